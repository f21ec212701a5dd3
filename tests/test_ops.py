"""Low-level kernels (so3krates.ops): sums through slots equal index_add; the spline converges and is C¹."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from so3krates.ops.scatter import scatter_sum
from so3krates.ops.slots import build_slots, gather_rows, slot_sum, sum_rows
from so3krates.ops.spline import build_spline, evaluate_spline

# --- slots ----------------------------------------------------------------------------------------------


def test_slots_list_every_edge_once_under_its_atom():
    index = torch.tensor([2, 0, 2, 2, 4, 0])
    slots = build_slots(index, 6)
    pad = len(index)
    assert slots.shape == (3, 6)  # three edges point to atom 2
    expected = [[1, pad, 0, pad, 4, pad], [5, pad, 2, pad, pad, pad], [pad, pad, 3, pad, pad, pad]]
    assert slots.tolist() == expected  # in edge order within an atom; atoms without edges: padding only
    assert build_slots(index, 6, min_width=5).shape == (5, 6)
    empty = build_slots(torch.zeros(0, dtype=torch.long), 3)
    assert empty.shape == (0, 3)  # no edges: no slots, and sums through them are zero
    torch.testing.assert_close(slot_sum(torch.zeros(0, 4), empty), torch.zeros(3, 4))


def test_sums_and_gathers_through_slots_give_index_add_and_its_gradients():
    generator = torch.Generator().manual_seed(0)
    n_atoms, n_edges = 7, 40
    index = torch.randint(0, n_atoms - 1, (n_edges,), generator=generator)  # atom 6 has no edge
    slots = build_slots(index, n_atoms)
    src = torch.randn(n_edges, 5, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    x = torch.randn(n_atoms, 4, dtype=torch.float64, generator=generator, requires_grad=True)

    plain = scatter_sum(src, index, n_atoms)
    torch.testing.assert_close(slot_sum(src.detach(), slots), plain.detach(), rtol=0, atol=1e-14)
    summed = sum_rows(src, index, n_atoms, slots)
    torch.testing.assert_close(summed, plain, rtol=0, atol=1e-14)
    weights = torch.randn_like(plain)
    (grad_slots,) = torch.autograd.grad((summed * weights).sum(), src)
    (grad_plain,) = torch.autograd.grad((plain * weights).sum(), src)
    torch.testing.assert_close(grad_slots, grad_plain, rtol=0, atol=0)

    gathered = gather_rows(x, index, slots)
    torch.testing.assert_close(gathered, x[index], rtol=0, atol=0)
    weights = torch.randn_like(gathered)
    (grad_slots,) = torch.autograd.grad((gathered * weights).sum(), x)
    (grad_plain,) = torch.autograd.grad((x[index] * weights).sum(), x)
    torch.testing.assert_close(grad_slots, grad_plain, rtol=0, atol=1e-14)
    assert grad_slots[n_atoms - 1].abs().max() == 0
    assert torch.autograd.gradcheck(lambda t: sum_rows(t, index, n_atoms, slots), (src,))
    assert torch.autograd.gradcheck(lambda t: gather_rows(t, index, slots), (x,))
    # Without slots: index_add and index_select.
    torch.testing.assert_close(sum_rows(src, index, n_atoms), plain)
    torch.testing.assert_close(gather_rows(x, index), x[index])


# --- spline ---------------------------------------------------------------------------------------------


def _function(d: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.sin(3.0 * d), torch.exp(-((d - 1.5) ** 2) / 0.1), d**3], dim=1)


def _derivative(d: torch.Tensor) -> torch.Tensor:
    return torch.stack(
        [3.0 * torch.cos(3.0 * d), -2.0 * (d - 1.5) / 0.1 * torch.exp(-((d - 1.5) ** 2) / 0.1), 3 * d**2], 1
    )


def test_spline_converges_at_fourth_order_and_is_c1():
    d = torch.linspace(0.013, 4.99, 997, dtype=torch.float64, requires_grad=True)
    errors = []
    for n in (64, 128, 256):
        spline = build_spline(_function, 5.0, n, torch.float64)
        values = evaluate_spline(spline, d)
        slopes = torch.autograd.grad(
            values.sum(0), d, torch.eye(3, dtype=torch.float64), is_grads_batched=True
        )
        value_error = (values - _function(d)).abs().max().item()
        slope_error = (slopes[0].T - _derivative(d)).abs().max().item()
        errors.append((value_error, slope_error))
    for coarse, fine in itertools.pairwise(errors):
        assert coarse[0] / fine[0] > 12.0  # O(h⁴): 16 per halving
        assert coarse[1] / fine[1] > 6.0  # O(h³): 8 per halving
    # The cubic d³ is reproduced exactly (a cubic Hermite spline is exact on cubics).
    np.testing.assert_allclose(values[:, 2].detach(), (d**3).detach(), rtol=1e-12, atol=1e-12)
    # C¹ at the nodes: value and slope from the left and the right interval agree.
    spline = build_spline(_function, 5.0, 64, torch.float64)
    node = 17 * 5.0 / 64
    around = torch.tensor([node - 1e-9, node + 1e-9], dtype=torch.float64, requires_grad=True)
    values = evaluate_spline(spline, around)
    (slopes,) = torch.autograd.grad(values[:, 0].sum(), around)
    assert abs(values[0, 0] - values[1, 0]) < 1e-7
    assert abs(slopes[0] - slopes[1]) < 1e-6


def test_arguments_beyond_the_spline_are_clamped_with_zero_gradient():
    spline = build_spline(_function, 5.0, 64, torch.float64)
    d = torch.tensor([5.0, 5.3, 7.0], dtype=torch.float64, requires_grad=True)
    values = evaluate_spline(spline, d)
    np.testing.assert_allclose(values[1:].detach(), values[:1].detach().expand(2, 3), atol=1e-14)
    (gradient,) = torch.autograd.grad(values[1:].sum(), d)
    assert torch.all(gradient == 0)
