"""Refinement benchmark: masked input-view PSNR and F-score before and after `refine_mesh`.

    python bench/refine.py [--data ../shared/data] [--preset fast] [--start fusion|degraded]
                           [--objects spot box input] [--supersample 2 [1 ...]]
                           [--optimizer uniform_adam [adam]] [--vertex-smoothness 0 [100]]
                           [--lr-vertices X] [--threads 2]
                           [--out /tmp/refine-bench]

``--start fusion`` refines the fusion model's output (reconstruct_bundle(model="fusion"),
same preset). ``--start degraded`` refines a degraded ground truth instead (GT mesh scaled
by 1.02 with a smooth wobble of ~1% of its size, texture blurred and tinted): it isolates
the optimiser from the rest of the pipeline and needs gt/mesh.glb. Masked PSNR is
:func:`pipeline.metrics.evaluate_views` (union of input and rendered masks, at the working
resolution); F-score and normal consistency (NC) are against gt/mesh.glb at 1% of its extent;
"held-out" is the masked PSNR / SSIM at 16 cameras no input view has (8 azimuths at +30 and
-20 degrees of elevation, 512 px) against the textured GT rendered there: fitting the input
views by crumpling the surface or speckling the texture lowers it. "dihedral" is
:func:`pipeline.metrics.mean_dihedral_angle` (surface roughness, no reference needed).
``--supersample`` lists
values of ``RefineConfig.supersample`` to refine with, each from the same start (``1 2``
compares pixel-centre training renders with the report's 2 x 2 samples). Prints one table and
writes each run's loss plot and report into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from bundles import DEFAULT_DATA, find_bundles  # bench/bundles.py (the script's folder is on sys.path)
from scipy import ndimage

from pipeline.bundle import load_bundle
from pipeline.config import REFINE_PRESETS, get_preset
from pipeline.evaluate import load_mesh_file
from pipeline.export import load_mesh
from pipeline.frames import PosedFrames, PosedView
from pipeline.mesh import TexturedMesh
from pipeline.metrics import evaluate_views, geometry_metrics, mean_dihedral_angle
from pipeline.prepare import prepare_frames
from pipeline.previews import bounding_sphere, preview_camera
from pipeline.reconstruct import reconstruct_bundle
from pipeline.refine import refine_mesh, write_loss_plot
from pipeline.render import make_rasterizer
from pipeline.shading import shade_rgb_antialiased

HELD_OUT_ELEVATIONS_DEG = (30.0, -20.0)
HELD_OUT_AZIMUTHS = 8
HELD_OUT_PX = 512


def degrade(gt: TexturedMesh, *, seed: int = 0) -> TexturedMesh:
    """The GT with a 2% scale error, a smooth ~1% wobble, and a blurred, tinted texture."""
    rng = np.random.default_rng(seed)
    v = gt.vertices.astype(np.float64)
    size = float((v.max(0) - v.min(0)).max())
    disp = np.zeros_like(v)
    for _ in range(4):
        k = rng.normal(size=3) * 4.0 / size
        disp += np.sin(v @ k + rng.uniform(0, 2 * np.pi))[:, None] * rng.normal(size=3) * 0.006 * size
    tex = ndimage.gaussian_filter(gt.texture.astype(np.float32), sigma=(4, 4, 0)) * 0.9 + 10
    return replace(gt, vertices=(v * 1.02 + disp).astype(np.float32), texture=np.clip(tex, 0, 255).astype(np.uint8))


def held_out_views(gt: TexturedMesh) -> PosedFrames:
    """The textured GT rendered (2 x 2 samples per pixel) at cameras no input view has, as frames to score against."""
    center, radius = bounding_sphere(gt.vertices)
    r = make_rasterizer(gt.vertices, gt.faces, backend="embree")
    views = []
    for elevation in HELD_OUT_ELEVATIONS_DEG:
        for i in range(HELD_OUT_AZIMUTHS):
            cam = preview_camera(
                i, HELD_OUT_AZIMUTHS, elevation_deg=elevation, resolution=HELD_OUT_PX, center=center, radius=radius
            )
            rgb, rast = shade_rgb_antialiased(gt, r, cam, samples=2)
            depth = np.zeros((cam.height, cam.width), np.float32)
            views.append(PosedView(f"{elevation:+.0f}_{i}", rgb, cam, depth, rast.mask, cam))
    return PosedFrames(views=views)


def score(mesh: TexturedMesh, frames, gt: TexturedMesh | None, held_out: PosedFrames | None) -> dict:
    per_view = evaluate_views(mesh, frames, backend="embree")
    out = {
        "psnr": float(np.mean([v["psnr"] for v in per_view])),
        "iou": float(np.mean([v["silhouette_iou"] for v in per_view])),
        "dihedral": mean_dihedral_angle(mesh.vertices, mesh.faces),
    }
    if gt is not None:
        g = geometry_metrics(mesh.vertices, mesh.faces, gt.vertices, gt.faces)  # the scoreboard's sample count
        out.update(f_score=g["f_score"], chamfer=g["chamfer_l1"], nc=g["normal_consistency"])
    if held_out is not None:
        ho = evaluate_views(mesh, held_out, backend="embree")
        out.update(held_psnr=float(np.mean([v["psnr"] for v in ho])), held_ssim=float(np.mean([v["ssim"] for v in ho])))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--preset", default="fast", choices=sorted(REFINE_PRESETS))
    ap.add_argument("--start", default="fusion", choices=["fusion", "degraded"])
    ap.add_argument("--objects", nargs="*", default=None, help="bundle folder names (default: all)")
    ap.add_argument("--supersample", type=int, nargs="+", default=None, help="RefineConfig.supersample values")
    ap.add_argument(
        "--optimizer", nargs="+", default=None, choices=["uniform_adam", "adam"], help="RefineConfig.optimizer values"
    )
    ap.add_argument(
        "--vertex-smoothness",
        type=float,
        nargs="+",
        default=None,
        help="RefineConfig.vertex_smoothness values",
    )
    ap.add_argument("--lr-vertices", type=float, default=None, help="RefineConfig.lr_vertices (default: the preset's)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "refine-bench")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = REFINE_PRESETS[args.preset]
    if args.lr_vertices is not None:
        cfg = replace(cfg, lr_vertices=args.lr_vertices)
    rows = []
    for name, bundle, gt_path in find_bundles(args.data, args.objects):
        gt = load_mesh_file(gt_path) if gt_path else None
        held_out = held_out_views(gt) if gt is not None else None
        recon_cfg = get_preset(args.preset)
        frames = prepare_frames(load_bundle(bundle), recon_cfg)
        if args.start == "degraded":
            if gt is None:
                print(f"{name}: no gt/mesh.glb, skipped for --start degraded")
                continue
            start = degrade(gt)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                reconstruct_bundle(bundle, tmp, model="fusion", preset=args.preset, evaluate=False, previews=False)
                start = load_mesh(Path(tmp) / "mesh.obj")
        before = score(start, frames, gt, held_out)
        variants = [
            (ss, o, lam)
            for o in args.optimizer or [cfg.optimizer]
            for ss in args.supersample or [cfg.supersample]
            for lam in args.vertex_smoothness or [cfg.vertex_smoothness]
        ]
        for ss, optimizer, lam in variants:
            t0 = time.perf_counter()
            run_cfg = replace(cfg, supersample=ss, optimizer=optimizer, vertex_smoothness=lam)
            refined, report = refine_mesh(start, frames, run_cfg, device=args.device)
            wall = time.perf_counter() - t0
            after = score(refined, frames, gt, held_out)
            run_dir = args.out / f"{name}-{args.start}-{args.preset}-ss{ss}-{optimizer}-lam{lam:g}"
            run_dir.mkdir(parents=True, exist_ok=True)
            write_loss_plot(report, run_dir / "loss.png")
            (run_dir / "report.json").write_text(
                json.dumps({"before": before, "after": after, "report": report.to_dict()}, indent=1)
            )
            rows.append((name, ss, optimizer, lam, before, after, report, wall))
            print(
                f"{name} (supersample {ss}, {optimizer}, lambda {lam:g}): done in {wall:.1f}s ({report['stop_reason']}, {report['iterations']} it)"
                f" -> {run_dir}",
                flush=True,
            )

    def fmt(d: dict, key: str, spec: str) -> str:
        return format(d[key], spec) if key in d else "-"

    hdr = (
        f"{'object':10s} {'ss':>2s} {'optimizer':>12s} {'lambda':>6s} {'PSNR0':>6s} {'PSNR1':>6s} {'dPSNR':>6s} {'IoU1':>6s} "
        f"{'F0':>6s} {'F1':>6s} {'NC0':>6s} {'NC1':>6s} {'held0':>12s} {'held1':>12s} {'dih0':>5s} {'dih1':>5s} "
        f"{'it':>4s} {'stop':>11s} {'time_s':>7s} backend"
    )
    print(f"\nstart={args.start} preset={args.preset} threads={args.threads}  (held: PSNR/SSIM at held-out views)")
    print(hdr)
    for name, ss, optimizer, lam, b, a, rep, wall in rows:
        held = [f"{fmt(d, 'held_psnr', '.2f')}/{fmt(d, 'held_ssim', '.3f')}" for d in (b, a)]
        print(
            f"{name:10s} {ss:2d} {optimizer:>12s} {lam:6g} {b['psnr']:6.2f} {a['psnr']:6.2f} {a['psnr'] - b['psnr']:+6.2f} "
            f"{a['iou']:6.3f} {fmt(b, 'f_score', '.3f'):>6s} {fmt(a, 'f_score', '.3f'):>6s} {fmt(b, 'nc', '.3f'):>6s} "
            f"{fmt(a, 'nc', '.3f'):>6s} {held[0]:>12s} {held[1]:>12s} {b['dihedral']:5.1f} {a['dihedral']:5.1f} "
            f"{rep['iterations']:4d} {rep['stop_reason']:>11s} {wall:7.1f} {rep['backend']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
