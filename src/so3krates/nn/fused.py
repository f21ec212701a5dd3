"""The fast path of the transformer layers: the same equations as the modules, in fewer and larger kernels.

The modules (``attention.py``, ``filters.py``, ``transformer.py``) spell out Eqs. (15–25) one object per
equation; that is the reference. For a 9-atom molecule each of their ~75 small operations per layer costs
more in dispatch than in arithmetic, and the backward pass doubles it. Here the same parameters are
assembled into a few dense matrices, so that one layer is about 30 operations:

- every query, key and value projection of both branches is one product ``h @ W`` with a block-diagonal
  ``W`` (F × 5F); the heads are blocks;
- the radial filters of all layers come from one product with the radial basis (computed once per call),
  the spherical filters of both branches from one small MLP;
- the per-head sums of q·w·k of both branches are one product with a fixed head-indicator matrix that
  also carries the 1/norm, and their expansion back to features (invariant branch) and spherical components
  (Euclidean branch) is another;
- Δh and Δx are summed over edges by one ``index_add`` (or, with edge slots, one gather-and-sum:
  :mod:`so3krates.nn.slots`).

Results equal the modules' to float round-off (a test compares them on every model variant). Assembling
the matrices costs a few operations per call; when no parameter needs a gradient (inference, MD) they are
built once and kept until a parameter changes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from so3krates.nn.filters import FilterNet
from so3krates.nn.slots import gather_rows, sum_rows
from so3krates.nn.transformer import first_of_pairs


class LayerWeights(NamedTuple):
    """The dense matrices of one transformer layer (n_branches = 2 with Euclidean variables, else 1)."""

    projection: Tensor  # (F, 2·B·F + F): queries of all branches | keys of all branches | values
    radial_out: tuple[tuple[Tensor, Tensor], ...]  # per branch: second radial layer (F, F), bias (F,)
    spherical_in: tuple[Tensor, Tensor] | None  # first spherical layer of both branches: (D, B·F/4), (B·F/4,)
    spherical_out: tuple[Tensor, ...]  # per branch: second spherical layer (F/4, F)
    head_sums: Tensor  # (B·F, H + D): 1/norm where feature f belongs to head k
    head_expand: Tensor  # (H + D, F + n_sph): 1 where a head's coefficient multiplies a value component


class FusedWeights(NamedTuple):
    radial_in: tuple[Tensor, Tensor]  # first radial layer of every layer and branch: (K, T·B·F), (T·B·F,)
    layers: tuple[LayerWeights, ...]


def _block_diagonal(weight: Tensor) -> Tensor:
    """(H, d, e) per-head matrices → (H·d, H·e) block-diagonal matrix (a HeadwiseLinear as a dense one)."""
    return torch.block_diag(*weight.unbind(0))


def _filter_nets(layer: nn.Module) -> list[FilterNet]:
    return [layer.invariant_filter] + ([layer.euclidean_filter] if layer.euclidean_filter is not None else [])


def _layer_weights(layer: nn.Module) -> LayerWeights:
    invariant, euclidean = layer.invariant_attention, layer.euclidean_attention
    attentions = [invariant] + ([euclidean] if euclidean is not None else [])
    projection = torch.cat(
        [_block_diagonal(a.query.weight) for a in attentions]
        + [_block_diagonal(a.key.weight) for a in attentions]
        + [_block_diagonal(invariant.value.weight)],
        dim=1,
    )
    filters = _filter_nets(layer)
    # The second layers stay per branch: block-diagonal matrices would double their arithmetic, which for
    # F = 132 is most of the model's.
    spherical_in, spherical_out = None, ()
    if euclidean is not None:
        spherical_in = (
            torch.cat([f.spherical[0].weight.T for f in filters], dim=1),
            torch.cat([f.spherical[0].bias for f in filters]),
        )
        spherical_out = tuple(f.spherical[2].weight.T for f in filters)
    radial_out = tuple(
        (f.radial[2].weight.T, f.radial[2].bias + (f.spherical[2].bias if f.spherical is not None else 0.0))
        for f in filters
    )
    dtype, device = projection.dtype, projection.device
    n_features = invariant.query.n_heads * invariant.query.head_dim
    n_heads = [a.query.n_heads for a in attentions]
    n_sph = layer.contraction.n_sph
    head_sums = torch.zeros(len(attentions) * n_features, sum(n_heads), dtype=dtype, device=device)
    head_expand = torch.zeros(sum(n_heads), n_features + n_sph, dtype=dtype, device=device)
    column = 0
    for branch, attention in enumerate(attentions):
        head_dim = attention.query.head_dim
        for head in range(attention.query.n_heads):
            rows = slice(branch * n_features + head * head_dim, branch * n_features + (head + 1) * head_dim)
            head_sums[rows, column + head] = 1.0 / attention.norm
        column += attention.query.n_heads
    invariant_dim = invariant.query.head_dim
    for head in range(n_heads[0]):
        head_expand[head, head * invariant_dim : (head + 1) * invariant_dim] = 1.0
    if euclidean is not None:
        degree_index = layer.contraction.degree_index
        head_expand[n_heads[0] + degree_index, n_features + torch.arange(n_sph, device=device)] = 1.0
    return LayerWeights(projection, radial_out, spherical_in, spherical_out, head_sums, head_expand)


def fused_weights(layers: nn.ModuleList) -> FusedWeights:
    """Assembles the dense matrices from the layers' parameters (differentiable: training can use them)."""
    filters = [f for layer in layers for f in _filter_nets(layer)]
    radial_in = (
        torch.cat([f.radial[0].weight.T for f in filters], dim=1),
        torch.cat([f.radial[0].bias for f in filters]),
    )
    return FusedWeights(radial_in, tuple(_layer_weights(layer) for layer in layers))


