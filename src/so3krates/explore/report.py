"""What a minima-hopping search found: discovery curve, energy histogram, lowest minima, re-scoring.

``write_report`` turns ``minima.db`` into files (all written atomically):

- ``unique_minima.csv`` / ``unique_minima.png``: number of unique minima and the lowest energy after each
  step, with the wall time — a curve still rising means the search is not converged;
- ``energy_histogram.png``: energies of the unique minima relative to the lowest;
- ``lowest_minima.extxyz``: the lowest K unique minima with energies, forces and their database columns.

``rescore`` re-optimises selected minima with a reference calculator (e.g. GFN2-xTB) and reports how far
the model's energies and geometries are from the reference's.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import ase.db
import ase.io
import numpy as np
from ase import Atoms
from ase.calculators.calculator import CalculationFailed, Calculator
from ase.calculators.singlepoint import SinglePointCalculator
from ase.optimize import BFGS

from so3krates.errors import DataError
from so3krates.explore.compare import rmsd
from so3krates.explore.hopping import read_minima
from so3krates.files import atomic_path, save_figure

HISTORY_COLUMNS = ("step", "elapsed_s", "n_minima", "n_unique", "lowest_energy_eV")


def discovery_history(db_path: str | os.PathLike) -> list[dict[str, float]]:
    """One entry per stored minimum in the order found: step, wall time (s), minima stored so far,
    unique minima so far, lowest energy so far (eV)."""
    db_path = Path(db_path)
    if not db_path.is_file():
        raise DataError(f"{db_path}: minima database not found")
    rows = sorted(ase.db.connect(db_path, type="db").select(), key=lambda row: row.id)
    history, n_unique, lowest = [], 0, math.inf
    for n, row in enumerate(rows, start=1):
        n_unique += bool(row.is_new)
        lowest = min(lowest, row.energy)
        history.append(
            {
                "step": row.step,
                "elapsed_s": row.elapsed,
                "n_minima": n,
                "n_unique": n_unique,
                "lowest_energy_eV": lowest,
            }
        )
    return history


def _save_figure(figure, path: Path) -> None:

    save_figure(figure, path, dpi=120)


def plot_discovery(history: list[dict[str, float]], path: str | os.PathLike) -> None:
    """Unique minima and lowest energy against the hopping step, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [entry["step"] for entry in history]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
    top.step(steps, [entry["n_unique"] for entry in history], where="post")
    top.set_ylabel("unique minima")
    lowest = np.array([entry["lowest_energy_eV"] for entry in history])
    bottom.step(steps, lowest - lowest[-1], where="post")
    bottom.set_ylabel("lowest energy − final lowest (eV)")
    bottom.set_xlabel("hopping step")
    figure.tight_layout()
    _save_figure(figure, Path(path))


