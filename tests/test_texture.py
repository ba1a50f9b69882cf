"""UV atlas and texture baking on synthetic shapes rendered by our own renderer."""

from __future__ import annotations

import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch

from pipeline import texture as texture_mod
from pipeline.camera import RIG_VIEW_NAMES, default_rig
from pipeline.config import TextureConfig
from pipeline.errors import UVAtlasError
from pipeline.frames import PosedFrames, PosedView
from pipeline.mesh import TexturedMesh
from pipeline.metrics import image_metrics
from pipeline.render import make_rasterizer
from pipeline.shading import render_views, shade_rgb
from pipeline.synthetic import make_shape
from pipeline.texture import bake_texture, fill_empty_texels, rasterize_uv
from pipeline.uv_atlas import FAULT_ENV, MAX_ATLAS_FACES, build_uv_atlas

VIEW_SIZE = 256
TEXTURE = TextureConfig(size=512, padding_px=2, xatlas_timeout_s=60.0)
#: Masked PSNR a bake of exact geometry must reach when re-rendered at the input cameras, dB.
MIN_REBAKE_PSNR_DB = 30.0
#: Background of the "no bleeding" fixtures: the checker texture never comes within 80 of it (its blue is >= 80).
GREEN = (0, 255, 0)
#: A texel this close (max abs channel difference) to the background colour counts as bleeding.
BLEED_DISTANCE = 50
#: Focal-length error of the "wrong cameras" fixtures: the object projects ~2 px past its silhouette.
CAMERA_ZOOM = 1.03


def synthetic_frames(
    shape: str, *, background=(255, 255, 255), depth_scale: int = 2, views=RIG_VIEW_NAMES
) -> tuple[PosedFrames, TexturedMesh]:
    """Rig views of a vertex-coloured synthetic shape: photos on ``background``, exact depth and mask at 1/depth_scale."""
    mesh = make_shape(shape)
    cams = default_rig(VIEW_SIZE, VIEW_SIZE, names=tuple(views))
    r = make_rasterizer(mesh.vertices, mesh.faces, backend="embree")
    views = []
    for name, cam in cams.items():
        rgb = shade_rgb(mesh, r.rasterize(cam), background=background)
        dcam = cam.scaled(VIEW_SIZE // depth_scale, VIEW_SIZE // depth_scale)
        dr = r.rasterize(dcam)
        views.append(PosedView(name=name, rgb=rgb, camera=cam, depth=dr.depth, mask=dr.mask, depth_camera=dcam))
    return PosedFrames(views=views), mesh


def background_like(texture: np.ndarray) -> np.ndarray:
    """(T, T) bool: texels within BLEED_DISTANCE of the GREEN background."""
    return np.abs(texture.astype(np.int16) - np.array(GREEN, np.int16)).max(-1) < BLEED_DISTANCE


def with_zoomed_cameras(frames: PosedFrames, zoom: float) -> PosedFrames:
    """The same photos, depth and masks, with every camera's focal length scaled by ``zoom`` (a camera error)."""
    views = []
    for view in frames.views:
        K = view.camera.K.copy()
        K[:2, :2] *= zoom
        cam = replace(view.camera, K=K)
        views.append(
            replace(view, camera=cam, depth_camera=cam.scaled(view.depth_camera.width, view.depth_camera.height))
        )
    return PosedFrames(views=views)


def masked_psnr(baked, frames: PosedFrames) -> list[float]:
    rendered = render_views(baked, frames.cameras, backend="embree")
    gt = make_rasterizer(baked.vertices, baked.faces, backend="embree")
    out = []
    for view, ren in zip(frames.views, rendered, strict=True):
        ref_mask = gt.rasterize(view.camera).mask
        out.append(image_metrics(ren["rgb"], ren["mask"], view.rgb, ref_mask)["psnr"])
    return out


# ---------------------------------------------------------------- uv atlas


def test_uv_atlas_maps_every_face_into_the_unit_square():
    mesh = make_shape("torus")
    v, f, uv, vmap = build_uv_atlas(mesh.vertices, mesh.faces, resolution=512, padding_px=2, timeout_s=60)
    assert v.dtype == np.float32 and f.dtype == np.int32 and uv.dtype == np.float32 and vmap.dtype == np.int64
    assert f.shape == mesh.faces.shape
    assert len(v) == len(uv) == len(vmap) >= len(mesh.vertices)
    # Same faces, same order, same winding: only seam vertices are duplicated.
    np.testing.assert_array_equal(vmap[f], mesh.faces)
    np.testing.assert_array_equal(v, mesh.vertices[vmap])
    assert uv.min() >= 0.0 and uv.max() <= 1.0
    # Charts do not overlap: rasterised texels match the summed UV area (within edge effects).
    raster = rasterize_uv(torch.as_tensor(uv), torch.as_tensor(f, dtype=torch.int64), 512)
    t = uv[f] * 512
    e1, e2 = t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]
    area = 0.5 * np.abs(e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]).sum()
    assert abs(int(raster.covered.sum()) - area) < 0.05 * area


