"""What a (re)started scheduler does with each stored job record.

Queued runs are queued again (in submission order); runs that were ``running`` when the
app stopped are retried while ``attempts < max_attempts``, else failed with JOB_INTERRUPTED
(CANCELED when a cancel was requested). A queued run of a model that is not served any
more fails with MODEL_UNAVAILABLE. Terminal jobs whose webhook was not delivered get it again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .. import errors as E
from ..jobs import ErrorInfo, JobRecord, ModelRun


@dataclass
class RecoveryPlan:
    queue: list[tuple[str, str]] = field(default_factory=list)
    """(model, job id) to queue, in submission order."""
    finish: list[JobRecord] = field(default_factory=list)
    """Jobs that became terminal now (they get expiry, webhook ...)."""
    save: list[JobRecord] = field(default_factory=list)
    """Jobs still open, to save as they are now."""
    webhooks: list[JobRecord] = field(default_factory=list)
    """Jobs that ended earlier and still owe their webhook."""
    durations: dict[str, list[float]] = field(default_factory=dict)
    """Model -> durations of succeeded runs (seeds the wait estimates)."""
    requeued: int = 0
    interrupted: int = 0


def _recover_run(rec: JobRecord, run: ModelRun, max_attempts: int, plan: RecoveryPlan) -> None:
    if rec.cancel_requested:
        run.status = "canceled"
        run.error = ErrorInfo(code=E.CANCELED, message="canceled while the service was down")
    elif run.attempts < max_attempts:
        run.status = "queued"
        run.stage = "requeued"
        run.warnings.append(f"attempt {run.attempts} was interrupted by a restart; retrying")
        plan.requeued += 1
    else:
        run.status = "failed"
        run.error = ErrorInfo(
            code=E.JOB_INTERRUPTED,
            message=f"the service stopped during the run and {run.attempts} attempt(s) are used up",
            details={"attempts": run.attempts},
        )
        plan.interrupted += 1
    run.finished_at = time.time() if run.status != "queued" else None


def plan_recovery(recs: list[JobRecord], *, max_attempts: int, served: set[str] | list[str]) -> RecoveryPlan:
    """Decide (and apply to the records) what happens to each stored job; no I/O."""
    plan = RecoveryPlan()
    for rec in recs:
        if rec.terminal:
            if rec.webhook is not None and not rec.webhook.delivered:
                plan.webhooks.append(rec)
            continue
        for m, run in rec.runs.items():
            if run.status == "running":
                _recover_run(rec, run, max_attempts, plan)
            if run.status == "queued" and m not in served:
                run.status = "failed"
                run.error = ErrorInfo(code=E.MODEL_UNAVAILABLE, message=f"model {m!r} is not served any more")
        rec.refresh_summary()
        plan.queue += [(m, rec.job_id) for m, run in rec.runs.items() if run.status == "queued"]
        (plan.finish if rec.terminal else plan.save).append(rec)
    for rec in recs:
        for m, run in rec.runs.items():
            if run.status == "succeeded" and run.started_at and run.finished_at:
                plan.durations.setdefault(m, []).append(run.finished_at - run.started_at)
    return plan
