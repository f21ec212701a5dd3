"""``so3krates explore``: minima hopping on a trained model's potential-energy surface.

argv → validated settings → ``so3krates.explore``. Torch and the model are imported only when the
command runs, so that ``so3krates --help`` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

#: Default budget when neither --steps nor --max-time is given.
DEFAULT_STEPS = 100


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds the ``explore`` subcommand to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    parser = subparsers.add_parser(
        "explore",
        help="minima hopping: unique minima of the model's energy surface, with reports",
        description=(
            "Minima hopping (Goedecker 2004): MD escapes from the current minimum and local optimisations. "
            "Every minimum goes to OUT/minima.db (new or a duplicate, by energy and permutation-aware "
            "aligned RMSD); running the command again on the same OUT continues the search. Writes "
            "unique_minima.csv/.png, energy_histogram.png and lowest_minima.extxyz to OUT."
        ),
    )
    parser.add_argument("--model", required=True, help="checkpoint, e.g. RUN/best.pt")
    parser.add_argument("--structure", required=True, help="starting structure (xyz, extxyz, ...)")
    parser.add_argument("--frame", type=int, default=-1, help="frame of --structure (default: the last)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument(
        "--steps",
        type=int,
        help=f"hopping steps of the whole search, earlier runs included (default {DEFAULT_STEPS})",
    )
    budget.add_argument("--max-time", type=float, metavar="SECONDS", help="wall-time budget of this run")
    parser.add_argument("--temperature", type=float, help="initial MD temperature, K (default 1000)")
    parser.add_argument("--fmax", type=float, help="optimisation convergence, eV/Å (default 0.01)")
    parser.add_argument("--timestep", type=float, help="MD time step, fs (default 1)")
    parser.add_argument(
        "--mdmin",
        type=int,
        help="an escape ends at this minimum of E_pot along its MD (default 2; flexible molecules need "
        "longer escapes, e.g. 20, for torsions to turn)",
    )
    parser.add_argument("--max-md-steps", type=int, help="MD steps per escape at most (default 2000)")
    parser.add_argument("--ediff", type=float, help="initial acceptance window E_diff, eV (default 0.5)")
    parser.add_argument("--energy-tol", type=float, help="same minimum: |ΔE| below this, eV (default 0.01)")
    parser.add_argument("--rmsd-tol", type=float, help="... and aligned RMSD below this, Å (default 0.1)")
    parser.add_argument(
        "--fragment-distance",
        type=float,
        metavar="Å",
        help="discard minima that fell apart into pieces farther apart than this (default: model cutoff)",
    )
    parser.add_argument(
        "--keep-topology",
        action="store_true",
        default=None,
        help="conformer search: discard minima whose covalent bonds differ from the start's",
    )
    parser.add_argument("--seed", type=int, help="random seed of the MD velocities (default 0)")
    parser.add_argument("--out", default="explore", help="output folder (default: explore)")
    parser.add_argument("--lowest", type=int, default=10, help="minima in lowest_minima.extxyz (default 10)")
    parser.add_argument(
        "--reference",
        choices=["xtb"],
        help="re-optimise the lowest minima with GFN2-xTB (needs `pip install tblite`)",
    )
    parser.add_argument(
        "--rescore", type=int, metavar="K", help="how many of the lowest minima to rescore (default 5)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    parser.add_argument("--threads", type=int, help="torch threads")
    parser.set_defaults(run=run)
    return parser


def _settings(args: argparse.Namespace) -> dict:
    """The HoppingConfig keys given on the command line; the others keep their defaults."""
    names = (
        "temperature",
        "fmax",
        "timestep",
        "mdmin",
        "max_md_steps",
        "ediff",
        "energy_tol",
        "rmsd_tol",
        "fragment_distance",
        "keep_topology",
        "seed",
    )
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def reference_calculator(name: str):
    """The ASE calculator of ``--reference NAME``; a missing optional package is a one-line error."""
    from so3krates.errors import ConfigError

    if name == "xtb":
        try:
            from tblite.ase import TBLite
        except ImportError:
            raise ConfigError("--reference xtb needs the tblite package: pip install tblite") from None
        return TBLite(method="GFN2-xTB", verbosity=0)
    raise ConfigError(f"--reference: unknown reference {name!r} (choose xtb)")


def read_start(path: str, frame: int):
    """The starting structure, or a one-line ``DataError`` naming the file."""
    import ase.io

    from so3krates.errors import DataError

    if not Path(path).is_file():
        raise DataError(f"{path}: structure file not found")
    try:
        atoms = ase.io.read(path, index=frame)
    except Exception as error:  # ASE raises many types for unreadable files
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"{path}: cannot read a structure ({message})") from None
    if atoms.pbc.any():
        raise DataError(f"{path}: the structure is periodic; explore supports molecules and clusters only")
    if len(atoms) < 2:
        raise DataError(f"{path}: {len(atoms)} atom(s); minima hopping needs at least two")
    return atoms


def run(args: argparse.Namespace) -> int:

    from so3krates.errors import ConfigError, DataError
    from so3krates.explore import (
        HoppingConfig,
        MinimaHopping,
        read_minima,
        rescore,
        write_report,
        write_rescore,
    )

    settings = _settings(args)
    config = HoppingConfig.from_dict(settings, source="so3krates explore")
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps: must be at least 1, got {args.steps}")
    if args.max_time is not None and args.max_time <= 0:
        raise ConfigError(f"--max-time: must be positive, got {args.max_time}")
    if args.lowest < 1:
        raise ConfigError(f"--lowest: must be at least 1, got {args.lowest}")
    if args.rescore is not None and args.reference is None:
        raise ConfigError("--rescore: needs a reference calculator (--reference xtb)")
    if args.rescore is not None and args.rescore < 1:
        raise ConfigError(f"--rescore: must be at least 1, got {args.rescore}")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads: must be at least 1, got {args.threads}")
    from so3krates.checks import check_device, check_output_dir

    check_output_dir(args.out, "--out")
    check_device(args.device)
    reference = reference_calculator(args.reference) if args.reference else None
    atoms = read_start(args.structure, args.frame)

    from so3krates.calculators.ase import So3kratesCalculator
    from so3krates.cli import set_torch_threads
    from so3krates.data.structure import unknown_elements

    set_torch_threads(args.threads)
    calculator = So3kratesCalculator(args.model, device=args.device, dtype=args.dtype)
    reason = unknown_elements(atoms.numbers, calculator.species)
    if reason:
        raise DataError(f"{args.structure}: key 'numbers': {reason} ({args.model})")

    if args.fragment_distance is None:
        # Beyond the cutoff a fragment feels nothing of the rest: it can never come back.
        config = HoppingConfig.from_dict({**settings, "fragment_distance": calculator.cutoff})

    out = Path(args.out)
    db_path = out / "minima.db"
    formula = atoms.get_chemical_formula()
    print(f"exploring {formula} ({len(atoms)} atoms) with {args.model}; minima in {db_path}")
    search = MinimaHopping(atoms, calculator, db_path, config)
    steps = args.steps if args.steps is not None or args.max_time is not None else DEFAULT_STEPS
    try:
        search.run(steps=steps, max_time=args.max_time)
    finally:  # also after Ctrl-C: the database is consistent, so report what was found
        if db_path.exists() and search.state is not None:
            paths = write_report(db_path, out, lowest=args.lowest)
            minima = read_minima(db_path)
            print(
                f"{len(minima)} unique minima after {search.state.step} steps; lowest "
                f"{minima[0].get_potential_energy():.4f} eV; wrote "
                + ", ".join(str(path) for path in paths.values())
            )
            if search.state.step < (steps or 0):
                print("rerun the same command to continue the search")
    if reference is not None:
        count = args.rescore or 5
        print(f"re-optimising the {count} lowest minima with GFN2-xTB")
        results = rescore(
            read_minima(db_path)[:count], reference, config.fmax, model_calculator=calculator, log=print
        )
        paths = write_rescore(results, out)
        print("wrote " + ", ".join(str(path) for path in paths.values()))
    return 0
