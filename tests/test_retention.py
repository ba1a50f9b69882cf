"""One TTL for jobs, experiments and batches (serve_app/retention.py), crash leftovers, and the
spooled /experiments upload. No Ray: the experiment and batch services run on a local store, a
job book and a fake scheduler queue, behind a small FastAPI app with the service's error handling;
times come from a fake clock (``now=``)."""

from __future__ import annotations

import asyncio
import glob
import json
import tempfile
import time

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from deployments.store import LocalStore
from pipeline.synthetic import write_bundle
from serve_app import batches as B
from serve_app.auth import Principal
from serve_app.config import AppArgs
from serve_app.experiments import router as R
from serve_app.experiments.service import ExperimentService, experiment_key
from serve_app.jobs import JobBook, JobRecord, ModelRun, job_key
from serve_app.middleware import add_exception_handling
from serve_app.retention import ORPHAN_GRACE_S, created_at_of_id, orphan_ids, set_expiry, sweep_expired
from serve_app.submission import JobSubmitter

ARTIFACT_TTL_S = 10.0
RECORD_TTL_S = 100.0
MAX_UPLOAD = 256 * 1024


def run(coro):
    return asyncio.run(coro)


class FakeQueue:
    """The scheduler's side of a submission: the record goes into the book, nothing runs."""

    def __init__(self, book: JobBook):
        self.book = book

    async def submit(self, rec: JobRecord) -> None:
        self.book.add(rec)
        await self.book.save(rec)

    def queued_count(self) -> int:
        return self.book.count("queued")


def submitter(tmp_path) -> JobSubmitter:
    args = AppArgs(
        store={"kind": "local", "path": str(tmp_path / "store")},
        artifact_ttl_s=ARTIFACT_TTL_S,
        record_ttl_s=RECORD_TTL_S,
        max_upload_bytes=MAX_UPLOAD,
        experiments={"snapshot": False, "db_path": str(tmp_path / "exp.sqlite")},
    )
    store = LocalStore(tmp_path / "store")
    book = JobBook(store)
    return JobSubmitter(args, store, book, FakeQueue(book), served=["fusion"])


def http_app(experiments: ExperimentService | None = None, batches: B.BatchService | None = None) -> TestClient:
    """The experiment and batch routes with the ingress's error handling, called by an admin."""
    app = FastAPI()
    add_exception_handling(app)
    app.include_router(R.router)
    app.include_router(B.router)

    @app.middleware("http")
    async def admin(request, call_next):
        request.scope["recon3d.principal"] = Principal("root", admin=True)
        return await call_next(request)

    R._service, B._service = experiments, batches
    return TestClient(app)


def error_code(r, status: int) -> str:
    assert r.status_code == status, r.text
    return r.json()["error"]["code"]


def ended_job(jobs: JobSubmitter, job_id: str, *, ended_at: float) -> JobRecord:
    rec = JobRecord(job_id=job_id, models=["fusion"], preset="fast", runs={"fusion": ModelRun(status="succeeded")})
    rec.refresh_summary()
    set_expiry(rec, ARTIFACT_TTL_S, now=ended_at)
    jobs.book.add(rec)
    jobs.store.put(job_key(job_id, "models", "fusion", "mesh.glb"), b"m")
    return rec


# ---------------------------------------------------------------- rules


def test_ids_of_every_kind_carry_their_creation_time_and_orphans_wait_the_grace():
    now = 1_800_000_000.0
    old_ms, young_ms = int((now - ORPHAN_GRACE_S - 5) * 1000), int((now - 10) * 1000)
    assert created_at_of_id(f"exp-{old_ms:013d}-0123abcd") == old_ms / 1000
    assert created_at_of_id(f"batch-{old_ms:013d}-0123abcd") == old_ms / 1000
    assert created_at_of_id(f"{old_ms:013d}-0123abcdef") == old_ms / 1000
    assert created_at_of_id("experiments.sqlite") is None and created_at_of_id("exp-12-ab") is None
    keys = [
        f"experiments/exp-{old_ms:013d}-0123abcd/input/bundle.zip",
        f"experiments/exp-{young_ms:013d}-0123abcd/input/bundle.zip",
        f"experiments/exp-{old_ms:013d}-99999999/runs/a/mesh.glb",
        "experiments/experiments.sqlite",  # the database snapshot, not an experiment
    ]
    known = {f"exp-{old_ms:013d}-99999999"}
    assert orphan_ids(keys, known, prefix="experiments", now=now) == [f"exp-{old_ms:013d}-0123abcd"]


# ---------------------------------------------------------------- experiments


