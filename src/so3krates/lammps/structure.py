"""ASE structures into and out of LAMMPS (``units metal``, ``atom_style atomic``).

LAMMPS needs a lower-triangular cell, a = (lx, 0, 0), b = (xy, ly, 0), c = (xz, yz, lz): a general ASE cell
is rotated into that frame (positions and velocities with it) and back when the structure is read out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.data import chemical_symbols
from ase.stress import full_3x3_to_voigt_6_stress

from so3krates.errors import So3kratesError
from so3krates.lammps.driver import LammpsDriver, atomic_numbers_of
from so3krates.units import VELOCITY_TO_METAL


def elements_of(atoms: Atoms) -> list[str]:
    """One LAMMPS atom type per element of ``atoms``, in order of atomic number."""
    return [chemical_symbols[z] for z in sorted(set(atoms.numbers.tolist()))]


def lammps_frame(cell: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """LAMMPS' lower-triangular cell and the rotation into it.

    Args:
        cell: (3, 3) float, Å — lattice vectors as rows, right-handed.

    Returns:
        (lammps_cell, rotation): ``cell @ rotation == lammps_cell``; vectors go into LAMMPS' frame as
        ``v @ rotation`` and back as ``v @ rotation.T``.
    """
    if np.linalg.det(cell) <= 0:
        raise So3kratesError("LAMMPS needs a right-handed cell with non-zero volume; swap two cell vectors")
    q, r = np.linalg.qr(cell.T)  # cell = r.T @ q.T with r upper-triangular
    signs = np.sign(np.diag(r))
    rotation = q * signs
    lammps_cell = np.tril(cell @ rotation)
    return lammps_cell, rotation


def create_structure(lmp: Any, atoms: Atoms, elements: Sequence[str]) -> np.ndarray:
    """Box, atoms, masses and velocities of ``atoms`` in a fresh LAMMPS instance (after ``units metal``).

    Periodic directions become ``p`` boundaries; non-periodic ones ``s`` (shrink-wrapped). A structure
    without any periodicity needs no cell.

    Returns:
        (3, 3) float — the rotation from ASE's frame into LAMMPS' (identity for molecules).
    """
    numbers = atomic_numbers_of(elements)
    pbc = np.asarray(atoms.pbc, dtype=bool)
    missing = sorted(set(atoms.numbers.tolist()) - set(numbers[1:].tolist()))
    if missing:
        raise So3kratesError(f"element(s) {[chemical_symbols[z] for z in missing]} have no LAMMPS atom type")
    type_of = {int(z): t for t, z in enumerate(numbers) if t > 0}
    types = np.array([type_of[int(z)] for z in atoms.numbers], dtype=np.int32)
    if pbc.any():
        lammps_cell, rotation = lammps_frame(np.asarray(atoms.cell.array))
        positions = atoms.positions @ rotation
        fractional = np.linalg.solve(lammps_cell.T, positions.T).T
        fractional[:, pbc] %= 1.0
        positions = fractional @ lammps_cell
        lx, ly, lz = np.diag(lammps_cell).tolist()
        xy, xz, yz = lammps_cell[[1, 2, 2], [0, 0, 1]].tolist()
        region = f"prism 0 {lx!r} 0 {ly!r} 0 {lz!r} {xy!r} {xz!r} {yz!r}"
    else:
        rotation = np.eye(3)
        positions = atoms.positions.copy()
        low, high = positions.min(axis=0) - 1.0, positions.max(axis=0) + 1.0
        region = "block " + " ".join(f"{a!r} {b!r}" for a, b in zip(low.tolist(), high.tolist(), strict=True))
    boundary = " ".join("p" if p else "s" for p in pbc)
    lmp.command(f"boundary {boundary}")
    lmp.command(f"region so3krates_box {region}")
    lmp.command(f"create_box {len(numbers) - 1} so3krates_box")
    masses = atoms.get_masses()
    for t, z in enumerate(numbers[1:], start=1):
        of_type = masses[types == t]
        mass = of_type[0] if len(of_type) else Atoms(numbers=[z]).get_masses()[0]
        if not np.all(of_type == mass):
            symbol = chemical_symbols[z]
            raise So3kratesError(f"atoms of {symbol} have different masses; LAMMPS has one mass per type")
        lmp.command(f"mass {t} {float(mass)!r}")
    velocities = atoms.get_velocities() @ rotation * VELOCITY_TO_METAL
    created = lmp.create_atoms(
        len(atoms),
        list(range(1, len(atoms) + 1)),
        types.tolist(),
        positions.ravel().tolist(),
        velocities.ravel().tolist(),
        shrinkexceed=True,
    )
    if created != len(atoms):
        raise So3kratesError(f"LAMMPS created {created} of {len(atoms)} atoms")
    return rotation


def read_structure(lmp: Any, driver: LammpsDriver, rotation: np.ndarray | None = None) -> Atoms:
    """The current LAMMPS state as ASE atoms, ordered by atom ID, in ASE's frame.

    Positions are unwrapped with the image flags; velocities are converted to ASE units. The atoms carry the
    driver's latest energy, forces and (for periodic cells) stress as a single-point calculator.

    Args:
        rotation: (3, 3) — as returned by ``create_structure``; identity when omitted.
    """
    rotation = np.eye(3) if rotation is None else rotation
    n_atoms = lmp.get_natoms()
    tag = lmp.numpy.extract_atom("id")[:n_atoms]
    x = lmp.numpy.extract_atom("x")[:n_atoms]
    structure, order = driver.structure(x, tag)
    velocities = lmp.numpy.extract_atom("v")[:n_atoms][order] / VELOCITY_TO_METAL
    atoms = Atoms(
        numbers=structure.numbers,
        positions=structure.positions @ rotation.T,
        cell=structure.cell.array @ rotation.T,
        pbc=structure.pbc,
        velocities=velocities @ rotation.T,
    )
    masses = lmp.numpy.extract_atom("mass")
    types = lmp.numpy.extract_atom("type")[:n_atoms][order]
    atoms.set_masses(masses[types])
    if driver.energy is not None:
        results = {"energy": driver.energy, "forces": driver.forces @ rotation.T}
        if driver.virial is not None and atoms.pbc.any():
            xx, yy, zz, xy, xz, yz = driver.virial
            virial = np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
            stress = -(rotation @ virial @ rotation.T) / atoms.get_volume()
            results["stress"] = full_3x3_to_voigt_6_stress(stress)
        atoms.calc = SinglePointCalculator(atoms, **results)
    return atoms
