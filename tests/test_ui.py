"""The web page in a real browser (headless Chromium driven by Python playwright) against the real service.

The service runs as in test_service.py (a private local Ray; the fusion deployment runs
``test_service_runners.behaviour_runner``, so an upload says what the "model" does: the real
pipeline, slow cancellable work, ...). Chromium is Debian's (``apt-get install chromium``);
without it the browser tests skip with one line, unless ``RECON3D_REQUIRE_BROWSER=1`` (set by
.ci/run), where a missing browser fails them. Screenshots go to ``$RECON3D_TEST_ARTIFACTS``
(else a pytest temporary folder, printed in the test output). ``RECON3D_CHROMIUM`` names another
Chromium executable.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

ray = pytest.importorskip("ray")
from serve_harness import BEHAVIOUR_MODEL, serve_app  # noqa: E402
from test_service_runners import with_behaviour  # noqa: E402

from pipeline.synthetic import write_bundle  # noqa: E402
from serve_app import ui  # noqa: E402

pytestmark = [pytest.mark.serve, pytest.mark.slow]

CHROMIUM_PATHS = ("/usr/lib/chromium/chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser")
# Headless, no sandbox (containers), WebGL through SwiftShader, and no traffic of Chromium's own
# (updates, sync, metrics...), so the page's requests are the only ones to watch.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless=new",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--disable-sync",
    "--metrics-recording-only",
    "--no-first-run",
    "--no-default-browser-check",
]
REQUIRE_BROWSER = os.environ.get("RECON3D_REQUIRE_BROWSER") == "1"
#: The page's own files (everything but vendor/) stay small: no framework, no build output.
PAGE_BYTES_LIMIT = 96 * 1024
JOB_TIMEOUT_S = 240.0


def find_browser() -> tuple[str | None, str]:
    """(chromium executable, "") or (None, why not)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return None, "the Python package playwright is not installed (pip install -e '.[dev]')"
    candidates = [os.environ["RECON3D_CHROMIUM"]] if os.environ.get("RECON3D_CHROMIUM") else CHROMIUM_PATHS
    exe = next((p for p in candidates if os.access(p, os.X_OK)), None)
    if exe is None:
        return None, f"no Chromium at {', '.join(candidates)} (apt-get install -y --no-install-recommends chromium)"
    return exe, ""


CHROMIUM, WHY_NO_BROWSER = find_browser()


def need_browser() -> str:
    if CHROMIUM is None:
        if REQUIRE_BROWSER:
            pytest.fail(f"RECON3D_REQUIRE_BROWSER=1 but {WHY_NO_BROWSER}")
        pytest.skip(f"browser tests skipped: {WHY_NO_BROWSER}")
    return CHROMIUM


# ---------------------------------------------------------------- fixtures


def app_args(store_dir: Path) -> dict:
    return {
        "store": {"kind": "local", "path": str(store_dir)},
        "models": [BEHAVIOUR_MODEL],
        "default_preset": "fast",
        "max_upload_bytes": 8 * 1024 * 1024,
        "max_queued_jobs": 8,
        "job_timeout_s": 300.0,
        "fanout_num_cpus": 0.5,
        "preview_views": 8,
        "ingress_num_cpus": 0,
    }


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    with serve_app(app_args(tmp_path_factory.mktemp("store"))) as (url, _start):
        yield url


