"""Estimate an unstated depth encoding by fitting raw PNG values against the silhouette hull.

For each view, the carved visual hull is ray-marched into the view, giving a reference
z-depth per foreground pixel. The encoding is affine (``z = near + v / max_value * (far - near)``),
so each view gets a robust line fit of raw value -> hull z, away from the hull's edges.
The hull contains the object, so its depth is never behind the true surface: where the
object is concave (a shoe's opening) the hull depth lies in front of it, by a lot. The fit
is therefore one-sided: it starts from a Huber fit and then keeps the band of pixels at and
just in front of the line (:func:`envelope_line`), which converges on the pixels where the
hull touches the surface. The slope of a view
whose values span few levels is poorly determined, so each view's slope is pulled towards
the fit pooled over all views (cross-view consistency), in proportion to how little its own
values constrain it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .camera import Camera
from .config import DepthEncoding
from .rig import CameraStack, carve_hull, render_hull, resize_masks

#: ``method`` of the depth-encoding report of a fit against the silhouette hull (an estimate, not a statement).
HULL_FIT_METHOD = "hull_fit"
#: The fit works on images resampled to this size (longest side, pixels).
FIT_IMAGE_SIZE = 256
#: Pixels within this many (fit-size) pixels of a silhouette edge are left out of the fit.
EDGE_EXCLUSION_PX = 3
#: Huber threshold in robust standard deviations (95% efficiency for Gaussian noise).
HUBER_K = 1.345
#: Iterations of reweighted least squares.
IRLS_ITERATIONS = 8
#: Iterations of the one-sided (envelope) refinement.
ENVELOPE_ITERATIONS = 12
#: Pixels whose hull depth is more than this many noise sigmas in front of the line are concavities;
#: more than ENVELOPE_BEHIND_SIGMAS behind it, outliers (edge values, noise).
ENVELOPE_FRONT_SIGMAS = 2.0
ENVELOPE_BEHIND_SIGMAS = 6.0
#: The slope prior counts as much as a view's own data when the view's values have this
#: standard deviation, as a fraction of ``max_value``.
SLOPE_PRIOR_SPREAD = 0.02
#: Fewest usable pixels for a per-view fit; views with fewer take the pooled fit.
MIN_FIT_PIXELS = 50


def _huber_line(v: np.ndarray, z: np.ndarray, w0: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Robust fit z ~ a + b v. Returns (a, b, final weights (n,))."""
    w = w0.copy()
    a, b = float(np.median(z)), 0.0
    for _ in range(IRLS_ITERATIONS):
        sw = w.sum()
        vm, zm = (w * v).sum() / sw, (w * z).sum() / sw
        var = (w * (v - vm) ** 2).sum()
        b = float((w * (v - vm) * (z - zm)).sum() / var) if var > 0 else 0.0
        a = float(zm - b * vm)
        r = z - (a + b * v)
        sigma = max(1.4826 * float(np.median(np.abs(r - np.median(r)))), 1e-6)
        ar = np.abs(r) / (HUBER_K * sigma)
        w = w0 * np.where(ar <= 1.0, 1.0, 1.0 / np.maximum(ar, 1e-12))
    return a, b, w


