"""Depth decoding: raw PNG values -> z-depth along the optical axis, with a validity mask."""

from __future__ import annotations

import numpy as np

from .config import DepthEncoding


def decode_depth(raw: np.ndarray, enc: DepthEncoding) -> tuple[np.ndarray, np.ndarray]:
    """Decode raw depth values.

    Parameters
    ----------
    raw : (H, W) float32, PNG values
    enc : DepthEncoding

    Returns
    -------
    z : (H, W) float32, scene units along the optical axis; 0 where invalid
    valid : (H, W) bool, False for background
    """
    raw = np.asarray(raw, dtype=np.float32)
    valid = raw != enc.background
    z = (enc.near + raw / enc.max_value * (enc.far - enc.near)).astype(np.float32)
    z[~valid] = 0.0
    return z, valid


def encode_depth(z: np.ndarray, valid: np.ndarray, enc: DepthEncoding, *, dtype=np.uint8) -> np.ndarray:
    """Inverse of :func:`decode_depth`: (H, W) z-depth -> PNG values (rounded, clipped).

    Foreground values that would round to ``background`` are nudged off it so they stay foreground.
    """
    v = (np.asarray(z, dtype=np.float64) - enc.near) / (enc.far - enc.near) * enc.max_value
    v = np.clip(np.round(v), 0, enc.max_value)
    bg = enc.background
    v[valid & (v == bg)] = bg + 1 if bg < enc.max_value else bg - 1
    v[~valid] = bg
    return v.astype(dtype)
