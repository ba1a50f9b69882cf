"""Whole-job speed of the CLI, against baseline commits, in one run on one machine.

    python bench/speed.py [--bundle ../shared/data/seed-example/input] [--model fusion]
                          [--preset balanced] [--baseline 8a70eae] [--also 57f0d3e]
                          [--repeat 2] [--threads 2]

Extracts each baseline commit (``git archive``) into a temporary folder, then runs
``python -m pipeline.cli reconstruct`` on the same bundle, alternating the baselines and the
current tree, ``--repeat`` times each, every run in a fresh subprocess with ``PYTHONPATH`` at its
tree (so imports count, as they do for a user). Prints, per stage of ``result.json["timings_s"]``,
the best time of each side and its ratio to the current tree, then the whole process's wall
time, its CPU time (user + sys, the UV atlas' child process included) and peak RSS (``wait4``'s rusage).

``--baseline`` is the commit whose outputs the current tree must reproduce: the same
reconstruction code, so the same mesh (default: main before this round of issue 20's work).
``--also`` commits are timed only (default: main before issue 20, 57f0d3e, whose mesh later
issues changed). Then it checks that the current tree's outputs say the same as the baseline's:

- ``quality.json`` and ``result.json``: every number equal within :data:`REL_TOL` relative
  (measured times, :data:`TIME_KEYS`, and the resolved device left out);
- every preview image and ``texture_kd.png``: decoded pixels compared; the largest absolute
  difference and the count of differing pixels are printed; a difference above
  :data:`MAX_PIXEL_DIFF` levels, or differing pixels above :data:`MAX_DIFF_FRACTION` of the
  image, is a mismatch;
- ``mesh.obj`` and ``mesh.glb`` geometry (vertices, faces, UVs) within :data:`REL_TOL`.

Exits 1 on a mismatch. The machine may be shared: best-of-``--repeat`` damps the noise,
and the ratio of two runs made side by side is what to read, not either absolute time.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = ROOT.parent / "shared" / "data" / "seed-example" / "input"
#: main before this round of issue 20 (after issue 19's one evaluation path): same mesh, same outputs.
DEFAULT_BASELINE = "8a70eae"
#: main before issue 20: timed only.
DEFAULT_ALSO = ("57f0d3e",)
STAGES = ("read_bundle", "prepare_frames", "reconstruct_geometry", "bake_texture", "export", "evaluate", "previews")
#: Keys whose values are measured times, not results: left out of the JSON comparison.
TIME_KEYS = frozenset({"timings", "timings_s", "seconds"})
#: Relative tolerance of numbers in quality.json / result.json and of mesh coordinates.
REL_TOL = 1e-6
#: Absolute tolerance for numbers near zero.
ABS_TOL = 1e-9
#: Largest per-channel difference (0-255 levels) allowed between two images of the same name ...
MAX_PIXEL_DIFF = 0
#: ... and largest fraction of pixels allowed to differ at all.
MAX_DIFF_FRACTION = 0.0


def extract_commit(commit: str, dest: Path) -> Path:
    """Write the tree of ``commit`` of this repository into ``dest`` (no .git); returns ``dest``."""
    data = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", commit], check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def run_cli(tree: Path, bundle: str, out: Path, model: str, preset: str, threads: int) -> dict:
    """Run ``recon3d reconstruct`` from ``tree`` in a subprocess; returns timings, wall and peak RSS."""
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "pipeline.cli", "reconstruct", bundle, "--out", str(out), "--model", model,
           "--preset", preset, "--device", "cpu", "--quiet"]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{tree}: recon3d reconstruct exited {proc.returncode}:\n{err[-3000:]}")
    timings = json.loads((out / "result.json").read_text())["timings_s"]
    return {
        "timings": timings,
        "wall": wall,
        "cpu": usage.ru_utime + usage.ru_stime,
        "rss_mb": usage.ru_maxrss / 1024.0,
    }


# ---------------------------------------------------------------- comparisons


def compare_json(a, b, path: str = "") -> list[str]:
    """Differences between two JSON values: numbers within REL_TOL, everything else equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k in TIME_KEYS:
                continue
            if k not in a or k not in b:
                out.append(f"{path}/{k}: only in {'baseline' if k in a else 'current'}")
            else:
                out += compare_json(a[k], b[k], f"{path}/{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: lengths {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in compare_json(x, y, f"{path}[{i}]")]
    num = (int, float)
    if isinstance(a, num) and isinstance(b, num) and not isinstance(a, bool) and not isinstance(b, bool):
        if math.isclose(a, b, rel_tol=REL_TOL, abs_tol=ABS_TOL) or (math.isnan(a) and math.isnan(b)):
            return []
        return [f"{path}: {a!r} != {b!r}"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def _frames(path: Path) -> list[np.ndarray]:
    im = Image.open(path)
    out = []
    for i in range(getattr(im, "n_frames", 1)):
        im.seek(i)
        out.append(np.asarray(im.convert("RGB"), dtype=np.int16))
    return out


def compare_image(a: Path, b: Path) -> tuple[str, bool]:
    """(description, ok) of two image files compared pixel by pixel, every frame of a GIF included."""
    fa, fb = _frames(a), _frames(b)
    if len(fa) != len(fb) or any(x.shape != y.shape for x, y in zip(fa, fb, strict=False)):
        return f"{len(fa)} vs {len(fb)} frames of {fa[0].shape} vs {fb[0].shape}", False
    diff = np.stack([np.abs(x - y).max(-1) for x, y in zip(fa, fb, strict=True)])
    n_diff, frac = int((diff > 0).sum()), float((diff > 0).mean())
    ok = int(diff.max()) <= MAX_PIXEL_DIFF and frac <= MAX_DIFF_FRACTION
    return f"max diff {int(diff.max())}, {n_diff} px differ ({100 * frac:.4f}%)", ok


def compare_meshes(a: Path, b: Path) -> list[str]:
    """Differences of mesh.obj and mesh.glb geometry (vertices, faces, UVs) between two output folders."""
    import trimesh

    out = []
    for name in ("mesh.obj", "mesh.glb"):
        ma = trimesh.load(a / name, force="mesh", process=False)
        mb = trimesh.load(b / name, force="mesh", process=False)
        pairs = [("vertices", ma.vertices, mb.vertices), ("faces", ma.faces, mb.faces)]
        uva, uvb = getattr(ma.visual, "uv", None), getattr(mb.visual, "uv", None)
        if uva is not None or uvb is not None:
            pairs.append(("uv", uva, uvb))
        for what, x, y in pairs:
            if x is None or y is None or np.shape(x) != np.shape(y):
                out.append(f"{name} {what}: shapes {np.shape(x)} != {np.shape(y)}")
            elif not np.allclose(x, y, rtol=REL_TOL, atol=ABS_TOL):
                out.append(f"{name} {what}: max diff {np.abs(np.asarray(x, float) - np.asarray(y, float)).max():.3g}")
    return out


def compare_outputs(base: Path, new: Path) -> bool:
    """Print the comparison of two output folders; True when they agree."""
    ok = True
    for name in ("quality.json", "result.json"):
        qa, qb = json.loads((base / name).read_text()), json.loads((new / name).read_text())
        qa.get("config", {}).pop("device", None), qb.get("config", {}).pop("device", None)
        diffs = compare_json(qa, qb)
        print(f"{name}: {'identical within rel ' + format(REL_TOL, 'g') if not diffs else 'DIFFERS'}")
        for d in diffs[:20]:
            print(f"    {d}")
        ok &= not diffs
    mesh_diffs = compare_meshes(base, new)
    print(
        f"mesh.obj / mesh.glb geometry: {'identical within rel ' + format(REL_TOL, 'g') if not mesh_diffs else 'DIFFERS'}"
    )
    for d in mesh_diffs:
        print(f"    {d}")
    ok &= not mesh_diffs
    images = sorted(p.relative_to(base) for p in base.rglob("*") if p.suffix in (".png", ".gif"))
    new_images = sorted(p.relative_to(new) for p in new.rglob("*") if p.suffix in (".png", ".gif"))
    if images != new_images:
        print(f"image files differ: {sorted(set(map(str, images)) ^ set(map(str, new_images)))}")
        ok = False
    for rel in images:
        if (new / rel).exists():
            desc, same = compare_image(base / rel, new / rel)
            size = f"{(base / rel).stat().st_size / 1e3:.0f} -> {(new / rel).stat().st_size / 1e3:.0f} kB"
            print(f"  {str(rel):32s} {'ok ' if same else 'BAD'} {desc}; {size}")
            ok &= same
    return ok


# ---------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default=str(DEFAULT_BUNDLE))
    p.add_argument("--model", default="fusion")
    p.add_argument("--preset", default="balanced")
    p.add_argument("--baseline", default=DEFAULT_BASELINE, help="commit whose outputs must be reproduced")
    p.add_argument("--also", nargs="*", default=list(DEFAULT_ALSO), help="more commits, timed only")
    p.add_argument("--repeat", type=int, default=2, help="runs of each side; the best time per stage is kept")
    p.add_argument("--threads", type=int, default=2, help="OMP/MKL threads of each run")
    p.add_argument("--keep", default=None, help="keep the outputs in this folder")
    a = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="recon3d-speed-") as tmp:
        work = Path(a.keep) if a.keep else Path(tmp)
        sides = {c: extract_commit(c, Path(tmp) / f"tree-{c}") for c in [*a.also, a.baseline]}
        sides["current"] = ROOT
        runs: dict[str, list[dict]] = {k: [] for k in sides}
        for i in range(a.repeat):
            for side, tree in sides.items():  # alternate, so every side sees the same load over time
                r = run_cli(tree, a.bundle, work / f"{side}-{i}", a.model, a.preset, a.threads)
                runs[side].append(r)
                print(
                    f"run {i + 1}/{a.repeat} {side}: {r['wall']:.2f} s wall, {r['cpu']:.2f} s CPU, {r['rss_mb']:.0f} MB peak",
                    flush=True,
                )
        print()
        print(f"{a.model} {a.preset} on {a.bundle}, best of {a.repeat}; ratio = that side / current tree")
        print_table(runs)
        print()
        same = compare_outputs(work / f"{a.baseline}-0", work / "current-0")
        print(f"\noutputs: {'the same content as' if same else 'MISMATCH against'} {a.baseline}")
        return 0 if same else 1


def print_table(runs: dict[str, list[dict]]) -> None:
    """Per stage, each side's best time and its ratio to the current tree's; wall, CPU and peak RSS."""

    def best(side: str, key: str) -> float | None:
        vals = [r["timings"].get(key) for r in runs[side]]
        vals = [v for v in vals if v is not None]
        return min(vals) if vals else None

    others = [k for k in runs if k != "current"]
    rows = [(s, {k: best(k, s) for k in runs}) for s in STAGES]
    rows.append(("evaluate + previews", {k: (best(k, "evaluate") or 0.0) + (best(k, "previews") or 0.0) for k in runs}))
    rows.append(("pipeline total", {k: best(k, "total") for k in runs}))
    rows.append(("whole process (wall)", {k: min(r["wall"] for r in runs[k]) for k in runs}))
    # CPU seconds (user + sys, xatlas' child included) move far less than wall time on a busy machine.
    rows.append(("whole process (CPU)", {k: min(r["cpu"] for r in runs[k]) for k in runs}))
    rows.append(("peak RSS (MB, max)", {k: max(r["rss_mb"] for r in runs[k]) for k in runs}))
    head = f"{'stage':22s}" + "".join(f" {k[:10]:>10s} {'ratio':>6s}" for k in others) + f" {'current':>10s}"
    print(head)
    for name, v in rows:
        line = f"{name:22s}"
        for k in others:
            ratio = f"{v[k] / v['current']:5.2f}x" if v[k] and v["current"] else "     -"
            line += f" {_fmt(v[k]):>10s} {ratio:>6s}"
        print(line + f" {_fmt(v['current']):>10s}")


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


if __name__ == "__main__":
    sys.exit(main())
