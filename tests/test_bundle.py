"""Bundle reading and every validation error (docs/input-format.md)."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.bundle import BundleLimits, load_bundle
from pipeline.errors import InvalidInputError, ReconError
from pipeline.synthetic import png_bytes, write_bundle


@pytest.fixture(scope="module")
def rig_bundle(tmp_path_factory) -> Path:
    return write_bundle(tmp_path_factory.mktemp("rig") / "b", "box", resolution=64)


@pytest.fixture(scope="module")
def posed_bundle(tmp_path_factory) -> Path:
    return write_bundle(tmp_path_factory.mktemp("posed") / "b", "sphere", resolution=64, with_transforms=True)


@pytest.fixture
def bundle(rig_bundle, tmp_path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(rig_bundle, dst)
    return dst


def _zip(folder: Path, dst: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, prefix + p.relative_to(folder).as_posix())
    return dst


def _code(src, **kw) -> str:
    with pytest.raises(InvalidInputError) as ei:
        load_bundle(src, **kw)
    assert ei.value.message and "Traceback" not in ei.value.message
    return ei.value.code


def test_reads_six_view_folder(rig_bundle):
    fs = load_bundle(rig_bundle)
    assert fs.names == ["front", "back", "left", "right", "top", "bottom"]
    assert not fs.cameras_given and fs.depth_encoding is None
    v = fs.views[0]
    assert v.rgb.shape == (64, 64, 3) and v.rgb.dtype == np.uint8
    assert v.depth_raw.shape == (64, 64) and (v.depth_raw > 0).any()


def test_reads_zip_with_top_level_folder(rig_bundle, tmp_path):
    fs = load_bundle(_zip(rig_bundle, tmp_path / "b.zip", prefix="my_bundle/"))
    assert len(fs.views) == 6
    fs2 = load_bundle((tmp_path / "b.zip").read_bytes())
    assert np.array_equal(fs.views[2].rgb, fs2.views[2].rgb)


def test_reads_transforms_json(posed_bundle):
    fs = load_bundle(posed_bundle)
    assert fs.cameras_given and fs.depth_encoding is not None
    cam = fs.views[0].camera
    assert cam is not None and abs(cam.fov_x_deg - 60.0) < 1e-6


def test_any_number_of_views_with_transforms(posed_bundle, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(posed_bundle, dst)
    t = json.loads((dst / "transforms.json").read_text())
    t["frames"] = t["frames"][:3]
    (dst / "transforms.json").write_text(json.dumps(t))
    for name in ("top", "bottom", "right"):
        (dst / "multi_views" / f"{name}.png").unlink()
    assert len(load_bundle(dst).views) == 3


def test_alpha_channel_gives_mask(posed_bundle, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(posed_bundle, dst)
    p = dst / "multi_views" / "front.png"
    rgb = np.asarray(Image.open(p))
    alpha = np.zeros(rgb.shape[:2], np.uint8)
    alpha[10:30, 10:30] = 255
    p.write_bytes(png_bytes(np.dstack([rgb, alpha])))
    v = load_bundle(dst).views[0]
    assert v.alpha is not None and v.alpha.sum() == 400


def test_missing_view(bundle):
    (bundle / "multi_views" / "top.png").unlink()
    assert _code(bundle) == "MISSING_VIEW"


def test_unknown_view(bundle):
    shutil.copy(bundle / "multi_views" / "top.png", bundle / "multi_views" / "diagonal.png")
    assert _code(bundle) == "UNKNOWN_VIEW"


def test_extra_depth_for_unknown_view(bundle):
    shutil.copy(bundle / "depth_renders" / "top.png", bundle / "depth_renders" / "side.png")
    assert _code(bundle) == "UNKNOWN_VIEW"


def test_view_without_depth(bundle):
    (bundle / "depth_renders" / "left.png").unlink()
    assert _code(bundle) == "MISSING_DEPTH"


@pytest.mark.parametrize(
    "content",
    [b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "truncated", "gif"],
    ids=["text", "bad-header", "truncated", "gif"],
)
def test_unreadable_images(bundle, content):
    p = bundle / "multi_views" / "right.png"
    if content == "truncated":
        content = p.read_bytes()[: len(p.read_bytes()) // 2]
    elif content == "gif":
        buf = io.BytesIO()
        Image.new("RGB", (64, 64)).save(buf, format="GIF")
        content = buf.getvalue()
    p.write_bytes(content)
    assert _code(bundle) == "INVALID_IMAGE"


def test_inconsistent_resolution(bundle):
    p = bundle / "multi_views" / "back.png"
    p.write_bytes(png_bytes(np.zeros((32, 48, 3), np.uint8)))
    assert _code(bundle) == "RESOLUTION_MISMATCH"


def test_depth_aspect_mismatch(bundle):
    for n in ("front", "back", "left", "right", "top", "bottom"):
        p = bundle / "depth_renders" / f"{n}.png"
        p.write_bytes(png_bytes(np.full((32, 64), 100, np.uint8)))
    assert _code(bundle) == "RESOLUTION_MISMATCH"


def test_file_over_limit(bundle):
    assert _code(bundle, limits=BundleLimits(max_file_bytes=200)) == "INPUT_TOO_LARGE"


def test_pixels_over_limit(bundle):
    assert _code(bundle, limits=BundleLimits(max_image_pixels=32 * 32)) == "INPUT_TOO_LARGE"


def test_all_background_depth(bundle):
    (bundle / "depth_renders" / "front.png").write_bytes(png_bytes(np.zeros((64, 64), np.uint8)))
    assert _code(bundle) == "EMPTY_DEPTH"


def test_zip_path_traversal(bundle, tmp_path):
    z = _zip(bundle, tmp_path / "b.zip")
    with zipfile.ZipFile(z, "a") as zf:
        zf.writestr("../../etc/evil.png", b"x")
    assert _code(z) == "UNSAFE_ARCHIVE"


def test_zip_member_with_an_unreadable_compression_method(bundle, tmp_path):
    from hostile_inputs import corrupt_member

    data = corrupt_member(_zip(bundle, tmp_path / "b.zip").read_bytes(), "multi_views/left.png", "method")
    with pytest.raises(InvalidInputError) as ei:
        load_bundle(data)
    assert ei.value.code == "INVALID_ARCHIVE"
    assert ei.value.details == {"file": "multi_views/left.png", "compression_method": 98}


def test_zip_absolute_path(bundle, tmp_path):
    z = _zip(bundle, tmp_path / "b.zip")
    with zipfile.ZipFile(z, "a") as zf:
        zf.writestr("/abs/evil.png", b"x")
    assert _code(z) == "UNSAFE_ARCHIVE"


def test_zip_bomb_ratio(bundle, tmp_path):
    z = _zip(bundle, tmp_path / "b.zip")
    with zipfile.ZipFile(z, "a", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("padding.bin", b"\0" * (8 * 1024 * 1024))
    assert _code(z) == "UNSAFE_ARCHIVE"


def test_not_a_zip(tmp_path):
    p = tmp_path / "bundle.zip"
    p.write_bytes(b"PK\x03\x04 definitely not a zip")
    assert _code(p) == "INVALID_ARCHIVE"


def test_missing_bundle(tmp_path):
    assert _code(tmp_path / "nope") == "BUNDLE_NOT_FOUND"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda t: "{not json",
        lambda t: {**t, "frames": []},
        lambda t: {k: v for k, v in t.items() if k != "camera_angle_x"},
        lambda t: {**t, "camera_angle_x": "wide"},
        lambda t: {**t, "frames": [{**t["frames"][0], "transform_matrix": [[1, 0], [0, 1]]}] + t["frames"][1:]},
        lambda t: {**t, "frames": [{**t["frames"][0], "transform_matrix": (2 * np.eye(4)).tolist()}] + t["frames"][1:]},
        lambda t: {**t, "frames": [{"transform_matrix": np.eye(4).tolist()}] + t["frames"][1:]},
        lambda t: {**t, "depth_encoding": {"kind": "disparity"}},
        lambda t: {**t, "depth_encoding": {"near": 3.0, "far": 1.0}},
        lambda t: [1, 2, 3],
    ],
    ids=[
        "not-json",
        "no-frames",
        "no-intrinsics",
        "bad-fov",
        "bad-shape",
        "not-rigid",
        "no-file-path",
        "bad-kind",
        "near-far",
        "not-object",
    ],
)
def test_malformed_transforms(posed_bundle, tmp_path, mutate):
    dst = tmp_path / "b"
    shutil.copytree(posed_bundle, dst)
    t = json.loads((dst / "transforms.json").read_text())
    new = mutate(t)
    (dst / "transforms.json").write_text(new if isinstance(new, str) else json.dumps(new))
    assert _code(dst) == "INVALID_TRANSFORMS"


def test_transforms_frame_file_missing(posed_bundle, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(posed_bundle, dst)
    (dst / "multi_views" / "left.png").unlink()
    assert _code(dst) == "MISSING_VIEW"


def test_errors_survive_pickling():
    e = InvalidInputError("bad", code="MISSING_VIEW", details={"missing": ["top"]})
    e2 = pickle.loads(pickle.dumps(e))
    assert isinstance(e2, ReconError) and e2.code == "MISSING_VIEW" and e2.details == {"missing": ["top"]}
