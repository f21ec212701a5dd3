"""Per-atom energy readout with per-element scale and shift (SPEC §2, readout)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from so3krates.nn.embedding import N_ELEMENTS


class EnergyReadout(nn.Module):
    """E_i = Linear(F_r → 1)(SiLU(Linear(F → F_r)(h_i))), then E_i ← E_i · σ_Z + μ_Z.

    The per-element shift μ_Z (eV) and scale σ_Z (eV) are buffers, not parameters: they come from dataset
    statistics (least-squares fit of energies on element counts or isolated-atom energies; force RMS).
    They stay float64 even in a float32 model, and the atomic energies are returned in float64: total
    energies of thousands of eV would otherwise carry float32 round-off of ~0.5 meV, the size of the
    errors we want to measure. Gradients flow back to the float32 network unchanged.
    """

    def __init__(self, n_features: int, n_readout_features: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(n_features, n_readout_features), nn.SiLU(), nn.Linear(n_readout_features, 1)
        )
        self.register_buffer("energy_shift", torch.zeros(N_ELEMENTS, dtype=torch.float64))  # (119,) eV, μ_Z
        self.register_buffer("energy_scale", torch.ones(N_ELEMENTS, dtype=torch.float64))  # (119,) eV, σ_Z

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) casts every floating buffer; follow device moves but keep these two in float64.
        shift, scale = self.energy_shift, self.energy_scale
        module = super()._apply(fn, recurse)
        device = self.energy_shift.device
        self.energy_shift = shift.to(device=device, dtype=torch.float64)
        self.energy_scale = scale.to(device=device, dtype=torch.float64)
        return module

    def forward(self, h: Tensor, atomic_numbers: Tensor) -> Tensor:
        """h: (n_atoms, n_features), atomic_numbers: (n_atoms,) → (n_atoms,) float64 atomic energies, eV."""
        raw = self.mlp(h).squeeze(-1).double()
        return raw * self.energy_scale[atomic_numbers] + self.energy_shift[atomic_numbers]

    def set_statistics(self, shifts: dict[int, float], scale: float) -> None:
        """Sets μ_Z from ``{Z: shift in eV}`` (other elements 0) and σ_Z = ``scale`` eV for every element."""
        with torch.no_grad():
            self.energy_shift.zero_()
            for z, value in shifts.items():
                self.energy_shift[int(z)] = float(value)
            self.energy_scale.fill_(float(scale))
