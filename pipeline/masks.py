"""Foreground masks: the signed distance to a mask's outline, the one definition fusion,
refinement and photo-consistency share, and a mask's bounding box.

Convention: pixels, negative inside, and the outline sits half a pixel outside the centre of
the last mask pixel (half-way between a mask pixel and its background neighbour), so bilinear
lookups read 0 exactly on it.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def signed_distance_px(mask: np.ndarray, *, border_is_background: bool = False) -> np.ndarray:
    """(H, W) float32 signed distance to the outline of an (H, W) bool mask, pixels, negative inside.

    ``border_is_background``: count the ring just outside the image as background (a mask that
    touches the image border gets an outline there). An empty mask gives +max(H, W) everywhere,
    a full one (without ``border_is_background``) -max(H, W).
    """
    m = np.asarray(mask, dtype=bool)
    if border_is_background:
        return signed_distance_px(np.pad(m, 1))[1:-1, 1:-1]
    if not m.any():
        return np.full(m.shape, float(max(m.shape)), np.float32)
    if m.all():
        return np.full(m.shape, -float(max(m.shape)), np.float32)
    inside = ndimage.distance_transform_edt(m)  # to the nearest background pixel centre
    outside = ndimage.distance_transform_edt(~m)
    return np.where(m, 0.5 - inside, outside - 0.5).astype(np.float32)


def mask_box(mask, margin: int) -> tuple[slice, slice] | None:
    """Rows and columns of the bounding box of an (H, W) bool mask (numpy or torch), grown by
    ``margin`` pixels and clipped to the image; None when the mask is empty."""
    any_row, any_col = mask.any(1), mask.any(0)
    if hasattr(any_row, "cpu"):
        any_row, any_col = any_row.cpu().numpy(), any_col.cpu().numpy()
    rows, cols = np.flatnonzero(any_row), np.flatnonzero(any_col)
    if len(rows) == 0:
        return None
    H, W = mask.shape
    rs = slice(max(int(rows[0]) - margin, 0), min(int(rows[-1]) + 1 + margin, H))
    return rs, slice(max(int(cols[0]) - margin, 0), min(int(cols[-1]) + 1 + margin, W))
