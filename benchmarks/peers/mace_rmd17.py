"""Train and test MACE (PyPI `mace-torch`) on rMD17 (or an extxyz file) within a wall-clock budget.

Runs inside `benchmarks/.envs/mace-torch`. Every setting comes from MACE's own command-line parser
(`mace.tools.build_default_arg_parser` + `check_args`, i.e. the defaults of `mace_run_train`) with the flags
below; the model (`configure_model`), E0s (`compute_average_E0s`), loss (`get_loss_fn`), optimizer
(`get_params_options` + `get_optimizer`), scheduler (`LRScheduler`), EMA, training step (`take_step`) and
validation (`evaluate`) are the package's own, called in the order `mace.cli.run_train.run` calls them.
Only the outer loop is ours, because `mace_run_train` has an epoch limit but no time limit (see
`rmd17_protocol.py`).

    python mace_rmd17.py --train-file T.npz --test-file S.npz --indices split.json \
        --budget-seconds 900 --out result.json --num-channels 256 --max-L 2

An extxyz file (energy in `info`, forces in `arrays`, eV and eV/Å; keys `--energy-key`/`--forces-key`) can
stand in for both npz files: then `--indices` also lists the "test" frames of `--test-file`, and
`--save-model` keeps the selected model for MACE's ASE calculator (`ala_dipeptide_mace.py`).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time

import numpy as np
import rmd17_protocol as protocol

# The mace_run_train settings written to the result (everything that shapes the model or its training).
REPORTED_SETTINGS = (
    "num_channels max_L max_ell num_interactions correlation r_max num_radial_basis num_cutoff_basis "
    "radial_type radial_MLP MLP_irreps interaction interaction_first scaling batch_size lr optimizer amsgrad "
    "weight_decay scheduler lr_factor scheduler_patience loss energy_weight forces_weight ema ema_decay "
    "clip_grad default_dtype seed avg_num_neighbors"
).split()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-file", required=True)
    parser.add_argument("--test-file", required=True)
    parser.add_argument(
        "--indices", required=True, help="JSON with 'train' and 'valid' (and optionally 'test') frame indices"
    )
    parser.add_argument("--energy-key", default="energy", help="extxyz only: info key of the energy, eV")
    parser.add_argument("--forces-key", default="forces", help="extxyz only: arrays key of the forces, eV/Å")
    parser.add_argument("--save-model", default=None, help="write the selected model here (torch.save)")
    parser.add_argument("--budget-seconds", type=float, required=True)
    parser.add_argument("--out", required=True, help="result JSON")
    parser.add_argument("--work-dir", default=None, help="scratch folder (default: next to --out)")
    parser.add_argument("--threads", type=int, default=2)
    # Model: Batatia et al. 2022 rMD17 settings by default (256 channels, L=2 messages, 2 layers, ν=3).
    parser.add_argument("--num-channels", type=int, default=256)
    parser.add_argument("--max-L", type=int, default=2)
    parser.add_argument("--max-ell", type=int, default=3)
    parser.add_argument("--num-interactions", type=int, default=2)
    parser.add_argument("--correlation", type=int, default=3)
    parser.add_argument("--cutoff", type=float, default=5.0)
    parser.add_argument("--num-radial-basis", type=int, default=8)
    # Training: Batatia et al. 2022 rMD17 (AMSGrad lr 0.01, batch 5, EMA 0.99, λ_E = 1, λ_F = 1000).
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=5)
    parser.add_argument("--energy-weight", type=float, default=1.0)
    parser.add_argument("--forces-weight", type=float, default=1000.0)
    parser.add_argument("--ema-decay", type=float, default=0.99)
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def load_frames(path: str, indices: list[int] | None, energy_key: str, forces_key: str) -> list:
    """Frames as `ase.Atoms` with `info["REF_energy"]` (eV) and `arrays["REF_forces"]` (eV/Å).

    Args:
        path: rMD17 `.npz` (read by `rmd17_protocol.load_frames`) or any file `ase.io.read` takes whose
            frames carry the energy (eV) in `info[energy_key]` and forces (eV/Å) in `arrays[forces_key]`.
        indices: frames to read, in this order; all frames when None.
    """
    if path.endswith(".npz"):
        return protocol.load_frames(path, indices)
    import ase
    import ase.io

    frames = ase.io.read(path, index=":")
    frames = frames if indices is None else [frames[k] for k in indices]
    atoms_list = []
    for frame in frames:
        # ASE moves the keys "energy" and "forces" into a SinglePointCalculator; other keys stay put.
        results = frame.calc.results if frame.calc is not None else {}
        energy = frame.info[energy_key] if energy_key in frame.info else results[energy_key]
        forces = frame.arrays[forces_key] if forces_key in frame.arrays else results[forces_key]
        atoms = ase.Atoms(numbers=frame.numbers, positions=frame.positions, cell=frame.cell, pbc=frame.pbc)
        atoms.info["REF_energy"] = float(energy)
        atoms.arrays["REF_forces"] = np.array(forces, dtype=float)
        atoms_list.append(atoms)
    return atoms_list


def model_flags(args: argparse.Namespace) -> dict:
    """The `mace_run_train` flags that set the model's size (also used by `speed_mace.py`)."""
    return {
        "model": "MACE",
        "num_channels": args.num_channels,
        "max_L": args.max_L,
        "max_ell": args.max_ell,
        "num_interactions": args.num_interactions,
        "correlation": args.correlation,
        "r_max": args.cutoff,
        "num_radial_basis": args.num_radial_basis,
    }


