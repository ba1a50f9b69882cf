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
    # Gather first, then convert: converting a 2048^2 texture to float per call cost more than the lookups.
    # Rows of the flattened texture, one take per tap: the same texels as texture[y, x], gathered faster.
    flat = texture.reshape(th * tw, -1)
    r0, r1 = y0 * tw, y1 * tw
    t = lambda rows: np.take(flat, rows, axis=0).astype(np.float32, copy=False)  # noqa: E731
    top = t(r0 + x0) * (1 - fx) + t(r0 + x1) * fx
    bot = t(r1 + x0) * (1 - fx) + t(r1 + x1) * fx
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
        uv = rast.interpolate_on_mesh(mesh.uvs.astype(np.float32), mesh.faces)
        col = sample_texture(mesh.texture, uv)
    elif mesh.vertex_colors is not None:
        col = rast.interpolate_on_mesh(mesh.vertex_colors.astype(np.float32), mesh.faces)
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
        out.append(
            {"rgb": shade_rgb(mesh, rast, background=background), "depth": rast.depth, "mask": rast.mask, "rast": rast}
        )
    return out


def edge_pixels(rast: Rasterization, *, depth_jump: float = 0.02) -> np.ndarray:
    """(H, W) bool: pixels whose 3x3 neighbourhood crosses the silhouette or a depth discontinuity.

    ``depth_jump`` is relative to the pixel's depth. These are the only pixels whose
    area average differs much from the pixel-centre sample.
    """
    from scipy import ndimage

    from .masks import mask_box

    full = np.zeros(rast.tri_id.shape, bool)
    # Edges lie within a pixel of the mesh: filter only its box, grown by two (the box's own
    # border rows, reflected by the filters, see no mesh and stay False, as in the whole frame).
    box = mask_box(rast.mask, 2)
    if box is None:
        return full
    m = rast.mask[box]
    edge = ndimage.maximum_filter(m, size=3) != ndimage.minimum_filter(m, size=3)
    d = np.where(m, rast.depth[box], 0.0)
    dmax = ndimage.maximum_filter(d, size=3)
    dmin = ndimage.minimum_filter(np.where(m, d, np.inf), size=3)
    edge |= m & (dmax - dmin > depth_jump * np.maximum(d, 1e-6))
    full[box] = edge
    return full


def subpixel_offsets(n: int) -> list[tuple[float, float]]:
    """The n x n sub-pixel sample positions of a pixel, as (dx, dy) pixel offsets from its centre, row by row.

    :func:`shade_rgb_antialiased` (the quality report's render) averages these; the
    refinement's renders (:mod:`pipeline.diffrender`) take the same ones.
    """
    o = [(k + 0.5) / n - 0.5 for k in range(max(int(n), 1))]
    return [(dx, dy) for dy in o for dx in o]


def shade_rgb_antialiased(
    mesh: TexturedMesh,
    rasterizer,
    cam: Camera,
    *,
    samples: int = 2,
    centre: Rasterization | None = None,
    background=(255, 255, 255),
) -> tuple[np.ndarray, Rasterization]:
    """Colour as the mean of ``samples`` x ``samples`` sub-pixel samples per pixel.

    With a ray-casting backend only edge pixels (:func:`edge_pixels`) are supersampled:
    inside a surface the bilinear texture lookup at the pixel centre is already the
    area average, and edges are a few percent of the pixels. Other backends rasterise
    the whole image at the higher resolution.

    Returns (rgb (H, W, 3) uint8, the pixel-centre Rasterization).
    """
    centre = centre if centre is not None else rasterizer.rasterize(cam)
    s = max(int(samples), 1)
    if s == 1:
        return shade_rgb(mesh, centre, background=background), centre
    if not hasattr(rasterizer, "cast"):
        fine = shade_rgb(mesh, rasterizer.rasterize(cam.scaled(cam.width * s, cam.height * s)), background=background)
        h, w = cam.height, cam.width
        rgb = fine.astype(np.float32).reshape(h, s, w, s, 3).mean(axis=(1, 3))
        return np.clip(rgb + 0.5, 0, 255).astype(np.uint8), centre
    from .camera import rays_through
    from .masks import mask_box

    out = np.empty((cam.height, cam.width, 3), np.uint8)
    out[:] = np.asarray(background, dtype=np.uint8)
    # Everything below is per pixel and within two pixels of the mesh: work on its box only.
    box = mask_box(centre.mask, 2)
    if box is None:
        return out, centre
    crop = Rasterization(centre.tri_id[box], centre.bary[box], centre.depth[box])
    rgb = shade_rgb(mesh, crop, background=background)
    if mesh.has_texture:
        _supersample_texture_interior(mesh, crop, rgb, s)
    ii, jj = np.nonzero(edge_pixels(crop))
    if len(ii):
        ox, oy = (np.array(o) + 0.5 for o in zip(*subpixel_offsets(s), strict=True))
        r0, c0 = box[0].start, box[1].start
        uv = np.stack([(jj + c0)[:, None] + ox[None], (ii + r0)[:, None] + oy[None]], axis=-1).reshape(-1, 2)
        tri, bary, _ = rasterizer.cast(*rays_through(cam, uv))
        sub = Rasterization(
            tri.reshape(len(ii), s * s), bary.reshape(len(ii), s * s, 3), np.zeros((len(ii), s * s), np.float32)
        )
        col = shade_rgb(mesh, sub, background=background).astype(np.float32).mean(axis=1)
        rgb[ii, jj] = np.clip(col + 0.5, 0, 255).astype(np.uint8)
    out[box] = rgb
    return out, centre


#: A UV derivative above this many texture widths per pixel is a chart seam, not a surface.
_MAX_UV_PER_PIXEL = 0.01


def _supersample_texture_interior(mesh: TexturedMesh, rast: Rasterization, rgb: np.ndarray, s: int) -> None:
    """Average s x s texture lookups over each covered pixel's footprint, in place.

    The footprint comes from the screen-space UV derivatives (central differences of
    the interpolated UV image), as a mip/anisotropic filter would use them. Pixels
    where the derivative jumps (chart seams, silhouettes) keep the centre sample.
    """
    m = rast.mask
    uv = rast.interpolate(mesh.uvs.astype(np.float32), mesh.faces)
    du = np.zeros_like(uv)
    dv = np.zeros_like(uv)
    du[:, 1:-1] = (uv[:, 2:] - uv[:, :-2]) / 2
    dv[1:-1] = (uv[2:] - uv[:-2]) / 2
    ok = m.copy()
    ok[:, 1:-1] &= m[:, 2:] & m[:, :-2]
    ok[1:-1] &= m[2:] & m[:-2]
    ok[[0, -1], :] = False
    ok[:, [0, -1]] = False
    # max over the two UV components written out: numpy's max along a length-2 axis is slow.
    ok &= np.maximum(np.abs(du[..., 0]), np.abs(du[..., 1])) < _MAX_UV_PER_PIXEL
    ok &= np.maximum(np.abs(dv[..., 0]), np.abs(dv[..., 1])) < _MAX_UV_PER_PIXEL
    if not ok.any():
        return
    c, a, b = uv[ok], du[ok], dv[ok]
    acc = np.zeros((len(c), 3), np.float32)
    for ox, oy in subpixel_offsets(s):
        acc += sample_texture(mesh.texture, c + ox * a + oy * b)
    rgb[ok] = np.clip(acc / (s * s) + 0.5, 0, 255).astype(np.uint8)
