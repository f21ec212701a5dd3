"""The rMD17 protocol shared by the peer runners: data, wall-clock budget, test metrics, result file.

Each peer runner runs inside its own virtual environment (only numpy, ase and torch are assumed here) and
imports this module from its own directory. It never imports `so3krates`, so that the peers are measured
with their own packages only.

Protocol (written by `benchmarks/accuracy.py`, identical for every model):
  * train/valid: frames of the rMD17 `train_01` file selected by the indices JSON (950 / 50),
  * test: all frames of the rMD17 `test_01` file,
  * units: Å, eV, eV/Å (rMD17 stores kcal/mol and kcal/mol/Å),
  * budget: wall-clock seconds of the training loop (optimizer steps + validation after every epoch);
    data preparation, model construction and the final test evaluation are timed separately,
  * model selection: the weights (EMA weights where the package keeps them) with the lowest validation
    loss, the criterion the package itself uses for its best checkpoint.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

KCAL_PER_MOL_IN_EV = 0.0433641  # 1 kcal/mol in eV (rMD17 stores kcal/mol)


def limit_threads(n_threads: int) -> None:
    """Pin torch to `n_threads` intra-op threads and one inter-op thread (call before any torch work)."""
    import torch

    torch.set_num_threads(n_threads)
    torch.set_num_interop_threads(1)


def load_frames(path: str, indices: Iterable[int] | None = None) -> list:
    """Read rMD17 frames as `ase.Atoms` with energy (eV) in `info` and forces (eV/Å) in `arrays`.

    Args:
        path: rMD17 `.npz` file (keys nuclear_charges (n_atoms,), coords (n_frames, n_atoms, 3) Å,
            energies (n_frames,) kcal/mol, forces (n_frames, n_atoms, 3) kcal/mol/Å).
        indices: frames to read, in this order; all frames when None.

    Returns:
        `ase.Atoms` with `info["REF_energy"]` (float, eV) and `arrays["REF_forces"]` ((n_atoms, 3), eV/Å).
    """
    import ase

    data = np.load(path)
    numbers = data["nuclear_charges"].astype(int)
    frames = range(len(data["energies"])) if indices is None else indices
    atoms_list = []
    for k in frames:
        atoms = ase.Atoms(numbers=numbers, positions=data["coords"][k], pbc=False)
        atoms.info["REF_energy"] = float(data["energies"][k]) * KCAL_PER_MOL_IN_EV
        atoms.arrays["REF_forces"] = data["forces"][k] * KCAL_PER_MOL_IN_EV
        atoms_list.append(atoms)
    return atoms_list


def read_split(indices_path: str) -> tuple[list[int], list[int]]:
    """Train and validation frame indices (into the `train_01` file) from the harness's JSON."""
    with open(indices_path) as handle:
        split = json.load(handle)
    return [int(i) for i in split["train"]], [int(i) for i in split["valid"]]


