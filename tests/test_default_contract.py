"""The main path: six views + depth and no camera file, read by the documented default contract.

A bundle rendered exactly as docs/input-format.md describes must reconstruct as well without
transforms.json as with it; depth whose encoding is off by a few percent must still give a
close surface; data no encoding or rig explains must say so with a warning code.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.camera import RIG_VIEW_NAMES, default_rig
from pipeline.config import DepthEncoding
from pipeline.metrics import geometry_metrics
from pipeline.reconstruct import reconstruct_bundle
from pipeline.synthetic import make_shape, png_bytes, render_bundle_views, transforms_json

SIZE = 160


def write_rig_bundle(out, shape: str, *, enc: DepthEncoding = DepthEncoding(), with_transforms: bool = False):
    """Six views of ``shape`` at the default rig, depth in ``enc`` (stated only in transforms.json, if any)."""
    mesh = make_shape(shape)
    cams = default_rig(SIZE, SIZE)
    for name, (rgb, depth) in render_bundle_views(mesh, cams, enc=enc).items():
        for folder, img in (("multi_views", rgb), ("depth_renders", depth)):
            (out / folder).mkdir(parents=True, exist_ok=True)
            (out / folder / f"{name}.png").write_bytes(png_bytes(img))
    if with_transforms:
        (out / "transforms.json").write_text(json.dumps(transforms_json(cams, 60.0)))
    return out, mesh


def fscore(result_dir, mesh) -> float:
    import trimesh

    pred = trimesh.load(result_dir / "mesh.obj", force="mesh", process=False)
    return geometry_metrics(pred.vertices, pred.faces, mesh.vertices, mesh.faces)["f_score"]


@pytest.mark.parametrize("shape", ["sphere", "box"])
def test_without_transforms_matches_with(tmp_path, shape):
    scores = {}
    for with_t in (True, False):
        b, mesh = write_rig_bundle(tmp_path / f"b{with_t}", shape, with_transforms=with_t)
        res = reconstruct_bundle(b, tmp_path / f"o{with_t}", preset="fast", evaluate=False, previews=False)
        scores[with_t] = fscore(tmp_path / f"o{with_t}", mesh)
        if not with_t:
            assert res["depth_encoding"]["choice"] == "prior", res["depth_encoding"]["candidates"]
            assert not any(w.startswith(("DEPTH_ENCODING_UNCERTAIN", "CAMERAS_UNCERTAIN")) for w in res["warnings"])
    assert scores[False] >= 0.98 and abs(scores[True] - scores[False]) <= 0.01, scores


def test_encoding_off_by_a_few_percent(tmp_path):
    # The depth was written with far = 2.5 * 1.04, the bundle states nothing: the default is 4 % off
    # (0.08 units at the object, 8 % of its size), which without a correction gives F well below 0.5.
    b, mesh = write_rig_bundle(tmp_path / "b", "sphere", enc=DepthEncoding(far=2.5 * 1.04))
    res = reconstruct_bundle(b, tmp_path / "o", preset="fast", evaluate=False, previews=False)
    assert res["depth_encoding"]["choice"] != "prior"
    assert fscore(tmp_path / "o", mesh) >= 0.95


def test_views_of_different_objects_are_flagged(tmp_path):
    # Each view shows another object: no rig and no encoding explains them.
    mesh_a, mesh_b = make_shape("capsule"), make_shape("torus")
    cams = default_rig(SIZE, SIZE)
    va, vb = render_bundle_views(mesh_a, cams), render_bundle_views(mesh_b, cams)
    for i, name in enumerate(RIG_VIEW_NAMES):
        rgb, depth = (va if i % 2 else vb)[name]
        for folder, img in (("multi_views", rgb), ("depth_renders", depth)):
            (tmp_path / "b" / folder).mkdir(parents=True, exist_ok=True)
            (tmp_path / "b" / folder / f"{name}.png").write_bytes(png_bytes(img))
    from pipeline.bundle import load_bundle
    from pipeline.config import get_preset
    from pipeline.prepare import prepare_frames

    frames = prepare_frames(load_bundle(tmp_path / "b"), get_preset("fast"))
    assert any(w.startswith("CAMERAS_UNCERTAIN") for w in frames.warnings), frames.camera_estimate


def test_stated_encoding_without_transforms(tmp_path):
    enc = DepthEncoding(near=1.0, far=3.0, max_value=65535.0)
    b, _ = write_rig_bundle(tmp_path / "b", "capsule", enc=enc)
    # write_rig_bundle's PNGs are 8-bit: write 16-bit ones for this encoding
    mesh = make_shape("capsule")
    cams = default_rig(SIZE, SIZE)
    from pipeline.depth import encode_depth
    from pipeline.render import make_rasterizer

    r = make_rasterizer(mesh.vertices, mesh.faces, backend="embree")
    for name in RIG_VIEW_NAMES:
        rast = r.rasterize(cams[name])
        (b / "depth_renders" / f"{name}.png").write_bytes(
            png_bytes(encode_depth(rast.depth, rast.mask, enc, dtype=np.uint16))
        )
    (b / "depth_encoding.json").write_text(json.dumps(enc.to_dict()))
    from pipeline.bundle import load_bundle

    fs = load_bundle(b)
    assert (
        fs.depth_encoding == enc and fs.depth_encoding_source == "depth_encoding.json" and fs.depth_max_value == 65535
    )
