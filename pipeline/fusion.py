"""Geometry of the ``fusion`` model: hull-bounded TSDF fusion of the depth maps -> one clean mesh.

Steps (torch, on ``cfg.device``; marching cubes and mesh clean-up on the CPU):

1. the silhouette hull's bounding box (coarse carve) sets the grid, ``cfg.fusion.resolution``
   samples on its longest side;
2. a signed distance to the hull: each view's 2-D signed distance to its mask edge, scaled
   to scene units at the sample's depth, the largest over the views (positive outside);
3. a truncated signed distance from the depth maps. A depth pixel counts only where its
   surface point lies inside the (slightly widened) hull, so wrong depth cannot grow the
   object or cut deep into it from outside the hull;
4. the field is the larger of the two (the intersection of the shapes); samples no depth
   map saw are inside when inside the hull: where depth is missing, the hull decides;
5. marching cubes, small-component removal, Taubin smoothing, decimation, outward winding.

The mesh stays in the cameras' world frame: nothing is re-centred or rescaled.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from .camera import transform_points
from .config import ReconstructConfig
from .errors import CanceledError, EmptyReconstructionError
from .frames import PosedFrames
from .masks import signed_distance_px
from .mesh_cleanup import decimate, keep_large_components, orient_outward, taubin_smooth
from .rig import CameraStack, VoxelGrid, carve_hull, resize_masks, sample_images, torch_device

#: Masks are resampled to at most this size (longest side) to find the hull's bounding box.
BOUNDS_IMAGE_SIZE = 192
#: Depth pixels this close (pixels) to a mask edge are not fused (edge values mix with background).
DEPTH_EDGE_PX = 1
#: A depth pixel's surface point may lie this many truncation distances outside the hull.
DEPTH_HULL_TOLERANCE = 0.5
#: Coarse-to-fine evaluation: cells around a coarser pass's surface that the next pass evaluates.
SPARSE_BAND_CELLS = 1
#: Field samples evaluated per batch (bounds memory: about 100 bytes per sample and view).
FIELD_CHUNK = 1 << 19
#: Distance reported for samples that leave a view's image, in scene units per pixel of focal length.
_OFF_IMAGE_PX = 1e4


def _check(should_cancel, progress, fraction: float) -> None:
    if should_cancel is not None and should_cancel():
        raise CanceledError("the job was canceled during geometry reconstruction")
    if progress is not None:
        progress("reconstruct_geometry", fraction)


def mask_signed_distance(
    masks: np.ndarray, tolerance_px: float = 0.0, *, max_distance_px: np.ndarray | None = None
) -> np.ndarray:
    """Signed distance to each mask's edge, in pixels (negative inside).

    Parameters
    ----------
    masks : (N, H, W) bool
    tolerance_px : the masks are widened by this much
    max_distance_px : (N,) float or None; distances beyond it do not matter to the caller, so
        each view's transform runs only on the box around its mask grown by that much (several
        times faster for a small object), and values outside the box are set to that bound

    Returns
    -------
    (N, H, W) float32; the edge sits half a pixel outside the last mask pixel's centre. Exact
    wherever the magnitude is below ``max_distance_px``.
    """
    out = np.empty(masks.shape, np.float32)
    H, W = masks.shape[1:]
    for n, m in enumerate(masks):
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        if max_distance_px is None or len(rows) == 0:
            r0, r1, c0, c1 = 0, H, 0, W
        else:
            # All mask pixels lie inside the box, so distances inside it are exact.
            g = int(math.ceil(float(max_distance_px[n]))) + 2
            r0, r1 = max(rows[0] - g, 0), min(rows[-1] + 1 + g, H)
            c0, c1 = max(cols[0] - g, 0), min(cols[-1] + 1 + g, W)
            out[n] = float(max_distance_px[n]) + 1.0
        out[n, r0:r1, c0:c1] = signed_distance_px(m[r0:r1, c0:c1])
    return out - np.float32(tolerance_px)


def relevant_distance_px(cameras: list, lo: np.ndarray, hi: np.ndarray, distance: float) -> np.ndarray:
    """(N,) pixels that ``distance`` scene units span, at most, anywhere in the box [lo, hi] seen by each camera.

    A length d at z-depth z spans d * f / z pixels; the nearest z of the box is at one of its
    corners. A camera with a corner at or behind it gets no bound (inf).
    """
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    out = np.empty(len(cameras), np.float64)
    for i, cam in enumerate(cameras):
        z_near = float(transform_points(cam.world_to_cam, corners)[:, 2].min())
        f = float(max(cam.K[0, 0], cam.K[1, 1]))
        out[i] = distance * f / z_near if z_near > 1e-6 else np.inf
    return out


def hull_signed_distance(
    sdf_px: torch.Tensor,
    cams: CameraStack,
    points: torch.Tensor,
    *,
    projected: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Signed distance (scene units, positive outside) of (P, 3) points to the visual hull.

    Each view's pixel distance is scaled by depth / focal length; the hull's is the largest
    over the views (the intersection of the cones). ``projected`` is ``cams.project(points)``
    when the caller already has it. Returns (P,) float32.
    """
    uv, z = projected if projected is not None else cams.project(points)
    N, h, w = sdf_px.shape
    d = sample_images(sdf_px, uv)
    inside_img = (uv[..., 0] >= 0) & (uv[..., 0] <= w) & (uv[..., 1] >= 0) & (uv[..., 1] <= h) & (z > 0)
    d = torch.where(inside_img, d, torch.full_like(d, _OFF_IMAGE_PX))
    return (d * z.clamp(min=1e-6) / cams.K[:, None, 0, 0]).amax(dim=0)