class FusedWeightCache:
    """Keeps :func:`fused_weights` while the parameters stay the same and need no gradient.

    The key is every parameter's storage and version counter (bumped by in-place updates: optimiser steps,
    ``load_state_dict``), so changed weights are never served from the cache; a dtype or device change
    gives new storage. Checking it costs microseconds, not the ~0.25 ms of iterating ``parameters()``.
    """

    def __init__(self) -> None:
        self._parameters: list[Tensor] = []
        self._key: list[int] = []
        self._weights: FusedWeights | None = None
        #: Other things derived from the frozen weights (the radial-filter table); emptied when they change.
        self.extras: dict[str, object] = {}

    def is_frozen(self, layers: nn.ModuleList) -> bool:
        """True when no parameter will get a gradient from this call."""
        if not self._parameters:
            self._parameters = list(layers.parameters())
        return not (torch.is_grad_enabled() and any([p.requires_grad for p in self._parameters]))

    def get(self, layers: nn.ModuleList) -> FusedWeights:
        if not self.is_frozen(layers):
            return fused_weights(layers)  # part of the autograd graph: built anew each call
        parameters = self._parameters
        key = [p._version for p in parameters] + [p.data_ptr() for p in parameters]
        if key != self._key or self._weights is None:
            with torch.no_grad():
                self._weights = fused_weights(layers)
            self._key = key
            self.extras = {}
        return self._weights


