"""The model replica's own evaluation (``ModelRequest.evaluate``, one-node clusters) writes what the CLI writes.

The model server runs in this process (no Ray): with ``evaluate`` it streams the ``evaluate`` and
``previews`` stages and a quality event before its result, and publishes quality.json and the
previews with the mesh; they must equal the CLI's for the same bundle and config (timings aside).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
import torch

from deployments import replica_evaluation as RE
from deployments.config import ModelConfig, ModelDeploymentConfig
from deployments.model_server import ModelServer
from deployments.protocol import ModelRequest, QualityEvent, ResultEvent, parse_event
from deployments.store import LocalStore, StoreConfig
from pipeline.config import get_preset
from pipeline.errors import CanceledError
from pipeline.overrides import apply_overrides
from pipeline.reconstruct import run_reconstruction
from pipeline.result import ReconstructionResult
from pipeline.synthetic import write_bundle

pytestmark = pytest.mark.slow

OVERRIDES = {"max_working_resolution": 96, "texture_size": 256, "fusion.resolution": 64}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return write_bundle(
        tmp_path_factory.mktemp("b") / "box.zip", "box", resolution=128, as_zip=True, with_transforms=True
    )


@pytest.fixture(scope="module")
def cli_out(bundle, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli")
    cfg = apply_overrides(get_preset("fast", device="cpu"), OVERRIDES)
    run_reconstruction(bundle, out, config=cfg, device="cpu", evaluate=True, previews=True).write(out)
    return out


def _server(tmp_path: Path) -> tuple[ModelServer, LocalStore]:
    store_cfg = StoreConfig(kind="local", path=str(tmp_path / "store"))
    model = ModelConfig(name="fusion", device="cpu", compute_threads=torch.get_num_threads())
    return ModelServer(ModelDeploymentConfig(model=model, store=store_cfg, num_gpus=0.0)), LocalStore(store_cfg.path)


def _request(**kw) -> ModelRequest:
    return ModelRequest(
        job_id="j", model="fusion", preset="fast", input_key="jobs/j/input/bundle.zip",
        output_prefix="jobs/j/models/fusion", cancel_key="jobs/j/cancel", deadline=time.time() + 120,
        overrides=OVERRIDES, **kw,
    )  # fmt: skip


def _drop_times(d: dict) -> dict:
    """Without measured times (the model ran twice): timings and the camera estimate's seconds."""
    d = {k: v for k, v in d.items() if k != "timings"}
    d["camera_estimate"] = {k: v for k, v in (d.get("camera_estimate") or {}).items() if k != "seconds"}
    return d


def test_the_replica_evaluates_as_the_cli_does(bundle, cli_out, tmp_path):
    server, store = _server(tmp_path)
    store.put("jobs/j/input/bundle.zip", bundle.read_bytes())

    async def collect():
        return [parse_event(e) async for e in server.run(_request(evaluate=True).to_dict())]

    events = asyncio.run(collect())
    final = events[-1]
    assert isinstance(final, ResultEvent), final
    order = [e.stage if e.type == "progress" else e.type for e in events]
    (quality_event,) = [e for e in events if isinstance(e, QualityEvent)]
    # the report is announced before the previews are made
    assert order.index("export") < order.index("evaluate") < order.index("quality") < order.index("previews")
    assert final.evaluation["quality"] == quality_event.quality and final.evaluation_inputs is None

    want = json.loads((cli_out / "quality.json").read_text())
    got = json.loads(store.get("jobs/j/models/fusion/quality.json"))
    assert _drop_times(got) == _drop_times(want)
    assert quality_event.quality["status"] == want["status"] and quality_event.quality["psnr"] == want["psnr"]
    previews = sorted(p.relative_to(cli_out).as_posix() for p in (cli_out / "previews").iterdir())
    assert len(previews) == 2 * 8 + 2 and set(previews) <= set(final.files)
    for rel in previews:
        assert store.get(f"jobs/j/models/fusion/{rel}") == (cli_out / rel).read_bytes(), rel
    result = ReconstructionResult.from_dict(json.loads(store.get("jobs/j/models/fusion/result.json")))
    assert result.quality.status == want["status"] and result.previews == final.result.previews
    assert {"evaluate", "previews", "evaluate_and_previews"} <= set(result.timings_s)


def test_without_the_frames_it_prepares_them_from_the_upload(bundle, cli_out, tmp_path):
    """A runner that hands over no frames (no ``on_exported``): the upload is read and prepared again."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("mesh.obj", "material.mtl", "texture_kd.png"):
        (out / name).write_bytes((cli_out / name).read_bytes())
    result = ReconstructionResult.read(cli_out / "result.json")
    result.quality = result.previews = None
    seen: list = []
    stages: list[str] = []
    ev = RE.evaluate_in_replica(
        out, result, None, bundle.read_bytes, n_previews=1,
        progress=lambda stage, _f: stages.append(stage), should_cancel=lambda: False,
        on_quality=lambda q, e: seen.append((q, e)),
    )  # fmt: skip
    want = json.loads((cli_out / "quality.json").read_text())
    assert stages == ["evaluate", "previews"] and ev["error"] is None and seen == [(ev["quality"], None)]
    assert _drop_times(json.loads((out / "quality.json").read_text())) == _drop_times(want)
    for rel in ("previews/contact_sheet.png", "previews/turntable.gif"):  # the same whatever the preview count
        assert (out / rel).read_bytes() == (cli_out / rel).read_bytes(), rel
    assert result.previews["textured"] == ["previews/textured_00.png"]


def test_a_broken_mesh_is_quality_failed_and_a_cancel_stops_it(cli_out, tmp_path):
    result = ReconstructionResult.read(cli_out / "result.json")
    out = tmp_path / "out"
    out.mkdir()
    (out / "mesh.obj").write_text("this is not a mesh\n")
    seen: list = []
    kw = dict(progress=lambda *_: None, on_quality=lambda q, e: seen.append((q, e)))
    ev = RE.evaluate_in_replica(out, result, None, lambda: b"", should_cancel=lambda: False, **kw)
    assert ev["quality"] is None and ev["error"]["code"] == "QUALITY_FAILED" and seen == [(None, ev["error"])]
    with pytest.raises(CanceledError):
        RE.evaluate_in_replica(out, result, None, lambda: b"", should_cancel=lambda: True, **kw)
