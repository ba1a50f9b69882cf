"""App builder: ``import_path: serve_app.builder:build_app`` in serve_config.yaml.

``build_app(args)`` validates the raw dict into :class:`AppArgs`, resolves each model's
GPU count against the cluster from its registry entry (``pipeline.registry``: keeps ``num_gpus``
when the cluster has GPUs, falls back to CPU with a logged warning when it has none), binds one
generic model deployment (``deployments.model_server``) per model, and binds the ingress on top.

On a cluster of more than one node it refuses a local-directory store unless the
directory is declared shared (``store.shared: true``): job records, uploads and
artifacts must be readable from every node (S3, or a filesystem all nodes mount).
"""

from __future__ import annotations

import logging

from ray import serve
from ray.serve import Application

from deployments.config import ModelConfig, ModelDeploymentConfig
from deployments.model_server import build_model_deployment
from deployments.store import StoreConfig
from pipeline.registry import ModelSpec, get_model

from . import constants as SC
from .config import AppArgs
from .ingress import Ingress

logger = logging.getLogger("recon3d.serve")

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


def alive_nodes() -> int:
    """Alive nodes of the Ray cluster this process is connected to (1 before Ray is up)."""
    import ray

    if not ray.is_initialized():
        return 1
    return sum(1 for n in ray.nodes() if n.get("Alive"))


class LocalStoreOnClusterError(ValueError):
    """A local-directory store on a multi-node cluster: other nodes would not see its files."""


def check_store_for_cluster(store: StoreConfig, nodes: int) -> None:
    """Refuse a node-local store when the app spans more than one node.

    Model replicas, fan-out tasks and a restarted ingress may each land on another node;
    they all read and write the same keys, so the store must be reachable from every node.
    """
    if store.kind == "local" and not store.shared and nodes > 1:
        raise LocalStoreOnClusterError(
            f"store.kind 'local' ({store.path}) is a directory on one node, but the Ray cluster has {nodes} "
            "alive nodes: model replicas, fan-out tasks and the ingress would each see a different disk. "
            "Use an object store (store: {kind: s3, bucket: ..., endpoint_url: ...}) or, when every node "
            "mounts that path from one shared filesystem (NFS, EFS ...), declare it with store.shared: true."
        )


def resolve_num_gpus(m: ModelConfig, spec: ModelSpec, available: float) -> float:
    """GPUs per replica.

    An explicit ``num_gpus`` is kept even when no GPU node is up yet (an autoscaled GPU
    group may start at zero nodes; the replica waits for one). ``None`` means 1 for GPU
    models when the cluster has GPUs now, else 0 (CPU fallback, logged).
    """
    if m.num_gpus is not None:
        if m.num_gpus > 0 and available < m.num_gpus:
            logger.warning(
                "model %r asks for %g GPU(s) per replica and the cluster has %g now: "
                "its replicas wait for the autoscaler to add a GPU node",
                m.name,
                m.num_gpus,
                available,
            )
        return m.num_gpus
    wanted = 1.0 if spec.wants_gpu else 0.0
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
    actor_options: dict = {"num_cpus": args.ingress_num_cpus}
    if args.ingress_resources:
        actor_options["resources"] = dict(args.ingress_resources)
    options = {
        "name": "ingress",
        "num_replicas": 1,
        "ray_actor_options": actor_options,
        "max_ongoing_requests": INGRESS_MAX_ONGOING_REQUESTS,
        # The old replica drains its in-flight runs (or re-queues them) before it goes.
        "graceful_shutdown_timeout_s": args.drain_timeout_s + SC.DRAIN_MARGIN_S,
        **(override_serve_options or {}),
    }
    logger.info("ingress deployment options: %s", options)
    return serve.deployment(cls).options(**options).bind(args.model_dump(mode="json"), model_apps)


def build_app(args: dict) -> Application:
    """Validate ``args`` (see :class:`AppArgs`) and bind the whole application."""
    a = AppArgs.model_validate(args or {})
    check_store_for_cluster(a.store, alive_nodes())
    available = cluster_gpus()
    model_apps: dict[str, Application] = {}
    for m in a.models:  # every name is in the registry (AppArgs validated it)
        cfg = ModelDeploymentConfig(model=m, store=a.store, num_gpus=resolve_num_gpus(m, get_model(m.name), available))
        model_apps[m.name] = build_model_deployment(cfg)
    return build_ingress_deployment(a, model_apps)
