"""Radial basis functions K(d) ∈ R^{n_rbf}, the distance input of the filter networks (Eq. 20).

Constants are built in float64 and cast to the input's dtype, so a float64 model is exact to float64
round-off even when it was constructed under a float32 default dtype.

They are not multiplied by the cutoff here: the cutoff multiplies every attention coefficient instead.
All are finite with finite gradients at d = 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

#: Decay constant of the Bernstein basis used by SO3LR, in Å⁻¹ (0.5 Bohr⁻¹; Kabylda et al. 2024).
BERNSTEIN_GAMMA = 0.9448630629184640


class PhysNetBasis(nn.Module):
    """exp(−β (exp(−d) − μ_k)²), μ_k evenly spaced in [exp(−r_c), 1], β = ((2/K)(1 − exp(−r_c)))⁻².

    Unke & Meuwly, PhysNet (JCTC 2019); the default of SO3krates (SPEC §2).
    """

    def __init__(self, n_rbf: int, cutoff: float) -> None:
        super().__init__()
        start = math.exp(-cutoff)
        self.register_buffer(
            "centers", torch.linspace(start, 1.0, n_rbf, dtype=torch.float64), persistent=False
        )
        self.beta = ((2.0 / n_rbf) * (1.0 - start)) ** -2

    def forward(self, distances: Tensor) -> Tensor:
        """distances: (n_edges,) float, Å → (n_edges, n_rbf) float."""
        x = torch.exp(-distances)[:, None]
        return torch.exp(-self.beta * (x - self.centers.to(x.dtype)) ** 2)


class BernsteinBasis(nn.Module):
    """Bernstein polynomials b_k(x) = C(K−1, k) x^k (1 − x)^(K−1−k) of x = exp(−γ d) (SO3LR).

    Evaluated in log space for the binomial coefficients, which overflow float32 for K ≳ 40.
    """

    def __init__(self, n_rbf: int, cutoff: float, gamma: float = BERNSTEIN_GAMMA) -> None:
        super().__init__()
        del cutoff  # the basis decays exponentially; the cutoff function bounds it
        k = torch.arange(n_rbf, dtype=torch.float64)
        n = n_rbf - 1
        log_binomial = math.lgamma(n + 1.0) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)
        self.register_buffer("log_binomial", log_binomial, persistent=False)
        self.register_buffer("k", k, persistent=False)
        self.gamma = float(gamma)
        self.n = n

    def forward(self, distances: Tensor) -> Tensor:
        """distances: (n_edges,) float, Å → (n_edges, n_rbf) float."""
        x = torch.exp(-self.gamma * distances)[:, None]
        one_minus_x = -torch.expm1(-self.gamma * distances)[:, None]  # accurate near d = 0
        # (1 − x)^(n−k) is 0^0 at d = 0, whose second derivative is NaN in autograd: evaluate the power only
        # on positive bases and put the exact limit (1 for k = n, else 0) at d = 0.
        positive = one_minus_x > 0
        safe = torch.where(positive, one_minus_x, torch.ones_like(one_minus_x))
        k, log_binomial = self.k.to(x.dtype), self.log_binomial.to(x.dtype)
        limit = (k == self.n).to(x.dtype)
        tail = torch.where(positive, safe ** (self.n - k), limit)
        return torch.exp(log_binomial) * x**k * tail


class GaussianBasis(nn.Module):
    """exp(−(d − μ_k)² / (2 σ²)), μ_k evenly spaced in [0, r_c], σ = spacing of the centres (SchNet)."""

    def __init__(self, n_rbf: int, cutoff: float) -> None:
        super().__init__()
        self.register_buffer(
            "centers", torch.linspace(0.0, cutoff, n_rbf, dtype=torch.float64), persistent=False
        )
        self.width = cutoff / max(n_rbf - 1, 1)

    def forward(self, distances: Tensor) -> Tensor:
        """distances: (n_edges,) float, Å → (n_edges, n_rbf) float."""
        centers = self.centers.to(distances.dtype)
        return torch.exp(-0.5 * ((distances[:, None] - centers) / self.width) ** 2)


class BesselBasis(nn.Module):
    """√(2/r_c) sin(k π d / r_c) / d, k = 1..K (DimeNet, Gasteiger et al. 2020).

    At d = 0 the exact limit √(2/r_c) k π / r_c is used (``torch.sinc`` would give NaN second derivatives).
    """

    def __init__(self, n_rbf: int, cutoff: float) -> None:
        super().__init__()
        k = torch.arange(1, n_rbf + 1, dtype=torch.float64)
        self.register_buffer("frequencies", k * math.pi / cutoff, persistent=False)
        self.prefactor = math.sqrt(2.0 / cutoff)

    def forward(self, distances: Tensor) -> Tensor:
        """distances: (n_edges,) float, Å → (n_edges, n_rbf) float."""
        d = distances[:, None]
        positive = d > 0
        safe = torch.where(positive, d, torch.ones_like(d))
        frequencies = self.frequencies.to(d.dtype)
        value = torch.where(positive, torch.sin(frequencies * safe) / safe, frequencies)
        return self.prefactor * value


RADIAL_BASES = {
    "physnet": PhysNetBasis,
    "bernstein": BernsteinBasis,
    "gaussian": GaussianBasis,
    "bessel": BesselBasis,
}
