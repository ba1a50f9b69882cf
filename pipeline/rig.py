"""Silhouette carving and rig estimation: cameras of the six-view rig from the masks alone.

Everything here works on torch tensors on one device (CPU or CUDA):

- :func:`carve_occupancy` intersects the masks' visual cones in a regular voxel grid
  (soft occupancy: the smallest mask coverage over the views);
- :func:`render_hull` ray-marches that grid into a view: silhouette and first-hit depth;
- :func:`estimate_rig` searches the rig's horizontal field of view and checks the
  view-to-axis assignment by re-projecting the carved hull into every view and
  comparing it with the masks (mean IoU); :class:`RigSearch` scores the candidates.

Cameras as tensors are :class:`~pipeline.camera_stack.CameraStack`, the grid
:class:`~pipeline.voxel_grid.VoxelGrid`, the device :func:`~pipeline.device.torch_device`.

Only the ratio of field of view to camera distance is determined by silhouettes, so
the distance stays at :data:`~pipeline.camera.RIG_DISTANCE`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .camera import RIG_DISTANCE, RIG_FOV_X_DEG, RIG_LAYOUT, Camera, default_rig
from .camera_stack import CameraStack, sample_images
from .reports import CameraEstimateReport
from .voxel_grid import VoxelGrid

#: Silhouette images used by the rig search are resampled to this size (longest side, pixels).
SEARCH_IMAGE_SIZE = 96
#: Samples on the longest side of the coarse grid that finds the hull's bounding box.
COARSE_RESOLUTION = 32
#: Ray-march samples per voxel of the grid's longest side.
SAMPLES_PER_VOXEL = 1.5
#: Soft occupancy above this is inside the hull.
OCCUPANCY_LEVEL = 0.5
#: Coarse step of the field-of-view search, degrees; then refined by halving down to FOV_FINE_STEP_DEG.
FOV_COARSE_STEP_DEG = 5.0
FOV_FINE_STEP_DEG = 1.25
#: A layout variant must beat the default by this much mean IoU to be chosen (guards against noise).
LAYOUT_MARGIN = 0.005
#: Fields of view scoring within this mean IoU of the best are indistinguishable by silhouettes
#: (convex, boxy objects carve alike at any FOV); among them the one nearest the nominal rig wins.
FOV_PRIOR_MARGIN = 0.005
#: ... widened to this fraction of the best field of view's IoU shortfall (1 - IoU) when that is larger
#: (the open sheet of the validation set: best 0.856 at 55 deg, the true 60 deg 0.849).
FOV_PRIOR_NOISE_FRACTION = 0.1


def resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, H, W) bool/float masks -> (N, h, w) float coverage in [0, 1] (area average)."""
    m = masks.float()[:, None]
    return F.interpolate(m, size=size, mode="area")[:, 0]


def carve_occupancy(masks: torch.Tensor, cams: CameraStack, grid: VoxelGrid, *, chunk: int = 1 << 20) -> torch.Tensor:
    """Soft visual hull: for each grid sample, the smallest mask value over the views.

    Parameters
    ----------
    masks : (N, h, w) float in [0, 1] at the cameras' image size
    cams : CameraStack, N cameras
    grid : VoxelGrid

    Returns
    -------
    (X, Y, Z) float32 in [0, 1]; 0 where any view sees background or the sample leaves its image
    """
    pts = grid.points(masks.device)
    out = torch.empty(len(pts), dtype=torch.float32, device=masks.device)
    for s in range(0, len(pts), chunk):
        uv, z = cams.project(pts[s : s + chunk])
        val = sample_images(masks, uv)
        val = torch.where(z > 0, val, torch.zeros_like(val))
        out[s : s + chunk] = val.amin(dim=0)
    return out.reshape(grid.shape)


