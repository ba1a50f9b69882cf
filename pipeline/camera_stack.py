"""Cameras as tensors: N cameras stacked on one device, projecting points and sampling images.

The tensor form of :class:`~pipeline.camera.Camera` (OpenCV convention, docs/conventions.md) used by
silhouette carving (:mod:`pipeline.rig`), depth fusion and the depth-encoding fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .camera import Camera


@dataclass
class CameraStack:
    """N cameras as tensors on one device.

    Attributes
    ----------
    K : (N, 3, 3) float32
    world_to_cam : (N, 4, 4) float32
    width, height : int, the common image size
    """

    K: torch.Tensor
    world_to_cam: torch.Tensor
    width: int
    height: int

    @classmethod
    def from_cameras(cls, cameras: list[Camera], device: torch.device) -> CameraStack:
        w, h = cameras[0].width, cameras[0].height
        if any((c.width, c.height) != (w, h) for c in cameras):
            raise ValueError("CameraStack needs cameras of one image size")
        K = torch.as_tensor(np.stack([c.K for c in cameras]), dtype=torch.float32, device=device)
        w2c = torch.as_tensor(np.stack([c.world_to_cam for c in cameras]), dtype=torch.float32, device=device)
        return cls(K=K, world_to_cam=w2c, width=w, height=h)

    def __len__(self) -> int:
        return self.K.shape[0]

    def project(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Project (P, 3) world points into every camera.

        Returns
        -------
        uv : (N, P, 2) pixel coordinates (pixel centres at +0.5)
        z : (N, P) depth along each optical axis
        """
        R, t = self.world_to_cam[:, :3, :3], self.world_to_cam[:, :3, 3]
        pc = torch.einsum("nij,pj->npi", R, points) + t[:, None, :]
        z = pc[..., 2]
        zs = z.clamp(min=1e-6)
        u = self.K[:, None, 0, 0] * pc[..., 0] / zs + self.K[:, None, 0, 2]
        v = self.K[:, None, 1, 1] * pc[..., 1] / zs + self.K[:, None, 1, 2]
        return torch.stack([u, v], dim=-1), z


def sample_images(images: torch.Tensor, uv: torch.Tensor, *, mode: str = "bilinear") -> torch.Tensor:
    """Sample (N, h, w) images at (N, P, 2) pixel coordinates -> (N, P); 0 outside the image."""
    N, h, w = images.shape
    g = torch.stack([uv[..., 0] / w * 2.0 - 1.0, uv[..., 1] / h * 2.0 - 1.0], dim=-1)
    out = F.grid_sample(images[:, None], g[:, None], mode=mode, padding_mode="zeros", align_corners=False)
    return out[:, 0, 0]