def plot_energy_histogram(energies: np.ndarray, path: str | os.PathLike) -> None:
    """Histogram of energies (eV) relative to the lowest, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    relative = np.asarray(energies) - np.min(energies)
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.hist(relative, bins=max(5, min(50, len(relative))))
    axes.set_xlabel("E − E_lowest (eV)")
    axes.set_ylabel("unique minima")
    axes.set_title(f"{len(relative)} unique minima")
    figure.tight_layout()
    _save_figure(figure, Path(path))


def write_report(db_path: str | os.PathLike, out_dir: str | os.PathLike, lowest: int = 10) -> dict[str, Path]:
    """Writes the summary files of a search (see the module docstring) and returns their paths.

    Args:
        db_path: ``minima.db`` of a search.
        out_dir: folder for the files (created if needed).
        lowest: how many of the lowest unique minima go to ``lowest_minima.extxyz``.
    """
    out_dir = Path(out_dir)
    history = discovery_history(db_path)
    if not history:
        raise DataError(f"{db_path}: the database holds no minima yet")
    paths = {
        "history_csv": out_dir / "unique_minima.csv",
        "history_png": out_dir / "unique_minima.png",
        "histogram_png": out_dir / "energy_histogram.png",
        "lowest_extxyz": out_dir / "lowest_minima.extxyz",
    }
    with atomic_path(paths["history_csv"]) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=HISTORY_COLUMNS)
        writer.writeheader()
        writer.writerows(history)
    plot_discovery(history, paths["history_png"])
    minima = read_minima(db_path)
    energies = np.array([atoms.get_potential_energy() for atoms in minima])
    plot_energy_histogram(energies, paths["histogram_png"])
    for atoms, energy in zip(minima, energies, strict=True):
        atoms.info["relative_energy"] = float(energy - energies[0])
    with atomic_path(paths["lowest_extxyz"]) as tmp:
        ase.io.write(tmp, minima[:lowest], format="extxyz")
    return paths


@dataclass(frozen=True)
class RescoreResult:
    """A model minimum compared with the reference minimum it relaxes into.

    Energies in eV, RMSD in Å. ``model_energy_at_reference_minimum`` is NaN without a model calculator.
    """

    id: int
    model_energy: float  # model, at the model minimum
    reference_energy_at_model_minimum: float
    reference_energy: float  # reference, at the reference minimum
    model_energy_at_reference_minimum: float
    error_at_model_minimum: float  # model − reference at the model minimum
    error_at_reference_minimum: float  # model − reference at the reference minimum
    rmsd: float  # between the model's and the reference's minimum (permutation-aware, aligned)
    reference_fmax_at_model_minimum: float  # eV/Å: how far the model minimum is from a reference one
    converged: bool  # the reference optimisation reached fmax
    reference_minimum: Atoms | None  # None when the reference calculation failed
    failure: str = ""  # why the reference calculation failed (e.g. SCF not converged); "" if it did not

    def as_row(self) -> dict[str, float]:
        row = asdict(self)
        del row["reference_minimum"]
        return row


def rescore(
    minima: list[Atoms],
    reference_calculator: Calculator,
    fmax: float = 0.01,
    model_calculator: Calculator | None = None,
    max_steps: int = 1000,
    log=None,
) -> list[RescoreResult]:
    """Re-optimises model minima with a reference calculator and compares energies and geometries.

    Args:
        minima: model minima with their model energy attached (e.g. ``read_minima(db)[:5]``);
            ``atoms.info['id']`` names them in the result.
        reference_calculator: ASE calculator of the reference method, e.g. ``TBLite(method="GFN2-xTB")``.
        fmax: eV/Å — convergence of the reference optimisation.
        model_calculator: the model, to evaluate it at the reference minimum; without it that energy and
            error are NaN.
        max_steps: reference optimiser steps per minimum.
        log: called with one line per minimum, or ``None``.
    """
    results = []
    for index, minimum in enumerate(minima):
        model_energy = minimum.get_potential_energy()
        atoms = Atoms(minimum.numbers, minimum.positions.copy(), pbc=False)
        atoms.calc = reference_calculator
        try:
            reference_at_model = atoms.get_potential_energy()
            reference_fmax = float(np.linalg.norm(atoms.get_forces(), axis=1).max())
            optimizer = BFGS(atoms, logfile=None)
            converged = bool(optimizer.run(fmax=fmax, steps=max_steps))
            reference_energy = atoms.get_potential_energy()
        except (CalculationFailed, RuntimeError) as error:
            # A reference method can fail on an odd structure (xTB: SCF not converged); that minimum is
            # reported as failed and the others are still compared.
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            nan = math.nan
            failed = RescoreResult(
                id=int(minimum.info.get("id", index)),
                model_energy=model_energy,
                reference_energy_at_model_minimum=nan,
                reference_energy=nan,
                model_energy_at_reference_minimum=nan,
                error_at_model_minimum=nan,
                error_at_reference_minimum=nan,
                rmsd=nan,
                reference_fmax_at_model_minimum=nan,
                converged=False,
                reference_minimum=None,
                failure=message,
            )
            results.append(failed)
            if log is not None:
                log(f"rescored #{results[-1].id}: the reference calculation failed ({message})")
            continue
        reference_minimum = Atoms(atoms.numbers, atoms.positions.copy(), pbc=False)
        reference_minimum.calc = SinglePointCalculator(
            reference_minimum, energy=reference_energy, forces=atoms.get_forces()
        )
        model_at_reference = math.nan
        if model_calculator is not None:
            probe = reference_minimum.copy()
            probe.calc = model_calculator
            model_at_reference = probe.get_potential_energy()
        result = RescoreResult(
            id=int(minimum.info.get("id", index)),
            model_energy=model_energy,
            reference_energy_at_model_minimum=reference_at_model,
            reference_energy=reference_energy,
            model_energy_at_reference_minimum=model_at_reference,
            error_at_model_minimum=model_energy - reference_at_model,
            error_at_reference_minimum=model_at_reference - reference_energy,
            rmsd=rmsd(minimum, reference_minimum),
            reference_fmax_at_model_minimum=reference_fmax,
            converged=converged,
            reference_minimum=reference_minimum,
        )
        results.append(result)
        if log is not None:
            log(
                f"rescored #{result.id}: model − reference {1e3 * result.error_at_model_minimum:+.1f} meV at "
                f"the model minimum, {1e3 * result.error_at_reference_minimum:+.1f} meV at the reference "
                f"minimum, RMSD {result.rmsd:.3f} Å{'' if converged else ' (reference not converged)'}"
            )
    return results


def write_rescore(results: list[RescoreResult], out_dir: str | os.PathLike) -> dict[str, Path]:
    """``rescore.csv`` (one row per minimum, with energies relative to the lowest of the set for model and
    reference, which removes any constant offset between the two) and ``reference_minima.extxyz``."""
    out_dir = Path(out_dir)
    paths = {"csv": out_dir / "rescore.csv", "extxyz": out_dir / "reference_minima.extxyz"}
    if not results:
        raise DataError("no minima to rescore")
    rows = [result.as_row() for result in results]
    lowest_model = min(row["model_energy"] for row in rows)
    references = [row["reference_energy"] for row in rows if not math.isnan(row["reference_energy"])]
    lowest_reference = min(references, default=math.nan)
    for row in rows:
        row["model_relative"] = row["model_energy"] - lowest_model
        row["reference_relative"] = row["reference_energy"] - lowest_reference
    with atomic_path(paths["csv"]) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    images = []
    for result in results:
        if result.reference_minimum is None:
            continue
        atoms = result.reference_minimum.copy()
        atoms.info.update(id=result.id, reference_energy=result.reference_energy)
        images.append(atoms)
    if not images:  # every reference calculation failed
        del paths["extxyz"]
        return paths
    with atomic_path(paths["extxyz"]) as tmp:
        ase.io.write(tmp, images, format="extxyz")
    return paths
