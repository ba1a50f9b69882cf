"""Ray tasks of experiments (kept apart so the rest of the package imports without Ray)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import ray

from deployments.store import Store


@ray.remote
def geometry_metrics_task(store: Store, mesh_key: str, gt_glb: bytes) -> dict:
    """pipeline.metrics.geometry_metrics of the run's mesh.glb (from the store) against the GT mesh bytes."""
    from pipeline.export import load_mesh
    from pipeline.metrics import geometry_metrics

    with tempfile.TemporaryDirectory(prefix="recon3d-geom-") as tmp:
        mesh_path, gt_path = Path(tmp) / "mesh.glb", Path(tmp) / "gt.glb"
        mesh_path.write_bytes(store.get(mesh_key))
        gt_path.write_bytes(gt_glb)
        mesh, gt = load_mesh(mesh_path), load_mesh(gt_path)
    return geometry_metrics(mesh.vertices, mesh.faces, gt.vertices, gt.faces)
