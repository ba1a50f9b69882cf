"""Differentiable rendering: forward agreement with the plain renderer, gradients against finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from pipeline.camera import Camera, default_rig
from pipeline.diffrender import (
    CpuDiffRenderer,
    make_diff_renderer,
    sample_at_views,
    sample_texture_torch,
    silhouette_loss,
)
from pipeline.masks import signed_distance_px
from pipeline.mesh import TexturedMesh
from pipeline.render import cuda_available, make_rasterizer
from pipeline.shading import sample_texture, shade_rgb, shade_rgb_antialiased, subpixel_offsets
from pipeline.synthetic import checker_texture, make_shape


def textured(shape: str = "box", texture_size: int = 64) -> TexturedMesh:
    """A synthetic shape with planar UVs (x, y mapped into [0.1, 0.9]) and a checker texture."""
    m = make_shape(shape)
    v = m.vertices.astype(np.float64)
    lo, hi = v.min(0), v.max(0)
    uvs = 0.1 + 0.8 * (v[:, :2] - lo[:2]) / (hi[:2] - lo[:2])
    return TexturedMesh(m.vertices, m.faces, uvs.astype(np.float32), checker_texture(texture_size))


def test_texture_lookup_matches_numpy_sampler():
    rng = np.random.default_rng(0)
    tex = rng.uniform(0, 1, (7, 5, 3))
    uv = rng.uniform(-0.2, 1.2, (200, 2))
    ref = sample_texture(tex.astype(np.float32), uv)
    got = sample_texture_torch(torch.tensor(tex), torch.tensor(uv)).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_cpu_render_matches_plain_renderer():
    mesh = textured("box")
    cams = list(default_rig(64, 64).values())
    r = make_rasterizer(mesh.vertices, mesh.faces, backend="embree")
    dr = make_diff_renderer(mesh.faces, mesh.uvs, cams, backend="embree")
    out = dr.render(torch.tensor(mesh.vertices, dtype=torch.float64), torch.tensor(mesh.texture / 255.0))
    for i, cam in enumerate(cams):
        rast = r.rasterize(cam)
        np.testing.assert_array_equal(out.mask[i].numpy(), rast.mask)
        ref = shade_rgb(mesh, rast).astype(np.float64) / 255.0
        # shade_rgb rounds to uint8; float32 embree barycentrics move UVs by ~1e-7
        np.testing.assert_allclose(out.rgb[i].numpy(), ref, atol=0.6 / 255 + 1e-4)
        np.testing.assert_allclose(out.depth[i].numpy(), rast.depth, atol=1e-5)


def _shifted(cam: Camera, dx: float, dy: float) -> Camera:
    """``cam`` whose pixel centres sit where ``cam`` has (centre + (dx, dy))."""
    K = cam.K.copy()
    K[0, 2] -= dx
    K[1, 2] -= dy
    return Camera(K=K, cam_to_world=cam.cam_to_world, width=cam.width, height=cam.height, name=cam.name)


def _interior(mask: np.ndarray, px: int = 2) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_erosion(mask, iterations=px)


@pytest.mark.parametrize("offset", [(0.25, -0.25), (-0.4, 0.3)])
def test_cpu_sample_offset_samples_where_a_shifted_camera_samples(offset):
    """Offset samples are taken in the face that covers the pixel centre: where the shifted
    camera's pixel centre lands in that face too, both give the same colour and depth (outline
    pixels keep their centre sample)."""
    mesh = textured("sphere")
    cams = list(default_rig(128, 128).values())
    dr = make_diff_renderer(mesh.faces, mesh.uvs, cams, backend="embree")
    out = dr.render(
        torch.tensor(mesh.vertices, dtype=torch.float64), torch.tensor(mesh.texture / 255.0), sample_offsets=(offset,)
    )
    r = make_rasterizer(mesh.vertices, mesh.faces, backend="embree")
    vis = {k: dr._vis[k].numpy() for k in ("view", "pixel", "face", "inner")}
    for i, cam in enumerate(cams):
        centre_face = np.full(cam.width * cam.height, -1)
        sel = vis["view"] == i
        centre_face[vis["pixel"][sel]] = np.where(vis["inner"][sel], vis["face"][sel], -2)
        rast = r.rasterize(_shifted(cam, *offset))
        same = (rast.tri_id.reshape(-1) == centre_face).reshape(rast.mask.shape) & rast.mask
        assert same.sum() > 200
        ref = shade_rgb(mesh, rast).astype(np.float64) / 255.0
        # shade_rgb rounds to uint8; float32 embree barycentrics move UVs by ~1e-7
        np.testing.assert_allclose(out.rgb[i].numpy()[same], ref[same], atol=0.6 / 255 + 1e-4)
        np.testing.assert_allclose(out.depth[i].numpy()[same], rast.depth[same], atol=1e-5)


def test_cpu_supersampled_render_is_what_the_quality_report_renders():
    """With the report's 2 x 2 sample offsets, a texture finer than the pixels renders as the report
    renders it (the mean over each pixel's footprint), which pixel-centre samples do not."""
    rng = np.random.default_rng(3)
    sphere = make_shape("sphere")
    v = sphere.vertices
    lo, hi = v.min(0), v.max(0)
    # About three texels per pixel and 0.003 UV units per pixel, like the presets' textures
    # (the report's footprint filter treats a UV step over 0.01 per pixel as a chart seam).
    uvs = (0.45 + 0.1 * (v[:, :2] - lo[:2]) / (hi[:2] - lo[:2])).astype(np.float32)
    mesh = TexturedMesh(v, sphere.faces, uvs, rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8))
    cams = list(default_rig(128, 128).values())[:2]
    dr = make_diff_renderer(mesh.faces, mesh.uvs, cams, backend="embree")
    verts, tex = torch.tensor(mesh.vertices, dtype=torch.float64), torch.tensor(mesh.texture / 255.0)
    centre = dr.render(verts, tex)
    mean = dr.render(verts, tex, sample_offsets=tuple(subpixel_offsets(2)))
    r = make_rasterizer(mesh.vertices, mesh.faces, backend="embree")
    for i, cam in enumerate(cams):
        report, rast = shade_rgb_antialiased(mesh, r, cam, samples=2)
        inside = _interior(rast.mask)
        ref = report.astype(np.float64)[inside] / 255.0
        err_mean = np.abs(mean.rgb[i].numpy()[inside] - ref).mean()
        err_centre = np.abs(centre.rgb[i].numpy()[inside] - ref).mean()
        assert err_mean < 1.0 / 255
        assert err_mean < 0.05 * err_centre


