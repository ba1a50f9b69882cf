"""Texture baking: project the views' photos onto a UV-atlased mesh into one diffuse texture.

Steps (all vectorised in torch, on the GPU when the CUDA rasterizer is used):

1. :func:`~pipeline.uv_atlas.start_uv_atlas` cuts the mesh into charts (isolated xatlas process);
   while it runs, each view is rendered (:func:`render_bake_views`: what the bake needs of a view
   that does not depend on the UVs).
2. :func:`rasterize_uv` fills every texel whose centre lies in a UV triangle with that
   triangle's id and barycentrics, giving each texel a world position and a normal.
3. For each view, texels are projected into the camera. A texel counts when it is in
   front of the view's rendered depth of *our* mesh (occlusion), inside the view's
   eroded foreground mask (no photographed background), and it is weighted by
   ``cos(normal, ray) ** angle_power`` times a ramp that fades texels near the
   silhouette edge, where cameras that are slightly off would paint background.
4. Texels no view sees get colours diffused over the mesh surface from seen neighbours
   (:func:`fill_unseen_from_surface`), never from the background.
5. The gutters and the empty atlas space take the colour of the nearest chart texel
   (:func:`fill_empty_texels`), so bilinear lookups and mip levels never mix in an
   undefined or background colour.
6. The least-squares fit (:mod:`pipeline.texture_solve`) corrects that blend so that its
   re-renders at the input cameras match the photos: every foreground pixel of every view
   (at the working resolution, but the outermost; weighted by the cosine of its viewing angle)
   is a bilinear lookup into the texture, and a smooth correction on a grid of about one node
   per input pixel is solved by conjugate gradients (``TextureConfig.fit_*``; 0 iterations
   keep the blend).

Texture convention (as :class:`~pipeline.mesh.TexturedMesh`): row 0 is the top; the
texel in row ``i``, column ``j`` has its centre at ``u = (j + 0.5) / T``,
``v = 1 - (i + 0.5) / T``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from .callbacks import ProgressFn
from .config import TextureConfig
from .device import torch_threads
from .errors import ReconstructionFailedError
from .frames import PosedFrames, PosedView
from .mesh import TexturedMesh, weld_vertices
from .metrics import resize_rgb
from .render import Backend, cuda_available, make_rasterizer
from .texture_solve import PixelObservations, ViewPixels, solve_texture, view_observations, view_pixels
from .uv_atlas import start_uv_atlas

#: Texel candidates processed per chunk while rasterizing UV triangles (bounds peak memory).
UV_RASTER_CHUNK = 4_000_000
#: Barycentric slack when testing whether a texel centre lies in a triangle (closes cracks on shared edges).
BARY_EPS = 1e-6
#: Foreground-mask erosion before sampling a photo, pixels at the working (depth) resolution.
MASK_ERODE_PX = 2
#: Width of the weight ramp inside the eroded mask edge, pixels at the working resolution.
EDGE_RAMP_PX = 6
#: Weight factor at the eroded mask edge (start of the ramp): small, so a view that sees a texel
#: well elsewhere wins, but not 0, so surfaces only one view sees near its silhouette keep their colour.
EDGE_MIN_WEIGHT = 0.05
#: Unseen texels take the colour of the nearest seen texel of the atlas within this many texels ...
UNSEEN_UV_FILL_PX = 12
#: ... when that texel is also near on the surface: 3D distance <= this times the UV distance in texel sizes.
UNSEEN_UV_FILL_STRETCH = 3.0
#: Visibility: the depth test allows the surface slope over this many pixels of the rendered depth.
VISIBILITY_SLOPE_PX = 1.5
#: ... with the slope (tan of the angle between normal and view ray) capped here (75 degrees).
MAX_SLOPE_TAN = 3.7
#: The texture fit leaves out the photo's foreground pixels this close to its edge, pixels at the working resolution ...
FIT_MASK_ERODE_PX = 1.0
#: A pixel's fit confidence is multiplied by cos(normal, view ray) ** this: obliquely seen surface moves
#: most in the view when the surface is off, so those pixels say least about the texture.
FIT_ANGLE_POWER = 1.0
#: ... and ramps its confidence from 0 to 1 over this many pixels inside that (0: no ramp).
FIT_EDGE_RAMP_PX = 0.0
#: Texels whose summed view weight is below this count as unseen and are filled from the surface.
MIN_VIEW_WEIGHT = 1e-4
#: Surface fill: vertex colours are estimated from every this-many-th seen texel.
SURFACE_FILL_STRIDE = 4
#: Surface fill: neighbour-averaging passes over mesh edges for vertices no view saw.
SURFACE_FILL_ITERATIONS = 64


@dataclass
class UVRaster:
    """Which triangle covers each texel centre.

    Attributes
    ----------
    face : (T, T) int64, face index per texel; -1 where no triangle covers the centre
    bary : (T, T, 3) float32, barycentric weights of the face's vertices (0 where uncovered)
    """

    face: torch.Tensor
    bary: torch.Tensor

    @property
    def covered(self) -> torch.Tensor:
        """(T, T) bool."""
        return self.face >= 0


def bake_texture(
    vertices: np.ndarray,
    faces: np.ndarray,
    frames: PosedFrames,
    cfg: TextureConfig,
    *,
    backend: Backend = "auto",
    progress: ProgressFn | None = None,
) -> TexturedMesh:
    """UV-atlas a mesh and bake the views' photos into a diffuse texture.

    Parameters
    ----------
    vertices : (V, 3) float, world (the input cameras' frame)
    faces : (F, 3) int, counter-clockwise seen from outside
    frames : PosedFrames, full-resolution ``rgb`` + ``camera``, working-resolution ``mask`` + ``depth_camera``
    cfg : TextureConfig
    backend : "auto", "embree" or "nvdiffrast": the rasterizer for visibility; with
        nvdiffrast the texel maths runs on the GPU too
    progress : callable(message, fraction in [0, 1]) or None, as :mod:`pipeline.reconstruct` passes it

    Returns
    -------
    TexturedMesh with vertices (V', 3) float32 split along UV seams, faces (F, 3) int32,
    uvs (V', 2) float32, texture (cfg.size, cfg.size, 3) uint8.

    Raises
    ------
    UVAtlasError
        When xatlas crashes or times out.
    ReconstructionFailedError
        When no view sees any part of the mesh.
    """
    report = progress or (lambda message, fraction: None)
    v_in = np.asarray(vertices, dtype=np.float32)
    f_in = np.asarray(faces, dtype=np.int64)

    report("uv atlas", 0.0)
    with start_uv_atlas(
        v_in, f_in, resolution=cfg.size, padding_px=cfg.padding_px, timeout_s=cfg.xatlas_timeout_s
    ) as job:
        # The atlas keeps every face with its corners in order, so the views' renders of the input
        # mesh are those of the atlas mesh, bit for bit: they are made while xatlas runs (on one
        # torch thread: xatlas computes charts on every core).
        with torch_threads(1):
            views = render_bake_views(v_in, f_in, frames, cfg, backend)
        v, f, uvs, vmap = job.result()
    texture = _bake_on_atlas(v_in, f_in, (v, f, uvs, vmap), views, frames, cfg, report)
    return TexturedMesh(vertices=v.astype(np.float32), faces=f.astype(np.int32), uvs=uvs, texture=texture)


def rebake_texture(
    mesh: TexturedMesh, frames: PosedFrames, cfg: TextureConfig, *, backend: Backend = "auto"
) -> TexturedMesh:
    """The same mesh (vertices, faces, UVs unchanged) with its texture baked anew from ``frames``,
    exactly as :func:`bake_texture` bakes a fresh atlas (blend, unseen fill, least-squares fit).

    What the ``nvdiffrec`` model judges and returns with (:mod:`pipeline.models`): the fusion mesh
    baked without the held-out views, so that neither judged candidate saw them, and the refined
    geometry baked from the photos as fusion bakes its own.

    Parameters
    ----------
    mesh : TexturedMesh with UVs, vertices split along UV seams (as :func:`bake_texture` returns them)
    frames : PosedFrames, as for :func:`bake_texture`
    cfg : TextureConfig; the texture is ``cfg.size`` square whatever the mesh's was

    Returns
    -------
    TexturedMesh sharing ``mesh``'s vertices (float32), faces (int32) and uvs, texture (cfg.size, cfg.size, 3) uint8.
    """
    if mesh.uvs is None:
        raise ReconstructionFailedError("rebake_texture needs a mesh with UVs")
    v = np.asarray(mesh.vertices, dtype=np.float32)
    f = np.asarray(mesh.faces, dtype=np.int64)
    # The welded surface stands for the pre-atlas mesh: normals and the unseen-texel fill ignore seams.
    weld, welded = weld_vertices(v)
    atlas = (v, f, np.asarray(mesh.uvs, dtype=np.float32), weld)
    views = render_bake_views(v, f, frames, cfg, backend)
    texture = _bake_on_atlas(welded.astype(np.float32), weld[f], atlas, views, frames, cfg, lambda m, x: None)
    return TexturedMesh(vertices=v, faces=f.astype(np.int32), uvs=atlas[2], texture=texture)


def refit_texture(
    mesh: TexturedMesh, frames: PosedFrames, cfg: TextureConfig, *, backend: Backend = "auto"
) -> TexturedMesh:
    """The mesh's own texture corrected by the least-squares fit to ``frames`` (:mod:`pipeline.texture_solve`,
    the last step of :func:`bake_texture`), starting from that texture instead of a fresh blend.

    What the ``nvdiffrec`` model returns after a refinement that trained on all views but the held-out
    ones: the fit brings those views' photos into the optimised texture (a few CG iterations).

    Parameters
    ----------
    mesh : TexturedMesh with UVs and a square (T, T, 3) uint8 texture
    frames : PosedFrames, as for :func:`bake_texture`
    cfg : TextureConfig: ``fit_iterations`` (0 returns the mesh as it is), ``fit_prior``, ``fit_smoothness``

    Returns
    -------
    TexturedMesh sharing ``mesh``'s geometry and UVs, texture (T, T, 3) uint8.
    """
    if mesh.uvs is None or mesh.texture is None or cfg.fit_iterations <= 0:
        return mesh
    T = int(mesh.texture.shape[0])
    v = np.asarray(mesh.vertices, dtype=np.float32)
    rasterizer = make_rasterizer(v, mesh.faces, backend=backend)
    device = _bake_device(rasterizer, backend)
    ft = torch.as_tensor(np.asarray(mesh.faces), dtype=torch.int64, device=device)
    uvs = torch.as_tensor(np.asarray(mesh.uvs, dtype=np.float32), device=device)
    covered = rasterize_uv(uvs, ft, T).covered
    vt = torch.as_tensor(v, device=device)
    observations = []
    for view in frames.views:
        center = torch.as_tensor(view.camera.center, dtype=torch.float32, device=device)
        rendered = rasterizer.rasterize(view.depth_camera)
        observations.append(_fit_observations(view, rendered, uvs[ft], vt, ft, center))
    colors = torch.as_tensor(np.asarray(mesh.texture, dtype=np.float32), device=device)[covered]
    texture = _pad_and_fit(colors, covered, observations, frames, replace(cfg, size=T), lambda m, x: None)
    return TexturedMesh(vertices=v, faces=mesh.faces, uvs=mesh.uvs, texture=texture)


def _bake_device(rasterizer, backend: Backend) -> torch.device:
    """Where a bake's texel maths runs: CUDA with nvdiffrast, or when ``auto`` finds a usable GPU."""
    use_cuda = getattr(rasterizer, "name", "") == "nvdiffrast" or (backend == "auto" and cuda_available())
    return torch.device("cuda" if use_cuda else "cpu")


@dataclass
class BakeView:
    """What the bake needs of one view that does not depend on the UVs (:func:`render_bake_views`).

    Attributes
    ----------
    depth : (h, w) float32, z-depth of the mesh in ``view.depth_camera``, 0 on background
    edge : (h, w) float32, :func:`_mask_edge_weight` of the view's mask
    pixels : the view's pixels for the least-squares fit (None when the config fits nothing)
    """

    depth: np.ndarray
    edge: torch.Tensor
    pixels: ViewPixels | None


def render_bake_views(vertices, faces, frames: PosedFrames, cfg: TextureConfig, backend: Backend) -> list[BakeView]:
    """One :class:`BakeView` per view of ``frames``: the mesh ``(vertices (V, 3) float, faces (F, 3) int)``
    rendered at the view's working resolution, on the device its texel maths runs on (:func:`_bake_device`)."""
    rasterizer = make_rasterizer(vertices, faces, backend=backend)
    device = _bake_device(rasterizer, backend)
    vt = torch.as_tensor(np.asarray(vertices, dtype=np.float32), device=device)
    ft = torch.as_tensor(np.asarray(faces), dtype=torch.int64, device=device)
    out = []
    for view in frames.views:
        rendered = rasterizer.rasterize(view.depth_camera)
        pixels = None
        if cfg.fit_iterations > 0:
            center = torch.as_tensor(view.camera.center, dtype=torch.float32, device=device)
            pixels = view_pixels(rendered.tri_id, rendered.bary, *_fit_inputs(view, rendered, vt, ft, center))
        out.append(BakeView(rendered.depth, _mask_edge_weight(view.mask, device), pixels))
    return out


def _bake_on_atlas(v_in, f_in, atlas, views: list[BakeView], frames: PosedFrames, cfg: TextureConfig, report):
    """(T, T, 3) uint8: the views baked onto an atlas ``(v, f, uvs, vmap)`` of the mesh ``(v_in, f_in)``
    (``vmap``: (V',) the ``v_in`` index of each atlas vertex), as :func:`bake_texture` describes; ``views``
    are :func:`render_bake_views` of ``frames`` (emptied here: their renders go before the fit's solve)."""
    v, f, uvs, vmap = atlas
    normals_in = TexturedMesh(v_in, f_in).vertex_normals()
    device = views[0].edge.device if views else torch.device("cpu")

    report("rasterize uv", 0.3)
    ft = torch.as_tensor(f, dtype=torch.int64, device=device)
    face_uvs = torch.as_tensor(uvs, device=device)[ft]
    # The fit's pixels get their UVs first, so that their face ids and barycentrics go before the texel state comes.
    observations = [bv.pixels.observations(face_uvs) for bv in views if bv.pixels is not None]
    for bv in views:
        bv.pixels = None
    raster = rasterize_uv(torch.as_tensor(uvs, device=device), ft, cfg.size)
    covered = raster.covered
    tex_face = raster.face[covered]
    tex_bary = raster.bary[covered]  # (N, 3)
    corners = ft[tex_face]  # (N, 3) new-vertex ids
    vt = torch.as_tensor(v, device=device)
    pos = (vt[corners] * tex_bary[..., None]).sum(1)  # (N, 3) world
    vn_t = torch.as_tensor(normals_in[vmap], device=device)  # (V', 3) per atlas vertex
    nrm = F.normalize((vn_t[corners] * tex_bary[..., None]).sum(1), dim=-1)

    extent = float(np.ptp(v_in, axis=0).max()) if len(v_in) else 1.0
    depth_tol = cfg.depth_tolerance * max(extent, 1e-6)
    acc = torch.zeros((len(pos), 3), dtype=torch.float32, device=device)
    wsum = torch.zeros(len(pos), dtype=torch.float32, device=device)
    for k, view in enumerate(frames.views):
        report(f"project view {view.name}", 0.35 + 0.5 * k / max(len(frames.views), 1))
        bv, views[k] = views[k], None
        # Cheap per-vertex culling first: texels of faces that no corner shows to the camera are skipped.
        center = torch.as_tensor(view.camera.center, dtype=torch.float32, device=device)
        facing = ((center - vt) * vn_t).sum(-1) > 0
        cand = torch.nonzero(facing[ft].any(1)[tex_face]).squeeze(1)
        idx, col, w = sample_view(pos, nrm, cand, view, bv.depth, cfg.angle_power, depth_tol, edge=bv.edge)
        acc.index_add_(0, idx, col * w[:, None])
        wsum.index_add_(0, idx, w)
    seen = wsum > MIN_VIEW_WEIGHT
    if not bool(seen.any()):
        raise ReconstructionFailedError(
            "no view sees the mesh: the cameras do not look at the reconstructed surface",
            details={"views": [view.name for view in frames.views]},
        )
    colors = acc / wsum.clamp(min=MIN_VIEW_WEIGHT)[:, None]

    report("fill unseen texels", 0.85)
    if not bool(seen.all()):
        colors = _fill_unseen(
            colors, seen, pos, covered, v_in, f_in, torch.as_tensor(vmap, device=device)[corners], tex_bary
        )

    # The fit's solve is the bake's memory peak: the per-texel projection state goes first (~300 MB at 2048²).
    del raster, tex_face, tex_bary, corners, pos, nrm, acc, wsum, vn_t, bv, idx, col, w, cand, facing
    texture = _pad_and_fit(colors, covered, observations, frames, cfg, report)
    report("done", 1.0)
    return texture


def _pad_and_fit(
    colors, covered, observations: list[PixelObservations], frames, cfg: TextureConfig, report
) -> np.ndarray:
    """(T, T, 3) uint8: the covered texels' colours, gutters padded, fitted to the views when there are observations."""
    T = cfg.size
    image = torch.zeros((T, T, 3), dtype=torch.float32, device=colors.device)
    image[covered] = colors
    report("pad charts", 0.9)
    source = nearest_valid_index(covered)  # the gutter filling, kept for the fit's lookups
    image = image.reshape(-1, 3)[source].view(T, T, 3)
    if observations:
        report("fit texture to the views", 0.92)
        obs = PixelObservations.concatenate(observations)
        image, _ = solve_texture(
            image, covered, source, obs, scale=fit_grid_scale(T, frames), prior=cfg.fit_prior,
            smoothness=cfg.fit_smoothness, iterations=cfg.fit_iterations,
        )  # fmt: skip
    return image.clamp(0, 255).add(0.5).to(torch.uint8).cpu().numpy()


def _fill_unseen(colors, seen, pos, covered, v_in, f_in, corner_vertices, tex_bary) -> torch.Tensor:
    """Colours for the texels no view saw: from the atlas nearby, else over the mesh surface (see the two fills)."""
    texel_size = math.sqrt(_surface_area(v_in, f_in) / max(len(pos), 1))
    colors, filled = fill_unseen_from_atlas(colors, seen, pos, covered, texel_size)
    if not bool(filled.all()):
        colors = fill_unseen_from_surface(colors, seen, filled, corner_vertices, tex_bary, f_in, len(v_in))
    return colors


def _fit_observations(view: PosedView, rendered, face_uvs: torch.Tensor, vt, ft, center) -> PixelObservations:
    """The pixels of one view for the least-squares fit, from its rasterization at the working resolution."""
    return view_observations(rendered.tri_id, rendered.bary, face_uvs, *_fit_inputs(view, rendered, vt, ft, center))


def _fit_inputs(view: PosedView, rendered, vt, ft, center) -> tuple[np.ndarray, torch.Tensor]:
    """The fit's photo ((h, w, 3) uint8, shrunk to the working resolution) and pixel confidence
    ((h, w) float32 on ``vt``'s device) of one view."""
    photo = resize_rgb(view.rgb, view.depth_camera.width, view.depth_camera.height)
    conf = fit_confidence(view.mask, vt.device)
    if FIT_ANGLE_POWER > 0:
        conf = conf * _pixel_cos(rendered.tri_id, rendered.bary, vt, ft, center).pow(FIT_ANGLE_POWER)
    return photo, conf


def rasterize_uv(uvs: torch.Tensor, faces: torch.Tensor, size: int) -> UVRaster:
    """Rasterize UV triangles at texel centres.

    Parameters
    ----------
    uvs : (V, 2) float32 in [0, 1], v = 0 at the bottom row
    faces : (F, 3) int64
    size : int, texture width and height T

    Returns
    -------
    UVRaster; where triangles overlap (shared edges), one of them wins.
    """
    device = uvs.device
    T = int(size)
    face_out = torch.full((T * T,), -1, dtype=torch.int64, device=device)
    bary_out = torch.zeros((T * T, 3), dtype=torch.float32, device=device)
    # Texel coordinates: x = u * T, y = (1 - v) * T; centres at integer + 0.5.
    p = torch.stack([uvs[:, 0] * T, (1.0 - uvs[:, 1]) * T], dim=-1).to(torch.float64)[faces]  # (F, 3, 2)
    lo = torch.ceil(p.amin(1) - 0.5).clamp(0, T - 1).to(torch.int64)  # first texel index inside the bbox
    hi = torch.floor(p.amax(1) - 0.5).clamp(0, T - 1).to(torch.int64)
    wh = (hi - lo + 1).clamp(min=0)
    count = wh[:, 0] * wh[:, 1]
    # Barycentrics are affine in the texel offset (dj, di) from the bbox's first texel
    # centre: b1 = b1_0 + A1 dj + B1 di (same for b2). Coefficients in float64 per face,
    # float32 per texel (offsets are small, so no cancellation).
    e1, e2 = p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]
    area = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]  # signed: its sign flips with the chart's orientation
    ok = (area.abs() > 1e-12) & (count > 0)
    inv = 1.0 / torch.where(ok, area, torch.ones_like(area))
    d0 = lo.to(torch.float64) + 0.5 - p[:, 0]
    coef = torch.stack(
        [
            (d0[:, 0] * e2[:, 1] - d0[:, 1] * e2[:, 0]) * inv,
            e2[:, 1] * inv,
            -e2[:, 0] * inv,
            (e1[:, 0] * d0[:, 1] - e1[:, 1] * d0[:, 0]) * inv,
            -e1[:, 1] * inv,
            e1[:, 0] * inv,
        ],
        dim=-1,
    ).to(torch.float32)
    ids = torch.nonzero(ok).squeeze(1)
    ends = torch.cumsum(count[ids], 0)
    start = 0
    while start < len(ids):
        # Chunk faces so that their candidate texels stay below UV_RASTER_CHUNK.
        base = int(ends[start - 1]) if start else 0
        stop = max(int(torch.searchsorted(ends, base + UV_RASTER_CHUNK, right=True)), start + 1)
        fid = ids[start:stop]
        n = count[fid]
        rep = torch.repeat_interleave(torch.arange(len(fid), device=device), n)
        local = torch.arange(int(ends[stop - 1]) - base, device=device) - (torch.cumsum(n, 0) - n)[rep]
        w = wh[fid, 0][rep]
        di = torch.div(local, w, rounding_mode="floor")
        dj = local - di * w
        c = coef[fid][rep]  # (N, 6)
        djf, dif = dj.to(torch.float32), di.to(torch.float32)
        b1 = c[:, 0] + c[:, 1] * djf + c[:, 2] * dif
        b2 = c[:, 3] + c[:, 4] * djf + c[:, 5] * dif
        b0 = 1.0 - b1 - b2
        inside = torch.nonzero((b0 >= -BARY_EPS) & (b1 >= -BARY_EPS) & (b2 >= -BARY_EPS)).squeeze(1)
        r = rep[inside]
        texel = (lo[fid, 1][r] + di[inside]) * T + lo[fid, 0][r] + dj[inside]
        face_out[texel] = fid[r]
        bary_out[texel] = torch.stack([b0[inside], b1[inside], b2[inside]], -1).clamp(0, 1)
        start = stop
    return UVRaster(face_out.view(T, T), bary_out.view(T, T, 3))


