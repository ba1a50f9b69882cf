"""Quality metrics: image agreement with the input views and surface agreement with a reference mesh.

Image metrics compare a re-render of the mesh with the input photo at one camera.
Colour metrics are computed twice:

- *masked*: over the union of the input's foreground mask and the rendered
  silhouette, so missing geometry (input foreground, no render) and floaters (render,
  no input foreground) both count, while the white background both share does not
  inflate the score;
- *full-frame*: over the whole image, for comparison with other systems' numbers.

Geometry metrics sample both surfaces in the cameras' world frame (no re-alignment:
a shifted or scaled result is penalised) and use nearest-neighbour distances.

Every per-view function is a plain function of picklable arguments, so the service
can fan views out as Ray tasks.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.spatial import cKDTree

from .frames import PosedFrames, PosedView
from .masks import mask_box
from .mesh import TexturedMesh, edge_adjacency, weld_vertices
from .render import Backend, make_rasterizer
from .shading import shade_rgb_antialiased

#: PSNR reported when the two images are identical (MSE == 0), dB.
PSNR_MAX_DB = 100.0
#: Value range of the float images the colour metrics see (uint8 inputs are divided by 255).
DATA_RANGE = 1.0
#: SSIM window: Gaussian with this sigma, pixels (Wang et al. 2004).
SSIM_SIGMA = 1.5
#: SSIM constants K1, K2 (Wang et al. 2004) and the Gaussian window's truncation, in sigmas (scikit-image's).
SSIM_K1, SSIM_K2, SSIM_TRUNCATE = 0.01, 0.03, 3.5
#: Radius of the SSIM window, pixels: scipy's Gaussian spans 2 * int(truncate * sigma + 0.5) + 1 taps.
SSIM_RADIUS = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)
#: Smallest image side SSIM accepts: one whole window.
SSIM_MIN_SIDE = 2 * SSIM_RADIUS + 1
#: Views of the quality report computed at once (threads: rendering, filters and PNG encoding release the GIL);
#: the environment variable RECON3D_REPORT_THREADS overrides it.
REPORT_THREADS = int(
    os.environ.get("RECON3D_REPORT_THREADS", 0)
    or max(1, min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))
)
#: Re-renders for image metrics are rasterised at this many times the working size per axis.
METRICS_SUPERSAMPLE = 2
#: Reference depths within this relative tolerance of the encoding's far value count as clipped.
DEPTH_SATURATION_RTOL = 1e-4
#: Default F-score threshold, as a fraction of the reference mesh's largest bounding-box extent.
FSCORE_TAU_FRACTION = 0.01
#: Default number of surface samples per mesh for geometry metrics.
GEOMETRY_SAMPLES = 100_000


# ---------------------------------------------------------------- image metrics


def _as_unit_float(img: np.ndarray, name: str) -> np.ndarray:
    """(H, W, 3) uint8 or float in [0, 1] -> float64 in [0, 1]."""
    a = np.asarray(img)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"{name} must be (H, W, 3), got {a.shape}")
    if a.dtype == np.uint8:
        return a.astype(np.float64) / 255.0
    return a.astype(np.float64)


def psnr_from_mse(mse: float) -> float:
    """PSNR in dB for images in [0, DATA_RANGE]; capped at :data:`PSNR_MAX_DB` (MSE 0 gives the cap)."""
    if mse <= 0.0:
        return PSNR_MAX_DB
    return float(min(PSNR_MAX_DB, 10.0 * math.log10(DATA_RANGE**2 / mse)))


def _gaussian(img: np.ndarray) -> np.ndarray:
    """The SSIM window applied to an (h, w) float64 image (scipy, reflected borders), as scikit-image applies it."""
    return ndimage.gaussian_filter(img, SSIM_SIGMA, mode="reflect", truncate=SSIM_TRUNCATE)


def ssim_map(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, float]:
    """Gaussian-weighted SSIM with population statistics (Wang et al. 2004), per pixel.

    The numbers are scikit-image's ``structural_similarity(pred, ref, data_range=1,
    channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, full=True)``
    (its map averaged over channels), bit for bit, at a fraction of the cost and memory on
    renders and photos over a white background. Where every pixel of a window is white (1.0)
    in ``pred``, its mean and second moment are the window's sum of weights and its cross
    moment is ``ref``'s mean, exactly, so ``pred``'s three moments are filtered only on the box
    around its non-white pixels; where the window is white in ``ref`` too, all five moments are
    that sum and the formula gives 1.0 exactly, so ``ref``'s two moments are filtered only on the
    box around either image's non-white pixels. Each box is grown by two window radii, so its
    filtered values match the whole frame's within one radius of the non-white pixels. The
    formula runs in place, one channel at a time, in scikit-image's order of operations.

    Parameters
    ----------
    pred, ref : (H, W, C) float64 in [0, 1]

    Returns
    -------
    ssim : (H, W) float64, the per-pixel SSIM averaged over channels
    mean : float, the mean over channels of each channel's map without a window radius of border
    """
    H, W, C = pred.shape
    r = SSIM_RADIUS
    pred_ink = (pred != 1.0).any(-1)
    pred_box = mask_box(pred_ink, r)  # pixels whose windows see a non-white pred pixel
    both_box = mask_box(pred_ink | (ref != 1.0).any(-1), r)  # ... a non-white pixel of either
    one = _gaussian(np.ones((2 * r + 1, 2 * r + 1)))[r, r]  # the filtered value of a white window
    acc = np.zeros((H, W))
    means = []
    for c in range(C):
        s = np.ones((H, W))  # all-white windows in both: SSIM 1.0 exactly
        if both_box is not None:
            s[both_box] = _ssim_channel(pred[..., c], ref[..., c], both_box, pred_box, one)
        means.append(s[r : H - r, r : W - r].mean(dtype=np.float64))
        acc += s
    return acc / np.float64(C), float(np.mean(means))


def _grown(box: tuple[slice, slice], r: int, H: int, W: int) -> tuple[slice, slice]:
    rows, cols = box
    return slice(max(rows.start - r, 0), min(rows.stop + r, H)), slice(max(cols.start - r, 0), min(cols.stop + r, W))


def _inside(box: tuple[slice, slice], outer: tuple[slice, slice]) -> tuple[slice, slice]:
    """``box`` in the coordinates of ``outer`` (which contains it)."""
    return tuple(slice(b.start - o.start, b.stop - o.start) for b, o in zip(box, outer, strict=True))


def _ssim_channel(x: np.ndarray, y: np.ndarray, box, pred_box, one: float) -> np.ndarray:
    """The SSIM map of one (H, W) channel on ``box`` (``pred_box``, inside it, holds pred's non-white windows)."""
    H, W = x.shape
    r = SSIM_RADIUS
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    grown = _grown(box, r, H, W)
    yg = y[grown]
    sl = _inside(box, grown)
    uy, uyy = _gaussian(yg)[sl], _gaussian(yg * yg)[sl]
    # All-white pred windows: ux = uxx = `one`, uxy = uy.
    shape = uy.shape
    ux, uxx, uxy = np.full(shape, one), np.full(shape, one), uy.copy()
    if pred_box is not None:
        pg = _grown(pred_box, r, H, W)
        xb, yb = x[pg], y[pg]
        src, dst = _inside(pred_box, pg), _inside(pred_box, box)
        ux[dst] = _gaussian(xb)[src]
        uxx[dst] = _gaussian(xb * xb)[src]
        uxy[dst] = _gaussian(xb * yb)[src]
    uxx -= ux * ux  # vx
    uyy -= uy * uy  # vy
    uxy -= ux * uy  # vxy
    num = ux * 2  # A1 = 2 ux uy + c1
    num *= uy
    num += c1
    uxy *= 2  # A2 = 2 vxy + c2
    uxy += c2
    num *= uxy
    den = ux * ux  # B1 = ux^2 + uy^2 + c1
    den += uy * uy
    den += c1
    uxx += uyy  # B2 = vx + vy + c2
    uxx += c2
    den *= uxx
    num /= den  # S
    return num


def _masked_psnr(sq: np.ndarray, region: np.ndarray) -> float | None:
    """PSNR of an (H, W) per-pixel squared-error map over a bool region; None when it is empty."""
    return psnr_from_mse(float(sq[region].mean())) if region.any() else None


def image_metrics(
    pred_rgb: np.ndarray,
    pred_mask: np.ndarray,
    ref_rgb: np.ndarray,
    ref_mask: np.ndarray,
    *,
    pred_depth: np.ndarray | None = None,
    ref_depth: np.ndarray | None = None,
) -> dict:
    """Compare a rendered view with the reference photo.

    Parameters
    ----------
    pred_rgb : (H, W, 3) uint8, or float in [0, 1], the re-render (background filled)
    pred_mask : (H, W) bool, the rendered silhouette
    ref_rgb : (H, W, 3) uint8, or float in [0, 1], the input photo at the same size
    ref_mask : (H, W) bool, the input foreground
    pred_depth, ref_depth : (H, W) float, z-depth in scene units, 0 where invalid

    Returns
    -------
    dict with
      ``psnr``, ``ssim``: masked over ``pred_mask | ref_mask`` (None if the union is empty);
      ``psnr_full``, ``ssim_full``: over the whole frame;
      ``depth_mae``: mean |pred_depth - ref_depth| in scene units over pixels valid in
      both masks and both depths (None without depths or overlap);
      ``silhouette_iou``: |pred & ref| / |pred | ref| (None if both are empty);
      ``mask_pixels``: size of the union; ``width``, ``height``.
    """
    pred = _as_unit_float(pred_rgb, "pred_rgb")
    ref = _as_unit_float(ref_rgb, "ref_rgb")
    pm = np.asarray(pred_mask, dtype=bool)
    rm = np.asarray(ref_mask, dtype=bool)
    if pred.shape != ref.shape or pm.shape != pred.shape[:2] or rm.shape != pred.shape[:2]:
        raise ValueError(f"shape mismatch: pred {pred.shape}, ref {ref.shape}, masks {pm.shape} {rm.shape}")

    if min(pred.shape[:2]) < SSIM_MIN_SIDE:
        raise ValueError(f"images must be at least {SSIM_MIN_SIDE} pixels on each side for SSIM, got {pred.shape[:2]}")
    union = pm | rm
    inter = pm & rm
    sq = ((pred - ref) ** 2).mean(axis=-1)  # (H, W) per-pixel MSE over channels
    n_union = int(union.sum())
    ssim_px, ssim_full = ssim_map(pred, ref)

    out: dict = {
        "psnr": _masked_psnr(sq, union),
        "ssim": float(ssim_px[union].mean()) if n_union else None,
        "psnr_full": psnr_from_mse(float(sq.mean())),
        "ssim_full": float(ssim_full),
        "depth_mae": None,
        "silhouette_iou": float(inter.sum() / n_union) if n_union else None,
        "mask_pixels": n_union,
        "width": int(pred.shape[1]),
        "height": int(pred.shape[0]),
    }
    if pred_depth is not None and ref_depth is not None:
        pd = np.asarray(pred_depth, dtype=np.float64)
        rd = np.asarray(ref_depth, dtype=np.float64)
        if pd.shape != pm.shape or rd.shape != pm.shape:
            raise ValueError(f"depth shapes {pd.shape} {rd.shape} do not match the image {pm.shape}")
        both = inter & (pd > 0) & (rd > 0)
        if both.any():
            out["depth_mae"] = float(np.abs(pd[both] - rd[both]).mean())
    return out


def resize_rgb(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (height, width, 3) uint8 by area averaging (no aliasing when shrinking)."""
    if rgb.shape[1] == width and rgb.shape[0] == height:
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.Resampling.BOX))


def render_view_for_metrics(
    mesh: TexturedMesh,
    view: PosedView,
    rasterizer,
    *,
    supersample: int = METRICS_SUPERSAMPLE,
    depth_far: float | None = None,
) -> dict[str, np.ndarray]:
    """Re-render ``view`` at its working (depth) resolution and fetch the matching reference.

    Colour is rasterised at ``supersample`` times the working size and area-averaged
    down, the same filtering that shrinks the photo, so silhouette and texture edges are
    anti-aliased alike on both sides (point-sampled renders cost ~10 dB on a perfect mesh).
    Silhouette and depth are sampled at pixel centres, like the input mask and depth.

    Parameters
    ----------
    depth_far : z (scene units) that the depth encoding saturates at; reference depths at
        or beyond it are clipped values, not measurements, and are left out of the depth error.

    Returns
    -------
    dict with ``pred_rgb`` (h, w, 3) uint8 on white, ``pred_mask`` (h, w) bool,
    ``pred_depth`` (h, w) float32 (0 off the mesh), and ``ref_rgb`` (the photo shrunk to
    (w, h)), ``ref_mask`` (h, w) bool, ``ref_depth`` (h, w) float32 (0 where invalid or saturated).
    """
    cam = view.depth_camera
    w, h = cam.width, cam.height
    rgb, centre = shade_rgb_antialiased(mesh, rasterizer, cam, samples=supersample)
    ref_depth = np.asarray(view.depth, dtype=np.float32)
    if depth_far is not None:
        ref_depth = np.where(ref_depth >= depth_far * (1.0 - DEPTH_SATURATION_RTOL), 0.0, ref_depth).astype(np.float32)
    return {
        "pred_rgb": rgb,
        "pred_mask": centre.mask,
        "pred_depth": centre.depth,
        "ref_rgb": resize_rgb(view.rgb, w, h),
        "ref_mask": np.asarray(view.mask, dtype=bool),
        "ref_depth": ref_depth,
    }


def evaluate_with(mesh: TexturedMesh, view: PosedView, rasterizer, supersample: int, depth_far: float | None) -> dict:
    """:func:`evaluate_view` with the mesh's rasterizer already built."""
    r = render_view_for_metrics(mesh, view, rasterizer, supersample=supersample, depth_far=depth_far)
    m = image_metrics(
        r["pred_rgb"], r["pred_mask"], r["ref_rgb"], r["ref_mask"], pred_depth=r["pred_depth"], ref_depth=r["ref_depth"]
    )
    return {"name": view.name, **m}


def evaluate_view(
    mesh: TexturedMesh,
    view: PosedView,
    *,
    backend: Backend = "auto",
    supersample: int = METRICS_SUPERSAMPLE,
    depth_far: float | None = None,
) -> dict:
    """Metrics of one view (see :func:`image_metrics`) plus its ``name``.

    The mesh is re-rendered at ``view.depth_camera`` (the working resolution) and compared
    with the photo shrunk to that size, the input mask and the decoded depth (see
    :func:`render_view_for_metrics` for ``supersample`` and ``depth_far``).
    """
    r = make_rasterizer(mesh.vertices, mesh.faces, backend=backend)
    return evaluate_with(mesh, view, r, supersample, depth_far)


def saturated_depth(frames: PosedFrames) -> float | None:
    """The z at which the frames' depth encoding clips (its ``far``), when it is stated."""
    far = (frames.depth_encoding or {}).get("far")
    return float(far) if isinstance(far, (int, float)) else None


def evaluate_views(
    mesh: TexturedMesh, frames: PosedFrames, *, backend: Backend = "auto", supersample: int = METRICS_SUPERSAMPLE
) -> list[dict]:
    """:func:`evaluate_view` for every view, building the rasterizer once."""
    r = make_rasterizer(mesh.vertices, mesh.faces, backend=backend)
    far = saturated_depth(frames)
    return map_views(lambda v: evaluate_with(mesh, v, r, supersample, far), frames.views, r)


def map_views(fn, items: list, rasterizer) -> list:
    """``[fn(x) for x in items]``, :data:`REPORT_THREADS` at a time with the CPU rasterizer.

    Embree, scipy's filters, numpy's array operations and PNG encoding release the GIL, so
    two views render and score at once on two cores. The CUDA rasterizer shares one context
    and runs them in turn.
    """
    if REPORT_THREADS < 2 or len(items) < 2 or not hasattr(rasterizer, "cast"):
        return [fn(x) for x in items]
    with ThreadPoolExecutor(REPORT_THREADS) as pool:
        return list(pool.map(fn, items))


def mean_masked_psnr(mesh: TexturedMesh, frames: PosedFrames, *, backend: Backend = "auto") -> float | None:
    """The mean over the views of the masked PSNR (dB) that :func:`evaluate_views` reports, without SSIM or depth.

    Rendered exactly as for the quality report (``METRICS_SUPERSAMPLE``), so two meshes compare
    on the number the user sees. None when no view has a mask or a rendered pixel.
    """
    r = make_rasterizer(mesh.vertices, mesh.faces, backend=backend)

    def one(v: PosedView) -> float | None:
        out = render_view_for_metrics(mesh, v, r)
        sq = ((_as_unit_float(out["pred_rgb"], "pred_rgb") - _as_unit_float(out["ref_rgb"], "ref_rgb")) ** 2).mean(-1)
        return _masked_psnr(sq, out["pred_mask"] | out["ref_mask"])

    values = [x for x in map_views(one, frames.views, r) if x is not None]
    return float(np.mean(values)) if values else None


# ---------------------------------------------------------------- geometry metrics


def sample_surface(vertices: np.ndarray, faces: np.ndarray, n: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Area-uniform random points on a triangle mesh.

    Parameters
    ----------
    vertices : (V, 3) float, world
    faces : (F, 3) int
    n : number of samples
    seed : random seed (the same seed on the same mesh gives the same points)

    Returns
    -------
    points : (n, 3) float64, world
    normals : (n, 3) float64, unit normals of the sampled faces
    """
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    if v.ndim != 2 or v.shape[1] != 3 or f.ndim != 2 or f.shape[1] != 3:
        raise ValueError(f"need (V, 3) vertices and (F, 3) faces, got {v.shape} {f.shape}")
    tri = v[f]
    cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    area2 = np.linalg.norm(cross, axis=1)
    total = area2.sum()
    if len(f) == 0 or total <= 0:
        raise ValueError("the mesh has no surface area to sample")
    rng = np.random.default_rng(seed)
    fid = np.searchsorted(np.cumsum(area2) / total, rng.random(n), side="right").clip(0, len(f) - 1)
    r1, r2 = rng.random(n), rng.random(n)
    # Fold the unit square onto the triangle: uniform barycentrics.
    flip = r1 + r2 > 1.0
    r1[flip], r2[flip] = 1.0 - r1[flip], 1.0 - r2[flip]
    t = tri[fid]
    points = t[:, 0] + r1[:, None] * (t[:, 1] - t[:, 0]) + r2[:, None] * (t[:, 2] - t[:, 0])
    normals = cross[fid] / np.maximum(area2[fid], 1e-300)[:, None]
    return points, normals


def geometry_metrics(
    pred_vertices: np.ndarray,
    pred_faces: np.ndarray,
    gt_vertices: np.ndarray,
    gt_faces: np.ndarray,
    *,
    n_samples: int = GEOMETRY_SAMPLES,
    tau: float | None = None,
    seed: int = 0,
) -> dict:
    """Surface agreement of a predicted mesh with a ground-truth mesh, both in the cameras' world frame.

    Both surfaces get ``n_samples`` area-uniform samples (the same ``seed``); distances are
    to the nearest sample of the other surface (scipy cKDTree).

    Parameters
    ----------
    pred_vertices, gt_vertices : (V, 3) float, world (scene units)
    pred_faces, gt_faces : (F, 3) int
    tau : F-score distance threshold in scene units; default
        :data:`FSCORE_TAU_FRACTION` of the GT's largest bounding-box extent

    Returns
    -------
    dict with ``accuracy`` (mean pred -> GT distance), ``completeness`` (mean GT -> pred
    distance), ``chamfer_l1`` (their mean), ``precision`` / ``recall`` (fraction of pred / GT
    samples within ``tau``), ``f_score`` (their harmonic mean), ``normal_consistency``
    (mean |cos| between the normals of nearest samples, both directions), ``tau``,
    ``n_samples``. Distances are in scene units.
    """
    gt_v = np.asarray(gt_vertices, dtype=np.float64)
    if tau is None:
        tau = FSCORE_TAU_FRACTION * float((gt_v.max(0) - gt_v.min(0)).max())
    p_pts, p_nrm = sample_surface(pred_vertices, pred_faces, n_samples, seed=seed)
    g_pts, g_nrm = sample_surface(gt_v, gt_faces, n_samples, seed=seed)
    d_pg, i_pg = cKDTree(g_pts).query(p_pts, workers=-1)
    d_gp, i_gp = cKDTree(p_pts).query(g_pts, workers=-1)
    precision = float((d_pg < tau).mean())
    recall = float((d_gp < tau).mean())
    f_score = 2.0 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    nc_pg = np.abs((p_nrm * g_nrm[i_pg]).sum(-1)).mean()
    nc_gp = np.abs((g_nrm * p_nrm[i_gp]).sum(-1)).mean()
    accuracy, completeness = float(d_pg.mean()), float(d_gp.mean())
    return {
        "chamfer_l1": 0.5 * (accuracy + completeness),
        "accuracy": accuracy,
        "completeness": completeness,
        "f_score": float(f_score),
        "precision": precision,
        "recall": recall,
        "normal_consistency": float(0.5 * (nc_pg + nc_gp)),
        "tau": float(tau),
        "n_samples": int(n_samples),
    }


def mean_dihedral_angle(vertices: np.ndarray, faces: np.ndarray) -> float:
    """Edge-length-weighted mean angle between the normals of the two faces at each interior edge, degrees.

    A measure of surface roughness that needs no reference: a smooth surface meshed finely scores
    a few degrees, a crumpled one tens. Vertices at the same position count as one (UV seams
    split them), so seams are interior edges; boundary and non-manifold edges and degenerate
    faces are left out.

    Parameters
    ----------
    vertices : (V, 3) float
    faces : (F, 3) int

    Returns
    -------
    float, degrees (0.0 when the mesh has no interior edge)
    """
    if len(vertices) == 0 or len(faces) == 0:
        return 0.0
    weld, pos = weld_vertices(vertices)
    f = weld[np.asarray(faces, dtype=np.int64)]
    n = np.cross(pos[f[:, 1]] - pos[f[:, 0]], pos[f[:, 2]] - pos[f[:, 0]])
    norm = np.linalg.norm(n, axis=1)
    keep = norm > 0
    f, n = f[keep], n[keep] / norm[keep, None]
    edges, edge_faces, face_count = edge_adjacency(f)
    interior = face_count == 2  # manifold interior edges: exactly two faces
    if not interior.any():
        return 0.0
    a, b = edge_faces[interior].T
    angle = np.degrees(np.arccos(np.clip((n[a] * n[b]).sum(-1), -1.0, 1.0)))
    length = np.linalg.norm(pos[edges[interior, 0]] - pos[edges[interior, 1]], axis=1)
    return float((angle * length).sum() / max(length.sum(), 1e-300))
