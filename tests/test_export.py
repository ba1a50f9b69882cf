"""Export and reload of textured meshes (OBJ + MTL + PNG, GLB)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import trimesh

from pipeline.errors import InvalidInputError
from pipeline.export import EXPORTERS, GLB_FILE, MTL_FILE, OBJ_FILE, TEXTURE_FILE, export_mesh, load_mesh
from pipeline.mesh import TexturedMesh
from pipeline.synthetic import checker_texture, make_shape

#: float32 positions and UVs survive a text round trip to within this.
ROUND_TRIP_ATOL = 1e-6


@pytest.fixture
def textured_mesh() -> TexturedMesh:
    shape = make_shape("torus")
    rng = np.random.default_rng(0)
    # Off-centre and off-scale: exports must keep the cameras' world frame exactly.
    v = shape.vertices * 1.7 + np.array([0.3, -1.2, 2.5], np.float32)
    uvs = rng.random((len(v), 2)).astype(np.float32)
    return TexturedMesh(vertices=v.astype(np.float32), faces=shape.faces, uvs=uvs, texture=checker_texture(64))


def test_export_writes_all_files(tmp_path, textured_mesh):
    files = export_mesh(textured_mesh, tmp_path)
    assert set(files) == {OBJ_FILE, MTL_FILE, TEXTURE_FILE, GLB_FILE}
    assert all(p.is_file() and p.stat().st_size > 0 for p in files.values())
    mtl = (tmp_path / MTL_FILE).read_text()
    assert f"map_Kd {TEXTURE_FILE}" in mtl


@pytest.mark.parametrize("fmt", ["obj", "glb"])
def test_round_trip(tmp_path, textured_mesh, fmt):
    files = export_mesh(textured_mesh, tmp_path, formats=(fmt,))
    back = load_mesh(files[OBJ_FILE if fmt == "obj" else GLB_FILE])
    np.testing.assert_allclose(back.vertices, textured_mesh.vertices, atol=ROUND_TRIP_ATOL * 10)
    np.testing.assert_array_equal(back.faces, textured_mesh.faces)
    np.testing.assert_allclose(back.uvs, textured_mesh.uvs, atol=ROUND_TRIP_ATOL)
    np.testing.assert_array_equal(back.texture, textured_mesh.texture)


@pytest.mark.parametrize("name", [OBJ_FILE, GLB_FILE])
def test_files_load_in_trimesh(tmp_path, textured_mesh, name):
    export_mesh(textured_mesh, tmp_path)
    m = trimesh.load(tmp_path / name, force="mesh")
    assert isinstance(m, trimesh.Trimesh)
    assert len(m.faces) == len(textured_mesh.faces)
    assert isinstance(m.visual, trimesh.visual.TextureVisuals)
    # Same place in the world (default processing may merge vertices, never move them).
    np.testing.assert_allclose(
        m.bounds, np.stack([textured_mesh.vertices.min(0), textured_mesh.vertices.max(0)]), atol=1e-5
    )


def test_obj_indices_are_valid(tmp_path, textured_mesh):
    export_mesh(textured_mesh, tmp_path, formats=("obj",))
    lines = (tmp_path / OBJ_FILE).read_text().splitlines()
    assert lines[1] == f"mtllib {MTL_FILE}"
    n_v = sum(line.startswith("v ") for line in lines)
    n_vt = sum(line.startswith("vt ") for line in lines)
    faces = [line.split()[1:] for line in lines if line.startswith("f ")]
    assert any(line.startswith("usemtl ") for line in lines)
    idx = np.array([[tok.split("/") for tok in f] for f in faces], dtype=np.int64)  # (F, 3, 2)
    assert idx.shape == (len(textured_mesh.faces), 3, 2)
    assert idx[..., 0].min() >= 1 and idx[..., 0].max() <= n_v
    assert idx[..., 1].min() >= 1 and idx[..., 1].max() <= n_vt


def _glb_json(path) -> dict:
    data = path.read_bytes()
    magic, version, length = struct.unpack_from("<4sII", data, 0)
    assert magic == b"glTF" and version == 2 and length == len(data)
    chunk_len, chunk_type = struct.unpack_from("<I4s", data, 12)
    assert chunk_type == b"JSON"
    return json.loads(data[20 : 20 + chunk_len])


def test_glb_has_a_pbr_base_colour_texture(tmp_path, textured_mesh):
    export_mesh(textured_mesh, tmp_path, formats=("glb",))
    gltf = _glb_json(tmp_path / GLB_FILE)
    material = gltf["materials"][0]
    tex_index = material["pbrMetallicRoughness"]["baseColorTexture"]["index"]
    assert gltf["images"][gltf["textures"][tex_index]["source"]]["mimeType"] == "image/png"
    prim = gltf["meshes"][0]["primitives"][0]
    assert "TEXCOORD_0" in prim["attributes"]
    pos = gltf["accessors"][prim["attributes"]["POSITION"]]
    assert pos["count"] == len(textured_mesh.vertices)
    np.testing.assert_allclose(pos["min"], textured_mesh.vertices.min(0), atol=1e-6)
    np.testing.assert_allclose(pos["max"], textured_mesh.vertices.max(0), atol=1e-6)


def test_unknown_format_lists_supported_ones(tmp_path, textured_mesh):
    with pytest.raises(InvalidInputError) as info:
        export_mesh(textured_mesh, tmp_path, formats=("obj", "fbx"))
    assert info.value.code == "UNKNOWN_EXPORT_FORMAT"
    assert info.value.details["supported"] == sorted(EXPORTERS)
    assert "fbx" in str(info.value) and "glb" in str(info.value)
    assert not any(tmp_path.iterdir())


def test_load_mesh_errors(tmp_path):
    with pytest.raises(InvalidInputError) as info:
        load_mesh(tmp_path / "missing.glb")
    assert info.value.code == "MESH_NOT_FOUND"
    bad = tmp_path / "bad.glb"
    bad.write_bytes(b"not a mesh")
    with pytest.raises(InvalidInputError) as info:
        load_mesh(bad)
    assert info.value.code == "INVALID_MESH"


def test_vertex_coloured_mesh_exports_without_texture(tmp_path):
    mesh = make_shape("box")
    files = export_mesh(mesh, tmp_path)
    assert set(files) == {OBJ_FILE, GLB_FILE}
    back = load_mesh(files[GLB_FILE])
    np.testing.assert_array_equal(back.faces, mesh.faces)
    np.testing.assert_array_equal(back.vertex_colors, mesh.vertex_colors)


def test_glb_embeds_the_same_png_as_the_obj(tmp_path, textured_mesh):
    """One PNG encode serves both formats: the GLB's image bytes are texture_kd.png's, its chunks consistent."""
    export_mesh(textured_mesh, tmp_path)
    glb = (tmp_path / GLB_FILE).read_bytes()
    magic, version, total = struct.unpack_from("<4sII", glb, 0)
    assert (magic, version, total) == (b"glTF", 2, len(glb))
    json_len, _ = struct.unpack_from("<I4s", glb, 12)
    tree = json.loads(glb[20 : 20 + json_len])
    bin_len, bin_type = struct.unpack_from("<I4s", glb, 20 + json_len)
    assert bin_type == b"BIN\x00" and tree["buffers"][0]["byteLength"] == bin_len
    blob = glb[28 + json_len : 28 + json_len + bin_len]
    view = tree["bufferViews"][tree["images"][0]["bufferView"]]
    image = blob[view["byteOffset"] : view["byteOffset"] + view["byteLength"]]
    assert image == (tmp_path / TEXTURE_FILE).read_bytes()
    assert all(v["byteOffset"] % 4 == 0 for v in tree["bufferViews"])
