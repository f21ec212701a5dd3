"""Dataset statistics that initialise the model: per-element energy shifts, force scale and N̄.

All in internal units (eV, eV/Å, Å). Frames with a NaN energy or NaN force components (unlabelled, masked in
the loss) are left out of the statistics they would spoil.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict

from so3krates.data.neighbors import neighbor_list
from so3krates.data.structure import Structure
from so3krates.errors import ConfigError


class DatasetStatistics(BaseModel):
    """What training needs to know about its data before the first step.

    Attributes:
        energy_shifts: Z → μ_Z, eV — per-element energy subtracted before the model sees the target.
        force_rms: eV/Å — RMS of the reference force components; the natural energy scale per atom.
        avg_num_neighbors: N̄ — mean number of neighbours within the cutoff (message normalisation).
        elements: sorted atomic numbers present in the data.
        n_structures: number of structures the statistics were computed on.
    """

    model_config = ConfigDict(extra="forbid")

    energy_shifts: dict[int, float]
    force_rms: float
    avg_num_neighbors: float
    elements: list[int]
    n_structures: int


def elements(structures: Sequence[Structure]) -> list[int]:
    """Sorted atomic numbers present in any of the structures."""
    if not structures:
        return []
    return sorted(int(z) for z in np.unique(np.concatenate([s.atomic_numbers for s in structures])))


def isolated_atom_shifts(present: list[int], isolated_atom_energies: dict[int, float]) -> dict[int, float]:
    """The per-element shifts given as isolated-atom energies (eV), for every element ``present``.

    Raises:
        ConfigError: an element present in the data has no energy.
    """
    missing = [z for z in present if z not in isolated_atom_energies]
    if missing:
        raise ConfigError(
            f"isolated_atom_energies: no energy for Z = {missing}, present in the data "
            f"(given for Z = {sorted(isolated_atom_energies)})"
        )
    return {z: float(isolated_atom_energies[z]) for z in present}


def energy_shifts(
    structures: Sequence[Structure], isolated_atom_energies: dict[int, float] | None = None
) -> dict[int, float]:
    """Per-element energy shifts μ_Z, eV, for every element present in the structures.

    Without ``isolated_atom_energies`` the shifts solve the least-squares problem
    ``E_total ≈ Σ_Z count_Z · μ_Z`` over the frames with an energy label (minimum-norm solution: when every
    frame has the same composition, the mean energy is spread over the elements in proportion to their
    counts). Elements that occur only in unlabelled frames, or every shift when no frame has an energy,
    get 0.

    Args:
        structures: the structures, energies in eV.
        isolated_atom_energies: Z → energy of the isolated atom, eV; used as the shifts when given.

    Raises:
        ConfigError: ``isolated_atom_energies`` lacks an element present in the structures.
    """
    present = elements(structures)
    if isolated_atom_energies is not None:
        return isolated_atom_shifts(present, isolated_atom_energies)

    labelled = [s for s in structures if np.isfinite(s.energy)]
    if not labelled:
        return dict.fromkeys(present, 0.0)
    column = {z: k for k, z in enumerate(present)}
    counts = np.zeros((len(labelled), len(present)))  # (n_frames, n_elements)
    for row, structure in enumerate(labelled):
        z, n = np.unique(structure.atomic_numbers, return_counts=True)
        counts[row, [column[int(zz)] for zz in z]] = n
    energies = np.array([s.energy for s in labelled])
    shifts, *_ = np.linalg.lstsq(counts, energies, rcond=None)
    return {z: float(shifts[column[z]]) for z in present}


def force_rms(structures: Sequence[Structure]) -> float:
    """RMS of all non-NaN reference force components, eV/Å; 1.0 when there are none."""
    components = [s.forces[np.isfinite(s.forces)] for s in structures if s.forces is not None]
    components = np.concatenate(components) if components else np.zeros(0)
    if len(components) == 0:
        return 1.0
    return float(np.sqrt(np.mean(components**2)))


def average_num_neighbors(structures: Sequence[Structure], cutoff: float) -> float:
    """N̄: the full neighbour-list size per atom within ``cutoff`` Å, periodic images included, averaged
    over all atoms of all structures."""
    n_atoms = sum(s.n_atoms for s in structures)
    if n_atoms == 0:
        raise ValueError("average_num_neighbors: no atoms")
    n_edges = sum(len(neighbor_list(s.positions, s.cell, s.pbc, cutoff).idx_i) for s in structures)
    return n_edges / n_atoms


def compute_statistics(
    structures: Sequence[Structure],
    cutoff: float,
    isolated_atom_energies: dict[int, float] | None = None,
) -> DatasetStatistics:
    """All statistics of a (training) set; ``cutoff`` in Å is the model's neighbour cutoff."""
    return DatasetStatistics(
        energy_shifts=energy_shifts(structures, isolated_atom_energies),
        force_rms=force_rms(structures),
        avg_num_neighbors=average_num_neighbors(structures, cutoff),
        elements=elements(structures),
        n_structures=len(structures),
    )
