"""Speed side by side: energy+forces time, MD steps per second and peak memory, ours next to the peers.

    python benchmarks/speed.py --setup                  # peer environments in benchmarks/.envs/ (once)
    python benchmarks/speed.py [--models so3krates,so3krates-torch,mace-small,mace-large] [--threads 2]
                               [--dtype float32] [--systems ethanol,aspirin,...] [--budget-seconds 15]
                               [--repeats 3] [--baseline REV]

`--scaling` runs the scaling mode instead (`scaling.py`: water boxes of 100–100,000 atoms, time and peak
memory per atom, the point where each model runs out of memory).

`--baseline REV` measures our models also as they were at git revision REV (a worktree under
`benchmarks/runs/`, imported through PYTHONPATH, with that revision's own runner): model `NAME@REV` next to
`NAME`. With `--repeats N` every (system, model) pair runs N times, the models alternating process by
process, so that a slow minute of a shared machine hits all of them; a case's median is the median of the
per-process medians, and the report gives the before/after ratio of each system.

Systems (`build_systems`): ethanol (9 atoms), aspirin (21, rMD17), alanine dipeptide (22), 3BPA (27),
periodic water boxes of about 100, 400, 1000 and 3000 atoms (molecules on a lattice at 1 g/cm³, random
orientations, seed 0), and the 192-atom DeePMD water box of `../shared/data/periodic`. Molecules without
their shared data file are skipped with a message.

Every (model, system) pair is one process in that model's environment (`benchmarks/peers/speed_*.py`,
protocol in `speed_protocol.py`), one after another under `flock /tmp/so3krates-cpu.lock`, with
OMP_NUM_THREADS = --threads and OMP_WAIT_POLICY=PASSIVE; with `--peer-threads best` (the default) every
peer also runs on one thread, and the faster of its two thread counts enters the table (marked where it is
not --threads): ours run small graphs on one thread by themselves, and so3krates-torch's molecules took 2–3×
longer on two threads than on one on this VM (4 December). In the same run this script measures the
machine's dense matrix-product throughput (2048² float32 and float64, same threads) for the roofline:
our model's matrix-product FLOPs per energy+forces call (counted by torch) over its median wall time, as a
fraction of that throughput.

Results: `<out-dir>/speed_<dtype>.json` (machine, date, commit, every measurement), `speed_<dtype>.md` (tables
with ratios to ours) and `speed_<dtype>_roofline.png`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from accuracy import (  # noqa: E402  (the helpers of the accuracy benchmark, one folder)
    LOCK,
    ROOT,
    _git_commit,
    env_python,
    machine_info,
    setup_env,
    write_atomically,
)

SHARED = ROOT.parent / "shared" / "data"
PEERS = BENCH / "peers"
MODELS = {
    # name: (environment or None for the project's, runner, extra flags, description, largest system)
    "so3krates": (
        None,
        "speed_so3krates.py",
        [],
        "ours, paper preset: F=132, 3 layers, l=1-3, r_c 5 Å",
        None,
    ),
    "so3krates-compiled": (
        None,
        "speed_so3krates.py",
        ["--compile"],
        "ours, paper preset, torch.compile (compilation not timed)",
        400,  # about a minute of compilation per process
    ),
    "so3krates-aoti": (
        None,
        "speed_so3krates.py",
        ["--compile", "aoti"],
        "ours, paper preset, forward+backward compiled ahead of time by AOTInductor (compilation not timed)",
        1000,
    ),
    "so3krates-aoti-network": (
        None,
        "speed_so3krates.py",
        ["--compile", "aoti", "--no-spline"],
        "ours, AOTInductor, radial filters evaluated instead of read from their spline",
        1000,
    ),
    "so3krates-aoti-unpaired": (
        None,
        "speed_so3krates.py",
        ["--compile", "aoti", "--no-pairs"],
        "ours, AOTInductor, plain neighbour list (filters once per edge instead of once per pair)",
        1000,
    ),
    "so3krates-aoti-no-blocks": (
        None,
        "speed_so3krates.py",
        ["--compile", "aoti", "--no-blocks"],
        "ours, AOTInductor, the whole graph at once at every size (no edge blocks)",
        None,
    ),
    "so3krates-aoti-blocks": (
        None,
        "speed_so3krates.py",
        ["--compile", "aoti", "--blocks"],
        "ours, edge blocks at every size, each block's messages compiled by inductor",
        None,
    ),
    "so3krates-aoti-all-threads": (
        None,
        "speed_so3krates.py",
        ["--compile", "aoti", "--all-threads"],
        "ours, AOTInductor, every graph on all threads (no single-thread evaluation of small graphs)",
        400,
    ),
    "so3krates-torch": (
        "so3krates-torch",
        "speed_so3krates_torch.py",
        [],
        "so3krates-torch 0.2.1, the same hyper-parameters",
        None,
    ),
    # Issue 17: the pretrained SO3LR, ours (converted) against the package that ships the weights. Not in the
    # default set (ask for them with --models so3lr,so3lr-torch); ratios in the report are to "so3lr".
    "so3lr": (
        None,
        "speed_so3lr.py",
        [],
        "ours, pretrained SO3LR converted from so3krates-torch (F=128, l=1-4, r_c 4.5 Å, r_lr 12 Å), eager",
        None,
    ),
    "so3lr-torch": (
        "so3krates-torch",
        "speed_so3lr_torch.py",
        [],
        "so3krates-torch 0.2.1 SO3LRCalculator's model (the same weights)",
        None,
    ),
    "mace-small": (
        "mace-torch",
        "speed_mace.py",
        ["--num-channels", "64", "--max-L", "1"],
        "MACE 64 channels, L=1, 2 layers, ν=3, r_c 5 Å (about our accuracy on rMD17 ethanol)",
        None,
    ),
    "mace-large": (
        "mace-torch",
        "speed_mace.py",
        ["--num-channels", "256", "--max-L", "2"],
        "MACE rMD17 paper settings: 256 channels, L=2, 2 layers, ν=3, r_c 5 Å",
        400,  # seconds per call beyond: 3 warm-up and 3 timed calls would take an hour at 3000 atoms
    ),
}
DEFAULT_MODELS = [
    "so3krates",
    "so3krates-compiled",
    "so3krates-aoti",
    "so3krates-torch",
    "mace-small",
    "mace-large",
]
#: Flags of our runner as it was before the execution layer (issue 19), for --baseline runs of older
#: revisions: the same variant under its old flag names.
BASELINE_FLAGS = {"so3krates-aoti-network": ["--compile", "aoti", "--no-table"]}
WATER_BOXES = {"water-100": 33, "water-400": 133, "water-1000": 333, "water-3000": 1000}
SYSTEMS = ["ethanol", "aspirin", "ala-dipeptide", "3bpa", *WATER_BOXES, "water-192-deepmd"]
MD_MAX_ATOMS = 400  # MD timing for systems up to this size (larger ones: energy+forces only)


# ------------------------------------------------------------------------------------------- systems


def water_box(n_molecules: int, seed: int = 0):
    """`n_molecules` water molecules on a cubic lattice in a periodic cube at 1 g/cm³, random orientations."""
    from ase import Atoms
    from ase.build import molecule
    from scipy.spatial.transform import Rotation

    volume = n_molecules * 18.015 / 0.60221  # Å³: M / (ρ N_A) with ρ = 1 g/cm³
    length = volume ** (1.0 / 3.0)
    per_side = math.ceil(n_molecules ** (1.0 / 3.0))
    spacing = length / per_side
    rng = np.random.default_rng(seed)
    water = molecule("H2O")
    water.positions -= water.get_center_of_mass()
    sites = np.array([(i, j, k) for i in range(per_side) for j in range(per_side) for k in range(per_side)])
    box = Atoms(cell=[length] * 3, pbc=True)
    for site in sites[:n_molecules]:
        rotation = Rotation.random(random_state=rng).as_matrix()
        box += Atoms(water.numbers, positions=water.positions @ rotation.T + (site + 0.5) * spacing)
    return box


def water_case(n_molecules: int, threads: int):
    """`water_box(n_molecules)`, the paper preset with random weights (seed 0, float32, frozen as `load_model`
    gives it) and the box's graph in pair order, with torch on `threads` threads and freed memory kept (as
    the calculator does): the set-up of the one-process comparisons (`block_size.py`, `aoti_layers.py`)."""
    import torch

    from so3krates import atoms_to_graph
    from so3krates.memory import keep_freed_memory
    from so3krates.model.config import preset
    from so3krates.model.so3krates import So3krates

    torch.set_num_threads(threads)
    keep_freed_memory()
    atoms = water_box(n_molecules)
    torch.manual_seed(0)
    model = So3krates(preset("paper")).float().eval().requires_grad_(False)
    return atoms, model, atoms_to_graph(atoms, model.cutoff, pairs=True)


def water_atoms(name: str) -> int:
    """N for a system named ``water-N`` (a random box of N // 3 water molecules), else 0."""
    size = name[len("water-") :] if name.startswith("water-") else ""
    return int(size) if size.isdigit() and int(size) >= 3 else 0


def build_systems(names: list[str], directory: Path) -> dict[str, Path]:
    """Writes each system to `directory/<name>.extxyz`; returns name → path (missing data: skipped)."""
    import ase.io
    from ase import Atoms
    from ase.build import molecule

    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in names:
        atoms = None
        if name == "ethanol":
            atoms = molecule("CH3CH2OH")
        elif name == "aspirin" and (SHARED / "rmd17/rmd17_aspirin_test_01.npz").is_file():
            data = np.load(SHARED / "rmd17/rmd17_aspirin_test_01.npz")
            atoms = Atoms(data["nuclear_charges"], positions=data["coords"][0])
        elif (
            name == "ala-dipeptide"
            and (SHARED / "generated/ala_dipeptide_gfn2xtb_500K_2000.extxyz").is_file()
        ):
            atoms = ase.io.read(SHARED / "generated/ala_dipeptide_gfn2xtb_500K_2000.extxyz", index=0)
        elif name == "3bpa" and (SHARED / "botnet_3bpa/train_300K.xyz").is_file():
            atoms = ase.io.read(SHARED / "botnet_3bpa/train_300K.xyz", index=0)
        elif name in WATER_BOXES:
            atoms = water_box(WATER_BOXES[name])
        elif water_atoms(name):
            atoms = water_box(water_atoms(name) // 3)
        elif name == "water-192-deepmd" and (SHARED / "periodic/deepmd_water_64H2O_400.extxyz").is_file():
            atoms = ase.io.read(SHARED / "periodic/deepmd_water_64H2O_400.extxyz", index=0)
        if atoms is None:
            print(f"{name}: skipped, its data file is not in {SHARED}")
            continue
        clean = Atoms(atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        paths[name] = directory / f"{name}.extxyz"
        ase.io.write(paths[name], clean, format="extxyz")
    return paths


# ------------------------------------------------------------------------------------------- measure


def matmul_throughput(threads: int, size: int = 2048, repeats: int = 5) -> dict[str, float]:
    """Median GFLOP/s of a dense size² product per dtype, on `threads` threads (the roofline's ceiling)."""
    import torch

    torch.set_num_threads(threads)
    out = {}
    for dtype in (torch.float32, torch.float64):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        out[str(dtype).split(".")[1]] = 2 * size**3 / float(np.median(times)) / 1e9
    return out


def baseline_worktree(revision: str) -> tuple[str, Path]:
    """(short commit, folder) of a git worktree of ``revision`` under benchmarks/runs/, made once."""
    found = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "--verify", f"{revision}^{{commit}}"],
        capture_output=True,
        text=True,
    )
    if found.returncode != 0:
        raise SystemExit(f"speed.py: --baseline {revision!r} is not a commit of this repository")
    commit = found.stdout.strip()
    folder = BENCH / "runs" / f"baseline-{commit}"
    if not folder.is_dir():
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(folder), commit], check=True
        )
    return commit, folder


