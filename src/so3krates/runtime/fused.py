"""Fused layers: the equations of ``TransformerLayer`` in fewer and larger kernels.

The modules (``attention.py``, ``filters.py``, ``transformer.py``) spell out Eqs. (15–25) one object per
equation; that is the reference. For a 9-atom molecule each of their ~75 small operations per layer costs
more in dispatch than in arithmetic, and the backward pass doubles it. Here the same parameters are
assembled into a few dense matrices, so that one layer is about 30 operations:

- every query, key and value projection of both branches is one product ``h @ W`` with a block-diagonal
  ``W`` (F × 5F); the heads are blocks;
- the spherical parts of the filters of both branches come from one small MLP (the radial parts are
  computed for all layers at once, :mod:`so3krates.runtime.radial`);
- the per-head sums of q·w·k of both branches are one product with a fixed head-indicator matrix that
  also carries the 1/norm, and their expansion back to features (invariant branch) and spherical components
  (Euclidean branch) is another;
- Δh and Δx are summed over edges in one sum (``EdgeLayout.sum_i``: a scatter-add, or through slots);
- or, with the plan's ``kernel``, the products, coefficients, messages and their sum are one hand-written
  CPU kernel (:mod:`so3krates.ops.pair_messages`), forward and backward, without per-edge tensors; with a
  radial spline the kernel also makes the filters itself, from the spline and the spherical MLP's hidden
  rows (its last layer in the kernel).

The weights are read through the modules' named interfaces only (``HeadwiseLinear.dense``,
``FilterNet.spherical_in`` …); the layer norms, the exchange block and the residual MLPs are the modules
themselves. The results equal the modules' to round-off (``tests/test_plans.py``, every model variant).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from so3krates.nn.transformer import TransformerLayer
from so3krates.ops.pair_messages import RadialSpline, SphericalFilters, pair_messages
from so3krates.runtime.layout import EdgeLayout


class LayerWeights(NamedTuple):
    """The dense matrices of one transformer layer (n_branches B = 2 with Euclidean variables, else 1)."""

    projection: Tensor  # (F, 2·B·F + F): queries of all branches | keys of all branches | values
    spherical_in: tuple[Tensor, Tensor] | None  # first spherical layer of both branches: (D, B·F/4), (B·F/4,)
    spherical_out: tuple[Tensor, ...]  # per branch: second spherical layer (F/4, F), no bias
    head_sums: Tensor  # (B·F, H + D), column-major: 1/norm where feature f belongs to head k
    head_expand: Tensor  # (H + D, F + n_sph): 1 where a head's coefficient multiplies a value component
    heads: tuple[Tensor, Tensor, Tensor] | None  # the same as ranges for the pair-message kernel, or None
    # With heads: spherical_out stacked, (B, F/4, F), as the kernel applies it (None without Euclidean branch)
    spherical_stack: Tensor | None = None


def layer_weights(layer: TransformerLayer, heads: bool = False) -> LayerWeights:
    """Assembles the matrices of one layer from its parameters (differentiable: training can use them);
    ``heads``: also the head ranges of :func:`so3krates.ops.pair_messages.pair_messages` (on the CPU)."""
    invariant, euclidean = layer.invariant_attention, layer.euclidean_attention
    attentions = [invariant] + ([euclidean] if euclidean is not None else [])
    projection = torch.cat(
        [a.query.dense() for a in attentions]
        + [a.key.dense() for a in attentions]
        + [invariant.value.dense()],
        dim=1,
    )
    nets = layer.filter_nets
    # The second layers stay per branch: block-diagonal matrices would double their arithmetic.
    spherical_in, spherical_out = None, ()
    if euclidean is not None:
        spherical_in = (
            torch.cat([net.spherical_in.weight.T for net in nets], dim=1),
            torch.cat([net.spherical_in.bias for net in nets]),
        )
        spherical_out = tuple(net.spherical_out.weight.T for net in nets)
    dtype, device = projection.dtype, projection.device
    n_features = invariant.query.n_heads * invariant.query.head_dim
    n_heads = [a.query.n_heads for a in attentions]
    n_sph = layer.contraction.n_sph
    # Column-major (a transposed view): with 7 columns and 264 rows a row-major right operand takes the
    # matrix-product library's slow path, 2.5x slower at 446 and 54,172 edges (one thread, torch 2.13).
    head_sums = torch.zeros(sum(n_heads), len(attentions) * n_features, dtype=dtype, device=device).T
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
    ranges, stack = None, None
    if heads:
        ranges = (
            _head_ranges(head_sums.argmax(dim=1)),
            _head_ranges(head_expand.argmax(dim=0)),
            head_sums.detach().amax(dim=0).contiguous(),
        )
        stack = torch.stack(spherical_out) if spherical_out else None
    return LayerWeights(projection, spherical_in, spherical_out, head_sums, head_expand, ranges, stack)


def _head_ranges(owner: Tensor) -> Tensor:
    """(R, 3) int32 [start, stop, head]: the runs of equal entries of ``owner`` (the head of each column)."""
    heads = owner.cpu().tolist()
    starts = [0] + [f for f in range(1, len(heads)) if heads[f] != heads[f - 1]]
    stops = [*starts[1:], len(heads)]
    return torch.tensor([[a, b, heads[a]] for a, b in zip(starts, stops, strict=True)], dtype=torch.int32)


def projections(layer: TransformerLayer, weights: LayerWeights, h: Tensor) -> tuple[Tensor, Tensor]:
    """Queries of all branches and keys of all branches | values, per atom: (n, B·F) and (n, B·F + F)."""
    n_features = h.shape[1]
    width = weights.projection.shape[1] - n_features
    width //= 2
    projected = layer.attention_input(h) @ weights.projection  # [q | k | v], (n_atoms, 2·B·F + F)
    # Split, not slice: the backward of a split is one cat, that of a slice a zero-filled copy.
    queries, keys_values = projected.split([width, width + n_features], dim=1)
    if layer.invariant_attention.use_qk_activation:
        keys, values = keys_values.split([width, n_features], dim=1)
        queries = torch.nn.functional.silu(queries)
        keys_values = torch.cat([torch.nn.functional.silu(keys), values], dim=1)
    return queries, keys_values


def edge_messages(
    layer: TransformerLayer,
    weights: LayerWeights,
    radial: list[Tensor],
    differences: Tensor | None,
    queries: Tensor,
    keys_values: Tensor,
    cutoff: Tensor,
    sph: Tensor,
    both: Callable[[Tensor], Tensor] | None,
) -> Tensor:
    """The message of every edge, [α_ij v_j | β_ij Y_ij] (n_edges, F + n_sph), from per-edge inputs.

    Args:
        radial: per branch, the radial part of its filters (n_first, F).
        differences: x_j − x_i on the rows of ``radial`` (n_first, n_sph); None without Euclidean branch.
        queries: (n_edges, B·F) of the centre atoms; keys_values: (n_edges, B·F + F) of the neighbours.
        cutoff: (n_edges,) φ(d_ij); sph: (n_edges, n_sph) Y(r̂_ij).
        both: first rows → all rows (``EdgeLayout.both``: the reverses of pairs repeat their filters), or
            None for edges in pair order whose filters are to be broadcast over the two halves instead.
    """
    width = len(radial) * radial[0].shape[1]
    n_features = radial[0].shape[1]
    filters = edge_filters(layer, weights, radial, differences)
    keys, values = keys_values.split([width, n_features], dim=1)
    if both is None:  # pairs: the filters of the first half broadcast over both, not copied
        products = (queries.view(2, -1, width) * filters * keys.view(2, -1, width)).view(-1, width)
    else:
        products = queries * both(filters) * keys
    # α_ij (invariant heads) and β_ij (one head per degree), Eqs. (21–22), in one product.
    coefficients = (products @ weights.head_sums) * cutoff[:, None]
    if weights.spherical_in is not None:
        values = torch.cat([values, sph], dim=1)
    return (coefficients @ weights.head_expand) * values  # [α v_j | β Y_ij] per edge


def spherical_hidden(
    layer: TransformerLayer, weights: LayerWeights, differences: Tensor | None
) -> Tensor | None:
    """The spherical filter MLP's hidden rows of both branches, silu(s_ij W + b): (n_first, B·K), or None
    without a Euclidean branch."""
    if weights.spherical_in is None:
        return None
    invariants = layer.contraction(differences)
    return torch.nn.functional.silu(torch.addmm(weights.spherical_in[1], invariants, weights.spherical_in[0]))


def kernel_filters(
    layer: TransformerLayer, weights: LayerWeights, differences: Tensor | None
) -> SphericalFilters | None:
    """The spherical parts of the filters as the pair-message kernel takes them (hidden rows and the last
    layer's weights, which it applies pair by pair), or None without a Euclidean branch."""
    hidden = spherical_hidden(layer, weights, differences)
    return None if hidden is None else SphericalFilters(hidden, weights.spherical_stack)


def edge_filters(
    layer: TransformerLayer, weights: LayerWeights, radial: list[Tensor], differences: Tensor | None
) -> Tensor:
    """The filters of both branches on the rows of ``radial``: (n_first, B·F)."""
    if weights.spherical_in is None:
        filters = radial
    else:
        # w_ij = radial part + MLP_s(s_ij) − b_s per branch (Eq. 20), the spherical part in one small MLP.
        hidden = spherical_hidden(layer, weights, differences)
        hidden = hidden.split(hidden.shape[1] // len(weights.spherical_out), dim=1)
        filters = [
            torch.addmm(f, s, w) for f, s, w in zip(radial, hidden, weights.spherical_out, strict=True)
        ]
    return torch.cat(filters, dim=1) if len(filters) > 1 else filters[0]


def finish_updates(layer: TransformerLayer, h: Tensor, x: Tensor, updates: Tensor) -> tuple[Tensor, Tensor]:
    """Summed messages (n_atoms, F [+ n_sph]) → Δh (and Δx) → ``layer.finish``."""
    if updates.shape[1] > h.shape[1]:
        dh, dx = updates.split([h.shape[1], x.shape[1]], dim=1)
        return layer.finish(h, x, dh, dx)
    return layer.finish(h, x, updates, None)


def fused_layer(
    layer: TransformerLayer,
    weights: LayerWeights,
    radial: list[Tensor] | RadialSpline,
    h: Tensor,
    x: Tensor,
    cutoff: Tensor,
    sph: Tensor,
    edges: EdgeLayout,
    kernel: bool = False,
) -> tuple[Tensor, Tensor]:
    """One transformer layer (the computation of ``TransformerLayer.forward``) with fused weights.

    Args:
        layer: the TransformerLayer (for its layer norms, exchange block and MLPs).
        weights: its fused matrices.
        radial: per branch, the radial part of its filters (n_first, F) (:mod:`so3krates.runtime.radial`);
            with ``kernel``, also the layer's radial spline for the kernel to read.
        h, x: (n_atoms, F), (n_atoms, n_sph) — features and Euclidean variables.
        cutoff: (n_edges,) φ(d_ij); sph: (n_edges, n_sph) Y(r̂_ij).
        edges: the layout; with pairs, ``radial`` holds the first of each pair only.
        kernel: the messages and their sum in the pair-message kernel (:mod:`so3krates.ops.pair_messages`;
            edges in pair order, weights assembled with ``heads``).
    """
    differences = edges.difference(x) if weights.spherical_in is not None else None
    queries, keys_values = projections(layer, weights, h)
    if kernel:
        if weights.spherical_in is None:  # no Euclidean branch: messages without Y
            sph = cutoff.new_zeros((cutoff.shape[0], 0))
        if isinstance(radial, RadialSpline):  # the kernel makes the filters from the spline and hidden rows
            filters, spline, spherical = None, radial, kernel_filters(layer, weights, differences)
        else:
            filters, spline, spherical = edge_filters(layer, weights, radial, differences), None, None
        updates = pair_messages(
            queries,
            keys_values,
            filters,
            cutoff,
            sph,
            edges.idx_i,
            edges.idx_j,
            weights.heads,
            spline,
            spherical,
        )
        return finish_updates(layer, h, x, updates)
    messages = edge_messages(
        layer,
        weights,
        radial,
        differences,
        edges.gather_i(queries),
        edges.gather_j(keys_values),
        cutoff,
        sph,
        edges.both,
    )
    return finish_updates(layer, h, x, edges.sum_i(messages, h.shape[0]))
