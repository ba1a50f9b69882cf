"""HTTP client of the Recon3D service (httpx only: no Ray, no FastAPI).

    from serve_app.client import Recon3DClient
    c = Recon3DClient("http://127.0.0.1:8000")
    job_id = c.submit("bundle.zip", model="fusion", preset="fast")
    for event, data in c.stream(job_id): print(event, data["progress"])
    c.download(job_id, "out/")

``submit_main(argv)`` is ``recon3d submit BUNDLE [--model M] [--preset P] [--wait --out DIR] [--url URL]``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx

DEFAULT_URL = os.environ.get("RECON3D_URL", "http://127.0.0.1:8000")
TERMINAL = ("succeeded", "failed", "canceled")
#: Environment variable of the API key the client sends (``--api-key`` overrides it).
API_KEY_ENV = "RECON3D_API_KEY"
_API_KEY_HELP = f"API key sent as a Bearer token (default ${API_KEY_ENV})"


class ServiceError(RuntimeError):
    """An error response of the service: ``code``, ``message``, ``details``, ``status``."""

    def __init__(
        self, status: int, code: str, message: str, details: dict | None = None, request_id: str | None = None
    ):
        super().__init__(f"{code}: {message}")
        self.status, self.code, self.message, self.details, self.request_id = (
            status,
            code,
            message,
            details or {},
            request_id,
        )


def _raise_for(r: httpx.Response) -> httpx.Response:
    if r.status_code < 400:
        return r
    try:
        body = r.json()
        err = body["error"]
        raise ServiceError(r.status_code, err["code"], err["message"], err.get("details"), body.get("request_id"))
    except (ValueError, KeyError, TypeError):
        raise ServiceError(r.status_code, "HTTP_ERROR", r.text[:500]) from None


def zip_folder(folder: str | Path) -> bytes:
    """A bundle folder as ZIP bytes (paths relative to the folder)."""
    folder = Path(folder)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts):
                zf.write(p, p.relative_to(folder).as_posix())
    return buf.getvalue()


class Recon3DClient:
    def __init__(self, url: str = DEFAULT_URL, *, timeout: float = 60.0, api_key: str | None = None):
        """``api_key``: the Bearer key (default $RECON3D_API_KEY; none for a keyless local service)."""
        self.url = url.rstrip("/")
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=self.url, timeout=timeout, headers=headers)

    def close(self) -> None:
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def submit(
        self,
        bundle: str | Path | bytes,
        *,
        model: str = "fusion",
        preset: str | None = None,
        webhook_url: str | None = None,
    ) -> str:
        """Upload a bundle (folder, ZIP path or ZIP bytes); returns the job id."""
        if isinstance(bundle, bytes):
            data = bundle
        elif Path(bundle).is_dir():
            data = zip_folder(bundle)
        else:
            data = Path(bundle).read_bytes()
        form = {
            "model": model,
            **({"preset": preset} if preset else {}),
            **({"webhook_url": webhook_url} if webhook_url else {}),
        }
        r = _raise_for(self.http.post("/jobs", files={"bundle": ("bundle.zip", data, "application/zip")}, data=form))
        return r.json()["job_id"]

    def get(self, job_id: str) -> dict:
        return _raise_for(self.http.get(f"/jobs/{job_id}")).json()

    def stream(self, job_id: str) -> Iterator[tuple[str, dict]]:
        """Server-Sent Events of the job: ("progress", {...}) ..., then ("end", full job)."""
        event = None
        with self.http.stream("GET", f"/jobs/{job_id}/events", timeout=httpx.Timeout(60.0, read=None)) as r:
            if r.status_code >= 400:
                r.read()
                _raise_for(r)
            for line in r.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event is not None:
                    yield event, json.loads(line[6:])
                    if event == "end":
                        return

    def wait(self, job_id: str, *, timeout: float | None = None, poll_s: float = 1.0) -> dict:
        """Poll until a terminal state; returns the job."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if job["status"] in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {job['status']}")
            time.sleep(poll_s)

    def download(self, job_id: str, out_dir: str | Path) -> list[Path]:
        """Fetch the job's ZIP and unpack it into ``out_dir`` (``<model>/<file>``)."""
        with self.http.stream("GET", f"/jobs/{job_id}/download", timeout=httpx.Timeout(60.0, read=600.0)) as r:
            if r.status_code >= 400:
                r.read()
                _raise_for(r)
            data = r.read()
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            zf.extractall(out)  # our own archive: names are <model>/<file>
            return [out / n for n in zf.namelist()]

    def cancel(self, job_id: str) -> dict:
        """Both steps of the two-step cancel."""
        try:
            return _raise_for(self.http.post(f"/jobs/{job_id}/cancel")).json()
        except ServiceError as e:
            if e.code != "CANCEL_CONFIRMATION_REQUIRED":
                raise
            body = {"confirm": True, "token": e.details.get("confirm_token")}
            return _raise_for(self.http.post(f"/jobs/{job_id}/cancel", json=body)).json()

    # ------------------------------------------------------------ experiments and batches

    def submit_experiment(self, spec: str | Path | dict, *, bundle: str | Path | bytes | None = None) -> dict:
        """POST /experiments: ``spec`` is a dict, YAML/JSON text, or a path to a .yaml/.json file;
        ``bundle`` (folder, ZIP path or bytes) replaces the spec's server-side datasets."""
        if isinstance(spec, dict):
            text = json.dumps(spec)
        elif isinstance(spec, Path) or (isinstance(spec, str) and "\n" not in spec and Path(spec).is_file()):
            text = Path(spec).read_text()
        else:
            text = spec
        if bundle is None:
            r = self.http.post("/experiments", content=text.encode(), headers={"content-type": "application/yaml"})
        else:
            data = _bundle_bytes(bundle)
            r = self.http.post(
                "/experiments", data={"spec": text}, files={"bundle": ("bundle.zip", data, "application/zip")}
            )
        return _raise_for(r).json()

    def get_experiment(self, experiment_id: str, *, csv: bool = False) -> dict | str:
        """Status and results table (a dict), or the table as CSV text."""
        r = _raise_for(self.http.get(f"/experiments/{experiment_id}", params={"format": "csv"} if csv else None))
        return r.text if csv else r.json()

    def wait_experiment(self, experiment_id: str, *, timeout: float | None = None, poll_s: float = 2.0) -> dict:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            exp = self.get_experiment(experiment_id)
            if exp["status"] == "finished":
                return exp
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"experiment {experiment_id} is still running: {exp['counts']}")
            time.sleep(poll_s)

    def experiment_plot(self, experiment_id: str) -> bytes:
        return _raise_for(self.http.get(f"/experiments/{experiment_id}/plot.png")).content

    def compare_experiments(self, ids: list[str], *, csv: bool = False) -> dict | str:
        params = {"ids": ",".join(ids), **({"format": "csv"} if csv else {})}
        r = _raise_for(self.http.get("/experiments/compare", params=params))
        return r.text if csv else r.json()

    def submit_batch(
        self,
        bundles: list[str | Path | bytes],
        *,
        model: str = "fusion",
        preset: str | None = None,
        overrides: dict | None = None,
    ) -> dict:
        """POST /batches with one ``bundles`` upload per item; returns the batch view (``batch_id``, items)."""
        files = [
            (
                "bundles",
                (
                    f"{Path(b).stem if not isinstance(b, bytes) else f'item{i}'}.zip",
                    _bundle_bytes(b),
                    "application/zip",
                ),
            )
            for i, b in enumerate(bundles)
        ]
        form = {"model": model, **({"preset": preset} if preset else {})}
        if overrides:
            form["overrides"] = json.dumps(overrides)
        return _raise_for(self.http.post("/batches", files=files, data=form)).json()

    def get_batch(self, batch_id: str) -> dict:
        return _raise_for(self.http.get(f"/batches/{batch_id}")).json()

    def download_batch(self, batch_id: str, out_dir: str | Path) -> list[Path]:
        """The batch ZIP unpacked into ``out_dir`` (``<item>/<model>/<file>`` and batch.json)."""
        r = _raise_for(self.http.get(f"/batches/{batch_id}/download", timeout=httpx.Timeout(60.0, read=600.0)))
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
            zf.extractall(out)  # our own archive: item names are sanitised by the service
            return [out / n for n in zf.namelist()]


