"""A regular grid of sample points in the world frame (carving, fusion)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class VoxelGrid:
    """A regular grid of sample points ``lo + index * spacing`` (index ``i, j, k`` along x, y, z).

    Attributes
    ----------
    lo : (3,) float64, world position of sample (0, 0, 0)
    spacing : float, distance between neighbouring samples, scene units
    shape : (3,) int, samples along x, y, z
    """

    lo: np.ndarray
    spacing: float
    shape: tuple[int, int, int]

    @classmethod
    def around(cls, lo, hi, resolution: int, *, margin_voxels: float = 2.0) -> VoxelGrid:
        """Grid over the box [lo, hi] with ``resolution`` samples on its longest side, plus a margin."""
        lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
        spacing = float((hi - lo).max()) / max(resolution - 1, 1)
        lo = lo - margin_voxels * spacing
        hi = hi + margin_voxels * spacing
        shape = tuple(int(n) for n in np.ceil((hi - lo) / spacing).astype(int) + 1)
        return cls(lo=lo, spacing=spacing, shape=shape)

    @property
    def hi(self) -> np.ndarray:
        return self.lo + (np.asarray(self.shape) - 1) * self.spacing

    def points(self, device: torch.device) -> torch.Tensor:
        """(X * Y * Z, 3) float32 world positions, x slowest."""
        axes = [
            torch.arange(n, device=device, dtype=torch.float32) * self.spacing + float(o)
            for n, o in zip(self.shape, self.lo, strict=True)
        ]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)

    def to_dict(self) -> dict:
        return {"lo": self.lo.round(6).tolist(), "spacing": round(self.spacing, 6), "shape": list(self.shape)}
