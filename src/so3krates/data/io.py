"""Reading labelled structures from files (npz, ASE database, extxyz and everything ASE reads) and writing
them back as extxyz.

Every reader converts to internal units (Å, eV, eV/Å, eV/Å³) once, here, and checks each frame; a bad
input raises one ``DataError`` line naming the file, the frame (0-based) and the key, e.g.
``data/x.npz: frame 17: key 'R': positions contain NaN or inf``. Missing or non-finite *labels* are not
errors: they become NaN (masked by the loss), with one warning per file.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import ase.db
import ase.io
import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io.formats import string2index
from ase.stress import voigt_6_to_full_3x3_stress

from so3krates.data.neighbors import MAX_CELL_LENGTH, neighbor_list
from so3krates.data.structure import Structure
from so3krates.errors import DataError
from so3krates.files import atomic_path
from so3krates.units import ENERGY_UNITS, LENGTH_UNITS

MAX_ATOMIC_NUMBER = 118
SEARCH_CUTOFF = 2.0  # Å — neighbour-list cutoff of the min_distance check, see _check_distances

#: Auto-detected npz layouts: (positions, atomic numbers, energy, forces) keys.
NPZ_LAYOUTS = {
    "sGDML/MD17": ("R", "z", "E", "F"),
    "rMD17": ("coords", "nuclear_charges", "energies", "forces"),
    "ASE names": ("positions", "numbers", "energy", "forces"),
}


def read_structures(
    path: str | os.PathLike,
    *,
    energy_key: str | None = None,
    forces_key: str | None = None,
    stress_key: str | None = None,
    energy_unit: str = "eV",
    length_unit: str = "Å",
    index: str | int = ":",
    min_distance: float = 0.1,
) -> list[Structure]:
    """Labelled structures from a file, in Å, eV, eV/Å and eV/Å³.

    The reader is chosen by the file name:

    - ``.npz``: molecules (no cell) in the sGDML/MD17 layout (``R (n_frames, n_atoms, 3)``, ``z (n_atoms,)``,
      ``E (n_frames,)`` or ``(n_frames, 1)``, ``F (n_frames, n_atoms, 3)``) or the rMD17 layout (``coords``,
      ``nuclear_charges``, ``energies``, ``forces``) or with ASE's names (``positions``, ``numbers``,
      ``energy``, ``forces``), detected from the keys. ``z`` may also be
      ``(n_frames, n_atoms)``; ``z = 0`` marks padding atoms, which are dropped frame by frame.
    - ``.db``: an ASE database; labels are the row's calculator results, key-value pairs or ``data``.
    - anything else: ``ase.io.read`` (extxyz, ...); labels from ``atoms.info`` (energy, stress as Voigt 6,
      9 or 3x3) and ``atoms.arrays`` (forces), or from the attached calculator for the keys ``energy``,
      ``forces`` and ``stress``.

    Args:
        path: the file.
        energy_key: key of the total energy; None means auto (``E``/``energies``/``energy`` in npz by layout,
            else ``energy``).
        forces_key: key of the forces; None means ``F`` in sGDML npz, else ``forces``.
        stress_key: key of the stress (ASE sign convention); None means ``stress`` (npz has none).
        energy_unit: unit of the energies in the file, one of ``units.ENERGY_UNITS``.
        length_unit: unit of positions and cell in the file, one of ``units.LENGTH_UNITS``; forces are in
            energy_unit/length_unit and stress in energy_unit/length_unit³.
        index: frames to read, in ``ase.io.read`` syntax (``":"``, ``"10:20"``, ``-1``).
        min_distance: float, Å — two atoms (or an atom and a periodic image) closer than this are an
            error; 0 disables the check.

    Returns:
        One ``Structure`` per selected frame. An explicitly given key that is in no frame is an error; a
        default key that is in no frame gives a warning and NaN energies / no forces.

    Raises:
        DataError: the file is missing or unreadable, or a frame is malformed (see the module docstring).
    """
    name = str(path)
    energy_factor = _unit_factor(name, "energy_unit", energy_unit, ENERGY_UNITS)
    length_factor = _unit_factor(name, "length_unit", length_unit, LENGTH_UNITS)
    path = Path(path)
    if not path.is_file():
        raise _error(name, None, None, "file not found" if not path.exists() else "not a regular file")
    if path.stat().st_size == 0:
        raise _error(name, None, None, "the file is empty")

    suffix = path.suffix.lower()
    if suffix == ".npz":
        if stress_key is not None:
            raise _error(name, None, stress_key, "npz files hold molecules without a cell, so no stress")
        raw = _read_npz(name, energy_key, forces_key, index)
    elif suffix == ".db":
        raw = _read_db(name, energy_key or "energy", forces_key or "forces", stress_key or "stress", index)
    else:
        raw = _read_ase(name, energy_key or "energy", forces_key or "forces", stress_key or "stress", index)
    if not raw.frames:
        raise _error(name, None, None, f"no frames (index={index!r})")

    explicit = {
        "energy": energy_key is not None,
        "forces": forces_key is not None,
        "stress": stress_key is not None,
    }
    structures = _to_structures(name, raw, energy_factor, length_factor, min_distance)
    _check_labels_present(name, raw, explicit)
    return structures


def write_extxyz(
    path: str | os.PathLike,
    structures: Sequence[Structure],
    predictions: dict[str, Sequence] | None = None,
) -> None:
    """Writes structures with their reference labels and, optionally, predictions, as one extxyz file.

    References go to ``REF_energy`` (info, eV), ``REF_forces`` (arrays, (n_atoms, 3) eV/Å) and ``REF_stress``
    (info, 9 values of the 3x3 tensor, eV/Å³); missing labels (NaN energy, None forces/stress) are left out.
    Predictions go to the plain keys ``energy``/``forces``/``stress``, so ``ase.io.read`` returns them as
    calculator results. The file is replaced atomically.

    Args:
        path: the output file.
        structures: the structures, in internal units.
        predictions: ``{"energy": (n_structures,) eV, "forces": n_structures × (n_atoms, 3) eV/Å,
            "stress": n_structures × (3, 3) eV/Å³ (optional)}``; a committee's ``energy_uncertainty``
            (n_structures,) eV and ``forces_uncertainty`` n_structures × (n_atoms,) eV/Å go to info and arrays
            of the same names (with ``max_force_uncertainty`` in info).
    """
    predictions = predictions or {}
    unknown = set(predictions) - {"energy", "forces", "stress", "energy_uncertainty", "forces_uncertainty"}
    if unknown:
        raise ValueError(f"write_extxyz: unknown prediction keys {sorted(unknown)}")
    for key, values in predictions.items():
        if len(values) != len(structures):
            raise ValueError(
                f"write_extxyz: predictions[{key!r}] has {len(values)} entries, "
                f"expected one per structure ({len(structures)})"
            )
    images = []
    for n, structure in enumerate(structures):
        atoms = structure.to_atoms()
        if not np.isnan(structure.energy):
            atoms.info["REF_energy"] = float(structure.energy)
        if structure.forces is not None:
            atoms.arrays["REF_forces"] = np.asarray(structure.forces, dtype=np.float64)
        if structure.stress is not None:
            # A flat 9-vector, not a 3x3 array: ASE writes the latter as a _JSON string other readers reject.
            atoms.info["REF_stress"] = np.asarray(structure.stress, dtype=np.float64).reshape(9)
        results = {key: np.asarray(values[n], dtype=np.float64) for key, values in predictions.items()}
        if "energy_uncertainty" in results:  # a committee's spread (so3krates.committee)
            atoms.info["energy_uncertainty"] = float(results.pop("energy_uncertainty"))
        if "forces_uncertainty" in results:
            atoms.arrays["forces_uncertainty"] = results.pop("forces_uncertainty")
            atoms.info["max_force_uncertainty"] = float(
                np.max(atoms.arrays["forces_uncertainty"], initial=0.0)
            )
        if "energy" in results:
            results["energy"] = float(results["energy"])
        if results:
            atoms.calc = SinglePointCalculator(atoms, **results)
        images.append(atoms)
    with atomic_path(path) as tmp:
        ase.io.write(tmp, images, format="extxyz")


# ---------------------------------------------------------------------------------------------------------
# Readers: each returns frames in file units and the keys as the file calls them, for messages.


@dataclass
class _Frame:
    where: str  # "frame 17", for messages
    numbers: np.ndarray  # (n_atoms,) int
    positions: np.ndarray  # (n_atoms, 3) float, length_unit
    cell: np.ndarray  # (3, 3) float, length_unit
    pbc: np.ndarray  # (3,) bool
    energy: float | None = None  # energy_unit; None: key absent
    forces: np.ndarray | None = None  # (n_atoms, 3) energy_unit/length_unit
    stress: np.ndarray | None = None  # (3, 3) energy_unit/length_unit³
    total_charge: float = 0.0  # e
    total_spin: float = 0.0  # ħ


@dataclass
class _Raw:
    frames: list[_Frame]
    keys: dict[str, str]  # role ("numbers", "positions", "cell", "energy", "forces", "stress") → file key
    available: list[str] = field(default_factory=list)  # keys in the file (first frame), for messages


def _read_npz(name: str, energy_key: str | None, forces_key: str | None, index: str | int) -> _Raw:
    arrays = {}
    key = None
    try:
        with np.load(name, allow_pickle=False) as archive:
            for key in archive.files:  # one by one, so that an unreadable array (objects) is named
                arrays[key] = archive[key]
    except Exception as exc:
        raise _error(name, None, key, f"cannot read as npz: {type(exc).__name__}: {exc}") from exc
    available = sorted(arrays)
    layout = next((keys for keys in NPZ_LAYOUTS.values() if keys[0] in arrays), None)
    if layout is None:
        expected = " or ".join(repr(keys[0]) for keys in NPZ_LAYOUTS.values())
        raise _error(name, None, None, f"no positions: expected key {expected}; keys present: {available}")
    positions_key, numbers_key, auto_energy, auto_forces = layout
    if numbers_key not in arrays:
        raise _error(name, None, numbers_key, f"not found; keys present: {available}")
    for key in (energy_key, forces_key):
        if key is not None and key not in arrays:
            raise _error(name, None, key, f"not found; keys present: {available}")
    energy_key = energy_key or (auto_energy if auto_energy in arrays else None)
    forces_key = forces_key or (auto_forces if auto_forces in arrays else None)

    positions = _numeric(name, positions_key, arrays[positions_key])
    if positions.ndim != 3 or positions.shape[2] != 3:
        raise _error(name, None, positions_key, f"shape {positions.shape}, expected (n_frames, n_atoms, 3)")
    n_frames, n_atoms = positions.shape[:2]
    if n_frames == 0:
        raise _error(name, None, positions_key, "no frames")
    numbers = arrays[numbers_key]
    if numbers.shape not in ((n_atoms,), (n_frames, n_atoms)):
        raise _error(
            name,
            None,
            numbers_key,
            f"shape {numbers.shape}, expected ({n_atoms},) or ({n_frames}, {n_atoms}) "
            f"to match {positions_key!r} {positions.shape}",
        )
    numbers = np.broadcast_to(numbers, (n_frames, n_atoms))
    if not _is_integral(numbers):
        raise _error(name, None, numbers_key, "atomic numbers must be integers")
    # Before the cast to int64, which would turn a float Z = 1e30 into a meaningless negative number;
    # z = 0 is padding, dropped below.
    outside = np.argwhere((numbers < 0) | (numbers > MAX_ATOMIC_NUMBER))
    if len(outside):
        frame, atom = outside[0]
        raise _error(
            name,
            f"frame {frame}",
            numbers_key,
            f"atom {atom}: unknown element Z = {numbers[frame, atom]:g} (expected 1–118, or 0 for padding)",
        )
    numbers = numbers.astype(np.int64)
    energies = forces = None
    if energy_key is not None:
        energies = _numeric(name, energy_key, arrays[energy_key])
        if energies.shape not in ((n_frames,), (n_frames, 1)):
            raise _error(
                name,
                None,
                energy_key,
                f"shape {energies.shape}, expected ({n_frames},) or ({n_frames}, 1) "
                f"to match {n_frames} frames of {positions_key!r}",
            )
        energies = energies.reshape(n_frames)
    if forces_key is not None:
        forces = _numeric(name, forces_key, arrays[forces_key])
        if forces.shape != positions.shape:
            raise _error(
                name,
                None,
                forces_key,
                f"shape {forces.shape} does not match {positions_key!r} {positions.shape}",
            )

    frames = []
    for frame in _selected(name, index, n_frames):
        # z = 0 marks padding atoms (QM7-X style files padded to the largest molecule).
        real = numbers[frame] != 0
        frames.append(
            _Frame(
                where=f"frame {frame}",
                numbers=numbers[frame][real],
                positions=positions[frame][real],
                cell=np.zeros((3, 3)),
                pbc=np.zeros(3, dtype=bool),
                energy=None if energies is None else float(energies[frame]),
                forces=None if forces is None else forces[frame][real],
            )
        )
    keys = {
        "numbers": numbers_key,
        "positions": positions_key,
        "cell": "cell",
        "energy": energy_key or auto_energy,
        "forces": forces_key or auto_forces,
        "stress": "stress",
    }
    return _Raw(frames, keys, available)


def _read_db(name: str, energy_key: str, forces_key: str, stress_key: str, index: str | int) -> _Raw:
    try:
        rows = list(ase.db.connect(name, type="db").select())
    except Exception as exc:
        raise _error(name, None, None, f"cannot read as ASE database: {type(exc).__name__}: {exc}") from exc
    frames = []
    keys = {"numbers": "numbers", "positions": "positions", "cell": "cell"}
    keys |= {"energy": energy_key, "forces": forces_key, "stress": stress_key}
    available: list[str] = []
    for frame in _selected(name, index, len(rows)):
        row = rows[frame]
        where = f"frame {frame}"
        if not available:
            calculated = [
                key for key in ("energy", "free_energy", "forces", "stress") if row.get(key) is not None
            ]
            available = calculated + list(row.key_value_pairs) + list(row.data)
        atoms = row.toatoms()
        frames.append(
            _Frame(
                where=where,
                numbers=atoms.numbers,
                positions=atoms.positions,
                cell=atoms.cell.array,
                pbc=atoms.pbc,
                energy=_energy(name, where, energy_key, _db_value(row, energy_key)),
                forces=_forces(name, where, forces_key, _db_value(row, forces_key), len(atoms)),
                stress=_stress(name, where, stress_key, _db_value(row, stress_key)),
                # ASE databases keep a row's total charge as the sum of its initial charges (``charge``).
                **_charge_and_spin(name, where, {k: _db_value(row, k) for k in ("charge", "total_spin")}),
            )
        )
    return _Raw(frames, keys, available)


def _db_value(row: ase.db.row.AtomsRow, key: str) -> object:
    """A row's calculator result or key-value pair (both are row attributes), else its ``data`` entry."""
    value = row.get(key)
    return row.data.get(key) if value is None else value


