"""App builder: ``import_path: serve_app.builder:build_app`` in serve_config.yaml.

``build_app(args)`` validates the raw dict into :class:`AppArgs`, resolves each model's
GPU count against the cluster (keeps ``num_gpus`` when the cluster has GPUs, falls back
to CPU with a logged warning when it has none), binds one deployment per model, and
binds the ingress on top.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ray import serve
from ray.serve import Application

from deployments.base import ModelDeploymentConfig, ModelServer
from deployments.fusion import FusionServer, build_fusion_deployment

from .config import AppArgs, ModelConfig
from .ingress import Ingress

logger = logging.getLogger("recon3d.serve")

#: Model name -> (server class, deployment builder). Models in KNOWN_MODELS but not here are not servable yet.
MODEL_BUILDERS: dict[str, tuple[type[ModelServer], Callable[..., Application]]] = {
    "fusion": (FusionServer, build_fusion_deployment),
}

#: Concurrent requests one ingress replica accepts (SSE streams hold one each).
INGRESS_MAX_ONGOING_REQUESTS = 1000


def cluster_gpus() -> float:
    """GPUs in the Ray cluster (or, before Ray is up, on this machine)."""
    import ray

    if ray.is_initialized():
        return float(ray.cluster_resources().get("GPU", 0.0))
    try:
        import torch

        return float(torch.cuda.device_count())
    except Exception:
        return 0.0


def resolve_num_gpus(m: ModelConfig, server_cls: type[ModelServer], available: float) -> float:
    """GPUs per replica: the configured value (default 1 for GPU models), or 0 when the cluster has none."""
    wanted = m.num_gpus if m.num_gpus is not None else (1.0 if server_cls.uses_gpu else 0.0)
    if wanted > 0 and available < wanted:
        logger.warning(
            "model %r asks for %g GPU(s) per replica but the cluster has %g: falling back to CPU",
            m.name,
            wanted,
            available,
        )
        return 0.0
    return wanted


def build_ingress_deployment(
    args: AppArgs,
    model_apps: dict[str, Application],
    *,
    override_serve_options: dict | None = None,
    deployment_cls: type | None = None,
) -> Application:
    """Bind the ingress (ONE replica: it owns the job scheduler) over the bound model deployments."""
    cls = deployment_cls or Ingress
    options = {
        "name": "ingress",
        "num_replicas": 1,
        "ray_actor_options": {"num_cpus": args.ingress_num_cpus},
        "max_ongoing_requests": INGRESS_MAX_ONGOING_REQUESTS,
        **(override_serve_options or {}),
    }
    logger.info("ingress deployment options: %s", options)
    return serve.deployment(cls).options(**options).bind(args.model_dump(mode="json"), model_apps)


def build_app(args: dict) -> Application:
    """Validate ``args`` (see :class:`AppArgs`) and bind the whole application."""
    a = AppArgs.model_validate(args or {})
    available = cluster_gpus()
    model_apps: dict[str, Application] = {}
    for m in a.models:
        if m.name not in MODEL_BUILDERS:
            raise ValueError(f"model {m.name!r} has no deployment yet; servable: {sorted(MODEL_BUILDERS)}")
        server_cls, build = MODEL_BUILDERS[m.name]
        cfg = ModelDeploymentConfig(model=m, store=a.store, num_gpus=resolve_num_gpus(m, server_cls, available))
        model_apps[m.name] = build(cfg)
    return build_ingress_deployment(a, model_apps)
