"""Results of experiments: a finished run's metrics, the Pareto front, the CSV table and the plot.

The plot is drawn with PIL (already a core dependency) instead of matplotlib: the ingress
stays light (matplotlib adds ~40 MB and a second of import to the replica) and one scatter
with a front needs nothing more.
"""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any

from PIL import Image, ImageDraw, ImageFont

#: Columns of the results table (JSON rows and CSV), in order.
TABLE_COLUMNS = (
    "experiment_id",
    "run_index",
    "slug",
    "dataset",
    "model",
    "preset",
    "overrides",
    "status",
    "error_code",
    "quality_status",
    "psnr",
    "ssim",
    "depth_mae",
    "silhouette_iou",
    "f_score",
    "chamfer_l1",
    "faces",
    "texture_size",
    "model_s",
    "wall_s",
    "peak_rss_mb",
    "peak_gpu_mb",
    "pareto",
    "job_id",
    "model_version",
    "git_commit",
)

_MB = 1024 * 1024


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def run_metrics(quality: dict | None, result: dict | None) -> dict[str, Any]:
    """DB columns from a run's quality.json and result.json (either may be None)."""
    q = quality or {}
    r = result or {}
    mesh = q.get("mesh") or r.get("mesh") or {}
    timings = r.get("timings_s") or q.get("timings") or {}
    total = _num(timings.get("total"))
    if total is None and timings:
        total = sum(v for v in (_num(x) for x in timings.values()) if v is not None)
    resources = r.get("resources") or {}
    geometry = q.get("geometry")
    return {
        "quality_status": q.get("status"),
        "psnr": _num(q.get("psnr")),
        "ssim": _num(q.get("ssim")),
        "psnr_full": _num(q.get("psnr_full")),
        "ssim_full": _num(q.get("ssim_full")),
        "depth_mae": _num(q.get("depth_mae")),
        "silhouette_iou": _num(q.get("silhouette_iou")),
        "f_score": _num((geometry or {}).get("f_score")),
        "chamfer_l1": _num((geometry or {}).get("chamfer_l1")),
        "geometry_json": json.dumps(geometry) if geometry else None,
        "faces": mesh.get("faces"),
        "vertices": mesh.get("vertices"),
        "texture_size": (r.get("mesh") or {}).get("texture_size")
        or (r.get("config") or {}).get("texture", {}).get("size"),
        "model_s": total,
        "timings_json": json.dumps(timings) if timings else None,
        "peak_rss_bytes": resources.get("peak_rss_bytes"),
        "peak_gpu_bytes": resources.get("peak_gpu_bytes"),
        "model_version": r.get("recon3d_version"),
        "device": r.get("device"),
        "params_json": json.dumps(r["config"], sort_keys=True) if isinstance(r.get("config"), dict) else None,
    }


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated when time (x) is minimised and quality (y) maximised.

    points : list of (time_s, psnr_db); a point is on the front when no other point is at
    least as fast and at least as good, and strictly better in one of the two.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return sorted(front)


def table_rows(runs: list[dict]) -> list[dict]:
    """DB run rows -> table rows (TABLE_COLUMNS), with ``pareto`` marked per dataset."""
    rows = []
    for r in runs:
        row = {k: r.get(k) for k in TABLE_COLUMNS}
        row["overrides"] = json.loads(r.get("overrides_json") or "{}")
        row["peak_rss_mb"] = round(r["peak_rss_bytes"] / _MB, 1) if r.get("peak_rss_bytes") else None
        row["peak_gpu_mb"] = round(r["peak_gpu_bytes"] / _MB, 1) if r.get("peak_gpu_bytes") else None
        row["pareto"] = False
        rows.append(row)
    by_dataset: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        if row["psnr"] is not None and row["model_s"] is not None:
            by_dataset.setdefault((row["experiment_id"], row["dataset"]), []).append(i)
    for idx in by_dataset.values():
        for j in pareto_front([(rows[i]["model_s"], rows[i]["psnr"]) for i in idx]):
            rows[idx[j]]["pareto"] = True
    return rows


def rows_to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(TABLE_COLUMNS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: (json.dumps(v, sort_keys=True) if isinstance(v, dict) else v) for k, v in row.items()})
    return buf.getvalue()


def format_table(rows: list[dict]) -> str:
    """A fixed-width text table for terminals (``recon3d experiment show``)."""
    cols = (
        "run_index",
        "slug",
        "status",
        "error_code",
        "psnr",
        "ssim",
        "f_score",
        "faces",
        "model_s",
        "peak_rss_mb",
        "pareto",
    )
    heads = ("#", "run", "status", "error", "psnr", "ssim", "f_score", "faces", "time_s", "rss_mb", "pareto")

    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, bool):
            return "*" if v else ""
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.2f}"
        return str(v)

    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)) for cell in cells]
    return "\n".join(lines)


# ---------------------------------------------------------------- plot

