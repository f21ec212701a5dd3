"""One labelled structure in internal units: the unit of exchange between readers, datasets and writers."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from ase import Atoms
from ase.data import chemical_symbols


@dataclass
class Structure:
    """A structure with optional reference labels, in Å, eV, eV/Å and eV/Å³.

    Attributes:
        positions: (n_atoms, 3) float64, Å — Cartesian coordinates.
        atomic_numbers: (n_atoms,) int64 — nuclear charges Z ≥ 1.
        cell: (3, 3) float64, Å — lattice vectors as rows (zeros for molecules).
        pbc: (3,) bool — periodicity along each lattice vector.
        energy: float, eV — total energy; NaN when the frame has no energy label.
        forces: (n_atoms, 3) float64, eV/Å, or None — NaN entries are masked in the loss.
        stress: (3, 3) float64, eV/Å³, or None — ASE sign convention (positive = tensile).
        total_charge: float, e — total charge (read from ``charge``; models with a charge input use it).
        total_spin: float, ħ — total spin S (read from ``total_spin``; 0 singlet, ½ doublet).
    """

    positions: np.ndarray
    atomic_numbers: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    energy: float = float("nan")
    forces: np.ndarray | None = None
    stress: np.ndarray | None = None
    total_charge: float = 0.0
    total_spin: float = 0.0

    @property
    def n_atoms(self) -> int:
        return len(self.atomic_numbers)

    def to_atoms(self) -> Atoms:
        """An ASE ``Atoms`` with the same geometry, and its total charge and spin in ``info`` when not zero
        (labels are not attached)."""
        atoms = Atoms(numbers=self.atomic_numbers, positions=self.positions, cell=self.cell, pbc=self.pbc)
        if self.total_charge:
            atoms.info["charge"] = float(self.total_charge)
        if self.total_spin:
            atoms.info["total_spin"] = float(self.total_spin)
        return atoms

    @classmethod
    def from_atoms(
        cls,
        atoms: Atoms,
        energy: float = float("nan"),
        forces: np.ndarray | None = None,
        stress: np.ndarray | None = None,
    ) -> Structure:
        return cls(
            positions=np.asarray(atoms.positions, dtype=np.float64),
            atomic_numbers=np.asarray(atoms.numbers, dtype=np.int64),
            cell=np.asarray(atoms.cell.array, dtype=np.float64),
            pbc=np.asarray(atoms.pbc, dtype=bool),
            energy=float(energy),
            forces=None if forces is None else np.asarray(forces, dtype=np.float64),
            stress=None if stress is None else np.asarray(stress, dtype=np.float64),
        )


def unknown_elements(numbers: np.ndarray, species: Iterable[int]) -> str | None:
    """``None`` if every atomic number is in ``species``, else the one-line reason, for error messages.

    Example: ``"element Cl (Z=17) was not in the training data (model knows H, C, O)"``.
    """
    known = {int(z) for z in species}
    unknown = sorted({int(z) for z in np.asarray(numbers).tolist()} - known)
    if not unknown:
        return None
    names = ", ".join(f"{chemical_symbols[z]} (Z={z})" for z in unknown)
    trained = ", ".join(chemical_symbols[z] for z in sorted(known))
    return f"element {names} was not in the training data (model knows {trained})"
