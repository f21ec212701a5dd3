"""Our side of `benchmarks/speed.py`: the SO3krates model of this package on one structure.

Runs in the project environment, under the same protocol as the peers (`speed_protocol.py`):

    python speed_so3krates.py --structure S.extxyz --threads 2 --dtype float32 --budget-seconds 20 \
        --md-steps 50 --out result.json [--preset paper] [--compile [aoti]] [--reference-path]

Besides the times it counts the floating-point operations of one energy+forces call (matrix products
only, forward and backward, with `torch.utils.flop_counter`) for the roofline figure.
"""

from __future__ import annotations

from importlib.metadata import version

import numpy as np
import speed_protocol as protocol

SINGLE_THREAD_EDGES = 1000  # So3kratesCalculator's default single_thread_edges


def main(argv: list[str] | None = None) -> None:
    parser = protocol.common_arguments(__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper")
    parser.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        default="none",
        choices=["none", "inductor", "aoti"],
        help="inductor: torch.compile (dynamic shapes); aoti: AOTInductor program of forward and backward",
    )
    parser.add_argument("--reference-path", action="store_true", help="per-equation modules, not fused")
    parser.add_argument(
        "--all-threads", action="store_true", help="no single-thread evaluation of small graphs"
    )
    parser.add_argument(
        "--no-table", action="store_true", help="evaluate the radial filters, not their float32 spline"
    )
    parser.add_argument(
        "--no-pairs", action="store_true", help="plain neighbour list: radial filters once per edge, not pair"
    )
    args = parser.parse_args(argv)
    protocol.limit_threads(args.threads)
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from so3krates import So3kratesCalculator, atoms_to_graph
    from so3krates.memory import keep_freed_memory
    from so3krates.model.config import preset
    from so3krates.model.derivatives import ForceField
    from so3krates.model.so3krates import So3krates, compile_model

    # What So3kratesCalculator does when it is made (below, for MD): freed memory stays in the process, so
    # the timed calls run as they do under the calculator.
    keep_freed_memory()
    atoms = protocol.read_structure(args.structure)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = So3krates(preset(args.preset)).to(dtype).eval().requires_grad_(False)  # as load_model gives it
    if args.reference_path:
        model.fused = False
    if args.no_table:
        model.tabulate = False
    force_field = ForceField(compile_model(model) if args.compile == "inductor" else model)
    # float64 geometry and paired edges, as in the calculator
    graph = atoms_to_graph(atoms, model.cutoff, paired=not args.no_pairs)
    # As So3kratesCalculator does (single_thread_edges): small graphs run on one of the threads.
    single = args.threads > 1 and graph.n_edges <= SINGLE_THREAD_EDGES and not args.all_threads
    if args.compile == "aoti":
        from so3krates.export.core import aoti_program_kind, compiled_program, graph_inputs

        # The calculator's choice and cache key, so that the MD part below compiles nothing more.
        fused, slotted = aoti_program_kind(graph.n_edges, threaded=args.threads > 1 and not single)
        program = compiled_program(
            model, dtype, list(range(1, 119)), fused=fused, paired=graph.paired, slotted=slotted
        )
        program_name = "slotted" if slotted else "fused" if fused else "per-equation"

        def energy_and_forces() -> torch.Tensor:
            # The edge tables are built in every call, as the calculator does.
            return program(*graph_inputs(graph, slots=slotted))[2]
    else:
        program_name = None

        def energy_and_forces() -> torch.Tensor:
            return force_field(graph)["forces"]

    if single:
        timed = energy_and_forces

        def energy_and_forces() -> torch.Tensor:
            torch.set_num_threads(1)
            try:
                return timed()
            finally:
                torch.set_num_threads(args.threads)

    first, times = protocol.time_calls(energy_and_forces, args.budget_seconds)
    protocol.check_forces(energy_and_forces(), len(atoms), args.structure)
    # Executed FLOPs: the eager model on the path the timed function took (an AOTI program's path is fixed
    # at export), after one call that builds what it caches (spline, fused weights).
    eager_path, model.fused = model.fused, (fused if args.compile == "aoti" else model.fused)
    force_field(graph)
    with FlopCounterMode(display=False) as executed:
        energy = float(force_field(graph)["energy"].detach()[0])
    model.fused = eager_path
    # The roofline counts the matrix products of the network evaluated edge by edge; a tabulated or paired
    # run executes fewer of them.
    tabulate, model.tabulate = model.tabulate, False
    with FlopCounterMode(display=False) as counter:
        force_field(atoms_to_graph(atoms, model.cutoff))
    model.tabulate = tabulate
    # min_distance=0: random weights give forces that can push atoms together; the peers have no such
    # check, and only the time per step is measured.
    calculator = So3kratesCalculator(
        model,
        dtype=args.dtype,
        compile=args.compile,
        min_distance=0.0,
        single_thread_edges=0 if args.all_threads else SINGLE_THREAD_EDGES,
        pair_edges=not args.no_pairs,
    )
    md_times = protocol.time_md(atoms, calculator, args.md_steps)
    variants = {"inductor": " compiled", "aoti": " AOTInductor"}
    variant = variants.get(args.compile, " reference path" if args.reference_path else "")
    variant += " (exact radial filters)" if args.no_table else ""
    variant += " (unpaired edges)" if args.no_pairs else ""
    protocol.write_result(
        args.out,
        {
            "package": "so3krates",
            "version": version("so3krates"),
            "model": f"SO3krates preset {args.preset}{variant}",
            "n_parameters": sum(p.numel() for p in model.parameters()),
            "n_atoms": len(atoms),
            "n_edges": graph.n_edges,
            "dtype": args.dtype,
            "threads": args.threads,
            "threads_used_for_ef": 1 if single else args.threads,
            "aoti_program": program_name,
            "first_call_s": first,
            "ef_times_s": times,
            "md_step_times_s": md_times,
            "md_neighbor_list_builds": calculator.n_neighbor_list_builds,
            "flops_per_ef": counter.get_total_flops(),
            "flops_executed_per_ef": executed.get_total_flops(),
            "energy": energy,
            "median_ef_ms": float(np.median(times) * 1e3),
        },
    )


if __name__ == "__main__":
    main()
