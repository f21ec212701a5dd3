"""The training loss: weighted energy, force and stress errors with NaN labels masked out."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from so3krates.train.config import LossConfig


def _penalty(difference: Tensor, config: LossConfig) -> tuple[Tensor, int]:
    """Mean penalty over the finite entries of ``difference`` and their number; (0, 0) when there are none."""
    finite = torch.isfinite(difference)
    if not finite.any():
        return difference.new_zeros(()), 0
    values = difference[finite]
    if config.kind == "huber":
        return F.huber_loss(values, torch.zeros_like(values), delta=config.huber_delta), len(values)
    return values.square().mean(), len(values)


def loss_weights(config: LossConfig) -> dict[str, float]:
    """The terms of the loss and their weights λ, in the order they are added (energy is always a term)."""
    weights = {"energy": config.energy_weight}
    if config.forces_weight > 0:
        weights["forces"] = config.forces_weight
    if config.stress_weight > 0:
        weights["stress"] = config.stress_weight
    return weights


def loss_terms(
    predictions: dict[str, Tensor], labels: dict[str, Tensor], config: LossConfig
) -> dict[str, tuple[Tensor, int]]:
    """Each term of ``loss_weights``: its mean penalty L and the number of finite entries it averages.

    The counts let a batch split over several processes weight each share's mean so that the sum over the
    shares is the mean over the whole batch.
    """
    energy_difference = predictions["energy"] - labels["energy"]
    if config.energy_per_atom:
        energy_difference = energy_difference / labels["n_atoms"]
    terms = {"energy": _penalty(energy_difference, config)}
    for name in loss_weights(config):
        if name != "energy":
            terms[name] = _penalty(predictions[name] - labels[name], config)
    return terms


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
    terms = loss_terms(predictions, labels, config)
    total = None
    for name, weight in loss_weights(config).items():
        term = weight * terms[name][0]
        total = term if total is None else total + term
    return total, {name: float(mean.detach()) for name, (mean, _) in terms.items()}
