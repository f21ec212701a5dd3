"""What an MD run reports: one ``TrajectoryResult`` per trajectory (its ``summary.json``), and for replicas
the fraction still stable over time and the mean time to failure."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from so3krates.md.stability import StabilityFailure


@dataclass
class TrajectoryResult:
    """How one trajectory ended; ``summary()`` is what its ``summary.json`` holds."""

    directory: Path
    seed: int
    status: str  # "completed", "unstable", "interrupted", or "uncertain" (a committee's threshold stopped it)
    steps_done: int  # last step integrated (the failing one for an unstable run)
    time_ps: float
    failure: StabilityFailure | None
    last_good_step: int
    mean_temperature_K: float
    drift_eV_per_atom_per_ps: float | None  # slope of the conserved energy; None without one (Langevin)
    wall_time_s: float
    ns_per_day: float
    restarted_from_step: int | None
    extra: dict[str, Any]

    @property
    def stable(self) -> bool:
        return self.failure is None

    def summary(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "stable": self.stable,
            "seed": self.seed,
            "steps_done": self.steps_done,
            "time_ps": self.time_ps,
            "failure": self.failure.to_dict() if self.failure else None,
            "failure_time_ps": self.failure.time_ps if self.failure else None,
            "last_good_step": self.last_good_step,
            "mean_temperature_K": self.mean_temperature_K,
            "conserved_energy_drift_eV_per_atom_per_ps": self.drift_eV_per_atom_per_ps,
            "wall_time_s": self.wall_time_s,
            "ns_per_day": self.ns_per_day,
            "restarted_from_step": self.restarted_from_step,
            **self.extra,
        }


@dataclass
class MDResult:
    """All trajectories of one ``run_md`` call and where their summary went."""

    output_dir: Path
    runs: list[TrajectoryResult]
    summary_path: Path
    total_time_ps: float

    @property
    def fraction_stable(self) -> float:
        return sum(run.stable for run in self.runs) / len(self.runs)

    @property
    def mean_time_to_failure_ps(self) -> float | None:
        """Mean failure time of the runs that failed; None if none did (see ``replica_summary``)."""
        times = [run.failure.time_ps for run in self.runs if run.failure]
        return float(np.mean(times)) if times else None


def replica_summary(runs: list[TrajectoryResult], total_time_ps: float) -> dict[str, Any]:
    """Fraction of replicas still stable over time, and the mean time to failure.

    ``mean_time_to_failure_ps`` averages the failed runs only; ``mean_survival_time_ps`` counts stable runs
    at their full length, a lower bound of the true mean time to failure when some runs never failed.
    """
    failure_times = np.array([run.failure.time_ps if run.failure else math.inf for run in runs])
    grid = np.linspace(0.0, total_time_ps, 201)
    fraction = [float(np.mean(failure_times > t)) for t in grid]
    failed = failure_times[np.isfinite(failure_times)]
    return {
        "replicas": len(runs),
        "n_stable": int(np.sum(~np.isfinite(failure_times))),
        "fraction_stable": float(np.mean(~np.isfinite(failure_times))),
        "mean_time_to_failure_ps": float(np.mean(failed)) if len(failed) else None,
        "mean_survival_time_ps": float(np.mean(np.minimum(failure_times, total_time_ps))),
        "survival": {"time_ps": grid.tolist(), "fraction_stable": fraction},
        "runs": [{"directory": str(run.directory), **run.summary()} for run in runs],
    }


def mean_temperature(thermo: dict[str, np.ndarray]) -> float:
    """K — mean of the logged temperatures after step 0 (the start value where there are none)."""
    if not len(thermo.get("T_K", ())):
        return math.nan
    later = thermo["T_K"][thermo["step"] > 0]
    return float(np.mean(later)) if len(later) else float(thermo["T_K"][0])


def conserved_energy_drift(thermo: dict[str, np.ndarray], n_atoms: int) -> float | None:
    """eV/atom/ps — least-squares slope of the conserved energy against time."""
    time_ps = thermo.get("time_ps", np.zeros(0))
    if len(time_ps) < 2 or np.ptp(time_ps) == 0:
        return None
    slope = np.polyfit(time_ps, thermo["E_conserved_eV"], 1)[0]
    return float(slope) / n_atoms
