"""Learned per-element embedding of the atomic number (Eq. 10)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from so3krates.ops.scatter import scatter_sum

#: Rows of every per-element table: Z = 0..118 (row 0 is unused; indexing by Z keeps lookups trivial).
N_ELEMENTS = 119


class AtomEmbedding(nn.Module):
    """h_i = Embed(Z_i) ∈ R^F, a learned table over atomic numbers."""

    def __init__(self, n_features: int) -> None:
        super().__init__()
        self.table = nn.Embedding(N_ELEMENTS, n_features)

    def forward(self, atomic_numbers: Tensor) -> Tensor:
        """atomic_numbers: (n_atoms,) int64 → (n_atoms, n_features)."""
        return self.table(atomic_numbers)


class ChargeSpinEmbedding(nn.Module):
    """Embedding of a per-structure quantity ψ (total charge, or unpaired electrons) into every atom.

    Attention of the atoms to ψ, as in SpookyNet (Unke et al., Nat. Commun. 12, 7273, 2021, Eqs. 13–16):
    q_i = Q_Z (a learned row per element), k and v one of two learned vectors chosen by the sign of ψ,
    a_i = ψ softplus(q_i · k / √F) / (Σ_{j ∈ structure} softplus(q_j · k / √F) + ε), e_i = a_i v + MLP(a_i v),
    with MLP = Linear(SiLU(Linear(SiLU(·)))) without biases. ψ = 0 gives e_i = 0.
    """

    def __init__(self, n_features: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.query = nn.Embedding(N_ELEMENTS, n_features)
        self.key = nn.Parameter(torch.randn(2, n_features) / n_features**0.5)  # row 0: ψ ≥ 0, row 1: ψ < 0
        self.value = nn.Parameter(torch.randn(2, n_features) / n_features**0.5)
        self.mlp = nn.Sequential(
            nn.SiLU(),
            nn.Linear(n_features, n_features, bias=False),
            nn.SiLU(),
            nn.Linear(n_features, n_features, bias=False),
        )
        self.eps = eps

    def forward(self, atomic_numbers: Tensor, psi: Tensor, batch: Tensor, n_graphs: int) -> Tensor:
        """atomic_numbers: (n_atoms,); psi: (n_graphs,) float; batch: (n_atoms,) → (n_atoms, n_features)."""
        query = self.query(atomic_numbers)
        psi = psi.to(query.dtype)
        sign = (psi < 0).long().index_select(0, batch)
        key, value = self.key.index_select(0, sign), self.value.index_select(0, sign)
        weights = torch.nn.functional.softplus((query * key).sum(dim=-1) / query.shape[-1] ** 0.5)
        total = scatter_sum(weights, batch, n_graphs) + self.eps
        attention = psi.index_select(0, batch) * weights / total.index_select(0, batch)
        embedded = attention[:, None] * value
        return embedded + self.mlp(embedded)
