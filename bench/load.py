"""Load test of the Serve app: N concurrent submissions of one bundle.

    python bench/load.py [--bundle /work/shared/data/objects/box] [--n 20] [--preset fast]

Starts a local Ray + the app on a temporary store, submits N jobs at once, polls
GET /jobs/{id} from a few threads meanwhile (p50/p99 latency under load), checks that
every job ends exactly once (no lost, no duplicated job ids), and compares the mean
per-job model time with one direct reconstruct_bundle call on the same bundle.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--bundle", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "objects" / "box"))
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--preset", default="fast")
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--num-cpus", type=int, default=None)
    a = p.parse_args()

    import ray
    from ray import serve

    from pipeline.reconstruct import reconstruct_bundle
    from serve_app.builder import build_app
    from serve_app.client import Recon3DClient, zip_folder

    data = zip_folder(a.bundle) if Path(a.bundle).is_dir() else Path(a.bundle).read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        reconstruct_bundle(data, Path(tmp) / "direct", preset=a.preset, evaluate=False, previews=False)
        direct_s = time.perf_counter() - t0

        ray.init(num_cpus=a.num_cpus, include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": a.port})
        args = {"store": {"kind": "local", "path": f"{tmp}/store"}, "max_queued_jobs": max(100, a.n), "fanout": False}
        serve.run(build_app(args), name="recon3d", route_prefix="/")
        url = f"http://127.0.0.1:{a.port}"
        c = Recon3DClient(url)
        t_submit = time.perf_counter()
        with cf.ThreadPoolExecutor(a.n) as ex:
            ids = list(ex.map(lambda _: c.submit(data, preset=a.preset), range(a.n)))
        submit_s = time.perf_counter() - t_submit

        latencies: list[float] = []
        stop = threading.Event()

        def poll():
            with httpx.Client(base_url=url) as h:
                while not stop.is_set():
                    for j in ids:
                        t = time.perf_counter()
                        h.get(f"/jobs/{j}").raise_for_status()
                        latencies.append(time.perf_counter() - t)

        pollers = [threading.Thread(target=poll) for _ in range(4)]
        for t in pollers:
            t.start()
        jobs = [c.wait(j, poll_s=2.0) for j in ids]
        wall_s = time.perf_counter() - t_submit
        stop.set()
        for t in pollers:
            t.join()
        listed = httpx.get(f"{url}/jobs", params={"limit": 200}).json()
        serve.shutdown()
        ray.shutdown()

    listed_ids = [j["job_id"] for j in listed["items"]]
    model_s = [j["models"]["fusion"]["timings_s"].get("total", 0.0) for j in jobs]
    e2e_s = [j["finished_at"] - j["created_at"] for j in jobs]
    lat = sorted(latencies)
    print("| metric | value |\n|---|---|")
    print(
        f"| jobs submitted / unique ids / listed | {a.n} / {len(set(ids))} / {len(set(listed_ids))} (duplicates in list: {len(listed_ids) - len(set(listed_ids))}) |"
    )
    print(f"| outcomes | {dict((s, [j['status'] for j in jobs].count(s)) for s in {j['status'] for j in jobs})} |")
    print(f"| submit {a.n} concurrently | {submit_s:.2f} s |")
    print(f"| wall time for all jobs | {wall_s:.1f} s |")
    print(
        f"| GET /jobs/{{id}} under load: n, p50, p99 | {len(lat)}, {1000 * lat[len(lat) // 2]:.1f} ms, {1000 * lat[int(0.99 * (len(lat) - 1))]:.1f} ms |"
    )
    print(f"| submit-to-end per job: p50, max | {statistics.median(e2e_s):.1f} s, {max(e2e_s):.1f} s |")
    print(f"| direct reconstruct_bundle | {direct_s:.2f} s |")
    print(f"| model time per job in the service (mean) | {statistics.mean(model_s):.2f} s |")
    print(f"| serve overhead per job (wall/n - direct) | {wall_s / a.n - direct_s:+.2f} s |")
    ok = len(set(ids)) == a.n and set(ids) <= set(listed_ids) and len(listed_ids) == len(set(listed_ids))
    print("OK" if ok else "LOST OR DUPLICATED JOBS")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
