"""Image and geometry metrics on synthetic data with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh

from pipeline.camera import default_rig
from pipeline.frames import PosedFrames, PosedView
from pipeline.mesh import TexturedMesh
from pipeline.metrics import (
    PSNR_MAX_DB,
    evaluate_view,
    evaluate_views,
    geometry_metrics,
    image_metrics,
    mean_dihedral_angle,
    sample_surface,
    ssim_map,
)
from pipeline.render import make_rasterizer
from pipeline.shading import shade_rgb
from pipeline.synthetic import make_shape


def _fibonacci_sphere(n: int) -> np.ndarray:
    """(n, 3) nearly uniform unit vectors (deterministic quadrature points on the sphere)."""
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    theta = np.pi * (1 + 5**0.5) * i
    return np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], -1)


def _sphere(radius: float, subdivisions: int = 5) -> trimesh.Trimesh:
    return trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)


# ---------------------------------------------------------------- image metrics


def test_identical_images_give_capped_psnr_and_unit_ssim():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    mask = np.zeros((64, 80), bool)
    mask[10:50, 20:60] = True
    depth = np.where(mask, 2.0, 0.0).astype(np.float32)
    m = image_metrics(img, mask, img, mask, pred_depth=depth, ref_depth=depth)
    assert m["psnr"] == PSNR_MAX_DB and m["psnr_full"] == PSNR_MAX_DB
    assert m["ssim"] == pytest.approx(1.0, abs=1e-9) and m["ssim_full"] == pytest.approx(1.0, abs=1e-9)
    assert m["silhouette_iou"] == 1.0 and m["depth_mae"] == 0.0
    assert m["mask_pixels"] == 40 * 40 and (m["width"], m["height"]) == (80, 64)


def test_masked_psnr_counts_only_the_union_and_matches_a_known_error():
    ref = np.full((50, 50, 3), 0.5)
    pred = ref.copy()
    pm = np.zeros((50, 50), bool)
    rm = np.zeros((50, 50), bool)
    pm[10:30, 10:30] = True
    rm[20:40, 20:40] = True
    union = pm | rm
    pred[union] += 0.1  # MSE 0.01 inside the union -> 20 dB
    m = image_metrics(pred, pm, ref, rm)
    assert m["psnr"] == pytest.approx(20.0, abs=1e-9)
    # The full frame dilutes the same error with identical background.
    assert m["psnr_full"] == pytest.approx(20.0 + 10 * np.log10(union.size / union.sum()), abs=1e-9)
    assert m["silhouette_iou"] == pytest.approx(100 / 700)
    assert m["ssim"] < m["ssim_full"] <= 1.0
    assert m["depth_mae"] is None


def test_depth_mae_uses_pixels_valid_in_both():
    pm = np.ones((16, 16), bool)
    rm = pm.copy()
    rm[:, :4] = False
    pd = np.full((16, 16), 1.5, np.float32)
    pd[:, 4:8] = 1.0
    rd = np.full((16, 16), 1.25, np.float32)
    rd[0] = 0.0  # invalid reference depth is skipped
    rd[:, :4] = 9.0  # outside the reference mask: skipped
    img = np.zeros((16, 16, 3), np.uint8)
    m = image_metrics(img, pm, img, rm, pred_depth=pd, ref_depth=rd)
    assert m["depth_mae"] == pytest.approx(0.25)
    pd[1, 8] = 0.0  # invalid predicted depth is skipped too
    assert image_metrics(img, pm, img, rm, pred_depth=pd, ref_depth=rd)["depth_mae"] == pytest.approx(0.25)


@pytest.mark.parametrize(
    "box",
    [(slice(10, 20), slice(30, 49)), (slice(0, 3), slice(0, 2)), (slice(0, 40), slice(0, 50)), None],
    ids=["inside", "corner", "whole", "all-white"],
)
def test_ssim_map_is_scikit_images_bit_for_bit(box):
    """The white-window shortcut changes nothing: same map and mean as skimage, wherever the render's non-white box is."""
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    pred = np.ones((40, 50, 3))
    if box is not None:
        pred[box] = rng.random(pred[box].shape)
    ref = np.clip(0.9 + 0.1 * rng.random((40, 50, 3)), 0, 1)
    ref[5:25, 20:45] = rng.random((20, 25, 3))
    want_mean, want = structural_similarity(
        pred, ref, data_range=1.0, channel_axis=-1, gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False, full=True,
    )  # fmt: skip
    got, got_mean = ssim_map(pred, ref)
    assert np.array_equal(got, want.mean(axis=-1))
    assert got_mean == want_mean


