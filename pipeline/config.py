"""Typed stage configs and named presets.

Every field states its unit. Configs are frozen; derive variants with
``dataclasses.replace``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

from .errors import InvalidInputError

Device = Literal["auto", "cpu", "cuda"]


@dataclass(frozen=True)
class DepthEncoding:
    """How depth PNG values map to z-depth along the optical axis (scene units).

    ``z = near + value / max_value * (far - near)`` for ``value != background``.
    """

    kind: Literal["zdepth_linear"] = "zdepth_linear"
    near: float = 0.0
    """z of value 0, scene units."""
    far: float = 2.5
    """z of value ``max_value``, scene units."""
    max_value: float = 255.0
    """The PNG value that encodes ``far`` (255 for 8-bit, 65535 for 16-bit)."""
    background: float = 0.0
    """The PNG value that marks background pixels."""

    @classmethod
    def from_dict(cls, d: dict, *, where: str = "depth_encoding") -> DepthEncoding:
        if not isinstance(d, dict):
            raise InvalidInputError(f"{where} must be an object", code="INVALID_TRANSFORMS", details={"field": where})
        unknown = set(d) - {"kind", "near", "far", "max_value", "background"}
        if unknown:
            raise InvalidInputError(
                f"{where} has unknown keys {sorted(unknown)}", code="INVALID_TRANSFORMS", details={"field": where}
            )
        if d.get("kind", "zdepth_linear") != "zdepth_linear":
            raise InvalidInputError(
                f"{where}.kind {d.get('kind')!r} is not supported; use 'zdepth_linear'",
                code="INVALID_TRANSFORMS",
                details={"field": f"{where}.kind"},
            )
        try:
            enc = cls(**{k: (float(v) if k != "kind" else v) for k, v in d.items()})
        except (TypeError, ValueError, OverflowError) as e:
            raise InvalidInputError(f"{where}: {e}", code="INVALID_TRANSFORMS", details={"field": where}) from None
        if not all(math.isfinite(v) for v in (enc.near, enc.far, enc.max_value, enc.background)):
            raise InvalidInputError(
                f"{where} needs finite numbers", code="INVALID_TRANSFORMS", details={"field": where}
            )
        if not (enc.far > enc.near >= 0.0) or enc.max_value <= 0:
            raise InvalidInputError(
                f"{where} needs far > near >= 0 and max_value > 0", code="INVALID_TRANSFORMS", details={"field": where}
            )
        return enc

    def to_dict(self) -> dict:
        return asdict(self)


DEFAULT_DEPTH_ENCODING = DepthEncoding()


@dataclass(frozen=True)
class CameraConfig:
    """How cameras are resolved when the bundle has no transforms.json."""

    estimate_rig: bool = True
    """Refine the default rig's field of view and check its view assignment by silhouette consistency."""
    fov_search_deg: tuple[float, float] = (40.0, 80.0)
    """Range of horizontal fields of view searched, degrees."""
    carve_resolution: int = 64
    """Voxels per axis of the silhouette carving grid."""
    estimate_depth_encoding: bool = True
    """Fit the depth encoding against the silhouette hull when the bundle does not state one."""


@dataclass(frozen=True)
class FusionConfig:
    """TSDF fusion of the depth maps, bounded by the silhouette hull."""

    resolution: int = 192
    """Voxels along the longest side of the object's bounding box."""
    truncation_voxels: float = 4.0
    """TSDF truncation distance, in voxels."""
    hull_tolerance_px: float = 0.25
    """The masks are widened by this much before their hull bounds the surface, pixels at the working
    resolution (so slightly wrong cameras do not carve into the object). Every pixel of widening shows
    up as a rim of background-coloured texels in the re-renders: 1.0 cost spot 3.3 dB of PSNR and 0.006
    of F-score against 0.25; 0 is tighter still but loses the box's edge pixels."""
    min_component_fraction: float = 0.02
    """Connected components with fewer faces than this fraction of the largest are removed."""
    smooth_iterations: int = 24
    """Taubin smoothing passes applied after marching cubes (removes 8-bit banding)."""
    target_faces: int = 20_000
    """Face count after decimation. The texture carries the fine detail: on the benchmark bundles
    20k faces score the same F-score, normal consistency and PSNR as 40k."""


