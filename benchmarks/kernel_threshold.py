"""Where the pair-message kernel pays: the same calculator with and without it, calls in turn, one process.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/kernel_threshold.py [--compile none,aoti] \
        [--systems ethanol,3bpa,water-90,water-300,water-999,water-3000] [--threads 2] [--rounds 7] \
        [--out-dir DIR]

For each system and compile mode, two `So3kratesCalculator`s of the paper model (seed-0 weights, float32)
differ only in `Planner(kernel_min_edges=...)`: 0 (the kernel wherever it is legal) and None (never). Each
round times a block of energy + forces calls of each (order swapped every round), on an unchanged
structure. Written: `<out-dir>/threshold_<compile>.{json,md}` (default `results/pair_kernel/`) with both
medians, the per-round ratio and the plan each side ran; the planner's `KERNEL_MIN_EDGES` is chosen from them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def timed_block(atoms, calc, seconds: float) -> list[float]:
    times, start = [], time.perf_counter()
    while not times or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        calc.calculate(atoms, ["energy", "forces"], [])
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile", default="none,aoti")
    parser.add_argument("--systems", default="ethanol,3bpa,water-90,water-300,water-999,water-3000")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--block-seconds", type=float, default=1.0)
    parser.add_argument("--out-dir", type=Path, default=HERE / "results" / "pair_kernel")
    args = parser.parse_args()
    unknown = sorted(set(args.compile.split(",")) - {"none", "inductor", "aoti"})
    if unknown:
        parser.error(f"--compile takes none, inductor, aoti (comma-separated), not {', '.join(unknown)}")
    if args.rounds < 1 or args.threads < 1:
        parser.error("--rounds and --threads must be at least 1")
    try:
        args.out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"--out-dir {args.out_dir}: {error.strerror}")

    import torch
    from speed import build_systems, water_atoms, water_box

    from so3krates import So3kratesCalculator
    from so3krates.files import atomic_path, write_json
    from so3krates.memory import keep_freed_memory
    from so3krates.model.config import preset
    from so3krates.model.so3krates import So3krates
    from so3krates.runtime import Planner

    torch.set_num_threads(args.threads)
    keep_freed_memory()
    names = args.systems.split(",")
    molecules = build_systems([n for n in names if not water_atoms(n)], HERE / "runs" / "kernel_threshold")
    out_dir = args.out_dir
    import ase.io

    for compile in args.compile.split(","):
        rows = []
        for name in names:
            atoms = water_box(water_atoms(name) // 3) if water_atoms(name) else None
            if atoms is None:
                if name not in molecules:
                    print(f"{name}: skipped (no data)")
                    continue
                atoms = ase.io.read(molecules[name])
            torch.manual_seed(0)
            model = So3krates(preset("paper")).float().eval().requires_grad_(False)
            sides = {}
            for side, minimum in (("kernel", 0), ("without", None)):
                calc = So3kratesCalculator(
                    model, dtype="float32", compile=compile, planner=Planner(kernel_min_edges=minimum)
                )
                calc.calculate(atoms, ["energy", "forces"], [])  # build, compile, warm up
                graph = calc.graph(atoms)
                plan = calc.force_field.plan(graph).describe()
                sides[side] = {"calc": calc, "times": [], "plan": plan, "edges": graph.n_edges}
            ratios = []
            for round_ in range(args.rounds):
                order = ("kernel", "without") if round_ % 2 == 0 else ("without", "kernel")
                block = {}
                for side in order:
                    block[side] = timed_block(atoms, sides[side]["calc"], args.block_seconds)
                    sides[side]["times"] += block[side]
                ratios.append(statistics.median(block["without"]) / statistics.median(block["kernel"]))
            row = {
                "system": name,
                "atoms": len(atoms),
                "edges": sides["kernel"]["edges"],
                "kernel_ms": 1e3 * statistics.median(sides["kernel"]["times"]),
                "without_ms": 1e3 * statistics.median(sides["without"]["times"]),
                "speed_up_median_of_rounds": statistics.median(ratios),
                "plans": {side: sides[side]["plan"] for side in sides},
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        result = {"compile": compile, "threads": args.threads, "rounds": args.rounds, "rows": rows}
        result["torch"] = torch.__version__
        write_json(out_dir / f"threshold_{compile}.json", result)
        lines = [
            f"# Pair-message kernel on and off, `compile={compile}`, {args.threads} threads, float32",
            "",
            "| system | atoms | edges | with kernel ms | without ms | speed-up (median of rounds) | plans |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in rows:
            plans = f"{r['plans']['kernel']} / {r['plans']['without']}"
            lines.append(
                f"| {r['system']} | {r['atoms']} | {r['edges']} | {r['kernel_ms']:.2f} | "
                f"{r['without_ms']:.2f} | {r['speed_up_median_of_rounds']:.2f} | {plans} |"
            )
        with atomic_path(out_dir / f"threshold_{compile}.md") as tmp:
            tmp.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
