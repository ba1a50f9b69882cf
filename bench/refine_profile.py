"""Where the orbit error of the ``nvdiffrec`` candidates is: outline or surface, per object.

    python bench/refine_profile.py [--set /tmp/recon3d-bench-validation/set_r512_d512] [--variant posed]
                                   [--runs /tmp/refine-validation] [--meshes F,R,Ra]

Reads the candidate meshes ``bench/refine_validation.py`` saved (``<runs>/<object>/<key>.npz``),
renders them and the GT mesh at the 8 held-out orbit cameras (as ``bench/validation.py``), and splits
the squared colour error summed over the masked PSNR's region (rendered | GT silhouette) into:

- ``edge%``: the share on pixels inside one silhouette only (the outline: a surface error);
- ``band%``: the share on pixels in both, within 2 px of the GT outline (the rim: surface or texture);
- the rest is on interior pixels (texture, or a surface error that shifts the texture);
- ``iou``: mean silhouette IoU; ``psnr``: the masked PSNR (as the bench's ``orb*`` columns).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.evaluate import load_mesh_file  # noqa: E402
from pipeline.mesh import TexturedMesh  # noqa: E402
from pipeline.metrics import METRICS_SUPERSAMPLE  # noqa: E402
from pipeline.render import make_rasterizer  # noqa: E402
from pipeline.shading import shade_rgb_antialiased  # noqa: E402
from pipeline.validation_set import load_orbit_cameras  # noqa: E402

#: Rim band width, pixels inside the GT outline.
RIM_PX = 2


def load_candidate(path: Path) -> TexturedMesh:
    z = np.load(path)
    return TexturedMesh(vertices=z["v"], faces=z["f"], uvs=z["uv"], texture=z["t"])


def error_split(mesh: TexturedMesh, gt: TexturedMesh, cameras) -> dict:
    """Shares of the squared error over the union of silhouettes: outline, rim band, interior; IoU and PSNR."""
    rp = make_rasterizer(mesh.vertices, mesh.faces, backend="embree")
    rg = make_rasterizer(gt.vertices, gt.faces, backend="embree")
    sums = np.zeros(3)
    ious, psnrs = [], []
    for cam in cameras:
        prgb, pc = shade_rgb_antialiased(mesh, rp, cam, samples=METRICS_SUPERSAMPLE)
        grgb, gc = shade_rgb_antialiased(gt, rg, cam, samples=METRICS_SUPERSAMPLE)
        sq = ((prgb.astype(np.float64) - grgb.astype(np.float64)) / 255.0) ** 2
        sq = sq.mean(-1)
        union, inter = pc.mask | gc.mask, pc.mask & gc.mask
        rim = inter & ~ndimage.binary_erosion(gc.mask, iterations=RIM_PX)
        sums += [sq[union & ~inter].sum(), sq[rim].sum(), sq[inter & ~rim].sum()]
        ious.append(inter.sum() / max(union.sum(), 1))
        psnrs.append(10 * np.log10(1.0 / max(sq[union].mean(), 1e-12)))
    share = sums / max(sums.sum(), 1e-12)
    return {
        "edge%": 100 * share[0],
        "band%": 100 * share[1],
        "iou": float(np.mean(ious)),
        "psnr": float(np.mean(psnrs)),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", type=Path, default=Path("/tmp/recon3d-bench-validation/set_r512_d512"))
    ap.add_argument("--variant", default="posed")
    ap.add_argument("--runs", type=Path, default=Path("/tmp/refine-validation"))
    ap.add_argument("--meshes", default="F,R,Ra")
    args = ap.parse_args(argv)
    print("| object | mesh | orbit PSNR | silhouette IoU | error on outline % | on 2 px rim % | interior % |")
    print("|---|---|---|---|---|---|---|")
    for obj_dir in sorted(p for p in args.runs.iterdir() if p.is_dir()):
        bundle = args.set / obj_dir.name / args.variant
        gt = load_mesh_file(bundle / "gt" / "mesh.glb")
        cams = load_orbit_cameras(bundle / "gt" / "orbit.json")
        for key in args.meshes.split(","):
            if not (obj_dir / f"{key}.npz").is_file():
                continue
            s = error_split(load_candidate(obj_dir / f"{key}.npz"), gt, cams)
            rest = 100 - s["edge%"] - s["band%"]
            print(
                f"| {obj_dir.name} | {key} | {s['psnr']:.2f} | {s['iou']:.4f} | {s['edge%']:.1f} | {s['band%']:.1f} | {rest:.1f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
