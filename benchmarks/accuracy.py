"""Accuracy on rMD17 under a fixed training wall-clock budget: ours next to so3krates-torch and MACE.

    python benchmarks/accuracy.py --setup                     # peer environments in benchmarks/.envs/
    python benchmarks/accuracy.py --models so3krates --molecules ethanol       # one command per model
    python benchmarks/accuracy.py --models mace-small,mace-large,so3krates-torch --molecules all
    python benchmarks/accuracy.py --report                    # tables, summary and figure only

Protocol (the same for every model): 950 training / 50 validation frames of `rmd17_<molecule>_train_01.npz`
(one permutation with seed 0, written to the results), all 1000 frames of `..._test_01.npz` as test set,
energies and forces converted from kcal/mol to eV; `--budget-minutes` of training wall time per model
(OMP_WAIT_POLICY=PASSIVE, at most 2 threads: each model runs at the thread count that trains it fastest
here, measured and written in `PEER_MODELS` and `configs/rmd17.yaml`); then the best-validation weights
are evaluated on the test set (not counted in the budget). Each model runs as its own process, one after
another, under `flock /tmp/so3krates-cpu.lock` so that no other heavy job on the machine overlaps it; the
load average around each run is recorded.

Every model is trained and tested by its own package's commands: ours with `so3krates train` /
`so3krates evaluate` (`run_ours`), so3krates-torch with `torchkrates-train` / `torchkrates-eval` and MACE
with `mace_run_train` / `mace_eval_configs` (`peers/*_cli_rmd17.py`: a config from `configs/peers/`, the
process stopped at the budget and finalised with the package's own restart option). The peers run in
their own virtual environments (`benchmarks/.envs/<package>`, pinned below, torch==2.13.0 CPU first).

Results: `<out-dir>/accuracy_<molecule>.json` (machine, protocol, one entry per model with its exact
commands, config and learning curve) and `accuracy_<molecule>.md`; `accuracy_summary.md` and
`accuracy_force_mae.png` over all molecules. A run of some models replaces those entries and keeps the
others. A finished run in the run folder is reused (`--rerun` trains again).

Sanity gate (`sanity_gate`): a model's number enters the tables only if its validation learning curve was
not flat (< 5 % improvement) for more than a third of the budget at a force MAE above twice the best test
force MAE of the molecule's table, unless the entry carries a written `investigation` showing that this is
the package's real behaviour.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import json
import os
import platform
import shlex
import shutil
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
#: What a results file keeps of `so3krates evaluate --json`.
TEST_METRICS = (
    "energy_mae_meV",
    "energy_rmse_meV",
    "forces_mae_meV_per_A",
    "forces_rmse_meV_per_A",
    "n_structures",
)

# Versions that install next to torch 2.13.0 on Python 3.11 (checked with pip; see README in this folder).
# so3krates-torch needs its `vis` extra: its training module imports pandas.
PEER_PACKAGES = {
    "so3krates-torch": ["so3krates-torch[vis]==0.2.1"],
    "mace-torch": ["mace-torch==0.3.16"],
}


MOLECULES = ["ethanol", "aspirin", "malonaldehyde", "toluene", "benzene", "azobenzene"]


@dataclass(frozen=True)
class PeerModel:
    """A peer model: the runner that trains it through its own command line, and its thread count."""

    env: str
    runner: str
    flags: list[str] = field(default_factory=list)
    threads: int = THREADS
    description: str = ""


# Threads: measured on ethanol on this machine. so3krates-torch: ~19 s per epoch on one thread, ~31 s on two
# (results/peers/so3krates_torch_cli_ethanol*.json); MACE small: 0.36 s per batch on two threads, 0.46 s
# on one. Ours: one (configs/rmd17.yaml).
PEER_MODELS = {
    "so3krates-torch": PeerModel(
        env="so3krates-torch",
        runner="so3krates_torch_cli_rmd17.py",
        threads=1,
        description="torchkrates-train with configs/peers/so3krates_torch_rmd17.yaml: the SO3krates paper "
        "size (F=132, 3 layers, l=1-3, 4 heads, 32 RBF, r_c 5 Å) and the package's documented training "
        "settings; 1 thread",
    ),
    "mace-large": PeerModel(
        env="mace-torch",
        runner="mace_cli_rmd17.py",
        flags=["--size", "large"],
        description="mace_run_train with configs/peers/mace_large_rmd17.yaml: the MACE paper's rMD17 model "
        "and training (256 channels, L=2, 2 layers, ν=3, r_c 5 Å, 8 Bessel; AMSGrad 0.01, λ_F 1000), "
        "MACE's Stage Two in the last quarter of the budget; 2 threads",
    ),
    "mace-small": PeerModel(
        env="mace-torch",
        runner="mace_cli_rmd17.py",
        flags=["--size", "small"],
        description="mace_run_train with configs/peers/mace_small_rmd17.yaml: as mace-large with 64 channels "
        "and L=1; 2 threads",
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


def run_env(threads: int) -> dict[str, str]:
    """The environment of a training process: `threads` threads that sleep when idle."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE")
    return env


