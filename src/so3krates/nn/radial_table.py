"""Tabulated radial filters: MLP_r(K(d)) of every layer and branch as a cubic spline in d.

In Eq. (20) the radial half of each filter, ``MLP_r(K_ij) = Linear(F, F)(SiLU(Linear(K, F)(K(d_ij))))``,
depends on the edge only through its length d. For the paper model (F = 132, K = 32, 3 layers, 2 branches)
that is ~130 k multiply-adds per edge in the forward pass and twice that in the backward pass, most of the
model's arithmetic. Once the weights are frozen (MD, evaluation, export) the same function can be read from
a table: the filters of all layers and branches (T·B·F columns) are sampled with their exact derivatives at
n + 1 evenly spaced distances in [0, r_c] and each interval holds the cubic Hermite polynomial through its
two ends. Per edge that leaves four row gathers and three multiply-adds per column.

Accuracy: the spline matches values and first derivatives at the nodes, so energies are C¹ in the positions
(forces are continuous; velocity Verlet conserves energy as with the exact network). The interpolation error
is O(h⁴) in the filters and O(h³) in their derivatives. With the default 2048 intervals over 5 Å, on the
trained alanine-dipeptide model in float64: energy 1.8e-10 eV, forces 1e-7 relative (4096 intervals: 2e-11
eV, 1e-8), below float32 round-off (8e-7 relative); 2 ps of float32 NVE drift -1.17e-5 eV/atom/ps with the
table and -1.16e-5 without. Second derivatives jump at the nodes, so Hessians (``so3krates spectrum``) and
float64 finite-difference checks use the exact network; the table is the float32 default and otherwise
opt-in (``So3krates.tabulate``).

Distances beyond the table (edges kept by a neighbour-list skin) are clamped to r_c: there φ(d) = φ'(d) = 0
multiplies every filter, so their value does not matter and their gradient is zero either way.

Why by hand: no library tabulates a neural network of one variable for autograd; the spline is a few lines.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor


class RadialTable(NamedTuple):
    """Power-basis coefficients of the spline on each interval: value = c0 + t (c1 + t (c2 + t c3)).

    coefficients: four (n_intervals, n_columns) tensors; t = d / spacing − g ∈ [0, 1] on interval g.
    spacing: Å; end: Å, the last node (the model's cutoff).
    """

    coefficients: tuple[Tensor, Tensor, Tensor, Tensor]
    spacing: float
    end: float


def build_radial_table(
    function: Callable[[Tensor], Tensor], end: float, n_intervals: int, dtype: torch.dtype
) -> RadialTable:
    """Samples ``function`` ((n,) float64 distances → (n, columns)) and its derivative on [0, end].

    The derivative comes from forward-mode differentiation (one pass for all columns), in float64; the
    coefficients are then cast to ``dtype``.
    """
    nodes = torch.linspace(0.0, end, n_intervals + 1, dtype=torch.float64)
    values, slopes = torch.func.jvp(function, (nodes,), (torch.ones_like(nodes),))
    h = end / n_intervals
    y0, y1 = values[:-1], values[1:]
    m0, m1 = h * slopes[:-1], h * slopes[1:]  # derivatives with respect to t
    coefficients = (y0, m0, 3.0 * (y1 - y0) - 2.0 * m0 - m1, 2.0 * (y0 - y1) + m0 + m1)
    return RadialTable(tuple(c.to(dtype).contiguous() for c in coefficients), h, float(end))


def evaluate_radial_table(table: RadialTable, distances: Tensor) -> Tensor:
    """distances: (n_edges,) float, Å → (n_edges, n_columns) in the table's dtype; differentiable in d."""
    c0, c1, c2, c3 = table.coefficients
    n_intervals = c0.shape[0]
    s = distances.to(c0.dtype).clamp(0.0, table.end) * (1.0 / table.spacing)
    interval = s.detach().floor().clamp(max=n_intervals - 1)
    t = (s - interval)[:, None]
    index = interval.long()
    return c0.index_select(0, index) + t * (
        c1.index_select(0, index) + t * (c2.index_select(0, index) + t * c3.index_select(0, index))
    )