@pytest.mark.parametrize("fault", ["segfault", "exit"])
def test_uv_atlas_child_crash_becomes_uv_atlas_error(monkeypatch, fault):
    monkeypatch.setenv(FAULT_ENV, fault)
    mesh = make_shape("box")
    with pytest.raises(UVAtlasError) as info:
        build_uv_atlas(mesh.vertices, mesh.faces, resolution=256, padding_px=2, timeout_s=60)
    assert info.value.code == "UV_ATLAS_FAILED"
    assert info.value.details["returncode"] != 0
    assert pickle.loads(pickle.dumps(info.value)).code == "UV_ATLAS_FAILED"


def test_uv_atlas_timeout_becomes_uv_atlas_error(monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "hang")
    mesh = make_shape("box")
    with pytest.raises(UVAtlasError, match="did not finish"):
        build_uv_atlas(mesh.vertices, mesh.faces, resolution=256, padding_px=2, timeout_s=3)


def test_uv_atlas_rejects_bad_and_oversized_input():
    v = np.zeros((3, 3), np.float32)
    with pytest.raises(UVAtlasError, match="out of range"):
        build_uv_atlas(v, np.array([[0, 1, 7]]), resolution=64, padding_px=1, timeout_s=10)
    with pytest.raises(UVAtlasError, match="at most"):
        build_uv_atlas(v, np.zeros((MAX_ATLAS_FACES + 1, 3), np.int32), resolution=64, padding_px=1, timeout_s=10)
    with pytest.raises(UVAtlasError, match="no faces"):
        build_uv_atlas(v, np.zeros((0, 3), np.int32), resolution=64, padding_px=1, timeout_s=10)


# ---------------------------------------------------------------- baking


@pytest.mark.parametrize("shape", ["box", "torus"])
def test_bake_reproduces_the_input_views(shape):
    frames, mesh = synthetic_frames(shape)
    baked = bake_texture(mesh.vertices, mesh.faces, frames, TEXTURE, backend="embree")
    assert baked.texture.shape == (TEXTURE.size, TEXTURE.size, 3) and baked.texture.dtype == np.uint8
    assert baked.faces.shape == mesh.faces.shape
    psnr = masked_psnr(baked, frames)
    assert min(psnr) > MIN_REBAKE_PSNR_DB, psnr


@pytest.mark.parametrize("views", [("front",), RIG_VIEW_NAMES])
def test_bake_never_samples_the_background(views):
    # Green background, and cameras slightly off so that the geometry projects past the
    # photographed silhouette, as with estimated cameras. With one view, nothing dilutes a bad sample.
    frames, mesh = synthetic_frames("capsule", background=GREEN, views=views)
    frames = with_zoomed_cameras(frames, CAMERA_ZOOM)
    baked = bake_texture(mesh.vertices, mesh.faces, frames, TEXTURE, backend="embree")
    bleeding = background_like(baked.texture)
    assert not bleeding.any(), f"{int(bleeding.sum())} texels took the background colour"


def test_unseen_texels_are_filled_from_the_surface_not_the_background():
    # Only the front view: the back of the shape is seen by no camera.
    frames, mesh = synthetic_frames("sphere", background=GREEN, views=("front",))
    baked = bake_texture(mesh.vertices, mesh.faces, frames, TEXTURE, backend="embree")
    assert not background_like(baked.texture).any()
    # The unseen back gets colours of the object, not black.
    back = synthetic_frames("sphere", views=("back",))[0].views[0]
    ren = render_views(baked, [back.camera], backend="embree")[0]
    assert ren["rgb"][ren["mask"]].mean() > 40


def test_bake_reports_progress_in_order():
    frames, mesh = synthetic_frames("box")
    seen = []
    bake_texture(mesh.vertices, mesh.faces, frames, replace(TEXTURE, size=256), progress=lambda s, f: seen.append(f))
    assert seen[0] == 0.0 and seen[-1] == 1.0 and seen == sorted(seen)


def test_fill_empty_texels_uses_nearest_valid_colour():
    image = torch.zeros((8, 8, 3))
    valid = torch.zeros((8, 8), dtype=torch.bool)
    image[1, 1] = torch.tensor([10.0, 20.0, 30.0])
    image[6, 6] = torch.tensor([200.0, 100.0, 50.0])
    valid[1, 1] = valid[6, 6] = True
    out = fill_empty_texels(image, valid)
    assert torch.equal(out[0, 0], image[1, 1]) and torch.equal(out[7, 7], image[6, 6])
    assert torch.equal(out[1, 1], image[1, 1])


def test_background_test_fails_without_the_mask_guard(monkeypatch):
    # With the mask guard disabled (all weights 1) the bleeding test above must fail: proves it can.
    monkeypatch.setattr(texture_mod, "_mask_edge_weight", lambda mask, device: torch.ones(mask.shape, device=device))
    frames, mesh = synthetic_frames("capsule", background=GREEN, views=("front",))
    frames = with_zoomed_cameras(frames, CAMERA_ZOOM)
    baked = bake_texture(mesh.vertices, mesh.faces, frames, TEXTURE, backend="embree")
    assert background_like(baked.texture).sum() > 10
