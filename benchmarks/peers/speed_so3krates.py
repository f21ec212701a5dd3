"""Our side of `benchmarks/speed.py`: the SO3krates model of this package on one structure.

Runs in the project environment, under the same protocol as the peers (`speed_protocol.py`):

    python speed_so3krates.py --structure S.extxyz --threads 2 --dtype float32 --budget-seconds 20 \
        --md-steps 50 --out result.json [--preset paper] [--compile [aoti]] [--modules] [--no-spline] \
        [--no-pairs] [--all-threads] [--no-blocks | --blocks] [--no-flops]

Besides the times it counts the floating-point operations of one energy+forces call (matrix products
only, forward and backward, with `torch.utils.flop_counter`) for the roofline figure.
"""

from __future__ import annotations

from importlib.metadata import version

import numpy as np
import speed_protocol as protocol


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
    parser.add_argument("--modules", action="store_true", help="the modules' layers only, never the fused")
    parser.add_argument(
        "--all-threads", action="store_true", help="no single-thread evaluation of small graphs"
    )
    parser.add_argument(
        "--no-spline", action="store_true", help="evaluate the radial filters, not their float32 spline"
    )
    parser.add_argument(
        "--no-pairs", action="store_true", help="plain neighbour list: filters once per edge, not per pair"
    )
    parser.add_argument(
        "--no-blocks", action="store_true", help="the whole graph at once at every size (no edge blocks)"
    )
    parser.add_argument(
        "--blocks",
        action="store_true",
        help="edge blocks at every size (compiled blocks with --compile), not only where memory asks",
    )
    parser.add_argument(
        "--no-flops", action="store_true", help="no FLOP count (it evaluates the whole graph eagerly)"
    )
    args = parser.parse_args(argv)
    if args.blocks and args.no_blocks:
        parser.error("--blocks and --no-blocks exclude each other")
    protocol.limit_threads(args.threads)
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from so3krates import So3kratesCalculator, atoms_to_graph
    from so3krates.memory import keep_freed_memory
    from so3krates.model.config import preset
    from so3krates.model.so3krates import So3krates
    from so3krates.runtime import EnergyFunction, Evaluator, ForceField, Plan, Planner

    # What So3kratesCalculator does when it is made (below, for MD): freed memory stays in the process, so
    # the timed calls run as they do under the calculator.
    keep_freed_memory()
    atoms = protocol.read_structure(args.structure)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = So3krates(preset(args.preset)).to(dtype).eval().requires_grad_(False)  # as load_model gives it
    defaults = Planner()
    planner = Planner(
        fused_max_edges=-1 if args.modules else defaults.fused_max_edges,
        aoti_fused_max_edges=-1 if args.modules else defaults.aoti_fused_max_edges,
        single_thread_edges=0 if args.all_threads else defaults.single_thread_edges,
        spline=False if args.no_spline else None,
        pairs=not args.no_pairs,
        blocks_min_edges=0 if args.no_blocks else 1 if args.blocks else defaults.blocks_min_edges,
    )
    # The calculator's force field, plan choice and thread setting, called on a graph built once (float64
    # geometry, pair order): what one MD step costs without the neighbour list.
    force_field = ForceField(model, compile=args.compile, frozen=True, planner=planner)
    graph = atoms_to_graph(atoms, model.cutoff, pairs=True)
    threads = force_field.threads(graph)
    plan = force_field.plan(graph, threads=threads)

    def energy_and_forces() -> dict[str, torch.Tensor]:
        return force_field(graph)

    first, times = protocol.time_calls(
        energy_and_forces, args.budget_seconds, args.warmup_calls, args.min_repeats
    )
    out = energy_and_forces()
    protocol.check_forces(out["forces"], len(atoms), args.structure)
    energy = float(out["energy"].detach()[0])
    del out
    flops = flops_executed = None
    if not args.no_flops:
        # Executed FLOPs: the eager evaluator of the same plan. The roofline counts the matrix products of
        # the network evaluated edge by edge, which a run with the spline or with pairs does not all execute.
        # Slots change no product; the pair-message kernel executes the spherical MLP's last layer itself
        # (counted by its flop formulas: in large graphs its backward pass applies it again) and edge blocks
        # evaluate their filters twice, so both stay in the plan.
        executed_plan = Plan(plan.layers, plan.radial, plan.pairs, blocks=plan.blocks, kernel=plan.kernel)
        evaluator = Evaluator(EnergyFunction(force_field.model, executed_plan, frozen=True), executed_plan)
        with FlopCounterMode(display=False) as executed:
            evaluator(graph)
        # The eager choice for trainable weights (no spline, no pairs): the modules above 2,000 edges,
        # which need less memory than the fused layers there.
        network_plan = Planner().plan(graph.n_edges, dtype, frozen=False)
        network = Evaluator(EnergyFunction(force_field.model, network_plan, frozen=True), network_plan)
        with FlopCounterMode(display=False) as counter:
            network(atoms_to_graph(atoms, model.cutoff))
        flops, flops_executed = counter.get_total_flops(), executed.get_total_flops()
    # min_distance=0: random weights give forces that can push atoms together; the peers have no such
    # check, and only the time per step is measured.
    calculator = So3kratesCalculator(
        model, dtype=args.dtype, compile=args.compile, min_distance=0.0, planner=planner
    )
    md_times = protocol.time_md(atoms, calculator, args.md_steps)
    variants = {"inductor": " compiled", "aoti": " AOTInductor"}
    variant = variants.get(args.compile, "")
    variant += " (modules only)" if args.modules else ""
    variant += " (radial network)" if args.no_spline else ""
    variant += " (plain neighbour list)" if args.no_pairs else ""
    variant += " (no edge blocks)" if args.no_blocks else ""
    variant += " (edge blocks at every size)" if args.blocks else ""
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
            "threads_used_for_ef": threads,
            "plan": plan.describe(),
            "first_call_s": first,
            "ef_times_s": times,
            "md_step_times_s": md_times,
            "md_neighbor_list_builds": calculator.n_neighbor_list_builds,
            "flops_per_ef": flops,
            "flops_executed_per_ef": flops_executed,
            "energy": energy,
            "median_ef_ms": float(np.median(times) * 1e3),
        },
    )


if __name__ == "__main__":
    main()
