"""Shading on top of :mod:`pipeline.render`: textured RGB, depth and mask images."""

from __future__ import annotations

import numpy as np

from .camera import Camera
from .mesh import TexturedMesh
from .render import Backend, Rasterization, make_rasterizer


def sample_texture(texture: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Bilinear lookup.

    Parameters
    ----------
    texture : (T, S, C) uint8 or float, row 0 at the top
    uv : (N, 2) float, v = 0 at the bottom row

    Returns
    -------
    (N, C) float32 in the texture's value range
    """
    th, tw = texture.shape[:2]
    # glTF's default sampler repeats: wrap coordinates outside [0, 1] (ours stay inside).
    outside = (uv < 0.0) | (uv > 1.0)
    if outside.any():
        uv = np.where(outside, uv - np.floor(uv), uv)
    x = np.clip(uv[:, 0] * tw - 0.5, 0, tw - 1)
    y = np.clip((1.0 - uv[:, 1]) * th - 0.5, 0, th - 1)
    x0 = np.floor(x).astype(np.int64)
    y0 = np.floor(y).astype(np.int64)
    x1 = np.minimum(x0 + 1, tw - 1)
    y1 = np.minimum(y0 + 1, th - 1)
    fx = (x - x0)[:, None].astype(np.float32)
    fy = (y - y0)[:, None].astype(np.float32)
    t = texture.astype(np.float32) if texture.dtype != np.float32 else texture
    top = t[y0, x0] * (1 - fx) + t[y0, x1] * fx
    bot = t[y1, x0] * (1 - fx) + t[y1, x1] * fx
    return top * (1 - fy) + bot * fy


def shade_rgb(mesh: TexturedMesh, rast: Rasterization, *, background=(255, 255, 255)) -> np.ndarray:
    """(H, W, 3) uint8 unlit colour: the texture, else vertex colours, else mid grey."""
    H, W = rast.tri_id.shape
    out = np.empty((H, W, 3), dtype=np.uint8)
    out[:] = np.asarray(background, dtype=np.uint8)
    m = rast.mask
    if not m.any():
        return out
    if mesh.has_texture:
        uv = rast.interpolate(mesh.uvs.astype(np.float32), mesh.faces)[m]
        col = sample_texture(mesh.texture, uv)
    elif mesh.vertex_colors is not None:
        col = rast.interpolate(mesh.vertex_colors.astype(np.float32), mesh.faces)[m]
    else:
        col = np.full((int(m.sum()), 3), 128.0, np.float32)
    out[m] = np.clip(col + 0.5, 0, 255).astype(np.uint8)
    return out


def render_views(
    mesh: TexturedMesh, cameras: list[Camera], *, backend: Backend = "auto", background=(255, 255, 255)
) -> list[dict[str, np.ndarray]]:
    """Render each camera. Returns dicts with ``rgb`` (H, W, 3) uint8, ``depth`` (H, W) float32, ``mask`` (H, W) bool."""
    r = make_rasterizer(mesh.vertices, mesh.faces, backend=backend)
    out = []
    for cam in cameras:
        rast = r.rasterize(cam)
        out.append({"rgb": shade_rgb(mesh, rast, background=background), "depth": rast.depth, "mask": rast.mask, "rast": rast})
    return out
