"""The job scheduler: an asyncio loop inside the (single) ingress replica.

* Per model, a FIFO of job ids and ``max_concurrent_jobs`` workers that dispatch them to
  the model deployment's handle (a streaming call: progress events, then the result).
* After a model run, the fan-out (per-view metrics, previews, quality.json) runs as
  Ray tasks; the model replica is already free for the next job.
* On start-up, :meth:`JobScheduler.recover` re-reads every record from the store:
  queued runs are queued again (in submission order); runs that were ``running`` when
  the app stopped are retried while ``attempts < max_attempts``, else failed with
  JOB_INTERRUPTED. No run stays ``running`` forever: each has a deadline
  (``job_timeout_s``), enforced by the model (JOB_TIMEOUT) and, as a backstop, here.
* Failover: a run whose model replica dies mid-job (its node went away) is re-queued at
  the front and dispatched again (Serve's router has dropped the dead replica) while
  ``attempts < max_attempts``, else failed with REPLICA_LOST. Each attempt's number is
  written to ``jobs/<id>/attempts/<model>`` before dispatch; a model publishes its files
  only while it owns that number, so a superseded attempt never overwrites a retry.
* Ownership and drain: one scheduler owns the job records at a time (``scheduler/owner.json``,
  heartbeated). A new ingress waits for the old one to release it (or for its heartbeat to go
  stale) before recovering; on redeploy/delete the old ingress's ``drain`` lets in-flight
  runs finish for ``drain_timeout_s``, then re-queues the rest and releases ownership.
* Queue position and ``estimated_wait_s`` come from a moving average of recent run
  durations per model and the model's running replicas (polled from ``serve.status``).
* Terminal states trigger the webhook (with retries) and set ``expires_at``; a sweep
  deletes expired artifacts (the API then answers 410 JOB_EXPIRED).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
import uuid

import httpx
import ray.exceptions as RE
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

from deployments import constants as DC
from deployments.base import ModelRequest

from . import errors as E
from .config import AppArgs
from .fanout import run_fanout
from .jobs import (
    JOBS_PREFIX,
    ErrorInfo,
    JobBook,
    JobRecord,
    artifacts_prefix,
    cancel_key,
    job_input_key,
    job_key,
)
from .logging import job_logger
from .retention import orphan_job_ids, record_due
from .store import Store
from .webhooks import WebhookRefusedError, deliver, service_secret

logger = logging.getLogger("recon3d.scheduler")

#: Share of a model run's progress bar given to the model itself; the fan-out fills the rest.
MODEL_PROGRESS_SHARE = 0.9
#: Job error code of a run whose replica died on its last allowed attempt.
REPLICA_LOST = "REPLICA_LOST"
#: Store key of the scheduler ownership record.
OWNER_KEY = "scheduler/owner.json"
#: Seconds between ownership heartbeats; an owner silent for OWNER_STALE_AFTER_S is presumed dead.
OWNER_HEARTBEAT_S = 5.0
OWNER_STALE_AFTER_S = 3 * OWNER_HEARTBEAT_S
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


def model_deployment_name(model: str) -> str:
    """Serve deployment name of a model (ModelServer.get_deployment_options)."""
    return f"{model}-model"


class JobScheduler:
    def __init__(self, args: AppArgs, store: Store, book: JobBook, handles: dict, metrics=None):
        self.args = args
        self.store = store
        self.book = book
        self.handles = handles
        self.metrics = metrics
        self.queues: dict[str, collections.deque[str]] = {m: collections.deque() for m in handles}
        self._wake: dict[str, asyncio.Condition] = {}
        self._tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Task] = set()
        self._running: dict[tuple[str, str], asyncio.Task] = {}
        #: (job, model) -> the timeout of the run's handle call (a cancel shortens it to CANCEL_STOP_S).
        self._deadlines: dict[tuple[str, str], asyncio.Timeout] = {}
        #: (job, model) -> the run's fan-out (a cancel cancels it, which ray.cancel()s its tasks).
        self._fanouts: dict[tuple[str, str], asyncio.Future] = {}
        self.recovered = False
        self.owner_id = uuid.uuid4().hex
        self.draining = False
        self.superseded = False
        #: model -> recent run durations (dispatch to terminal), seconds.
        self.durations: dict[str, collections.deque[float]] = {
            m: collections.deque(maxlen=DC.WAIT_ESTIMATE_WINDOW) for m in handles
        }
        #: model -> RUNNING replicas at the last poll (None = unknown, e.g. outside Serve).
        self.replicas: dict[str, int | None] = {m: None for m in handles}

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._wake = {m: asyncio.Condition() for m in self.handles}
        await self.acquire_ownership()
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

    # ------------------------------------------------------------ ownership + drain

    def _read_owner(self) -> dict | None:
        try:
            return json.loads(self.store.get(OWNER_KEY))
        except (KeyError, ValueError):
            return None

    def _write_owner(self, *, released: bool = False) -> None:
        doc = {"id": self.owner_id, "heartbeat": time.time(), "released": released}
        self.store.put(OWNER_KEY, json.dumps(doc).encode())

    async def acquire_ownership(self) -> None:
        """Wait until no other live scheduler owns the records (bounded), then take them."""
        deadline = time.monotonic() + self.args.drain_timeout_s + DC.DRAIN_MARGIN_S
        while time.monotonic() < deadline:
            cur = await asyncio.to_thread(self._read_owner)
            if cur is None or cur.get("released") or cur.get("id") == self.owner_id:
                break
            if time.time() - float(cur.get("heartbeat", 0)) > OWNER_STALE_AFTER_S:
                logger.warning("taking over from scheduler %s: its heartbeat is stale", cur.get("id"))
                break
            await asyncio.sleep(0.5)
        else:
            logger.warning("the previous scheduler did not release the job records in time; taking over")
        await asyncio.to_thread(self._write_owner)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(OWNER_HEARTBEAT_S)
            try:
                cur = await asyncio.to_thread(self._read_owner)
                if cur is not None and cur.get("id") != self.owner_id:
                    # A newer ingress took over: stop dispatching; it has re-queued our runs.
                    if not self.superseded:
                        logger.warning("scheduler superseded by %s; no more dispatches here", cur.get("id"))
                    self.superseded = True
                    return
                await asyncio.to_thread(self._write_owner)
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
        inflight = list(self._running.values())
        done, pending = await asyncio.wait(inflight, timeout=timeout_s) if inflight else (set(), set())
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending, timeout=DC.DRAIN_MARGIN_S / 2)
        await self.stop()
        cur = await asyncio.to_thread(self._read_owner)
        if cur is None or cur.get("id") == self.owner_id:
            await asyncio.to_thread(self._write_owner, released=True)
        logger.info("drained: %d runs finished, %d re-queued", len(done), len(pending))
        return {"finished": len(done), "requeued": len(pending)}

    def _spawn(self, coro) -> None:
        t = asyncio.create_task(coro)
        self._background.add(t)
        t.add_done_callback(self._background.discard)

    async def recover(self) -> None:
        """Rebuild the queues from the store after a (re)start."""
        recs = await asyncio.to_thread(self.book.load_all)
        # What a crash left: job folders whose record was never written (serve_app/retention.py).
        keys = await asyncio.to_thread(self.store.list, JOBS_PREFIX)
        for orphan in orphan_job_ids(keys, set(self.book.jobs), prefix=JOBS_PREFIX):
            await asyncio.to_thread(self.store.delete_prefix, job_key(orphan))
            logger.info("deleted the files of job %s, which has no record (an interrupted submission)", orphan)
        requeued = interrupted = 0
        for rec in recs:
            if rec.terminal:
                if rec.webhook is not None and not rec.webhook.delivered:
                    self._spawn(self._deliver_webhook(rec))
                continue
            for m, run in rec.runs.items():
                if run.status == "running":
                    if rec.cancel_requested:
                        run.status = "canceled"
                        run.error = ErrorInfo(code=E.CANCELED, message="canceled while the service was down")
                    elif run.attempts < self.args.max_attempts:
                        run.status = "queued"
                        run.stage = "requeued"
                        run.warnings.append(f"attempt {run.attempts} was interrupted by a restart; retrying")
                        requeued += 1
                    else:
                        run.status = "failed"
                        run.error = ErrorInfo(
                            code=E.JOB_INTERRUPTED,
                            message=f"the service stopped during the run and {run.attempts} attempt(s) are used up",
                            details={"attempts": run.attempts},
                        )
                        interrupted += 1
                    run.finished_at = time.time() if run.status != "queued" else None
                if run.status == "queued" and m not in self.handles:
                    run.status = "failed"
                    run.error = ErrorInfo(code="MODEL_UNAVAILABLE", message=f"model {m!r} is not served any more")
            rec.refresh_summary()
            for m, run in rec.runs.items():
                if run.status == "queued":
                    self.queues[m].append(rec.job_id)
            if rec.terminal:
                await self._finish(rec)
            else:
                await self.book.save(rec)
        for rec in recs:  # seed the wait estimates with what already ran
            for m, run in rec.runs.items():
                if run.status == "succeeded" and run.started_at and run.finished_at and m in self.durations:
                    self.durations[m].append(run.finished_at - run.started_at)
        logger.info("recovered %d jobs: %d retried, %d failed as interrupted", len(recs), requeued, interrupted)
        self._update_queue_metric()

    # ------------------------------------------------------------ queue

    def queue_position(self, job_id: str) -> int | None:
        """0-based place in the earliest queue holding the job, or None when not queued."""
        pos = [q.index(job_id) for q in self.queues.values() if job_id in q]
        return min(pos) if pos else None

    def in_flight(self, model: str) -> int:
        """Runs of ``model`` dispatched to its handle (running on a replica or waiting for one)."""
        return sum(1 for (_, m) in self._running if m == model)

    def mean_duration_s(self, model: str) -> float | None:
        d = self.durations.get(model)
        return sum(d) / len(d) if d else None

    def estimated_wait_s(self, job_id: str) -> float | None:
        """Seconds until a queued job starts, roughly; None when not queued or nothing has run yet.

        ``mean recent run duration x (jobs ahead in the queue + runs in flight) / replicas``,
        for the model queue where the job is furthest back; replicas = the model's RUNNING
        replicas (at least 1: a scaled-to-zero model is assumed to get one).
        """
        best: float | None = None
        for m, q in self.queues.items():
            if job_id not in q:
                continue
            mean = self.mean_duration_s(m)
            if mean is None:
                return None
            ahead = q.index(job_id) + self.in_flight(m)
            wait = mean * ahead / max(self.replicas.get(m) or 1, 1)
            best = wait if best is None else max(best, wait)
        return None if best is None else round(best, 1)

    async def _poll_replicas(self) -> None:
        """Keep ``self.replicas`` current (RUNNING replicas per model deployment)."""
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
                    d = deps.get(model_deployment_name(m))
                    self.replicas[m] = None if d is None else int((d.replica_states or {}).get("RUNNING", 0))
            except Exception:
                logger.debug("replica poll failed", exc_info=True)
            await asyncio.sleep(DC.REPLICA_POLL_INTERVAL_S)

    def queued_count(self) -> int:
        return self.book.count("queued")

    async def submit(self, rec: JobRecord) -> None:
        self.book.add(rec)
        await self.book.save(rec)
        for m in rec.models:
            self.queues[m].append(rec.job_id)
            async with self._wake[m]:
                self._wake[m].notify()
        self._update_queue_metric()

    async def cancel(self, rec: JobRecord) -> None:
        """Cancel queued runs at once; flag running ones (the model polls the flag and stops)."""
        rec.cancel_requested = True
        for m, run in rec.runs.items():
            if run.status == "queued":
                if rec.job_id in self.queues[m]:
                    self.queues[m].remove(rec.job_id)
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
                if cm is not None and (cm.when() is None or cm.when() > loop.time() + DC.CANCEL_STOP_S):
                    cm.reschedule(loop.time() + DC.CANCEL_STOP_S)
                fan = self._fanouts.get((rec.job_id, m))
                if fan is not None:
                    fan.cancel()  # ray.cancel()s its tasks (serve_app/fanout.py)
        rec.refresh_summary()
        if rec.terminal:
            await self._finish(rec)
        else:
            await self.book.save(rec)
        self._update_queue_metric()

    async def delete(self, rec: JobRecord) -> None:
        self.book.remove(rec.job_id)
        await asyncio.to_thread(self.store.delete_prefix, job_key(rec.job_id))

    def _update_queue_metric(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self.queued_count())

    async def _next(self, model: str) -> str:
        cond = self._wake[model]
        q = self.queues[model]
        async with cond:
            await cond.wait_for(lambda: bool(q))
            job_id = q.popleft()
        for other in q:  # their queue position changed
            self.book.notify(other)
        return job_id

    async def _worker(self, model: str) -> None:
        while True:
            job_id = await self._next(model)
            if self.draining or self.superseded:
                self.queues[model].appendleft(job_id)  # stays queued in the store; the next owner runs it
                return
            rec = self.book.get(job_id)
            if rec is None or rec.runs.get(model) is None or rec.runs[model].status != "queued":
                continue
            task = asyncio.create_task(self._run_model(rec, model), name=f"run:{job_id}:{model}")
            self._running[(job_id, model)] = task
            try:
                await asyncio.shield(task)  # a drain cancels the run itself, not this wait
            except asyncio.CancelledError:
                if not task.done():
                    raise
            except Exception:
                pass
            finally:
                self._running.pop((job_id, model), None)
            try:
                task.result()
            except asyncio.CancelledError:
                continue
            except Exception:
                logger.exception("scheduler error", extra={"job_id": job_id, "model": model})
                run = rec.runs[model]
                if run.status == "running":
                    run.status = "failed"
                    run.error = ErrorInfo(code=E.INTERNAL, message="the scheduler failed while running this job")
                    rec.refresh_summary()
                    await self._finish(rec) if rec.terminal else await self.book.save(rec)
            self._update_queue_metric()

    # ------------------------------------------------------------ one model run

    async def _run_model(self, rec: JobRecord, model: str) -> None:
        log = job_logger(rec.job_id)
        run = rec.runs[model]
        run.status = "running"
        run.attempts += 1
        run.stage = "waiting_for_replica"  # until the replica's first event ("started")
        run.started_at = time.time()
        run.error = None
        rec.started_at = rec.started_at or run.started_at
        rec.refresh_summary()
        await self.book.save(rec)
        await asyncio.to_thread(self.store.put, attempt_key(rec.job_id, model), str(run.attempts).encode())
        log.info("dispatch", extra={"model": model, "attempt": run.attempts})

        prefix = artifacts_prefix(rec.job_id, model)
        req = ModelRequest(
            job_id=rec.job_id,
            model=model,
            preset=rec.preset,
            input_key=job_input_key(rec),
            output_prefix=prefix,
            cancel_key=cancel_key(rec.job_id),
            deadline=time.time() + self.args.job_timeout_s,
            attempt=run.attempts,
            overrides=rec.overrides or None,
            attempt_key=attempt_key(rec.job_id, model),
        )
        share = MODEL_PROGRESS_SHARE if self.args.fanout else 1.0
        final: dict | None = None
        gen = self.handles[model].options(stream=True).run.remote(req.to_dict())
        try:
            async with asyncio.timeout(self.args.job_timeout_s + DC.CANCEL_GRACE_S) as deadline:
                self._deadlines[(rec.job_id, model)] = deadline
                async for ev in gen:
                    if ev.get("type") == "progress":
                        run.stage = ev["stage"]
                        run.progress = round(max(run.progress, 100.0 * share * ev["fraction"]), 2)
                        rec.refresh_summary()
                        await self.book.save(rec, force=False)
                    else:
                        final = ev
        except TimeoutError:
            gen.cancel()
            final = {
                "type": "error",
                "error": {"code": E.JOB_TIMEOUT, "message": "the model did not stop at its deadline"},
            }
            if rec.cancel_requested:
                final["error"] = {
                    "code": E.CANCELED,
                    "message": f"canceled; the model did not stop within {DC.CANCEL_STOP_S:g} s, its call was canceled",
                }
        except asyncio.CancelledError:
            # Drain (redeploy): stop the model at its next cancel checkpoint and leave the job queued.
            gen.cancel()
            if self.draining and not self.superseded:
                await asyncio.shield(self._requeue(rec, model, "a redeploy"))
            raise
        except REPLICA_LOST_ERRORS as e:
            log.warning("model replica lost: %s", e, extra={"model": model, "attempt": run.attempts})
            if self.draining or self.superseded or run.attempts < self.args.max_attempts:
                if not self.superseded:
                    await self._requeue(rec, model, f"the loss of its replica ({type(e).__name__})", front=True)
                return
            final = {
                "type": "error",
                "error": {
                    "code": REPLICA_LOST,
                    "message": f"the model replica (or its node) died during each of {run.attempts} attempt(s)",
                    "details": {"attempts": run.attempts, "error": type(e).__name__},
                },
            }
        except Exception as e:  # the deployment is gone, a bug ...
            log.warning("model call failed: %s", e, extra={"model": model})
            final = {
                "type": "error",
                "error": {"code": "MODEL_FAILED", "message": f"the model replica failed: {type(e).__name__}"},
            }

        finally:
            self._deadlines.pop((rec.job_id, model), None)

        if final is None:
            final = {"type": "error", "error": {"code": "MODEL_FAILED", "message": "the model returned no result"}}
        if final["type"] == "error":
            err = final["error"]
            run.status = "canceled" if err["code"] == E.CANCELED else "failed"
            run.error = ErrorInfo(code=err["code"], message=err.get("message", ""), details=err.get("details") or {})
        else:
            result = final["result"]
            run.files = list(final["files"])
            run.timings_s = {
                k: float(v) for k, v in (result.get("timings_s") or {}).items() if isinstance(v, (int, float))
            }
            run.warnings += list(result.get("warnings") or [])
            if "quality" in result:
                run.quality = result["quality"]
            run.progress = max(run.progress, 100.0 * share)
            if self.args.fanout and not rec.cancel_requested:
                fan = asyncio.ensure_future(self._fanout(rec, model, result))
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
            elif rec.cancel_requested:
                run.status = "canceled"
            if run.status == "running":
                run.status = "succeeded"
                run.progress = 100.0
        if self.superseded:
            return  # a newer scheduler owns this record now (it re-queued the run)
        run.finished_at = time.time()
        run.stage = "done"
        if run.status == "succeeded":
            self.durations.setdefault(model, collections.deque(maxlen=DC.WAIT_ESTIMATE_WINDOW)).append(
                run.finished_at - run.started_at
            )
        if self.metrics is not None:
            self.metrics.job_finished(model, run.status, run.finished_at - run.started_at, run.timings_s)
        log.info(
            "model run ended",
            extra={
                "model": model,
                "status": run.status,
                "code": run.error.code if run.error else None,
                "elapsed_s": round(run.finished_at - run.started_at, 3),
            },
        )
        rec.refresh_summary()
        if rec.terminal:
            await self._finish(rec)
        else:
            await self.book.save(rec)

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
            await asyncio.sleep(DC.REPLICA_LOST_RETRY_DELAY_S)
            self.queues[model].appendleft(rec.job_id)
        else:
            self.queues[model].append(rec.job_id)
        async with self._wake[model]:
            self._wake[model].notify()
        self._update_queue_metric()

    async def _fanout(self, rec: JobRecord, model: str, result: dict) -> None:
        run = rec.runs[model]
        run.stage = "evaluate"
        await self.book.save(rec, force=False)
        t0 = time.perf_counter()
        fo = await run_fanout(
            job_id=rec.job_id,
            store=self.store,
            input_key=job_input_key(rec),
            prefix=artifacts_prefix(rec.job_id, model),
            preset=rec.preset,
            result=result,
            max_retries=self.args.fanout_max_retries,
            num_cpus=self.args.fanout_num_cpus,
            n_previews=self.args.preview_views,
        )
        run.timings_s["evaluate_and_previews"] = round(time.perf_counter() - t0, 3)
        run.files = sorted(set(run.files) | set(fo.files))
        run.warnings += fo.warnings
        run.quality = fo.quality
        if fo.error is not None:
            run.status = "failed"
            run.error = ErrorInfo(**fo.error)

    # ------------------------------------------------------------ terminal states

    async def _finish(self, rec: JobRecord) -> None:
        rec.expires_at = rec.expires_at or time.time() + self.args.artifact_ttl_s
        await self.book.save(rec)
        await asyncio.to_thread(self.store.delete, cancel_key(rec.job_id))
        job_logger(rec.job_id).info(
            "job ended", extra={"status": rec.status, "code": rec.error.code if rec.error else None}
        )
        if rec.webhook is not None and not rec.webhook.delivered:
            self._spawn(self._deliver_webhook(rec))

    async def _deliver_webhook(self, rec: JobRecord) -> None:
        wh = rec.webhook
        body = {
            "job_id": rec.job_id,
            "status": rec.status,
            "error": rec.error.model_dump() if rec.error else None,
            "models": {m: {"status": r.status, "quality": r.quality} for m, r in rec.runs.items()},
            "links": {"self": f"/jobs/{rec.job_id}", "download": f"/jobs/{rec.job_id}/download"},
        }
        delay = self.args.webhook_backoff_s
        raw = json.dumps(body, separators=(",", ":")).encode()  # signed exactly as sent
        secret = wh.secret or await asyncio.to_thread(service_secret, self.args.webhooks, self.store)
        while wh.attempts < self.args.webhook_attempts and not wh.delivered:
            wh.attempts += 1
            try:
                status = await deliver(
                    wh.url, raw, {"x-recon3d-event": "job." + rec.status}, secret, self.args.webhooks
                )
                if status < 300:
                    wh.delivered = True
                    wh.last_error = None
                    break
                wh.last_error = f"HTTP {status}"
            except WebhookRefusedError as e:  # the name now resolves inside the network: never retried
                wh.last_error = e.message
                break
            except (httpx.HTTPError, TimeoutError, OSError) as e:
                wh.last_error = f"{type(e).__name__}: {e}"
            await asyncio.sleep(delay)
            delay *= 2
        job_logger(rec.job_id).info("webhook", extra={"status": "delivered" if wh.delivered else "undelivered"})
        if rec.job_id in self.book.jobs:
            await self.book.save(rec)

    async def sweep_once(self) -> int:
        """Delete artifacts (and the upload) of jobs past ``expires_at``; returns how many jobs expired."""
        now = time.time()
        n = 0
        for rec in list(self.book.jobs.values()):
            if rec.terminal and not rec.expired and rec.expires_at is not None and rec.expires_at <= now:
                await asyncio.to_thread(self.store.delete_prefix, job_key(rec.job_id, "models"))
                await asyncio.to_thread(self.store.delete_prefix, job_key(rec.job_id, "input"))
                rec.expired = True
                await self.book.save(rec)
                job_logger(rec.job_id).info("artifacts expired")
                n += 1
            elif record_due(rec, now, self.args.record_ttl_s):
                await asyncio.to_thread(self.store.delete_prefix, job_key(rec.job_id))
                self.book.remove(rec.job_id)
                job_logger(rec.job_id).info("record expired")
        return n

    async def _sweeper(self) -> None:
        while True:
            try:
                await self.sweep_once()
            except Exception:
                logger.exception("sweep failed")
            await asyncio.sleep(self.args.sweep_interval_s)
