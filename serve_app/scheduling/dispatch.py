"""One model run through a deployment handle: the request, the event stream, and what the run record learns.

:func:`stream_run` calls ``handle.options(stream=True).run.remote(request)`` and returns the
final typed event (:mod:`deployments.protocol`); ``apply_*`` write an event into a
:class:`~serve_app.jobs.ModelRun`. A handle is anything with that call shape: tests pass a
fake that yields event dicts, without Ray.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import ray.exceptions as RE
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

from deployments.protocol import (
    JOB_TIMEOUT,
    MODEL_FAILED,
    ErrorEvent,
    ModelRequest,
    ProgressEvent,
    QualityEvent,
    ResultEvent,
    parse_event,
)

from .. import constants as SC
from .. import errors as E
from ..jobs import ErrorInfo, JobRecord, ModelRun, artifacts_prefix, cancel_key, job_input_key, job_key

#: Errors of a handle call that mean the replica (or its node) is gone, not that the job is bad.
REPLICA_LOST_ERRORS: tuple[type[BaseException], ...] = (
    RE.RayActorError,  # ActorDiedError, ActorUnavailableError
    RE.NodeDiedError,
    RE.WorkerCrashedError,
    RE.ObjectLostError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)


def attempt_key(job_id: str, model: str) -> str:
    """Store key holding the attempt number that owns the model's output folder."""
    return job_key(job_id, "attempts", model)


def model_request(
    rec: JobRecord, model: str, attempt: int, job_timeout_s: float, *, evaluate: bool = False, preview_views: int = 8
) -> ModelRequest:
    """The request of attempt ``attempt`` of ``rec``'s run of ``model``; ``evaluate``: the replica scores its mesh
    (``preview_views`` preview cameras)."""
    return ModelRequest(
        job_id=rec.job_id,
        model=model,
        preset=rec.preset,
        input_key=job_input_key(rec),
        output_prefix=artifacts_prefix(rec.job_id, model),
        cancel_key=cancel_key(rec.job_id),
        deadline=time.time() + job_timeout_s,
        attempt=attempt,
        overrides=rec.overrides or None,
        attempt_key=attempt_key(rec.job_id, model),
        evaluate=evaluate,
        preview_views=preview_views,
    )


async def stream_run(
    handle,
    req: ModelRequest,
    *,
    on_progress: Callable[[ProgressEvent], Awaitable[None]],
    timeout_s: float,
    on_deadline: Callable[[asyncio.Timeout], None] | None = None,
    canceled: Callable[[], bool] = lambda: False,
    on_quality: Callable[[QualityEvent], Awaitable[None]] | None = None,
) -> ResultEvent | ErrorEvent:
    """Run ``req`` on ``handle``: progress events go to ``on_progress``, the quality event of a replica
    that evaluates to ``on_quality``; returns the final event.

    A model that does not finish within ``timeout_s`` gives JOB_TIMEOUT. ``on_deadline`` receives the
    call's timeout: a cancel shortens it to CANCEL_STOP_S, and when it fires with ``canceled()`` true
    the run ends CANCELED. A canceled wait (drain) and the handle's own errors
    (``REPLICA_LOST_ERRORS``, ...) propagate, after the stream is canceled.
    """
    gen = handle.options(stream=True).run.remote(req.to_dict())
    final: ResultEvent | ErrorEvent | None = None
    try:
        async with asyncio.timeout(timeout_s) as deadline:
            if on_deadline is not None:
                on_deadline(deadline)
            async for raw in gen:
                ev = parse_event(raw)
                if isinstance(ev, ProgressEvent):
                    await on_progress(ev)
                elif isinstance(ev, QualityEvent):
                    if on_quality is not None:
                        await on_quality(ev)
                else:
                    final = ev
    except TimeoutError:
        gen.cancel()
        if canceled():
            return ErrorEvent(
                E.CANCELED, f"canceled; the model did not stop within {SC.CANCEL_STOP_S:g} s, its call was canceled"
            )
        return ErrorEvent(JOB_TIMEOUT, "the model did not stop at its deadline")
    except BaseException:
        gen.cancel()
        raise
    return final or ErrorEvent(MODEL_FAILED, "the model returned no result")


def apply_progress(run: ModelRun, ev: ProgressEvent, share: float) -> None:
    """The run's stage and progress (the model's share of the bar; never backwards)."""
    run.stage = ev.stage
    run.progress = round(max(run.progress, 100.0 * share * ev.fraction), 2)


def apply_error(run: ModelRun, ev: ErrorEvent) -> None:
    run.status = "canceled" if ev.code == E.CANCELED else "failed"
    run.error = ErrorInfo(code=ev.code, message=ev.message, details=dict(ev.details))


def apply_result(run: ModelRun, ev: ResultEvent, share: float) -> None:
    """Files, timings, warnings and (CLI-style) quality of the model's result."""
    result = ev.result
    run.files = list(ev.files)
    run.timings_s = {k: float(v) for k, v in (result.timings_s or {}).items() if isinstance(v, (int, float))}
    run.warnings += list(result.warnings or [])
    if result.quality is not None:
        run.quality = {"status": result.quality.status, "psnr": result.quality.psnr, "ssim": result.quality.ssim}
    run.progress = max(run.progress, 100.0 * share)