def run_logged(command: list[str], log_path: Path, timeout: float, threads: int = THREADS) -> None:
    """Run `command` under the machine-wide lock with output to `log_path`; raise with the log's tail."""
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        status = subprocess.run(
            ["flock", LOCK, *command],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=run_env(threads),
            timeout=timeout,
        ).returncode
    if status != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"exit status {status}; see {log_path}:\n{tail}")


def finished_run(path: Path, molecule: str, budget: float) -> dict | None:
    """A finished peer run's result.json in a run folder, if it is for this molecule and budget."""
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    if result.get("molecule") != molecule or abs(result.get("budget_seconds", -1) - budget) > 1e-6:
        return None
    return result


def previous_entry(json_path: Path, name: str, entry: dict) -> dict:
    """The entry the results file already holds for this model's run folder and budget ({} if none)."""
    if not json_path.is_file():
        return {}
    previous = json.loads(json_path.read_text()).get("models", {}).get(name, {})
    same = previous.get("run_dir") == entry.get("run_dir") and previous.get("budget_seconds") == entry.get(
        "budget_seconds"
    )
    return previous if same else {}


# Facts of a training run, not of its evaluation: a re-evaluation of the same run keeps them. An
# investigation (sanity gate) was written about that run's learning curve, so it stays with the run.
RUN_FACTS = ("date", "cpu", "load_average_1min", "wall_seconds_total", "investigation")


def keep_run_facts(entry: dict, previous: dict) -> dict:
    """`entry`, a re-evaluation of a reused run, with the run's own facts from `previous` it lacks."""
    return {**{key: previous[key] for key in RUN_FACTS if key in previous}, **entry}