def object_bounds(masks: torch.Tensor, cams_full, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """World (lo, hi) of the masks' carved hull, from a coarse carve."""
    N, H, W = masks.shape
    s = min(1.0, BOUNDS_IMAGE_SIZE / max(H, W))
    h, w = max(8, round(H * s)), max(8, round(W * s))
    small = resize_masks(masks, (h, w))
    cams = CameraStack.from_cameras([c.scaled(w, h) for c in cams_full], masks.device)
    occ, grid = carve_hull(small, cams, resolution)
    idx = torch.nonzero(occ >= 0.5)
    if len(idx) == 0:
        raise EmptyReconstructionError("the views' silhouettes do not intersect: no object to reconstruct")
    lo = grid.lo + idx.amin(0).cpu().numpy() * grid.spacing
    hi = grid.lo + idx.amax(0).cpu().numpy() * grid.spacing
    return lo - grid.spacing, hi + grid.spacing


def depth_lookup_table(depth: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(N, h + 2, w + 2) float32: the depth maps with -inf at invalid pixels and on a one-pixel border.

    :func:`fuse_depth_tsdf` reads it by clamped pixel index: a sample that leaves the image
    lands on the border, and -inf depth puts every sample far "behind" it, where no view counts.
    """
    table = torch.where(valid, depth, torch.full_like(depth, -math.inf))
    return F.pad(table, (1, 1, 1, 1), value=-math.inf)


def fuse_depth_tsdf(
    depth_table: torch.Tensor,
    cams: CameraStack,
    points: torch.Tensor,
    truncation: float,
    *,
    projected: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated signed distance from depth maps at (P, 3) points.

    Parameters
    ----------
    depth_table : (N, h + 2, w + 2) from :func:`depth_lookup_table` (z-depth, scene units)
    truncation : scene units
    projected : ``cams.project(points)`` when the caller already has it (uv (N, P, 2), z (N, P))

    Returns
    -------
    tsdf : (P,) float32 in [-1, 1], positive in front of the surfaces (outside); 0 where unseen
    weight : (P,) float32, number of views that saw the point within the truncation band or in front
    """
    N, hp, wp = depth_table.shape
    h, w = hp - 2, wp - 2
    uv, z = projected if projected is not None else cams.project(points)
    # Shifted by the border and clamped onto it; truncation towards zero is floor for these non-negatives.
    col = (uv[..., 0].clamp(-1.0, float(w)) + 1.0).long()
    row = (uv[..., 1].clamp(-1.0, float(h)) + 1.0).long()
    zo = torch.gather(depth_table.reshape(N, -1), 1, row * wp + col)
    sdf = zo - z
    ok = (sdf > -truncation) & (z > 0)
    tsdf = torch.where(ok, (sdf / truncation).clamp(max=1.0), torch.zeros_like(sdf)).sum(0)
    weight = ok.sum(0, dtype=torch.float32)
    return torch.where(weight > 0, tsdf / weight.clamp(min=1.0), tsdf), weight


def _coarser(grid: VoxelGrid) -> VoxelGrid:
    """The grid of every other sample of ``grid`` (same origin, twice the spacing, covering it)."""
    shape = tuple(int(n) for n in np.ceil((np.asarray(grid.shape) - 1) / 2).astype(int) + 1)
    return VoxelGrid(lo=grid.lo, spacing=grid.spacing * 2, shape=shape)


def _cell_samples(active_cell: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """(X, Y, Z) bool: samples of the twice-finer grid ``shape`` that lie in (or on) an active coarse cell."""
    act = active_cell.repeat_interleave(2, 0).repeat_interleave(2, 1).repeat_interleave(2, 2)
    act = F.pad(act, (0, 1, 0, 1, 0, 1))
    # A sample on a cell's far face belongs to the next cell too: extend each active run by one.
    act[1:] |= act[:-1].clone()
    act[:, 1:] |= act[:, :-1].clone()
    act[:, :, 1:] |= act[:, :, :-1].clone()
    X, Y, Z = shape
    return act[:X, :Y, :Z]


def _sign_fill(coarse: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """(X, Y, Z) float32 of +-1: the sign of ``coarse`` interpolated onto the twice-finer grid ``shape``."""
    up = tuple((n - 1) * 2 + 1 for n in coarse.shape)
    dense = F.interpolate(torch.sign(coarse)[None, None], size=up, mode="trilinear", align_corners=True)[0, 0]
    X, Y, Z = shape
    dense = dense[:X, :Y, :Z]
    return torch.where(dense >= 0, torch.ones_like(dense), -torch.ones_like(dense)).contiguous()


def evaluate_sparse(field_at, grid: VoxelGrid, truncation: float, device) -> tuple[torch.Tensor, int]:
    """Evaluate a truncated field exactly only where marching cubes reads it (coarse-to-fine).

    Marching cubes uses a sample's value only on an edge whose ends differ in sign; elsewhere
    the sign is enough. Three passes, each halving the spacing:

    1. every 4th sample, with a truncation of at least :data:`SPARSE_BAND_CELLS` + 0.5 of its
       cells; cells whose corners are all saturated at one sign hold no surface, even a thin one;
    2. every 2nd sample in the other cells; the cells whose corners differ in sign, grown by
       :data:`SPARSE_BAND_CELLS` cells on every side (where the fine surface may stray from
       the coarse one), are
    3. evaluated at every sample.

    Every sample not evaluated takes the sign of its coarser cell.

    Parameters
    ----------
    field_at : callable (P, 3) world points, truncation -> (P,) values in [-1, 1]
    grid : the fine VoxelGrid; truncation : fine truncation distance, scene units

    Returns
    -------
    (X, Y, Z) float32 field, and the number of samples evaluated (all passes)
    """
    mid = _coarser(grid)
    top = _coarser(mid)
    top_trunc = max(truncation, (SPARSE_BAND_CELLS + 0.5) * top.spacing)
    f_top = field_at(top.points(device), top_trunc).reshape(top.shape)
    n_evaluated = int(np.prod(top.shape))
    mx = F.max_pool3d(f_top[None, None], 2, stride=1)[0, 0]
    mn = -F.max_pool3d(-f_top[None, None], 2, stride=1)[0, 0]
    active_cell = (mn < 1.0) & (mx > -1.0)

    coarser = f_top  # the previous pass's field, whose signs fill the samples not evaluated
    for level in (mid, grid):
        dense = _sign_fill(coarser, level.shape)
        X, Y, Z = level.shape
        idx = torch.nonzero(_cell_samples(active_cell, level.shape).reshape(-1), as_tuple=True)[0]
        if len(idx):
            ijk = torch.stack([idx // (Y * Z), (idx // Z) % Y, idx % Z], dim=-1).float()
            lo = torch.as_tensor(level.lo, dtype=torch.float32, device=device)
            dense.view(-1)[idx] = field_at(lo + ijk * level.spacing, truncation)
        n_evaluated += int(len(idx))
        if level is mid:
            coarser = dense
            outside = (dense >= 0).float()[None, None]
            mixed = F.max_pool3d(outside, 2, stride=1) != -F.max_pool3d(-outside, 2, stride=1)
            k = 2 * SPARSE_BAND_CELLS + 1
            active_cell = F.max_pool3d(mixed.float(), k, stride=1, padding=SPARSE_BAND_CELLS)[0, 0] > 0
    return dense, n_evaluated


def _depth_inside_hull(depth, valid, cams: CameraStack, sdf_px, tolerance: float) -> torch.Tensor:
    """(N, h, w) bool: valid depth pixels whose surface point lies within ``tolerance`` of the hull."""
    N, h, w = depth.shape
    out = valid.clone()
    ii, jj = torch.meshgrid(
        torch.arange(h, device=depth.device, dtype=torch.float32) + 0.5,
        torch.arange(w, device=depth.device, dtype=torch.float32) + 0.5,
        indexing="ij",
    )
    Kinv = torch.linalg.inv(cams.K)
    c2w = torch.linalg.inv(cams.world_to_cam)
    for n in range(N):
        sel = torch.nonzero(valid[n].reshape(-1), as_tuple=True)[0]
        if len(sel) == 0:
            continue
        z = depth[n].reshape(-1)[sel]
        pix = torch.stack([jj.reshape(-1)[sel], ii.reshape(-1)[sel], torch.ones_like(z)], dim=-1)
        pc = (pix @ Kinv[n].T) * z[:, None]
        pw = pc @ c2w[n, :3, :3].T + c2w[n, :3, 3]
        d = hull_signed_distance(sdf_px, cams, pw)
        flat = out[n].reshape(-1)
        flat[sel] = d <= tolerance
    return out


def reconstruct_geometry(
    frames: PosedFrames, cfg: ReconstructConfig, *, progress=None, should_cancel=None
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Fuse the posed depth maps inside the silhouette hull and extract one clean mesh.

    Parameters
    ----------
    frames : PosedFrames, masks and depth at the working resolution with their ``depth_camera``
    cfg : ReconstructConfig, uses ``cfg.fusion``, ``cfg.camera.carve_resolution`` and ``cfg.device``

    Returns
    -------
    vertices : (V, 3) float32, world (the cameras' frame)
    faces : (F, 3) int32, counter-clockwise seen from outside
    report : JSON-serialisable dict: grid, voxel size, components removed, face counts, timings
    """
    fc = cfg.fusion
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, t: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - t, 3)
        return now

    device = torch_device(cfg.device)
    views = frames.views
    cams_full = [v.depth_camera for v in views]
    masks_np = np.stack([v.mask for v in views])
    masks = torch.as_tensor(masks_np, device=device)
    depth = torch.as_tensor(np.stack([v.depth for v in views]), dtype=torch.float32, device=device)
    cams = CameraStack.from_cameras(cams_full, device)
    _check(should_cancel, progress, 0.02)

    lo, hi = object_bounds(masks, cams_full, cfg.camera.carve_resolution)
    grid = VoxelGrid.around(lo, hi, fc.resolution, margin_voxels=fc.truncation_voxels + 2)
    truncation = fc.truncation_voxels * grid.spacing
    t = lap("bounds", t0)
    _check(should_cancel, progress, 0.1)

    # The hull enters the field clamped at the truncation distance, and the depth check well inside it.
    cap_px = relevant_distance_px(cams_full, grid.lo, grid.hi, truncation) + fc.hull_tolerance_px
    cap = cap_px if np.isfinite(cap_px).all() else None
    sdf_px = torch.as_tensor(
        mask_signed_distance(masks_np, fc.hull_tolerance_px, max_distance_px=cap), device=device
    )
    t = lap("mask_distance", t)
    _check(should_cancel, progress, 0.2)

    # Depth pixels: away from mask edges, and their surface points near the hull.
    k = 2 * DEPTH_EDGE_PX + 1
    interior = -F.max_pool2d(-masks.float()[:, None], k, stride=1, padding=DEPTH_EDGE_PX)[:, 0] > 0.5
    valid = interior & (depth > 0)
    n_valid = int(valid.sum())
    valid = _depth_inside_hull(depth, valid, cams, sdf_px, DEPTH_HULL_TOLERANCE * truncation)
    depth_used = float(valid.sum()) / max(n_valid, 1)
    t = lap("depth_check", t)
    _check(should_cancel, progress, 0.3)

    depth_table = depth_lookup_table(depth, valid)

    def field_at(points: torch.Tensor, trunc: float) -> torch.Tensor:
        out = torch.empty(len(points), device=device)
        for s0 in range(0, len(points), FIELD_CHUNK):
            p = points[s0 : s0 + FIELD_CHUNK]
            proj = cams.project(p)  # one projection serves the hull and the depth maps
            hull = (hull_signed_distance(sdf_px, cams, p, projected=proj) / trunc).clamp(-1.0, 1.0)
            tsdf, weight = fuse_depth_tsdf(depth_table, cams, p, trunc, projected=proj)
            # Unseen samples take the hull's side: inside where the hull is, which keeps the object closed.
            out[s0 : s0 + FIELD_CHUNK] = torch.maximum(torch.where(weight > 0, tsdf, -torch.ones_like(tsdf)), hull)
        return out

    field, n_evaluated = evaluate_sparse(field_at, grid, truncation, device)
    field_np = field.cpu().numpy()
    del field
    t = lap("fuse", t)
    _check(should_cancel, progress, 0.55)

    if not (field_np.min() < 0.0 < field_np.max()):
        raise EmptyReconstructionError("the fused volume has no surface", details={"grid": grid.to_dict()})
    from skimage.measure import marching_cubes

    verts, faces, _, _ = marching_cubes(field_np, level=0.0, spacing=(grid.spacing,) * 3, allow_degenerate=False)
    del field_np
    verts = (verts + grid.lo).astype(np.float32)
    faces = faces.astype(np.int32)
    n_mc = len(faces)
    t = lap("marching_cubes", t)
    _check(should_cancel, progress, 0.7)

    verts, faces, comp = keep_large_components(verts, faces, fc.min_component_fraction)
    verts = taubin_smooth(verts, faces, fc.smooth_iterations)
    t = lap("clean_smooth", t)
    _check(should_cancel, progress, 0.8)
    verts, faces = decimate(verts, faces, fc.target_faces)
    faces = orient_outward(verts, faces)
    if len(faces) == 0:
        raise EmptyReconstructionError("the reconstructed mesh is empty")
    t = lap("decimate", t)
    _check(should_cancel, progress, 1.0)
    timings["total"] = round(time.perf_counter() - t0, 3)

    report = {
        "method": "hull_bounded_tsdf",
        "device": str(device),
        "grid": grid.to_dict(),
        "voxel_size": round(grid.spacing, 6),
        "truncation": round(truncation, 6),
        "depth_pixels_used_fraction": round(depth_used, 4),
        "samples_evaluated_fraction": round(n_evaluated / float(np.prod(grid.shape)), 4),
        "marching_cubes_faces": int(n_mc),
        "components": comp["components"],
        "components_removed": comp["removed"],
        "faces_removed_with_components": comp["removed_faces"],
        "vertices": int(len(verts)),
        "faces": int(len(faces)),
        "bounds": {"lo": verts.min(0).round(5).tolist(), "hi": verts.max(0).round(5).tolist()},
        "timings_s": timings,
    }
    return verts.astype(np.float32), faces.astype(np.int32), report
