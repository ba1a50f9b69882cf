"""The validation set's generator keeps its contract: readable bundles, one depth in three encodings, true GT."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pipeline.bundle import load_bundle
from pipeline.camera import RIG_LAYOUT, RIG_VIEW_NAMES
from pipeline.config import DEFAULT_DEPTH_ENCODING
from pipeline.depth import decode_depth
from pipeline.evaluate import load_mesh_file
from pipeline.mesh import edge_adjacency, weld_vertices
from pipeline.render import make_rasterizer
from pipeline.validation_set import CASES, OBJECTS, VARIANTS, build_object, load_orbit_cameras, write_validation_set

#: Small versions: a coarse grid and 64 px views keep the whole module to a few seconds.
STEP = 0.03
RES = 64
#: genus 3 (16-bit encoded variant), an open surface (8-bit encoded variant), sharp flat faces (16-bit).
NAMES = ["pretzel", "sheet", "crate"]


@pytest.fixture(scope="module")
def vset(tmp_path_factory):
    root = tmp_path_factory.mktemp("vset")
    manifest = write_validation_set(root, objects=NAMES, resolution=RES, step=STEP)
    return root, manifest


def _topology(name: str) -> tuple[int, int, np.ndarray]:
    """(Euler characteristic, connected components, boundary edge count) of an object's welded mesh."""
    import scipy.sparse as sp
    from scipy.sparse.csgraph import connected_components

    m = build_object(name, step=STEP).mesh
    weld, pos = weld_vertices(m.vertices)
    f = weld[m.faces.astype(np.int64)]
    edges, _, count = edge_adjacency(f)
    chi = len(pos) - len(edges) + len(f)
    adj = sp.coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(len(pos), len(pos)))
    n_comp = connected_components(adj, directed=False)[0]
    return chi, n_comp, count


def test_the_set_covers_the_issue_cases():
    covered = set()
    for name in OBJECTS:
        covered |= set(build_object(name, step=0.05).covers)
    assert len(OBJECTS) >= 10
    assert covered == set(CASES)


@pytest.mark.parametrize("name", ["pretzel", "plate_two_holes", "mug", "crate", "sheet"])
def test_topology_is_as_designed(name):
    obj = build_object(name, step=STEP)
    chi, n_comp, count = _topology(name)
    assert n_comp == 1
    assert (count >= 3).sum() == 0, "non-manifold edges"
    if obj.closed:
        assert (count == 1).sum() == 0, "a closed object has boundary edges"
        assert (2 - chi) // 2 == obj.genus and chi % 2 == 0
    else:
        assert (count == 1).sum() > 0, "the open surface has no boundary"
        assert chi == 1  # a disc-like sheet: one boundary loop


def test_bundles_read_and_state_what_they_should(vset):
    root, manifest = vset
    assert [o["name"] for o in manifest["objects"]] == NAMES
    for entry in manifest["objects"]:
        name = entry["name"]
        obj = build_object(name, step=STEP)
        for variant in VARIANTS:
            fs = load_bundle(root / name / variant)
            assert fs.names == list(RIG_VIEW_NAMES)
            assert fs.views[0].size == (RES, RES)
            if variant == "rig":
                assert not (root / name / variant / "transforms.json").exists()
                assert not fs.cameras_given and fs.depth_encoding is None
            else:
                assert fs.cameras_given
                want = obj.encoding if variant == "encoded" else DEFAULT_DEPTH_ENCODING
                assert fs.depth_encoding == want
        enc = obj.encoding
        assert enc != DEFAULT_DEPTH_ENCODING
        fs = load_bundle(root / name / "encoded")
        assert fs.depth_max_value == (65535.0 if enc.max_value > 255 else 255.0)
    # both kinds of non-default encoding are exercised
    assert {o["encoded_encoding"]["max_value"] for o in manifest["objects"]} == {255.0, 65535.0}


def test_variants_decode_to_the_same_depth(vset):
    root, manifest = vset
    for entry in manifest["objects"]:
        name = entry["name"]
        enc = build_object(name, step=STEP).encoding
        default = load_bundle(root / name / "rig")
        encoded = load_bundle(root / name / "encoded")
        posed = load_bundle(root / name / "posed")
        q = DEFAULT_DEPTH_ENCODING.far / DEFAULT_DEPTH_ENCODING.max_value / 2 + (enc.far - enc.near) / enc.max_value / 2
        for a, b, c in zip(default.views, encoded.views, posed.views, strict=True):
            np.testing.assert_array_equal(a.rgb, b.rgb)
            np.testing.assert_array_equal(a.depth_raw, c.depth_raw)
            za, va = decode_depth(a.depth_raw, DEFAULT_DEPTH_ENCODING)
            zb, vb = decode_depth(b.depth_raw, enc)
            np.testing.assert_array_equal(va, vb)  # same silhouette
            both = va & (a.depth_raw < DEFAULT_DEPTH_ENCODING.max_value)  # the default clips at far = 2.5
            assert both.sum() > 10
            assert np.abs(za[both] - zb[both]).max() <= q + 1e-6
            # the non-default encoding does not clip this object
            assert (b.depth_raw[vb] < enc.max_value).all()