def run_peer(name: str, molecule: str, budget: float, run_dir: Path, rerun: bool) -> dict:
    """Train and test one peer through its own command line (`peers/*_cli_rmd17.py`); returns its entry."""
    model = PEER_MODELS[name]
    if not env_python(model.env).exists():
        raise RuntimeError(
            f"{env_python(model.env)} missing: run `python benchmarks/accuracy.py --setup` first"
        )
    command = [str(ROOT / ".venv" / "bin" / "python"), str(PEERS / model.runner), *model.flags]
    command += [
        "--molecule",
        molecule,
        "--budget-minutes",
        f"{budget / 60:g}",
        "--threads",
        str(model.threads),
    ]
    command += ["--out", str(run_dir), "--overwrite"]
    result = None if rerun else finished_run(run_dir / "result.json", molecule, budget)
    reused = result is not None
    if result is None:
        run_logged(command, run_dir.parent / f"{name}.log", timeout=budget + 3 * 3600, threads=model.threads)
        result = json.loads((run_dir / "result.json").read_text())
    training = result["training"]
    common = {  # what every entry of a peer run records about the run itself
        "package": result["package"],
        "package_version": result["package_version"],
        "budget_seconds": result["budget_seconds"],
        "train_seconds": training["train_seconds"],
        "stopped_by": training["stopped_by"],
        "torch_threads": result["threads"],
        "description": model.description,
        "command": shlex.join(command),
        "commands": result["commands"],
        "config_yaml": result["config_yaml"],
        "date": result["date"],
        "load_average_1min": {
            "before": result["load_average"]["start"][0],
            "after": result["load_average"]["end"][0],
        },
        "run_dir": str(run_dir),
        "reused_finished_run": reused,
    }
    if "outcome" in result:  # e.g. no epoch within the budget: no model to test
        return {**common, "outcome": result["outcome"], "epochs": 0}
    steps_per_epoch = -(-N_TRAIN // 5)
    curve = [
        {
            "wall_s": c["wall_s"],
            "epochs": c["epochs_completed"],
            "valid_energy_mae_meV": c["valid_mae_e_meV"],
            "valid_forces_mae_meV_per_A": c["valid_mae_f_meV_per_A"],
        }
        for c in training["learning_curve"]
        if c["epoch"] is not None
    ]
    return {
        **common,
        "parameters": result.get("parameters") or peer_parameters(name, result),
        "epochs": training["epochs_completed"],
        "steps": training["epochs_completed"] * steps_per_epoch,
        "best_epoch": training["best_epoch"] + 1,
        "setup_seconds": training["setup_seconds"],
        "train_cpu_seconds": training["cpu_seconds"],
        "signals": training["signals"],
        "test": {**result["test"], "n_structures": result["test"]["n_frames"]},
        "learning_curve": curve,
        "finalise_overrides": result.get("finalise_overrides"),
    }


def peer_parameters(name: str, result: dict) -> int | None:
    """The parameter count of a peer run whose runner did not record it, from its final model."""
    model = Path(result.get("finalisation", {}).get("model", ""))
    if not model.is_file():
        return None
    sys.path.insert(0, str(PEERS))
    from cli_runner import count_parameters

    return count_parameters(env_python(PEER_MODELS[name].env), model)


def our_train_command(config: Path, molecule: str, run_dir: Path, split: dict, max_time: float) -> list[str]:
    """`so3krates train CONFIG` in the main `.venv` with the harness's data: the molecule's files, the shared
    split (written to `run_dir/split.npz`), `run_dir/train` as the run directory and the time budget."""
    train_file, test_file = data_files(molecule)
    run_dir.mkdir(parents=True, exist_ok=True)
    split_npz = run_dir / "split.npz"
    np.savez(
        split_npz, train=np.array(split["train"]), valid=np.array(split["valid"]), test=np.array([], int)
    )
    sets = {
        "run_dir": run_dir / "train",
        "data.train_file": train_file,
        "data.test_file": test_file,
        "data.split_file": split_npz,
        "training.max_time": max_time,
        "training.progress": "false",
    }
    command = [str(ROOT / ".venv" / "bin" / "python"), "-m", "so3krates", "train", str(config)]
    for key, value in sets.items():
        command += ["--set", f"{key}={value}"]
    return command


def run_ours(molecule: str, budget: float, run_dir: Path, split: dict, rerun: bool) -> dict:
    """Train and test our model with `so3krates train` / `so3krates evaluate` in the main `.venv`.

    The config is `benchmarks/configs/rmd17.yaml` (our settings, with their reasons; the same for every
    molecule); the harness supplies the data paths, the shared split (as `split.npz`), the budget and the
    run directory. Threads come from the config: one, because batches of five small molecules run fastest
    on one thread and a second OpenMP thread under OMP_WAIT_POLICY=PASSIVE made each step about twice as
    slow here. A finished training in `run_dir/train` for the same budget is evaluated, not repeated,
    unless `rerun`.
    """
    python = ROOT / ".venv" / "bin" / "python"
    _, test_file = data_files(molecule)
    train_dir = run_dir / "train"
    command = our_train_command(BENCH / "configs" / "rmd17.yaml", molecule, run_dir, split, budget)
    train_wall = None
    finished = (train_dir / "results.json").is_file() and (train_dir / "config.yaml").is_file()
    if finished:
        done = yaml.safe_load((train_dir / "config.yaml").read_text())
        finished = float(done["training"]["max_time"]) == budget
    if rerun or not finished:
        if train_dir.exists():
            shutil.rmtree(train_dir)  # a stale run there would be resumed instead of started
        started = time.perf_counter()
        run_logged(command, run_dir / "log.txt", timeout=budget + 3600, threads=1)
        train_wall = time.perf_counter() - started
    metrics_path = run_dir / "test_metrics.json"
    evaluate = [str(python), "-m", "so3krates", "evaluate", "--model", str(train_dir / "best.pt")]
    evaluate += ["--data", str(test_file), "--energy-unit", "kcal/mol", "--json", str(metrics_path)]
    # The harness owns this folder: a reused training is evaluated again into it.
    evaluate += ["--out-dir", str(run_dir / "test"), "--threads", "1", "--overwrite"]
    run_logged(evaluate, run_dir / "evaluate_log.txt", timeout=3600, threads=1)
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
    curve = [
        {
            "wall_s": float(row["time_s"]),
            "epochs": int(row["step"]) / steps_per_epoch,
            "valid_energy_mae_meV": float(row["valid_energy_mae_meV"]),
            "valid_forces_mae_meV_per_A": float(row["valid_forces_mae_meV_per_A"]),
        }
        for row in history
    ]
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
        "test": {k: metrics[k] for k in TEST_METRICS},
        "learning_curve": curve,
        "description": "ours: `so3krates train configs/rmd17.yaml`, paper preset (F=132, 3 layers, l=1-3, "
        "4 heads, 32 PhysNet RBF, r_c 5 Å), float32, 1 thread",
        "command": shlex.join(command),
        "commands": {"train": shlex.join(command), "evaluate": shlex.join(evaluate)},
        "config_yaml": (train_dir / "config.yaml").read_text(),
        "run_dir": str(run_dir),
        "reused_finished_run": train_wall is None,
    }


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


