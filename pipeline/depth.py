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


def clipped_free_depth(raw: np.ndarray, foreground: np.ndarray, enc: DepthEncoding) -> np.ndarray | None:
    """Where the encoding clipped the depth, how far the ray is known to be empty.

    A value of ``max_value`` means the surface lies at or beyond ``far``: the ray is empty up to
    the lowest z that rounds to ``max_value`` (half a step before ``far``), and says nothing past it.

    Parameters
    ----------
    raw : (H, W) float32, PNG values
    foreground : (H, W) bool, the pixels that see the object
    enc : DepthEncoding

    Returns
    -------
    (H, W) float32 z-depth (scene units) at clipped foreground pixels, 0 elsewhere; None when no
    pixel is clipped
    """
    clipped = foreground & (np.asarray(raw) >= enc.max_value)
    if not clipped.any():
        return None
    step = (enc.far - enc.near) / enc.max_value
    return np.where(clipped, np.float32(enc.far - 0.5 * step), np.float32(0.0)).astype(np.float32)


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
