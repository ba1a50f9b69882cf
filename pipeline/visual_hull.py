"""The visual hull of silhouettes: carving, ray-marched renders and silhouette IoU.

Everything here works on torch tensors on one device (CPU or CUDA):

- :func:`carve_occupancy` intersects the masks' visual cones in a regular voxel grid
  (soft occupancy: the smallest mask coverage over the views);
- :func:`carve_hull` carves it in a grid fitted to the hull's bounding box;
- :func:`render_hull` ray-marches that grid into a view: silhouette and first-hit depth.

Cameras as tensors are :class:`~pipeline.camera_stack.CameraStack`, the grid
:class:`~pipeline.voxel_grid.VoxelGrid`. The rig search (:mod:`pipeline.rig`), the depth
calibration and fusion's hull bound use it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .camera import RIG_DISTANCE
from .camera_stack import CameraStack, sample_images
from .voxel_grid import VoxelGrid

#: Samples on the longest side of the coarse grid that finds the hull's bounding box.
COARSE_RESOLUTION = 32
#: Ray-march samples per voxel of the grid's longest side.
SAMPLES_PER_VOXEL = 1.5
#: Soft occupancy above this is inside the hull.
OCCUPANCY_LEVEL = 0.5


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
