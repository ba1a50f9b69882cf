"""Input preparation: resolve cameras and depth encoding, build masks, decode depth.

``FrameSet`` (as read) -> :class:`~pipeline.frames.PosedFrames` (cameras resolved, depth in
scene units, masks), at the working resolution for depth and masks; the photos stay at full
resolution for texturing.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from .bundle import FrameSet
from .camera import RIG_FOV_X_DEG, Camera, default_rig
from .config import DepthEncoding, ReconstructConfig
from .depth import clipped_free_depth, decode_depth
from .depth_calibration import estimate_depth_encodings
from .device import torch_device, torch_threads
from .errors import CanceledError, EmptyDepthError, InvalidInputError
from .frames import PosedFrames, PosedView
from .reports import CameraEstimateReport, DepthEncodingReport
from .rig import estimate_rig

#: Torch CPU threads of the rig and depth-encoding estimates. Their operations are many and small
#: (up to a few million elements): on one thread they take 2.4-2.8 CPU s on the sneaker, no more than
#: the 2.6 s of wall two threads took on an idle machine; and when another process holds a core,
#: every operation waits for the descheduled thread (load average 5 on 2 cores: 46 s on two
#: threads, 2.5 s on one; the same cameras and encodings bit for bit).
ESTIMATE_TORCH_THREADS = 1

#: Mask components smaller than this fraction of the view's largest one are specks, not object.
MASK_SPECK_FRACTION = 0.002
#: A six-view rig whose carved hull re-projects onto the masks with a lower mean IoU than this
#: explains them poorly (benchmark bundles score 0.95-0.99, thin rods and open sheets 0.85, six views of two
#: different objects 0.43): warning CAMERAS_UNCERTAIN.
CAMERAS_UNCERTAIN_IOU = 0.8


def working_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(w, h) scaled down (never up) so the longest side is at most ``max_side``."""
    s = min(1.0, max_side / max(width, height))
    return max(1, round(width * s)), max(1, round(height * s))


