"""Geometry of the ``fusion`` model: hull-bounded TSDF fusion of the depth maps -> one clean mesh.

Steps (torch, on ``cfg.device``; marching cubes and mesh clean-up on the CPU):

1. the silhouette hull's bounding box (coarse carve) sets the grid, ``cfg.fusion.resolution``
   samples on its longest side;
2. a signed distance to the hull: each view's 2-D signed distance to its mask edge, scaled
   to scene units at the sample's depth, the largest over the views (positive outside);
3. a truncated signed distance from the depth maps. A depth pixel counts only where its
   surface point lies inside the (slightly widened) hull, so wrong depth cannot grow the
   object or cut deep into it from outside the hull. A shell of ``THIN_SHELL_VOXELS`` behind each
   view's surface stays inside whatever the views on the other side say: an open sheet, seen from
   both sides, is a thin slab (their mean alone cancels near it and leaves holes);
4. the field is the larger of the two (the intersection of the shapes); samples no depth
   map saw are inside when inside the hull: where depth is missing, the hull decides;
   a pixel whose depth the encoding clipped at ``far`` (``PosedView.free_depth``) is no surface:
   its ray is empty up to far, so the field is outside there whatever the other views say;
5. marching cubes, small-component removal, Taubin smoothing, decimation, then (after welding
   coincident vertices) removal of the small pieces that hang off non-manifold edges or single
   vertices, which a viewer that welds UV seams and splits the mesh shows as floating fragments;
   outward winding.

The mesh stays in the cameras' world frame: nothing is re-centred or rescaled.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .camera import transform_points
from .camera_stack import CameraStack
from .config import ReconstructConfig
from .device import torch_device
from .errors import CanceledError, EmptyReconstructionError
from .frames import PosedFrames
from .masks import mask_box, signed_distance_px
from .mesh_cleanup import decimate, drop_hanging_pieces, keep_large_components, orient_outward, taubin_smooth
from .reports import GeometryReport
from .visual_hull import carve_hull, resize_masks
from .voxel_grid import VoxelGrid

#: Masks are resampled to at most this size (longest side) to find the hull's bounding box.
BOUNDS_IMAGE_SIZE = 192
#: Depth pixels this close (pixels) to a mask edge are not fused (edge values mix with background).
DEPTH_EDGE_PX = 1
#: A depth pixel's surface point may lie this many truncation distances outside the hull.
DEPTH_HULL_TOLERANCE = 0.5
#: Thickness (grid steps) of the shell behind each view's surface that is inside whatever the other views
#: say: an open sheet, seen from both sides, becomes a slab this thick on each side instead of holes.
THIN_SHELL_VOXELS = 1.0
#: Coarse-to-fine evaluation: cells around a coarser pass's surface that the next pass evaluates.
SPARSE_BAND_CELLS = 1
#: Field samples evaluated per batch (bounds memory: about 100 bytes per sample and view).
FIELD_CHUNK = 1 << 19
#: The hull table's border: a sample that leaves a view's image is this far outside, per unit of depth.
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

    def one_view(n: int) -> None:
        m = masks[n]
        # All mask pixels lie inside the grown box, so distances inside it are exact.
        margin = None if max_distance_px is None else int(math.ceil(float(max_distance_px[n]))) + 2
        box = mask_box(m, margin) if margin is not None else None
        if box is None:
            box = (slice(0, H), slice(0, W))
        else:
            out[n] = float(max_distance_px[n]) + 1.0
        out[(n, *box)] = signed_distance_px(m[box])

    # scipy's distance transform releases the GIL: views run in parallel on the compute threads.
    with ThreadPoolExecutor(max(1, min(len(masks), torch.get_num_threads()))) as pool:
        list(pool.map(one_view, range(len(masks))))
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


def _in_chunks(fn, points: torch.Tensor) -> torch.Tensor:
    """(P,) float32: ``fn`` of (n, 3) points -> (n,), applied :data:`FIELD_CHUNK` points at a time (bounds memory)."""
    out = torch.empty(len(points), device=points.device)
    for s0 in range(0, len(points), FIELD_CHUNK):
        out[s0 : s0 + FIELD_CHUNK] = fn(points[s0 : s0 + FIELD_CHUNK])
    return out


class SilhouetteHull:
    """Signed distance (scene units, positive outside) of world points to the visual hull.

    Each view's pixel distance to its mask edge is scaled by depth / focal length; the hull's is
    the largest over the views (the intersection of the cones). All views are evaluated at once:
    one (5N, 4) matrix gives, per view, the normalised coordinates of a distance table with a
    one-pixel border (off the image reads as far outside), the pixel (u + 1, v + 1) and z, so a
    point costs one small matrix product and a few passes over (N, P).

    Parameters
    ----------
    cams : CameraStack of the N views, images (h, w)
    sdf_px : (N, h, w) float32, each mask's signed distance in pixels (positive outside)
    """

    def __init__(self, cams: CameraStack, sdf_px: torch.Tensor):
        N, h, w = sdf_px.shape
        self.n_views, self.height, self.width = N, h, w
        P = cams.K @ cams.world_to_cam[:, :3, :]  # (N, 3, 4): rows give u z, v z and z
        u1, v1, z = P[:, 0] + P[:, 2], P[:, 1] + P[:, 2], P[:, 2]  # u + 1, v + 1: pixels of bordered tables
        rows = torch.stack([u1 * (2.0 / (w + 2)) - z, v1 * (2.0 / (h + 2)) - z, u1, v1, z], dim=1)  # (N, 5, 4)
        self._rows = rows[:, :, :3].reshape(5 * N, 3).contiguous()
        self._offset = rows[:, :, 3].reshape(5 * N, 1).contiguous()
        scaled = sdf_px / cams.K[:, 0, 0, None, None]  # times z: scene units
        self._table = F.pad(scaled, (1, 1, 1, 1), value=_OFF_IMAGE_PX)[:, None].contiguous()

    def project(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(P, 3) world points -> (N, 5, P) projected rows, z (N, P) and 1 / z (N, P)."""
        ph = torch.addmm(self._offset, self._rows, points.T).view(self.n_views, 5, len(points))
        z = ph[:, 4]
        return ph, z, z.clamp(min=1e-6).reciprocal()

    def distance_projected(self, ph: torch.Tensor, z: torch.Tensor, inv_z: torch.Tensor) -> torch.Tensor:
        """The hull distance (P,) from :meth:`project`'s output."""
        grid = torch.stack([ph[:, 0] * inv_z, ph[:, 1] * inv_z], dim=-1)[:, None]
        d = F.grid_sample(self._table, grid, mode="bilinear", padding_mode="border", align_corners=False)[:, 0, 0]
        return d.mul_(z).amax(0)

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        """(P, 3) float32 world points -> (P,) float32 signed distance, scene units."""
        return _in_chunks(lambda p: self.distance_projected(*self.project(p)), points)


