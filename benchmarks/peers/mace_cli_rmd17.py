"""Train MACE on rMD17 through its own command line, under a wall-clock budget, and test it.

    python benchmarks/peers/mace_cli_rmd17.py --size small --molecule ethanol --budget-minutes 15 \
        --threads 2 --out benchmarks/runs/peers/mace_small_cli/ethanol

Runs in the main `.venv` (numpy, ase, yaml) and calls MACE's commands from its own environment
(`benchmarks/.envs/mace-torch/bin/`) as subprocesses, the way its users run it:

1. data: the shared split of `benchmarks/accuracy.py` (`make_split`, `data_files`): 950 train / 50 valid
   frames of `rmd17_<molecule>_train_01.npz`, all 1000 frames of `..._test_01.npz`, as extxyz with
   `REF_energy` / `REF_forces` (eV, eV/Å), the keys mace_run_train reads by default;
2. `mace_run_train --config <out>/config.yaml` (the copy of `configs/peers/mace_<size>_rmd17.yaml` with the
   per-run values filled in), OMP_NUM_THREADS = --threads, OMP_WAIT_POLICY=PASSIVE. The budget clock
   starts at MACE's "Started training, reporting errors on validation set" line (data loading, E0s and
   model set-up before it are timed separately). mace_run_train has an epoch limit but no time limit, so
   at the budget the runner stops it (SIGINT, then SIGTERM/SIGKILL after grace periods,
   `cli_runner.run_watched`). What survives is MACE's checkpoint, written with the EMA weights after
   every epoch whose validation loss improved (only the latest is kept, so the latest is the best);
3. finalisation with MACE's own restart option: `mace_run_train` again with `restart_latest: true` and
   `max_num_epochs` = the checkpoint's epoch, so it reloads that checkpoint, runs no epoch, writes its final
   model `rmd17.model` and evaluates it on train, valid and the test file (its own error table, kept in
   the result as a cross-check);
4. `mace_eval_configs` on the 1000 test frames writes the predictions (`MACE_energy`, `MACE_forces`); the
   runner computes the energy MAE (meV per molecule) and force MAE (meV/Å per Cartesian component) from
   that file against the npz labels, as for every model of the benchmark;
5. `<out>/result.json`: commands, resolved config, package version, threads, budget, times, epochs,
   learning curve (MACE's own metrics file `<results_dir>/rmd17_run-<seed>_train.txt`, with wall times from
   its log lines), test errors and the load average at start and end.

With `--xyz TRAIN VALID TEST` (extxyz with REF_energy / REF_forces) the runner trains and tests on those
files instead of the rMD17 split (`benchmarks/ood_split.py` uses this); `--molecule` is then a label.

Run one heavy job at a time on the machine (e.g. under `flock /tmp/so3krates-cpu.lock`, as accuracy.py does).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
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
    xyz_reference,
)

BENCH = Path(__file__).resolve().parents[1]
CONFIGS = BENCH / "configs" / "peers"
DEFAULT_PEER_ENV = BENCH / ".envs" / "mace-torch"

NAME = "rmd17"  # `name` of the configs: the final model is <model_dir>/rmd17.model
LOOP_MARKER = "Started training, reporting errors on validation set"  # tools.train, before the first epoch
MISSING_CHECKPOINT = "Cannot find checkpoint with tag"  # a restart that would train from scratch
TEST_TABLE = re.compile(r"Error-table on ")

try:
    import yaml
except ImportError as error:
    raise fail(f"{error}; run it with the main venv (.venv/bin/python)") from None

sys.path.insert(0, str(BENCH))
from accuracy import data_files, make_split  # noqa: E402  (the split every model of the benchmark uses)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["small", "large"], default="small", help="MACE size")
    parser.add_argument("--molecule", default="ethanol", help="rMD17 molecule (default: ethanol)")
    parser.add_argument("--budget-minutes", type=float, default=15.0, help="training wall time (default 15)")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the peer (default 2)")
    parser.add_argument("--out", default=None, help="run folder (default: benchmarks/runs/peers/...)")
    parser.add_argument("--seed", type=int, default=0, help="mace_run_train --seed (default 0)")
    parser.add_argument("--config", default=None, help="YAML (default configs/peers/mace_<size>_rmd17.yaml)")
    parser.add_argument("--peer-env", default=str(DEFAULT_PEER_ENV), help="mace-torch environment")
    parser.add_argument(
        "--grace-seconds", type=float, default=5.0, help="wait after SIGINT before SIGTERM (default 5)"
    )
    parser.add_argument("--eval-batch-size", type=int, default=50, help="mace_eval_configs --batch_size")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    parser.add_argument(
        "--xyz",
        nargs=3,
        metavar=("TRAIN", "VALID", "TEST"),
        help="extxyz files (REF_energy in info, REF_forces in arrays; eV, eV/Å) instead of the rMD17 split; "
        "--molecule is then only the run's label",
    )
    args = parser.parse_args(argv)
    if args.config is None:
        args.config = str(CONFIGS / f"mace_{args.size}_rmd17.yaml")
    if args.out is None:
        args.out = str(BENCH / "runs" / "peers" / f"mace_{args.size}_cli" / args.molecule)
    if (Path(args.out) / "result.json").exists() and not args.overwrite:
        raise fail(f"{args.out}: holds an earlier run (result.json); pass --overwrite to replace it")
    if not args.budget_minutes > 0:
        raise fail(f"--budget-minutes must be positive, got {args.budget_minutes}")
    if args.threads < 1:
        raise fail(f"--threads must be at least 1, got {args.threads}")
    return args


def resolve_config(template: str, values: dict[str, object]) -> str:
    """The template with its ${...} placeholders filled; checks the run name the runner relies on."""
    text = fill_placeholders(template, values)
    config = yaml.safe_load(text)
    if config.get("name") != NAME:
        raise fail(f"the config's name must be {NAME!r} (the runner finds checkpoints and model by it)")
    return text


def mace_error_tables(log_text: str) -> list[str]:
    """MACE's own error tables at the end of a run: each 'Error-table on ...' line and the table under it."""
    rows, inside = [], False
    for line in log_text.splitlines():
        if TEST_TABLE.search(line):
            rows.append(line.split("INFO: ", 1)[-1])
            inside = True
        elif inside and line[:1] in "+|":
            rows.append(line)
        else:
            inside = False
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_start = os.getloadavg()
    t_begin = time.time()

    # Bad input first: one line each, nothing written.
    if args.xyz is None:
        train_npz, test_npz = data_files(args.molecule)
    else:
        for path in args.xyz:
            if not Path(path).is_file():
                raise fail(f"--xyz: {path} not found")
    peer_bin = Path(args.peer_env) / "bin"
    for tool in ("python", "mace_run_train", "mace_eval_configs"):
        if not os.access(peer_bin / tool, os.X_OK):
            raise fail(
                f"{peer_bin / tool} not found: set up the peer venv (python benchmarks/accuracy.py --setup)"
            )
    config_template = Path(args.config)
    if not config_template.is_file():
        raise fail(f"config {config_template} not found")
    versions = peer_versions(peer_bin / "python", "mace-torch")

    out = Path(args.out).resolve()
    work = out / "train"  # mace_run_train's working directory: checkpoints, logs, results, final model
    if work.exists():
        shutil.rmtree(work)  # a stale checkpoint there would be taken as this run's best
    work.mkdir(parents=True)
    data_dir = out / "data"
    data_dir.mkdir(exist_ok=True)

    # 1. Data: the rMD17 split as extxyz, or the given extxyz files.
    if args.xyz is None:
        split = make_split(train_npz)
        train_xyz, valid_xyz, test_xyz = (data_dir / f"{part}.xyz" for part in ("train", "valid", "test"))
        n_frames = {
            "train": write_frames(train_npz, split["train"], train_xyz),
            "valid": write_frames(train_npz, split["valid"], valid_xyz),
            "test": write_frames(test_npz, None, test_xyz),
        }
        reference = npz_reference(test_npz)
        data_record = {"train_file": str(train_npz), "test_file": str(test_npz), "split_seed": split["seed"]}
    else:
        train_xyz, valid_xyz, test_xyz = (Path(path).resolve() for path in args.xyz)
        reference = xyz_reference(test_xyz)
        n_frames = {"test": len(reference["energy"])}
        data_record = {"train_file": str(train_xyz), "valid_file": str(valid_xyz), "test_file": str(test_xyz)}

    # 2. Training under the budget.
    values = {
        "SEED": args.seed,
        "LOG_DIR": str(work / "logs"),
        "MODEL_DIR": str(work / "model"),
        "CHECKPOINTS_DIR": str(work / "checkpoints"),
        "RESULTS_DIR": str(work / "results"),
        "TRAIN_XYZ": str(train_xyz),
        "VALID_XYZ": str(valid_xyz),
    }
    config_text = resolve_config(config_template.read_text(), values)
    config_path = out / "config.yaml"
    config_path.write_text(config_text)
    env = peer_env_vars(args.threads)
    budget_seconds = 60.0 * args.budget_minutes
    train_command = [str(peer_bin / "mace_run_train"), "--config", str(config_path)]
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
            f"mace_run_train failed (exit {train_run['returncode']}); {train_log}:\n{log_tail(train_log)}"
        )
    if train_run["loop_started"] is None:
        raise fail(f"mace_run_train never reached its training loop; see {train_log}")
    t_loop = train_run["loop_started"]
    tag = f"{NAME}_run-{args.seed}"
    curve = learning_curve(train_log, work / "results" / f"{tag}_train.txt", t_loop)
    epochs_completed = max((c["epochs_completed"] for c in curve), default=0)

    # 3. Finalisation with MACE's restart option: reload the best checkpoint, write and test the final model.
    found = latest_checkpoint(work / "checkpoints", tag)
    if found is None:
        raise fail(f"no checkpoint was written within the budget (epochs completed: {epochs_completed})")
    checkpoint, best_epoch = found
    final_config = yaml.safe_load(config_text)
    overrides = {
        "restart_latest": True,  # reload the latest (= best) checkpoint
        "max_num_epochs": best_epoch,  # training restarts at the checkpoint's epoch: no epoch runs
        "test_file": str(test_xyz),  # MACE's own error table on the test set, as a cross-check
        "results_dir": str(work / "results_finalise"),  # keep the training run's metric files apart
        "log_dir": str(work / "logs_finalise"),
    }
    final_config.update(overrides)
    final_config_path = out / "config_finalise.yaml"
    final_config_path.write_text(yaml.safe_dump(final_config, sort_keys=False))
    final_command = [str(peer_bin / "mace_run_train"), "--config", str(final_config_path)]
    final_log = out / "finalise.log"
    model_path = work / "model" / f"{NAME}.model"
    print(f"finalising from {checkpoint.name}: {shlex.join(final_command)}", flush=True)
    final_run = run_watched(
        final_command,
        final_log,
        work,
        env,
        None,
        args.grace_seconds,
        abort_marker=MISSING_CHECKPOINT,
        timeout=3600,
    )
    final_text = final_log.read_text(errors="replace")
    if final_run["stopped_by"] is not None or final_run["returncode"] != 0 or not model_path.exists():
        raise fail(
            f"finalisation failed ({final_run['stopped_by'] or final_run['returncode']}); see {final_log}"
        )
    if f"Loading checkpoint: {checkpoint}" not in final_text:
        raise fail(f"finalisation did not load {checkpoint.name}; see {final_log}")
    best_entry = next((c for c in curve if c["epoch"] == best_epoch), None)

    # 4. Test: mace_eval_configs writes the predictions; the errors are computed here from that file.
    predictions = out / "test_predictions.xyz"
    eval_command = [
        str(peer_bin / "mace_eval_configs"),
        "--configs",
        str(test_xyz),
        "--model",
        str(model_path),
        "--output",
        str(predictions),
        "--device",
        "cpu",
        "--default_dtype",
        "float64",
        "--batch_size",
        str(args.eval_batch_size),
    ]
    eval_log = out / "eval.log"
    print(f"testing: {shlex.join(eval_command)}", flush=True)
    eval_run = run_watched(eval_command, eval_log, out, env, None, args.grace_seconds, timeout=3600)
    if eval_run["returncode"] != 0 or not predictions.exists():
        raise fail(
            f"mace_eval_configs failed (exit {eval_run['returncode']}); {eval_log}:\n{log_tail(eval_log)}"
        )
    test = test_errors(predictions, reference, "MACE_energy", "MACE_forces")

    # 5. Result.
    result = {
        "model": f"mace-{args.size} (mace_run_train / mace_eval_configs command line)",
        "molecule": args.molecule,
        "package": "mace-torch",
        "package_version": versions["mace-torch"],
        "torch": versions["torch"],
        "peer_python": versions["python"],
        "parameters": count_parameters(peer_bin / "python", model_path),
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
        "finalise_overrides": overrides,
        "data": {
            **data_record,
            "n_frames": n_frames,
            "units": f"eV, eV/Å (1 kcal/mol = ase.units.kcal / ase.units.mol = {EV_PER_KCAL_MOL:.10f} eV)",
            "keys": {"energy": "info['REF_energy']", "forces": "arrays['REF_forces']"},
        },
        "training": {
            "setup_seconds": round(t_loop - train_run["started"], 3),
            "train_seconds": round(train_run["ended"] - t_loop, 3),
            "wall_seconds": round(train_run["ended"] - train_run["started"], 3),
            "cpu_seconds": round(train_run["cpu_seconds"], 3),
            "stopped_by": train_run["stopped_by"] or "mace_run_train finished by itself",
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
            "mace_error_tables": mace_error_tables(final_text),
        },
        "test": {
            **test,
            "eval_wall_seconds": round(eval_run["ended"] - eval_run["started"], 3),
            "predictions": str(predictions),
            "source": "computed by this runner from mace_eval_configs's predictions file (MACE_energy, "
            "MACE_forces) against the npz labels; energy per molecule, forces per Cartesian component",
        },
        "logs": {"train": str(train_log), "finalise": str(final_log), "eval": str(eval_log)},
        "wall_seconds_total": round(time.time() - t_begin, 3),
        "load_average": {"start": list(load_start), "end": list(os.getloadavg())},
    }
    result_path = out / "result.json"
    tmp = result_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(result_path)
    last = curve[-1] if curve else {}
    print(
        f"{args.molecule}: mace-{args.size}, {epochs_completed} epochs in "
        f"{result['training']['train_seconds']:.0f} s; valid F MAE (last) "
        f"{last.get('valid_mae_f_meV_per_A', float('nan')):.1f} meV/Å; test E MAE "
        f"{test['energy_mae_meV']:.1f} meV, F MAE {test['forces_mae_meV_per_A']:.1f} meV/Å -> {result_path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
