"""The Recon3D HTTP service on Ray Serve: ingress, job scheduler, storage and client.

``serve_app.client`` needs only httpx; everything else needs the ``serve`` extra.
"""
