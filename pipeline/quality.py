"""The quality report (``quality.json``): per-view metrics, a status, mesh statistics and timings.

Status rule (thresholds configurable through :class:`QualityThresholds`):

- ``normal``  if masked PSNR >= ``psnr_normal`` and masked SSIM >= ``ssim_normal``;
- ``warning`` if masked PSNR >= ``psnr_warning`` and masked SSIM >= ``ssim_warning``;
- ``failure`` otherwise (also when a metric is missing). A failed report carries
  ``error = {code: "QUALITY_FAILED", message}``; the mesh files stay downloadable.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import trimesh
from pydantic import BaseModel, Field, model_validator

from .mesh import TexturedMesh
from .metrics import mean_dihedral_angle
from .reports import CameraEstimateReport, StageReport

Status = Literal["normal", "warning", "failure"]

#: Version of the quality.json layout; bump when a field changes meaning.
QUALITY_SCHEMA_VERSION = 1
#: Error code of a report whose status is ``failure``.
QUALITY_FAILED = "QUALITY_FAILED"


class QualityThresholds(BaseModel):
    """PSNR (dB) and SSIM thresholds of the status rule, on the masked metrics."""

    psnr_normal: float = Field(25.0, description="Masked PSNR (dB) at or above which a result can be 'normal'.")
    ssim_normal: float = Field(0.85, description="Masked SSIM at or above which a result can be 'normal'.")
    psnr_warning: float = Field(20.0, description="Masked PSNR (dB) below which a result is a 'failure'.")
    ssim_warning: float = Field(0.75, description="Masked SSIM below which a result is a 'failure'.")

    @model_validator(mode="after")
    def _ordered(self) -> QualityThresholds:
        if self.psnr_warning > self.psnr_normal or self.ssim_warning > self.ssim_normal:
            raise ValueError("warning thresholds must not exceed the normal thresholds")
        return self


def _ok(x: float | None) -> bool:
    return x is not None and not math.isnan(x)


def classify(psnr: float | None, ssim: float | None, thresholds: QualityThresholds | None = None) -> Status:
    """The status of a (masked PSNR in dB, masked SSIM) pair; missing or NaN values give ``failure``."""
    t = thresholds or QualityThresholds()
    if not (_ok(psnr) and _ok(ssim)):
        return "failure"
    if psnr >= t.psnr_normal and ssim >= t.ssim_normal:
        return "normal"
    if psnr >= t.psnr_warning and ssim >= t.ssim_warning:
        return "warning"
    return "failure"


class ViewMetrics(BaseModel):
    """Metrics of one input view (see :func:`pipeline.metrics.image_metrics`)."""

    name: str = Field(description="View name.")
    psnr: float | None = Field(description="PSNR (dB) over the union of input mask and rendered silhouette.")
    ssim: float | None = Field(description="SSIM averaged over the union of input mask and rendered silhouette.")
    psnr_full: float = Field(description="PSNR (dB) over the whole frame.")
    ssim_full: float = Field(description="SSIM over the whole frame.")
    depth_mae: float | None = Field(
        None, description="Mean absolute z-depth error (scene units) where both masks agree."
    )
    silhouette_iou: float | None = Field(None, description="IoU of the rendered silhouette and the input mask.")
    mask_pixels: int = Field(0, description="Pixels in the union mask.")
    width: int = Field(0, description="Width of the compared images (the working resolution), pixels.")
    height: int = Field(0, description="Height of the compared images, pixels.")
    status: Status = Field("failure", description="This view's status under the report's thresholds.")


class MeshStats(BaseModel):
    """Topology of the result (vertices welded by position first, so UV seams do not split it)."""

    vertices: int = Field(description="Vertices as stored (UV seams duplicate vertices).")
    faces: int = Field(description="Triangles.")
    components: int = Field(description="Connected components after welding vertices by position.")
    watertight: bool = Field(description="Every edge is shared by exactly two faces with consistent winding.")
    area: float = Field(description="Surface area, scene units squared.")
    bounds: list[list[float]] = Field(description="[[min x, y, z], [max x, y, z]] in world, scene units.")
    mean_dihedral_deg: float | None = Field(
        None,
        description="Surface roughness: edge-length-weighted mean angle between neighbouring faces' normals, "
        "degrees (pipeline.metrics.mean_dihedral_angle). A smooth surface scores a few degrees; a surface "
        "crumpled to fit the input views scores tens, whatever its PSNR.",
    )


class GeometryMetrics(BaseModel):
    """Surface agreement with a ground-truth mesh in the same frame (see :func:`pipeline.metrics.geometry_metrics`)."""

    chamfer_l1: float = Field(description="Mean of accuracy and completeness, scene units.")
    accuracy: float = Field(description="Mean distance from result samples to the GT surface, scene units.")
    completeness: float = Field(description="Mean distance from GT samples to the result surface, scene units.")
    f_score: float = Field(description="Harmonic mean of precision and recall at tau.")
    precision: float = Field(description="Fraction of result samples within tau of the GT.")
    recall: float = Field(description="Fraction of GT samples within tau of the result.")
    normal_consistency: float = Field(description="Mean |cos| between normals of nearest samples, both directions.")
    tau: float = Field(description="F-score threshold, scene units.")
    n_samples: int = Field(description="Surface samples per mesh.")


class QualityError(BaseModel):
    code: str = Field(QUALITY_FAILED, description="Stable error code.")
    message: str = Field(description="What failed and by how much.")


class QualityReport(BaseModel):
    """Content of ``quality.json``."""

    schema_version: int = Field(QUALITY_SCHEMA_VERSION, description="Layout version of this file.")
    status: Status = Field(description="normal, warning or failure under `thresholds`.")
    psnr: float | None = Field(description="Mean over views of the masked PSNR, dB.")
    ssim: float | None = Field(description="Mean over views of the masked SSIM.")
    psnr_full: float | None = Field(None, description="Mean over views of the full-frame PSNR, dB.")
    ssim_full: float | None = Field(None, description="Mean over views of the full-frame SSIM.")
    depth_mae: float | None = Field(None, description="Mean over views of the depth MAE, scene units.")
    silhouette_iou: float | None = Field(None, description="Mean over views of the silhouette IoU.")
    thresholds: QualityThresholds = Field(default_factory=QualityThresholds)
    per_view: list[ViewMetrics] = Field(default_factory=list)
    model: str = Field(description="Reconstruction model that made the mesh.")
    preset: str = Field(description="Preset it ran with.")
    timings: dict[str, float] = Field(default_factory=dict, description="Seconds per stage.")
    camera_estimate: dict = Field(default_factory=dict, description="How the cameras were resolved.")
    mesh: MeshStats
    geometry: GeometryMetrics | None = Field(
        None, description="Metrics against a ground-truth mesh, when one was given."
    )
    error: QualityError | None = Field(None, description="Set when status is failure.")

    @model_validator(mode="after")
    def _error_iff_failure(self) -> QualityReport:
        if (self.status == "failure") != (self.error is not None):
            raise ValueError("error must be set exactly when status is 'failure'")
        return self


def mesh_stats(mesh: TexturedMesh) -> dict:
    """Counts and topology of ``mesh`` (see :class:`MeshStats`)."""
    v = np.asarray(mesh.vertices, dtype=np.float64)
    f = np.asarray(mesh.faces, dtype=np.int64)
    stats = {"vertices": int(len(v)), "faces": int(len(f)), "components": 0, "watertight": False, "area": 0.0}
    stats["bounds"] = [v.min(0).tolist(), v.max(0).tolist()] if len(v) else [[0.0] * 3, [0.0] * 3]
    if len(f) == 0:
        return stats
    # process=True welds duplicate positions (UV seams), so components and watertightness see one surface.
    tm = trimesh.Trimesh(vertices=v, faces=f, process=True)
    stats["components"] = len(trimesh.graph.connected_components(tm.face_adjacency, nodes=np.arange(len(tm.faces))))
    stats["watertight"] = bool(tm.is_watertight)
    stats["area"] = float(tm.area)
    stats["mean_dihedral_deg"] = round(mean_dihedral_angle(v, f), 3)
    return stats


def _jsonable(obj):
    """Plain JSON types from nested dicts/lists that may hold numpy scalars and arrays."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(x) for k, x in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(x) for x in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _mean(values: list[float | None]) -> float | None:
    vals = [x for x in values if _ok(x)]
    return float(np.mean(vals)) if vals else None


