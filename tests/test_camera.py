"""The camera convention: projection, the default rig and the renderer agree."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh

from pipeline.camera import (
    RIG_VIEW_NAMES,
    default_rig,
    invert_rigid,
    look_at,
    opencv_to_opengl,
    opengl_to_opencv,
    pixel_rays,
    project_points,
)
from pipeline.render import EmbreeRasterizer


def test_rig_positions_and_image_up():
    cams = default_rig(64, 64)
    expect = {
        "front": (0, 0, 2.5),
        "back": (0, 0, -2.5),
        "left": (2.5, 0, 0),
        "right": (-2.5, 0, 0),
        "top": (0, 2.5, 0),
        "bottom": (0, -2.5, 0),
    }
    for name, pos in expect.items():
        c = cams[name]
        assert np.allclose(c.center, pos)
        # optical axis points at the origin
        assert np.allclose(c.cam_to_world[:3, 2], -np.asarray(pos) / 2.5)
        # image "up" (-y in OpenCV) is +Y for the side views and +Z for top/bottom
        up = -c.cam_to_world[:3, 1]
        assert np.allclose(up, (0, 0, 1) if name in ("top", "bottom") else (0, 1, 0))


def test_front_view_x_right_y_up():
    cam = default_rig(100, 100)["front"]
    uv, z = project_points(cam.K, cam.world_to_cam, np.array([[0.3, 0.2, 0.0]]))
    assert uv[0, 0] > 50 and uv[0, 1] < 50 and np.isclose(z[0], 2.5)


def test_left_view_sees_object_left_side():
    # The object faces +Z; its own left is +X, and the left camera sits at +X.
    cam = default_rig(100, 100)["left"]
    uv, _ = project_points(cam.K, cam.world_to_cam, np.array([[0.0, 0.0, 0.3]]))
    assert uv[0, 0] < 50  # the object's front appears on the left of the left view


def test_opengl_round_trip():
    T = look_at((1.0, 2.0, 3.0), (0, 0, 0), (0, 1, 0))
    assert np.allclose(opengl_to_opencv(opencv_to_opengl(T)), T)
    assert np.allclose(invert_rigid(T) @ T, np.eye(4))
    R = T[:3, :3]
    assert np.allclose(R.T @ R, np.eye(3)) and np.isclose(np.linalg.det(R), 1.0)


@pytest.mark.parametrize("name", RIG_VIEW_NAMES)
def test_projection_lands_where_renderer_draws(name):
    center = np.array([0.21, -0.13, 0.17])
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.05)
    sphere.apply_translation(center)
    cam = default_rig(200, 200)[name]
    rast = EmbreeRasterizer(sphere.vertices, sphere.faces).rasterize(cam)
    ys, xs = np.nonzero(rast.mask)
    assert len(xs) > 20
    uv, z = project_points(cam.K, cam.world_to_cam, center[None])
    # mask centroid (pixel centres at +0.5) matches the projected centre
    assert abs((xs + 0.5).mean() - uv[0, 0]) < 0.5 and abs((ys + 0.5).mean() - uv[0, 1]) < 0.5
    # z-depth at the centre pixel is the sphere's front surface
    i, j = int(uv[0, 1]), int(uv[0, 0])
    assert abs(rast.depth[i, j] - (z[0] - 0.05)) < 5e-3


def test_pixel_rays_pass_through_pixel_centres():
    cam = default_rig(8, 6)["top"]
    o, d = pixel_rays(cam)
    pts = o + 1.7 * d
    uv, _ = project_points(cam.K, cam.world_to_cam, pts)
    jj, ii = np.meshgrid(np.arange(8) + 0.5, np.arange(6) + 0.5)
    assert np.allclose(uv, np.stack([jj.ravel(), ii.ravel()], 1), atol=1e-6)
