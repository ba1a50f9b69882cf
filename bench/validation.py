"""Validation-set benchmark: every object and variant of pipeline/validation_set.py, reconstructed by ``fusion``.

    python bench/validation.py [--preset fast] [--objects mug,rod] [--variants posed,rig] [--res 512]
                               [--jobs 1] [--out /tmp/recon3d-bench-validation] [--no-open3d]

Builds the set under ``--out/set_r<res>`` (kept between runs; ``--rebuild`` forces it), then per
object and variant reconstructs with ``reconstruct_bundle(..., model="fusion", preset=...)`` and
prints one table:

- ``F``, ``P``, ``R``: F-score, precision and recall at tau = 1% of the GT's largest extent;
  ``CD``: Chamfer-L1 (scene units); ``NC``: normal consistency (pipeline.metrics.geometry_metrics);
- ``nvPSNR``, ``nvSSIM``: masked PSNR / SSIM of the mesh against the GT mesh, both rendered at 8
  held-out orbit cameras (gt/orbit.json), as the quality report renders (METRICS_SUPERSAMPLE);
- ``inPSNR``: input-view masked PSNR from quality.json;
- ``comp``: connected components of the output after welding UV seams
  (trimesh ``merge_vertices(merge_tex=True, merge_norm=True)``, then ``split``); the GT has 1;
- ``o3dF``, ``o3dP``, ``o3dR``: Open3D's ``UniformTSDFVolume`` (voxel 1/256 of the scene cube) on
  the same depth PNGs decoded with the bundle's documented cameras and encoding (transforms.json,
  else the default rig and encoding);
- ``clip%``: the share of foreground depth pixels the bundle's encoding clips at ``far`` (no depth
  there; the default ``far`` = 2.5 is the rig's centre, so every surface behind it is clipped);
- ``enc far``: the depth encoding's ``far`` the reconstruction used (min-max over views), ``s``: wall time.

``--shared`` adds spot and box from ../shared/data/objects in the same three variants
(pipeline.validation_set.write_variants_of_bundle). A row that fails prints its error instead of numbers. Rows go to ``rows.json`` and ``rows.csv``
beside the outputs, the table to ``table.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import DEFAULT_DEPTH_ENCODING, PRESETS  # noqa: E402
from pipeline.metrics import GEOMETRY_SAMPLES, METRICS_SUPERSAMPLE, geometry_metrics, image_metrics  # noqa: E402
from pipeline.validation_set import (  # noqa: E402
    DEFAULT_GRID_STEP,
    OBJECTS,
    VARIANTS,
    load_orbit_cameras,
    write_validation_set,
    write_variants_of_bundle,
)

#: ../shared/data/objects beside the checkout: bundles with gt/mesh.glb that ``--shared`` adds.
SHARED_OBJECTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "objects"

#: Table columns: (header, row key, format).
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("object", "object", ""),
    ("variant", "variant", ""),
    ("F", "f_score", ".3f"),
    ("P", "precision", ".3f"),
    ("R", "recall", ".3f"),
    ("CD", "chamfer", ".4f"),
    ("NC", "nc", ".3f"),
    ("nvPSNR", "novel_psnr", ".2f"),
    ("nvSSIM", "novel_ssim", ".3f"),
    ("inPSNR", "input_psnr", ".2f"),
    ("comp", "components", "d"),
    ("o3dF", "o3d_f_score", ".3f"),
    ("o3dP", "o3d_precision", ".3f"),
    ("o3dR", "o3d_recall", ".3f"),
    ("clip%", "clipped_pct", ".1f"),
    ("enc far", "enc_far", ""),
    ("s", "seconds", ".1f"),
)
#: Voxels per side of the Open3D TSDF cube (the issue's "1/256 of the scene").
O3D_RESOLUTION = 256
#: Open3D truncation distance, in voxels.
O3D_TRUNC_VOXELS = 4.0


# ---------------------------------------------------------------- metrics of one output


def welded_components(mesh_path: Path) -> int:
    """Connected components of a mesh file after welding UV seams and normals (the issue's count)."""
    import trimesh

    m = trimesh.load(mesh_path, force="mesh", process=False)
    m.merge_vertices(merge_tex=True, merge_norm=True)
    return len(m.split(only_watertight=False))


def novel_view_metrics(pred, gt, cameras) -> dict:
    """Mean masked PSNR / SSIM of ``pred`` against ``gt``, both TexturedMesh, rendered at ``cameras``."""
    from pipeline.render import make_rasterizer
    from pipeline.shading import shade_rgb_antialiased

    rp = make_rasterizer(pred.vertices, pred.faces, backend="embree")
    rg = make_rasterizer(gt.vertices, gt.faces, backend="embree")
    psnr, ssim = [], []
    for cam in cameras:
        prgb, pc = shade_rgb_antialiased(pred, rp, cam, samples=METRICS_SUPERSAMPLE)
        grgb, gc = shade_rgb_antialiased(gt, rg, cam, samples=METRICS_SUPERSAMPLE)
        m = image_metrics(prgb, pc.mask, grgb, gc.mask)
        if m["psnr"] is not None:
            psnr.append(m["psnr"])
            ssim.append(m["ssim"])
    return {"novel_psnr": float(np.mean(psnr)) if psnr else None, "novel_ssim": float(np.mean(ssim)) if ssim else None}


def documented_frames(bundle: Path) -> list[tuple[object, np.ndarray, np.ndarray]]:
    """(depth camera, z (h, w) float32 with 0 = no depth, rgb (h, w, 3) uint8) per view, read as the bundle
    documents itself: transforms.json's cameras and encoding, else the default rig and encoding.

    Depth at the encoding's ``max_value`` is clipped (no depth), as pipeline.prepare treats it.
    """
    from pipeline.bundle import load_bundle
    from pipeline.camera import default_rig
    from pipeline.depth import decode_depth
    from pipeline.metrics import resize_rgb

    fs = load_bundle(bundle)
    enc = fs.depth_encoding or DEFAULT_DEPTH_ENCODING
    W, H = fs.views[0].size
    rig = None if fs.cameras_given else default_rig(W, H, names=tuple(fs.names))
    out = []
    for v in fs.views:
        cam = v.camera if fs.cameras_given else rig[v.name]
        raw = v.depth_raw
        z, valid = decode_depth(raw, enc)
        z[raw >= enc.max_value] = 0.0
        h, w = raw.shape
        out.append((cam.scaled(w, h), z, resize_rgb(v.rgb, w, h)))
    return out


def open3d_tsdf(bundle: Path, gt, samples: int) -> dict:
    """Open3D UniformTSDFVolume on the bundle's documented depth and cameras; geometry metrics against ``gt``."""
    import open3d as o3d

    frames = documented_frames(bundle)
    pts = []
    for cam, z, _ in frames:
        ii, jj = np.nonzero(z > 0)
        x = (jj + 0.5 - cam.K[0, 2]) / cam.K[0, 0] * z[ii, jj]
        y = (ii + 0.5 - cam.K[1, 2]) / cam.K[1, 1] * z[ii, jj]
        pc = np.stack([x, y, z[ii, jj]], 1)
        pts.append(pc @ cam.cam_to_world[:3, :3].T + cam.cam_to_world[:3, 3])
    pts = np.concatenate(pts)
    lo, hi = np.percentile(pts, 0.1, axis=0), np.percentile(pts, 99.9, axis=0)
    length = float((hi - lo).max() * 1.2)
    origin = (lo + hi) / 2 - length / 2
    voxel = length / O3D_RESOLUTION
    vol = o3d.pipelines.integration.UniformTSDFVolume(
        length=length,
        resolution=O3D_RESOLUTION,
        sdf_trunc=O3D_TRUNC_VOXELS * voxel,
        color_type=o3d.pipelines.integration.TSDFVolumeColorType.RGB8,
        origin=origin.reshape(3, 1),
    )
    for cam, z, rgb in frames:
        h, w = z.shape
        rgbd = o3d.geometry.RGBDImage.create_from_color_and_depth(
            o3d.geometry.Image(np.ascontiguousarray(rgb)),
            o3d.geometry.Image(np.ascontiguousarray(z, dtype=np.float32)),
            depth_scale=1.0,
            depth_trunc=1e3,
            convert_rgb_to_intensity=False,
        )
        # Open3D puts pixel centres at integer coordinates; ours are at +0.5.
        K = cam.K
        intr = o3d.camera.PinholeCameraIntrinsic(w, h, K[0, 0], K[1, 1], K[0, 2] - 0.5, K[1, 2] - 0.5)
        vol.integrate(rgbd, intr, cam.world_to_cam)
    mesh = vol.extract_triangle_mesh()
    v, f = np.asarray(mesh.vertices), np.asarray(mesh.triangles)
    if len(f) == 0:
        return {"o3d_f_score": 0.0, "o3d_precision": 0.0, "o3d_recall": 0.0}
    g = geometry_metrics(v, f, gt.vertices, gt.faces, n_samples=samples)
    return {
        "o3d_f_score": g["f_score"],
        "o3d_precision": g["precision"],
        "o3d_recall": g["recall"],
        "o3d_chamfer": g["chamfer_l1"],
    }


# ---------------------------------------------------------------- one row


def run_row(obj: str, variant: str, bundle: Path, out_dir: Path, preset: str, samples: int, with_open3d: bool) -> dict:
    """Reconstruct one bundle and measure it; any failure becomes ``row["error"]``, never an exception."""
    from pipeline.evaluate import load_mesh_file
    from pipeline.reconstruct import reconstruct_bundle

    row: dict = {"object": obj, "variant": variant}
    t0 = time.perf_counter()
    try:
        result = reconstruct_bundle(bundle, out_dir, model="fusion", preset=preset, previews=False)
        row["seconds"] = time.perf_counter() - t0
        row["faces"] = result.get("mesh", {}).get("faces")
        row["input_psnr"] = (result.get("quality") or {}).get("psnr")
        row["status"] = (result.get("quality") or {}).get("status")
        row["warnings"] = result.get("warnings", [])
        row.update(_encoding_summary(result))
        gt = load_mesh_file(bundle / "gt" / "mesh.glb")
        pred_path = out_dir / "mesh.glb"
        pred = load_mesh_file(pred_path)
        g = geometry_metrics(pred.vertices, pred.faces, gt.vertices, gt.faces, n_samples=samples)
        row.update(
            f_score=g["f_score"],
            precision=g["precision"],
            recall=g["recall"],
            chamfer=g["chamfer_l1"],
            nc=g["normal_consistency"],
        )
        row.update(novel_view_metrics(pred, gt, load_orbit_cameras(bundle / "gt" / "orbit.json")))
        row["components"] = welded_components(pred_path)
    except Exception as e:  # one object's failure is a row, not the end of the run
        row["error"] = f"{type(e).__name__}: {e}"
        row["traceback"] = traceback.format_exc(limit=6)
        row.setdefault("seconds", time.perf_counter() - t0)
    if with_open3d:
        try:
            gt = load_mesh_file(bundle / "gt" / "mesh.glb")
            row.update(open3d_tsdf(bundle, gt, samples))
        except Exception as e:  # Open3D missing or failing leaves its columns empty
            row["o3d_error"] = f"{type(e).__name__}: {e}"
    return row


def _encoding_summary(result: dict) -> dict:
    """The ``far`` the run decoded depth with (min-max over views) and how it chose the encoding."""
    enc = result.get("depth_encoding") or {}
    fars = []
    for cam in result.get("cameras") or []:
        e = cam.get("depth_encoding") if isinstance(cam, dict) else None
        if isinstance(e, dict) and isinstance(e.get("far"), (int, float)):
            fars.append(float(e["far"]))
    if not fars and isinstance(enc.get("far"), (int, float)):
        fars = [float(enc["far"])]
    text = (
        "" if not fars else (f"{min(fars):.3f}" if max(fars) - min(fars) < 5e-4 else f"{min(fars):.2f}-{max(fars):.2f}")
    )
    return {"enc_far": text, "enc_method": enc.get("method")}


# ---------------------------------------------------------------- table


def format_table(rows: list[dict]) -> str:
    """A Markdown table of the rows; an error row shows its message after the names."""
    head = [c[0] for c in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        if "error" in r:
            msg = r["error"].replace("|", "/")[:120]
            cells = [r["object"], r["variant"], f"ERROR {msg}"] + [""] * (len(COLUMNS) - 3)
        else:
            cells = []
            for _, key, fmt in COLUMNS:
                val = r.get(key)
                if val is None or (isinstance(val, float) and math.isnan(val)):
                    cells.append("-")
                else:
                    cells.append(format(val, fmt) if fmt else str(val))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """Per-variant means of F, novel-view PSNR and Open3D's F, and how many rows beat Open3D."""
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == variant and "error" not in r]
        if not rs:
            continue
        f = np.mean([r["f_score"] for r in rs])
        nv = np.mean([r["novel_psnr"] for r in rs if r.get("novel_psnr") is not None])
        o3 = [r for r in rs if r.get("o3d_f_score") is not None]
        beat = sum(r["f_score"] >= r["o3d_f_score"] for r in o3)
        o3f = np.mean([r["o3d_f_score"] for r in o3]) if o3 else float("nan")
        errors = sum(1 for r in rows if r["variant"] == variant and "error" in r)
        out.append(
            f"{variant}: mean F {f:.3f} (Open3D {o3f:.3f}, F >= Open3D on {beat}/{len(o3)}), "
            f"mean novel-view PSNR {nv:.2f} dB, rows F >= 0.98: {sum(r['f_score'] >= 0.98 for r in rs)}/{len(rs)}, "
            f"errors {errors}"
        )
    return "\n".join(out)


def write_rows(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "rows.json").write_text(json.dumps(rows, indent=1, default=str))
    keys = list(dict.fromkeys(k for r in rows for k in r if k != "traceback"))
    with open(out / "rows.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (json.dumps(v) if isinstance(v, list) else v) for k, v in r.items() if k != "traceback"})


# ---------------------------------------------------------------- main


def ensure_set(
    root: Path, objects: list[str], resolution: int, depth_resolution: int, step: float, rebuild: bool
) -> dict:
    """The set's manifest under ``root``, building the objects that are missing (or all with ``rebuild``)."""
    mpath = root / "manifest.json"
    manifest = json.loads(mpath.read_text()) if mpath.is_file() and not rebuild else None
    if manifest and (manifest["resolution"], manifest["depth_resolution"], manifest["step"]) != (
        resolution,
        depth_resolution,
        step,
    ):
        manifest = None
    have = {o["name"]: o for o in manifest["objects"]} if manifest else {}
    missing = [o for o in objects if o not in have or set(have[o]["variants"]) != set(VARIANTS)]
    if missing:
        print(f"building {missing} at {resolution} px under {root}", file=sys.stderr)
        t0 = time.perf_counter()
        new = write_validation_set(
            root, objects=missing, resolution=resolution, depth_resolution=depth_resolution, step=step
        )
        print(f"built in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        for o in new["objects"]:
            have[o["name"]] = o
        new["objects"] = [have[n] for n in OBJECTS if n in have]
        (root / "manifest.json").write_text(json.dumps(new, indent=1))
        manifest = new
    return manifest or {"objects": []}


def ensure_shared(root: Path, rebuild: bool) -> list[dict]:
    """Manifest entries of the three variants of every ../shared/data/objects bundle with a GT mesh."""
    out = []
    for src in sorted(p for p in SHARED_OBJECTS.glob("*") if (p / "gt" / "mesh.glb").is_file()):
        dst = root / f"shared_{src.name}"
        mpath = dst / "entry.json"
        if mpath.is_file() and not rebuild:
            out.append(json.loads(mpath.read_text()))
            continue
        entry = write_variants_of_bundle(src, dst)
        entry["name"] = dst.name
        mpath.write_text(json.dumps(entry, indent=1))
        out.append(entry)
    return out


def add_clipped(rows: list[dict], manifest: dict) -> None:
    """Copy each bundle's clipped share of foreground depth (manifest.json, percent) into its row."""
    by_name = {o["name"]: o for o in manifest["objects"]}
    for r in rows:
        v = by_name.get(r["object"], {}).get("variants", {}).get(r["variant"])
        if v is not None:
            r["clipped_pct"] = 100.0 * v["clipped_fraction"]


def _split(text: str | None, allowed, what: str) -> list[str]:
    if not text:
        return list(allowed)
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in allowed]
    if bad:
        raise SystemExit(f"unknown {what} {bad}; choose from {list(allowed)}")
    return names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--objects", help=f"comma-separated, 'none' (with --shared), default all: {','.join(OBJECTS)}")
    ap.add_argument("--variants", help=f"comma-separated, default all: {','.join(VARIANTS)}")
    ap.add_argument("--preset", default="fast", choices=sorted(PRESETS))
    ap.add_argument("--res", type=int, default=512, help="photo resolution of the bundles, pixels")
    ap.add_argument("--depth-res", type=int, default=None, help="depth resolution (default: --res)")
    ap.add_argument("--step", type=float, default=DEFAULT_GRID_STEP, help="marching-cubes grid step of the objects")
    ap.add_argument("--jobs", type=int, default=1, help="rows reconstructed at once (processes)")
    ap.add_argument(
        "--samples", type=int, default=GEOMETRY_SAMPLES, help="surface samples per mesh for geometry metrics"
    )
    ap.add_argument("--out", type=Path, default=Path("/tmp/recon3d-bench-validation"))
    ap.add_argument("--rebuild", action="store_true", help="rebuild the bundles even if they exist")
    ap.add_argument("--no-open3d", action="store_true", help="skip the Open3D TSDF columns")
    ap.add_argument(
        "--shared", action="store_true", help="add the three variants of each ../shared/data/objects bundle (spot, box)"
    )
    args = ap.parse_args(argv)
    objects = [] if args.objects == "none" else _split(args.objects, OBJECTS, "objects")
    variants = _split(args.variants, VARIANTS, "variants")
    dres = args.depth_res or args.res
    set_root = args.out / f"set_r{args.res}_d{dres}"
    manifest = ensure_set(set_root, objects, args.res, dres, args.step, args.rebuild)
    if args.shared:
        shared = ensure_shared(args.out / "shared", args.rebuild)
        manifest = {**manifest, "objects": manifest["objects"] + shared}
        objects = objects + [e["name"] for e in shared]
        set_paths = {e["name"]: args.out / "shared" / e["name"] for e in shared}
    else:
        set_paths = {}
    run_root = args.out / f"runs_{args.preset}_r{args.res}"
    tasks = [
        (o, v, set_paths.get(o, set_root / o) / v, run_root / o / v, args.preset, args.samples, not args.no_open3d)
        for o in objects
        for v in variants
    ]
    rows: list[dict] = []
    t0 = time.perf_counter()
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as ex:
            for row in ex.map(run_row, *zip(*tasks, strict=True)):
                _report(row)
                rows.append(row)
    else:
        for t in tasks:
            row = run_row(*t)
            _report(row)
            rows.append(row)
    add_clipped(rows, manifest)
    table = format_table(rows)
    head = (
        f"fusion, preset {args.preset}, {args.res} px photos / {dres} px depth, {len(objects)} objects x "
        f"{len(variants)} variants, {time.perf_counter() - t0:.0f} s; outputs in {run_root}"
    )
    text = "\n".join([head, "", table, "", summary(rows)])
    print(text)
    write_rows(rows, run_root)
    (run_root / "table.md").write_text(text + "\n")
    return 0


def _report(row: dict) -> None:
    what = (
        row.get("error")
        or f"F {row.get('f_score', float('nan')):.3f}, Open3D F {row.get('o3d_f_score', float('nan')):.3f}"
    )
    print(f"{row['object']}/{row['variant']}: {what} ({row.get('seconds', 0):.1f} s)", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