@dataclass
class BudgetLog:
    """What the budgeted training loop did."""

    budget_seconds: float
    train_seconds: float = 0.0
    train_cpu_seconds: float = 0.0  # this process's CPU time over the loop
    other_jobs_cpu_seconds: float = 0.0  # CPU time of every other process on the machine over the loop
    steps: int = 0
    steps_per_epoch: int = 0
    epochs_completed: int = 0
    best_valid_loss: float = float("inf")
    best_epoch: float = 0.0
    history: list = field(default_factory=list)  # one entry per validation

    @property
    def epochs(self) -> float:
        return self.steps / self.steps_per_epoch if self.steps_per_epoch else 0.0


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has been busy since boot (all cores; idle and iowait excluded)."""
    with open("/proc/stat") as handle:
        fields = [int(x) for x in handle.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def train_for_budget(
    *,
    budget_seconds: float,
    steps_per_epoch: int,
    epoch_batches: Callable[[], Iterable],
    take_step: Callable[[object], float],
    validate: Callable[[], tuple[float, dict]],
    snapshot: Callable[[], dict],
    end_epoch: Callable[[float], None],
    log: Callable[[str], None] = print,
) -> tuple[BudgetLog, dict | None]:
    """Train until the wall clock says `budget_seconds`; keep the weights with the best validation loss.

    The clock runs over optimizer steps and the validation after every epoch. Training stops before the
    first step that would start after the budget; the partial epoch is then validated once more (so
    the last steps can win), which may run the loop a few seconds past the budget — `train_seconds`
    records the true time.

    Args:
        epoch_batches: returns an iterable over one shuffled epoch of training batches.
        take_step: one optimizer step (and EMA update) on a batch; returns the training loss.
        validate: (validation loss, metrics) with the weights that would be deployed (EMA if any).
        snapshot: a copy of those weights (a state dict) to restore for the test.
        end_epoch: called with the validation loss after each full epoch (learning-rate schedule).

    Returns:
        the log and the best snapshot.
    """
    record = BudgetLog(budget_seconds=budget_seconds, steps_per_epoch=steps_per_epoch)
    best_state = None
    start, cpu_start, busy_start = time.perf_counter(), time.process_time(), busy_cpu_seconds()

    def check(epoch_label: float) -> None:
        nonlocal best_state
        valid_loss, metrics = validate()
        elapsed = time.perf_counter() - start
        record.history.append(
            {
                "epoch": round(epoch_label, 3),
                "seconds": round(elapsed, 1),
                "valid_loss": valid_loss,
                **metrics,
            }
        )
        improved = valid_loss < record.best_valid_loss
        if improved:
            record.best_valid_loss, record.best_epoch = valid_loss, epoch_label
            best_state = snapshot()
        log(
            f"epoch {epoch_label:7.2f}  {elapsed:7.1f} s  valid loss {valid_loss:.6g}  "
            + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items())
            + ("  *" if improved else "")
        )

    out_of_time = False
    while not out_of_time:
        for batch in epoch_batches():
            if time.perf_counter() - start >= budget_seconds:
                out_of_time = True
                break
            loss = take_step(batch)
            if not np.isfinite(loss):
                raise RuntimeError(f"training loss became {loss} at step {record.steps}")
            record.steps += 1
        if out_of_time:
            if record.steps % steps_per_epoch:
                check(record.epochs)
            break
        record.epochs_completed += 1
        check(float(record.epochs_completed))
        end_epoch(record.history[-1]["valid_loss"])
    record.train_seconds = time.perf_counter() - start
    record.train_cpu_seconds = time.process_time() - cpu_start
    record.other_jobs_cpu_seconds = busy_cpu_seconds() - busy_start - record.train_cpu_seconds
    return record, best_state


def test_errors(
    reference: list, predicted_energies: np.ndarray, predicted_forces: list[np.ndarray]
) -> dict[str, float]:
    """Energy and force errors on the test frames.

    Args:
        reference: `ase.Atoms` from `load_frames`.
        predicted_energies: (n_frames,) float, eV.
        predicted_forces: n_frames arrays (n_atoms, 3) float, eV/Å.

    Returns:
        energy MAE/RMSE in meV (per structure) and force MAE/RMSE in meV/Å (per Cartesian component).
    """
    energy_error = np.asarray(predicted_energies) - np.array([a.info["REF_energy"] for a in reference])
    force_error = np.concatenate(
        [(f - a.arrays["REF_forces"]).ravel() for f, a in zip(predicted_forces, reference, strict=True)]
    )
    return {
        "energy_mae_meV": float(np.mean(np.abs(energy_error)) * 1e3),
        "energy_rmse_meV": float(np.sqrt(np.mean(energy_error**2)) * 1e3),
        "forces_mae_meV_per_A": float(np.mean(np.abs(force_error)) * 1e3),
        "forces_rmse_meV_per_A": float(np.sqrt(np.mean(force_error**2)) * 1e3),
        "n_structures": len(reference),
    }


def run_record(
    record: BudgetLog, budget_seconds: float, setup_seconds: float, test_start: float, errors: dict
) -> dict:
    """The result fields every peer runner reports, from its budget log and test errors."""
    return {
        "budget_seconds": budget_seconds,
        "train_seconds": record.train_seconds,
        "train_cpu_seconds": record.train_cpu_seconds,
        # Other processes' CPU time during the training loop, as a share of the machine (all cores):
        # jobs outside the lock that slowed this run down.
        "other_jobs_cpu_seconds": record.other_jobs_cpu_seconds,
        "other_jobs_cpu_share": record.other_jobs_cpu_seconds / (record.train_seconds * os.cpu_count()),
        "setup_seconds": setup_seconds,
        "test_seconds": time.perf_counter() - test_start,
        "epochs": record.epochs,
        "epochs_completed": record.epochs_completed,
        "steps": record.steps,
        "best_epoch": record.best_epoch,
        "best_valid_loss": record.best_valid_loss,
        "history": record.history,
        "test": errors,
    }


def write_result(path: str, result: dict) -> None:
    """Write the runner's result JSON (atomically: a crash never leaves half a file)."""
    import torch

    result = {
        **result,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(result, handle, indent=2)
        handle.write("\n")
    os.replace(tmp, path)
