"""A stability monitor for MD: has the structure broken apart?

Following Fu et al. 2023 ("Forces are not enough", arXiv:2210.07237), a run is unstable once any covalent
bond of the first frame leaves its reference range by more than a threshold (0.5 Å). The monitor also stops
on overlapping atoms and on non-finite energies, forces or positions. A check touches only the bonded pairs
and the pairs within ``min_distance`` (a linear-time neighbour search), so it costs little next to a force
evaluation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from ase import Atoms
from ase.geometry import find_mic
from ase.neighborlist import NeighborList, natural_cutoffs

from so3krates.data.neighbors import neighbor_list


@dataclass(frozen=True)
class StabilityFailure:
    """Why and when a run stopped.

    kind: ``"bond"``, ``"overlap"``, ``"non-finite"`` or ``"model-refused"`` (the calculator refused the
        structure, e.g. atoms closer than its ``min_distance``).
    """

    step: int
    time_ps: float
    kind: str
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def covalent_bonds(atoms: Atoms, bond_scale: float = 1.2) -> np.ndarray:
    """Pairs closer than ``bond_scale`` × (sum of covalent radii), images included for periodic cells.

    Returns:
        (n_bonds, 2) int64 — atom indices i < j of each bond (a bond to an image of the same pair is kept
        once, bonds of an atom to its own image are dropped).
    """
    cutoffs = natural_cutoffs(atoms, mult=bond_scale)
    search = NeighborList(cutoffs, skin=0.0, self_interaction=False, bothways=False)
    search.update(atoms)
    pairs = set()
    for i in range(len(atoms)):
        for j in search.get_neighbors(i)[0]:
            if i != j:
                pairs.add((min(i, int(j)), max(i, int(j))))
    return np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2)


class StabilityMonitor:
    """Tracks the covalent bonds of the first frame and the closest approach of any two atoms.

    Args:
        atoms: the first frame; its bonds and their lengths are the reference.
        max_bond_deviation: Å — a bond further than this outside its reference range breaks the run.
        bond_scale: atoms closer than bond_scale × (sum of covalent radii) are bonded.
        min_distance: Å — two atoms closer than this overlap; 0 turns the overlap check off.
        reference_steps: checks up to this step widen each bond's reference range to the lengths seen
            (min/max); 0 uses the first frame's lengths only.

    Example::

        monitor = StabilityMonitor(atoms)
        failure = monitor.check(atoms, step=100, time_ps=0.05, energy=e, forces=f)
        if failure is not None:
            print(failure.reason)
    """

    def __init__(
        self,
        atoms: Atoms,
        max_bond_deviation: float = 0.5,
        bond_scale: float = 1.2,
        min_distance: float = 0.5,
        reference_steps: int = 0,
    ) -> None:
        self.max_bond_deviation = float(max_bond_deviation)
        self.min_distance = float(min_distance)
        self.reference_steps = int(reference_steps)
        self.symbols = atoms.get_chemical_symbols()
        self.bonds = covalent_bonds(atoms, bond_scale)
        lengths = self.bond_lengths(atoms)
        self.reference_min = lengths.copy()  # (n_bonds,) Å
        self.reference_max = lengths.copy()  # (n_bonds,) Å
        self.failure: StabilityFailure | None = None

    @property
    def n_bonds(self) -> int:
        return len(self.bonds)

    def bond_lengths(self, atoms: Atoms) -> np.ndarray:
        """(n_bonds,) float, Å — current length of every reference bond (minimum image when periodic)."""
        vectors = atoms.positions[self.bonds[:, 1]] - atoms.positions[self.bonds[:, 0]]
        if atoms.pbc.any():
            _, lengths = find_mic(vectors, atoms.cell, atoms.pbc)
            return np.asarray(lengths, dtype=np.float64)
        return np.linalg.norm(vectors, axis=1)

    def _bond_name(self, k: int) -> str:
        i, j = self.bonds[k]
        return f"{self.symbols[i]}{i}–{self.symbols[j]}{j}"

    def check(
        self,
        atoms: Atoms,
        step: int,
        time_ps: float,
        energy: float | None = None,
        forces: np.ndarray | None = None,
    ) -> StabilityFailure | None:
        """The first problem found in ``atoms`` (recorded in ``self.failure``), or None if it looks sound."""
        failure = self._find_problem(atoms, step, energy, forces)
        if failure is None:
            return None
        self.failure = StabilityFailure(step=step, time_ps=time_ps, kind=failure[0], reason=failure[1])
        return self.failure

    def _find_problem(
        self, atoms: Atoms, step: int, energy: float | None, forces: np.ndarray | None
    ) -> tuple[str, str] | None:
        if not np.isfinite(atoms.positions).all():
            return "non-finite", "non-finite positions"
        if energy is not None and not np.isfinite(energy):
            return "non-finite", f"non-finite energy ({energy})"
        if forces is not None and not np.isfinite(forces).all():
            return "non-finite", "non-finite forces"
        if self.n_bonds:
            lengths = self.bond_lengths(atoms)
            if step <= self.reference_steps:
                np.minimum(self.reference_min, lengths, out=self.reference_min)
                np.maximum(self.reference_max, lengths, out=self.reference_max)
            deviation = np.maximum(self.reference_min - lengths, lengths - self.reference_max)
            worst = int(np.argmax(deviation))
            if deviation[worst] > self.max_bond_deviation:
                side = "stretched" if lengths[worst] > self.reference_max[worst] else "compressed"
                return "bond", (
                    f"bond {self._bond_name(worst)} {side} to {lengths[worst]:.3f} Å, "
                    f"{deviation[worst]:.3f} Å outside its reference "
                    f"[{self.reference_min[worst]:.3f}, {self.reference_max[worst]:.3f}] Å "
                    f"(threshold {self.max_bond_deviation} Å)"
                )
        if self.min_distance > 0 and len(atoms) > 1:
            edges = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, self.min_distance)
            if len(edges.idx_i):
                vectors = (
                    atoms.positions[edges.idx_j]
                    - atoms.positions[edges.idx_i]
                    + edges.shifts @ atoms.cell.array
                )
                distances = np.linalg.norm(vectors, axis=1)
                k = int(np.argmin(distances))
                i, j = int(edges.idx_i[k]), int(edges.idx_j[k])
                return "overlap", (
                    f"atoms {self.symbols[i]}{i} and {self.symbols[j]}{j} are {distances[k]:.3f} Å apart, "
                    f"closer than {self.min_distance} Å"
                )
        return None
