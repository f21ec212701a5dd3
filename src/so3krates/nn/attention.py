"""Invariant and Euclidean self-attention over the edges of the neighbour graph (Eqs. 15, 21–22).

Neither uses a softmax: the attention coefficients are multiplied by the cutoff function instead, which
keeps the energy smooth as atoms enter or leave the neighbourhood and makes it size-extensive.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from so3krates.ops.scatter import scatter_sum


class HeadwiseLinear(nn.Module):
    """One bias-free d×d matrix per head, applied to that head's slice of the features.

    Equivalent to a block-diagonal Linear(F, F) with n_heads blocks; initialised like ``nn.Linear``.
    """

    def __init__(self, n_heads: int, head_dim: int) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        bound = 1.0 / math.sqrt(head_dim)
        self.weight = nn.Parameter(torch.empty(n_heads, head_dim, head_dim).uniform_(-bound, bound))

    def dense(self) -> Tensor:
        """The same map as one (F, F) block-diagonal matrix, ``features @ dense()`` (differentiable)."""
        return torch.block_diag(*self.weight.unbind(0))

    def forward(self, features: Tensor) -> Tensor:
        """features: (n, n_heads · head_dim) → (n, n_heads, head_dim)."""
        split = features.view(-1, self.n_heads, self.head_dim)
        return torch.einsum("nhd,hde->nhe", split, self.weight)


def _attention_coefficients(
    query: Tensor, key: Tensor, filters: Tensor, cutoff: Tensor, idx_i: Tensor, idx_j: Tensor, norm: float
) -> Tensor:
    """φ(d_ij) · Σ_f q_i,f w_ij,f k_j,f / norm per head; query, key: (n_atoms, H, d) → (n_edges, H)."""
    filters = filters.view(-1, query.shape[1], query.shape[2])
    scores = (query.index_select(0, idx_i) * filters * key.index_select(0, idx_j)).sum(-1)
    return scores * (cutoff[:, None] / norm)


class InvariantAttention(nn.Module):
    """Δh_i = ⊕_h Σ_j α^h_ij v^h_j with α^h_ij = φ(d_ij) Σ_f q_i,f w_ij,f k_j,f / √d (Eqs. 15, 21)."""

    def __init__(self, n_features: int, n_heads: int, norm: float, use_qk_activation: bool = False) -> None:
        super().__init__()
        head_dim = n_features // n_heads
        self.query = HeadwiseLinear(n_heads, head_dim)
        self.key = HeadwiseLinear(n_heads, head_dim)
        self.value = HeadwiseLinear(n_heads, head_dim)
        self.use_qk_activation = use_qk_activation
        self.qk_activation = nn.SiLU() if use_qk_activation else nn.Identity()
        self.norm = float(norm)

    def forward(self, h: Tensor, filters: Tensor, cutoff: Tensor, idx_i: Tensor, idx_j: Tensor) -> Tensor:
        """Args:
            h: (n_atoms, n_features) — invariant features.
            filters: (n_edges, n_features) — w_ij of this branch.
            cutoff: (n_edges,) — φ(d_ij).
            idx_i, idx_j: (n_edges,) int64 — centre and neighbour atoms.

        Returns:
            (n_atoms, n_features) — the update Δh.
        """
        query = self.qk_activation(self.query(h))
        key = self.qk_activation(self.key(h))
        alpha = _attention_coefficients(query, key, filters, cutoff, idx_i, idx_j, self.norm)  # (n_edges, H)
        messages = alpha[:, :, None] * self.value(h).index_select(0, idx_j)  # (n_edges, H, d)
        return scatter_sum(messages, idx_i, h.shape[0]).reshape(h.shape)


class EuclideanAttention(nn.Module):
    """Δx^l_i = Σ_j β^l_ij Y_l(r̂_ij), one head of width F/D per degree (Eq. 22).

    β^l_ij = φ(d_ij) Σ_f q'_i,f w'_ij,f k'_j,f / √(F/D). The values are the bare spherical harmonics of the
    edge direction, so no tensor product (Clebsch–Gordan coupling) is needed.
    """

    def __init__(self, n_features: int, n_degrees: int, norm: float, use_qk_activation: bool = False) -> None:
        super().__init__()
        head_dim = n_features // n_degrees
        self.query = HeadwiseLinear(n_degrees, head_dim)
        self.key = HeadwiseLinear(n_degrees, head_dim)
        self.use_qk_activation = use_qk_activation
        self.qk_activation = nn.SiLU() if use_qk_activation else nn.Identity()
        self.norm = float(norm)

    def forward(
        self,
        h: Tensor,
        filters: Tensor,
        cutoff: Tensor,
        sph: Tensor,
        degree_index: Tensor,
        idx_i: Tensor,
        idx_j: Tensor,
    ) -> Tensor:
        """Args:
            h: (n_atoms, n_features) — invariant features.
            filters: (n_edges, n_features) — w'_ij of this branch.
            cutoff: (n_edges,) — φ(d_ij).
            sph: (n_edges, n_sph) — Y(r̂_ij).
            degree_index: (n_sph,) int64 — which degree (head) each component belongs to.
            idx_i, idx_j: (n_edges,) int64 — centre and neighbour atoms.

        Returns:
            (n_atoms, n_sph) — the update Δx.
        """
        query = self.qk_activation(self.query(h))
        key = self.qk_activation(self.key(h))
        beta = _attention_coefficients(query, key, filters, cutoff, idx_i, idx_j, self.norm)  # (n_edges, D)
        messages = beta.index_select(1, degree_index) * sph  # (n_edges, n_sph)
        return scatter_sum(messages, idx_i, h.shape[0])
