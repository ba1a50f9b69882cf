"""The scheduler's parts alone: a fake model handle, an in-memory store, no Ray runtime, no HTTP.

The Ray + HTTP tests (test_service.py) cover the same behaviour end to end.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from deployments.protocol import ErrorEvent, ProgressEvent, ResultEvent
from deployments.store import LocalStore
from serve_app import errors as E
from serve_app.config import AppArgs
from serve_app.jobs import JobBook, JobRecord, ModelRun, WebhookState, job_key
from serve_app.retention import set_expiry, sweep_expired
from serve_app.scheduler import JobScheduler
from serve_app.scheduling import dispatch as D
from serve_app.scheduling.ownership import Ownership, drain_tasks
from serve_app.scheduling.queues import JobQueues
from serve_app.scheduling.recovery import plan_recovery
from serve_app.webhooks import WebhookSettings, deliver_webhook, webhook_body

# ---------------------------------------------------------------- fakes


class FakeStream:
    """What ``handle.options(stream=True).run.remote(req)`` returns: an async iterator of event dicts."""

    def __init__(self, events, *, delay_s: float = 0.0, raise_at_end: BaseException | None = None):
        self.events = list(events)
        self.delay_s = delay_s
        self.raise_at_end = raise_at_end
        self.canceled = False

    def __aiter__(self):
        return self._gen()

    async def _gen(self):
        for ev in self.events:
            await asyncio.sleep(self.delay_s)
            yield ev
        if self.raise_at_end is not None:
            raise self.raise_at_end

    def cancel(self):
        self.canceled = True


class FakeHandle:
    """A model deployment handle: each ``run.remote(request)`` answers with the next scripted stream."""

    def __init__(self, *streams: FakeStream):
        self.streams = list(streams)
        self.requests: list[dict] = []
        self.run = self

    def options(self, **_kw):
        return self

    def remote(self, request: dict):
        self.requests.append(request)
        return self.streams.pop(0)


def result_event(files=("mesh.obj",)) -> dict:
    return {
        "type": "result",
        "result": {"model": "fusion", "preset": "fast", "timings_s": {"total": 0.5}, "warnings": ["w"]},
        "files": list(files),
        "elapsed_s": 0.5,
    }


def progress(fraction: float, stage: str = "bake_texture") -> dict:
    return {"type": "progress", "stage": stage, "fraction": fraction}


def new_record(job_id: str = "0000000000001-aaaaaaaaaa", models=("fusion",), **kw) -> JobRecord:
    return JobRecord(job_id=job_id, models=list(models), preset="fast", runs={m: ModelRun() for m in models}, **kw)


def app_args(**kw) -> AppArgs:
    return AppArgs.model_validate({"fanout": False, "drain_timeout_s": 0, **kw})


def run(coro):
    return asyncio.run(coro)


# ---------------------------------------------------------------- dispatch


def test_stream_run_reports_progress_and_returns_the_typed_result():
    handle = FakeHandle(FakeStream([progress(0.0, "started"), progress(0.5), result_event()]))
    seen: list[ProgressEvent] = []

    async def on_progress(ev):
        seen.append(ev)

    req = D.model_request(new_record(), "fusion", 1, 60.0)
    final = run(D.stream_run(handle, req, on_progress=on_progress, timeout_s=5))
    assert isinstance(final, ResultEvent) and final.files == ["mesh.obj"] and final.result.model == "fusion"
    assert [e.fraction for e in seen] == [0.0, 0.5]
    assert handle.requests[0]["attempt"] == 1 and handle.requests[0]["output_prefix"].endswith("/models/fusion")


def test_stream_run_times_out_and_cancels_the_stream():
    stream = FakeStream([progress(0.1)] * 50, delay_s=0.05)

    async def on_progress(_ev):
        pass

    final = run(
        D.stream_run(
            FakeHandle(stream), D.model_request(new_record(), "fusion", 1, 1), on_progress=on_progress, timeout_s=0.2
        )
    )
    assert isinstance(final, ErrorEvent) and final.code == E.JOB_TIMEOUT
    assert stream.canceled


def test_stream_run_shortened_by_a_cancel_ends_canceled_not_timed_out():
    """A cancel reschedules the call's deadline (CANCEL_STOP_S in the scheduler); when it fires, CANCELED."""
    stream = FakeStream([progress(0.1)] * 100, delay_s=0.05)
    seen: list = []

    async def on_progress(_ev):
        pass

    def on_deadline(cm):
        seen.append(cm)
        cm.reschedule(asyncio.get_running_loop().time() + 0.15)  # what cancel() does to a running call

    final = run(
        D.stream_run(
            FakeHandle(stream),
            D.model_request(new_record(), "fusion", 1, 1),
            on_progress=on_progress,
            timeout_s=60,
            on_deadline=on_deadline,
            canceled=lambda: True,
        )
    )
    assert len(seen) == 1 and stream.canceled
    assert isinstance(final, ErrorEvent) and final.code == E.CANCELED and "did not stop" in final.message