def _read_ase(name: str, energy_key: str, forces_key: str, stress_key: str, index: str | int) -> _Raw:
    images: list[Atoms] = []
    try:
        # Frame by frame, so that a failure can name the frame it happened in.
        for atoms in ase.io.iread(name, index=index):
            images.append(atoms)
    except Exception as exc:
        # Before the first frame, the file as a whole may be at fault (format, encoding): name no frame,
        # unless an xyz file's atom-count lines show which frame is broken.
        where = _frame_labels(index, len(images) + 1)[-1] if images else None
        located = None if images else _xyz_count_error(name)
        if located is not None:
            raise _error(name, located[0], None, located[1]) from None
        raise _error(name, where, None, f"ase.io.read failed: {type(exc).__name__}: {exc}") from exc
    labels = _frame_labels(index, len(images))
    keys = {"numbers": "species", "positions": "positions", "cell": "cell"}
    keys |= {"energy": energy_key, "forces": forces_key, "stress": stress_key}
    frames = []
    for where, atoms in zip(labels, images, strict=True):
        results = atoms.calc.results if atoms.calc is not None else {}
        # ASE moves the standard names energy/forces/stress from the comment line into a calculator.
        energy = atoms.info.get(energy_key, results.get("energy") if energy_key == "energy" else None)
        forces = atoms.arrays.get(forces_key, results.get("forces") if forces_key == "forces" else None)
        stress = atoms.info.get(stress_key, results.get("stress") if stress_key == "stress" else None)
        frames.append(
            _Frame(
                where=where,
                numbers=atoms.numbers,
                positions=atoms.positions,
                cell=atoms.cell.array,
                pbc=atoms.pbc,
                energy=_energy(name, where, energy_key, energy),
                forces=_forces(name, where, forces_key, forces, len(atoms)),
                stress=_stress(name, where, stress_key, stress),
                **_charge_and_spin(name, where, atoms.info),
            )
        )
    first = images[0] if images else None
    available = (
        []
        if first is None
        else [*first.info, *(k for k in first.arrays if k not in ("numbers", "positions"))]
    )
    if first is not None and first.calc is not None:
        available += list(first.calc.results)
    return _Raw(frames, keys, available)


