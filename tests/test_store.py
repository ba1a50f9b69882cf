"""Store backends: the local directory and S3 (against moto's standalone server on 127.0.0.1)."""

from __future__ import annotations

import pickle

import pytest
from serve_harness import free_port

from deployments.store import InvalidKeyError, LocalStore, S3Store, check_key, make_store
from serve_app.config import AppArgs, StoreConfig
from serve_app.jobs import JobBook, JobRecord, ModelRun, record_key


@pytest.fixture(scope="module")
def moto_url(monkeypatch_module):
    server = pytest.importorskip("moto.server")
    port = free_port()
    srv = server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    srv.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    mp.setenv("AWS_ACCESS_KEY_ID", "testing")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
    yield mp
    mp.undo()


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return make_store(StoreConfig(kind="local", path=str(tmp_path / "store")))
    url = request.getfixturevalue("moto_url")
    cfg = StoreConfig(
        kind="s3",
        bucket=f"recon3d-{tmp_path.name[-8:].lower().replace('_', '-')}",
        prefix="svc",
        endpoint_url=url,
        region="us-east-1",
        create_bucket=True,
    )
    return make_store(cfg)


def test_put_get_list_delete_roundtrip(store):
    store.put("jobs/a/job.json", b"{}")
    store.put("jobs/a/models/fusion/mesh.obj", b"v 0 0 0\n" * 1000)
    store.put("jobs/b/job.json", b"[]")
    assert store.get("jobs/a/job.json") == b"{}"
    assert store.exists("jobs/a/job.json") and not store.exists("jobs/a/nope")
    assert store.size("jobs/a/models/fusion/mesh.obj") == 8000
    assert store.list("jobs/a") == ["jobs/a/job.json", "jobs/a/models/fusion/mesh.obj"]
    assert store.list("jobs") == ["jobs/a/job.json", "jobs/a/models/fusion/mesh.obj", "jobs/b/job.json"]
    assert b"".join(store.iter_bytes("jobs/a/models/fusion/mesh.obj", chunk_size=1000)) == b"v 0 0 0\n" * 1000
    store.put("jobs/a/job.json", b'{"v": 2}')  # overwrite
    assert store.get("jobs/a/job.json") == b'{"v": 2}'
    assert store.delete_prefix("jobs/a") == 2
    assert store.list("jobs") == ["jobs/b/job.json"]
    with pytest.raises(KeyError):
        store.get("jobs/a/job.json")
    with pytest.raises(KeyError):
        store.size("jobs/a/job.json")
    store.delete("jobs/never")  # absent keys are ignored
    clone = pickle.loads(pickle.dumps(store))  # Ray tasks receive the store by value
    assert clone.get("jobs/b/job.json") == b"[]"


def test_keys_cannot_escape_the_root(store):
    for bad in ("", "/etc/passwd", "../x", "a/../../x", "a\\b", "a\x00b"):
        with pytest.raises(InvalidKeyError):
            check_key(bad)
        with pytest.raises(InvalidKeyError):
            store.put(bad, b"x")


def test_presigned_url_only_on_s3(store):
    store.put("f.txt", b"hello")
    url = store.presigned_url("f.txt")
    if isinstance(store, S3Store):
        import httpx

        assert httpx.get(url).content == b"hello"
    else:
        assert isinstance(store, LocalStore) and url is None


def test_job_records_survive_a_new_book(store):
    """What recovery relies on: records written by one JobBook are read back by a fresh one."""
    import asyncio

    book = JobBook(store)
    rec = JobRecord(job_id="0000000000001-0000000001", models=["fusion"], preset="fast", runs={"fusion": ModelRun()})
    book.add(rec)
    rec.runs["fusion"].progress = 40.0
    asyncio.run(book.save(rec))
    store.put(record_key("0000000000002-0000000002"), b"{not json")  # a corrupt record is skipped
    again = JobBook(store).load_all()
    assert [r.job_id for r in again] == [rec.job_id] and again[0].runs["fusion"].progress == 40.0


def test_progress_never_goes_backwards():
    rec = JobRecord(
        job_id="x", models=["fusion"], preset="fast", runs={"fusion": ModelRun(status="running", progress=60)}
    )
    rec.refresh_summary()
    rec.runs["fusion"].progress = 10.0  # e.g. a retried attempt starting over
    rec.refresh_summary()
    assert rec.progress == 60.0 and rec.status == "running"


def test_app_args_validation():
    a = AppArgs.model_validate({"store": "s3://bucket/pre", "models": "fusion"})
    assert a.store.kind == "s3" and a.store.bucket == "bucket" and a.store.prefix == "pre"
    with pytest.raises(ValueError, match="unique"):
        AppArgs.model_validate({"models": ["fusion", "fusion"]})
    with pytest.raises(ValueError, match="unknown model"):
        AppArgs.model_validate({"models": ["nerf"]})
    with pytest.raises(ValueError, match="bucket"):
        AppArgs.model_validate({"store": {"kind": "s3"}})
    with pytest.raises(ValueError):
        AppArgs.model_validate({"modles": []})