FLAT_IMPROVEMENT = 0.05  # "flat": the validation force MAE improved by less than 5 %
FLAT_SHARE = 1.0 / 3.0  # ... for more than a third of the budget
FLAT_LEVEL = 2.0  # ... at a force MAE above twice the best model's test force MAE


def sanity_gate(entry: dict, best_force: float) -> dict:
    """Issue 18's gate: was the learning curve flat for > 1/3 of the budget at > 2× the best force MAE?

    Flat from validation i to j: no validation up to j improved on validation i's force MAE by 5 % or more.
    The longest such stretch that starts above the level counts (a curve that ends flat runs to the budget).
    """
    curve = [
        (c.get("wall_s"), c.get("valid_forces_mae_meV_per_A")) for c in entry.get("learning_curve") or []
    ]
    curve = [(t, f) for t, f in curve if t is not None and f is not None]
    if not curve:  # nothing to check: such a number is not published as checked
        return {"passed": False, "checked": False, "reason": "no learning curve with wall times recorded"}
    level = FLAT_LEVEL * best_force
    budget = entry["budget_seconds"]
    longest, span = 0.0, None
    for i, (t_i, f_i) in enumerate(curve):
        if f_i <= level:
            continue
        t_end = budget
        for t_j, f_j in curve[i + 1 :]:
            if f_j < (1.0 - FLAT_IMPROVEMENT) * f_i:
                t_end = t_j
                break
        if t_end - t_i > longest:
            longest, span = t_end - t_i, (t_i, t_end, f_i)
    flat = longest > FLAT_SHARE * budget
    investigation = entry.get("investigation")
    return {
        "passed": not flat or bool(investigation),
        "checked": True,
        "flat_seconds": round(longest, 1),
        "flat_span": None
        if span is None
        else {"from_s": span[0], "to_s": span[1], "valid_force_mae": span[2]},
        "level_meV_per_A": round(level, 2),
        "validations": len(curve),
        "investigation": investigation,
        "rule": f"flat (< {100 * FLAT_IMPROVEMENT:.0f} % better) for more than {FLAT_SHARE:.2f} of the "
        f"budget at a validation force MAE above {FLAT_LEVEL:g}× the best test force MAE of the table fails, "
        "unless the entry has a written investigation",
    }


def apply_gate(results: dict) -> dict:
    """Each entry's `sanity_gate`, against the best test force MAE of the table."""
    entries = results["models"]
    forces = {n: e["test"]["forces_mae_meV_per_A"] for n, e in entries.items() if "test" in e}
    if not forces:
        return results
    best = min(forces.values())
    for name, entry in entries.items():
        if name in forces:
            entry["sanity_gate"] = sanity_gate(entry, best)
    return results


