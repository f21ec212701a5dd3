"""A C¹ cubic Hermite spline of a vector-valued function of one variable, for autograd.

The execution layer reads the radial filters of the model from such a spline (``Plan.radial = "spline"``,
:mod:`so3krates.runtime.evaluator`): in Eq. (20) the radial half of each filter, MLP_r(K(d_ij)), depends on
an edge only through its length d, and once the weights are frozen the same function can be read from a
table of n + 1 evenly spaced nodes on [0, end] that holds the values and the exact derivatives. Per edge
that leaves four row gathers and three multiply-adds per column instead of two matrix products.

Accuracy: the spline matches values and first derivatives at the nodes, so an energy built from it is C¹
in the positions (forces are continuous, and velocity Verlet conserves energy as with the exact function).
The interpolation error is O(h⁴) in the values and O(h³) in the derivatives (tested); second derivatives
jump at the nodes, which is why Hessians never use it. Arguments beyond ``end`` are clamped to ``end``:
there the cutoff function and its derivative are zero, so the value does not matter and the gradient is 0.

Why by hand: no library tabulates a function of one variable for autograd; the spline is a few lines.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor


class Spline(NamedTuple):
    """Power-basis coefficients on each interval: value = c0 + t (c1 + t (c2 + t c3)).

    coefficients: four (n_intervals, n_columns) tensors; t = x / spacing − g ∈ [0, 1] on interval g.
    spacing: the width of an interval; end: the last node.
    """

    coefficients: tuple[Tensor, Tensor, Tensor, Tensor]
    spacing: float
    end: float

    @property
    def n_intervals(self) -> int:
        return self.coefficients[0].shape[0]


def build_spline(
    function: Callable[[Tensor], Tensor],
    end: float,
    n_intervals: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> Spline:
    """Samples ``function`` ((n,) float64 → (n, columns)) and its derivative on [0, end].

    The derivative comes from forward-mode differentiation (one pass for all columns), in float64; the
    coefficients are then cast to ``dtype``. ``device``: where ``function`` runs and the spline lives.
    """
    nodes = torch.linspace(0.0, end, n_intervals + 1, dtype=torch.float64, device=device)
    values, slopes = torch.func.jvp(function, (nodes,), (torch.ones_like(nodes),))
    h = end / n_intervals
    y0, y1 = values[:-1], values[1:]
    m0, m1 = h * slopes[:-1], h * slopes[1:]  # derivatives with respect to t
    coefficients = (y0, m0, 3.0 * (y1 - y0) - 2.0 * m0 - m1, 2.0 * (y0 - y1) + m0 + m1)
    return Spline(tuple(c.to(dtype).contiguous() for c in coefficients), h, float(end))


def evaluate_spline(spline: Spline, x: Tensor) -> Tensor:
    """x: (n,) float → (n, n_columns) in the spline's dtype; differentiable in x."""
    c0, c1, c2, c3 = spline.coefficients
    s = x.to(c0.dtype).clamp(0.0, spline.end) * (1.0 / spline.spacing)
    interval = s.detach().floor().clamp(max=c0.shape[0] - 1)
    t = (s - interval)[:, None]
    index = interval.long()
    # Powers of t, not Horner's scheme: the derivative in t then needs only the gathered coefficient rows,
    # which compiled programs gather again in the backward pass, where Horner's nested products made
    # inductor keep three (edges × columns) intermediates for it. 999 water, `aoti`: 0.83–0.97 of the time
    # (benchmarks/results/spline_powers/), molecules unchanged.
    t2 = t * t
    return (c0.index_select(0, index) + t * c1.index_select(0, index)) + (
        t2 * c2.index_select(0, index) + (t2 * t) * c3.index_select(0, index)
    )
