"""Learned per-element embedding of the atomic number (Eq. 10)."""

from __future__ import annotations

from torch import Tensor, nn

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
