"""Typed service configuration: what ``serve_config.yaml``'s ``args`` may hold.

``build_app(args: dict)`` validates the raw dict into :class:`AppArgs` first, so a typo
in the YAML fails at deploy time with a pydantic error naming the field.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deployments.config import AutoscalingConfig, ModelConfig
from deployments.store import StoreConfig
from pipeline.registry import model_names

from . import constants as SC
from .auth import AuthSettings
from .experiments.settings import BatchSettings, ExperimentsSettings
from .quotas import QuotaSettings
from .webhooks import WebhookSettings

__all__ = ["AppArgs", "AutoscalingConfig", "ModelConfig", "StoreConfig", "known_models"]


def known_models() -> tuple[str, ...]:
    """Models the API knows (the registry). A known model this app does not serve answers 503 MODEL_UNAVAILABLE."""
    return model_names()


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
    max_upload_bytes: int = Field(SC.MAX_UPLOAD_BYTES, gt=0, description="Largest accepted request body (413 above).")
    max_queued_jobs: int = Field(SC.MAX_QUEUED_JOBS, ge=1, description="Queued jobs before 429 QUEUE_FULL.")
    job_timeout_s: float = Field(SC.JOB_TIMEOUT_S, gt=0, description="Wall-clock limit of one model run, seconds.")
    artifact_ttl_s: float = Field(SC.ARTIFACT_TTL_S, gt=0, description="Seconds artifacts are kept after a job ends.")
    record_ttl_s: float = Field(
        SC.RECORD_TTL_S,
        gt=0,
        description="Seconds a job's record is kept after its artifacts expired (410 JOB_EXPIRED until then, 404 after).",
    )
    max_attempts: int = Field(
        2, ge=1, description="Runs of a job at most; a job interrupted by a restart is retried while attempts remain."
    )
    fanout: bool = Field(True, description="Make quality.json and the previews of each model run (where: evaluate_in).")
    evaluate_in: Literal["auto", "replica", "tasks"] = Field(
        "auto",
        description="Where quality.json and the previews are made: 'replica' = in the model replica's process "
        "after its run (as the CLI does); 'tasks' = fanned out as Ray tasks once the mesh is published; "
        "'auto' = 'replica' while the Ray cluster has one node, else 'tasks' (decided per run).",
    )
    fanout_max_retries: int = Field(2, ge=0, description="Retries of a failed per-view task.")
    preview_views: int = Field(
        8, ge=1, description="Preview cameras around the object (textured + wireframe PNG each)."
    )
    fanout_num_cpus: float = Field(1.0, gt=0, description="CPUs each fan-out task reserves.")
    webhook_attempts: int = Field(3, ge=1, description="Webhook deliveries tried per terminal state.")
    webhook_backoff_s: float = Field(1.0, ge=0, description="First retry delay of a webhook; doubles each try.")
    sweep_interval_s: float = Field(SC.SWEEP_INTERVAL_S, gt=0, description="Seconds between TTL sweeps.")
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
    webhooks: WebhookSettings = Field(
        default_factory=WebhookSettings, description="Webhook address checks, deadline, size cap (webhooks.py)."
    )
    quotas: QuotaSettings = Field(
        default_factory=QuotaSettings, description="Per-key quotas of queued jobs and stored bytes (quotas.py)."
    )
    auth: AuthSettings = Field(
        default_factory=AuthSettings, description="API keys (serve_app/auth.py); none = keyless on loopback only."
    )
    drain_timeout_s: float = Field(
        SC.DRAIN_TIMEOUT_S,
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