def test_model_request_reads_a_shared_upload():
    rec = new_record(input_ref="experiments/exp-1/input/bundle.zip")
    assert D.model_request(rec, "fusion", 1, 1).input_key == "experiments/exp-1/input/bundle.zip"


def test_stream_run_without_a_final_event_is_model_failed():
    async def on_progress(_ev):
        pass

    final = run(
        D.stream_run(
            FakeHandle(FakeStream([])),
            D.model_request(new_record(), "fusion", 1, 1),
            on_progress=on_progress,
            timeout_s=1,
        )
    )
    assert final.code == E.MODEL_FAILED


def test_apply_functions_write_the_run_record():
    r = ModelRun(status="running")
    D.apply_progress(r, ProgressEvent("bake_texture", 0.5), 0.9)
    D.apply_progress(r, ProgressEvent("bake_texture", 0.2), 0.9)  # never backwards
    assert r.progress == 45.0 and r.stage == "bake_texture"
    D.apply_error(r, ErrorEvent(E.CANCELED, "stop"))
    assert r.status == "canceled" and r.error.code == E.CANCELED
    D.apply_error(r, ErrorEvent(E.MODEL_OOM, "oom"))
    assert r.status == "failed"


# ---------------------------------------------------------------- the scheduler with a fake handle


def test_scheduler_runs_a_job_to_success_and_records_its_duration(tmp_path):
    async def main():
        store = LocalStore(tmp_path)
        book = JobBook(store)
        handle = FakeHandle(FakeStream([progress(0.0, "started"), progress(0.6), result_event()]))
        s = JobScheduler(app_args(), store, book, {"fusion": handle})
        await s.start()
        rec = new_record()
        await s.submit(rec)
        for _ in range(100):
            if rec.terminal:
                break
            await asyncio.sleep(0.02)
        await s.stop()
        return s, rec, store

    s, rec, store = run(main())
    run_ = rec.runs["fusion"]
    assert rec.status == "succeeded" and run_.progress == 100.0 and run_.files == ["mesh.obj"]
    assert run_.warnings == ["w"] and run_.attempts == 1
    assert store.get(D.attempt_key(rec.job_id, "fusion")) == b"1"
    assert rec.expires_at is not None
    assert s.q.mean_duration_s("fusion") is not None


QUALITY = {"status": "warning", "psnr": 20.4, "ssim": 0.86, "failed_views": []}


def evaluated_result(error: dict | None = None) -> dict:
    """The result of a replica that scored its own mesh (``ModelRequest.evaluate``)."""
    ev = result_event(files=("mesh.obj", "quality.json", "previews/turntable.gif"))
    return {**ev, "evaluation": {"quality": QUALITY, "error": error, "warnings": []}}


