"""``nvdiffrec`` judged on views it did not train on, over the validation set (issue 16, item 4).

    python bench/refine_validation.py [--set /tmp/recon3d-bench-validation/set_r512_d512]
                                      [--variant posed] [--objects mug,rod] [--preset fast]
                                      [--held-out-views 1] [--threads 2] [--out /tmp/refine-validation]
                                      [--time-budget 0]

Per object: the ``fusion`` mesh (``reconstruct_bundle``, same preset), then the ``nvdiffrec`` stages
as :func:`pipeline.models.nvdiffrec_model` runs them: hold out ``--held-out-views`` input views
(:func:`pipeline.refine_selection.choose_held_out_views`), refine on the rest, keep the better of the
two at the held-out views with both re-baked from the training views (:func:`pipeline.models.compare_refined`).
Candidates: ``F`` fusion (full bake), ``R`` refined as optimised, ``Ft``/``Rt`` both re-baked from the
training views (the judged pair), ``Rl`` refined with its texture fitted to every view (returned when
it wins), ``Ra`` refined geometry re-baked from every view. Per object and candidate ``k``:

- ``held``: the held-out view; ``ho<k>``: masked PSNR there (``hoFt``/``hoRt`` are the choice's measure;
  ``hoF``/``hoR`` were the measure before session 11, ``old_ret`` what it chose);
- ``orb<k>``: masked PSNR against the GT mesh at its 8 held-out orbit cameras (gt/orbit.json, as
  bench/validation.py); ``orbS`` of the returned mesh and ``gain`` = orbS - orbF (the issue's measure:
  mean >= +0.5 dB, none below -0.2 dB); ``old_gain`` the same for the old choice (refined as optimised or fusion);
- ``fscoreF``/``fscoreR``: F@1% of the fusion and the refined surface against the GT;
- ``ret``: which mesh was returned, ``s``: refinement seconds.

``--time-budget S`` replaces the preset's refinement time budget (0: none, so the steps taken
depend only on the optimisation, not on the machine's load: use it to compare two trees).

Candidate meshes are saved to ``--out/<object>/<k>.npz`` (bench/refine_profile.py reads them).
Build the set first with ``bench/validation.py`` (it writes ``--set``). Rows go to ``rows.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from validation import novel_view_metrics  # bench/validation.py (the script's folder is on sys.path)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.bundle import load_bundle  # noqa: E402
from pipeline.config import get_preset  # noqa: E402
from pipeline.evaluate import load_mesh_file  # noqa: E402
from pipeline.export import load_mesh  # noqa: E402
from pipeline.metrics import geometry_metrics, mean_masked_psnr  # noqa: E402
from pipeline.models import compare_refined  # noqa: E402
from pipeline.prepare import prepare_frames  # noqa: E402
from pipeline.reconstruct import reconstruct_bundle  # noqa: E402
from pipeline.refine import refine_mesh  # noqa: E402
from pipeline.refine_selection import choose_held_out_views, split_frames  # noqa: E402
from pipeline.texture import rebake_texture, refit_texture  # noqa: E402
from pipeline.validation_set import OBJECTS, load_orbit_cameras  # noqa: E402


def run_object(
    bundle: Path, preset: str, held_out_views: int, save: Path | None = None, time_budget_s: float | None = None
) -> dict:
    cfg = get_preset(preset)
    refine_cfg = replace(cfg.refine, held_out_views=held_out_views)
    if time_budget_s is not None:
        refine_cfg = replace(refine_cfg, time_budget_s=time_budget_s or 1e9)
    with tempfile.TemporaryDirectory() as tmp:
        reconstruct_bundle(bundle, tmp, model="fusion", preset=preset, evaluate=False, previews=False)
        fused = load_mesh(Path(tmp) / "mesh.obj")
    frames = prepare_frames(load_bundle(bundle), cfg)
    held = choose_held_out_views(fused, frames, refine_cfg.held_out_views)
    training, judges = split_frames(frames, held)
    t0 = time.perf_counter()
    refined, report = refine_mesh(fused, training, refine_cfg, device="cpu")
    seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    warnings: list[str] = []
    returned = compare_refined(fused, refined, frames, report, warnings, held_out=held, texture=cfg.texture)
    select_s = time.perf_counter() - t1
    # F: fusion (full bake); R: refined; Ft / Rt: both re-baked from the training views (the judged pair);
    # Rl: refined, its texture fitted to every view (what is returned when it wins); Ra: refined, re-baked from every view.
    meshes = {"F": fused, "R": refined}
    meshes["Ft"] = rebake_texture(fused, training, cfg.texture) if held else fused
    meshes["Rt"] = rebake_texture(refined, training, cfg.texture) if held else refined
    meshes["Rl"] = returned if returned is not fused else refit_texture(refined, frames, cfg.texture)
    meshes["Ra"] = rebake_texture(refined, frames, cfg.texture)
    gt = load_mesh_file(bundle / "gt" / "mesh.glb")
    orbit = load_orbit_cameras(bundle / "gt" / "orbit.json")
    row = {"held": ",".join(held) or "-", "s": seconds, "select_s": select_s, "iterations": report.get("iterations")}
    for k, m in meshes.items():
        row["ho" + k] = mean_masked_psnr(m, judges) if judges.views else None
        row["orb" + k] = novel_view_metrics(m, gt, orbit)["novel_psnr"]
    row["orbS"] = row["orbF"] if returned is fused else row["orbRl"]
    row["ret"] = report.get("returned")
    for k in ("F", "R"):
        g = geometry_metrics(meshes[k].vertices, meshes[k].faces, gt.vertices, gt.faces)
        row["fscore" + k], row["chamfer" + k] = g["f_score"], g["chamfer_l1"]
    row["gain"] = row["orbS"] - row["orbF"]
    row["gain_refined"] = row["orbRl"] - row["orbF"]
    row["old_ret"] = "refined" if held and row["hoR"] > row["hoF"] else "fusion"
    row["old_gain"] = row["orbR"] - row["orbF"] if row["old_ret"] == "refined" else 0.0
    if save is not None:
        save.mkdir(parents=True, exist_ok=True)
        for k, m in meshes.items():
            np.savez_compressed(save / f"{k}.npz", v=m.vertices, f=m.faces, uv=m.uvs, t=m.texture)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", type=Path, default=Path("/tmp/recon3d-bench-validation/set_r512_d512"))
    ap.add_argument("--variant", default="posed")
    ap.add_argument("--objects", default=None, help="comma-separated (default: all)")
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--held-out-views", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "refine-validation")
    ap.add_argument("--time-budget", type=float, default=None, help="refinement time budget, s (0: none)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    objects = args.objects.split(",") if args.objects else [o for o in OBJECTS if (args.set / o).is_dir()]
    rows = []
    for obj in objects:
        row = {"object": obj}
        try:
            bundle = args.set / obj / args.variant
            row.update(run_object(bundle, args.preset, args.held_out_views, args.out / obj, args.time_budget))
        except Exception as e:  # one object's failure is a row, not the end of the run
            row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "rows.json").write_text(json.dumps(rows, indent=1))
    cols = ("held", "hoF", "hoR", "old_gain", "hoFt", "hoRt", "orbF", "orbR", "orbRl", "orbS", "gain", "ret", "s")
    print(f"nvdiffrec {args.preset}, {args.variant}, held-out views {args.held_out_views}")
    print("| object | " + " | ".join(cols) + " |\n|" + "---|" * (len(cols) + 1))
    for r in rows:
        if "error" in r:
            print(f"| {r['object']} | ERROR {r['error'][:100]} |")
            continue
        cells = [r[c] if isinstance(r[c], str) else ("-" if r[c] is None else f"{r[c]:.2f}") for c in cols]
        print(f"| {r['object']} | " + " | ".join(cells) + " |")
    ok = [r for r in rows if "error" not in r]
    if ok:
        gains = [r["gain"] for r in ok]
        print(
            f"\nmean gain of the returned mesh at orbit views {np.mean(gains):+.2f} dB (worst {min(gains):+.2f}); "
            f"of the refined mesh, always returned, {np.mean([r['gain_refined'] for r in ok]):+.2f} dB; "
            f"refined returned on {sum(r['ret'] == 'refined' for r in ok)}/{len(ok)}; the old choice "
            f"{np.mean([r['old_gain'] for r in ok]):+.2f} dB (worst {min(r['old_gain'] for r in ok):+.2f})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
