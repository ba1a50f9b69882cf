"""Estimate an unstated (or check a stated) depth encoding against the silhouettes and across views.

The encoding maps raw PNG values to z-depth, ``z = near + v / max_value * (far - near)``. The
prior is the bundle's stated encoding, else the documented default (``far`` 2.5, 0 = background).
It is always a candidate, and an estimate replaces it only where it explains the data measurably
better (:data:`MARGIN`), by one score, :func:`encoding_misfit`, that weighs two checks that need
no knowledge of the encoding:

- **hull**: the silhouette hull contains the object and touches it along the silhouettes, so the
  decoded depth should lie on the hull's first-hit depth where the hull is tight;
- **cross-view**: a point decoded from one view, projected into another, should land inside that
  view's silhouette and on (or behind, if occluded there) that view's decoded depth.

Candidates, each accepted only if it beats the one before it by the margin: the prior; one depth
scale shared by all views (a misstated ``far``); one affine encoding shared by all views; one per
view (only if the views measurably disagree). The hull alone is biased (it is never behind the
surface, and is in front of it in concavities); its one-sided line fit (:func:`envelope_line`)
seeds the affine candidates, and the score decides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .camera import Camera
from .camera_stack import CameraStack
from .config import DepthEncoding
from .reports import DepthEncodingReport
from .visual_hull import carve_hull, render_hull, resize_masks

#: ``method`` of the depth-encoding report when an estimate replaced the prior (not a statement).
HULL_FIT_METHOD = "hull_fit"
#: The checks work on images resampled to this size (longest side, pixels).
FIT_IMAGE_SIZE = 192
#: Pixels within this many (fit-size) pixels of a silhouette edge are left out (edge values mix with background).
EDGE_EXCLUSION_PX = 2
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
#: Fewest usable pixels for a per-view fit.
MIN_FIT_PIXELS = 50
#: Points per view used by the cross-view check (a fixed random subset: the score stays cheap).
CROSS_VIEW_POINTS = 3000
#: The tolerance of both checks is this many times (one depth level + one pixel's footprint).
TOLERANCE_FACTOR = 1.5
#: An estimate must lower the misfit by this much (absolute, the misfit is in [0, 1]) to replace the current choice.
MARGIN = 0.02
#: ... and by this fraction of the current choice's misfit.
RELATIVE_MARGIN = 0.25
#: A chosen encoding with a misfit above this explains the data poorly: warning DEPTH_ENCODING_UNCERTAIN.
UNCERTAIN_MISFIT = 0.15
#: An estimate may not shrink the depth range (far - near) below this fraction of the prior's.
MIN_RANGE_FRACTION = 0.25
#: Depth scales searched for the shared-scale candidate.
SCALE_RANGE = (0.5, 2.0)


def _huber_line(v: np.ndarray, z: np.ndarray, w0: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Robust fit z ~ a + b v. Returns (a, b, final weights (n,))."""
    w = w0.copy()
    a, b = float(np.median(z)), 0.0
    for _ in range(IRLS_ITERATIONS):
        a, b = _weighted_line(v, z, w)
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


@dataclass
class DepthEvidence:
    """What the checks read, at the fit size (h, w), on one device.

    Attributes
    ----------
    raw : (N, h, w) float32, raw PNG values (nearest sample; values must not be blended)
    valid : (N, h, w) bool, interior foreground pixels with a depth value
    inside : (N, h, w) bool, the silhouettes widened by one pixel (a point landing outside is a violation)
    hull_z : (N, h, w) float32, first-hit z-depth of the carved hull; 0 where it misses
    cams : CameraStack of the N views at (w, h)
    points : N tensors (P_n, 2) long, (row, col) of the pixels the cross-view check projects
    hull_voxel : float, the hull grid's spacing, scene units
    """

    raw: torch.Tensor
    valid: torch.Tensor
    inside: torch.Tensor
    hull_z: torch.Tensor
    cams: CameraStack
    points: list[torch.Tensor]
    hull_voxel: float

    def __len__(self) -> int:
        return self.raw.shape[0]