@pytest.mark.parametrize("ref_box", [(slice(8, 30), slice(12, 40)), (slice(0, 6), slice(44, 50)), None])
def test_ssim_map_on_white_photos_is_scikit_images_bit_for_bit(ref_box):
    """Windows white in both images are skipped (SSIM 1.0 exactly): same map and mean as skimage."""
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(1)
    pred = np.ones((40, 50, 3))
    pred[12:26, 20:35] = rng.random((14, 15, 3))
    ref = np.ones((40, 50, 3))
    if ref_box is not None:
        ref[ref_box] = rng.random(ref[ref_box].shape)
    want_mean, want = structural_similarity(
        pred, ref, data_range=1.0, channel_axis=-1, gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False, full=True,
    )  # fmt: skip
    got, got_mean = ssim_map(pred, ref)
    assert np.array_equal(got, want.mean(axis=-1))
    assert got_mean == want_mean
    assert got[0, 0] == 1.0


def test_shape_mismatch_raises():
    a = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(ValueError):
        image_metrics(a, np.ones((16, 16), bool), np.zeros((16, 17, 3), np.uint8), np.ones((16, 17), bool))
    with pytest.raises(ValueError, match="at least"):
        image_metrics(a[:8, :8], np.ones((8, 8), bool), a[:8, :8], np.ones((8, 8), bool))


def _posed_frames(mesh: TexturedMesh, work: int = 64, photo_scale: int = 2) -> PosedFrames:
    """Six views of ``mesh``: photos at photo_scale x the working size, depth and masks at the working size."""
    r = make_rasterizer(mesh.vertices, mesh.faces, backend="embree")
    views = []
    for name, cam in default_rig(work * photo_scale, work * photo_scale).items():
        dcam = cam.scaled(work, work)
        d = r.rasterize(dcam)
        rgb = shade_rgb(mesh, r.rasterize(cam))
        views.append(PosedView(name=name, rgb=rgb, camera=cam, depth=d.depth, mask=d.mask, depth_camera=dcam))
    return PosedFrames(views=views, depth_encoding={"far": 2.5})


def test_evaluate_views_of_the_true_mesh_are_near_perfect():
    mesh = make_shape("capsule")
    per_view = evaluate_views(mesh, _posed_frames(mesh), backend="embree")
    assert [v["name"] for v in per_view] == ["front", "back", "left", "right", "top", "bottom"]
    for v in per_view:
        # Anti-aliased re-render vs an area-shrunk photo of the same scene: equal up to rounding and
        # the centre-sample approximation of smooth interiors (shading.shade_rgb_antialiased).
        assert v["psnr"] > 38.0 and v["ssim"] > 0.995
        assert v["silhouette_iou"] == 1.0
        assert v["depth_mae"] < 0.01
        assert (v["width"], v["height"]) == (64, 64)


def test_evaluate_view_drops_for_a_displaced_mesh():
    mesh = make_shape("capsule")
    frames = _posed_frames(mesh)
    moved = TexturedMesh(
        vertices=mesh.vertices + np.float32([0.08, 0.0, 0.0]), faces=mesh.faces, vertex_colors=mesh.vertex_colors
    )
    good = evaluate_view(mesh, frames.views[0], backend="embree")
    bad = evaluate_view(moved, frames.views[0], backend="embree")
    assert bad["psnr"] < good["psnr"] - 15.0
    assert bad["silhouette_iou"] < 0.9


def test_saturated_reference_depth_is_ignored():
    mesh = make_shape("sphere")
    frames = _posed_frames(mesh)
    view = frames.views[0]
    # Clip the reference depth like an encoding whose far plane cuts through the object.
    far = float(np.median(view.depth[view.mask]))
    view.depth = np.where(view.mask, np.minimum(view.depth, far), 0.0).astype(np.float32)
    clipped = evaluate_view(mesh, view, backend="embree")
    ignored = evaluate_view(mesh, view, backend="embree", depth_far=far)
    assert clipped["depth_mae"] > 0.01
    assert ignored["depth_mae"] < 0.005


# ---------------------------------------------------------------- geometry metrics


def test_sample_surface_is_area_uniform_and_seeded():
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 5], [3, 0, 5], [0, 1, 5]], float)
    f = np.array([[0, 1, 2], [3, 4, 5]])
    p, n = sample_surface(v, f, 40_000, seed=3)
    assert p.shape == (40_000, 3) and n.shape == (40_000, 3)
    assert np.mean(p[:, 2] > 2.5) == pytest.approx(0.75, abs=0.01)  # area ratio 1 : 3
    assert np.allclose(np.abs(n[:, 2]), 1.0)
    on_first = p[:, 2] < 2.5
    assert (p[on_first, 0] + p[on_first, 1] <= 1 + 1e-9).all() and (p[:, :2] >= -1e-12).all()
    p2, _ = sample_surface(v, f, 40_000, seed=3)
    assert np.array_equal(p, p2)