def sample_view(
    pos: torch.Tensor,
    nrm: torch.Tensor,
    cand: torch.Tensor,
    view: PosedView,
    rendered_depth: np.ndarray,
    angle_power: float,
    depth_tol: float,
    *,
    edge: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Colours and weights of the texels one view sees.

    Parameters
    ----------
    pos : (N, 3) float32, texel positions, world
    nrm : (N, 3) float32, unit texel normals, world
    cand : (M,) int64, the texels to consider (a superset of those facing the camera)
    view : PosedView
    rendered_depth : (h, w) float32, z-depth of our mesh in ``view.depth_camera``, 0 on background
    angle_power : float, exponent of the cosine weight
    depth_tol : float, visibility tolerance, scene units
    edge : (h, w) float32, :func:`mask_edge_weight` of ``view.mask`` when already computed

    Returns
    -------
    idx : (K,) int64, texels with a positive weight
    colors : (K, 3) float32 in [0, 255], bilinear samples of the full-resolution ``view.rgb``
    weights : (K,) float32 > 0: cos ** angle_power times the mask-edge ramp
    """
    device = pos.device
    dcam = view.depth_camera
    h, w = dcam.height, dcam.width
    w2c = torch.as_tensor(dcam.world_to_cam, dtype=torch.float32, device=device)
    p = pos[cand]
    pc = p @ w2c[:3, :3].T + w2c[:3, 3]
    z = pc[:, 2].clamp(min=1e-9)
    K = dcam.K
    x = (K[0, 0] * pc[:, 0] + K[0, 1] * pc[:, 1]) / z + K[0, 2]  # continuous pixels at the working resolution
    y = K[1, 1] * pc[:, 1] / z + K[1, 2]
    ray = torch.as_tensor(dcam.center, dtype=torch.float32, device=device) - p
    cos = (nrm[cand] * ray).sum(-1) * ray.square().sum(-1).rsqrt()
    ok = (cos > 0) & (pc[:, 2] > 1e-6) & (x >= 0) & (x < w) & (y >= 0) & (y < h)
    sel = torch.nonzero(ok).squeeze(1)
    x, y, z, cos = x[sel], y[sel], z[sel], cos[sel]
    pix = y.long().clamp(0, h - 1) * w + x.long().clamp(0, w - 1)

    # Occlusion: the texel may not lie behind our own mesh. The 3x3 minimum of the
    # rendered depth rejects texels just behind an occluding edge.
    d = torch.as_tensor(rendered_depth, dtype=torch.float32, device=device)
    d = torch.where(d > 0, d, torch.full_like(d, float("inf")))
    dmin = (-F.max_pool2d(-d[None, None], 3, stride=1, padding=1)).reshape(-1)
    # Foreground: 0 outside the eroded mask, ramping to 1 inside (no photographed background).
    edge = (edge if edge is not None else _mask_edge_weight(view.mask, device)).reshape(-1)
    # The 3x3 minimum and the nearest-pixel lookup sit up to VISIBILITY_SLOPE_PX pixels away: on a
    # slanted surface the depth changes by (pixel footprint) * tan(angle) per pixel, so allow that too.
    tan = (1.0 - cos.square()).clamp(min=0).sqrt() / cos.clamp(min=1e-3)
    tol = depth_tol + VISIBILITY_SLOPE_PX * (z / float(K[0, 0])) * tan.clamp(max=MAX_SLOPE_TAN)
    wv = cos.pow(angle_power) * edge[pix] * (z <= dmin[pix] + tol)
    keep = torch.nonzero(wv > 0).squeeze(1)
    x, y, wv = x[keep], y[keep], wv[keep]
    H, W = view.rgb.shape[:2]
    colors = _bilinear(view.rgb, x * (W / w), y * (H / h), device)
    return cand[sel[keep]], colors, wv


def fit_grid_scale(size: int, frames: PosedFrames) -> int:
    """Texels per node of the fit's correction grid along each axis: the largest power of two not above
    the texture size over the working resolution, so one node is about one input pixel (2 for every preset)."""
    work = max(max(v.depth_camera.width, v.depth_camera.height) for v in frames.views)
    return 1 << max(int(math.floor(math.log2(max(size / max(work, 1), 1.0)))), 0)


def _pixel_cos(
    tri_id: np.ndarray, bary: np.ndarray, vt: torch.Tensor, ft: torch.Tensor, center: torch.Tensor
) -> torch.Tensor:
    """(h, w) float32: cos of the angle between the face normal and the ray to the camera at each pixel, 0 off the mesh."""
    tri = torch.as_tensor(tri_id).reshape(-1).to(vt.device)
    on = torch.nonzero(tri >= 0).squeeze(1)
    corners = vt[ft[tri[on]]]  # (M, 3, 3)
    n = F.normalize(torch.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0], dim=-1), dim=-1)
    b = torch.as_tensor(bary).reshape(-1, 3).to(vt.device)[on]
    ray = F.normalize(center - (corners * b[..., None]).sum(1), dim=-1)
    out = torch.zeros(len(tri), dtype=torch.float32, device=vt.device)
    out[on] = (n * ray).sum(-1).clamp(min=0)
    return out.view(tri_id.shape)


def fit_confidence(mask: np.ndarray, device: torch.device) -> torch.Tensor:
    """(h, w) float32: how much the texture fit trusts each pixel of a view's photo.

    Every foreground pixel but the outermost FIT_MASK_ERODE_PX: those are part of the quality
    report's comparison too, but their colour is the object's blended with the background,
    and fitting it paints a pale rim that other views would see on the surface.
    """
    from scipy.ndimage import distance_transform_edt

    dist = distance_transform_edt(np.pad(np.asarray(mask, dtype=bool), 1))[1:-1, 1:-1]
    conf = (
        np.clip((dist - FIT_MASK_ERODE_PX) / max(FIT_EDGE_RAMP_PX, 1e-6), 0.0, 1.0)
        if FIT_EDGE_RAMP_PX > 0
        else dist > FIT_MASK_ERODE_PX
    )
    return torch.as_tensor(np.asarray(conf, dtype=np.float32), device=device)


def _mask_edge_weight(mask: np.ndarray, device: torch.device) -> torch.Tensor:
    """(h, w) float32 in [0, 1]: 0 outside the mask eroded by MASK_ERODE_PX, then EDGE_MIN_WEIGHT ramping to 1 over EDGE_RAMP_PX."""
    from scipy.ndimage import distance_transform_edt

    m = np.asarray(mask, dtype=bool)
    # Pad with background so the image border counts as a silhouette edge.
    dist = distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
    ramp = EDGE_MIN_WEIGHT + (1.0 - EDGE_MIN_WEIGHT) * np.clip((dist - MASK_ERODE_PX) / EDGE_RAMP_PX, 0.0, 1.0)
    ramp = np.where(dist > MASK_ERODE_PX, ramp, 0.0).astype(np.float32)
    return torch.as_tensor(ramp, device=device)


def _bilinear(image: np.ndarray, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(N, C) float32 bilinear samples of an (H, W, C) uint8 image at continuous pixel coordinates (centres at +0.5)."""
    img = torch.from_numpy(np.require(image, requirements=["C", "W"])).to(device)
    H, W = img.shape[:2]
    img = img.permute(2, 0, 1)[None].to(torch.float32)  # (1, C, H, W)
    # align_corners=False: -1 and +1 are the outer edges of the border pixels, matching the +0.5 centres.
    grid = torch.stack([x * (2.0 / W) - 1.0, y * (2.0 / H) - 1.0], dim=-1)[None, None]
    out = F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[0, :, 0].T


def _surface_area(vertices: np.ndarray, faces: np.ndarray) -> float:
    tri = vertices[faces].astype(np.float64)
    return float(0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1).sum())


