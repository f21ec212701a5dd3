"""``so3krates export``: a checkpoint → a file that runs without the training code (torchscript, pt2,
aoti, lammps-mliap); the formats are described in :mod:`so3krates.export.core`."""

from __future__ import annotations

import argparse

from so3krates.cli import set_torch_threads

FORMATS = (
    "torchscript",
    "pt2",
    "aoti",
    "lammps-mliap",
)  # as so3krates.export.FORMATS, without importing torch


def _run(args: argparse.Namespace) -> int:
    from so3krates.export import export_model

    set_torch_threads(args.threads)
    metadata = export_model(
        args.model,
        args.out,
        fmt=args.format,
        dtype=args.dtype,
        fused=args.fused,
        species=args.species,
        tabulate={"auto": None, "on": True, "off": False}[args.radial_table],
        paired=args.paired_edges,
    )
    print(
        f"wrote {args.out}: {metadata['format']}, {metadata['dtype']}, cutoff {metadata['cutoff']:g} Å, "
        f"receptive field {metadata['receptive_field']:g} Å, elements {metadata['species']}"
        + (
            f", radial filters tabulated ({metadata['radial_table_intervals']} intervals)"
            if metadata.get("radial_table_intervals")
            else ""
        )
        + (", inputs: paired edges" if metadata.get("paired_edges") else "")
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
        help="write a model file that runs without the training code (TorchScript, torch.export, "
        "AOTInductor, LAMMPS ML-IAP)",
    )
    parser.add_argument("--model", required=True, help="checkpoint, e.g. RUN/best.pt")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument(
        "--out", required=True, help="output file (.pt2 for pt2 and aoti, .pkl for lammps-mliap)"
    )
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64", help="network dtype")
    parser.add_argument(
        "--fused",
        action="store_true",
        help="fused layer evaluation: faster for molecules, slower for systems of thousands of atoms",
    )
    parser.add_argument(
        "--radial-table",
        choices=["auto", "on", "off"],
        default="auto",
        help="radial filters from their spline (auto: with --fused in float32; off: the exact network)",
    )
    parser.add_argument(
        "--paired-edges",
        action="store_true",
        help="pt2/aoti: the program takes the neighbour list ordered by pairs (edge k + n/2 is edge k "
        "reversed; so3krates.data.neighbors.paired_edges, as ExportedCalculator builds it) and evaluates "
        "the filters once per pair",
    )
    parser.add_argument(
        "--species", type=int, nargs="+", help="atomic numbers to allow (default: those of the checkpoint)"
    )
    parser.add_argument("--threads", type=int, help="torch threads")
    parser.set_defaults(run=_run)
