"""Refinement by differentiable rendering (the ``nvdiffrec`` model's last stage).

Starts from the fusion mesh (its UV atlas and baked kd texture) and jointly optimises

- vertex positions, as offsets from the start (optionally through the smooth
  parametrisation of :mod:`pipeline.smooth_param`), regularised by a uniform Laplacian
  relative to the start mesh (keeps the fusion's smoothness, lets the shape move);
- the kd texture's texels,

against the input views: colour (squared error by default, what PSNR scores, plus a
small 1 - SSIM term so texture contrast survives where the views disagree; both over
the union of input and rendered masks, the region the masked PSNR uses), silhouette (:func:`pipeline.diffrender.silhouette_loss`)
and z-depth (smooth L1). Inputs are unlit albedo renders or evenly lit photos, so no
specular (ks) or normal map is fitted: with no view-dependent shading in the data they
would only absorb noise.

Topology, UVs and the world frame never change. Errors:
:class:`~pipeline.errors.ModelOOMError` (CUDA memory, after one retry at half the
resolution), :class:`~pipeline.errors.ConvergenceError` (NaN or a rising loss; the
caller keeps the fusion result), :class:`~pipeline.errors.CanceledError`.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .callbacks import CancelFn, ProgressFn
from .camera import Camera
from .config import RefineConfig
from .depth_calibration import HULL_FIT_METHOD
from .diffrender import make_diff_renderer, silhouette_loss
from .errors import (
    CanceledError,
    ConvergenceError,
    InvalidInputError,
    ModelOOMError,
    ReconstructionFailedError,
    is_oom,
)
from .frames import PosedFrames
from .masks import mask_box, signed_distance_px
from .mesh import TexturedMesh, graph_laplacian, weld_vertices
from .metrics import SSIM_K1, SSIM_K2, SSIM_SIGMA
from .optim import UniformAdam
from .render import cuda_available
from .reports import RefineReport
from .shading import subpixel_offsets
from .smooth_param import SmoothParametrisation

STAGE = "refine"
#: A windowed mean loss above this multiple of the first window's mean means the optimisation diverged.
DIVERGENCE_RATIO = 1.5
#: Smooth-L1 transition of the depth term, as a fraction of the bounding-box diagonal (about 8-bit depth steps).
DEPTH_HUBER_FRACTION = 0.005
#: Render sizes below this (longest side, pixels) are not worth a retry after running out of memory.
MIN_RETRY_RESOLUTION = 32
#: Finest texture-correction level, texels per render pixel along the longest side.
TEXTURE_FINEST_PER_PIXEL = 1.0
#: Coarsest texture-correction level, texels along its longest side.
TEXTURE_COARSEST_PX = 32
#: The structural term is computed in each view's object box grown by this many pixels.
SSIM_BOX_MARGIN_PX = 8
#: SSIM's stabilising constants for images in [0, 1], those of :func:`pipeline.metrics.image_metrics`.
_SSIM_C1 = SSIM_K1**2
_SSIM_C2 = SSIM_K2**2
#: When the loss stalls with the learning rate above this multiple of its final value, the refinement
#: runs one more convergence window at the final rate before it stops.
SETTLE_RATE_RATIO = 2.0
#: Convergence-test window of the coarse pass (``RefineConfig.coarse_resolution``), iterations.
COARSE_CONVERGENCE_WINDOW = 15
#: Loss-curve entries kept in a ConvergenceError's details.
ERROR_CURVE_TAIL = 50


# ---------------------------------------------------------------- targets


def _resize_float(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """(H, W) float -> (height, width) float32 by area averaging."""
    if img.shape == (height, width):
        return img.astype(np.float32)
    return np.asarray(Image.fromarray(img.astype(np.float32), mode="F").resize((width, height), Image.Resampling.BOX))


def build_targets(frames: PosedFrames, resolution: int, device) -> tuple[list[Camera], dict[str, torch.Tensor]]:
    """Cameras and target images of every view at the render size.

    The render size keeps each view's working (depth) aspect ratio with its longest side
    ``min(resolution, working size)``. Colour is the photo shrunk by area averaging, the mask
    is the area-averaged working mask > 0.5, and depth is the area average of the working
    depth where every contributing pixel is valid (0 elsewhere).

    Returns
    -------
    cameras : list of C Camera at (w, h)
    targets : dict of tensors ``rgb`` (C, h, w, 3) float32 in [0, 1], ``mask`` (C, h, w) bool,
        ``sdf`` (C, h, w) float32 pixels (negative inside), ``depth`` (C, h, w) float32 scene units
    """
    if not frames.views:
        raise InvalidInputError("refinement needs at least one view", code="INSUFFICIENT_VIEWS")
    dcam0 = frames.views[0].depth_camera
    long_side = max(dcam0.width, dcam0.height)
    s = min(1.0, resolution / long_side)
    w, h = max(1, round(dcam0.width * s)), max(1, round(dcam0.height * s))
    cams, rgbs, masks, sdfs, depths = [], [], [], [], []
    for v in frames.views:
        cam = v.depth_camera.scaled(w, h)
        rgb = np.asarray(Image.fromarray(v.rgb).resize((w, h), Image.Resampling.BOX), dtype=np.float32) / 255.0
        m = _resize_float(np.asarray(v.mask, dtype=np.float32), w, h) > 0.5
        valid = (np.asarray(v.depth) > 0) & np.asarray(v.mask, dtype=bool)
        dsum = _resize_float(np.where(valid, v.depth, 0.0), w, h)
        vfrac = _resize_float(valid.astype(np.float32), w, h)
        depth = np.where(vfrac > 1.0 - 1e-4, dsum / np.maximum(vfrac, 1e-6), 0.0).astype(np.float32)
        cams.append(cam)
        rgbs.append(rgb)
        masks.append(m)
        sdfs.append(signed_distance_px(m))
        depths.append(depth)
    t = {
        "rgb": torch.as_tensor(np.stack(rgbs), device=device),
        "mask": torch.as_tensor(np.stack(masks), device=device),
        "sdf": torch.as_tensor(np.stack(sdfs), device=device),
        "depth": torch.as_tensor(np.stack(depths), device=device),
    }
    return cams, t


@functools.lru_cache(maxsize=4)
def _gaussian_taps(sigma: float) -> tuple[float, ...]:
    """The 1-D Gaussian's 2 r + 1 weights (r = 3.5 sigma rounded), summing to 1."""
    r = int(3.5 * sigma + 0.5)
    k = np.arange(-r, r + 1, dtype=np.float64)
    g = np.exp(-0.5 * (k / sigma) ** 2)
    return tuple((g / g.sum()).tolist())


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (n, h, w) images, edge samples repeated: (n, h, w).

    One shifted multiply-add per tap and axis, in place: six times faster on the CPU than the
    dense banded matmul it replaced, and a 1-channel conv2d is slower still.
    """
    taps = _gaussian_taps(sigma)
    r = len(taps) // 2
    n, h, w = x.shape
    p = F.pad(x[:, None], (r, r, r, r), mode="replicate")[:, 0]
    rows = p[:, 0:h, :] * taps[0]
    for k in range(1, 2 * r + 1):
        rows.add_(p[:, k : k + h, :], alpha=taps[k])
    out = rows[:, :, 0:w] * taps[0]
    for k in range(1, 2 * r + 1):
        out.add_(rows[:, :, k : k + w], alpha=taps[k])
    return out


def gaussian_blur_transposed(y: torch.Tensor, sigma: float) -> torch.Tensor:
    """The adjoint of :func:`gaussian_blur` applied to (n, h, w) ``y``: (n, h, w).

    Spreads each value over its taps into a zero-padded frame, then folds what landed in the
    padding back onto the edge rows and columns it was read from (the repeated samples).
    """
    taps = _gaussian_taps(sigma)
    r = len(taps) // 2
    n, h, w = y.shape
    cols = y.new_zeros((n, h, w + 2 * r))
    for k in range(2 * r + 1):
        cols[:, :, k : k + w].add_(y, alpha=taps[k])
    cols[:, :, r] += cols[:, :, :r].sum(-1)
    cols[:, :, r + w - 1] += cols[:, :, r + w :].sum(-1)
    cols = cols[:, :, r : r + w]
    out = y.new_zeros((n, h + 2 * r, w))
    for k in range(2 * r + 1):
        out[:, k : k + h, :].add_(cols, alpha=taps[k])
    out[:, r, :] += out[:, :r, :].sum(1)
    out[:, r + h - 1, :] += out[:, r + h :, :].sum(1)
    return out[:, r : r + h, :]


def ssim_map_torch(a: torch.Tensor, b: torch.Tensor, *, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Per-pixel SSIM of two (C, h, w, 3) images in [0, 1], averaged over channels: (C, h, w).

    Gaussian windows (``sigma`` pixels, truncated at 3.5 sigma) and population statistics, as
    :func:`pipeline.metrics.image_metrics` measures it (up to the image border handling);
    differentiable in both images.
    """
    n, h, w = a.shape[:3]
    x1 = a.permute(0, 3, 1, 2)
    x2 = b.permute(0, 3, 1, 2)
    stats = torch.stack([x1, x2, x1 * x1, x2 * x2, x1 * x2])  # (5, C, 3, h, w)
    mu1, mu2, e11, e22, e12 = gaussian_blur(stats.reshape(-1, h, w), sigma).reshape(stats.shape)
    s11, s22, s12 = e11 - mu1 * mu1, e22 - mu2 * mu2, e12 - mu1 * mu2
    c1, c2 = _SSIM_C1, _SSIM_C2
    m = ((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1 * mu1 + mu2 * mu2 + c1) * (s11 + s22 + c2))
    return m.mean(1)


