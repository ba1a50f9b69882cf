"""The job scheduler: an asyncio loop inside the (single) ingress replica, put together from
the parts in :mod:`serve_app.scheduling` (each tested alone, without Ray).

* Per model, a FIFO of job ids (:mod:`~serve_app.scheduling.queues`) and ``max_concurrent_jobs``
  workers that dispatch them to the model deployment's handle
  (:mod:`~serve_app.scheduling.dispatch`: a streaming call, progress events, then the result).
* Each model run's quality.json and previews: on a one-node cluster the model replica makes them
  itself after its run (``ModelRequest.evaluate``, ``deployments/replica_evaluation.py``); on more
  nodes they fan out as Ray tasks once the mesh is published (:mod:`serve_app.fanout`), and the
  model replica is already free (``AppArgs.evaluate_in``).
* On start-up, :mod:`~serve_app.scheduling.recovery` decides what happens to every stored record.
  No run stays ``running`` forever: each has a deadline (``job_timeout_s``), enforced by the
  model (JOB_TIMEOUT) and, as a backstop, here.
* Failover: a run whose model replica dies mid-job (its node went away) is re-queued at the
  front and dispatched again while ``attempts < max_attempts``, else failed with REPLICA_LOST.
  Each attempt's number is written to ``jobs/<id>/attempts/<model>`` before dispatch; a model
  publishes its files only while it owns that number, so a superseded attempt never overwrites a retry.
* Ownership and drain (:mod:`~serve_app.scheduling.ownership`): one scheduler owns the job records
  at a time; on redeploy/delete the old ingress lets in-flight runs finish for ``drain_timeout_s``,
  then re-queues the rest and releases ownership.
* Terminal states trigger the signed webhook (:mod:`serve_app.webhooks`) and set
  ``expires_at``; a sweep (:mod:`serve_app.retention`) deletes expired artifacts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict

from deployments.model_server import deployment_name
from deployments.protocol import MODEL_FAILED, REPLICA_LOST, ErrorEvent, ProgressEvent, QualityEvent, ResultEvent
from deployments.store import Store

from . import constants as SC
from . import errors as E
from .config import AppArgs
from .fanout import FanoutResult, from_replica, replica_evaluates, run_fanout
from .jobs import JOBS_PREFIX, ErrorInfo, JobBook, JobRecord, artifacts_prefix, cancel_key, job_input_key, job_key
from .logging import job_logger
from .retention import orphan_job_ids, set_expiry, sweep_expired
from .scheduling import dispatch as D
from .scheduling.ownership import OWNER_HEARTBEAT_S, Ownership, drain_tasks
from .scheduling.queues import JobQueues
from .scheduling.recovery import plan_recovery
from .webhooks import deliver_webhook, service_secret

logger = logging.getLogger("recon3d.scheduler")

#: Share of a model run's progress bar given to the model itself; the fan-out fills the rest.
MODEL_PROGRESS_SHARE = 0.9
attempt_key = D.attempt_key  # where tests and tools look for it


class JobScheduler:
    def __init__(self, args: AppArgs, store: Store, book: JobBook, handles: dict, metrics=None):
        self.args = args
        self.store = store
        self.book = book
        self.handles = handles
        self.metrics = metrics
        self.q = JobQueues(list(handles))
        self.ownership = Ownership(store)
        self._tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Task] = set()
        self._running: dict[tuple[str, str], asyncio.Task] = {}
        #: (job, model) -> the timeout of the run's handle call (a cancel shortens it to CANCEL_STOP_S).
        self._deadlines: dict[tuple[str, str], asyncio.Timeout] = {}
        #: (job, model) -> the run's fan-out (a cancel cancels it, which ray.cancel()s its tasks).
        self._fanouts: dict[tuple[str, str], asyncio.Future] = {}
        self.recovered = False
        self.draining = False
        self.superseded = False

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self.ownership.acquire(self.args.drain_timeout_s + SC.DRAIN_MARGIN_S)
        await self.recover()
        for m in self.handles:
            n = self.args.model(m).dispatch_slots()
            self._tasks += [asyncio.create_task(self._worker(m), name=f"worker:{m}:{i}") for i in range(n)]
        self._tasks.append(asyncio.create_task(self._sweeper(), name="sweeper"))
        self._tasks.append(asyncio.create_task(self._heartbeat(), name="heartbeat"))
        self._tasks.append(asyncio.create_task(self._poll_replicas(), name="replicas"))
        self.recovered = True

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(OWNER_HEARTBEAT_S)
            try:
                if not await self.ownership.beat():
                    # A newer ingress took over: stop dispatching; it has re-queued our runs.
                    logger.warning("scheduler superseded; no more dispatches here")
                    self.superseded = True
                    return
            except Exception:
                logger.warning("ownership heartbeat failed", exc_info=True)

    async def drain(self, timeout_s: float | None = None) -> dict:
        """Graceful stop (redeploy, ``serve.delete``): finish or re-queue every in-flight run.

        New dispatches stop at once; runs in flight get ``timeout_s`` (default
        ``drain_timeout_s``) to finish; the rest are canceled at the model and saved as
        ``queued`` (the attempt is not held against ``max_attempts``), so the next ingress
        recovers them. Returns ``{"finished": n, "requeued": n}``.
        """
        self.draining = True
        timeout_s = self.args.drain_timeout_s if timeout_s is None else timeout_s
        done, pending = await drain_tasks(list(self._running.values()), timeout_s, SC.DRAIN_MARGIN_S / 2)
        await self.stop()
        await self.ownership.release()
        logger.info("drained: %d runs finished, %d re-queued", done, pending)
        return {"finished": done, "requeued": pending}

    def _spawn(self, coro) -> None:
        t = asyncio.create_task(coro)
        self._background.add(t)
        t.add_done_callback(self._background.discard)

    async def _delete_orphans(self) -> None:
        """What a crash left: job folders whose record was never written (serve_app/retention.py)."""
        keys = await asyncio.to_thread(self.store.list, JOBS_PREFIX)
        for orphan in orphan_job_ids(keys, set(self.book.jobs), prefix=JOBS_PREFIX):
            await asyncio.to_thread(self.store.delete_prefix, job_key(orphan))
            logger.info("deleted the files of job %s, which has no record (an interrupted submission)", orphan)

    async def recover(self) -> None:
        """Rebuild the queues from the store after a (re)start."""
        recs = await asyncio.to_thread(self.book.load_all)
        await self._delete_orphans()
        plan = plan_recovery(recs, max_attempts=self.args.max_attempts, served=set(self.handles))
        for rec in plan.webhooks:
            self._spawn(self._deliver_webhook(rec))
        for model, job_id in plan.queue:
            self.q.queues[model].append(job_id)
        for rec in plan.finish:
            await self._finish(rec)
        for rec in plan.save:
            await self.book.save(rec)
        for model, durations in plan.durations.items():
            if model in self.q.durations:
                self.q.durations[model].extend(durations)
        logger.info(
            "recovered %d jobs: %d retried, %d failed as interrupted", len(recs), plan.requeued, plan.interrupted
        )
        self._update_queue_metric()

    # ------------------------------------------------------------ queue

    @property
    def queues(self):
        return self.q.queues

    @property
    def replicas(self):
        return self.q.replicas

    def queue_position(self, job_id: str) -> int | None:
        return self.q.position(job_id)

    def estimated_wait_s(self, job_id: str) -> float | None:
        return self.q.estimated_wait_s(job_id)

    async def _poll_replicas(self) -> None:
        """Keep ``replicas`` current (RUNNING replicas per model deployment)."""
        from ray import serve

        try:
            app = serve.get_replica_context().app_name
        except Exception:
            return  # not inside a Serve replica (unit tests)
        while True:
            try:
                st = await asyncio.to_thread(serve.status)
                deps = st.applications[app].deployments
                for m in self.handles:
                    d = deps.get(deployment_name(m))
                    self.q.replicas[m] = None if d is None else int((d.replica_states or {}).get("RUNNING", 0))
            except Exception:
                logger.debug("replica poll failed", exc_info=True)
            await asyncio.sleep(SC.REPLICA_POLL_INTERVAL_S)

    def queued_count(self) -> int:
        return self.book.count("queued")

    async def submit(self, rec: JobRecord) -> None:
        self.book.add(rec)
        await self.book.save(rec)
        for m in rec.models:
            await self.q.push(m, rec.job_id)
        self._update_queue_metric()

    async def cancel(self, rec: JobRecord) -> None:
        """Cancel queued runs at once; flag running ones (the model polls the flag and stops)."""
        rec.cancel_requested = True
        for m, run in rec.runs.items():
            if run.status == "queued":
                self.q.remove(m, rec.job_id)
                run.status = "canceled"
                run.finished_at = time.time()
                run.error = ErrorInfo(code=E.CANCELED, message="canceled before it started")
        if any(r.status == "running" for r in rec.runs.values()):
            await asyncio.to_thread(self.store.put, cancel_key(rec.job_id), b"canceled")
            loop = asyncio.get_running_loop()
            for m in rec.models:
                # The model stops at its next checkpoint (seconds); past CANCEL_STOP_S the scheduler
                # stops waiting, cancels the handle call and ends the run as canceled.
                cm = self._deadlines.get((rec.job_id, m))
                if cm is not None and (cm.when() is None or cm.when() > loop.time() + SC.CANCEL_STOP_S):
                    cm.reschedule(loop.time() + SC.CANCEL_STOP_S)
                fan = self._fanouts.get((rec.job_id, m))
                if fan is not None:
                    fan.cancel()  # ray.cancel()s its tasks (serve_app/fanout.py)
        rec.refresh_summary()
        await self._save_or_finish(rec)
        self._update_queue_metric()

    async def delete(self, rec: JobRecord) -> None:
        self.book.remove(rec.job_id)
        await asyncio.to_thread(self.store.delete_prefix, job_key(rec.job_id))

    def _update_queue_metric(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self.queued_count())

    async def _save_or_finish(self, rec: JobRecord) -> None:
        await self._finish(rec) if rec.terminal else await self.book.save(rec)

    async def _next(self, model: str) -> str:
        job_id = await self.q.pop(model)
        for other in self.q.queues[model]:  # their queue position changed
            self.book.notify(other)
        return job_id

    async def _worker(self, model: str) -> None:
        while True:
            job_id = await self._next(model)
            if self.draining or self.superseded:
                self.q.queues[model].appendleft(job_id)  # stays queued in the store; the next owner runs it
                return
            rec = self.book.get(job_id)
            if rec is None or rec.runs.get(model) is None or rec.runs[model].status != "queued":
                continue
            await self._dispatch(rec, model)
            self._update_queue_metric()

    async def _dispatch(self, rec: JobRecord, model: str) -> None:
        """Run ``rec``'s run of ``model`` as a task a drain can cancel; a scheduler bug fails the run (INTERNAL)."""
        key = (rec.job_id, model)
        task = asyncio.create_task(self._run_model(rec, model), name=f"run:{rec.job_id}:{model}")
        self._running[key] = task
        self.q.in_flight_keys.add(key)
        try:
            await asyncio.shield(task)  # a drain cancels the run itself, not this wait
        except asyncio.CancelledError:
            if not task.done():
                raise
        except Exception:
            pass
        finally:
            self._running.pop(key, None)
            self.q.in_flight_keys.discard(key)
        if task.cancelled() or task.exception() is None:
            return
        logger.error("scheduler error", exc_info=task.exception(), extra={"job_id": rec.job_id, "model": model})
        run = rec.runs[model]
        if run.status == "running":
            run.status = "failed"
            run.error = ErrorInfo(code=E.INTERNAL, message="the scheduler failed while running this job")
            rec.refresh_summary()
            await self._save_or_finish(rec)

    # ------------------------------------------------------------ one model run

    async def _start_run(self, rec: JobRecord, model: str) -> None:
        run = rec.runs[model]
        run.status = "running"
        run.attempts += 1
        run.stage = "waiting_for_replica"  # until the replica's first event ("started")
        run.started_at = time.time()
        run.error = None
        rec.started_at = rec.started_at or run.started_at
        rec.refresh_summary()
        await self.book.save(rec)
        await asyncio.to_thread(self.store.put, D.attempt_key(rec.job_id, model), str(run.attempts).encode())
        job_logger(rec.job_id).info("dispatch", extra={"model": model, "attempt": run.attempts})

    async def _run_model(self, rec: JobRecord, model: str) -> None:
        run = rec.runs[model]
        await self._start_run(rec, model)
        share = MODEL_PROGRESS_SHARE if self.args.fanout else 1.0

        async def on_progress(ev: ProgressEvent) -> None:
            D.apply_progress(run, ev, share)
            rec.refresh_summary()
            await self.book.save(rec, force=False)

        def on_deadline(cm: asyncio.Timeout) -> None:
            self._deadlines[(rec.job_id, model)] = cm  # cancel() shortens it to CANCEL_STOP_S

        async def on_quality(ev: QualityEvent) -> None:
            await self._show_quality(rec, model, from_replica(ev.quality, ev.error))

        evaluate = self.args.fanout and await replica_evaluates(self.args.evaluate_in)
        req = D.model_request(
            rec, model, run.attempts, self.args.job_timeout_s, evaluate=evaluate, preview_views=self.args.preview_views
        )
        try:
            final = await D.stream_run(
                self.handles[model],
                req,
                on_progress=on_progress,
                timeout_s=self.args.job_timeout_s + SC.CANCEL_GRACE_S,
                on_deadline=on_deadline,
                canceled=lambda: rec.cancel_requested,
                on_quality=on_quality,
            )
        except asyncio.CancelledError:
            # Drain (redeploy): the model stops at its next cancel checkpoint; the job stays queued.
            if self.draining and not self.superseded:
                await asyncio.shield(self._requeue(rec, model, "a redeploy"))
            raise
        except D.REPLICA_LOST_ERRORS as e:
            final = await self._replica_lost(rec, model, e)
            if final is None:
                return
        except Exception as e:  # the deployment is gone, a bug ...
            job_logger(rec.job_id).warning("model call failed: %s", e, extra={"model": model})
            final = ErrorEvent(MODEL_FAILED, f"the model replica failed: {type(e).__name__}")
        finally:
            self._deadlines.pop((rec.job_id, model), None)
        if isinstance(final, ResultEvent):
            await self._succeeded(rec, model, final, share)
        else:
            D.apply_error(run, final)
        if not self.superseded:  # else a newer scheduler owns this record now (it re-queued the run)
            await self._end_run(rec, model)

    async def _replica_lost(self, rec: JobRecord, model: str, e: BaseException) -> ErrorEvent | None:
        """Re-queue (at the front) while attempts remain; else the REPLICA_LOST error. None = re-queued."""
        run = rec.runs[model]
        job_logger(rec.job_id).warning("model replica lost: %s", e, extra={"model": model, "attempt": run.attempts})
        if self.draining or self.superseded or run.attempts < self.args.max_attempts:
            if not self.superseded:
                await self._requeue(rec, model, f"the loss of its replica ({type(e).__name__})", front=True)
            return None
        return ErrorEvent(
            REPLICA_LOST,
            f"the model replica (or its node) died during each of {run.attempts} attempt(s)",
            {"attempts": run.attempts, "error": type(e).__name__},
        )

    async def _succeeded(self, rec: JobRecord, model: str, ev: ResultEvent, share: float) -> None:
        run = rec.runs[model]
        D.apply_result(run, ev, share)
        if rec.cancel_requested:
            run.status = "canceled"
        elif ev.evaluation is not None:  # the replica scored its mesh itself; its files came with the result
            e = ev.evaluation
            self._apply_evaluation(run, from_replica(e.get("quality"), e.get("error"), e.get("warnings")))
        elif self.args.fanout:
            await self._cancelable_fanout(rec, model, ev)
        if run.status == "running":
            run.status = "succeeded"
            run.progress = 100.0

    async def _cancelable_fanout(self, rec: JobRecord, model: str, ev: ResultEvent) -> None:
        """The fan-out, which this job's cancel cancels (its Ray tasks are ray.cancel()-ed); a drain propagates."""
        run = rec.runs[model]
        fan = asyncio.ensure_future(self._fanout(rec, model, ev))
        self._fanouts[(rec.job_id, model)] = fan
        try:
            await fan
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling() or not rec.cancel_requested:
                raise  # a drain, not this job's cancel
            run.status = "canceled"
            run.error = ErrorInfo(code=E.CANCELED, message="canceled during metrics and previews")
        finally:
            self._fanouts.pop((rec.job_id, model), None)

    async def _end_run(self, rec: JobRecord, model: str) -> None:
        run = rec.runs[model]
        run.finished_at = time.time()
        run.stage = "done"
        elapsed = run.finished_at - run.started_at
        if run.status == "succeeded":
            self.q.record_duration(model, elapsed)
        if self.metrics is not None:
            self.metrics.job_finished(model, run.status, elapsed, run.timings_s)
        job_logger(rec.job_id).info(
            "model run ended",
            extra={
                "model": model,
                "status": run.status,
                "code": run.error.code if run.error else None,
                "elapsed_s": round(elapsed, 3),
            },
        )
        rec.refresh_summary()
        await self._save_or_finish(rec)

    async def _requeue(self, rec: JobRecord, model: str, why: str, *, front: bool = False) -> None:
        """Put a run back in the queue after ``why`` interrupted it (its attempt count stays)."""
        run = rec.runs[model]
        run.status = "queued"
        run.stage = "requeued"
        run.warnings.append(f"attempt {run.attempts} was interrupted by {why}; re-queued")
        rec.refresh_summary()
        await self.book.save(rec)
        if self.draining:
            return  # the next owner's recover() queues it
        if front:
            await asyncio.sleep(SC.REPLICA_LOST_RETRY_DELAY_S)
        await self.q.push(model, rec.job_id, front=front)
        self._update_queue_metric()

    async def _fanout(self, rec: JobRecord, model: str, ev: ResultEvent) -> None:
        run = rec.runs[model]
        run.stage = "evaluate"
        await self.book.save(rec, force=False)
        t0 = time.perf_counter()

        async def on_quality(fo) -> None:
            await self._show_quality(rec, model, fo)

        fo = await run_fanout(
            job_id=rec.job_id,
            store=self.store,
            input_key=job_input_key(rec),
            prefix=artifacts_prefix(rec.job_id, model),
            result=ev.result,
            max_retries=self.args.fanout_max_retries,
            num_cpus=self.args.fanout_num_cpus,
            n_previews=self.args.preview_views,
            inputs=ev.evaluation_inputs,
            on_quality=on_quality,
        )
        run.timings_s["evaluate_and_previews"] = round(time.perf_counter() - t0, 3)
        self._apply_evaluation(run, fo)

    async def _show_quality(self, rec: JobRecord, model: str, fo: FanoutResult) -> None:
        """The report is known: show it (and the stage) without waiting for the slowest preview."""
        run = rec.runs[model]
        run.quality = self._quality_view(fo)
        run.stage = "previews"
        await self.book.save(rec, force=False)

    def _apply_evaluation(self, run, fo: FanoutResult) -> None:
        """quality.json's summary, the previews' files and warnings into the run; a failed report fails it."""
        run.files = sorted(set(run.files) | set(fo.files))
        run.warnings += fo.warnings
        run.quality = self._quality_view(fo)
        if fo.error is not None:
            run.status = "failed"
            run.error = ErrorInfo(**fo.error)

    @staticmethod
    def _quality_view(fo) -> dict | None:
        """The run record's ``quality``: quality.json's summary and its error."""
        if not fo.quality:
            return None
        return {**asdict(fo.quality), "error": fo.error and {k: fo.error[k] for k in ("code", "message")}}

    # ------------------------------------------------------------ terminal states

    async def _finish(self, rec: JobRecord) -> None:
        set_expiry(rec, self.args.artifact_ttl_s)
        await self.book.save(rec)
        await asyncio.to_thread(self.store.delete, cancel_key(rec.job_id))
        job_logger(rec.job_id).info(
            "job ended", extra={"status": rec.status, "code": rec.error.code if rec.error else None}
        )
        if rec.webhook is not None and not rec.webhook.delivered:
            self._spawn(self._deliver_webhook(rec))

    async def _deliver_webhook(self, rec: JobRecord) -> None:
        secret = rec.webhook.secret or await asyncio.to_thread(service_secret, self.args.webhooks, self.store)
        delivered = await deliver_webhook(
            rec,
            attempts=self.args.webhook_attempts,
            backoff_s=self.args.webhook_backoff_s,
            settings=self.args.webhooks,
            secret=secret,
        )
        job_logger(rec.job_id).info("webhook", extra={"status": "delivered" if delivered else "undelivered"})
        if rec.job_id in self.book.jobs:
            await self.book.save(rec)

    async def sweep_once(self) -> int:
        """Delete artifacts (and the upload) of jobs past ``expires_at``; returns how many jobs expired."""
        return await sweep_expired(self.book, self.store, record_ttl_s=self.args.record_ttl_s)

    async def _sweeper(self) -> None:
        while True:
            try:
                await self.sweep_once()
            except Exception:
                logger.exception("sweep failed")
            await asyncio.sleep(self.args.sweep_interval_s)
