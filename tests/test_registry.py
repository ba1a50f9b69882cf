"""The model registry: a third model is one registry entry plus its function, made here only.

It runs through the library's runner (``reconstruct_bundle``) and through the one generic
model server (without Ray), and the CLI, the config validation and the builder's GPU rule
see it, with no other file touched.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
import torch

from deployments.config import ModelConfig, ModelDeploymentConfig
from deployments.model_server import ModelServer, deployment_name
from deployments.protocol import ModelRequest, parse_event
from deployments.store import LocalStore, StoreConfig
from pipeline import cli
from pipeline.reconstruct import ModelOutput, reconstruct_bundle
from pipeline.registry import ModelSpec, Stage, get_model, model_names, register_model, unregister_model
from pipeline.synthetic import make_shape, write_bundle


def place_box(frames):
    """A box of the bundle's scale, for a test model: the 'reconstruction' is known in advance."""
    return make_shape("box", texture_size=64)


def tiny_box_model(stages, frames, cfg) -> ModelOutput:
    """The tiny model's pipeline function: one named stage."""
    mesh = stages.run("place_box", place_box, frames)
    return ModelOutput(mesh=mesh, frames=frames, reports={"geometry": {"method": "box"}})


TINY = ModelSpec(
    name="tiny",
    description="A box, for tests.",
    function=tiny_box_model,
    stages=(Stage("place_box", 1.0),),
    wants_gpu=False,
    num_cpus=0.5,
)


@pytest.fixture
def tiny():
    register_model(TINY)
    try:
        yield TINY
    finally:
        unregister_model("tiny")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return write_bundle(tmp_path_factory.mktemp("tiny") / "b.zip", "box", resolution=64, as_zip=True)


def test_builtin_models_are_registered():
    assert model_names()[:2] == ("fusion", "nvdiffrec")
    assert get_model("nvdiffrec").stage_names(__import__("pipeline.config").config.get_preset("fast"))[-2:] == [
        "refine",
        "compare_refined",
    ]
    with pytest.raises(Exception, match="UNKNOWN_MODEL|unknown model"):
        get_model("nope")


def test_a_third_model_runs_through_the_pipeline_runner(tiny, bundle, tmp_path):
    stages: list[str] = []
    result = reconstruct_bundle(
        bundle, tmp_path / "out", model="tiny", preset="fast", device="cpu",
        progress=lambda s, f: stages.append(s), evaluate=True, previews=False,
    )  # fmt: skip
    assert result["model"] == "tiny" and result["geometry"] == {"method": "box"}
    assert list(dict.fromkeys(stages)) == ["read_bundle", "prepare_frames", "place_box", "export", "evaluate"]
    assert {"mesh.obj", "mesh.glb", "quality.json"} <= set(result["files"])
    quality = json.loads((tmp_path / "out" / "quality.json").read_text())
    assert quality["model"] == "tiny" and len(quality["per_view"]) == 6
    assert json.loads((tmp_path / "out" / "result.json").read_text())["model"] == "tiny"


def test_the_cli_config_validation_and_deployment_options_see_it(tiny):
    from serve_app.builder import resolve_num_gpus
    from serve_app.config import AppArgs

    choices = next(
        a for a in cli.build_parser()._subparsers._group_actions[0].choices["reconstruct"]._actions if a.dest == "model"
    )
    assert "tiny" in choices.choices
    args = AppArgs.model_validate({"models": ["tiny"]})
    m = args.models[0]
    assert resolve_num_gpus(m, get_model("tiny"), available=4.0) == 0.0  # wants_gpu=False
    cfg = ModelDeploymentConfig(model=m, store=StoreConfig(), num_gpus=0.0)
    opts = ModelServer.get_deployment_options(cfg)
    assert opts["name"] == deployment_name("tiny") == "tiny-model"
    assert opts["ray_actor_options"]["num_cpus"] == 0.5  # the registry's default resources


def test_unregistered_models_are_refused_by_the_config():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="unknown model"):
        ModelConfig(name="tiny")


def test_a_third_model_runs_through_the_generic_model_server(tiny, bundle, tmp_path):
    store_cfg = StoreConfig(kind="local", path=str(tmp_path / "store"))
    store = LocalStore(store_cfg.path)
    store.put("jobs/j/input/bundle.zip", bundle.read_bytes())
    model = ModelConfig(name="tiny", device="cpu", compute_threads=torch.get_num_threads())
    server = ModelServer(ModelDeploymentConfig(model=model, store=store_cfg, num_gpus=0.0))
    req = ModelRequest(
        job_id="j", model="tiny", preset="fast", input_key="jobs/j/input/bundle.zip",
        output_prefix="jobs/j/models/tiny", cancel_key="jobs/j/cancel", deadline=time.time() + 60,
        overrides={"max_working_resolution": 48},
    )  # fmt: skip

    async def collect():
        return [ev async for ev in server.run(req.to_dict())]

    events = [parse_event(e) for e in asyncio.run(collect())]
    final = events[-1]
    assert final.type == "result", final
    assert [e.stage for e in events[:-1]][:1] == ["started"] and "place_box" in {e.stage for e in events[:-1]}
    assert {"mesh.obj", "result.json"} <= set(final.files) and "quality.json" not in final.files
    stored = json.loads(store.get("jobs/j/models/tiny/result.json"))
    assert stored["model"] == "tiny" and stored["resources"]["peak_rss_bytes"] > 0
    # the resolved config travels with the result, overrides applied
    assert final.result.resolved_config().max_working_resolution == 48
