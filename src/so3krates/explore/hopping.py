"""Minima hopping (S. Goedecker, J. Chem. Phys. 120, 9911 (2004)) with every minimum in an ASE database.

Why our own loop and not ``ase.optimize.minimahopping.MinimaHopping``: ASE's version (3.29) decides
whether a minimum is new by comparing positions after translation only, so a molecule or cluster that
rotated during the MD burst is taken for a new minimum; it keeps its state in a text log and dozens of
``md*.traj``/``qn*.traj`` files in the working directory and resumes by parsing them; and it has no
wall-time budget. The algorithm itself is short, so it is written out here with ASE doing the MD
(``VelocityVerlet``) and the local optimisation (``BFGS``/``FIRE``), deduplication by energy and
permutation-aware aligned RMSD (``compare.py``), and the state in the database.

One step (Goedecker's Fig. 1; parameter names as in the paper and in ASE):

1. *Escape*: NVE MD from the current minimum with Maxwell–Boltzmann velocities at temperature T, stopped
   once the potential energy has passed through ``mdmin`` minima along the trajectory, then a local
   optimisation to ``fmax``.
2. *Temperature feedback*: the current minimum again → T ← β₁T; a minimum seen before → T ← β₂T
   (β₁, β₂ > 1: escape harder); a new minimum → T ← β₃T (β₃ < 1).
3. *Downward preference* (not when the escape failed): accept the minimum as the new current one if
   E < E_current + E_diff, then E_diff ← α₁E_diff (α₁ < 1); otherwise stay, E_diff ← α₂E_diff (α₂ > 1).

Each step writes one row (the minimum it found, new or a duplicate) and the search state (T, E_diff, the
current minimum, the step counter) in one SQLite transaction, so an interrupted search resumes exactly
where it stopped. Every step draws its velocities from a generator seeded with ``(seed, step)``, so a
resumed search follows the same path as one that was never interrupted.
"""

from __future__ import annotations

import bisect
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import ase.db
import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator
from ase.calculators.singlepoint import SinglePointCalculator
from ase.md.velocitydistribution import Stationary, ZeroRotation
from ase.md.verlet import VelocityVerlet
from ase.optimize import BFGS, FIRE
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from scipy.sparse.csgraph import connected_components

from so3krates import __version__
from so3krates.errors import ConfigError, DataError, So3kratesError, format_validation_error
from so3krates.explore.compare import rmsd
from so3krates.md.stability import covalent_bonds

try:
    from ase.md import thermalize_momenta  # ASE ≥ 3.29
except ImportError:  # pragma: no cover - older ASE
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    def thermalize_momenta(atoms, temperature_K, *, exact_temperature=False, rng=None):
        MaxwellBoltzmannDistribution(
            atoms, temperature_K=temperature_K, force_temp=exact_temperature, rng=rng
        )


#: The key-value columns of every row of ``minima.db`` (besides ASE's energy, forces and ``fmax``).
MINIMA_COLUMNS: dict[str, str] = {
    "step": "int — hopping step that found the minimum (0: the optimised starting structure)",
    "temperature": "float, K — MD temperature of the escape that led here (0 for step 0)",
    "parent_id": "int — row id of the minimum the MD started from (0 for step 0)",
    "is_new": "bool — a minimum not seen before (the unique minima are the rows with is_new)",
    "duplicate_of": "int — row id of the unique minimum this one repeats (0 when new)",
    "rmsd": "float, Å — RMSD to that unique minimum (0 when new)",
    "accepted": "bool — became the current minimum (Goedecker's E < E_current + E_diff)",
    "ediff": "float, eV — E_diff after this step",
    "md_steps": "int — MD steps of the escape",
    "opt_steps": "int — optimiser steps",
    "elapsed": "float, s — wall time of the search when the minimum was found (summed over resumes)",
}

_FORMAT = "so3krates-minima-hopping"


