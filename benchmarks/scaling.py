"""Scaling mode of `speed.py`: time and peak memory per atom of energy + forces, water, 100–100,000 atoms.

    python benchmarks/speed.py --scaling [--models so3krates-aoti,so3krates-aoti-blocks,
        so3krates-aoti-no-blocks,so3krates-torch,mace-small]
        [--scaling-atoms 100,300,1000,3000,10000,30000,100000] [--memory-limit-gb 20]
        [--threads 2] [--dtype float32]

Every (model, size) pair is one process of that model's speed runner (`peers/speed_*.py`, the protocol of
`speed_protocol.py`) with `--md-steps 0 --no-calculator-check` (ours also `--no-flops`): energy + forces of
the structure built once, one or two warm-up calls, then timed calls (at least 2 from 30,000 atoms on, 3
below) within `--budget-seconds`; peak resident memory of the process. The boxes are `speed.water_box`
(molecules on a lattice at 1 g/cm³, random orientations, seed 0). Each process runs under an address-space
limit (`RLIMIT_AS`, `--memory-limit-gb`): a model that fails for lack of memory at one size is marked
there and not run at larger sizes. The sizes run one after another, every model at one size before the next
size, so that a slow minute of this shared machine does not bias one model.

The blocks check (`--check-atoms`, default 3,000): forces of our edge blocks against the whole graph at
once (both float32, eager), and of both against float64 — the blocks must agree with the whole graph to
float32 round-off.

Results in `<out-dir>/scaling/`: `scaling_<dtype>.json`, `scaling_<dtype>.md` (tables) and
`scaling_<dtype>.png` (time and memory per atom against atoms, out-of-memory points marked).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from accuracy import _git_commit, env_python, machine_info, write_atomically  # noqa: E402

DEFAULT_ATOMS = (100, 300, 1000, 3000, 10_000, 30_000, 100_000)
DEFAULT_MODELS = (
    "so3krates-aoti",
    "so3krates-aoti-blocks",
    "so3krates-aoti-no-blocks",
    "so3krates-torch",
    "mace-small",
)
#: Sizes from which a call takes long enough that one warm-up call and two timed ones suffice.
LARGE_ATOMS = 30_000
#: Messages of a process that ran out of (its limit of) memory.
OUT_OF_MEMORY = (
    "can't allocate memory",
    "cannot allocate memory",
    "memoryerror",
    "bad_alloc",
    "out of memory",
)


def molecules_for(n_atoms: int) -> int:
    return max(1, round(n_atoms / 3))


def _limit_memory(limit_bytes: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    return apply


def run_one(model: str, structure: Path, n_atoms: int, args: argparse.Namespace, work: Path) -> dict:
    """One process of ``model`` on ``structure``: its result, or {"error": ..., "out_of_memory": bool}."""
    from speed import MODELS, PEERS

    env_name, runner, flags, _, _ = MODELS[model]
    python = str(env_python(env_name)) if env_name else sys.executable
    if not Path(python).exists():
        return {"error": "environment missing (python benchmarks/speed.py --setup)", "out_of_memory": False}
    large = n_atoms >= LARGE_ATOMS
    out = work / f"{model}_{structure.stem}.json"
    out.unlink(missing_ok=True)
    command = [
        "flock", args.lock, python, runner, "--structure", str(structure), "--threads", str(args.threads),
        "--dtype", args.dtype, "--budget-seconds", str(args.budget_seconds), "--md-steps", "0",
        "--out", str(out), "--no-calculator-check", "--warmup-calls", "1" if large else "2",
        "--min-repeats", "2" if large else "3", *flags,
    ]  # fmt: skip
    if model.startswith("so3krates") and model != "so3krates-torch":
        command.append("--no-flops")
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), OMP_WAIT_POLICY="PASSIVE"
    )
    log = work / f"{model}_{structure.stem}.log"
    start = time.perf_counter()
    try:
        with open(log, "w") as handle:
            status = subprocess.run(
                command,
                cwd=PEERS,
                env=env,
                stdout=handle,
                stderr=subprocess.STDOUT,
                timeout=args.case_timeout,
                preexec_fn=_limit_memory(int(args.memory_limit_gb * 2**30)),
            ).returncode
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {args.case_timeout:.0f} s", "out_of_memory": False}
    wall = time.perf_counter() - start
    if status != 0 or not out.is_file():
        text = log.read_text(errors="replace")
        lines = [line for line in text.strip().splitlines() if line.strip()] or ["(no output)"]
        # The line that says why: the first one naming a lack of memory (a C++ traceback ends with frames).
        marked = [line for line in lines if any(marker in line.lower() for marker in OUT_OF_MEMORY)]
        return {"error": (marked or lines[-1:])[0][:300], "out_of_memory": bool(marked), "wall_s": wall}
    result = json.loads(out.read_text())
    times = np.array(result["ef_times_s"])
    result["ef_s_median"] = float(np.median(times))
    result["us_per_atom"] = 1e6 * result["ef_s_median"] / n_atoms
    result["kb_per_atom"] = 1024 * result["peak_rss_mb"] / n_atoms
    result["wall_s"] = wall
    return result


def check_blocks(structure: Path, out: Path) -> None:
    """In the project environment: forces of edge blocks (eager, and compiled with the spline as the planner
    runs them under ``aoti``) vs the whole graph (float32) and vs float64."""
    import ase.io
    import torch

    from so3krates import atoms_to_graph
    from so3krates.model.config import preset
    from so3krates.model.so3krates import So3krates
    from so3krates.runtime import ForceField, Planner

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    atoms = ase.io.read(structure)
    torch.manual_seed(0)
    model = So3krates(preset("paper")).eval().requires_grad_(False)
    graph = atoms_to_graph(atoms, model.cutoff, pairs=True)
    results = {}
    for name, dtype, planner, compile in (
        ("blocks float32", torch.float32, Planner(blocks_min_edges=1), "none"),
        ("compiled blocks float32", torch.float32, Planner(blocks_min_edges=1), "aoti"),
        ("whole float32", torch.float32, Planner(blocks_min_edges=0), "none"),
        ("blocks float64", torch.float64, Planner(blocks_min_edges=1), "none"),
        ("whole float64", torch.float64, Planner(blocks_min_edges=0), "none"),
    ):
        force_field = ForceField(model.to(dtype), compile=compile, frozen=True, planner=planner)
        plan = force_field.plan(graph)
        out_ = force_field(graph)
        results[name] = {
            "plan": plan.describe(),
            "energy": float(out_["energy"].detach()[0]),
            "forces": out_["forces"].detach().double(),
        }
        del force_field, out_
    reference = results["whole float64"]["forces"]

    def largest(a: str, b: str) -> float:
        return float((results[a]["forces"] - results[b]["forces"]).abs().max())

    summary = {
        "n_atoms": len(atoms),
        "n_edges": graph.n_edges,
        "plans": {name: entry["plan"] for name, entry in results.items()},
        "max_abs_force_eV_A": float(reference.abs().max()),
        "blocks32_vs_whole32": largest("blocks float32", "whole float32"),
        "whole32_vs_whole64": largest("whole float32", "whole float64"),
        "blocks32_vs_whole64": largest("blocks float32", "whole float64"),
        "compiled_blocks32_vs_whole32": largest("compiled blocks float32", "whole float32"),
        "compiled_blocks32_vs_whole64": largest("compiled blocks float32", "whole float64"),
        "blocks64_vs_whole64": largest("blocks float64", "whole float64"),
        "energy_blocks32_minus_whole32_eV": results["blocks float32"]["energy"]
        - results["whole float32"]["energy"],
    }
    out.write_text(json.dumps(summary, indent=1))


def markdown(results: dict) -> str:
    models = results["models"]
    lines = [
        f"# Scaling: energy + forces of water boxes, {results['dtype']}, {results['threads']} threads",
        "",
        f"{results['date']}, commit {results['commit']}, {results['machine'].get('cpu', '')}, "
        f"OMP_WAIT_POLICY=PASSIVE; `python benchmarks/speed.py --scaling` reproduces it. One process per "
        f"model and size, each under a {results['memory_limit_gb']:.0f} GB address-space limit "
        "(`RLIMIT_AS`); medians of the timed calls (at least 3, 2 from 30,000 atoms). Peak memory is the "
        "whole process's resident peak (`ru_maxrss`), the interpreter and libraries included.",
        "",
        "Models: " + "; ".join(f"**{m}** — {results['descriptions'][m]}" for m in models) + ".",
        "",
        "## Time per atom, µs (in brackets: seconds per call)",
        "",
        "| atoms | edges | " + " | ".join(models) + " |",
        "|---|---|" + "---|" * len(models),
    ]

    def cell(entry: dict | None, key: str) -> str:
        if entry is None:
            return "—"
        if "error" in entry:
            return "out of memory" if entry.get("out_of_memory") else "failed"
        if key == "time":
            return f"{entry['us_per_atom']:.0f} ({entry['ef_s_median']:.3g} s)"
        return f"{entry['kb_per_atom']:.0f} ({entry['peak_rss_mb'] / 1024:.2f} GB)"

    sizes = results["sizes"]
    for size in sizes:
        row = [f"{size['n_atoms']:,}", f"{size['n_edges']:,}"]
        row += [cell(size["models"].get(m), "time") for m in models]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "## Peak memory per atom, KB (in brackets: the process's peak)",
        "",
        "| atoms | " + " | ".join(models) + " |",
        "|---|" + "---|" * len(models),
    ]
    for size in sizes:
        row = [f"{size['n_atoms']:,}"] + [cell(size["models"].get(m), "memory") for m in models]
        lines.append("| " + " | ".join(row) + " |")
    plans = {
        m: sorted({size["models"][m]["plan"] for size in sizes if "plan" in size["models"].get(m, {})})
        for m in models
    }
    lines += ["", "Plans of our runs: " + "; ".join(f"{m}: {', '.join(p)}" for m, p in plans.items() if p)]
    failures = [
        f"{m} at {size['n_atoms']:,} atoms: {size['models'][m]['error']}"
        for size in sizes
        for m in models
        if "error" in size["models"].get(m, {})
    ]
    if failures:
        lines += ["", "Not measured:", ""] + [f"- {text}" for text in failures]
    check = results.get("blocks_check")
    if check:
        lines += [
            "",
            f"## Edge blocks against the whole graph ({check['n_atoms']:,} atoms, "
            f"{check['n_edges']:,} edges)",
            "",
            "Largest force difference, eV/Å (largest force component "
            f"{check['max_abs_force_eV_A']:.3g} eV/Å):",
            "",
            f"- blocks float32 vs whole graph float32: {check['blocks32_vs_whole32']:.2e}",
            f"- whole graph float32 vs float64 (float32 round-off): {check['whole32_vs_whole64']:.2e}",
            f"- blocks float32 vs whole graph float64: {check['blocks32_vs_whole64']:.2e}",
            f"- blocks float64 vs whole graph float64: {check['blocks64_vs_whole64']:.2e}",
        ]
        if "compiled_blocks32_vs_whole32" in check:  # runs from before compiled blocks lack it
            lines += [
                "- compiled blocks (spline) float32 vs whole graph float32: "
                f"{check['compiled_blocks32_vs_whole32']:.2e}, vs float64: "
                f"{check['compiled_blocks32_vs_whole64']:.2e}",
            ]
    return "\n".join(lines) + "\n"


def figure(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for model in results["models"]:
        atoms, times, memory, failed = [], [], [], None
        for size in results["sizes"]:
            entry = size["models"].get(model)
            if entry is None:
                continue
            if "error" in entry:
                failed = (size["n_atoms"], entry.get("out_of_memory"))
                break
            atoms.append(size["n_atoms"])
            times.append(entry["us_per_atom"])
            memory.append(entry["kb_per_atom"])
        (line,) = axes[0].plot(atoms, times, "o-", label=model)
        axes[1].plot(atoms, memory, "o-", color=line.get_color(), label=model)
        if failed is not None and atoms:
            label = "out of memory" if failed[1] else "failed"
            for axis, values in ((axes[0], times), (axes[1], memory)):
                axis.plot([failed[0]], [values[-1]], "x", color=line.get_color(), markersize=11, mew=2.5)
                axis.annotate(
                    label, (failed[0], values[-1]), textcoords="offset points", xytext=(4, 6), fontsize=8
                )
    axes[0].set_ylabel("energy + forces, µs per atom")
    axes[1].set_ylabel("peak resident memory, KB per atom")
    for axis in axes:
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("atoms (water, 1 g/cm³)")
        axis.grid(alpha=0.3, which="both")
    axes[1].axhline(150, color="grey", ls="--", lw=1)
    axes[1].annotate("150 KB/atom", (results["sizes"][0]["n_atoms"], 150), fontsize=8, xytext=(2, 3),
                     textcoords="offset points")  # fmt: skip
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"Scaling on {results['machine'].get('cpu', 'this machine')}, {results['threads']} threads, "
        f"{results['dtype']}; × = the first size that did not fit in {results['memory_limit_gb']:.0f} GB",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    import ase.io
    from speed import MODELS, count_edges, water_box

    models = [m.strip() for m in (args.models or ",".join(DEFAULT_MODELS)).split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        print(f"speed.py --scaling: unknown models {unknown}; models: {list(MODELS)}")
        return 2
    try:
        sizes = [int(n) for n in args.scaling_atoms.split(",")]
    except ValueError:
        print(
            "speed.py --scaling: --scaling-atoms takes numbers of atoms, e.g. 100,1000, "
            f"not {args.scaling_atoms!r}"
        )
        return 2
    if min(sizes) < 3 or args.memory_limit_gb <= 0:
        print("speed.py --scaling: sizes of at least 3 atoms and a positive --memory-limit-gb, please")
        return 2
    work = args.work_dir.resolve() / "scaling" / args.dtype
    work.mkdir(parents=True, exist_ok=True)
    out_dir = args.out_dir / "scaling"
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "commit": _git_commit(),
        "machine": machine_info(),
        "threads": args.threads,
        "dtype": args.dtype,
        "memory_limit_gb": args.memory_limit_gb,
        "models": models,
        "descriptions": {m: MODELS[m][3] for m in models},
        "sizes": [],
    }
    if args.check_atoms:
        structure = work / f"water-{args.check_atoms}.extxyz"
        ase.io.write(structure, water_box(molecules_for(args.check_atoms)), format="extxyz")
        check_out = work / "blocks_check.json"
        subprocess.run(
            ["flock", args.lock, sys.executable, __file__, "--check-blocks", str(structure), str(check_out)],
            check=True,
            env={**os.environ, "OMP_NUM_THREADS": str(args.threads), "OMP_WAIT_POLICY": "PASSIVE"},
        )
        results["blocks_check"] = json.loads(check_out.read_text())
        print(f"blocks check: {results['blocks_check']}")
    stopped: dict[str, str] = {}
    for n_atoms in sizes:
        atoms = water_box(molecules_for(n_atoms))
        structure = work / f"water-{len(atoms)}.extxyz"
        ase.io.write(structure, atoms, format="extxyz")
        size = {"n_atoms": len(atoms), "n_edges": count_edges(structure), "models": {}}
        results["sizes"].append(size)
        print(f"{len(atoms)} atoms, {size['n_edges']} edges")
        for model in models:
            if model in stopped:
                continue
            entry = run_one(model, structure, len(atoms), args, work)
            size["models"][model] = entry
            if "error" in entry:
                stopped[model] = entry["error"]
                what = "out of memory" if entry["out_of_memory"] else "failed"
                print(f"  {model}: {what}: {entry['error']}")
            else:
                print(
                    f"  {model}: {entry['ef_s_median']:.3g} s per call, {entry['us_per_atom']:.0f} µs/atom, "
                    f"peak {entry['peak_rss_mb']:.0f} MB ({entry['kb_per_atom']:.0f} KB/atom)"
                    + (f", plan {entry['plan']}" if "plan" in entry else "")
                )
            # Saved after every case: a run of an hour keeps what it measured if it is stopped.
            write_atomically(out_dir / f"scaling_{args.dtype}.json", json.dumps(results, indent=1))
    write_atomically(out_dir / f"scaling_{args.dtype}.md", markdown(results))
    figure(results, out_dir / f"scaling_{args.dtype}.png")
    print(f"results: {out_dir}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--check-blocks":
        check_blocks(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        raise SystemExit("run through: python benchmarks/speed.py --scaling")
