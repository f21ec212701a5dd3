"""Accuracy beyond the training distribution: alanine dipeptide, trained on the first half of the trajectory.

    python benchmarks/ood_split.py run [--models so3krates,mace-small] [--splits time,random] \
        [--budget-minutes 8]
    python benchmarks/ood_split.py report        # results/ood_ala_dipeptide.{json,md}

Data: the shared GFN2-xTB trajectory `../shared/data/generated/ala_dipeptide_gfn2xtb_500K_2000.extxyz`
(Langevin MD at 500 K, 2000 frames in time order, one per 5 fs). Two splits of the same sizes
(900 train / 100 valid / 1000 test):

- `time`: train and valid drawn at random (seed 0) from the first 1000 frames; test = the last 1000 frames,
  a later stretch of the trajectory that the model has not seen (the report counts the backbone conformers
  (φ, ψ) of both halves, to show how different they are);
- `random`: train, valid and test drawn at random (seed 0) from all 2000 frames (the usual split).

Each model trains for `--budget-minutes` of wall time on each split with its own package's commands, one
after another under the CPU lock: ours with `so3krates train configs/ood_ala_dipeptide.yaml` and
`so3krates evaluate` (one thread), MACE-small with `mace_run_train` / `mace_eval_configs` through
`peers/mace_cli_rmd17.py --xyz` (its rMD17 config, two threads). The report gives the test errors and the
ratio time-split / random-split force MAE per model. Run files go to `benchmarks/runs/ood_ala_dipeptide/`
(gitignored); the data is written there from the shared file, never into the repository.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
from accuracy import LOCK, _git_commit, machine_info, write_atomically  # noqa: E402
from ala_dipeptide import conformer, dihedrals  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "generated" / "ala_dipeptide_gfn2xtb_500K_2000.extxyz"
RUNS = BENCH / "runs" / "ood_ala_dipeptide"
RESULTS = BENCH / "results"
CONFIG = BENCH / "configs" / "ood_ala_dipeptide.yaml"
SPLITS = ("time", "random")
MODELS = ("so3krates", "mace-small")
N_TRAIN, N_VALID, SEED = 900, 100, 0


def fail(message: str) -> SystemExit:
    return SystemExit(f"ood_split.py: {message}")


def split_indices(n_frames: int, kind: str) -> dict[str, list[int]]:
    """Train/valid/test frame indices of the `time` or `random` split."""
    rng = np.random.default_rng(SEED)
    half = n_frames // 2
    if kind == "time":
        first = rng.permutation(half)
        train, valid, test = first[:N_TRAIN], first[N_TRAIN : N_TRAIN + N_VALID], np.arange(half, n_frames)
    else:
        order = rng.permutation(n_frames)
        train, valid = order[:N_TRAIN], order[N_TRAIN : N_TRAIN + N_VALID]
        test = np.sort(order[N_TRAIN + N_VALID : N_TRAIN + N_VALID + (n_frames - half)])
    return {
        "train": sorted(int(i) for i in train),
        "valid": sorted(int(i) for i in valid),
        "test": test.tolist(),
    }


def write_split(kind: str) -> dict:
    """The split's three extxyz files (energy/forces for ours, REF_energy/REF_forces for MACE)."""
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import read, write

    if not DATA.is_file():
        raise fail(f"{DATA} not found (the shared data folder must sit beside the repository)")
    frames = read(DATA, index=":")
    indices = split_indices(len(frames), kind)
    folder = RUNS / kind / "data"
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for part, chosen in indices.items():
        out = []
        for k in chosen:
            atoms = frames[k].copy()
            energy, forces = frames[k].get_potential_energy(), frames[k].get_forces()
            atoms.info["REF_energy"] = energy
            atoms.arrays["REF_forces"] = forces
            atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
            out.append(atoms)
        path = folder / f"{part}.extxyz"
        tmp = path.with_name(path.name + ".tmp")
        write(tmp, out, format="extxyz")
        tmp.replace(path)
        files[part] = path
    return {"indices": indices, "files": files}


def locked(command: list[str], log: Path, threads: int, timeout: float) -> None:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE")
    with open(log, "w") as handle:
        handle.write("$ " + shlex.join(command) + "\n")
        handle.flush()
        status = subprocess.run(
            ["flock", LOCK, *command], stdout=handle, stderr=subprocess.STDOUT, env=env, timeout=timeout
        ).returncode
    if status != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-12:])
        raise fail(f"exit status {status}; see {log}:\n{tail}")


