"""Issue 21, ρ ≥ 0.5: does an uncertainty rank per-structure errors where the data cover a trajectory evenly?

    python benchmarks/committee_resampling/even_coverage.py setup [--steps N] [--frames M]  # configs
    bash benchmarks/committee_resampling/train.sh VARIANT      # (in benchmarks/runs/even_coverage)
    python benchmarks/committee_resampling/even_coverage.py analyze [--steps N] [--frames M]  # rho

VARIANT is `even` for the default 3,000 optimizer steps per member on 115 frames, with `_sN` appended for
`--steps N` (the same frames and bootstrap draws, members trained longer) and `_fM` for `--frames M` (M
frames at even intervals, e.g. 400 for the loop's whole label budget); `setup` prints it.

The `so3krates learn` committee's data cover the shared 2000-frame alanine-dipeptide trajectory evenly, and
its force uncertainty ranks the per-structure error with ρ ≈ 0.2 only
(`results/learn/committee_resampling.md`).
Here a committee of the same size and model (4 members, paper preset with 2 layers, 3,000 optimizer steps,
each on its own bootstrap draw) learns 115 frames taken at even intervals from that trajectory (as many as
the loop labelled), and the remaining 1,885 frames are the test set. Besides the committee's spread, a
second uncertainty that needs no committee is tried: the distance of each atom's last-layer features to the
nearest training atom of the same element (per member, averaged over the members), largest per structure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RUN = HERE.parent / "runs" / "even_coverage"
DATA = HERE.parents[2] / "shared" / "data" / "generated" / "ala_dipeptide_gfn2xtb_500K_2000.extxyz"
N_FRAMES, STEPS, MEMBERS = 115, 3000, 4
#: `--diverse`: every member its own architecture (same cutoff, so they still form one committee), so that
#: their disagreement also contains the systematic errors that one architecture repeats in every seed.
DIVERSE = (
    {"preset": "paper", "n_layers": 2},
    {"preset": "paper", "n_layers": 2, "n_features": 96, "degrees": [1, 2]},
    {"preset": "paper", "n_layers": 3},
    {
        "preset": "paper",
        "n_layers": 2,
        "use_layer_norm": True,
        "use_residual_mlp": True,
        "use_qk_activation": True,
    },
)


def selected(frames: int) -> np.ndarray:
    return np.unique(np.linspace(0, 1999, frames).round().astype(int))


def variant(steps: int, frames: int, diverse: bool) -> str:
    """Name of the committee trained for ``steps`` optimizer steps per member on ``frames`` frames (configs,
    runs, results)."""
    name = "even" + (f"_s{steps}" if steps != STEPS else "") + (f"_f{frames}" if frames != N_FRAMES else "")
    return name + ("_div" if diverse else "")


def setup(steps: int, n_frames: int, diverse: bool) -> None:
    import ase.io
    import yaml

    RUN.mkdir(parents=True, exist_ok=True)
    frames = ase.io.read(DATA, ":")
    chosen = selected(n_frames)
    name = variant(steps, n_frames, diverse)
    train = []
    for k in chosen:
        atoms = frames[k].copy()
        atoms.info["REF_energy"] = frames[k].get_potential_energy()
        atoms.arrays["REF_forces"] = frames[k].get_forces()
        atoms.calc = None
        train.append(atoms)
    for m in range(MEMBERS):
        draw = np.random.default_rng(1000 + m).choice(len(train), len(train), replace=True)
        draw_file = f"boot_{m}.extxyz" if n_frames == N_FRAMES else f"boot_f{n_frames}_{m}.extxyz"
        ase.io.write(RUN / draw_file, [train[i] for i in draw])
        config = member_config(m, f"{name}/member_{m}", draw_file, steps, int(0.9 * len(train)))
        if diverse:
            config["model"] = dict(DIVERSE[m])
        (RUN / f"{name}_m{m}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    print(f"{len(train)} frames, configs in {RUN}; train with: bash train.sh {name}")


def member_config(m: int, run_dir: str, train_file: str, steps: int, n_train: int) -> dict:
    """`so3krates train` config of committee member m: the paper model with 2 layers (as `so3krates learn`
    trains it), its own 10 % validation split and seed, about `steps` optimizer steps of batch 5."""
    return {
        "run_dir": run_dir,
        "data": {
            "train_file": train_file,
            "energy_key": "REF_energy",
            "forces_key": "REF_forces",
            "valid_fraction": 0.1,
            "split_seed": m,
            "n_test": 0,
        },
        "model": {"preset": "paper", "n_layers": 2},
        "training": {
            "progress": False,
            "max_epochs": int(np.ceil(steps * 5 / n_train)),
            "seed": m,
            "threads": 1,
            "dtype": "float32",
        },
    }


def last_features(energy_function, structure) -> np.ndarray:
    """Per-atom invariant features after the last layer (the readout's input), (n_atoms, F)."""
    import torch

    from so3krates import atoms_to_graph
    from so3krates.runtime.layout import EdgeLayout

    graph = atoms_to_graph(structure, energy_function.model.cutoff)
    with torch.no_grad():
        vectors = graph.edge_vectors().to(energy_function.model.dtype)
        h = energy_function.features(vectors, graph.atomic_numbers, EdgeLayout(graph.idx_i, graph.idx_j))
    return h.double().numpy()


def calibrated_ceiling(sigma: np.ndarray, rng: np.random.Generator, draws: int = 200) -> dict:
    """The ρ that a perfectly calibrated uncertainty with these σ would reach, (frames, atoms) → quantiles.

    If every atom's error vector were drawn from an isotropic Gaussian whose spread is its σ (the committee's
    σ, up to one common factor, which does not change ranks), the largest atomic error per structure would
    still scatter around what σ predicts; how far σ can rank it then depends only on how much σ varies
    between structures. Returned: quantiles over ``draws`` simulated error sets of ρ(largest σ,
    largest simulated error) and ρ(mean σ, mean simulated error).
    """
    from scipy.stats import spearmanr

    largest, mean = [], []
    for _ in range(draws):
        error = sigma * np.linalg.norm(rng.standard_normal((*sigma.shape, 3)), axis=-1) / np.sqrt(3.0)
        largest.append(spearmanr(sigma.max(1), error.max(1)).statistic)
        mean.append(spearmanr(sigma.mean(1), error.mean(1)).statistic)
    quantiles = (0.05, 0.5, 0.95)
    return {
        "draws": draws,
        "quantiles": list(quantiles),
        "sigma max vs simulated error max": np.quantile(largest, quantiles).round(3).tolist(),
        "sigma mean vs simulated error mean": np.quantile(mean, quantiles).round(3).tolist(),
    }


def analyze(steps: int, frames: int, diverse: bool) -> None:
    import torch
    from scipy.stats import rankdata, spearmanr

    from so3krates.committee import FORCES_UNCERTAINTY, load_committee
    from so3krates.data.io import read_structures
    from so3krates.evaluate import predict
    from so3krates.files import write_json
    from so3krates.model.checkpoint import load_model
    from so3krates.runtime.evaluator import EnergyFunction
    from so3krates.runtime.plan import Plan

    torch.set_num_threads(2)
    name = variant(steps, frames, diverse)
    members = sorted(RUN.glob(f"{name}/member_*/best.pt"))
    chosen = set(selected(frames).tolist())
    structures = read_structures(DATA)
    test = [k for k in range(len(structures)) if k not in chosen]
    test_structures = [structures[k] for k in test]
    force_field, _ = load_committee([str(p) for p in members], "cpu", torch.float32)
    prediction, metrics = predict(force_field, test_structures, 32, "cpu", False)
    sigma = [np.asarray(u) for u in prediction[FORCES_UNCERTAINTY]]
    error = [
        np.linalg.norm(np.asarray(f) - s.forces, axis=1)
        for s, f in zip(test_structures, prediction["forces"], strict=True)
    ]
    max_error = np.array([e.max() for e in error])
    mean_error = np.array([e.mean() for e in error])
    numbers = test_structures[0].atomic_numbers

    def rho(a, b):
        return float(spearmanr(a, b).statistic)

    results = {
        "steps_per_member": steps,
        "n_train_frames": len(chosen),
        "n_test_frames": len(test),
        "architectures": list(DIVERSE) if diverse else "paper preset, 2 layers (every member)",
        "members": [str(p.relative_to(RUN)) for p in members],
        "committee_force_mae_eV_A": float(
            np.mean(
                [
                    np.abs(np.asarray(f) - s.forces).mean()
                    for s, f in zip(test_structures, prediction["forces"], strict=True)
                ]
            )
        ),
        "rho": {
            "sigma max vs error max": rho([s.max() for s in sigma], max_error),
            "sigma mean vs error mean": rho([s.mean() for s in sigma], mean_error),
            "all atoms pooled": rho(np.concatenate(sigma), np.concatenate(error)),
        },
    }
    # σ relative to its element's median over the test set: the largest relative σ per structure.
    all_sigma = np.stack(sigma)
    median_by_element = {z: np.median(all_sigma[:, numbers == z]) for z in set(numbers.tolist())}
    scale = np.array([median_by_element[z] for z in numbers])
    results["rho"]["sigma / element median, max vs error max"] = rho((all_sigma / scale).max(1), max_error)
    # Not an uncertainty but a baseline: the largest predicted force per structure (errors grow with it).
    force_norm = [np.linalg.norm(np.asarray(f), axis=1) for f in prediction["forces"]]
    results["rho"]["largest predicted force vs error max"] = rho([f.max() for f in force_norm], max_error)
    results["rho"]["sigma max + largest force (ranks summed) vs error max"] = rho(
        rankdata([s.max() for s in sigma]) + rankdata([f.max() for f in force_norm]), max_error
    )
    # Feature distance to the nearest training atom of the same element, per member, then averaged.
    train_frames = [structures[k].to_atoms() for k in sorted(chosen)]
    distances = np.zeros((len(test), len(numbers)))
    for path in members:
        model, _ = load_model(path, "cpu", torch.float32)
        energy_function = EnergyFunction(model, Plan(), frozen=True)  # the modules' reference equations
        train_h = np.stack([last_features(energy_function, a) for a in train_frames])  # (T, n, F)
        test_h = np.stack([last_features(energy_function, s.to_atoms()) for s in test_structures])
        for z in set(numbers.tolist()):
            columns = numbers == z
            reference = train_h[:, columns].reshape(-1, train_h.shape[-1])
            query = test_h[:, columns].reshape(-1, test_h.shape[-1])
            nearest = np.full(len(query), np.inf)
            for start in range(0, len(reference), 256):
                block = reference[start : start + 256]
                d = np.sqrt(np.maximum(((query[:, None, :] - block[None]) ** 2).sum(-1), 0.0))
                nearest = np.minimum(nearest, d.min(1))
            distances[:, columns] += nearest.reshape(len(test), -1) / len(members)
    results["rho"]["feature distance max vs error max"] = rho(distances.max(1), max_error)
    results["rho"]["feature distance mean vs error mean"] = rho(distances.mean(1), mean_error)
    results["rho"]["feature distance pooled atoms"] = rho(distances.ravel(), np.concatenate(error))
    results["calibrated_ceiling"] = calibrated_ceiling(all_sigma, np.random.default_rng(0))
    results["metrics"] = {k: v for k, v in metrics.items() if isinstance(v, float)}
    write_json(RUN / f"{name.replace('even', 'even_coverage', 1)}.json", results)
    print(json.dumps(results["rho"], indent=1), results["committee_force_mae_eV_A"])
    print("calibrated ceiling:", json.dumps(results["calibrated_ceiling"]))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["setup", "analyze"])
    parser.add_argument("--steps", type=int, default=STEPS, help="optimizer steps per member")
    parser.add_argument("--frames", type=int, default=N_FRAMES, help="training frames at even intervals")
    parser.add_argument("--diverse", action="store_true", help="members of different architectures")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, not {args.steps}")
    if not 10 <= args.frames <= 1000:
        parser.error(f"--frames must be between 10 and 1000, not {args.frames}")
    if not DATA.is_file():
        sys.exit(f"even_coverage.py: {DATA} is missing (the shared data folder)")
    name = variant(args.steps, args.frames, args.diverse)
    if args.stage == "analyze" and not list(RUN.glob(f"{name}/member_*/best.pt")):
        sys.exit(f"even_coverage.py: no trained members in {RUN / name}: run setup and train.sh {name} first")
    {"setup": setup, "analyze": analyze}[args.stage](args.steps, args.frames, args.diverse)
