"""Typed errors of the reconstruction library.

Every error carries a stable ``code`` (the service maps codes to HTTP statuses in
``serve_app/middleware.py``), a human message saying what is wrong and where, and a
JSON-serialisable ``details`` dict. All errors survive pickling, so they cross Ray
task and actor boundaries unchanged.
"""

from __future__ import annotations

from typing import Any


class ReconError(Exception):
    """Base class. ``code`` is stable API surface: never rename a code."""

    code: str = "RECON_ERROR"

    def __init__(self, message: str, *, code: str | None = None, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = dict(details or {})

    def __reduce__(self):
        return (_rebuild_error, (type(self), self.message, self.code, self.details))

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def _rebuild_error(cls, message, code, details):
    return cls(message, code=code, details=details)


class InvalidInputError(ReconError):
    """The bundle is malformed: the client must fix it (HTTP 422)."""

    code = "INVALID_INPUT"


class MissingViewError(InvalidInputError):
    code = "MISSING_VIEW"


class UnknownViewError(InvalidInputError):
    code = "UNKNOWN_VIEW"


class MissingDepthError(InvalidInputError):
    code = "MISSING_DEPTH"


class InvalidImageError(InvalidInputError):
    code = "INVALID_IMAGE"


class ResolutionMismatchError(InvalidInputError):
    code = "RESOLUTION_MISMATCH"


class EmptyDepthError(InvalidInputError):
    code = "EMPTY_DEPTH"


class InvalidTransformsError(InvalidInputError):
    code = "INVALID_TRANSFORMS"


class InvalidArchiveError(InvalidInputError):
    code = "INVALID_ARCHIVE"


class UnsafeArchiveError(InvalidInputError):
    code = "UNSAFE_ARCHIVE"


class InputTooLargeError(InvalidInputError):
    """A file, an archive or an image exceeds a size limit (HTTP 413)."""

    code = "INPUT_TOO_LARGE"


class UnsupportedMediaError(InvalidInputError):
    """The upload is not a type we read (HTTP 415)."""

    code = "UNSUPPORTED_MEDIA_TYPE"


class InsufficientViewsError(InvalidInputError):
    code = "INSUFFICIENT_VIEWS"


class ReconstructionFailedError(ReconError):
    """A stage could not produce a usable result from valid input."""

    code = "MODEL_FAILED"


class EmptyReconstructionError(ReconstructionFailedError):
    code = "EMPTY_RECONSTRUCTION"


class UVAtlasError(ReconstructionFailedError):
    code = "UV_ATLAS_FAILED"


class ModelOOMError(ReconError):
    code = "MODEL_OOM"


def is_oom(e: BaseException) -> bool:
    """Whether ``e`` means out of memory: MemoryError (host), :class:`ModelOOMError`, torch's
    ``OutOfMemoryError`` (CUDA; matched by name, so this module needs no torch), or a message saying so."""
    if isinstance(e, (MemoryError, ModelOOMError)):
        return True
    return type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower()


class ConvergenceError(ReconError):
    code = "MODEL_CONVERGENCE_FAILED"


class StageTimeoutError(ReconError):
    code = "STAGE_TIMEOUT"


class CanceledError(ReconError):
    """Raised inside a stage when the caller asked to stop."""

    code = "CANCELED"
