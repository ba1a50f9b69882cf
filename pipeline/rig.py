"""Rig estimation: cameras of the six-view rig from the masks alone.

:func:`estimate_rig` searches the rig's horizontal field of view and checks the view-to-axis
assignment by re-projecting the carved visual hull (:mod:`pipeline.visual_hull`) into every view
and comparing it with the masks (mean IoU); :class:`RigSearch` scores the candidates. Everything
works on torch tensors on one device, :func:`~pipeline.device.torch_device`.

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
from .camera_stack import CameraStack
from .reports import CameraEstimateReport
from .visual_hull import carve_hull, render_hull, resize_masks, silhouette_iou

#: Silhouette images used by the rig search are resampled to this size (longest side, pixels).
SEARCH_IMAGE_SIZE = 96
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