@dataclass(frozen=True)
class TextureConfig:
    """UV atlas and texture baking."""

    size: int = 2048
    """Texture width and height, pixels."""
    padding_px: int = 4
    """Gutter between UV charts, pixels; baked colours are dilated into it."""
    angle_power: float = 4.0
    """Per-view weight is cos(angle between normal and view ray) ** angle_power."""
    depth_tolerance: float = 0.01
    """Visibility test tolerance, as a fraction of the object's largest extent."""
    xatlas_timeout_s: float = 120.0
    """Wall-clock limit of the isolated UV-atlas process, seconds."""
    fit_iterations: int = 10
    """Most conjugate-gradient iterations of the least-squares texture fit (:mod:`pipeline.texture_solve`)
    that corrects the blended bake so its re-renders match the photos; 0 keeps the blended bake."""
    fit_prior: float = 0.1
    """Fit: weight of the pull towards the blended bake, relative to each texel's own data weight."""
    fit_smoothness: float = 2.0
    """Fit: weight of the smoothness of the correction between neighbouring texels, relative to their data weight."""


@dataclass(frozen=True)
class PhotoRefineConfig:
    """Photo-consistency refinement of the fused surface before texturing (:mod:`pipeline.photo_refine`)."""

    enabled: bool = False
    """Run the stage; off, the fused surface goes to texturing unchanged. Off by default: on the
    benchmark bundles it does not yet raise the re-render PSNR (see bench/photo_refine.py)."""
    pass_image_sizes: tuple[int, ...] = (256, 512, 1024)
    """One pass per entry, coarse to fine: the photos' size (longest side, pixels) for that pass,
    capped at the working resolution."""
    search_steps: int = 6
    """Offsets tried per pass along each normal: ``k * step`` for ``k`` in ``[-search_steps, search_steps]``."""
    step_px: float = 1.0
    """Offset step, pixels of the pass's images at the object's distance."""
    blur_px: float = 1.0
    """Gaussian blur sigma applied to the pass's images, pixels (widens the basin of attraction)."""
    patch_radius: int = 0
    """Colour patches of (2r+1)^2 samples in the tangent plane, compared by normalised cross-correlation;
    0 compares single blurred colours by their variance."""
    patch_spacing_px: float = 1.5
    """Distance between patch samples, pixels of the pass's images at the object's distance."""
    angle_power: float = 1.0
    """A view's colour weight for a vertex is cos(normal, view ray) ** angle_power."""
    smoothness: float = 4.0
    """Weight of the graph-Laplacian term of the offset solve; the offset field varies over about
    sqrt(smoothness) mesh edges (larger: smoother)."""
    anchor: float = 0.05
    """Pull of every offset towards 0, relative to a typical vertex's photo confidence (vertices with
    no data stay where they are)."""
    photo_weight: float = 1.0
    """Weight of the colour targets (0: only the silhouette constraint moves vertices)."""
    silhouette_weight: float = 2.0
    """Confidence of the mask-edge target of a silhouette-generating vertex, per view, relative to a
    typical photo confidence."""
    move_prior: float = 0.1
    """Relative cost added at the largest offset (quadratic in the offset): ties go to small moves."""
    max_offset_px: float = 24.0
    """Largest total move of a vertex, pixels at the working resolution and the object's distance."""


@dataclass(frozen=True)
class CameraRefineConfig:
    """Per-view rigid refinement of ESTIMATED cameras against the fused surface (:mod:`pipeline.camera_refine`).

    Given cameras (transforms.json) are never changed.
    """

    enabled: bool = False
    """Run the stage for bundles whose cameras were estimated (off by default: +0.3 dB on the
    sneaker for a second fusion, see bench/photo_refine.py)."""
    level_image_sizes: tuple[int, ...] = (256, 512)
    """Coarse-to-fine levels: the photos' size (longest side, pixels), capped at the working resolution."""
    iterations: int = 60
    """Adam steps per level."""
    learning_rate: float = 0.3
    """Adam step, in pixels of the level's images (rotations: pixels at the object's distance)."""
    blur_px: float = 1.5
    """Gaussian blur sigma of the level's images, pixels."""
    angle_power: float = 1.0
    """A view's colour weight for a vertex is cos(normal, view ray) ** angle_power."""
    silhouette_weight: float = 1.0
    """Weight of the silhouette term (mean squared shortfall of the bilinear mask value below 0.5 at the vertices)."""
    prior_weight: float = 1e-5
    """Weight of the squared corrections (level pixels) that keeps them small."""
    refuse: bool = True
    """Fuse the depth maps again with the refined cameras (else only texturing uses them)."""


