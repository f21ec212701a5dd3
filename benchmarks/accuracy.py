"""Accuracy on rMD17 under a fixed training wall-clock budget: ours next to so3krates-torch and MACE.

    python benchmarks/accuracy.py --setup                       # peer environments in benchmarks/.envs/
    python benchmarks/accuracy.py --models so3krates-torch,mace-small,mace-large [--budget-minutes 15]

Protocol (the same for every model): 950 training / 50 validation frames of `rmd17_<molecule>_train_01.npz`
(one permutation with seed 0, written to the results), all 1000 frames of `..._test_01.npz` as test set,
energies and forces converted from kcal/mol to eV; `--budget-minutes` of training wall time per model on
2 threads (OMP_NUM_THREADS=2, OMP_WAIT_POLICY=PASSIVE); then the best-validation weights are evaluated
on the test set (not counted in the budget). Each model runs as its own process, one after another,
under `flock /tmp/so3krates-cpu.lock` so that no other heavy job on the machine overlaps it.

Peers run in their own virtual environments (`benchmarks/.envs/<package>`, pinned below, torch==2.13.0
CPU installed first) through `benchmarks/peers/*_rmd17.py`; ours runs in the main `.venv` through the
`so3krates train` / `so3krates evaluate` commands (`run_ours`).

Results: `<out-dir>/accuracy_<molecule>.json` (machine, protocol, one entry per model) and
`accuracy_<molecule>.md` (a table). A run of some models replaces those entries and keeps the others.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
ENVS = BENCH / ".envs"
PEERS = BENCH / "peers"
DATA_DIR = Path("/work/shared/data/rmd17")
LOCK = "/tmp/so3krates-cpu.lock"
TORCH = "torch==2.13.0"  # the CPU build; installed first so that no peer pulls a CUDA build
THREADS = 2
N_TRAIN, N_VALID, SPLIT_SEED = 950, 50, 0

# Versions that install next to torch 2.13.0 on Python 3.11 (checked with pip; see README in this folder).
# so3krates-torch needs its `vis` extra: its training module imports pandas.
PEER_PACKAGES = {
    "so3krates-torch": ["so3krates-torch[vis]==0.2.1"],
    "mace-torch": ["mace-torch==0.3.16"],
}


@dataclass(frozen=True)
class PeerModel:
    """A peer model: which environment, which runner, which size flags."""

    env: str
    runner: str
    flags: list[str] = field(default_factory=list)
    description: str = ""


PEER_MODELS = {
    "so3krates-torch": PeerModel(
        env="so3krates-torch",
        runner="so3krates_torch_rmd17.py",
        flags="--num-features 132 --num-layers 3 --degrees 1,2,3 --num-heads 4 --num-radial-basis 32 "
        "--cutoff 5.0 --lr 1e-3".split(),
        description="SO3krates paper size: F=132, 3 layers, l=1-3, 4 heads, 32 RBF, r_c 5 Å",
    ),
    "mace-large": PeerModel(
        env="mace-torch",
        runner="mace_rmd17.py",
        flags="--num-channels 256 --max-L 2 --max-ell 3 --num-interactions 2 --correlation 3 --cutoff 5.0 "
        "--num-radial-basis 8 --lr 0.01".split(),
        description="MACE rMD17 paper settings: 256 channels, L=2, 2 layers, ν=3, r_c 5 Å, 8 Bessel",
    ),
    "mace-small": PeerModel(
        env="mace-torch",
        runner="mace_rmd17.py",
        flags="--num-channels 64 --max-L 1 --max-ell 3 --num-interactions 2 --correlation 3 --cutoff 5.0 "
        "--num-radial-basis 8 --lr 0.01".split(),
        description="MACE small: 64 channels, L=1, 2 layers, ν=3, r_c 5 Å, 8 Bessel",
    ),
}
MODELS = ["so3krates", *PEER_MODELS]


# --------------------------------------------------------------------------------------------- setup


def env_python(env: str) -> Path:
    return ENVS / env / "bin" / "python"


def setup_env(env: str) -> None:
    """Create `benchmarks/.envs/<env>`: torch==2.13.0 first, then the pinned peer with torch held fixed."""
    python = env_python(env)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(ENVS / env)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, TORCH], check=True)
    # Naming torch==2.13.0 again makes pip refuse, instead of replacing torch, if a pin disagrees.
    subprocess.run([*pip, *PEER_PACKAGES[env], TORCH], check=True)
    version = subprocess.run(
        [str(python), "-c", "import torch; print(torch.__version__)"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    print(f"{env}: {' '.join(PEER_PACKAGES[env])} with torch {version}")


# ------------------------------------------------------------------------------------------- protocol


def data_files(molecule: str) -> tuple[Path, Path]:
    train, test = (DATA_DIR / f"rmd17_{molecule}_{part}_01.npz" for part in ("train", "test"))
    for path in (train, test):
        if not path.is_file():
            raise SystemExit(f"accuracy.py: {path} not found")
    return train, test


def make_split(train_file: Path) -> dict[str, list[int]]:
    """950 train / 50 valid indices into the train file: one permutation with seed 0, for every model."""
    n_frames = len(np.load(train_file)["energies"])
    order = np.random.default_rng(SPLIT_SEED).permutation(n_frames)
    if n_frames < N_TRAIN + N_VALID:
        raise SystemExit(f"accuracy.py: {train_file} has {n_frames} frames, need {N_TRAIN + N_VALID}")
    return {
        "seed": SPLIT_SEED,
        "train": order[:N_TRAIN].tolist(),
        "valid": order[N_TRAIN : N_TRAIN + N_VALID].tolist(),
    }


def run_env() -> dict[str, str]:
    """The environment of every training process: 2 threads that sleep when idle."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS), OMP_WAIT_POLICY="PASSIVE")
    return env


