"""Per-atom energy readout with per-element scale and shift (SPEC §2, readout)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from so3krates.nn.embedding import N_ELEMENTS


class EnergyReadout(nn.Module):
    """E_i = Linear(F_r → 1)(SiLU(Linear(F → F_r)(h_i))), then E_i ← E_i · σ_Z + μ_Z.

    The per-element shift μ_Z (eV) and scale σ_Z (eV) are buffers, not parameters: they come from dataset
    statistics (least-squares fit of energies on element counts or isolated-atom energies; force RMS).
    """

    def __init__(self, n_features: int, n_readout_features: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(n_features, n_readout_features), nn.SiLU(), nn.Linear(n_readout_features, 1)
        )
        self.register_buffer("energy_shift", torch.zeros(N_ELEMENTS))  # (119,) eV, μ_Z
        self.register_buffer("energy_scale", torch.ones(N_ELEMENTS))  # (119,) eV, σ_Z

    def forward(self, h: Tensor, atomic_numbers: Tensor) -> Tensor:
        """h: (n_atoms, n_features), atomic_numbers: (n_atoms,) → (n_atoms,) atomic energies, eV."""
        raw = self.mlp(h).squeeze(-1)
        return raw * self.energy_scale[atomic_numbers] + self.energy_shift[atomic_numbers]