def mace_cli_args(args: argparse.Namespace, work_dir: str) -> argparse.Namespace:
    """The namespace `mace_run_train` would build from these flags (its parser's defaults for the rest)."""
    from mace import tools

    flags = {
        "name": "rmd17",
        "work_dir": work_dir,
        "train_file": "in-memory",  # data come from rmd17_protocol; the parser only requires the flag
        "E0s": "average",
        **model_flags(args),
        "loss": "weighted",
        "energy_weight": args.energy_weight,
        "forces_weight": args.forces_weight,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "valid_batch_size": 10,
        "ema_decay": args.ema_decay,
        "default_dtype": args.dtype,
        "device": "cpu",
        "seed": args.seed,
    }
    argv = [f"--{key}={value}" for key, value in flags.items()] + ["--amsgrad", "--ema"]
    cli_args = tools.build_default_arg_parser().parse_args(argv)
    cli_args, _ = tools.check_args(cli_args)
    # What mace.cli.run_train.run sets for an energy+forces model.
    cli_args.compute_energy, cli_args.compute_dipole, cli_args.compute_polarizability = True, False, False
    return cli_args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    protocol.limit_threads(args.threads)
    import torch
    from mace import data, modules, tools
    from mace.tools import torch_geometric
    from mace.tools.model_script_utils import configure_model
    from mace.tools.scripts_utils import (
        LRScheduler,
        dict_to_array,
        get_loss_fn,
        get_optimizer,
        get_params_options,
    )
    from mace.tools.train import evaluate, take_step
    from torch_ema import ExponentialMovingAverage

    logging.basicConfig(level=logging.WARNING)
    setup_start = time.perf_counter()
    work_dir = args.work_dir or os.path.splitext(args.out)[0] + "_work"
    os.makedirs(work_dir, exist_ok=True)
    cli = mace_cli_args(args, work_dir)
    tools.set_seeds(cli.seed)
    tools.set_default_dtype(cli.default_dtype)
    device = torch.device("cpu")

    keyspec = data.KeySpecification(info_keys={"energy": "REF_energy"}, arrays_keys={"forces": "REF_forces"})
    train_idx, valid_idx = protocol.read_split(args.indices)
    with open(args.indices) as handle:
        test_idx = json.load(handle).get("test")  # None: every frame of the test file (rMD17)
    keys = (args.energy_key, args.forces_key)
    train_configs = data.config_from_atoms_list(load_frames(args.train_file, train_idx, *keys), keyspec)
    valid_configs = data.config_from_atoms_list(load_frames(args.train_file, valid_idx, *keys), keyspec)
    z_table = tools.AtomicNumberTable(sorted({int(z) for c in train_configs for z in c.atomic_numbers}))
    heads = ["Default"]
    e0s = data.compute_average_E0s(train_configs, z_table)  # --E0s average: least squares
    atomic_energies = dict_to_array({heads[0]: e0s}, heads)

    def loader(configs, batch_size, shuffle):
        dataset = [data.AtomicData.from_config(c, z_table, cutoff=cli.r_max, heads=heads) for c in configs]
        generator = torch.Generator().manual_seed(cli.seed)
        return torch_geometric.dataloader.DataLoader(
            dataset, batch_size, shuffle=shuffle, generator=generator
        )

    train_loader = loader(train_configs, cli.batch_size, shuffle=True)
    valid_loader = loader(valid_configs, cli.valid_batch_size, shuffle=False)
    loss_fn = get_loss_fn(cli, dipole_only=False, compute_dipole=False)
    cli.avg_num_neighbors = modules.compute_avg_num_neighbors(train_loader)
    model, output_args = configure_model(cli, train_loader, atomic_energies, None, heads, z_table, None)
    model.to(device)
    optimizer = get_optimizer(cli, get_params_options(cli, model))
    lr_scheduler = LRScheduler(optimizer, cli)
    ema = ExponentialMovingAverage(model.parameters(), decay=cli.ema_decay)
    n_parameters = tools.count_parameters(model)
    setup_seconds = time.perf_counter() - setup_start
    print(f"mace: {cli.hidden_irreps}, {n_parameters} parameters, setup {setup_seconds:.1f} s", flush=True)

    def step(batch) -> float:
        loss, _ = take_step(model, loss_fn, batch, optimizer, ema, output_args, cli.clip_grad, device)
        return float(loss.detach())

    def validate() -> tuple[float, dict]:
        with ema.average_parameters():
            loss, metrics = evaluate(model, loss_fn, valid_loader, output_args, device)
        return float(loss), {
            "valid_mae_e_meV": metrics["mae_e"] * 1e3,
            "valid_mae_f_meV_per_A": metrics["mae_f"] * 1e3,
        }

    def snapshot() -> dict:
        with ema.average_parameters():
            return copy.deepcopy(model.state_dict())

    record, best_state = protocol.train_for_budget(
        budget_seconds=args.budget_seconds,
        steps_per_epoch=len(train_loader),
        epoch_batches=lambda: train_loader,
        take_step=step,
        validate=validate,
        snapshot=snapshot,
        end_epoch=lambda valid_loss: lr_scheduler.step(metrics=valid_loss),  # as tools.train.train
        log=lambda line: print(line, flush=True),
    )

    test_start = time.perf_counter()
    model.load_state_dict(best_state)
    test_atoms = load_frames(args.test_file, test_idx, *keys)
    test_loader = loader(data.config_from_atoms_list(test_atoms, keyspec), 50, shuffle=False)
    energies, forces = [], []
    for batch in test_loader:
        out = model(batch.to_dict(), training=False, compute_force=True)
        energies.append(out["energy"].detach().cpu().numpy())
        counts = np.diff(batch.ptr.numpy())
        forces.extend(np.split(out["forces"].detach().cpu().numpy(), np.cumsum(counts)[:-1]))
    errors = protocol.test_errors(test_atoms, np.concatenate(energies), forces)
    print(f"test: {errors}", flush=True)
    if args.save_model:
        torch.save(model, args.save_model)  # the whole module, as mace_run_train saves it for MACECalculator

    import mace

    protocol.write_result(
        args.out,
        {
            "package": "mace-torch",
            "package_version": mace.__version__,
            "parameters": n_parameters,
            "settings": {
                "model": f"{cli.model} ({type(model).__name__})",
                "hidden_irreps": str(cli.hidden_irreps),
                **{key: getattr(cli, key) for key in REPORTED_SETTINGS},
                "loss_fn": repr(loss_fn),
                "e0s": "average: least squares over the training set (mace --E0s average)",
                "stage_two": "off (Stage Two/SWA starts after a fixed epoch count, beyond this budget)",
            },
            **protocol.run_record(record, args.budget_seconds, setup_seconds, test_start, errors),
        },
    )


if __name__ == "__main__":
    sys.exit(main())
