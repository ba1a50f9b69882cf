"""Smooth vertex parametrisation for the refinement: positions ``x = (I + lambda L)^-1 u``.

With uniform steps (:class:`pipeline.optim.UniformAdam`) the vertices the photos barely
constrain move little, which keeps the surface smooth but also makes a global move (a
scale error, a shifted side) slow: each step nudges the few strongly pulled vertices, and
the Laplacian term drags their neighbours along one ring per step. Optimising ``u``
instead of ``x``, with ``L`` the combinatorial graph Laplacian, turns every step into a
smooth, mesh-wide displacement field: the gradient reaching ``u`` is the position gradient
filtered by ``(I + lambda L)^-1``, a low-pass filter whose width grows with ``lambda``
(Nicolet et al. 2021, "Large Steps in Inverse Rendering of Geometry", section 4).

The system matrix is symmetric positive definite, so the same factorisation solves the
forward map and its adjoint. It is factorised once per refinement pass on the CPU
(scipy's sparse LU; the mesh never changes topology); each step solves two (V, 3)
systems, a few milliseconds for the fusion meshes' 10^4-10^5 vertices.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch

from .mesh import graph_laplacian


class SmoothParametrisation:
    """The map ``u -> (I + lambda L)^-1 u`` on (V, C) per-vertex values, differentiable in ``u``.

    Parameters
    ----------
    faces : (F, 3) int, welded faces
    n_vertices : V
    smoothness : lambda >= 0; 0 is the identity. Larger values spread each step over a wider
        patch of surface (the filter's width is about ``sqrt(lambda)`` edge rings).
    """

    def __init__(self, faces: np.ndarray, n_vertices: int, smoothness: float):
        if smoothness < 0:
            raise ValueError(f"smoothness must be >= 0, got {smoothness}")
        self.smoothness = float(smoothness)
        self._lu = None
        if self.smoothness > 0:
            M = sp.identity(n_vertices, format="csc") + self.smoothness * graph_laplacian(faces, n_vertices)
            self._lu = spla.splu(M.tocsc())

    def solve(self, u: torch.Tensor) -> torch.Tensor:
        """(V, C) ``(I + lambda L)^-1 u``, on ``u``'s device and dtype, with the adjoint solve as its gradient."""
        if self._lu is None:
            return u
        return _Solve.apply(u, self._lu)


class _Solve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, lu):
        ctx.lu = lu
        x = lu.solve(u.detach().cpu().double().numpy())
        return torch.as_tensor(x, dtype=u.dtype, device=u.device)

    @staticmethod
    def backward(ctx, grad):
        # The matrix is symmetric: the adjoint solve is the same solve.
        g = ctx.lu.solve(grad.detach().cpu().double().numpy())
        return torch.as_tensor(g, dtype=grad.dtype, device=grad.device), None
