"""The smooth vertex parametrisation x = (I + lambda L)^-1 u (pipeline.smooth_param)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.mesh import graph_laplacian, weld_vertices
from pipeline.smooth_param import SmoothParametrisation
from pipeline.synthetic import make_shape


def _welded_sphere():
    m = make_shape("sphere")
    weld, pos = weld_vertices(m.vertices)
    return weld[np.asarray(m.faces, dtype=np.int64)], pos


def test_laplacian_is_symmetric_with_zero_row_sums():
    faces, pos = _welded_sphere()
    L = graph_laplacian(faces, len(pos))
    assert abs(L - L.T).max() == 0
    np.testing.assert_allclose(np.asarray(L.sum(1)).ravel(), 0.0, atol=1e-12)
    # Off-diagonal entries are -1 per edge; the diagonal is the vertex degree.
    deg = L.diagonal()
    assert deg.min() >= 3 and (L - np.diag(deg)).min() == -1
    # A degenerate face adds its one real edge and no self-loop; an unused vertex keeps a zero row.
    np.testing.assert_array_equal(
        graph_laplacian(np.array([[0, 0, 1]]), 3).toarray(), [[1, -1, 0], [-1, 1, 0], [0, 0, 0]]
    )


def test_solve_matches_the_dense_inverse_and_keeps_constants():
    faces, pos = _welded_sphere()
    lam = 5.0
    S = SmoothParametrisation(faces, len(pos), lam)
    M = np.eye(len(pos)) + lam * graph_laplacian(faces, len(pos)).toarray()
    u = torch.randn(len(pos), 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(S.solve(u).numpy(), np.linalg.solve(M, u.numpy()), rtol=1e-9, atol=1e-12)
    # A translation (the same offset everywhere) passes unfiltered: L annihilates constants.
    t = torch.tensor([[0.1, -0.2, 0.3]], dtype=torch.float64).expand(len(pos), 3)
    np.testing.assert_allclose(S.solve(t).numpy(), t.numpy(), atol=1e-12)


def test_solve_is_a_low_pass_filter():
    faces, pos = _welded_sphere()
    noise = torch.randn(len(pos), 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    L = graph_laplacian(faces, len(pos))
    rough = [
        float(np.abs(L @ SmoothParametrisation(faces, len(pos), lam).solve(noise).numpy()).mean()) for lam in (0, 1, 10)
    ]
    assert rough[0] > 3 * rough[1] > 3 * rough[2]


def test_gradient_is_the_adjoint_solve():
    faces, pos = _welded_sphere()
    lam = 3.0
    S = SmoothParametrisation(faces, len(pos), lam)
    M = np.eye(len(pos)) + lam * graph_laplacian(faces, len(pos)).toarray()
    g = torch.Generator().manual_seed(2)
    u = torch.randn(len(pos), 2, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(len(pos), 2, dtype=torch.float64, generator=g)
    (S.solve(u) * w).sum().backward()
    # d/du <w, M^-1 u> = M^-T w, and M is symmetric.
    np.testing.assert_allclose(u.grad.numpy(), np.linalg.solve(M.T, w.numpy()), rtol=1e-9, atol=1e-12)


def test_zero_smoothness_is_the_identity_and_negative_is_refused():
    faces, pos = _welded_sphere()
    u = torch.randn(len(pos), 3)
    assert SmoothParametrisation(faces, len(pos), 0.0).solve(u) is u
    with pytest.raises(ValueError):
        SmoothParametrisation(faces, len(pos), -1.0)