@dataclass(frozen=True)
class RefineConfig:
    """Differentiable-rendering refinement of a textured mesh (the ``nvdiffrec`` model, :mod:`pipeline.refine`)."""

    iterations: int = 400
    """Largest number of optimisation steps."""
    resolution: int = 512
    """Render size, pixels along the longest image side (capped at the views' working resolution)."""
    optimizer: Literal["uniform_adam", "adam"] = "uniform_adam"
    """"uniform_adam" (:class:`pipeline.optim.UniformAdam`): one step normaliser per tensor, so vertices
    and texels the photos barely constrain move little. "adam" normalises every entry on its own: those
    then move as far as the rest, which crumples the surface and speckles the texture at other angles
    (spot at ``balanced``: normal consistency 0.927 against 0.966, held-out-view SSIM 0.919 against 0.965)."""
    lr_vertices: float = 3e-4
    """Step for vertex offsets, as a fraction of the start mesh's bounding-box diagonal (with
    "uniform_adam", the step of the vertex whose gradient is largest)."""
    lr_texture: float = 3e-3
    """Step for kd texels, colour units in [0, 1] (with "uniform_adam", that of the largest-gradient texel
    of each correction level)."""
    lr_final_fraction: float = 0.1
    """Both learning rates decay exponentially to this fraction of their start at ``iterations``."""
    photometric_loss: Literal["l1", "l2"] = "l2"
    """Per-pixel colour error: "l2" fits the mean colour (what PSNR scores), "l1" the median (robust to outliers)."""
    ssim_weight: float = 0.05
    """Weight of the structural term, 1 - SSIM averaged over the masked pixels (keeps texture contrast
    where views disagree, which a pure colour error would average away)."""
    laplacian_weight: float = 20.0
    """Weight of the uniform-Laplacian term relative to the start mesh (keeps the surface smooth)."""
    mask_weight: float = 1.0
    """Weight of the silhouette term."""
    depth_weight: float = 10.0
    """Weight of the depth term (smooth L1 of z-depth over the bounding-box diagonal) when the depth
    encoding is the bundle's own (stated, or the contract's default): the depth maps are measurements."""
    estimated_depth_weight: float = 0.0
    """Weight of the depth term when the depth encoding was estimated (fitted against the silhouette
    hull): the decoded depth is then a prior the photos contradict by a few pixels, and pulling towards
    it held the sneaker's surface back (fast: 22.1 dB at weight 10, 23.0 at 0)."""
    time_budget_s: float = 600.0
    """Wall-clock limit of the optimisation loop, seconds; the loop stops (without error) when reached."""
    convergence_tol: float = 2e-3
    """Stop when the mean loss of the last window improves on the window before by less than this fraction."""
    convergence_window: int = 25
    """Iterations per window of the convergence test."""
    visibility_interval: int = 2
    """CPU backend: re-run the exact (embree) visibility every this many iterations (5 left the
    silhouettes stale long enough to cost spot 0.2 dB and the sneaker 0.3 dB at ``fast``)."""
    smoothing_steps: int = 1
    """Laplacian diffusion passes applied to the optimised vertex offsets (larger: smoother, more global
    moves; on the sneaker 8 passes held the surface too stiff to follow the photos: 2.7 dB less at ``fast``).
    Not applied when ``vertex_smoothness`` > 0, whose exact filter replaces them."""
    vertex_smoothness: float = 0.0
    """lambda of the smooth vertex parametrisation ``x = x0 + (I + lambda L)^-1 u``
    (:mod:`pipeline.smooth_param`), replacing the ``smoothing_steps`` passes; 0 optimises the offsets
    directly. For starts that are globally off (a scale error): on the test sphere's 6% scale error,
    100 with ``lr_vertices=1e-3`` brought the radius error from 0.024 to 0.0014 and kept the surface
    smooth, where direct offsets reached 0.017 and roughened it (2.5 -> 10.5 degrees). Off by default: on fusion starts, whose errors are local,
    it gained nothing (sneaker at ``fast`` 20.2-20.3 dB, as without) and cost spot 0.2-0.8 dB."""
    coarse_resolution: int = 0
    """Render size of a first, coarser pass whose result the main pass starts from (0: no such pass).
    A coarse pass sees misplaced detail within its wider pixels, where the main pass's photometric
    gradients, a pixel or two wide, would not reach it."""
    coarse_iterations: int = 150
    """Largest number of steps of the coarse pass."""
    coarse_lr_vertices: float = 3e-4
    """Vertex step of the coarse pass (fraction of the bounding-box diagonal)."""
    held_out_views: int = 1
    """Input views the refinement does not train on (:mod:`pipeline.refine_selection` picks those whose
    surface the other views see most of); the refined mesh is returned only where it scores a higher
    masked PSNR than the fusion mesh at them. 0 trains on every view and compares at the input views,
    which rewards fitting them (unseen objects: +0.8 dB at the inputs, +0.09 dB at other views)."""
    supersample: int = 2
    """Each step renders the mean of ``supersample`` x ``supersample`` sub-pixel samples per pixel, as
    the quality report does (``pipeline.metrics.METRICS_SUPERSAMPLE``). 1 renders pixel centres: a
    texture fitted to those leaves the texels between them free, and the report's render shows them
    as speckle (spot at ``balanced``: 31.5 dB refined at 1, 32.2 at 2; fusion 32.1)."""


