"""Photo-consistency surface refinement: move vertices along their normals until the views agree.

The fused surface (8-bit banded depth, the visual hull in concave areas) can sit a few
pixels off the true one. Texture baked from view A through such a surface lands in the
wrong place when seen from view B. This stage moves every vertex along its normal to
the offset where the views that see it show the same colour, keeps the silhouette
generators on the mask edges, and smooths the offset field over the mesh:

1. per pass, the photos are area-resampled to that pass's image size and blurred a
   little (a wider basin of attraction on coarse passes, detail on fine ones);
2. each vertex tries offsets ``k * step`` along its normal, ``k`` in ``[-K, K]``, with
   ``step`` about one pixel of that pass; each candidate is projected into every view
   that sees the vertex (ray-cast visibility of the current mesh) and scored by the
   weighted cross-view colour variance (weights: cos(normal, view ray) and a fade at
   the mask edges), or optionally by a patch 1 - NCC; candidates outside any view's
   mask (outside the visual hull) are rejected; a minimum counts only when the cost
   rises on both sides of it;
3. vertices that project outside some view's mask get a second, strong target: the
   nearest offset that brings them back inside every mask (silhouettes no wider than
   the masks);
4. the per-vertex targets and their confidences (how distinct the colour minimum is)
   are combined by a screened-Poisson solve on the mesh graph,
   ``(C + alpha I + lambda L) x = C d``, so the offset field is smooth, vertices with no
   texture follow their neighbours, and vertices without any data stay;
5. offsets are clamped per pass and in total; 2 to 4 passes coarse to fine.

Everything per vertex is vectorised in torch on one device; visibility uses the
project's rasterizers (embree rays on the CPU, a depth test against nvdiffrast renders
on CUDA); the sparse solve runs in scipy.
"""

from __future__ import annotations

import math
import time

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch
import torch.nn.functional as F

from .callbacks import ProgressFn
from .config import PhotoRefineConfig
from .frames import PosedFrames
from .mesh import TexturedMesh, graph_laplacian
from .render import Backend
from .reports import PhotoRefinementReport
from .view_sampling import (
    MIN_VIEW_COS,
    RAY_OFFSET_PX,
    PassViews,
    edge_fade,
    outside_mask,
    prepare_pass_views,
    project,
    sample_image,
    vertex_normals_torch,
    vertex_visibility,
)

#: Hull targets: an outward crossing costs this many extra steps (inwards wins ties).
HULL_OUTWARD_PENALTY = 1.0
#: A candidate leaves the visual hull where some view's bilinear mask value is below 0.5 - this.
HULL_TOLERANCE = 0.0
#: Patch costs: colour noise level (rms per channel, colours in [0, 1]) below which a patch counts as flat.
PATCH_NOISE = 0.02
#: A colour minimum counts when the cost rises on both sides, this many steps away ...
BASIN_STEPS = 2
#: ... by more than this (summed RGB variance, colours in [0, 1]; about 2.5 % rms per channel).
MIN_RISE = 0.002
#: Confidences are divided by this quantile of the positive ones (scale-free weights).
CONFIDENCE_QUANTILE = 0.75
#: Colour confidences are capped at this many times the normalising quantile (one sharp vertex cannot pin the field).
MAX_CONFIDENCE = 4.0


def solve_offsets(
    target: np.ndarray, confidence: np.ndarray, lap: sp.csr_matrix, smoothness: float, anchor: float
) -> np.ndarray:
    """Smooth offset field: argmin_x  sum c_i (x_i - d_i)^2 + anchor |x|^2 + smoothness x^T L x.

    Parameters
    ----------
    target : (V,) float, per-vertex target offsets d
    confidence : (V,) float >= 0, c
    lap : (V, V) graph Laplacian
    smoothness, anchor : float > 0

    Returns
    -------
    (V,) float64 offsets
    """
    c = np.asarray(confidence, np.float64)
    A = (sp.diags(c + anchor) + smoothness * lap).tocsc()
    return spla.spsolve(A, c * np.asarray(target, np.float64))