def markdown_table(results: dict) -> str:
    protocol = results["protocol"]
    lines = [
        f"# rMD17 {results['molecule']}: accuracy after a fixed training budget",
        "",
        f"{protocol['n_train']} train / {protocol['n_valid']} valid frames of `{protocol['train_file']}` "
        f"(seed {protocol['split_seed']}), test on all {protocol['n_test']} frames of "
        f"`{protocol['test_file']}`. "
        "Best-validation weights; energy MAE per structure, force MAE per Cartesian component. Every model "
        "trained and tested by its own package's commands (see `commands` in the JSON).",
        f"Machine: {machine_line(results)}, {results['machine']['cores']} cores, "
        f"up to {results['machine']['threads_per_model']} threads per model (each model's own choice, see the"
        f" descriptions), torch {results['machine']['torch']}.",
        *cpu_note(results),
        "",
        "| model | package | parameters | threads | epochs | energy MAE (meV) | force MAE (meV/Å) "
        "| budget (min) | sanity gate |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    nan = float("nan")
    for name, entry in results["models"].items():
        test = entry.get("test", {})
        parameters = f"{entry['parameters']:,}" if entry.get("parameters") else "—"
        epochs = f"{entry['epochs']:.1f}" if entry.get("epochs") is not None else "—"
        version = f"{entry.get('package', '')} {entry.get('package_version') or ''}".strip()
        gate = entry.get("sanity_gate", {})
        if not gate:
            verdict = "—"
        elif not gate.get("checked", True):
            verdict = f"**not checked**: {gate['reason']}"
        elif gate["passed"]:
            verdict = "passed" + (" (investigated)" if gate.get("investigation") else "")
        else:
            verdict = (
                f"**failed**: flat {gate['flat_seconds'] / 60:.1f} min above {gate['level_meV_per_A']:.0f}"
            )
        energy, force = test.get("energy_mae_meV", nan), test.get("forces_mae_meV_per_A", nan)
        shown = (
            (f"{energy:.2f}", f"{force:.2f}") if gate.get("passed", True) else ("(withheld)", "(withheld)")
        )
        if "outcome" in entry:
            shown, verdict = ("—", "—"), entry["outcome"]
        lines.append(
            f"| {name} | {version} | {parameters} | {entry.get('torch_threads', '—')} | {epochs} "
            f"| {shown[0]} | {shown[1]} | {entry['budget_seconds'] / 60:g} | {verdict} |"
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


def entry_cpus(results: dict) -> dict[str, str]:
    """Model → the CPU its run trained on (entries from before this was recorded: the header's)."""
    return {name: e.get("cpu", results["machine"]["cpu"]) for name, e in results["models"].items()}


def machine_line(results: dict) -> str:
    """The CPU of the runs, or "several CPUs" where they differ (then named by :func:`cpu_note`)."""
    cpus = set(entry_cpus(results).values())
    return next(iter(cpus)) if len(cpus) == 1 else "several CPUs (below)"


def cpu_note(results: dict) -> list[str]:
    """Where the models of one table trained on different CPUs: which on which (a budget is then not
    quite equal)."""
    by_cpu: dict[str, list[str]] = {}
    for name, cpu in entry_cpus(results).items():
        by_cpu.setdefault(cpu, []).append(name)
    if len(by_cpu) <= 1:
        return []
    listed = "; ".join(f"{', '.join(names)} on {cpu}" for cpu, names in by_cpu.items())
    return [
        f"Not every model trained on the same CPU ({listed}): the machine behind this VM changed between "
        "sessions, and the same wall-clock budget buys a different amount of training on another CPU."
    ]


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
    signals = entry.get("signals") or []
    if signals and signals[-1].get("signal") != "SIGINT":
        notes.append(
            f"- {name}: stopped at the budget with {', '.join(x['signal'] for x in signals)} (it did not "
            "stop on SIGINT); its best checkpoint, written before, is the one tested."
        )
    if entry.get("investigation"):
        notes.append(f"- {name}: {entry['investigation']}")
    return notes


def summary(out_dir: Path) -> tuple[str, dict] | None:
    """Force and energy MAE per molecule and model over every `accuracy_<molecule>.json` in `out_dir`."""
    tables = {}
    for molecule in MOLECULES:
        path = out_dir / f"accuracy_{molecule}.json"
        if path.is_file():
            tables[molecule] = apply_gate(json.loads(path.read_text()))["models"]
    if not tables:
        return None
    models = [m for m in MODELS if any(m in t for t in tables.values())]
    lines = [
        "# rMD17: force MAE (meV/Å) / energy MAE (meV) after the same training budget",
        "",
        "Each cell: test force MAE / energy MAE on all 1000 test frames, after the budget in the molecule's "
        "table (`accuracy_<molecule>.md`, which also gives threads, epochs and dates). Bold: lowest force "
        "MAE of a complete row; —: not run yet; withheld: did not pass the sanity gate (see the molecule's "
        "table); a model that ran but finished no epoch within the budget says so.",
        "",
        "| molecule | " + " | ".join(models) + " |",
        "|---|" + "---:|" * len(models),
    ]
    wins = dict.fromkeys(models, 0)
    for molecule, entries in tables.items():
        passed = {
            m: e["test"]["forces_mae_meV_per_A"]
            for m, e in entries.items()
            if "test" in e and e.get("sanity_gate", {}).get("passed", True)
        }
        best = min(passed, key=passed.get) if passed else None
        # A complete row: every model has a published number or ran without finishing an epoch.
        complete = all(m in passed or "outcome" in entries.get(m, {}) for m in models)
        if best is not None and complete:
            wins[best] += 1
        cells = []
        for m in models:
            e = entries.get(m)
            if e is None:
                cells.append("—")
            elif "outcome" in e:
                cells.append(e["outcome"])
            elif m not in passed:
                cells.append("withheld")
            else:
                text = f"{e['test']['forces_mae_meV_per_A']:.1f} / {e['test']['energy_mae_meV']:.1f}"
                cells.append(f"**{text}**" if m == best and complete else text)
        lines.append(f"| {molecule} | " + " | ".join(cells) + " |")
    complete = [mol for mol, t in tables.items() if all(m in t for m in models)]
    lines += [
        "",
        f"Molecules with every model run: {len(complete)} of {len(MOLECULES)} "
        f"({', '.join(complete) or 'none'}); lowest force MAE among them: "
        + ", ".join(f"{m} {k}" for m, k in wins.items())
        + ".",
        "",
    ]
    for molecule, entries in tables.items():
        note = cpu_note({"models": entries, "machine": {"cpu": "an unrecorded CPU"}})
        lines += [f"{molecule}: {note[0][0].lower()}{note[0][1:]}", ""] if note else []
    return "\n".join(lines), tables


def plot_summary(tables: dict, path: Path) -> None:
    """One group of bars per molecule, one bar per model: test force MAE (gate failures left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in MODELS if any(m in t for t in tables.values())]
    molecules = list(tables)
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(max(5.5, 1.6 + 1.4 * len(molecules)), 3.8))
    for k, m in enumerate(models):
        xs, ys = [], []
        for x, molecule in enumerate(molecules):
            e = tables[molecule].get(m)
            if e and "test" in e and e.get("sanity_gate", {}).get("passed", True):
                xs.append(x + (k - (len(models) - 1) / 2) * width)
                ys.append(e["test"]["forces_mae_meV_per_A"])
        ax.bar(xs, ys, width=width, label=m)
    ax.set_xticks(range(len(molecules)), molecules)
    ax.set_ylabel("test force MAE / meV/Å")
    budgets = {e["budget_seconds"] / 60 for t in tables.values() for e in t.values()}
    ax.set_title(f"rMD17, {'/'.join(f'{b:g}' for b in sorted(budgets))} min of training per model")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def save_figure(fig, path: Path) -> None:
    """A matplotlib figure to ``path`` (PNG) through a temporary name, then closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", action="store_true", help="create/update the peer environments and exit")
    parser.add_argument(
        "--report", action="store_true", help="only rewrite the tables, summary and figure from the JSON"
    )
    parser.add_argument(
        "--rerun", action="store_true", help="train again even where the run folder holds a finished run"
    )
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma list among {','.join(MODELS)}")
    parser.add_argument("--budget-minutes", type=float, default=15.0, help="training wall time per model")
    parser.add_argument(
        "--molecules", default="ethanol", help=f"comma list among {','.join(MOLECULES)}, or 'all'"
    )
    parser.add_argument("--out-dir", type=Path, default=BENCH / "results")
    parser.add_argument("--runs-dir", type=Path, default=BENCH / "runs", help="logs and scratch (gitignored)")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose among {MODELS}")
    args.molecules = MOLECULES if args.molecules == "all" else [m.strip() for m in args.molecules.split(",")]
    unknown = sorted(set(args.molecules) - set(MOLECULES))
    if unknown:
        parser.error(f"unknown molecule(s) {unknown}; choose among {MOLECULES} or 'all'")
    if not args.budget_minutes > 0:
        parser.error(f"--budget-minutes must be positive, got {args.budget_minutes}")
    return args


def write_reports(out_dir: Path, molecules: list[str]) -> None:
    """Each molecule's markdown table (with the sanity gate) and the summary table and figure."""
    for molecule in molecules:
        json_path = out_dir / f"accuracy_{molecule}.json"
        if json_path.is_file():
            results = apply_gate(json.loads(json_path.read_text()))
            write_atomically(json_path, json.dumps(results, indent=2) + "\n")
            write_atomically(json_path.with_suffix(".md"), markdown_table(results))
    made = summary(out_dir)
    if made is not None:
        text, tables = made
        write_atomically(out_dir / "accuracy_summary.md", text)
        plot_summary(tables, out_dir / "accuracy_force_mae.png")
        print(f"wrote {out_dir / 'accuracy_summary.md'} and {out_dir / 'accuracy_force_mae.png'}", flush=True)


def header_for(molecule: str, train_file: Path, test_file: Path, split: dict) -> dict:
    return {
        "benchmark": "rMD17 accuracy after a fixed training wall-clock budget",
        "molecule": molecule,
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
            "threads": {name: (PEER_MODELS[name].threads if name in PEER_MODELS else 1) for name in MODELS},
            "env": {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "the model's thread count"},
            "budget": "training-loop wall time (steps + validation after each epoch); set-up and test not "
            "counted",
            "selection": "weights (EMA where used) with the lowest validation loss",
            "train_indices": split["train"],
            "valid_indices": split["valid"],
        },
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.setup:
        for env in dict.fromkeys(PEER_MODELS[m].env for m in args.models if m in PEER_MODELS):
            setup_env(env)
        return 0
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.report:
        write_reports(args.out_dir, MOLECULES)
        return 0

    budget = 60.0 * args.budget_minutes
    failures = {}
    for molecule in args.molecules:
        train_file, test_file = data_files(molecule)
        run_root = args.runs_dir / molecule
        run_root.mkdir(parents=True, exist_ok=True)
        split = make_split(train_file)
        (run_root / "split.json").write_text(json.dumps(split))
        header = header_for(molecule, train_file, test_file, split)
        json_path = args.out_dir / f"accuracy_{molecule}.json"
        for name in args.models:
            run_dir = run_root / name
            run_dir.mkdir(parents=True, exist_ok=True)
            started = datetime.datetime.now(datetime.timezone.utc)
            print(f"[{started:%H:%M:%S}] {molecule} {name}: {args.budget_minutes:g}-min budget", flush=True)
            tick = time.perf_counter()
            load_before = os.getloadavg()
            try:
                if name == "so3krates":
                    entry = run_ours(molecule, budget, run_dir, split, rerun=args.rerun)
                else:
                    entry = run_peer(name, molecule, budget, run_dir, rerun=args.rerun)
            except (
                RuntimeError,
                subprocess.TimeoutExpired,
                OSError,
                KeyError,
                json.JSONDecodeError,
            ) as error:
                failures[(molecule, name)] = str(error)
                print(f"{molecule} {name}: FAILED: {error}", file=sys.stderr, flush=True)
                continue
            if entry.get("reused_finished_run"):
                entry = keep_run_facts(entry, previous_entry(json_path, name, entry))
            entry.setdefault("date", started.isoformat(timespec="seconds"))
            # The machine's CPU can change between sessions: a budget buys different training on another.
            entry.setdefault("cpu", header["machine"]["cpu"])
            entry.setdefault("wall_seconds_total", time.perf_counter() - tick)  # lock wait included
            # 1-minute load averages around the run: well above 2 means another job shared the cores.
            entry.setdefault("load_average_1min", {"before": load_before[0], "after": os.getloadavg()[0]})
            if "outcome" in entry:
                outcome = entry["outcome"]
            else:
                test = entry["test"]
                outcome = (
                    f"epochs {entry.get('epochs') or float('nan'):.1f}, "
                    f"energy MAE {test['energy_mae_meV']:.2f} meV, "
                    f"force MAE {test['forces_mae_meV_per_A']:.2f} meV/Å"
                )
            print(f"{molecule} {name}: {outcome} ({entry['wall_seconds_total']:.0f} s in all)", flush=True)
            # Written after every model, so that a later failure keeps the finished ones.
            header["updated"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            results = merge_results(json_path, header, {name: entry})
            write_atomically(json_path, json.dumps(results, indent=2) + "\n")
            write_reports(args.out_dir, [molecule])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
