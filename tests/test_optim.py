"""UniformAdam: one step normaliser per tensor."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.optim import UniformAdam


def test_step_is_the_first_moment_over_the_largest_second_moment():
    p = torch.zeros(3, requires_grad=True)
    opt = UniformAdam([p], lr=0.1, betas=(0.9, 0.99))
    grads = [torch.tensor([1.0, -0.5, 0.0]), torch.tensor([2.0, 0.5, 0.25]), torch.tensor([-1.0, 1.0, 0.5])]
    m = torch.zeros(3, dtype=torch.float64)
    v = torch.zeros(3, dtype=torch.float64)
    expected = torch.zeros(3, dtype=torch.float64)
    for t, g in enumerate(grads, start=1):
        p.grad = g.clone()
        opt.step()
        g64 = g.double()
        m = 0.9 * m + 0.1 * g64
        v = 0.99 * v + 0.01 * g64 * g64
        expected -= 0.1 * (m / (1 - 0.9**t)) / (math.sqrt(float(v.max()) / (1 - 0.99**t)) + 1e-12)
        torch.testing.assert_close(p.detach().double(), expected, rtol=1e-5, atol=1e-7)


def test_entries_move_in_proportion_to_their_gradients_where_adam_moves_them_alike():
    """A steady gradient 100 times smaller moves an entry 100 times less, not as far (Adam)."""
    scales = torch.tensor([1.0, 0.01])
    moved = {}
    for name, cls in (("uniform", UniformAdam), ("adam", torch.optim.Adam)):
        p = torch.zeros(2, requires_grad=True)
        opt = cls([p], lr=0.01)
        for _ in range(20):
            opt.zero_grad()
            (scales * p).sum().backward()
            opt.step()
        moved[name] = p.detach().abs()
    torch.testing.assert_close(moved["uniform"][1] / moved["uniform"][0], torch.tensor(0.01), rtol=1e-4, atol=0)
    assert moved["uniform"][0] == pytest.approx(0.2, rel=1e-3)  # the largest moves lr per step
    assert moved["adam"][1] / moved["adam"][0] > 0.99


def test_each_tensor_has_its_own_normaliser_and_minimises_a_quadratic():
    a = torch.full((4,), 3.0, requires_grad=True)
    b = torch.full((4,), -2.0, requires_grad=True)
    opt = UniformAdam([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.1}])
    for _ in range(300):
        opt.zero_grad()
        loss = (a**2).sum() + 1e-3 * (b**2).sum()  # b's gradients are 1000 times smaller
        loss.backward()
        opt.step()
    assert a.detach().abs().max() < 0.05
    assert b.detach().abs().max() < 0.05  # its own normaliser: not held back by a's scale


def test_invalid_settings_and_missing_gradients():
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError):
        UniformAdam([p], lr=-1.0)
    with pytest.raises(ValueError):
        UniformAdam([p], betas=(1.0, 0.9))
    opt = UniformAdam([p], lr=0.1)
    opt.step()  # no gradient yet: nothing moves
    assert torch.equal(p.detach(), torch.zeros(2))
