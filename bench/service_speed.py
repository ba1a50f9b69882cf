"""The service against the CLI on the same job: submit -> terminal state, with a warm model replica.

    python bench/service_speed.py [--bundle ../shared/data/seed-example/input] [--model fusion]
                                  [--preset balanced] [--jobs 3] [--num-cpus 2]

Starts a private local Ray (``--num-cpus``, default 2) and the app with ``serve_config.yaml``'s
args (the store in a temporary folder), over real HTTP. Submits the bundle ``--jobs`` times, one
after the other; the first warms the model replica and Ray's task workers, the rest are timed
from the POST to the first poll (every 0.1 s) that reads a terminal state. Before each timed job
it runs ``recon3d reconstruct`` on the same bundle in a subprocess (the CLI, with quality.json
and previews; the service idles meanwhile), so both see the same load. Prints the best of each,
their ratio, the service's per-stage times (``timings_s`` of the job's run) and the job's hops
(each status and stage change the polls saw, with how long it lasted).

The machine may be shared: read the service/CLI ratio of one run, not the absolute times.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
DEFAULT_BUNDLE = ROOT.parent / "shared" / "data" / "seed-example" / "input"
TERMINAL = {"succeeded", "failed", "canceled"}
POLL_S = 0.1


def app_args(store_dir: Path) -> dict:
    """serve_config.yaml's args for the recon3d app, with the store moved to ``store_dir``."""
    cfg = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    args = next(a["args"] for a in cfg["applications"] if a["name"] == "recon3d")
    args["store"] = {"kind": "local", "path": str(store_dir)}
    return args


def time_job(client: httpx.Client, data: bytes, model: str, preset: str) -> tuple[float, dict, list]:
    """(seconds from the POST to the first terminal poll, the job, its hops).

    The hops are ``(seconds after the POST, status, the run's stage)`` at each poll that saw the
    pair change: submit -> queued -> the model's stages -> evaluate -> previews -> terminal.
    """
    t0 = time.perf_counter()
    r = client.post(
        "/jobs", files={"bundle": ("bundle.zip", data, "application/zip")}, data={"model": model, "preset": preset}
    )
    r.raise_for_status()
    job_id = r.json()["job_id"]
    hops = [(time.perf_counter() - t0, "accepted", None)]
    while True:
        job = client.get(f"/jobs/{job_id}").json()
        state = (job["status"], (job["models"].get(model) or {}).get("stage"))
        if state != hops[-1][1:]:
            hops.append((time.perf_counter() - t0, *state))
        if job["status"] in TERMINAL:
            return time.perf_counter() - t0, job, hops
        time.sleep(POLL_S)


def hop_lines(hops: list) -> str:
    """One line per hop: when it was first seen and how long the previous one lasted."""
    out = []
    for (t, status, stage), nxt in zip(hops, hops[1:] + [None], strict=True):
        lasted = f"{nxt[0] - t:6.2f} s" if nxt is not None else ""
        out.append(f"      {t:7.2f} s  {status:9s} {stage or '-':22s} {lasted}")
    return "\n".join(out)


def replica_peak_rss_mb(model: str) -> float | None:
    """The model replica's peak RSS (VmHWM, MB) since its run started (the server resets it then); Linux only.

    Found by its process name on this machine: run one benchmark at a time."""
    name = f"ServeReplica:recon3d:{model}-model".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::" + name):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            continue
    return None


def run_cli(bundle: str, out: Path, model: str, preset: str) -> float:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "pipeline.cli", "reconstruct", bundle, "--out", str(out), "--model", model,
           "--preset", preset, "--device", "cpu", "--quiet"]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default=str(DEFAULT_BUNDLE))
    p.add_argument("--model", default="fusion")
    p.add_argument("--preset", default="balanced")
    p.add_argument("--jobs", type=int, default=3, help="jobs submitted one after the other; the first warms up")
    p.add_argument("--num-cpus", type=int, default=2)
    a = p.parse_args()

    import ray
    from ray import serve
    from serve_harness import free_port, wait_ready

    from serve_app.builder import build_app
    from serve_app.client import zip_folder

    data = zip_folder(a.bundle) if Path(a.bundle).is_dir() else Path(a.bundle).read_bytes()
    times: list[float] = []
    clis: list[float] = []
    with tempfile.TemporaryDirectory(prefix="recon3d-service-speed-") as tmp:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
        ray.init(address="local", num_cpus=a.num_cpus, include_dashboard=False, log_to_driver=False)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_app(app_args(Path(tmp) / "store")), name="recon3d", route_prefix="/", blocking=False)
            wait_ready(url)
            with httpx.Client(base_url=url, timeout=60) as client:
                for i in range(a.jobs):
                    if i > 0 or a.jobs == 1:
                        clis.append(run_cli(a.bundle, Path(tmp) / f"cli-{i}", a.model, a.preset))
                        t = json.loads((Path(tmp) / f"cli-{i}" / "result.json").read_text())["timings_s"]
                        print(f"CLI run before job {i + 1}: {clis[-1]:.2f} s; timings_s: {json.dumps(t)}", flush=True)
                    s, job, hops = time_job(client, data, a.model, a.preset)
                    run = job["models"][a.model]
                    print(
                        f"job {i + 1}/{a.jobs} ({'warm-up' if i == 0 else 'timed'}): {s:.2f} s, {job['status']}",
                        flush=True,
                    )
                    print("    run timings_s: " + json.dumps(run.get("timings_s", {})), flush=True)
                    peak = replica_peak_rss_mb(a.model)
                    print(
                        f"    model replica peak RSS since the run started: {peak or float('nan'):.0f} MB", flush=True
                    )
                    print("    hops (seen at, status, stage, lasted):\n" + hop_lines(hops), flush=True)
                    if i > 0 or a.jobs == 1:
                        times.append(s)
        finally:
            serve.shutdown()
            ray.shutdown()
    best, cli = min(times), min(clis)
    print()
    print(f"{a.model} {a.preset} on {a.bundle}, {a.num_cpus} CPUs")
    print(f"{'service, submit -> terminal (best warm)':42s} {best:7.2f} s")
    print(f"{'CLI, whole process (wall, best)':42s} {cli:7.2f} s")
    print(f"{'service / CLI':42s} {best / cli:7.2f}x  (service overhead {best - cli:+.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