def _run_evaluating_job(tmp_path, final: dict):
    """(record, the first request, the stage and quality seen while the job ran)."""
    events = [progress(0.0, "started"), progress(1.0, "evaluate"), {"type": "quality", "quality": QUALITY}]
    handle = FakeHandle(FakeStream([*events, progress(1.0, "previews"), final], delay_s=0.05))

    async def main():
        store = LocalStore(tmp_path)
        s = JobScheduler(app_args(fanout=True, evaluate_in="replica"), store, JobBook(store), {"fusion": handle})
        await s.start()
        rec = new_record()
        await s.submit(rec)
        seen = []
        for _ in range(200):
            if rec.terminal:
                break
            seen.append((rec.runs["fusion"].stage, rec.runs["fusion"].quality))
            await asyncio.sleep(0.01)
        await s.stop()
        return rec, seen

    rec, seen = run(main())
    return rec, handle.requests[0], seen


def test_a_replica_that_evaluates_shows_the_quality_before_its_previews(tmp_path):
    rec, request, seen = _run_evaluating_job(tmp_path, evaluated_result())
    assert request["evaluate"] is True
    assert ("previews", {**QUALITY, "error": None}) in seen  # shown while the previews were being made
    run_ = rec.runs["fusion"]
    assert rec.status == "succeeded" and run_.progress == 100.0 and run_.quality == {**QUALITY, "error": None}
    assert {"quality.json", "previews/turntable.gif"} <= set(run_.files)


def test_a_failed_report_from_the_replica_fails_the_run_and_keeps_its_files(tmp_path):
    error = {"code": "QUALITY_FAILED", "message": "masked PSNR 9.1 dB is below 12 dB"}
    rec, _, _ = _run_evaluating_job(tmp_path, evaluated_result(error))
    run_ = rec.runs["fusion"]
    assert rec.status == "failed" and run_.error.code == "QUALITY_FAILED" and "mesh.obj" in run_.files
    assert run_.quality["error"] == error


def test_where_the_evaluation_runs():
    from serve_app.fanout import replica_evaluates

    assert run(replica_evaluates("replica")) and not run(replica_evaluates("tasks"))
    assert not run(replica_evaluates("auto"))  # outside Ray: the node count is unknown, so the tasks
    assert D.model_request(new_record(), "fusion", 1, 60.0).evaluate is False


def test_scheduler_requeues_a_run_whose_replica_died_then_fails_it(tmp_path):
    lost = D.REPLICA_LOST_ERRORS[-1]("replica gone")

    async def main(max_attempts):
        store = LocalStore(tmp_path / str(max_attempts))
        handle = FakeHandle(*(FakeStream([progress(0.0, "started")], raise_at_end=lost) for _ in range(3)))
        s = JobScheduler(app_args(max_attempts=max_attempts), store, JobBook(store), {"fusion": handle})
        await s.start()
        rec = new_record()
        await s.submit(rec)
        for _ in range(200):
            if rec.terminal:
                break
            await asyncio.sleep(0.02)
        await s.stop()
        return rec, handle

    import serve_app.constants as SC

    old, SC.REPLICA_LOST_RETRY_DELAY_S = SC.REPLICA_LOST_RETRY_DELAY_S, 0.0
    try:
        rec, handle = run(main(2))
    finally:
        SC.REPLICA_LOST_RETRY_DELAY_S = old
    assert rec.status == "failed" and rec.runs["fusion"].error.code == E.REPLICA_LOST
    assert [r["attempt"] for r in handle.requests] == [1, 2]
    assert any("loss of its replica" in w for w in rec.runs["fusion"].warnings)


def test_queued_jobs_can_be_canceled_before_they_start(tmp_path):
    async def main():
        store = LocalStore(tmp_path)
        s = JobScheduler(app_args(), store, JobBook(store), {"fusion": FakeHandle()})
        rec = new_record()
        s.book.add(rec)
        s.q.queues["fusion"].append(rec.job_id)
        await s.cancel(rec)
        return s, rec

    s, rec = run(main())
    assert rec.status == "canceled" and rec.runs["fusion"].error.code == E.CANCELED
    assert s.queue_position(rec.job_id) is None