def run_ours(kind: str, files: dict, budget: float) -> dict:
    run_dir = RUNS / kind / "so3krates"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    train_dir = run_dir / "train"
    sets = {
        "run_dir": train_dir,
        "data.train_file": files["train"],
        "data.valid_file": files["valid"],
        "data.test_file": files["test"],
        "training.max_time": budget,
    }
    command = [sys.executable, "-m", "so3krates", "train", str(CONFIG)]
    for key, value in sets.items():
        command += ["--set", f"{key}={value}"]
    t0 = time.time()
    locked(command, run_dir / "train_log.txt", threads=1, timeout=budget + 3600)
    train_wall = time.time() - t0
    metrics_path = run_dir / "test_metrics.json"
    evaluate = [sys.executable, "-m", "so3krates", "evaluate", "--model", str(train_dir / "best.pt")]
    evaluate += ["--data", str(files["test"]), "--json", str(metrics_path), "--threads", "1"]
    evaluate += ["--out-dir", str(run_dir / "test")]
    locked(evaluate, run_dir / "evaluate_log.txt", threads=1, timeout=3600)
    metrics = json.loads(metrics_path.read_text())
    last = (train_dir / "metrics.csv").read_text().strip().splitlines()[-1].split(",")
    return {
        "package": "so3krates",
        "package_version": _git_commit(),
        "threads": 1,
        "commands": {"train": shlex.join(command), "evaluate": shlex.join(evaluate)},
        "config_yaml": (train_dir / "config.yaml").read_text(),
        "epochs": int(last[0]),
        "train_wall_seconds": round(train_wall, 1),
        "test": {k: metrics[k] for k in ("energy_mae_meV", "forces_mae_meV_per_A", "forces_rmse_meV_per_A")},
    }


def run_mace(kind: str, files: dict, budget: float) -> dict:
    run_dir = RUNS / kind / "mace-small"
    command = [sys.executable, str(BENCH / "peers" / "mace_cli_rmd17.py"), "--size", "small"]
    command += [
        "--molecule",
        f"ala-dipeptide-{kind}",
        "--budget-minutes",
        f"{budget / 60:g}",
        "--threads",
        "2",
    ]
    command += ["--xyz", str(files["train"]), str(files["valid"]), str(files["test"])]
    command += ["--out", str(run_dir), "--overwrite"]
    run_dir.mkdir(parents=True, exist_ok=True)
    locked(command, RUNS / kind / "mace-small.log", threads=2, timeout=budget + 3 * 3600)
    result = json.loads((run_dir / "result.json").read_text())
    return {
        "package": "mace-torch",
        "package_version": result["package_version"],
        "threads": result["threads"],
        "commands": {"runner": shlex.join(command), **result["commands"]},
        "config_yaml": result["config_yaml"],
        "epochs": result["training"]["epochs_completed"],
        "train_wall_seconds": result["training"]["train_seconds"],
        "test": {
            k: result["test"][k] for k in ("energy_mae_meV", "forces_mae_meV_per_A", "forces_rmse_meV_per_A")
        },
        "mace_error_tables": result["finalisation"].get("mace_error_tables"),
    }


def conformer_counts() -> dict:
    """Backbone conformers (nearest vacuum minimum within 45°, else 'other') in each half of the data."""
    from ase.io import read

    frames = read(DATA, index=":")
    half = len(frames) // 2
    counts = {}
    for name, part in (("first_half", frames[:half]), ("second_half", frames[half:])):
        labels = Counter(conformer(*dihedrals(a)) or "other" for a in part)
        counts[name] = {k: labels[k] / len(part) for k in sorted(labels)}
    return counts


def run(args: argparse.Namespace) -> None:
    budget = 60.0 * args.budget_minutes
    path = RESULTS / "ood_ala_dipeptide.json"
    results = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
    for kind in args.splits:
        made = write_split(kind)
        for model in args.models:
            started = datetime.datetime.now(datetime.timezone.utc)
            print(f"[{started:%H:%M:%S}] {kind} split, {model}: {args.budget_minutes:g} min", flush=True)
            load = os.getloadavg()[0]
            entry = (run_ours if model == "so3krates" else run_mace)(kind, made["files"], budget)
            entry.update(
                date=started.isoformat(timespec="seconds"),
                budget_seconds=budget,
                load_average_1min={"before": load, "after": os.getloadavg()[0]},
                split={part: len(ix) for part, ix in made["indices"].items()},
            )
            results["runs"].setdefault(kind, {})[model] = entry
            results.update(
                benchmark="alanine dipeptide: test on the second half of the trajectory vs a random split",
                data=str(DATA.name),
                machine=machine_info(),
                harness_commit=_git_commit(),
                splits={k: split_indices(2000, k) for k in SPLITS},
            )
            write_atomically(path, json.dumps(results, indent=2) + "\n")
            print(
                f"  force MAE {entry['test']['forces_mae_meV_per_A']:.1f} meV/Å, energy MAE "
                f"{entry['test']['energy_mae_meV']:.1f} meV",
                flush=True,
            )
    report(args)


