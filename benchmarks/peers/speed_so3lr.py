"""Our side of the SO3LR comparison in `benchmarks/speed.py`: the pretrained SO3LR, converted into ours.

Runs in the project environment (with the `so3lr` extra), under the protocol of `speed_protocol.py`:

    python speed_so3lr.py --structure S.extxyz --threads 2 --dtype float32 --budget-seconds 20 \
        --md-steps 50 --out result.json

The timed call is the calculator's force field on a graph built once (short- and long-range edges, r_c
4.5 Å and r_lr 12 Å, total charge 0): one MD step without the neighbour list. MD runs through
`So3kratesCalculator`, which reuses its neighbour list (r_lr + skin) between steps.
"""

from __future__ import annotations

from importlib.metadata import version

import numpy as np
import speed_protocol as protocol


def main(argv: list[str] | None = None) -> None:
    args = protocol.common_arguments(__doc__.splitlines()[0]).parse_args(argv)
    protocol.limit_threads(args.threads)
    import torch

    from so3krates import So3kratesCalculator, atoms_to_graph
    from so3krates.memory import keep_freed_memory
    from so3krates.pretrained import so3lr
    from so3krates.runtime import ForceField

    keep_freed_memory()
    atoms = protocol.read_structure(args.structure)
    model = so3lr(dtype=getattr(torch, args.dtype))
    force_field = ForceField(model, frozen=True)
    graph = atoms_to_graph(
        atoms, model.cutoff, long_range_cutoff=model.long_range_cutoff, total_charge=0.0, total_spin=0.0
    )

    def energy_and_forces() -> torch.Tensor:
        return force_field(graph)["forces"]

    first, times = protocol.time_calls(energy_and_forces, args.budget_seconds)
    protocol.check_forces(energy_and_forces(), len(atoms), args.structure)
    energy = float(force_field(graph)["energy"].detach()[0])
    calculator = So3kratesCalculator(model, dtype=args.dtype, min_distance=0.0, total_charge=0.0)
    md_times = protocol.time_md(atoms, calculator, args.md_steps)
    protocol.write_result(
        args.out,
        {
            "package": "so3krates",
            "version": version("so3krates"),
            "model": "SO3LR pretrained (converted from so3krates-torch 0.2.1), eager",
            "n_parameters": sum(p.numel() for p in model.parameters()),
            "n_atoms": len(atoms),
            "n_edges": graph.n_edges,
            "n_long_range_edges": int(graph.lr_idx_i.shape[0]),
            "dtype": args.dtype,
            "threads": args.threads,
            "first_call_s": first,
            "ef_times_s": times,
            "md_step_times_s": md_times,
            "md_neighbor_list_builds": calculator.n_neighbor_list_builds,
            "energy": energy,
            "median_ef_ms": float(np.median(times) * 1e3),
        },
    )


if __name__ == "__main__":
    main()
