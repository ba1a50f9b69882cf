"""API keys, ownership and signed, SSRF-safe webhooks: unit checks, then one keyed app over HTTP."""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from serve_app.auth import (
    AuthConfigError,
    AuthSettings,
    Principal,
    can_access,
    check_bind,
    entry_for,
    load_keys,
    parse_entries,
    webhook_secret,
)
from serve_app.webhooks import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WebhookRefusedError,
    WebhookSettings,
    resolve_public,
    sign,
    verify,
)

ALICE, BOB, ROOT = "r3d_alice_key_0123456789", "r3d_bob_key_9876543210", "r3d_admin_key_5555555555"

# ---------------------------------------------------------------- units (no Ray)


def test_entries_hold_hashes_and_refuse_plain_keys(tmp_path):
    entry = entry_for("alice", ALICE)
    assert ALICE not in entry and entry.startswith("alice:user:sha256:")
    keys = parse_entries(entry + "\n# comment\n" + entry_for("root", ROOT, "admin"), "test")
    assert sorted(p.name for p in keys.values()) == ["alice", "root"]
    assert [p.admin for p in keys.values()] == [False, True]
    with pytest.raises(AuthConfigError):
        parse_entries(f"alice:user:{ALICE}", "test")  # a plain key is not an entry
    f = tmp_path / "keys"
    f.write_text(entry + "\n")
    assert list(load_keys(AuthSettings(api_keys_env=None, api_keys_file=str(f))).values()) == [Principal("alice")]


def test_non_loopback_bind_without_keys_refuses_to_start():
    for host in ("0.0.0.0", "::", "10.1.2.3", "192.168.0.5", None):
        with pytest.raises(AuthConfigError, match="refusing to start"):
            check_bind(host, {})
    for host in ("127.0.0.1", "::1", "localhost"):
        check_bind(host, {})
    check_bind("0.0.0.0", parse_entries(entry_for("alice", ALICE), "t"))


def test_ownership_rule():
    assert can_access(Principal("alice"), "alice") and not can_access(Principal("bob"), "alice")
    assert can_access(Principal("root", admin=True), "alice") and can_access(Principal("root", admin=True), None)
    assert not can_access(Principal("alice"), None)


def test_webhook_addresses_inside_the_network_are_refused():
    s = WebhookSettings()

    def refused(url: str) -> bool:
        try:
            asyncio.run(resolve_public(url, s))
            return False
        except WebhookRefusedError:
            return True

    for url in (
        "http://127.0.0.1/x",
        "http://localhost:8000/",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/",
        "http://192.168.1.1/",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://0.0.0.0/",
        "http://2130706433/",  # 127.0.0.1 as one integer
        "http://[fd00:ec2::254]/",
    ):
        assert refused(url), url
    assert (
        asyncio.run(resolve_public("http://127.0.0.1:9/x", WebhookSettings(allow_hosts=["127.0.0.1"]))) == "127.0.0.1"
    )
    assert asyncio.run(resolve_public("http://8.8.8.8/x", s)) == "8.8.8.8"  # an address needs no DNS


def test_signature_round_trip():
    secret = webhook_secret(ALICE)
    body = b'{"job_id":"x"}'
    sig = sign(secret, "1700000000", body)
    assert verify(secret, "1700000000", body, sig)
    assert not verify(secret, "1700000001", body, sig) and not verify(webhook_secret(BOB), "1700000000", body, sig)


# ---------------------------------------------------------------- one keyed app over HTTP

ray = pytest.importorskip("ray")
from serve_harness import BEHAVIOUR_MODEL, serve_app  # noqa: E402

from pipeline.synthetic import write_bundle  # noqa: E402


