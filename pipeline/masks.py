"""Signed distance to a foreground mask's outline, the one definition fusion, refinement and
photo-consistency share.

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