def gather_depth_evidence(
    raw: np.ndarray,
    masks: np.ndarray,
    cameras: list[Camera],
    *,
    background: float,
    max_value: float,
    device: torch.device,
    carve_resolution: int,
    seed: int = 0,
) -> DepthEvidence:
    """Resample masks and raw depth to the fit size, carve and render the hull: :class:`DepthEvidence`."""
    N, H, W = raw.shape
    s = min(1.0, FIT_IMAGE_SIZE / max(H, W))
    h, w = max(8, round(H * s)), max(8, round(W * s))
    m = resize_masks(torch.as_tensor(masks, device=device), (h, w))
    cams = CameraStack.from_cameras([c.scaled(w, h) for c in cameras], device)
    occ, grid = carve_hull(m, cams, carve_resolution)
    fg = m >= 0.5
    _, hull_z = render_hull(occ, grid, cams, rays=fg)
    k = 2 * EDGE_EXCLUSION_PX + 1
    interior = -F.max_pool2d(-(m >= 0.99).float()[:, None], k, stride=1, padding=EDGE_EXCLUSION_PX)[:, 0] > 0.5
    inside = F.max_pool2d(fg.float()[:, None], 3, stride=1, padding=1)[:, 0] > 0.5
    rows = np.minimum(((np.arange(h) + 0.5) * H / h).astype(int), H - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * W / w).astype(int), W - 1)
    raw_s = torch.as_tensor(np.ascontiguousarray(raw[:, rows][:, :, cols]), dtype=torch.float32, device=device)
    # Values at max_value are clipped: the surface is at or beyond far, so they carry no depth.
    valid = interior & (raw_s != background) & (raw_s < max_value)
    gen = torch.Generator().manual_seed(seed)
    points = []
    for n in range(N):
        idx = torch.nonzero(valid[n])
        if len(idx) > CROSS_VIEW_POINTS:
            idx = idx[torch.randperm(len(idx), generator=gen)[:CROSS_VIEW_POINTS].to(device)]
        points.append(idx)
    return DepthEvidence(raw_s, valid, inside, hull_z, cams, points, float(grid.spacing))


def _median_hull_depth(ev: DepthEvidence, prior: DepthEncoding) -> float:
    """Median z of the hull's first hits over all views (the prior's far where the hull misses everything)."""
    z = ev.hull_z[ev.hull_z > 0]
    return float(z.median()) if len(z) else prior.far


def _tolerance(ev: DepthEvidence, prior: DepthEncoding) -> float:
    """Scene units: one depth level of the prior plus one pixel's footprint at the median hull depth."""
    pixel = _median_hull_depth(ev, prior) / float(ev.cams.K[:, 0, 0].mean())
    level = (prior.far - prior.near) / prior.max_value
    return TOLERANCE_FACTOR * (level + pixel)