def stored_experiment(svc: ExperimentService, experiment_id: str, job_ids: list[str], *, created: float) -> None:
    """An experiment row with one run per job, its shared bundle copy and one copied run output."""
    runs = [
        {
            "experiment_id": experiment_id,
            "run_index": i,
            "slug": f"upload/fusion-fast-{i}",
            "dataset": "upload",
            "model": "fusion",
            "preset": "fast",
            "overrides_json": "{}",
            "job_id": job_id,
            "status": "succeeded",
            "created_at": created,
        }
        for i, job_id in enumerate(job_ids)
    ]
    exp = {
        "experiment_id": experiment_id,
        "name": "e",
        "description": "",
        "status": "running",
        "spec_json": "{}",
        "bundle_key": experiment_key(experiment_id, "input", "bundle.zip"),
        "git_commit": None,
        "created_at": created,
    }
    svc.db.create_experiment(exp, runs)
    svc.store.put(experiment_key(experiment_id, "input", "bundle.zip"), b"zip")
    svc.store.put(experiment_key(experiment_id, "runs", "upload", "fusion-fast-0", "mesh.glb"), b"m")


def experiment_service(tmp_path) -> ExperimentService:
    svc = ExperimentService(submitter(tmp_path))
    from serve_app.experiments.db import ExperimentsDB

    svc.db = ExperimentsDB(svc.db_path)
    return svc


def test_an_ended_experiment_loses_its_files_after_the_ttl_then_its_record(tmp_path):
    svc = experiment_service(tmp_path)
    running, ended = "exp-0000000000001-aaaaaaaa", "exp-0000000000002-bbbbbbbb"
    stored_experiment(svc, running, ["j1"], created=50.0)
    stored_experiment(svc, ended, ["j2", "j3"], created=50.0)
    svc.db.finish_experiment(ended, 100.0)  # every run's job is terminal
    client = http_app(experiments=svc)

    assert run(svc.sweep_once(now=100.0 + ARTIFACT_TTL_S - 1)) == 0
    assert svc.store.exists(experiment_key(ended, "input", "bundle.zip"))
    assert client.get(f"/experiments/{ended}").json()["expires_at"] == 100.0 + ARTIFACT_TTL_S

    assert run(svc.sweep_once(now=100.0 + ARTIFACT_TTL_S)) == 1
    assert svc.store.list(experiment_key(ended)) == []  # the bundle copy and the run outputs
    assert svc.store.exists(experiment_key(running, "input", "bundle.zip"))  # a running one keeps its files
    view = client.get(f"/experiments/{ended}")
    assert view.status_code == 200 and view.json()["expired"] is True  # the table is still there
    assert error_code(client.get(f"/experiments/{ended}/download"), 410) == "EXPERIMENT_EXPIRED"
    assert client.get(f"/experiments/{running}/download").status_code == 200

    gone = 100.0 + ARTIFACT_TTL_S + RECORD_TTL_S
    assert run(svc.sweep_once(now=gone - 1)) == 0 and svc.db.experiment(ended) is not None
    run(svc.sweep_once(now=gone))
    assert svc.db.experiment(ended) is None and svc.db.runs(ended) == []
    assert error_code(client.get(f"/experiments/{ended}"), 404) == "EXPERIMENT_NOT_FOUND"
    assert svc.db.experiment(running) is not None  # never ended: never expires


def test_a_restart_deletes_experiment_files_without_rows_unless_a_job_reads_them(tmp_path):
    svc = experiment_service(tmp_path)
    old = int((1_800_000_000.0 - ORPHAN_GRACE_S - 5) * 1000)
    orphan, in_use, known = (f"exp-{old:013d}-{h}" for h in ("0000000a", "0000000b", "0000000c"))
    stored_experiment(svc, known, ["j1"], created=old / 1000)
    for experiment_id in (orphan, in_use):  # bundle stored, crash before the rows
        svc.store.put(experiment_key(experiment_id, "input", "bundle.zip"), b"zip")
    queued = JobRecord(
        job_id="0000000000009-aaaaaaaaaa",
        models=["fusion"],
        preset="fast",
        runs={"fusion": ModelRun()},
        input_ref=experiment_key(in_use, "input", "bundle.zip"),
    )
    svc.jobs.book.add(queued)
    assert run(svc.delete_orphans(now=1_800_000_000.0)) == [orphan]
    assert svc.store.list(experiment_key(orphan)) == []
    assert svc.store.exists(experiment_key(in_use, "input", "bundle.zip"))
    assert svc.store.exists(experiment_key(known, "input", "bundle.zip"))