def fill_unseen_from_atlas(
    colors: torch.Tensor, seen: torch.Tensor, pos: torch.Tensor, covered: torch.Tensor, texel_size: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy the colour of the nearest seen texel of the atlas to unseen texels that are near it on the surface too.

    Closes the thin unseen bands along chart borders and silhouettes. A candidate is
    accepted within UNSEEN_UV_FILL_PX texels and when its 3D distance is at most
    UNSEEN_UV_FILL_STRETCH texel sizes per texel of UV distance (so a neighbour from
    another chart, far away on the surface, is never used).

    Parameters
    ----------
    colors : (N, 3) float32, colours of the covered texels (valid where ``seen``)
    seen : (N,) bool
    pos : (N, 3) float32, world positions of the covered texels
    covered : (T, T) bool, which texels the N entries are (row-major order)
    texel_size : float, mean world length of a texel edge

    Returns
    -------
    colors : (N, 3) float32
    filled : (N,) bool, ``seen`` or filled here
    """
    from scipy.ndimage import distance_transform_cdt

    device = colors.device
    T = covered.shape[1]
    cov = covered.cpu().numpy().reshape(-1)
    seen_np = seen.cpu().numpy()
    seen_img = np.zeros(cov.shape, bool)
    seen_img[np.flatnonzero(cov)[seen_np]] = True
    dist, (iy, ix) = distance_transform_cdt(~seen_img.reshape(T, T), metric="chessboard", return_indices=True)
    index_of = np.full(cov.shape, -1, np.int64)
    index_of[cov] = np.arange(int(cov.sum()))
    unseen = np.flatnonzero(~seen_np)
    texel = np.flatnonzero(cov)[unseen]
    d = dist.reshape(-1)[texel]
    src = index_of[iy.reshape(-1)[texel] * T + ix.reshape(-1)[texel]]
    near = d <= UNSEEN_UV_FILL_PX
    unseen, src, d = unseen[near], src[near], d[near]
    u_t = torch.as_tensor(unseen, device=device)
    s_t = torch.as_tensor(src, device=device)
    gap = (pos[u_t] - pos[s_t]).norm(dim=-1)
    ok = gap <= torch.as_tensor(d, dtype=torch.float32, device=device) * (UNSEEN_UV_FILL_STRETCH * texel_size)
    colors = colors.clone()
    colors[u_t[ok]] = colors[s_t[ok]]
    filled = seen.clone()
    filled[u_t[ok]] = True
    return colors, filled


def fill_unseen_from_surface(
    colors: torch.Tensor,
    seen: torch.Tensor,
    filled: torch.Tensor,
    corner_vertices: torch.Tensor,
    bary: torch.Tensor,
    faces: np.ndarray,
    n_vertices: int,
) -> torch.Tensor:
    """Colour texels no view saw from their neighbours on the mesh surface (not in UV space).

    Seen texels splat their colour onto the (un-split) input vertices of their triangle;
    vertices with no colour take the mean of coloured neighbours along mesh edges,
    repeatedly; unseen texels then interpolate their triangle's vertex colours.

    Parameters
    ----------
    colors : (N, 3) float32, texel colours (valid where ``seen``)
    seen : (N,) bool, texels a view saw (the only colour sources)
    filled : (N,) bool, texels that already have a colour (kept)
    corner_vertices : (N, 3) int64, the input-mesh vertex ids of each texel's triangle
    bary : (N, 3) float32, the texel's barycentric weights
    faces : (F, 3) int, the input mesh's faces (defines the edges)
    n_vertices : int, V

    Returns
    -------
    (N, 3) float32 colours, unchanged where ``filled``.
    """
    device = colors.device
    # Every SURFACE_FILL_STRIDE-th seen texel is plenty to estimate vertex colours.
    src_texels = torch.nonzero(seen).squeeze(1)[::SURFACE_FILL_STRIDE]
    wv = bary[src_texels].reshape(-1)
    vid = corner_vertices[src_texels].reshape(-1)
    vcol = torch.zeros((n_vertices, 3), dtype=torch.float32, device=device)
    vw = torch.zeros(n_vertices, dtype=torch.float32, device=device)
    vcol.index_add_(0, vid, colors[src_texels].repeat_interleave(3, 0) * wv[:, None])
    vw.index_add_(0, vid, wv)
    known = vw > 1e-6
    vcol = torch.where(known[:, None], vcol / vw.clamp(min=1e-6)[:, None], vcol)

    f = torch.as_tensor(np.asarray(faces, dtype=np.int64), device=device)
    src = torch.cat([f[:, 0], f[:, 1], f[:, 2], f[:, 1], f[:, 2], f[:, 0]])
    dst = torch.cat([f[:, 1], f[:, 2], f[:, 0], f[:, 0], f[:, 1], f[:, 2]])
    for _ in range(SURFACE_FILL_ITERATIONS):
        if bool(known.all()):
            break
        k = known[src].to(torch.float32)
        s = torch.zeros_like(vcol).index_add_(0, dst, vcol[src] * k[:, None])
        c = torch.zeros_like(vw).index_add_(0, dst, k)
        new = (~known) & (c > 0)
        vcol[new] = s[new] / c[new][:, None]
        known = known | new
    if not bool(known.all()):
        # Components no view saw at all: the mean seen colour is the least surprising guess.
        vcol[~known] = colors[seen].mean(0)
    interp = (vcol[corner_vertices] * bary[..., None]).sum(1)
    return torch.where(filled[:, None], colors, interp)


def nearest_valid_index(valid: torch.Tensor) -> torch.Tensor:
    """(T * T,) int64: for every texel, the row-major index of the nearest ``valid`` texel (chessboard distance; itself when valid).

    One C pass of scipy's distance transform (~0.2 s CPU at 2048^2).

    Parameters
    ----------
    valid : (T, T) bool, at least one True
    """
    from scipy.ndimage import distance_transform_cdt

    hole = ~valid.cpu().numpy()
    T = hole.shape[1]
    index = np.arange(hole.size, dtype=np.int64)
    if hole.any():
        iy, ix = distance_transform_cdt(hole, metric="chessboard", return_distances=False, return_indices=True)
        index[hole.reshape(-1)] = (iy[hole] * T + ix[hole]).astype(np.int64)
    return torch.as_tensor(index, device=valid.device)


def fill_empty_texels(image: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Give every texel outside ``valid`` the colour of its nearest valid texel (chessboard distance).

    This pads the chart gutters for bilinear lookups and fills the unused atlas space,
    so no mip level averages in a colour that is not on the surface.

    Parameters
    ----------
    image : (T, T, C) float32, valid where ``valid``
    valid : (T, T) bool, at least one True

    Returns
    -------
    (T, T, C) float32, equal to ``image`` where ``valid``.
    """
    return image.reshape(-1, image.shape[-1])[nearest_valid_index(valid)].view(image.shape)
