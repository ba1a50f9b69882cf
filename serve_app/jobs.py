"""Job records and their durable store.

A job is one upload reconstructed by one or more models. Its record lives at
``jobs/<id>/job.json`` in the :class:`~deployments.store.Store`; the upload at
``jobs/<id>/input/bundle.zip``; each model's artifacts under ``jobs/<id>/models/<model>/``;
the cancel flag a running model deployment polls at ``jobs/<id>/cancel``.

:class:`JobBook` keeps every record in memory (the ingress replica owns the scheduler),
writes through to the store on every state change (progress at most every
``PROGRESS_PERSIST_INTERVAL_S``), and wakes Server-Sent-Event listeners.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from typing import Literal

from pydantic import BaseModel, Field

from deployments.store import Store

from . import constants as SC

JobStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "canceled"})

JOBS_PREFIX = "jobs"


def job_key(job_id: str, *parts: str) -> str:
    return "/".join((JOBS_PREFIX, job_id, *parts))


def record_key(job_id: str) -> str:
    return job_key(job_id, "job.json")


def input_key(job_id: str) -> str:
    return job_key(job_id, "input", "bundle.zip")


def job_input_key(rec: JobRecord) -> str:
    """Store key of the job's upload: its own, or the one copy an experiment's runs share."""
    return rec.input_ref or input_key(rec.job_id)


def cancel_key(job_id: str) -> str:
    return job_key(job_id, "cancel")


def artifacts_prefix(job_id: str, model: str) -> str:
    return job_key(job_id, "models", model)


def write_artifacts(zf, store: Store, rec: JobRecord, *, prefix: str = "") -> None:
    """Add every model's files of ``rec`` to the open ZipFile ``zf`` as ``<prefix><model>/<file>``."""
    for m, run in rec.runs.items():
        for rel in run.files:
            zf.writestr(f"{prefix}{m}/{rel}", store.get(f"{artifacts_prefix(rec.job_id, m)}/{rel}"))


def new_job_id() -> str:
    # Sortable by creation time (ms), then random: listings come out in submission order.
    return f"{int(time.time() * 1000):013d}-{uuid.uuid4().hex[:10]}"


class ErrorInfo(BaseModel):
    code: str
    message: str
    details: dict = Field(default_factory=dict)


class ModelRun(BaseModel):
    """One model's run of a job."""

    status: JobStatus = "queued"
    stage: str | None = None
    progress: float = Field(0.0, description="0-100, never decreases within an attempt.")
    attempts: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    timings_s: dict[str, float] = Field(default_factory=dict)
    quality: dict | None = Field(None, description="Summary of quality.json (status, psnr, ssim ...).")
    files: list[str] = Field(default_factory=list, description="Artifact paths relative to the model folder.")
    warnings: list[str] = Field(default_factory=list)
    error: ErrorInfo | None = None


class WebhookState(BaseModel):
    url: str
    secret: str | None = Field(
        None, description="HMAC secret of the signature (derived from the submitting key); None = the service's."
    )
    delivered: bool = False
    attempts: int = 0
    last_error: str | None = None


