"""Error metrics in meV and meV/Å, accumulated over batches, and the MAE/RMSE table."""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: metric name → (label key, whether to divide by n_atoms, unit factor to meV).
_QUANTITIES = {
    "energy": ("energy", False),
    "energy_per_atom": ("energy", True),
    "forces": ("forces", False),
    "stress": ("stress", False),
}
_UNITS = {"energy": "meV", "energy_per_atom": "meV_per_atom", "forces": "meV_per_A", "stress": "meV_per_A3"}


class ErrorAccumulator:
    """Sums of |error| and error² over finite labels, per quantity; ``results()`` gives MAE and RMSE."""

    def __init__(self) -> None:
        self.sums = {name: [0.0, 0.0, 0] for name in _QUANTITIES}  # Σ|e|, Σe², count
        self.n_structures = 0

    def update(self, predictions: dict[str, Tensor], labels: dict[str, Tensor]) -> None:
        self.n_structures += int(labels["n_atoms"].numel())
        for name, (key, per_atom) in _QUANTITIES.items():
            if key not in predictions:
                continue
            error = (predictions[key].detach().double() - labels[key]).reshape(len(labels[key]), -1)
            if per_atom:
                error = error / labels["n_atoms"][:, None]
            error = error[torch.isfinite(error)]
            sums = self.sums[name]
            sums[0] += float(error.abs().sum())
            sums[1] += float(error.square().sum())
            sums[2] += int(error.numel())

    def totals(self) -> Tensor:
        """(4 · 3 + 1,) float64 — every sum and count, to add up the accumulators of several processes."""
        flat = [value for sums in self.sums.values() for value in sums]
        return torch.tensor([*flat, self.n_structures], dtype=torch.float64)

    def set_totals(self, totals: Tensor) -> None:
        """Replaces the sums and counts by ``totals`` (the layout of ``totals()``)."""
        values = totals.tolist()
        for k, name in enumerate(self.sums):
            self.sums[name] = [values[3 * k], values[3 * k + 1], round(values[3 * k + 2])]
        self.n_structures = round(values[-1])

    def results(self) -> dict[str, float]:
        """``{energy_mae_meV, energy_rmse_meV, ..., forces_mae_meV_per_A, ..., n_structures}``."""
        out: dict[str, float] = {}
        for name, (abs_sum, sq_sum, count) in self.sums.items():
            if count == 0:
                continue
            unit = _UNITS[name]
            out[f"{name}_mae_{unit}"] = 1e3 * abs_sum / count
            out[f"{name}_rmse_{unit}"] = 1e3 * math.sqrt(sq_sum / count)
        out["n_structures"] = self.n_structures
        out["n_energy_labels"] = self.sums["energy"][2]  # structures in the energy metrics
        return out


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """A fixed-width MAE/RMSE table, one row per split (train, valid, test)."""
    columns = [
        ("E MAE", "energy_mae_meV"),
        ("E RMSE", "energy_rmse_meV"),
        ("E/atom MAE", "energy_per_atom_mae_meV_per_atom"),
        ("F MAE", "forces_mae_meV_per_A"),
        ("F RMSE", "forces_rmse_meV_per_A"),
        ("σ MAE", "stress_mae_meV_per_A3"),
    ]
    columns = [c for c in columns if any(c[1] in row for row in rows.values())]
    header = f"{'split':<6s} {'n':>6s} " + " ".join(f"{title:>11s}" for title, _ in columns)
    lines = [header, "-" * len(header)]
    for split, row in rows.items():
        cells = " ".join(f"{row[key]:>11.3f}" if key in row else f"{'—':>11s}" for _, key in columns)
        lines.append(f"{split:<6s} {int(row.get('n_structures', 0)):>6d} {cells}")
    lines.append("units: energy meV, energy per atom meV/atom, forces meV/Å (per component), stress meV/Å³")
    for split, row in rows.items():
        labelled, total = row.get("n_energy_labels"), int(row.get("n_structures", 0))
        if labelled is not None and labelled < total and "energy_mae_meV" in row:
            lines.append(
                f"{split}: energy metrics over {labelled} of {total} structures (the rest have none)"
            )
    return "\n".join(lines)
