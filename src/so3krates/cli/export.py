"""``so3krates export``: a checkpoint → a file that runs without the training code (pt2, aoti,
lammps-mliap); the formats are described in :mod:`so3krates.export.formats`."""

from __future__ import annotations

import argparse

from so3krates.cli import atomic_number, positive_int, set_torch_threads

FORMATS = ("pt2", "aoti", "lammps-mliap")  # as so3krates.export.FORMATS, without importing torch


def _run(args: argparse.Namespace) -> int:

    import torch

    from so3krates.checks import check_output_file
    from so3krates.errors import DataError
    from so3krates.export import export_model
    from so3krates.runtime.plan import Plan, Planner

    check_output_file(args.out, "--out", overwrite=args.overwrite)
    set_torch_threads(args.threads)
    plan = None
    if args.format != "lammps-mliap":
        dtype = {"float64": torch.float64, "float32": torch.float32}[args.dtype]
        plan = Planner().complete(dtype, args.layers, args.radial, args.pairs, args.slots)
    elif args.layers != "modules" or args.radial or args.pairs or args.slots:
        raise DataError(
            "a lammps-mliap model chooses its plan per call: --layers, --radial, --pairs and "
            "--slots are for pt2 and aoti"
        )
    metadata = export_model(
        args.model, args.out, fmt=args.format, dtype=args.dtype, plan=plan, species=args.species
    )
    plan_text = ""
    if metadata["plan"] is not None:
        plan_text = ", plan: " + Plan(**metadata["plan"]).describe()
    print(
        f"wrote {args.out}: {metadata['format']}, {metadata['dtype']}, cutoff {metadata['cutoff']:g} Å, "
        f"receptive field {metadata['receptive_field']:g} Å, elements {metadata['species']}{plan_text}"
    )
    if args.format == "lammps-mliap":
        print(
            f"LAMMPS: pair_style mliap unified {args.out} 1; comm_modify cutoff "
            f"{metadata['receptive_field'] + 2.0:g} (receptive field + neighbour skin)"
        )
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "export",
        help="write a model file that runs without the training code (torch.export, AOTInductor, "
        "LAMMPS ML-IAP)",
    )
    parser.add_argument("--model", required=True, help="checkpoint, e.g. RUN/best.pt")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument(
        "--out", required=True, help="output file (.pt2 for pt2 and aoti, .pkl for lammps-mliap)"
    )
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64", help="network dtype")
    parser.add_argument(
        "--layers",
        choices=["modules", "fused"],
        default="modules",
        help="pt2/aoti: fused layers are faster (molecules to 10,000 atoms), the modules need less memory",
    )
    parser.add_argument(
        "--radial",
        choices=["network", "spline"],
        help="pt2/aoti: radial filters from their network or from a spline of it (default: the spline for "
        "--layers fused --dtype float32, else the network)",
    )
    parser.add_argument(
        "--pairs",
        action="store_true",
        help="pt2/aoti: the program takes the neighbour list in pair order (edge k + n/2 is edge k reversed; "
        "so3krates.data.neighbors.pair_order, as So3kratesCalculator builds it) and evaluates the filters "
        "once per pair",
    )
    parser.add_argument(
        "--slots",
        action="store_true",
        help="pt2/aoti with --layers fused: two more inputs, the edge slots of idx_i and idx_j "
        "(so3krates.ops.slots.build_slots): sums without scatter-adds, every kernel on all threads",
    )
    parser.add_argument(
        "--species",
        type=atomic_number,
        nargs="+",
        help="atomic numbers to allow (default: those of the checkpoint)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument("--threads", type=positive_int, help="torch threads")
    parser.set_defaults(run=_run)