def run_case(
    model: str,
    structure: Path,
    args: argparse.Namespace,
    work: Path,
    baseline: Path | None = None,
    threads: int | None = None,
) -> dict | None:
    """One process of ``model`` on ``structure`` on ``threads`` threads (default ``--threads``); with
    ``baseline``, that worktree's package and runner."""
    threads = threads or args.threads
    name = model
    model = model.split("@")[0]
    env_name, runner, flags, _, max_atoms = MODELS[model]
    python = str(env_python(env_name)) if env_name else sys.executable
    if not Path(python).exists():
        print(f"  {model}: environment missing, run `python benchmarks/speed.py --setup`")
        return None
    n_atoms = int(structure.read_text().split()[0])
    if max_atoms is not None and n_atoms > max_atoms:
        print(f"  {model}: skipped above {max_atoms} atoms")
        return {"error": f"not run above {max_atoms} atoms"}
    tag = "" if threads == args.threads else f"_{threads}t"
    out = work / f"{name}_{structure.stem}{tag}.json"
    command = [
        "flock", args.lock, python, runner, "--structure", str(structure), "--threads", str(threads),
        "--dtype", args.dtype, "--budget-seconds", str(args.budget_seconds),
        "--md-steps", str(args.md_steps if n_atoms <= MD_MAX_ATOMS else 0), "--out", str(out), *flags,
    ]  # fmt: skip
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE")
    peers = PEERS
    if baseline is not None:  # the old package first on the path, and the old runner with its flags
        env["PYTHONPATH"] = str(baseline / "src")
        peers = baseline / "benchmarks" / "peers"
        flags = BASELINE_FLAGS.get(model, flags)
        command = [*command[: command.index(str(out)) + 1], *flags]
    log = work / f"{name}_{structure.stem}{tag}.log"
    start = time.perf_counter()
    try:
        with open(log, "w") as handle:
            status = subprocess.run(
                command,
                cwd=peers,
                env=env,
                stdout=handle,
                stderr=subprocess.STDOUT,
                timeout=args.case_timeout,
            ).returncode
    except subprocess.TimeoutExpired:
        print(f"  {model}: no result within {args.case_timeout:.0f} s (log {log})")
        return {"error": f"timeout after {args.case_timeout:.0f} s"}
    if status != 0 or not out.is_file():
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        print(f"  {model}: failed (exit {status}): {tail[0]} (log {log})")
        return {"error": tail[0]}
    result = json.loads(out.read_text())
    times = np.array(result["ef_times_s"]) * 1e3
    result["ef_ms"] = {
        "median": float(np.median(times)),
        "q25": float(np.percentile(times, 25)),
        "q75": float(np.percentile(times, 75)),
        "n": len(times),
    }
    md = result.get("md_step_times_s") or []
    result["md_steps_per_s"] = float(1.0 / np.median(md)) if md else None
    result["threads"] = threads
    print(
        f"  {name}{f' (on {threads} thread' + 's' * (threads > 1) + ')' if tag else ''}: "
        f"E+F {result['ef_ms']['median']:.2f} ms, "
        + (f"MD {result['md_steps_per_s']:.0f} steps/s, " if md else "")
        + f"peak {result['peak_rss_mb']:.0f} MB ({time.perf_counter() - start:.0f} s)"
    )
    return result


