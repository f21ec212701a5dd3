"""The radial filters of every layer and branch at once, from their network or from a spline.

Eq. (20) gives each branch of each layer a filter w_ij = MLP_r(K(d_ij)) + MLP_s(s_ij). The execution layer
evaluates it as the sum of two parts:

- the radial part MLP_r(K(d_ij)) + b_s, everything that depends on the edge only through its length
  (b_s is the output bias of MLP_s): from the networks, layer by layer (one product with the radial basis
  for the first layers of both branches), or read for all layers at once from a spline in d;
- the spherical part MLP_s(s_ij) − b_s, which depends on the current Euclidean variables and is
  computed in each layer.

The sum is w_ij exactly. Keeping b_s with the radial part saves one addition per edge, feature and branch.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from torch import Tensor, nn

from so3krates.model.so3krates import So3krates
from so3krates.nn.transformer import TransformerLayer
from so3krates.ops.spline import Spline, build_spline, evaluate_spline

#: Intervals of the radial spline over [0, r_c]: its error is then below float32 round-off (the bound is
#: tested in tests/test_plans.py; measured values in benchmarks/results/thresholds.md).
SPLINE_INTERVALS = 2048


class RadialWeights(NamedTuple):
    """The radial networks of one layer's branches as matrices (B branches).

    first: (K, B·F) weights and (B·F,) bias of the branches' first layers side by side.
    second: per branch, its second layer (F, F) and the bias MLP_r's + MLP_s's output biases (F,).
    """

    first: tuple[Tensor, Tensor]
    second: tuple[tuple[Tensor, Tensor], ...]


def radial_weights(layer: TransformerLayer) -> RadialWeights:
    """Assembles one layer's :class:`RadialWeights` (differentiable, so training can use them)."""
    nets = layer.filter_nets
    first = (
        torch.cat([net.radial_in.weight.T for net in nets], dim=1),
        torch.cat([net.radial_in.bias for net in nets]),
    )
    second = tuple(
        (
            net.radial_out.weight.T,
            net.radial_out.bias + (net.spherical_out.bias if net.spherical_out is not None else 0.0),
        )
        for net in nets
    )
    return RadialWeights(first, second)


def network_filters(weights: RadialWeights, rbf: Tensor) -> list[Tensor]:
    """The radial parts of one layer's filters from their networks: (n, K) basis → B tensors (n, F).

    Layer by layer, not all layers at once: the gradients of a layer's filters are then freed as soon as
    the backward pass has gone through that layer, instead of being held until its end.
    """
    # Products and bias additions apart, not addmm: a compiler fuses an addition into the next kernel,
    # while addmm first copies the bias into its output (an extra pass over an (n, B·F) tensor).
    hidden = nn.functional.silu(torch.mm(rbf, weights.first[0]) + weights.first[1])
    chunks = hidden.split(weights.second[0][0].shape[0], dim=1)
    return [torch.mm(c, w) + b for c, (w, b) in zip(chunks, weights.second, strict=True)]


def build_filter_spline(model: So3krates, n_intervals: int = SPLINE_INTERVALS) -> Spline:
    """The spline of the radial parts of all T·B filters on [0, r_c] (columns layer by layer, invariant
    branch first), sampled in float64, in the model's dtype."""
    exact = copy.deepcopy(model).to(torch.float64).requires_grad_(False)
    with torch.no_grad():
        weights = [radial_weights(layer) for layer in exact.layers]

    def filters(distances: Tensor) -> Tensor:
        rbf = exact.radial_basis(distances)
        return torch.cat([f for layer in weights for f in network_filters(layer, rbf)], dim=1)

    device = next(model.parameters()).device
    return build_spline(filters, model.cutoff, n_intervals, dtype=model.dtype, device=device)


def spline_filters(model: So3krates, spline: Spline, distances: Tensor) -> list[Tensor]:
    """The radial parts of all T·B filters read from the spline: (n,) → T·B tensors (n, F)."""
    return list(evaluate_spline(spline, distances).split(model.config.n_features, dim=1))
