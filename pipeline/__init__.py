"""Recon3D reconstruction library: bundles in, textured meshes in the cameras' frame out.

This package never imports Ray or any web framework; the service wraps it.
"""

__version__ = "0.1.0"