def encoding_misfit(ev: DepthEvidence, near: np.ndarray, far: np.ndarray, max_value: float, tol: float) -> dict:
    """The fraction of decoded depth that contradicts the silhouettes or the other views.

    Only contradictions count, because only they are certain: an object may be concave where
    the hull is not, and a point may be hidden from another view, but a surface point can never be

    - in front of the silhouette hull (decoded z below the hull's first hit by more than
      ``tol`` + the hull voxel), nor
    - outside another view's silhouette, or in front of the surface that view sees there
      (projected z below that view's decoded z by more than ``tol``): that view looks through it.

    Parameters
    ----------
    near, far : (N,) float, one encoding per view; tol : scene units

    Returns
    -------
    dict: ``misfit`` (violations over checks, both kinds), ``hull``, ``cross_view`` (each kind's fraction)
    """
    dev = ev.raw.device
    N, h, w = ev.raw.shape
    near_t = torch.as_tensor(np.asarray(near, np.float32), device=dev)[:, None, None]
    far_t = torch.as_tensor(np.asarray(far, np.float32), device=dev)[:, None, None]
    z = near_t + ev.raw / max_value * (far_t - near_t)
    hm = ev.valid & (ev.hull_z > 0)
    n_hull = int(hm.sum())
    v_hull = int(((z - ev.hull_z)[hm] < -(tol + ev.hull_voxel)).sum())

    Kinv = torch.linalg.inv(ev.cams.K)
    c2w = torch.linalg.inv(ev.cams.world_to_cam)
    n_cross = v_cross = 0
    nidx = None
    for i in range(N):
        rc = ev.points[i]
        if len(rc) == 0:
            continue
        zi = z[i, rc[:, 0], rc[:, 1]]
        pix = torch.stack([rc[:, 1].float() + 0.5, rc[:, 0].float() + 0.5, torch.ones_like(zi)], dim=-1)
        pw = ((pix @ Kinv[i].T) * zi[:, None]) @ c2w[i, :3, :3].T + c2w[i, :3, 3]
        uv, zj = ev.cams.project(pw)  # (N, P, 2), (N, P)
        col, row = uv[..., 0].floor().long(), uv[..., 1].floor().long()
        on_image = (col >= 0) & (col < w) & (row >= 0) & (row < h) & (zj > 0)
        on_image[i] = False
        col, row = col.clamp(0, w - 1), row.clamp(0, h - 1)
        nidx = torch.arange(N, device=dev)[:, None].expand_as(col)
        inside = ev.inside[nidx, row, col]
        see_through = ev.valid[nidx, row, col] & (zj < z[nidx, row, col] - tol)
        n_cross += int(on_image.sum())
        v_cross += int((on_image & (~inside | see_through)).sum())
    total = max(n_hull + n_cross, 1)
    return {
        "misfit": (v_hull + v_cross) / total,
        "hull": v_hull / max(n_hull, 1),
        "cross_view": v_cross / max(n_cross, 1),
    }


