"""Sweep the presets over the shared datasets through the experiments API; print the table and the Pareto front.

    python bench/sweep.py [--models fusion[,nvdiffrec]] [--presets fast,balanced,quality]
                          [--datasets objects/spot,objects/box,seed-example/input]
                          [--url http://127.0.0.1:8000] [--out bench_out/sweep]

Without ``--url`` it starts a local Ray + Serve app (store in a temporary folder, dataset root
/work/shared/data, one replica per model sharing the CPUs) and stops it at the end. The datasets
with a ``gt/mesh.glb`` also get F-score and Chamfer. A model-preset is "on the Pareto front" when
no other one is both faster and better (mean PSNR over the datasets against mean model time).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from serve_app.client import Recon3DClient  # noqa: E402
from serve_app.experiments.results import format_table, pareto_front  # noqa: E402

DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data beside the checkout
DEFAULT_DATASETS = "objects/spot,objects/box,seed-example/input"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_local_service(store: Path, cpus: int, models: list[str]) -> str:
    import ray
    from ray import serve

    from serve_app.builder import build_app

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {
        "store": {"kind": "local", "path": str(store)},
        # The replicas share the CPUs; each computes on every core (compute_threads), one job at a time here.
        "models": [{"name": m, "num_cpus": max(cpus - 1, 1) / len(models)} for m in models],
        "job_timeout_s": 3 * 3600,
        "fanout_num_cpus": 0.5,
        "preview_views": 2,
        "ingress_num_cpus": 0,
        "experiments": {"dataset_root": str(DATA_ROOT)},
    }
    serve.run(build_app(args), name="recon3d", route_prefix="/", blocking=False)
    return f"http://127.0.0.1:{port}"


def _setting(row: dict) -> str:
    return f"{row['model']}-{row['preset']}"


def preset_front(rows: list[dict]) -> list[tuple[str, float, float, bool]]:
    """(model-preset, mean model_s, mean PSNR, on the front) over the datasets every one finished."""
    done = [r for r in rows if r["psnr"] is not None and r["model_s"] is not None]
    presets = sorted({_setting(r) for r in done})
    shared = (
        set.intersection(*({r["dataset"] for r in done if _setting(r) == p} for p in presets)) if presets else set()
    )
    stats = []
    for p in presets:
        sel = [r for r in done if _setting(r) == p and r["dataset"] in shared]
        if sel:
            stats.append((p, sum(r["model_s"] for r in sel) / len(sel), sum(r["psnr"] for r in sel) / len(sel)))
    front = set(pareto_front([(t, q) for _, t, q in stats]))
    return [(p, t, q, i in front) for i, (p, t, q) in enumerate(stats)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="fast,balanced,quality")
    ap.add_argument("--models", default="fusion", help="comma-separated: fusion, nvdiffrec")
    ap.add_argument("--datasets", default=DEFAULT_DATASETS, help="names under /work/shared/data")
    ap.add_argument("--url", default=None, help="a running service whose experiments.dataset_root is /work/shared/data")
    ap.add_argument("--out", default="bench_out/sweep", help="results.csv and plot.png go here")
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--timeout", type=float, default=3 * 3600)
    a = ap.parse_args(argv)

    url = a.url or start_local_service(Path(tempfile.mkdtemp(prefix="recon3d-sweep-")), a.cpus, a.models.split(","))
    spec = {
        "name": "preset-sweep",
        "datasets": a.datasets.split(","),
        "models": a.models.split(","),
        "presets": a.presets.split(","),
    }
    t0 = time.monotonic()
    with Recon3DClient(url, timeout=300) as c:
        deadline = time.monotonic() + 180
        while True:  # the local app may still be starting
            try:
                if c.http.get("/ready").status_code == 200:
                    break
            except Exception:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the service did not become ready")
            time.sleep(1)
        exp_id = c.submit_experiment(spec)["experiment_id"]
        print(f"experiment {exp_id}: {spec}", flush=True)
        last = None
        while True:
            exp = c.get_experiment(exp_id)
            if exp["counts"] != last:
                print(f"[{time.monotonic() - t0:7.1f} s] {exp['counts']}", flush=True)
                last = exp["counts"]
            if exp["status"] == "finished" or time.monotonic() - t0 > a.timeout:
                break
            time.sleep(5)
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.csv").write_text(c.get_experiment(exp_id, csv=True))
        (out / "plot.png").write_bytes(c.experiment_plot(exp_id))

    rows = exp["runs"]
    print()
    print(format_table(rows))
    print("\nper-dataset Pareto front (PSNR vs model time):")
    for ds in sorted({r["dataset"] for r in rows}):
        front = [_setting(r) for r in rows if r["dataset"] == ds and r["pareto"]]
        print(f"  {ds}: {', '.join(front) or '-'}")
    print("\npresets, mean over the datasets all of them finished:")
    print(f"  {'model-preset':<20} {'model_s':>9} {'psnr':>7}  pareto")
    for p, t, q, on in preset_front(rows):
        print(f"  {p:<20} {t:9.1f} {q:7.2f}  {'*' if on else ''}")
    geo = [r for r in rows if r.get("f_score") is not None]
    if geo:
        print("\ngeometry vs gt/mesh.glb:")
        for r in geo:
            print(f"  {r['slug']:<40} F-score {r['f_score']:.3f}  Chamfer-L1 {r['chamfer_l1']:.4f}")
    print(f"\n{out / 'results.csv'}, {out / 'plot.png'}; total {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