# ---------------------------------------------------------------------------------------------------------
# Labels and checks.


def _charge_and_spin(name: str, where: str, info: dict) -> dict[str, float]:
    """The frame's total charge (key ``charge``, e) and total spin S (``total_spin``, ħ; ≥ 0), 0 if absent."""
    values = {}
    for key, field_name in (("charge", "total_charge"), ("total_spin", "total_spin")):
        value = info.get(key)
        if value is not None:
            array = _numeric(name, key, value, where)
            if array.size != 1:
                raise _error(name, where, key, f"{key} has shape {array.shape}, expected a single number")
            value = float(array.reshape(()))
        if value is not None and not np.isfinite(value):
            raise _error(name, where, key, f"{key} is {value}, expected a finite number")
        if key == "total_spin" and value is not None and value < 0:
            raise _error(
                name, where, key, f"total_spin is {value}; the total spin S is ≥ 0 (½ for a doublet)"
            )
        values[field_name] = 0.0 if value is None else float(value)
    return values


def _energy(name: str, where: str, key: str, value: object) -> float | None:
    if value is None:
        return None
    array = _numeric(name, key, value, where)
    if array.size != 1:
        raise _error(name, where, key, f"energy has shape {array.shape}, expected a single number")
    return float(array.reshape(()))


def _forces(name: str, where: str, key: str, value: object, n_atoms: int) -> np.ndarray | None:
    if value is None:
        return None
    array = _numeric(name, key, value, where)
    if array.shape != (n_atoms, 3):
        raise _error(name, where, key, f"forces have shape {array.shape}, expected ({n_atoms}, 3)")
    return array


