"""The model registry: every reconstruction model is declared here, once.

A :class:`ModelSpec` names the model, lists its stages (each with a progress weight and a rule
saying whether a config runs it), gives its default resources (CPUs per replica, whether it
wants a GPU), and points at its pipeline function. Everything else derives from it:

* the CLI's ``--model`` choices and :func:`pipeline.reconstruct.reconstruct_bundle`;
* the service's config validation (``deployments.config.ModelConfig.name``, ``known_models()``);
* the app builder (one generic ``deployments.model_server.ModelServer`` per entry it serves);
* the scheduler (deployment names, dispatch slots).

Adding a model is one :func:`register_model` call plus its function. The function has the
signature of :func:`pipeline.models.fusion_model`: ``(stages, frames, cfg) -> ModelOutput``,
where ``stages`` (:class:`pipeline.reconstruct.StageRunner`) times each named stage, reports
progress and polls cancellation. The registry imports nothing heavy: a function is named by its
import path and resolved on first use, so the CLI and the config validation stay light.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import InvalidInputError


def _always(_cfg: Any) -> bool:
    return True


def _camera_refine_on(cfg: Any) -> bool:
    return bool(cfg.camera_refine.enabled and len(cfg.camera_refine.level_image_sizes) > 0)


def _photo_refine_on(cfg: Any) -> bool:
    return bool(cfg.photo_refine.enabled)


@dataclass(frozen=True)
class Stage:
    """One named stage of a model."""

    name: str
    weight: float
    """Relative cost, for an overall progress fraction that never goes backwards."""
    enabled: Callable[[Any], bool] = _always
    """Whether a :class:`~pipeline.config.ReconstructConfig` runs this stage."""


@dataclass(frozen=True)
class ModelSpec:
    """A reconstruction model, declared once."""

    name: str
    description: str
    function: str | Callable[..., Any]
    """``module:function`` (resolved lazily) or the callable: ``(stages, frames, cfg) -> ModelOutput``."""
    stages: tuple[Stage, ...]
    """The model's own stages, between ``prepare_frames`` and ``export``, in order."""
    wants_gpu: bool = True
    """Whether a replica reserves a GPU when the cluster has one (``num_gpus`` None -> 1, else CPU)."""
    num_cpus: float = 1.0
    """CPUs a replica reserves unless the deployment's config says otherwise."""

    def resolve(self) -> Callable[..., Any]:
        """The pipeline function (imported on first use)."""
        if callable(self.function):
            return self.function
        module, _, attr = self.function.partition(":")
        fn = getattr(importlib.import_module(module), attr)
        if not callable(fn):
            raise TypeError(f"model {self.name!r}: {self.function!r} is not callable")
        return fn

    def stage_names(self, cfg: Any) -> list[str]:
        """The model's stages that ``cfg`` runs."""
        return [s.name for s in self.stages if s.enabled(cfg)]


#: Stages shared by the runner around every model.
READ_STAGES: tuple[Stage, ...] = (Stage("read_bundle", 0.05), Stage("prepare_frames", 0.15))
EXPORT_STAGES: tuple[Stage, ...] = (Stage("export", 0.05),)
EVALUATE_STAGES: tuple[Stage, ...] = (Stage("evaluate", 0.10), Stage("previews", 0.10))

FUSION_STAGES: tuple[Stage, ...] = (
    Stage("reconstruct_geometry", 0.30),
    Stage("refine_cameras", 0.10, _camera_refine_on),
    Stage("refuse_geometry", 0.15, _camera_refine_on),
    Stage("photo_refine", 0.15, _photo_refine_on),
    Stage("bake_texture", 0.25),
)

_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec, *, replace: bool = False) -> ModelSpec:
    """Add ``spec``; a second model of the same name raises unless ``replace``."""
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"model {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def unregister_model(name: str) -> None:
    """Remove a model (tests that register one of their own)."""
    _REGISTRY.pop(name, None)


def model_names() -> tuple[str, ...]:
    """Registered model names, in registration order."""
    return tuple(_REGISTRY)


def get_model(name: str) -> ModelSpec:
    """The spec of ``name``; an unknown name raises UNKNOWN_MODEL listing the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InvalidInputError(
            f"unknown model {name!r}; choose one of {list(_REGISTRY)}", code="UNKNOWN_MODEL", details={"model": name}
        ) from None


register_model(
    ModelSpec(
        name="fusion",
        description="Depth fusion plus texture baking (CPU or GPU).",
        function="pipeline.models:fusion_model",
        stages=FUSION_STAGES,
        wants_gpu=True,
    )
)
register_model(
    ModelSpec(
        name="nvdiffrec",
        description="Fusion, then differentiable-rendering refinement (nvdiffrast on a GPU, a CPU path otherwise).",
        function="pipeline.models:nvdiffrec_model",
        stages=(*FUSION_STAGES, Stage("refine", 1.50), Stage("compare_refined", 0.05)),
        wants_gpu=True,
    )
)
