"""Views resampled for a refinement pass, and the sampling helpers shared by the surface and camera refinements.

:func:`prepare_pass_views` resizes and blurs every view's photo and mask for one pass and
stacks them on one device (:class:`PassViews`); :func:`project` maps world points into a
pass view, :func:`sample_image` reads bilinear samples, :func:`outside_mask` and
:func:`edge_fade` weigh samples against the mask edge, and :func:`vertex_visibility` says
which vertices each camera sees. Used by :mod:`pipeline.photo_refine` and
:mod:`pipeline.camera_refine`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .camera import Camera
from .frames import PosedFrames
from .masks import signed_distance_px
from .render import Backend, make_rasterizer

#: A view counts for a vertex's colour term only when cos(normal, ray to camera) exceeds this.
MIN_VIEW_COS = 0.1
#: Visibility rays start this many pass pixels off the surface along the normal (no self-hits).
RAY_OFFSET_PX = 0.75
#: Colour weights fade in over this many pixels inside the mask edge (edge pixels mix with background).
EDGE_FADE_PX = 3.0


@dataclass
class PassViews:
    """The views resampled for one pass, stacked on one device.

    Attributes
    ----------
    images : (N, 3, h, w) float32 in [0, 1], blurred
    sdf : (N, h, w) float32, signed distance to the mask edge in pixels (negative inside)
    masks : (N, h, w) float32 in {0, 1}; bilinear samples cross 0.5 on the mask edge (sub-pixel)
    cameras : list of N Camera at (w, h)
    K : (N, 3, 3) float32; world_to_cam : (N, 4, 4) float32; centers : (N, 3) float32
    """

    images: torch.Tensor
    sdf: torch.Tensor
    masks: torch.Tensor
    cameras: list[Camera]
    K: torch.Tensor
    world_to_cam: torch.Tensor
    centers: torch.Tensor

    @property
    def size(self) -> tuple[int, int]:
        return self.cameras[0].width, self.cameras[0].height


def _resize_rgb(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3) uint8 by area averaging."""
    if (rgb.shape[1], rgb.shape[0]) == size:
        return rgb
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BOX))


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if (mask.shape[1], mask.shape[0]) == size:
        return np.asarray(mask, bool)
    im = Image.fromarray(np.asarray(mask, np.uint8) * 255).resize(size, Image.Resampling.BILINEAR)
    return np.asarray(im) >= 128


def _gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, h, w) images (reflect padding)."""
    if sigma <= 0:
        return images
    r = max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-r, r + 1, dtype=images.dtype, device=images.device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    C = images.shape[1]
    out = F.pad(images, (r, r, 0, 0), mode="reflect")
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    out = F.pad(out, (0, 0, r, r), mode="reflect")
    return F.conv2d(out, k.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)


def prepare_pass_views(frames: PosedFrames, size: int, blur_px: float, device: torch.device) -> PassViews:
    """Resample the photos and masks of ``frames`` to ``size`` pixels on the longest side (never above the working size).

    Returns a :class:`PassViews` whose cameras are the views' ``depth_camera`` scaled to that size.
    """
    cams, imgs, sdfs, masks = [], [], [], []
    for v in frames.views:
        dc = v.depth_camera
        s = min(1.0, size / max(dc.width, dc.height))
        wh = (max(8, round(dc.width * s)), max(8, round(dc.height * s)))
        cams.append(dc.scaled(*wh))
        imgs.append(_resize_rgb(v.rgb, wh))
        m = _resize_mask(v.mask, wh)
        masks.append(m)
        sdfs.append(signed_distance_px(m, border_is_background=True))
    if len({(c.width, c.height) for c in cams}) != 1:
        raise ValueError("photo refinement needs views of one image size")
    images = torch.as_tensor(np.stack(imgs), device=device).permute(0, 3, 1, 2).float() / 255.0
    return PassViews(
        images=_gaussian_blur(images, blur_px),
        sdf=torch.as_tensor(np.stack(sdfs), device=device),
        masks=torch.as_tensor(np.stack(masks), dtype=torch.float32, device=device),
        cameras=cams,
        K=torch.as_tensor(np.stack([c.K for c in cams]), dtype=torch.float32, device=device),
        world_to_cam=torch.as_tensor(np.stack([c.world_to_cam for c in cams]), dtype=torch.float32, device=device),
        centers=torch.as_tensor(np.stack([c.center for c in cams]), dtype=torch.float32, device=device),
    )


def project(pv: PassViews, n: int, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, 3) world points -> pixel coordinates (P, 2) and z (P,) in pass view ``n``."""
    R, t = pv.world_to_cam[n, :3, :3], pv.world_to_cam[n, :3, 3]
    pc = points @ R.T + t
    z = pc[:, 2]
    zs = z.clamp(min=1e-6)
    K = pv.K[n]
    u = (K[0, 0] * pc[:, 0] + K[0, 1] * pc[:, 1]) / zs + K[0, 2]
    v = K[1, 1] * pc[:, 1] / zs + K[1, 2]
    return torch.stack([u, v], dim=-1), z