def _stress(name: str, where: str, key: str, value: object) -> np.ndarray | None:
    if value is None:
        return None
    array = _numeric(name, key, value, where)
    if array.size == 6:
        return voigt_6_to_full_3x3_stress(array.reshape(6))
    if array.size == 9:
        return array.reshape(3, 3)
    raise _error(name, where, key, f"stress has shape {array.shape}, expected Voigt 6, 9 or (3, 3)")


def _numeric(name: str, key: str, value: object, where: str | None = None) -> np.ndarray:
    """The value as a float64 array; booleans, strings and complex numbers are errors, not silently 1.0, NaN
    or their real part."""
    array = np.asarray(value)
    if (
        array.dtype == bool
        or not np.issubdtype(array.dtype, np.number)
        or np.issubdtype(array.dtype, np.complexfloating)
    ):
        hint = " (a bare key without '=' in the comment line?)" if array.dtype == bool else ""
        shown = repr(value) if array.size <= 3 else f"an array of {array.dtype}"
        raise _error(name, where, key, f"expected numbers, got {shown}{hint}")
    return array.astype(np.float64)


def _xyz_count_error(name: str) -> tuple[str, str] | None:
    """(frame, what) when an xyz file's frames do not follow their atom-count lines, else None.

    ase names no frame when the count line of one frame is wrong: it scans the whole file for frame starts
    before it returns any frame. This walk does the same and says where the count went wrong.
    """
    if Path(name).suffix.lower() not in (".xyz", ".extxyz"):
        return None
    try:
        with open(name, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None
    line, frame, previous = 0, 0, None
    while line < len(lines):
        text = lines[line].strip()
        if not text and all(not rest.strip() for rest in lines[line:]):
            return None  # trailing blank lines
        try:
            count = int(text)
        except ValueError:
            shown = text if len(text) <= 40 else text[:37] + "..."
            where = f"frame {frame}"
            what = f"line {line + 1}: expected the atom count of a frame, got {shown!r}"
            if previous is not None:
                count_line, atoms = previous[0] + 1, previous[1]
                what += f" (frame {frame - 1} says {atoms} atoms on line {count_line}: check that count)"
            return where, what
        if count < 0 or line + count + 2 > len(lines):
            return f"frame {frame}", f"line {line + 1}: {count} atoms, but the file ends before them"
        previous = (line, count)
        line += count + 2
        frame += 1
    return None


def _check_labels_present(name: str, raw: _Raw, explicit: dict[str, bool]) -> None:
    """A key the user named must be in some frame; a default key that is in none only earns a warning;
    frames without a label that others have are kept without it (masked) and counted in a warning."""
    for role in ("energy", "forces"):
        missing = [frame.where for frame in raw.frames if getattr(frame, role) is None]
        if missing and len(missing) < len(raw.frames):
            warnings.warn(
                f"{name}: {len(missing)} of {len(raw.frames)} frames have no {role} label under key "
                f"{raw.keys[role]!r} ({', '.join(missing[:3])}{', …' if len(missing) > 3 else ''}); they are "
                f"kept without it: masked in the loss, left out of the {role} metrics",
                stacklevel=3,
            )
    for role in ("energy", "forces", "stress"):
        if any(getattr(frame, role) is not None for frame in raw.frames):
            continue
        key = raw.keys[role]
        if explicit[role]:
            raise _error(name, None, key, f"not found in any frame; keys present: {raw.available}")
        if role != "stress":  # molecules have no stress: not worth a warning
            warnings.warn(
                f"{name}: no {role} labels under the default key {key!r} (keys present: {raw.available}); "
                f"pass {role}_key to read them",
                stacklevel=3,
            )


def _to_structures(
    name: str, raw: _Raw, energy_factor: float, length_factor: float, min_distance: float
) -> list[Structure]:
    keys = raw.keys
    forces_factor = energy_factor / length_factor
    stress_factor = energy_factor / length_factor**3
    masked = {"energies": 0, "force components": 0, "stress components": 0}
    structures = []
    for frame in raw.frames:
        where = frame.where
        numbers = np.asarray(frame.numbers)
        if len(numbers) == 0:
            raise _error(name, where, keys["numbers"], "the frame has no atoms")
        unknown = np.flatnonzero((numbers < 1) | (numbers > MAX_ATOMIC_NUMBER))
        if len(unknown):
            atom = unknown[0]
            raise _error(
                name,
                where,
                keys["numbers"],
                f"atom {atom}: unknown element Z = {numbers[atom]} (expected 1–118)",
            )
        positions = np.asarray(frame.positions, dtype=np.float64) * length_factor
        if not np.isfinite(positions).all():
            raise _error(name, where, keys["positions"], "positions contain NaN or inf")
        cell = np.asarray(frame.cell, dtype=np.float64) * length_factor
        pbc = np.asarray(frame.pbc, dtype=bool)
        if not np.isfinite(cell).all():
            raise _error(name, where, keys["cell"], "cell contains NaN or inf")
        if pbc.any() and np.abs(cell[pbc]).max() > MAX_CELL_LENGTH:
            raise _error(
                name,
                where,
                keys["cell"],
                f"a periodic cell vector of {np.abs(cell[pbc]).max():.3g} Å is longer than "
                f"{MAX_CELL_LENGTH:g} Å; make that direction non-periodic",
            )
        if pbc.any() and np.linalg.matrix_rank(cell[pbc]) < pbc.sum():
            raise _error(
                name, where, keys["cell"], f"periodic along {pbc.tolist()} but the cell is degenerate"
            )
        if min_distance > 0:
            _check_distances(name, where, keys["positions"], positions, cell, pbc, min_distance)

        energy = np.nan if frame.energy is None else frame.energy * energy_factor
        if not np.isfinite(energy):
            masked["energies"] += frame.energy is not None
            energy = np.nan
        forces = _masked(frame.forces, forces_factor, masked, "force components")
        stress = _masked(frame.stress, stress_factor, masked, "stress components")
        structures.append(
            Structure(
                positions,
                numbers.astype(np.int64),
                cell,
                pbc,
                float(energy),
                forces,
                stress,
                total_charge=frame.total_charge,
                total_spin=frame.total_spin,
            )
        )
    if any(masked.values()):
        counts = ", ".join(f"{count} {what}" for what, count in masked.items() if count)
        warnings.warn(f"{name}: NaN or inf labels masked in the loss: {counts}", stacklevel=3)
    return structures


def _masked(values: np.ndarray | None, factor: float, masked: dict[str, int], what: str) -> np.ndarray | None:
    """Labels in internal units with inf turned into NaN (the loss masks NaN), counting them."""
    if values is None:
        return None
    values = np.array(values, dtype=np.float64) * factor
    bad = ~np.isfinite(values)
    masked[what] += int(bad.sum())
    values[bad] = np.nan
    return values


def _check_distances(
    name: str,
    where: str,
    key: str,
    positions: np.ndarray,
    cell: np.ndarray,
    pbc: np.ndarray,
    min_distance: float,
) -> None:
    # vesin bins space into cells of the cutoff's size: a 0.1 Å cutoff means ~10⁵ bins per molecule and
    # milliseconds per frame, so ask for a few Å (microseconds, few pairs) and filter.
    try:
        idx_i, idx_j, shifts = neighbor_list(positions, cell, pbc, max(min_distance, SEARCH_CUTOFF))
    except DataError as error:
        raise _error(name, where, key, str(error)) from None
    distances = np.linalg.norm(positions[idx_j] - positions[idx_i] + shifts @ cell, axis=1)
    if not (distances < min_distance).any():
        return
    closest = int(np.argmin(distances))
    i, j, distance = int(idx_i[closest]), int(idx_j[closest]), distances[closest]
    pair = f"atom {i} and its own periodic image" if i == j else f"atoms {min(i, j)} and {max(i, j)}"
    if i != j and shifts[closest].any():
        pair += " (periodic image)"
    raise _error(
        name, where, key, f"{pair} are {distance:.3g} Å apart, closer than min_distance = {min_distance} Å"
    )


# ---------------------------------------------------------------------------------------------------------
# Small pieces.


def _error(name: str, where: str | None, key: str | None, what: str) -> DataError:
    """``file: frame k: key 'K': what`` on one line (messages from ASE or numpy may span several)."""
    parts = [name, *([where] if where else []), *([f"key {key!r}"] if key else []), what]
    return DataError(": ".join(" ".join(str(part).split()) for part in parts))


def _unit_factor(name: str, argument: str, unit: str, table: dict[str, float]) -> float:
    if unit not in table:
        raise _error(name, None, None, f"{argument} {unit!r} is not one of {', '.join(table)}")
    return table[unit]


def _is_integral(array: np.ndarray) -> bool:
    if np.issubdtype(array.dtype, np.integer):
        return True
    return bool(np.issubdtype(array.dtype, np.floating) and np.all(array == np.round(array)))


def _selected(name: str, index: str | int, n_frames: int) -> range | list[int]:
    """The 0-based frame numbers that ``index`` selects out of ``n_frames``."""
    try:
        selection = string2index(index) if isinstance(index, str) else index
        if isinstance(selection, slice):
            return range(n_frames)[selection]
        return [range(n_frames)[selection]]
    except (ValueError, IndexError, TypeError) as exc:
        raise _error(
            name, None, None, f"index {index!r} does not select frames of {n_frames}: {exc}"
        ) from exc


def _frame_labels(index: str | int, n_selected: int) -> list[str]:
    """Names of the frames ``ase.io.read`` returned, as numbers in the file where the index tells them."""
    selection = string2index(index) if isinstance(index, str) else index
    if isinstance(selection, int):
        return [f"frame {selection}"]
    start, step = selection.start or 0, selection.step or 1
    if start >= 0 and step > 0:
        return [f"frame {start + k * step}" for k in range(n_selected)]
    return [f"frame {k} of index {index!r}" for k in range(n_selected)]
