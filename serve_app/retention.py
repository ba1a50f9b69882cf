"""What the store may keep, and for how long: one TTL for jobs, experiments and batches, and crash leftovers.

* **Jobs.** A job's files (upload, artifacts) go at ``expires_at`` (``artifact_ttl_s`` after it
  ended; the record then answers 410 JOB_EXPIRED). The record itself goes ``record_ttl_s`` later
  (then 404), so ``jobs/`` does not grow without bound and restarts do not reload every job ever run.
* **Experiments.** An experiment ends when every run's job is terminal (``finished_at``). Its
  files (the one shared copy of each bundle, ``experiments/<id>/input/``, and the copied run
  outputs, ``experiments/<id>/runs/``) go ``artifact_ttl_s`` later (the download then answers
  410 EXPERIMENT_EXPIRED); its database rows go ``record_ttl_s`` after that (then 404).
* **Batches.** A batch stores no files of its own (each item is a job with its own upload): its
  download answers 410 BATCH_EXPIRED once every item's files expired, and ``batch.json`` goes
  when none of its items' job records is left (the jobs' record TTL), then 404.
* **Crash leftovers.** A crash between writing a job's upload and its record leaves
  ``jobs/<id>/`` without a ``job.json``; one between storing an experiment's bundle and writing
  its rows leaves ``experiments/<id>/`` without rows. At start-up, before anything new is
  written, :func:`orphan_ids` finds those folders (older than ``ORPHAN_GRACE_S``, so an old
  replica still writing during a redeploy is left alone) and their owners delete them. A batch
  whose jobs were never queued is a batch without job records: the batch rule above removes it.
"""

from __future__ import annotations

import asyncio
import time

from deployments.store import Store

from .jobs import JobBook, JobRecord, job_key
from .logging import job_logger

#: Seconds a folder without a record is left alone (another replica may be writing it).
ORPHAN_GRACE_S = 3600.0


# ---------------------------------------------------------------- jobs


def set_expiry(rec: JobRecord, ttl_s: float, *, now: float | None = None) -> None:
    """Give a terminal job its ``expires_at`` (kept when it has one)."""
    rec.expires_at = rec.expires_at or (time.time() if now is None else now) + ttl_s


def due(rec: JobRecord, now: float) -> bool:
    """True when a terminal job's files are past ``expires_at`` and not yet deleted."""
    return rec.terminal and not rec.expired and rec.expires_at is not None and rec.expires_at <= now


def record_due(rec, now: float, record_ttl_s: float) -> bool:
    """True when an expired job's record has outlived ``record_ttl_s`` after its files went."""
    return bool(rec.expired and rec.expires_at is not None and rec.expires_at + record_ttl_s <= now)


async def sweep_expired(
    book: JobBook, store: Store, *, now: float | None = None, record_ttl_s: float | None = None
) -> int:
    """Delete the artifacts and upload of every job past ``expires_at``; returns how many expired.

    With ``record_ttl_s``, the record of a job expired that long ago goes too.
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


# ---------------------------------------------------------------- experiments and batches


def experiment_files_due(finished_at: float | None, files_expired_at: float | None, now: float, ttl_s: float) -> bool:
    """True when an ended experiment's files are ``ttl_s`` (artifact_ttl_s) old and still stored."""
    return finished_at is not None and files_expired_at is None and finished_at + ttl_s <= now


def experiment_record_due(files_expired_at: float | None, now: float, record_ttl_s: float) -> bool:
    """True when an experiment's rows have outlived ``record_ttl_s`` after its files went."""
    return files_expired_at is not None and files_expired_at + record_ttl_s <= now


def batch_files_expired(jobs: list[JobRecord | None]) -> bool:
    """True when no item of a batch has files left: each job is expired, or gone."""
    return all(job is None or job.expired for job in jobs)


def batch_record_due(created_at: float, jobs: list[JobRecord | None], now: float) -> bool:
    """True when none of a batch's item jobs has a record left (past ORPHAN_GRACE_S: a batch being
    submitted writes its record before its jobs)."""
    return all(job is None for job in jobs) and created_at + ORPHAN_GRACE_S <= now


# ---------------------------------------------------------------- crash leftovers


def created_at_of_id(record_id: str) -> float | None:
    """Unix seconds from an id ``[<kind>-]<13-digit ms>-<hex>`` (job, ``exp-``, ``batch-``); None for
    a name that is not one."""
    parts = record_id.split("-")
    head = parts[1] if len(parts) == 3 and parts[0] in ("exp", "batch") else parts[0]
    return int(head) / 1000.0 if len(head) == 13 and head.isdigit() else None


def orphan_ids(keys: list[str], known: set[str], *, prefix: str, now: float | None = None) -> list[str]:
    """Ids that have files under ``prefix/<id>/`` but no record, older than ORPHAN_GRACE_S."""
    now = time.time() if now is None else now
    seen: set[str] = set()
    for key in keys:
        parts = key.split("/")
        if len(parts) >= 3 and parts[0] == prefix:
            seen.add(parts[1])
    out = []
    for record_id in sorted(seen - known):
        created = created_at_of_id(record_id)
        if created is not None and created + ORPHAN_GRACE_S <= now:
            out.append(record_id)
    return out


def orphan_job_ids(keys: list[str], known: set[str], *, prefix: str = "jobs", now: float | None = None) -> list[str]:
    """Job ids that have files under ``prefix/<id>/`` but no ``job.json``, older than ORPHAN_GRACE_S."""
    return orphan_ids(keys, known, prefix=prefix, now=now)
