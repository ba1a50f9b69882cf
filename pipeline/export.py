"""Write and read textured meshes: OBJ + MTL + PNG and binary glTF (GLB).

Files hold the mesh exactly as given, in the input cameras' world frame: no axis swap,
no recentring, no scaling. UVs follow :class:`~pipeline.mesh.TexturedMesh` (v = 0 at
the texture's bottom row, as OBJ expects); trimesh flips v for glTF on export and back
on import.

Exporters are in the :data:`EXPORTERS` registry: ``name -> fn(mesh, out_dir, *, texture_png=None) -> list of paths``;
:func:`export_mesh` encodes the texture PNG once and hands it to each.
"""

from __future__ import annotations

import io
import json
import struct
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


def write_obj(mesh: TexturedMesh, out_dir: str | Path, *, texture_png: bytes | None = None) -> list[Path]:
    """Write ``mesh.obj``, and with a texture ``material.mtl`` + ``texture_kd.png``.

    ``texture_png``: the texture already encoded (:func:`encode_texture_png`), to reuse.

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
        written.append(_write_texture(mesh, out, texture_png))
    return written


#: zlib level of the texture PNG (shared by the OBJ and the GLB): level 1 encodes a 2048^2 texture
#: in ~0.2 s, level 6 (Pillow's and trimesh's default) in ~0.8 s for a 15% smaller file.
TEXTURE_PNG_LEVEL = 1


def encode_texture_png(texture: np.ndarray) -> bytes:
    """The PNG file of a (T, T, 3) uint8 texture, encoded once for every format that embeds or references it."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(texture, dtype=np.uint8)).save(
        buf, format="PNG", optimize=False, compress_level=TEXTURE_PNG_LEVEL
    )
    return buf.getvalue()


def _write_texture(mesh: TexturedMesh, out: Path, png: bytes | None) -> Path:
    path = out / TEXTURE_FILE
    path.write_bytes(png if png is not None else encode_texture_png(mesh.texture))
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


def write_glb(mesh: TexturedMesh, out_dir: str | Path, *, texture_png: bytes | None = None) -> list[Path]:
    """Write ``mesh.glb`` (binary glTF 2.0, PBR material with baseColorTexture, metallic 0, roughness 1).

    ``texture_png``: the texture already encoded (:func:`encode_texture_png`), to reuse.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / GLB_FILE
    tm = to_trimesh(mesh)
    if mesh.has_texture:
        # trimesh re-encodes every texture at zlib level 6 (0.8 s at 2048^2): give it a 1 x 1
        # stand-in and put the PNG the OBJ uses into the file instead.
        tm.visual.material.baseColorTexture = Image.new("RGB", (1, 1))
    data = trimesh.exchange.gltf.export_glb(trimesh.Scene(tm), include_normals=True)
    if mesh.has_texture:
        data = replace_glb_image(data, 0, texture_png if texture_png is not None else encode_texture_png(mesh.texture))
    path.write_bytes(data)
    return [path]


def replace_glb_image(glb: bytes, image_index: int, png: bytes) -> bytes:
    """A binary glTF with the bytes of image ``image_index`` (stored in a bufferView) replaced by ``png``.

    The binary chunk is rebuilt: the image's bufferView gets the new bytes, later views move,
    every view stays 4-byte aligned, and the buffer's length is updated.
    """
    magic, version, _ = struct.unpack_from("<4sII", glb, 0)
    json_len, json_type = struct.unpack_from("<I4s", glb, 12)
    if magic != b"glTF" or version != 2 or json_type != b"JSON":
        raise ValueError("not a binary glTF 2.0 file")
    tree = json.loads(glb[20 : 20 + json_len])
    bin_start = 20 + json_len
    bin_len, bin_type = struct.unpack_from("<I4s", glb, bin_start)
    if bin_type != b"BIN\x00":
        raise ValueError("binary glTF without a BIN chunk")
    blob = glb[bin_start + 8 : bin_start + 8 + bin_len]
    target = tree["images"][image_index]["bufferView"]
    pieces, offset = [], 0
    for i, view in enumerate(tree["bufferViews"]):
        start = view.get("byteOffset", 0)
        data = png if i == target else blob[start : start + view["byteLength"]]
        view["byteOffset"], view["byteLength"] = offset, len(data)
        pad = (-len(data)) % 4
        pieces.append(data + b"\x00" * pad)
        offset += len(data) + pad
    tree["buffers"][0]["byteLength"] = offset
    new_bin = b"".join(pieces)
    js = json.dumps(tree, separators=(",", ":")).encode()
    js += b" " * ((-len(js)) % 4)
    total = 12 + 8 + len(js) + 8 + len(new_bin)
    return (
        struct.pack("<4sII", b"glTF", 2, total)
        + struct.pack("<I4s", len(js), b"JSON") + js
        + struct.pack("<I4s", len(new_bin), b"BIN\x00") + new_bin
    )  # fmt: skip


#: Export format -> writer(mesh, out_dir, *, texture_png=None) -> written paths (the main file first).
EXPORTERS: dict[str, Callable[..., list[Path]]] = {
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
    # One PNG encode for every format (the OBJ's texture_kd.png and the GLB's embedded image).
    png = encode_texture_png(mesh.texture) if mesh.has_texture else None
    for fmt in dict.fromkeys(formats):
        for path in EXPORTERS[fmt](mesh, out_dir, texture_png=png):
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
