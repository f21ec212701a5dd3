"""``so3krates evaluate``: a trained model against reference data — metrics, predictions, parity plots."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from so3krates.checks import check_device, check_output_file, check_results_folder
from so3krates.committee import (
    ENERGY_UNCERTAINTY,
    FORCES_UNCERTAINTY,
    Committee,
    load_committee,
    member_paths,
)
from so3krates.data.dataset import GraphDataset
from so3krates.data.io import read_structures, write_extxyz
from so3krates.data.structure import Structure, unknown_elements
from so3krates.errors import DataError, So3kratesError
from so3krates.files import save_figure, write_json
from so3krates.model.checkpoint import load_model
from so3krates.runtime.force_field import ForceField
from so3krates.runtime.predict import predict_batches
from so3krates.train.metrics import ErrorAccumulator, format_table


def check_species(structures: list[Structure], species: list[int], source: str) -> None:
    """Refuses the first structure with an element the model was not trained on, naming file and frame."""
    for frame, structure in enumerate(structures):
        reason = unknown_elements(structure.atomic_numbers, species)
        if reason:
            raise DataError(f"{source}: frame {frame}: key 'numbers': {reason}")


def predict(
    force_field: ForceField | Committee,
    structures: list[Structure],
    batch_size: int = 32,
    device: str = "cpu",
    compute_stress: bool = False,
) -> tuple[dict[str, list[np.ndarray]], dict[str, float]]:
    """Predictions per structure (energy eV, forces eV/Å, stress eV/Å³; a committee's mean, with its
    ``energy_uncertainty`` and ``forces_uncertainty``) and the error metrics."""
    dataset = GraphDataset(structures, force_field.cutoff, getattr(force_field, "long_range_cutoff", None))
    accumulator = ErrorAccumulator()
    predictions: dict[str, list] = {"energy": [], "forces": []}
    if compute_stress:
        predictions["stress"] = []
    committee = isinstance(force_field, Committee)
    if committee:
        predictions[ENERGY_UNCERTAINTY], predictions[FORCES_UNCERTAINTY] = [], []
    for _, batch, labels in predict_batches(force_field, dataset, batch_size, device, compute_stress):
        accumulator.update(batch, labels)
        counts = labels["n_atoms"].tolist()
        predictions["energy"] += batch["energy"].cpu().double().tolist()
        predictions["forces"] += list(torch.split(batch["forces"].cpu().double(), counts))
        if committee:
            predictions[ENERGY_UNCERTAINTY] += batch[ENERGY_UNCERTAINTY].cpu().double().tolist()
            predictions[FORCES_UNCERTAINTY] += [
                u.numpy() for u in torch.split(batch[FORCES_UNCERTAINTY].cpu().double(), counts)
            ]
        if compute_stress:
            predictions["stress"] += list(batch["stress"].cpu().double())
    predictions["forces"] = [f.numpy() for f in predictions["forces"]]
    if compute_stress:
        predictions["stress"] = [s.numpy() for s in predictions["stress"]]
    return predictions, accumulator.results()


def parity_plot(path: Path, structures: list[Structure], predictions: dict[str, list]) -> None:
    """Energy per atom and force components, prediction against reference, with MAE in the titles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_atoms = np.array([s.n_atoms for s in structures])
    reference_e = np.array([s.energy for s in structures]) / n_atoms
    predicted_e = np.array(predictions["energy"]) / n_atoms
    reference_f = np.concatenate(
        [s.forces.ravel() if s.forces is not None else np.full(3 * s.n_atoms, np.nan) for s in structures]
    )
    predicted_f = np.concatenate([f.ravel() for f in predictions["forces"]])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    for axis, ref, pred, label, unit in (
        (axes[0], reference_e, predicted_e, "energy per atom", "eV/atom"),
        (axes[1], reference_f, predicted_f, "force components", "eV/Å"),
    ):
        mask = np.isfinite(ref)
        if mask.any():
            ref, pred = ref[mask], pred[mask]
            if label.startswith("energy"):  # per-atom energies are compared relative to their mean
                shift = ref.mean()
                ref, pred = ref - shift, pred - shift
            mae = 1e3 * np.abs(pred - ref).mean()
            axis.scatter(ref, pred, s=4, alpha=0.5)
            low, high = min(ref.min(), pred.min()), max(ref.max(), pred.max())
            axis.plot([low, high], [low, high], color="black", lw=0.8)
            axis.set_title(f"{label}: MAE {mae:.2f} m{unit}")
        axis.set_xlabel(f"reference / {unit}")
        axis.set_ylabel(f"predicted / {unit}")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def uncertainty_against_error(
    structures: list[Structure], predictions: dict[str, list]
) -> dict[str, np.ndarray | float]:
    """Per structure: the committee's largest atomic force uncertainty and the largest true atomic force
    error (eV/Å), their Spearman rank correlation, and the same for energy (uncertainty vs |error|).

    Also the rank correlation of the mean atomic uncertainty with the mean atomic force error per structure,
    and of the atomic uncertainties with the atomic errors pooled over all atoms. Structures without
    reference forces (or energies) are left out of that correlation.
    """
    from scipy.stats import spearmanr

    sigmas = [np.asarray(u, dtype=np.float64) for u in predictions[FORCES_UNCERTAINTY]]
    errors = [
        np.linalg.norm(f - s.forces, axis=1) if s.forces is not None else np.full(len(f), np.nan)
        for s, f in zip(structures, predictions["forces"], strict=True)
    ]
    sigma_f = np.array([np.max(u, initial=0.0) for u in sigmas])
    error_f = np.array([np.max(e, initial=0.0) for e in errors])
    sigma_e = np.asarray(predictions[ENERGY_UNCERTAINTY], dtype=np.float64)
    error_e = np.abs(np.asarray(predictions["energy"]) - np.array([s.energy for s in structures]))

    def rho(x: np.ndarray, y: np.ndarray) -> float:
        mask = np.isfinite(x) & np.isfinite(y)
        if mask.sum() < 3 or np.ptp(x[mask]) == 0 or np.ptp(y[mask]) == 0:
            return float("nan")
        return float(spearmanr(x[mask], y[mask]).statistic)

    def mean(values: list[np.ndarray]) -> np.ndarray:
        return np.array([np.mean(v) if len(v) else np.nan for v in values])

    pooled = (np.concatenate(sigmas), np.concatenate(errors)) if sigmas else (np.zeros(0), np.zeros(0))
    return {
        "max_force_uncertainty": sigma_f,
        "max_force_error": error_f,
        "energy_uncertainty": sigma_e,
        "energy_error": error_e,
        "spearman_forces": rho(sigma_f, error_f),
        "spearman_forces_mean": rho(mean(sigmas), mean(errors)),
        "spearman_forces_atoms": rho(*pooled),
        "spearman_energy": rho(sigma_e, error_e),
    }


