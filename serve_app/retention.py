"""What the store may keep, and for how long: record TTL and crash leftovers.

* A job's files (upload, artifacts) go at ``expires_at`` (``artifact_ttl_s`` after it ended; the
  record then answers 410 JOB_EXPIRED). The record itself goes ``record_ttl_s`` later (then 404),
  so ``jobs/`` does not grow without bound and restarts do not reload every job ever run.
* A crash between writing a job's upload and its record leaves ``jobs/<id>/`` without a
  ``job.json``. At start-up, before anything new is written, :func:`orphan_job_ids` finds those
  folders (older than ``ORPHAN_GRACE_S``, so an old replica still writing during a redeploy is
  left alone) and the scheduler deletes them.
"""

from __future__ import annotations

import time

#: Seconds a job folder without a record is left alone (another replica may be writing it).
ORPHAN_GRACE_S = 3600.0


def record_due(rec, now: float, record_ttl_s: float) -> bool:
    """True when an expired job's record has outlived ``record_ttl_s`` after its files went."""
    return bool(rec.expired and rec.expires_at is not None and rec.expires_at + record_ttl_s <= now)


def job_created_at(job_id: str) -> float | None:
    """Unix seconds from a job id (``<13-digit ms>-<hex>``), None for a name that is not one."""
    head = job_id.split("-", 1)[0]
    return int(head) / 1000.0 if len(head) == 13 and head.isdigit() else None


def orphan_job_ids(keys: list[str], known: set[str], *, prefix: str = "jobs", now: float | None = None) -> list[str]:
    """Job ids that have files under ``prefix/<id>/`` but no record, older than ORPHAN_GRACE_S."""
    now = time.time() if now is None else now
    seen: set[str] = set()
    for key in keys:
        parts = key.split("/")
        if len(parts) >= 3 and parts[0] == prefix:
            seen.add(parts[1])
    out = []
    for job_id in sorted(seen - known):
        created = job_created_at(job_id)
        if created is not None and created + ORPHAN_GRACE_S <= now:
            out.append(job_id)
    return out
