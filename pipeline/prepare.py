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
from .errors import CanceledError, EmptyDepthError, InvalidInputError
from .frames import PosedFrames, PosedView
from .rig import estimate_rig, torch_device

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
    PosedFrames with ``camera_estimate`` and ``depth_encoding`` reports (JSON-serialisable)
    """

    def report(fraction: float) -> None:
        if should_cancel is not None and should_cancel():
            raise CanceledError("the job was canceled while preparing frames")
        if progress is not None:
            progress("prepare_frames", fraction)

    t0 = time.perf_counter()
    device = torch_device(cfg.device)
    W, H = fs.views[0].size
    depth_sizes = [(v.depth_raw.shape[1], v.depth_raw.shape[0]) for v in fs.views if v.depth_raw is not None]
    src_w, src_h = depth_sizes[0] if depth_sizes else (W, H)
    size = working_size(src_w, src_h, cfg.max_working_resolution)
    background = fs.depth_encoding.background if fs.depth_encoding is not None else 0.0
    masks, raws = build_masks(fs, size, background)
    warnings: list[str] = []
    report(0.1)

    # ---- cameras
    names = fs.names
    if resolved is not None:
        cameras, res_encodings = _cameras_from_resolved(fs, resolved)
        camera_report = {"method": "resolved", "source": "an earlier run"}
    elif fs.cameras_given:
        cameras = [v.camera for v in fs.views]
        camera_report = {"method": "given", "source": "transforms.json"}
    elif cfg.camera.estimate_rig:
        m = torch.as_tensor(np.stack(masks), device=device)
        rig, camera_report = estimate_rig(
            m,
            names,
            W,
            H,
            fov_range_deg=cfg.camera.fov_search_deg,
            carve_resolution=cfg.camera.carve_resolution,
            should_cancel=should_cancel,
        )
        cameras = [rig[n] for n in names]
        if camera_report["score_mean_iou"] < CAMERAS_UNCERTAIN_IOU:
            camera_report["uncertain"] = True
            warnings.append(
                f"CAMERAS_UNCERTAIN: no rig explains the silhouettes well (best mean IoU "
                f"{camera_report['score_mean_iou']:.2f} < {CAMERAS_UNCERTAIN_IOU}); the views may not be the six-view rig"
            )
    else:
        rig = default_rig(W, H, names=tuple(names))
        cameras = [rig[n] for n in names]
        camera_report = {"method": "default_rig", "fov_x_deg": RIG_FOV_X_DEG}
    camera_report["seconds"] = round(time.perf_counter() - t0, 3)
    report(0.5)
    depth_cameras = [c.scaled(*size) for c in cameras]

    # ---- depth encoding
    t1 = time.perf_counter()
    have_depth = [r is not None for r in raws]
    if resolved is not None:
        encodings = res_encodings
        depth_report = {"method": "resolved", "source": "an earlier run"}
    elif cfg.camera.estimate_depth_encoding and all(have_depth):
        # The stated encoding, else the documented default, is the prior: an estimate replaces it
        # only where it explains the masks and the other views measurably better.
        stated = fs.depth_encoding is not None
        encodings, depth_report = estimate_depth_encodings(
            np.stack(raws),
            np.stack(masks),
            depth_cameras,
            prior=fs.depth_encoding or DepthEncoding(max_value=fs.depth_max_value, background=background),
            prior_source=fs.depth_encoding_source if stated else "default",
            device=device,
        )
        if "warning" in depth_report:
            warnings.append(depth_report["warning"])
    elif fs.depth_encoding is not None:
        encodings = [fs.depth_encoding] * len(raws)
        depth_report = {"method": "given", "source": fs.depth_encoding_source, **fs.depth_encoding.to_dict()}
    else:
        enc = DepthEncoding(max_value=fs.depth_max_value, background=background)
        encodings = [enc] * len(raws)
        depth_report = {"method": "default", **enc.to_dict()}
        if any(have_depth):
            warnings.append("depth encoding not stated and not estimated: assumed the default")
    depth_report["seconds"] = round(time.perf_counter() - t1, 3)
    report(0.9)

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
    report(1.0)
    return PosedFrames(views=views, camera_estimate=camera_report, depth_encoding=depth_report, warnings=warnings)


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