def render_hull(
    occupancy: torch.Tensor,
    grid: VoxelGrid,
    cams: CameraStack,
    *,
    samples: int | None = None,
    rays: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ray-march a soft occupancy grid into each camera (one ray per pixel centre).

    ``rays`` : optional (N, h, w) bool, march only these pixels (the others read 0).

    Returns
    -------
    silhouette : (N, h, w) float32, the largest occupancy along each ray
    depth : (N, h, w) float32, z-depth of the first crossing of :data:`OCCUPANCY_LEVEL`
        (linearly interpolated between samples); 0 where the ray misses the hull
    """
    device = occupancy.device
    N, h, w = len(cams), cams.height, cams.width
    samples = samples or int(max(grid.shape) * SAMPLES_PER_VOXEL)
    corners = torch.as_tensor(
        np.array(
            [
                [x, y, z]
                for x in (grid.lo[0], grid.hi[0])
                for y in (grid.lo[1], grid.hi[1])
                for z in (grid.lo[2], grid.hi[2])
            ]
        ),
        dtype=torch.float32,
        device=device,
    )
    _, zc = cams.project(corners)  # (N, 8)
    z0 = zc.amin(dim=1).clamp(min=1e-3)
    z1 = zc.amax(dim=1)
    ii, jj = torch.meshgrid(
        torch.arange(h, device=device, dtype=torch.float32) + 0.5,
        torch.arange(w, device=device, dtype=torch.float32) + 0.5,
        indexing="ij",
    )
    Kinv = torch.linalg.inv(cams.K)  # (N, 3, 3)
    pix = torch.stack([jj.reshape(-1), ii.reshape(-1), torch.ones(h * w, device=device)], dim=-1)
    d_cam = torch.einsum("nij,pj->npi", Kinv, pix)  # (N, P, 3), z = 1
    cam_to_world = torch.linalg.inv(cams.world_to_cam)
    R, C = cam_to_world[:, :3, :3], cam_to_world[:, :3, 3]
    d_world = torch.einsum("nij,npj->npi", R, d_cam)
    t = torch.linspace(0.0, 1.0, samples, device=device)
    zs = z0[:, None] + (z1 - z0)[:, None] * t[None]  # (N, S)
    lo = torch.as_tensor(grid.lo, dtype=torch.float32, device=device)
    ext = torch.as_tensor(grid.hi - grid.lo, dtype=torch.float32, device=device)
    vol = occupancy[None, None].permute(0, 1, 4, 3, 2)  # grid_sample wants (D=z, H=y, W=x)
    sil = torch.empty(N, h * w, device=device)
    depth = torch.empty(N, h * w, device=device)
    sil.zero_()
    depth.zero_()
    for n in range(N):
        sel = torch.nonzero(rays[n].reshape(-1), as_tuple=True)[0] if rays is not None else None
        dn = d_world[n] if sel is None else d_world[n][sel]
        if len(dn) == 0:
            continue
        p = C[n][None, None] + dn[:, None, :] * zs[n][None, :, None]  # (P, S, 3)
        g = (p - lo) / ext * 2.0 - 1.0
        occ = F.grid_sample(vol, g[None, None], mode="bilinear", padding_mode="zeros", align_corners=True)[0, 0, 0]
        sil_n = occ.amax(dim=1)
        inside = occ >= OCCUPANCY_LEVEL
        hit = inside.any(dim=1)
        k = torch.argmax(inside.to(torch.uint8), dim=1)  # first inside sample
        kp = (k - 1).clamp(min=0)
        o1 = occ.gather(1, k[:, None])[:, 0]
        o0 = occ.gather(1, kp[:, None])[:, 0]
        frac = ((OCCUPANCY_LEVEL - o0) / (o1 - o0).clamp(min=1e-6)).clamp(0.0, 1.0)
        frac = torch.where(k > 0, frac, torch.ones_like(frac))
        zk = zs[n][k]
        zkp = zs[n][kp]
        depth_n = torch.where(hit, zkp + (zk - zkp) * frac, torch.zeros_like(zk))
        if sel is None:
            sil[n], depth[n] = sil_n, depth_n
        else:
            sil[n, sel], depth[n, sel] = sil_n, depth_n
    return sil.reshape(N, h, w), depth.reshape(N, h, w)


def silhouette_iou(rendered: torch.Tensor, masks: torch.Tensor, *, soft: bool = False) -> torch.Tensor:
    """(N,) IoU of silhouettes (N, h, w) against masks (N, h, w), values in [0, 1].

    ``soft``: sum(min) / sum(max) of the coverages (smooth in the cameras); else both thresholded at 0.5.
    """
    if soft:
        inter = torch.minimum(rendered, masks).flatten(1).sum(1)
        union = torch.maximum(rendered, masks).flatten(1).sum(1).clamp(min=1e-6)
        return inter / union
    a = rendered >= 0.5
    b = masks >= 0.5
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float().clamp(min=1.0)
    return inter / union


def carve_hull(
    masks: torch.Tensor, cams: CameraStack, resolution: int, *, coarse_resolution: int = COARSE_RESOLUTION
) -> tuple[torch.Tensor, VoxelGrid]:
    """Carve the masks' visual hull in a grid fitted to it.

    A coarse carve over a generous box finds the hull's bounding box; the grid of ``resolution``
    samples on its longest side is then laid over that box (plus a margin).

    Returns
    -------
    occupancy : (X, Y, Z) float32 soft occupancy (see :func:`carve_occupancy`)
    grid : VoxelGrid
    """
    lo, hi = bounds_from_masks(masks, cams)
    coarse = VoxelGrid.around(lo, hi, coarse_resolution, margin_voxels=0.0)
    occ = carve_occupancy(masks, cams, coarse)
    idx = torch.nonzero(occ > 0.0)
    if len(idx):
        lo = coarse.lo + idx.amin(0).cpu().numpy() * coarse.spacing - coarse.spacing
        hi = coarse.lo + idx.amax(0).cpu().numpy() * coarse.spacing + coarse.spacing
    grid = VoxelGrid.around(lo, hi, resolution, margin_voxels=1.0)
    return carve_occupancy(masks, cams, grid), grid


# ---------------------------------------------------------------- rig estimation


def _rotate_up(direction, up, quarter_turns: int):
    """Rotate an image-up vector about the viewing axis by quarter turns."""
    d, u = np.asarray(direction, float), np.asarray(up, float)
    for _ in range(quarter_turns % 4):
        u = np.cross(d, u)
    return tuple(float(x) for x in u)


def layout_variants(names: list[str]) -> dict[str, dict]:
    """Named alternative view-to-axis assignments of the default rig.

    ``default``; ``swap_left_right``; ``swap_front_back``; ``top_up_rot{90,180,270}`` and
    ``bottom_up_rot{90,180,270}`` (the view's image rotated about its axis).
    """
    base = {n: RIG_LAYOUT[n] for n in names}
    out = {"default": base}
    if "left" in base and "right" in base:
        out["swap_left_right"] = {**base, "left": base["right"], "right": base["left"]}
    if "front" in base and "back" in base:
        out["swap_front_back"] = {**base, "front": base["back"], "back": base["front"]}
    for name in ("top", "bottom"):
        if name in base:
            d, u = base[name]
            for q in (1, 2, 3):
                out[f"{name}_up_rot{90 * q}"] = {**base, name: (d, _rotate_up(d, u, q))}
    return out


def _combine_layouts(variants: dict[str, dict], chosen: list[str], names: list[str]) -> dict:
    """Apply each chosen variant's change to the default layout (the changes touch different views)."""
    base = variants["default"]
    out = dict(base)
    for key in chosen:
        for n in names:
            if variants[key][n] != base[n]:
                out[n] = variants[key][n]
    return out


def bounds_from_masks(
    masks: torch.Tensor, cams: CameraStack, *, distance: float = RIG_DISTANCE
) -> tuple[np.ndarray, np.ndarray]:
    """A generous world box that contains every visual cone's intersection near the origin.

    Back-projects each mask's pixel extent to the plane through the origin, then widens it by
    the perspective of the far side. Returns (lo (3,), hi (3,)) float64.
    """
    N, h, w = masks.shape
    fg = masks >= 0.5
    radius = 0.0
    for n in range(N):
        ys, xs = torch.nonzero(fg[n], as_tuple=True)
        if len(xs) == 0:
            continue
        K = cams.K[n]
        du = torch.maximum((xs.float() + 1.0 - K[0, 2]).abs(), (xs.float() - K[0, 2]).abs()).max() / K[0, 0]
        dv = torch.maximum((ys.float() + 1.0 - K[1, 2]).abs(), (ys.float() - K[1, 2]).abs()).max() / K[1, 1]
        radius = max(radius, float(torch.maximum(du, dv)) * distance)
    radius = min(radius, 0.95 * distance)
    r = radius * distance / max(distance - radius, 1e-3)
    return np.full(3, -r), np.full(3, r)


def hull_score(masks_small: torch.Tensor, cameras: list[Camera], resolution: int) -> tuple[float, list[float]]:
    """Mean silhouette IoU of the carved hull re-projected into each view (masks at the cameras' size)."""
    cams = CameraStack.from_cameras(cameras, masks_small.device)
    occ, grid = carve_hull(masks_small, cams, resolution)
    # The hull projects inside the masks: march only the rays near them.
    near = F.max_pool2d((masks_small > 0.0).float()[:, None], 3, stride=1, padding=1)[:, 0] > 0
    sil, _ = render_hull(occ, grid, cams, rays=near)
    iou = silhouette_iou(sil, masks_small, soft=True)
    return float(iou.mean()), [round(float(x), 4) for x in iou]


def estimate_rig(
    masks: torch.Tensor,
    names: list[str],
    width: int,
    height: int,
    *,
    fov_range_deg: tuple[float, float] = (40.0, 80.0),
    carve_resolution: int = 64,
    should_cancel=None,
) -> tuple[dict[str, Camera], CameraEstimateReport]:
    """Estimate the six-view rig from foreground masks.

    Parameters
    ----------
    masks : (N, H, W) bool or float tensor, one per name, at any common resolution
    names : N view names of the default rig (``front`` ... ``bottom``)
    width, height : int, size of the images the returned cameras are for
    fov_range_deg : (lo, hi) horizontal field of view searched, degrees

    Returns
    -------
    cameras : name -> Camera at (width, height)
    report : CameraEstimateReport: fov_x_deg, distance, layout, score, per-view IoU,
        the scores of the field-of-view and layout candidates
    """
    search = RigSearch.on_masks(masks, names, carve_resolution, should_cancel)
    variants = layout_variants(names)
    fov, best_score, fov_scores = search.best_fov(variants["default"], fov_range_deg)
    chosen, layout_scores = search.choose_layout(variants, fov, best_score)
    layout = _combine_layouts(variants, chosen, names)
    if chosen:  # the assignment changed: the field of view may move with it
        fov, best_score, more = search.best_fov(layout, fov_range_deg)
        fov_scores.update(more)
    final_score, per_view = search.score(fov, layout)
    cameras = default_rig(width, height, fov_x_deg=fov, names=tuple(names), layout=layout)
    report = CameraEstimateReport(
        method="silhouette_carving",
        fov_x_deg=round(float(fov), 3),
        distance=RIG_DISTANCE,
        layout=chosen or ["default"],
        layout_vectors={n: {"direction": list(layout[n][0]), "image_up": list(layout[n][1])} for n in names},
        score_mean_iou=round(final_score, 4),
        per_view_iou=dict(zip(names, per_view, strict=True)),
        fov_candidates={str(k): round(v, 4) for k, v in sorted(fov_scores.items())},
        layout_candidates=layout_scores,
        search_crop_px=[int(search.x0), int(search.y0), int(2 * search.half), int(2 * search.half)],
        carve_resolution=carve_resolution,
    )
    return cameras, report


def search_crop(masks: torch.Tensor) -> tuple[int, int, int]:
    """The centred square that holds every mask: (x0, y0, half), its corner and half side, pixels.

    A crop of the same size in every view keeps the rig's shared intrinsics (the principal point
    moves), and the object fills it, so the search's small silhouettes keep their detail.
    """
    H, W = masks.shape[1:]
    fg = masks.flatten(0, 0).any(dim=0)
    ys, xs = torch.nonzero(fg, as_tuple=True)
    half = (
        int(
            max(
                (xs.float() + 1 - W / 2).abs().max(),
                (xs.float() - W / 2).abs().max(),
                (ys.float() + 1 - H / 2).abs().max(),
                (ys.float() - H / 2).abs().max(),
            ).ceil()
        )
        + 2
    )
    half = min(half, max(H, W) // 2 + 2)
    return W // 2 - half, H // 2 - half, half


@dataclass
class RigSearch:
    """Scores rig candidates (field of view, layout) on the masks' search crop.

    Attributes
    ----------
    small : (N, s, s) float, mask coverage of the crop at :data:`SEARCH_IMAGE_SIZE`
    names : N view names
    width, height : int, the masks' size
    x0, y0, half : the crop (:func:`search_crop`)
    """

    small: torch.Tensor
    names: list[str]
    width: int
    height: int
    x0: int
    y0: int
    half: int
    carve_resolution: int
    should_cancel: Callable[[], bool] | None = None

    @classmethod
    def on_masks(cls, masks: torch.Tensor, names: list[str], carve_resolution: int, should_cancel=None) -> RigSearch:
        H, W = masks.shape[1:]
        x0, y0, half = search_crop(masks)
        pad = (max(0, -x0), max(0, x0 + 2 * half - W), max(0, -y0), max(0, y0 + 2 * half - H))
        crop = F.pad(masks.float(), pad)
        crop = crop[:, max(0, y0) : max(0, y0) + 2 * half, max(0, x0) : max(0, x0) + 2 * half]
        small = resize_masks(crop, (SEARCH_IMAGE_SIZE, SEARCH_IMAGE_SIZE))
        return cls(small, list(names), W, H, x0, y0, half, carve_resolution, should_cancel)

    def cameras(self, fov: float, layout: dict) -> list[Camera]:
        """The rig's cameras for the search crop, at the search size."""
        full = default_rig(self.width, self.height, fov_x_deg=fov, names=tuple(self.names), layout=layout)
        out = []
        for n in self.names:
            K = full[n].K.copy()
            K[0, 2] -= self.x0
            K[1, 2] -= self.y0
            side = 2 * self.half
            c = Camera(K=K, cam_to_world=full[n].cam_to_world, width=side, height=side, name=n)
            out.append(c.scaled(SEARCH_IMAGE_SIZE, SEARCH_IMAGE_SIZE))
        return out

    def score(self, fov: float, layout: dict) -> tuple[float, list[float]]:
        """Mean and per-view IoU of the hull carved with this rig (:func:`hull_score`)."""
        if self.should_cancel is not None and self.should_cancel():
            from .errors import CanceledError

            raise CanceledError("the job was canceled during rig estimation")
        return hull_score(self.small, self.cameras(fov, layout), self.carve_resolution)

    def best_fov(self, layout: dict, fov_range_deg: tuple[float, float]) -> tuple[float, float, dict[float, float]]:
        """The field of view that explains the masks best: (fov, its mean IoU, every fov tried -> IoU).

        A coarse scan, refined by halving the step around the best, then the vertex of the parabola
        through the best and its neighbours; among the fields of view within the noise margin of the
        best, the one nearest the nominal rig wins.
        """
        lo, hi = fov_range_deg
        tried: dict[float, float] = {}

        def at(f: float) -> float:
            key = round(float(f), 3)
            if key not in tried:
                tried[key] = self.score(key, layout)[0]
            return tried[key]

        n = max(2, int(math.ceil((hi - lo) / FOV_COARSE_STEP_DEG)))
        step = (hi - lo) / n
        for f in np.linspace(lo, hi, n + 1):
            at(f)
        best = max(tried, key=tried.get)
        while step / 2.0 >= FOV_FINE_STEP_DEG - 1e-9:
            step /= 2.0
            for f in (best - step, best + step):
                if lo <= f <= hi:
                    at(f)
            best = max(tried, key=tried.get)
        # Sub-step estimate: the vertex of the parabola through the best sample and its neighbours.
        if lo < best - step and best + step < hi:
            y0, y1, y2 = at(best - step), tried[best], at(best + step)
            curv = y0 - 2.0 * y1 + y2
            if curv < 0:
                offset = float(np.clip(0.5 * (y0 - y2) / curv, -0.5, 0.5)) * step
                if abs(offset) > 1e-3:
                    at(best + offset)
            best = max(tried, key=tried.get)
        # A poor best fit (thin or open objects carve coarsely) makes small IoU differences noise.
        margin = max(FOV_PRIOR_MARGIN, FOV_PRIOR_NOISE_FRACTION * (1.0 - tried[best]))
        close = [f for f, v in tried.items() if v >= tried[best] - margin]
        best = min(close, key=lambda f: (abs(f - RIG_FOV_X_DEG), -tried[f]))
        return best, tried[best], tried

    def choose_layout(self, variants: dict[str, dict], fov: float, best_score: float) -> tuple[list[str], dict]:
        """The alternative view-to-axis assignments that clearly help at ``fov``: (chosen, every score)."""
        layout_scores = {"default": round(best_score, 4)}
        chosen: list[str] = []
        groups = {"left_right": ["swap_left_right"], "front_back": ["swap_front_back"]}
        for name in ("top", "bottom"):
            groups[name] = [k for k in variants if k.startswith(f"{name}_up_rot")]
        for keys in groups.values():
            cand = {
                k: self.score(fov, _combine_layouts(variants, chosen + [k], self.names))[0]
                for k in keys
                if k in variants
            }
            layout_scores.update({k: round(v, 4) for k, v in cand.items()})
            if cand:
                k = max(cand, key=cand.get)
                if cand[k] > best_score + LAYOUT_MARGIN:
                    chosen.append(k)
                    best_score = cand[k]
        return chosen, layout_scores
