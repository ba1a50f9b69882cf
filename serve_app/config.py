"""Typed service configuration: what ``serve_config.yaml``'s ``args`` may hold.

``build_app(args: dict)`` validates the raw dict into :class:`AppArgs` first, so a typo
in the YAML fails at deploy time with a pydantic error naming the field.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deployments import constants as DC

from .experiments.settings import BatchSettings, ExperimentsSettings

#: Models the API knows. A known model that this app does not serve answers 503 MODEL_UNAVAILABLE.
KNOWN_MODELS: tuple[str, ...] = ("fusion", "nvdiffrec")


class StoreConfig(BaseModel):
    """Where job records, uploads and artifacts live."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["local", "s3"] = Field("local", description="Backend: a local directory or an S3 bucket.")
    path: str = Field("./runs/service", description="Root directory of the local store.")
    bucket: str | None = Field(None, description="S3 bucket (kind=s3).")
    prefix: str = Field("recon3d", description="Key prefix inside the S3 bucket.")
    endpoint_url: str | None = Field(None, description="S3 endpoint (MinIO, moto ...); None = AWS.")
    region: str | None = Field(None, description="S3 region name.")
    create_bucket: bool = Field(False, description="Create the bucket at start-up when it does not exist.")
    shared: bool = Field(
        False,
        description="kind=local only: the directory is a filesystem every Ray node mounts at the same path "
        "(NFS, EFS, ...). Without it the builder refuses a local store on a cluster of more than one node.",
    )

    @model_validator(mode="after")
    def _bucket_for_s3(self) -> StoreConfig:
        if self.kind == "s3" and not self.bucket:
            raise ValueError("store.kind 's3' needs store.bucket")
        return self


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

    name: str = Field(description=f"Model id, one of {list(KNOWN_MODELS)}.")
    num_gpus: float | None = Field(
        None, ge=0, description="GPUs per replica; None = 1 when the cluster has GPUs, else 0 (CPU fallback, logged)."
    )
    num_cpus: float = Field(1.0, gt=0, description="CPUs per replica.")
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
        if v not in KNOWN_MODELS:
            raise ValueError(f"unknown model {v!r}; known: {list(KNOWN_MODELS)}")
        return v


class UISettings(BaseModel):
    """The web page served at / and /ui (serve_app/ui.py)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Serve the page at /, /ui and /ui/<file>; False answers 404 there.")
    dashboard_url: str | None = Field(
        None, description="Ray dashboard link on the page; None = port 8265 on the host the page was loaded from."
    )
    grafana_url: str | None = Field(
        None,
        description="Grafana link on the page; None = $RAY_GRAFANA_IFRAME_HOST, else port 3000 on the page's host.",
    )


class AppArgs(BaseModel):
    """Arguments of :func:`serve_app.builder.build_app` (``args:`` in serve_config.yaml)."""

    model_config = ConfigDict(extra="forbid")

    store: StoreConfig = Field(default_factory=StoreConfig, description="Storage backend.")
    models: list[ModelConfig] = Field(
        default_factory=lambda: [ModelConfig(name="fusion")], description="Model deployments to serve."
    )
    default_preset: str = Field("balanced", description="Preset when the request names none.")
    max_upload_bytes: int = Field(DC.MAX_UPLOAD_BYTES, gt=0, description="Largest accepted request body (413 above).")
    max_queued_jobs: int = Field(DC.MAX_QUEUED_JOBS, ge=1, description="Queued jobs before 429 QUEUE_FULL.")
    job_timeout_s: float = Field(DC.JOB_TIMEOUT_S, gt=0, description="Wall-clock limit of one model run, seconds.")
    artifact_ttl_s: float = Field(DC.ARTIFACT_TTL_S, gt=0, description="Seconds artifacts are kept after a job ends.")
    max_attempts: int = Field(
        2, ge=1, description="Runs of a job at most; a job interrupted by a restart is retried while attempts remain."
    )
    fanout: bool = Field(True, description="Run per-view metrics and previews as Ray tasks after the model.")
    fanout_max_retries: int = Field(2, ge=0, description="Retries of a failed per-view task.")
    preview_views: int = Field(
        8, ge=1, description="Preview cameras around the object (textured + wireframe PNG each)."
    )
    fanout_num_cpus: float = Field(1.0, gt=0, description="CPUs each fan-out task reserves.")
    webhook_attempts: int = Field(3, ge=1, description="Webhook deliveries tried per terminal state.")
    webhook_backoff_s: float = Field(1.0, ge=0, description="First retry delay of a webhook; doubles each try.")
    sweep_interval_s: float = Field(DC.SWEEP_INTERVAL_S, gt=0, description="Seconds between TTL sweeps.")
    validate_pixels: bool = Field(
        True, description="Decode the images at submit time (load_bundle) so bad input fails with 422 before queueing."
    )
    ingress_num_cpus: float = Field(0.5, ge=0, description="CPUs reserved by the ingress replica.")
    experiments: ExperimentsSettings = Field(
        default_factory=ExperimentsSettings, description="Parameter sweeps and their metrics database."
    )
    batches: BatchSettings = Field(default_factory=BatchSettings, description="Many bundles per request.")
    ui: UISettings = Field(default_factory=UISettings, description="The web page.")
    ingress_resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources of the ingress replica (pin it to a node group)."
    )
    drain_timeout_s: float = Field(
        DC.DRAIN_TIMEOUT_S,
        ge=0,
        description="On redeploy/delete, seconds the old ingress waits for in-flight runs before re-queueing them.",
    )

    @field_validator("store", mode="before")
    @classmethod
    def _store_from_str(cls, v):
        # "s3://bucket/prefix" or a directory path are accepted for convenience.
        if isinstance(v, str):
            if v.startswith("s3://"):
                bucket, _, prefix = v[5:].partition("/")
                return {"kind": "s3", "bucket": bucket, "prefix": prefix}
            return {"kind": "local", "path": v}
        return v

    @field_validator("models", mode="before")
    @classmethod
    def _models_from_names(cls, v):
        # "fusion", ["fusion"], or full dicts.
        if isinstance(v, str):
            v = [s.strip() for s in v.split(",") if s.strip()]
        return [{"name": m} if isinstance(m, str) else m for m in v]

    @model_validator(mode="after")
    def _check(self) -> AppArgs:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        if not names:
            raise ValueError("serve at least one model")
        from pipeline.config import PRESETS

        if self.default_preset not in PRESETS:
            raise ValueError(f"default_preset {self.default_preset!r} is not one of {sorted(PRESETS)}")
        return self

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)
