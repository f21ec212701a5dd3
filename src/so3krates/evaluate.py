"""``so3krates evaluate``: a trained model against reference data — metrics, predictions, parity plots."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from so3krates.checks import check_device, check_output_file, check_results_folder
from so3krates.data.dataset import GraphDataset
from so3krates.data.io import read_structures, write_extxyz
from so3krates.data.structure import Structure, unknown_elements
from so3krates.errors import DataError, So3kratesError
from so3krates.files import atomic_path, save_figure
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
    force_field: ForceField,
    structures: list[Structure],
    batch_size: int = 32,
    device: str = "cpu",
    compute_stress: bool = False,
) -> tuple[dict[str, list[np.ndarray]], dict[str, float]]:
    """Predictions per structure (energy eV, forces eV/Å, stress eV/Å³) and the error metrics."""
    dataset = GraphDataset(structures, force_field.cutoff, getattr(force_field, "long_range_cutoff", None))
    accumulator = ErrorAccumulator()
    predictions: dict[str, list] = {"energy": [], "forces": []}
    if compute_stress:
        predictions["stress"] = []
    for _, batch, labels in predict_batches(force_field, dataset, batch_size, device, compute_stress):
        accumulator.update(batch, labels)
        counts = labels["n_atoms"].tolist()
        predictions["energy"] += batch["energy"].cpu().double().tolist()
        predictions["forces"] += list(torch.split(batch["forces"].cpu().double(), counts))
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


#: The files ``evaluate`` writes to its output folder.
EVALUATE_FILES = ["predictions.extxyz", "parity.png", "metrics.json"]


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
    model, metadata = load_model(model_path, device=device, dtype=getattr(torch, dtype))
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
    predictions, metrics = predict(ForceField(model), structures, batch_size, device, compute_stress)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_extxyz(out_dir / "predictions.extxyz", structures, predictions)
    parity_plot(out_dir / "parity.png", structures, predictions)
    text = json.dumps(metrics, indent=2)
    with atomic_path(out_dir / "metrics.json") as tmp:
        tmp.write_text(text)
    if json_path is not None:
        with atomic_path(json_path) as tmp:
            tmp.write_text(text)
    log(format_table({"data": metrics}))
    log(f"predictions, parity plot and metrics in {out_dir}")
    return metrics
