"""Where the time of one energy+forces call goes, kernel by kernel, in the compiled (AOTInductor) program.

    .venv/bin/python benchmarks/profile_kernels.py --structure S.extxyz [--threads 2] [--layers modules]
        [--radial network] [--variant default] [--calls 5] [--out-dir benchmarks/results/profile]

The paper-preset model (float32, random weights with seed 0, as in `speed.py`) on edges in pair order is
compiled
with inductor's kernel profiling on, into a scratch file (never the calculator's program cache: the cache
key does not know of profiling). Then `--calls` calls are timed without the profiler and `--calls` with it.
Each profiled kernel falls into one of four groups:

- *matrix products*: the library calls (`mm`, `addmm`, `bmm`);
- *generated, with scatter-adds*: inductor's kernels that sum edges into atoms (`index_add`/`index_put`
  in their name), with whatever elementwise work inductor fused into them;
- *generated, other*: the rest of inductor's kernels (elementwise, gathers, reductions);
- *other ATen calls*: copies, fills and ATen fallbacks.

The matrix products' own throughput is the matrix-product FLOPs the call executes (counted with
`torch.utils.flop_counter` on the same evaluation path, eagerly) over their profiled time.

Variants (`--variant`) compile the same program differently, to test what limits it:

- `default`: the plain program (generated kernels on one thread), which `So3kratesCalculator(compile="aoti")`
  runs for calls on one thread;
- `threaded`: inductor's generated kernels on all threads (`cpp.threads = -1`); its scatter-adds then become
  atomic additions;
- `scatter-fallback`: `threaded`, compiled under `torch.use_deterministic_algorithms(True)`, so that inductor
  leaves the scatter-adds to ATen instead of generating atomic ones;
- `slots`: the program `So3kratesCalculator(compile="aoti")` runs on several threads (a plan with slots,
  fused layers only): sums over edges read a table of every atom's edges instead of scattering, and the
  generated kernels run on all threads. The tables are built once, outside the timed calls.

Results: `<out-dir>/<structure>_<path>_<variant>_<threads>t.{json,md}`. Run under
`flock /tmp/so3krates-cpu.lock` on this shared machine, with `OMP_WAIT_POLICY=PASSIVE`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from accuracy import _git_commit, write_atomically  # noqa: E402  (the benchmarks' shared helpers)

VARIANTS = ("default", "threaded", "scatter-fallback", "slots")
GROUPS = (
    "matrix products",
    "generated, with scatter-adds",
    "generated, other",
    "pair-message kernel",
    "other ATen calls",
)


def kernel_group(name: str) -> str:
    """One of GROUPS for a profiler event name of an AOTInductor program."""
    if name.startswith("aoti_torch_cpu_") and name.removeprefix("aoti_torch_cpu_").split("_")[0] in (
        "mm",
        "addmm",
        "bmm",
    ):
        return GROUPS[0]
    if "cpp_fused" in name:
        return GROUPS[1] if ("index_add" in name or "index_put" in name) else GROUPS[2]
    if name.startswith("so3krates::"):
        return GROUPS[3]
    return GROUPS[4]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structure", required=True, help="extxyz file; its first frame is used")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", choices=["modules", "fused"], default="modules")
    parser.add_argument("--radial", choices=["network", "spline"], default="network")
    parser.add_argument("--variant", choices=VARIANTS, default="default")
    parser.add_argument("--kernel", action="store_true", help="the pair-message kernel (fused layers)")
    parser.add_argument("--calls", type=int, default=5, help="timed calls, then as many profiled ones")
    parser.add_argument("--top", type=int, default=15, help="kernels listed one by one")
    parser.add_argument("--out-dir", type=Path, default=BENCH / "results" / "profile")
    args = parser.parse_args(argv)
    if not Path(args.structure).is_file():
        parser.error(f"--structure {args.structure}: not a file (an extxyz file is needed)")

    import ase.io
    import torch
    from torch.profiler import profile
    from torch.utils.flop_counter import FlopCounterMode

    from so3krates import atoms_to_graph
    from so3krates.export import export_model, load_exported
    from so3krates.memory import keep_freed_memory
    from so3krates.model.config import preset
    from so3krates.model.so3krates import So3krates
    from so3krates.runtime import EnergyFunction, Evaluator, Plan
    from so3krates.runtime.programs import graph_inputs

    keep_freed_memory()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    atoms = ase.io.read(args.structure, index=0)
    torch.manual_seed(0)
    model = So3krates(preset("paper")).to(torch.float32).eval().requires_grad_(False)
    graph = atoms_to_graph(atoms, model.cutoff, pairs=True)
    slots = args.variant == "slots"
    if slots and args.layers != "fused":
        parser.error("the slots variant is a program of the fused layers: add --layers fused")
    if args.kernel and args.layers != "fused":
        parser.error("the pair-message kernel runs the fused layers: add --layers fused")
    plan = Plan(args.layers, args.radial, pairs=True, slots=slots, kernel=args.kernel)
    inputs = graph_inputs(graph, plan)

    configs: dict[str, object] = {"cpp.enable_kernel_profile": True}
    if args.variant not in ("default", "slots"):  # a program with slots is threaded anyway
        configs["cpp.threads"] = -1
    deterministic = torch.are_deterministic_algorithms_enabled()
    with tempfile.TemporaryDirectory(prefix="so3krates-profile-") as scratch:
        program_path = Path(scratch) / "program.pt2"
        start = time.perf_counter()
        torch.use_deterministic_algorithms(args.variant == "scatter-fallback")
        try:
            export_model(
                model, program_path, fmt="aoti", dtype="float32", plan=plan, inductor_configs=configs
            )
        finally:
            torch.use_deterministic_algorithms(deterministic)
        compile_s = time.perf_counter() - start
        program = load_exported(program_path).program.function

        for _ in range(3):
            program(*inputs)
        times = []
        for _ in range(args.calls):
            start = time.perf_counter()
            program(*inputs)
            times.append(time.perf_counter() - start)
        with profile() as profiler:
            for _ in range(args.calls):
                program(*inputs)

    # Matrix-product FLOPs of the same plan, counted on the eager evaluator.
    evaluator = Evaluator(EnergyFunction(model, plan, frozen=True), plan)
    with FlopCounterMode(display=False) as counter:
        evaluator(graph)
    flops = counter.get_total_flops()

    kernels = []
    for event in profiler.key_averages():
        if event.key.startswith(("ProfilerStep", "USDT")):
            continue
        kernels.append(
            {
                "name": event.key,
                "group": kernel_group(event.key),
                "calls": event.count // args.calls,
                "ms": event.self_cpu_time_total / 1e3 / args.calls,
            }
        )
    kernels.sort(key=lambda k: -k["ms"])
    profiled_ms = sum(k["ms"] for k in kernels)
    groups = {g: sum(k["ms"] for k in kernels if k["group"] == g) for g in GROUPS}
    matmul_ms = groups[GROUPS[0]]
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "structure": str(args.structure),
        "n_atoms": len(atoms),
        "n_edges": graph.n_edges,
        "threads": args.threads,
        "plan": plan.as_dict(),
        "variant": args.variant,
        "inductor_configs": configs,
        "compile_s": compile_s,
        "wall_ms": [t * 1e3 for t in times],
        "median_wall_ms": statistics.median(times) * 1e3,
        "profiled_ms": profiled_ms,
        "groups_ms": groups,
        "matmul_gflop": flops / 1e9,
        "matmul_gflops_in_program": flops / 1e9 / (matmul_ms / 1e3) if matmul_ms else None,
        "kernels": kernels,
        "torch": torch.__version__,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    kernel = "_kernel" if args.kernel else ""
    stem = f"{Path(args.structure).stem}_{args.layers}_{args.radial}{kernel}_{args.variant}_{args.threads}t"
    markdown = render(result, args.top)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(args.out_dir / f"{stem}.json", json.dumps(result, indent=1) + "\n")
    write_atomically(args.out_dir / f"{stem}.md", markdown)
    print(markdown)


def render(result: dict, top: int) -> str:
    profiled = result["profiled_ms"]
    lines = [
        f"# Kernel profile: {Path(result['structure']).stem}, {result['n_atoms']} atoms, "
        f"{result['n_edges']} edges",
        "",
        f"{result['date']}, commit {result['commit']}, torch {result['torch']}, {result['threads']} threads, "
        f"plan: {result['plan']['layers']} layers, radial {result['plan']['radial']}, pairs, "
        f"{'pair-message kernel, ' if result['plan'].get('kernel') else ''}float32, "
        f"variant `{result['variant']}`.",
        "",
        f"Wall time per call: median {result['median_wall_ms']:.0f} ms "
        f"({', '.join(f'{t:.0f}' for t in result['wall_ms'])}); profiled: {profiled:.0f} ms.",
        "",
        "| group | ms per call | share |",
        "|---|---|---|",
    ]
    for group, ms in result["groups_ms"].items():
        lines.append(f"| {group} | {ms:.1f} | {100 * ms / profiled:.0f} % |")
    if result["matmul_gflops_in_program"]:
        lines += [
            "",
            f"Matrix products: {result['matmul_gflop']:.2f} GFLOP per call at "
            f"{result['matmul_gflops_in_program']:.0f} GFLOP/s inside the program.",
        ]
    lines += ["", f"Top {top} kernels:", "", "| ms | calls | group | kernel |", "|---|---|---|---|"]
    for kernel in result["kernels"][:top]:
        name = kernel["name"] if len(kernel["name"]) <= 90 else kernel["name"][:87] + "..."
        lines.append(f"| {kernel['ms']:.1f} | {kernel['calls']} | {kernel['group']} | `{name}` |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
