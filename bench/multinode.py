"""The same burst of jobs on a simulated cluster with one fake-GPU node, then with two.

    python bench/multinode.py [--jobs 8] [--work-s 3] [--behaviour sleep]

Each run starts cluster/simulate.py's cluster (head + N fake-GPU worker nodes, S3 on moto),
deploys the app with the model pinned to ``fake_gpu`` nodes (autoscaling 1..N replicas,
fan-out off), submits ``--jobs`` jobs at once and waits for all of them. Prints throughput
(jobs/min) and p50/p99 job latency (submit -> terminal, client side) per node count.

``sleep`` jobs model a GPU-bound reconstruction of fixed length, so the table measures the
service's scheduling, autoscaling and store traffic across nodes, not this machine's CPU
(``--behaviour real`` runs the library on 2 shared cores: then two nodes cannot be faster).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "cluster"), str(REPO / "tests"), str(REPO)]

from simulate import SimulatedCluster  # noqa: E402
from test_service_runners import with_behaviour  # noqa: E402

from pipeline.synthetic import write_bundle  # noqa: E402

TERMINAL = {"succeeded", "failed", "canceled"}


def run_burst(nodes: int, bundle: bytes, jobs: int) -> dict:
    with SimulatedCluster(gpu_nodes=nodes) as sim:
        args = sim.app_args(
            runner="cluster_runners:cluster_runner",
            model={
                "autoscaling": {
                    **sim.app_args(runner="x")["models"][0]["autoscaling"],
                    "min_replicas": nodes,
                    "initial_replicas": nodes,
                }
            },
        )
        url = sim.deploy(args)
        with httpx.Client(base_url=url, timeout=60) as c:
            t_submit: dict[str, float] = {}
            t0 = time.perf_counter()
            for _ in range(jobs):
                r = c.post("/jobs", files={"bundle": ("b.zip", bundle, "application/zip")})
                r.raise_for_status()
                t_submit[r.json()["job_id"]] = time.perf_counter()
            done: dict[str, float] = {}
            status: dict[str, str] = {}
            while len(done) < jobs:
                for job_id in t_submit.keys() - done.keys():
                    j = c.get(f"/jobs/{job_id}").json()
                    if j["status"] in TERMINAL:
                        done[job_id] = time.perf_counter()
                        status[job_id] = j["status"]
                time.sleep(0.2)
            wall = max(done.values()) - t0
        lat = np.array([done[i] - t_submit[i] for i in t_submit])
        return {
            "nodes": nodes,
            "jobs": jobs,
            "succeeded": sum(s == "succeeded" for s in status.values()),
            "wall_s": wall,
            "jobs_per_min": 60.0 * jobs / wall,
            "p50_s": float(np.percentile(lat, 50)),
            "p99_s": float(np.percentile(lat, 99)),
            "mean_s": statistics.fmean(lat),
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=8)
    p.add_argument("--work-s", type=float, default=3.0, help="seconds of model work per job (sleep behaviour)")
    p.add_argument("--behaviour", default="sleep", help="'sleep' or a test_service_runners behaviour (real, quick)")
    p.add_argument("--nodes", default="1,2", help="fake-GPU node counts to compare")
    a = p.parse_args(argv)
    tmp = Path("/tmp/recon3d-bench-multinode")
    tmp.mkdir(exist_ok=True)
    zip_bytes = write_bundle(tmp / "box.zip", "box", resolution=64, as_zip=True, with_transforms=True).read_bytes()
    behaviour = f"sleep:{a.work_s}" if a.behaviour == "sleep" else a.behaviour
    bundle = with_behaviour(zip_bytes, behaviour)
    rows = [run_burst(int(n), bundle, a.jobs) for n in a.nodes.split(",")]
    print(f"\nburst of {a.jobs} jobs, behaviour {behaviour!r}, fan-out off, S3 store on moto")
    print(f"{'nodes':>5} {'ok':>4} {'wall s':>8} {'jobs/min':>9} {'p50 s':>7} {'p99 s':>7}")
    for r in rows:
        print(
            f"{r['nodes']:>5} {r['succeeded']:>4} {r['wall_s']:>8.1f} {r['jobs_per_min']:>9.1f} "
            f"{r['p50_s']:>7.1f} {r['p99_s']:>7.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