def run_logged(command: list[str], log_path: Path, timeout: float) -> None:
    """Run `command` under the machine-wide lock with output to `log_path`; raise with the log's tail."""
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        status = subprocess.run(
            ["flock", LOCK, *command], stdout=log, stderr=subprocess.STDOUT, env=run_env(), timeout=timeout
        ).returncode
    if status != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"exit status {status}; see {log_path}:\n{tail}")


def run_peer(
    name: str, train_file: Path, test_file: Path, split_path: Path, budget: float, run_dir: Path
) -> dict:
    """Train and test one peer model in its own environment; returns its result JSON."""
    model = PEER_MODELS[name]
    python = env_python(model.env)
    if not python.exists():
        raise RuntimeError(f"{python} missing: run `python benchmarks/accuracy.py --setup` first")
    out = run_dir / "result.json"
    out.unlink(missing_ok=True)
    command = [str(python), "-W", "ignore", str(PEERS / model.runner)]
    command += ["--train-file", str(train_file), "--test-file", str(test_file), "--indices", str(split_path)]
    command += ["--budget-seconds", str(budget), "--out", str(out), "--work-dir", str(run_dir / "work")]
    command += ["--threads", str(THREADS), *model.flags]
    run_logged(command, run_dir / "log.txt", timeout=budget + 3600)
    result = json.loads(out.read_text())
    result["description"] = model.description
    result["command"] = " ".join(command)
    return result


