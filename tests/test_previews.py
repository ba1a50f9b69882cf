"""Preview cameras, shaded stills, hidden-line wireframes, the turntable GIF and the contact sheet."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh
from PIL import Image

from pipeline.camera import default_rig, project_points
from pipeline.frames import PosedFrames, PosedView
from pipeline.mesh import TexturedMesh
from pipeline.previews import (
    bounding_sphere,
    contact_tiles,
    corner_normals,
    diff_heatmap,
    fit_distance,
    preview_camera,
    render_preview,
    render_wireframe,
    write_contact_sheet,
    write_previews,
)
from pipeline.render import make_rasterizer
from pipeline.shading import shade_rgb
from pipeline.synthetic import make_shape

HALF = 0.5  # cube half-size


def _cube() -> TexturedMesh:
    box = trimesh.creation.box(extents=(2 * HALF,) * 3)
    colors = np.full((len(box.vertices), 3), 200, np.uint8)
    return TexturedMesh(box.vertices.astype(np.float32), box.faces.astype(np.int32), vertex_colors=colors)


def test_preview_cameras_orbit_and_frame_the_object():
    mesh = make_shape("capsule")
    center, radius = bounding_sphere(mesh.vertices)
    d = fit_distance(mesh.vertices, center, 8)
    cams = [preview_camera(i, 8, resolution=128, center=center, radius=radius, distance=d) for i in range(8)]
    assert np.allclose(cams[0].center - center, d * np.array([0, np.sin(np.radians(20)), np.cos(np.radians(20))]))
    assert cams[2].center[0] > 0 and abs(cams[2].center[2] - center[2]) < 1e-9  # 90 degrees: +X
    for cam in cams:
        assert np.isclose(np.linalg.norm(cam.center - center), d)
        uv, z = project_points(cam.K, cam.world_to_cam, center[None])
        assert np.allclose(uv, 64.0) and z[0] > 0  # looks at the centre
        uv, _ = project_points(cam.K, cam.world_to_cam, mesh.vertices.astype(np.float64))
        assert (uv >= 0).all() and (uv <= 128).all()  # fits
    # The fitted distance is tight: the outermost vertex sits exactly at the margin in some view.
    from pipeline.previews import PREVIEW_MARGIN

    reach = max(
        np.abs(project_points(c.K, c.world_to_cam, mesh.vertices.astype(np.float64))[0] - 64.0).max() / 64.0
        for c in cams
    )
    assert reach == pytest.approx(1.0 / PREVIEW_MARGIN, rel=1e-6)


def test_render_preview_is_shaded_on_white():
    img = render_preview(make_shape("sphere"), 1, resolution=96, supersample=1, backend="embree")
    assert img.shape == (96, 96, 3) and img.dtype == np.uint8
    assert (img[0, 0] == 255).all() and (img[-1, -1] == 255).all()
    fg = (img < 250).any(-1)
    assert fg.mean() > 0.2
    # Headlight: the rim (grazing) is darker than the middle (facing the camera).
    grey = img.astype(float).mean(-1)
    ys, xs = np.nonzero(fg)
    cy, cx = int(ys.mean()), int(xs.mean())
    assert grey[cy - 3 : cy + 4, cx - 3 : cx + 4].mean() > grey[fg].min() + 40


def _seg_dist(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N,) distance from (N, 2) points to the segment a-b."""
    ab = b - a
    t = np.clip(((p - a) @ ab) / max(ab @ ab, 1e-12), 0, 1)
    return np.linalg.norm(p - (a + t[:, None] * ab), axis=1)


def test_wireframe_of_a_cube_draws_visible_edges_only():
    mesh = _cube()
    res = 256
    img = render_wireframe(mesh, 1, n=8, resolution=res, supersample=1, backend="embree")
    center, radius = bounding_sphere(mesh.vertices)
    cam = preview_camera(
        1, 8, resolution=res, center=center, radius=radius, distance=fit_distance(mesh.vertices, center, 8)
    )
    blue = img[..., 2].astype(int) - img[..., 0].astype(int)  # lines are blue, the base is grey

    v = mesh.vertices.astype(np.float64)
    f = mesh.faces.astype(np.int64)
    uv, _ = project_points(cam.K, cam.world_to_cam, v)
    normals = mesh.face_normals().astype(np.float64)
    facing = ((cam.center - v[f].mean(1)) * normals).sum(-1) > 0
    visible_edges = {tuple(sorted((a, b))) for tri in f[facing] for a, b in zip(tri, np.roll(tri, -1), strict=True)}
    all_edges = {tuple(sorted((a, b))) for tri in f for a, b in zip(tri, np.roll(tri, -1), strict=True)}
    hidden_edges = all_edges - visible_edges
    assert hidden_edges, "the view must hide some edges"

    t = np.linspace(0.1, 0.9, 60)[:, None]
    seg_2d = [(uv[a], uv[b]) for a, b in visible_edges]

    def samples(a, b):
        return uv[a] * (1 - t) + uv[b] * t

    hidden_checked = 0
    for a, b in hidden_edges:
        p = samples(a, b)
        clear = np.min([_seg_dist(p, s0, s1) for s0, s1 in seg_2d], axis=0) > 4.0
        for x, y in p[clear]:
            i, j = int(y), int(x)
            assert blue[i - 1 : i + 2, j - 1 : j + 2].max() < 20, f"hidden edge {a}-{b} drawn at {(i, j)}"
            hidden_checked += 1
    assert hidden_checked > 30

    for a, b in visible_edges:
        for x, y in samples(a, b):
            i, j = int(y), int(x)
            # > 20: silhouette edges get only the inner half of the line.
            assert blue[i - 1 : i + 2, j - 1 : j + 2].max() > 20, f"visible edge {a}-{b} missing at {(i, j)}"