def test_gt_mesh_is_the_object_seen_by_the_cameras(vset):
    root, manifest = vset
    for entry in manifest["objects"]:
        name = entry["name"]
        obj = build_object(name, step=STEP)
        gt = load_mesh_file(root / name / "posed" / "gt" / "mesh.glb")
        np.testing.assert_allclose(gt.vertices, obj.mesh.vertices, atol=1e-6)
        np.testing.assert_array_equal(gt.faces, obj.mesh.faces)
        # The GT, rendered at the cameras of transforms.json, gives the depth the bundle holds.
        fs = load_bundle(root / name / "encoded")
        r = make_rasterizer(gt.vertices, gt.faces, backend="embree")
        for v in fs.views:
            rast = r.rasterize(v.camera)
            z, valid = decode_depth(v.depth_raw, fs.depth_encoding)
            np.testing.assert_array_equal(rast.mask, valid)
            step = (fs.depth_encoding.far - fs.depth_encoding.near) / fs.depth_encoding.max_value
            assert np.abs(rast.depth[valid] - z[valid]).max() <= step / 2 + 1e-5


def test_orbit_cameras_are_held_out(vset):
    root, _ = vset
    cams = load_orbit_cameras(root / "crate" / "rig" / "gt" / "orbit.json")
    assert len(cams) == 8
    rig_dirs = np.array([d for d, _ in RIG_LAYOUT.values()])
    for cam in cams:
        d = cam.center / np.linalg.norm(cam.center)
        assert math.degrees(math.acos(np.clip((rig_dirs @ d).max(), -1, 1))) > 15.0
        assert cam.width == RES
    meta = json.loads((root / "manifest.json").read_text())
    assert meta["resolution"] == RES


def _bench_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "validation.py"
    spec = importlib.util.spec_from_file_location("bench_validation", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_turns_a_failure_into_an_error_row(tmp_path):
    bench = _bench_module()
    row = bench.run_row("ghost", "rig", tmp_path / "no-such-bundle", tmp_path / "out", "fast", 1000, False)
    assert row["object"] == "ghost"
    assert "BUNDLE_NOT_FOUND" in row["error"]
    good = {"object": "crate", "variant": "posed", "f_score": 0.5, "components": 3, "enc_far": "2.500"}
    table = bench.format_table([good, row])
    lines = table.splitlines()
    assert len(lines) == 4
    assert "| crate | posed | 0.500 |" in lines[2]
    assert "ERROR" in lines[3] and "ghost" in lines[3]


def test_variants_of_an_existing_bundle(vset, tmp_path):
    from pipeline.validation_set import ENCODED_VARIANTS, write_variants_of_bundle

    root, _ = vset
    src = root / "crate" / "posed"
    enc = ENCODED_VARIANTS[0]
    entry = write_variants_of_bundle(src, tmp_path / "crate", encoding=enc, orbit_resolution=32)
    given = load_bundle(src)
    rig = load_bundle(tmp_path / "crate" / "rig")
    encoded = load_bundle(tmp_path / "crate" / "encoded")
    assert not rig.cameras_given and encoded.depth_encoding == enc and encoded.depth_max_value == 65535.0
    q = (enc.far - enc.near) / enc.max_value  # one 16-bit step: the 8-bit values are re-encoded, not re-rendered
    for g, r, e in zip(given.views, rig.views, encoded.views, strict=True):
        np.testing.assert_array_equal(g.depth_raw, r.depth_raw)
        zg, vg = decode_depth(g.depth_raw, DEFAULT_DEPTH_ENCODING)
        ze, ve = decode_depth(e.depth_raw, enc)
        np.testing.assert_array_equal(vg, ve)
        kept = vg & (g.depth_raw < DEFAULT_DEPTH_ENCODING.max_value)
        assert np.abs(zg[kept] - ze[kept]).max() <= q
        # pixels the source clips stay clipped
        np.testing.assert_array_equal(g.depth_raw[vg] >= 255, e.depth_raw[ve] >= enc.max_value)
    assert len(load_orbit_cameras(tmp_path / "crate" / "posed" / "gt" / "orbit.json")) == 8
    assert (tmp_path / "crate" / "encoded" / "gt" / "mesh.glb").is_file()
    assert set(entry["variants"]) == set(VARIANTS)


def test_variants_refuse_a_bundle_off_the_default_rig(tmp_path):
    import shutil

    from pipeline.synthetic import write_bundle
    from pipeline.validation_set import write_variants_of_bundle

    src = write_bundle(tmp_path / "b", "sphere", resolution=32, with_transforms=True, fov_x_deg=50.0)
    (src / "gt").mkdir()
    with pytest.raises(ValueError, match="default rig"):
        write_variants_of_bundle(src, tmp_path / "out")
    shutil.rmtree(tmp_path / "b")