def report(args: argparse.Namespace) -> None:
    path = RESULTS / "ood_ala_dipeptide.json"
    if not path.is_file():
        raise fail(f"{path} not found: run `python benchmarks/ood_split.py run` first")
    results = json.loads(path.read_text())
    if DATA.is_file():
        results["conformers"] = conformer_counts()
    runs = results["runs"]
    lines = [
        "# Alanine dipeptide: accuracy on the second half of the trajectory (out of distribution)",
        "",
        f"Data: `{results['data']}` (GFN2-xTB, 500 K, 2000 frames in time order, 5 fs apart). "
        f"`time` split: {N_TRAIN} train / {N_VALID} valid frames drawn from the first 1000 frames, test on "
        "the last 1000; `random` split: the same sizes drawn from all 2000 frames (seed 0). Each model "
        "trained for the same wall time on each split with its own package's commands "
        "(`benchmarks/ood_split.py`; commands and configs in the JSON).",
        "",
        "| model | threads | split | epochs | energy MAE (meV) | force MAE (meV/Å) "
        "| ratio time / random: energy, force |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for model in MODELS:
        random_test = runs.get("random", {}).get(model, {}).get("test", {})
        for kind in SPLITS:
            entry = runs.get(kind, {}).get(model)
            if entry is None:
                continue
            force = entry["test"]["forces_mae_meV_per_A"]
            ratio = ""
            if kind == "time" and random_test:
                energy_ratio = entry["test"]["energy_mae_meV"] / random_test["energy_mae_meV"]
                ratio = f"{energy_ratio:.2f}, {force / random_test['forces_mae_meV_per_A']:.2f}"
            lines.append(
                f"| {model} | {entry['threads']} | {kind} | {entry['epochs']} | "
                f"{entry['test']['energy_mae_meV']:.1f} | {force:.1f} | {ratio} |"
            )
    budgets = sorted({e["budget_seconds"] / 60 for r in runs.values() for e in r.values()})
    lines += ["", f"Budget: {', '.join(f'{b:g}' for b in budgets)} min of training per model and split."]
    if "conformers" in results:
        names = sorted({k for half in results["conformers"].values() for k in half})
        lines += [
            "",
            "Backbone conformers (nearest vacuum minimum within 45° in φ and ψ) in each half of the "
            "trajectory, share of frames:",
            "",
            "| half | " + " | ".join(names) + " |",
            "|---|" + "---:|" * len(names),
        ]
        for half, shares in results["conformers"].items():
            lines.append(f"| {half} | " + " | ".join(f"{shares.get(n, 0.0):.2f}" for n in names) + " |")
    notes = [
        f"- {model}, {kind}: 1-min load average {e['load_average_1min']['before']:.1f} before / "
        f"{e['load_average_1min']['after']:.1f} after (2 cores): other jobs shared the machine."
        for kind, r in runs.items()
        for model, e in r.items()
        if max(e["load_average_1min"].values()) > 2.5
    ]
    if notes:
        lines += ["", "Notes:", "", *notes]
    lines.append("")
    write_atomically(path, json.dumps(results, indent=2) + "\n")
    write_atomically(path.with_suffix(".md"), "\n".join(lines))
    print(f"wrote {path} and {path.with_suffix('.md')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["run", "report"])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma list among {','.join(MODELS)}")
    parser.add_argument("--splits", default=",".join(SPLITS), help="comma list among time,random")
    parser.add_argument("--budget-minutes", type=float, default=8.0, help="training wall time per run")
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.splits = [s for s in args.splits.split(",") if s]
    if set(args.models) - set(MODELS) or set(args.splits) - set(SPLITS):
        parser.error(f"models among {MODELS}, splits among {SPLITS}")
    if not args.budget_minutes > 0:
        parser.error("--budget-minutes must be positive")
    (run if args.command == "run" else report)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
