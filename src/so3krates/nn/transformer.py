"""One SO3krates layer: Euclidean transformer block followed by the exchange block (Eqs. 15–25)."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn

from so3krates.nn.attention import EuclideanAttention, InvariantAttention
from so3krates.nn.filters import FilterNet
from so3krates.nn.interaction import ExchangeBlock, ResidualMLP
from so3krates.nn.spherical import DegreeContraction


class EdgeFeatures(NamedTuple):
    """Geometry of the edges, computed once per forward pass and shared by all layers.

    rbf: (n_edges, n_rbf) — radial basis K_ij.
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


class TransformerLayer(nn.Module):
    """Updates invariant features h (n_atoms, F) and Euclidean variables x (n_atoms, n_sph).

    1. s_ij = c(x_j − x_i) (spherical invariants of the neighbourhood),
    2. filters w_ij = MLP_r(K_ij) + MLP_s(s_ij), one network per branch (Eq. 20),
    3. invariant attention Δh (Eqs. 15, 21) and Euclidean attention Δx (Eq. 22), added as residuals,
    4. exchange block (Eqs. 24–25), optionally wrapped in residual MLPs; optional LayerNorms on h, either
       before attention and exchange (``layer_norm_position="before"``) or after their residual sums
       (``"after"``, SO3LR).

    ``forward`` is ``update(h, x, filters(x, edges), edges)``: steps 1–2 and steps 3–4 are separate so that
    the execution layer can compute the filters in another arrangement and reuse the rest.
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
        layer_norm_position: str = "before",
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
        self.norm_after = layer_norm_position == "after"
        if self.norm_after:
            # SO3LR (Kabylda et al. 2024): LayerNorm after each residual sum (ε = 10⁻⁶, Flax's default), one
            # pre-activated residual MLP between attention and exchange.
            self.norm_attention = nn.LayerNorm(n_features, eps=1e-6) if use_layer_norm else nn.Identity()
            self.norm_exchange = nn.LayerNorm(n_features, eps=1e-6) if use_layer_norm else nn.Identity()
            self.mlp_before_exchange = (
                ResidualMLP(n_features, pre_activation=True) if use_residual_mlp else nn.Identity()
            )
            self.mlp_after_exchange = nn.Identity()
        else:
            self.norm_attention = nn.LayerNorm(n_features) if use_layer_norm else nn.Identity()
            self.norm_exchange = nn.LayerNorm(n_features) if use_layer_norm else nn.Identity()
            self.mlp_before_exchange = ResidualMLP(n_features) if use_residual_mlp else nn.Identity()
            self.mlp_after_exchange = ResidualMLP(n_features) if use_residual_mlp else nn.Identity()

    @property
    def filter_nets(self) -> list[FilterNet]:
        """The filter network of each branch: invariant first, then Euclidean (if there is one)."""
        return [self.invariant_filter] + (
            [self.euclidean_filter] if self.euclidean_filter is not None else []
        )

    def filters(self, x: Tensor, edges: EdgeFeatures) -> list[Tensor]:
        """w_ij of each branch (Eq. 20), one (n_edges, n_features) tensor each, invariant branch first."""
        sph_invariants = self.contraction(x.index_select(0, edges.idx_j) - x.index_select(0, edges.idx_i))
        return [net(edges.rbf, sph_invariants) for net in self.filter_nets]

    def attention_input(self, h: Tensor) -> Tensor:
        """The features that queries, keys and values are computed from."""
        return h if self.norm_after else self.norm_attention(h)

    def finish(self, h: Tensor, x: Tensor, dh: Tensor, dx: Tensor | None) -> tuple[Tensor, Tensor]:
        """Attention updates (Δh, Δx; Δx None without Euclidean branch) → residuals, norms, MLPs, exchange."""
        h = h + dh
        if dx is not None:
            x = x + dx
        if self.norm_after:
            h = self.mlp_before_exchange(self.norm_attention(h))
            da, db = self.exchange(h, x)
            return self.norm_exchange(h + da), x + db
        h = self.mlp_before_exchange(h)
        da, db = self.exchange(self.norm_exchange(h), x)
        return self.mlp_after_exchange(h + da), x + db

    def update(
        self, h: Tensor, x: Tensor, filters: list[Tensor], edges: EdgeFeatures
    ) -> tuple[Tensor, Tensor]:
        """Attention with the given filters, residuals and the exchange block → updated (h, x)."""
        idx_i, idx_j = edges.idx_i, edges.idx_j
        h_in = self.attention_input(h)
        dh = self.invariant_attention(h_in, filters[0], edges.cutoff, idx_i, idx_j)
        dx = None
        if self.euclidean_attention is not None:
            dx = self.euclidean_attention(
                h_in, filters[1], edges.cutoff, edges.sph, self.contraction.degree_index, idx_i, idx_j
            )
        return self.finish(h, x, dh, dx)

    def forward(self, h: Tensor, x: Tensor, edges: EdgeFeatures) -> tuple[Tensor, Tensor]:
        """h: (n_atoms, n_features), x: (n_atoms, n_sph) → updated (h, x)."""
        return self.update(h, x, self.filters(x, edges), edges)