def _weighted_line(v: np.ndarray, z: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    sw = w.sum()
    vm, zm = (w * v).sum() / sw, (w * z).sum() / sw
    var = (w * (v - vm) ** 2).sum()
    b = float((w * (v - vm) * (z - zm)).sum() / var) if var > 0 else 0.0
    return float(zm - b * vm), b


def envelope_line(v: np.ndarray, z: np.ndarray, w0: np.ndarray) -> tuple[float, float, np.ndarray, float]:
    """One-sided robust fit of hull depth ``z`` against raw value ``v`` (z_hull <= a + b v up to noise).

    Parameters
    ----------
    v, z, w0 : (n,) float64 raw values, hull z-depths and prior weights

    Returns
    -------
    a, b : the line; w : (n,) final weights (0 for rejected pixels); sigma : noise scale, scene units
    """
    a, b, _ = _huber_line(v, z, w0)
    w, sigma = w0, 0.0
    for _ in range(ENVELOPE_ITERATIONS):
        r = z - (a + b * v)
        pos = r[(r > 0) & (w0 > 0)]
        sigma = max(float(np.sqrt(np.mean(pos**2))) if len(pos) else 0.0, 1e-5)
        w = w0 * ((r > -ENVELOPE_FRONT_SIGMAS * sigma) & (r < ENVELOPE_BEHIND_SIGMAS * sigma))
        if w.sum() <= 0:
            break
        a, b = _weighted_line(v, z, w)
    return a, b, w, sigma


def _fit_samples(
    raw: np.ndarray, masks: np.ndarray, cameras: list[Camera], background: float, device: torch.device, resolution: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per view: (raw values (n,), hull z (n,)) at interior foreground pixels of the fit-size images."""
    N, H, W = raw.shape
    s = min(1.0, FIT_IMAGE_SIZE / max(H, W))
    h, w = max(8, round(H * s)), max(8, round(W * s))
    m = resize_masks(torch.as_tensor(masks, device=device), (h, w))
    cams = CameraStack.from_cameras([c.scaled(w, h) for c in cameras], device)
    occ, grid = carve_hull(m, cams, resolution)
    fg = m >= 0.5
    _, zh = render_hull(occ, grid, cams, rays=fg)
    # Interior: the mask eroded by EDGE_EXCLUSION_PX (min-pool of the mask).
    k = 2 * EDGE_EXCLUSION_PX + 1
    interior = -F.max_pool2d(-(m >= 0.99).float()[:, None], k, stride=1, padding=EDGE_EXCLUSION_PX)[:, 0] > 0.5
    # Raw values at the fit pixels' centres (nearest sample: raw values must not be blended).
    rows = np.minimum(((np.arange(h) + 0.5) * H / h).astype(int), H - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * W / w).astype(int), W - 1)
    raw_s = raw[:, rows][:, :, cols]
    zh = zh.cpu().numpy()
    ok = interior.cpu().numpy() & (zh > 0) & (raw_s != background)
    return [(raw_s[n][ok[n]].astype(np.float64), zh[n][ok[n]].astype(np.float64)) for n in range(N)]


def estimate_depth_encodings(
    raw: np.ndarray,
    masks: np.ndarray,
    cameras: list[Camera],
    *,
    max_value: float = 255.0,
    background: float = 0.0,
    device: torch.device | str = "cpu",
    carve_resolution: int = 96,
) -> tuple[list[DepthEncoding], dict]:
    """Fit one affine depth encoding per view against the silhouette hull.

    Parameters
    ----------
    raw : (N, H, W) float32, raw depth PNG values
    masks : (N, H, W) bool, foreground
    cameras : N cameras (any image size; scaled to the fit size here)
    max_value, background : the PNG's full-scale and background values

    Returns
    -------
    encodings : N DepthEncoding (``near`` may come out below 0 for a poorly constrained view:
        it is clamped to 0 and reported)
    report : JSON-serialisable: per view near, far, pixels used, inlier fraction (pixels where
        the hull touches the surface), correlation and robust residual (scene units) of the
        inliers; the pooled fit
    """
    device = torch.device(device)
    samples = _fit_samples(
        np.asarray(raw, np.float32), np.asarray(masks, bool), cameras, background, device, carve_resolution
    )
    counts = [len(v) for v, _ in samples]
    if sum(counts) < MIN_FIT_PIXELS:
        return [DepthEncoding(max_value=max_value, background=background)] * len(cameras), {
            "method": "default",
            "reason": "too few foreground pixels to fit",
        }
    # Pooled fit: every view weighs the same regardless of its pixel count.
    v_all = np.concatenate([v for v, _ in samples])
    z_all = np.concatenate([z for _, z in samples])
    w_all = np.concatenate([np.full(len(v), 1.0 / max(len(v), 1)) for v, _ in samples])
    a_g, b_g, _, _ = envelope_line(v_all, z_all, w_all)

    encodings, per_view = [], {}
    spread = SLOPE_PRIOR_SPREAD * max_value
    for cam, (v, z) in zip(cameras, samples, strict=True):
        if len(v) < MIN_FIT_PIXELS:
            a, b, w, sigma = a_g, b_g, np.ones(len(v)), 0.0
        else:
            a, b, w, sigma = envelope_line(v, z, np.ones(len(v)))
            # Shrink the slope towards the pooled one; the centred intercept stays this view's.
            sw = w.sum()
            vm, zm = (w * v).sum() / sw, (w * z).sum() / sw
            var = (w * (v - vm) ** 2).sum()
            lam = sw * spread**2
            b = float(((w * (v - vm) * (z - zm)).sum() + lam * b_g) / (var + lam))
            a = float(zm - b * vm)
        near, far = a, a + b * max_value
        clamped = near < 0.0 or far <= near
        if clamped:  # not a valid encoding: fall back to the pooled slope through this view's centre
            vm = float(np.median(v)) if len(v) else 0.0
            zm = float(np.median(z)) if len(z) else a_g + b_g * vm
            b = b_g
            a = zm - b * vm
            near, far = max(a, 0.0), max(a, 0.0) + max(b, 1e-6) * max_value
        enc = DepthEncoding(near=float(near), far=float(far), max_value=max_value, background=background)
        encodings.append(enc)
        inl = w > 0
        r = (z - (a + b * v))[inl]
        vi, zi = v[inl], z[inl]
        corr = float(np.corrcoef(vi, zi)[0, 1]) if len(vi) > 2 and vi.std() > 0 and zi.std() > 0 else 0.0
        per_view[cam.name] = {
            "near": round(float(near), 4),
            "far": round(float(far), 4),
            "pixels": int(len(v)),
            "levels": int(len(np.unique(v))),
            "inlier_fraction": round(float(inl.mean()) if len(v) else 0.0, 4),
            "correlation": round(corr, 4),
            "residual_mad": round(float(np.median(np.abs(r))) if len(r) else 0.0, 5),
            "noise_sigma": round(float(sigma), 5),
            "fallback": bool(clamped or len(v) < MIN_FIT_PIXELS),
        }
    report = {
        "method": HULL_FIT_METHOD,
        "source": "estimated",
        "pooled": {"near": round(a_g, 4), "far": round(a_g + b_g * max_value, 4)},
        "per_view": per_view,
        "max_value": max_value,
        "background": background,
    }
    return encodings, report
