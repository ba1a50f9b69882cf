"""Geometry benchmark of the ``fusion`` model's geometry half (prepare_frames + reconstruct_geometry).

    python bench/geometry.py [--data ../shared/data] [--preset balanced] [--render OUT_DIR] [names...]

For bundles with a ground-truth mesh (objects/spot, objects/box): F-score at tau = 1% of the
ground truth's largest extent, Chamfer-L1 and normal consistency, from 100k surface samples on
each mesh. For every bundle: silhouette IoU of the mesh re-rendered in each view against the
view's mask, time, peak RSS and the camera / depth-encoding estimates.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np
import trimesh
from bundles import DEFAULT_DATA, find_bundles  # bench/bundles.py (the script's folder is on sys.path)
from scipy.spatial import cKDTree

from pipeline.bundle import load_bundle
from pipeline.config import get_preset
from pipeline.fusion import reconstruct_geometry
from pipeline.prepare import prepare_frames
from pipeline.render import make_rasterizer

SAMPLES = 100_000
TAU_FRACTION = 0.01


def sample_surface(vertices: np.ndarray, faces: np.ndarray, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, 3) area-uniform surface points and their (n, 3) face normals."""
    m = trimesh.Trimesh(vertices, faces, process=False)
    pts, fid = trimesh.sample.sample_surface(m, n, seed=seed)
    return np.asarray(pts), np.asarray(m.face_normals[fid])


def surface_metrics(pred_v, pred_f, gt_v, gt_f) -> dict:
    """F-score at tau (1% of GT's largest extent), Chamfer-L1 and normal consistency."""
    tau = TAU_FRACTION * float((gt_v.max(0) - gt_v.min(0)).max())
    p, pn = sample_surface(pred_v, pred_f, SAMPLES, seed=1)
    g, gn = sample_surface(gt_v, gt_f, SAMPLES, seed=2)
    d_pg, i_pg = cKDTree(g).query(p)
    d_gp, i_gp = cKDTree(p).query(g)
    precision = float((d_pg < tau).mean())
    recall = float((d_gp < tau).mean())
    f = 2 * precision * recall / max(precision + recall, 1e-12)
    nc = 0.5 * (np.abs((pn * gn[i_pg]).sum(1)).mean() + np.abs((gn * pn[i_gp]).sum(1)).mean())
    return {
        "tau": round(tau, 5),
        "fscore": round(f, 4),
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "chamfer_l1": round(float(0.5 * (d_pg.mean() + d_gp.mean())), 5),
        "normal_consistency": round(float(nc), 4),
    }


def silhouette_ious(vertices, faces, frames) -> dict[str, float]:
    r = make_rasterizer(vertices, faces, backend="embree")
    out = {}
    for v in frames.views:
        m = r.rasterize(v.depth_camera).mask
        out[v.name] = round(float((m & v.mask).sum() / max((m | v.mask).sum(), 1)), 4)
    return out


def render_previews(vertices, faces, frames, out: Path, name: str) -> Path:
    """Grey Lambert-shaded renders of the mesh in each input view, side by side with the masks."""
    from PIL import Image

    r = make_rasterizer(vertices, faces, backend="embree")
    fn = np.cross(vertices[faces[:, 1]] - vertices[faces[:, 0]], vertices[faces[:, 2]] - vertices[faces[:, 0]])
    fn /= np.maximum(np.linalg.norm(fn, axis=1, keepdims=True), 1e-12)
    tiles = []
    for v in frames.views:
        cam = v.depth_camera.scaled(256, 256)
        rast = r.rasterize(cam)
        img = np.full((256, 256), 255, np.uint8)
        m = rast.mask
        view_dir = cam.cam_to_world[:3, 2]
        shade = np.abs(fn[rast.tri_id[m]] @ view_dir)
        img[m] = (40 + 200 * shade).astype(np.uint8)
        mask = np.asarray(Image.fromarray(v.mask.astype(np.uint8) * 255).resize((256, 256)))
        tiles.append(np.concatenate([img, mask], 0))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    Image.fromarray(np.concatenate(tiles, 1)).save(path)
    return path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--preset", default="balanced")
    ap.add_argument("--render", type=Path, default=None, help="write shaded renders of each mesh here")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    cfg = get_preset(args.preset)
    rows = []
    for name, path, gt in find_bundles(args.data):
        if args.names and name not in args.names:
            continue
        fs = load_bundle(path)
        t0 = time.perf_counter()
        frames = prepare_frames(fs, cfg)
        t1 = time.perf_counter()
        v, f, rep = reconstruct_geometry(frames, cfg)
        t2 = time.perf_counter()
        row = {
            "name": name,
            "prepare_s": round(t1 - t0, 2),
            "geometry_s": round(t2 - t1, 2),
            "faces": int(len(f)),
            "components": rep.components - rep.components_removed,
            "fov": frames.camera_estimate.fov_x_deg,
            "iou": silhouette_ious(v, f, frames),
            "geometry": rep.to_dict(),
            "depth_encoding": frames.depth_encoding.to_dict(),
        }
        row["iou_mean"] = round(float(np.mean(list(row["iou"].values()))), 4)
        if gt is not None:
            g = trimesh.load(gt, force="mesh")
            row.update(surface_metrics(v, f, np.asarray(g.vertices), np.asarray(g.faces)))
        if args.render:
            render_previews(v, f, frames, args.render, name)
        rows.append(row)
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    cols = [
        "name",
        "prepare_s",
        "geometry_s",
        "faces",
        "components",
        "fov",
        "iou_mean",
        "fscore",
        "chamfer_l1",
        "normal_consistency",
    ]
    print(" | ".join(f"{c:>10}" for c in cols))
    for r in rows:
        print(" | ".join(f"{str(r.get(c, '-')):>10}" for c in cols))
    for r in rows:
        print(r["name"], "per-view IoU", r["iou"], "timings", r["geometry"]["timings_s"])
    print(f"peak RSS {rss_gb:.2f} GB")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