def test_diff_heatmap_is_black_where_equal():
    a = np.full((16, 16, 3), 100, np.uint8)
    b = a.copy()
    b[:8] = 255
    m = np.ones((16, 16), bool)
    h = diff_heatmap(a, b, m)
    assert (h[8:] == 0).all() and (h[:8].astype(int).sum(-1) > 300).all()
    assert (diff_heatmap(a, b, np.zeros_like(m)) == 0).all()


def _frames(mesh: TexturedMesh, size: int = 64) -> PosedFrames:
    r = make_rasterizer(mesh.vertices, mesh.faces, backend="embree")
    views = []
    for name, cam in list(default_rig(size, size).items())[:2]:
        rast = r.rasterize(cam)
        views.append(PosedView(name, shade_rgb(mesh, rast), cam, rast.depth, rast.mask, cam))
    return PosedFrames(views=views)


def test_write_previews_writes_every_kind(tmp_path):
    mesh = make_shape("torus")
    frames = _frames(mesh)
    written = write_previews(mesh, tmp_path, frames, n=2, resolution=64, gif_frames=3, backend="embree")
    assert written["textured"] == ["previews/textured_00.png", "previews/textured_01.png"]
    assert written["wireframe"] == ["previews/wireframe_00.png", "previews/wireframe_01.png"]
    assert written["turntable"] == ["previews/turntable.gif"] and written["contact_sheet"] == [
        "previews/contact_sheet.png"
    ]
    for paths in written.values():
        for p in paths:
            assert (tmp_path / p).is_file()
    assert Image.open(tmp_path / "previews/textured_00.png").size == (64, 64)
    gif = Image.open(tmp_path / "previews/turntable.gif")
    assert gif.n_frames == 3
    sheet = Image.open(tmp_path / "previews/contact_sheet.png")
    assert sheet.width > 3 * 100 and sheet.height > 2 * 100
    assert "contact_sheet" not in write_previews(
        mesh, tmp_path / "no_frames", n=1, resolution=32, gif_frames=2, backend="embree"
    )


def test_contact_sheet_labels_use_given_metrics(tmp_path):
    mesh = make_shape("sphere")
    frames = _frames(mesh)
    per_view = [{"name": v.name, "psnr": 31.25, "ssim": 0.9} for v in frames.views]
    p = write_contact_sheet(mesh, frames, tmp_path / "sheet.png", per_view=per_view, tile=96, backend="embree")
    img = np.asarray(Image.open(p))
    assert img.shape[1] == 3 * 96 + 4 * 4


def test_contact_tiles_of_the_true_mesh_match_the_photo():
    mesh = make_shape("capsule")
    # Photos at twice the working size, as in real bundles: the shrunk photo is anti-aliased like the tiles.
    r = make_rasterizer(mesh.vertices, mesh.faces, backend="embree")
    cam = default_rig(128, 128)["left"]
    dcam = cam.scaled(64, 64)
    rast = r.rasterize(dcam)
    view = PosedView("left", shade_rgb(mesh, r.rasterize(cam)), cam, rast.depth, rast.mask, dcam)
    t = contact_tiles(mesh, view, r, tile=64)
    assert max(t["ref"].shape[:2]) == 64 and t["ref"].shape == t["pred"].shape == t["diff"].shape
    # Cropped to the object: it fills most of the tile.
    assert t["ref_mask"].mean() > 0.3
    err = np.abs(t["ref"].astype(int) - t["pred"].astype(int)).max(-1)
    assert err.mean() < 8 and np.median(err) <= 2  # differences only along resampled edges


def test_corner_normals_keep_creases_and_smooth_curves():
    cube = _cube()
    n = corner_normals(cube.vertices, cube.faces)
    assert n.shape == (len(cube.faces), 3, 3)
    assert np.allclose(n, cube.face_normals()[:, None, :], atol=1e-6)  # 90-degree edges stay sharp
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=1.0)
    # Split every face off (as UV seams do): welding must still smooth across them.
    v = sphere.vertices[sphere.faces].reshape(-1, 3)
    n = corner_normals(v, np.arange(len(v)).reshape(-1, 3)).reshape(-1, 3)
    assert np.abs((n * v).sum(-1) - 1.0).max() < 2e-3  # ~ radial


def test_rasterize_many_matches_one_camera_at_a_time():
    """The turntable's single render pass gives every camera exactly its own rasterization."""
    from pipeline.render import rasterize_many

    mesh = _cube()
    r = make_rasterizer(mesh.vertices, mesh.faces)
    center, radius = bounding_sphere(mesh.vertices)
    cams = [preview_camera(i, 5, resolution=24 + 8 * i, center=center, radius=radius) for i in range(5)]
    for cam, many in zip(cams, rasterize_many(r, cams), strict=True):
        one = r.rasterize(cam)
        assert many.mask.any()
        for a, b in ((many.tri_id, one.tri_id), (many.bary, one.bary), (many.depth, one.depth)):
            assert np.array_equal(a, b)
