"""Response and request bodies of the HTTP API (they shape the OpenAPI page at /docs)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from .jobs import ErrorInfo, JobRecord, JobStatus, ModelRun


class ErrorBody(BaseModel):
    error: ErrorInfo
    request_id: str


class JobLinks(BaseModel):
    self: str
    events: str
    download: str
    cancel: str


class JobAccepted(BaseModel):
    job_id: str
    status: JobStatus
    links: JobLinks


class ModelRunView(ModelRun):
    links: dict[str, str] = Field(default_factory=dict, description="File path -> URL of GET /jobs/{id}/files/{path}.")


class JobView(BaseModel):
    job_id: str
    status: JobStatus
    progress: float = Field(description="0-100; never decreases.")
    stage: str | None
    queue_position: int | None = Field(description="0 = next to run; null when not queued.")
    estimated_wait_s: float | None = Field(
        None,
        description="Rough seconds until a queued job starts: mean recent run time x (jobs ahead + runs in flight) "
        "/ running replicas; null when not queued or before any run finished.",
    )
    models: dict[str, ModelRunView]
    preset: str
    error: ErrorInfo | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    expires_at: float | None
    expired: bool
    cancel_requested: bool
    links: JobLinks


class JobList(BaseModel):
    items: list[JobView]
    total: int
    limit: int
    offset: int
    next_offset: int | None


class CancelRequest(BaseModel):
    confirm: bool = Field(False, description="True confirms the cancel asked for by the first call.")
    token: str | None = Field(None, description="The confirm_token of the first call (optional).")


class CancelAccepted(BaseModel):
    job_id: str
    status: JobStatus
    cancel_requested: bool


def links_for(job_id: str) -> JobLinks:
    base = f"/jobs/{job_id}"
    return JobLinks(self=base, events=f"{base}/events", download=f"{base}/download", cancel=f"{base}/cancel")


def job_view(rec: JobRecord, queue_position: int | None, estimated_wait_s: float | None = None) -> JobView:
    runs = {
        m: ModelRunView(**r.model_dump(), links={f: f"/jobs/{rec.job_id}/files/{m}/{f}" for f in r.files})
        for m, r in rec.runs.items()
    }
    return JobView(
        job_id=rec.job_id,
        status=rec.status,
        progress=rec.progress,
        stage=rec.stage,
        queue_position=queue_position,
        estimated_wait_s=estimated_wait_s,
        models=runs,
        preset=rec.preset,
        error=rec.error,
        created_at=rec.created_at,
        started_at=rec.started_at,
        finished_at=rec.finished_at,
        expires_at=rec.expires_at,
        expired=rec.expired,
        cancel_requested=rec.cancel_requested,
        links=links_for(rec.job_id),
    )
