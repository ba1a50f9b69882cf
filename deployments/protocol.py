"""What crosses a model deployment's handle, and the job error codes: one module both sides import.

The scheduler (``serve_app``) sends a :class:`ModelRequest` (ids and store keys, never bytes or
arrays) as a plain dict; the model server (:mod:`deployments.model_server`) streams back events
as plain dicts::

    {"type": "progress", "stage": "bake_texture", "fraction": 0.62}              # any number
    {"type": "quality", "quality": {"status": ..., "psnr": ...}, "error": None}   # only when it evaluates
    {"type": "result", "result": {...result.json...}, "files": [...], "elapsed_s": 12.3}   # or
    {"type": "error", "error": {"code": "MODEL_OOM", "message": "...", "details": {...}}}

:func:`parse_event` turns them back into :class:`ProgressEvent`, :class:`QualityEvent`,
:class:`ResultEvent` or :class:`ErrorEvent`. Errors travel as data (the last event), never as exceptions, so nothing
depends on how Ray wraps exception types across a handle. This module imports neither Ray nor
the service, only the library's result type.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from pipeline.errors import CanceledError, ModelOOMError, ReconstructionFailedError, is_oom
from pipeline.quality import QUALITY_FAILED
from pipeline.result import ReconstructionResult

# Re-exported: quality.json's failure code (owned by pipeline.quality) and the one out-of-memory test (pipeline.errors).
__all__ = ["QUALITY_FAILED", "is_oom"]

# ---------------------------------------------------------------- job error codes (one place)
# The library's own codes are its error classes' (``code``); the service's are defined here.

#: The run passed its deadline (the model stopped at a cancel checkpoint, or the scheduler gave up).
JOB_TIMEOUT = "JOB_TIMEOUT"
#: The service stopped during the run and its attempts are used up.
JOB_INTERRUPTED = "JOB_INTERRUPTED"
#: The model raised something that is not a ReconError, or its replica call failed.
MODEL_FAILED = ReconstructionFailedError.code
#: The model ran out of (GPU or host) memory.
MODEL_OOM = ModelOOMError.code
#: The job was canceled.
CANCELED = CanceledError.code
#: The scheduler itself failed while running the job.
INTERNAL = "INTERNAL"
#: The run's replica (or its node) died on its last allowed attempt.
REPLICA_LOST = "REPLICA_LOST"
#: The attempt was superseded (its job was retried elsewhere): it publishes nothing.
STALE_ATTEMPT = "STALE_ATTEMPT"
#: The model is known but not served (any more).
MODEL_UNAVAILABLE = "MODEL_UNAVAILABLE"


# ---------------------------------------------------------------- request


@dataclass(frozen=True)
class ModelRequest:
    """What crosses the handle: ids and store keys, never bytes or arrays."""

    job_id: str
    model: str
    preset: str
    input_key: str
    output_prefix: str
    cancel_key: str
    deadline: float
    """Unix time after which the run stops with JOB_TIMEOUT."""
    attempt: int = 1
    attempt_key: str | None = None
    """Store key holding the number of the attempt that owns ``output_prefix`` (fences a replaced attempt)."""
    overrides: dict | None = None
    """Config parameters over the preset, dotted keys (pipeline.overrides)."""
    evaluate: bool = False
    """Score the mesh in the replica's own process (quality.json, previews) before the result, as the
    CLI does; False: the scheduler fans the evaluation out as Ray tasks (``serve_app.fanout``)."""
    preview_views: int = 8
    """Preview cameras around the object when the replica evaluates (``AppArgs.preview_views``)."""

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- events


@dataclass(frozen=True)
class ProgressEvent:
    stage: str
    fraction: float
    """Overall fraction of the model run, 0..1."""
    type: str = "progress"

    def to_dict(self) -> dict:
        return {"type": self.type, "stage": self.stage, "fraction": float(self.fraction)}


@dataclass(frozen=True)
class QualityEvent:
    """quality.json's summary, sent by a replica that evaluates (``ModelRequest.evaluate``) before its previews.

    ``quality``: :class:`~pipeline.result.QualitySummary` as a dict; ``error``: ``{code, message}``
    when the report's status is failure, or when it could not be built (QUALITY_FAILED)."""

    quality: dict | None
    error: dict | None = None
    type: str = "quality"

    def to_dict(self) -> dict:
        return {"type": self.type, "quality": self.quality, "error": self.error}


@dataclass(frozen=True)
class ErrorEvent:
    code: str
    message: str = ""
    details: dict = field(default_factory=dict)
    type: str = "error"

    def to_dict(self) -> dict:
        return {"type": self.type, "error": {"code": self.code, "message": self.message, "details": self.details}}

    @property
    def error(self) -> dict:
        return {"code": self.code, "message": self.message, "details": dict(self.details)}


@dataclass(frozen=True)
class ResultEvent:
    result: ReconstructionResult
    files: list[str]
    """Paths relative to the request's ``output_prefix``."""
    elapsed_s: float = 0.0
    evaluation_inputs: dict | None = None
    """Ray object refs of what the fan-out scores, put by the model replica once the mesh existed:
    ``mesh`` (the published mesh read back), ``frames`` (the PosedFrames it was made from) and
    ``normals`` (the previews' corner normals). None: the fan-out reads them from the store."""
    evaluation: dict | None = None
    """What the replica's own evaluation gave (``ModelRequest.evaluate``): ``quality`` and ``error`` as
    in :class:`QualityEvent`, ``warnings``; its files are in ``files``. None: the replica did not evaluate."""
    type: str = "result"

    def to_dict(self) -> dict:
        out = {
            "type": self.type,
            "result": self.result.to_dict(),
            "files": list(self.files),
            "elapsed_s": self.elapsed_s,
        }
        if self.evaluation_inputs:
            out["evaluation_inputs"] = dict(self.evaluation_inputs)
        if self.evaluation is not None:
            out["evaluation"] = dict(self.evaluation)
        return out


ModelEvent = ProgressEvent | QualityEvent | ResultEvent | ErrorEvent


def parse_event(d: dict) -> ModelEvent:
    """The typed event of a dict that crossed the handle."""
    kind = d.get("type")
    if kind == "progress":
        return ProgressEvent(stage=d["stage"], fraction=float(d["fraction"]))
    if kind == "result":
        return ResultEvent(
            result=ReconstructionResult.from_dict(d["result"]),
            files=list(d["files"]),
            elapsed_s=d.get("elapsed_s", 0.0),
            evaluation_inputs=d.get("evaluation_inputs") or None,
            evaluation=d.get("evaluation"),
        )
    if kind == "quality":
        return QualityEvent(quality=d.get("quality"), error=d.get("error"))
    if kind == "error":
        e = d.get("error") or {}
        return ErrorEvent(
            code=e.get("code", MODEL_FAILED), message=e.get("message", ""), details=e.get("details") or {}
        )
    raise ValueError(f"unknown model event {kind!r}")
