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
import os
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
)

BENCH = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = BENCH / "configs" / "peers" / "so3krates_torch_rmd17.yaml"
DEFAULT_PEER_ENV = BENCH / ".envs" / "so3krates-torch"

NAME_EXP = "rmd17"  # GENERAL.name_exp of the config (file tag of checkpoints, logs and the final model)
LOOP_MARKER = "Starting training loop..."  # run_train.py logs this just before tools.train.train()
FRESH_MARKER = "Starting fresh training."  # a restart that found no usable checkpoint

try:
    import yaml
except ImportError as error:
    raise fail(f"{error}; run it with the main venv (.venv/bin/python)") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, "so3krates-torch", "torchkrates-eval", DEFAULT_PEER_ENV, DEFAULT_CONFIG)
    args = parser.parse_args(argv)
    check_common_arguments(args, BENCH / "runs" / "peers" / "so3krates_torch_cli" / args.molecule)
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
    peer_bin, config_template = check_peer(
        args.peer_env, ("torchkrates-train", "torchkrates-eval"), args.config
    )
    versions = peer_versions(peer_bin / "python", "so3krates-torch")
    out = Path(args.out).resolve()
    work, data_dir = fresh_run_dir(out)  # torchkrates-train's working directory: checkpoints, logs, model

    # 1. Data: the benchmark's split, as extxyz with the package's default keys.
    data = write_rmd17_split(args.molecule, data_dir)
    train_xyz, valid_xyz, test_xyz = (data["files"][part] for part in ("train", "valid", "test"))

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
    train_command = [str(peer_bin / "torchkrates-train"), "--config", str(config_path)]
    train_log = out / "train.log"
    train_run = train_under_budget(train_command, train_log, work, env, args, LOOP_MARKER)
    curve = learning_curve(train_log, work / "logs" / f"{NAME_EXP}_valid.txt", train_run["loop_started"])
    package_config_dump = work / "checkpoints" / "config.yaml"  # the package's own dump, defaults included

    # 3. Finalisation with the package's restart option: reload the best checkpoint, write the final model.
    found = latest_checkpoint(work / "checkpoints", NAME_EXP, set_aside=True)
    if found is None:
        raise fail(f"no checkpoint was written within the budget ({len(curve) - 1} validations)")
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
    final_run = run_step(
        f"finalising from {checkpoint.name}",
        final_command,
        final_log,
        work,
        env,
        args,
        model_path,
        abort_marker=FRESH_MARKER,
    )
    final_text = final_log.read_text(errors="replace")
    if f"Loaded checkpoint from epoch {best_epoch}" not in final_text:
        raise fail(f"finalisation did not load {checkpoint.name}; see {final_log}")
    reloaded = learning_curve(
        final_log, work / "logs_finalise" / f"{NAME_EXP}_valid.txt", final_run["started"]
    )

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
    eval_run = run_step("testing", eval_command, eval_log, out, env, args, predictions)
    test = test_errors(predictions, data["reference"], "SO3_energy", "SO3_forces")

    # 5. Result.
    result = {
        "model": "so3krates-torch (torchkrates-train / torchkrates-eval command line)",
        **run_record(args, env, versions, "so3krates-torch"),
        "parameters": count_parameters(peer_bin / "python", model_path),
        "commands": {
            "train": shlex.join(train_command),
            "finalise": shlex.join(final_command),
            "eval": shlex.join(eval_command),
        },
        "config_template": str(config_template),
        "config_yaml": config_text,
        "config_package_dump_yaml": package_config_dump.read_text() if package_config_dump.exists() else None,
        "finalise_overrides": overrides,
        "data": data["record"],
        "training": training_record(train_run, curve, checkpoint, best_epoch, "torchkrates-train"),
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
    }
    path = write_result(out, result, t_begin, load_start)
    print(f"{summary_line(result, 'so3krates-torch')} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
