"""Rig estimation from silhouettes: field of view and view-to-axis assignment."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from pipeline.camera import RIG_VIEW_NAMES, default_rig
from pipeline.camera_stack import CameraStack
from pipeline.mesh import TexturedMesh
from pipeline.render import make_rasterizer
from pipeline.rig import estimate_rig, layout_variants
from pipeline.synthetic import make_shape
from pipeline.visual_hull import carve_occupancy
from pipeline.voxel_grid import VoxelGrid

SIZE = 128


def _masks(mesh: TexturedMesh, fov: float, layout=None) -> torch.Tensor:
    r = make_rasterizer(mesh.vertices, mesh.faces, backend="embree")
    cams = default_rig(SIZE, SIZE, fov_x_deg=fov, layout=layout)
    return torch.as_tensor(np.stack([r.rasterize(cams[n]).mask for n in RIG_VIEW_NAMES]))


def _asymmetric_mesh() -> TexturedMesh:
    """A slab with a tower on one corner: no mirror symmetry, so swapped views are inconsistent."""
    slab = trimesh.creation.box(extents=(0.8, 0.25, 0.6))
    tower = trimesh.creation.box(extents=(0.3, 0.5, 0.25))
    tower.apply_translation((0.25, 0.35, 0.17))
    m = trimesh.util.concatenate([slab, tower])
    return TexturedMesh(vertices=np.asarray(m.vertices, np.float32), faces=np.asarray(m.faces, np.int32))


def test_carve_box_is_inside_masks_and_fills_the_box():
    mesh = make_shape("box")
    masks = _masks(mesh, 60.0).float()
    cams = default_rig(SIZE, SIZE)
    stack = CameraStack.from_cameras([cams[n] for n in RIG_VIEW_NAMES], torch.device("cpu"))
    grid = VoxelGrid.around((-0.5, -0.5, -0.5), (0.5, 0.5, 0.5), 41, margin_voxels=0)
    occ = carve_occupancy(masks, stack, grid) >= 0.5
    pts = grid.points(torch.device("cpu")).numpy()
    inside_box = (np.abs(pts) <= np.array([0.4, 0.28, 0.2]) - 0.03).all(1)
    far_outside = (np.abs(pts) >= np.array([0.4, 0.28, 0.2]) + 0.05).any(1)
    occ = occ.reshape(-1).numpy()
    assert occ[inside_box].all()
    assert not occ[far_outside].any()


def test_estimate_rig_moves_towards_a_clearly_different_fov():
    masks = _masks(_asymmetric_mesh(), 40.0)
    cams, report = estimate_rig(masks, list(RIG_VIEW_NAMES), 256, 256)
    # Silhouettes constrain the FOV only loosely; a clearly narrower rig must still pull the
    # estimate well away from the nominal 60 degrees, towards the truth.
    assert report["fov_x_deg"] <= 50.0, report["fov_candidates"]
    assert report["layout"] == ["default"]
    assert report["score_mean_iou"] > 0.9
    assert cams["front"].width == 256 and abs(cams["front"].fov_x_deg - report["fov_x_deg"]) < 1e-6


def test_estimate_rig_keeps_the_nominal_fov_when_silhouettes_cannot_tell():
    # A box carves alike at any FOV (its IoU curve rises by < 0.005 from 60 to 80 degrees):
    # a bundle rendered exactly on the contract's rig must keep 60 degrees.
    masks = _masks(make_shape("box"), 60.0)
    _, report = estimate_rig(masks, list(RIG_VIEW_NAMES), 256, 256)
    assert abs(report["fov_x_deg"] - 60.0) <= 1.0, report["fov_candidates"]


def test_estimate_rig_detects_swapped_left_right():
    masks = _masks(_asymmetric_mesh(), 60.0)
    i, j = RIG_VIEW_NAMES.index("left"), RIG_VIEW_NAMES.index("right")
    swapped = masks.clone()
    swapped[[i, j]] = masks[[j, i]]
    _, report = estimate_rig(swapped, list(RIG_VIEW_NAMES), SIZE, SIZE)
    assert "swap_left_right" in report["layout"], report["layout_candidates"]
    assert abs(report["fov_x_deg"] - 60.0) <= 3.0


def test_estimate_rig_detects_rotated_top_view():
    mesh = _asymmetric_mesh()
    variants = layout_variants(list(RIG_VIEW_NAMES))
    masks = _masks(mesh, 60.0, layout=variants["top_up_rot90"])
    _, report = estimate_rig(masks, list(RIG_VIEW_NAMES), SIZE, SIZE)
    assert report["layout"] == ["top_up_rot90"], report["layout_candidates"]


@pytest.mark.parametrize("name", ["swap_left_right", "top_up_rot180"])
def test_layout_variants_change_only_their_views(name):
    v = layout_variants(list(RIG_VIEW_NAMES))
    changed = [n for n in RIG_VIEW_NAMES if v[name][n] != v["default"][n]]
    assert changed == (["left", "right"] if name == "swap_left_right" else ["top"])
