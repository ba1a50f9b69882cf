"""The validation set: procedural textured objects that break reconstructions, and the bundles made of them.

Each object is built offline from numpy (signed distance fields meshed by marching cubes, or
parametric grids where an edge must stay sharp or a surface open), coloured so that texture
metrics mean something, and rendered by the project's own renderer into bundles that follow
docs/input-format.md in three variants:

- ``posed``: six default-rig views plus ``transforms.json`` stating the cameras and the default
  depth encoding;
- ``rig``: the same six photos and depth renders with no ``transforms.json`` (the documented
  default rig and encoding ``value = 255 * z / 2.5``, 0 = background);
- ``encoded``: the same photos, depth re-encoded with a non-default encoding (16-bit, or 8-bit
  with another range) that ``transforms.json`` states. A bundle without ``transforms.json``
  cannot state an encoding (docs/input-format.md, pipeline/bundle.py), so this variant has one.

Every bundle also holds ``gt/mesh.glb`` (the object, vertex colours or a UV texture, world frame)
and ``gt/orbit.json``: held-out cameras on an orbit, none of them in the rig, in the
``transforms.json`` convention, for novel-view metrics.

World frame: the default rig's (docs/conventions.md): object at the origin (unless it is the
off-centre one), +Y up, facing +Z, scene units.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .camera import (
    RIG_DISTANCE,
    RIG_FOV_X_DEG,
    RIG_VIEW_NAMES,
    Camera,
    default_rig,
    intrinsics_from_fov,
    look_at,
    opencv_to_opengl,
)
from .config import DEFAULT_DEPTH_ENCODING, DepthEncoding
from .depth import encode_depth
from .export import write_glb
from .mesh import TexturedMesh
from .render import make_rasterizer
from .shading import shade_rgb_antialiased
from .synthetic import png_bytes

#: The three bundle variants of every object (see the module docstring).
VARIANTS: tuple[str, ...] = ("posed", "rig", "encoded")
#: Marching-cubes grid step for the benchmark's objects, scene units (about 1.5 px at 512 px).
DEFAULT_GRID_STEP = 0.008
#: Sub-pixel samples per axis for the photos (a camera area-averages; point samples alias).
PHOTO_SUPERSAMPLE = 3
#: Held-out orbit: azimuths (degrees from +Z towards +X) and elevations (degrees); none is a rig direction.
ORBIT_AZIMUTHS_DEG: tuple[float, ...] = (22.5, 67.5, 112.5, 157.5, 202.5, 247.5, 292.5, 337.5)
ORBIT_ELEVATIONS_DEG: tuple[float, ...] = (30.0, -20.0, 35.0, -25.0, 25.0, -30.0, 20.0, -35.0)

#: Non-default encodings of the ``encoded`` variant, used in turn over the objects.
ENCODED_VARIANTS: tuple[DepthEncoding, ...] = (
    DepthEncoding(near=1.0, far=4.0, max_value=65535.0, background=0.0),  # 16-bit
    DepthEncoding(near=1.75, far=3.25, max_value=255.0, background=0.0),  # 8-bit, another range
)

#: Cases of docs/issue 16 an object covers (the names used in ``ValidationObject.covers``).
CASES: tuple[str, ...] = (
    "thin_parts",
    "deep_concavity",
    "genus_2_plus",
    "flat_faces_sharp_edges",
    "elongated",
    "off_centre",
    "small_in_frame",
    "high_frequency_texture",
    "near_white",
    "open_surface",
)


@dataclass
class ValidationObject:
    """One object of the validation set.

    Attributes
    ----------
    name : str
    mesh : TexturedMesh, world frame, vertex colours or UV texture
    covers : tuple of str, the :data:`CASES` it stresses
    genus : int or None, the designed genus of its surface (None for an open surface)
    closed : bool, True when the surface is designed watertight
    encoding : DepthEncoding, the stated encoding of its ``encoded`` variant
    """

    name: str
    mesh: TexturedMesh
    covers: tuple[str, ...]
    genus: int | None
    closed: bool
    encoding: DepthEncoding = field(default=ENCODED_VARIANTS[0])


# ---------------------------------------------------------------- colour patterns


def _hue_rgb(h: np.ndarray, s: float = 0.75, v: float = 0.9) -> np.ndarray:
    """(N,) hue in [0, 1) -> (N, 3) float RGB in [0, 255] (HSV with fixed saturation and value)."""
    h = np.mod(h, 1.0) * 6.0
    i = np.floor(h).astype(int) % 6
    f = h - np.floor(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    vv = np.full_like(h, v)
    pp = np.broadcast_to(p, h.shape)
    table = [(vv, t, pp), (q, vv, pp), (pp, vv, t), (pp, q, vv), (t, pp, vv), (vv, pp, q)]
    out = np.zeros((len(h), 3))
    for k, (r, g, b) in enumerate(table):
        m = i == k
        out[m] = np.stack([r[m], g[m], b[m]], -1)
    return out * 255.0


def checker_colors(points: np.ndarray, *, cell: float = 0.1, seed: int = 0) -> np.ndarray:
    """(N, 3) uint8: a 3D checkerboard of ``cell``-sized cubes, hue varying smoothly with position.

    Sharp colour edges test texture baking; the hue gradient makes every region distinct.
    """
    p = np.asarray(points, dtype=np.float64)
    rng = np.random.default_rng(seed)
    axis = rng.normal(size=3)
    hue = 0.5 + (p @ (axis / np.linalg.norm(axis))) * 0.6
    check = (np.floor(p / cell).sum(1) % 2).astype(np.float64)
    base = _hue_rgb(hue)
    return np.clip(base * (0.45 + 0.55 * check[:, None]), 0, 255).round().astype(np.uint8)


def stripe_colors(points: np.ndarray, *, period: float = 0.06, direction=(1.0, 0.6, 0.3)) -> np.ndarray:
    """(N, 3) uint8: colour stripes across ``direction`` with the given period, plus a slow hue drift."""
    p = np.asarray(points, dtype=np.float64)
    d = np.asarray(direction, dtype=np.float64)
    s = p @ (d / np.linalg.norm(d))
    band = (np.floor(s / (period / 2)) % 3).astype(int)
    hue = 0.15 + 0.33 * band + 0.2 * p[:, 1]
    return np.clip(_hue_rgb(hue, s=0.8, v=0.85), 0, 255).round().astype(np.uint8)


def near_white_colors(points: np.ndarray, *, cell: float = 0.12) -> np.ndarray:
    """(N, 3) uint8 in [236, 252]: a faint warm/cool checker, nearly the white of the background."""
    p = np.asarray(points, dtype=np.float64)
    check = (np.floor(p / cell).sum(1) % 2).astype(np.float64)
    warm = np.array([252.0, 248.0, 240.0])
    cool = np.array([238.0, 242.0, 248.0])
    return (warm * check[:, None] + cool * (1 - check[:, None])).round().astype(np.uint8)


def high_frequency_texture(width: int = 1024, height: int = 512, *, seed: int = 0) -> np.ndarray:
    """(height, width, 3) uint8: a 4-texel checker under random 2-texel colour noise and thin hue bands."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    check = ((x // 4 + y // 4) % 2).astype(np.float64)
    hue = (x / width * 3.0 + y / height) % 1.0
    base = _hue_rgb(hue.ravel(), s=0.7, v=0.95).reshape(height, width, 3)
    noise = rng.integers(0, 2, size=(height // 2 + 1, width // 2 + 1)).repeat(2, 0).repeat(2, 1)[:height, :width]
    img = base * (0.35 + 0.45 * check[..., None] + 0.2 * noise[..., None])
    lines = (x % 16 == 0) | (y % 16 == 0)
    img[lines] = (30, 30, 30)
    return np.clip(img, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- geometry builders


def sdf_mesh(sdf: Callable[[np.ndarray], np.ndarray], lo, hi, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Mesh the zero level set of a signed distance function (negative inside) by marching cubes.

    Parameters
    ----------
    sdf : function (N, 3) float64 points -> (N,) float64 signed distances
    lo, hi : (3,) float, a box that contains the surface (padded by two steps here)
    step : grid spacing, scene units

    Returns
    -------
    vertices : (V, 3) float64, world
    faces : (F, 3) int64, counter-clockwise seen from outside (positive enclosed volume)
    """
    from skimage.measure import marching_cubes

    lo = np.asarray(lo, dtype=np.float64) - 2 * step
    hi = np.asarray(hi, dtype=np.float64) + 2 * step
    n = np.ceil((hi - lo) / step).astype(int) + 1
    axes = [lo[k] + step * np.arange(n[k]) for k in range(3)]
    vol = np.empty(tuple(n), dtype=np.float32)
    yy, zz = np.meshgrid(axes[1], axes[2], indexing="ij")
    for i, x in enumerate(axes[0]):  # slab by slab: bounded memory at fine steps
        pts = np.stack([np.full(yy.size, x), yy.ravel(), zz.ravel()], axis=1)
        vol[i] = sdf(pts).reshape(yy.shape)
    verts, faces, _, _ = marching_cubes(vol, level=0.0, spacing=(step, step, step))
    # Where the level set passes through a grid point, marching cubes emits coincident vertices
    # and zero-area faces: merge them, or they read as specks of separate components.
    verts, faces = _merge_positions(verts.astype(np.float64) + lo, faces.astype(np.int64))
    if _signed_volume(verts, faces) < 0:
        faces = faces[:, ::-1].copy()
    return verts, faces


def _signed_volume(v: np.ndarray, f: np.ndarray) -> float:
    t = v[f]
    return float(np.einsum("ij,ij->i", t[:, 0], np.cross(t[:, 1], t[:, 2])).sum() / 6.0)


def grid_patch(
    fn: Callable[[np.ndarray, np.ndarray], np.ndarray], nu: int, nv: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A parametric surface sampled on an (nu + 1) x (nv + 1) grid of (u, v) in [0, 1]^2.

    Parameters
    ----------
    fn : function (u (N,), v (N,)) -> (N, 3) float64 points
    nu, nv : cells along u and v

    Returns
    -------
    vertices : ((nu + 1) * (nv + 1), 3) float64
    faces : (2 * nu * nv, 3) int64, counter-clockwise in the (u, v) plane
    uv : ((nu + 1) * (nv + 1), 2) float64, the grid parameters
    """
    u, v = np.meshgrid(np.linspace(0, 1, nu + 1), np.linspace(0, 1, nv + 1), indexing="ij")
    uv = np.stack([u.ravel(), v.ravel()], 1)
    verts = np.asarray(fn(uv[:, 0], uv[:, 1]), dtype=np.float64)
    idx = np.arange((nu + 1) * (nv + 1)).reshape(nu + 1, nv + 1)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel(), idx[:-1, 1:].ravel()
    faces = np.concatenate([np.stack([a, b, c], 1), np.stack([a, c, d], 1)])
    return verts, faces, uv


def grid_box(extents, step: float) -> tuple[np.ndarray, np.ndarray]:
    """A watertight box centred at the origin, each face a regular grid of cells no larger than ``step``.

    Returns (vertices (V, 3) float64, faces (F, 3) int64, counter-clockwise from outside).
    """
    ext = np.asarray(extents, dtype=np.float64)
    half = ext / 2
    parts_v, parts_f = [], []
    offset = 0
    for axis in range(3):
        a1, a2 = (axis + 1) % 3, (axis + 2) % 3
        n1, n2 = (int(math.ceil(ext[a] / step)) for a in (a1, a2))
        for sign in (1.0, -1.0):

            def fn(u, v, axis=axis, a1=a1, a2=a2, sign=sign):
                p = np.zeros((len(u), 3))
                p[:, axis] = sign * half[axis]
                p[:, a1] = (u - 0.5) * ext[a1]
                p[:, a2] = (v - 0.5) * ext[a2]
                return p

            v, f, _ = grid_patch(fn, n1, n2)
            if sign < 0:  # (a1, a2, axis) is right-handed: the +axis face is CCW as built
                f = f[:, ::-1]
            parts_v.append(v)
            parts_f.append(f + offset)
            offset += len(v)
    return _merge_positions(np.concatenate(parts_v), np.concatenate(parts_f))


def _merge_positions(v: np.ndarray, f: np.ndarray, *, decimals: int = 9) -> tuple[np.ndarray, np.ndarray]:
    """Merge vertices at the same position (rounded), dropping faces that collapse."""
    key = np.round(v, decimals)
    uniq, inv = np.unique(key, axis=0, return_inverse=True)
    f = inv.reshape(-1)[f]
    f = f[(f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 0] != f[:, 2])]
    used, f = np.unique(f, return_inverse=True)  # drop vertices no face uses any more
    return uniq[used], f.reshape(-1, 3)


def _rotation(axis, degrees: float) -> np.ndarray:
    """(3, 3) rotation about ``axis`` by ``degrees`` (right-handed)."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    t = math.radians(degrees)
    K = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + math.sin(t) * K + (1 - math.cos(t)) * K @ K


def _in_frame(R: np.ndarray, offset=(0.0, 0.0, 0.0)) -> Callable[[np.ndarray], np.ndarray]:
    """Points (N, 3) in world -> the object's own frame, for an object rotated by R then moved by offset."""
    o = np.asarray(offset, dtype=np.float64)
    return lambda p: (p - o) @ R  # (R^T (p - o)) row-wise


# signed distance primitives on (N, 3) float64 points


def _sd_torus(p: np.ndarray, major: float, minor: float) -> np.ndarray:
    """Torus around the local y axis."""
    q = np.hypot(p[:, 0], p[:, 2]) - major
    return np.hypot(q, p[:, 1]) - minor


def _sd_capsule(p: np.ndarray, a, b, r: float) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ab = b - a
    h = np.clip(((p - a) @ ab) / (ab @ ab), 0.0, 1.0)
    return np.linalg.norm(p - a - h[:, None] * ab, axis=1) - r


def _sd_round_box(p: np.ndarray, half, r: float) -> np.ndarray:
    q = np.abs(p) - (np.asarray(half) - r)
    return np.linalg.norm(np.maximum(q, 0.0), axis=1) + np.minimum(q.max(1), 0.0) - r


def _smin(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth union (polynomial smooth minimum) with blend radius k."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b * (1 - h) + a * h - k * h * (1 - h)


def _finish(
    verts: np.ndarray, faces: np.ndarray, colors: np.ndarray | None = None, uvs=None, texture=None
) -> TexturedMesh:
    return TexturedMesh(
        vertices=np.asarray(verts, dtype=np.float32),
        faces=np.asarray(faces, dtype=np.int32),
        uvs=None if uvs is None else np.asarray(uvs, dtype=np.float32),
        texture=texture,
        vertex_colors=colors,
    )


# ---------------------------------------------------------------- the objects


def make_mug(step: float) -> ValidationObject:
    """A mug: a deep open cylinder with a thin ring handle (genus 1)."""
    R, t, H, tb = 0.28, 0.035, 0.7, 0.05
    to_local = _in_frame(_rotation((0, 1, 0), -30.0))

    def sdf(p):
        p = to_local(p)
        rxz = np.hypot(p[:, 0], p[:, 2])
        outer = np.maximum(rxz - R, np.abs(p[:, 1]) - H / 2)
        cavity = np.maximum(rxz - (R - t), -(p[:, 1] - (-H / 2 + tb)))
        body = np.maximum(outer, -cavity)
        q = p - np.array([R + 0.02, 0.0, 0.0])
        ring = np.hypot(np.hypot(q[:, 0], q[:, 1]) - 0.16, q[:, 2]) - 0.03  # torus around local z
        handle = np.maximum(ring, R - 0.01 - rxz)  # only outside the wall
        return np.minimum(body, handle)

    v, f = sdf_mesh(sdf, (-0.55, -0.4, -0.55), (0.55, 0.4, 0.55), step)
    return ValidationObject(
        "mug", _finish(v, f, checker_colors(v, cell=0.09, seed=1)), ("thin_parts", "deep_concavity"), 1, True
    )


def make_pot(step: float) -> ValidationObject:
    """A thin-walled pot: a sphere shell cut above its equator, mouth narrower than the belly (deep concavity)."""
    Rb, t, c = 0.42, 0.03, np.array([0.0, 0.12, 0.0])  # centred: y from -0.315 to 0.32

    def sdf(p):
        shell = np.abs(np.linalg.norm(p - c, axis=1) - Rb) - t / 2
        return np.maximum(shell, p[:, 1] - (c[1] + 0.2))

    v, f = sdf_mesh(sdf, (-0.47, -0.35, -0.47), (0.47, 0.36, 0.47), step)
    return ValidationObject(
        "pot", _finish(v, f, stripe_colors(v, period=0.1)), ("deep_concavity", "thin_parts"), 0, True
    )


def make_pretzel(step: float) -> ValidationObject:
    """Three tube rings in a row, each touching the next (genus 3), tilted out of the rig's planes."""
    Rm, rm = 0.15, 0.04
    d = 2 * Rm - 0.5 * rm  # overlapping tubes, but no extra hole between rings
    to_local = _in_frame(_rotation((1, 0.3, 0), 55.0))

    def sdf(p):
        p = to_local(p)
        out = None
        for cx in (-d, 0.0, d):
            s = _sd_torus(p - np.array([cx, 0.0, 0.0]), Rm, rm)
            out = s if out is None else np.minimum(out, s)
        return out

    r = d + Rm + rm
    v, f = sdf_mesh(sdf, (-r, -r, -r), (r, r, r), step)
    return ValidationObject(
        "pretzel", _finish(v, f, checker_colors(v, cell=0.07, seed=3)), ("genus_2_plus", "thin_parts"), 3, True
    )


def make_plate(step: float) -> ValidationObject:
    """A thick plate with two round holes (genus 2), tilted."""
    to_local = _in_frame(_rotation((1, 0, 0.4), 25.0))

    def sdf(p):
        p = to_local(p)
        slab = _sd_round_box(p, (0.42, 0.05, 0.28), 0.02)
        holes = np.minimum(np.hypot(p[:, 0] - 0.19, p[:, 2]) - 0.1, np.hypot(p[:, 0] + 0.19, p[:, 2]) - 0.1)
        return np.maximum(slab, -holes)

    v, f = sdf_mesh(sdf, (-0.46, -0.46, -0.46), (0.46, 0.46, 0.46), step)
    return ValidationObject(
        "plate_two_holes",
        _finish(v, f, checker_colors(v, cell=0.08, seed=4)),
        ("genus_2_plus", "flat_faces_sharp_edges"),
        2,
        True,
    )


def make_crate(step: float) -> ValidationObject:
    """A box with exact sharp edges, turned 25 degrees about +Y so its large faces are seen obliquely."""
    v, f = grid_box((0.8, 0.5, 0.45), step * 1.5)
    v = v @ _rotation((0, 1, 0), 25.0).T
    return ValidationObject(
        "crate", _finish(v, f, checker_colors(v, cell=0.1, seed=5)), ("flat_faces_sharp_edges",), 0, True
    )


def make_wedge(step: float) -> ValidationObject:
    """A ramp: a box sheared into a prism whose sloping face meets the base at an acute edge (about 34 degrees)."""
    v, f = grid_box((1.0, 1.0, 1.0), step * 1.5 / 0.6)
    x, y, z = v[:, 0] + 0.5, v[:, 1] + 0.5, v[:, 2]
    # x scales linearly with height: every face stays planar; top face 0.1 wide.
    xs = x * (1.0 - 0.88 * y)
    v = np.stack([0.8 * xs - 0.4, 0.45 * y - 0.225, 0.55 * z], 1)
    v = v @ _rotation((0, 1, 0), -35.0).T
    return ValidationObject(
        "wedge",
        _finish(v, f, stripe_colors(v, period=0.09, direction=(0.2, 1.0, 0.5))),
        ("flat_faces_sharp_edges",),
        0,
        True,
    )


def make_rod(step: float) -> ValidationObject:
    """A long thin rod (capsule, 1.0 long, 0.05 thick) along a diagonal."""
    a, b = np.array([-0.42, -0.25, 0.12]), np.array([0.42, 0.25, -0.12])

    def sdf(p):
        return _sd_capsule(p, a, b, 0.025)

    v, f = sdf_mesh(sdf, np.minimum(a, b) - 0.03, np.maximum(a, b) + 0.03, min(step, 0.006))
    return ValidationObject(
        "rod",
        _finish(v, f, stripe_colors(v, period=0.08, direction=(0.84, 0.5, -0.24))),
        ("elongated", "thin_parts"),
        0,
        True,
    )


def make_blob_offcentre(step: float) -> ValidationObject:
    """An organic blob of smoothly joined spheres, centred at (0.3, 0.15, -0.25) instead of the origin."""
    offset = np.array([0.3, 0.15, -0.25])
    balls = [
        ((0.0, 0.0, 0.0), 0.2),
        ((0.17, 0.12, 0.05), 0.13),
        ((-0.15, 0.1, -0.08), 0.12),
        ((0.02, -0.15, 0.12), 0.11),
    ]

    def sdf(p):
        q = p - offset
        out = None
        for c, r in balls:
            s = np.linalg.norm(q - np.asarray(c), axis=1) - r
            out = s if out is None else _smin(out, s, 0.06)
        return out

    v, f = sdf_mesh(sdf, offset - 0.36, offset + 0.36, step)
    return ValidationObject(
        "blob_offcentre", _finish(v, f, checker_colors(v, cell=0.06, seed=7)), ("off_centre",), 0, True
    )


def make_small_snowman(step: float) -> ValidationObject:
    """A snowman 0.22 tall: small in the frame (about 50 px of 512)."""

    def sdf(p):
        body = np.linalg.norm(p - np.array([0.0, -0.04, 0.0]), axis=1) - 0.07
        head = np.linalg.norm(p - np.array([0.0, 0.06, 0.0]), axis=1) - 0.05
        nose = _sd_capsule(p, (0.0, 0.06, 0.04), (0.0, 0.055, 0.09), 0.012)
        return np.minimum(_smin(body, head, 0.02), nose)

    v, f = sdf_mesh(sdf, (-0.08, -0.12, -0.08), (0.08, 0.12, 0.1), min(step, 0.003))
    return ValidationObject(
        "small_snowman", _finish(v, f, checker_colors(v, cell=0.03, seed=8)), ("small_in_frame",), 0, True
    )


def make_hf_ellipsoid(step: float, *, texture_size: int = 1024) -> ValidationObject:
    """An ellipsoid with a UV texture of 2-4 texel detail (about one pixel at 512 px): high-frequency texture."""
    radii = np.array([0.42, 0.32, 0.36])
    n_lat = max(8, int(math.pi * 0.36 / step / 1.5))

    def fn(u, v):
        lon = (u - 0.5) * 2 * math.pi
        lat = (v - 0.5) * math.pi
        return np.stack([np.cos(lat) * np.sin(lon), np.sin(lat), np.cos(lat) * np.cos(lon)], 1) * radii

    v, f, uv = grid_patch(fn, 2 * n_lat, n_lat)  # (lon, lat) increasing is counter-clockwise from outside
    # The poles collapse rows of vertices to one point: drop those zero-area faces.
    t = v[f]
    area = np.linalg.norm(np.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]), axis=1)
    f = f[area > 1e-12]
    tex = high_frequency_texture(texture_size, texture_size // 2)
    return ValidationObject("hf_ellipsoid", _finish(v, f, uvs=uv, texture=tex), ("high_frequency_texture",), 0, True)


def make_white_egg(step: float) -> ValidationObject:
    """A near-white egg (RGB 236-252) on the white background."""

    def sdf(p):
        ry = np.where(p[:, 1] > 0, 0.46, 0.36)  # pointed top, round bottom; continuous at y = 0
        q = p / np.stack([np.full(len(p), 0.3), ry, np.full(len(p), 0.3)], 1)
        return (np.linalg.norm(q, axis=1) - 1.0) * 0.3

    v, f = sdf_mesh(sdf, (-0.31, -0.37, -0.31), (0.31, 0.47, 0.31), step)
    return ValidationObject("white_egg", _finish(v, f, near_white_colors(v)), ("near_white",), 0, True)


def make_sheet(step: float) -> ValidationObject:
    """An open curved sheet: 240 degrees of a wavy cylinder wall, no caps (one boundary loop per edge)."""
    n_theta = int(math.radians(240) * 0.36 / step)
    n_y = int(0.6 / step)

    def fn(u, v):
        theta = (u - 0.5) * math.radians(240)
        r = 0.34 + 0.03 * np.sin(5 * theta)
        return np.stack([r * np.sin(theta), (v - 0.5) * 0.6 + 0.05 * np.cos(2 * theta), r * np.cos(theta)], 1)

    v, f, _ = grid_patch(fn, n_theta, n_y)
    v = v @ _rotation((1, 0, 0), 15.0).T
    return ValidationObject(
        "sheet", _finish(v, f, checker_colors(v, cell=0.08, seed=11)), ("open_surface",), None, False
    )


#: Object name -> builder(grid step) -> ValidationObject, in table order.
OBJECTS: dict[str, Callable[[float], ValidationObject]] = {
    "mug": make_mug,
    "pot": make_pot,
    "pretzel": make_pretzel,
    "plate_two_holes": make_plate,
    "crate": make_crate,
    "wedge": make_wedge,
    "rod": make_rod,
    "blob_offcentre": make_blob_offcentre,
    "small_snowman": make_small_snowman,
    "hf_ellipsoid": make_hf_ellipsoid,
    "white_egg": make_white_egg,
    "sheet": make_sheet,
}


def build_object(name: str, *, step: float = DEFAULT_GRID_STEP) -> ValidationObject:
    """Build one object of :data:`OBJECTS` with its ``encoded``-variant encoding assigned."""
    if name not in OBJECTS:
        raise ValueError(f"unknown validation object {name!r}; choose from {list(OBJECTS)}")
    obj = OBJECTS[name](step)
    obj.encoding = ENCODED_VARIANTS[list(OBJECTS).index(name) % len(ENCODED_VARIANTS)]
    return obj


# ---------------------------------------------------------------- cameras


def orbit_cameras(
    width: int, height: int, *, fov_x_deg: float = RIG_FOV_X_DEG, distance: float = RIG_DISTANCE
) -> dict[str, Camera]:
    """Held-out cameras on an orbit around the origin, none along a rig axis, keyed ``orbit_00`` ...

    Azimuths :data:`ORBIT_AZIMUTHS_DEG`, elevations :data:`ORBIT_ELEVATIONS_DEG`; world +Y is image up.
    """
    K = intrinsics_from_fov(fov_x_deg, width, height)
    out = {}
    for k, (az, el) in enumerate(zip(ORBIT_AZIMUTHS_DEG, ORBIT_ELEVATIONS_DEG, strict=True)):
        a, e = math.radians(az), math.radians(el)
        eye = distance * np.array([math.cos(e) * math.sin(a), math.sin(e), math.cos(e) * math.cos(a)])
        name = f"orbit_{k:02d}"
        out[name] = Camera(
            K=K.copy(), cam_to_world=look_at(eye, (0, 0, 0), (0, 1, 0)), width=width, height=height, name=name
        )
    return out


def cameras_json(
    cams: dict[str, Camera], fov_x_deg: float, *, encoding: DepthEncoding | None = None, with_files: bool = True
) -> dict:
    """A NeRF-convention camera file (OpenGL axes) for ``cams``, as transforms.json and gt/orbit.json use it."""
    first = next(iter(cams.values()))
    d: dict = {"camera_angle_x": float(math.radians(fov_x_deg)), "w": first.width, "h": first.height}
    if encoding is not None:
        d["depth_encoding"] = encoding.to_dict()
    frames = []
    for n, c in cams.items():
        fr = {"file_path": f"multi_views/{n}.png"} if with_files else {"name": n}
        if with_files:
            fr["depth_path"] = f"depth_renders/{n}.png"
        fr["transform_matrix"] = opencv_to_opengl(c.cam_to_world).tolist()
        frames.append(fr)
    d["frames"] = frames
    return d


def load_orbit_cameras(path: str | Path) -> list[Camera]:
    """Read ``gt/orbit.json`` (written by :func:`write_object_bundles`) back into cameras (OpenCV axes)."""
    from .camera import opengl_to_opencv

    d = json.loads(Path(path).read_text())
    w, h = int(d["w"]), int(d["h"])
    K = intrinsics_from_fov(math.degrees(d["camera_angle_x"]), w, h)
    return [
        Camera(
            K=K.copy(),
            cam_to_world=opengl_to_opencv(np.asarray(fr["transform_matrix"])),
            width=w,
            height=h,
            name=fr["name"],
        )
        for fr in d["frames"]
    ]


# ---------------------------------------------------------------- writing bundles


def _depth_png(values: np.ndarray, enc: DepthEncoding) -> bytes:
    """PNG bytes of encoded depth: 16-bit grey when ``max_value`` exceeds 255, else 8-bit."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    if enc.max_value > 255:
        Image.fromarray(values.astype(np.uint16)).save(buf, format="PNG")
    else:
        Image.fromarray(values.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def render_rig(
    obj: ValidationObject, resolution: int, depth_resolution: int
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Render the default rig: name -> (rgb (R, R, 3) uint8 on white, z (D, D) float32 scene units, mask (D, D) bool)."""
    cams = default_rig(resolution, resolution)
    r = make_rasterizer(obj.mesh.vertices, obj.mesh.faces, backend="embree")
    out = {}
    for name in RIG_VIEW_NAMES:
        cam = cams[name]
        rgb, _ = shade_rgb_antialiased(obj.mesh, r, cam, samples=PHOTO_SUPERSAMPLE)
        dr = r.rasterize(cam.scaled(depth_resolution, depth_resolution))
        out[name] = (rgb, dr.depth, dr.mask)
    return out


def write_object_bundles(
    obj: ValidationObject,
    out: str | Path,
    *,
    variants: tuple[str, ...] = VARIANTS,
    resolution: int = 512,
    depth_resolution: int | None = None,
) -> dict:
    """Write ``out/<variant>/`` bundles of one object; returns its manifest entry (JSON-serialisable).

    Each bundle: ``multi_views/*.png``, ``depth_renders/*.png``, ``transforms.json`` (not in
    ``rig``), ``gt/mesh.glb`` and ``gt/orbit.json`` (held-out cameras at ``resolution``).
    The manifest entry records the covered cases, designed genus, the ``encoded`` encoding, and
    per variant the fraction of foreground depth pixels the encoding clips at ``far``.
    """
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    out = Path(out)
    dres = depth_resolution or resolution
    views = render_rig(obj, resolution, dres)
    rig = default_rig(resolution, resolution)
    orbit = cameras_json(orbit_cameras(resolution, resolution), RIG_FOV_X_DEG, with_files=False)
    gt_dir = out / "_gt"
    write_glb(obj.mesh, gt_dir)
    glb = (gt_dir / "mesh.glb").read_bytes()
    entry: dict = {
        "name": obj.name,
        "covers": list(obj.covers),
        "genus": obj.genus,
        "closed": obj.closed,
        "faces": int(len(obj.mesh.faces)),
        "encoded_encoding": obj.encoding.to_dict(),
        "variants": {},
    }
    for variant in variants:
        enc = obj.encoding if variant == "encoded" else DEFAULT_DEPTH_ENCODING
        b = out / variant
        (b / "multi_views").mkdir(parents=True, exist_ok=True)
        (b / "depth_renders").mkdir(parents=True, exist_ok=True)
        (b / "gt").mkdir(parents=True, exist_ok=True)
        clipped = fg = 0
        for name in RIG_VIEW_NAMES:
            rgb, z, mask = views[name]
            values = encode_depth(z, mask, enc, dtype=np.uint16 if enc.max_value > 255 else np.uint8)
            clipped += int((mask & (values >= enc.max_value)).sum())
            fg += int(mask.sum())
            (b / "multi_views" / f"{name}.png").write_bytes(png_bytes(rgb))
            (b / "depth_renders" / f"{name}.png").write_bytes(_depth_png(values, enc))
        if variant != "rig":
            (b / "transforms.json").write_text(json.dumps(cameras_json(rig, RIG_FOV_X_DEG, encoding=enc), indent=1))
        (b / "gt" / "mesh.glb").write_bytes(glb)
        (b / "gt" / "orbit.json").write_text(json.dumps(orbit, indent=1))
        entry["variants"][variant] = {
            "path": str(b),
            "encoding": enc.to_dict(),
            "clipped_fraction": clipped / max(fg, 1),
        }
    for p in gt_dir.iterdir():
        p.unlink()
    gt_dir.rmdir()
    return entry


def write_validation_set(
    out: str | Path,
    *,
    objects: list[str] | None = None,
    variants: tuple[str, ...] = VARIANTS,
    resolution: int = 512,
    depth_resolution: int | None = None,
    step: float = DEFAULT_GRID_STEP,
) -> dict:
    """Build and write every object's bundles under ``out/<object>/<variant>/``, plus ``out/manifest.json``.

    Returns the manifest: ``{"resolution", "depth_resolution", "step", "objects": [entry, ...]}``.
    """
    out = Path(out)
    manifest = {
        "resolution": resolution,
        "depth_resolution": depth_resolution or resolution,
        "step": step,
        "variants": list(variants),
        "objects": [],
    }
    for name in objects or list(OBJECTS):
        obj = build_object(name, step=step)
        manifest["objects"].append(
            write_object_bundles(
                obj, out / name, variants=variants, resolution=resolution, depth_resolution=depth_resolution
            )
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def write_variants_of_bundle(
    src: str | Path, out: str | Path, *, encoding: DepthEncoding = ENCODED_VARIANTS[0], orbit_resolution: int = 512
) -> dict:
    """The three variants of an existing default-rig bundle that has ``transforms.json`` and ``gt/mesh.glb``.

    For meshes that come as bundles (../shared/data/objects): ``posed`` is a copy, ``rig`` the copy
    without ``transforms.json``, ``encoded`` the depth decoded with the stated encoding and written
    again with ``encoding``; clipped values (at ``max_value``) stay clipped. Each gets
    ``gt/orbit.json`` at ``orbit_resolution``.

    Raises ValueError when the bundle's cameras are not the default rig: its ``rig`` variant would
    then not be the same scene.
    """
    import shutil

    from .bundle import load_bundle
    from .depth import decode_depth

    src, out = Path(src), Path(out)
    fs = load_bundle(src)
    if not fs.cameras_given or fs.names != list(RIG_VIEW_NAMES):
        raise ValueError(f"{src} is not a six-view bundle with transforms.json")
    w, h = fs.views[0].size
    rig = default_rig(w, h)
    for v in fs.views:
        if not (
            np.allclose(v.camera.cam_to_world, rig[v.name].cam_to_world, atol=1e-6)
            and np.allclose(v.camera.K, rig[v.name].K)
        ):
            raise ValueError(f"view {v.name!r} of {src} is not at the default rig's camera")
    given = fs.depth_encoding or DEFAULT_DEPTH_ENCODING
    orbit = cameras_json(orbit_cameras(orbit_resolution, orbit_resolution), RIG_FOV_X_DEG, with_files=False)
    entry: dict = {
        "name": src.name,
        "covers": [],
        "genus": None,
        "closed": None,
        "encoded_encoding": encoding.to_dict(),
        "variants": {},
    }
    for variant in VARIANTS:
        b = out / variant
        if b.exists():
            shutil.rmtree(b)
        shutil.copytree(src, b, ignore=shutil.ignore_patterns("transforms.json", "depth_renders"))
        (b / "depth_renders").mkdir()
        enc = encoding if variant == "encoded" else given
        clipped = fg = 0
        for v in fs.views:
            raw = v.depth_raw
            z, valid = decode_depth(raw, given)
            clip = valid & (raw >= given.max_value)
            if variant == "encoded":
                values = encode_depth(z, valid, enc, dtype=np.uint16 if enc.max_value > 255 else np.uint8)
                values[clip] = enc.max_value
                data = _depth_png(values, enc)
            else:
                data = (src / "depth_renders" / f"{v.name}.png").read_bytes()
            (b / "depth_renders" / f"{v.name}.png").write_bytes(data)
            clipped += int(clip.sum())
            fg += int(valid.sum())
        if variant != "rig":
            d = json.loads((src / "transforms.json").read_text())
            d["depth_encoding"] = enc.to_dict()
            (b / "transforms.json").write_text(json.dumps(d, indent=1))
        (b / "gt" / "orbit.json").write_text(json.dumps(orbit, indent=1))
        entry["variants"][variant] = {
            "path": str(b),
            "encoding": enc.to_dict(),
            "clipped_fraction": clipped / max(fg, 1),
        }
    return entry