def fused_layer(
    layer: nn.Module,
    weights: LayerWeights,
    radial: Tensor | list[Tensor],
    h: Tensor,
    x: Tensor,
    cutoff: Tensor,
    sph: Tensor,
    idx_i: Tensor,
    idx_j: Tensor,
    radial_filters: bool = False,
    paired: bool = False,
    slots: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """One transformer layer (the computation of ``TransformerLayer.forward``) with fused weights.

    Args:
        layer: the TransformerLayer (for its layer norms, exchange block and MLPs).
        weights: its fused matrices.
        radial: (n_edges, B·F) — SiLU of the first radial filter layer of this layer's branches, or with
            ``radial_filters`` the whole MLP_r of each branch (second-layer biases included), one (n_edges,
            F) tensor per branch.
        h, x: (n_atoms, F), (n_atoms, n_sph) — features and Euclidean variables.
        cutoff: (n_edges,) φ(d_ij); sph: (n_edges, n_sph) Y(r̂_ij); idx_i, idx_j: (n_edges,) int64.
        paired: edges in the order of :func:`so3krates.data.neighbors.paired_edges`, ``radial`` (then
            with ``radial_filters``) for the first half only: the filters are symmetric (w_ij = w_ji), so
            they are completed for the first half and repeated (see ``TransformerLayer.forward``).
        slots: ``edge_slots`` of idx_i and of idx_j: sums over edges, and the gradients of the gathers,
            without scatter-adds (:mod:`so3krates.nn.slots`; differentiable once).
    """
    slots_i, slots_j = slots if slots is not None else (None, None)
    n_features = h.shape[1]
    n_branches = len(weights.radial_out)
    width = n_branches * n_features
    # w_ij = MLP_r(K_ij) + MLP_s(s_ij) per branch (Eq. 20); both second layers accumulate in one addmm chain.
    if radial_filters:
        filters = list(radial)
    else:
        hidden = radial.split(n_features, dim=1)
        filters = [torch.addmm(b, r, w) for r, (w, b) in zip(hidden, weights.radial_out, strict=True)]
    if weights.spherical_in is not None:
        if slots is not None:
            # Gathered on all edges, so that the gradient goes through the tables of the full list.
            difference = gather_rows(x, idx_j, slots_j) - gather_rows(x, idx_i, slots_i)
            invariants = layer.contraction(first_of_pairs(difference) if paired else difference)
        else:
            first_i, first_j = idx_i, idx_j
            if paired:
                first_i, first_j = first_of_pairs(idx_i), first_of_pairs(idx_j)
            invariants = layer.contraction(x.index_select(0, first_j) - x.index_select(0, first_i))
        hidden = torch.nn.functional.silu(
            torch.addmm(weights.spherical_in[1], invariants, weights.spherical_in[0])
        )
        hidden = hidden.split(hidden.shape[1] // n_branches, dim=1)
        filters = [
            torch.addmm(f, s, w) for f, s, w in zip(filters, hidden, weights.spherical_out, strict=True)
        ]
    filters = torch.cat(filters, dim=1) if n_branches > 1 else filters[0]
    if paired:
        filters = torch.cat([filters, filters])

    projected = layer.norm_attention(h) @ weights.projection  # [q | k | v], (n_atoms, 2·B·F + F)
    # Split, not slice: the backward of a split is one cat, that of a slice a zero-filled copy.
    queries, keys_values = projected.split([width, width + n_features], dim=1)
    if isinstance(layer.invariant_attention.qk_activation, nn.SiLU):
        keys, values = keys_values.split([width, n_features], dim=1)
        queries = torch.nn.functional.silu(queries)
        keys_values = torch.cat([torch.nn.functional.silu(keys), values], dim=1)
    queries = gather_rows(queries, idx_i, slots_i)
    keys, values = gather_rows(keys_values, idx_j, slots_j).split([width, n_features], dim=1)
    # α_ij (invariant heads) and β_ij (one head per degree), Eqs. (21–22), in one product.
    coefficients = ((queries * filters * keys) @ weights.head_sums) * cutoff[:, None]
    if weights.spherical_in is not None:
        values = torch.cat([values, sph], dim=1)
    messages = (coefficients @ weights.head_expand) * values  # [α v_j | β Y_ij] per edge
    updates = sum_rows(messages, idx_i, h.shape[0], slots_i)
    if weights.spherical_in is not None:
        dh, dx = updates.split([n_features, x.shape[1]], dim=1)
        h, x = h + dh, x + dx
    else:
        h = h + updates

    h = layer.mlp_before_exchange(h)
    dh, dx = layer.exchange(layer.norm_exchange(h), x)
    h, x = h + dh, x + dx
    return layer.mlp_after_exchange(h), x
