"""cluster/: manifests parse, validate against their schemas, and serveConfigV2 stays in sync.

No kubectl here: the RayService is checked against cluster/schemas/rayservice.v1.schema.json
(written from the KubeRay ray.io/v1 API reference), its serveConfigV2 against Ray Serve's
own ServeDeploySchema and our AppArgs, the launcher YAML against Ray's ray-schema.json.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
sys.path.insert(0, str(CLUSTER))

import render_rayservice as R  # noqa: E402

from serve_app.config import AppArgs  # noqa: E402


@pytest.fixture(scope="module")
def rayservice() -> dict:
    return yaml.safe_load((CLUSTER / "rayservice.yaml").read_text())


def test_rayservice_is_in_sync_with_serve_config(capsys):
    assert R.main(["--check"]) == 0, capsys.readouterr().out


def test_check_catches_drift():
    drifted = (REPO / "serve_config.yaml").read_text().replace("max_queued_jobs: 100", "max_queued_jobs: 7")
    assert drifted != (REPO / "serve_config.yaml").read_text()
    text = R.render(drifted, R.OVERRIDES.read_text(), R.TEMPLATE.read_text())
    assert text != (CLUSTER / "rayservice.yaml").read_text() and "max_queued_jobs: 7" in text


def test_merge_rules():
    base = {"applications": [{"name": "a", "args": {"models": [{"name": "m", "x": 1, "y": 2}], "k": 1}}]}
    over = {"applications": [{"name": "a", "args": {"models": [{"name": "m", "y": None, "z": 3}, {"name": "n"}]}}]}
    assert R.merge(base, over) == {
        "applications": [{"name": "a", "args": {"models": [{"name": "m", "x": 1, "z": 3}, {"name": "n"}], "k": 1}}]
    }
    assert base["applications"][0]["args"]["models"][0]["y"] == 2  # inputs untouched


def test_rayservice_matches_the_crd_schema(rayservice):
    schema = json.loads((CLUSTER / "schemas" / "rayservice.v1.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(rayservice, schema)
    bad = json.loads(json.dumps(rayservice))
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # must be a string
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_cluster_layout_head_without_replicas_and_autoscaled_gpu_group(rayservice):
    rc = rayservice["spec"]["rayClusterConfig"]
    assert rc["enableInTreeAutoscaling"] is True
    assert rc["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in rc["workerGroupSpecs"]}
    gpu = groups["gpu"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1" and gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1
    assert groups["cpu"]["minReplicas"] >= 1  # somewhere for the ingress (the head takes no replica)
    import ray

    assert rc["rayVersion"] == ray.__version__


def test_serve_config_v2_is_a_valid_serve_config_and_app_args(rayservice):
    from ray.serve.schema import ServeDeploySchema

    cfg = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(cfg) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema(**cfg)
    app = next(a for a in cfg["applications"] if a["name"] == "recon3d")
    args = AppArgs.model_validate(app["args"])
    assert args.store.kind == "s3"  # multi-node: never a node-local directory
    fusion = args.model("fusion")
    assert fusion.num_gpus == 1 and fusion.autoscaling.min_replicas == 0
    assert fusion.dispatch_slots() == fusion.autoscaling.max_replicas * fusion.max_ongoing_requests
    gpu_pods = next(g for g in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert fusion.autoscaling.max_replicas <= gpu_pods["maxReplicas"]


def test_cluster_launcher_yaml_matches_rays_schema():
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cfg = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    jsonschema.validate(cfg, schema)
    nodes = cfg["available_node_types"]
    assert nodes[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    assert nodes["gpu_worker"]["min_workers"] == 0 and nodes["gpu_worker"]["node_config"]["InstanceType"].startswith(
        "g"
    )
    assert any("--num-cpus=0" in c for c in cfg["head_start_ray_commands"])


def test_grafana_dashboard_covers_our_metrics_and_serves():
    dash = json.loads((CLUSTER / "grafana" / "recon3d.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    for metric in ("recon3d_queue_depth", "recon3d_jobs_total", "recon3d_stage_duration_s", "recon3d_job_duration_s"):
        assert f"ray_{metric}" in exprs, metric  # Ray prefixes application metrics with ray_
    assert "ray_serve_deployment_replica_healthy" in exprs and "ray_serve_autoscaling_target_replicas" in exprs
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for name in re.findall(r"ray_serve_[a-z_]+", exprs):  # Serve metric names exist in this Ray version
        base = re.sub(r"_(bucket|sum|count|total)$", "", name[len("ray_") :])
        assert _serve_metric_defined(base), name


def _serve_metric_defined(name: str) -> bool:
    spec = importlib.util.find_spec("ray.serve")
    root = Path(spec.origin).parent / "_private"
    return any(f'"{name}"' in p.read_text(errors="ignore") for p in root.rglob("*.py"))


def test_dockerfiles_prebuild_nvdiffrast_and_install_the_package():
    cuda = (CLUSTER / "docker" / "Dockerfile.cuda").read_text()
    cpu = (CLUSTER / "docker" / "Dockerfile.cpu").read_text()
    assert "prebuild_nvdiffrast.py" in cuda and ".[serve,gpu]" in cuda and "TORCH_EXTENSIONS_DIR" in cuda
    assert ".[serve]" in cpu
    import ray

    for text in (cpu, cuda):
        assert f"rayproject/ray:{ray.__version__}" in text  # image Ray == cluster Ray == pinned Ray
