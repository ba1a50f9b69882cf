"""Per-phase CPU cost of one CPU refinement step, a baseline commit against this tree, in one process.

    python bench/refine_step_ab.py --start <pickle of (start mesh, frames)> [--baseline 0a04da4]
                                   [--steps 16] [--threads 1] [--clock cpu|wall]

Builds the ``fast`` refinement problem (:class:`pipeline.refine._Problem`, one input view held out
as the ``nvdiffrec`` model does) from the same start twice: once with the baseline commit's
``pipeline/refine.py`` and ``pipeline/diffrender.py`` (extracted with ``git archive``, loaded beside
this tree's modules; every other module is this tree's), once with this tree's. Then runs the
steps of both alternately (visibility every ``visibility_interval`` steps, render, loss, backward,
optimiser) and prints, per side, the mean seconds per step of each phase and the last loss. Alternating
steps in one process puts both sides under the same machine load: read the ratio. Make the start
with ``bench/refine_speed.py`` (``make_start``).
"""

from __future__ import annotations

import argparse
import importlib.util
import pickle
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from speed import ROOT, extract_commit  # bench/speed.py

sys.path.insert(0, str(ROOT))

from pipeline import refine  # noqa: E402
from pipeline.config import REFINE_PRESETS  # noqa: E402
from pipeline.refine_selection import choose_held_out_views, split_frames  # noqa: E402


def load_baseline(tree: Path):
    """The baseline's refine module, its renderer the baseline's diffrender."""

    def load(name: str, file: str):
        spec = importlib.util.spec_from_file_location(f"pipeline.{name}", tree / "pipeline" / file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[f"pipeline.{name}"] = module
        spec.loader.exec_module(module)
        return module

    diffrender = load("_baseline_diffrender", "diffrender.py")
    module = load("_baseline_refine", "refine.py")
    module.make_diff_renderer = diffrender.make_diff_renderer
    module.silhouette_loss = diffrender.silhouette_loss
    return module


def step(module, pb, cfg, it: int, acc: dict, clock) -> float:
    """One refinement step as ``refine._refine`` takes it; adds each phase's seconds to ``acc``."""

    def tick(key, t0):
        t1 = clock()
        acc[key] = acc.get(key, 0.0) + t1 - t0
        return t1

    t0 = clock()
    positions = pb.welded_positions()
    vertices = positions[pb.weld]
    if it % max(cfg.visibility_interval, 1) == 0:
        pb.renderer.update_visibility(vertices.detach())
        t0 = tick("visibility", t0)
    texture = [pb.tex_base, module.compose_corrections(pb.tex_levels)]
    out = pb.renderer.render(vertices, texture, sample_offsets=pb.samples)
    t0 = tick("render", t0)
    loss, _ = pb.loss(out, positions, cfg)
    t0 = tick("loss", t0)
    pb.opt.zero_grad(set_to_none=True)
    loss.backward()
    t0 = tick("backward", t0)
    pb.opt.step()
    tick("optimiser", t0)
    return float(loss.detach())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--start", type=Path, required=True)
    ap.add_argument("--baseline", default="0a04da4")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    start, frames = pickle.loads(args.start.read_bytes())
    training, _ = split_frames(frames, choose_held_out_views(start, frames, 1))
    cfg = replace(REFINE_PRESETS["fast"], convergence_tol=-1.0, time_budget_s=1e9)
    with tempfile.TemporaryDirectory() as tmp:
        modules = {"baseline": load_baseline(extract_commit(args.baseline, Path(tmp))), "current": refine}
        sides = {k: (m, m._Problem(start, training, cfg, torch.device("cpu")), {}) for k, m in modules.items()}
    last = {}
    for it in range(args.steps):
        for name, (module, pb, acc) in sides.items():
            last[name] = step(module, pb, cfg, it, acc, clock)
    print(f"seconds per step ({args.clock}), {args.steps} steps, {args.threads} thread(s), baseline {args.baseline}")
    for name, (_, _, acc) in sides.items():
        cells = ", ".join(f"{k} {v / args.steps:.4f}" for k, v in acc.items())
        print(f"{name:9s} {cells}; step {sum(acc.values()) / args.steps:.4f}; last loss {last[name]:.9g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
