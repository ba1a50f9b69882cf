"""The CPU rasterizer casts only the pixels near the mesh's projection: the result is the whole frame's, bit for bit."""

from __future__ import annotations

import numpy as np

from pipeline.camera import pixel_rays, ray_z_scale
from pipeline.previews import bounding_sphere, preview_camera
from pipeline.render import EmbreeRasterizer, Rasterization
from pipeline.shading import edge_pixels
from pipeline.synthetic import make_shape


def _whole_frame(r: EmbreeRasterizer, cam) -> Rasterization:
    """Every pixel centre cast (what the rasterizer did before it skipped the background)."""
    tri, bary, t = r.cast(*pixel_rays(cam))
    z = t * ray_z_scale(cam).astype(np.float32)
    H, W = cam.height, cam.width
    return Rasterization(tri.reshape(H, W), bary.reshape(H, W, 3), z.reshape(H, W).astype(np.float32))


def _cameras(mesh, n=5):
    center, radius = bounding_sphere(mesh.vertices)
    # From far (object small in the frame) to near (object cut by the frame's edges).
    return [
        preview_camera(i, n, resolution=40 + 9 * i, center=center, radius=radius, distance=radius * d)
        for i, d in enumerate((6.0, 3.0, 2.0, 1.4, 1.1))
    ]


def test_boxed_rasterization_equals_the_whole_frame():
    mesh = make_shape("box")
    r = EmbreeRasterizer(mesh.vertices, mesh.faces)
    cams = _cameras(mesh)
    boxes = [r.pixel_box(cam) for cam in cams]
    assert (boxes[0][1] - boxes[0][0]) * (boxes[0][3] - boxes[0][2]) < 0.5 * cams[0].width * cams[0].height
    for cam, many in zip(cams, r.rasterize_many(cams), strict=True):
        want = _whole_frame(r, cam)
        for got in (r.rasterize(cam), many):
            assert want.mask.any()
            for a, b in ((got.tri_id, want.tri_id), (got.bary, want.bary), (got.depth, want.depth)):
                assert a.dtype == b.dtype and np.array_equal(a, b)


def test_a_camera_inside_the_mesh_casts_the_whole_frame():
    mesh = make_shape("box")
    r = EmbreeRasterizer(mesh.vertices, mesh.faces)
    center, radius = bounding_sphere(mesh.vertices)
    cam = preview_camera(0, 4, resolution=32, center=center, radius=radius, distance=1e-3)
    assert r.pixel_box(cam) == (0, 32, 0, 32)
    got, want = r.rasterize(cam), _whole_frame(r, cam)
    assert np.array_equal(got.tri_id, want.tri_id) and np.array_equal(got.depth, want.depth)


def test_edge_pixels_on_the_box_equal_the_whole_frame():
    from scipy import ndimage

    mesh = make_shape("box")
    r = EmbreeRasterizer(mesh.vertices, mesh.faces)
    n_edges = 0
    for cam in _cameras(mesh):
        rast = r.rasterize(cam)
        m, d = rast.mask, np.where(rast.mask, rast.depth, 0.0)
        want = ndimage.maximum_filter(m, size=3) != ndimage.minimum_filter(m, size=3)
        dmin = ndimage.minimum_filter(np.where(m, d, np.inf), size=3)
        want |= m & (ndimage.maximum_filter(d, size=3) - dmin > 0.02 * np.maximum(d, 1e-6))
        assert np.array_equal(edge_pixels(rast), want)
        n_edges += int(want.sum())
    assert n_edges > 0


def test_interpolation_and_texture_lookups_are_the_written_out_formulas_bit_for_bit():
    # interpolate / interpolate_on_mesh and sample_texture gather by flat index (faster); the values
    # must stay those of the plain formulas, which every preview and metric was pinned to.
    from pipeline.shading import sample_texture

    mesh = make_shape("torus")
    cam = _cameras(mesh)[2]
    rast = EmbreeRasterizer(mesh.vertices, mesh.faces).rasterize(cam)
    m = rast.mask
    attr = np.random.default_rng(0).random((len(mesh.vertices), 2)).astype(np.float32)
    f, b = mesh.faces[rast.tri_id[m]], rast.bary[m]
    want = attr[f[:, 0]] * b[:, :1] + attr[f[:, 1]] * b[:, 1:2] + attr[f[:, 2]] * b[:, 2:3]
    got = rast.interpolate(attr, mesh.faces)
    assert got.shape == (*m.shape, 2) and not got[~m].any()
    assert np.array_equal(got[m], want) and np.array_equal(rast.interpolate_on_mesh(attr, mesh.faces), want)

    texture = np.random.default_rng(1).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    uv = np.concatenate([want, [[0.0, 0.0], [1.0, 1.0], [0.999, 0.001]]]).astype(np.float32)
    x = np.clip(uv[:, 0] * 53 - 0.5, 0, 52)
    y = np.clip((1.0 - uv[:, 1]) * 37 - 0.5, 0, 36)
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    x1, y1 = np.minimum(x0 + 1, 52), np.minimum(y0 + 1, 36)
    fx, fy = (x - x0)[:, None].astype(np.float32), (y - y0)[:, None].astype(np.float32)
    t = lambda yy, xx: texture[yy, xx].astype(np.float32)  # noqa: E731
    top = t(y0, x0) * (1 - fx) + t(y0, x1) * fx
    bot = t(y1, x0) * (1 - fx) + t(y1, x1) * fx
    assert np.array_equal(sample_texture(texture, uv), top * (1 - fy) + bot * fy)