def combine_runs(runs: list[dict]) -> dict:
    """One case's result from several processes: the last run's details, the medians of all runs."""
    timed = [run for run in runs if "ef_ms" in run]
    if not timed:
        return runs[-1]
    combined = dict(timed[-1])
    medians = [run["ef_ms"]["median"] for run in timed]
    combined["ef_ms"] = {**timed[-1]["ef_ms"], "median": float(np.median(medians)), "runs": medians}
    md = [run["md_steps_per_s"] for run in timed if run.get("md_steps_per_s")]
    combined["md_steps_per_s"] = float(np.median(md)) if md else None
    combined["md_steps_per_s_runs"] = md
    combined["peak_rss_mb"] = float(np.median([run["peak_rss_mb"] for run in timed]))
    return combined


def is_peer(model: str) -> bool:
    """A model of another package (its own environment), as opposed to one of ours."""
    return MODELS[model.split("@")[0]][0] is not None


def faster_thread_count(by_threads: dict[int, dict]) -> dict:
    """Of one peer's combined results per thread count, the faster one (median E+F), with the others'
    medians kept in ``ef_ms_by_threads``."""
    timed = {t: r for t, r in by_threads.items() if "ef_ms" in r}
    if not timed:
        return next(iter(by_threads.values()))
    best = min(timed, key=lambda t: timed[t]["ef_ms"]["median"])
    return {**timed[best], "ef_ms_by_threads": {str(t): r["ef_ms"]["median"] for t, r in timed.items()}}


