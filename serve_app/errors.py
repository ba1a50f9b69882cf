"""Service errors: stable codes, no HTTP (serve_app/middleware.py maps codes to statuses).

They subclass :class:`pipeline.errors.ReconError`, so they pickle across handles and
share one ``to_dict()`` shape with the library's errors.
"""

from __future__ import annotations

# Job-level failure codes (a job's ``error``, never an HTTP status), defined once, next to the events that carry them.
from deployments.protocol import (  # noqa: F401
    CANCELED,
    INTERNAL,
    JOB_INTERRUPTED,
    JOB_TIMEOUT,
    MODEL_FAILED,
    MODEL_OOM,
    MODEL_UNAVAILABLE,
    QUALITY_FAILED,
    REPLICA_LOST,
    STALE_ATTEMPT,
)
from pipeline.errors import ReconError


class ServiceError(ReconError):
    code = "SERVICE_ERROR"


class InvalidRequestError(ServiceError):
    """A form field or query parameter is wrong (HTTP 422)."""

    code = "INVALID_REQUEST"


class JobNotFoundError(ServiceError):
    code = "JOB_NOT_FOUND"


class JobNotReadyError(ServiceError):
    """The job has not succeeded (yet), so it has no artifacts to download."""

    code = "JOB_NOT_READY"


class JobExpiredError(ServiceError):
    """The job's artifacts passed their TTL and were deleted."""

    code = "JOB_EXPIRED"


class JobFinishedError(ServiceError):
    """The job already reached a terminal state: it cannot be canceled."""

    code = "JOB_ALREADY_FINISHED"


class CancelConfirmationRequiredError(ServiceError):
    """First step of the two-step cancel: repeat the call with ``{"confirm": true}``."""

    code = "CANCEL_CONFIRMATION_REQUIRED"


class QueueFullError(ServiceError):
    code = "QUEUE_FULL"

    def __init__(self, message: str, *, retry_after_s: int, **kw):
        details = dict(kw.pop("details", None) or {})
        details.setdefault("retry_after_s", int(retry_after_s))
        super().__init__(message, details=details, **kw)
        self.retry_after_s = int(details["retry_after_s"])

    def __reduce__(self):
        return (_rebuild_queue_full, (self.message, self.details))


def _rebuild_queue_full(message, details):
    return QueueFullError(message, retry_after_s=details["retry_after_s"], details=details)


class ModelUnavailableError(ServiceError):
    """The model is known but not served by this app, or its deployment is not healthy."""

    code = MODEL_UNAVAILABLE


class NotFoundError(ServiceError):
    """No such route or page file (HTTP 404)."""

    code = "NOT_FOUND"


class FileNotFoundInJobError(ServiceError):
    code = "FILE_NOT_FOUND"


class InvalidPathError(ServiceError):
    """A file path that is absolute or climbs out of the job's folder."""

    code = "INVALID_PATH"


class NotReadyError(ServiceError):
    """The service is starting (recovery not finished) or a dependency is down."""

    code = "SERVICE_NOT_READY"