def _tangent_patch(nrm: torch.Tensor, radius: int, spacing: float) -> torch.Tensor:
    """(V, Q, 3) offsets of a (2r+1)^2 grid in each vertex's tangent plane, ``spacing`` apart (scene units)."""
    ex = torch.tensor([1.0, 0.0, 0.0], dtype=nrm.dtype, device=nrm.device)
    ey = torch.tensor([0.0, 1.0, 0.0], dtype=nrm.dtype, device=nrm.device)
    a = torch.where(nrm[:, :1].abs() < 0.9, ex, ey)
    t1 = F.normalize(torch.cross(nrm, a.expand_as(nrm), dim=-1), dim=-1)
    t2 = torch.cross(nrm, t1, dim=-1)
    g = torch.arange(-radius, radius + 1, dtype=nrm.dtype, device=nrm.device) * spacing
    gi, gj = torch.meshgrid(g, g, indexing="ij")
    return gi.reshape(1, -1, 1) * t1[:, None, :] + gj.reshape(1, -1, 1) * t2[:, None, :]


def _photo_cost(
    pv: PassViews,
    cand: torch.Tensor,
    weights: torch.Tensor,
    patch: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted cross-view disagreement of candidate positions.

    Without ``patch``: the variance of the views' (blurred) colours. With ``patch``: each
    view's colour patch around the candidate is made zero-mean and scaled to unit norm
    (softened by :data:`PATCH_NOISE`, so flat patches shrink to nothing instead of
    amplifying noise), and the cost is the variance of these normalised patches, i.e.
    a weighted 1 - NCC that is blind to exposure and shading differences between views.

    Parameters
    ----------
    cand : (V, S, 3) candidate positions, world
    weights : (N, V) per-view weights of each vertex (0: the view does not count)
    patch : (V, Q, 3) tangent-plane offsets of the patch samples, or None for single samples

    Returns
    -------
    cost : (V, S) float32, inf where fewer than two views count
    inside_hull : (V, S) bool, the candidate projects inside (or within tolerance of) every view's mask
    n_views : (V,) int, views with a positive weight
    """
    V, S, _ = cand.shape
    w_img, h_img = pv.size
    Q = 1 if patch is None else patch.shape[1]
    pts = cand.reshape(-1, 3)
    samples = pts if patch is None else (cand[:, :, None, :] + patch[:, None, :, :]).reshape(-1, 3)
    D = 3 * Q
    s1 = torch.zeros((V * S, D), device=pts.device)
    s2 = torch.zeros(V * S, device=pts.device)
    ws = torch.zeros(V * S, device=pts.device)
    hull = torch.ones(V * S, dtype=torch.bool, device=pts.device)
    for n in range(len(pv.cameras)):
        uv, z = project(pv, n, pts)
        in_img = (uv[:, 0] >= 0) & (uv[:, 0] <= w_img) & (uv[:, 1] >= 0) & (uv[:, 1] <= h_img) & (z > 0)
        hull &= ~in_img | (outside_mask(pv, n, uv) <= HULL_TOLERANCE)
        w = weights[n][:, None].expand(V, S).reshape(-1) * in_img
        if not bool((w > 0).any()):
            continue
        if patch is None:
            col = sample_image(pv.images[n], uv, w_img, h_img)
        else:
            suv, _ = project(pv, n, samples)
            col = sample_image(pv.images[n], suv, w_img, h_img).view(V * S, Q, 3)
            col = col - col.mean(1, keepdim=True)
            norm = (col.square().sum((1, 2)) / Q + PATCH_NOISE**2).sqrt()
            col = (col / norm[:, None, None]).reshape(V * S, D) / math.sqrt(Q)
        s1 += w[:, None] * col
        s2 += w * col.square().sum(-1)
        ws += w
    mean_sq = (s1 / ws.clamp(min=1e-12)[:, None]).square().sum(-1)
    var = (s2 / ws.clamp(min=1e-12) - mean_sq).clamp(min=0.0)
    n_views = (weights > 0).sum(0)
    var = torch.where((n_views >= 2)[:, None].expand(V, S).reshape(-1), var, torch.full_like(var, float("inf")))
    return var.view(V, S), hull.view(V, S), n_views


def hull_targets(
    pv: PassViews, pos: torch.Tensor, nrm: torch.Tensor, step: float, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Offsets that bring vertices outside the visual hull back onto it.

    A vertex that projects outside some view's mask (the bilinear mask below 0.5)
    makes that view's rendered silhouette too wide. Its target is the offset
    along the normal nearest to 0 (inwards first) at which it projects inside every mask,
    linear between candidates.

    Parameters
    ----------
    pos, nrm : (V, 3) vertices and unit normals, world; step : scene units; steps : K

    Returns
    -------
    target : (V,) float32 offset, scene units (0 where inside the hull)
    outside : (V,) bool, vertices outside the hull that have a target
    """
    w_img, h_img = pv.size
    ks = torch.arange(-steps, steps + 1, device=pos.device, dtype=torch.float32)
    offs = ks * step
    cand = (pos[:, None, :] + offs[None, :, None] * nrm[:, None, :]).reshape(-1, 3)
    worst = torch.full((len(cand),), -float("inf"), device=pos.device)
    for n in range(len(pv.cameras)):
        uv, z = project(pv, n, cand)
        in_img = (uv[:, 0] >= 0) & (uv[:, 0] <= w_img) & (uv[:, 1] >= 0) & (uv[:, 1] <= h_img) & (z > 0)
        out = outside_mask(pv, n, uv)
        worst = torch.maximum(worst, torch.where(in_img, out, torch.full_like(out, -float("inf"))))
    # (V, S): how far outside the most violated mask, in [-0.5, 0.5]; > 0 is outside.
    worst = worst.view(len(pos), -1) - HULL_TOLERANCE
    outside0 = worst[:, steps] > 0
    a, b = worst[:, :-1], worst[:, 1:]
    # Crossings into the hull between consecutive candidates.
    cross = (a > 0) != (b > 0)
    frac = (a / (a - b).where(a != b, torch.ones_like(a))).clamp(0, 1)
    zero = offs[:-1] + frac * step
    dist = torch.where(
        cross, zero.abs() + (zero > 0) * HULL_OUTWARD_PENALTY * step, torch.full_like(zero, float("inf"))
    )
    best = dist.argmin(1)
    found = torch.isfinite(dist.gather(1, best[:, None])[:, 0])
    outside = outside0 & found
    target = torch.where(outside, zero.gather(1, best[:, None])[:, 0], torch.zeros(len(pos), device=pos.device))
    return target, outside


def refine_pass(
    vertices: torch.Tensor,
    faces: torch.Tensor,
    pv: PassViews,
    lap: sp.csr_matrix,
    cfg: PhotoRefineConfig,
    *,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, dict]:
    """One coarse-to-fine pass at the resolution of ``pv``.

    Parameters
    ----------
    vertices : (V, 3) float32 world; faces : (F, 3) int64
    pv : the views resampled for this pass; lap : (V, V) graph Laplacian of ``faces``

    Returns
    -------
    offsets : (V,) float32 signed moves along the vertex normals, scene units
    report : dict of pass statistics
    """
    device = vertices.device
    nrm = vertex_normals_torch(vertices, faces)
    center = vertices.mean(0)
    # One pixel of this pass at the object's distance, scene units (median over the views).
    dist = (pv.centers - center).norm(dim=-1)
    px = float((dist / pv.K[:, 0, 0]).median())
    step = cfg.step_px * px
    K = cfg.search_steps

    vis = torch.as_tensor(
        vertex_visibility(
            vertices.cpu().numpy(),
            faces.cpu().numpy(),
            nrm.cpu().numpy(),
            pv.cameras,
            RAY_OFFSET_PX * px,
            backend=backend,
        ),
        device=device,
    )
    weights = torch.zeros(vis.shape, device=device)
    for n in range(len(pv.cameras)):
        ray = pv.centers[n] - vertices
        cos = (nrm * ray).sum(-1) * ray.square().sum(-1).rsqrt()
        uv, _ = project(pv, n, vertices)
        weights[n] = vis[n] * (cos > MIN_VIEW_COS) * cos.clamp(min=0).pow(cfg.angle_power) * edge_fade(pv, n, uv)

    ks = torch.arange(-K, K + 1, device=device, dtype=torch.float32)
    offs = ks * step
    cand = vertices[:, None, :] + offs[None, :, None] * nrm[:, None, :]
    patch = _tangent_patch(nrm, cfg.patch_radius, cfg.patch_spacing_px * px) if cfg.patch_radius > 0 else None
    cost, hull, n_views = _photo_cost(pv, cand, weights, patch)
    # Outside the visual hull is never photo-consistent.
    cost = torch.where(hull, cost, torch.full_like(cost, float("inf")))
    # A gentle prior towards small moves breaks ties on flat cost curves.
    cost_p = cost * (1.0 + cfg.move_prior * (ks / K).square())[None, :]
    best = cost_p.argmin(1)
    c_best = cost.gather(1, best[:, None])[:, 0]
    finite = torch.isfinite(c_best)
    # Sub-step minimum from the parabola through the best candidate and its neighbours.
    lo = cost.gather(1, (best - 1).clamp(0, 2 * K)[:, None])[:, 0]
    hi = cost.gather(1, (best + 1).clamp(0, 2 * K)[:, None])[:, 0]
    interior = (best > 0) & (best < 2 * K) & torch.isfinite(lo) & torch.isfinite(hi)
    curv = lo + hi - 2.0 * c_best
    frac = torch.where(interior & (curv > 0), 0.5 * (lo - hi) / curv.clamp(min=1e-12), torch.zeros_like(curv))
    target = (offs[best] + frac.clamp(-0.5, 0.5) * step).where(finite, torch.zeros_like(c_best))
    # Confidence: the cost must rise on both sides of the minimum (a real basin, not a slope
    # running into the search range's end, which flat colour next to a silhouette produces).
    lo2 = cost.gather(1, (best - BASIN_STEPS).clamp(0, 2 * K)[:, None])[:, 0]
    hi2 = cost.gather(1, (best + BASIN_STEPS).clamp(0, 2 * K)[:, None])[:, 0]
    inside_range = (best >= BASIN_STEPS) & (best <= 2 * K - BASIN_STEPS)
    rise = (torch.minimum(lo2, hi2) - c_best).nan_to_num(0.0, posinf=0.0)
    ok = finite & inside_range & (rise > MIN_RISE)
    conf = torch.where(ok, rise, torch.zeros_like(rise))
    pos_conf = conf[conf > 0]
    if len(pos_conf):
        conf = (conf / torch.quantile(pos_conf, CONFIDENCE_QUANTILE).clamp(min=1e-12)).clamp(max=MAX_CONFIDENCE)
    conf = cfg.photo_weight * conf

    # Vertices outside the visual hull: a strong target back onto it (silhouettes as wide as the masks).
    hull_t, outside = hull_targets(pv, vertices, nrm, step, K)
    hull_c = cfg.silhouette_weight * outside.float()
    tot_c = conf + hull_c
    tgt = torch.where(tot_c > 0, (conf * target + hull_c * hull_t) / tot_c.clamp(min=1e-12), torch.zeros_like(target))

    x = solve_offsets(tgt.cpu().numpy(), tot_c.cpu().numpy(), lap, cfg.smoothness, cfg.anchor)
    x = torch.as_tensor(x, dtype=torch.float32, device=device).clamp(-K * step, K * step)
    report = {
        "pixel_size": round(px, 6),
        "step": round(step, 6),
        "vertices_with_photo_data": int((conf > 0).sum()),
        "vertices_outside_hull": int(outside.sum()),
        "vertices_seen_twice": int((n_views >= 2).sum()),
        "mean_abs_offset_px": round(float(x.abs().mean()) / px, 3),
        "max_abs_offset_px": round(float(x.abs().max()) / px, 3),
    }
    return x, report


def photo_consistency(
    vertices: np.ndarray,
    faces: np.ndarray,
    frames: PosedFrames,
    *,
    size: int = 512,
    blur_px: float = 1.0,
    angle_power: float = 1.0,
) -> float:
    """Mean weighted cross-view colour variance at the vertices (lower is more consistent; a diagnostic and test metric).

    Parameters
    ----------
    vertices : (V, 3) float world; faces : (F, 3) int
    size : image size (longest side) the photos are resampled to; blur_px : blur sigma, pixels

    Returns
    -------
    float, the mean over vertices seen by at least two views of the summed RGB variance (colours in [0, 1])
    """
    device = torch.device("cpu")
    pv = prepare_pass_views(frames, size, blur_px, device)
    v = torch.as_tensor(np.asarray(vertices, np.float32), device=device)
    f = torch.as_tensor(np.asarray(faces, np.int64), device=device)
    nrm = vertex_normals_torch(v, f)
    dist = (pv.centers - v.mean(0)).norm(dim=-1)
    px = float((dist / pv.K[:, 0, 0]).median())
    vis = torch.as_tensor(vertex_visibility(v.numpy(), f.numpy(), nrm.numpy(), pv.cameras, RAY_OFFSET_PX * px))
    weights = torch.zeros(vis.shape)
    for n in range(len(pv.cameras)):
        ray = pv.centers[n] - v
        cos = (nrm * ray).sum(-1) * ray.square().sum(-1).rsqrt()
        uv, _ = project(pv, n, v)
        weights[n] = vis[n] * (cos > MIN_VIEW_COS) * cos.clamp(min=0).pow(angle_power) * edge_fade(pv, n, uv)
    cost, _, _ = _photo_cost(pv, v[:, None, :], weights)
    c = cost[:, 0]
    c = c[torch.isfinite(c)]
    return float(c.mean()) if len(c) else float("nan")


def refine_surface(
    vertices: np.ndarray,
    faces: np.ndarray,
    frames: PosedFrames,
    cfg: PhotoRefineConfig,
    *,
    device: str | torch.device = "cpu",
    backend: Backend = "auto",
    progress: ProgressFn | None = None,
) -> tuple[np.ndarray, PhotoRefinementReport]:
    """Move vertices along their normals to make the views photo-consistent (see the module docstring).

    Parameters
    ----------
    vertices : (V, 3) float, world (the cameras' frame)
    faces : (F, 3) int, counter-clockwise seen from outside (kept as is)
    frames : PosedFrames; full-resolution ``rgb``, working-resolution ``mask`` and ``depth_camera``
    cfg : PhotoRefineConfig

    Returns
    -------
    vertices : (V, 3) float32, refined, same order as the input
    report : PhotoRefinementReport: per-pass statistics, total offset, timings
    """
    t0 = time.perf_counter()
    v_in = np.asarray(vertices, np.float32)
    f_in = np.asarray(faces, np.int64)
    report = PhotoRefinementReport(enabled=bool(cfg.enabled))
    if not cfg.enabled or len(f_in) == 0 or len(frames.views) < 2:
        report.seconds = round(time.perf_counter() - t0, 3)
        return v_in.copy(), report
    device = torch.device(device)
    v = torch.as_tensor(v_in, device=device)
    f = torch.as_tensor(f_in, device=device)
    lap = graph_laplacian(f_in, len(v_in))
    work = max(max(vw.depth_camera.width, vw.depth_camera.height) for vw in frames.views)
    total = torch.zeros(len(v), device=device)
    limit = None
    n_pass = len(cfg.pass_image_sizes)
    for i, size in enumerate(cfg.pass_image_sizes):
        if progress is not None:
            progress("photo_refine", i / n_pass)
        pv = prepare_pass_views(frames, min(size, work), cfg.blur_px, device)
        x, rep = refine_pass(v, f, pv, lap, cfg, backend=backend)
        if limit is None:
            limit = cfg.max_offset_px * rep["pixel_size"] * max(pv.size) / work
        nrm = vertex_normals_torch(v, f)
        new_total = (total + x).clamp(-limit, limit)
        v = v + (new_total - total)[:, None] * nrm
        total = new_total
        rep["image_size"] = list(pv.size)
        report.passes.append(rep)
    if progress is not None:
        progress("photo_refine", 1.0)
    report.mean_abs_offset = round(float(total.abs().mean()), 6)
    report.max_abs_offset = round(float(total.abs().max()), 6)
    report.seconds = round(time.perf_counter() - t0, 3)
    return v.cpu().numpy().astype(np.float32), report


def refine_textured_surface(
    mesh: TexturedMesh, frames: PosedFrames, cfg: PhotoRefineConfig, **kw
) -> tuple[TexturedMesh, PhotoRefinementReport]:
    """:func:`refine_surface` on a :class:`TexturedMesh` (its texture, if any, is kept as is)."""
    v, report = refine_surface(mesh.vertices, mesh.faces, frames, cfg, **kw)
    return TexturedMesh(v, mesh.faces, mesh.uvs, mesh.texture, mesh.vertex_colors), report