@pytest.fixture(scope="module")
def client(service):
    with httpx.Client(base_url=service, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    out = Path(os.environ.get("RECON3D_TEST_ARTIFACTS") or tmp_path_factory.mktemp("ui-artifacts"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"\nUI screenshots: {out}")
    return out


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """Small procedural bundles as ZIP files on disk, as a person would pick them."""
    root = tmp_path_factory.mktemp("bundles")
    box = write_bundle(root / "box.zip", "box", resolution=160, as_zip=True).read_bytes()
    out = {}
    for name, behaviour in (("real", "real"), ("slow", "slow")):
        out[name] = root / f"{name}.zip"
        out[name].write_bytes(with_behaviour(box, behaviour))
    # No top view: the service answers 422 MISSING_VIEW (the page cannot see inside a ZIP).
    src = zipfile.ZipFile(io.BytesIO(box))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for info in src.infolist():
            if "top." not in info.filename:
                zf.writestr(info, src.read(info))
    out["no_top"] = root / "no_top.zip"
    out["no_top"].write_bytes(buf.getvalue())
    out["not_png"] = root / "front.png"
    out["not_png"].write_text("this is not an image\n")
    return out


@pytest.fixture(scope="module")
def browser():
    exe = need_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Page:
    """A browser tab on the service's page that records every request it makes."""

    def __init__(self, browser, url: str, *, width: int = 1280, height: int = 900):
        self.url = url
        self.context = browser.new_context(viewport={"width": width, "height": height}, accept_downloads=True)
        self.page = self.context.new_page()
        self.requests: list[str] = []
        self.console_errors: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("console", lambda m: m.type == "error" and self.console_errors.append(m.text))
        self.page.on("pageerror", lambda e: self.console_errors.append(str(e)))

    def open(self, path: str = "/") -> None:
        self.page.goto(self.url + path)
        self.page.wait_for_selector("body[data-ready='1']", timeout=30_000)

    def foreign_requests(self) -> list[str]:
        origin = urlparse(self.url)
        bad = []
        for u in self.requests:
            # blob: URLs are the page's own copies of API responses: blob:http://host:port/uuid
            p = urlparse(u[5:] if u.startswith("blob:") else u)
            if (p.scheme, p.hostname, p.port) != (origin.scheme, origin.hostname, origin.port):
                bad.append(u)
        return bad

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def tab(browser, service):
    t = Page(browser, service)
    yield t
    t.close()


def upload_bundle(tab: Page, path: Path, preset: str = "fast") -> str:
    page = tab.page
    page.set_input_files("#bundle-file", str(path))
    page.wait_for_selector("#chosen .ok, #chosen .problems", timeout=10_000)
    page.check(f"#presets input[value='{preset}']")
    page.click("#submit-button")
    page.wait_for_function("() => document.querySelector('#job-id').textContent.length > 0", timeout=30_000)
    return page.inner_text("#job-id").strip()


def wait_status(tab: Page, statuses: set[str], timeout: float = JOB_TIMEOUT_S) -> str:
    tab.page.wait_for_function(
        "s => s.includes(document.querySelector('#job-status').textContent)",
        arg=sorted(statuses),
        timeout=timeout * 1000,
    )
    return tab.page.inner_text("#job-status").strip()


# JS: wait for the viewer's model, then count the non-background pixels of its canvas capture.
VIEWER_PIXELS_JS = """
async (sel) => {
  const mv = document.querySelector(sel);
  mv.scrollIntoView({block: "center"});  // model-viewer renders only while on screen
  const t0 = performance.now();
  while (!(mv.loaded && mv.modelIsVisible)) {
    if (performance.now() - t0 > 60000) return {loaded: mv.loaded, visible: mv.modelIsVisible, timeout: true};
    await new Promise((r) => setTimeout(r, 100));
  }
  await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
  const img = new Image();
  img.src = mv.toDataURL("image/png");
  await img.decode();
  const c = document.createElement("canvas");
  c.width = img.width; c.height = img.height;
  const ctx = c.getContext("2d");
  ctx.drawImage(img, 0, 0);
  const d = ctx.getImageData(0, 0, c.width, c.height).data;
  let drawn = 0;
  const colours = new Set();
  for (let i = 0; i < d.length; i += 4) {
    if (d[i + 3] > 0) { drawn++; colours.add((d[i] >> 4) << 8 | (d[i + 1] >> 4) << 4 | (d[i + 2] >> 4)); }
  }
  return {loaded: mv.loaded, visible: mv.modelIsVisible, drawn, total: d.length / 4, colours: colours.size};
}
"""


# ---------------------------------------------------------------- without a browser


def test_page_files_are_small_and_vendored_files_match_their_record():
    own = [p for p in ui.STATIC_DIR.rglob("*") if p.is_file() and "vendor" not in p.parts]
    assert {p.name for p in own} >= {"index.html", "app.js", "api.js", "checks.js", "app.css"}
    total = sum(p.stat().st_size for p in own)
    assert total < PAGE_BYTES_LIMIT, f"the page's own files are {total} bytes"
    for record in ui.STATIC_DIR.glob("vendor/*/VENDORED.json"):
        meta = json.loads(record.read_text())
        assert (record.parent / "LICENSE").is_file()
        for name, f in meta["files"].items():
            if "sha256" in f:
                data = (record.parent / name).read_bytes()
                assert hashlib.sha256(data).hexdigest() == f["sha256"] and len(data) == f["bytes"], name
    for p in own:  # nothing of the page's own points outside the service
        text = p.read_text()
        assert "https://" not in text and "http://" not in text.replace("http://www.w3.org", ""), p


def test_page_routes(client):
    for path in ("/", "/ui"):
        r = client.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in r.headers["content-security-policy"]
        assert '<script type="module" src="ui/app.js">' in r.text
    js = client.get("/ui/app.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    vendored = client.get("/ui/vendor/model-viewer/model-viewer.min.js")
    assert vendored.status_code == 200 and "max-age" in vendored.headers["cache-control"]
    settings = client.get("/ui/settings.json").json()
    assert settings["models"] == ["fusion"] and settings["default_preset"] == "fast"
    for bad in ("/ui/../pyproject.toml", "/ui/%2e%2e/ui.py", "/ui/nope.js", "/ui/vendor/model-viewer/NOTICE"):
        r = client.get(bad)
        assert r.status_code == 404 and r.json()["error"]["code"] == "NOT_FOUND", bad


# ---------------------------------------------------------------- in the browser


def test_submit_watch_view_and_download(tab, client, bundles, artifacts):
    tab.open("/")
    page = tab.page
    job_id = upload_bundle(tab, bundles["real"])
    assert page.eval_on_selector("#upload-progress", "p => p.value") == 1
    status = wait_status(tab, {"succeeded", "failed", "canceled"})
    job = client.get(f"/jobs/{job_id}").json()
    run = job["models"]["fusion"]
    # The 160 px box can come back QUALITY_FAILED (test_service.py); every file is there either way.
    assert status == job["status"] and (status == "succeeded" or run["error"]["code"] == "QUALITY_FAILED"), run

    # Progress moved: several snapshots, never down, ending where the job ended (100 when it succeeded).
    seen = [float(x) for x in page.eval_on_selector_all("#job-log li", "ls => ls.map(l => l.dataset.progress)")]
    assert len(seen) >= 3 and seen == sorted(seen) and seen[0] < seen[-1] == job["progress"], seen
    assert job["progress"] == 100.0 or status != "succeeded"

    # The viewer draws the mesh: a good share of the canvas is not background, in many colours.
    px = page.evaluate(VIEWER_PIXELS_JS, ".result[data-model='fusion'] model-viewer")
    assert px.get("loaded") and px.get("visible"), px
    assert px["drawn"] > 0.03 * px["total"] and px["colours"] > 8, px

    # Quality badge and per-view table match the API's quality.json.
    quality = client.get(f"/jobs/{job_id}/files/fusion/quality.json").json()
    result = page.locator(".result[data-model='fusion']")
    assert result.locator(".quality-badge").inner_text() == run["quality"]["status"] == quality["status"]
    page.wait_for_function(
        "n => document.querySelectorAll(\".result[data-model='fusion'] .quality-table tbody tr\").length === n",
        arg=len(quality["per_view"]),
    )
    for v in quality["per_view"]:
        cells = result.locator(f".quality-table tr[data-view='{v['name']}'] td").all_inner_texts()
        assert cells[:2] == [f"{v['psnr']:.2f}", f"{v['ssim']:.3f}"] and cells[2] == v["status"], (v, cells)

    # Previews: the contact sheet, the turntable and the textured views are shown.
    page.wait_for_function(
        "() => [...document.querySelectorAll('.previews img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    shown = set(page.eval_on_selector_all(".previews img", "is => is.map(i => i.dataset.file)"))
    assert {"previews/contact_sheet.png", "previews/turntable.gif", "previews/textured_01.png"} <= shown

    result.locator(".viewer-box").scroll_into_view_if_needed()
    page.screenshot(path=str(artifacts / "ui-result.png"), full_page=True)
    result.locator(".viewer-box").screenshot(path=str(artifacts / "ui-viewer.png"))
    result.locator(".quality-table").screenshot(path=str(artifacts / "ui-quality-table.png"))
    page.locator(".previews figure.wide").screenshot(path=str(artifacts / "ui-contact-sheet.png"))

    # Wireframe toggle reaches the viewer's scene and still draws.
    page.check(".result[data-model='fusion'] .wireframe")
    px_wire = page.evaluate(VIEWER_PIXELS_JS, ".result[data-model='fusion'] model-viewer")
    assert 0 < px_wire["drawn"] < px["drawn"], (px_wire, px)
    result.locator(".viewer-box").screenshot(path=str(artifacts / "ui-wireframe.png"))

    # The ZIP download holds the model's files.
    with page.expect_download() as dl:
        page.click("#download-zip")
    path = artifacts / "download.zip"
    dl.value.save_as(path)
    names = set(zipfile.ZipFile(path).namelist())
    assert {"fusion/mesh.glb", "fusion/quality.json", "fusion/previews/contact_sheet.png"} <= names

    assert tab.foreign_requests() == [], tab.foreign_requests()
    assert not tab.console_errors, tab.console_errors


def test_cancel_a_running_job_in_two_steps(tab, client, bundles, artifacts):
    tab.open("/ui")
    page = tab.page
    job_id = upload_bundle(tab, bundles["slow"])
    wait_status(tab, {"running"}, timeout=120)
    page.click("#cancel-button")
    page.wait_for_selector("#cancel-confirm:not([hidden])")
    assert client.get(f"/jobs/{job_id}").json()["status"] == "running"  # the first step stops nothing
    assert "Really cancel" in page.inner_text("#cancel-question")
    page.screenshot(path=str(artifacts / "ui-cancel-confirm.png"))
    page.click("#cancel-yes")
    assert wait_status(tab, {"succeeded", "failed", "canceled"}, timeout=60) == "canceled"
    job = client.get(f"/jobs/{job_id}").json()
    assert job["status"] == "canceled" and job["cancel_requested"]
    assert tab.foreign_requests() == []


def test_bad_uploads_show_their_codes(tab, client, bundles, artifacts):
    tab.open("/")
    page = tab.page
    before = client.get("/jobs").json()["total"]

    # Caught in the page: a "view" that is not an image; nothing is sent.
    page.set_input_files("#views-files", str(bundles["not_png"]))
    page.wait_for_selector("#problems li[data-code='UNSUPPORTED_MEDIA_TYPE']")
    assert page.is_disabled("#submit-button")
    assert "MISSING_DEPTH" not in page.inner_text("#problems")  # the bad file is not counted as a view
    page.click("#clear-button")

    # Caught by the service: the ZIP lacks the top view -> 422 MISSING_VIEW, shown with its words.
    page.set_input_files("#bundle-file", str(bundles["no_top"]))
    page.wait_for_selector("#chosen .ok")
    page.click("#submit-button")
    page.wait_for_selector("#submit-error[data-code='MISSING_VIEW']:not([hidden])")
    text = page.inner_text("#submit-error")
    assert "MISSING_VIEW" in text and "A view is missing" in text and "top" in text, text
    page.screenshot(path=str(artifacts / "ui-bad-upload.png"))
    assert client.get("/jobs").json()["total"] == before
    posts = [u for u in tab.requests if u.endswith("/jobs")]
    assert len(posts) == 1, tab.requests  # only the ZIP reached the service


def test_jobs_list_filter_and_delete(tab, client, bundles):
    data = bundles["slow"].read_bytes()
    ids = {}
    for behaviour in ("quick", "fail"):
        r = client.post(
            "/jobs",
            files={"bundle": ("b.zip", with_behaviour(data, behaviour), "application/zip")},
            data={"preset": "fast"},
        )
        ids[behaviour] = r.json()["job_id"]
    deadline = time.monotonic() + 120
    for job_id in ids.values():
        while client.get(f"/jobs/{job_id}").json()["status"] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline
            time.sleep(0.5)
    job_id, failed_id = ids["quick"], ids["fail"]
    tab.open("/")
    page = tab.page
    page.click("nav [data-tab='jobs']")
    rows_js = """([want, gone, status]) => {
        const rs = [...document.querySelectorAll('#jobs-table tbody tr[data-job]')];
        return rs.some(r => r.dataset.job === want) && !rs.some(r => r.dataset.job === gone)
               && rs.every(r => !status || r.dataset.status === status); }"""
    page.wait_for_function(rows_js, arg=[failed_id, "", ""])  # all: both jobs
    page.select_option("#jobs-filter", "succeeded")
    page.wait_for_function(rows_js, arg=[job_id, failed_id, "succeeded"])
    page.select_option("#jobs-filter", "failed")
    page.wait_for_function(rows_js, arg=[failed_id, job_id, "failed"])
    page.select_option("#jobs-filter", "")
    row = page.locator(f"#jobs-table tr[data-job='{job_id}']")
    row.wait_for()
    row.get_by_role("button", name="Delete").click()
    row.get_by_role("button", name="Confirm delete").click()  # two clicks: nothing goes on one
    page.wait_for_function("id => !document.querySelector(`#jobs-table tr[data-job='${id}']`)", arg=job_id)
    assert client.get(f"/jobs/{job_id}").json()["error"]["code"] == "JOB_NOT_FOUND"


def test_api_key_asked_on_401_and_kept_in_session_storage(tab, service):
    """Until the service has keys (issue 17), a 401 is simulated on GET /jobs: the page asks, then retries with the key."""
    seen: list[str | None] = []

    def guard(route, request):
        auth = request.headers.get("authorization")
        seen.append(auth)
        if auth != "Bearer k-123":
            body = {"error": {"code": "UNAUTHORIZED", "message": "send an API key", "details": {}}, "request_id": "x"}
            return route.fulfill(status=401, content_type="application/json", body=json.dumps(body))
        return route.continue_()

    tab.page.route("**/jobs?limit=*", guard)
    tab.open("/")
    page = tab.page
    page.click("nav [data-tab='jobs']")
    page.wait_for_selector("#key-dialog[open]")
    assert "UNAUTHORIZED" in page.inner_text("#key-reason")
    page.fill("#key-input", "k-123")
    page.keyboard.press("Enter")
    page.wait_for_selector("#jobs-table tbody tr")
    assert seen[:2] == [None, "Bearer k-123"], seen
    assert page.evaluate("sessionStorage.getItem('recon3d.apiKey')") == "k-123"
    assert page.evaluate("localStorage.length") == 0
    assert page.inner_text("#key-button") == "API key (set)"


def test_narrow_screen_and_keyboard(artifacts, browser, service):
    narrow = Page(browser, service, width=390, height=844)
    try:
        narrow.open("/")
        page = narrow.page
        # One column: the drop boxes stack, and nothing is wider than the screen.
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        boxes = page.eval_on_selector_all(".drop", "ds => ds.map(d => d.getBoundingClientRect().left)")
        assert len(set(round(x) for x in boxes)) == 1
        # Keyboard: Tab reaches the file pickers and the tabs; every input has a label.
        unlabelled = page.evaluate(
            "[...document.querySelectorAll('input, select')].filter(i => !i.labels?.length && !i.getAttribute('aria-label')).map(i => i.id || i.name)"
        )
        assert unlabelled == []
        focused = []
        for _ in range(8):
            page.keyboard.press("Tab")
            focused.append(
                page.evaluate(
                    "document.activeElement.id || document.activeElement.dataset.tab || document.activeElement.tagName"
                )
            )
        assert "bundle-file" in focused and "jobs" in focused, focused
        page.click("nav [data-tab='monitoring']")
        assert "ray get-auth-token" in page.inner_text("#tab-monitoring")
        assert page.get_attribute("#dashboard-link", "href").endswith(":8265")
        page.screenshot(path=str(artifacts / "ui-narrow.png"), full_page=True)
    finally:
        narrow.close()


def test_experiments_table_and_plot(tab, client, bundles, artifacts):
    box = zipfile.ZipFile(bundles["slow"])
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:  # the slow bundle, made quick
        for info in box.infolist():
            if info.filename != "behaviour.txt":
                zf.writestr(info, box.read(info))
    r = client.post(
        "/experiments",
        files={"bundle": ("b.zip", with_behaviour(buf.getvalue(), "quick"), "application/zip")},
        data={"spec": "name: ui-sweep\npresets: [fast]\ngrid:\n  texture_size: [256, 512]\n"},
    )
    assert r.status_code == 202, r.text
    exp_id = r.json()["experiment_id"]
    deadline = time.monotonic() + 180
    while (exp := client.get(f"/experiments/{exp_id}").json())["status"] != "finished":
        assert time.monotonic() < deadline, exp
        time.sleep(1)
    tab.open("/")
    page = tab.page
    page.click("nav [data-tab='experiments']")
    page.wait_for_selector("#experiment-table tbody tr[data-slug]")
    page.select_option("#experiment-select", exp_id)
    page.wait_for_function(
        "n => document.querySelectorAll('#experiment-table tbody tr[data-slug]').length === n", arg=len(exp["runs"])
    )
    for row in exp["runs"]:
        cells = page.locator(f"#experiment-table tr[data-slug='{row['slug']}'] td").all_inner_texts()
        assert cells[0].startswith(row["status"]) and cells[2] == (f"{row['psnr']:.2f}" if row["psnr"] else "–")
        assert cells[7] == ("yes" if row["pareto"] else "")
    page.wait_for_function(
        "() => { const i = document.querySelector('#experiment-plot'); return i.complete && i.naturalWidth > 0; }"
    )
    page.screenshot(path=str(artifacts / "ui-experiments.png"), full_page=True)
    assert tab.foreign_requests() == []
