"""Differentiable rendering: forward agreement with the plain renderer, gradients against finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from pipeline.camera import default_rig
from pipeline.diffrender import (
    CpuDiffRenderer,
    make_diff_renderer,
    sample_images,
    sample_texture_torch,
    silhouette_loss,
)
from pipeline.masks import signed_distance_px
from pipeline.mesh import TexturedMesh
from pipeline.render import cuda_available, make_rasterizer
from pipeline.shading import sample_texture, shade_rgb
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
    d = sample_images(torch.tensor(sdf[None]), torch.zeros(1, dtype=torch.long), torch.tensor([[5.0, 10.5]]))
    assert abs(float(d[0])) < 1e-6


def _tiny_scene():
    sphere = trimesh.creation.icosphere(subdivisions=1, radius=0.5)
    v = np.asarray(sphere.vertices) * np.array([1.0, 0.8, 0.9])
    uvs = 0.5 + 0.4 * v[:, :2] / np.abs(v[:, :2]).max()
    rig = default_rig(20, 20, fov_x_deg=40.0)
    cams = [rig["front"], rig["left"]]
    return v, np.asarray(sphere.faces), uvs, cams


def test_cpu_gradients_match_finite_differences():
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
        out = r.render(vv, tt)
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
    # Gradients reach both vertices and texels through nvdiffrast.
    v = verts.cuda().requires_grad_(True)
    t = tex.cuda().requires_grad_(True)
    out = make_diff_renderer(mesh.faces, mesh.uvs, cams, backend="nvdiffrast").render(v, t)
    (out.rgb.mean() + out.coverage.mean() + out.depth.mean()).backward()
    assert v.grad.abs().sum() > 0 and t.grad.abs().sum() > 0