def test_subpixel_offsets_are_the_reports_sample_positions():
    assert subpixel_offsets(1) == [(0.0, 0.0)]
    assert sorted(subpixel_offsets(2)) == sorted([(-0.25, -0.25), (0.25, -0.25), (-0.25, 0.25), (0.25, 0.25)])


@pytest.mark.parametrize("scale", [1.01, 2.0, 0.5])
def test_cpu_visibility_refresh_matches_a_full_cast(scale):
    """Refreshes cast only inside the last silhouette's box; a mesh that grows past it is cast whole."""
    mesh = textured("sphere")
    cams = list(default_rig(96, 96).values())
    dr = CpuDiffRenderer(mesh.faces, mesh.uvs, cams)
    dr.update_visibility(mesh.vertices)
    moved = (mesh.vertices * scale).astype(np.float32)
    dr.update_visibility(moved)
    r = make_rasterizer(moved, mesh.faces, backend="embree")
    for i, cam in enumerate(cams):
        rast = r.rasterize(cam)
        np.testing.assert_array_equal(dr._vis["mask"][i].numpy(), rast.mask)
        sel = dr._vis["view"].numpy() == i
        tri = np.full(cam.width * cam.height, -1)
        tri[dr._vis["pixel"].numpy()[sel]] = dr._vis["face"].numpy()[sel]
        np.testing.assert_array_equal(tri, rast.tri_id.reshape(-1))


def test_signed_distance_of_a_square():
    m = np.zeros((20, 20), bool)
    m[5:15, 5:15] = True
    sdf = signed_distance_px(m)
    assert sdf[10, 10] < -4 and sdf[0, 0] > 4
    assert sdf[10, 5] == pytest.approx(-0.5) and sdf[10, 4] == pytest.approx(0.5)
    # The outline (half-way between pixel centres 4 and 5, i.e. x = 5.0) reads as zero.
    d = sample_at_views(torch.tensor(sdf[None]), torch.zeros(1, dtype=torch.long), torch.tensor([[5.0, 10.5]]))
    assert abs(float(d[0])) < 1e-6


def _tiny_scene():
    sphere = trimesh.creation.icosphere(subdivisions=1, radius=0.5)
    v = np.asarray(sphere.vertices) * np.array([1.0, 0.8, 0.9])
    uvs = 0.5 + 0.4 * v[:, :2] / np.abs(v[:, :2]).max()
    rig = default_rig(20, 20, fov_x_deg=40.0)
    cams = [rig["front"], rig["left"]]
    return v, np.asarray(sphere.faces), uvs, cams