# ============================= OURS: finished by the owner of `so3krates train` =============================
def run_ours(
    train_file: Path, test_file: Path, split_path: Path, budget: float, run_dir: Path, reuse: bool = False
) -> dict:
    """Train and test our model with `so3krates train` / `so3krates evaluate` in the main `.venv`.

    The config is `benchmarks/configs/rmd17_<molecule>.yaml` (our settings, with their reasons); the harness
    supplies the data paths, the shared split (as `split.npz`), the budget and the run directory. Threads
    come from the config: one, because batches of five small molecules run fastest on one thread and a
    second OpenMP thread under OMP_WAIT_POLICY=PASSIVE made each step about twice as slow here.
    `reuse=True` evaluates an already finished training in `run_dir/train` instead of training again.
    """
    python = ROOT / ".venv" / "bin" / "python"
    molecule = train_file.name.split("_")[1]
    config = BENCH / "configs" / f"rmd17_{molecule}.yaml"
    split = json.loads(split_path.read_text())
    split_npz = run_dir / "split.npz"
    np.savez(
        split_npz, train=np.array(split["train"]), valid=np.array(split["valid"]), test=np.array([], int)
    )
    train_dir = run_dir / "train"
    sets = {
        "run_dir": train_dir,
        "data.train_file": train_file,
        "data.test_file": test_file,
        "data.split_file": split_npz,
        "training.max_time": budget,
        "training.progress": "false",
    }
    command = [str(python), "-m", "so3krates", "train", str(config)]
    for key, value in sets.items():
        command += ["--set", f"{key}={value}"]
    train_wall = None
    if not (reuse and (train_dir / "results.json").is_file()):
        if train_dir.exists():
            raise RuntimeError(f"{train_dir} exists; remove it or pass --reuse-ours")
        started = time.perf_counter()
        run_logged(command, run_dir / "log.txt", timeout=budget + 3600)
        train_wall = time.perf_counter() - started
    metrics_path = run_dir / "test_metrics.json"
    evaluate = [str(python), "-m", "so3krates", "evaluate", "--model", str(train_dir / "best.pt")]
    evaluate += ["--data", str(test_file), "--energy-unit", "kcal/mol", "--json", str(metrics_path)]
    evaluate += ["--out-dir", str(run_dir / "test"), "--threads", "1"]
    run_logged(evaluate, run_dir / "evaluate_log.txt", timeout=3600)
    metrics = json.loads(metrics_path.read_text())
    # Epochs and parameters from the run itself: the history and the checkpoint's config.
    with open(train_dir / "metrics.csv") as handle:
        history = list(csv.DictReader(handle))
    best = min(history, key=lambda row: float(row["valid_loss"]))
    resolved = yaml.safe_load((train_dir / "config.yaml").read_text())
    count = subprocess.run(
        [
            str(python),
            "-c",
            "import sys, yaml; from so3krates import So3krates, ModelConfig; "
            "from so3krates.model.so3krates import count_parameters; "
            "print(count_parameters(So3krates(ModelConfig(**yaml.safe_load(sys.stdin)['model'])))['total'])",
        ],
        input=yaml.safe_dump(resolved),
        capture_output=True,
        text=True,
        check=True,
    )
    last = history[-1]
    steps_per_epoch = -(-N_TRAIN // int(resolved["training"]["batch_size"]))
    return {
        "package": "so3krates",
        "package_version": _git_commit(),
        "parameters": int(count.stdout.strip()),
        "epochs": int(last["step"]) / steps_per_epoch,
        "best_epoch": int(best["epoch"]),
        "steps": int(last["step"]),
        "budget_seconds": budget,
        "train_seconds": float(last["time_s"]),
        "train_wall_seconds": train_wall,
        "torch_threads": int(resolved["training"]["threads"]),
        "settings": {k: resolved[k] for k in ("model", "loss", "training")},
        "test": {
            k: metrics[k]
            for k in (
                "energy_mae_meV",
                "energy_rmse_meV",
                "forces_mae_meV_per_A",
                "forces_rmse_meV_per_A",
                "n_structures",
            )
        },
        "description": "ours: paper preset (F=132, 3 layers, l=1-3, 4 heads, 32 PhysNet RBF, r_c 5 Å), "
        "float32, 1 thread",
        "command": " ".join(command),
    }


# ============================================================================================================


# -------------------------------------------------------------------------------------------- results


def machine_info() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = TORCH.split("==")[1]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads_per_model": THREADS,
        "torch": torch_version,
        "python": platform.python_version(),
        "os": platform.platform(),
    }


