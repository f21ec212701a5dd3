"""What an MD run writes: ``thermo.csv`` and ``trajectory.extxyz`` (append-only), ``restart.npz``, frames
and summaries (atomic), and the PNG plots.

The append-only files are written one row or frame per ``write`` call and flushed; ``restart.npz`` records
their sizes, so a restart cuts them back to exactly the state it continues from.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

import ase.io
import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from so3krates.files import atomic_path, save_figure

#: thermo.csv columns: step, time (ps), potential, kinetic and conserved energy (eV), temperature (K).
THERMO_COLUMNS = ("step", "time_ps", "E_pot_eV", "E_kin_eV", "T_K", "E_conserved_eV")
#: extra column of periodic runs: the cell volume (Å³).
VOLUME_COLUMN = "volume_A3"
#: extra column of committee runs: the largest atomic force uncertainty of the frame (eV/Å).
UNCERTAINTY_COLUMN = "max_force_uncertainty_eV_A"


class AppendOnlyFile:
    """A text file that only grows, one flushed ``write`` per record; ``size`` is its length in bytes."""

    def __init__(self, path: Path, header: str = "") -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "a", encoding="utf-8")  # closed in close()
        if header and self._handle.tell() == 0:
            self.write(header)

    def write(self, text: str) -> None:
        self._handle.write(text)
        self._handle.flush()

    @property
    def size(self) -> int:
        return self._handle.tell()

    def close(self) -> None:
        self._handle.close()


def truncate(path: Path, size: int) -> None:
    """Cuts ``path`` back to ``size`` bytes (rows and frames written after a restart state are dropped)."""
    if path.is_file() and path.stat().st_size > size:
        os.truncate(path, size)


class ThermoLog(AppendOnlyFile):
    """``thermo.csv``: one row per ``thermo_every`` steps, see ``THERMO_COLUMNS``."""

    def __init__(self, path: Path, periodic: bool, uncertainty: bool = False) -> None:
        self.columns = (
            THERMO_COLUMNS
            + ((VOLUME_COLUMN,) if periodic else ())
            + ((UNCERTAINTY_COLUMN,) if uncertainty else ())
        )
        super().__init__(path, header=",".join(self.columns) + "\n")

    def append(self, row: dict[str, float]) -> None:
        values = [str(int(row["step"]))] + [repr(float(row[key])) for key in self.columns[1:]]
        self.write(",".join(values) + "\n")


def read_thermo(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The columns of a ``thermo.csv`` as float arrays (a torn last row, from a crash, is skipped)."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return {}
    header, body = rows[0], [row for row in rows[1:] if len(row) == len(rows[0])]
    data = np.array([[float(value) for value in row] for row in body], dtype=np.float64)
    data = data.reshape(-1, len(header))
    return {name: data[:, k] for k, name in enumerate(header)}


def frame(
    atoms: Atoms,
    energy: float,
    forces: np.ndarray,
    step: int,
    time_ps: float,
    stress: np.ndarray | None = None,
) -> Atoms:
    """A copy of ``atoms`` (positions, momenta, cell) with its energy, forces, step and time, for extxyz."""
    copy = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    copy.set_momenta(atoms.get_momenta(), apply_constraint=False)
    copy.info["step"] = int(step)
    copy.info["time_ps"] = float(time_ps)
    results: dict[str, Any] = {"energy": float(energy), "forces": np.asarray(forces, dtype=np.float64)}
    if stress is not None:
        results["stress"] = stress
    copy.calc = SinglePointCalculator(copy, **results)
    return copy


def extxyz_text(atoms: Atoms) -> str:
    buffer = io.StringIO()
    ase.io.write(buffer, atoms, format="extxyz")
    return buffer.getvalue()


def write_frame(path: Path, atoms: Atoms) -> None:
    """One frame as an extxyz file, written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(extxyz_text(atoms), encoding="utf-8")


def save_state(path: Path, state: dict[str, Any]) -> None:
    """The restart state (arrays, numbers, and JSON strings for nested entries) as ``.npz``, atomically."""
    arrays = {}
    for key, value in state.items():
        if isinstance(value, dict):
            arrays[key] = np.array(json.dumps(value))
        else:
            arrays[key] = np.asarray(value)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:  # a file name would get ".npz" appended by numpy
            np.savez(handle, **arrays)


def load_state(path: Path, json_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """Reads ``save_state``'s file; ``json_keys`` are decoded back into dicts."""
    with np.load(path, allow_pickle=False) as data:
        state: dict[str, Any] = {key: data[key] for key in data.files}
    for key in json_keys:
        if key in state:
            state[key] = json.loads(str(state[key]))
    return state


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_thermo(
    path: Path, thermo: dict[str, np.ndarray], n_atoms: int, target_K: float | None, conserving: bool = True
) -> None:
    """``thermo.png``: energies relative to the first row (meV/atom), and the temperature.

    ``conserving``: the ensemble has a conserved quantity (NVE, Nosé–Hoover, Bussi, NPT); for Langevin the
    ``E_conserved_eV`` column is E_pot + E_kin, and the plot says so.
    """
    if len(thermo.get("step", ())) == 0:
        return
    plt = _pyplot()
    time = thermo["time_ps"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (
        ("E_pot_eV", "E_pot"),
        ("E_kin_eV", "E_kin"),
        ("E_conserved_eV", "conserved" if conserving else "E_pot + E_kin (not conserved)"),
    ):
        axes[0].plot(time, 1e3 * (thermo[key] - thermo[key][0]) / n_atoms, label=label)
    axes[0].set_xlabel("time / ps")
    axes[0].set_ylabel("E − E(0) / meV per atom")
    axes[0].legend()
    axes[1].plot(time, thermo["T_K"], label="T")
    if target_K is not None:
        axes[1].axhline(target_K, color="k", linestyle="--", linewidth=1, label="target")
    axes[1].set_xlabel("time / ps")
    axes[1].set_ylabel("T / K")
    axes[1].legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def plot_survival(path: Path, time_ps: list[float], fraction: list[float], n_replicas: int) -> None:
    """``stability.png``: the fraction of replicas still stable against simulated time."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.step(time_ps, fraction, where="post")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("time / ps")
    ax.set_ylabel(f"fraction stable ({n_replicas} replicas)")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