def build_quality_report(
    per_view: list[dict],
    *,
    mesh: TexturedMesh,
    model: str,
    preset: str,
    timings: dict[str, float],
    camera_estimate: CameraEstimateReport | dict,
    thresholds: QualityThresholds | None = None,
    geometry: dict | None = None,
) -> QualityReport:
    """Assemble :class:`QualityReport` from :func:`pipeline.metrics.evaluate_views` output.

    Summary colour and depth metrics are means over views; the status applies the rule to
    the mean masked PSNR and SSIM. A view with no masked pixels counts as a failed view
    and leaves the means to the others.
    """
    t = thresholds or QualityThresholds()
    views = [ViewMetrics(**{**v, "status": classify(v.get("psnr"), v.get("ssim"), t)}) for v in per_view]
    psnr = _mean([v.psnr for v in views])
    ssim = _mean([v.ssim for v in views])
    status = classify(psnr, ssim, t)
    error = None
    if status == "failure":
        if psnr is None or ssim is None:
            msg = "no view could be compared with the mesh (empty render and mask)"
        else:
            msg = (
                f"the mesh re-renders poorly against the input views: masked PSNR {psnr:.2f} dB "
                f"and SSIM {ssim:.3f} (a usable result needs PSNR >= {t.psnr_warning:g} and SSIM >= {t.ssim_warning:g}); "
                f"worst view {min(views, key=lambda v: v.psnr if _ok(v.psnr) else -1.0).name!r}"
            )
        error = QualityError(message=msg)
    return QualityReport(
        status=status,
        psnr=psnr,
        ssim=ssim,
        psnr_full=_mean([v.psnr_full for v in views]),
        ssim_full=_mean([v.ssim_full for v in views]),
        depth_mae=_mean([v.depth_mae for v in views]),
        silhouette_iou=_mean([v.silhouette_iou for v in views]),
        thresholds=t,
        per_view=views,
        model=model,
        preset=preset,
        timings={k: float(x) for k, x in timings.items()},
        camera_estimate=_jsonable(
            camera_estimate.to_dict() if isinstance(camera_estimate, StageReport) else dict(camera_estimate or {})
        ),
        mesh=MeshStats(**mesh_stats(mesh)),
        geometry=GeometryMetrics(**geometry) if geometry is not None else None,
        error=error,
    )