def _git_commit() -> str | None:
    result = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return result.stdout.strip() or None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def merge_results(path: Path, header: dict, new_entries: dict[str, dict]) -> dict:
    """The results file with `new_entries` replacing entries of the same name; other entries are kept."""
    previous = json.loads(path.read_text()) if path.is_file() else {}
    models = dict(previous.get("models", {}))
    models.update(new_entries)
    return {**header, "models": {name: models[name] for name in MODELS if name in models}}


def markdown_table(results: dict) -> str:
    protocol = results["protocol"]
    lines = [
        f"# rMD17 {results['molecule']}: accuracy after a fixed training budget",
        "",
        f"{protocol['n_train']} train / {protocol['n_valid']} valid frames of `{protocol['train_file']}` "
        f"(seed {protocol['split_seed']}), test on all {protocol['n_test']} frames of "
        f"`{protocol['test_file']}`. "
        "Best-validation weights; energy MAE per structure, force MAE per Cartesian component.",
        f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, "
        f"up to {results['machine']['threads_per_model']} threads per model (each model's own choice, see the"
        f" descriptions), torch {results['machine']['torch']}.",
        "",
        "| model | package | parameters | epochs | energy MAE (meV) | force MAE (meV/Å) | budget (min) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    nan = float("nan")
    for name, entry in results["models"].items():
        test = entry.get("test", {})
        parameters = f"{entry['parameters']:,}" if entry.get("parameters") else "—"
        epochs = f"{entry['epochs']:.1f}" if entry.get("epochs") is not None else "—"
        version = f"{entry.get('package', '')} {entry.get('package_version') or ''}".strip()
        lines.append(
            f"| {name} | {version} | {parameters} | {epochs} | {test.get('energy_mae_meV', nan):.2f} "
            f"| {test.get('forces_mae_meV_per_A', nan):.2f} | {entry['budget_seconds'] / 60:g} |"
        )
    lines += ["", "Models:", ""]
    lines += [f"- **{name}**: {entry.get('description', '')}" for name, entry in results["models"].items()]
    notes = [note for name, entry in results["models"].items() for note in entry_notes(name, entry)]
    if notes:
        lines += ["", "Notes:", "", *notes]
    lines += [
        "",
        "Run dates: " + ", ".join(f"{n} {e.get('date', '?')}" for n, e in results["models"].items()),
        "",
    ]
    return "\n".join(lines)


def entry_notes(name: str, entry: dict) -> list[str]:
    """Facts about a result that the table alone hides (each derived from the entry itself)."""
    notes = []
    test = entry.get("test", {})
    mae, rmse = test.get("energy_mae_meV"), test.get("energy_rmse_meV")
    if mae and rmse and mae > 10.0 and rmse < 1.02 * mae:
        notes.append(
            f"- {name}: energy RMSE ≈ MAE ({rmse:.0f} vs {mae:.0f} meV): the energy error is an almost "
            "constant offset that the energy term of the loss had not removed within the budget."
        )
    share = entry.get("other_jobs_cpu_share")
    if share is not None and share > 0.05:
        notes.append(
            f"- {name}: other jobs used {100 * share:.0f} % of the machine's CPU time during training "
            f"({entry['other_jobs_cpu_seconds']:.0f} CPU s): less training per budget than when idle."
        )
    load = entry.get("load_average_1min", {})
    if share is None and max(load.values(), default=0.0) > 2.5:
        notes.append(
            f"- {name}: 1-min load average {load['before']:.1f} before / {load['after']:.1f} after the run "
            "(2 cores): other jobs shared the machine for part of the budget."
        )
    return notes


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", action="store_true", help="create/update the peer environments and exit")
    parser.add_argument("--report", action="store_true", help="only rewrite the markdown table from the JSON")
    parser.add_argument(
        "--reuse-ours",
        action="store_true",
        help="evaluate a finished training of ours instead of training again",
    )
    parser.add_argument(
        "--models", default=",".join(PEER_MODELS), help=f"comma list among {','.join(MODELS)}"
    )
    parser.add_argument("--budget-minutes", type=float, default=15.0, help="training wall time per model")
    parser.add_argument("--molecule", default="ethanol", choices=["ethanol", "aspirin"])
    parser.add_argument("--out-dir", type=Path, default=BENCH / "results")
    parser.add_argument("--runs-dir", type=Path, default=BENCH / "runs", help="logs and scratch (gitignored)")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose among {MODELS}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.setup:
        for env in dict.fromkeys(PEER_MODELS[m].env for m in args.models if m in PEER_MODELS):
            setup_env(env)
        return 0

    if args.report:
        json_path = args.out_dir / f"accuracy_{args.molecule}.json"
        results = json.loads(json_path.read_text())
        write_atomically(json_path.with_suffix(".md"), markdown_table(results))
        return 0

    train_file, test_file = data_files(args.molecule)
    budget = 60.0 * args.budget_minutes
    run_root = args.runs_dir / args.molecule
    run_root.mkdir(parents=True, exist_ok=True)
    split = make_split(train_file)
    split_path = run_root / "split.json"
    split_path.write_text(json.dumps(split))

    header = {
        "benchmark": "rMD17 accuracy after a fixed training wall-clock budget",
        "molecule": args.molecule,
        "machine": machine_info(),
        "harness_commit": _git_commit(),
        "protocol": {
            "train_file": train_file.name,
            "test_file": test_file.name,
            "train_file_sha256": _sha256(train_file),
            "test_file_sha256": _sha256(test_file),
            "n_train": N_TRAIN,
            "n_valid": N_VALID,
            "n_test": len(np.load(test_file)["energies"]),
            "split_seed": SPLIT_SEED,
            "kcal_per_mol_in_eV": 0.0433641,
            "threads": THREADS,
            "env": {"OMP_NUM_THREADS": str(THREADS), "OMP_WAIT_POLICY": "PASSIVE"},
            "budget": "training-loop wall time (steps + validation after each epoch); test not counted",
            "selection": "weights (EMA where used) with the lowest validation loss",
            "train_indices": split["train"],
            "valid_indices": split["valid"],
        },
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.out_dir / f"accuracy_{args.molecule}.json"
    failures = {}
    for name in args.models:
        run_dir = run_root / name
        run_dir.mkdir(parents=True, exist_ok=True)
        started = datetime.datetime.now(datetime.timezone.utc)
        print(f"[{started:%H:%M:%S}] {name}: training for {args.budget_minutes:g} min ...", flush=True)
        tick = time.perf_counter()
        load_before = os.getloadavg()
        try:
            if name == "so3krates":
                entry = run_ours(train_file, test_file, split_path, budget, run_dir, reuse=args.reuse_ours)
            else:
                entry = run_peer(name, train_file, test_file, split_path, budget, run_dir)
        except (RuntimeError, subprocess.TimeoutExpired, OSError, KeyError, json.JSONDecodeError) as error:
            failures[name] = str(error)
            print(f"{name}: FAILED: {error}", file=sys.stderr, flush=True)
            continue
        entry["date"] = started.isoformat(timespec="seconds")
        entry["wall_seconds_total"] = time.perf_counter() - tick  # waiting for the lock included
        # 1-minute load averages around the run: well above 2 means another job shared the cores.
        entry["load_average_1min"] = {"before": load_before[0], "after": os.getloadavg()[0]}
        test = entry["test"]
        print(
            f"{name}: epochs {entry.get('epochs') or float('nan'):.1f}, "
            f"energy MAE {test['energy_mae_meV']:.2f} meV, "
            f"force MAE {test['forces_mae_meV_per_A']:.2f} meV/Å "
            f"({entry['wall_seconds_total']:.0f} s in all)",
            flush=True,
        )
        # Written after every model, so that a later failure keeps the finished ones.
        header["updated"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        results = merge_results(json_path, header, {name: entry})
        write_atomically(json_path, json.dumps(results, indent=2) + "\n")
        write_atomically(args.out_dir / f"accuracy_{args.molecule}.md", markdown_table(results))
        print(f"wrote {json_path} and {json_path.with_suffix('.md')}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
