"""Bundle discovery shared by the benchmarks: every bundle under ../shared/data."""

from __future__ import annotations

from pathlib import Path

#: ../shared/data beside the checkout.
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def find_bundles(data: Path, names: list[str] | None = None) -> list[tuple[str, Path, Path | None]]:
    """(name, bundle folder, ground-truth mesh or None) for every bundle under ``data``.

    The older system's outputs under ``examples/`` are skipped; a bundle folder named
    ``input`` takes its parent's name. ``names`` keeps only the bundles so named.
    """
    out = []
    for mv in sorted(data.rglob("multi_views")):
        b = mv.parent
        if "examples" in b.parts:
            continue
        name = b.name if b.name != "input" else b.parent.name
        if names and b.name not in names and name not in names:
            continue
        gt = b / "gt" / "mesh.glb"
        out.append((name, b, gt if gt.exists() else None))
    return out
