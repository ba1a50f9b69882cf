"""Triangle-mesh clean-up after marching cubes: components, orientation, smoothing, decimation.

Functions take and return plain arrays: ``vertices`` (V, 3) float, ``faces`` (F, 3) int.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import connected_components

#: Taubin's shrink and inflate factors (lambda > 0, mu < -lambda): smoothing without shrinkage.
TAUBIN_LAMBDA = 0.5
TAUBIN_MU = -0.53


def remove_unreferenced(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop vertices no face uses. Returns (vertices (V', 3), faces (F, 3) reindexed)."""
    used = np.zeros(len(vertices), bool)
    used[faces.ravel()] = True
    remap = np.cumsum(used) - 1
    return vertices[used], remap[faces].astype(faces.dtype)


def face_components(faces: np.ndarray, n_vertices: int) -> np.ndarray:
    """(F,) int component label of each face (faces sharing a vertex are connected)."""
    # Two edges per face join its three vertices; a face takes its first vertex's component.
    e = np.concatenate([faces[:, :2], faces[:, 1:]])
    g = sp.csr_matrix((np.ones(len(e), np.int8), (e[:, 0], e[:, 1])), shape=(n_vertices, n_vertices))
    _, labels = connected_components(g, directed=False)
    return labels[faces[:, 0]]


def edge_face_components(faces: np.ndarray) -> np.ndarray:
    """(F,) int component label of each face, faces joined only through shared edges.

    Pieces that touch the rest at a single vertex (fans left by marching cubes or decimation)
    come out separate, as they do for any viewer or tool that splits a mesh by its edges.
    """
    e = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    owner = np.tile(np.arange(len(faces)), 3)
    _, edge_id = np.unique(e, axis=0, return_inverse=True)
    edge_id = edge_id.ravel()
    # Faces and edges as one bipartite graph: faces sharing an edge end in one component.
    n_f = len(faces)
    n = n_f + int(edge_id.max()) + 1
    g = sp.csr_matrix((np.ones(len(owner), np.int8), (owner, n_f + edge_id)), shape=(n, n))
    _, labels = connected_components(g, directed=False)
    return labels[:n_f]