def _bundle_bytes(bundle: str | Path | bytes) -> bytes:
    if isinstance(bundle, bytes):
        return bundle
    return zip_folder(bundle) if Path(bundle).is_dir() else Path(bundle).read_bytes()


def _bar(progress: float, stage: str | None, width: int = 30) -> str:
    n = int(width * progress / 100.0)
    return f"\r[{'#' * n}{'.' * (width - n)}] {progress:5.1f}% {stage or '':<24}"


def submit_main(argv: list[str] | None = None) -> int:
    """``recon3d submit``: exit 0 succeeded (or submitted without --wait), 1 failed, 2 rejected, 130 canceled."""
    p = argparse.ArgumentParser(prog="recon3d submit", description="Submit a bundle to a Recon3D service.")
    p.add_argument("bundle", help="bundle folder or ZIP")
    p.add_argument("--model", default="fusion", help="model, or several comma-separated")
    p.add_argument("--preset", default=None, help="fast, balanced or quality (default: the service's)")
    p.add_argument("--url", default=DEFAULT_URL, help=f"service URL (default {DEFAULT_URL}, or $RECON3D_URL)")
    p.add_argument("--wait", action="store_true", help="follow progress until the job ends")
    p.add_argument("--out", default=None, help="with --wait: download the results into this folder")
    p.add_argument("--webhook-url", default=None)
    p.add_argument("--api-key", default=None, help=_API_KEY_HELP)
    args = p.parse_args(argv)
    with Recon3DClient(args.url, api_key=args.api_key) as c:
        try:
            job_id = c.submit(args.bundle, model=args.model, preset=args.preset, webhook_url=args.webhook_url)
        except ServiceError as e:
            print(f"error: {e.code}: {e.message}", file=sys.stderr)
            return 2
        except httpx.HTTPError as e:
            print(f"error: cannot reach {args.url}: {e}", file=sys.stderr)
            return 1
        print(job_id)
        if not args.wait:
            return 0
        job: dict = {}
        try:
            for event, data in c.stream(job_id):
                if event == "progress":
                    sys.stderr.write(_bar(data["progress"], data.get("stage")))
                    sys.stderr.flush()
                else:
                    job = data
        except (httpx.HTTPError, ServiceError):
            job = c.wait(job_id)  # stream dropped: fall back to polling
        sys.stderr.write("\n")
        status = job.get("status")
        if status == "succeeded" and args.out:
            files = c.download(job_id, args.out)
            print(f"{len(files)} files in {args.out}")
        if status != "succeeded":
            err = job.get("error") or {}
            print(f"{status}: {err.get('code', '')}: {err.get('message', '')}", file=sys.stderr)
            return 130 if status == "canceled" else 1
        return 0