class HullBoundedTSDF:
    """The fused field at world points: a TSDF of the depth maps, bounded by the silhouette hull.

    Its value at a point is the larger (the intersection of the shapes) of

    - the hull's signed distance over the truncation distance, clamped to [-1, 1];
    - the mean over the views that see the point (in front of their depth, or behind it by less
      than the truncation) of the depth's signed distance over the truncation, at most 1;
      -1 where no view sees the point, so that the hull decides where depth is missing;
      where the point lies less than ``shell`` behind some view's surface, at most minus the
      smaller of its distances to that surface and to the shell's back (over the truncation), so
      that a part thinner than the truncation, seen from both sides, keeps an inside.

    Depth is read at the nearest pixel of a table with a one-pixel border, -inf there and at
    invalid pixels, so that no view counts for points that leave its image.

    Parameters
    ----------
    hull : SilhouetteHull of the same views
    depth : (N, h, w) float32 z-depth, scene units; valid : (N, h, w) bool, the pixels to fuse
    free_depth : (N, h, w) float32 clipped pixels' free z-depth (0 elsewhere) or None
    shell : thickness (scene units) of the inside kept behind every view's surface; 0: none
    """

    def __init__(
        self,
        hull: SilhouetteHull,
        depth: torch.Tensor,
        valid: torch.Tensor,
        free_depth: torch.Tensor | None = None,
        shell: float = 0.0,
    ):
        self.hull, self.shell = hull, float(shell)
        table = torch.where(valid, depth, torch.full_like(depth, -math.inf))
        self._depth = F.pad(table, (1, 1, 1, 1), value=-math.inf).reshape(len(depth), -1)
        self._free = None
        if free_depth is not None and bool((free_depth > 0).any()):
            # 0 (no clipped pixel, or off the image) carves nothing: every z > 0 lies beyond it.
            self._free = F.pad(free_depth, (1, 1, 1, 1), value=0.0).reshape(len(depth), -1)

    def __call__(self, points: torch.Tensor, truncation: float) -> torch.Tensor:
        """(P, 3) float32 world points -> (P,) float32 field values in [-1, 1] (positive outside)."""
        return _in_chunks(lambda p: self._evaluate(p, truncation), points)

    def _evaluate(self, p: torch.Tensor, truncation: float) -> torch.Tensor:
        h, w = self.hull.height, self.hull.width
        ph, z, inv_z = self.hull.project(p)
        hull = (self.hull.distance_projected(ph, z, inv_z) / truncation).clamp_(-1.0, 1.0)
        # Clamped onto the border; truncation towards zero is floor for these non-negatives.
        col = (ph[:, 2] * inv_z).clamp_(0.0, float(w + 1))
        row = (ph[:, 3] * inv_z).clamp_(0.0, float(h + 1)).floor_()
        pixel = torch.add(col, row, alpha=float(w + 2)).long()
        sdf = torch.gather(self._depth, 1, pixel).sub_(z)
        if self._free is not None:
            # A clipped pixel's ray is empty up to its free depth: outside there, whatever the others say.
            free = torch.gather(self._free, 1, pixel).sub_(z).amax(0)
            hull = torch.maximum(hull, (free / truncation).clamp_(-1.0, 1.0))
        seen = sdf > -truncation
        if float(z.min()) <= 0.0:
            seen &= z > 0
        n_seen = seen.sum(0, dtype=torch.float32)
        tsdf = torch.where(seen, sdf.mul_(1.0 / truncation).clamp_(max=1.0), 0.0).sum(0)
        tsdf = torch.where(n_seen > 0, tsdf / n_seen.clamp(min=1.0), -1.0)
        if self.shell > 0:
            # Thin parts: views on both sides of a sheet see its neighbourhood in front and behind, and
            # their mean cancels into holes. A shell just behind each view's surface is inside; a tent
            # (0 at the surface and at the shell's back), so that a closed surface, where the mean
            # is already at most -depth behind / truncation, stays where it is.
            behind = torch.where(seen, -sdf * truncation, -math.inf)  # scene units behind each surface
            tent = torch.minimum(behind, self.shell - behind).amax(0)
            tsdf = torch.where(tent > 0, torch.minimum(tsdf, -tent / truncation), tsdf)
        return torch.maximum(tsdf, hull)


