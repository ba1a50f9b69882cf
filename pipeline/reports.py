"""Stage reports: how each stage of a reconstruction went, as typed objects.

Each report is one section of ``result.json`` (docs/API.md):

- :class:`CameraEstimateReport` (``camera_estimate``): how the cameras were resolved
  (:func:`pipeline.prepare.prepare_frames`, :func:`pipeline.rig.estimate_rig`);
- :class:`DepthEncodingReport` (``depth_encoding``): how the depth PNGs were decoded
  (:func:`pipeline.depth_calibration.estimate_depth_encodings`);
- :class:`GeometryReport` (``geometry``): the fused surface (:func:`pipeline.fusion.reconstruct_geometry`);
- :class:`CameraRefinementReport` (``camera_refinement``, :mod:`pipeline.camera_refine`);
- :class:`PhotoRefinementReport` (``photo_refinement``, :mod:`pipeline.photo_refine`);
- :class:`RefineReport` (``refine``, :mod:`pipeline.refine`).

A report's JSON form (:meth:`StageReport.to_dict`) holds the fields in declaration order and
leaves out those that are None, except where None is a value (``_keeps_none``). Keys a report does not declare (a result.json written by another version) are kept in
``extra`` and written back as they came, so reading and rewriting a result.json never loses
content. Reports can also be read by key (``report["method"]``, ``report.get("far")``), like
the dicts they replace.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

R = TypeVar("R", bound="StageReport")


@dataclass
class StageReport:
    """Base of the stage reports: JSON form, reading back, read access by key."""

    def _keeps_none(self, name: str) -> bool:
        """Whether field ``name`` is written when None (None is a value there)."""
        return False

    def to_dict(self) -> dict:
        """The JSON form: declared fields in order (None left out unless kept), then ``extra``."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if value is None and not self._keeps_none(f.name):
                continue
            out[f.name] = _plain(value)
        out.update(_plain(getattr(self, "extra", None) or {}))
        return out

    @classmethod
    def from_dict(cls: type[R], d: dict) -> R:
        """A report from its JSON form; undeclared keys go to ``extra``."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        return cls(**known, extra=extra)

    @classmethod
    def coerce(cls: type[R], value: R | dict | None) -> R | None:
        """``value`` as this report type (a dict is read with :meth:`from_dict`; None stays None)."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, StageReport):
            value = value.to_dict()
        if not isinstance(value, dict):
            raise TypeError(f"{cls.__name__} expects a dict or a {cls.__name__}, got {type(value).__name__}")
        return cls.from_dict(value)

    # Read access by key, for readers written against the dict form (result.json's keys).
    def __getitem__(self, key: str) -> Any:
        d = self.to_dict()
        if key not in d:
            raise KeyError(key)
        return d[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)

    def __contains__(self, key: str) -> bool:
        return key in self.to_dict()

    def keys(self):
        return self.to_dict().keys()