def weld_coincident(vertices: np.ndarray, faces: np.ndarray, *, decimals: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Merge vertices at the same position (rounded to ``decimals``), as trimesh's ``merge_vertices`` does.

    Decimation can leave distinct vertices on one spot; any tool that welds UV seams by position
    joins them, so connectivity must be judged on the welded mesh. Faces that collapse (two
    corners on one vertex) are dropped. Returns (vertices (V', 3), faces (F', 3)).
    """
    if len(faces) == 0:
        return vertices, faces
    key = np.round(np.asarray(vertices, dtype=np.float64), decimals)
    _, first, inverse = np.unique(key, axis=0, return_index=True, return_inverse=True)
    f = inverse.ravel()[faces].astype(faces.dtype)
    ok = (f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 2] != f[:, 0])
    return remove_unreferenced(vertices[first], f[ok])


def manifold_edge_components(faces: np.ndarray) -> np.ndarray:
    """(F,) int component label of each face, faces joined only through edges that exactly two faces share.

    This is the connectivity trimesh's ``split`` uses: a piece hanging off a non-manifold edge
    (three or more faces) or touching the rest at one vertex comes out separate.
    """
    n_f = len(faces)
    e = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    owner = np.tile(np.arange(n_f), 3)
    _, edge_id, count = np.unique(e, axis=0, return_inverse=True, return_counts=True)
    edge_id = edge_id.ravel()
    two = count[edge_id] == 2
    # Each two-face edge appears twice: sorted by edge id, its two owners are adjacent.
    order = np.argsort(edge_id[two], kind="stable")
    pairs = owner[two][order].reshape(-1, 2)
    g = sp.csr_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n_f, n_f))
    _, labels = connected_components(g, directed=False)
    return labels


def non_manifold_edge_count(faces: np.ndarray) -> int:
    """Edges that three or more faces share."""
    e = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    _, count = np.unique(e, axis=0, return_counts=True)
    return int((count > 2).sum())


def drop_hanging_pieces(
    vertices: np.ndarray, faces: np.ndarray, min_fraction: float, *, max_rounds: int = 3
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Weld coincident vertices, then remove the small pieces that hang off non-manifold edges or single vertices.

    Pieces are judged by :func:`manifold_edge_components` (as a viewer that welds UV seams and
    splits the mesh sees them); those with fewer faces than ``min_fraction`` of the largest go.
    Removing a piece can make the edge it hung on manifold and free the next one, so this
    repeats up to ``max_rounds`` times.

    Returns (vertices, faces, report) with report ``{"removed": pieces, "removed_faces": faces,
    "non_manifold_edges": left}``.
    """
    vertices, faces = weld_coincident(vertices, faces)
    removed = removed_faces = 0
    for _ in range(max_rounds):
        if len(faces) == 0:
            break
        labels = manifold_edge_components(faces)
        _, inv, counts = np.unique(labels, return_inverse=True, return_counts=True)
        small = counts < min_fraction * counts.max()
        if not small.any():
            break
        keep = ~small[inv.ravel()]
        removed += int(small.sum())
        removed_faces += int((~keep).sum())
        vertices, faces = remove_unreferenced(vertices, faces[keep])
    nm = non_manifold_edge_count(faces) if len(faces) else 0
    return vertices, faces, {"removed": removed, "removed_faces": removed_faces, "non_manifold_edges": nm}


def keep_large_components(
    vertices: np.ndarray, faces: np.ndarray, min_fraction: float, *, through: str = "vertex"
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Remove connected components with fewer faces than ``min_fraction`` of the largest one.

    ``through``: ``"vertex"`` joins faces that share a vertex, ``"edge"`` only those sharing an edge.
    Returns (vertices, faces, report) with report ``{"components": n, "removed": k, "removed_faces": m}``.
    """
    if len(faces) == 0:
        return vertices, faces, {"components": 0, "removed": 0, "removed_faces": 0}
    labels = face_components(faces, len(vertices)) if through == "vertex" else edge_face_components(faces)
    _, inv, counts = np.unique(labels, return_inverse=True, return_counts=True)
    keep_comp = counts >= min_fraction * counts.max()
    keep = keep_comp[inv]
    v, f = remove_unreferenced(vertices, faces[keep])
    report = {"components": int(len(counts)), "removed": int((~keep_comp).sum()), "removed_faces": int((~keep).sum())}
    return v, f, report


def signed_volume(vertices: np.ndarray, faces: np.ndarray) -> float:
    """Volume enclosed by a closed mesh; negative when its faces wind inwards."""
    v = vertices.astype(np.float64)
    a, b, c = v[faces[:, 0]], v[faces[:, 1]], v[faces[:, 2]]
    return float(np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6.0)


def orient_outward(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Faces wound counter-clockwise seen from outside (flipped when the enclosed volume is negative)."""
    if signed_volume(vertices, faces) < 0:
        return faces[:, ::-1].copy()
    return faces


def _umbrella_operator(faces: np.ndarray, n: int) -> sp.csr_matrix:
    """(V, V) float32 row-normalised vertex adjacency (the uniform 'umbrella' averaging operator)."""
    a, b = faces.ravel(), faces[:, [1, 2, 0]].ravel()
    rows, cols = np.concatenate([a, b]), np.concatenate([b, a])
    A = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n, n))
    A.data[:] = 1.0  # duplicate edges count once
    deg = np.diff(A.indptr)
    A.data /= np.repeat(np.maximum(deg, 1), deg).astype(np.float32)
    return A


def taubin_smooth(vertices: np.ndarray, faces: np.ndarray, iterations: int) -> np.ndarray:
    """Taubin lambda|mu smoothing (removes marching-cubes stair steps and 8-bit depth banding).

    Runs in float32 with torch's CSR product, which uses every core (scipy's uses one).
    Returns (V, 3) vertices of the same dtype.
    """
    if iterations <= 0 or len(faces) == 0:
        return vertices
    M = _umbrella_operator(faces, len(vertices))
    with warnings.catch_warnings():  # "CSR support is in beta": the product used here is stable
        warnings.simplefilter("ignore", UserWarning)
        Mt = torch.sparse_csr_tensor(
            torch.as_tensor(M.indptr.astype(np.int64)),
            torch.as_tensor(M.indices.astype(np.int64)),
            torch.as_tensor(M.data.astype(np.float32)),
            size=M.shape,
            check_invariants=False,
        )
    v = torch.as_tensor(np.asarray(vertices, dtype=np.float32))
    for _ in range(iterations):
        v = v + TAUBIN_LAMBDA * (Mt @ v - v)
        v = v + TAUBIN_MU * (Mt @ v - v)
    return v.numpy().astype(vertices.dtype)


def decimate(vertices: np.ndarray, faces: np.ndarray, target_faces: int) -> tuple[np.ndarray, np.ndarray]:
    """Quadric decimation (fast_simplification) to about ``target_faces``; unchanged when already smaller."""
    if target_faces <= 0 or len(faces) <= target_faces:
        return vertices, faces
    import fast_simplification

    v, f = fast_simplification.simplify(
        np.ascontiguousarray(vertices, dtype=np.float32),
        np.ascontiguousarray(faces, dtype=np.int32),
        target_reduction=1.0 - target_faces / len(faces),
    )
    return np.asarray(v, np.float32), np.asarray(f, np.int32)