PLOT_SIZE = (900, 600)
_MARGIN = (80, 30, 40, 70)  # left, top, right, bottom, pixels
_PALETTE = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
]


def _nice_ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    span = hi - lo if hi > lo else 1.0
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((s * mag for s in (1, 2, 5, 10) if s * mag >= raw), default=10 * mag)
    start = math.ceil(lo / step) * step
    return [start + k * step for k in range(int((hi - start) / step) + 1)]


def _plot_points(d, font, box: tuple[int, int, int, int], pts: list[dict]) -> None:
    """Axes with ticks, each dataset's Pareto step line, the points and the legend inside ``box``."""
    x0, y0, x1, y1 = box
    xs = [r["model_s"] for r in pts]
    ys = [r["psnr"] for r in pts]
    groups = sorted({(r["dataset"], r["model"]) for r in pts})
    xlo, xhi = 0.0, max(xs) * 1.1 or 1.0
    ylo, yhi = min(ys) - 1.0, max(ys) + 1.0
    # Headroom for the legend in the top-right corner, so no point lies under it.
    legend_frac = min((16 * len(groups) + 16) / (y1 - y0), 0.5)
    yhi = (yhi - ylo * legend_frac) / (1.0 - legend_frac)

    def px(x: float, y: float) -> tuple[float, float]:
        return x0 + (x - xlo) / (xhi - xlo) * (x1 - x0), y1 - (y - ylo) / (yhi - ylo) * (y1 - y0)

    for t in _nice_ticks(xlo, xhi):
        u, _ = px(t, ylo)
        d.line((u, y1, u, y1 + 5), fill="black")
        d.text((u - 10, y1 + 8), f"{t:g}", fill="black", font=font)
    for t in _nice_ticks(ylo, yhi):
        _, v = px(xlo, t)
        d.line((x0 - 5, v, x0, v), fill="black")
        d.text((x0 - 45, v - 7), f"{t:g}", fill="black", font=font)
    d.text(((x0 + x1) // 2 - 60, y1 + 28), "model time, s", fill="black", font=font)
    d.text((8, (y0 + y1) // 2), "PSNR, dB", fill="black", font=font)
    _plot_fronts_and_points(d, font, px, pts)
    colour = {g: _PALETTE[i % len(_PALETTE)] for i, g in enumerate(groups)}
    for i, g in enumerate(groups):
        yy = y0 + 8 + 16 * i
        d.ellipse((x1 - 200, yy, x1 - 190, yy + 10), fill=colour[g])
        d.text((x1 - 185, yy - 2), f"{g[0]} / {g[1]}", fill="black", font=font)


def _plot_fronts_and_points(d, font, px, pts: list[dict]) -> None:
    groups = sorted({(r["dataset"], r["model"]) for r in pts})
    colour = {g: _PALETTE[i % len(_PALETTE)] for i, g in enumerate(groups)}
    for ds in sorted({r["dataset"] for r in pts}):
        front = sorted((r for r in pts if r["dataset"] == ds and r.get("pareto")), key=lambda r: r["model_s"])
        line = []
        for a in front:
            p = px(a["model_s"], a["psnr"])
            if line:
                line.append((p[0], line[-1][1]))
            line.append(p)
        if len(line) > 1:
            d.line(line, fill="black", width=1)
    for r in pts:
        u, v = px(r["model_s"], r["psnr"])
        d.ellipse((u - 5, v - 5, u + 5, v + 5), fill=colour[(r["dataset"], r["model"])])
        if r.get("pareto"):
            d.ellipse((u - 9, v - 9, u + 9, v + 9), outline="black", width=2)
            d.text((u + 10, v - 16), str(r.get("slug", "")).split("/")[-1][:40], fill="black", font=font)


def plot_png(rows: list[dict], *, title: str = "") -> bytes:
    """PSNR (dB) against model time (s): one colour per dataset/model group, the Pareto front of
    each dataset ringed in black and joined by a step line. Failed runs without metrics are listed
    in the footer. Returns PNG bytes."""
    W, H = PLOT_SIZE
    left, top, right, bottom = _MARGIN
    img = Image.new("RGB", PLOT_SIZE, "white")
    d = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    pts = [r for r in rows if r.get("psnr") is not None and r.get("model_s") is not None]
    failed = [r for r in rows if r not in pts]
    d.text((left, 8), title or "PSNR vs time (Pareto front ringed)", fill="black", font=font)
    box = (left, top, W - right, H - bottom)
    d.rectangle(box, outline="black")
    if pts:
        _plot_points(d, font, box, pts)
    else:
        d.text((box[0] + 20, (box[1] + box[3]) // 2), "no run has metrics yet", fill="black", font=font)
    if failed:
        names = ", ".join(f"{r.get('slug')} ({r.get('error_code') or r.get('status')})" for r in failed)
        d.text((left, H - 22), f"no metrics: {names}"[:140], fill=(180, 0, 0), font=font)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
