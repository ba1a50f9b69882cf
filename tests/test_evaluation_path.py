"""One evaluation path: the CLI (in-process) and the service (the fan-out's parts, one task each)
write the same quality.json for the same bundle and overrides, timings aside.

The service side is run here exactly as serve_app/fanout.py chains it, without Ray: the mesh
read back from the model's files, the frames prepared from the upload with the config that
travelled in result.json, one ``view_metrics`` per view, then ``quality_document``.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from pipeline import evaluation as EV
from pipeline.config import get_preset
from pipeline.overrides import apply_overrides
from pipeline.reconstruct import reconstruct_bundle
from pipeline.result import ReconstructionResult
from pipeline.synthetic import write_bundle

OVERRIDES = {"max_working_resolution": 96, "texture_size": 256}


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evalpath")
    bundle = write_bundle(tmp / "b.zip", "box", resolution=128, as_zip=True, with_transforms=True)
    cfg = apply_overrides(get_preset("fast", device="cpu"), OVERRIDES)
    cfg = replace(cfg, fusion=replace(cfg.fusion, resolution=64))
    out = tmp / "out"
    reconstruct_bundle(bundle, out, model="fusion", config=cfg, device="cpu", evaluate=True, previews=False)
    return bundle, out


def _without_timings(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k != "timings"}


def test_cli_and_service_write_the_same_quality_json(cli_run):
    bundle, out = cli_run
    cli_doc = json.loads((out / "quality.json").read_text())

    result = ReconstructionResult.read(out / "result.json")  # what the model server publishes
    cfg = EV.evaluation_config(result)
    assert cfg.max_working_resolution == 96  # the override travelled, typed; no preset resolved again
    frames = EV.frames_for_result(bundle.read_bytes(), result, cfg)
    mesh = EV.published_mesh(lambda name: (out / name).read_bytes())  # the fan-out reads the published files
    per_view = [EV.view_metrics(mesh, frames, i) for i in range(len(frames.views))]
    service_doc, summary = EV.quality_document(per_view, [], mesh, frames, result)

    assert _without_timings(json.loads(EV.quality_json(service_doc))) == _without_timings(cli_doc)
    assert cli_doc["failed_views"] == [] and summary.quality.status == cli_doc["status"]
    assert len(cli_doc["per_view"]) == 6


def test_metrics_follow_the_working_resolution_override(cli_run):
    bundle, out = cli_run
    result = ReconstructionResult.read(out / "result.json")
    frames = EV.frames_for_result(bundle.read_bytes(), result)
    assert max(frames.views[0].depth_camera.width, frames.views[0].depth_camera.height) <= 96
