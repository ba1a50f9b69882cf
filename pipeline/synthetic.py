"""Procedural textured shapes and the bundles our own renderer makes of them.

Used by tests (no external data), examples and benchmarks. A synthetic bundle follows
docs/input-format.md exactly, so it exercises the same reading path as user uploads.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Literal

import numpy as np
import trimesh
from PIL import Image

from .camera import RIG_VIEW_NAMES, Camera, default_rig, opencv_to_opengl
from .config import DEFAULT_DEPTH_ENCODING, DepthEncoding
from .depth import encode_depth
from .mesh import TexturedMesh
from .render import make_rasterizer
from .shading import shade_rgb

Shape = Literal["box", "sphere", "capsule", "torus"]


def checker_texture(size: int = 256, tiles: int = 4) -> np.ndarray:
    """(size, size, 3) uint8 colourful checkerboard with a smooth hue gradient (sharp edges test baking)."""
    y, x = np.mgrid[0:size, 0:size] / size
    check = ((np.floor(x * tiles) + np.floor(y * tiles)) % 2).astype(np.float32)
    r = 60 + 160 * x
    g = 60 + 160 * y
    b = 200 - 120 * check
    img = np.stack([r * (0.55 + 0.45 * check), g * (0.55 + 0.45 * check), b], axis=-1)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_shape(shape: Shape = "box", *, size: float = 0.8, texture_size: int = 256) -> TexturedMesh:
    """A textured mesh centred at the origin with its largest extent ``size``.

    UVs are spherical-ish projections: good enough to carry a recognisable pattern.
    """
    if shape == "box":
        m = trimesh.creation.box(extents=(size, size * 0.7, size * 0.5))
        m = m.subdivide().subdivide()
    elif shape == "sphere":
        m = trimesh.creation.icosphere(subdivisions=4, radius=size / 2)
    elif shape == "capsule":
        m = trimesh.creation.capsule(height=size * 0.5, radius=size * 0.25, count=[32, 32])
        m.apply_transform(trimesh.transformations.rotation_matrix(np.pi / 2, (0, 0, 1)))
    elif shape == "torus":
        m = trimesh.creation.torus(
            major_radius=size * 0.3, minor_radius=size * 0.12, major_sections=64, minor_sections=24
        )
    else:
        raise ValueError(f"unknown shape {shape!r}")
    v = np.asarray(m.vertices, dtype=np.float64)
    v -= (v.max(0) + v.min(0)) / 2
    v *= size / (v.max(0) - v.min(0)).max()
    d = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-9)
    uvs = np.stack(
        [0.5 + np.arctan2(d[:, 0], d[:, 2]) / (2 * np.pi), 0.5 + np.arcsin(np.clip(d[:, 1], -1, 1)) / np.pi], 1
    )
    # Vertex colours carry the pattern (no UV seam artefacts in the ground truth).
    from .shading import sample_texture

    colors = sample_texture(checker_texture(texture_size), uvs).round().astype(np.uint8)
    return TexturedMesh(vertices=v.astype(np.float32), faces=np.asarray(m.faces, dtype=np.int32), vertex_colors=colors)


def render_bundle_views(
    mesh: TexturedMesh, cameras: dict[str, Camera], *, depth_scale: int = 1, enc: DepthEncoding = DEFAULT_DEPTH_ENCODING
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Render name -> (rgb (H, W, 3) uint8 on white, depth PNG values (H/s, W/s) uint8)."""
    r = make_rasterizer(mesh.vertices, mesh.faces, backend="embree")
    out = {}
    for name, cam in cameras.items():
        rgb = shade_rgb(mesh, r.rasterize(cam))
        dcam = cam.scaled(cam.width // depth_scale, cam.height // depth_scale)
        dr = r.rasterize(dcam)
        out[name] = (rgb, encode_depth(dr.depth, dr.mask, enc))
    return out


def write_bundle(
    out: str | Path,
    shape: Shape = "box",
    *,
    resolution: int = 256,
    depth_scale: int = 1,
    with_transforms: bool = False,
    fov_x_deg: float = 60.0,
    as_zip: bool = False,
) -> Path:
    """Write a six-view bundle of a procedural shape; returns the folder (or ZIP) path."""
    mesh = make_shape(shape)
    cams = default_rig(resolution, resolution, fov_x_deg=fov_x_deg)
    views = render_bundle_views(mesh, cams, depth_scale=depth_scale)
    files: dict[str, bytes] = {}
    for name in RIG_VIEW_NAMES:
        rgb, depth = views[name]
        files[f"multi_views/{name}.png"] = png_bytes(rgb)
        files[f"depth_renders/{name}.png"] = png_bytes(depth)
    if with_transforms:
        files["transforms.json"] = json.dumps(transforms_json(cams, fov_x_deg)).encode()
    out = Path(out)
    if as_zip:
        out.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
            for k, v in files.items():
                zf.writestr(k, v)
        return out
    for k, v in files.items():
        p = out / k
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(v)
    return out


def transforms_json(cams: dict[str, Camera], fov_x_deg: float) -> dict:
    """A NeRF-convention transforms.json for the given cameras (OpenGL axes)."""
    return {
        "camera_angle_x": float(np.radians(fov_x_deg)),
        "depth_encoding": DEFAULT_DEPTH_ENCODING.to_dict(),
        "frames": [
            {
                "file_path": f"multi_views/{n}.png",
                "depth_path": f"depth_renders/{n}.png",
                "transform_matrix": opencv_to_opengl(c.cam_to_world).tolist(),
            }
            for n, c in cams.items()
        ],
    }


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()