REFINE_PRESETS: dict[str, RefineConfig] = {
    # Render at the preset's working resolution: the masked PSNR is measured there, and
    # silhouettes fitted at half of it stay a pixel off.
    "fast": RefineConfig(iterations=150, resolution=512, time_budget_s=150.0, convergence_window=15),
    # The sneaker: 150 steps at 512², then 200 at 1024² with vertex step 6e-4 (depth term off).
    "balanced": RefineConfig(
        iterations=200, resolution=1024, lr_vertices=6e-4, time_budget_s=600.0, coarse_resolution=512
    ),
    "quality": RefineConfig(iterations=600, resolution=2048, time_budget_s=1800.0, convergence_window=40),
}


@dataclass(frozen=True)
class ReconstructConfig:
    """Everything one reconstruction needs."""

    preset: str = "balanced"
    device: Device = "auto"
    camera: CameraConfig = field(default_factory=CameraConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    texture: TextureConfig = field(default_factory=TextureConfig)
    camera_refine: CameraRefineConfig = field(default_factory=CameraRefineConfig)
    """Per-view refinement of estimated cameras (after a first fusion; then the geometry is fused again)."""
    photo_refine: PhotoRefineConfig = field(default_factory=PhotoRefineConfig)
    """Photo-consistency refinement of the fused surface (between geometry and texture)."""
    refine: RefineConfig = field(default_factory=lambda: REFINE_PRESETS["balanced"])
    """Differentiable-rendering refinement (the ``nvdiffrec`` model only)."""
    max_working_resolution: int = 1024
    """Images are processed at most at this size (longest side, pixels); textures sample the full-resolution photos."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ReconstructConfig:
        """The config :meth:`to_dict` wrote (result.json's ``config``): the same tree of frozen dataclasses."""
        return _dataclass_from_dict(cls, d)


def _dataclass_from_dict(cls: type, d: dict):
    """Rebuild dataclass ``cls`` from ``asdict`` output: nested dataclasses recursively, lists back to tuples."""
    import dataclasses
    import typing

    if not isinstance(d, dict):
        raise InvalidInputError(f"{cls.__name__} expects an object, got {type(d).__name__}", code="INVALID_CONFIG")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        hint, value = hints.get(f.name), d[f.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            value = _dataclass_from_dict(hint, value)
        elif typing.get_origin(hint) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


PRESETS: dict[str, ReconstructConfig] = {
    "fast": ReconstructConfig(
        preset="fast",
        fusion=FusionConfig(resolution=128, target_faces=10_000, smooth_iterations=12),
        texture=TextureConfig(size=1024),
        refine=REFINE_PRESETS["fast"],
        max_working_resolution=512,
    ),
    "balanced": ReconstructConfig(preset="balanced"),
    "quality": ReconstructConfig(
        preset="quality",
        # 8-bit depth terraces span more voxels at 256^3: 72 passes (spot NC 0.939 -> 0.955, F unchanged).
        fusion=FusionConfig(resolution=256, target_faces=60_000, smooth_iterations=72),
        texture=TextureConfig(size=4096),
        refine=REFINE_PRESETS["quality"],
        max_working_resolution=2048,
    ),
}

PRESET_DESCRIPTIONS: dict[str, str] = {
    "fast": "128^3 fusion, 10k faces, 1024^2 texture: previews and tests.",
    "balanced": "192^3 fusion, 20k faces, 2048^2 texture: the default.",
    "quality": "256^3 fusion, 60k faces, 4096^2 texture, 72 smoothing passes: the most detail.",
}


def get_preset(name: str, *, device: Device = "auto") -> ReconstructConfig:
    """The named preset, with ``device`` set. Unknown names raise InvalidInputError listing the valid ones."""
    if name not in PRESETS:
        raise InvalidInputError(
            f"unknown preset {name!r}; choose one of {sorted(PRESETS)}", code="UNKNOWN_PRESET", details={"preset": name}
        )
    return replace(PRESETS[name], device=device)