def _coarser(grid: VoxelGrid) -> VoxelGrid:
    """The grid of every other sample of ``grid`` (same origin, twice the spacing, covering it)."""
    shape = tuple(int(n) for n in np.ceil((np.asarray(grid.shape) - 1) / 2).astype(int) + 1)
    return VoxelGrid(lo=grid.lo, spacing=grid.spacing * 2, shape=shape)


def _corner_any(samples: torch.Tensor) -> torch.Tensor:
    """(X, Y, Z) bool samples -> (X-1, Y-1, Z-1) bool: whether any of each cell's 8 corners is set."""
    out = samples
    for d in range(3):
        n = out.shape[d]
        out = out.narrow(d, 0, n - 1) | out.narrow(d, 1, n - 1)
    return out


def _dilate(x: torch.Tensor, r: int) -> torch.Tensor:
    """(X, Y, Z) bool grown by ``r`` samples on every side (a box dilation; same shape)."""
    for d in range(3):
        n = x.shape[d]
        out = x.clone()
        for k in range(1, min(r, n - 1) + 1):
            out.narrow(d, k, n - k).logical_or_(x.narrow(d, 0, n - k))
            out.narrow(d, 0, n - k).logical_or_(x.narrow(d, k, n - k))
        x = out
    return x


def _cell_samples(active_cell: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """(X, Y, Z) bool: samples of the twice-finer grid ``shape`` that lie in (or on) an active coarse cell.

    Along each axis, fine sample 2c + 1 lies inside cell c and sample 2c on the face between
    cells c - 1 and c; the three axes apply one after the other.
    """
    x = active_cell
    for d in range(3):
        m = x.shape[d]
        out_shape = list(x.shape)
        out_shape[d] = 2 * m + 1
        out = x.new_zeros(out_shape)
        lead = (slice(None),) * d
        out[(*lead, slice(1, None, 2))] = x
        out[(*lead, slice(0, 2 * m, 2))] |= x
        out[(*lead, slice(2, None, 2))] |= x
        x = out.narrow(d, 0, shape[d])
    return x


def _sign_fill(coarse: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """(X, Y, Z) float32 of +-1 on the twice-finer grid ``shape``: sample i takes the sign of coarse sample i // 2.

    That coarse sample is a corner of every coarse cell holding sample i, so the sign is right
    wherever those cells' corners agree, which is everywhere :func:`evaluate_sparse` does not evaluate.
    """
    sign = torch.where(coarse >= 0, 1.0, -1.0).to(torch.float32)
    out = torch.empty(shape, dtype=torch.float32, device=coarse.device)
    for i in (0, 1):
        for j in (0, 1):
            for k in (0, 1):
                dst = out[i::2, j::2, k::2]
                dst.copy_(sign[: dst.shape[0], : dst.shape[1], : dst.shape[2]])
    return out


def surface_cells(field: torch.Tensor) -> torch.Tensor:
    """(X, Y, Z) bool: the cells that the zero level set may cross, each at its highest corner (scikit-image's index).

    A cell qualifies when it has a corner >= 0 and a corner <= 0, whichever side marching cubes
    puts an exact zero on. Passed as marching cubes' mask, it skips the rest of the volume
    (half of scikit-image's time on a 205^3 grid).
    """
    cells = _corner_any(field >= 0) & _corner_any(field <= 0)
    return F.pad(cells, (1, 0, 1, 0, 1, 0), value=False)


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
    # A cell may hold a surface unless its corners are all saturated at one sign.
    active_cell = _corner_any(f_top < 1.0) & _corner_any(f_top > -1.0)

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
            mixed = _corner_any(dense >= 0) & _corner_any(dense < 0)
            active_cell = _dilate(mixed, SPARSE_BAND_CELLS)
    return dense, n_evaluated


def _depth_inside_hull(depth, valid, cams: CameraStack, hull: SilhouetteHull, tolerance: float) -> torch.Tensor:
    """(N, h, w) bool: valid depth pixels whose surface point lies within ``tolerance`` of the hull."""
    Kinv = torch.linalg.inv(cams.K)
    c2w = torch.linalg.inv(cams.world_to_cam)
    points = []
    for n in range(len(depth)):
        i, j = torch.nonzero(valid[n], as_tuple=True)
        z = depth[n, i, j]
        pix = torch.stack([j.float() + 0.5, i.float() + 0.5, torch.ones_like(z)], dim=-1)
        pc = (pix @ Kinv[n].T) * z[:, None]
        points.append(pc @ c2w[n, :3, :3].T + c2w[n, :3, 3])
    out = torch.zeros_like(valid)
    out[valid] = hull(torch.cat(points)) <= tolerance  # boolean indexing runs view by view, row-major
    return out


class _StageClock:
    """Per-step wall times (seconds) of one geometry reconstruction, with cancellation and progress checks."""

    def __init__(self, progress, should_cancel):
        self.t0 = self._last = time.perf_counter()
        self.timings: dict[str, float] = {}
        self._progress, self._should_cancel = progress, should_cancel

    def lap(self, name: str, fraction: float) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self._last, 3)
        self._last = now
        _check(self._should_cancel, self._progress, fraction)

    def total(self) -> dict[str, float]:
        self.timings["total"] = round(time.perf_counter() - self.t0, 3)
        return self.timings


@dataclass
class _FusionInputs:
    """The views as tensors on the fusion device (working resolution, N views of (h, w))."""

    cams_full: list
    cams: CameraStack
    masks_np: np.ndarray  # (N, h, w) bool
    masks: torch.Tensor  # (N, h, w) bool
    depth: torch.Tensor  # (N, h, w) float32 z-depth, 0 where invalid
    free_depth: torch.Tensor | None  # (N, h, w) float32 at clipped pixels, 0 elsewhere; None: none clipped


def _fusion_inputs(frames: PosedFrames, device) -> _FusionInputs:
    views = frames.views
    cams_full = [v.depth_camera for v in views]
    masks_np = np.stack([v.mask for v in views])
    free = None
    if any(v.free_depth is not None for v in views):
        free_np = np.stack(
            [v.free_depth if v.free_depth is not None else np.zeros(v.mask.shape, np.float32) for v in views]
        )
        free = torch.as_tensor(free_np, dtype=torch.float32, device=device)
    return _FusionInputs(
        cams_full=cams_full,
        cams=CameraStack.from_cameras(cams_full, device),
        masks_np=masks_np,
        masks=torch.as_tensor(masks_np, device=device),
        depth=torch.as_tensor(np.stack([v.depth for v in views]), dtype=torch.float32, device=device),
        free_depth=free,
    )


def _hull(inp: _FusionInputs, grid: VoxelGrid, truncation: float, tolerance_px: float) -> SilhouetteHull:
    """The silhouette hull; its distance table is exact only as far as the field reads it (truncation)."""
    cap_px = relevant_distance_px(inp.cams_full, grid.lo, grid.hi, truncation) + tolerance_px
    cap = cap_px if np.isfinite(cap_px).all() else None
    sdf_px = mask_signed_distance(inp.masks_np, tolerance_px, max_distance_px=cap)
    return SilhouetteHull(inp.cams, torch.as_tensor(sdf_px, device=inp.depth.device))


def _fused_field(
    inp: _FusionInputs, hull: SilhouetteHull, grid: VoxelGrid, truncation: float
) -> tuple[HullBoundedTSDF, float]:
    """The fused field and the fraction of depth pixels it uses.

    Depth pixels count away from mask edges (edge values mix with the background) and where
    their surface points lie near the hull; clipped pixels carve free space, also away from edges.
    """
    k = 2 * DEPTH_EDGE_PX + 1
    interior = -F.max_pool2d(-inp.masks.float()[:, None], k, stride=1, padding=DEPTH_EDGE_PX)[:, 0] > 0.5
    valid = interior & (inp.depth > 0)
    n_valid = int(valid.sum())
    valid = _depth_inside_hull(inp.depth, valid, inp.cams, hull, DEPTH_HULL_TOLERANCE * truncation)
    free = None if inp.free_depth is None else inp.free_depth * interior
    fused = HullBoundedTSDF(hull, inp.depth, valid, free, shell=THIN_SHELL_VOXELS * grid.spacing)
    return fused, float(valid.sum()) / max(n_valid, 1)


def _marching_cubes(field: torch.Tensor, grid: VoxelGrid) -> tuple[np.ndarray, np.ndarray]:
    """Zero level set of the (X, Y, Z) field -> (V, 3) float32 world vertices, (F, 3) int32 faces."""
    from skimage.measure import marching_cubes

    cells_np = surface_cells(field).cpu().numpy()
    field_np = field.cpu().numpy()
    if not (field_np.min() < 0.0 < field_np.max()):
        raise EmptyReconstructionError("the fused volume has no surface", details={"grid": grid.to_dict()})
    verts, faces, _, _ = marching_cubes(
        field_np, level=0.0, spacing=(grid.spacing,) * 3, allow_degenerate=False, mask=cells_np
    )
    return (verts + grid.lo).astype(np.float32), faces.astype(np.int32)


def _clean_mesh(verts: np.ndarray, faces: np.ndarray, fc, clock: _StageClock) -> tuple[np.ndarray, np.ndarray, dict]:
    """Small components out, Taubin smoothing, decimation, hanging pieces out, outward winding."""
    verts, faces, comp = keep_large_components(verts, faces, fc.min_component_fraction)
    verts = taubin_smooth(verts, faces, fc.smooth_iterations)
    clock.lap("clean_smooth", 0.8)
    verts, faces = decimate(verts, faces, fc.target_faces)
    # Decimation can leave fans on one vertex and pieces on non-manifold edges: a viewer that welds
    # UV seams and splits the mesh would show them as floating fragments.
    verts, faces, pieces = drop_hanging_pieces(verts, faces, fc.min_component_fraction)
    comp["removed_faces"] += pieces["removed_faces"]
    comp["fragments_removed"] = pieces["removed"]
    comp["non_manifold_edges"] = pieces["non_manifold_edges"]
    if len(faces) == 0:
        raise EmptyReconstructionError("the reconstructed mesh is empty")
    return verts, orient_outward(verts, faces), comp


def reconstruct_geometry(
    frames: PosedFrames, cfg: ReconstructConfig, *, progress=None, should_cancel=None
) -> tuple[np.ndarray, np.ndarray, GeometryReport]:
    """Fuse the posed depth maps inside the silhouette hull and extract one clean mesh.

    Parameters
    ----------
    frames : PosedFrames, masks and depth at the working resolution with their ``depth_camera``
    cfg : ReconstructConfig, uses ``cfg.fusion``, ``cfg.camera.carve_resolution`` and ``cfg.device``

    Returns
    -------
    vertices : (V, 3) float32, world (the cameras' frame)
    faces : (F, 3) int32, counter-clockwise seen from outside
    report : GeometryReport: grid, voxel size, components removed, face counts, timings
    """
    fc = cfg.fusion
    clock = _StageClock(progress, should_cancel)
    device = torch_device(cfg.device)
    inp = _fusion_inputs(frames, device)
    _check(should_cancel, progress, 0.02)

    lo, hi = object_bounds(inp.masks, inp.cams_full, cfg.camera.carve_resolution)
    grid = VoxelGrid.around(lo, hi, fc.resolution, margin_voxels=fc.truncation_voxels + 2)
    truncation = fc.truncation_voxels * grid.spacing
    clock.lap("bounds", 0.1)
    hull = _hull(inp, grid, truncation, fc.hull_tolerance_px)
    clock.lap("mask_distance", 0.2)
    fused, depth_used = _fused_field(inp, hull, grid, truncation)
    clock.lap("depth_check", 0.3)
    field, n_evaluated = evaluate_sparse(fused, grid, truncation, device)
    clock.lap("fuse", 0.55)
    verts, faces = _marching_cubes(field, grid)
    del field
    n_mc = len(faces)
    clock.lap("marching_cubes", 0.7)
    verts, faces, comp = _clean_mesh(verts, faces, fc, clock)
    clock.lap("decimate", 1.0)

    report = GeometryReport(
        method="hull_bounded_tsdf",
        device=str(device),
        grid=grid.to_dict(),
        voxel_size=round(grid.spacing, 6),
        truncation=round(truncation, 6),
        depth_pixels_used_fraction=round(depth_used, 4),
        clipped_pixels_carved=int((inp.free_depth > 0).sum()) if inp.free_depth is not None else 0,
        samples_evaluated_fraction=round(n_evaluated / float(np.prod(grid.shape)), 4),
        marching_cubes_faces=int(n_mc),
        components=comp["components"],
        components_removed=comp["removed"],
        fragments_removed_after_decimation=comp["fragments_removed"],
        non_manifold_edges=comp["non_manifold_edges"],
        faces_removed_with_components=comp["removed_faces"],
        vertices=int(len(verts)),
        faces=int(len(faces)),
        bounds={"lo": verts.min(0).round(5).tolist(), "hi": verts.max(0).round(5).tolist()},
        timings_s=clock.total(),
    )
    return verts.astype(np.float32), faces.astype(np.int32), report
