"""Fused layers against the modules' layers in `aoti` programs of one large water box, in turn in one process.

    python benchmarks/aoti_layers.py [--molecules 3333] [--rounds 8] [--threads 2]

The planner's choice between the two whole-graph programs (`Planner.aoti_fused_max_edges`). Both programs are
compiled for the same graph (`speed.water_box`, paper preset, float32, pairs, random weights, no edge
blocks), warmed up, then called in turn for `--rounds` rounds (the order alternating), so that a slow minute
of this shared machine hits both. Prints the medians, the per-round ratios and their median, and the largest
force difference. Peak memory needs one process per program: `--only fused` or `--only modules` prints the
process's peak resident memory with a single program. Results: `results/aoti_layers/`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from accuracy import _git_commit, machine_info, write_atomically  # noqa: E402
from scaling_in_turn import _writable  # noqa: E402
from speed import water_case  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--molecules", type=int, default=3333)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=["fused", "modules"], help="one program (for its peak memory)")
    parser.add_argument("--out", type=_writable, help="JSON of the results")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from so3krates.runtime import ForceField, Planner

    atoms, model, graph = water_case(args.molecules, args.threads)
    print(f"{len(atoms)} atoms, {graph.n_edges} edges", flush=True)
    names = [args.only] if args.only else ["fused", "modules"]
    fields, forces, plans = {}, {}, {}
    for name in names:
        planner = Planner(aoti_fused_max_edges=10**12 if name == "fused" else -1, blocks_min_edges=0)
        fields[name] = ForceField(model, compile="aoti", frozen=True, planner=planner)
        plans[name] = fields[name].plan(graph, threads=args.threads).describe()
        start = time.perf_counter()
        forces[name] = fields[name](graph)["forces"].detach().clone()
        fields[name](graph)
        print(f"{name}: {plans[name]}, first call {time.perf_counter() - start:.1f} s", flush=True)
    times = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            fields[name](graph)
            times[name].append(time.perf_counter() - start)
    result = {
        "commit": _git_commit(),
        "machine": machine_info(),
        "command": " ".join(["python", "benchmarks/aoti_layers.py", *(argv or sys.argv[1:])]),
        "atoms": len(atoms),
        "edges": graph.n_edges,
        "threads": args.threads,
        "plans": plans,
        "seconds": times,
        "median_seconds": {name: float(np.median(t)) for name, t in times.items()},
        "peak_resident_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    for name in names:
        print(f"{name}: median {result['median_seconds'][name]:.2f} s, calls {np.round(times[name], 2)}")
    if not args.only:
        ratios = np.array(times["fused"]) / np.array(times["modules"])
        result["fused_over_modules"] = {"per_round": ratios.tolist(), "median": float(np.median(ratios))}
        result["max_force_difference"] = float((forces["fused"] - forces["modules"]).abs().max())
        print(f"fused / modules per round: {np.round(ratios, 3)}, median {np.median(ratios):.3f}")
        print(f"largest force difference {result['max_force_difference']:.1e} eV/Å")
    print(f"peak resident memory {result['peak_resident_mb']:.0f} MB")
    if args.out:
        write_atomically(args.out, json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
