"""CPU refinement speed against a baseline commit, in one run on one machine (issue 20, item 3).

    python bench/refine_speed.py [--bundle ../shared/data/seed-example/input] [--preset fast]
                                 [--baseline 8a70eae] [--repeat 1] [--threads 2]

Makes the ``fusion`` start mesh and the frames once (current tree), then runs
:func:`pipeline.refine.refine_mesh` on every input view with the preset's RefineConfig from the
baseline tree and from the current tree, alternating, each in a fresh subprocess with
``PYTHONPATH`` at its tree and ``--threads`` torch threads. ``--iterations N`` runs exactly N steps on both sides (no early stop,
no time budget: on a loaded machine the budget would cut the sides at different steps). Prints, per
side, the refinement's wall time, iterations, seconds and CPU seconds per iteration (``refine_mesh``
only, set-up included), and the masked PSNR of
the result at the input views, then the ratios. The machine may be shared: read the ratio of
the two sides, not either absolute time.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from speed import DEFAULT_BUNDLE, ROOT, extract_commit  # bench/speed.py

#: The parent of issue 20's refinement speed work.
DEFAULT_BASELINE = "8a70eae"

_CHILD = """
import json, pickle, sys, time
import torch
torch.set_num_threads(int(sys.argv[3]))
from dataclasses import replace
from pipeline.config import REFINE_PRESETS
from pipeline.metrics import mean_masked_psnr
from pipeline.refine import refine_mesh
start, frames = pickle.load(open(sys.argv[1], "rb"))
cfg = REFINE_PRESETS[sys.argv[2]]
if int(sys.argv[4]) > 0:  # a fixed number of steps: no early stop, no time budget
    cfg = replace(cfg, iterations=int(sys.argv[4]), convergence_tol=-1.0, time_budget_s=1e9)
t0, c0 = time.perf_counter(), time.process_time()
mesh, report = refine_mesh(start, frames, cfg, device="cpu")
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
print(json.dumps({"wall_s": wall, "cpu_s": cpu, "iterations": report["iterations"],
                  "stop_reason": report["stop_reason"], "psnr": mean_masked_psnr(mesh, frames)}))
"""


def make_start(bundle: str, preset: str, path: Path) -> None:
    from pipeline.bundle import load_bundle
    from pipeline.config import get_preset
    from pipeline.export import load_mesh
    from pipeline.prepare import prepare_frames
    from pipeline.reconstruct import reconstruct_bundle

    with tempfile.TemporaryDirectory() as tmp:
        reconstruct_bundle(bundle, tmp, model="fusion", preset=preset, evaluate=False, previews=False)
        start = load_mesh(Path(tmp) / "mesh.obj")
    frames = prepare_frames(load_bundle(bundle), get_preset(preset))
    path.write_bytes(pickle.dumps((start, frames)))


def run_side(tree: Path, start: Path, preset: str, threads: int, iterations: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(start), preset, str(threads), str(iterations)],
        cwd=tree, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default=str(DEFAULT_BUNDLE))
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--baseline", default=DEFAULT_BASELINE)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--start", type=Path, default=None, help="a pickled (start mesh, frames) to reuse")
    ap.add_argument(
        "--iterations",
        type=int,
        default=0,
        help="run exactly this many steps (0: the preset, its early stop and budget)",
    )
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = extract_commit(args.baseline, tmp / "baseline")
        start = args.start or tmp / "start.pkl"
        if args.start is None:
            make_start(args.bundle, args.preset, start)
        runs: dict[str, list[dict]] = {"baseline": [], "current": []}
        for _ in range(args.repeat):
            for side, tree in (("baseline", base), ("current", ROOT)):
                t0 = time.perf_counter()
                runs[side].append(run_side(tree, start, args.preset, args.threads, args.iterations))
                print(f"{side}: {json.dumps(runs[side][-1])} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    best = {k: min(v, key=lambda r: r["wall_s"]) for k, v in runs.items()}
    print(f"refinement, {args.preset}, {args.threads} threads, baseline {args.baseline}, best of {args.repeat}")
    print(f"{'side':9s} {'wall_s':>7s} {'cpu_s':>7s} {'it':>4s} {'s/it':>6s} {'cpu/it':>6s} {'PSNR':>6s} stop")
    for side, r in best.items():
        n = max(r["iterations"], 1)
        print(
            f"{side:9s} {r['wall_s']:7.1f} {r['cpu_s']:7.1f} {r['iterations']:4d} "
            f"{r['wall_s'] / n:6.3f} {r['cpu_s'] / n:6.3f} {r['psnr']:6.2f} {r['stop_reason']}"
        )
    b, c = best["baseline"], best["current"]
    print(
        f"ratio current/baseline: wall {c['wall_s'] / b['wall_s']:.2f}, cpu {c['cpu_s'] / b['cpu_s']:.2f}, "
        f"per iteration {(c['wall_s'] / c['iterations']) / (b['wall_s'] / b['iterations']):.2f}; "
        f"PSNR {c['psnr'] - b['psnr']:+.2f} dB"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