def _hull_samples(ev: DepthEvidence) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per view: (raw values (n,), hull z (n,)) at the valid pixels the hull covers."""
    out = []
    for n in range(len(ev)):
        m = ev.valid[n] & (ev.hull_z[n] > 0)
        out.append((ev.raw[n][m].double().cpu().numpy(), ev.hull_z[n][m].double().cpu().numpy()))
    return out


@dataclass
class _Candidate:
    name: str
    near: np.ndarray
    far: np.ndarray
    score: dict


def _valid_pair(near: float, far: float, prior: DepthEncoding) -> bool:
    """A usable encoding: ordered, in front of nothing negative, and not squeezing the depth range
    below :data:`MIN_RANGE_FRACTION` of the prior's (a flat encoding puts every pixel at one depth,
    which contradicts nothing and explains nothing)."""
    return (
        math.isfinite(near)
        and math.isfinite(far)
        and far > near >= 0.0
        and far - near >= MIN_RANGE_FRACTION * (prior.far - prior.near)
    )


def estimate_depth_encodings(
    raw: np.ndarray,
    masks: np.ndarray,
    cameras: list[Camera],
    *,
    prior: DepthEncoding | None = None,
    prior_source: str = "default",
    max_value: float = 255.0,
    background: float = 0.0,
    device: torch.device | str = "cpu",
    carve_resolution: int = 96,
) -> tuple[list[DepthEncoding], DepthEncodingReport]:
    """Choose the depth encoding of each view: the prior, unless an estimate explains the data measurably better.

    Parameters
    ----------
    raw : (N, H, W) float32, raw depth PNG values
    masks : (N, H, W) bool, foreground
    cameras : N cameras (any image size; scaled to the fit size here)
    prior : the stated encoding, else None for the documented default with this ``max_value``/``background``
    prior_source : ``"default"`` or where the prior was stated (reported)

    Returns
    -------
    encodings : N DepthEncoding
    report : DepthEncodingReport: ``method`` (``prior_source`` when the prior is kept, else
        :data:`HULL_FIT_METHOD`), ``choice``, every candidate with its near/far and scores,
        ``tolerance``, ``uncertain`` and, when uncertain, ``warning``
    """
    if prior is None:
        prior = DepthEncoding(max_value=max_value, background=background)
    max_value, background = prior.max_value, prior.background
    device = torch.device(device)
    N = len(cameras)
    ev = gather_depth_evidence(
        np.asarray(raw, np.float32),
        np.asarray(masks, bool),
        cameras,
        background=background,
        max_value=max_value,
        device=device,
        carve_resolution=carve_resolution,
    )
    if int(ev.valid.sum()) < MIN_FIT_PIXELS:
        return [prior] * N, DepthEncodingReport(
            method=prior_source, choice="prior", reason="too few foreground pixels to check", **prior.to_dict()
        )
    tol = _tolerance(ev, prior)

    def score(near, far) -> dict:
        return encoding_misfit(ev, near, far, max_value, tol)

    ones = np.ones(N)
    cands = [_Candidate("prior", ones * prior.near, ones * prior.far, score(ones * prior.near, ones * prior.far))]
    cands.append(_shared_scale(prior, ones, score, (tol + ev.hull_voxel) / _median_hull_depth(ev, prior)))
    samples = _hull_samples(ev)
    cands.append(_shared_affine(cands[-1], samples, prior, ones, score))
    cands.append(_per_view(cands[-1], samples, prior, score))

    chosen = _choose(ev, cands, max_value, tol)
    encodings = [
        DepthEncoding(near=float(a), far=float(b), max_value=max_value, background=background)
        for a, b in zip(chosen.near, chosen.far, strict=True)
    ]
    return encodings, _report(cands, chosen, prior, prior_source, cameras, tol)


def _choose(ev: DepthEvidence, cands: list[_Candidate], max_value: float, tol: float) -> _Candidate:
    """The prior, unless a later candidate beats the current choice by the margins (in order)."""
    chosen = cands[0]
    for c in cands[1:]:
        gain = chosen.score["misfit"] - c.score["misfit"]
        if gain > MARGIN and gain > RELATIVE_MARGIN * chosen.score["misfit"]:
            chosen = c
    if chosen is not cands[0]:
        # Estimates that contradict the data equally: the surface touches the hull where the hull is
        # tight, so the nearest placement is the one the silhouettes support (a farther one only hides
        # inside the object). Ties keep the simpler candidate.
        feasible = [c for c in cands[1:] if c.score["misfit"] <= chosen.score["misfit"] + MARGIN / 2]
        depth = {c.name: _median_depth(ev, c, max_value) for c in feasible}
        nearest = min(depth.values())
        chosen = next(c for c in feasible if depth[c.name] <= nearest + 0.25 * tol)
    return chosen


def _report(
    cands, chosen: _Candidate, prior: DepthEncoding, prior_source: str, cameras, tol: float
) -> DepthEncodingReport:
    kept = chosen is cands[0]
    uncertain = chosen.score["misfit"] > UNCERTAIN_MISFIT
    report = DepthEncodingReport(
        method=("default" if prior_source == "default" else "given") if kept else HULL_FIT_METHOD,
        source=prior_source if kept else "estimated",
        choice=chosen.name,
        prior=prior.to_dict(),
        tolerance=round(tol, 5),
        candidates={c.name: _candidate_report(c, cameras) for c in cands},
        per_view={
            cam.name: {"near": round(float(a), 4), "far": round(float(b), 4)}
            for cam, a, b in zip(cameras, chosen.near, chosen.far, strict=True)
        },
        max_value=prior.max_value,
        background=prior.background,
        uncertain=bool(uncertain),
    )
    if uncertain:
        report.warning = (
            f"DEPTH_ENCODING_UNCERTAIN: no candidate encoding explains the depth maps well "
            f"(best misfit {chosen.score['misfit']:.2f} > {UNCERTAIN_MISFIT}); used {chosen.name!r}"
        )
    return report


def _median_depth(ev: DepthEvidence, c: _Candidate, max_value: float) -> float:
    """Median decoded z over the valid pixels of every view under candidate ``c``."""
    near = torch.as_tensor(c.near, dtype=torch.float32, device=ev.raw.device)[:, None, None]
    far = torch.as_tensor(c.far, dtype=torch.float32, device=ev.raw.device)[:, None, None]
    z = near + ev.raw / max_value * (far - near)
    return float(z[ev.valid].median())


def _candidate_report(c: _Candidate, cameras: list[Camera]) -> dict:
    out = {k: round(v, 4) for k, v in c.score.items()}
    if np.allclose(c.near, c.near[0]) and np.allclose(c.far, c.far[0]):
        out.update(near=round(float(c.near[0]), 4), far=round(float(c.far[0]), 4))
    else:
        out["per_view"] = {
            cam.name: [round(float(a), 4), round(float(b), 4)] for cam, a, b in zip(cameras, c.near, c.far, strict=True)
        }
    return out


def _shared_scale(prior: DepthEncoding, ones: np.ndarray, score, scale_tolerance: float) -> _Candidate:
    """One factor on every view's prior depth (a misstated ``far``).

    Contradictions rise steeply once the surfaces are pulled in front of where they can be,
    and slowly when pushed back (they hide inside the object). The factor is therefore read at
    that steep wall, the nearest placement whose misfit is within :data:`MARGIN` of the least,
    plus the checks' own tolerance (``scale_tolerance``, as a fraction of depth), which lets
    surfaces come that much nearer before they count as contradictions.
    """

    def f(s: float) -> float:
        return score(ones * prior.near * s, ones * prior.far * s)["misfit"]

    grid = np.exp(np.linspace(math.log(SCALE_RANGE[0]), math.log(SCALE_RANGE[1]), 57))
    vals = np.array([f(g) for g in grid])
    floor = float(vals.min())
    k = int(np.argmax(vals <= floor + MARGIN))  # first (nearest) scale on the floor
    lo, hi = (grid[k - 1], grid[k]) if k > 0 else (grid[0], grid[0])
    for _ in range(12):  # bisect the wall between a contradicted and an accepted scale
        mid = math.sqrt(lo * hi)
        if f(mid) <= floor + MARGIN:
            hi = mid
        else:
            lo = mid
    s = hi * (1.0 + scale_tolerance)
    near, far = ones * prior.near * s, ones * prior.far * s
    return _Candidate("shared_scale", near, far, score(near, far))


def _pooled_envelope(samples, max_value: float, prior: DepthEncoding) -> tuple[float, float] | None:
    """(near, far) of the one-sided hull fit pooled over all views (each view weighs the same), or None."""
    v_all = np.concatenate([v for v, _ in samples])
    z_all = np.concatenate([z for _, z in samples])
    if len(v_all) < MIN_FIT_PIXELS or np.ptp(v_all) <= 0:
        return None
    w_all = np.concatenate([np.full(len(v), 1.0 / max(len(v), 1)) for v, _ in samples])
    a, b, _, _ = envelope_line(v_all, z_all, w_all)
    return (a, a + b * max_value) if _valid_pair(a, a + b * max_value, prior) else None


def _shared_affine(fallback: _Candidate, samples, prior: DepthEncoding, ones: np.ndarray, score) -> _Candidate:
    """One (near, far) for every view: the pooled one-sided hull fit (the shared scale where it is degenerate)."""
    pair = _pooled_envelope(samples, prior.max_value, prior)
    near, far = (ones * pair[0], ones * pair[1]) if pair else (fallback.near, fallback.far)
    return _Candidate("shared_affine", near, far, score(near, far))


def _per_view(shared: _Candidate, samples, prior: DepthEncoding, score) -> _Candidate:
    """(near, far) per view: each view's one-sided hull fit, its slope pulled towards the shared one
    in proportion to how little its own values constrain it; degenerate views keep the shared encoding."""
    near, far = shared.near.copy(), shared.far.copy()
    max_value = prior.max_value
    spread = SLOPE_PRIOR_SPREAD * max_value
    for n, (v, z) in enumerate(samples):
        if len(v) < MIN_FIT_PIXELS or np.ptp(v) <= 0:
            continue
        b_shared = (far[n] - near[n]) / max_value
        _, _, w, _ = envelope_line(v, z, np.ones(len(v)))
        sw = w.sum()
        if sw <= 0:
            continue
        vm, zm = (w * v).sum() / sw, (w * z).sum() / sw
        var = (w * (v - vm) ** 2).sum()
        lam = sw * spread**2
        b = float(((w * (v - vm) * (z - zm)).sum() + lam * b_shared) / (var + lam))
        a = float(zm - b * vm)
        if _valid_pair(a, a + b * max_value, prior):
            near[n], far[n] = a, a + b * max_value
    return _Candidate("per_view", near, far, score(near, far))
