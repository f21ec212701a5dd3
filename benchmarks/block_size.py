"""Edge blocks: time of energy + forces per block size, radial variant and number of block threads,
against the whole graph at once.

    python benchmarks/block_size.py [--molecules 1000] [--rounds 8] [--threads 2]          # eager
    python benchmarks/block_size.py --compile aoti --block-edges 8192 --workers 1,2       # compiled blocks

One process, one water box (`speed.water_box`, paper preset, float32, random weights): the variants take
turns call by call for `--rounds` rounds (the order rotated every round), so that a slow minute of this
shared machine hits all of them. Reports the median and quartiles per variant, the ratio to the whole graph
(the planner's plan for it in that compile mode) and how many cores the process kept busy (CPU time over
wall time), in `results/scaling/block_size[_<compile>].md` and `.json`. Memory is not compared here (one
process); `speed.py --scaling` measures it per process.
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--molecules", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", choices=["none", "aoti"], default="none")
    parser.add_argument("--block-edges", default="2048,4096,8192,16384,32768", help="comma list")
    parser.add_argument(
        "--workers",
        default="1",
        help="comma list: threads that evaluate blocks at once (Planner.block_workers)",
    )
    parser.add_argument("--out-dir", type=Path, default=BENCH / "results" / "scaling")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    from so3krates.runtime import ForceField, Planner

    atoms, model, graph = water_case(args.molecules, args.threads)
    variants = {"whole graph": Planner(blocks_min_edges=0)}
    workers = [int(w) for w in args.workers.split(",")]
    for block_edges in (int(b) for b in args.block_edges.split(",")):
        for w in workers:
            name = f"blocks of {block_edges}" + (f", {w} thread{'s' * (w > 1)}" if len(workers) > 1 else "")
            variants[name] = Planner(blocks_min_edges=1, block_edges=block_edges, block_workers=w)
    if args.compile == "none":
        variants["blocks of 8192, spline"] = Planner(blocks_min_edges=1, block_edges=8192, spline=True)
    force_fields = {
        name: ForceField(model, frozen=True, compile=args.compile, planner=p) for name, p in variants.items()
    }
    plans = {name: ff.plan(graph).describe() for name, ff in force_fields.items()}
    reference = force_fields["whole graph"](graph)["forces"]
    differences = {}
    for name, force_field in force_fields.items():  # warm-up, and the forces of each variant
        differences[name] = float((force_field(graph)["forces"] - reference).abs().max())
    times: dict[str, list[float]] = {name: [] for name in force_fields}
    busy: dict[str, list[float]] = {name: [] for name in force_fields}
    names = list(force_fields)
    for round_ in range(args.rounds):
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in order:
            cpu, start = time.process_time(), time.perf_counter()
            force_fields[name](graph)
            times[name].append(time.perf_counter() - start)
            busy[name].append((time.process_time() - cpu) / times[name][-1])
        print(f"round {round_ + 1}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in names), flush=True)
    whole = float(np.median(times["whole graph"]))
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "commit": _git_commit(),
        "machine": machine_info(),
        "threads": args.threads,
        "compile": args.compile,
        "n_atoms": len(atoms),
        "n_edges": graph.n_edges,
        "rounds": args.rounds,
        "variants": {
            name: {
                "plan": plans[name],
                "median_s": float(np.median(t)),
                "q25_s": float(np.percentile(t, 25)),
                "q75_s": float(np.percentile(t, 75)),
                "ratio_to_whole": float(np.median(t)) / whole,
                "max_force_difference_to_whole_eV_A": differences[name],
                "cores_busy": float(np.median(busy[name])),
                "times_s": t,
            }
            for name, t in times.items()
        },
    }
    command = " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"# Edge blocks: block size ({len(atoms):,} atoms of water, {graph.n_edges:,} edges)",
        "",
        f"{results['date']}, commit {results['commit']}, {results['machine'].get('cpu', '?')}, "
        f"{args.threads} threads, float32, compile `{args.compile}`, paper preset; {args.rounds} rounds, "
        f"variants in turn in one process (`python benchmarks/block_size.py {command}`).",
        "",
        "| variant | plan | s per call (quartiles) | / whole graph | cores busy | max |ΔF| to whole, eV/Å |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in results["variants"].items():
        lines.append(
            f"| {name} | {entry['plan']} | {entry['median_s']:.2f} "
            f"({entry['q25_s']:.2f}–{entry['q75_s']:.2f}) | {entry['ratio_to_whole']:.2f} "
            f"| {entry['cores_busy']:.2f} | {entry['max_force_difference_to_whole_eV_A']:.1e} |"
        )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = "block_size" if args.compile == "none" else f"block_size_{args.compile}"
    write_atomically(args.out_dir / f"{stem}.json", json.dumps(results, indent=1))
    write_atomically(args.out_dir / f"{stem}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