def sample_image(img: torch.Tensor, uv: torch.Tensor, w: int, h: int, padding: str = "border") -> torch.Tensor:
    """Bilinear samples of (C, h, w) at (P, 2) pixel coordinates (centres at +0.5) -> (P, C)."""
    g = torch.stack([uv[:, 0] * (2.0 / w) - 1.0, uv[:, 1] * (2.0 / h) - 1.0], dim=-1)
    out = F.grid_sample(img[None], g[None, None], mode="bilinear", padding_mode=padding, align_corners=False)
    return out[0, :, 0].T


def vertex_normals_torch(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """(V, 3) area-weighted unit vertex normals of (V, 3) vertices and (F, 3) int64 faces."""
    tri = vertices[faces]
    fn = torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1)
    vn = torch.zeros_like(vertices)
    for k in range(3):
        vn.index_add_(0, faces[:, k], fn)
    return F.normalize(vn, dim=-1, eps=1e-12)


def vertex_visibility(
    vertices: np.ndarray,
    faces: np.ndarray,
    normals: np.ndarray,
    cameras: list[Camera],
    offset: float,
    *,
    backend: Backend = "auto",
) -> np.ndarray:
    """Which vertices each camera sees, ignoring the facing test (the caller weighs by the normal).

    Parameters
    ----------
    vertices : (V, 3) float, world; faces : (F, 3) int; normals : (V, 3) float unit
    cameras : N cameras
    offset : rays start this far off the surface along the normal, scene units

    Returns
    -------
    (N, V) bool: nothing of the mesh lies between the (offset) vertex and the camera centre
    """
    rast = make_rasterizer(vertices, faces, backend=backend)
    start = np.asarray(vertices, np.float64) + offset * np.asarray(normals, np.float64)
    out = np.zeros((len(cameras), len(vertices)), bool)
    for n, cam in enumerate(cameras):
        to_cam = cam.center - start
        dist = np.linalg.norm(to_cam, axis=1)
        if hasattr(rast, "cast"):
            tri, _, t = rast.cast(start, to_cam / np.maximum(dist, 1e-12)[:, None])
            out[n] = (tri < 0) | (t >= dist)
        else:  # CUDA: depth test against a render (vertices are on the surface, so allow the offset)
            r = rast.rasterize(cam)
            from .camera import project_points

            uv, z = project_points(cam.K, cam.world_to_cam, start)
            col = np.clip(uv[:, 0].astype(int), 0, cam.width - 1)
            row = np.clip(uv[:, 1].astype(int), 0, cam.height - 1)
            d = r.depth[row, col]
            out[n] = (d <= 0) | (z <= d + 2.0 * offset)
    return out


def outside_mask(pv: PassViews, n: int, uv: torch.Tensor) -> torch.Tensor:
    """(P,) float in [-0.5, 0.5]: 0.5 minus the bilinear mask value; positive outside the mask edge.

    The bilinear mask crosses 0.5 half-way between an inside and an outside pixel centre,
    a sub-pixel edge estimate without the outward bias that pixel-centre distance
    transforms have on slanted edges.
    """
    w_img, h_img = pv.size
    return 0.5 - sample_image(pv.masks[n][None], uv, w_img, h_img, padding="zeros")[:, 0]


def edge_fade(pv: PassViews, n: int, uv: torch.Tensor) -> torch.Tensor:
    """(P,) weight in [0, 1]: 0 outside the mask, ramping to 1 over EDGE_FADE_PX inside it."""
    w_img, h_img = pv.size
    sd = sample_image(pv.sdf[n][None], uv, w_img, h_img)[:, 0]
    return (-sd / EDGE_FADE_PX).clamp(0.0, 1.0)
