"""Write and read textured meshes: OBJ + MTL + PNG and binary glTF (GLB).

Files hold the mesh exactly as given, in the input cameras' world frame: no axis swap,
no recentring, no scaling. UVs follow :class:`~pipeline.mesh.TexturedMesh` (v = 0 at
the texture's bottom row, as OBJ expects); trimesh flips v for glTF on export and back
on import.

Exporters are in the :data:`EXPORTERS` registry: ``name -> fn(mesh, out_dir) -> list of paths``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import trimesh
from PIL import Image

from .errors import InvalidInputError
from .mesh import TexturedMesh

OBJ_FILE = "mesh.obj"
MTL_FILE = "material.mtl"
TEXTURE_FILE = "texture_kd.png"
GLB_FILE = "mesh.glb"
MATERIAL_NAME = "material_0"
#: Significant digits written for OBJ positions and UVs (float32 holds ~7).
OBJ_DIGITS = 7


def _check_mesh(mesh: TexturedMesh) -> None:
    v, f = np.asarray(mesh.vertices), np.asarray(mesh.faces)
    if v.ndim != 2 or v.shape[1] != 3 or f.ndim != 2 or f.shape[1] != 3:
        raise InvalidInputError(
            f"expected (V, 3) vertices and (F, 3) faces, got {v.shape} and {f.shape}", code="INVALID_MESH"
        )
    if len(f) and (f.min() < 0 or f.max() >= len(v)):
        raise InvalidInputError("face indices are out of range of the vertices", code="INVALID_MESH")
    if mesh.uvs is not None and np.asarray(mesh.uvs).shape != (len(v), 2):
        raise InvalidInputError(f"uvs must be ({len(v)}, 2), got {np.asarray(mesh.uvs).shape}", code="INVALID_MESH")


def _rows(arr: np.ndarray, prefix: str) -> str:
    """One OBJ line per row of a float array, e.g. ``v 0.1 0.2 0.3``."""
    if len(arr) == 0:
        return ""
    fmt = " ".join([f"%.{OBJ_DIGITS}g"] * arr.shape[1])
    # np.savetxt-style formatting through one big % operation is ~5x faster than per-line f-strings.
    lines = (prefix + " " + fmt + "\n") * len(arr)
    return lines % tuple(arr.astype(np.float64).ravel())


def write_obj(mesh: TexturedMesh, out_dir: str | Path) -> list[Path]:
    """Write ``mesh.obj``, and with a texture ``material.mtl`` + ``texture_kd.png``.

    Faces reference the same index for position and UV (``f a/a b/b c/c``, 1-based):
    the mesh is already split along UV seams.

    Returns
    -------
    The written paths, mesh.obj first.
    """
    _check_mesh(mesh)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    v = np.asarray(mesh.vertices, dtype=np.float32)
    f = np.asarray(mesh.faces, dtype=np.int64) + 1
    parts = ["# Recon3D mesh, input cameras' world frame\n"]
    written = []
    if mesh.has_texture:
        parts.append(f"mtllib {MTL_FILE}\n")
        parts.append(_rows(v, "v"))
        parts.append(_rows(np.asarray(mesh.uvs, dtype=np.float32), "vt"))
        parts.append(f"usemtl {MATERIAL_NAME}\n")
        fi = np.repeat(f, 2, axis=1)  # a a b b c c -> "a/a b/b c/c"
        parts.append(("f %d/%d %d/%d %d/%d\n" * len(f)) % tuple(fi.ravel()) if len(f) else "")
    else:
        if mesh.vertex_colors is not None:
            # The common "v x y z r g b" extension (colours in [0, 1]).
            parts.append(_rows(np.hstack([v, np.asarray(mesh.vertex_colors, np.float32) / 255.0]), "v"))
        else:
            parts.append(_rows(v, "v"))
        parts.append(("f %d %d %d\n" * len(f)) % tuple(f.ravel()) if len(f) else "")
    obj_path = out / OBJ_FILE
    obj_path.write_text("".join(parts))
    written.append(obj_path)
    if mesh.has_texture:
        mtl_path = out / MTL_FILE
        mtl_path.write_text(
            f"newmtl {MATERIAL_NAME}\nKa 1.000 1.000 1.000\nKd 1.000 1.000 1.000\nKs 0.000 0.000 0.000\n"
            f"d 1.0\nillum 1\nmap_Kd {TEXTURE_FILE}\n"
        )
        written.append(mtl_path)
        written.append(_write_texture(mesh, out))
    return written


def _write_texture(mesh: TexturedMesh, out: Path) -> Path:
    path = out / TEXTURE_FILE
    Image.fromarray(np.ascontiguousarray(mesh.texture, dtype=np.uint8)).save(path, optimize=False, compress_level=1)
    return path


def to_trimesh(mesh: TexturedMesh) -> trimesh.Trimesh:
    """A trimesh.Trimesh with the same vertices, faces and order (no processing), PBR base-colour texture."""
    _check_mesh(mesh)
    if mesh.has_texture:
        material = trimesh.visual.material.PBRMaterial(
            name=MATERIAL_NAME,
            baseColorTexture=Image.fromarray(np.ascontiguousarray(mesh.texture, dtype=np.uint8)),
            baseColorFactor=[255, 255, 255, 255],
            metallicFactor=0.0,
            roughnessFactor=1.0,
        )
        visual = trimesh.visual.TextureVisuals(uv=np.asarray(mesh.uvs, dtype=np.float64), material=material)
    elif mesh.vertex_colors is not None:
        visual = trimesh.visual.ColorVisuals(vertex_colors=np.asarray(mesh.vertex_colors, np.uint8))
    else:
        visual = None
    return trimesh.Trimesh(
        vertices=np.asarray(mesh.vertices, dtype=np.float64),
        faces=np.asarray(mesh.faces, dtype=np.int64),
        visual=visual,
        process=False,
    )


def write_glb(mesh: TexturedMesh, out_dir: str | Path) -> list[Path]:
    """Write ``mesh.glb`` (binary glTF 2.0, PBR material with baseColorTexture, metallic 0, roughness 1)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / GLB_FILE
    data = trimesh.exchange.gltf.export_glb(trimesh.Scene(to_trimesh(mesh)), include_normals=True)
    path.write_bytes(data)
    return [path]


