"""Texture-baking benchmark: bake the views onto a mesh and compare re-renders with the photos.

    python bench/texture.py spot box            # ground-truth meshes of /work/shared/data/objects
    python bench/texture.py sneaker             # fused geometry of the seed example (needs pipeline.fusion)
    python bench/texture.py spot --out /tmp/bake --size 2048
    python bench/texture.py sneaker --fit-iterations 0   # the blend without the least-squares fit

Prints per-object timings (atlas, bake) and masked PSNR / SSIM at the working (depth)
resolution (:func:`pipeline.metrics.evaluate_views`), and writes side-by-side PNGs
(photo | re-render | |difference| x4) plus the texture into ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import trimesh
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import uv_atlas  # noqa: E402
from pipeline.bundle import load_bundle  # noqa: E402
from pipeline.config import DEFAULT_DEPTH_ENCODING, PRESETS  # noqa: E402
from pipeline.depth import decode_depth  # noqa: E402
from pipeline.frames import PosedFrames, PosedView  # noqa: E402
from pipeline.metrics import evaluate_views, render_view_for_metrics  # noqa: E402
from pipeline.render import make_rasterizer  # noqa: E402
from pipeline.texture import bake_texture  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data beside the checkout
#: Ground-truth meshes above this many faces are decimated first (the fusion output size).
MAX_FACES = 40_000


def frames_from_bundle(path: Path) -> PosedFrames:
    """PosedFrames straight from a bundle with transforms.json (cameras and depth encoding given)."""
    fs = load_bundle(path)
    enc = fs.depth_encoding or DEFAULT_DEPTH_ENCODING
    views = []
    for v in fs.views:
        depth, mask = decode_depth(v.depth_raw, enc)
        dcam = v.camera.scaled(depth.shape[1], depth.shape[0])
        views.append(PosedView(name=v.name, rgb=v.rgb, camera=v.camera, depth=depth, mask=mask, depth_camera=dcam))
    return PosedFrames(views=views, depth_encoding=enc.to_dict())


def gt_geometry(path: Path) -> tuple[np.ndarray, np.ndarray]:
    m = trimesh.load(path, force="mesh")
    m = trimesh.Trimesh(m.vertices, m.faces, process=True)  # weld UV seams: the baker must not see them
    v, f = np.asarray(m.vertices, np.float32), np.asarray(m.faces, np.int32)
    if len(f) > MAX_FACES:
        import fast_simplification

        v, f = fast_simplification.simplify(v, f, target_count=MAX_FACES)
    return v, f


def sneaker_inputs(cache: Path | None = None):
    """Prepared frames and fused geometry of the seed example (pickled to ``cache`` to iterate on baking alone)."""
    import pickle

    if cache is not None and cache.is_file():
        return pickle.loads(cache.read_bytes())
    from pipeline.bundle import load_bundle as load
    from pipeline.fusion import reconstruct_geometry
    from pipeline.prepare import prepare_frames

    cfg = PRESETS["balanced"]
    frames = prepare_frames(load(DATA / "seed-example" / "input"), cfg)
    v, f, _ = reconstruct_geometry(frames, cfg)
    out = (frames, np.asarray(v, np.float32), np.asarray(f, np.int32))
    if cache is not None:
        cache.write_bytes(pickle.dumps(out))
    return out


def side_by_side(mesh, frames: PosedFrames, out: Path, name: str) -> None:
    r = make_rasterizer(mesh.vertices, mesh.faces)
    rows = []
    for view in frames.views:
        d = render_view_for_metrics(mesh, view, r)
        diff = np.clip(np.abs(d["pred_rgb"].astype(np.int16) - d["ref_rgb"].astype(np.int16)) * 4, 0, 255).astype(
            np.uint8
        )
        rows.append(np.concatenate([d["ref_rgb"], d["pred_rgb"], diff], axis=1))
        Image.fromarray(rows[-1]).save(out / f"{name}_{view.name}.png")
    Image.fromarray(mesh.texture).save(out / f"{name}_texture.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("objects", nargs="+")
    ap.add_argument("--out", default="/tmp/bench_texture")
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--angle-power", type=float, default=None)
    ap.add_argument(
        "--fit-iterations", type=int, default=None, help="CG iterations of the least-squares fit (0: the blend alone)"
    )
    ap.add_argument("--cache", default="", help="pickle the sneaker's frames and geometry here (and reuse them)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = replace(PRESETS["balanced"].texture, size=args.size)
    if args.angle_power is not None:
        cfg = replace(cfg, angle_power=args.angle_power)
    if args.fit_iterations is not None:
        cfg = replace(cfg, fit_iterations=args.fit_iterations)

    print(f"{'object':10s} {'faces':>7s} {'atlas_s':>8s} {'bake_s':>7s} {'psnr':>6s} {'ssim':>6s}  per-view psnr")
    for name in args.objects:
        if name == "sneaker":
            frames, v, f = sneaker_inputs(Path(args.cache) if args.cache else None)
        else:
            frames = frames_from_bundle(DATA / "objects" / name)
            v, f = gt_geometry(DATA / "objects" / name / "gt" / "mesh.glb")
        t0 = time.perf_counter()
        uv_atlas.build_uv_atlas(v, f, resolution=cfg.size, padding_px=cfg.padding_px, timeout_s=cfg.xatlas_timeout_s)
        t_atlas = time.perf_counter() - t0
        t0 = time.perf_counter()
        mesh = bake_texture(v, f, frames, cfg)
        t_bake = time.perf_counter() - t0
        per_view = evaluate_views(mesh, frames)
        psnr = np.mean([m["psnr"] for m in per_view])
        ssim = np.mean([m["ssim"] for m in per_view])
        pv = " ".join(f"{m['name']}={m['psnr']:.1f}/{m['ssim']:.3f}" for m in per_view)
        print(f"{name:10s} {len(f):7d} {t_atlas:8.2f} {t_bake:7.2f} {psnr:6.2f} {ssim:6.3f}  {pv}", flush=True)
        side_by_side(mesh, frames, out, name)


if __name__ == "__main__":
    main()
