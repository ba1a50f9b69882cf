"""Artifacts are kept ``artifact_ttl_s`` after a job's terminal state, then deleted (the API answers 410)."""

from __future__ import annotations

import asyncio
import time

from deployments.store import Store

from ..jobs import JobBook, JobRecord, job_key
from ..logging import job_logger
from ..retention import record_due


def set_expiry(rec: JobRecord, ttl_s: float, *, now: float | None = None) -> None:
    """Give a terminal job its ``expires_at`` (kept when it has one)."""
    rec.expires_at = rec.expires_at or (time.time() if now is None else now) + ttl_s


def due(rec: JobRecord, now: float) -> bool:
    return rec.terminal and not rec.expired and rec.expires_at is not None and rec.expires_at <= now


async def sweep_expired(
    book: JobBook, store: Store, *, now: float | None = None, record_ttl_s: float | None = None
) -> int:
    """Delete the artifacts and upload of every job past ``expires_at``; returns how many expired.

    With ``record_ttl_s``, the record of a job expired that long ago goes too (serve_app/retention.py).
    """
    now = time.time() if now is None else now
    n = 0
    for rec in list(book.jobs.values()):
        if due(rec, now):
            await asyncio.to_thread(store.delete_prefix, job_key(rec.job_id, "models"))
            await asyncio.to_thread(store.delete_prefix, job_key(rec.job_id, "input"))
            rec.expired = True
            await book.save(rec)
            job_logger(rec.job_id).info("artifacts expired")
            n += 1
        elif record_ttl_s is not None and record_due(rec, now, record_ttl_s):
            await asyncio.to_thread(store.delete_prefix, job_key(rec.job_id))
            book.remove(rec.job_id)
            job_logger(rec.job_id).info("record expired")
    return n
