"""Least-squares texture: texel colours that make the re-rendered mesh match the photos.

The blended bake (:func:`pipeline.texture.bake_texture`) gives every texel a weighted mean
of the colours the views show at its position. Where the views disagree through the
surface (a surface a few pixels off makes view B's texture land elsewhere in view A), that
mean is not the texture whose renders are closest to the photos. This module solves for
that texture directly.

Each foreground pixel ``p`` of each input view (at the working resolution, the size the
quality report renders and compares at) sees the texture through a bilinear lookup, so its
rendered colour is linear in the texels: ``(A t)_p = sum_j a_pj t_j`` with the four
bilinear weights of the pixel's UV. Texels in the chart gutters are the colour of their
nearest chart texel (:func:`pipeline.texture.fill_empty_texels`), so a lookup that touches
the gutter is folded onto that texel. With ``t0`` the blended bake, the correction
``d = t - t0`` minimises

    sum_p c_p ((A (t0 + d))_p - I_p)^2 + prior * sum_j h_j d_j^2 + smoothness * sum_(i~j) h_ij (d_i - d_j)^2

where ``c_p`` is the pixel's confidence (the bake's fade at the mask edges), ``I_p`` the
photo shrunk to the working size, ``h_j`` the texel's own data weight (so the prior is
relative: a texel seen by many pixels moves as freely as one seen by few), and ``i~j``
texels adjacent in the atlas. The smoothness term keeps the correction free of patterns
that only the input views cannot see (a checkerboard between pixel centres), which would
show at any other view. The normal equations are solved by Jacobi-preconditioned
conjugate gradients, the three colour channels at once, all in torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

#: Pixel confidences below this are left out of the fit (the mask edge ramp's zero).
MIN_PIXEL_CONFIDENCE = 1e-3
#: CG stops once the preconditioned residual norm falls below this fraction of its start (per channel, worst).
CG_RELATIVE_TOLERANCE = 1e-3


@dataclass
class PixelObservations:
    """Input-view pixels and where they look up the texture.

    Attributes
    ----------
    uv : (P, 2) float32, the texture coordinate at each pixel centre (v = 0 at the bottom row)
    colors : (P, 3) float32, the photo's colour at the pixel, [0, 255]
    confidence : (P,) float32 in (0, 1]
    """

    uv: torch.Tensor
    colors: torch.Tensor
    confidence: torch.Tensor

    @staticmethod
    def concatenate(parts: list[PixelObservations]) -> PixelObservations:
        return PixelObservations(
            torch.cat([p.uv for p in parts]),
            torch.cat([p.colors for p in parts]),
            torch.cat([p.confidence for p in parts]),
        )


@dataclass
class ViewPixels:
    """The pixels of one view that the fit uses, before the mesh has UVs (:func:`view_pixels`).

    Attributes
    ----------
    face : (P,) int32, the mesh's face at each pixel centre
    bary : (P, 3) float32, barycentrics of that face
    colors : (P, 3) uint8, the photo's colour at the pixel (kept small: the bake holds every view's at once)
    confidence : (P,) float32 in (0, 1]
    """

    face: torch.Tensor
    bary: torch.Tensor
    colors: torch.Tensor
    confidence: torch.Tensor

    def observations(self, face_uvs: torch.Tensor) -> PixelObservations:
        """These pixels' texture lookups, given ``face_uvs`` (F, 3, 2) float32, the UVs of each face's corners."""
        uv = (face_uvs[self.face.long()] * self.bary[..., None]).sum(1)
        return PixelObservations(uv, self.colors.to(torch.float32), self.confidence)


def view_pixels(tri_id: np.ndarray, bary: np.ndarray, photo: np.ndarray, confidence: torch.Tensor) -> ViewPixels:
    """The pixels of one view that the fit uses: on the mesh, with confidence above MIN_PIXEL_CONFIDENCE.

    Parameters
    ----------
    tri_id : (h, w) int64, the mesh's face per pixel centre (-1 off the mesh), at the working resolution
    bary : (h, w, 3) float32, barycentrics of that face
    photo : (h, w, 3) uint8, the photo shrunk to the working resolution
    confidence : (h, w) float32 in [0, 1], 0 where the photo may show background; its device is the result's
    """
    device = confidence.device
    tri = torch.as_tensor(tri_id, device=device).reshape(-1)
    conf = confidence.reshape(-1)
    sel = torch.nonzero((tri >= 0) & (conf > MIN_PIXEL_CONFIDENCE)).squeeze(1)
    b = torch.as_tensor(bary, device=device).reshape(-1, 3)[sel]
    colors = torch.from_numpy(np.array(photo, dtype=np.uint8).reshape(-1, 3)).to(device)[sel]
    return ViewPixels(tri[sel].to(torch.int32), b, colors, conf[sel])


def view_observations(
    tri_id: np.ndarray, bary: np.ndarray, face_uvs: torch.Tensor, photo: np.ndarray, confidence: torch.Tensor
) -> PixelObservations:
    """:func:`view_pixels` of one view with their texture coordinates (``face_uvs``: (F, 3, 2) float32,
    on the device of ``confidence``). Returns PixelObservations of the pixels on the mesh with
    confidence above MIN_PIXEL_CONFIDENCE."""
    return view_pixels(tri_id, bary, photo, confidence).observations(face_uvs)


def bilinear_taps(uv: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The four texels and weights of a bilinear lookup, exactly as :func:`pipeline.shading.sample_texture`.

    Parameters
    ----------
    uv : (P, 2) float32, v = 0 at the bottom row (inside [0, 1])
    size : int, texture width and height T

    Returns
    -------
    taps : (P, 4) int64, row-major texel indices: (y0, x0), (y0, x1), (y1, x0), (y1, x1)
    weights : (P, 4) float32, summing to 1 per row
    """
    T = int(size)
    x = (uv[:, 0] * T - 0.5).clamp(0, T - 1)
    y = ((1.0 - uv[:, 1]) * T - 0.5).clamp(0, T - 1)
    x0, y0 = x.floor().long(), y.floor().long()
    x1, y1 = (x0 + 1).clamp(max=T - 1), (y0 + 1).clamp(max=T - 1)
    fx, fy = x - x0, y - y0
    taps = torch.stack([y0 * T + x0, y0 * T + x1, y1 * T + x0, y1 * T + x1], dim=1)
    weights = torch.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], dim=1)
    return taps, weights.to(torch.float32)