class HoppingConfig(BaseModel):
    """Settings of a minima-hopping search; defaults follow Goedecker (2004) and ASE."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    temperature: float = Field(1000.0, gt=0, description="K — initial MD temperature T₀")
    fmax: float = Field(0.01, gt=0, description="eV/Å — convergence of the local optimisation")
    timestep: float = Field(1.0, gt=0, description="fs — MD time step")
    mdmin: int = Field(2, ge=1, description="stop the MD after this many minima of E_pot along it")
    max_md_steps: int = Field(2000, ge=1, description="upper limit of MD steps per escape")
    max_opt_steps: int = Field(1000, ge=1, description="local optimisations not converged by then fail")
    optimizer: Literal["bfgs", "fire"] = "bfgs"
    ediff: float = Field(0.5, gt=0, description="eV — initial acceptance window E_diff")
    beta1: float = Field(1.1, gt=1, description="T factor when the escape returned to the current minimum")
    beta2: float = Field(1.1, gt=1, description="T factor when a known minimum was found")
    beta3: float = Field(1 / 1.1, gt=0, lt=1, description="T factor when a new minimum was found")
    alpha1: float = Field(0.98, gt=0, lt=1, description="E_diff factor after an acceptance")
    alpha2: float = Field(1 / 0.98, gt=1, description="E_diff factor after a rejection")
    energy_tol: float = Field(0.01, gt=0, description="eV — same minimum: energies closer than this ...")
    rmsd_tol: float = Field(0.1, gt=0, description="Å — ... and aligned RMSD below this")
    allow_reflection: bool = Field(False, description="count mirror images as the same minimum")
    fragment_distance: float | None = Field(
        None,
        gt=0,
        description="Å — atoms closer than this are connected; a minimum with more connected fragments "
        "than the current one is discarded as dissociated (None: no check)",
    )
    keep_topology: bool = Field(
        False,
        description="a conformer search: discard minima whose covalent bonds (closer than 1.2 × the sum of "
        "covalent radii, as in the MD stability monitor) differ from the starting minimum's",
    )
    seed: int = 0

    @classmethod
    def from_dict(cls, settings: dict[str, Any], source: str = "explore settings") -> HoppingConfig:
        """Validates ``settings``; bad keys or values raise ``ConfigError`` with one line naming the key."""
        try:
            return cls.model_validate(settings)
        except ValidationError as error:
            raise ConfigError(format_validation_error(error, source)) from None


@dataclass
class _Minimum:
    id: int
    energy: float
    atoms: Atoms


@dataclass
class HoppingState:
    """What a search needs to go on: the last finished step, T, E_diff, the current minimum, wall time."""

    step: int
    temperature: float
    ediff: float
    current_id: int
    elapsed: float


class MinimaHopping:
    """A minima-hopping search on the potential-energy surface of ``calculator``.

    Args:
        atoms: starting structure (a molecule or cluster; periodic structures are refused because RMSD
            after rotation is not meaningful for them).
        calculator: any ASE calculator, e.g. ``So3kratesCalculator``.
        db_path: the ASE database of minima, conventionally ``OUT/minima.db``; when it already holds a
            search of the same system, that search continues with its minima, T and E_diff.
        config: the settings (``HoppingConfig``); on resume the new settings apply from the next step.
        log: called with one line per step; ``None`` is silent.

    Example::

        search = MinimaHopping(atoms, So3kratesCalculator("best.pt"), "explore/minima.db")
        search.run(steps=100)
        search.unique_minima()  # lowest first
    """

    def __init__(
        self,
        atoms: Atoms,
        calculator: Calculator,
        db_path: str | os.PathLike,
        config: HoppingConfig | None = None,
        log: Callable[[str], None] | None = print,
    ) -> None:
        if atoms.pbc.any():
            raise DataError("minima hopping supports molecules and clusters only (the structure is periodic)")
        self.config = config or HoppingConfig()
        self.db_path = Path(db_path)
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self.atoms = atoms.copy()
        self.atoms.calc = calculator
        self._log = log or (lambda line: None)
        self._energies: list[float] = []  # of the unique minima, ascending, for the energy-window search
        self._unique: list[_Minimum] = []  # in the same order
        self.state: HoppingState | None = None
        self._start_bonds: set[tuple[int, int]] | None = None  # for keep_topology
        self._resume()

    # ----------------------------------------------------------------------------------------- storage

    def _connect(self) -> ase.db.core.Database:
        return ase.db.connect(self.db_path, type="db")

    def _resume(self) -> None:
        if not self.db_path.exists():
            return
        db = self._connect()
        try:
            metadata = db.metadata
        except Exception as error:  # sqlite3 raises several types for files that are not databases
            raise DataError(f"{self.db_path}: not a readable ASE database ({error})") from None
        if metadata.get("format") != _FORMAT:
            if db.count() > 0:
                raise DataError(f"{self.db_path}: not a so3krates minima-hopping database")
            return
        numbers = np.asarray(metadata["numbers"])
        if sorted(numbers.tolist()) != sorted(self.atoms.numbers.tolist()):
            formula = Atoms(numbers=numbers).get_chemical_formula()
            raise DataError(
                f"{self.db_path}: holds minima of {formula}, not of {self.atoms.get_chemical_formula()}; "
                "choose another output folder"
            )
        self.state = HoppingState(**metadata["state"])
        for row in db.select(is_new=True):
            self._add_unique(_Minimum(row.id, row.energy, row.toatoms()))
        current = db.get(id=self.state.current_id).toatoms()
        if np.array_equal(current.numbers, self.atoms.numbers):
            self.atoms.positions = current.positions
        else:  # the same system with its atoms in another order: go on with the stored one
            current.calc, self.atoms = self.atoms.calc, current
        self._log(
            f"continuing the search in {self.db_path}: step {self.state.step}, {len(self._unique)} unique "
            f"minima, T = {self.state.temperature:.1f} K, E_diff = {self.state.ediff:.4f} eV"
        )

    def _add_unique(self, minimum: _Minimum) -> None:
        index = bisect.bisect(self._energies, minimum.energy)
        self._energies.insert(index, minimum.energy)
        self._unique.insert(index, minimum)

    def _write(self, atoms: Atoms | None, row: dict[str, Any], make_current: bool = False) -> int:
        """One transaction: the minimum (when there is one) and the search state after this step.

        Returns the row id of the minimum (0 without one); with ``make_current`` it becomes the current
        minimum of the stored state.
        """
        db = self._connect()
        with db:
            row_id = db.write(atoms, key_value_pairs=row) if atoms is not None else 0
            if make_current:
                self.state.current_id = row_id
            db.metadata = {
                "format": _FORMAT,
                "so3krates_version": __version__,
                "numbers": self.atoms.numbers.tolist(),
                "settings": self.config.model_dump(mode="json"),
                "state": vars(self.state).copy(),
            }
        return row_id

    # ------------------------------------------------------------------------------------------ search

    def unique_minima(self) -> list[Atoms]:
        """The unique minima found so far, lowest energy first (``atoms.info['id']``: their row id)."""
        out = []
        for minimum in self._unique:
            atoms = minimum.atoms.copy()
            atoms.info["id"] = minimum.id
            atoms.calc = SinglePointCalculator(atoms, energy=minimum.energy)
            out.append(atoms)
        return out

    def _find(self, atoms: Atoms, energy: float) -> tuple[_Minimum, float] | None:
        """The stored unique minimum that ``atoms`` repeats, and the RMSD to it, or ``None``.

        Only minima within ``energy_tol`` of ``energy`` are aligned (a window of the sorted list).
        """
        tol = self.config.energy_tol
        lo = bisect.bisect_left(self._energies, energy - tol)
        hi = bisect.bisect_right(self._energies, energy + tol)
        best = None
        for minimum in self._unique[lo:hi]:
            distance = rmsd(minimum.atoms, atoms, allow_reflection=self.config.allow_reflection)
            if distance < self.config.rmsd_tol and (best is None or distance < best[1]):
                best = (minimum, distance)
        return best

    def _optimize(self) -> tuple[bool, int]:
        self.atoms.set_momenta(np.zeros_like(self.atoms.positions))
        optimizer_class = {"bfgs": BFGS, "fire": FIRE}[self.config.optimizer]
        optimizer = optimizer_class(self.atoms, logfile=None)
        converged = bool(optimizer.run(fmax=self.config.fmax, steps=self.config.max_opt_steps))
        return converged, int(optimizer.nsteps)

    def _escape(self, temperature: float, rng: np.random.Generator) -> int:
        """NVE MD until E_pot has passed through ``mdmin`` minima; leaves the atoms at the last of them."""
        atoms = self.atoms
        thermalize_momenta(atoms, temperature, exact_temperature=True, rng=rng)
        Stationary(atoms)
        if not atoms.constraints:
            with np.errstate(invalid="ignore", divide="ignore"):  # linear molecules: one moment is 0
                ZeroRotation(atoms)  # rotating the whole molecule only wastes kinetic energy
        dynamics = VelocityVerlet(atoms, timestep=self.config.timestep * units.fs, logfile=None)
        window = [(atoms.get_potential_energy(), atoms.positions.copy())]  # the last three MD frames
        n_minima, last_minimum, md_steps = 0, None, 0
        while md_steps < self.config.max_md_steps:
            dynamics.step()
            md_steps += 1
            window = [*window[-2:], (atoms.get_potential_energy(), atoms.positions.copy())]
            if len(window) == 3 and window[0][0] > window[1][0] <= window[2][0]:
                n_minima, last_minimum = n_minima + 1, window[1][1]
                if n_minima >= self.config.mdmin:
                    break
        if last_minimum is not None:
            atoms.positions = last_minimum
        return md_steps

    def _initialize(self) -> None:
        """Step 0: the optimised starting structure becomes the first minimum."""
        start = time.perf_counter()
        converged, opt_steps = self._optimize()
        if not converged:
            raise DataError(
                f"the starting structure did not converge to fmax = {self.config.fmax} eV/Å in "
                f"{self.config.max_opt_steps} optimiser steps"
            )
        energy = self.atoms.get_potential_energy()
        self.state = HoppingState(
            step=0,
            temperature=self.config.temperature,
            ediff=self.config.ediff,
            current_id=0,
            elapsed=time.perf_counter() - start,
        )
        row = {
            "step": 0,
            "temperature": 0.0,
            "parent_id": 0,
            "is_new": True,
            "duplicate_of": 0,
            "rmsd": 0.0,
            "accepted": True,
            "ediff": self.state.ediff,
            "md_steps": 0,
            "opt_steps": opt_steps,
            "elapsed": self.state.elapsed,
        }
        minimum = self._snapshot()
        row_id = self._write(minimum, row, make_current=True)
        self._add_unique(_Minimum(row_id, energy, minimum))
        self._log(f"step 0: optimised the starting structure, E = {energy:.4f} eV (minimum #{row_id})")

    def _snapshot(self) -> Atoms:
        atoms = Atoms(self.atoms.numbers, self.atoms.positions.copy(), pbc=False)
        atoms.calc = SinglePointCalculator(
            atoms, energy=self.atoms.get_potential_energy(), forces=self.atoms.get_forces()
        )
        return atoms

    def _n_fragments(self, atoms: Atoms) -> int:
        if self.config.fragment_distance is None:
            return 1
        distances = np.linalg.norm(atoms.positions[:, None] - atoms.positions[None], axis=-1)
        return int(connected_components(distances < self.config.fragment_distance, directed=False)[0])

    def _bonds_changed(self, atoms: Atoms) -> str | None:
        """With ``keep_topology``: which bonds broke or formed relative to the starting minimum, else None."""
        if not self.config.keep_topology:
            return None
        if self._start_bonds is None:  # those of the step-0 minimum, computed once
            start = min(self._unique, key=lambda minimum: minimum.id).atoms
            self._start_bonds = {tuple(pair) for pair in covalent_bonds(start).tolist()}
        before = self._start_bonds
        after = {tuple(pair) for pair in covalent_bonds(atoms).tolist()}
        if before == after:
            return None
        symbols = atoms.get_chemical_symbols()

        def names(pairs: set) -> str:
            return ", ".join(f"{symbols[i]}{i}–{symbols[j]}{j}" for i, j in sorted(pairs)[:3]) + (
                " …" if len(pairs) > 3 else ""
            )

        broken, formed = before - after, after - before
        return "; ".join(
            ([f"broke {names(broken)}"] if broken else []) + ([f"formed {names(formed)}"] if formed else [])
        )

    def _skip(self, step: int, elapsed: Callable[[], float], reason: str, temperature_factor: float) -> None:
        """A step that found no minimum: only the state is stored (T scaled by ``temperature_factor``)."""
        self.state.step, self.state.elapsed = step, elapsed()
        self.state.temperature *= temperature_factor
        self._write(None, {})
        self._log(
            f"step {step}: {reason}; no minimum stored{'; T lowered' if temperature_factor < 1 else ''}"
        )

    def _step(self, step: int, elapsed: Callable[[], float]) -> None:
        config, state = self.config, self.state
        current = next(m for m in self._unique if m.id == state.current_id)
        rng = np.random.default_rng([config.seed, step])
        temperature = state.temperature
        self.atoms.positions = current.atoms.positions
        try:
            md_steps = self._escape(temperature, rng)
            converged, opt_steps = self._optimize()
        except So3kratesError as error:  # e.g. atoms pushed closer than the model's min_distance
            return self._skip(step, elapsed, f"escape at {temperature:.0f} K failed ({error})", config.beta3)
        if not converged:
            return self._skip(step, elapsed, f"not converged in {config.max_opt_steps} optimiser steps", 1.0)
        if self._n_fragments(self.atoms) > self._n_fragments(current.atoms):
            # A fragment beyond the interaction range never comes back: a dead end, not a minimum.
            return self._skip(
                step, elapsed, f"the structure dissociated at {temperature:.0f} K", config.beta3
            )
        changed = self._bonds_changed(self.atoms)
        if changed:  # another molecule, not another conformer: lower T as after a dissociation
            reason = f"bonds changed at {temperature:.0f} K ({changed})"
            return self._skip(step, elapsed, reason, config.beta3)

        energy = self.atoms.get_potential_energy()
        minimum = self._snapshot()
        known = self._find(minimum, energy)
        if known is not None and known[0].id == current.id:
            outcome, state.temperature = "returned to the current minimum", temperature * config.beta1
        elif known is not None:
            outcome, state.temperature = f"found #{known[0].id} again", temperature * config.beta2
        else:
            outcome, state.temperature = "new minimum", temperature * config.beta3
        accepted = False
        if known is None or known[0].id != current.id:
            accepted = energy < current.energy + state.ediff
            state.ediff *= config.alpha1 if accepted else config.alpha2
        state.step, state.elapsed = step, elapsed()
        row = {
            "step": step,
            "temperature": temperature,
            "parent_id": current.id,
            "is_new": known is None,
            "duplicate_of": known[0].id if known else 0,
            "rmsd": known[1] if known else 0.0,
            "accepted": bool(accepted),
            "ediff": state.ediff,
            "md_steps": md_steps,
            "opt_steps": opt_steps,
            "elapsed": state.elapsed,
        }
        if accepted and known is not None:
            state.current_id = known[0].id
        row_id = self._write(minimum, row, make_current=accepted and known is None)
        if known is None:
            self._add_unique(_Minimum(row_id, energy, minimum))
        self._log(
            f"step {step}: T = {temperature:.0f} K, E = {energy:.4f} eV (#{row_id}), {outcome}"
            f"{', accepted' if accepted else ''}; {len(self._unique)} unique, lowest "
            f"{self._energies[0]:.4f} eV"
        )

    def run(self, steps: int | None = None, max_time: float | None = None) -> int:
        """Hops until the database holds ``steps`` hopping steps or ``max_time`` seconds have passed.

        ``steps`` counts all steps of the search, including those of earlier runs, so repeating an
        interrupted command finishes the same search; ``max_time`` is the wall time of this call
        (checked between steps). Returns the number of steps done by this call.
        """
        if steps is None and max_time is None:
            raise ConfigError("minima hopping needs a budget: steps or max_time")
        start = time.perf_counter()
        if self.state is None:
            self._initialize()
        offset = self.state.elapsed

        def elapsed() -> float:
            return offset + time.perf_counter() - start

        done = 0
        while steps is None or self.state.step < steps:
            if max_time is not None and time.perf_counter() - start >= max_time:
                self._log(f"stopping after {max_time:g} s of wall time")
                break
            self._step(self.state.step + 1, elapsed)
            done += 1
        return done


def read_minima(db_path: str | os.PathLike, unique: bool = True) -> list[Atoms]:
    """The minima of a search database, lowest energy first.

    Each has a ``SinglePointCalculator`` with the stored energy and forces, and ``atoms.info`` holds its
    row id (``id``) and the columns of ``MINIMA_COLUMNS``.

    Args:
        db_path: ``minima.db`` written by ``MinimaHopping``.
        unique: only the unique minima (``is_new``); otherwise every row, duplicates included.
    """
    db_path = Path(db_path)
    if not db_path.is_file():
        raise DataError(f"{db_path}: minima database not found")
    db = ase.db.connect(db_path, type="db")
    rows = db.select(is_new=True) if unique else db.select()
    minima = []
    for row in rows:
        atoms = row.toatoms()
        atoms.info.update(row.key_value_pairs, id=row.id)
        minima.append(atoms)
    return sorted(minima, key=lambda atoms: atoms.get_potential_energy())
