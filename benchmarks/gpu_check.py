"""The package on a CUDA GPU: every plan against the CPU reference, compiled programs, and timings.

    python benchmarks/gpu_check.py --out benchmarks/results/gpu [--time-limit-s 420]
        [--sections correctness,compiled,speed,md] [--device cuda]

This machine has no GPU; the script is for the rare session that is lent one, and for users who want to
know what their GPU node gives. Each section writes `gpu_check.json` again when it ends (atomically), so a
run stopped at its time limit keeps what it measured; sections that would start after `--time-limit-s`
are skipped and say so.

- tests: `pytest tests/test_gpu.py` (the plan matrix, the calculator and SO3LR on the GPU against the CPU).
- correctness: every legal inference plan (`legal_plans`, the matrix of `tests/test_plans.py`) × the model
  variants of the test suite × float32 and float64, energies/forces/stress on the GPU against the reference
  path on the CPU (float64 reference); and the physics of the paper preset on the GPU in float64: rotation
  equivariance, finite-difference forces, batch vs single.
- speed: the paper preset (random weights; speed does not depend on them), float32, energy + forces per
  call through `ForceField` on the GPU, eager and inductor: molecules and water boxes of 999 to 99,999
  atoms at 1 g/cm³ (`speed.water_box`); median of the timed calls (CUDA synchronised), peak GPU memory,
  the plan the planner chose; the compiled forces against the eager ones (float32).
- compiled: `ForceField(compile="inductor")` (Triton kernels) on the GPU in float64, whole graph and edge
  blocks (300 water atoms), against eager on the GPU: equal to round-off.
- md: ASE velocity Verlet through `So3kratesCalculator` on the GPU (999 water, float32, 0.5 fs), steps
  per second with the neighbour list (vesin, on the CPU) included.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(BENCH))

from accuracy import write_atomically  # noqa: E402

SECTIONS = ("tests", "correctness", "speed", "compiled", "md")
#: Relative to the force scale (as in tests/test_plans.py, with room for another device's summation order).
TOLERANCE = {("float64", "network"): 1e-9, ("float64", "spline"): 1e-6, ("float32", "network"): 5e-5}
TOLERANCE[("float32", "spline")] = TOLERANCE[("float32", "network")]


def synchronize(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def numpy_outputs(out: dict) -> dict[str, np.ndarray]:
    return {key: value.detach().double().cpu().numpy() for key, value in out.items()}


def relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(got - expected).max() / max(np.abs(expected).max(), 1.0))


# ------------------------------------------------------------------------------------------- sections


def gpu_tests() -> dict:
    import subprocess

    command = [sys.executable, "-m", "pytest", "-q", "tests/test_gpu.py", "-p", "no:cacheprovider"]
    done = subprocess.run([*command, "-o", "addopts="], cwd=ROOT, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    summary = lines[-1] if lines else ""
    return {"command": " ".join(command), "returncode": done.returncode, "summary": summary}


def correctness(device: str) -> dict:
    import torch

    from helpers import (
        PLANS,
        VARIANTS,
        ethanol,
        make_model,
        random_rotation,
        reference_outputs,
        triclinic_cell,
    )
    from so3krates import ForceField, atoms_to_graph, collate
    from so3krates.runtime import EnergyFunction, Evaluator

    structures = [ethanol(0), triclinic_cell()]
    rows, failures = [], []
    for variant, dtype_name, plan in itertools.product(sorted(VARIANTS), ("float64", "float32"), PLANS):
        dtype = getattr(torch, dtype_name)
        model = make_model(VARIANTS[variant], dtype).requires_grad_(False)
        expected = reference_outputs(model, structures)  # on the CPU
        gpu_model = model.to(device)
        evaluator = Evaluator(EnergyFunction(gpu_model, plan, frozen=True, block_edges=16), plan)
        graph = collate([atoms_to_graph(a, model.cutoff, pairs=plan.pairs) for a in structures]).to(device)
        got = numpy_outputs(evaluator(graph, compute_stress=True))
        errors = {key: relative_error(got[key], expected[key]) for key in ("energy", "forces", "stress")}
        tolerance = TOLERANCE[(dtype_name, plan.radial)]
        ok = max(errors["forces"], errors["energy"], errors["stress"] / 10) <= tolerance
        row = {"variant": variant, "dtype": dtype_name, "plan": plan.describe(), **errors, "ok": ok}
        rows.append(row)
        if not ok:
            failures.append(row)
    # Physics of the paper preset on the GPU, float64.
    model = make_model(VARIANTS["paper"], torch.float64).requires_grad_(False).to(device)
    force_field = ForceField(model, frozen=True)

    def evaluate(atoms_list):
        graph = collate([atoms_to_graph(a, model.cutoff, pairs=True) for a in atoms_list]).to(device)
        return numpy_outputs(force_field(graph))

    atoms = ethanol(3)
    base = evaluate([atoms])
    rotation = random_rotation(np.random.default_rng(0))
    rotated = atoms.copy()
    rotated.positions = atoms.positions @ rotation.T
    turned = evaluate([rotated])
    physics = {
        "rotation_energy_rel": float(abs(turned["energy"][0] - base["energy"][0]) / abs(base["energy"][0])),
        "rotation_forces_rel": relative_error(turned["forces"], base["forces"] @ rotation.T),
    }
    step, worst = 1e-4, 0.0
    for atom, axis in [(0, 0), (2, 1), (5, 2), (8, 0)]:
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[atom, axis] += step
        minus.positions[atom, axis] -= step
        numerical = -(evaluate([plus])["energy"][0] - evaluate([minus])["energy"][0]) / (2 * step)
        worst = max(worst, abs(numerical - base["forces"][atom, axis]))
    physics["finite_difference_forces_max_abs_eV_per_A"] = worst
    cell = triclinic_cell(1)
    batch = evaluate([atoms, cell])
    single = evaluate([cell])
    physics["batch_vs_single_forces_max_abs"] = float(
        max(
            np.abs(batch["forces"][: len(atoms)] - base["forces"]).max(),
            np.abs(batch["forces"][len(atoms) :] - single["forces"]).max(),
        )
    )
    physics["ok"] = (
        physics["rotation_forces_rel"] < 1e-10
        and physics["finite_difference_forces_max_abs_eV_per_A"] < 1e-6
        and physics["batch_vs_single_forces_max_abs"] < 1e-10
    )
    return {
        "plans": rows,
        "n_checked": len(rows),
        "n_failed": len(failures),
        "failures": failures,
        "worst_float64_forces_rel": max(r["forces"] for r in rows if r["dtype"] == "float64"),
        "worst_float32_forces_rel": max(r["forces"] for r in rows if r["dtype"] == "float32"),
        "physics_paper_float64": physics,
    }


def compiled(device: str) -> dict:
    import torch
    from speed import water_box

    from helpers import VARIANTS, make_model
    from so3krates import ForceField, atoms_to_graph
    from so3krates.runtime import Planner

    atoms = water_box(100)  # 300 atoms, periodic
    out = {}
    # float64: where a compiled program must agree with eager to round-off (float32 is compared in speed).
    for dtype_name in ("float64",):
        dtype = getattr(torch, dtype_name)
        model = make_model(VARIANTS["paper"], dtype).requires_grad_(False).to(device)
        graph = atoms_to_graph(atoms, model.cutoff, pairs=True).to(device)
        reference = numpy_outputs(ForceField(model, frozen=True, planner=Planner(spline=False))(graph))
        for name, planner in {
            "whole graph": Planner(spline=False, blocks_min_edges=0),
            "edge blocks": Planner(spline=False, blocks_min_edges=1, block_edges=4096),
        }.items():
            started = time.perf_counter()
            force_field = ForceField(model, compile="inductor", frozen=True, planner=planner)
            got = numpy_outputs(force_field(graph))
            synchronize(device)
            first = time.perf_counter() - started
            plan = force_field.plan(graph)
            out[f"{dtype_name} {name}"] = {
                "plan": plan.describe(),
                "first_call_s": first,
                "forces_max_abs_vs_eager": float(np.abs(got["forces"] - reference["forces"]).max()),
                "energy_abs_vs_eager": float(np.abs(got["energy"] - reference["energy"]).max()),
            }
    return out


def time_calls(function, device: str, min_repeats: int = 5, budget_s: float = 10.0) -> tuple[float, list]:
    started = time.perf_counter()
    function()
    synchronize(device)
    first = time.perf_counter() - started
    function()  # a second warm-up: compiled programs of dynamic shapes are specialised on the first
    synchronize(device)
    times: list[float] = []
    begin = time.perf_counter()
    while len(times) < min_repeats or (time.perf_counter() - begin < budget_s and len(times) < 50):
        started = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return first, times


def speed(device: str, deadline: float, water_atoms: list[int]) -> dict:
    import torch
    from ase.build import molecule
    from speed import water_box

    from so3krates import ForceField, So3krates, atoms_to_graph
    from so3krates.model.config import preset

    torch.manual_seed(0)
    model = So3krates(preset("paper")).to(torch.float32).eval().requires_grad_(False).to(device)
    systems = {"ethanol": molecule("CH3CH2OH"), "C60": molecule("C60")}
    for n in water_atoms:
        systems[f"water {n}"] = water_box(n // 3)
    rows, eager_forces = [], {}
    for mode in ("none", "inductor"):
        force_field = ForceField(model, compile=mode, frozen=True)
        for name, atoms in systems.items():
            if time.perf_counter() > deadline:
                rows.append({"system": name, "compile": mode, "skipped": "time limit"})
                continue
            graph = atoms_to_graph(atoms, model.cutoff, pairs=True).to(device)
            row = {"system": name, "compile": mode, "n_atoms": len(atoms), "n_edges": graph.n_edges}
            row["plan"] = force_field.plan(graph).describe()
            on_gpu = torch.device(device).type == "cuda"
            try:
                if on_gpu:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                first, times = time_calls(lambda f=force_field, g=graph: f(g), device)
                forces = force_field(graph)["forces"].detach().double().cpu().numpy()
                if mode == "none":
                    eager_forces[name] = forces
                elif name in eager_forces:
                    row["forces_max_abs_vs_eager"] = float(np.abs(forces - eager_forces[name]).max())
                median = float(np.median(times))
                row.update(
                    first_call_s=first,
                    median_ms=median * 1e3,
                    us_per_atom=median * 1e6 / len(atoms),
                    n_timed=len(times),
                )
                if on_gpu:
                    peak = torch.cuda.max_memory_allocated(device)
                    row.update(peak_gpu_memory_MB=peak / 2**20, peak_KB_per_atom=peak / 1024 / len(atoms))
            except torch.OutOfMemoryError as error:
                row["out_of_memory"] = str(error).splitlines()[0]
            rows.append(row)
            print(json.dumps(row), flush=True)
            del graph
    return {"rows": rows}


def md(device: str) -> dict:
    import torch
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.md.verlet import VelocityVerlet
    from speed import water_box

    from so3krates import So3krates, So3kratesCalculator
    from so3krates.model.config import preset

    torch.manual_seed(0)
    model = So3krates(preset("paper")).eval().requires_grad_(False)
    out = {}
    for mode in ("none", "inductor"):
        atoms = water_box(333)
        MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
        atoms.calc = So3kratesCalculator(
            model, device=device, dtype="float32", compile=mode, min_distance=0.0
        )
        dynamics = VelocityVerlet(atoms, 0.5 * units.fs)
        dynamics.run(5)  # warm-up (compilation)
        synchronize(device)
        steps = 40
        started = time.perf_counter()
        dynamics.run(steps)
        synchronize(device)
        elapsed = time.perf_counter() - started
        out[mode] = {
            "n_atoms": len(atoms),
            "steps_per_s": steps / elapsed,
            "ns_per_day": steps / elapsed * 0.5e-6 * 86400,
            "neighbor_list_builds": atoms.calc.n_neighbor_list_builds,
        }
    return out


# -------------------------------------------------------------------------------------------- report


def row_of(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown(results: dict) -> str:
    """The tables of `gpu_check.md` from the JSON."""
    machine = results["machine"]
    lines = [
        "# so3krates on a GPU",
        "",
        f"{machine['device']}, torch {machine['torch']}, Python {machine['python']}. "
        "Made by `benchmarks/gpu_check.py` (see its docstring for the protocol).",
        "",
    ]
    sections = results["sections"]
    tests = sections.get("tests", {})
    if "summary" in tests:
        lines += ["## `tests/test_gpu.py`", "", f"`{tests['command']}`: {tests['summary']}", ""]
    correctness = sections.get("correctness", {})
    if "n_checked" in correctness:
        physics = correctness["physics_paper_float64"]
        lines += [
            "## Correctness (GPU against the CPU reference)",
            "",
            f"- {correctness['n_checked']} plan × variant × dtype combinations, {correctness['n_failed']} "
            "outside tolerance; largest force error relative to the force scale: "
            f"float64 {correctness['worst_float64_forces_rel']:.1e}, "
            f"float32 {correctness['worst_float32_forces_rel']:.1e}.",
            f"- Paper preset, float64, on the GPU: rotation {physics['rotation_forces_rel']:.1e} (forces, "
            f"relative), finite-difference forces {physics['finite_difference_forces_max_abs_eV_per_A']:.1e} "
            f"eV/Å, batch vs single {physics['batch_vs_single_forces_max_abs']:.1e} eV/Å.",
            "",
        ]
    compiled = {k: v for k, v in sections.get("compiled", {}).items() if isinstance(v, dict)}
    if compiled:
        lines += ["## Compiled (inductor, Triton) against eager on the GPU", ""]
        lines += [row_of("case", "plan", "forces max abs (eV/Å)", "first call (s)"), "|---|---|---:|---:|"]
        for name, row in compiled.items():
            versus = f"{row['forces_max_abs_vs_eager']:.1e}"
            lines.append(row_of(name, row["plan"], versus, f"{row['first_call_s']:.0f}"))
        lines.append("")
    rows = sections.get("speed", {}).get("rows", [])
    if rows:
        lines += ["## Energy + forces per call (paper preset, float32)", ""]
        header = ("system", "atoms", "edges", "compile", "plan", "median (ms)", "µs/atom")
        header += ("peak GPU memory (MB)", "KB/atom", "forces vs eager (eV/Å)")
        lines += [row_of(*header), "|---|---:|---:|---|---|---:|---:|---:|---:|---:|"]
        for row in rows:
            if "median_ms" not in row:
                why = row.get("skipped") or row.get("out_of_memory")
                lines.append(row_of(row["system"], "", "", row["compile"], "", why, "", "", "", ""))
                continue
            versus = row.get("forces_max_abs_vs_eager")
            lines.append(
                row_of(
                    row["system"],
                    f"{row['n_atoms']:,}",
                    f"{row['n_edges']:,}",
                    row["compile"],
                    row["plan"],
                    f"{row['median_ms']:.2f}",
                    f"{row['us_per_atom']:.2f}",
                    f"{row.get('peak_gpu_memory_MB', 0):,.0f}",
                    f"{row.get('peak_KB_per_atom', 0):,.0f}",
                    "" if versus is None else f"{versus:.1e}",
                )
            )
        lines.append("")
    md = {k: v for k, v in sections.get("md", {}).items() if isinstance(v, dict)}
    if md:
        lines += ["## MD through the ASE calculator (999 water, float32, 0.5 fs)", ""]
        lines += [row_of("compile", "steps/s", "ns/day"), "|---|---:|---:|"]
        for mode, row in md.items():
            lines.append(row_of(mode, f"{row['steps_per_s']:.1f}", f"{row['ns_per_day']:.2f}"))
        lines.append("")
    notes = results.get("notes", [])
    if notes:
        lines += ["## Notes", "", *(f"- {note}" for note in notes)]
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "gpu")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--time-limit-s", type=float, default=420.0)
    parser.add_argument("--water-atoms", default="999,9999,99999")
    parser.add_argument("--report", action="store_true", help="only rewrite gpu_check.md from the JSON")
    args = parser.parse_args(argv)
    path = args.out / "gpu_check.json"
    if args.report:
        if not path.is_file():
            parser.error(f"--report: {path} does not exist (run the checks first)")
        write_atomically(path.with_suffix(".md"), markdown(json.loads(path.read_text())))
        return 0
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose among {list(SECTIONS)}")
    import torch

    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: device {args.device!r}: this torch ({torch.__version__}) sees no CUDA GPU")
        return 2
    deadline = time.perf_counter() + args.time_limit_s
    results: dict = {
        "benchmark": "so3krates on a GPU: correctness against the CPU, compiled programs, timings",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "device": (
                torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else args.device
            ),
            "cpu_threads": torch.get_num_threads(),
        },
        "sections": {},
    }
    water_atoms = [int(n) for n in args.water_atoms.split(",") if n]
    args.out.mkdir(parents=True, exist_ok=True)
    for section in sections:
        if time.perf_counter() > deadline:
            results["sections"][section] = {"skipped": "time limit"}
            continue
        started = time.perf_counter()
        print(f"[{time.strftime('%H:%M:%S')}] {section}", flush=True)
        try:
            if section == "tests":
                value = gpu_tests()
            elif section == "correctness":
                value = correctness(args.device)
            elif section == "compiled":
                value = compiled(args.device)
            elif section == "speed":
                value = speed(args.device, deadline, water_atoms)
            else:
                value = md(args.device)
        except Exception as error:  # keep the other sections' results; report this one's error
            value = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
        value["seconds"] = time.perf_counter() - started
        results["sections"][section] = value
        summary = {k: v for k, v in value.items() if k not in ("plans", "rows", "traceback")}
        print(json.dumps(summary, default=str)[:3000], flush=True)
        write_atomically(path, json.dumps(results, indent=2, default=str) + "\n")
        write_atomically(path.with_suffix(".md"), markdown(results))
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
