"""Speed of so3krates-torch (PyPI `so3krates-torch`) on one structure: energy+forces and MD steps.

Runs inside `benchmarks/.envs/so3krates-torch`, under the protocol of `speed_protocol.py`:

    python speed_so3krates_torch.py --structure S.extxyz --threads 2 --dtype float32 --budget-seconds 20 \
        --md-steps 50 --out result.json [--num-features 132 --num-layers 3 --degrees 1,2,3 ...]

The model is a randomly initialised (seed 0, untrained) SO3krates of the paper's size, built by the
package's own factory (`so3krates_torch.tools.model_setup.create_model`, the one `torchkrates-train` calls)
with the `torchkrates-train` defaults for every setting not given here and the SO3LR terms (ZBL,
electrostatics, dispersion) off, as in `so3krates_torch_rmd17.py`. The energy+forces input is built once
by the package's data pipeline (`create_dataloader_from_list`: matscipy neighbour list, one-graph batch);
the timed call is the model's forward with autograd forces, as in the package's calculator. MD runs
through the package's calculator (`TorchkratesCalculator`), which rebuilds the input graph, neighbour
list included, on every call.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import version

import numpy as np
import so3krates_torch_rmd17
import speed_protocol as protocol

# Modules of the SO3LR terms that this benchmark switches off (So3krates, not SO3LR).
UNUSED_MODULES = ("partial_charges_output_block.", "hirshfeld_output_block.", "zbl_repulsion.")
SEED = 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = protocol.common_arguments(__doc__.splitlines()[0])
    # Model: the SO3krates paper model (Frank et al. 2024), as in so3krates_torch_rmd17.py.
    parser.add_argument("--num-features", type=int, default=132)
    parser.add_argument("--num-layers", type=int, default=3)
    parser.add_argument("--degrees", default="1,2,3")
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--num-radial-basis", type=int, default=32)
    parser.add_argument("--cutoff", type=float, default=5.0)
    parser.add_argument("--energy-regression-dim", type=int, default=None, help="default: num_features")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> dict:
    """The GENERAL and ARCHITECTURE parts of a `torchkrates-train` configuration (package-validated)."""
    from so3krates_torch.config.training_config import ArchitectureConfig

    architecture = ArchitectureConfig.model_validate(so3krates_torch_rmd17.architecture(args))
    return {
        "GENERAL": {"default_dtype": args.dtype, "seed": SEED},
        "ARCHITECTURE": architecture.model_dump(),
    }


def model_description(architecture: dict) -> str:
    sizes = " ".join(
        f"{key}={architecture[key]}"
        for key in ("num_features", "num_layers", "degrees", "num_heads", "num_radial_basis_fn", "r_max")
    )
    return f"So3krates (SO3LR class, ZBL/electrostatics/dispersion off) {sizes}, random init (seed {SEED})"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    protocol.limit_threads(args.threads)
    import torch
    from so3krates_torch.calculator.so3 import TorchkratesCalculator
    from so3krates_torch.tools.model_setup import (
        create_model,
        set_avg_num_neighbors_in_model,
        set_dtype_model,
    )
    from so3krates_torch.tools.utils import compute_avg_num_neighbors, create_dataloader_from_list

    logging.basicConfig(level=logging.WARNING)
    dtype = getattr(torch, args.dtype)
    torch.set_default_dtype(dtype)
    torch.manual_seed(SEED)
    atoms = protocol.read_structure(args.structure)
    config = build_config(args)
    device = torch.device("cpu")
    model = create_model(config, device)
    set_dtype_model(model, args.dtype)

    # The input, built once: the package's data pipeline (neighbour list, one-graph batch), as for evaluation.
    loader = create_dataloader_from_list([atoms], batch_size=1, r_max=args.cutoff, r_max_lr=None)
    # Message normalisation by the average neighbour count, here that of the structure itself (as
    # torchkrates-train sets it from its training set).
    avg_num_neighbors = compute_avg_num_neighbors(loader)
    set_avg_num_neighbors_in_model(model, avg_num_neighbors)
    # Inference as the package's calculator runs it: parameters frozen, autograd only for the forces.
    model.eval().requires_grad_(False)
    batch = next(iter(loader)).to(device)
    data = batch.to_dict()
    n_edges = int(data["edge_index"].shape[1])

    def energy_and_forces() -> dict:
        return model(data, training=False, compute_force=True, compute_stress=False)

    first, times = protocol.time_calls(
        energy_and_forces, args.budget_seconds, args.warmup_calls, args.min_repeats
    )
    out = energy_and_forces()
    forces = out["forces"]
    protocol.check_forces(forces, len(atoms), args.structure)
    energy = float(out["energy"].detach()[0])

    calculator = TorchkratesCalculator(
        models=model, device="cpu", default_dtype=args.dtype, model_type="so3krates"
    )
    calculator_energy = None
    if not args.no_calculator_check:
        forces_array = forces.detach().cpu().numpy()
        calculator_energy = protocol.check_calculator(atoms, calculator, energy, forces_array)
    md_times = protocol.time_md(atoms, calculator, args.md_steps)

    n_parameters = sum(
        p.numel() for name, p in model.named_parameters() if not name.startswith(UNUSED_MODULES)
    )
    protocol.write_result(
        args.out,
        {
            "package": "so3krates-torch",
            "version": version("so3krates-torch"),
            "model": model_description(config["ARCHITECTURE"]),
            # SO3LR always builds its partial-charge, Hirshfeld and ZBL heads; with those terms off they
            # never touch the energy, so they are left out of the count (all: `n_parameters_all_modules`).
            "n_parameters": n_parameters,
            "n_parameters_all_modules": sum(p.numel() for p in model.parameters()),
            "n_atoms": len(atoms),
            "n_edges": n_edges,
            "pbc": [bool(p) for p in atoms.pbc],
            "avg_num_neighbors": avg_num_neighbors,
            "dtype": args.dtype,
            "threads": args.threads,
            "first_call_s": first,
            "ef_times_s": times,
            "md_step_times_s": md_times,
            "md_neighbor_list": "rebuilt by the calculator on every call",
            "energy": energy,
            "calculator_energy": calculator_energy,
            "median_ef_ms": float(np.median(times) * 1e3),
            "median_md_step_ms": float(np.median(md_times) * 1e3) if md_times else None,
        },
    )


if __name__ == "__main__":
    sys.exit(main())
