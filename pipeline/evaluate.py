"""Score an existing mesh file against a bundle's views (and optionally a ground-truth mesh).

    recon3d evaluate MESH --bundle BUNDLE [--gt GT_MESH] [--out quality.json]

Loads the mesh, prepares the bundle's frames exactly as reconstruction does, re-renders
every view, prints a per-view table with a summary and writes ``quality.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .bundle import load_bundle
from .config import PRESETS, ReconstructConfig, get_preset
from .export import load_mesh
from .frames import PosedFrames
from .mesh import TexturedMesh
from .metrics import evaluate_views, geometry_metrics
from .prepare import prepare_frames
from .quality import QualityReport, QualityThresholds, build_quality_report

#: Model name recorded for meshes that did not come with a result.json.
EXTERNAL_MODEL = "external"


# ---------------------------------------------------------------- loading


def load_mesh_file(path: str | Path) -> TexturedMesh:
    """Read an OBJ / GLB into a :class:`TexturedMesh` (:func:`pipeline.export.load_mesh`)."""
    return load_mesh(path)


def load_frames(bundle_path: str | Path, cfg: ReconstructConfig, *, resolved: list[dict] | None = None) -> PosedFrames:
    """Read a bundle and resolve cameras and depth exactly as reconstruction does.

    ``resolved`` (``result.json["cameras"]`` of the run that made the mesh) reuses that
    run's cameras and depth encodings instead of estimating them again.
    """
    return prepare_frames(load_bundle(bundle_path), cfg, resolved=resolved)


def _result_info(mesh_path: Path) -> dict:
    """model, preset and resolved cameras from a result.json next to the mesh, when there is one."""
    p = mesh_path.parent / "result.json"
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError):
        return {}
    info = {k: d[k] for k in ("model", "preset") if isinstance(d.get(k), str)}
    if isinstance(d.get("cameras"), list):
        info["cameras"] = d["cameras"]
    return info


# ---------------------------------------------------------------- evaluation


def evaluate_mesh_file(
    mesh_path: str | Path,
    bundle_path: str | Path,
    *,
    gt_path: str | Path | None = None,
    out: str | Path | None = None,
    cfg: ReconstructConfig | None = None,
    thresholds: QualityThresholds | None = None,
    backend: str = "auto",
) -> QualityReport:
    """Evaluate ``mesh_path`` against the views of ``bundle_path`` (and ``gt_path`` when given).

    Writes the report to ``out`` (quality.json) when given and returns it.
    """
    cfg = cfg or get_preset("balanced")
    timings: dict[str, float] = {}
    t = time.perf_counter()
    mesh = load_mesh_file(mesh_path)
    info = _result_info(Path(mesh_path))
    frames = load_frames(bundle_path, cfg, resolved=info.get("cameras"))
    timings["load"] = round(time.perf_counter() - t, 3)

    t = time.perf_counter()
    per_view = evaluate_views(mesh, frames, backend=backend)
    timings["evaluate"] = round(time.perf_counter() - t, 3)

    geometry = None
    if gt_path is not None:
        t = time.perf_counter()
        gt = load_mesh_file(gt_path)
        geometry = geometry_metrics(mesh.vertices, mesh.faces, gt.vertices, gt.faces)
        timings["geometry"] = round(time.perf_counter() - t, 3)

    report = build_quality_report(
        per_view,
        mesh=mesh,
        model=info.get("model", EXTERNAL_MODEL),
        preset=info.get("preset", cfg.preset),
        timings=timings,
        camera_estimate=frames.camera_estimate,
        thresholds=thresholds,
        geometry=geometry,
    )
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report.model_dump_json(indent=2))
    return report


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_report_table(report: QualityReport) -> str:
    """A plain-text table: one row per view, a mean row, then status, mesh and geometry lines."""
    cols = ("view", "PSNR dB", "SSIM", "PSNR full", "SSIM full", "depth MAE", "sil. IoU", "status")
    rows = [
        (v.name, _fmt(v.psnr, ".2f"), _fmt(v.ssim, ".4f"), _fmt(v.psnr_full, ".2f"), _fmt(v.ssim_full, ".4f"),
         _fmt(v.depth_mae, ".4f"), _fmt(v.silhouette_iou, ".4f"), v.status)
        for v in report.per_view
    ]  # fmt: skip
    rows.append(
        ("mean", _fmt(report.psnr, ".2f"), _fmt(report.ssim, ".4f"), _fmt(report.psnr_full, ".2f"),
         _fmt(report.ssim_full, ".4f"), _fmt(report.depth_mae, ".4f"), _fmt(report.silhouette_iou, ".4f"), report.status)
    )  # fmt: skip
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    line = lambda r: "  ".join(s.rjust(w) if i else s.ljust(w) for i, (s, w) in enumerate(zip(r, widths, strict=True)))  # noqa: E731
    out = [line(cols), line(tuple("-" * w for w in widths)), *(line(r) for r in rows[:-1])]
    out += [line(tuple("-" * w for w in widths)), line(rows[-1]), ""]
    t = report.thresholds
    out.append(
        f"status: {report.status}  (normal: PSNR >= {t.psnr_normal:g} and SSIM >= {t.ssim_normal:g}; "
        f"warning: PSNR >= {t.psnr_warning:g} and SSIM >= {t.ssim_warning:g})"
    )
    if report.error is not None:
        out.append(f"error: {report.error.code}: {report.error.message}")
    m = report.mesh
    out.append(
        f"mesh: {m.faces} faces, {m.vertices} vertices, {m.components} components, watertight={m.watertight}, "
        f"mean dihedral {m.mean_dihedral_deg} deg"
    )
    g = report.geometry
    if g is not None:
        out.append(
            f"geometry vs GT: F-score@{g.tau:.4f} {g.f_score:.4f} (precision {g.precision:.4f}, recall {g.recall:.4f}), "
            f"Chamfer-L1 {g.chamfer_l1:.5f}, normal consistency {g.normal_consistency:.4f}"
        )
    return "\n".join(out)


# ---------------------------------------------------------------- command line


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``recon3d evaluate``."""
    parser.add_argument("mesh", help="mesh file to score (OBJ, GLB, PLY ...), in the bundle's camera frame")
    parser.add_argument("--bundle", required=True, help="bundle folder or ZIP whose views the mesh is compared with")
    parser.add_argument("--gt", default=None, help="ground-truth mesh in the same frame (adds Chamfer / F-score)")
    parser.add_argument("--out", default="quality.json", help="where to write the report (default: ./quality.json)")
    parser.add_argument(
        "--preset", default="balanced", choices=sorted(PRESETS), help="preset used to prepare the frames"
    )
    parser.add_argument("--backend", default="auto", choices=["auto", "embree", "nvdiffrast"], help="render backend")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when the quality status is failure")


def run_evaluate(args: argparse.Namespace) -> int:
    """Run ``recon3d evaluate``: print the table, write quality.json. Returns the exit status."""
    out = Path(args.out)
    report = evaluate_mesh_file(
        args.mesh, args.bundle, gt_path=args.gt, out=out, cfg=get_preset(args.preset), backend=args.backend
    )
    print(format_report_table(report))
    print(f"wrote {out}")
    return 1 if (args.strict and report.status == "failure") else 0