def experiment_main(argv: list[str] | None = None) -> int:
    """``recon3d experiment``: submit a sweep, show its table, or compare experiments.

        recon3d experiment SPEC.yaml [--bundle B] [--wait] [--url URL]
        recon3d experiment show ID [--csv] [--plot plot.png]
        recon3d experiment compare ID ID ... [--csv]

    Exit codes: 0 ok, 1 unreachable / timed out, 2 rejected (the error code is printed).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _experiment_args(argv)
    with Recon3DClient(args.url, api_key=args.api_key) as c:
        try:
            if argv[:1] == ["show"]:
                return _experiment_show(c, args)
            if argv[:1] == ["compare"]:
                return _experiment_compare(c, args)
            return _experiment_submit(c, args)
        except ServiceError as e:
            print(f"error: {e.code}: {e.message} {json.dumps(e.details)[:300]}", file=sys.stderr)
            return 2
        except (httpx.HTTPError, TimeoutError) as e:
            print(f"error: {args.url}: {e}", file=sys.stderr)
            return 1


def _experiment_args(argv: list[str]) -> argparse.Namespace:
    url_p = argparse.ArgumentParser(add_help=False)
    url_p.add_argument("--url", default=DEFAULT_URL, help=f"service URL (default {DEFAULT_URL}, or $RECON3D_URL)")
    url_p.add_argument("--api-key", default=None, help=_API_KEY_HELP)
    if argv[:1] == ["show"]:
        p = argparse.ArgumentParser(prog="recon3d experiment show", parents=[url_p])
        p.add_argument("experiment_id")
        p.add_argument("--csv", action="store_true", help="print CSV instead of the text table")
        p.add_argument("--plot", default=None, help="also save the PSNR-vs-time plot (PNG) here")
        return p.parse_args(argv[1:])
    if argv[:1] == ["compare"]:
        p = argparse.ArgumentParser(prog="recon3d experiment compare", parents=[url_p])
        p.add_argument("experiment_ids", nargs="+")
        p.add_argument("--csv", action="store_true")
        return p.parse_args(argv[1:])
    p = argparse.ArgumentParser(
        prog="recon3d experiment", parents=[url_p], description="Submit a parameter sweep (JSON or YAML spec)."
    )
    p.add_argument("spec", help="experiment spec file (.yaml or .json); see docs/API.md")
    p.add_argument("--bundle", default=None, help="run on this bundle (folder or ZIP) instead of server datasets")
    p.add_argument("--wait", action="store_true", help="wait for the end, then print the table")
    return p.parse_args(argv)


def _experiment_show(c: Recon3DClient, args) -> int:
    from serve_app.experiments.results import format_table

    if args.csv:
        print(c.get_experiment(args.experiment_id, csv=True), end="")
    else:
        exp = c.get_experiment(args.experiment_id)
        print(f"{exp['experiment_id']}  {exp['name']}  {exp['status']}  {exp['counts']}")
        print(format_table(exp["runs"]))
        print(f"pareto front: {', '.join(exp['pareto']) or '-'}")
    if args.plot:
        Path(args.plot).write_bytes(c.experiment_plot(args.experiment_id))
    return 0


def _experiment_compare(c: Recon3DClient, args) -> int:
    from serve_app.experiments.results import format_table

    out = c.compare_experiments(args.experiment_ids, csv=args.csv)
    if args.csv:
        print(out, end="")
    else:
        for e in out["experiments"]:
            print(f"{e['experiment_id']}  {e['name']}  best PSNR {e['best_psnr']}  pareto {e['pareto']}")
        print(format_table(out["runs"]))
    return 0


def _experiment_submit(c: Recon3DClient, args) -> int:
    from serve_app.experiments.results import format_table

    body = c.submit_experiment(Path(args.spec), bundle=args.bundle)
    print(body["experiment_id"])
    if args.wait:
        exp = c.wait_experiment(body["experiment_id"])
        print(format_table(exp["runs"]))
        print(f"pareto front: {', '.join(exp['pareto']) or '-'}")
    return 0
