"""The ``nvdiffrec`` model deployment: fusion, then differentiable-rendering refinement (pipeline.refine).

It declares one GPU: refinement runs nvdiffrast on CUDA. The app builder drops the
GPU with a logged warning on clusters that have none, and the CPU path runs instead.
"""

from __future__ import annotations

from ray.serve import Application

from .base import ModelDeploymentConfig, ModelServer, bind_model_deployment


class NvdiffrecServer(ModelServer):
    """Serves ``model="nvdiffrec"``."""

    model_name = "nvdiffrec"
    uses_gpu = True


def build_nvdiffrec_deployment(
    cfg: ModelDeploymentConfig,
    *,
    override_serve_options: dict | None = None,
    deployment_cls: type[ModelServer] | None = None,
) -> Application:
    """Bind the nvdiffrec deployment: options from ``get_deployment_options(cfg)``, then the overrides."""
    return bind_model_deployment(deployment_cls or NvdiffrecServer, cfg, override_serve_options)
