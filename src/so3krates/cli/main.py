"""``so3krates <command>``: argv → validated config → library call. No model logic lives here.

Commands follow the pipeline stages: ``info`` (a model preset), ``prepare``, ``train``, ``evaluate``,
then simulation and analysis with a trained model: ``md``, ``explore``, ``spectrum``, and ``export``.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
import warnings
from collections.abc import Sequence
from typing import Any

import yaml
from pydantic import ValidationError

from so3krates import __version__
from so3krates.cli import (
    Parser,
    explore,
    export,
    md,
    positive_float,
    positive_int,
    set_torch_threads,
    spectrum,
)
from so3krates.errors import So3kratesError, format_validation_error, user_error_message
from so3krates.memory import keep_freed_memory


class UsageError(So3kratesError):
    """Bad input from the user: printed as one line, exit status 2, no traceback."""


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``["cutoff=4.5", "degrees=[1,2]"]`` → ``{"cutoff": 4.5, "degrees": [1, 2]}`` (values are YAML)."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--set expects key=value, got {pair!r}")
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise UsageError(f"--set {key}: cannot parse value {value!r}: {error}") from None
    return overrides


def _command_info(args: argparse.Namespace) -> int:
    import torch

    from so3krates import ForceField, atoms_to_graph, preset
    from so3krates.model.so3krates import count_parameters
    from so3krates.model.so3lr import build_model

    try:
        config = preset(args.preset, **parse_overrides(args.set))
    except ValidationError as error:
        raise UsageError(format_validation_error(error, "model config")) from None
    except ValueError as error:
        raise UsageError(str(error)) from None
    torch.set_num_threads(args.threads)
    model = build_model(config)
    print(f"so3krates {__version__} — preset {args.preset!r}")
    print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False).rstrip())
    print("\nparameters:")
    counts = count_parameters(model)
    for name, count in counts.items():
        print(f"  {name:<36s} {count:>10,d}")
    if args.time:
        from ase.build import molecule

        dtype = getattr(torch, args.dtype)
        force_field = ForceField(model.to(dtype), frozen=True)  # inference, as the calculator runs it
        graph = atoms_to_graph(
            molecule("CH3CH2OH"),
            config.cutoff,
            pairs=True,
            long_range_cutoff=config.long_range_cutoff if config.long_range else None,
        )
        timings = []
        for _ in range(25):
            start = time.perf_counter()
            force_field(graph)
            timings.append(time.perf_counter() - start)
        median = sorted(timings[5:])[len(timings[5:]) // 2]
        print(
            f"\nenergy + forces, ethanol ({graph.n_atoms} atoms, {graph.n_edges} edges), {args.dtype}, "
            f"{args.threads} threads: {1e3 * median:.2f} ms (median of 20, untrained weights)"
        )
    return 0


def _command_prepare(args: argparse.Namespace) -> int:
    import itertools

    from so3krates.checks import check_output_file

    check_output_file(args.out, "--out", overwrite=args.overwrite)

    from so3krates.data.hdf5 import write_hdf5
    from so3krates.data.io import read_structures

    def structures():
        for path in args.data:  # one input file in memory at a time
            print(f"reading {path}")
            yield from read_structures(
                path,
                energy_key=args.energy_key,
                forces_key=args.forces_key,
                stress_key=args.stress_key,
                energy_unit=args.energy_unit,
                length_unit=args.length_unit,
            )

    count = write_hdf5(args.out, itertools.chain(structures()), args.cutoff)
    print(f"wrote {args.out}: {count} structures with neighbour lists within {args.cutoff} Å")
    return 0


def _command_train(args: argparse.Namespace) -> int:
    from so3krates.train.config import load_train_config
    from so3krates.train.distributed import detect_placement, launch, peer_failure
    from so3krates.train.trainer import train

    config = load_train_config(args.config, parse_overrides(args.set))
    placement = detect_placement()
    if args.nproc is not None and args.nproc > 1:
        if placement.world_size > 1:
            raise UsageError(
                f"--nproc: this process is already rank {placement.rank} of a {placement.launcher} job"
            )
        argv = ["train", args.config, *(f"--set={pair}" for pair in args.set)]
        return launch(args.nproc, argv + (["--resume"] if args.resume else []))
    if placement.world_size == 1:
        train(config, resume=args.resume)
        return 0
    # One process of several: its errors name it and end it at once with a non-zero status, so that the
    # launcher stops the job instead of the other ranks waiting for this one.
    where = f"rank {placement.rank} of {placement.world_size}"
    try:
        train(config, resume=args.resume)
    except So3kratesError as error:
        raise type(error)(f"{where}: {error}") from None
    except Exception as error:
        reason = peer_failure(error)
        if reason is None:  # this rank's own error
            import traceback

            traceback.print_exc()
            reason = f"{type(error).__name__}: {error}"
        print(f"so3krates train: {where} failed: {reason}", file=sys.stderr)
        return 1
    return 0


def _command_evaluate(args: argparse.Namespace) -> int:
    from so3krates.evaluate import evaluate_file

    set_torch_threads(args.threads)
    evaluate_file(
        args.model,
        args.data,
        out_dir=args.out_dir,
        json_path=args.json,
        energy_key=args.energy_key,
        forces_key=args.forces_key,
        stress_key=args.stress_key,
        energy_unit=args.energy_unit,
        length_unit=args.length_unit,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        overwrite=args.overwrite,
    )
    return 0


def _command_learn(args: argparse.Namespace) -> int:
    from so3krates.learn import learn, load_learn_config

    learn(load_learn_config(args.config, parse_overrides(args.set)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="so3krates",
        description="SO3krates, the Euclidean transformer for fast and stable machine-learned force fields.",
    )
    parser.add_argument("--version", action="version", version=f"so3krates {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    info = commands.add_parser("info", help="show a model preset: resolved config and parameter counts")
    info.add_argument("--preset", default="paper", help="model preset (paper, tiny); default: paper")
    info.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    info.add_argument("--time", action="store_true", help="also time energy + forces on ethanol")
    info.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    info.add_argument("--threads", type=positive_int, default=2, help="torch threads (default 2)")
    info.set_defaults(run=_command_info)

    prepare = commands.add_parser("prepare", help="convert data files to one streamed HDF5 file for training")
    prepare.add_argument("--data", nargs="+", required=True, help="input files (extxyz, npz, ASE db, ...)")
    prepare.add_argument("--out", required=True, help="output .h5 file")
    prepare.add_argument(
        "--cutoff", type=positive_float, required=True, help="neighbour-list cutoff, Å (≥ model's)"
    )
    prepare.add_argument("--energy-key")
    prepare.add_argument("--forces-key")
    prepare.add_argument("--stress-key")
    prepare.add_argument("--energy-unit", default="eV")
    prepare.add_argument("--length-unit", default="Å")
    prepare.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    prepare.set_defaults(run=_command_prepare)

    train = commands.add_parser("train", help="train a model from a YAML config")
    train.add_argument("config", help="YAML file with data, model, loss and training sections")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override, e.g. training.max_epochs=10",
    )
    train.add_argument("--resume", action="store_true", help="continue the run in run_dir from last.pt")
    train.add_argument(
        "--nproc",
        type=positive_int,
        metavar="N",
        help="train in N processes on this machine (torchrun; one GPU each with device cuda)",
    )
    train.set_defaults(run=_command_train)

    evaluate = commands.add_parser(
        "evaluate", help="metrics, predictions and parity plots of a trained model"
    )
    evaluate.add_argument("--model", required=True, help="checkpoint, e.g. RUN/best.pt")
    evaluate.add_argument("--data", required=True, help="reference data (extxyz, npz, ASE db, ...)")
    evaluate.add_argument("--json", help="also write the metrics to this JSON file")
    evaluate.add_argument("--out-dir", help="folder for predictions.extxyz, parity.png, metrics.json")
    evaluate.add_argument("--energy-key")
    evaluate.add_argument("--forces-key")
    evaluate.add_argument("--stress-key")
    evaluate.add_argument("--energy-unit", default="eV")
    evaluate.add_argument("--length-unit", default="Å")
    evaluate.add_argument("--batch-size", type=positive_int, default=32)
    evaluate.add_argument("--device", default="cpu")
    evaluate.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    evaluate.add_argument("--threads", type=positive_int, help="torch threads")
    evaluate.add_argument("--overwrite", action="store_true", help="replace results already in --out-dir")
    evaluate.set_defaults(run=_command_evaluate)

    learn = commands.add_parser(
        "learn",
        help="active learning: committee, MD, label where it disagrees, retrain (no training set needed)",
        description="From start structures and a reference method (GFN2-xTB or any ASE calculator) to a "
        "committee of models that simulates stably. Rerun the same command to continue an interrupted run.",
    )
    learn.add_argument("config", help="YAML file: work_dir, structures, reference, committee, exploration, …")
    learn.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. budget.max_labels=200"
    )
    learn.set_defaults(run=_command_learn)

    md.register(commands)
    explore.register(commands)
    spectrum.register(commands)
    export.register(commands)
    return parser


def _one_line_warning(command: str):
    """A warning as one line, ``so3krates COMMAND: warning: …``, without Python's file and source line."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"so3krates {command}: warning: {message}", file=file or sys.stderr)

    return show


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    keep_freed_memory()
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning(args.command)
            return args.run(args)
    except KeyboardInterrupt:
        print(f"so3krates {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # the one error policy: so3krates.errors.user_error_message
        message = user_error_message(error)
        if message is None:
            traceback.print_exc()
            print(
                f"so3krates {args.command}: this is a bug in so3krates, not a problem with your input; "
                "please report it with the command line and the traceback above",
                file=sys.stderr,
            )
            return 1
        print(f"so3krates {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
