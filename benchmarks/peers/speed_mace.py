"""Speed of MACE (PyPI `mace-torch`) on one structure: energy+forces and MD steps.

Runs inside `benchmarks/.envs/mace-torch`, under the protocol of `speed_protocol.py`:

    python speed_mace.py --structure S.extxyz --threads 2 --dtype float32 --budget-seconds 20 \
        --md-steps 50 --out result.json [--num-channels 64 --max-L 1]   # mace-large: 256 and 2

The model is a randomly initialised (seed 0, untrained) MACE built by the package's own factory
(`mace.tools.model_script_utils.configure_model`) from the namespace of MACE's own command-line parser
(the `mace_run_train` defaults for every setting not given here), as in `mace_rmd17.py`; its elements are
those of the structure, E0s zero, scale 1 and shift 0 (no training set to take statistics from). The
energy+forces input is built once by the package's data pipeline (`config_from_atoms`,
`AtomicData.from_config`: matscipy neighbour list, one-graph batch); the timed call is the model's forward
with autograd forces. MD runs through the package's calculator (`mace.calculators.MACECalculator`), which
rebuilds the input graph, neighbour list included, on every call and always computes the stress as well.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import version

import mace_rmd17
import numpy as np
import speed_protocol as protocol

SEED = 0
HEADS = ["Default"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = protocol.common_arguments(__doc__.splitlines()[0])
    # Model: mace-small of mace_rmd17.py by default (64 channels, L=1 messages); mace-large: 256 and L=2.
    parser.add_argument("--num-channels", type=int, default=64)
    parser.add_argument("--max-L", type=int, default=1)
    parser.add_argument("--max-ell", type=int, default=3)
    parser.add_argument("--num-interactions", type=int, default=2)
    parser.add_argument("--correlation", type=int, default=3)
    parser.add_argument("--cutoff", type=float, default=5.0)
    parser.add_argument("--num-radial-basis", type=int, default=8)
    return parser.parse_args(argv)


def mace_cli_args(args: argparse.Namespace) -> argparse.Namespace:
    """The namespace `mace_run_train` would build from these flags (its parser's defaults for the rest)."""
    from mace import tools

    flags = {
        "name": "speed",
        "train_file": "in-memory",  # the parser only requires the flag; nothing is trained
        **mace_rmd17.model_flags(args),
        # No training set to take the energy shift and force scale from: shift 0, scale 1.
        "mean": 0.0,
        "std": 1.0,
        "default_dtype": args.dtype,
        "device": "cpu",
        "seed": SEED,
    }
    cli_args = tools.build_default_arg_parser().parse_args(
        [f"--{key}={value}" for key, value in flags.items()]
    )
    cli_args, _ = tools.check_args(cli_args)
    # What mace.cli.run_train.run sets for an energy+forces model.
    cli_args.compute_energy, cli_args.compute_dipole, cli_args.compute_polarizability = True, False, False
    return cli_args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    protocol.limit_threads(args.threads)
    import torch
    from mace import data, modules, tools
    from mace.calculators import MACECalculator
    from mace.tools import torch_geometric
    from mace.tools.model_script_utils import configure_model
    from mace.tools.scripts_utils import dict_to_array

    logging.basicConfig(level=logging.WARNING)
    cli = mace_cli_args(args)
    tools.set_seeds(SEED)
    tools.set_default_dtype(cli.default_dtype)
    torch.set_default_dtype(getattr(torch, args.dtype))
    device = torch.device("cpu")

    atoms = protocol.read_structure(args.structure)
    z_table = tools.AtomicNumberTable(sorted({int(z) for z in atoms.numbers}))
    atomic_energies = dict_to_array({HEADS[0]: {z: 0.0 for z in z_table.zs}}, HEADS)

    # The input, built once: the package's data pipeline (neighbour list, one-graph batch), as for evaluation.
    config = data.config_from_atoms(atoms, key_specification=data.KeySpecification(), head_name=HEADS[0])
    graph = data.AtomicData.from_config(config, z_table=z_table, cutoff=cli.r_max, heads=HEADS)
    loader = torch_geometric.dataloader.DataLoader([graph], batch_size=1, shuffle=False)
    # Message normalisation by the average neighbour count, here that of the structure itself (as
    # mace_run_train sets it from its training set).
    cli.avg_num_neighbors = modules.compute_avg_num_neighbors(loader)
    model, _ = configure_model(cli, loader, atomic_energies, None, HEADS, z_table, None)
    # Inference as the package's calculator runs it: parameters frozen, autograd only for the forces.
    model = model.to(device).eval().requires_grad_(False)
    batch = next(iter(loader)).to(device)
    batch_dict = batch.to_dict()
    n_edges = int(batch_dict["edge_index"].shape[1])

    def energy_and_forces() -> dict:
        return model(batch_dict, training=False, compute_force=True, compute_stress=False)

    first, times = protocol.time_calls(
        energy_and_forces, args.budget_seconds, args.warmup_calls, args.min_repeats
    )
    out = energy_and_forces()
    forces = out["forces"]
    protocol.check_forces(forces, len(atoms), args.structure)
    energy = float(out["energy"].detach()[0])

    calculator = MACECalculator(models=model, device="cpu", default_dtype=args.dtype, model_type="MACE")
    calculator_energy = None
    if not args.no_calculator_check:
        forces_array = forces.detach().cpu().numpy()
        calculator_energy = protocol.check_calculator(atoms, calculator, energy, forces_array)
    md_times = protocol.time_md(atoms, calculator, args.md_steps)

    protocol.write_result(
        args.out,
        {
            "package": "mace-torch",
            "version": version("mace-torch"),
            "model": (
                f"MACE ({type(model).__name__}) hidden_irreps={cli.hidden_irreps} max_ell={cli.max_ell} "
                f"interactions={cli.num_interactions} correlation={cli.correlation} r_max={cli.r_max} "
                f"radial_basis={cli.num_radial_basis}, random init (seed {SEED})"
            ),
            "n_parameters": tools.count_parameters(model),
            "n_atoms": len(atoms),
            "n_edges": n_edges,
            "pbc": [bool(p) for p in atoms.pbc],
            "elements": [int(z) for z in z_table.zs],
            "avg_num_neighbors": cli.avg_num_neighbors,
            "dtype": args.dtype,
            "threads": args.threads,
            "first_call_s": first,
            "ef_times_s": times,
            "md_step_times_s": md_times,
            "md_neighbor_list": "rebuilt by the calculator on every call",
            "md_calculator_computes_stress": True,  # MACECalculator always does, for model_type MACE
            "energy": energy,
            "calculator_energy": calculator_energy,
            "median_ef_ms": float(np.median(times) * 1e3),
            "median_md_step_ms": float(np.median(md_times) * 1e3) if md_times else None,
        },
    )


if __name__ == "__main__":
    sys.exit(main())
