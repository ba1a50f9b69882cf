"""Status rule, quality.json round trip, mesh statistics and the evaluate command."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import trimesh
from pydantic import ValidationError

from pipeline.evaluate import add_evaluate_arguments, evaluate_mesh_file, run_evaluate
from pipeline.mesh import TexturedMesh
from pipeline.quality import QualityReport, QualityThresholds, build_quality_report, classify, mesh_stats
from pipeline.synthetic import make_shape, write_bundle


@pytest.mark.parametrize(
    "psnr, ssim, status",
    [
        (25.0, 0.85, "normal"),  # both exactly at the normal thresholds
        (40.0, 0.99, "normal"),
        (24.999, 0.99, "warning"),
        (25.0, 0.8499, "warning"),
        (20.0, 0.75, "warning"),  # both exactly at the warning thresholds
        (19.999, 0.99, "failure"),
        (30.0, 0.7499, "failure"),
        (None, 0.9, "failure"),
        (30.0, math.nan, "failure"),
    ],
)
def test_classify_boundaries(psnr, ssim, status):
    assert classify(psnr, ssim, QualityThresholds()) == status


def test_thresholds_are_configurable_and_ordered():
    t = QualityThresholds(psnr_normal=30, ssim_normal=0.9, psnr_warning=28, ssim_warning=0.8)
    assert classify(29.0, 0.95, t) == "warning"
    assert classify(27.0, 0.95, t) == "failure"
    with pytest.raises(ValidationError):
        QualityThresholds(psnr_normal=20, psnr_warning=25)


def _view(name, psnr, ssim, **kw):
    return {"name": name, "psnr": psnr, "ssim": ssim, "psnr_full": psnr + 10, "ssim_full": 0.99, **kw}


def _report(per_view, **kw):
    mesh = make_shape("box")
    return build_quality_report(
        per_view,
        mesh=mesh,
        model="fusion",
        preset="fast",
        timings={"evaluate": 1.5},
        camera_estimate={"method": "given", "fov": np.float64(60.0), "K": np.eye(3)},
        **kw,
    )


def test_report_status_means_and_round_trip():
    per_view = [
        _view("front", 30.0, 0.95, depth_mae=0.01, silhouette_iou=0.98),
        _view("back", 24.0, 0.90, depth_mae=0.03, silhouette_iou=0.96),
    ]
    geometry = {
        "chamfer_l1": 0.004, "accuracy": 0.003, "completeness": 0.005, "f_score": 0.93, "precision": 0.95,
        "recall": 0.91, "normal_consistency": 0.97, "tau": 0.01, "n_samples": 1000,
    }  # fmt: skip
    r = _report(per_view, geometry=geometry)
    assert r.status == "normal" and r.error is None
    assert r.psnr == pytest.approx(27.0) and r.ssim == pytest.approx(0.925)
    assert r.depth_mae == pytest.approx(0.02) and r.silhouette_iou == pytest.approx(0.97)
    assert [v.status for v in r.per_view] == ["normal", "warning"]
    assert r.mesh.faces == len(make_shape("box").faces) and r.mesh.components == 1 and r.mesh.watertight
    assert r.camera_estimate["K"] == np.eye(3).tolist()
    text = r.model_dump_json(indent=2)
    d = json.loads(text)
    for key in (
        "status",
        "psnr",
        "ssim",
        "thresholds",
        "per_view",
        "model",
        "preset",
        "timings",
        "camera_estimate",
        "mesh",
    ):
        assert key in d
    assert d["geometry"]["f_score"] == 0.93
    assert QualityReport.model_validate_json(text) == r


def test_failure_carries_an_error_and_files_stay_listed():
    r = _report([_view("front", 15.0, 0.6), _view("back", 18.0, 0.7)])
    assert r.status == "failure"
    assert r.error is not None and r.error.code == "QUALITY_FAILED" and "16.50 dB" in r.error.message
    assert QualityReport.model_validate_json(r.model_dump_json()).error == r.error
    # The invariant is enforced when reading a file back.
    d = json.loads(r.model_dump_json())
    d["error"] = None
    with pytest.raises(ValidationError):
        QualityReport.model_validate(d)


def test_no_comparable_view_is_a_failure():
    r = _report([{"name": "front", "psnr": None, "ssim": None, "psnr_full": 30.0, "ssim_full": 0.9}])
    assert r.status == "failure" and r.psnr is None and "no view" in r.error.message


def test_mesh_stats_weld_uv_seams_and_count_components():
    box = trimesh.creation.box(extents=(1, 1, 1))
    # Unweld: every face gets its own three vertices, as UV seams do.
    v = box.vertices[box.faces].reshape(-1, 3)
    f = np.arange(len(v)).reshape(-1, 3)
    s = mesh_stats(TexturedMesh(vertices=v.astype(np.float32), faces=f.astype(np.int32)))
    assert s["vertices"] == 36 and s["faces"] == 12
    assert s["components"] == 1 and s["watertight"] and s["area"] == pytest.approx(6.0)
    # 12 unit cube edges at 90 degrees, 6 face diagonals (length sqrt 2) at 0, seams welded.
    assert s["mean_dihedral_deg"] == pytest.approx(12 * 90 / (12 + 6 * np.sqrt(2)), abs=1e-3)
    two = np.concatenate([v, v + [3.0, 0.0, 0.0]])
    s2 = mesh_stats(
        TexturedMesh(vertices=two.astype(np.float32), faces=np.concatenate([f, f + len(v)]).astype(np.int32))
    )
    assert s2["components"] == 2
    assert s2["bounds"] == [[-0.5, -0.5, -0.5], [3.5, 0.5, 0.5]]
    open_box = TexturedMesh(vertices=box.vertices.astype(np.float32), faces=box.faces[:-1].astype(np.int32))
    assert not mesh_stats(open_box)["watertight"]


def test_evaluate_mesh_file_on_a_synthetic_bundle(tmp_path, capsys):
    # Photos at twice the depth size: shrunk to the working size, they are anti-aliased like real photos.
    bundle = write_bundle(tmp_path / "bundle", "capsule", resolution=128, depth_scale=2, with_transforms=True)
    mesh = make_shape("capsule")
    mesh_path = tmp_path / "mesh.ply"
    trimesh.Trimesh(mesh.vertices, mesh.faces, vertex_colors=mesh.vertex_colors, process=False).export(mesh_path)
    out = tmp_path / "quality.json"
    report = evaluate_mesh_file(mesh_path, bundle, gt_path=mesh_path, out=out, backend="embree")
    assert report.status == "normal" and report.psnr > 30 and report.silhouette_iou > 0.95
    assert report.geometry is not None and report.geometry.f_score == 1.0
    assert report.model == "external" and len(report.per_view) == 6
    assert QualityReport.model_validate_json(out.read_text()) == report

    import argparse

    parser = argparse.ArgumentParser()
    add_evaluate_arguments(parser)
    args = parser.parse_args(
        [str(mesh_path), "--bundle", str(bundle), "--out", str(tmp_path / "q2.json"), "--backend", "embree"]
    )
    assert run_evaluate(args) == 0
    printed = capsys.readouterr().out
    assert "front" in printed and "mean" in printed and "status: normal" in printed
    assert (tmp_path / "q2.json").is_file()
