"""The measurement protocol that every runner of `benchmarks/speed.py` follows, ours and the peers'.

Each runner runs in its own environment (ours in the project's, the peers' in `benchmarks/.envs/*`) and
imports this module from its own directory; it imports neither torch at module level nor `so3krates`. One
runner process measures one model on one structure, so that peak memory is that of this case alone:

    python RUNNER.py --structure S.extxyz --threads 2 --dtype float32 --budget-seconds 20 \
        --md-steps 50 --out result.json [model size flags]

1. Energy + forces of the model itself on an input built once (no neighbour list in the timed part):
   three warm-up calls, then calls until `budget_seconds` is spent (at least `MIN_REPEATS`, at most
   `MAX_REPEATS`); every call's wall time is recorded.
2. MD through the package's own ASE calculator: velocity Verlet, 0.5 fs, from Maxwell–Boltzmann velocities
   at 300 K (seed 0); the calculator's neighbour-list handling is part of the step, as in a user's MD run.
   At most `--md-steps` steps and `MD_BUDGET_SECONDS` (at least `MIN_REPEATS` steps); skipped with
   `--md-steps 0`.
3. Peak resident memory of the process (`ru_maxrss`), after both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from collections.abc import Callable

import numpy as np

WARMUP_CALLS = 3
MIN_REPEATS = 3
# At most this many timed calls (100 until 6 December): a hundred calls of ours on a molecule took ~0.1 s,
# one moment of this shared VM, whose cores slow down by 1.3-1.6x for phases of a fraction of a second to
# several seconds (3BPA, one process, windows of 100 calls: 0.73 ms, then 1.08 for 1.9 s); the peers' hundred
# calls took ~1 s. With 1,000, every model's median spans up to --budget-seconds of its calls.
MAX_REPEATS = 1000
MD_BUDGET_SECONDS = 10.0  # MD timing stops after this (at least MIN_REPEATS steps), e.g. for 1000 atoms


def common_arguments(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--structure", required=True, help="extxyz file with one structure")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--budget-seconds", type=float, default=20.0, help="time for the E+F repeats")
    parser.add_argument("--md-steps", type=int, default=50, help="timed MD steps (0: no MD)")
    parser.add_argument("--out", required=True, help="JSON result")
    # The scaling mode of speed.py: calls of 10⁵ atoms take minutes, so fewer of them.
    parser.add_argument("--warmup-calls", type=int, default=WARMUP_CALLS)
    parser.add_argument("--min-repeats", type=int, default=MIN_REPEATS)
    parser.add_argument(
        "--no-calculator-check", action="store_true", help="skip the calculator's extra call (scaling mode)"
    )
    return parser


def limit_threads(n_threads: int) -> None:
    """Pin torch to `n_threads` intra-op threads and one inter-op thread (call before any torch work)."""
    import torch

    torch.set_num_threads(n_threads)
    torch.set_num_interop_threads(1)


def read_structure(path: str):
    import ase.io

    return ase.io.read(path, index=0)


def time_calls(
    call: Callable[[], object],
    budget_seconds: float,
    warmup_calls: int = WARMUP_CALLS,
    min_repeats: int = MIN_REPEATS,
) -> tuple[float, list[float]]:
    """(first call in s, wall times in s of the timed calls after the warm-up; the first call is one of
    the ``warmup_calls``)."""
    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    for _ in range(warmup_calls - 1):
        call()
    times: list[float] = []
    deadline = time.perf_counter() + budget_seconds
    while len(times) < MAX_REPEATS and (len(times) < min_repeats or time.perf_counter() < deadline):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return first, times


def time_md(atoms, calculator, n_steps: int, timestep_fs: float = 0.5) -> list[float]:
    """Wall time in s of each of `n_steps` velocity-Verlet steps (after two untimed steps)."""
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
    from ase.md.verlet import VelocityVerlet

    if n_steps <= 0:
        return []
    atoms = atoms.copy()
    atoms.calc = calculator
    MaxwellBoltzmannDistribution(atoms, temperature_K=300.0, rng=np.random.default_rng(0))
    Stationary(atoms)
    dynamics = VelocityVerlet(atoms, timestep=timestep_fs * units.fs)
    dynamics.run(2)
    times: list[float] = []
    deadline = time.perf_counter() + MD_BUDGET_SECONDS
    while len(times) < n_steps and (len(times) < MIN_REPEATS or time.perf_counter() < deadline):
        start = time.perf_counter()
        dynamics.run(1)
        times.append(time.perf_counter() - start)
    return times


def check_forces(forces, n_atoms: int, structure: str) -> None:
    """Raises unless `forces` (a torch tensor or None) is finite with shape (n_atoms, 3)."""
    import torch

    if forces is None or tuple(forces.shape) != (n_atoms, 3) or not torch.isfinite(forces).all():
        shape = None if forces is None else tuple(forces.shape)
        raise RuntimeError(f"{structure}: bad forces {shape}")


def check_calculator(atoms, calculator, energy: float, forces: np.ndarray) -> float:
    """The calculator's energy of the structure, after checking that it agrees with the timed call's."""
    atoms = atoms.copy()
    atoms.calc = calculator
    calculator_energy = float(atoms.get_potential_energy())
    scale = max(1.0, abs(energy))
    if abs(calculator_energy - energy) > 1e-4 * scale or not np.allclose(
        atoms.get_forces(), forces, rtol=1e-3, atol=1e-4 * max(1.0, float(np.abs(forces).max()))
    ):
        raise RuntimeError(f"calculator disagrees with the model: {calculator_energy} vs {energy} eV")
    return calculator_energy


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def write_result(path: str, result: dict) -> None:
    """Writes the result JSON atomically (temporary name, then rename)."""
    result = {
        **result,
        "peak_rss_mb": peak_rss_mb(),
        "python": platform.python_version(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    tmp = f"{path}.tmp"
    with open(tmp, "w") as handle:
        json.dump(result, handle, indent=1)
    os.replace(tmp, path)