@pytest.mark.parametrize("offsets", [((0.0, 0.0),), ((-0.25, -0.25), (0.25, -0.25), (-0.25, 0.25), (0.25, 0.25))])
def test_cpu_gradients_match_finite_differences(offsets):
    v, faces, uvs, cams = _tiny_scene()
    rng = np.random.default_rng(1)
    tex = torch.tensor(rng.uniform(0.2, 0.8, (6, 6, 3)), requires_grad=True)
    verts = torch.tensor(v, requires_grad=True)
    target = np.zeros((2, 20, 20), bool)
    target[:, 6:15, 5:14] = True
    sdf = torch.tensor(np.stack([signed_distance_px(t) for t in target]), dtype=torch.float64)
    r = CpuDiffRenderer(faces, uvs, cams)
    r.update_visibility(v)  # visibility is fixed: the gradient is that of the piecewise-smooth render
    assert r._vis["contour"][0].numel() > 0

    def fn(vv, tt):
        out = r.render(vv, tt, sample_offsets=offsets)
        return out.rgb, out.depth, out.contour_xy, silhouette_loss(out, torch.tensor(target), sdf)

    assert torch.autograd.gradcheck(fn, (verts, tex), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_silhouette_gradient_grows_a_small_mesh():
    v, faces, uvs, cams = _tiny_scene()
    r = CpuDiffRenderer(faces, uvs, cams)
    target = np.zeros((2, 20, 20), bool)
    target[:, 2:18, 2:18] = True  # larger than the sphere's outline
    sdf = torch.tensor(np.stack([signed_distance_px(t) for t in target]), dtype=torch.float64)
    verts = torch.tensor(v, requires_grad=True)
    loss = silhouette_loss(r.render(verts, torch.full((4, 4, 3), 0.5, dtype=torch.float64)), torch.tensor(target), sdf)
    loss.backward()
    radial = (-verts.grad * verts.detach()).sum(-1)  # descent direction . outward
    assert float(radial.sum()) > 0


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU with nvdiffrast")
def test_cuda_render_agrees_with_cpu():
    mesh = textured("sphere")
    cams = list(default_rig(96, 96).values())
    tex = torch.tensor(mesh.texture / 255.0, dtype=torch.float32)
    verts = torch.tensor(mesh.vertices, dtype=torch.float32)
    cpu = make_diff_renderer(mesh.faces, mesh.uvs, cams, backend="embree").render(verts, tex)
    gpu = make_diff_renderer(mesh.faces, mesh.uvs, cams, backend="nvdiffrast").render(verts.cuda(), tex.cuda())
    m_cpu, m_gpu = cpu.mask.numpy(), gpu.mask.cpu().numpy()
    iou = (m_cpu & m_gpu).sum() / (m_cpu | m_gpu).sum()
    assert iou > 0.99
    from scipy import ndimage

    interior = ndimage.binary_erosion(m_cpu & m_gpu, iterations=1, structure=np.ones((1, 3, 3), bool))
    np.testing.assert_allclose(gpu.rgb.cpu().numpy()[interior], cpu.rgb.numpy()[interior], atol=2e-2)
    np.testing.assert_allclose(gpu.depth.cpu().numpy()[interior], cpu.depth.numpy()[interior], atol=1e-3)
    # The report's 2 x 2 samples: the same offsets on both backends.
    offsets = tuple(subpixel_offsets(2))
    cpu4 = make_diff_renderer(mesh.faces, mesh.uvs, cams, backend="embree").render(verts, tex, sample_offsets=offsets)
    gpu4 = make_diff_renderer(mesh.faces, mesh.uvs, cams, backend="nvdiffrast").render(
        verts.cuda(), tex.cuda(), sample_offsets=offsets
    )
    np.testing.assert_allclose(gpu4.rgb.cpu().numpy()[interior], cpu4.rgb.numpy()[interior], atol=2e-2)
    # Gradients reach both vertices and texels through nvdiffrast.
    v = verts.cuda().requires_grad_(True)
    t = tex.cuda().requires_grad_(True)
    out = make_diff_renderer(mesh.faces, mesh.uvs, cams, backend="nvdiffrast").render(v, t)
    (out.rgb.mean() + out.coverage.mean() + out.depth.mean()).backward()
    assert v.grad.abs().sum() > 0 and t.grad.abs().sum() > 0
