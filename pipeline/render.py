"""Rasterisation: for each pixel, the triangle id, barycentrics and z-depth of a mesh seen by a camera.

One interface, two backends:

- ``embree``: CPU ray casting through embreex (pixel-centre rays, exact visibility);
- ``nvdiffrast``: CUDA rasterisation, used when torch sees a GPU and nvdiffrast imports.

Both return a :class:`Rasterization` in the same convention, so metrics, texture
baking and previews never care which one ran. Shading on top of it is in
:mod:`pipeline.shading`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .camera import Camera, project_points, rays_through, transform_points

Backend = Literal["auto", "embree", "nvdiffrast"]

#: :meth:`EmbreeRasterizer.rasterize_many` casts at most this many rays per call (one 1024^2 image).
MAX_RAYS_PER_CAST = 1 << 20
#: Rays are cast only for pixels within this many pixels of the mesh's projected bounding box
#: (float32 rays and triangles are off by far less than a pixel).
CULL_MARGIN_PX = 2


@dataclass
class Rasterization:
    """Per-pixel visibility of one mesh in one camera.

    Attributes
    ----------
    tri_id : (H, W) int64, index of the visible face; -1 for background
    bary : (H, W, 3) float32, barycentric weights of the face's three vertices (0 on background)
    depth : (H, W) float32, z-depth along the optical axis, scene units; 0 on background
    """

    tri_id: np.ndarray
    bary: np.ndarray
    depth: np.ndarray

    @property
    def mask(self) -> np.ndarray:
        """(H, W) bool, True where the mesh covers the pixel."""
        return self.tri_id >= 0

    def interpolate(self, attr: np.ndarray, faces: np.ndarray) -> np.ndarray:
        """Interpolate a per-vertex attribute (V, C) to (H, W, C); zeros on background."""
        H, W = self.tri_id.shape
        on = np.flatnonzero(self.tri_id.reshape(-1) >= 0)
        out = np.zeros((H * W, attr.shape[1]), dtype=np.float32)
        out[on] = self.interpolate_on_mesh(attr, faces, on)
        return out.reshape(H, W, -1)

    def interpolate_on_mesh(self, attr: np.ndarray, faces: np.ndarray, on: np.ndarray | None = None) -> np.ndarray:
        """:meth:`interpolate` at the covered pixels only: (N, C) in row-major pixel order (``image[mask]``'s).

        ``on``: (N,) int64 flat indices of the covered pixels, when the caller has them.
        """
        tri = self.tri_id.reshape(-1)
        on = np.flatnonzero(tri >= 0) if on is None else on
        f = faces[tri[on]]
        b = self.bary.reshape(-1, 3)[on]
        # The sum of the three products in their order, accumulated in place.
        val = attr[f[:, 0]] * b[:, :1]
        val += attr[f[:, 1]] * b[:, 1:2]
        val += attr[f[:, 2]] * b[:, 2:3]
        return val.astype(np.float32, copy=False)


def cuda_available() -> bool:
    """True when torch sees a CUDA device and nvdiffrast imports."""
    try:
        import torch

        if not torch.cuda.is_available():
            return False
        import nvdiffrast.torch  # noqa: F401
    except Exception:  # any import or driver problem means "no CUDA backend"
        return False
    return True


class EmbreeRasterizer:
    """CPU backend. Builds the BVH once; :meth:`rasterize` casts one ray per pixel centre.

    Parameters
    ----------
    vertices : (V, 3) float, world
    faces : (F, 3) int
    """

    name = "embree"

    def __init__(self, vertices: np.ndarray, faces: np.ndarray):
        from embreex import mesh_construction, rtcore_scene

        self.vertices = np.ascontiguousarray(vertices, dtype=np.float64)
        self.faces = np.ascontiguousarray(faces, dtype=np.int64)
        self._scene = rtcore_scene.EmbreeScene()
        tris = self.vertices[self.faces].astype(np.float32)
        if len(tris):
            mesh_construction.TriangleMesh(self._scene, tris)

    def cast(self, origins: np.ndarray, directions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cast (N, 3) rays. Returns (tri_id (N,) int64, bary (N, 3) float32, t (N,) float32 ray length)."""
        n = len(origins)
        if len(self.faces) == 0 or n == 0:
            return np.full(n, -1, np.int64), np.zeros((n, 3), np.float32), np.zeros(n, np.float32)
        r = self._scene.run(
            np.ascontiguousarray(origins, dtype=np.float32),
            np.ascontiguousarray(directions, dtype=np.float32),
            output=1,
        )
        tri = r["primID"].astype(np.int64)
        u, v = r["u"], r["v"]
        bary = np.stack([1.0 - u - v, u, v], axis=-1).astype(np.float32)
        hit = tri >= 0
        bary[~hit] = 0.0
        t = np.where(hit, r["tfar"], 0.0).astype(np.float32)
        return tri, bary, t

    def cast_ids(self, origins: np.ndarray, directions: np.ndarray) -> np.ndarray:
        """Cast (N, 3) float32 rays and return only the hit triangle ids, (N,) int64 (-1: miss)."""
        n = len(origins)
        if len(self.faces) == 0 or n == 0:
            return np.full(n, -1, np.int64)
        ids = self._scene.run(
            np.ascontiguousarray(origins, dtype=np.float32), np.ascontiguousarray(directions, dtype=np.float32)
        )
        return np.asarray(ids, dtype=np.int64)

    def rasterize_many(self, cams: list[Camera]) -> list[Rasterization]:
        """:meth:`rasterize` for each camera, casting many cameras' rays per embree call
        (up to :data:`MAX_RAYS_PER_CAST`, so memory stays that of one large image)."""
        out: list[Rasterization] = []
        group: list[tuple[Camera, tuple[int, int, int, int]]] = []
        n_rays = 0
        for cam in cams:
            box = self.pixel_box(cam)
            n = (box[1] - box[0]) * (box[3] - box[2])
            if group and n_rays + n > MAX_RAYS_PER_CAST:
                out += self._rasterize_group(group)
                group, n_rays = [], 0
            group.append((cam, box))
            n_rays += n
        if group:
            out += self._rasterize_group(group)
        return out

    def pixel_box(self, cam: Camera) -> tuple[int, int, int, int]:
        """(r0, r1, c0, c1): the pixel rows [r0, r1) and columns [c0, c1) whose centre rays can hit the mesh.

        A ray hits a triangle only where the triangle's projection covers the pixel centre, so
        pixels outside the projected vertices' bounding box (plus :data:`CULL_MARGIN_PX`) are
        background without casting. The whole frame when a vertex is not in front of the camera.
        """
        H, W = cam.height, cam.width
        if len(self.faces) == 0:
            return 0, 0, 0, 0
        uv, z = project_points(cam.K, cam.world_to_cam, self.vertices)
        if not (z.min() > 0.0 and np.isfinite(uv).all()):
            return 0, H, 0, W
        (u0, v0), (u1, v1) = uv.min(0), uv.max(0)
        c0 = min(max(math.floor(u0) - CULL_MARGIN_PX, 0), W)
        c1 = max(min(math.ceil(u1) + CULL_MARGIN_PX, W), c0)
        r0 = min(max(math.floor(v0) - CULL_MARGIN_PX, 0), H)
        r1 = max(min(math.ceil(v1) + CULL_MARGIN_PX, H), r0)
        return r0, r1, c0, c1

    def _rasterize_group(self, group: list[tuple[Camera, tuple[int, int, int, int]]]) -> list[Rasterization]:
        """One embree call for the boxed pixels of every camera; the frames outside the boxes are background."""
        rays, uvs = [], []
        for cam, (r0, r1, c0, c1) in group:
            # Pixel centres of the box, row-major: the same values pixel_rays gives those pixels.
            jj, ii = np.meshgrid(np.arange(c0, c1) + 0.5, np.arange(r0, r1) + 0.5)
            uv = np.stack([jj.ravel(), ii.ravel()], axis=-1)
            rays.append(rays_through(cam, uv))
            uvs.append(uv)
        tri, bary, t = self.cast(np.concatenate([o for o, _ in rays]), np.concatenate([d for _, d in rays]))
        del rays
        out, start = [], 0
        for (cam, (r0, r1, c0, c1)), uv in zip(group, uvs, strict=True):
            H, W, h, w = cam.height, cam.width, r1 - r0, c1 - c0
            n = h * w
            full = Rasterization(
                np.full((H, W), -1, np.int64), np.zeros((H, W, 3), np.float32), np.zeros((H, W), np.float32)
            )
            if n:
                z = t[start : start + n] * _z_scale(cam, uv).astype(np.float32)
                full.tri_id[r0:r1, c0:c1] = tri[start : start + n].reshape(h, w)
                full.bary[r0:r1, c0:c1] = bary[start : start + n].reshape(h, w, 3)
                full.depth[r0:r1, c0:c1] = z.reshape(h, w).astype(np.float32)
            out.append(full)
            start += n
        return out

    def rasterize(self, cam: Camera) -> Rasterization:
        return self._rasterize_group([(cam, self.pixel_box(cam))])[0]


def _z_scale(cam: Camera, uv: np.ndarray) -> np.ndarray:
    """(N,) float64 z-depth per unit of ray length through (N, 2) pixel coordinates (:func:`ray_z_scale`'s formula)."""
    x = (uv[:, 0] - cam.K[0, 2]) / cam.K[0, 0]
    y = (uv[:, 1] - cam.K[1, 2]) / cam.K[1, 1]
    return 1.0 / np.sqrt(1.0 + x * x + y * y)


class NvdiffrastRasterizer:
    """CUDA backend through nvdiffrast. Same inputs and outputs as :class:`EmbreeRasterizer`."""

    name = "nvdiffrast"
    _ctx = None

    def __init__(self, vertices: np.ndarray, faces: np.ndarray, *, device: str = "cuda"):
        import nvdiffrast.torch as dr
        import torch

        self._dr, self._torch = dr, torch
        self.device = torch.device(device)
        self.vertices = np.ascontiguousarray(vertices, dtype=np.float64)
        self.faces = np.ascontiguousarray(faces, dtype=np.int64)
        self._v = torch.as_tensor(self.vertices, dtype=torch.float32, device=self.device)
        self._f = torch.as_tensor(self.faces, dtype=torch.int32, device=self.device)
        if NvdiffrastRasterizer._ctx is None:
            NvdiffrastRasterizer._ctx = dr.RasterizeCudaContext(device=self.device)

    def rasterize(self, cam: Camera) -> Rasterization:
        torch = self._torch
        H, W = cam.height, cam.width
        if len(self.faces) == 0:
            return Rasterization(
                np.full((H, W), -1, np.int64), np.zeros((H, W, 3), np.float32), np.zeros((H, W), np.float32)
            )
        clip, z_cam = clip_space(self._v, cam, torch)
        rast, _ = self._dr.rasterize(self._ctx, clip[None].contiguous(), self._f, resolution=[H, W])
        rast = rast[0]
        tri = rast[..., 3].long() - 1
        u, v = rast[..., 0], rast[..., 1]
        # nvdiffrast weights (u, v) belong to vertices 0 and 1.
        bary = torch.stack([u, v, 1.0 - u - v], dim=-1)
        hit = tri >= 0
        bary = torch.where(hit[..., None], bary, torch.zeros_like(bary))
        fz = z_cam[self._f[tri.clamp(min=0)].long()]  # (H, W, 3)
        depth = torch.where(hit, (fz * bary).sum(-1), torch.zeros_like(u))
        return Rasterization(
            tri.cpu().numpy(), bary.cpu().numpy().astype(np.float32), depth.cpu().numpy().astype(np.float32)
        )


def clip_space(vertices, cam: Camera, xp, *, near: float = 1e-3, far: float = 1e3):
    """Clip-space (V, 4) positions for nvdiffrast and camera z (V,), from torch (V, 3) world vertices.

    Image row 0 maps to NDC y = -1, which nvdiffrast writes to its first output row,
    so the raster comes out in image order with no flip. Pixel centres match the
    +0.5 convention of :mod:`pipeline.camera`.
    """
    torch = xp
    w2c = torch.as_tensor(cam.world_to_cam, dtype=vertices.dtype, device=vertices.device)
    pc = transform_points(w2c, vertices)
    x, y, z = pc[:, 0], pc[:, 1], pc[:, 2]
    K = cam.K
    W, H = cam.width, cam.height
    cx = 2.0 * K[0, 0] / W * x + (2.0 * K[0, 2] / W - 1.0) * z
    cy = 2.0 * K[1, 1] / H * y + (2.0 * K[1, 2] / H - 1.0) * z
    a = (far + near) / (far - near)
    b = -2.0 * far * near / (far - near)
    cz = a * z + b
    return torch.stack([cx, cy, cz, z], dim=-1), z


def make_rasterizer(vertices: np.ndarray, faces: np.ndarray, *, backend: Backend = "auto"):
    """A rasterizer for one mesh. ``auto`` picks nvdiffrast when CUDA is usable, else embree."""
    if backend == "nvdiffrast" or (backend == "auto" and cuda_available()):
        return NvdiffrastRasterizer(vertices, faces)
    if backend not in ("auto", "embree"):
        raise ValueError(f"unknown render backend {backend!r}; use auto, embree or nvdiffrast")
    return EmbreeRasterizer(vertices, faces)


def rasterize_many(rasterizer, cams: list[Camera]) -> list[Rasterization]:
    """Every camera's :class:`Rasterization`: one embree call for all of them with the CPU backend."""
    if hasattr(rasterizer, "rasterize_many"):
        return rasterizer.rasterize_many(cams)
    return [rasterizer.rasterize(cam) for cam in cams]


def rasterize(vertices: np.ndarray, faces: np.ndarray, cam: Camera, *, backend: Backend = "auto") -> Rasterization:
    """One-shot :class:`Rasterization` of a mesh (V, 3) / (F, 3) in ``cam``."""
    return make_rasterizer(vertices, faces, backend=backend).rasterize(cam)