def _resize_nearest(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) array -> (h, w) by picking the pixel under each new pixel centre (values are not blended)."""
    w, h = size
    H, W = img.shape
    if (w, h) == (W, H):
        return img
    rows = np.minimum(((np.arange(h) + 0.5) * H / h).astype(int), H - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * W / w).astype(int), W - 1)
    return img[rows][:, cols]


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if (mask.shape[1], mask.shape[0]) == size:
        return mask
    im = Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.BILINEAR)
    return np.asarray(im) >= 128


def remove_mask_specks(mask: np.ndarray, *, fraction: float = MASK_SPECK_FRACTION) -> np.ndarray:
    """(H, W) bool without connected components smaller than ``fraction`` of the largest."""
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    keep = sizes >= fraction * sizes.max()
    return keep[labels]


def build_masks(
    fs: FrameSet, size: tuple[int, int], background: float
) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    """Foreground masks (h, w) bool at ``size`` = (w, h) and raw depth resampled to it (or None).

    The mask is the RGBA alpha where the photo has one, else ``depth != background``.
    """
    masks, raws = [], []
    for v in fs.views:
        raw = _resize_nearest(v.depth_raw, size) if v.depth_raw is not None else None
        if v.alpha is not None:
            m = _resize_mask(v.alpha, size)
        elif raw is not None:
            m = raw != background
        else:
            raise InvalidInputError(
                f"view {v.name!r} has neither a depth render nor an alpha mask",
                code="MISSING_DEPTH",
                details={"view": v.name},
            )
        m = remove_mask_specks(m)
        if not m.any():
            raise EmptyDepthError(f"view {v.name!r} has an empty foreground mask", details={"view": v.name})
        masks.append(m)
        raws.append(raw)
    return masks, raws


def prepare_frames(
    fs: FrameSet, cfg: ReconstructConfig, *, progress=None, should_cancel=None, resolved: list[dict] | None = None
) -> PosedFrames:
    """Resolve cameras and depth, build masks.

    Cameras come from transforms.json when the bundle has one, else the default six-view rig
    refined by silhouette carving (``cfg.camera``). The depth encoding is the bundle's, else
    fitted against the silhouette hull. Depth and masks are at ``cfg.max_working_resolution``;
    rgb stays at full resolution.

    ``resolved`` (from :meth:`PosedFrames.resolved_views`, e.g. ``result.json["cameras"]``)
    gives the cameras and encodings of an earlier run: nothing is estimated again.

    Depth values at the encoding's ``max_value`` are clipped (the surface is at or beyond
    ``far``): such pixels stay foreground but carry no depth.

    Returns
    -------
    PosedFrames with ``camera_estimate`` and ``depth_encoding`` reports
    (:class:`~pipeline.reports.CameraEstimateReport`, :class:`~pipeline.reports.DepthEncodingReport`)
    """

    def report(fraction: float) -> None:
        if should_cancel is not None and should_cancel():
            raise CanceledError("the job was canceled while preparing frames")
        if progress is not None:
            progress("prepare_frames", fraction)

    t0 = time.perf_counter()
    device = torch_device(cfg.device)
    size = depth_working_size(fs, cfg.max_working_resolution)
    background = fs.depth_encoding.background if fs.depth_encoding is not None else 0.0
    masks, raws = build_masks(fs, size, background)
    warnings: list[str] = []
    report(0.1)

    from_run = _cameras_from_resolved(fs, resolved) if resolved is not None else None
    if from_run is not None:
        cameras, camera_report = from_run[0], CameraEstimateReport(method="resolved", source="an earlier run")
    else:
        cameras, camera_report = resolve_cameras(fs, cfg, masks, device, warnings, should_cancel=should_cancel)
    camera_report.seconds = round(time.perf_counter() - t0, 3)
    report(0.5)
    depth_cameras = [c.scaled(*size) for c in cameras]

    t1 = time.perf_counter()
    if from_run is not None:
        encodings, depth_report = from_run[1], DepthEncodingReport(method="resolved", source="an earlier run")
    else:
        encodings, depth_report = resolve_depth_encodings(fs, cfg, masks, raws, depth_cameras, device, warnings)
    depth_report.seconds = round(time.perf_counter() - t1, 3)
    report(0.9)

    views = decode_views(fs, cameras, depth_cameras, masks, raws, encodings)
    report(1.0)
    return PosedFrames(views=views, camera_estimate=camera_report, depth_encoding=depth_report, warnings=warnings)


def depth_working_size(fs: FrameSet, max_side: int) -> tuple[int, int]:
    """(w, h) of depth and masks: the depth renders' size (else the photos'), at most ``max_side``."""
    W, H = fs.views[0].size
    depth_sizes = [(v.depth_raw.shape[1], v.depth_raw.shape[0]) for v in fs.views if v.depth_raw is not None]
    src_w, src_h = depth_sizes[0] if depth_sizes else (W, H)
    return working_size(src_w, src_h, max_side)


def resolve_cameras(
    fs: FrameSet, cfg: ReconstructConfig, masks: list[np.ndarray], device, warnings: list[str], *, should_cancel=None
) -> tuple[list[Camera], CameraEstimateReport]:
    """The views' cameras (at photo size): transforms.json's, else the rig estimated from the
    masks (``cfg.camera.estimate_rig``; warning CAMERAS_UNCERTAIN when it fits poorly), else the
    default rig. Warnings are appended to ``warnings``.
    """
    names = fs.names
    W, H = fs.views[0].size
    if fs.cameras_given:
        return [v.camera for v in fs.views], CameraEstimateReport(method="given", source="transforms.json")
    if not cfg.camera.estimate_rig:
        rig = default_rig(W, H, names=tuple(names))
        return [rig[n] for n in names], CameraEstimateReport(method="default_rig", fov_x_deg=RIG_FOV_X_DEG)
    m = torch.as_tensor(np.stack(masks), device=device)
    with torch_threads(ESTIMATE_TORCH_THREADS):
        rig, camera_report = estimate_rig(
            m,
            names,
            W,
            H,
            fov_range_deg=cfg.camera.fov_search_deg,
            carve_resolution=cfg.camera.carve_resolution,
            should_cancel=should_cancel,
        )
    if camera_report.score_mean_iou < CAMERAS_UNCERTAIN_IOU:
        camera_report.uncertain = True
        warnings.append(
            f"CAMERAS_UNCERTAIN: no rig explains the silhouettes well (best mean IoU "
            f"{camera_report.score_mean_iou:.2f} < {CAMERAS_UNCERTAIN_IOU}); the views may not be the six-view rig"
        )
    return [rig[n] for n in names], camera_report


def resolve_depth_encodings(
    fs: FrameSet,
    cfg: ReconstructConfig,
    masks: list[np.ndarray],
    raws: list[np.ndarray | None],
    depth_cameras: list[Camera],
    device,
    warnings: list[str],
) -> tuple[list[DepthEncoding], DepthEncodingReport]:
    """Each view's depth encoding: fitted against the silhouette hull (``cfg.camera.estimate_depth_encoding``,
    every view has depth), else the stated one, else the documented default. Warnings go to ``warnings``.
    """
    background = fs.depth_encoding.background if fs.depth_encoding is not None else 0.0
    have_depth = [r is not None for r in raws]
    if cfg.camera.estimate_depth_encoding and all(have_depth):
        # The stated encoding, else the documented default, is the prior: an estimate replaces it
        # only where it explains the masks and the other views measurably better.
        stated = fs.depth_encoding is not None
        with torch_threads(ESTIMATE_TORCH_THREADS):
            encodings, depth_report = estimate_depth_encodings(
                np.stack(raws),
                np.stack(masks),
                depth_cameras,
                prior=fs.depth_encoding or DepthEncoding(max_value=fs.depth_max_value, background=background),
                prior_source=fs.depth_encoding_source if stated else "default",
                device=device,
            )
        if depth_report.warning is not None:
            warnings.append(depth_report.warning)
        return encodings, depth_report
    if fs.depth_encoding is not None:
        depth_report = DepthEncodingReport(
            method="given", source=fs.depth_encoding_source, **fs.depth_encoding.to_dict()
        )
        return [fs.depth_encoding] * len(raws), depth_report
    enc = DepthEncoding(max_value=fs.depth_max_value, background=background)
    if any(have_depth):
        warnings.append("depth encoding not stated and not estimated: assumed the default")
    return [enc] * len(raws), DepthEncodingReport(method="default", **enc.to_dict())


def decode_views(
    fs: FrameSet,
    cameras: list[Camera],
    depth_cameras: list[Camera],
    masks: list[np.ndarray],
    raws: list[np.ndarray | None],
    encodings: list[DepthEncoding | None],
) -> list[PosedView]:
    """One PosedView per view: depth decoded (0 outside the mask and where clipped at ``max_value``)."""
    views = []
    for v, cam, dcam, m, raw, enc in zip(fs.views, cameras, depth_cameras, masks, raws, encodings, strict=True):
        if raw is not None and enc is not None:
            z, valid = decode_depth(raw, enc)
            free = clipped_free_depth(raw, valid & m, enc)
            z[~(valid & m) | (raw >= enc.max_value)] = 0.0
        else:
            z, enc, free = np.zeros(m.shape, np.float32), None, None
        views.append(
            PosedView(
                name=v.name,
                rgb=v.rgb,
                camera=cam,
                depth=z,
                mask=m,
                depth_camera=dcam,
                depth_encoding=enc,
                free_depth=free,
            )
        )
    return views


def _cameras_from_resolved(fs: FrameSet, resolved: list[dict]) -> tuple[list[Camera], list[DepthEncoding | None]]:
    """Cameras and encodings of an earlier run (:meth:`PosedFrames.resolved_views`), matched by view name."""
    by_name = {r.get("name"): r for r in resolved}
    cameras, encodings = [], []
    for v in fs.views:
        r = by_name.get(v.name)
        if r is None:
            raise InvalidInputError(f"no resolved camera for view {v.name!r}", details={"view": v.name})
        W, H = v.size
        cam = Camera(
            K=np.asarray(r["K"], dtype=np.float64),
            cam_to_world=np.asarray(r["cam_to_world_opencv"], dtype=np.float64),
            width=int(r["width"]),
            height=int(r["height"]),
            name=v.name,
        )
        cameras.append(cam.scaled(W, H) if (cam.width, cam.height) != (W, H) else cam)
        enc = r.get("depth_encoding")
        encodings.append(DepthEncoding(**enc) if enc else None)
    return cameras, encodings
