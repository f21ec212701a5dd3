"""Train so3krates-torch on rMD17 through its own command line, under a wall-clock budget, and test it.

    python benchmarks/peers/so3krates_torch_cli_rmd17.py --molecule ethanol --budget-minutes 15 --threads 2 \
        --out benchmarks/runs/peers/so3krates_torch_cli/ethanol

Runs in the main `.venv` (numpy, ase, yaml) and calls the package's commands from its own environment
(`benchmarks/.envs/so3krates-torch/bin/`) as subprocesses, the way its users run it:

1. data: the shared split of `benchmarks/accuracy.py` (`make_split`, `data_files`): 950 train / 50 valid
   frames of `rmd17_<molecule>_train_01.npz`, all 1000 frames of `..._test_01.npz`, written as extxyz
   with `REF_energy` (eV) in `info` and `REF_forces` (eV/Å) in `arrays`, the keys the package reads by
   default (kcal/mol → eV with ase.units.kcal / ase.units.mol);
2. `torchkrates-train --config <out>/config.yaml` (the copy of `configs/peers/so3krates_torch_rmd17.yaml`
   with the per-run values filled in), OMP_NUM_THREADS = --threads, OMP_WAIT_POLICY=PASSIVE. The budget
   clock starts at the package's "Starting training loop..." log line (its setup is timed separately);
   at the budget the runner sends SIGINT, then SIGTERM and SIGKILL after grace periods if needed
   (`cli_runner.run_watched`). torchkrates-train has no interrupt handler and in our runs did not stop on
   SIGINT at all, so the default grace before SIGTERM is 5 s (it was 60 s in the runs of 3 Dec, which
   therefore trained about a minute past the budget). What survives is its best checkpoint, written
   after every epoch whose validation loss improved, with the EMA weights;
3. finalisation with the package's own restart option: `torchkrates-train` again with `restart_latest: true`
   and `num_epochs` = best epoch + 1, so it reloads the best checkpoint, validates it once, runs no epoch and
   writes its final model `<name_exp>.model` (the best-checkpoint EMA weights);
4. `torchkrates-eval` on the 1000 test frames, with its predictions written as extxyz (`SO3_energy`,
   `SO3_forces`). torchkrates-eval prints no errors, so the runner computes the energy MAE (meV per
   molecule) and the force MAE (meV/Å per Cartesian component) from that file against the npz labels;
5. `<out>/result.json`: commands, resolved config, package version, threads, budget, times, epochs,
   learning curve (validation errors from the package's own `<log_dir>/<name_exp>_valid.txt`, with wall
   times from its log lines), test errors and the load average at start and end.

Run one heavy job at a time on the machine (e.g. under `flock /tmp/so3krates-cpu.lock`, as accuracy.py does).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

from cli_runner import (
    EV_PER_KCAL_MOL,
    count_parameters,
    fail,
    fill_placeholders,
    latest_checkpoint,
    learning_curve,
    log_tail,
    npz_reference,
    peer_env_vars,
    peer_versions,
    run_watched,
    test_errors,
    write_frames,
)

BENCH = Path(__file__).resolve().parents[1]
ROOT = BENCH.parent
DEFAULT_CONFIG = BENCH / "configs" / "peers" / "so3krates_torch_rmd17.yaml"
DEFAULT_PEER_ENV = BENCH / ".envs" / "so3krates-torch"

NAME_EXP = "rmd17"  # GENERAL.name_exp of the config (file tag of checkpoints, logs and the final model)
LOOP_MARKER = "Starting training loop..."  # run_train.py logs this just before tools.train.train()
FRESH_MARKER = "Starting fresh training."  # a restart that found no usable checkpoint

try:
    import yaml
except ImportError as error:
    raise fail(f"{error}; run it with the main venv (.venv/bin/python)") from None

sys.path.insert(0, str(BENCH))
from accuracy import data_files, make_split  # noqa: E402  (the split every model of the benchmark uses)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--molecule", default="ethanol", help="rMD17 molecule (default: ethanol)")
    parser.add_argument("--budget-minutes", type=float, default=15.0, help="training wall time (default 15)")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the peer (default 2)")
    parser.add_argument("--out", default=None, help="run folder (default: benchmarks/runs/peers/...)")
    parser.add_argument("--seed", type=int, default=0, help="GENERAL.seed (default 0)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="torchkrates-train YAML template")
    parser.add_argument("--peer-env", default=str(DEFAULT_PEER_ENV), help="so3krates-torch environment")
    parser.add_argument(
        "--grace-seconds",
        type=float,
        default=5.0,
        help="wait after SIGINT before SIGTERM (default 5: the package does not stop on SIGINT, and its best "
        "checkpoint is already on disk)",
    )
    parser.add_argument("--eval-batch-size", type=int, default=50, help="torchkrates-eval --batch_size")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = str(BENCH / "runs" / "peers" / "so3krates_torch_cli" / args.molecule)
    if (Path(args.out) / "result.json").exists() and not args.overwrite:
        raise fail(f"{args.out}: holds an earlier run (result.json); pass --overwrite to replace it")
    if not args.budget_minutes > 0:
        raise fail(f"--budget-minutes must be positive, got {args.budget_minutes}")
    if args.threads < 1:
        raise fail(f"--threads must be at least 1, got {args.threads}")
    return args


# ---------------------------------------------------------------------------------------------- config


def resolve_config(template: str, values: dict[str, object]) -> str:
    """The template with its ${...} placeholders filled; checks the experiment name the runner relies on."""
    text = fill_placeholders(template, values)
    config = yaml.safe_load(text)
    if config["GENERAL"]["name_exp"] != NAME_EXP:
        raise fail(f"GENERAL.name_exp must be {NAME_EXP!r} (the runner finds checkpoints and model by it)")
    return text


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_start = os.getloadavg()
    t_begin = time.time()

    # Bad input first: one line each, nothing written.
    train_npz, test_npz = data_files(args.molecule)
    peer_bin = Path(args.peer_env) / "bin"
    for tool in ("python", "torchkrates-train", "torchkrates-eval"):
        if not os.access(peer_bin / tool, os.X_OK):
            raise fail(
                f"{peer_bin / tool} not found: set up the peer venv (python benchmarks/accuracy.py --setup)"
            )
    config_template = Path(args.config)
    if not config_template.is_file():
        raise fail(f"config {config_template} not found")
    versions = peer_versions(peer_bin / "python", "so3krates-torch")

    out = Path(args.out).resolve()
    work = out / "train"  # torchkrates-train's working directory: checkpoints, logs, final model
    if work.exists():
        shutil.rmtree(work)  # a stale checkpoint there would be taken as this run's best
    work.mkdir(parents=True)
    data_dir = out / "data"
    data_dir.mkdir(exist_ok=True)

    # 1. Data: the benchmark's split, as extxyz with the package's default keys.
    split = make_split(train_npz)
    train_xyz, valid_xyz, test_xyz = (data_dir / f"{part}.xyz" for part in ("train", "valid", "test"))
    n_frames = {
        "train": write_frames(train_npz, split["train"], train_xyz),
        "valid": write_frames(train_npz, split["valid"], valid_xyz),
        "test": write_frames(test_npz, None, test_xyz),
    }

    # 2. Training under the budget.
    values = {
        "CHECKPOINTS_DIR": str(work / "checkpoints"),
        "MODEL_DIR": str(work / "model"),
        "LOG_DIR": str(work / "logs"),
        "SEED": args.seed,
        "TRAIN_XYZ": str(train_xyz),
        "VALID_XYZ": str(valid_xyz),
    }
    config_text = resolve_config(config_template.read_text(), values)
    config_path = out / "config.yaml"
    config_path.write_text(config_text)
    env = peer_env_vars(args.threads)
    budget_seconds = 60.0 * args.budget_minutes
    train_command = [str(peer_bin / "torchkrates-train"), "--config", str(config_path)]
    train_log = out / "train.log"
    print(
        f"training for {args.budget_minutes:g} min: {shlex.join(train_command)} (log {train_log})", flush=True
    )
    train_run = run_watched(
        train_command,
        train_log,
        work,
        env,
        budget_seconds,
        args.grace_seconds,
        loop_marker=LOOP_MARKER,
        timeout=budget_seconds + 1800,
    )
    if train_run["stopped_by"] is None and train_run["returncode"] != 0:
        raise fail(
            f"torchkrates-train failed (exit {train_run['returncode']}); {train_log}:\n{log_tail(train_log)}"
        )
    if train_run["loop_started"] is None:
        raise fail(f"torchkrates-train never reached its training loop; see {train_log}")
    t_loop = train_run["loop_started"]
    curve = learning_curve(train_log, work / "logs" / f"{NAME_EXP}_valid.txt", t_loop)
    epochs_completed = max((c["epochs_completed"] for c in curve), default=0)
    package_config_dump = work / "checkpoints" / "config.yaml"  # the package's own dump, defaults included

    # 3. Finalisation with the package's restart option: reload the best checkpoint, write the final model.
    found = latest_checkpoint(work / "checkpoints", NAME_EXP)
    if found is None:
        raise fail(f"no checkpoint was written within the budget (epochs completed: {epochs_completed})")
    checkpoint, best_epoch = found
    final_config = yaml.safe_load(config_text)
    overrides = {
        "MISC.restart_latest": True,  # reload the latest (= best) checkpoint
        "TRAINING.num_epochs": best_epoch + 1,  # training restarts at best_epoch + 1: no epoch runs
        "GENERAL.log_dir": str(work / "logs_finalise"),  # keep the training run's metric files apart
    }
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        final_config[section][key] = value
    final_config_path = out / "config_finalise.yaml"
    final_config_path.write_text(yaml.safe_dump(final_config, sort_keys=False))
    final_command = [str(peer_bin / "torchkrates-train"), "--config", str(final_config_path)]
    final_log = out / "finalise.log"
    model_path = work / f"{NAME_EXP}.model"
    print(f"finalising from {checkpoint.name}: {shlex.join(final_command)}", flush=True)
    final_run = run_watched(
        final_command, final_log, work, env, None, args.grace_seconds, abort_marker=FRESH_MARKER, timeout=1800
    )
    final_text = final_log.read_text(errors="replace")
    if final_run["stopped_by"] is not None or final_run["returncode"] != 0 or not model_path.exists():
        raise fail(
            f"finalisation failed ({final_run['stopped_by'] or final_run['returncode']}); see {final_log}"
        )
    if f"Loaded checkpoint from epoch {best_epoch}" not in final_text:
        raise fail(f"finalisation did not load {checkpoint.name}; see {final_log}")
    reloaded = learning_curve(
        final_log, work / "logs_finalise" / f"{NAME_EXP}_valid.txt", final_run["started"]
    )
    best_entry = next((c for c in curve if c["epoch"] == best_epoch), None)

    # 4. Test: torchkrates-eval writes the predictions; the errors are computed here from that file.
    predictions = out / "test_predictions.xyz"
    eval_command = [
        str(peer_bin / "torchkrates-eval"),
        "--model_path",
        str(model_path),
        "--data_path",
        str(test_xyz),
        "--output_file",
        str(predictions),
        "--model_type",
        "so3krates",
        "--device",
        "cpu",
        "--dtype",
        "float64",
        "--batch_size",
        str(args.eval_batch_size),
    ]
    eval_log = out / "eval.log"
    print(f"testing: {shlex.join(eval_command)}", flush=True)
    eval_run = run_watched(eval_command, eval_log, out, env, None, args.grace_seconds, timeout=3600)
    if eval_run["returncode"] != 0 or not predictions.exists():
        raise fail(
            f"torchkrates-eval failed (exit {eval_run['returncode']}); {eval_log}:\n{log_tail(eval_log)}"
        )
    test = test_errors(predictions, npz_reference(test_npz), "SO3_energy", "SO3_forces")

    # 5. Result.
    result = {
        "model": "so3krates-torch (torchkrates-train / torchkrates-eval command line)",
        "molecule": args.molecule,
        "package": "so3krates-torch",
        "package_version": versions["so3krates-torch"],
        "parameters": count_parameters(peer_bin / "python", model_path),
        "torch": versions["torch"],
        "peer_python": versions["python"],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "runner_command": shlex.join([sys.executable, *sys.argv]),
        "commands": {
            "train": shlex.join(train_command),
            "finalise": shlex.join(final_command),
            "eval": shlex.join(eval_command),
        },
        "environment": {k: env[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")},
        "threads": args.threads,
        "budget_minutes": args.budget_minutes,
        "budget_seconds": budget_seconds,
        "config_template": str(config_template),
        "config_yaml": config_text,
        "config_package_dump_yaml": package_config_dump.read_text() if package_config_dump.exists() else None,
        "finalise_overrides": overrides,
        "data": {
            "train_file": str(train_npz),
            "test_file": str(test_npz),
            "split_seed": split["seed"],
            "n_frames": n_frames,
            "units": f"eV, eV/Å (1 kcal/mol = ase.units.kcal / ase.units.mol = {EV_PER_KCAL_MOL:.10f} eV)",
            "keys": {"energy": "info['REF_energy']", "forces": "arrays['REF_forces']"},
        },
        "training": {
            "setup_seconds": round(t_loop - train_run["started"], 3),
            "train_seconds": round(train_run["ended"] - t_loop, 3),
            "wall_seconds": round(train_run["ended"] - train_run["started"], 3),
            "cpu_seconds": round(train_run["cpu_seconds"], 3),
            "stopped_by": train_run["stopped_by"] or "torchkrates-train finished by itself",
            "signals": train_run["signals"],
            "returncode": train_run["returncode"],
            "epochs_completed": epochs_completed,
            "best_checkpoint": checkpoint.name,
            "best_epoch": best_epoch,
            "best_valid": best_entry,
            "learning_curve": curve,
        },
        "finalisation": {
            "wall_seconds": round(final_run["ended"] - final_run["started"], 3),
            "model": str(model_path),
            "valid_of_reloaded_checkpoint": reloaded[0] if reloaded else None,
        },
        "test": {
            **test,
            "eval_wall_seconds": round(eval_run["ended"] - eval_run["started"], 3),
            "predictions": str(predictions),
            "source": "computed by this runner from torchkrates-eval's predictions file (SO3_energy, "
            "SO3_forces) against the npz labels; energy per molecule, forces per Cartesian component",
        },
        "logs": {"train": str(train_log), "finalise": str(final_log), "eval": str(eval_log)},
        "wall_seconds_total": round(time.time() - t_begin, 3),
        "load_average": {"start": list(load_start), "end": list(os.getloadavg())},
    }
    result_path = out / "result.json"
    result_path.write_text(json.dumps(result, indent=2) + "\n")
    last = curve[-1] if curve else {}
    print(
        f"{args.molecule}: {epochs_completed} epochs in {result['training']['train_seconds']:.0f} s; "
        f"valid F MAE (last) {last.get('valid_mae_f_meV_per_A', float('nan')):.1f} meV/Å; test E MAE "
        f"{test['energy_mae_meV']:.1f} meV, F MAE {test['forces_mae_meV_per_A']:.1f} meV/Å -> {result_path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
