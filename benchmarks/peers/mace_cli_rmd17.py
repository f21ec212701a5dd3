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
   With `--stage-two-fraction f` (default 0.25) the run gets MACE's Stage Two (`swa: true`: its
   energy-weighted loss, annealed lower learning rate and weight averaging), which MACE starts at epoch
   `start_swa` (by default after 3/4 of `max_num_epochs`). A wall-clock budget gives no epoch count, so the
   runner measures one: the first run has Stage Two armed but out of reach and is stopped after its first
   checkpoint (the first epoch); MACE's own `restart_latest` then continues it with `start_swa` set so that
   Stage Two gets the last f of the budget at that epoch time. (Restarting into Stage Two from a run that
   had it off fails in mace-torch 0.3.16 at the second Stage Two epoch, KeyError 'swa_lr': the optimizer
   state of such a checkpoint lacks the Stage Two learning rate; arming it from the start avoids that.)
3. finalisation with MACE's own restart option: `mace_run_train` again with `restart_latest: true` and
   `max_num_epochs` = the checkpoint's epoch, so it reloads that checkpoint, runs no epoch, writes its final
   model `rmd17.model` (after Stage Two also `rmd17_stagetwo.model`, the one tested, from the best Stage Two
   checkpoint) and evaluates it on train, valid and the test file (its own error table, kept in the result
   as a cross-check);
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
INITIAL_LOSS = re.compile(r"INFO: Initial: .*?loss=([0-9.eE+-]+)")  # validation before any epoch
SWA_SUFFIX = "_swa"  # MACE's name for checkpoints written in Stage Two
NO_EPOCH = "no epoch completed within the budget"
MIN_STAGE_TWO_SECONDS = 30.0  # less left after the first checkpoint: no Stage Two (recorded why)

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
    parser.add_argument(
        "--stage-two-fraction",
        type=float,
        default=0.25,
        help="share of the budget for MACE's Stage Two (swa), after a restart from the best checkpoint "
        "(default 0.25, MACE's own share of the epochs; 0: no Stage Two)",
    )
    args = parser.parse_args(argv)
    if not 0.0 <= args.stage_two_fraction < 1.0:
        raise fail(f"--stage-two-fraction must be in [0, 1), got {args.stage_two_fraction}")
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


def resume_with_stage_two(
    config: dict,
    checkpoint: Path,
    start_swa: int,
    budget: float,
    out: Path,
    work: Path,
    env: dict,
    args: argparse.Namespace,
    tag: str,
) -> tuple[dict, dict, list[dict]]:
    """The rest of the budget: mace_run_train restarted from the first run's checkpoint (`restart_latest`)
    with Stage Two from epoch `start_swa` (MACE's epoch index in the restarted run). Returns its record,
    its run and its learning curve (without the restart's initial validation)."""
    overrides = {
        "restart_latest": True,
        "swa": True,
        "start_swa": start_swa,
        "results_dir": str(work / "results_resumed"),
        "log_dir": str(work / "logs_resumed"),
    }
    path = out / "config_resumed.yaml"
    path.write_text(yaml.safe_dump({**config, **overrides}, sort_keys=False))
    command = [str(Path(args.peer_env) / "bin" / "mace_run_train"), "--config", str(path)]
    log = out / "train_resumed.log"
    run = train_under_budget(command, log, work, env, args, LOOP_MARKER, budget=budget)
    text = log.read_text(errors="replace")
    if f"Loading checkpoint: {checkpoint}" not in text:
        raise fail(f"the resumed run did not restart from {checkpoint.name}; see {log}")
    # MACE falls back to untrained weights when a checkpoint does not load: then its validation before
    # training is the first run's (untrained) one.
    initial = INITIAL_LOSS.findall(text)
    untrained = INITIAL_LOSS.findall((out / "train.log").read_text(errors="replace"))
    if initial and untrained and initial[0] == untrained[0]:
        raise fail(
            f"the resumed run started from untrained weights ({checkpoint.name} did not load); see {log}"
        )
    curve = learning_curve(log, work / "results_resumed" / f"{tag}_train.txt", run["loop_started"])
    curve = [{**c, "stage": 2 if c["epoch"] >= start_swa else 1} for c in curve if c["epoch"] is not None]
    record = {
        "fraction": args.stage_two_fraction,
        "ran": True,
        "budget_seconds": round(budget, 3),
        "restarted_from": checkpoint.name,
        "start_swa": start_swa,
        "overrides": overrides,
        "command": shlex.join(command),
        "config_yaml": path.read_text(),
        "log": str(log),
        "tested": False,
    }
    return record, run, curve