def uncertainty_plot(path: Path, analysis: dict[str, np.ndarray | float]) -> None:
    """Committee uncertainty against the true error per structure (forces and energy), log–log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    for axis, sigma, error, rho, label, unit in (
        (
            axes[0],
            analysis["max_force_uncertainty"],
            analysis["max_force_error"],
            analysis["spearman_forces"],
            "largest atomic force",
            "eV/Å",
        ),
        (
            axes[1],
            analysis["energy_uncertainty"],
            analysis["energy_error"],
            analysis["spearman_energy"],
            "energy",
            "eV",
        ),
    ):
        mask = np.isfinite(sigma) & np.isfinite(error) & (sigma > 0) & (error > 0)
        axis.scatter(sigma[mask], error[mask], s=5, alpha=0.5)
        if mask.any():
            low = min(sigma[mask].min(), error[mask].min())
            high = max(sigma[mask].max(), error[mask].max())
            axis.plot([low, high], [low, high], color="black", lw=0.8, label="error = uncertainty")
            axis.set_xscale("log")
            axis.set_yscale("log")
            axis.legend(loc="upper left")
        axis.set_title(f"{label}: Spearman ρ = {rho:.2f}")
        axis.set_xlabel(f"committee uncertainty / {unit}")
        axis.set_ylabel(f"true error / {unit}")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


#: The files ``evaluate`` writes to its output folder (a committee also writes ``uncertainty.png``).
EVALUATE_FILES = ["predictions.extxyz", "parity.png", "metrics.json", "uncertainty.png"]


def default_output_dir(model_path: str | os.PathLike, data_path: str | os.PathLike) -> Path:
    """``RUN/eval_<data file stem>`` next to the checkpoint."""
    return Path(model_path).parent / f"eval_{Path(data_path).stem}"


def evaluate_file(
    model_path: str | os.PathLike,
    data_path: str | os.PathLike,
    *,
    out_dir: str | os.PathLike | None = None,
    json_path: str | os.PathLike | None = None,
    energy_key: str | None = None,
    forces_key: str | None = None,
    stress_key: str | None = None,
    energy_unit: str = "eV",
    length_unit: str = "Å",
    batch_size: int = 32,
    device: str = "cpu",
    dtype: str = "float64",
    overwrite: bool = False,
    log=print,
) -> dict[str, float]:
    """Evaluates a checkpoint on a data file; writes predictions (extxyz), parity plot and metrics JSON.

    Everything is checked before anything is written, so bad input leaves no partial output.
    """
    out_dir = Path(out_dir) if out_dir is not None else default_output_dir(model_path, data_path)
    check_results_folder(out_dir, EVALUATE_FILES, overwrite, "--out-dir")
    if json_path is not None:
        check_output_file(json_path, "--json", overwrite=overwrite)
    check_device(device)
    if batch_size < 1:
        raise So3kratesError(f"batch size must be at least 1, not {batch_size}")
    members = member_paths(model_path)
    if members is not None:
        try:
            force_field, metadata = load_committee(members, device, getattr(torch, dtype))
        except So3kratesError as error:
            raise DataError(f"{model_path}: {error}") from None
    else:
        model, metadata = load_model(model_path, device=device, dtype=getattr(torch, dtype))
        force_field = ForceField(model)
    structures = read_structures(
        data_path,
        energy_key=energy_key,
        forces_key=forces_key,
        stress_key=stress_key,
        energy_unit=energy_unit,
        length_unit=length_unit,
    )
    check_species(structures, metadata.get("species") or list(range(1, 119)), str(data_path))
    compute_stress = any(s.stress is not None and s.pbc.any() for s in structures)
    predictions, metrics = predict(force_field, structures, batch_size, device, compute_stress)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_extxyz(out_dir / "predictions.extxyz", structures, predictions)
    parity_plot(out_dir / "parity.png", structures, predictions)
    if members is None:
        (out_dir / "uncertainty.png").unlink(missing_ok=True)  # a committee's, from an earlier evaluation
    else:
        analysis = uncertainty_against_error(structures, predictions)
        uncertainty_plot(out_dir / "uncertainty.png", analysis)
        metrics = {
            **metrics,
            "committee_size": len(members),
            "spearman_force_uncertainty_vs_error": analysis["spearman_forces"],
            "spearman_mean_force_uncertainty_vs_error": analysis["spearman_forces_mean"],
            "spearman_atomic_force_uncertainty_vs_error": analysis["spearman_forces_atoms"],
            "spearman_energy_uncertainty_vs_error": analysis["spearman_energy"],
            "mean_max_force_uncertainty": float(np.mean(analysis["max_force_uncertainty"])),
        }
    write_json(out_dir / "metrics.json", metrics)
    if json_path is not None:
        write_json(json_path, metrics)
    log(format_table({"data": metrics}))
    if members is not None:
        log(
            f"committee of {len(members)}: Spearman ρ(largest atomic force uncertainty, largest atomic force "
            f"error) = {metrics['spearman_force_uncertainty_vs_error']:.3f} over {len(structures)} frames "
            f"(mean over atoms: {metrics['spearman_mean_force_uncertainty_vs_error']:.3f}, all atoms pooled: "
            f"{metrics['spearman_atomic_force_uncertainty_vs_error']:.3f}); "
            f"energy ρ = {metrics['spearman_energy_uncertainty_vs_error']:.3f} (uncertainty.png)"
        )
    log(f"predictions, parity plot and metrics in {out_dir}")
    return metrics