def test_identical_meshes_score_perfectly():
    s = _sphere(0.5, 3)
    g = geometry_metrics(s.vertices, s.faces, s.vertices, s.faces, n_samples=20_000)
    assert g["chamfer_l1"] == 0.0 and g["f_score"] == 1.0
    assert g["precision"] == 1.0 and g["recall"] == 1.0
    assert g["normal_consistency"] == pytest.approx(1.0)
    assert g["tau"] == pytest.approx(0.01 * (s.vertices.max(0) - s.vertices.min(0)).max())


def test_shifted_sphere_gives_the_expected_chamfer():
    r, delta = 0.5, 0.05
    s = _sphere(r)
    moved = s.vertices + [delta, 0.0, 0.0]
    g = geometry_metrics(moved, s.faces, s.vertices, s.faces, n_samples=100_000)
    # Exact distance from a point of the shifted sphere (r u + delta e_x) to the original sphere.
    u = _fibonacci_sphere(200_000)
    expected = np.abs(np.linalg.norm(r * u + [delta, 0, 0], axis=1) - r).mean()  # ~ delta / 2
    assert g["accuracy"] == pytest.approx(expected, rel=0.05)
    assert g["completeness"] == pytest.approx(expected, rel=0.05)
    assert g["chamfer_l1"] == pytest.approx(expected, rel=0.05)
    assert g["f_score"] < 0.5  # tau = 0.01 is a fifth of the shift
    # Shifting the other way is symmetric; no re-alignment hides the offset.
    g2 = geometry_metrics(s.vertices - [delta, 0, 0], s.faces, s.vertices, s.faces, n_samples=100_000)
    assert g2["chamfer_l1"] == pytest.approx(g["chamfer_l1"], rel=0.02)


def test_sphere_against_cube_matches_analytic_distances():
    a, r = 0.5, 0.35  # cube half-size, sphere radius (sphere strictly inside the cube)
    cube = trimesh.creation.box(extents=(2 * a, 2 * a, 2 * a))
    sphere = _sphere(r)
    # Far-apart surfaces make nearest-neighbour queries slow; 20k samples keep the bias under 1 %.
    g = geometry_metrics(sphere.vertices, sphere.faces, cube.vertices, cube.faces, n_samples=20_000)
    # Sphere point r u -> nearest cube face: a - r max|u_i|.
    u = _fibonacci_sphere(200_000)
    accuracy = (a - r * np.abs(u).max(axis=1)).mean()
    # Cube point p -> sphere: |p| - r; by symmetry average over one face z = a on a fine grid.
    x = (np.arange(1000) + 0.5) / 1000 * 2 * a - a
    xx, yy = np.meshgrid(x, x)
    completeness = (np.sqrt(xx**2 + yy**2 + a**2) - r).mean()
    assert g["accuracy"] == pytest.approx(accuracy, rel=0.02)
    assert g["completeness"] == pytest.approx(completeness, rel=0.02)
    assert g["chamfer_l1"] == pytest.approx(0.5 * (accuracy + completeness), rel=0.02)
    assert g["f_score"] == 0.0  # every distance exceeds tau = 0.01
    assert 0.3 < g["normal_consistency"] < 1.0


def test_empty_mesh_raises():
    s = _sphere(0.5, 1)
    with pytest.raises(ValueError):
        geometry_metrics(np.zeros((0, 3)), np.zeros((0, 3), int), s.vertices, s.faces)


def test_mean_dihedral_angle_of_a_hinge_a_flat_sheet_a_seam_and_noise():
    # Two triangles folded by 90 degrees along their shared edge; the other edges are boundary.
    hinge_v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float64)
    hinge_f = np.array([[0, 1, 2], [1, 0, 3]])
    assert mean_dihedral_angle(hinge_v, hinge_f) == pytest.approx(90.0)
    # The same hinge with its edge split like a UV seam (duplicated vertices): still one interior edge.
    split_v = np.vstack([hinge_v, hinge_v[[0, 1]]])
    assert mean_dihedral_angle(split_v, np.array([[0, 1, 2], [5, 4, 3]])) == pytest.approx(90.0)
    # A flat grid has none; noise along its normal raises it.
    n = 12
    ys, xs = np.mgrid[0:n, 0:n]
    grid_v = np.stack([xs.ravel(), ys.ravel(), np.zeros(n * n)], 1) / n
    i = (ys[:-1, :-1] * n + xs[:-1, :-1]).ravel()
    grid_f = np.concatenate([np.stack([i, i + 1, i + n], 1), np.stack([i + 1, i + n + 1, i + n], 1)])
    assert mean_dihedral_angle(grid_v, grid_f) == pytest.approx(0.0, abs=1e-6)
    bumpy = grid_v.copy()
    bumpy[:, 2] = np.random.default_rng(0).normal(0.0, 0.01, len(bumpy))
    assert mean_dihedral_angle(bumpy, grid_f) > 5.0
    assert mean_dihedral_angle(np.zeros((0, 3)), np.zeros((0, 3), int)) == 0.0
