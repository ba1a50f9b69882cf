"""Typed stage reports (pipeline.reports): JSON form, round trip through result.json, read by key."""

import json

import numpy as np
import pytest

from pipeline.frames import PosedFrames
from pipeline.reports import (
    CameraEstimateReport,
    DepthEncodingReport,
    GeometryReport,
    PhotoRefinementReport,
    RefineReport,
)
from pipeline.result import ReconstructionResult


def test_json_form_keeps_declared_order_and_leaves_out_unset_fields():
    r = DepthEncodingReport(method="given", source="transforms.json", kind="zdepth_linear", near=0.5, far=2.5,
                            max_value=255.0, background=0.0, seconds=0.01)  # fmt: skip
    assert list(r.to_dict()) == ["method", "source", "kind", "near", "far", "max_value", "background", "seconds"]
    c = CameraEstimateReport(method="default_rig", fov_x_deg=np.float64(60.0))
    assert c.to_dict() == {"method": "default_rig", "fov_x_deg": 60.0}
    assert type(c.to_dict()["fov_x_deg"]) is float  # numpy scalars become JSON numbers


def test_read_by_key_like_the_dicts_they_replace():
    r = CameraEstimateReport(method="silhouette_carving", score_mean_iou=0.93)
    assert r["method"] == "silhouette_carving" and r.get("source") is None and r.get("x", 1) == 1
    assert "score_mean_iou" in r and "uncertain" not in r
    with pytest.raises(KeyError):
        r["uncertain"]
    assert dict(r) == r.to_dict()


def test_unknown_keys_survive_a_round_trip():
    d = {"method": "hull_bounded_tsdf", "voxel_size": 0.01, "from_a_newer_version": [1, 2]}
    g = GeometryReport.from_dict(d)
    assert g.voxel_size == 0.01 and g.extra == {"from_a_newer_version": [1, 2]}
    assert g.to_dict() == d


def test_refine_report_keeps_a_null_settle_but_a_failed_run_has_none():
    done = RefineReport(loss_curve=[0.5, 0.4], iterations=2, settled_from_iteration=None)
    assert done.to_dict()["settled_from_iteration"] is None
    failed = RefineReport(error={"code": "CONVERGENCE_FAILED"}, fallback="fusion")
    assert failed.to_dict() == {"error": {"code": "CONVERGENCE_FAILED"}, "fallback": "fusion"}


def test_result_json_reads_back_into_the_report_types(tmp_path):
    result = ReconstructionResult(
        model="fusion",
        camera_estimate=CameraEstimateReport(method="given", source="transforms.json", seconds=0.0),
        depth_encoding={"method": "default", "near": 0.0, "far": 2.5},  # a model's dict form is typed on entry
        geometry=GeometryReport(method="hull_bounded_tsdf", vertices=10, faces=16),
        photo_refinement=PhotoRefinementReport(enabled=False, seconds=0.0),
    )
    assert isinstance(result.depth_encoding, DepthEncodingReport)
    result.write(tmp_path)
    raw = json.loads((tmp_path / "result.json").read_text())
    assert raw["camera_estimate"] == {"method": "given", "source": "transforms.json", "seconds": 0.0}
    assert raw["photo_refinement"] == {"enabled": False, "passes": [], "seconds": 0.0}
    assert raw["camera_refinement"] is None and "refine" not in raw
    back = ReconstructionResult.read(tmp_path / "result.json")
    assert isinstance(back.geometry, GeometryReport) and back.geometry.faces == 16
    assert isinstance(back.camera_estimate, CameraEstimateReport) and back.camera_refinement is None
    assert back.to_dict() == raw


def test_posed_frames_type_hand_built_reports():
    frames = PosedFrames(views=[], camera_estimate={"method": "given"})
    assert isinstance(frames.camera_estimate, CameraEstimateReport) and frames.camera_estimate.method == "given"
    assert isinstance(frames.depth_encoding, DepthEncodingReport) and frames.depth_encoding.to_dict() == {}
