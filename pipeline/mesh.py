"""The textured mesh that stages hand to each other, and connectivity helpers on its arrays."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


@dataclass
class TexturedMesh:
    """A triangle mesh with one UV atlas and one diffuse texture, in the input cameras' world frame.

    Attributes
    ----------
    vertices : (V, 3) float32, world
    faces : (F, 3) int32, counter-clockwise seen from outside
    uvs : (V, 2) float32 or None, texture coordinates in [0, 1]; v = 0 is the bottom row of ``texture`` (OBJ/glTF-from-OBJ convention)
    texture : (T, T, 3) uint8 or None, the diffuse (kd) texture, row 0 at the top
    vertex_colors : (V, 3) uint8 or None, used where there is no texture
    """

    vertices: np.ndarray
    faces: np.ndarray
    uvs: np.ndarray | None = None
    texture: np.ndarray | None = None
    vertex_colors: np.ndarray | None = None

    @property
    def has_texture(self) -> bool:
        return self.uvs is not None and self.texture is not None

    def vertex_normals(self) -> np.ndarray:
        """(V, 3) float32 area-weighted unit vertex normals."""
        v = self.vertices.astype(np.float64)
        f = self.faces
        fn = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
        vn = np.zeros_like(v)
        for k in range(3):
            np.add.at(vn, f[:, k], fn)
        n = np.linalg.norm(vn, axis=1, keepdims=True)
        return (vn / np.maximum(n, 1e-12)).astype(np.float32)

    def face_normals(self) -> np.ndarray:
        """(F, 3) float32 unit face normals."""
        v = self.vertices.astype(np.float64)
        f = self.faces
        fn = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
        return (fn / np.maximum(np.linalg.norm(fn, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def weld_vertices(vertices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge vertices at identical positions (the copies a UV atlas makes along its seams).

    Parameters
    ----------
    vertices : (V, 3) float

    Returns
    -------
    weld : (V,) int64, the welded id of each vertex
    positions : (U, 3) float64, one position per welded id
    """
    v = np.asarray(vertices, dtype=np.float64)
    positions, weld = np.unique(v, axis=0, return_inverse=True)
    return weld.reshape(-1).astype(np.int64), positions


def edge_adjacency(faces: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The unique edges of a triangle mesh and the faces on each.

    Parameters
    ----------
    faces : (F, 3) int

    Returns
    -------
    edges : (E, 2) int64, vertex ids, smaller first
    edge_faces : (E, 2) int64, the first two faces on each edge (-1 where an edge has one face)
    face_count : (E,) int64, how many faces share each edge (2: interior, 1: boundary, 3+: non-manifold)
    """
    faces = np.asarray(faces, dtype=np.int64)
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    fid = np.tile(np.arange(len(faces)), 3)
    key = np.sort(e, axis=1)
    order = np.lexsort((key[:, 1], key[:, 0]))
    key, fid = key[order], fid[order]
    start = np.ones(len(key), bool)
    start[1:] = (key[1:] != key[:-1]).any(axis=1)
    first = np.flatnonzero(start)
    edges = key[first]
    counts = np.diff(np.append(first, len(key)))
    ef = np.full((len(edges), 2), -1, np.int64)
    ef[:, 0] = fid[first]
    two = counts >= 2
    ef[two, 1] = fid[first[two] + 1]
    return edges, ef, counts.astype(np.int64)


def graph_laplacian(faces: np.ndarray, n_vertices: int) -> sp.csr_matrix:
    """(V, V) float64 combinatorial Laplacian ``D - A`` of the mesh's edge graph: symmetric, positive semi-definite.

    Parameters
    ----------
    faces : (F, 3) int, indices into the V vertices (weld UV-seam copies first, or the seams are cuts)
    n_vertices : V

    ``D`` holds each vertex's number of neighbours, ``A`` is 1 per edge; repeated vertices in a
    degenerate face add no self-loop. An unreferenced vertex has an all-zero row.
    """
    f = np.asarray(faces, dtype=np.int64)
    e = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    e = np.unique(np.sort(e, axis=1), axis=0)
    e = e[e[:, 0] != e[:, 1]]
    i = np.concatenate([e[:, 0], e[:, 1]])
    j = np.concatenate([e[:, 1], e[:, 0]])
    A = sp.csr_matrix((np.ones(len(i)), (i, j)), shape=(n_vertices, n_vertices))
    return (sp.diags(np.asarray(A.sum(1)).ravel()) - A).tocsr()
