"""Posed frames: the typed hand-off from input preparation to fusion, texturing and metrics."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .camera import Camera
from .config import DepthEncoding
from .reports import CameraEstimateReport, DepthEncodingReport


@dataclass
class PosedView:
    """One view with its resolved camera and decoded depth.

    Attributes
    ----------
    name : str
    rgb : (H, W, 3) uint8, the full-resolution photo
    camera : Camera at (W, H)
    depth : (h, w) float32, z-depth in scene units, 0 where invalid (working resolution)
    mask : (h, w) bool, foreground (working resolution)
    depth_camera : Camera, ``camera`` scaled to (w, h)
    depth_encoding : DepthEncoding or None, how ``depth`` was decoded (None: no depth)
    free_depth : (h, w) float32 or None; at foreground pixels whose depth the encoding clipped at
        ``far`` (``depth`` 0 there), the z-depth up to which the ray is known to be empty (the
        surface lies at or beyond it); 0 elsewhere. None: no clipped pixel
    """

    name: str
    rgb: np.ndarray
    camera: Camera
    depth: np.ndarray
    mask: np.ndarray
    depth_camera: Camera
    depth_encoding: DepthEncoding | None = None
    free_depth: np.ndarray | None = None


@dataclass
class PosedFrames:
    """All views of a bundle, posed and decoded, plus the reports of how cameras and depth were resolved."""

    views: list[PosedView]
    camera_estimate: CameraEstimateReport = field(default_factory=CameraEstimateReport)
    depth_encoding: DepthEncodingReport = field(default_factory=DepthEncodingReport)
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self):
        # Callers that build frames by hand (tests, benchmarks) may pass the reports' dict form.
        self.camera_estimate = CameraEstimateReport.coerce(self.camera_estimate) or CameraEstimateReport()
        self.depth_encoding = DepthEncodingReport.coerce(self.depth_encoding) or DepthEncodingReport()

    @property
    def cameras(self) -> list[Camera]:
        return [v.camera for v in self.views]

    @property
    def depth_cameras(self) -> list[Camera]:
        return [v.depth_camera for v in self.views]

    def resolved_views(self) -> list[dict]:
        """Per view, the camera (at photo resolution) and depth encoding actually used.

        JSON-serialisable; ``prepare_frames(..., resolved=...)`` accepts it back, so later
        stages (metrics, previews, other processes) rebuild these frames without re-estimating.
        """
        return [
            {
                **v.camera.to_dict(),
                "depth_encoding": v.depth_encoding.to_dict() if v.depth_encoding is not None else None,
            }
            for v in self.views
        ]
