"""Batches over real HTTP: many bundles, one id, aggregate + per-item status, one ZIP, the cap.

One Serve app for the module; the fusion deployment runs ``test_service_runners.behaviour_runner``
(each bundle's behaviour.txt says quick / fail / slow).
"""

from __future__ import annotations

import io
import json
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from serve_app.batches import aggregate_status, split_archive

REPO = Path(__file__).resolve().parents[1]
MAX_ITEMS = 3


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for k, v in files.items():
            zf.writestr(k, v)
    return buf.getvalue()


def test_aggregate_status_and_archive_split():
    assert aggregate_status(["queued", "queued"]) == "queued"
    assert aggregate_status(["succeeded", "queued"]) == "running"
    assert aggregate_status(["succeeded", "succeeded"]) == "succeeded"
    assert aggregate_status(["succeeded", "failed"]) == "partial"
    assert aggregate_status(["failed", "canceled"]) == "failed"
    assert aggregate_status(["canceled"]) == "canceled"
    bundle = {"multi_views/front.png": b"x", "depth_renders/front.png": b"y"}
    folders = _zip({f"{n}/{k}": v for n in ("a", "b") for k, v in bundle.items()} | {"readme.txt": b"hi"})
    items = split_archive(folders, max_items=3, max_unpacked=10**6)
    assert [n for n, _ in items] == ["a", "b"]
    assert sorted(zipfile.ZipFile(io.BytesIO(items[0][1])).namelist()) == sorted(bundle)
    nested = _zip({"x/one.zip": _zip(bundle), "two.zip": _zip(bundle)})
    assert [n for n, _ in split_archive(nested, max_items=3, max_unpacked=10**6)] == ["one", "two"]
    with pytest.raises(Exception) as e:
        split_archive(_zip({f"{i}.zip": b"" for i in range(4)}), max_items=3, max_unpacked=10**6)
    assert e.value.code == "BATCH_TOO_LARGE"
    with pytest.raises(Exception) as e:
        split_archive(_zip({"readme.txt": b"hi"}), max_items=3, max_unpacked=10**6)
    assert e.value.code == "INVALID_ARCHIVE"


ray = pytest.importorskip("ray")
from serve_harness import BEHAVIOUR_MODEL, serve_app  # noqa: E402
from test_service_runners import with_behaviour  # noqa: E402

from pipeline.synthetic import write_bundle  # noqa: E402


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    args = {
        "store": {"kind": "local", "path": str(tmp_path_factory.mktemp("store"))},
        "models": [BEHAVIOUR_MODEL],
        "default_preset": "fast",
        "job_timeout_s": 60,
        "fanout_num_cpus": 0.5,
        # The Ray-task fan-out end to end (multi-node clusters); test_service covers the replica's own evaluation.
        "evaluate_in": "tasks",
        "preview_views": 1,
        "ingress_num_cpus": 0,
        "batches": {"max_items": MAX_ITEMS},
    }
    with serve_app(args) as (url, _), httpx.Client(base_url=url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def box(tmp_path_factory) -> bytes:
    return write_bundle(
        tmp_path_factory.mktemp("b") / "box.zip", "box", resolution=96, as_zip=True, with_transforms=True
    ).read_bytes()


def _error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "request_id"} and body["error"]["code"] == code, body
    return body["error"]["details"]


def _wait(client, batch_id: str, timeout: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        b = client.get(f"/batches/{batch_id}").json()
        if b["status"] not in ("queued", "running"):
            return b
        time.sleep(0.3)
    raise TimeoutError(f"batch {batch_id} is still {b['status']}")


@pytest.mark.serve
@pytest.mark.slow
def test_batch_of_uploads_partial_failure_and_one_zip(client, box):
    files = [
        ("bundles", ("chair.zip", with_behaviour(box, "quick"), "application/zip")),
        ("bundles", ("chair.zip", with_behaviour(box, "quick"), "application/zip")),
        ("bundles", ("broken.zip", with_behaviour(box, "fail"), "application/zip")),
    ]
    r = client.post("/batches", files=files, data={"overrides": json.dumps({"texture_size": 256})})
    assert r.status_code == 202, r.text
    body = r.json()
    batch_id = body["batch_id"]
    assert [i["name"] for i in body["items"]] == ["chair", "chair-2", "broken"]
    assert body["overrides"] == {"texture.size": 256} and r.headers["location"] == f"/batches/{batch_id}"
    job = client.get(f"/jobs/{body['items'][0]['job_id']}").json()
    assert job["preset"] == "fast"

    b = _wait(client, batch_id)
    assert b["status"] == "partial" and b["counts"] == {"succeeded": 2, "failed": 1}, b
    by_name = {i["name"]: i for i in b["items"]}
    assert by_name["broken"]["error"]["code"] == "MODEL_FAILED" and by_name["chair"]["status"] == "succeeded"

    z = client.get(f"/batches/{batch_id}/download")
    assert z.status_code == 200 and z.headers["content-type"] == "application/zip"
    names = set(zipfile.ZipFile(io.BytesIO(z.content)).namelist())
    assert {"batch.json", "chair/fusion/mesh.glb", "chair-2/fusion/quality.json"} <= names
    assert not any(n.startswith("broken/fusion/mesh") for n in names)


@pytest.mark.serve
def test_batch_archive_cap_not_ready_and_errors(client, box):
    slow = with_behaviour(box, "slow")
    archive = _zip({"one.zip": slow})
    r = client.post("/batches", files={"archive": ("all.zip", archive, "application/zip")})
    assert r.status_code == 202, r.text
    batch_id = r.json()["batch_id"]
    _error(client.get(f"/batches/{batch_id}/download"), 409, "BATCH_NOT_READY")
    job_id = r.json()["items"][0]["job_id"]
    token = client.post(f"/jobs/{job_id}/cancel").json()["error"]["details"]["confirm_token"]
    assert client.post(f"/jobs/{job_id}/cancel", json={"confirm": True, "token": token}).status_code == 202
    assert _wait(client, batch_id, timeout=60)["status"] == "canceled"

    four = [("bundles", (f"b{i}.zip", box, "application/zip")) for i in range(MAX_ITEMS + 1)]
    assert _error(client.post("/batches", files=four), 413, "BATCH_TOO_LARGE") == {"items": 4, "limit": MAX_ITEMS}
    too_big_archive = _zip({f"{i}.zip": box for i in range(MAX_ITEMS + 1)})
    _error(
        client.post("/batches", files={"archive": ("a.zip", too_big_archive, "application/zip")}),
        413,
        "BATCH_TOO_LARGE",
    )
    _error(client.get("/batches/batch-0000000000000-00000000"), 404, "BATCH_NOT_FOUND")
    broken = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(box)) as src, zipfile.ZipFile(broken, "w") as out:
        for n in src.namelist():
            if n != "multi_views/left.png":
                out.writestr(n, src.read(n))
    files = [
        ("bundles", ("good.zip", box, "application/zip")),
        ("bundles", ("bad.zip", broken.getvalue(), "application/zip")),
    ]
    assert _error(client.post("/batches", files=files), 422, "MISSING_VIEW")["item"] == "bad"
    r = client.post("/batches", files=[files[0]], data={"overrides": '{"faces": "many"}'})
    assert _error(r, 422, "INVALID_OVERRIDES")["key"] == "faces"
    _error(client.post("/batches", data={"model": "fusion"}), 422, "INVALID_REQUEST")
