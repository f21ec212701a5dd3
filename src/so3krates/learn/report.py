"""What ``so3krates learn`` reports per iteration: a summary line, ``iterations.csv`` and ``learning.png``.

Each row is one iteration's ``summary.json`` (see :class:`so3krates.learn.loop.Learner`); missing numbers are
None (an empty CSV cell, a gap in the plot).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from so3krates.files import atomic_path, save_figure

#: Columns of ``iterations.csv``, in order.
COLUMNS = (
    "iteration", "n_train", "n_holdout", "labels_used", "holdout_forces_mae", "best_member_forces_mae",
    "alpha", "threshold", "spearman", "replicas", "stable_replicas", "max_force_uncertainty",
    "n_candidates", "n_selected", "n_failed", "wall_s", "elapsed_s", "stop",
)  # fmt: skip


def iteration_line(row: dict[str, Any]) -> str:
    """One line that sums up an iteration, for the log."""
    mae = row["holdout_forces_mae"]
    times = [t for t in row["stable_time_ps"] if t is not None]
    return (
        f"iteration {row['iteration']}: {row['n_train']} train / {row['n_holdout']} held-out frames, "
        + (f"held-out F MAE {mae:.1f} meV/Å, " if mae is not None else "")
        + f"threshold σ {row['threshold']:.3g} eV/Å (α {row['alpha']:.2f}); "
        f"{row['stable_replicas']}/{row['replicas']} replicas completed "
        f"(mean {np.mean(times) if times else 0:.2f} ps), "
        f"max σ {row['max_force_uncertainty']:.3g} eV/Å; {row['n_candidates']} candidates → "
        f"{row['n_selected']} labelled ({row['n_failed']} failed); {row['labels_used']} reference calls, "
        f"{row['elapsed_s'] / 60:.1f} min" + (f"; stop: {row['stop']}" if row["stop"] else "")
    )


def write_iterations(directory: Path, rows: list[dict[str, Any]], target_ps: float) -> None:
    """``directory/iterations.csv`` and ``directory/learning.png`` from all iterations so far (atomically)."""
    with atomic_path(directory / "iterations.csv") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(COLUMNS)
            for row in rows:
                writer.writerow(["" if row.get(key) is None else row.get(key) for key in COLUMNS])
    plot_learning(directory / "learning.png", rows, target_ps)


def plot_learning(path: Path, rows: list[dict[str, Any]], target_ps: float) -> None:
    """Dataset size, held-out error, uncertainty and stable time per replica, against the iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    it = [row["iteration"] for row in rows]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    axes[0].plot(it, [row["n_train"] + row["n_holdout"] for row in rows], "o-")
    axes[0].set_ylabel("labelled frames")
    axes[1].plot(it, [row["holdout_forces_mae"] or np.nan for row in rows], "o-", label="committee")
    axes[1].plot(it, [row["best_member_forces_mae"] or np.nan for row in rows], "s--", label="best member")
    axes[1].set_ylabel("held-out force MAE / meV/Å")
    axes[1].legend()
    axes[2].semilogy(it, [row["max_force_uncertainty"] for row in rows], "o-", label="largest σ in MD")
    axes[2].semilogy(it, [row["threshold"] for row in rows], "k--", label="threshold")
    axes[2].set_ylabel("force uncertainty / eV/Å")
    axes[2].legend()
    for row in rows:
        times = [t if t is not None else 0.0 for t in row["stable_time_ps"]]
        axes[3].scatter([row["iteration"]] * len(times), times, s=14, color="C0")
    axes[3].axhline(target_ps, color="k", linestyle="--", linewidth=1)
    axes[3].set_ylabel("time per replica / ps")
    for axis in axes:
        axis.set_xlabel("iteration")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
