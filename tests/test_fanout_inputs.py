"""The fan-out on the model replica's object refs writes what the CLI writes, without reading the upload.

A model run's ``on_exported`` hook puts the published mesh, its frames and the preview normals
in the object store (:func:`deployments.model_server.put_evaluation_inputs`, here from a Ray task
standing in for the replica, so the refs are owned elsewhere, as in the service). The fan-out is
given an upload key that does not exist: it can only succeed on the refs.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from deployments.store import LocalStore  # noqa: E402
from pipeline.config import get_preset  # noqa: E402
from pipeline.overrides import apply_overrides  # noqa: E402
from pipeline.reconstruct import run_reconstruction  # noqa: E402
from pipeline.synthetic import write_bundle  # noqa: E402

pytestmark = [pytest.mark.serve, pytest.mark.slow]

OVERRIDES = {"max_working_resolution": 96, "texture_size": 256}


def _config():
    cfg = apply_overrides(get_preset("fast", device="cpu"), OVERRIDES)
    return replace(cfg, fusion=replace(cfg.fusion, resolution=64))


@pytest.fixture(scope="module")
def local_ray():
    # Workers import this module's remote function by name.
    here = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(here).parent), here, os.environ.get("PYTHONPATH", "")])
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_fanout_on_the_replicas_refs_matches_the_cli(tmp_path, local_ray):
    from deployments.model_server import put_evaluation_inputs
    from serve_app.fanout import run_fanout

    bundle = write_bundle(tmp_path / "b.zip", "box", resolution=128, as_zip=True, with_transforms=True)
    cli = tmp_path / "cli"
    cli_result = run_reconstruction(bundle, cli, config=_config(), device="cpu", evaluate=True, previews=True)
    cli_result.write(cli)

    @ray.remote
    def model_run(src: bytes, out: str):
        """The model replica: run without evaluation, put the inputs when the mesh exists."""
        inputs: dict = {}
        result = run_reconstruction(
            src, out, config=_config(), device="cpu", evaluate=False, previews=False,
            on_exported=lambda frames, folder: inputs.update(put_evaluation_inputs(frames, folder)),
        )  # fmt: skip
        # Nested in a list, the refs travel borrowed (as inside the ResultEvent's dict).
        return result, [inputs]

    result, (inputs,) = ray.get(model_run.remote(bundle.read_bytes(), str(tmp_path / "model")))
    assert set(inputs) == {"mesh", "frames", "normals"}
    store = LocalStore(tmp_path / "store")
    for name in ("mesh.obj", "material.mtl", "texture_kd.png"):
        store.put(f"out/{name}", (tmp_path / "model" / name).read_bytes())
    fo = asyncio.run(
        run_fanout(
            job_id="j",
            store=store,
            input_key="no/such/upload.zip",
            prefix="out",
            result=result,
            max_retries=0,
            num_cpus=0.5,
            n_previews=8,
            inputs=inputs,
        )  # fmt: skip
    )
    assert fo.error is None or fo.error["code"] != "QUALITY_FAILED", fo.error
    got = json.loads(store.get("out/quality.json"))
    want = json.loads((cli / "quality.json").read_text())

    def drop(d: dict) -> dict:
        """Without measured times (the model ran twice): timings and the camera estimate's seconds."""
        d = {k: v for k, v in d.items() if k != "timings"}
        d["camera_estimate"] = {k: v for k, v in (d.get("camera_estimate") or {}).items() if k != "seconds"}
        return d

    assert drop(got) == drop(want)
    for rel in sorted(p.relative_to(cli).as_posix() for p in (cli / "previews").iterdir()):
        assert store.get(f"out/{rel}") == (cli / rel).read_bytes(), rel