def target_ssim_stats(target: torch.Tensor, *, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """The blurred mean and second moment of (C, h, w, 3) target images: (C, 2, 3, h, w).

    They never change during a refinement, so :func:`structural_loss` takes them made once.
    """
    n, h, w = target.shape[:3]
    y = target.permute(0, 3, 1, 2)  # (C, 3, h, w)
    stats = torch.stack([y, y * y], 1).reshape(-1, h, w)
    return gaussian_blur(stats, sigma).reshape(n, 2, 3, h, w)


def structural_loss(
    rgb: torch.Tensor, target: torch.Tensor, region: torch.Tensor, target_stats: torch.Tensor | None = None
) -> torch.Tensor:
    """Sum of (1 - SSIM) over the ``region`` pixels of (C, h, w, 3) renders against their targets.

    Each view is cropped to the box around its region first (the rest is background on both
    sides and adds nothing), which makes the term several times cheaper. All crops come out
    of one gather: slicing each view separately would give every slice its own full-size
    gradient buffer in the backward pass. The term and its gradient are computed by
    :class:`_StructuralTerm` (values as :func:`ssim_map_torch` gives them).

    ``target_stats`` is :func:`target_ssim_stats` of ``target`` (made here when None). Blurred
    over the whole frame, they equal the crop's own at every region pixel: the box keeps
    :data:`SSIM_BOX_MARGIN_PX` pixels around the region, more than the blur's radius.
    """
    C, h, w = rgb.shape[:3]
    if target_stats is None:
        target_stats = target_ssim_stats(target.detach())
    full = (slice(0, h), slice(0, w))
    boxes = [mask_box(region[c], SSIM_BOX_MARGIN_PX) or full for c in range(C)]
    flat_idx = []
    for c, (ys, xs) in enumerate(boxes):
        rows = torch.arange(ys.start, ys.stop, device=rgb.device)
        cols = torch.arange(xs.start, xs.stop, device=rgb.device)
        flat_idx.append((c * h * w + rows[:, None] * w + cols[None, :]).reshape(-1))
    idx = torch.cat(flat_idx)
    crops = rgb.reshape(-1, 3).index_select(0, idx)  # index_select: its backward is the cheaper index_add
    target_crops = target.reshape(-1, 3)[idx].detach()
    weights = torch.cat([region[c, ys, xs].reshape(-1) for c, (ys, xs) in enumerate(boxes)]).to(rgb.dtype)
    shapes = tuple((ys.stop - ys.start, xs.stop - xs.start) for ys, xs in boxes)
    stat_crops = tuple(target_stats[c, :, :, ys, xs].to(rgb.dtype) for c, (ys, xs) in enumerate(boxes))
    return _StructuralTerm.apply(crops, target_crops, weights, shapes, stat_crops)


class _StructuralTerm(torch.autograd.Function):
    """sum over crops and pixels of weight * (1 - SSIM), with SSIM's gradient written out.

    Autograd through :func:`ssim_map_torch` keeps some twenty crop-sized intermediates and
    blurs five statistics back; the target's statistics need no gradient, and the render's
    gradient needs three blurs (the sneaker at ``fast``: the term took over half of each step).
    With ``mu``/``e`` the blurred means and second moments of render x and target y, per
    channel and pixel, S = A1 A2 / (B1 B2), A1 = 2 mu_x mu_y + c1, A2 = 2 (e_xy - mu_x mu_y) + c2,
    B1 = mu_x^2 + mu_y^2 + c1, B2 = e_xx - mu_x^2 + e_yy - mu_y^2 + c2, and for an upstream
    per-pixel g = dL/dS: dL/dx = G^T(g dS/dmu_x) + 2 x G^T(g dS/de_xx) + y G^T(g dS/de_xy).
    """

    @staticmethod
    def forward(ctx, crops, target_crops, weights, shapes, target_stat_crops):
        total = crops.new_zeros(())
        saved = []
        start = 0
        for (hb, wb), (mu_y, e_yy) in zip(shapes, target_stat_crops, strict=True):
            n = hb * wb
            x = crops[start : start + n].reshape(hb, wb, 3).permute(2, 0, 1)
            y = target_crops[start : start + n].reshape(hb, wb, 3).permute(2, 0, 1)
            wgt = weights[start : start + n].reshape(hb, wb)
            # Only the render's statistics are blurred per step; the target's come made (target_ssim_stats).
            mu_x, e_xx, e_xy = gaussian_blur(torch.cat([x, x * x, x * y]), SSIM_SIGMA).reshape(3, 3, hb, wb)
            mxy = mu_x * mu_y
            mxx = mu_x * mu_x
            a1 = 2.0 * mxy + _SSIM_C1
            a2 = 2.0 * (e_xy - mxy) + _SSIM_C2
            b1 = mxx + mu_y * mu_y + _SSIM_C1
            b2 = (e_xx - mxx) + (e_yy - mu_y * mu_y) + _SSIM_C2
            s = (a1 * a2) / (b1 * b2)
            total = total + ((1.0 - s.mean(0)) * wgt).sum()
            if ctx.needs_input_grad[0]:
                # g = dL/dS = -weight / 3 (the channel mean); the three maps G^T is applied to.
                gs = s * (-wgt / 3.0)
                d_mu = gs * (2.0 * mu_y * (1.0 / a1 - 1.0 / a2) + 2.0 * mu_x * (1.0 / b2 - 1.0 / b1))
                d_exx = -gs / b2
                d_exy = 2.0 * gs / a2
                saved.append((x, y, torch.cat([d_mu, d_exx, d_exy])))
            start += n
        ctx.saved = saved
        ctx.n_rows = crops.shape[0]
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grads = []
        for x, y, maps in ctx.saved:
            b_mu, b_exx, b_exy = gaussian_blur_transposed(maps, SSIM_SIGMA).reshape(3, *x.shape)
            gx = b_mu + 2.0 * x * b_exx + y * b_exy  # (3, hb, wb)
            grads.append(gx.permute(1, 2, 0).reshape(-1, 3))
        ctx.saved = None
        grad = torch.cat(grads) * grad_total if grads else None
        return grad, None, None, None, None


# ---------------------------------------------------------------- regulariser


def uniform_laplacian(faces: np.ndarray, n_vertices: int, device) -> torch.Tensor:
    """(V, V) sparse float32 uniform Laplacian L: (L x)_i = x_i - mean of x over i's neighbours
    (``D^-1 (D - A)`` of :func:`pipeline.mesh.graph_laplacian`; zero rows for unreferenced vertices)."""
    lap = graph_laplacian(faces, n_vertices).tocoo()
    deg = lap.diagonal()
    vals = lap.data / np.maximum(deg[lap.row], 1.0)
    L = torch.sparse_coo_tensor(
        np.stack([lap.row, lap.col]).astype(np.int64),
        vals.astype(np.float32),
        (n_vertices, n_vertices),
        check_invariants=False,
    )
    return L.coalesce().to(device)


def diffuse(L: torch.Tensor, x: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` passes of x <- x - 0.5 L x over (V, C) per-vertex values (a low-pass filter on the mesh).

    Vertex offsets are optimised through this filter: every parameter moves a smooth
    patch of surface, so Adam's per-parameter step normalisation cannot make
    neighbouring vertices jitter against each other (the idea behind "large steps"
    preconditioning, Nicolet et al. 2021, in its cheapest form).
    """
    for _ in range(steps):
        x = x - 0.5 * torch.sparse.mm(L, x)
    return x


def texture_pyramid_params(shape: tuple[int, ...], resolution: int, device) -> list[torch.Tensor]:
    """Zero-initialised texture corrections at halving sizes, the finest about the render size.

    Finer corrections would leave texels between the sampled ones untouched (speckle once
    the texture is filtered at render time); the base texture keeps the fine detail.

    Parameters
    ----------
    shape : (T, S, 3) of the base texture
    resolution : render size, pixels

    Returns
    -------
    list of (t_k, s_k, 3) float32 tensors requiring grad, coarsest last
    """
    T, S = int(shape[0]), int(shape[1])
    finest = min(1.0, TEXTURE_FINEST_PER_PIXEL * resolution / max(T, S))
    levels, f = [], finest
    while True:
        t, s = max(1, round(T * f)), max(1, round(S * f))
        levels.append(torch.zeros((t, s, 3), dtype=torch.float32, device=device, requires_grad=True))
        if max(t, s) <= TEXTURE_COARSEST_PX:
            break
        f /= 2.0
    return levels


def compose_corrections(levels: list[torch.Tensor]) -> torch.Tensor:
    """(t0, s0, 3) sum of the correction levels, each upsampled bilinearly to the finest (first) level's size.

    The renderer samples this and the base texture at each pixel's UV every step: two
    texture lookups instead of one per level (bilinear sampling of a bilinear upsample
    differs from sampling the coarse level directly by a fraction of a coarse texel).
    """
    t0, s0 = levels[0].shape[:2]
    total = levels[0].permute(2, 0, 1)[None]
    for lv in levels[1:]:
        total = total + F.interpolate(lv.permute(2, 0, 1)[None], size=(t0, s0), mode="bilinear", align_corners=False)
    return total[0].permute(1, 2, 0)


def compose_texture(base: torch.Tensor, levels: list[torch.Tensor]) -> torch.Tensor:
    """(T, S, 3) texture in [0, 1]: the base plus the composed corrections upsampled bilinearly to its size."""
    T, S = base.shape[:2]
    delta = compose_corrections(levels)
    if tuple(delta.shape[:2]) != (T, S):
        delta = F.interpolate(delta.permute(2, 0, 1)[None], size=(T, S), mode="bilinear", align_corners=False)[0]
        delta = delta.permute(1, 2, 0)
    return (base + delta).clamp(0.0, 1.0)


# ---------------------------------------------------------------- loss health


def check_loss_health(history: list[float], window: int) -> str | None:
    """Why the loss curve means the optimisation failed, or None when it is healthy.

    Returns ``"nan"`` when the last value is not finite, ``"diverged"`` when the mean of the
    last ``window`` values exceeds :data:`DIVERGENCE_RATIO` times the mean of the first window.
    """
    if not history:
        return None
    if not math.isfinite(history[-1]):
        return "nan"
    if len(history) >= 2 * window:
        first = float(np.mean(history[:window]))
        last = float(np.mean(history[-window:]))
        if last > DIVERGENCE_RATIO * first:
            return "diverged"
    return None


def has_converged(history: list[float], window: int, tol: float) -> bool:
    """True when the mean of the last window improved on the window before it by less than ``tol`` (relative)."""
    if len(history) < 2 * window:
        return False
    prev = float(np.mean(history[-2 * window : -window]))
    last = float(np.mean(history[-window:]))
    return prev - last < tol * abs(prev)


# ---------------------------------------------------------------- optimisation


def _resolve_device(device: str) -> torch.device:
    """Like :func:`pipeline.device.torch_device`, but CUDA counts only with nvdiffrast usable (the
    refinement's rasterizer), and an explicit ``cuda`` without it is the caller's error."""
    if device == "auto":
        return torch.device("cuda" if cuda_available() else "cpu")
    if device == "cuda" and not cuda_available():
        raise InvalidInputError(
            "device 'cuda' was requested but no CUDA GPU with nvdiffrast is usable; use 'auto' or 'cpu'",
            code="DEVICE_UNAVAILABLE",
            details={"device": device},
        )
    return torch.device(device)


def refine_mesh(
    mesh: TexturedMesh,
    frames: PosedFrames,
    cfg: RefineConfig,
    *,
    device: str = "auto",
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
) -> tuple[TexturedMesh, RefineReport]:
    """Refine vertex positions and the kd texture of a textured mesh against the input views.

    Parameters
    ----------
    mesh : TexturedMesh with ``uvs`` and ``texture`` (the fusion result), world frame
    frames : PosedFrames, the input views with cameras, working-resolution masks and depth
    cfg : RefineConfig
    device : "auto" (CUDA with nvdiffrast when usable, else CPU with embree), "cpu" or "cuda"
    progress : called as ``progress("refine", fraction)``
    should_cancel : polled every iteration; True raises CanceledError

    Returns
    -------
    mesh : TexturedMesh with the same faces, UVs and world frame; refined vertices (float32)
        and texture (uint8)
    report : RefineReport with ``loss_curve`` (list of float, one per iteration), ``terms`` (dict of
        per-iteration lists: photometric, mask, depth, laplacian), ``iterations``,
        ``stop_reason`` ("converged", "iterations" or "time_budget"), ``time_s``, ``device``,
        ``backend``, ``resolution`` (render size, longest side), ``visibility_updates``,
        ``oom_retry`` (bool), ``settled_from_iteration`` (where a stalled loss switched the
        rest to the final learning rate, or None); all of the main pass. With
        ``cfg.coarse_resolution`` set, a first pass at that size runs before it, and
        ``coarse_pass`` has its ``iterations``, ``stop_reason``, ``time_s``, ``resolution`` and
        ``oom_retry`` (``time_s`` at the top level then covers both passes, and the main pass
        gets what is left of the time budget)

    Raises
    ------
    ReconstructionFailedError : the mesh has no texture or UVs (an upstream stage failed)
    ModelOOMError : CUDA ran out of memory at ``cfg.resolution`` and at half of it
    ConvergenceError : the loss became NaN or rose; ``details`` has the reason, iteration and loss tail
    CanceledError : ``should_cancel()`` returned True
    """
    if not mesh.has_texture:
        raise ReconstructionFailedError(
            "refinement needs a textured mesh (uvs and texture); bake a texture first",
            details={"vertices": int(len(mesh.vertices))},
        )
    dev = _resolve_device(device)
    t0 = time.perf_counter()
    coarse_report = None
    dcam = frames.views[0].depth_camera if frames.views else None
    render_size = min(cfg.resolution, max(dcam.width, dcam.height)) if dcam is not None else cfg.resolution
    if 0 < cfg.coarse_resolution < render_size and cfg.coarse_iterations > 0:
        coarse_cfg = replace(
            cfg,
            resolution=cfg.coarse_resolution,
            iterations=cfg.coarse_iterations,
            lr_vertices=cfg.coarse_lr_vertices,
            convergence_window=COARSE_CONVERGENCE_WINDOW,
            coarse_resolution=0,
        )
        # Progress share by rendered pixels: the coarse pass's steps are several times cheaper.
        share = coarse_cfg.iterations * coarse_cfg.resolution**2
        share = share / (share + cfg.iterations * cfg.resolution**2)
        mesh, coarse_report = _refine_with_retry(
            mesh, frames, coarse_cfg, dev, _scaled_progress(progress, 0.0, share), should_cancel
        )
        cfg = replace(cfg, time_budget_s=max(cfg.time_budget_s - (time.perf_counter() - t0), 0.0))
        progress = _scaled_progress(progress, share, 1.0)
    refined, report = _refine_with_retry(mesh, frames, cfg, dev, progress, should_cancel)
    if coarse_report is not None:
        report.coarse_pass = {
            k: getattr(coarse_report, k) for k in ("iterations", "stop_reason", "time_s", "resolution", "oom_retry")
        }
        report.time_s = round(time.perf_counter() - t0, 3)
    return refined, report


def _scaled_progress(progress: ProgressFn | None, lo: float, hi: float) -> ProgressFn | None:
    """``progress`` with its fraction mapped from [0, 1] into [lo, hi]."""
    if progress is None:
        return None
    return lambda stage, fraction: progress(stage, lo + (hi - lo) * fraction)


def _refine_with_retry(
    mesh, frames, cfg: RefineConfig, dev, progress, should_cancel
) -> tuple[TexturedMesh, RefineReport]:
    """One optimisation pass; on CUDA out-of-memory, one retry at half the render size."""
    try:
        return _refine(mesh, frames, cfg, dev, progress, should_cancel, oom_retry=False)
    except Exception as e:
        if not is_oom(e):
            raise
        half = cfg.resolution // 2
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        if half < MIN_RETRY_RESOLUTION:
            raise ModelOOMError(
                f"out of memory refining at {cfg.resolution} px on {dev}",
                details={"resolution": cfg.resolution, "device": str(dev)},
            ) from None
    try:
        return _refine(mesh, frames, replace(cfg, resolution=half), dev, progress, should_cancel, oom_retry=True)
    except Exception as e:
        if not is_oom(e):
            raise
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        raise ModelOOMError(
            f"out of memory refining at {cfg.resolution} px and again at {half} px on {dev}; "
            "use a smaller refine resolution or a GPU with more memory",
            details={"resolution": cfg.resolution, "retry_resolution": half, "device": str(dev)},
        ) from None


def refine_depth_weight(frames: PosedFrames, cfg: RefineConfig) -> float:
    """The depth term's weight: ``cfg.estimated_depth_weight`` when the depth encoding was fitted
    against the silhouette hull (:data:`pipeline.depth_calibration.HULL_FIT_METHOD`), else ``cfg.depth_weight``."""
    estimated = frames.depth_encoding.method == HULL_FIT_METHOD
    return cfg.estimated_depth_weight if estimated else cfg.depth_weight


class _Problem:
    """Everything one refinement optimises and compares against: targets, renderer, parameters, optimiser."""

    def __init__(self, mesh, frames, cfg: RefineConfig, dev):
        self.cams, self.tgt = build_targets(frames, cfg.resolution, dev)
        # Geometry lives on the welded surface (UV-seam copies share one position), so seams never open.
        weld_np, welded = weld_vertices(mesh.vertices)
        self.renderer = make_diff_renderer(
            mesh.faces, mesh.uvs, self.cams, backend="nvdiffrast" if dev.type == "cuda" else "embree", device=dev,
            weld=weld_np,
        )  # fmt: skip
        self.weld = torch.as_tensor(weld_np, device=dev)
        self.v0 = torch.as_tensor(welded.astype(np.float32), device=dev)
        v0 = self.v0
        self.scale = float(torch.linalg.norm(v0.max(0).values - v0.min(0).values).clamp(min=1e-9))
        welded_faces = weld_np[np.asarray(mesh.faces, dtype=np.int64)]
        self.L = uniform_laplacian(welded_faces, len(v0), dev)
        self.smooth = SmoothParametrisation(welded_faces, len(v0), cfg.vertex_smoothness)
        self.offset_param = torch.zeros_like(v0, requires_grad=True)
        # The smooth parametrisation is the diffusion pass's exact form: it replaces those passes.
        self.diffusion_steps = 0 if cfg.vertex_smoothness > 0 else cfg.smoothing_steps
        self.tex_base = torch.as_tensor(np.asarray(mesh.texture, dtype=np.float32) / 255.0, device=dev)
        self.tex_levels = texture_pyramid_params(self.tex_base.shape, cfg.resolution, dev)
        groups = [
            {"params": [self.offset_param], "lr": cfg.lr_vertices * self.scale},
            {"params": self.tex_levels, "lr": cfg.lr_texture},
        ]
        self.opt = UniformAdam(groups) if cfg.optimizer == "uniform_adam" else torch.optim.Adam(groups)
        self.lap0 = torch.sparse.mm(self.L, v0)
        self.n_obj = float(self.tgt["mask"].sum().clamp(min=1))
        self.depth_valid = self.tgt["mask"] & (self.tgt["depth"] > 0)
        self.depth_valid_flat, self.tgt_depth_flat = self.depth_valid.reshape(-1), self.tgt["depth"].reshape(-1)
        self.depth_weight = refine_depth_weight(frames, cfg)
        self.tgt_rgb_flat = self.tgt["rgb"].reshape(-1, 3)
        self.tgt_ssim = target_ssim_stats(self.tgt["rgb"]) if cfg.ssim_weight > 0 else None
        self.samples = tuple(subpixel_offsets(cfg.supersample))

    def welded_positions(self) -> torch.Tensor:
        """(V_welded, 3) the start plus the offsets the parameters stand for."""
        return self.v0 + self.smooth.solve(diffuse(self.L, self.offset_param, self.diffusion_steps))

    def loss(self, out, positions: torch.Tensor, cfg: RefineConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted loss of one render, and its terms (photometric, mask, depth, laplacian)."""
        tgt, n_obj, scale = self.tgt, self.n_obj, self.scale
        union = tgt["mask"] | out.mask | (out.coverage > 0)
        # Only the union's pixels enter the term: no full-frame arithmetic, forward or backward.
        in_union = torch.nonzero(union.reshape(-1), as_tuple=True)[0]
        diff = out.rgb.reshape(-1, 3).index_select(0, in_union) - self.tgt_rgb_flat[in_union]
        per_px = diff.square() if cfg.photometric_loss == "l2" else diff.abs()
        photo = per_px.mean(-1).sum() / n_obj
        if cfg.ssim_weight > 0:
            photo = photo + cfg.ssim_weight * structural_loss(out.rgb, tgt["rgb"], union, self.tgt_ssim) / n_obj
        sil = silhouette_loss(out, tgt["mask"], tgt["sdf"]) / n_obj
        depth = self.depth_term(out) / n_obj
        lap = ((torch.sparse.mm(self.L, positions) - self.lap0) / scale).pow(2).sum() / n_obj
        loss = photo + cfg.mask_weight * sil + self.depth_weight * depth + cfg.laplacian_weight * lap
        return loss, {"photometric": photo, "mask": sil, "depth": depth, "laplacian": lap}

    def depth_term(self, out) -> torch.Tensor:
        """Sum of smooth L1 of the z-depth error (over the bounding-box diagonal) where both depths exist.

        On the CPU only the covered pixels are visited (``out.pixels``); elsewhere the term is 0.
        """
        if out.pixels is not None:
            both = self.depth_valid_flat.index_select(0, out.pixels)
            err = out.pixel_depth - self.tgt_depth_flat.index_select(0, out.pixels)
            dz = torch.where(both, err / self.scale, torch.zeros_like(err))
        else:
            both = self.depth_valid & out.mask
            dz = torch.where(both, (out.depth - self.tgt["depth"]) / self.scale, torch.zeros_like(out.depth))
        return F.smooth_l1_loss(dz, torch.zeros_like(dz), beta=DEPTH_HUBER_FRACTION, reduction="sum")

    def silhouette_iou(self, out) -> float:
        with torch.no_grad():
            inter = (out.mask & self.tgt["mask"]).sum((1, 2)).float()
            uni = (out.mask | self.tgt["mask"]).sum((1, 2)).float().clamp(min=1)
            return float((inter / uni).mean())

    def diverged(self, reason: str, it: int, history: list[float], terms: dict, dev) -> ConvergenceError:
        return ConvergenceError(
            f"refinement failed at iteration {it}: the loss {'is not finite' if reason == 'nan' else 'rose'}; "
            "keep the fusion result",
            details={
                "reason": reason,
                "iteration": it,
                "loss_tail": [v if math.isfinite(v) else None for v in history[-ERROR_CURVE_TAIL:]],
                "terms": {k: (v[-1] if math.isfinite(v[-1]) else None) for k, v in terms.items()},
                "resolution": max(self.cams[0].width, self.cams[0].height),
                "device": str(dev),
                "backend": self.renderer.name,
            },
        )


def _refine(mesh, frames, cfg: RefineConfig, dev, progress, should_cancel, *, oom_retry: bool):
    t0 = time.perf_counter()
    pb = _Problem(mesh, frames, cfg, dev)
    # Exponential decay to cfg.lr_final_fraction at the last iteration: big steps early, little jitter late.
    # Once the loss stalls, the remaining steps ("settling") run at the final rate.
    settle_left: int | None = None

    def lr_factor(it: int) -> float:
        if settle_left is not None:
            return cfg.lr_final_fraction
        return cfg.lr_final_fraction ** (min(it, cfg.iterations) / max(cfg.iterations, 1))

    base_rates = [g["lr"] for g in pb.opt.param_groups]

    def set_rates(it: int) -> None:  # LambdaLR's rule, without its Optimizer (see optim.UniformAdam)
        for g, lr in zip(pb.opt.param_groups, base_rates, strict=True):
            g["lr"] = lr * lr_factor(it)

    log = {"history": [], "terms": {"photometric": [], "mask": [], "depth": [], "laplacian": []}, "iou": []}
    log.update(stop_reason="iterations", vis_updates=0, settle_at=None)
    history, terms = log["history"], log["terms"]
    for it in range(cfg.iterations):
        if should_cancel is not None and should_cancel():
            raise CanceledError("the job was canceled during refinement", details={"iteration": it})
        if time.perf_counter() - t0 > cfg.time_budget_s:
            log["stop_reason"] = "time_budget"
            break
        positions = pb.welded_positions()
        vertices = positions[pb.weld]
        refresh = it % max(cfg.visibility_interval, 1) == 0
        if refresh:
            pb.renderer.update_visibility(vertices.detach())
            log["vis_updates"] += 1
        out = pb.renderer.render(vertices, [pb.tex_base, compose_corrections(pb.tex_levels)], sample_offsets=pb.samples)
        if refresh:  # silhouette agreement, for the report
            log["iou"].append(pb.silhouette_iou(out))
        loss, parts = pb.loss(out, positions, cfg)
        history.append(float(loss.detach()))
        for k, term in parts.items():
            terms[k].append(float(term.detach()))
        reason = check_loss_health(history, cfg.convergence_window)
        if reason is not None:
            raise pb.diverged(reason, it, history, terms, dev)
        pb.opt.zero_grad(set_to_none=True)
        loss.backward()
        pb.opt.step()
        if progress is not None and (it % 5 == 0 or it == cfg.iterations - 1):
            progress(STAGE, (it + 1) / cfg.iterations)
        if settle_left is not None:
            settle_left -= 1
            if settle_left <= 0:
                log["stop_reason"] = "converged"
                break
        elif has_converged(history, cfg.convergence_window, cfg.convergence_tol):
            # A stall at a large step is the step's noise floor, not the optimum: on the sneaker,
            # runs stopped at 133-255 steps scored 24.6-24.8 dB, the whole schedule 25.4. Run one
            # window at the final rate, then stop; stop at once when the rate is near its end.
            if lr_factor(it + 1) <= SETTLE_RATE_RATIO * cfg.lr_final_fraction:
                log["stop_reason"] = "converged"
                break
            settle_left = cfg.convergence_window
            log["settle_at"] = it + 1
        set_rates(it + 1)  # after the test above, so a settle starts at the final rate on the next step
    return _refined_result(mesh, pb, log, dev, progress, oom_retry, t0)


def _refined_result(mesh, pb: _Problem, log: dict, dev, progress, oom_retry: bool, t0: float):
    """The refined TexturedMesh and the report of the run."""
    with torch.no_grad():
        v_out = pb.welded_positions()[pb.weld].cpu().numpy().astype(np.float32)
        tex_out = (
            (compose_texture(pb.tex_base, pb.tex_levels) * 255.0 + 0.5).clamp(0, 255).to(torch.uint8).cpu().numpy()
        )
    if not np.isfinite(v_out).all():
        raise ConvergenceError("refined vertices are not finite; keep the fusion result", details={"reason": "nan"})
    refined = TexturedMesh(
        vertices=v_out,
        faces=np.asarray(mesh.faces, dtype=np.int32),
        uvs=np.asarray(mesh.uvs, dtype=np.float32),
        texture=tex_out,
        vertex_colors=mesh.vertex_colors,
    )
    if progress is not None:
        progress(STAGE, 1.0)
    report = RefineReport(
        loss_curve=log["history"],
        terms=log["terms"],
        iterations=int(len(log["history"])),
        stop_reason=log["stop_reason"],
        time_s=round(time.perf_counter() - t0, 3),
        device=str(dev),
        backend=pb.renderer.name,
        resolution=int(max(pb.cams[0].width, pb.cams[0].height)),
        visibility_updates=log["vis_updates"],
        silhouette_iou=log["iou"],
        oom_retry=oom_retry,
        depth_weight=pb.depth_weight,
        settled_from_iteration=log["settle_at"],
        vertex_offset_max=float(np.abs(v_out - np.asarray(mesh.vertices, dtype=np.float32)).max())
        if len(v_out)
        else 0.0,
    )
    return refined, report


# ---------------------------------------------------------------- plot


def write_loss_plot(report: RefineReport, path: str | Path) -> None:
    """Write a PNG of the loss curve (total and per term, log scale): matplotlib if installed, else PIL."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    curve = [v for v in report.get("loss_curve", []) if v is not None and math.isfinite(v)]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _write_loss_plot_pil(curve, path)
        return
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(curve, label="total", color="black", linewidth=1.5)
    for name, values in report.get("terms", {}).items():
        vals = [v for v in values if v is not None and math.isfinite(v)]
        if vals and max(vals) > 0:
            ax.plot(vals, label=name, linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title(f"refinement ({report.get('backend', '?')}, stop: {report.get('stop_reason', '?')})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _write_loss_plot_pil(
    curve: list[float], path: Path, *, size: tuple[int, int] = (600, 400), margin: int = 30
) -> None:
    """A plain line plot of ``curve`` (log scale) on white."""
    from PIL import ImageDraw

    W, H = size
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.rectangle([margin, margin, W - margin, H - margin], outline=(160, 160, 160))
    pos = [v for v in curve if v > 0]
    if len(pos) >= 2:
        lo, hi = math.log10(min(pos)), math.log10(max(pos))
        span = max(hi - lo, 1e-9)
        pts = [
            (
                margin + i / (len(pos) - 1) * (W - 2 * margin),
                H - margin - (math.log10(v) - lo) / span * (H - 2 * margin),
            )
            for i, v in enumerate(pos)
        ]
        draw.line(pts, fill=(0, 0, 0), width=2)
        draw.text((margin, 5), f"loss {max(pos):.4g} -> {pos[-1]:.4g} ({len(curve)} it)", fill=(0, 0, 0))
    img.save(path)
