"""One SO3krates layer: Euclidean transformer block followed by the exchange block (Eqs. 15–25)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from so3krates.nn.attention import EuclideanAttention, InvariantAttention
from so3krates.nn.filters import FilterNet
from so3krates.nn.interaction import ExchangeBlock, ResidualMLP
from so3krates.nn.spherical import DegreeContraction


class EdgeFeatures(NamedTuple):
    """Geometry of the edges, computed once per forward pass and shared by all layers.

    rbf: (n_edges, n_rbf) — radial basis K_ij; None when the radial filters are read from a table.
    cutoff: (n_edges,) — φ(d_ij).
    sph: (n_edges, n_sph) — Y(r̂_ij).
    idx_i, idx_j: (n_edges,) int64 — centre and neighbour atoms.
    distances: (n_edges,) — d_ij, in the network's dtype.
    """

    rbf: Tensor | None
    cutoff: Tensor
    sph: Tensor
    idx_i: Tensor
    idx_j: Tensor
    distances: Tensor


def first_of_pairs(per_edge: Tensor) -> Tensor:
    """The first half of a per-edge tensor in paired order (:func:`so3krates.data.neighbors.paired_edges`).

    A view, not a slice: a slice would give an exported program a guard n_pairs ≥ 2.
    """
    return per_edge.view(2, per_edge.shape[0] // 2, *per_edge.shape[1:])[0]


class TransformerLayer(nn.Module):
    """Updates invariant features h (n_atoms, F) and Euclidean variables x (n_atoms, n_sph).

    1. s_ij = c(x_j − x_i) (spherical invariants of the neighbourhood),
    2. filters w_ij = MLP_r(K_ij) + MLP_s(s_ij), one network per branch (Eq. 20),
    3. invariant attention Δh (Eqs. 15, 21) and Euclidean attention Δx (Eq. 22), added as residuals,
    4. exchange block (Eqs. 24–25), optionally wrapped in residual MLPs; optional pre-LayerNorms on h.
    """

    def __init__(
        self,
        n_features: int,
        n_heads: int,
        n_rbf: int,
        contraction: DegreeContraction,
        invariant_norm: float,
        euclidean_norm: float,
        use_qk_activation: bool = False,
        use_layer_norm: bool = False,
        use_residual_mlp: bool = False,
    ) -> None:
        super().__init__()
        n_degrees = contraction.n_degrees
        self.contraction = contraction
        self.invariant_filter = FilterNet(n_rbf, n_degrees, n_features)
        self.invariant_attention = InvariantAttention(n_features, n_heads, invariant_norm, use_qk_activation)
        # The invariant-only model (no degrees) has no Euclidean branch: the ablation of Frank et al.
        self.euclidean_filter = FilterNet(n_rbf, n_degrees, n_features) if n_degrees else None
        self.euclidean_attention = (
            EuclideanAttention(n_features, n_degrees, euclidean_norm, use_qk_activation)
            if n_degrees
            else None
        )
        self.exchange = ExchangeBlock(n_features, contraction)
        self.norm_attention = nn.LayerNorm(n_features) if use_layer_norm else nn.Identity()
        self.norm_exchange = nn.LayerNorm(n_features) if use_layer_norm else nn.Identity()
        self.mlp_before_exchange = ResidualMLP(n_features) if use_residual_mlp else nn.Identity()
        self.mlp_after_exchange = ResidualMLP(n_features) if use_residual_mlp else nn.Identity()

    def forward(
        self,
        h: Tensor,
        x: Tensor,
        edges: EdgeFeatures,
        radial: list[Tensor] | None = None,
        paired: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """h: (n_atoms, n_features), x: (n_atoms, n_sph) → updated (h, x).

        radial: this layer's MLP_r, one (n_edges, F) tensor per branch, read from the radial-filter table
            (so3krates.nn.radial_table), MLP_s's output bias included; or None to evaluate MLP_r here.
        paired: the edges are in the order of :func:`so3krates.data.neighbors.paired_edges` and ``radial``
            holds the first half only. The filters are symmetric, w_ij = w_ji (d_ij = d_ji and
            s_ij = c(x_j − x_i) = s_ji), so they are evaluated for the first half and repeated.
        """
        idx_i, idx_j = edges.idx_i, edges.idx_j
        first_i, first_j = idx_i, idx_j
        if paired:
            if radial is None:
                raise ValueError("paired edges need this layer's radial filters for the first half (radial)")
            first_i, first_j = first_of_pairs(idx_i), first_of_pairs(idx_j)
        sph_invariants = self.contraction(x.index_select(0, first_j) - x.index_select(0, first_i))
        if radial is not None:
            invariant_filters = self.invariant_filter.from_radial(radial[0], sph_invariants)
        else:
            invariant_filters = self.invariant_filter(edges.rbf, sph_invariants)
        if paired:
            invariant_filters = torch.cat([invariant_filters, invariant_filters])

        h_normed = self.norm_attention(h)
        dh = self.invariant_attention(h_normed, invariant_filters, edges.cutoff, idx_i, idx_j)
        if self.euclidean_attention is not None:
            if radial is not None:
                euclidean_filters = self.euclidean_filter.from_radial(radial[1], sph_invariants)
            else:
                euclidean_filters = self.euclidean_filter(edges.rbf, sph_invariants)
            if paired:
                euclidean_filters = torch.cat([euclidean_filters, euclidean_filters])
            x = x + self.euclidean_attention(
                h_normed,
                euclidean_filters,
                edges.cutoff,
                edges.sph,
                self.contraction.degree_index,
                idx_i,
                idx_j,
            )
        h = h + dh

        h = self.mlp_before_exchange(h)
        dh, dx = self.exchange(self.norm_exchange(h), x)
        h, x = h + dh, x + dx
        return self.mlp_after_exchange(h), x