class JobRecord(BaseModel):
    """Everything the service knows about one job (persisted as job.json)."""

    job_id: str
    status: JobStatus = "queued"
    models: list[str]
    preset: str
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    progress: float = 0.0
    stage: str | None = None
    runs: dict[str, ModelRun] = Field(default_factory=dict)
    error: ErrorInfo | None = None
    webhook: WebhookState | None = None
    cancel_requested: bool = False
    cancel_token: str | None = None
    cancel_token_expires_at: float | None = None
    expires_at: float | None = None
    expired: bool = False
    upload_bytes: int = 0
    request_id: str | None = None
    owner: str | None = Field(None, description="Name of the API key that submitted the job (serve_app/auth.py).")
    input_ref: str | None = Field(
        None, description="Store key of a shared upload (an experiment's one copy); None = the job's own."
    )
    overrides: dict = Field(default_factory=dict, description="Config parameters over the preset (pipeline.overrides).")

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def refresh_summary(self) -> None:
        """Recompute the job's status, stage and progress from its model runs.

        Progress is the mean of the runs' progress and never goes backwards.
        """
        runs = list(self.runs.values())
        statuses = {r.status for r in runs}
        if statuses <= TERMINAL:
            if "canceled" in statuses or self.cancel_requested:
                status = "canceled"
            elif "failed" in statuses:
                status = "failed"
            else:
                status = "succeeded"
        elif "running" in statuses or (statuses & TERMINAL):
            status = "running"
        else:
            status = "queued"
        self.status = status
        mean = sum(r.progress for r in runs) / max(len(runs), 1)
        if status == "succeeded":
            mean = 100.0
        self.progress = round(max(self.progress, min(mean, 100.0)), 2)
        running = [r for r in runs if r.status == "running" and r.stage]
        self.stage = running[0].stage if running else ("done" if self.terminal else self.stage)
        if self.terminal:
            if self.finished_at is None:
                self.finished_at = time.time()
            failed = [(m, r) for m, r in self.runs.items() if r.status == "failed" and r.error is not None]
            if status == "failed" and failed and self.error is None:
                m, r = failed[0]
                self.error = ErrorInfo(
                    code=r.error.code, message=f"{m}: {r.error.message}", details={"model": m, **r.error.details}
                )

    def issue_cancel_token(self, ttl_s: float) -> str:
        self.cancel_token = secrets.token_urlsafe(12)
        self.cancel_token_expires_at = time.time() + ttl_s
        return self.cancel_token

    def cancel_token_valid(self, token: str | None) -> bool:
        if self.cancel_token is None or (self.cancel_token_expires_at or 0) < time.time():
            return False
        # Bytes: compare_digest refuses a str with non-ASCII characters (a TypeError, a 500).
        return token is None or secrets.compare_digest(token.encode(), self.cancel_token.encode())


class JobBook:
    """In-memory index of job records, written through to the store."""

    def __init__(self, store: Store):
        self.store = store
        self.jobs: dict[str, JobRecord] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._changed: dict[str, asyncio.Event] = {}
        self._last_persist: dict[str, float] = {}

    # ------------------------------------------------------------ loading

    def load_all(self) -> list[JobRecord]:
        """Read every job.json from the store (start-up); corrupt records are skipped."""
        for key in self.store.list(JOBS_PREFIX):
            if not key.endswith("/job.json"):
                continue
            try:
                rec = JobRecord.model_validate_json(self.store.get(key))
            except (KeyError, ValueError):
                continue
            self.jobs[rec.job_id] = rec
        return sorted(self.jobs.values(), key=lambda r: r.created_at)

    # ------------------------------------------------------------ access

    def get(self, job_id: str) -> JobRecord | None:
        return self.jobs.get(job_id)

    def add(self, rec: JobRecord) -> None:
        self.jobs[rec.job_id] = rec

    def remove(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)
        self._locks.pop(job_id, None)
        self._last_persist.pop(job_id, None)
        ev = self._changed.pop(job_id, None)
        if ev is not None:
            ev.set()

    def list(self, status: str | None = None) -> list[JobRecord]:
        recs = sorted(self.jobs.values(), key=lambda r: r.created_at, reverse=True)
        return [r for r in recs if status is None or r.status == status]

    def count(self, status: str) -> int:
        return sum(1 for r in self.jobs.values() if r.status == status)

    # ------------------------------------------------------------ change + persistence

    def changed_event(self, job_id: str) -> asyncio.Event:
        return self._changed.setdefault(job_id, asyncio.Event())

    def notify(self, job_id: str) -> None:
        ev = self._changed.pop(job_id, None)
        if ev is not None:
            ev.set()

    async def save(self, rec: JobRecord, *, force: bool = True) -> None:
        """Persist ``rec`` (serialised under a per-job lock so the newest state lands last) and notify."""
        rec.updated_at = time.time()
        self.notify(rec.job_id)
        now = time.monotonic()
        if not force and now - self._last_persist.get(rec.job_id, 0.0) < SC.PROGRESS_PERSIST_INTERVAL_S:
            return
        lock = self._locks.setdefault(rec.job_id, asyncio.Lock())
        async with lock:
            if rec.job_id not in self.jobs:
                return  # deleted meanwhile
            self._last_persist[rec.job_id] = time.monotonic()
            data = rec.model_dump_json(indent=1).encode()
            await asyncio.to_thread(self.store.put, record_key(rec.job_id), data)