#: Export format -> writer(mesh, out_dir) -> written paths (the main file first).
EXPORTERS: dict[str, Callable[[TexturedMesh, str | Path], list[Path]]] = {
    "obj": write_obj,
    "glb": write_glb,
}


def export_mesh(mesh: TexturedMesh, out_dir: str | Path, formats=("obj", "glb")) -> dict[str, Path]:
    """Write ``mesh`` in each of ``formats`` into ``out_dir``.

    Returns
    -------
    dict file name -> path of every file written (``mesh.obj``, ``material.mtl``,
    ``texture_kd.png``, ``mesh.glb`` for the defaults).

    Raises
    ------
    InvalidInputError
        ``UNKNOWN_EXPORT_FORMAT`` for a format not in :data:`EXPORTERS` (nothing is written).
    """
    unknown = [fmt for fmt in formats if fmt not in EXPORTERS]
    if unknown:
        raise InvalidInputError(
            f"unknown export format(s) {unknown}; supported: {sorted(EXPORTERS)}",
            code="UNKNOWN_EXPORT_FORMAT",
            details={"formats": unknown, "supported": sorted(EXPORTERS)},
        )
    written: dict[str, Path] = {}
    for fmt in dict.fromkeys(formats):
        for path in EXPORTERS[fmt](mesh, out_dir):
            written[path.name] = path
    return written


def load_mesh(path: str | Path) -> TexturedMesh:
    """Read an OBJ (with its MTL and texture) or a GLB / glTF into a :class:`TexturedMesh`.

    Multi-part files are concatenated (trimesh ``force="mesh"``). Vertex order is kept
    (no merging), so a file written by :func:`export_mesh` reads back unchanged.

    Raises
    ------
    InvalidInputError
        ``MESH_NOT_FOUND`` when the file does not exist, ``INVALID_MESH`` when it cannot be
        read or holds no triangles.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"no mesh file at {path}", code="MESH_NOT_FOUND", details={"path": str(path)})
    try:
        m = trimesh.load(path, force="mesh", process=False, maintain_order=True)
    except Exception as e:  # trimesh raises many exception types for unreadable files
        raise InvalidInputError(
            f"cannot read mesh {path.name}: {e}", code="INVALID_MESH", details={"path": str(path)}
        ) from None
    if not isinstance(m, trimesh.Trimesh) or len(m.faces) == 0:
        raise InvalidInputError(f"{path.name} holds no triangles", code="INVALID_MESH", details={"path": str(path)})
    uvs = texture = colors = None
    vis = m.visual
    if isinstance(vis, trimesh.visual.TextureVisuals):
        mat = vis.material
        image = getattr(mat, "baseColorTexture", None)
        if image is None:
            image = getattr(mat, "image", None)
        if vis.uv is not None and len(vis.uv) == len(m.vertices) and image is not None:
            uvs = np.asarray(vis.uv, dtype=np.float32)
            texture = np.asarray(image.convert("RGB"), dtype=np.uint8)
        else:  # an untextured material: its constant colour on every vertex
            rgba = getattr(mat, "baseColorFactor", None)
            if rgba is None:
                rgba = getattr(mat, "main_color", None)
            if rgba is not None:
                colors = np.tile(np.asarray(rgba, dtype=np.uint8)[:3], (len(m.vertices), 1))
    elif isinstance(vis, trimesh.visual.ColorVisuals) and vis.kind == "vertex":
        colors = np.asarray(vis.vertex_colors, dtype=np.uint8)[:, :3]
    return TexturedMesh(
        vertices=np.asarray(m.vertices, dtype=np.float32),
        faces=np.asarray(m.faces, dtype=np.int32),
        uvs=uvs,
        texture=texture,
        vertex_colors=colors,
    )
