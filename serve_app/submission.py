"""Job submission: the small interface the ingress, batches and experiments queue jobs through.

:class:`JobSubmitter` owns what every way in shares: which models are known and served, the
queue limit (429 QUEUE_FULL), the job record, the stored upload and the hand-off to the
scheduler. Batches and experiments receive a ``JobSubmitter``, not the ingress object, so
they depend on this module alone and the ingress imports them without a cycle.
"""

from __future__ import annotations

import asyncio
import os
from typing import Protocol

from deployments.store import Store
from pipeline.config import get_preset
from pipeline.errors import InvalidInputError
from pipeline.registry import model_names

from . import constants as SC
from . import errors as E
from .config import AppArgs
from .jobs import JobBook, JobRecord, ModelRun, WebhookState, input_key, new_job_id


class JobQueue(Protocol):
    """The part of the scheduler submission needs."""

    def queued_count(self) -> int: ...

    async def submit(self, rec: JobRecord) -> None: ...


def parse_models(spec: str) -> list[str]:
    """'fusion' or 'fusion,nvdiffrec' -> unique names in order; unknown names raise (422)."""
    names = list(dict.fromkeys(s.strip() for s in (spec or "").split(",") if s.strip()))
    if not names:
        raise E.InvalidRequestError("model must name at least one model", details={"field": "model"})
    known = model_names()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InvalidInputError(
            f"unknown model(s) {unknown}; choose from {list(known)}",
            code="UNKNOWN_MODEL",
            details={"models": unknown},
        )
    return names


class JobSubmitter:
    """Queue jobs: checks (served model, preset, queue room), then record + upload + scheduler."""

    def __init__(self, args: AppArgs, store: Store, book: JobBook, queue: JobQueue, *, served: list[str], metrics=None):
        self.args = args
        self.store = store
        self.book = book
        self.queue = queue
        self.served = sorted(served)
        self.metrics = metrics

    def get_job(self, job_id: str) -> JobRecord | None:
        return self.book.get(job_id)

    def check_served(self, models: list[str]) -> None:
        """MODEL_UNAVAILABLE (503) for a known model this app does not serve."""
        unavailable = [m for m in models if m not in self.served]
        if unavailable:
            raise E.ModelUnavailableError(
                f"model(s) {unavailable} are not served by this deployment; served: {self.served}",
                details={"models": unavailable, "served": self.served},
            )

    def resolve_preset(self, preset: str | None) -> str:
        """The preset, or the app's default; UNKNOWN_PRESET (422) lists the valid names."""
        preset = preset or self.args.default_preset
        get_preset(preset)
        return preset

    def check_queue_room(self, n: int | None = None) -> None:
        """QUEUE_FULL (429) when one more job (``n`` None) or ``n`` more (a batch, an experiment) would pass
        ``max_queued_jobs``."""
        queued = self.queue.queued_count()
        limit = self.args.max_queued_jobs
        if n is None and queued >= limit:
            raise E.QueueFullError(
                f"{queued} jobs are queued (the limit is {limit}); retry later",
                retry_after_s=SC.QUEUE_FULL_RETRY_AFTER_S,
                details={"queued": queued},
            )
        if n is not None and queued + n > limit:
            raise E.QueueFullError(
                f"{n} jobs would join {queued} queued ones (the limit is {limit}); retry later or send fewer",
                retry_after_s=SC.QUEUE_FULL_RETRY_AFTER_S,
                details={"queued": queued, "requested": n, "limit": limit},
            )

    async def enqueue(
        self,
        data: bytes | str,
        *,
        models: list[str],
        preset: str,
        overrides: dict | None = None,
        webhook_url: str | None = None,
        webhook_secret: str | None = None,
        request_id: str | None = None,
        owner: str | None = None,
        job_id: str | None = None,
        input_ref: str | None = None,
    ) -> str:
        """Store ``data`` (a bundle ZIP) as a new job's input and queue it; returns the job id.

        ``data`` may be the path of a bundle ZIP on disk (stored by a streamed copy, never whole in memory).
        ``job_id``: an id the caller made (new_job_id) so that its own record could name the job first.
        ``input_ref``: the store key of a copy of ``data`` the job shares (nothing is stored for it).
        ``owner``: the name of the submitting API key (serve_app/auth.py); ``webhook_secret`` signs its webhook.
        """
        job_id = job_id or new_job_id()
        rec = JobRecord(
            job_id=job_id,
            models=list(models),
            preset=preset,
            runs={m: ModelRun() for m in models},
            webhook=WebhookState(url=webhook_url, secret=webhook_secret) if webhook_url else None,
            upload_bytes=os.path.getsize(data) if isinstance(data, str) else len(data),
            overrides=dict(overrides or {}),
            request_id=request_id,
            owner=owner,
            input_ref=input_ref,
        )
        if input_ref is None:
            put = self.store.put_file if isinstance(data, str) else self.store.put
            await asyncio.to_thread(put, input_key(job_id), data)
        await self.queue.submit(rec)
        if self.metrics is not None:
            self.metrics.submitted.inc()
        return job_id
