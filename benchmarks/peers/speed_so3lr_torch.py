"""so3krates-torch's pretrained SO3LR (PyPI `so3krates-torch`, its `SO3LRCalculator`) on one structure.

Runs inside `benchmarks/.envs/so3krates-torch`, under the protocol of `speed_protocol.py`:

    python speed_so3lr_torch.py --structure S.extxyz --threads 2 --dtype float32 --budget-seconds 20 \
        --md-steps 50 --out result.json

The model is the one `SO3LRCalculator` loads and sets up (its shipped weights, long-range cutoff 12 Å,
dispersion damping 2 Å). The energy+forces input is built once by the package's data pipeline
(`create_dataloader_from_list` with r_max 4.5 Å and r_max_lr 12 Å, total charge and spin 0); the timed call
is the model's forward with autograd forces, as in the calculator. MD runs through the calculator, which
rebuilds the input graph, neighbour lists included, on every call.
"""

from __future__ import annotations

import contextlib
import io
import sys
from importlib.metadata import version

import numpy as np
import speed_protocol as protocol


def main(argv: list[str] | None = None) -> None:
    args = protocol.common_arguments(__doc__.splitlines()[0]).parse_args(argv)
    protocol.limit_threads(args.threads)
    from so3krates_torch.calculator.so3 import SO3LRCalculator
    from so3krates_torch.tools.utils import create_dataloader_from_list

    atoms = protocol.read_structure(args.structure)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its dtype choice
        calculator = SO3LRCalculator(default_dtype=args.dtype)
    model = calculator.models[0]
    loader = create_dataloader_from_list(
        [atoms], batch_size=1, r_max=calculator.r_max, r_max_lr=calculator.r_max_lr
    )
    data = next(iter(loader)).to("cpu").to_dict()
    n_edges = int(data["edge_index"].shape[1])

    def energy_and_forces() -> dict:
        return model(data, training=False, compute_force=True, compute_stress=False)

    first, times = protocol.time_calls(energy_and_forces, args.budget_seconds)
    out = energy_and_forces()
    protocol.check_forces(out["forces"], len(atoms), args.structure)
    energy = float(out["energy"].detach()[0])
    calculator_energy = protocol.check_calculator(
        atoms, calculator, energy, out["forces"].detach().cpu().numpy()
    )
    md_times = protocol.time_md(atoms, calculator, args.md_steps)
    protocol.write_result(
        args.out,
        {
            "package": "so3krates-torch",
            "version": version("so3krates-torch"),
            "model": "SO3LR pretrained (SO3LRCalculator), r_max_lr 12 Å",
            "n_parameters": sum(p.numel() for p in model.parameters()),
            "n_atoms": len(atoms),
            "n_edges": n_edges,
            "n_long_range_edges": int(data["edge_index_lr"].shape[1]),
            "dtype": args.dtype,
            "threads": args.threads,
            "first_call_s": first,
            "ef_times_s": times,
            "md_step_times_s": md_times,
            "md_neighbor_list": "rebuilt by the calculator on every call",
            "energy": energy,
            "calculator_energy": calculator_energy,
            "median_ef_ms": float(np.median(times) * 1e3),
        },
    )


if __name__ == "__main__":
    sys.exit(main())
