"""Hull-bounded TSDF fusion on synthetic shapes, and prepare_frames on synthetic bundles."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import trimesh
from scipy.spatial import cKDTree

from pipeline.bundle import load_bundle
from pipeline.camera import RIG_VIEW_NAMES, default_rig
from pipeline.config import DEFAULT_DEPTH_ENCODING, get_preset
from pipeline.depth import decode_depth, encode_depth
from pipeline.errors import CanceledError
from pipeline.frames import PosedFrames, PosedView
from pipeline.fusion import reconstruct_geometry
from pipeline.mesh_cleanup import face_components, signed_volume
from pipeline.prepare import prepare_frames
from pipeline.render import make_rasterizer
from pipeline.synthetic import make_shape, write_bundle

SIZE = 160


def _frames(shape: str, *, offset=(0.0, 0.0, 0.0)) -> tuple[PosedFrames, object]:
    mesh = make_shape(shape)
    mesh.vertices = mesh.vertices + np.asarray(offset, np.float32)
    r = make_rasterizer(mesh.vertices, mesh.faces, backend="embree")
    views = []
    for n, cam in default_rig(SIZE, SIZE).items():
        rast = r.rasterize(cam)
        raw = encode_depth(rast.depth, rast.mask, DEFAULT_DEPTH_ENCODING).astype(np.float32)  # 8-bit banding
        z, _ = decode_depth(raw, DEFAULT_DEPTH_ENCODING)
        rgb = np.zeros((SIZE, SIZE, 3), np.uint8)
        views.append(PosedView(name=n, rgb=rgb, camera=cam, depth=z * rast.mask, mask=rast.mask, depth_camera=cam))
    return PosedFrames(views=views), mesh


def _cfg(resolution: int = 96):
    cfg = get_preset("fast", device="cpu")
    return dataclasses.replace(cfg, fusion=dataclasses.replace(cfg.fusion, resolution=resolution, target_faces=8000))


def _fscore(v, f, gt_v, gt_f, tau):
    p = trimesh.sample.sample_surface(trimesh.Trimesh(v, f, process=False), 20000, seed=0)[0]
    g = trimesh.sample.sample_surface(trimesh.Trimesh(gt_v, gt_f, process=False), 20000, seed=1)[0]
    prec = (cKDTree(g).query(p)[0] < tau).mean()
    rec = (cKDTree(p).query(g)[0] < tau).mean()
    return 2 * prec * rec / (prec + rec)


def test_fused_sphere_has_the_right_radius_place_and_orientation():
    frames, mesh = _frames("sphere", offset=(0.1, -0.05, 0.0))
    v, f, report = reconstruct_geometry(frames, _cfg())
    assert v.dtype == np.float32 and f.dtype == np.int32
    centre = np.array([0.1, -0.05, 0.0])
    radius = np.linalg.norm(v - centre, axis=1)
    assert abs(np.median(radius) - 0.4) < 0.01
    assert np.abs(radius - 0.4).max() < 0.04
    assert len(np.unique(face_components(f, len(v)))) == 1
    vol = signed_volume(v, f)
    assert vol > 0 and abs(vol - 4 / 3 * np.pi * 0.4**3) / vol < 0.05  # CCW from outside
    assert report["faces"] == len(f) and report["grid"]["shape"]


def test_fused_box_matches_source_mesh():
    frames, mesh = _frames("box")
    v, f, _ = reconstruct_geometry(frames, _cfg(128))
    extent = float((mesh.vertices.max(0) - mesh.vertices.min(0)).max())
    # 160-px views and 8-bit depth (one level is 1.2% of the extent here): tau = 2% of the extent.
    assert _fscore(v, f, mesh.vertices, mesh.faces, 0.02 * extent) > 0.9
    assert len(np.unique(face_components(f, len(v)))) == 1


def test_cancel_raises():
    frames, _ = _frames("sphere")
    with pytest.raises(CanceledError):
        reconstruct_geometry(frames, _cfg(), should_cancel=lambda: True)


def test_prepare_frames_given_and_estimated(tmp_path):
    posed = load_bundle(write_bundle(tmp_path / "a", "box", resolution=128, with_transforms=True))
    fr = prepare_frames(posed, get_preset("fast", device="cpu"))
    assert fr.camera_estimate["method"] == "given" and fr.depth_encoding["method"] == "given"
    assert [v.name for v in fr.views] == list(RIG_VIEW_NAMES)
    rig = load_bundle(write_bundle(tmp_path / "b", "box", resolution=128))
    fr = prepare_frames(rig, get_preset("fast", device="cpu"))
    assert fr.camera_estimate["method"] == "silhouette_carving"
    assert fr.depth_encoding["method"] == "hull_fit"
    v = fr.views[0]
    assert v.depth.shape == v.mask.shape and v.rgb.shape[:2] == (128, 128)
    assert (v.depth[v.mask] > 0).mean() > 0.9


def test_capped_mask_distance_is_exact_within_its_bound():
    from pipeline.fusion import mask_signed_distance

    rng = np.random.default_rng(1)
    masks = np.zeros((2, 120, 100), bool)
    masks[0, 30:60, 20:70] = True
    masks[0, 62:64, 40:42] = rng.random((2, 2)) > 0.5
    masks[1, 0:50, 60:100] = True  # touches the image border
    full = mask_signed_distance(masks, 0.5)
    cap = np.array([12.0, 7.5])
    capped = mask_signed_distance(masks, 0.5, max_distance_px=cap)
    for n in range(2):
        near = np.abs(full[n] + 0.5) < cap[n]
        assert np.array_equal(full[n][near], capped[n][near])
        assert (np.abs(capped[n][~near] + 0.5) >= cap[n]).all()  # beyond the bound: at least the bound
