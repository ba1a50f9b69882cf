"""Pinhole cameras: intrinsics, camera-to-world transforms, projection and rays.

Internal convention (see docs/conventions.md), used by every module:

- camera frame: OpenCV axes, +x right, +y down, +z forward (the optical axis);
- ``cam_to_world``: (4, 4) float64 rigid transform from that camera frame to world;
- ``K``: (3, 3) float64 intrinsics in pixels; the centre of pixel (row i, column j)
  is at continuous image coordinates (j + 0.5, i + 0.5);
- world: the frame of the input cameras. The default rig has the object at the
  origin, +Y up, facing +Z.

``transforms.json`` arrives in OpenGL axes (+y up, looking along -z); the only
conversion is :func:`opengl_to_opencv`, called once at the input boundary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

#: Axis flip between OpenGL and OpenCV camera frames (its own inverse).
_GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])

#: Default six-view rig: view name -> (camera position direction, image-up vector).
RIG_LAYOUT: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "front": ((0.0, 0.0, 1.0), (0.0, 1.0, 0.0)),
    "back": ((0.0, 0.0, -1.0), (0.0, 1.0, 0.0)),
    "left": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "right": ((-1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "top": ((0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),
    "bottom": ((0.0, -1.0, 0.0), (0.0, 0.0, 1.0)),
}
RIG_VIEW_NAMES: tuple[str, ...] = tuple(RIG_LAYOUT)
RIG_DISTANCE = 2.5
RIG_FOV_X_DEG = 60.0


@dataclass(frozen=True)
class Camera:
    """One pinhole camera.

    Attributes
    ----------
    K : (3, 3) float64, pixels
    cam_to_world : (4, 4) float64, OpenCV camera axes -> world
    width, height : int, image size in pixels
    name : str, the view name
    """

    K: np.ndarray
    cam_to_world: np.ndarray
    width: int
    height: int
    name: str = ""

    @property
    def world_to_cam(self) -> np.ndarray:
        """(4, 4) float64 inverse of ``cam_to_world``."""
        return invert_rigid(self.cam_to_world)

    @property
    def center(self) -> np.ndarray:
        """(3,) float64 camera centre in world."""
        return self.cam_to_world[:3, 3].copy()

    @property
    def fov_x_deg(self) -> float:
        return math.degrees(2.0 * math.atan(self.width / (2.0 * self.K[0, 0])))

    def scaled(self, width: int, height: int) -> Camera:
        """The same camera for an image resampled to ``(width, height)``."""
        sx, sy = width / self.width, height / self.height
        K = self.K.copy()
        K[0] *= sx
        K[1] *= sy
        return replace(self, K=K, width=int(width), height=int(height))

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "width": self.width,
            "height": self.height,
            "K": self.K.tolist(),
            "cam_to_world_opencv": self.cam_to_world.tolist(),
            "fov_x_deg": round(self.fov_x_deg, 4),
        }


def invert_rigid(T: np.ndarray) -> np.ndarray:
    """Inverse of a (4, 4) rigid transform."""
    R, t = T[:3, :3], T[:3, 3]
    out = np.eye(4)
    out[:3, :3] = R.T
    out[:3, 3] = -R.T @ t
    return out


def opengl_to_opencv(cam_to_world_gl: np.ndarray) -> np.ndarray:
    """Convert a (4, 4) camera-to-world from OpenGL camera axes to OpenCV axes.

    This is the single place where the NeRF / OpenGL convention is flipped.
    """
    return np.asarray(cam_to_world_gl, dtype=np.float64) @ _GL_TO_CV


def opencv_to_opengl(cam_to_world_cv: np.ndarray) -> np.ndarray:
    """Inverse of :func:`opengl_to_opencv` (for writing transforms.json)."""
    return np.asarray(cam_to_world_cv, dtype=np.float64) @ _GL_TO_CV


def intrinsics_from_fov(fov_x_deg: float, width: int, height: int) -> np.ndarray:
    """(3, 3) K with square pixels and the principal point at the image centre."""
    f = (width / 2.0) / math.tan(math.radians(fov_x_deg) / 2.0)
    return np.array([[f, 0.0, width / 2.0], [0.0, f, height / 2.0], [0.0, 0.0, 1.0]])


def look_at(eye, target, up) -> np.ndarray:
    """(4, 4) OpenCV cam_to_world for a camera at ``eye`` looking at ``target``.

    ``up`` is the world direction that appears upwards in the image.
    """
    eye, target, up = (np.asarray(v, dtype=np.float64) for v in (eye, target, up))
    z = target - eye
    z /= np.linalg.norm(z)
    x = np.cross(z, up)  # image right; y (down) is z x x
    n = np.linalg.norm(x)
    if n < 1e-9:
        raise ValueError("look_at: up is parallel to the viewing direction")
    x /= n
    y = np.cross(z, x)
    T = np.eye(4)
    T[:3, 0], T[:3, 1], T[:3, 2], T[:3, 3] = x, y, z, eye
    return T


def default_rig(
    width: int,
    height: int,
    *,
    fov_x_deg: float = RIG_FOV_X_DEG,
    distance: float = RIG_DISTANCE,
    names: tuple[str, ...] = RIG_VIEW_NAMES,
    layout: dict | None = None,
) -> dict[str, Camera]:
    """Cameras of the default six-view rig (docs/input-format.md), keyed by view name."""
    layout = layout or RIG_LAYOUT
    K = intrinsics_from_fov(fov_x_deg, width, height)
    out = {}
    for name in names:
        direction, up = layout[name]
        eye = distance * np.asarray(direction, dtype=np.float64)
        out[name] = Camera(
            K=K.copy(), cam_to_world=look_at(eye, (0.0, 0.0, 0.0), up), width=width, height=height, name=name
        )
    return out


def transform_points(T, points):
    """Apply a (4, 4) transform to (N, 3) points. Works for numpy arrays and torch tensors."""
    return points @ T[:3, :3].T + T[:3, 3]


def project_points(K, world_to_cam, points):
    """Project (N, 3) world points to pixels.

    Works for numpy arrays and torch tensors alike (all arguments the same kind).

    Returns
    -------
    uv : (N, 2) continuous pixel coordinates (pixel centres at +0.5)
    z : (N,) depth along the optical axis; points with z <= 0 are behind the camera
    """
    pc = transform_points(world_to_cam, points)
    z = pc[:, 2]
    zs = z.clip(1e-9) if hasattr(z, "clip") else z
    u = K[0, 0] * pc[:, 0] / zs + K[0, 1] * pc[:, 1] / zs + K[0, 2]
    v = K[1, 1] * pc[:, 1] / zs + K[1, 2]
    uv = np.stack([u, v], axis=-1) if isinstance(points, np.ndarray) else _stack_torch(u, v)
    return uv, z


def _stack_torch(u, v):
    import torch

    return torch.stack([u, v], dim=-1)


def row_norm(x: np.ndarray) -> np.ndarray:
    """(..., ) Euclidean length of each row of an (..., C) float array, C small.

    Bit for bit ``np.linalg.norm(x, axis=-1)`` (the same sum of squares in the same order),
    several times faster: numpy's reduction along a short last axis is slow.
    """
    acc = x[..., 0] * x[..., 0]
    for c in range(1, x.shape[-1]):
        acc = acc + x[..., c] * x[..., c]
    return np.sqrt(acc)


def rays_through(cam: Camera, uv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World rays through continuous pixel coordinates.

    Parameters
    ----------
    uv : (N, 2) float, pixel coordinates (pixel centres at +0.5)

    Returns
    -------
    origins : (N, 3) float64, all equal to the camera centre (a read-only broadcast view)
    directions : (N, 3) float64, unit length
    """
    uv = np.asarray(uv, dtype=np.float64)
    # [u, v, 1] @ K^-1.T @ R.T written out column by column: the same sums in the same order as
    # the matrix products (bit-identical rays), without BLAS's threads for 3x3 products (a
    # strided R.T even missed BLAS and took ~1 s per million rays).
    Ki = np.linalg.inv(cam.K)
    u, v = uv[:, 0], uv[:, 1]
    d_cam = [u * Ki[p, 0] + v * Ki[p, 1] + Ki[p, 2] for p in range(3)]
    R = cam.cam_to_world[:3, :3]
    d = np.empty((len(uv), 3))
    for p in range(3):
        d[:, p] = d_cam[0] * R[p, 0] + d_cam[1] * R[p, 1] + d_cam[2] * R[p, 2]
    d /= row_norm(d)[:, None]
    return np.broadcast_to(cam.center, d.shape), d


def pixel_rays(cam: Camera, *, stride: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """World rays through pixel centres.

    Returns
    -------
    origins : (H * W, 3) float64, all equal to the camera centre (a read-only broadcast view)
    directions : (H * W, 3) float64, unit length, row-major over pixels;
        with ``stride`` > 1, every stride-th pixel (H and W divided, rounding up)
    """
    j = np.arange(0, cam.width, stride) + 0.5
    i = np.arange(0, cam.height, stride) + 0.5
    jj, ii = np.meshgrid(j, i)
    return rays_through(cam, np.stack([jj.ravel(), ii.ravel()], axis=-1))


def ray_z_scale(cam: Camera, *, stride: int = 1) -> np.ndarray:
    """(H * W,) float64: z-depth per unit of ray length for each pixel ray (cos of the off-axis angle)."""
    j = np.arange(0, cam.width, stride) + 0.5
    i = np.arange(0, cam.height, stride) + 0.5
    jj, ii = np.meshgrid(j, i)
    x = (jj.ravel() - cam.K[0, 2]) / cam.K[0, 0]
    y = (ii.ravel() - cam.K[1, 2]) / cam.K[1, 1]
    return 1.0 / np.sqrt(1.0 + x * x + y * y)
