"""``result.json``: what one reconstruction produced, as one typed object.

:class:`ReconstructionResult` is written once (:meth:`ReconstructionResult.write`) by whoever
finishes the run: the CLI's :func:`pipeline.reconstruct.reconstruct_bundle`, or the model
deployment after it added the run's ``resources``. Every reader (the deployment, the
scheduler, the fan-out, experiments) reads it back with :meth:`ReconstructionResult.read`.
The resolved config travels in it (``config``), so an evaluation of the result uses exactly
the working resolution and overrides the model used, without resolving a preset again.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ReconstructConfig
from .reports import (
    CameraEstimateReport,
    CameraRefinementReport,
    DepthEncodingReport,
    GeometryReport,
    PhotoRefinementReport,
    RefineReport,
    StageReport,
)

RESULT_FILE = "result.json"
#: Keys written only when they hold something (the CLI's evaluation, nvdiffrec, the deployment).
_OPTIONAL = ("refine", "quality", "previews", "resources")


@dataclass
class MeshSummary:
    vertices: int = 0
    faces: int = 0
    texture_size: int = 0
    """Side of the square texture, pixels (0 = no texture)."""


@dataclass
class QualitySummary:
    """The headline of quality.json."""

    status: str
    psnr: float | None = None
    ssim: float | None = None
    failed_views: list[str] = field(default_factory=list)


@dataclass
class ReconstructionResult:
    """The content of result.json."""

    model: str
    recon3d_version: str = ""
    preset: str = ""
    device: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    """The resolved :class:`~pipeline.config.ReconstructConfig` (preset + overrides), ``to_dict()`` form."""
    views: list[str] = field(default_factory=list)
    camera_estimate: CameraEstimateReport | None = None
    cameras: list[dict] | None = None
    """Resolved cameras and depth encodings per view (``PosedFrames.resolved_views``), reused by evaluation."""
    depth_encoding: DepthEncodingReport | None = None
    geometry: GeometryReport | None = None
    camera_refinement: CameraRefinementReport | None = None
    photo_refinement: PhotoRefinementReport | None = None
    mesh: MeshSummary = field(default_factory=MeshSummary)
    warnings: list[str] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    refine: RefineReport | None = None
    quality: QualitySummary | None = None
    previews: dict[str, list[str]] | None = None
    resources: dict | None = None
    """Peak memory of the run (added by the model deployment)."""

    def __post_init__(self):
        # The stage reports are typed; their dict form (a model's own report, result.json) is read into them.
        for name, report_cls in _REPORTS.items():
            setattr(self, name, report_cls.coerce(getattr(self, name)))

    def resolved_config(self) -> ReconstructConfig:
        """The config the run used, typed (a runner that wrote none: its preset's)."""
        if self.config:
            return ReconstructConfig.from_dict(self.config)
        from .config import get_preset

        return get_preset(self.preset or "balanced")

    def to_dict(self) -> dict:
        d = _json_safe({f.name: _section(getattr(self, f.name)) for f in dataclasses.fields(self)})
        for k in _OPTIONAL:
            if d.get(k) is None:
                d.pop(k, None)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ReconstructionResult:
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if isinstance(kw.get("mesh"), dict):
            kw["mesh"] = MeshSummary(**kw["mesh"])
        if isinstance(kw.get("quality"), dict):
            q = kw["quality"]
            kw["quality"] = QualitySummary(**{k: q[k] for k in ("status", "psnr", "ssim", "failed_views") if k in q})
        return cls(**kw)

    def write(self, out_dir: str | Path) -> Path:
        """Write ``result.json`` into ``out_dir``; returns its path."""
        path = Path(out_dir) / RESULT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def read(cls, path_or_bytes: str | Path | bytes) -> ReconstructionResult:
        """Read a result.json (a path, or its bytes from a store)."""
        raw = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
        return cls.from_dict(json.loads(raw))


#: The stage reports' sections of result.json and their types (:mod:`pipeline.reports`).
_REPORTS: dict[str, type[StageReport]] = {
    "camera_estimate": CameraEstimateReport,
    "depth_encoding": DepthEncodingReport,
    "geometry": GeometryReport,
    "camera_refinement": CameraRefinementReport,
    "photo_refinement": PhotoRefinementReport,
    "refine": RefineReport,
}


def _section(value: Any) -> Any:
    """A field's JSON form: a report's :meth:`~pipeline.reports.StageReport.to_dict`, a dataclass's fields."""
    if isinstance(value, StageReport):
        return value.to_dict()
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return value


def _json_safe(obj: Any) -> Any:
    """Plain JSON types: numpy scalars and arrays become numbers and lists, paths strings."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return obj
