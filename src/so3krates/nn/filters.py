"""Filter networks that turn edge geometry into per-feature attention weights (Eq. 20)."""

from __future__ import annotations

from torch import Tensor, nn


class FilterNet(nn.Module):
    """w_ij = MLP_r(K_ij) + MLP_s(s_ij) ∈ R^F (Eq. 20).

    MLP_r = Linear(K, F) → SiLU → Linear(F, F) acts on the radial basis; MLP_s = Linear(D, F/4) → SiLU →
    Linear(F/4, F) acts on the spherical invariants s_ij = c(x_j − x_i) of the neighbourhood.

    The four linear maps are also reachable by name (``radial_in``, ``radial_out``, ``spherical_in``,
    ``spherical_out``): the execution layer (:mod:`so3krates.runtime`) evaluates the same function in other
    arrangements and reads the weights through these names only.
    """

    def __init__(self, n_rbf: int, n_degrees: int, n_features: int) -> None:
        super().__init__()
        self.radial = nn.Sequential(
            nn.Linear(n_rbf, n_features), nn.SiLU(), nn.Linear(n_features, n_features)
        )
        # Without Euclidean variables (n_degrees = 0) there are no spherical invariants and no MLP_s.
        self.spherical = None
        if n_degrees:
            self.spherical = nn.Sequential(
                nn.Linear(n_degrees, n_features // 4), nn.SiLU(), nn.Linear(n_features // 4, n_features)
            )

    @property
    def radial_in(self) -> nn.Linear:
        return self.radial[0]

    @property
    def radial_out(self) -> nn.Linear:
        return self.radial[2]

    @property
    def spherical_in(self) -> nn.Linear | None:
        return None if self.spherical is None else self.spherical[0]

    @property
    def spherical_out(self) -> nn.Linear | None:
        return None if self.spherical is None else self.spherical[2]

    def forward(self, rbf: Tensor, sph_invariants: Tensor) -> Tensor:
        """rbf: (n_edges, n_rbf), sph_invariants: (n_edges, n_degrees) → (n_edges, n_features)."""
        if self.spherical is None:
            return self.radial(rbf)
        return self.radial(rbf) + self.spherical(sph_invariants)