def count_edges(path: Path, cutoff: float = 5.0) -> int:
    import ase.io

    from so3krates.data.neighbors import neighbor_list

    atoms = ase.io.read(path)
    return len(neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, cutoff).idx_i)


# -------------------------------------------------------------------------------------------- report


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def markdown(results: dict) -> str:
    models = [m for m in results["models"] if any(m in case for case in results["cases"].values())]
    # The ratios' reference: our eager model, or the first of our variants in the run.
    candidates = [m for m in models if m.startswith("so3krates") and m != "so3krates-torch" and "@" not in m]
    ours = "so3krates" if "so3krates" in models else (candidates[0] if candidates else "so3krates")
    if "so3lr" in models and "so3krates" not in models:
        ours = "so3lr"
    lines = [
        f"# Speed: energy + forces and MD on {results['machine']['cpu']}",
        "",
        f"{results['date']}, commit {results['commit']}, {results['threads']} threads, {results['dtype']}, "
        f"torch {results['machine']['torch']}, OMP_WAIT_POLICY=PASSIVE. One process per model and system; "
        "medians after 3 warm-up calls; `python benchmarks/speed.py` reproduces it.",
        "",
        "Models: " + "; ".join(f"**{m}** — {MODELS[m.split('@')[0]][3]}" for m in models) + ".",
        "",
        f"## Energy + forces, ms per call (median; in brackets: the time / that of {ours})",
        "",
        *(
            [
                "Peers at their faster thread count (`--peer-threads best`): each ran on "
                f"{results['threads']} threads and on 1; a cell says where 1 was faster. Both medians are in "
                "the JSON (`ef_ms_by_threads`).",
                "",
            ]
            if results.get("peer_threads") == "best" and results["threads"] > 1
            else []
        ),
        "| system | atoms | edges | " + " | ".join(models) + " | µs per edge (ours) |",
        "|---" * (len(models) + 4) + "|",
    ]
    for name, case in results["cases"].items():
        base = case.get(ours, {}).get("ef_ms", {}).get("median")
        cells = []
        for model in models:
            entry = case.get(model) or {}
            if "ef_ms" not in entry:
                cells.append(entry.get("error", "—")[:40] if entry else "—")
                continue
            value = entry["ef_ms"]["median"]
            ratio = f" ({value / base:.1f}×)" if base and model != ours else ""
            threads = entry.get("threads", results["threads"])
            on = f", {threads} thread{'s' * (threads > 1)}" if threads != results["threads"] else ""
            cells.append(f"{value:.2f}{ratio}{on}")
        per_edge = 1e3 * base / case["n_edges"] if base and case["n_edges"] else None
        lines.append(
            f"| {name} | {case['n_atoms']} | {case['n_edges']} | "
            + " | ".join(cells)
            + f" | {_fmt(per_edge)} |"
        )
    lines += [
        "",
        "## MD through each package's ASE calculator (velocity Verlet, 0.5 fs), steps per second",
        "",
        "| system | " + " | ".join(models) + " |",
        "|---" * (len(models) + 1) + "|",
    ]
    for name, case in results["cases"].items():
        cells = [_fmt((case.get(m) or {}).get("md_steps_per_s"), 0) for m in models]
        if any(c != "—" for c in cells):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Peak memory of the process, MB", "", "| system | " + " | ".join(models) + " |"]
    lines.append("|---" * (len(models) + 1) + "|")
    for name, case in results["cases"].items():
        lines.append(
            f"| {name} | "
            + " | ".join(_fmt((case.get(m) or {}).get("peak_rss_mb"), 0) for m in models)
            + " |"
        )
    lines += before_and_after(results)
    peak = results["matmul_gflops"][results["dtype"]]
    lines += [
        "",
        f"## Roofline (ours): the machine's matrix-product throughput is {peak:.0f} GFLOP/s "
        f"({results['dtype']}, {results['threads']} threads, 2048² product)",
        "",
        "Two fractions per model. *Network*: the matrix-product FLOPs of the network evaluated edge by edge "
        "(forward and backward) over the wall time, i.e. the throughput of a plain implementation that "
        "would be as fast. *Executed*: the FLOPs the run actually executed (`flops_executed_per_ef` in the "
        "JSON) over the wall time; fewer, because pairs evaluate the filters once per pair of atoms "
        "and the fused path reads them from a spline. The second says how close the machine is to its "
        "limit.",
        "",
        "| system | atoms | model | GFLOP network | GFLOP executed | ms | network % | executed % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, case in results["cases"].items():
        for model in models:
            entry = case.get(model) or {}
            if not model.startswith("so3krates") or model == "so3krates-torch" or "flops_per_ef" not in entry:
                continue
            seconds = entry["ef_ms"]["median"] * 1e-3
            network = entry["flops_per_ef"] / 1e9
            executed = entry.get("flops_executed_per_ef", entry["flops_per_ef"]) / 1e9
            lines.append(
                f"| {name} | {case['n_atoms']} | {model} | {network:.3f} | {executed:.3f} | "
                f"{1e3 * seconds:.1f} | {100 * network / seconds / peak:.0f} % | "
                f"{100 * executed / seconds / peak:.0f} % |"
            )
    return "\n".join(lines) + "\n"


def before_and_after(results: dict) -> list[str]:
    """The table of a --baseline run: each of our models now against the same model at the baseline."""
    commit = results.get("baseline")
    if not commit:
        return []
    lines = [
        "",
        f"## Before and after: this commit against {commit} (medians of {results.get('repeats', 1)} "
        "processes each, alternating)",
        "",
        "| system | model | before, ms | after, ms | after / before | per-process medians before; after |",
        "|---|---|---|---|---|---|",
    ]
    for name, case in results["cases"].items():
        for model in results["models"]:
            before, after = case.get(f"{model}@{commit}") or {}, case.get(model) or {}
            if "@" in model or "ef_ms" not in before or "ef_ms" not in after:
                continue
            b, a = before["ef_ms"], after["ef_ms"]
            runs = ", ".join(f"{t:.2f}" for t in b.get("runs", [b["median"]]))
            runs += "; " + ", ".join(f"{t:.2f}" for t in a.get("runs", [a["median"]]))
            lines.append(
                f"| {name} | {model} | {b['median']:.2f} | {a['median']:.2f} | "
                f"{a['median'] / b['median']:.3f} | {runs} |"
            )
    return lines


def roofline_figure(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peak = results["matmul_gflops"][results["dtype"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for model in results["models"]:
        points = [
            (case["n_atoms"], case[model]["ef_ms"]["median"])
            for case in results["cases"].values()
            if "ef_ms" in (case.get(model) or {})
        ]
        if points:
            points.sort()
            left.loglog(*zip(*points, strict=True), "o-", label=model)
        if model == "so3krates":
            achieved = sorted(
                (
                    case["n_atoms"],
                    100 * case[model]["flops_per_ef"] / (case[model]["ef_ms"]["median"] * 1e-3) / 1e9 / peak,
                )
                for case in results["cases"].values()
                if "flops_per_ef" in (case.get(model) or {})
            )
            right.semilogx(*zip(*achieved, strict=True), "o-", color="C0")
    left.set(xlabel="atoms", ylabel="energy + forces, ms", title="time per call")
    left.legend()
    right.axhline(100, color="grey", lw=0.8)
    right.set(
        xlabel="atoms",
        ylabel="% of dense matmul throughput",
        title=f"ours: matmul FLOPs / time ({peak:.0f} GFLOP/s = 100 %)",
        ylim=(0, 105),
    )
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------- main


def thread_counts(model: str, args: argparse.Namespace) -> list[int]:
    """The thread counts a model runs at: ``--threads``; a peer with ``--peer-threads best`` also on one."""
    if is_peer(model) and args.peer_threads == "best" and args.threads > 1:
        return [args.threads, 1]
    return [args.threads]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", action="store_true", help="create the peer environments and stop")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"of {', '.join(MODELS)}")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"of {', '.join(SYSTEMS)}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--peer-threads",
        choices=["best", "same"],
        default="best",
        help="best: each peer also on one thread, and its faster count is reported (ours choose one thread "
        "for small graphs by themselves); same: every model on --threads",
    )
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--budget-seconds", type=float, default=10.0, help="E+F repeats per case")
    parser.add_argument("--md-steps", type=int, default=100)
    parser.add_argument("--case-timeout", type=float, default=600.0, help="seconds per (model, system)")
    parser.add_argument("--repeats", type=int, default=1, help="processes per (system, model), alternating")
    parser.add_argument("--baseline", help="git revision whose package our models are also measured with")
    parser.add_argument("--lock", default=LOCK, help="lock file that keeps heavy jobs from overlapping")
    parser.add_argument("--out-dir", type=Path, default=BENCH / "results")
    parser.add_argument("--work-dir", type=Path, default=BENCH / "runs" / "speed")
    scaling = parser.add_argument_group("scaling mode (benchmarks/scaling.py)")
    scaling.add_argument("--scaling", action="store_true", help="time and memory per atom, 100–100,000 atoms")
    scaling.add_argument("--scaling-atoms", default="100,300,1000,3000,10000,30000,100000")
    scaling.add_argument("--memory-limit-gb", type=float, default=20.0, help="address-space limit, each")
    scaling.add_argument("--check-atoms", type=int, default=3000, help="blocks vs whole graph here (0: no)")
    args = parser.parse_args(argv)
    if args.scaling and "--models" not in " ".join(argv if argv is not None else sys.argv):
        args.models = None  # the scaling mode's own default set
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.scaling:
        import scaling

        return scaling.main(args)
    if args.setup:
        for env in sorted({entry[0] for entry in MODELS.values() if entry[0]}):
            setup_env(env)
        return 0
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS] + [
        s for s in args.systems.split(",") if s.strip() and s.strip() not in SYSTEMS
    ]
    if unknown:
        print(f"speed.py: unknown model or system {unknown}; models: {list(MODELS)}, systems: {SYSTEMS}")
        return 2
    work = args.work_dir.resolve() / args.dtype  # runners start in peers/: absolute paths
    paths = build_systems([s.strip() for s in args.systems.split(",") if s.strip()], work / "systems")
    results_path = args.out_dir / f"speed_{args.dtype}.json"
    previous = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results = {
        "date": datetime.date.today().isoformat(),
        "commit": _git_commit(),
        "machine": machine_info(),
        "threads": args.threads,
        "peer_threads": args.peer_threads,
        "dtype": args.dtype,
        "matmul_gflops": matmul_throughput(args.threads),
        "models": list(dict.fromkeys([*previous.get("models", []), *models])),
        "cases": previous.get("cases", {}),
    }
    entries, baseline = list(models), None
    if args.baseline:
        commit, baseline = baseline_worktree(args.baseline)
        entries += [f"{m}@{commit}" for m in models if m.startswith("so3krates") and m != "so3krates-torch"]
        results["baseline"] = commit
        results["models"] = list(dict.fromkeys([*results["models"], *entries]))
    results["repeats"] = args.repeats
    print(f"matmul throughput: {results['matmul_gflops']} GFLOP/s")
    for name, path in paths.items():
        case = results["cases"].setdefault(name, {})
        case.update(n_atoms=int(path.read_text().split()[0]), n_edges=count_edges(path))
        print(f"{name}: {case['n_atoms']} atoms, {case['n_edges']} edges within 5 Å")
        runs: dict[tuple[str, int], list[dict]] = {}
        for repeat in range(args.repeats):  # the models alternate, process by process
            if args.repeats > 1:
                print(f" repeat {repeat + 1} of {args.repeats}")
            for entry in entries:
                for threads in thread_counts(entry, args):
                    result = run_case(entry, path, args, work, baseline if "@" in entry else None, threads)
                    if result is not None:
                        runs.setdefault((entry, threads), []).append(result)
        for entry in entries:
            by_threads = {t: combine_runs(r) for (e, t), r in runs.items() if e == entry and r}
            if by_threads:
                case[entry] = faster_thread_count(by_threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(results_path, json.dumps(results, indent=1))
    write_atomically(args.out_dir / f"speed_{args.dtype}.md", markdown(results))
    roofline_figure(results, args.out_dir / f"speed_{args.dtype}_roofline.png")
    print(f"results: {results_path}, {args.out_dir / f'speed_{args.dtype}.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