def test_one_out_of_memory_rule_for_the_library_and_the_server():
    import torch

    from deployments import protocol
    from pipeline.errors import ModelOOMError, ReconstructionFailedError, is_oom

    assert protocol.is_oom is is_oom
    assert is_oom(MemoryError()) and is_oom(ModelOOMError("x")) and is_oom(torch.cuda.OutOfMemoryError("CUDA"))
    assert is_oom(RuntimeError("CUDA error: out of memory"))
    assert not is_oom(ReconstructionFailedError("fusion produced no surface")) and not is_oom(ValueError("x"))


# ---------------------------------------------------------------- queues


def test_wait_estimate_follows_durations_queue_and_replicas():
    q = JobQueues(["fusion"])
    q.queues["fusion"].extend(["a", "b", "c"])
    assert q.estimated_wait_s("c") is None  # nothing ran yet
    q.record_duration("fusion", 10.0)
    q.record_duration("fusion", 20.0)
    assert q.position("c") == 2 and q.estimated_wait_s("c") == 30.0
    q.in_flight_keys.add(("x", "fusion"))
    q.replicas["fusion"] = 3
    assert q.estimated_wait_s("c") == 15.0  # 15 s x (2 ahead + 1 running) / 3 replicas
    assert q.estimated_wait_s("zzz") is None


# ---------------------------------------------------------------- ownership and drain


def test_ownership_waits_for_a_live_owner_and_takes_over_a_stale_one(tmp_path):
    store = LocalStore(tmp_path)
    old = Ownership(store, "old")
    old.write()
    new = Ownership(store, "new", stale_after_s=60)
    assert not new.free(new.read())
    t0 = time.monotonic()
    run(new.acquire(0.3, poll_s=0.05))  # the old one never releases: taken over at the deadline
    assert time.monotonic() - t0 >= 0.25 and new.read()["id"] == "new"
    assert run(old.beat()) is False  # the old scheduler learns it was superseded
    run(old.release())  # and does not release what it no longer owns
    assert new.read()["released"] is False
    stale = Ownership(store, "third", stale_after_s=0.0)
    assert stale.free(stale.read())
    run(new.release())
    assert Ownership(store, "fourth").free(new.read())


def test_drain_lets_quick_runs_finish_and_cancels_the_rest():
    async def main():
        quick = asyncio.create_task(asyncio.sleep(0.01))
        slow = asyncio.create_task(asyncio.sleep(10))
        counts = await drain_tasks([quick, slow], 0.2, 0.5)
        return counts, slow.cancelled()

    (finished, canceled), slow_canceled = run(main())
    assert (finished, canceled) == (1, 1) and slow_canceled
    assert run(drain_tasks([], 1, 1)) == (0, 0)


# ---------------------------------------------------------------- recovery


def test_recovery_retries_interrupted_runs_fails_used_up_ones_and_unserved_models():
    retry = new_record("0000000000001-aaaaaaaaaa")
    retry.runs["fusion"].status, retry.runs["fusion"].attempts = "running", 1
    used_up = new_record("0000000000002-aaaaaaaaaa")
    used_up.runs["fusion"].status, used_up.runs["fusion"].attempts = "running", 2
    canceled = new_record("0000000000003-aaaaaaaaaa", cancel_requested=True)
    canceled.runs["fusion"].status = "running"
    unserved = new_record("0000000000004-aaaaaaaaaa", models=("nvdiffrec",))
    done = new_record("0000000000005-aaaaaaaaaa", webhook=WebhookState(url="http://h/x"))
    done.runs["fusion"].status, done.runs["fusion"].started_at, done.runs["fusion"].finished_at = "succeeded", 1.0, 4.0
    done.refresh_summary()
    plan = plan_recovery([retry, used_up, canceled, unserved, done], max_attempts=2, served={"fusion"})
    assert plan.queue == [("fusion", retry.job_id)] and plan.requeued == 1 and plan.interrupted == 1
    assert used_up.runs["fusion"].error.code == E.JOB_INTERRUPTED
    assert canceled.runs["fusion"].status == "canceled"
    assert unserved.runs["nvdiffrec"].error.code == E.MODEL_UNAVAILABLE
    assert {r.job_id for r in plan.finish} == {used_up.job_id, canceled.job_id, unserved.job_id}
    assert plan.save == [retry] and plan.webhooks == [done] and plan.durations == {"fusion": [3.0]}


