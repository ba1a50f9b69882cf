"""Configuration of one model deployment (pydantic; validated by the app builder).

Lives with the model servers, which read it; ``serve_app.config.AppArgs`` holds a list of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.registry import model_names

from . import constants as DC
from .store import StoreConfig


class AutoscalingConfig(BaseModel):
    """Serve autoscaling of one model deployment (replicas follow the ongoing requests)."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=0, description="Replicas kept warm; 0 lets an idle GPU model scale to zero.")
    initial_replicas: int | None = Field(
        None, ge=0, description="Replicas at deploy time; None = min_replicas (at least 1 when min_replicas > 0)."
    )
    max_replicas: int = Field(1, ge=1, description="Upper bound; one GPU each for GPU models.")
    target_ongoing_requests: float = Field(1.0, gt=0, description="Jobs per replica the autoscaler aims for.")
    upscale_delay_s: float = Field(10.0, ge=0, description="Seconds of sustained load before adding a replica.")
    downscale_delay_s: float = Field(300.0, ge=0, description="Seconds of low load before removing a replica.")
    downscale_to_zero_delay_s: float | None = Field(
        None, ge=0, description="Seconds idle before the last replica goes (min_replicas 0); None = downscale_delay_s."
    )

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError("autoscaling.max_replicas must be >= min_replicas")
        return self


class ModelConfig(BaseModel):
    """One model deployment."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description=f"Model id, one of {list(model_names())} (pipeline.registry).")
    num_gpus: float | None = Field(
        None, ge=0, description="GPUs per replica; None = 1 when the cluster has GPUs, else 0 (CPU fallback, logged)."
    )
    num_cpus: float | None = Field(
        None, gt=0, description="CPUs per replica; None = the model's default in pipeline.registry (1)."
    )
    compute_threads: int | None = Field(
        None,
        ge=1,
        description="torch CPU threads of the replica's compute; None = every core its process may use. "
        "Ray limits a worker to its num_cpus reservation (one thread for 0.5), which would leave the "
        "refinement on one core of a machine with idle ones; set it where replicas share a node.",
    )
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources per replica (placement on labelled nodes, e.g. {'fake_gpu': 1} in tests).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Device passed to the pipeline.")
    max_ongoing_requests: int = Field(DC.MODEL_MAX_ONGOING_REQUESTS, ge=1, description="Jobs one replica runs at once.")
    graceful_shutdown_timeout_s: float = Field(
        DC.MODEL_GRACEFUL_SHUTDOWN_S,
        gt=0,
        description="Seconds a draining replica may finish its job (>= the longest stage).",
    )
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig, description="Replica autoscaling.")
    max_concurrent_jobs: int | None = Field(
        None,
        ge=1,
        description="Jobs the scheduler hands to this model's Serve handle at once; None = max_replicas x "
        "max_ongoing_requests, so jobs waiting for a replica are visible to Serve's autoscaler.",
    )
    runner: str | None = Field(
        None,
        description="Import path 'module:function' of a callable with reconstruct_bundle's signature "
        "(tests and custom engines); None = pipeline.reconstruct:reconstruct_bundle.",
    )

    def dispatch_slots(self) -> int:
        """Jobs in flight at the model's handle at once (running on a replica or queued for one)."""
        if self.max_concurrent_jobs is not None:
            return self.max_concurrent_jobs
        return self.autoscaling.max_replicas * self.max_ongoing_requests

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in model_names():
            raise ValueError(f"unknown model {v!r}; known: {list(model_names())}")
        return v


@dataclass(frozen=True)
class ModelDeploymentConfig:
    """Everything a model replica needs: its model config, the store, and the resolved GPU count."""

    model: ModelConfig
    store: StoreConfig
    num_gpus: float