@dataclass
class CameraEstimateReport(StageReport):
    """How the cameras were resolved (result.json ``camera_estimate``).

    ``method``: ``given`` (transforms.json), ``resolved`` (an earlier run's cameras),
    ``silhouette_carving`` (the rig estimated from the masks) or ``default_rig``.
    """

    method: str | None = None
    source: str | None = None
    """Where given cameras came from (``transforms.json``, ``an earlier run``)."""
    fov_x_deg: float | None = None
    """Horizontal field of view of the rig, degrees (estimated or the default rig's)."""
    distance: float | None = None
    """Camera distance of the rig, scene units (not determined by silhouettes: the nominal one)."""
    layout: list[str] | None = None
    """The view-to-axis assignments chosen (``["default"]`` when none changed)."""
    layout_vectors: dict[str, dict] | None = None
    """Per view: ``direction`` and ``image_up``, world (3,) each."""
    score_mean_iou: float | None = None
    """Mean silhouette IoU of the carved hull re-projected into the views."""
    per_view_iou: dict[str, float] | None = None
    fov_candidates: dict[str, float] | None = None
    """Field of view tried (degrees, as a string) -> mean IoU."""
    layout_candidates: dict[str, float] | None = None
    search_crop_px: list[int] | None = None
    """x0, y0, width, height of the square the search ran on, photo pixels."""
    carve_resolution: int | None = None
    uncertain: bool | None = None
    """True when no rig explains the silhouettes well (warning CAMERAS_UNCERTAIN)."""
    seconds: float | None = None
    refinement: dict | None = None
    """Added by :func:`pipeline.camera_refine.refine_cameras`: its method and per-view corrections."""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class DepthEncodingReport(StageReport):
    """How the depth PNGs were decoded (result.json ``depth_encoding``).

    ``method``: ``given`` / ``default`` (the stated or documented encoding, kept),
    :data:`pipeline.depth_calibration.HULL_FIT_METHOD` (an estimate replaced it) or ``resolved``.
    """

    method: str | None = None
    source: str | None = None
    """Where the encoding came from (a file of the bundle, ``default``, ``estimated``)."""
    choice: str | None = None
    """The candidate chosen (``prior``, ``shared_scale``, ...)."""
    reason: str | None = None
    """Why the prior was kept without a check."""
    kind: str | None = None
    near: float | None = None
    """z of raw value 0, scene units (the encoding used, when one for all views)."""
    far: float | None = None
    """z of raw value ``max_value``, scene units."""
    prior: dict | None = None
    """The stated or default encoding the estimate started from (``DepthEncoding.to_dict()``)."""
    tolerance: float | None = None
    """Depth tolerance of the checks, scene units."""
    candidates: dict[str, dict] | None = None
    """Candidate name -> its near/far (or per-view pairs) and scores."""
    per_view: dict[str, dict] | None = None
    """View name -> ``near``, ``far`` of the encoding used."""
    max_value: float | None = None
    background: float | None = None
    uncertain: bool | None = None
    warning: str | None = None
    """DEPTH_ENCODING_UNCERTAIN's text, when uncertain."""
    seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class GeometryReport(StageReport):
    """The fused surface (result.json ``geometry``); another model may fill only ``method``."""

    method: str | None = None
    device: str | None = None
    grid: dict | None = None
    """The TSDF grid (``VoxelGrid.to_dict()``: lo, spacing, shape)."""
    voxel_size: float | None = None
    """Scene units."""
    truncation: float | None = None
    """TSDF truncation distance, scene units."""
    depth_pixels_used_fraction: float | None = None
    clipped_pixels_carved: int | None = None
    """Depth pixels at the encoding's clip value, used only as free space up to ``far``."""
    samples_evaluated_fraction: float | None = None
    marching_cubes_faces: int | None = None
    components: int | None = None
    components_removed: int | None = None
    fragments_removed_after_decimation: int | None = None
    non_manifold_edges: int | None = None
    faces_removed_with_components: int | None = None
    vertices: int | None = None
    faces: int | None = None
    bounds: dict | None = None
    """``lo``, ``hi``: (3,) world bounds of the mesh."""
    timings_s: dict[str, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class CameraRefinementReport(StageReport):
    """Rigid camera corrections (result.json ``camera_refinement``)."""

    enabled: bool = False
    applied: bool = False
    reason: str | None = None
    """Why nothing was refined (``disabled``, given cameras, ...)."""
    levels: list[dict] | None = None
    """Per image-size level: the fit's losses."""
    views: list[dict] | None = None
    """Per view: ``name``, ``rotation_deg``, ``translation_px`` (working pixels)."""
    seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class PhotoRefinementReport(StageReport):
    """Photo-consistency surface refinement (result.json ``photo_refinement``)."""

    enabled: bool = False
    passes: list[dict] = field(default_factory=list)
    """Per pass: pixel size, step, vertex counts, offsets, ``image_size``."""
    mean_abs_offset: float | None = None
    """Scene units, along the normals."""
    max_abs_offset: float | None = None
    seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class RefineReport(StageReport):
    """Differentiable-rendering refinement (result.json ``refine``, the nvdiffrec model).

    A run that did not converge has only ``error`` and ``fallback``.
    """

    loss_curve: list[float | None] | None = None
    terms: dict[str, list] | None = None
    iterations: int | None = None
    stop_reason: str | None = None
    """``converged``, ``iterations`` or ``time_budget``."""
    time_s: float | None = None
    device: str | None = None
    backend: str | None = None
    resolution: int | None = None
    """Render size, longest side, pixels."""
    visibility_updates: Any = None
    silhouette_iou: Any = None
    oom_retry: bool | None = None
    depth_weight: float | None = None
    settled_from_iteration: int | None = None
    """Where a stalled loss switched the rest to the final learning rate (None: it did not)."""
    vertex_offset_max: float | None = None
    coarse_pass: dict | None = None
    """The coarse pass's iterations, stop_reason, time_s, resolution, oom_retry."""
    mean_dihedral_deg: dict[str, float] | None = None
    input_view_psnr: dict[str, float | None] | None = None
    """Masked PSNR of each mesh at the views the refinement trained on."""
    held_out_views: list[str] | None = None
    """Views the refinement did not train on (``pipeline.refine_selection``)."""
    selected_by: str | None = None
    """``held_out_views`` or ``input_views``: which views judged refined against fusion."""
    held_out_psnr: dict[str, float | None] | None = None
    """Masked PSNR of each mesh at ``held_out_views`` (None when none was held out)."""
    returned: str | None = None
    """``refined`` or ``fusion``: which mesh the model returned."""
    error: dict | None = None
    """A failed refinement's error (code, message, details)."""
    fallback: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def _keeps_none(self, name: str) -> bool:
        # A finished run always states where it settled (None: never); a failed one has no such key.
        if name == "held_out_psnr":
            return self.selected_by is not None
        return name == "settled_from_iteration" and self.loss_curve is not None


def _plain(value: Any) -> Any:
    """Plain JSON types (numpy scalars and arrays become numbers and lists, paths strings)."""
    import numpy as np

    if isinstance(value, StageReport):
        return value.to_dict()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return value
