"""Time per atom of several water boxes in one process, in turn: is it constant from 1,000 to 100,000 atoms?

    python benchmarks/scaling_in_turn.py [--molecules 333,3333,33333] [--rounds 5] [--threads 2]
        [--compile aoti] [--out results/scaling/in_turn.json]

`speed.py --scaling` runs every size in a process of its own, one after another; on this VM the speed drifts
by up to 1.4× within minutes, more than the differences between sizes that issue 22's target (time per atom
constant within 15 %) is about. Here one process holds every box (`speed.water_case`, paper preset, float32,
random weights) with the calculator's force field and planner (whole graph or edge blocks, as the memory
asks), and every round times each size once, in rotating order, so that a slow minute hits all of them.
Reports per size the plan, the median µs per atom, and the median over rounds of its ratio to the smallest
size's time per atom in the same round (the drift-free number). Peak memory is not measured here (one
process holds every size): `speed.py --scaling` does that.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from accuracy import _git_commit, machine_info, write_atomically  # noqa: E402
from speed import water_case  # noqa: E402


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(m) for m in text.split(",")]
    except ValueError:
        message = f"expected a comma list of numbers of molecules, not {text!r}"
        raise argparse.ArgumentTypeError(message) from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"numbers of molecules must be positive, not {text!r}")
    return sorted(sizes)


def _writable(text: str) -> Path:
    path = Path(text)
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"no folder {path.parent} for {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--molecules", type=_sizes, default="333,3333,33333", help="comma list, one box each, smallest first"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", choices=["none", "inductor", "aoti"], default="aoti")
    parser.add_argument("--out", type=_writable, help="JSON of the results")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from so3krates.runtime import ForceField

    sizes = args.molecules
    cases = {}
    force_field = None
    for molecules in sizes:
        atoms, model, graph = water_case(molecules, args.threads)
        if force_field is None:  # the same random weights for every size (seed 0)
            force_field = ForceField(model, compile=args.compile, frozen=True)
        plan = force_field.plan(graph, threads=force_field.threads(graph)).describe()
        start = time.perf_counter()
        force_field(graph)
        first = time.perf_counter() - start
        print(f"{len(atoms)} atoms, {graph.n_edges} edges: {plan}; first call {first:.1f} s", flush=True)
        cases[len(atoms)] = {"graph": graph, "edges": graph.n_edges, "plan": plan, "seconds": []}
    names = list(cases)
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n_atoms in order:
            start = time.perf_counter()
            force_field(cases[n_atoms]["graph"])
            cases[n_atoms]["seconds"].append(time.perf_counter() - start)
        times = ", ".join(f"{n}: {cases[n]['seconds'][-1]:.3g} s" for n in names)
        print(f"round {r + 1}: {times}", flush=True)
    smallest = names[0]
    base = np.array(cases[smallest]["seconds"]) / smallest
    result = {
        "commit": _git_commit(),
        "machine": machine_info(),
        "command": " ".join(["python", "benchmarks/scaling_in_turn.py", *(argv or sys.argv[1:])]),
        "threads": args.threads,
        "compile": args.compile,
        "sizes": {},
    }
    print(f"\n| atoms | edges | plan | µs per atom (median) | / {smallest} atoms, same round (median) |")
    print("|---|---|---|---|---|")
    for n_atoms, case in cases.items():
        per_atom = np.array(case["seconds"]) / n_atoms
        ratios = per_atom / base
        result["sizes"][n_atoms] = {
            "edges": case["edges"],
            "plan": case["plan"],
            "seconds": case["seconds"],
            "median_us_per_atom": float(np.median(per_atom) * 1e6),
            "ratio_to_smallest_per_round": ratios.tolist(),
            "median_ratio_to_smallest": float(np.median(ratios)),
        }
        print(
            f"| {n_atoms:,} | {case['edges']:,} | {case['plan']} | {np.median(per_atom) * 1e6:.0f} "
            f"| {np.median(ratios):.2f} ({ratios.min():.2f}–{ratios.max():.2f}) |"
        )
    if args.out:
        write_atomically(args.out, json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
