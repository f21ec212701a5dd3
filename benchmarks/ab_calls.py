"""Before and after a change, call by call: this tree against a git revision, in two live processes.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/ab_calls.py --baseline REV \
        [--systems ethanol,ala-dipeptide,3bpa,water-1000] [--compile aoti] [--dtype float32] [--threads 2] \
        [--rounds 15] [--block-seconds 1.0] [--out-dir benchmarks/results/execution_layer]

`speed.py --baseline REV --repeats N` compares whole processes; on this shared 2-core VM one process's
median differs from the next one's by up to ±30 %, so a few processes cannot resolve a 5 % change. Here one
worker process per side stays alive for a system (this tree's package, and REV's from a worktree under
`benchmarks/runs/` on PYTHONPATH); both build `So3kratesCalculator(So3krates(preset("paper")), ...)` with
seed-0 weights (the public API of both sides, so the same model) and warm up, then they take turns: in
each round each worker times a block of energy + forces calls (`calculator.calculate` on an unchanged
structure: the neighbour list is reused, as between the list rebuilds of an MD run), the order swapped every
round (A B, B A, ...), so that a slow minute of the machine falls on both. The report gives each side's
median over all calls, the median and quartiles of the per-round ratios after / before, and each worker's
peak resident memory. Results: `<out-dir>/ab_calls_<compile>_<dtype>.{json,md}`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from accuracy import _git_commit, machine_info, write_atomically  # noqa: E402
from speed import SYSTEMS, baseline_worktree, build_systems, water_atoms  # noqa: E402

WORKER = """
import json, resource, sys, time
import torch, ase.io
from so3krates import So3krates, So3kratesCalculator, preset
structure, dtype, compile_mode, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
torch.set_num_threads(threads)
torch.set_num_interop_threads(1)
atoms = ase.io.read(structure, index=0)
torch.manual_seed(0)
model = So3krates(preset("paper"))
calculator = So3kratesCalculator(model, dtype=dtype, compile=compile_mode, min_distance=0.0)
for _ in range(5):  # compiles (aoti: from the cache after the first run) and warms up
    calculator.calculate(atoms, ["energy", "forces"])
start = time.perf_counter()
calculator.calculate(atoms, ["energy", "forces"])
print(json.dumps({"single_s": time.perf_counter() - start}), flush=True)
for line in sys.stdin:
    times = []
    for _ in range(int(line)):
        start = time.perf_counter()
        calculator.calculate(atoms, ["energy", "forces"])
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"times_s": times, "peak_rss_mb": peak}), flush=True)
"""


def start_worker(structure: Path, args: argparse.Namespace, source: Path | None) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OMP_WAIT_POLICY="PASSIVE")
    if source is not None:
        env["PYTHONPATH"] = str(source / "src")
    command = [sys.executable, "-c", WORKER, str(structure), args.dtype, args.compile, str(args.threads)]
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)


def read_reply(worker: subprocess.Popen) -> dict:
    line = worker.stdout.readline()
    if not line:
        raise RuntimeError(f"a worker stopped (exit {worker.wait()})")
    return json.loads(line)


def compare(structure: Path, args: argparse.Namespace, baseline: Path) -> dict:
    workers = {
        "after": start_worker(structure, args, None),
        "before": start_worker(structure, args, baseline),
    }
    try:
        single = max(read_reply(worker)["single_s"] for worker in workers.values())
        calls = max(3, int(args.block_seconds / single))
        times: dict[str, list[float]] = {"after": [], "before": []}
        peaks: dict[str, float] = {}
        ratios = []
        for round_ in range(args.rounds):
            order = ["after", "before"] if round_ % 2 == 0 else ["before", "after"]
            block = {}
            for side in order:
                workers[side].stdin.write(f"{calls}\n")
                workers[side].stdin.flush()
                reply = read_reply(workers[side])
                block[side] = float(np.median(reply["times_s"]))
                times[side] += reply["times_s"]
                peaks[side] = reply["peak_rss_mb"]
            ratios.append(block["after"] / block["before"])
    finally:
        for worker in workers.values():
            worker.stdin.close()
            worker.wait(timeout=60)
    return {
        "calls_per_block": calls,
        "rounds": args.rounds,
        "median_ms": {side: 1e3 * float(np.median(values)) for side, values in times.items()},
        "ratio_median": float(np.median(ratios)),
        "ratio_quartiles": [float(np.percentile(ratios, 25)), float(np.percentile(ratios, 75))],
        "ratios": ratios,
        "peak_rss_mb": peaks,
    }


def _systems(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SYSTEMS and not water_atoms(name)]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown system(s) {', '.join(unknown) or '(none given)'}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="git revision to compare with")
    parser.add_argument(
        "--systems",
        type=_systems,
        default="ethanol,ala-dipeptide,3bpa,water-1000",
        help=f"comma list of {', '.join(SYSTEMS)} or water-N (a random box of N // 3 water molecules)",
    )
    parser.add_argument("--compile", choices=["none", "inductor", "aoti"], default="aoti")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--block-seconds", type=float, default=1.0, help="time of one block of calls")
    parser.add_argument("--out-dir", type=Path, default=BENCH / "results" / "execution_layer")
    args = parser.parse_args(argv)
    commit, baseline = baseline_worktree(args.baseline)
    paths = build_systems(args.systems, BENCH / "runs" / "ab_calls" / "systems")
    results = {
        "date": datetime.date.today().isoformat(),
        "commit": _git_commit(),
        "baseline": commit,
        "machine": machine_info(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "systems": {},
    }
    for name, path in paths.items():
        print(f"{name}: {args.compile}, {args.dtype}, {args.threads} threads", flush=True)
        result = compare(path, args, baseline)
        results["systems"][name] = result
        q25, q75 = result["ratio_quartiles"]
        print(
            f"  before {result['median_ms']['before']:.2f} ms, after {result['median_ms']['after']:.2f} ms, "
            f"after / before {result['ratio_median']:.3f} (rounds: {q25:.3f}–{q75:.3f}); peak "
            f"{result['peak_rss_mb']['before']:.0f} → {result['peak_rss_mb']['after']:.0f} MB",
            flush=True,
        )
    stem = f"ab_calls_{args.compile}_{args.dtype}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(args.out_dir / f"{stem}.json", json.dumps(results, indent=1))
    write_atomically(args.out_dir / f"{stem}.md", markdown(results))
    return 0


def markdown(results: dict) -> str:
    a = results["args"]
    lines = [
        f"# Before and after, call by call: {results['commit']} against {results['baseline']}",
        "",
        f"{results['date']}, {results['machine']['cpu']}, torch {results['machine']['torch']}; compile "
        f"`{a['compile']}`, {a['dtype']}, {a['threads']} threads, OMP_WAIT_POLICY=PASSIVE. Two live worker "
        f"processes take turns, {a['rounds']} rounds of about {a['block_seconds']} s each "
        "(`benchmarks/ab_calls.py`): energy + forces through `So3kratesCalculator` on an unchanged "
        "structure.",
        "",
        "| system | calls per block | before, ms | after, ms | after / before (median of rounds) | "
        "quartiles of the rounds | peak MB before → after |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for name, r in results["systems"].items():
        q25, q75 = r["ratio_quartiles"]
        lines.append(
            f"| {name} | {r['calls_per_block']} | {r['median_ms']['before']:.2f} | "
            f"{r['median_ms']['after']:.2f} | {r['ratio_median']:.3f} | {q25:.3f}–{q75:.3f} | "
            f"{r['peak_rss_mb']['before']:.0f} → {r['peak_rss_mb']['after']:.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
