"""Per-key quotas: queued jobs (429 ``QUOTA_QUEUED_JOBS``) and stored upload bytes (413 ``QUOTA_STORAGE``).

They apply to every ``user`` key; an ``admin`` key and the keyless local caller are exempt.
A key's usage is read from the job records it owns (:class:`~serve_app.jobs.JobBook`):
queued jobs are its jobs in ``queued``; stored bytes are the uploads of its jobs whose
files have not expired yet (``upload_bytes``; artifacts are not counted).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from . import errors as E
from .auth import Principal


class QuotaSettings(BaseModel):
    """``quotas:`` in AppArgs (None = no quota)."""

    model_config = ConfigDict(extra="forbid")

    max_queued_jobs_per_key: int | None = Field(
        None, ge=1, description="Jobs one user key may have queued at once (429 QUOTA_QUEUED_JOBS above)."
    )
    max_stored_bytes_per_key: int | None = Field(
        None, ge=1, description="Upload bytes one user key may keep stored (413 QUOTA_STORAGE above)."
    )


class QueuedJobsQuotaError(E.ServiceError):
    code = "QUOTA_QUEUED_JOBS"


class StorageQuotaError(E.ServiceError):
    code = "QUOTA_STORAGE"


def usage(book, owner: str) -> tuple[int, int]:
    """(queued jobs, stored upload bytes) of ``owner``."""
    queued = stored = 0
    for rec in book.jobs.values():
        if rec.owner != owner:
            continue
        queued += rec.status == "queued"
        if not rec.expired:
            stored += rec.upload_bytes
    return queued, stored


def check_quota(settings: QuotaSettings, book, principal: Principal, *, jobs: int = 0, new_bytes: int = 0) -> None:
    """Refuse ``jobs`` more queued jobs or ``new_bytes`` more stored bytes past the caller's quota."""
    if principal.admin or (settings.max_queued_jobs_per_key is None and settings.max_stored_bytes_per_key is None):
        return
    queued, stored = usage(book, principal.name)
    limit = settings.max_queued_jobs_per_key
    if limit is not None and jobs and queued + jobs > limit:
        raise QueuedJobsQuotaError(
            f"key {principal.name!r} has {queued} jobs queued; its quota is {limit} (wait for some to start)",
            details={"queued": queued, "requested": jobs, "limit": limit},
        )
    limit = settings.max_stored_bytes_per_key
    if limit is not None and new_bytes and stored + new_bytes > limit:
        raise StorageQuotaError(
            f"key {principal.name!r} stores {stored} bytes of uploads; {new_bytes} more would pass its quota of "
            f"{limit} (DELETE finished jobs, or wait for them to expire)",
            details={"stored": stored, "requested": new_bytes, "limit": limit},
        )
