"""The textured mesh that stages hand to each other."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
