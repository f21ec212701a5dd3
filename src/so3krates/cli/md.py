"""``so3krates md``: argv → ``MDConfig`` → ``run_md``. Nothing heavy is imported until the command runs."""

from __future__ import annotations

import argparse

from so3krates.cli import positive_int

#: option → MDConfig key, for the options that map one to one (the stability ones go to ``stability.*``).
_OPTIONS = {
    "model": "model",
    "structure": "structure",
    "frame": "frame",
    "ensemble": "ensemble",
    "temperature": "temperature_K",
    "timestep": "timestep_fs",
    "steps": "n_steps",
    "time_ps": "time_ps",
    "friction": "friction_per_fs",
    "tdamp": "tdamp_fs",
    "tchain": "tchain",
    "pressure": "pressure_bar",
    "pdamp": "pdamp_fs",
    "barostat": "barostat",
    "seed": "seed",
    "velocities": "velocities",
    "trajectory_every": "trajectory_every",
    "thermo_every": "thermo_every",
    "restart_every": "restart_every",
    "out": "output_dir",
    "dtype": "dtype",
    "device": "device",
    "threads": "threads",
    "skin": "skin",
    "compile": "compile",
    "replicas": "replicas",
    "uncertainty_threshold": "uncertainty_threshold",
    "uncertainty_action": "uncertainty_action",
}
_STABILITY_OPTIONS = {
    "check_every": "check_every",
    "max_bond_deviation": "max_bond_deviation",
    "bond_scale": "bond_scale",
    "min_distance": "min_distance",
    "reference_steps": "reference_steps",
}


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds ``md`` to ``subparsers`` (the object ``add_subparsers`` returned); defaults live in MDConfig."""
    md = subparsers.add_parser(
        "md",
        help="molecular dynamics (NVE, Langevin, Nosé–Hoover, Bussi, NPT) with a stability monitor",
        description="Molecular dynamics of a trained model through ASE. Writes thermo.csv, "
        "trajectory.extxyz, thermo.png, restart.npz and summary.json to the output directory; a run "
        "that broke apart stops cleanly with last_good.extxyz.",
    )
    md.add_argument(
        "--model",
        required=True,
        help="checkpoint, e.g. RUN/best.pt, or a committee: a directory of member_*/best.pt",
    )
    md.add_argument("--structure", required=True, help="start structure (extxyz, xyz, cif, … — ase.io.read)")
    md.add_argument("--frame", type=int, help="frame of the structure file (default 0; -1: the last)")
    md.add_argument(
        "--ensemble",
        choices=["nve", "langevin", "nose-hoover", "bussi", "npt"],
        help="default nve; npt needs a periodic cell",
    )
    md.add_argument("--temperature", type=float, metavar="K", help="target and start temperature (300)")
    md.add_argument("--timestep", type=float, metavar="FS", help="timestep in fs (0.5)")
    length = md.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="number of steps (1000)")
    length.add_argument("--time-ps", type=float, metavar="PS", help="simulated time instead of --steps")
    md.add_argument("--friction", type=float, metavar="PER_FS", help="Langevin friction in 1/fs (0.01)")
    md.add_argument("--tdamp", type=float, metavar="FS", help="thermostat time in fs (100 × timestep)")
    md.add_argument("--tchain", type=int, help="Nosé–Hoover chain length (3)")
    md.add_argument("--pressure", type=float, metavar="BAR", help="NPT pressure in bar (1)")
    md.add_argument("--pdamp", type=float, metavar="FS", help="NPT barostat time in fs (1000 × timestep)")
    md.add_argument("--barostat", choices=["isotropic", "anisotropic"], help="NPT cell freedom (isotropic)")
    md.add_argument("--seed", type=int, help="seed of velocities and thermostat noise (0)")
    md.add_argument(
        "--velocities",
        choices=["maxwell-boltzmann", "file", "zero"],
        help="initial velocities (maxwell-boltzmann at --temperature); total momentum is removed",
    )
    md.add_argument("--trajectory-every", type=int, metavar="N", help="steps between frames (10)")
    md.add_argument("--thermo-every", type=int, metavar="N", help="steps between thermo.csv rows (10)")
    md.add_argument("--restart-every", type=int, metavar="N", help="steps between restart.npz writes (1000)")
    md.add_argument("--out", metavar="DIR", help="output directory (runs/md)")
    md.add_argument("--replicas", type=int, metavar="N", help="independent runs, seeds seed … seed+N−1 (1)")
    md.add_argument("--restart", action="store_true", help="continue the run(s) in --out from restart.npz")
    md.add_argument("--dtype", choices=["float32", "float64"], help="network precision (float64)")
    md.add_argument("--device", help="torch device (cpu)")
    md.add_argument("--threads", type=positive_int, help="torch threads")
    md.add_argument("--skin", type=float, metavar="Å", help="neighbour-list skin (0.5)")
    md.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        choices=["none", "inductor", "aoti"],
        default=None,
        help="inductor (the default of a bare --compile): torch.compile, about a minute at every start, then "
        "~1.5× faster steps; aoti: forward and backward compiled ahead of time, about a minute once per "
        "model (cached in ~/.cache/so3krates), then ~3× faster steps on CPUs",
    )
    md.add_argument("--no-progress", action="store_true", help="no progress bar")
    committee = md.add_argument_group("committees (--model DIR with member_*/best.pt)")
    committee.add_argument(
        "--uncertainty-threshold",
        type=float,
        metavar="EV_PER_A",
        help="flag (or stop at) frames whose largest atomic force uncertainty exceeds this",
    )
    committee.add_argument(
        "--uncertainty-action",
        choices=["flag", "stop"],
        help="flag: write such frames to flagged.extxyz and go on (default); stop: end the run there",
    )
    stability = md.add_argument_group("stability monitor (Fu et al. 2023, arXiv:2210.07237)")
    stability.add_argument("--no-stability", action="store_true", help="do not stop runs that broke apart")
    stability.add_argument("--check-every", type=int, metavar="N", help="steps between checks (10)")
    stability.add_argument(
        "--max-bond-deviation", type=float, metavar="Å", help="bond deviation that breaks a run (0.5)"
    )
    stability.add_argument(
        "--bond-scale", type=float, help="bonded: closer than this × sum of covalent radii (1.2)"
    )
    stability.add_argument("--min-distance", type=float, metavar="Å", help="overlap distance (0.5)")
    stability.add_argument(
        "--reference-steps", type=int, metavar="N", help="bond ranges from the checks up to step N (0)"
    )
    md.set_defaults(run=run_command)
    return md


def config_values(args: argparse.Namespace) -> dict:
    """The options given on the command line as MDConfig keys (absent ones keep MDConfig's defaults)."""
    values = {
        key: getattr(args, option) for option, key in _OPTIONS.items() if getattr(args, option) is not None
    }
    stability = {
        key: getattr(args, option)
        for option, key in _STABILITY_OPTIONS.items()
        if getattr(args, option) is not None
    }
    if args.no_stability:
        stability["enabled"] = False
    if stability:
        values["stability"] = stability
    if args.no_progress:
        values["progress"] = False
    return values


def _option_name(location: tuple) -> str | None:
    """``("stability", "check_every")`` → ``"--check-every"``: errors name what the user typed."""
    table = _STABILITY_OPTIONS if location[:1] == ("stability",) else _OPTIONS
    key = location[-1] if location else None
    for option, config_key in table.items():
        if config_key == key:
            return "--" + option.replace("_", "-")
    return None


def build_config(args: argparse.Namespace):
    """The validated MDConfig; a bad value raises ConfigError naming the option (``--timestep: ...``)."""
    from pydantic import ValidationError

    from so3krates.errors import ConfigError
    from so3krates.md.config import MDConfig

    try:
        return MDConfig.model_validate(config_values(args))
    except ValidationError as error:
        problems = []
        for item in error.errors():
            message = item["msg"].removeprefix("Value error, ")
            location = tuple(str(part) for part in item["loc"])
            option = _option_name(location)
            problems.append(f"{option or '.'.join(location)}: {message}" if location else message)
        raise ConfigError("; ".join(problems)) from None


def run_command(args: argparse.Namespace) -> int:
    """Runs ``so3krates md``: 0 when all runs ended (stable or stopped by the monitor), 130 if interrupted."""
    from so3krates.md.run import run_md

    result = run_md(build_config(args), restart=args.restart)
    return 130 if any(run.status == "interrupted" for run in result.runs) else 0
