"""End-to-end quality benchmark: reconstruct every bundle with the ``fusion`` model and print one table.

    python bench/quality.py [--preset balanced] [--out /tmp/recon3d-bench-quality] [BUNDLE_OR_FOLDER ...]

Without arguments: every bundle under /work/shared/data/objects plus the sneaker photos
(/work/shared/data/seed-example/input). A folder argument that is not itself a bundle is
searched one level down. Columns: F-score at tau = 1% of the GT's largest extent,
Chamfer-L1 and normal consistency (when the bundle has gt/mesh.glb), masked PSNR / SSIM
and status from quality.json, wall time and face count. Outputs (meshes, quality.json,
previews/) stay under --out for inspection.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import PRESETS  # noqa: E402
from pipeline.errors import ReconError  # noqa: E402
from pipeline.evaluate import load_mesh_file  # noqa: E402
from pipeline.metrics import GEOMETRY_SAMPLES, geometry_metrics  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data beside the checkout
DEFAULT_BUNDLES = (DATA / "objects", DATA / "seed-example" / "input")
GT_MESH = Path("gt") / "mesh.glb"
COLUMNS = ("bundle", "F-score", "Chamfer", "NC", "PSNR", "SSIM", "status", "time s", "faces")


def is_bundle(path: Path) -> bool:
    return (path / "multi_views").is_dir() or (path / "transforms.json").is_file() or path.suffix == ".zip"


def find_bundles(paths: list[Path]) -> list[Path]:
    """Bundles named directly, or one level inside a folder, in name order."""
    out = []
    for p in paths:
        if is_bundle(p):
            out.append(p)
        elif p.is_dir():
            out += sorted(c for c in p.iterdir() if c.is_dir() and is_bundle(c))
    return out


def bundle_name(path: Path) -> str:
    return path.parent.name if path.name == "input" else path.stem


def run_one(bundle: Path, out_dir: Path, preset: str, samples: int) -> dict:
    """Reconstruct ``bundle`` into ``out_dir`` and collect one table row (a dict)."""
    from pipeline.reconstruct import reconstruct_bundle

    row: dict = {"bundle": bundle_name(bundle)}
    t0 = time.perf_counter()
    try:
        result = reconstruct_bundle(bundle, out_dir, model="fusion", preset=preset)
    except ReconError as e:
        row["status"] = e.code
        row["time s"] = time.perf_counter() - t0
        return row
    row["time s"] = time.perf_counter() - t0
    row["faces"] = result.get("mesh", {}).get("faces")
    q_path = out_dir / "quality.json"
    if q_path.is_file():
        q = json.loads(q_path.read_text())
        row.update({"PSNR": q.get("psnr"), "SSIM": q.get("ssim"), "status": q.get("status")})
    gt_path = bundle / GT_MESH
    if gt_path.is_file():
        mesh_path = next(p for p in (out_dir / "mesh.glb", out_dir / "mesh.obj") if p.is_file())
        pred, gt = load_mesh_file(mesh_path), load_mesh_file(gt_path)
        g = geometry_metrics(pred.vertices, pred.faces, gt.vertices, gt.faces, n_samples=samples)
        row.update({"F-score": g["f_score"], "Chamfer": g["chamfer_l1"], "NC": g["normal_consistency"]})
    return row


def format_table(rows: list[dict]) -> str:
    fmt = {"F-score": ".4f", "Chamfer": ".5f", "NC": ".4f", "PSNR": ".2f", "SSIM": ".4f", "time s": ".1f", "faces": "d"}
    cells = [[("-" if r.get(c) is None else format(r[c], fmt.get(c, ""))) for c in COLUMNS] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(COLUMNS)]

    def line(vals):
        return "  ".join(
            v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(vals, widths, strict=True))
        )

    return "\n".join([line(COLUMNS), line(["-" * w for w in widths]), *(line(c) for c in cells)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundles", nargs="*", type=Path, help="bundles, or folders of bundles (default: shared data)")
    ap.add_argument("--preset", default="balanced", choices=sorted(PRESETS))
    ap.add_argument("--out", type=Path, default=Path("/tmp/recon3d-bench-quality"), help="where outputs are kept")
    ap.add_argument(
        "--samples", type=int, default=GEOMETRY_SAMPLES, help="surface samples per mesh for geometry metrics"
    )
    args = ap.parse_args(argv)
    bundles = find_bundles(args.bundles or [p for p in DEFAULT_BUNDLES if p.exists()])
    if not bundles:
        print("no bundles found", file=sys.stderr)
        return 1
    rows = []
    for b in bundles:
        row = run_one(b, args.out / args.preset / bundle_name(b), args.preset, args.samples)
        print(f"{row['bundle']}: done in {row['time s']:.1f} s", file=sys.stderr)
        rows.append(row)
    print(f"fusion model, preset {args.preset}; outputs in {args.out / args.preset}")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
