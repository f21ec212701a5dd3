"""Alanine dipeptide (GFN2-xTB): what the model does in simulation — stability, exploration, spectrum, drift.

    python benchmarks/ala_dipeptide.py train        # paper preset and the invariant-only ablation
    python benchmarks/ala_dipeptide.py stability [--time-ps 20 --replicas 4 --temperatures 500,700 --jobs 2]
    python benchmarks/ala_dipeptide.py explore [--minutes 8]      # needs `pip install -e ".[xtb]"`
    python benchmarks/ala_dipeptide.py spectrum                   # C7eq: model Hessian vs xTB Vibrations
    python benchmarks/ala_dipeptide.py drift                      # NVE, 0.5 fs, float32 and float64
    python benchmarks/ala_dipeptide.py report                     # results/ala_dipeptide.{json,md}
    python benchmarks/ala_dipeptide.py mace-train                 # MACE-small, same split and budget
    python benchmarks/ala_dipeptide.py mace-stability [--time-ps 10 --stop-at 09:55]

Data: `../shared/data/generated/ala_dipeptide_gfn2xtb_500K_2000.extxyz` (Langevin MD at 500 K, one frame per
5 fs; 1000 train / 100 valid / 900 test frames, `configs/ala_dipeptide.yaml`). Every step is a
`so3krates` command that a user would run; this script only chains them, on one thread per process, two
processes at a time (the machine has two cores), and collects their JSON into one table.

The MACE arm runs in MACE's own environment (`benchmarks/.envs/mace-torch`, from `accuracy.py --setup`):
`peers/mace_rmd17.py` trains MACE-small on the frames of our split (`paper/split.npz`) for the same 20
minutes, and `peers/mace_stability.py` runs the `stability` protocol with MACE's ASE calculator.

Conformers are named by the backbone dihedrals φ (C–N–Cα–C) and ψ (N–Cα–C–N): the nearest of the
usual vacuum minima of alanine dipeptide (centres below, approximate) within 45° in both angles.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
DATA = ROOT.parent / "shared" / "data" / "generated" / "ala_dipeptide_gfn2xtb_500K_2000.extxyz"
RUNS = BENCH / "runs" / "ala_dipeptide"
RESULTS = BENCH / "results"
MODELS = {"paper": RUNS / "paper" / "best.pt", "invariant": RUNS / "invariant" / "best.pt"}
MACE_RUN = RUNS / "mace"
MACE_PYTHON = BENCH / ".envs" / "mace-torch" / "bin" / "python"
# (φ, ψ) in degrees of the vacuum minima, approximate; used only to name the minima found.
CONFORMERS = {
    "C7eq": (-83.0, 75.0),
    "C5": (-155.0, 160.0),
    "C7ax": (73.0, -60.0),
    "alphaR": (-70.0, -40.0),
    "alphaL": (65.0, 35.0),
    "beta2": (-135.0, 25.0),
}
WINDOW_DEG = 45.0
# Backbone atoms in the data's atom order (RDKit order of SMILES CC(=O)N[C@@H](C)C(=O)NC, H last).
PHI, PSI = (1, 3, 4, 6), (3, 4, 6, 8)
BACKBONE_ELEMENTS = {1: "C", 3: "N", 4: "C", 6: "C", 8: "N"}


def so3krates(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("so3krates")), *args]


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    return env


def run_parallel(commands: list[tuple[list[str], Path]], n_parallel: int = 2) -> None:
    """Runs commands, `n_parallel` at a time, each with its log; raises if one failed."""
    pending, running, failed = list(commands), [], []
    while pending or running:
        while pending and len(running) < n_parallel:
            command, log = pending.pop(0)
            log.parent.mkdir(parents=True, exist_ok=True)
            handle = open(log, "w")  # closed when the process ends
            handle.write("$ " + " ".join(command) + "\n")
            handle.flush()
            process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=environment())
            running.append((process, handle, log))
            print(f"started: {' '.join(command[1:4])} … (log {log})", flush=True)
        time.sleep(2)
        for item in list(running):
            process, handle, log = item
            if process.poll() is not None:
                handle.close()
                running.remove(item)
                if process.returncode != 0:
                    failed.append(f"{log} (exit {process.returncode})")
    if failed:
        raise SystemExit("failed: " + ", ".join(failed))


def dihedrals(atoms) -> tuple[float, float]:
    """(φ, ψ) in degrees, in (−180, 180]."""
    for index, symbol in BACKBONE_ELEMENTS.items():
        if atoms[index].symbol != symbol:
            raise ValueError(
                f"atom {index} is {atoms[index].symbol}, expected {symbol}: not the data's atom order"
            )

    def wrap(angle: float) -> float:
        return (angle + 180.0) % 360.0 - 180.0

    return wrap(atoms.get_dihedral(*PHI)), wrap(atoms.get_dihedral(*PSI))


def conformer(phi: float, psi: float) -> str | None:
    def distance(a: float, b: float) -> float:
        return abs((a - b + 180.0) % 360.0 - 180.0)

    best = min(
        CONFORMERS, key=lambda name: distance(phi, CONFORMERS[name][0]) + distance(psi, CONFORMERS[name][1])
    )
    centre = CONFORMERS[best]
    return best if distance(phi, centre[0]) <= WINDOW_DEG and distance(psi, centre[1]) <= WINDOW_DEG else None


# ------------------------------------------------------------------------------------------ commands


def train(args: argparse.Namespace) -> None:
    config = str(BENCH / "configs" / "ala_dipeptide.yaml")
    run_parallel(
        [
            (
                so3krates("train", config, "--set", f"run_dir={RUNS / 'paper'}"),
                RUNS / "logs" / "train_paper.log",
            ),
            (
                so3krates(
                    "train", config, "--set", f"run_dir={RUNS / 'invariant'}", "--set", "model.degrees=[]"
                ),
                RUNS / "logs" / "train_invariant.log",
            ),
        ],
        n_parallel=1,
    )


def stability(args: argparse.Namespace) -> None:
    commands = []
    for name in args.models.split(","):
        for temperature in args.temperatures.split(","):
            out = RUNS / "stability" / f"{name}_{temperature}K"
            command = so3krates(
                "md", "--model", str(MODELS[name]), "--structure", str(DATA), "--frame", "0",
                "--ensemble", "langevin", "--temperature", temperature, "--friction", "0.01",
                "--timestep", "0.5", "--time-ps", str(args.time_ps), "--replicas", str(args.replicas),
                "--dtype", "float32", "--threads", "1", "--trajectory-every", "200", "--thermo-every", "20",
                "--out", str(out), "--no-progress", "--compile", args.compile,
            )  # fmt: skip
            commands.append((command, RUNS / "logs" / f"stability_{name}_{temperature}K.log"))
    run_parallel(commands, args.jobs)


def mace_train(args: argparse.Namespace) -> None:
    """MACE-small (accuracy.py's mace-small settings) on our train/valid/test frames, 20 min, one thread."""
    split = np.load(RUNS / "paper" / "split.npz")
    MACE_RUN.mkdir(parents=True, exist_ok=True)
    indices = MACE_RUN / "split.json"
    indices.write_text(json.dumps({key: [int(i) for i in split[key]] for key in ("train", "valid", "test")}))
    command = [
        str(MACE_PYTHON), str(BENCH / "peers" / "mace_rmd17.py"), "--train-file", str(DATA),
        "--test-file", str(DATA), "--indices", str(indices), "--budget-seconds", "1200",
        "--out", str(MACE_RUN / "train.json"), "--work-dir", str(MACE_RUN / "work"), "--threads", "1",
        "--num-channels", "64", "--max-L", "1", "--save-model", str(MACE_RUN / "mace_small.model"),
    ]  # fmt: skip
    run_parallel([(command, RUNS / "logs" / "train_mace.log")], n_parallel=1)


def mace_stability(args: argparse.Namespace) -> None:
    """Two workers that share the (temperature, replica) runs of `peers/mace_stability.py`, hottest first."""
    temperatures = ",".join(sorted(args.temperatures.split(","), key=float, reverse=True))
    command = [
        str(MACE_PYTHON), str(BENCH / "peers" / "mace_stability.py"), "--model",
        str(MACE_RUN / "mace_small.model"), "--structure", str(DATA), "--frame", "0",
        "--out", str(RUNS / "stability"), "--temperatures", temperatures,
        "--time-ps", str(args.time_ps), "--replicas", str(args.replicas), "--threads", "1",
    ]  # fmt: skip
    if args.stop_at:
        command += ["--stop-at", args.stop_at]
    run_parallel([(command, RUNS / "logs" / f"stability_mace_worker{k}.log") for k in (1, 2)])
    subprocess.run([*command, "--summarise-only"], check=True, env=environment())


def explore(args: argparse.Namespace) -> None:
    out = RUNS / "explore"
    command = so3krates(
        "explore", "--model", str(MODELS["paper"]), "--structure", str(DATA), "--frame", "0",
        "--max-time", str(60 * args.minutes), "--out", str(out), "--threads", "1",
        "--dtype", "float64", "--lowest", "20", "--reference", "xtb", "--rescore", str(args.rescore),
        "--keep-topology", "--temperature", "600", "--mdmin", str(args.mdmin),
    )  # fmt: skip
    run_parallel([(command, RUNS / "logs" / "explore.log")], n_parallel=1)


def _c7eq_start():
    """The lowest explored minimum named C7eq, else the first data frame."""
    import ase.io

    lowest = RUNS / "explore" / "lowest_minima.extxyz"
    if lowest.is_file():
        for atoms in ase.io.read(lowest, ":"):
            if conformer(*dihedrals(atoms)) == "C7eq":
                return atoms
    return ase.io.read(DATA, index=0)


def spectrum(args: argparse.Namespace) -> None:
    """Model: `so3krates spectrum harmonic --optimize`; reference: GFN2-xTB minimum + ase.vibrations."""
    import ase.io
    from ase.optimize import BFGS
    from ase.vibrations import Vibrations
    from tblite.ase import TBLite

    out = RUNS / "spectrum"
    out.mkdir(parents=True, exist_ok=True)
    start = _c7eq_start()
    ase.io.write(out / "start.extxyz", start)
    model_command = so3krates(
        "spectrum", "harmonic", "--model", str(MODELS["paper"]), "--structure", str(out / "start.extxyz"),
        "--optimize", "--out", str(out / "model"), "--threads", "1",
    )  # fmt: skip
    run_parallel([(model_command, RUNS / "logs" / "spectrum_model.log")], n_parallel=1)
    reference = start.copy()
    reference.calc = TBLite(method="GFN2-xTB", verbosity=0)
    BFGS(reference, logfile=str(out / "xtb_opt.log")).run(fmax=1e-3, steps=1000)
    ase.io.write(out / "xtb_minimum.extxyz", reference)
    vibrations = Vibrations(reference, name=str(out / "xtb_vib"), delta=0.01, nfree=2)
    vibrations.clean()
    vibrations.run()
    energies = vibrations.get_energies()  # eV, complex for imaginary modes
    wavenumbers = np.real(energies) / 1.239841984e-4  # eV → cm⁻¹
    vibrations.clean()
    np.savetxt(out / "xtb_frequencies_cm-1.txt", wavenumbers)
    print(f"xTB: {len(wavenumbers)} frequencies, φ/ψ = {dihedrals(reference)}")


def drift(args: argparse.Namespace) -> None:
    commands = []
    for dtype in ("float32", "float64"):
        out = RUNS / "drift" / dtype
        command = so3krates(
            "md", "--model", str(MODELS["paper"]), "--structure", str(DATA), "--frame", "0",
            "--ensemble", "nve", "--temperature", "300", "--timestep", "0.5", "--time-ps", str(args.drift_ps),
            "--dtype", dtype, "--threads", "1", "--trajectory-every", "200", "--thermo-every", "10",
            "--out", str(out), "--no-progress",
        )  # fmt: skip
        commands.append((command, RUNS / "logs" / f"drift_{dtype}.log"))
    run_parallel(commands)


# -------------------------------------------------------------------------------------------- report


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _rescore_rows(path: Path) -> list[dict]:
    import csv

    if not path.is_file():
        return []
    with open(path) as handle:
        return [{key: value for key, value in row.items()} for row in csv.DictReader(handle)]


def _parameters(checkpoint: Path) -> int:
    import torch

    from so3krates.model.config import ModelConfig
    from so3krates.model.so3krates import So3krates, count_parameters

    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return int(count_parameters(So3krates(ModelConfig(**saved["model_config"])))["total"])


def _last_epoch(metrics_csv: Path) -> int | None:
    lines = metrics_csv.read_text().strip().splitlines() if metrics_csv.is_file() else []
    return int(lines[-1].split(",")[0]) if len(lines) > 1 else None


def _stability_entry(summary: dict | None) -> dict | None:
    """One row of the stability table from a `summary.json` of `so3krates md` or `peers/mace_stability.py`.

    The latter lists replicas stopped by its `--stop-at` (the deadline) under "interrupted": they count as
    runs that had not failed by the time they were stopped (so mean survival is then a lower bound).
    """
    runs = (summary or {}).get("runs") or []
    stopped = (summary or {}).get("interrupted") or []
    if not runs and not stopped:
        return None
    everything = runs + stopped
    entry = {
        "replicas": len(everything),
        "fraction_stable": summary.get("fraction_stable"),
        "mean_time_to_failure_ps": summary.get("mean_time_to_failure_ps"),
        "mean_survival_time_ps": summary.get("mean_survival_time_ps"),
        "time_ps": max(run["target_steps"] * run["timestep_fs"] / 1000 for run in everything),
        # Comparable across arms that ran for different times (MACE: 10 ps, ours: 20 ps).
        "fraction_stable_at_10ps": sum(
            run["failure"] is None or run["failure"]["time_ps"] > 10.0 for run in everything
        )
        / len(everything),
        "failures": [
            {"seed": run["seed"], **run["failure"]} for run in everything if run["failure"] is not None
        ],
        "steps_per_second": [
            (run["steps_done"] - (run["restarted_from_step"] or 0)) / run["wall_time_s"] for run in everything
        ],
    }
    if stopped:
        failure_times = [run["failure"]["time_ps"] for run in everything if run["failure"] is not None]
        entry.update(
            fraction_stable=sum(run["failure"] is None for run in everything) / len(everything),
            mean_time_to_failure_ps=float(np.mean(failure_times)) if failure_times else None,
            mean_survival_time_ps=float(np.mean([run["time_ps"] for run in everything])),
            stopped_at_ps=[run["time_ps"] for run in stopped],
        )
    return entry


def collect() -> dict:
    import ase.io

    results: dict = {"data": str(DATA.name), "models": {}, "stability": {}, "drift": {}}
    for name, checkpoint in MODELS.items():
        metrics = _read(checkpoint.parent / "results.json")
        if metrics:
            results["models"][name] = {
                "package": "so3krates",
                "parameters": _parameters(checkpoint),
                "epochs": _last_epoch(checkpoint.parent / "metrics.csv"),
                "test_energy_mae_meV": metrics["test"]["energy_mae_meV"],
                "test_forces_mae_meV_per_A": metrics["test"]["forces_mae_meV_per_A"],
            }
    mace = _read(MACE_RUN / "train.json")
    if mace:
        results["models"]["mace"] = {
            "package": f"mace-torch {mace['package_version']} (small: {mace['settings']['hidden_irreps']})",
            "parameters": mace["parameters"],
            "epochs": mace["epochs"],
            "steps": mace["steps"],
            "train_seconds": mace["train_seconds"],
            "other_jobs_cpu_share": mace["other_jobs_cpu_share"],
            "settings": mace["settings"],
            "test_energy_mae_meV": mace["test"]["energy_mae_meV"],
            "test_energy_rmse_meV": mace["test"]["energy_rmse_meV"],
            "test_forces_mae_meV_per_A": mace["test"]["forces_mae_meV_per_A"],
            "n_test": mace["test"]["n_structures"],
        }
    for directory in sorted((RUNS / "stability").glob("*K")):
        entry = _stability_entry(_read(directory / "summary.json"))
        if entry:
            results["stability"][directory.name] = entry
    for dtype in ("float32", "float64"):
        summary = _read(RUNS / "drift" / dtype / "summary.json")
        if summary:
            results["drift"][dtype] = {
                "drift_eV_per_atom_per_ps": summary["conserved_energy_drift_eV_per_atom_per_ps"],
                "time_ps": summary["time_ps"],
                "mean_temperature_K": summary["mean_temperature_K"],
                "stable": summary["stable"],
            }
    explore_dir = RUNS / "explore"
    if (explore_dir / "unique_minima.csv").is_file():
        lines = (explore_dir / "unique_minima.csv").read_text().strip().splitlines()
        minima = ase.io.read(explore_dir / "lowest_minima.extxyz", ":")
        named = []
        for atoms in minima:
            phi, psi = dihedrals(atoms)
            named.append(
                {
                    "energy_eV": atoms.get_potential_energy(),
                    "phi": phi,
                    "psi": psi,
                    "name": conformer(phi, psi),
                }
            )
        results["explore"] = {
            "unique_minima_over_time": lines[-1],
            "lowest": named,
            "conformers_found": sorted({m["name"] for m in named if m["name"]}),
            "rescore": _rescore_rows(explore_dir / "rescore.csv"),
        }
    model_freq = RUNS / "spectrum" / "model" / "frequencies.csv"
    xtb_freq = RUNS / "spectrum" / "xtb_frequencies_cm-1.txt"
    if model_freq.is_file() and xtb_freq.is_file():
        import csv

        with open(model_freq) as handle:
            rows = list(csv.DictReader(handle))
        key = next(k for k in rows[0] if "cm" in k)
        ours = np.sort(np.array([float(r[key]) for r in rows]))
        reference = np.sort(np.loadtxt(xtb_freq))
        ours, reference = ours[-(3 * 22 - 6) :], reference[-(3 * 22 - 6) :]  # the 3N − 6 vibrations
        results["spectrum"] = {
            "n_modes": len(ours),
            "mad_cm-1": float(np.mean(np.abs(ours - reference))),
            "max_abs_dev_cm-1": float(np.max(np.abs(ours - reference))),
            "model_cm-1": ours.tolist(),
            "xtb_cm-1": reference.tolist(),
        }
    return results


def markdown(results: dict) -> str:
    lines = ["# Alanine dipeptide (GFN2-xTB): simulation benchmarks", "", f"Data: `{results['data']}`.", ""]
    if results["models"]:
        lines += [
            "## Models (test split, 900 frames)",
            "",
            "| model | package | parameters | epochs in 20 min | E MAE meV | F MAE meV/Å |",
            "|---|---|---|---|---|---|",
        ]
        for name, entry in results["models"].items():
            epochs = entry.get("epochs")
            lines.append(
                f"| {name} | {entry.get('package', 'so3krates')} | {entry.get('parameters', 0):,} | "
                f"{'—' if epochs is None else f'{epochs:.4g}'} | {entry['test_energy_mae_meV']:.1f} | "
                f"{entry['test_forces_mae_meV_per_A']:.1f} |"
            )
        if "mace" in results["models"]:
            mace = results["models"]["mace"]
            lines += [
                "",
                "Each model trained for 20 min on one thread (MACE: `peers/mace_rmd17.py`, the MACE-small "
                f"settings of `accuracy.py`, float64; {mace['steps']} optimizer steps; other jobs used "
                f"{100 * mace['other_jobs_cpu_share']:.0f}% of the machine meanwhile). MACE's energy error "
                f"is a constant offset (RMSE {mace['test_energy_rmse_meV']:.0f} meV ≈ MAE): with λ_E = 1 "
                "against λ_F = 1000 its energy term had not removed the initial offset within the budget, "
                "which does not affect the forces or the dynamics.",
            ]
    if results["stability"]:
        lines += [
            "",
            "## Stability (Langevin, 0.5 fs, bond deviation > 0.5 Å ends a run)",
            "",
            "Frame 0 of the data, seeds 0–3, friction 0.01/fs. so3krates models in float32, MACE in float64 "
            "(its ASE calculator). A run stopped at the deadline counts as stable up to that time; mean "
            "survival is then a lower bound.",
            "",
            "| model, T | replicas × ps | stable | stable at 10 ps | mean time to failure ps "
            "| mean survival ps | steps/s |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, entry in results["stability"].items():
            mttf = entry["mean_time_to_failure_ps"]
            stopped = entry.get("stopped_at_ps", [])
            runs = f"{entry['replicas']} × {entry['time_ps']:g}"
            if stopped:
                runs += f" ({len(stopped)} stopped at {', '.join(f'{t:.1f}' for t in stopped)})"
            lines.append(
                f"| {name} | {runs} | {entry['fraction_stable']:.2f} | "
                f"{entry['fraction_stable_at_10ps']:.2f} | "
                f"{'—' if mttf is None else f'{mttf:.2f}'} | {entry['mean_survival_time_ps']:.2f} | "
                f"{np.mean(entry['steps_per_second']):.0f} |"
            )
        failures = [
            f"{name} seed {failure['seed']} at {failure['time_ps']:.2f} ps: {failure['reason']}"
            for name, entry in results["stability"].items()
            for failure in entry["failures"]
        ]
        if failures:
            lines += ["", "Failures:", ""] + [f"- {line}" for line in failures]
    if results["drift"]:
        lines += [
            "",
            "## NVE energy drift (0.5 fs, from 300 K)",
            "",
            "| dtype | ps | drift eV/atom/ps |",
            "|---|---|---|",
        ]
        for dtype, entry in results["drift"].items():
            lines.append(f"| {dtype} | {entry['time_ps']:g} | {entry['drift_eV_per_atom_per_ps']:.2e} |")
    if "explore" in results:
        entry = results["explore"]
        found = ", ".join(entry["conformers_found"]) or "none"
        lines += [
            "",
            "## Exploration (minima hopping, paper model)",
            "",
            "`so3krates explore --keep-topology --temperature 600 --mdmin 20` from the first data frame, one "
            "thread; last row of unique_minima.csv (step, s, minima, unique, lowest eV): "
            f"`{entry['unique_minima_over_time']}`. Conformers among the lowest minima (φ and ψ within "
            f"{WINDOW_DEG:.0f}° of the usual vacuum minima): {found}.",
        ]
        lines += ["", "| E eV | φ | ψ | conformer |", "|---|---|---|---|"]
        for m in entry["lowest"]:
            lines.append(f"| {m['energy_eV']:.4f} | {m['phi']:.0f} | {m['psi']:.0f} | {m['name'] or '—'} |")
        if entry["rescore"]:
            lines += ["", "GFN2-xTB re-optimisation of the lowest minima (`rescore.csv`):", ""]
            lines += [
                "| minimum | model − xTB at model min. meV | at xTB min. meV | RMSD Å |",
                "|---|---|---|---|",
            ]
            for row in entry["rescore"]:
                if row.get("failure"):
                    lines.append(f"| #{row['id']} | failed: {row['failure']} | | |")
                    continue
                lines.append(
                    f"| #{row['id']} | {1e3 * float(row['error_at_model_minimum']):+.1f} | "
                    f"{1e3 * float(row['error_at_reference_minimum']):+.1f} | {float(row['rmsd']):.3f} |"
                )
    if "spectrum" in results:
        entry = results["spectrum"]
        lines += [
            "",
            "## Harmonic frequencies at the C7eq minimum: model Hessian vs GFN2-xTB (ase.vibrations)",
            "",
            f"{entry['n_modes']} modes, sorted and paired by rank: mean absolute deviation "
            f"{entry['mad_cm-1']:.1f} cm⁻¹, largest {entry['max_abs_dev_cm-1']:.1f} cm⁻¹.",
        ]
    return "\n".join(lines) + "\n"


def report(args: argparse.Namespace) -> None:
    results = collect()
    RESULTS.mkdir(parents=True, exist_ok=True)
    for path, text in (
        (RESULTS / "ala_dipeptide.json", json.dumps(results, indent=1)),
        (RESULTS / "ala_dipeptide.md", markdown(results)),
    ):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    print(markdown(results))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "step",
        choices=[
            "train", "stability", "explore", "spectrum", "drift", "report", "mace-train", "mace-stability"
        ],
    )  # fmt: skip
    parser.add_argument("--models", default="paper,invariant")
    parser.add_argument("--temperatures", default="500,700")
    parser.add_argument("--time-ps", type=float, default=20.0)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--minutes", type=float, default=8.0, help="exploration wall time")
    parser.add_argument("--rescore", type=int, default=5, help="minima re-optimised with GFN2-xTB")
    parser.add_argument("--mdmin", type=int, default=20, help="escape length in E_pot minima along the MD")
    parser.add_argument("--drift-ps", type=float, default=2.0)
    parser.add_argument("--stop-at", default=None, help="mace-stability: HH:MM UTC, stop cleanly then")
    parser.add_argument(
        "--compile",
        default="aoti",
        choices=["none", "aoti"],
        help="stability: how `so3krates md` evaluates the model (aoti: ~3x the steps per second; float32 "
        "then reads the radial filters from their spline)",
    )
    parser.add_argument("--jobs", type=int, default=2, help="stability: processes at a time (1 thread each)")
    args = parser.parse_args(argv)
    if not DATA.is_file():
        print(f"ala_dipeptide.py: {DATA} not found (the shared data folder must sit beside the repository)")
        return 2
    {
        "train": train,
        "stability": stability,
        "explore": explore,
        "spectrum": spectrum,
        "drift": drift,
        "report": report,
        "mace-train": mace_train,
        "mace-stability": mace_stability,
    }[args.step](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
