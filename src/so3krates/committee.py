"""Committees: several trained models of the same species and cutoff, and their disagreement.

A committee of K models trained on the same data from different seeds predicts the mean energy and forces
of its members; the spread of the members is an estimate of the error where no reference is at hand
(Schran, Brezina, Marsalek, J. Chem. Phys. 153, 104105 (2020), "Committee neural network potentials control
generalization errors and enable active learning"). We report, per structure and per atom:

- ``energy_uncertainty``: the standard deviation of the members' energies (eV; K − 1 in the denominator);
- ``forces_uncertainty``: per atom, √(Σ_α s_α²) with s_α the standard deviation of force component α over
  the members (eV/Å), the length of the per-component spread. Its maximum over the atoms of a structure is
  the quantity MD logs and active learning selects on.

The members are evaluated one after another on one shared graph: the neighbour list, the graph and the
checks are built once. Different weights leave no batched program to share: the evaluation of K members
costs about K times one model's, the rest of a call (neighbour list, ASE) once (benchmarks/committee.py
measures the ratio).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from so3krates import keys
from so3krates.data.graph import Graph
from so3krates.errors import So3kratesError
from so3krates.runtime.force_field import ForceField

#: Key of the committee's per-structure energy spread (eV) in force-field outputs and calculator results.
ENERGY_UNCERTAINTY = "energy_uncertainty"
#: Key of the per-atom force spread (eV/Å).
FORCES_UNCERTAINTY = "forces_uncertainty"


def member_paths(directory: str | os.PathLike) -> list[Path] | None:
    """The checkpoints of the committee in ``directory`` (``member_*/best.pt``, what ``so3krates learn``
    writes), or None when it names one model (a file, or a run directory with its own ``best.pt``)."""
    path = Path(directory)
    if path.is_dir() and not (path / "best.pt").is_file():
        members = sorted(path.glob("member_*/best.pt"))
        if members:
            return members
    return None


def spread(values: Tensor) -> Tensor:
    """Standard deviation over the first axis (the members), K − 1 in the denominator; 0 for one member."""
    if values.shape[0] < 2:
        return torch.zeros_like(values[0])
    return values.std(dim=0, unbiased=True)


class Committee:
    """K force fields with the same species, cutoff and long-range cutoff, called like one.

    ``committee(graph)`` returns the members' mean of every output (energy, atomic energies, forces,
    stress, virial), plus ``energy_uncertainty`` (n_graphs,), ``forces_uncertainty`` (n_atoms,) and the
    members' own ``member_energy`` (K, n_graphs) and ``member_forces`` (K, n_atoms, 3).
    """

    def __init__(self, members: Sequence[ForceField], species: Sequence[int] | None = None, names=None):
        if len(members) < 2:
            raise So3kratesError(f"a committee needs at least two members, got {len(members)}")
        names = list(names) if names is not None else [f"member {k}" for k in range(len(members))]
        first = members[0]
        for name, member in zip(names[1:], members[1:], strict=True):
            for attribute in ("cutoff", "long_range_cutoff"):
                mine, theirs = getattr(member, attribute, None), getattr(first, attribute, None)
                if mine != theirs:
                    raise So3kratesError(
                        f"{name}: {attribute} {mine} differs from {names[0]}'s {theirs}; a committee's "
                        "members must share it"
                    )
        self.members = list(members)
        self.names = names
        self.species = list(species) if species is not None else None
        self.cutoff = first.cutoff
        self.long_range_cutoff = getattr(first, "long_range_cutoff", None)
        self.model = first.model  # read for the configuration (e.g. whether it takes a total charge)

    def __len__(self) -> int:
        return len(self.members)

    def __call__(
        self, graph: Graph, compute_forces: bool = True, compute_stress: bool = False
    ) -> dict[str, Tensor]:
        outputs = [
            member(graph, compute_forces=compute_forces, compute_stress=compute_stress)
            for member in self.members
        ]
        result: dict[str, Tensor] = {}
        for key, value in outputs[0].items():
            if isinstance(value, Tensor) and all(isinstance(o.get(key), Tensor) for o in outputs):
                result[key] = torch.stack([o[key].detach() for o in outputs]).mean(dim=0)
        energies = torch.stack([o[keys.ENERGY].detach() for o in outputs])
        result["member_energy"] = energies
        result[ENERGY_UNCERTAINTY] = spread(energies)
        if compute_forces:
            forces = torch.stack([o[keys.FORCES].detach() for o in outputs])
            result["member_forces"] = forces
            result[FORCES_UNCERTAINTY] = spread(forces).norm(dim=-1)
        return result


def load_committee(
    paths: Sequence[str | os.PathLike],
    device: str = "cpu",
    dtype: torch.dtype = torch.float64,
    compile: str = "none",
    planner=None,
) -> tuple[Committee, dict[str, Any]]:
    """The committee of ``paths`` (checkpoints) and the first member's metadata.

    Every member must have been trained on the same species: a committee whose members know different
    elements has no meaning for the elements some of them never saw.
    """
    from so3krates.model.checkpoint import load_model

    members, names, species, metadata = [], [], None, {}
    for path in paths:
        if not Path(path).is_file():
            raise So3kratesError(f"{path}: committee member not found")
        model, meta = load_model(path, device=device, dtype=dtype)
        member_species = sorted(meta.get("species") or [])
        if species is None:
            species, metadata = member_species, meta
        elif member_species != species:
            raise So3kratesError(
                f"{path}: trained on elements {member_species}, the first member on {species}; a committee's "
                "members must share them"
            )
        members.append(ForceField(model, compile, frozen=True, planner=planner))
        names.append(str(path))
    return Committee(members, species or None, names), metadata


def uncertainty_summary(forces_uncertainty: np.ndarray) -> float:
    """eV/Å — the largest atomic force uncertainty of a structure (what MD logs and learning selects on)."""
    return float(np.max(forces_uncertainty)) if len(forces_uncertainty) else 0.0