def test_experiment_upload_is_spooled_once_counted_and_bounded(tmp_path, monkeypatch):
    """The bundle part is copied to a temporary file with a running count (413 past the upload limit),
    stored once under the experiment, shared by its runs, and the temporary file is gone afterwards."""
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool_dir))
    svc = experiment_service(tmp_path)
    svc.args.validate_pixels = True
    svc.settings.geometry_metrics = False
    client = http_app(experiments=svc)
    bundle = write_bundle(tmp_path / "b.zip", "box", resolution=48, as_zip=True, with_transforms=True).read_bytes()
    assert len(bundle) < MAX_UPLOAD
    spec = "name: up\npresets: [fast]\ngrid:\n  texture_size: [256, 512]\n"

    r = client.post("/experiments", files={"bundle": ("b.zip", bundle, "application/zip")}, data={"spec": spec})
    assert r.status_code == 202, r.text
    experiment_id = r.json()["experiment_id"]
    assert svc.store.list(experiment_key(experiment_id)) == [experiment_key(experiment_id, "input", "bundle.zip")]
    assert svc.store.get(experiment_key(experiment_id, "input", "bundle.zip")) == bundle
    jobs = [row["job_id"] for row in svc.db.runs(experiment_id)]
    assert len(jobs) == 2
    for job_id in jobs:
        rec = svc.jobs.book.get(job_id)
        assert rec.input_ref == experiment_key(experiment_id, "input", "bundle.zip")
        assert svc.store.list(job_key(job_id, "input")) == []  # no per-run copy
    assert glob.glob(str(spool_dir / "recon3d-upload-*")) == []

    big = bundle + b"\0" * (MAX_UPLOAD - len(bundle) + 1)  # still a ZIP by its magic, one byte over
    r = client.post("/experiments", files={"bundle": ("b.zip", big, "application/zip")}, data={"spec": spec})
    assert error_code(r, 413) == "INPUT_TOO_LARGE"
    assert glob.glob(str(spool_dir / "recon3d-upload-*")) == []
    assert len(svc.db.experiments()) == 1  # nothing stored for the refused one

    r = client.post("/experiments", content=b" " * (R.MAX_SPEC_BYTES + 1), headers={"content-type": "application/json"})
    assert error_code(r, 413) == "INPUT_TOO_LARGE"


# ---------------------------------------------------------------- batches


def test_a_batch_expires_with_its_jobs_then_its_record_goes(tmp_path):
    jobs = submitter(tmp_path)
    svc = B.BatchService(jobs)
    created = 1_000.0
    a, b = (
        ended_job(jobs, "0000000001000-aaaaaaaaaa", ended_at=10_000.0),
        ended_job(jobs, "0000000001000-bbbbbbbbbb", ended_at=10_005.0),
    )
    rec = B.BatchRecord(
        batch_id="batch-0000000001000-0123abcd",
        created_at=created,
        model="fusion",
        preset="fast",
        items=[B.BatchItem(index=0, name="a", job_id=a.job_id), B.BatchItem(index=1, name="b", job_id=b.job_id)],
    )
    jobs.store.put(B.batch_key(rec.batch_id), rec.model_dump_json().encode())
    svc.batches[rec.batch_id] = rec
    client = http_app(batches=svc)

    view = client.get(f"/batches/{rec.batch_id}").json()
    assert view["expired"] is False and view["expires_at"] == 10_005.0 + ARTIFACT_TTL_S
    assert client.get(f"/batches/{rec.batch_id}/download").status_code == 200

    run(sweep_expired(jobs.book, jobs.store, now=10_000.0 + ARTIFACT_TTL_S, record_ttl_s=RECORD_TTL_S))
    assert client.get(f"/batches/{rec.batch_id}").json()["expired"] is False  # item b still has files
    run(sweep_expired(jobs.book, jobs.store, now=10_005.0 + ARTIFACT_TTL_S, record_ttl_s=RECORD_TTL_S))
    assert client.get(f"/batches/{rec.batch_id}").json()["expired"] is True
    assert error_code(client.get(f"/batches/{rec.batch_id}/download"), 410) == "BATCH_EXPIRED"

    t = 10_005.0 + ARTIFACT_TTL_S + RECORD_TTL_S
    run(sweep_expired(jobs.book, jobs.store, now=t - 1, record_ttl_s=RECORD_TTL_S))  # a's record goes
    assert run(svc.sweep_once(now=t - 1)) == [] and jobs.store.exists(B.batch_key(rec.batch_id))
    run(sweep_expired(jobs.book, jobs.store, now=t, record_ttl_s=RECORD_TTL_S))  # b's record goes
    assert run(svc.sweep_once(now=t)) == [rec.batch_id]
    assert not jobs.store.exists(B.batch_key(rec.batch_id))
    assert error_code(client.get(f"/batches/{rec.batch_id}"), 404) == "BATCH_NOT_FOUND"


def test_a_restart_drops_a_batch_whose_jobs_were_never_queued(tmp_path):
    jobs = submitter(tmp_path)
    now = time.time()
    old, young = (
        B.BatchRecord(
            batch_id=f"batch-{int(t * 1000):013d}-0123abcd",
            created_at=t,
            model="fusion",
            preset="fast",
            items=[B.BatchItem(index=0, name="a", job_id=f"{int(t * 1000):013d}-aaaaaaaaaa")],
        )
        for t in (now - ORPHAN_GRACE_S - 5, now - 5)
    )
    for rec in (old, young):  # the batch record is written first; the crash came before its jobs
        jobs.store.put(B.batch_key(rec.batch_id), rec.model_dump_json().encode())
    svc = B.BatchService(jobs)

    async def start_and_stop():
        await svc.start()  # loads the records and sweeps once
        svc._sweeper.cancel()

    run(start_and_stop())
    assert set(svc.batches) == {young.batch_id}  # another replica may still be queueing its jobs
    assert json.loads(jobs.store.get(B.batch_key(young.batch_id)))["batch_id"] == young.batch_id
    assert not jobs.store.exists(B.batch_key(old.batch_id))


@pytest.fixture(autouse=True)
def _no_services():
    yield
    R._service = B._service = None
