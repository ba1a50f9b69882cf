"""The ``fusion`` model deployment: TSDF fusion + texture baking (pipeline.reconstruct)."""

from __future__ import annotations

from ray.serve import Application

from .base import ModelDeploymentConfig, ModelServer, bind_model_deployment


class FusionServer(ModelServer):
    """Serves ``model="fusion"``. Uses the GPU when the replica has one, else the CPU."""

    model_name = "fusion"
    uses_gpu = True


def build_fusion_deployment(
    cfg: ModelDeploymentConfig,
    *,
    override_serve_options: dict | None = None,
    deployment_cls: type[ModelServer] | None = None,
) -> Application:
    """Bind the fusion deployment: options from ``get_deployment_options(cfg)``, then the overrides."""
    return bind_model_deployment(deployment_cls or FusionServer, cfg, override_serve_options)