def _bake_render(flat: torch.Tensor, uv: torch.Tensor, size: int) -> torch.Tensor:
    """(P, 3) float32: the bilinear lookup of texture ``flat`` ((T*T, 3) float32) at ``uv`` ((P, 2)),
    one tap at a time (a (P, 4, 3) gather would hold four colours per pixel at once)."""
    taps, w = bilinear_taps(uv, size)
    out = flat[taps[:, 0]] * w[:, :1]
    for k in range(1, 4):
        out += flat[taps[:, k]] * w[:, k : k + 1]
    return out


def _grid_pairs(node: np.ndarray, size: int) -> np.ndarray:
    """(E, 2) int64 pairs of positions in ``node`` whose grid cells are 4-neighbours.

    ``node`` : (n,) int64, sorted row-major indices into a ``size`` x ``size`` grid.
    """
    pairs = []
    for step, same_row in ((1, True), (size, False)):
        nb = node + step
        pos = np.minimum(np.searchsorted(node, nb), len(node) - 1)
        ok = node[pos] == nb
        if same_row:
            ok &= (node % size) != size - 1
        i = np.flatnonzero(ok)
        pairs.append(np.stack([i, pos[i]], axis=1))
    return np.concatenate(pairs)


def solve_texture(
    image: torch.Tensor,
    covered: torch.Tensor,
    source: torch.Tensor,
    obs: PixelObservations,
    *,
    scale: int,
    prior: float,
    smoothness: float,
    iterations: int,
) -> tuple[torch.Tensor, dict]:
    """Least-squares correction of a baked texture against the input pixels (see the module docstring).

    The correction lives on a grid ``scale`` times coarser than the texture (about one
    node per input pixel where the texture has more texels than the views have pixels)
    and is upsampled bilinearly onto the chart texels.

    Parameters
    ----------
    image : (T, T, 3) float32, the blended bake, [0, 255], gutters already filled
    covered : (T, T) bool, the chart texels
    source : (T * T,) int64, for every texel the row-major index of the chart texel whose
        colour it carries (:func:`pipeline.texture.nearest_valid_index`)
    obs : PixelObservations
    scale : int >= 1, texels per correction node along each axis (T divisible by it)
    prior, smoothness : float >= 0, relative weights of the two regularisers
    iterations : int, most CG iterations

    Returns
    -------
    image : (T, T, 3) float32, corrected, gutters refilled
    report : dict: ``nodes``, ``pixels``, ``iterations``, and the input pixels' rms colour
        error before and after as the fit models it (``rms_before``, ``rms_after``, [0, 255])
    """
    import scipy.sparse as sp

    T = image.shape[0]
    Tc = T // scale
    device = image.device
    flat = image.reshape(-1, 3)
    residual = obs.colors - _bake_render(flat, obs.uv, T)  # (P, 3) photo minus the bake's render
    ctaps, cw = bilinear_taps(obs.uv, Tc)
    # Compact ids of the nodes the pixels touch (a dense lookup: cheaper than a sort at these sizes).
    # int32 ids and row pointers: scipy keeps them, where int64 would double the matrices' index memory.
    flat_taps = ctaps.cpu().numpy().reshape(-1)
    del ctaps
    used = np.zeros(Tc * Tc, dtype=bool)
    used[flat_taps] = True
    node = np.flatnonzero(used)
    local = (np.cumsum(used, dtype=np.int32) - 1)[flat_taps]
    del flat_taps
    n, P = len(node), len(obs.uv)
    sw = obs.confidence.sqrt().cpu().numpy()
    vals = (cw.cpu().numpy() * sw[:, None]).reshape(-1)
    del cw
    A = sp.csr_matrix((vals, local, np.arange(0, 4 * P + 1, 4, dtype=np.int32)), shape=(P, n))
    At = A.T.tocsr()
    b = residual.cpu().numpy() * sw[:, None]
    # h: each node's own data weight (the diagonal of A^T A); both regularisers scale with it.
    h = np.bincount(local, weights=vals.astype(np.float64) ** 2, minlength=n).astype(np.float32)
    h = np.maximum(h, np.float32(np.median(h) * 1e-2))
    # Smoothness only between nodes over chart texels (not across the gutters between charts).
    node_has_chart = F.max_pool2d(covered[None, None].float(), scale)[0, 0].reshape(-1).cpu().numpy()[node] > 0
    pairs = _grid_pairs(node, Tc)
    pairs = pairs[node_has_chart[pairs[:, 0]] & node_has_chart[pairs[:, 1]]]
    hp = smoothness * np.minimum(h[pairs[:, 0]], h[pairs[:, 1]])
    E = len(pairs)
    D = sp.csr_matrix(
        (np.concatenate([np.sqrt(hp), -np.sqrt(hp)]), (np.tile(np.arange(E), 2), pairs.T.reshape(-1))), shape=(E, n)
    )
    M = At @ A
    M += D.T @ D
    M += sp.diags(prior * h)
    M = M.tocsr().astype(np.float32, copy=False)
    x, used = conjugate_gradient(M, At @ b, 1.0 / M.diagonal(), iterations)
    rms_before = float(np.sqrt((b**2).sum() / max(3 * P, 1) / max(float((sw**2).mean()), 1e-12)))
    rms_after = float(np.sqrt(((A @ x - b) ** 2).sum() / max(3 * P, 1) / max(float((sw**2).mean()), 1e-12)))

    grid = torch.zeros((Tc * Tc, 3), dtype=torch.float32, device=device)
    grid[torch.as_tensor(node, device=device)] = torch.as_tensor(x, device=device)
    # align_corners=False doubling samples the coarse grid at the fine texel centres, as bilinear_taps would.
    up = F.interpolate(grid.view(Tc, Tc, 3).permute(2, 0, 1)[None], size=(T, T), mode="bilinear", align_corners=False)
    del grid
    up = up[0].permute(1, 2, 0).reshape(-1, 3)
    up += flat  # in place: at T = 2048 each (T*T, 3) float32 copy is 50 MB
    out = up[source]
    report = {
        "nodes": n,
        "pixels": P,
        "iterations": used,
        "rms_before": round(rms_before, 3),
        "rms_after": round(rms_after, 3),
    }
    return out.view(T, T, 3), report


def conjugate_gradient(M, b: np.ndarray, inv_diag: np.ndarray, iterations: int) -> tuple[np.ndarray, int]:
    """Solve ``M x = b`` (symmetric positive definite) for all columns of ``b`` at once, Jacobi-preconditioned.

    Parameters
    ----------
    M : (n, n) scipy sparse matrix
    b : (n, C) float32
    inv_diag : (n,) float32, the preconditioner
    iterations : int, most iterations

    Returns
    -------
    x : (n, C) float32; the iterations used : int
    """
    x = np.zeros_like(b)
    r = b.copy()
    z = r * inv_diag[:, None]
    p = z.copy()
    rz = (r * z).sum(0)
    start = np.maximum(rz, 1e-30)
    used = 0
    for used in range(1, iterations + 1):  # noqa: B007 (the count is returned)
        q = M @ p
        alpha = rz / np.maximum((p * q).sum(0), 1e-30)
        x += p * alpha
        r -= q * alpha
        z = r * inv_diag[:, None]
        rz_new = (r * z).sum(0)
        if bool((np.sqrt(rz_new / start) < CG_RELATIVE_TOLERANCE).all()):
            break
        p = z + p * (rz_new / np.maximum(rz, 1e-30))
        rz = rz_new
    return x, used
