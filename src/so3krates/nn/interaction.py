"""The exchange block where invariant and Euclidean information mix (Eqs. 24–25)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from so3krates.nn.spherical import DegreeContraction


class ExchangeBlock(nn.Module):
    """[a_i, b_i] = Linear(F+D → F+D)([h_i, c(x_i)]); returns the updates (a_i, b^l_i x^l_i).

    The caller adds them: h_i ← h_i + a_i, x^l_i ← x^l_i + b^l_i x^l_i.

    Per-atom only (no edges): the invariant features learn from the size of each degree of x_i, and each
    degree of x_i is rescaled by an invariant, which keeps it equivariant.
    """

    def __init__(self, n_features: int, contraction: DegreeContraction) -> None:
        super().__init__()
        self.n_features = n_features
        self.contraction = contraction
        self.linear = nn.Linear(n_features + contraction.n_degrees, n_features + contraction.n_degrees)

    def forward(self, h: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """h: (n_atoms, n_features), x: (n_atoms, n_sph) → updates (Δh, Δx) of the same shapes."""
        mixed = self.linear(torch.cat([h, self.contraction(x)], dim=-1))  # Eq. (24)
        a, b = mixed.split([self.n_features, self.contraction.n_degrees], dim=-1)
        return a, self.contraction.expand(b) * x  # Eq. (25)


class ResidualMLP(nn.Module):
    """h ← h + Linear(SiLU(Linear(h))), the optional feature refinement of later SO3krates versions.

    ``pre_activation``: h ← h + Linear(SiLU(Linear(SiLU(h)))), the form SO3LR uses after its first
    LayerNorm (Kabylda et al. 2024).
    """

    def __init__(self, n_features: int, pre_activation: bool = False) -> None:
        super().__init__()
        layers = [nn.Linear(n_features, n_features), nn.SiLU(), nn.Linear(n_features, n_features)]
        self.mlp = nn.Sequential(*([nn.SiLU()] if pre_activation else []), *layers)

    def forward(self, h: Tensor) -> Tensor:
        """h: (n_atoms, n_features) → (n_atoms, n_features)."""
        return h + self.mlp(h)