def combine_stages(record: dict, stage_two: dict, run: dict | None) -> dict:
    """The training record of the first run with the resumed run's times, stop and signals added."""
    record["stage_two"] = stage_two
    if run is None:
        return record
    first = {k: record[k] for k in ("setup_seconds", "train_seconds", "stopped_by", "signals")}
    resumed = {
        "setup_seconds": round(run["loop_started"] - run["started"], 3),
        "train_seconds": round(run["ended"] - run["loop_started"], 3),
        "stopped_by": run["stopped_by"] or "mace_run_train finished by itself",
        "signals": run["signals"],
    }
    stage_two["first_run"], stage_two["resumed_run"] = first, resumed
    for key in ("setup_seconds", "train_seconds"):
        record[key] = round(first[key] + resumed[key], 3)
    record["wall_seconds"] = round(record["wall_seconds"] + run["ended"] - run["started"], 3)
    record["cpu_seconds"] = round(record["cpu_seconds"] + run["cpu_seconds"], 3)
    record["stopped_by"] = resumed["stopped_by"]
    record["signals"] = first["signals"] + run["signals"]
    return record


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
    stage_two = args.stage_two_fraction > 0
    config = yaml.safe_load(config_text)
    if stage_two:  # armed, out of reach: the first run only measures the epoch time (module docstring)
        config.update(swa=True, start_swa=int(config["max_num_epochs"]) - 1)
        config_text = yaml.safe_dump(config, sort_keys=False)
    config_path = out / "config.yaml"
    config_path.write_text(config_text)
    env = peer_env_vars(args.threads)
    train_command = [str(peer_bin / "mace_run_train"), "--config", str(config_path)]
    train_log = out / "train.log"
    tag = f"{NAME}_run-{args.seed}"
    checkpoints = work / "checkpoints"
    budget = 60.0 * args.budget_minutes
    train_run = train_under_budget(
        train_command,
        train_log,
        work,
        env,
        args,
        LOOP_MARKER,
        budget=0.0 if stage_two else budget,  # with Stage Two: stop at the first checkpoint
        ready=(lambda: latest_checkpoint(checkpoints, tag) is not None) if stage_two else None,
    )
    curve = learning_curve(train_log, work / "results" / f"{tag}_train.txt", train_run["loop_started"])
    found = latest_checkpoint(checkpoints, tag, set_aside=True)
    if found is None:  # no epoch ended within the whole budget: that is the result, not a failure
        result = {
            "model": f"mace-{args.size} (mace_run_train command line)",
            **run_record(args, env, versions, "mace-torch"),
            "commands": {"train": shlex.join(train_command)},
            "config_template": str(config_template),
            "config_yaml": config_text,
            "data": data["record"],
            "outcome": NO_EPOCH,
            "training": {
                "setup_seconds": round(train_run["loop_started"] - train_run["started"], 3),
                "train_seconds": round(train_run["ended"] - train_run["loop_started"], 3),
                "cpu_seconds": round(train_run["cpu_seconds"], 3),
                "stopped_by": train_run["stopped_by"],
                "signals": train_run["signals"],
                "epochs_completed": 0,
                "learning_curve": curve,
            },
            "logs": {"train": str(train_log)},
        }
        path = write_result(out, result, t_begin, load_start)
        print(f"{args.molecule}: mace-{args.size}: {NO_EPOCH} -> {path}")
        return 0
    checkpoint, best_epoch = found
    first_seconds = train_run["ended"] - train_run["loop_started"]  # one epoch, its validations, the stop
    stage_two_record: dict = {"fraction": args.stage_two_fraction, "ran": False}
    if stage_two and budget - first_seconds < MIN_STAGE_TWO_SECONDS:
        left = budget - first_seconds
        stage_two_record["why_not"] = f"{left:.0f} s of the budget left after the first epoch"
    elif stage_two:
        # Stage One for 1 + start_swa epochs (this run's and the restart's indices 0 … start_swa − 1).
        stage_one_epochs = round((1.0 - args.stage_two_fraction) * budget / first_seconds)
        start_swa = max(0, stage_one_epochs - 1)
        stage_two_record, stage_two_run, resumed_curve = resume_with_stage_two(
            config, checkpoint, start_swa, budget - first_seconds, out, work, env, args, tag
        )
        stage_two_record["epoch_seconds_measured"] = round(first_seconds, 3)
        last_epochs = max((c["epochs_completed"] for c in curve), default=0)
        for k, entry in enumerate(resumed_curve):  # after the first run's time and epochs
            if entry["wall_s"] is not None:
                entry["wall_s"] = round(entry["wall_s"] + first_seconds, 3)
            entry["epochs_completed"] = last_epochs + k + 1
        curve += resumed_curve
        found_two = latest_checkpoint(checkpoints, tag, SWA_SUFFIX, set_aside=True)
        if found_two is None or found_two[1] < 1:
            stage_two_record["why_not_tested"] = "no Stage Two checkpoint that MACE's finalisation can load"
            checkpoint, best_epoch = latest_checkpoint(checkpoints, tag, set_aside=True)
        else:
            checkpoint, best_epoch = found_two
            stage_two_record["tested"] = True

    # 3. Finalisation with MACE's restart option: reload the best checkpoint, write and test the final model.
    tested_stage_two = stage_two_record.get("tested", False)
    final_config = dict(config)
    overrides = {
        "restart_latest": True,  # reload the latest (= best) checkpoint
        "max_num_epochs": best_epoch,  # training restarts at the checkpoint's epoch: no epoch runs
        "test_file": str(test_xyz),  # MACE's own error table on the test set, as a cross-check
        "results_dir": str(work / "results_finalise"),  # keep the training run's metric files apart
        "log_dir": str(work / "logs_finalise"),
    }
    if tested_stage_two:
        # Stage Two on: MACE reloads the best Stage Two checkpoint and writes both stages' models. It
        # needs start_swa < max_num_epochs (no epoch runs either way).
        overrides.update(swa=True, start_swa=min(stage_two_record["start_swa"], best_epoch - 1))
    else:  # the latest Stage One checkpoint, loaded without Stage Two
        overrides.update(swa=False)
    final_config.update(overrides)
    final_config_path = out / "config_finalise.yaml"
    final_config_path.write_text(yaml.safe_dump(final_config, sort_keys=False))
    final_command = [str(peer_bin / "mace_run_train"), "--config", str(final_config_path)]
    final_log = out / "finalise.log"
    model_path = work / "model" / (f"{NAME}_stagetwo.model" if tested_stage_two else f"{NAME}.model")
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
        "training": combine_stages(
            training_record(train_run, curve, checkpoint, best_epoch, "mace_run_train"),
            stage_two_record,
            stage_two_run if stage_two_record["ran"] else None,
        ),
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
        "logs": {
            "train": str(train_log),
            **({"resumed": stage_two_record["log"]} if stage_two_record["ran"] else {}),
            "finalise": str(final_log),
            "eval": str(eval_log),
        },
    }
    path = write_result(out, result, t_begin, load_start)
    print(f"{summary_line(result, f'mace-{args.size}')} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