@pytest.fixture(scope="module")
def service(tmp_path_factory, bundle):
    d = tmp_path_factory.mktemp("auth")
    keys = d / "api-keys"
    keys.write_text("\n".join([entry_for("alice", ALICE), entry_for("bob", BOB), entry_for("root", ROOT, "admin")]))
    args = {
        "store": {"kind": "local", "path": str(d / "store")},
        "models": [BEHAVIOUR_MODEL],
        "default_preset": "fast",
        "fanout": False,
        "ingress_num_cpus": 0,
        "webhook_backoff_s": 0.2,
        "auth": {"api_keys_env": None, "api_keys_file": str(keys)},
        "webhooks": {"allow_hosts": ["127.0.0.1"], "deadline_s": 5, "max_response_bytes": 1024},
        "quotas": {"max_stored_bytes_per_key": 20 * len(bundle)},
    }
    with serve_app(args) as (url, _):
        yield url


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> bytes:
    return write_bundle(tmp_path_factory.mktemp("ab") / "b.zip", "box", resolution=48, as_zip=True).read_bytes()


def client(url: str, key: str | None) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {key}"} if key else {})


def wait_terminal(c: httpx.Client, job_id: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get(f"/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "canceled"):
            return job
        time.sleep(0.3)
    raise TimeoutError(job_id)


def test_without_a_key_401_and_open_paths_stay_open(service):
    anon = client(service, None)
    for method, path in (("GET", "/jobs"), ("POST", "/jobs"), ("GET", "/experiments"), ("GET", "/batches/x")):
        r = anon.request(method, path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "UNAUTHORIZED", (path, r.text)
        assert r.headers["www-authenticate"].startswith("Bearer")
    assert client(service, "r3d_not_a_key").get("/jobs").status_code == 401
    assert client(service, None).get("/jobs", headers={"Authorization": "Basic YWxpY2U6eA=="}).status_code == 401
    assert anon.get("/ready").status_code == 200
    assert anon.get("/health").status_code == 200


def test_jobs_are_owned(service, bundle):
    alice, bob, root = client(service, ALICE), client(service, BOB), client(service, ROOT)
    r = alice.post("/jobs", files={"bundle": ("b.zip", bundle, "application/zip")})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    assert wait_terminal(alice, job_id)["status"] == "succeeded"
    # Another key's job is unknown to bob: every route answers 404, as for a missing id.
    for method, path in (
        ("GET", f"/jobs/{job_id}"),
        ("GET", f"/jobs/{job_id}/download"),
        ("GET", f"/jobs/{job_id}/files/fusion/mesh.obj"),
        ("GET", f"/jobs/{job_id}/events"),
        ("POST", f"/jobs/{job_id}/cancel"),
        ("DELETE", f"/jobs/{job_id}"),
    ):
        r = bob.request(method, path)
        assert r.status_code == 404 and r.json()["error"]["code"] == "JOB_NOT_FOUND", (method, path, r.text)
    assert job_id not in [j["job_id"] for j in bob.get("/jobs").json()["items"]]
    assert job_id in [j["job_id"] for j in alice.get("/jobs").json()["items"]]
    # The admin sees and cleans up everything.
    assert job_id in [j["job_id"] for j in root.get("/jobs", params={"limit": 200}).json()["items"]]
    assert root.get(f"/jobs/{job_id}/download").status_code == 200
    assert root.delete(f"/jobs/{job_id}").status_code == 204
    assert alice.get(f"/jobs/{job_id}").status_code == 404


def test_experiments_and_batches_are_owned(service, bundle):
    alice, bob, root = client(service, ALICE), client(service, BOB), client(service, ROOT)
    spec = json.dumps({"name": "owned", "models": ["fusion"], "presets": ["fast"]})
    r = alice.post("/experiments", files={"spec": ("s.json", spec), "bundle": ("b.zip", bundle)})
    assert r.status_code == 202, r.text
    exp_id = r.json()["experiment_id"]
    for path in (f"/experiments/{exp_id}", f"/experiments/{exp_id}/download", f"/experiments/compare?ids={exp_id}"):
        r = bob.get(path)
        assert r.status_code == 404 and r.json()["error"]["code"] == "EXPERIMENT_NOT_FOUND", (path, r.text)
    assert exp_id not in [e["experiment_id"] for e in bob.get("/experiments").json()["items"]]
    assert exp_id in [e["experiment_id"] for e in alice.get("/experiments").json()["items"]]
    assert root.get(f"/experiments/{exp_id}").status_code == 200

    r = alice.post("/batches", files=[("bundles", ("one.zip", bundle)), ("bundles", ("two.zip", bundle))])
    assert r.status_code == 202, r.text
    batch_id = r.json()["batch_id"]
    item_job = r.json()["items"][0]["job_id"]
    assert bob.get(f"/batches/{batch_id}").json()["error"]["code"] == "BATCH_NOT_FOUND"
    assert bob.get(f"/jobs/{item_job}").status_code == 404
    assert alice.get(f"/batches/{batch_id}").status_code == 200 and root.get(f"/batches/{batch_id}").status_code == 200


def test_python_client_takes_the_key(service, bundle, monkeypatch):
    from serve_app.client import Recon3DClient, ServiceError

    with Recon3DClient(service, api_key=ALICE) as c:
        job_id = c.submit(bundle)
    monkeypatch.setenv("RECON3D_API_KEY", ALICE)
    with Recon3DClient(service) as c:
        assert c.get(job_id)["job_id"] == job_id
    monkeypatch.setenv("RECON3D_API_KEY", BOB)
    with Recon3DClient(service) as c, pytest.raises(ServiceError):
        c.get(job_id)


class _Receiver:
    """A webhook receiver on 127.0.0.1 that records (headers, raw body) and answers a large body."""

    def __init__(self):
        self.calls: list[tuple[dict, bytes]] = []
        calls = self.calls

        class Hook(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                calls.append((dict(self.headers), self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.send_header("Content-Length", str(10 * 1024 * 1024))
                self.end_headers()
                try:
                    for _ in range(160):  # 10 MiB offered; the service reads at most 1 KiB of it
                        self.wfile.write(b"z" * 65536)
                except OSError:
                    pass

            def log_message(self, *a):
                pass

        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.srv.server_address[1]}/hook"


def test_webhook_refused_inside_the_network(service, bundle):
    alice = client(service, ALICE)
    for url in ("http://169.254.169.254/latest/meta-data/", "http://10.0.0.7/x", "http://[::1]:8000/"):
        r = alice.post("/jobs", files={"bundle": ("b.zip", bundle)}, data={"webhook_url": url})
        assert r.status_code == 422 and r.json()["error"]["code"] == "WEBHOOK_URL_REFUSED", (url, r.text)


def test_webhook_is_signed_with_the_keys_secret(service, bundle):
    rx = _Receiver()
    alice = client(service, ALICE)
    try:
        r = alice.post("/jobs", files={"bundle": ("b.zip", bundle)}, data={"webhook_url": rx.url})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        wait_terminal(alice, job_id)
        deadline = time.monotonic() + 20
        while not rx.calls and time.monotonic() < deadline:
            time.sleep(0.1)
        job = alice.get(f"/jobs/{job_id}").json()
        time.sleep(1.0)  # a second delivery would arrive now if the capped read had failed the first
    finally:
        rx.srv.shutdown()
    assert len(rx.calls) == 1, job
    headers, body = rx.calls[0]
    assert json.loads(body)["job_id"] == job_id
    # What a receiver does: recompute the HMAC of "<timestamp>.<raw body>" with the secret of its key.
    assert verify(webhook_secret(ALICE), headers[TIMESTAMP_HEADER], body, headers[SIGNATURE_HEADER])
    assert not verify(webhook_secret(BOB), headers[TIMESTAMP_HEADER], body, headers[SIGNATURE_HEADER])
    assert headers["Host"].startswith("127.0.0.1:") and job["status"] == "succeeded"


def test_storage_quota_per_key(service, bundle):
    """21 bundles in one batch would pass bob's quota of 20 bundles' bytes: 413 before anything is queued."""
    bob = client(service, BOB)
    before = bob.get("/jobs").json()["total"]
    files = [("bundles", (f"b{i}.zip", bundle)) for i in range(21)]
    r = bob.post("/batches", files=files)
    assert r.status_code == 413 and r.json()["error"]["code"] == "QUOTA_STORAGE", r.text
    assert r.json()["error"]["details"]["limit"] == 20 * len(bundle)
    assert bob.get("/jobs").json()["total"] == before


def test_quota_rules_without_a_service():
    from types import SimpleNamespace

    from serve_app.quotas import QuotaSettings, check_quota, usage

    def job(owner, status, nbytes, expired=False):
        return SimpleNamespace(owner=owner, status=status, upload_bytes=nbytes, expired=expired)

    book = SimpleNamespace(
        jobs={
            "1": job("alice", "queued", 100),
            "2": job("alice", "queued", 100),
            "3": job("alice", "succeeded", 100, expired=True),
            "4": job("bob", "queued", 500),
        }
    )
    assert usage(book, "alice") == (2, 200)
    q = QuotaSettings(max_queued_jobs_per_key=3, max_stored_bytes_per_key=300)
    check_quota(q, book, Principal("alice"), jobs=1, new_bytes=100)
    with pytest.raises(Exception, match="queued") as e:
        check_quota(q, book, Principal("alice"), jobs=2)
    assert e.value.code == "QUOTA_QUEUED_JOBS"
    with pytest.raises(Exception) as e:
        check_quota(q, book, Principal("alice"), new_bytes=101)
    assert e.value.code == "QUOTA_STORAGE"
    check_quota(q, book, Principal("root", admin=True), jobs=50, new_bytes=10**9)  # admins are exempt


def test_retention_rules():
    from types import SimpleNamespace

    from serve_app.retention import ORPHAN_GRACE_S, orphan_job_ids, record_due

    now = 1_800_000_000.0
    old = f"{int((now - ORPHAN_GRACE_S - 5) * 1000):013d}-aaaaaaaaaa"
    young = f"{int((now - 10) * 1000):013d}-bbbbbbbbbb"
    known = f"{int((now - 9999) * 1000):013d}-cccccccccc"
    keys = [f"jobs/{old}/input/bundle.zip", f"jobs/{young}/input/bundle.zip", f"jobs/{known}/job.json", "jobs/x"]
    assert orphan_job_ids(keys, {known}, now=now) == [old]
    rec = SimpleNamespace(expired=True, expires_at=now - 100)
    assert record_due(rec, now, 50) and not record_due(rec, now, 200)
    assert not record_due(SimpleNamespace(expired=False, expires_at=now - 100), now, 50)


def test_shipped_configs_bind_safely():
    """The README's `serve run serve_config.yaml` binds loopback (keyless is allowed there); the
    Kubernetes config binds every interface and so must come with keys (it reads them from a secret)."""
    import importlib.util

    import yaml

    from serve_app.auth import is_loopback

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("render_rayservice", repo / "cluster" / "render_rayservice.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    SERVE_CONFIG, OVERRIDES, serve_config_v2 = render.SERVE_CONFIG, render.OVERRIDES, render.serve_config_v2
    from serve_app.config import AppArgs

    local = yaml.safe_load(SERVE_CONFIG.read_text())
    assert is_loopback(local["http_options"]["host"])
    check_bind(local["http_options"]["host"], {})
    args = AppArgs.model_validate(local["applications"][0]["args"])
    assert args.auth.api_keys_env == "RECON3D_API_KEYS"
    cluster = serve_config_v2(SERVE_CONFIG.read_text(), OVERRIDES.read_text())
    assert not is_loopback(cluster["http_options"]["host"])
    with pytest.raises(AuthConfigError):
        check_bind(cluster["http_options"]["host"], {})
