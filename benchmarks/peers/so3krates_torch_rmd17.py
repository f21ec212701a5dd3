"""Train and test so3krates-torch (PyPI `so3krates-torch`) on rMD17 within a wall-clock budget.

Runs inside `benchmarks/.envs/so3krates-torch`. The model, data pipeline, E0s, loss, optimizer,
scheduler, EMA and the training step are the package's own (`so3krates_torch.tools.*`, the functions
that `torchkrates-train` calls); only the outer loop is ours, because `torchkrates-train` has an epoch
limit but no time limit. See `rmd17_protocol.py` for the protocol.

    python so3krates_torch_rmd17.py --train-file T.npz --test-file S.npz --indices split.json \
        --budget-seconds 900 --out result.json [--num-features 132 --num-layers 3 --degrees 1,2,3 ...]
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import time
from importlib.metadata import version

import numpy as np
import rmd17_protocol as protocol

# Modules of the SO3LR terms that this benchmark switches off (So3krates, not SO3LR).
UNUSED_MODULES = ("partial_charges_output_block.", "hirshfeld_output_block.", "zbl_repulsion.")

# The torchkrates-train settings written to the result (everything that shapes the model or its training).
REPORTED_ARCHITECTURE = (
    "r_max degrees num_features num_heads num_layers num_radial_basis_fn energy_regression_dim "
    "radial_basis_fn cutoff_fn message_normalization zbl_repulsion_bool electrostatic_energy_bool "
    "dispersion_energy_bool"
).split()
REPORTED_TRAINING = (
    "batch_size lr optimizer amsgrad scheduler lr_scheduler_gamma energy_weight forces_weight ema ema_decay "
    "clip_grad weight_decay"
).split()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-file", required=True)
    parser.add_argument("--test-file", required=True)
    parser.add_argument("--indices", required=True, help="JSON with 'train' and 'valid' frame indices")
    parser.add_argument("--budget-seconds", type=float, required=True)
    parser.add_argument("--out", required=True, help="result JSON")
    parser.add_argument("--work-dir", default=None, help="scratch folder (default: next to --out)")
    parser.add_argument("--threads", type=int, default=2)
    # Model: the SO3krates paper model (Frank et al. 2024).
    parser.add_argument("--num-features", type=int, default=132)
    parser.add_argument("--num-layers", type=int, default=3)
    parser.add_argument("--degrees", default="1,2,3")
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--num-radial-basis", type=int, default=32)
    parser.add_argument("--cutoff", type=float, default=5.0)
    parser.add_argument("--energy-regression-dim", type=int, default=None, help="default: num_features")
    # Training: lr of the SO3krates paper; everything else the package's defaults.
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=5)
    parser.add_argument("--energy-weight", type=float, default=1.0)
    parser.add_argument("--forces-weight", type=float, default=1000.0)
    parser.add_argument("--amsgrad", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--ema-decay", type=float, default=0.99)
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def architecture(args: argparse.Namespace) -> dict:
    """The ARCHITECTURE section from the size flags (also used by `speed_so3krates_torch.py`)."""
    return {
        "r_max": args.cutoff,
        "degrees": [int(d) for d in args.degrees.split(",")],
        "num_features": args.num_features,
        "num_heads": args.num_heads,
        "num_layers": args.num_layers,
        "num_radial_basis_fn": args.num_radial_basis,
        "energy_regression_dim": args.energy_regression_dim or args.num_features,
        # So3krates, not SO3LR: no ZBL, electrostatics or dispersion terms.
        "zbl_repulsion_bool": False,
        "electrostatic_energy_bool": False,
        "dispersion_energy_bool": False,
    }


def build_config(args: argparse.Namespace, work_dir: str, train_xyz: str, valid_xyz: str) -> dict:
    """The `torchkrates-train` YAML configuration, validated by the package's own `TrainConfig`."""
    from so3krates_torch.config import TrainConfig

    raw = {
        "GENERAL": {
            "name_exp": "rmd17",
            "checkpoints_dir": os.path.join(work_dir, "checkpoints"),
            "model_dir": os.path.join(work_dir, "model"),
            "log_dir": os.path.join(work_dir, "logs"),
            "default_dtype": args.dtype,
            "seed": args.seed,
        },
        "ARCHITECTURE": architecture(args),
        "TRAINING": {
            "path_to_train_data": train_xyz,
            "path_to_val_data": valid_xyz,
            "batch_size": args.batch_size,
            "valid_batch_size": 10,
            "lr": args.lr,
            "optimizer": "adam",
            "amsgrad": args.amsgrad,
            "energy_weight": args.energy_weight,
            "forces_weight": args.forces_weight,
            "ema": True,
            "ema_decay": args.ema_decay,
            "num_epochs": 1_000_000,  # the wall clock stops training
        },
        "MISC": {"device": "cpu", "restart_latest": False, "no_checkpoint": True, "log_level": "WARNING"},
    }
    return TrainConfig.model_validate(raw).model_dump()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    protocol.limit_threads(args.threads)
    import ase.io
    import torch
    from so3krates_torch.cli.run_train import DTYPE_MAP
    from so3krates_torch.tools.data_setup import setup_data_loaders
    from so3krates_torch.tools.model_setup import (
        _setup_model_for_training,
        set_atomic_energy_shifts_in_model,
        set_avg_num_neighbors_in_model,
        set_dtype_model,
    )
    from so3krates_torch.tools.torch_geometric import seed_everything
    from so3krates_torch.tools.train import evaluate, take_step
    from so3krates_torch.tools.training_setup import (
        setup_loss_function,
        setup_optimizer_and_scheduler,
        setup_training_tools,
    )
    from so3krates_torch.tools.utils import create_dataloader_from_list

    logging.basicConfig(level=logging.WARNING)
    setup_start = time.perf_counter()
    work_dir = args.work_dir or os.path.splitext(args.out)[0] + "_work"
    os.makedirs(work_dir, exist_ok=True)
    train_idx, valid_idx = protocol.read_split(args.indices)
    train_xyz, valid_xyz = os.path.join(work_dir, "train.xyz"), os.path.join(work_dir, "valid.xyz")
    ase.io.write(train_xyz, protocol.load_frames(args.train_file, train_idx), format="extxyz")
    ase.io.write(valid_xyz, protocol.load_frames(args.train_file, valid_idx), format="extxyz")

    config = build_config(args, work_dir, train_xyz, valid_xyz)
    torch.set_default_dtype(DTYPE_MAP[args.dtype])
    seed_everything(args.seed)
    device = torch.device("cpu")
    # The same sequence of calls as so3krates_torch.cli.run_train.run_training (fresh model, no fine-tuning).
    model, _ = _setup_model_for_training(config, device)
    train_loader, valid_loaders, _, avg_num_neighbors, _, e0s, _ = setup_data_loaders(config)
    model.avg_num_neighbors = avg_num_neighbors
    set_atomic_energy_shifts_in_model(model, e0s)  # least-squares E0s of the training set
    set_avg_num_neighbors_in_model(model, avg_num_neighbors)
    set_dtype_model(model, args.dtype)
    loss_fn = setup_loss_function(config)
    optimizer, lr_scheduler = setup_optimizer_and_scheduler(model, config)
    _, _, ema = setup_training_tools(config, model)
    valid_loader = valid_loaders["main"]
    max_grad_norm = config["TRAINING"]["clip_grad"]
    output_args = {"forces": True, "virials": False, "stress": False}
    # SO3LR always builds its partial-charge, Hirshfeld and ZBL heads; with those terms off they never touch
    # the energy, so they are left out of the count (all trainable parameters: `parameters_all_modules`).
    n_parameters_all = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_parameters = sum(
        p.numel()
        for name, p in model.named_parameters()
        if p.requires_grad and not name.startswith(UNUSED_MODULES)
    )
    setup_seconds = time.perf_counter() - setup_start
    print(f"so3krates-torch: {n_parameters} parameters, setup {setup_seconds:.1f} s", flush=True)

    def step(batch) -> float:
        loss, _ = take_step(model, loss_fn, batch, optimizer, ema, output_args, max_grad_norm, device)
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
        end_epoch=lambda valid_loss: lr_scheduler.step(),
        log=lambda line: print(line, flush=True),
    )

    test_start = time.perf_counter()
    model.load_state_dict(best_state)
    test_atoms = protocol.load_frames(args.test_file)
    test_loader = create_dataloader_from_list(
        test_atoms, batch_size=50, r_max=args.cutoff, r_max_lr=None, shuffle=False
    )
    energies, forces = [], []
    for batch in test_loader:
        out = model(batch.to_dict(), training=False, compute_force=True)
        energies.append(out["energy"].detach().cpu().numpy())
        counts = np.diff(batch.ptr.numpy())
        forces.extend(np.split(out["forces"].detach().cpu().numpy(), np.cumsum(counts)[:-1]))
    errors = protocol.test_errors(test_atoms, np.concatenate(energies), forces)
    print(f"test: {errors}", flush=True)

    protocol.write_result(
        args.out,
        {
            "package": "so3krates-torch",
            "package_version": version("so3krates-torch"),
            "parameters": n_parameters,
            "parameters_all_modules": n_parameters_all,
            "settings": {
                **{key: config["ARCHITECTURE"][key] for key in REPORTED_ARCHITECTURE},
                **{key: config["TRAINING"][key] for key in REPORTED_TRAINING},
                "loss": repr(loss_fn),
                "e0s": "least squares over the training set (package default)",
                "avg_num_neighbors": avg_num_neighbors,
                "dtype": args.dtype,
                "seed": args.seed,
            },
            **protocol.run_record(record, args.budget_seconds, setup_seconds, test_start, errors),
        },
    )


if __name__ == "__main__":
    sys.exit(main())
