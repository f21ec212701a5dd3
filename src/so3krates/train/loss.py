"""The training loss: weighted energy, force and stress errors with NaN labels masked out."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from so3krates.train.config import LossConfig


def _penalty(difference: Tensor, config: LossConfig) -> Tensor:
    """Mean penalty over the finite entries of ``difference``; 0 when there are none."""
    finite = torch.isfinite(difference)
    if not finite.any():
        return difference.new_zeros(())
    values = difference[finite]
    if config.kind == "huber":
        return F.huber_loss(values, torch.zeros_like(values), delta=config.huber_delta)
    return values.square().mean()


def compute_loss(
    predictions: dict[str, Tensor], labels: dict[str, Tensor], config: LossConfig
) -> tuple[Tensor, dict[str, float]]:
    """λ_E · L(E) + λ_F · L(F) + λ_S · L(σ) (SPEC §2: λ_E = 0.01, λ_F = 0.99 by default).

    Args:
        predictions: ``energy`` (n_graphs,) eV, ``forces`` (n_atoms, 3) eV/Å, optionally ``stress``.
        labels: the same keys with NaN for missing values, plus ``n_atoms`` (n_graphs,).
        config: weights and the penalty (MSE, or Huber with ``huber_delta``).

    Returns:
        The scalar loss and its parts (as floats, for logging).
    """
    energy_difference = predictions["energy"] - labels["energy"]
    if config.energy_per_atom:
        energy_difference = energy_difference / labels["n_atoms"]
    parts = {"energy": _penalty(energy_difference, config)}
    total = config.energy_weight * parts["energy"]
    if config.forces_weight > 0:
        parts["forces"] = _penalty(predictions["forces"] - labels["forces"], config)
        total = total + config.forces_weight * parts["forces"]
    if config.stress_weight > 0:
        parts["stress"] = _penalty(predictions["stress"] - labels["stress"], config)
        total = total + config.stress_weight * parts["stress"]
    return total, {name: float(value.detach()) for name, value in parts.items()}