# ---------------------------------------------------------------- webhooks


def test_webhook_retries_until_delivered_and_records_the_last_error():
    calls: list[dict] = []
    answers = iter([500, 200])

    async def post(url, body, headers, secret, settings):
        calls.append({"url": url, "event": headers["x-recon3d-event"], "body": body, "secret": secret})
        return next(answers)

    rec = new_record(webhook=WebhookState(url="http://hooks.example/done"))
    rec.runs["fusion"].status = "succeeded"
    rec.refresh_summary()
    sleeps: list[float] = []

    async def fake_sleep(s):
        sleeps.append(s)

    ok = run(
        deliver_webhook(
            rec, attempts=3, backoff_s=1.0, sleep=fake_sleep, settings=WebhookSettings(), secret="s3", post=post
        )
    )
    assert ok and rec.webhook.delivered and rec.webhook.attempts == 2 and rec.webhook.last_error is None
    assert sleeps == [1.0] and calls[0]["event"] == "job.succeeded" and calls[0]["secret"] == "s3"
    assert json.loads(calls[0]["body"]) == webhook_body(rec)  # the signed bytes are the body
    assert webhook_body(rec)["links"]["download"] == f"/jobs/{rec.job_id}/download"


def test_webhook_gives_up_after_its_attempts():
    rec = new_record(webhook=WebhookState(url="http://hooks.example/done"))

    async def no_sleep(_s):
        pass

    async def post(*_a):
        return 503

    ok = run(
        deliver_webhook(
            rec, attempts=2, backoff_s=0.0, sleep=no_sleep, settings=WebhookSettings(), secret="k", post=post
        )
    )
    assert not ok and rec.webhook.attempts == 2 and rec.webhook.last_error == "HTTP 503"


# ---------------------------------------------------------------- retention


def test_sweep_deletes_only_expired_artifacts(tmp_path):
    store = LocalStore(tmp_path)
    book = JobBook(store)
    old, fresh = new_record("0000000000001-aaaaaaaaaa"), new_record("0000000000002-aaaaaaaaaa")
    for rec in (old, fresh):
        rec.runs["fusion"].status = "succeeded"
        rec.refresh_summary()
        book.add(rec)
        store.put(job_key(rec.job_id, "models", "fusion", "mesh.obj"), b"v")
        store.put(job_key(rec.job_id, "input", "bundle.zip"), b"z")
    set_expiry(old, 10.0, now=100.0)
    set_expiry(fresh, 10.0, now=1000.0)
    assert run(sweep_expired(book, store, now=500.0)) == 1
    assert old.expired and not fresh.expired
    assert not store.exists(job_key(old.job_id, "models", "fusion", "mesh.obj"))
    assert store.exists(job_key(fresh.job_id, "input", "bundle.zip"))
    assert run(sweep_expired(book, store, now=500.0)) == 0  # once


def test_sweep_deletes_records_past_the_record_ttl(tmp_path):
    store = LocalStore(tmp_path)
    book = JobBook(store)
    rec = new_record("0000000000001-aaaaaaaaaa")
    rec.runs["fusion"].status = "succeeded"
    rec.refresh_summary()
    book.add(rec)
    set_expiry(rec, 10.0, now=100.0)
    assert run(sweep_expired(book, store, now=200.0, record_ttl_s=1000.0)) == 1 and rec.expired
    run(sweep_expired(book, store, now=500.0, record_ttl_s=1000.0))
    assert book.get(rec.job_id) is not None  # 410 JOB_EXPIRED until the record TTL
    run(sweep_expired(book, store, now=1200.0, record_ttl_s=1000.0))
    assert book.get(rec.job_id) is None  # then 404


@pytest.mark.parametrize("ttl", [5.0])
def test_expiry_is_set_once(ttl):
    rec = new_record()
    set_expiry(rec, ttl, now=1.0)
    set_expiry(rec, ttl, now=100.0)
    assert rec.expires_at == 6.0
