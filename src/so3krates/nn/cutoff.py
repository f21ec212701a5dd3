"""Smooth cutoff functions φ(d): 1 at d = 0, 0 for d ≥ r_c, continuous first derivative at r_c.

Every message of the model is multiplied by φ(d_ij), which makes the energy C¹ as an atom crosses the
cutoff sphere (Eqs. 21 and 22 of Frank et al., Nat. Commun. 2024).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class CosineCutoff(nn.Module):
    """φ(d) = ½ (cos(π d / r_c) + 1) for d < r_c, else 0 (the paper's choice, SPEC §2)."""

    def __init__(self, cutoff: float) -> None:
        super().__init__()
        self.cutoff = float(cutoff)

    def forward(self, distances: Tensor) -> Tensor:
        """distances: (n_edges,) float, Å → (n_edges,) float, dimensionless."""
        value = 0.5 * (torch.cos(distances * (math.pi / self.cutoff)) + 1.0)
        return torch.where(distances < self.cutoff, value, torch.zeros_like(value))


class PolynomialCutoff(nn.Module):
    """Polynomial envelope of Gasteiger et al. (DimeNet, ICLR 2020, Eq. 8), exponent p = 6.

    φ(x) = 1 − (p+1)(p+2)/2 xᵖ + p(p+2) xᵖ⁺¹ − p(p+1)/2 xᵖ⁺² with x = d / r_c; C² at the cutoff.
    """

    def __init__(self, cutoff: float, p: int = 6) -> None:
        super().__init__()
        self.cutoff = float(cutoff)
        self.p = int(p)

    def forward(self, distances: Tensor) -> Tensor:
        """distances: (n_edges,) float, Å → (n_edges,) float, dimensionless."""
        p = self.p
        x = distances / self.cutoff
        value = (
            1.0
            - 0.5 * (p + 1) * (p + 2) * x**p
            + p * (p + 2) * x ** (p + 1)
            - 0.5 * p * (p + 1) * x ** (p + 2)
        )
        return torch.where(x < 1.0, value, torch.zeros_like(value))


class ExponentialCutoff(nn.Module):
    """φ(d) = exp(−d² / ((r_c − d)(r_c + d))) for d < r_c, else 0 (SpookyNet, Unke et al. 2021); C^∞."""

    def __init__(self, cutoff: float) -> None:
        super().__init__()
        self.cutoff = float(cutoff)

    def forward(self, distances: Tensor) -> Tensor:
        """distances: (n_edges,) float, Å → (n_edges,) float, dimensionless."""
        inside = distances < self.cutoff
        # Keep the argument finite outside the cutoff so that the unused branch has finite gradients.
        safe = torch.where(inside, distances, torch.zeros_like(distances))
        value = torch.exp(-(safe**2) / ((self.cutoff - safe) * (self.cutoff + safe)))
        return torch.where(inside, value, torch.zeros_like(value))


class PhysNetCutoff(nn.Module):
    """φ(x) = 1 − 6x⁵ + 15x⁴ − 10x³ with x = d / r_c, else 0 (Unke & Meuwly, PhysNet, JCTC 2019; SO3LR).

    C² at the cutoff: φ, φ' and φ'' vanish at x = 1.
    """

    def __init__(self, cutoff: float) -> None:
        super().__init__()
        self.cutoff = float(cutoff)

    def forward(self, distances: Tensor) -> Tensor:
        """distances: (n_edges,) float, Å → (n_edges,) float, dimensionless."""
        x = distances / self.cutoff
        value = 1.0 + x**3 * (-10.0 + x * (15.0 - 6.0 * x))
        return torch.where(distances < self.cutoff, value, torch.zeros_like(value))


CUTOFF_FUNCTIONS = {
    "cosine": CosineCutoff,
    "physnet": PhysNetCutoff,
    "polynomial": PolynomialCutoff,
    "exponential": ExponentialCutoff,
}
