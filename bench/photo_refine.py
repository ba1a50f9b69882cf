"""Benchmark the photo-consistency refinement (and camera refinement) of the fusion model.

    python bench/photo_refine.py [BUNDLE ...] [--preset balanced] [--cameras] [--set key=value ...]

For each bundle: prepare -> fuse, then texture + re-render at the input cameras with and
without :func:`pipeline.photo_refine.refine_surface` (and, with ``--cameras``, after
:func:`pipeline.camera_refine.refine_cameras` + a second fusion). Prints masked PSNR /
SSIM per view, the vertex colour variance, timings, and F-score against ``gt/mesh.glb``
when the bundle has one. Defaults to the shared benchmark bundles.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np

from pipeline.bundle import load_bundle
from pipeline.camera_refine import refine_cameras
from pipeline.config import get_preset
from pipeline.fusion import reconstruct_geometry
from pipeline.metrics import evaluate_views, geometry_metrics
from pipeline.photo_refine import photo_consistency, refine_surface
from pipeline.prepare import prepare_frames
from pipeline.texture import bake_texture

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data beside the checkout
DEFAULT_BUNDLES = [DATA / "seed-example/input", DATA / "objects/spot", DATA / "objects/box"]


def _score(name: str, vertices, faces, frames, cfg, gt) -> None:
    t0 = time.perf_counter()
    mesh = bake_texture(vertices, faces, frames, cfg.texture)
    bake_s = time.perf_counter() - t0
    per_view = evaluate_views(mesh, frames)
    psnr = np.mean([v["psnr"] for v in per_view])
    ssim = np.mean([v["ssim"] for v in per_view])
    views = "  ".join(f"{v['name'][:3]} {v['psnr']:5.2f}" for v in per_view)
    line = f"  {name:14s} PSNR {psnr:6.2f} SSIM {ssim:.4f} var {photo_consistency(vertices, faces, frames):.5f} bake {bake_s:5.1f}s | {views}"
    if gt is not None:
        g = geometry_metrics(vertices, faces, gt.vertices, gt.faces)
        line += f" | F@1% {g['f_score']:.4f} NC {g['normal_consistency']:.4f}"
    print(line, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="*", type=Path, default=DEFAULT_BUNDLES)
    ap.add_argument("--preset", default="balanced")
    ap.add_argument("--cameras", action="store_true", help="also run camera refinement + a second fusion")
    ap.add_argument("--set", nargs="*", default=[], help="PhotoRefineConfig overrides, key=python-literal")
    args = ap.parse_args()
    import ast

    import trimesh

    cfg = get_preset(args.preset)
    overrides = {k: ast.literal_eval(v) for k, v in (s.split("=", 1) for s in args.set)}
    pr_cfg = dataclasses.replace(cfg.photo_refine, enabled=True, **overrides)
    for bundle in args.bundles:
        gt_path = bundle / "gt/mesh.glb"
        gt = trimesh.load(gt_path, force="mesh") if gt_path.exists() else None
        t0 = time.perf_counter()
        frames = prepare_frames(load_bundle(bundle), cfg)
        V, F, _ = reconstruct_geometry(frames, cfg)
        print(f"{bundle}: prepare + fuse {time.perf_counter() - t0:.1f}s, {len(F)} faces", flush=True)
        _score("fused", V, F, frames, cfg, gt)
        t0 = time.perf_counter()
        V2, report = refine_surface(V, F, frames, pr_cfg)
        print(
            f"  photo_refine {time.perf_counter() - t0:.1f}s, mean |offset| {report['mean_abs_offset']:.5f}", flush=True
        )
        _score("photo_refine", V2, F, frames, cfg, gt)
        if args.cameras:
            cam_cfg = dataclasses.replace(cfg.camera_refine, enabled=True)
            t0 = time.perf_counter()
            frames_c, crep = refine_cameras(V, F, frames, cam_cfg)
            if crep["applied"]:
                Vc, Fc, _ = reconstruct_geometry(frames_c, cfg)
                print(f"  camera_refine + refuse {time.perf_counter() - t0:.1f}s: {crep['views']}", flush=True)
                _score("camera_refine", Vc, Fc, frames_c, cfg, gt)
            else:
                print(f"  camera_refine skipped: {crep.get('reason')}")


if __name__ == "__main__":
    main()
