"""``so3krates <command>``: argv → validated config → library call. No model logic lives here.

Commands arrive with the pipeline stages (prepare, train, evaluate, md, ...); today: ``info``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

import yaml
from pydantic import ValidationError

from so3krates import __version__


class UsageError(Exception):
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


def format_validation_error(error: ValidationError, what: str) -> str:
    """All problems on one line, each naming its key: ``model config: key 'n_heads': ...``."""
    problems = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ")
        location = ".".join(str(part) for part in item["loc"])
        problems.append(f"{what}: key {location!r}: {message}" if location else f"{what}: {message}")
    return "; ".join(problems)


def _command_info(args: argparse.Namespace) -> int:
    import torch

    from so3krates import ForceField, So3krates, atoms_to_graph, preset
    from so3krates.model.so3krates import count_parameters

    try:
        config = preset(args.preset, **parse_overrides(args.set))
    except ValidationError as error:
        raise UsageError(format_validation_error(error, "model config")) from None
    except ValueError as error:
        raise UsageError(str(error)) from None
    torch.set_num_threads(args.threads)
    model = So3krates(config)
    print(f"so3krates {__version__} — preset {args.preset!r}")
    print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False).rstrip())
    print("\nparameters:")
    counts = count_parameters(model)
    for name, count in counts.items():
        print(f"  {name:<36s} {count:>10,d}")
    if args.time:
        from ase.build import molecule

        dtype = getattr(torch, args.dtype)
        force_field = ForceField(model).to(dtype).eval()
        graph = atoms_to_graph(molecule("CH3CH2OH"), config.cutoff, dtype=dtype)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    info.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    info.set_defaults(run=_command_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.run(args)
    except UsageError as error:
        print(f"so3krates {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
