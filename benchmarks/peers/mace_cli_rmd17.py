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
import os
import re
import shlex
import sys
import time
from pathlib import Path

from cli_runner import (
    add_common_arguments,
    check_common_arguments,
    check_peer,
    count_parameters,
    fail,
    fill_placeholders,
    fresh_run_dir,
    latest_checkpoint,
    learning_curve,
    peer_env_vars,
    peer_versions,
    run_record,
    run_step,
    summary_line,
    test_errors,
    train_under_budget,
    training_record,
    write_result,
    write_rmd17_split,
    xyz_reference,
)

BENCH = Path(__file__).resolve().parents[1]
CONFIGS = BENCH / "configs" / "peers"
DEFAULT_PEER_ENV = BENCH / ".envs" / "mace-torch"

NAME = "rmd17"  # `name` of the configs: the final model is <model_dir>/rmd17.model
LOOP_MARKER = "Started training, reporting errors on validation set"  # tools.train, before the first epoch
MISSING_CHECKPOINT = "Cannot find checkpoint with tag"  # a restart that would train from scratch
ERROR_TABLE = re.compile(r"Error-table on ")

try:
    import yaml
except ImportError as error:
    raise fail(f"{error}; run it with the main venv (.venv/bin/python)") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["small", "large"], default="small", help="MACE size")
    add_common_arguments(parser, "mace-torch", "mace_eval_configs", DEFAULT_PEER_ENV, None)
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
    default_out = BENCH / "runs" / "peers" / f"mace_{args.size}_cli" / args.molecule
    check_common_arguments(args, default_out, rmd17=args.xyz is None)
    for path in args.xyz or ():
        if not Path(path).is_file():
            raise fail(f"--xyz: {path} not found")
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
        if ERROR_TABLE.search(line):
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
    peer_bin, config_template = check_peer(
        args.peer_env, ("mace_run_train", "mace_eval_configs"), args.config
    )
    versions = peer_versions(peer_bin / "python", "mace-torch")
    out = Path(args.out).resolve()
    work, data_dir = fresh_run_dir(out)  # mace_run_train's working directory: checkpoints, logs, model

    # 1. Data: the rMD17 split as extxyz, or the given extxyz files.
    if args.xyz is None:
        data = write_rmd17_split(args.molecule, data_dir)
    else:
        files = dict(zip(("train", "valid", "test"), (Path(p).resolve() for p in args.xyz), strict=True))
        reference = xyz_reference(files["test"])
        record = {f"{part}_file": str(path) for part, path in files.items()}
        data = {
            "files": files,
            "reference": reference,
            "record": {**record, "n_test": len(reference["energy"])},
        }
    train_xyz, valid_xyz, test_xyz = (data["files"][part] for part in ("train", "valid", "test"))

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
    train_command = [str(peer_bin / "mace_run_train"), "--config", str(config_path)]
    train_log = out / "train.log"
    train_run = train_under_budget(train_command, train_log, work, env, args, LOOP_MARKER)
    tag = f"{NAME}_run-{args.seed}"
    curve = learning_curve(train_log, work / "results" / f"{tag}_train.txt", train_run["loop_started"])

    # 3. Finalisation with MACE's restart option: reload the best checkpoint, write and test the final model.
    found = latest_checkpoint(work / "checkpoints", tag)
    if found is None:
        raise fail(f"no checkpoint was written within the budget ({len(curve) - 1} validations)")
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
    final_run = run_step(
        f"finalising from {checkpoint.name}",
        final_command,
        final_log,
        work,
        env,
        args,
        model_path,
        abort_marker=MISSING_CHECKPOINT,
    )
    final_text = final_log.read_text(errors="replace")
    if f"Loading checkpoint: {checkpoint}" not in final_text:
        raise fail(f"finalisation did not load {checkpoint.name}; see {final_log}")

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
    eval_run = run_step("testing", eval_command, eval_log, out, env, args, predictions)
    test = test_errors(predictions, data["reference"], "MACE_energy", "MACE_forces")

    # 5. Result.
    result = {
        "model": f"mace-{args.size} (mace_run_train / mace_eval_configs command line)",
        **run_record(args, env, versions, "mace-torch"),
        "parameters": count_parameters(peer_bin / "python", model_path),
        "commands": {
            "train": shlex.join(train_command),
            "finalise": shlex.join(final_command),
            "eval": shlex.join(eval_command),
        },
        "config_template": str(config_template),
        "config_yaml": config_text,
        "finalise_overrides": overrides,
        "data": data["record"],
        "training": training_record(train_run, curve, checkpoint, best_epoch, "mace_run_train"),
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
            "MACE_forces) against the reference labels; energy per structure, forces per Cartesian component",
        },
        "logs": {"train": str(train_log), "finalise": str(final_log), "eval": str(eval_log)},
    }
    path = write_result(out, result, t_begin, load_start)
    print(f"{summary_line(result, f'mace-{args.size}')} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
