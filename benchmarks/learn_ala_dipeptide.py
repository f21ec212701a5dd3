"""``so3krates learn`` on alanine dipeptide from one structure, against training on plain reference MD.

    python benchmarks/learn_ala_dipeptide.py run          # the loop (configs/learn_ala_dipeptide.yaml)
    python benchmarks/learn_ala_dipeptide.py validate     # final model: 4 replicas x 20 ps, 500 K
    python benchmarks/learn_ala_dipeptide.py baseline     # 400 xTB calls of 500 K MD -> one model
    python benchmarks/learn_ala_dipeptide.py evaluate     # both on the shared 2000-frame trajectory
    python benchmarks/learn_ala_dipeptide.py committee-speed   # committee call vs one model
    python benchmarks/learn_ala_dipeptide.py kill-test [--kills 3 --labels 120]   # SIGKILL and resume
    python benchmarks/learn_ala_dipeptide.py report       # results/learn/ala_dipeptide.{json,md}

Data: frame 0 of ``../shared/data/generated/ala_dipeptide_gfn2xtb_500K_2000.extxyz`` (GFN2-xTB, tblite
0.8.0, 500 K Langevin MD) is the only structure the loop sees; the 2000 frames are the test set. The
reference is GFN2-xTB through tblite (``pip install -e ".[xtb]"``).

The baseline spends the same number of reference calls (400) the plain way: a GFN2-xTB Langevin MD at
500 K from the same frame (0.5 fs, friction 0.01/fs; every step one call, every step a training frame),
and trains one model of the same size for as many optimizer steps as one member of the final committee
received over all iterations.

Every step runs the ``so3krates`` command a user would run; the machine has two cores: run one step at a
time (``OMP_WAIT_POLICY=PASSIVE`` is set for the children).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
DATA = ROOT.parent / "shared" / "data" / "generated" / "ala_dipeptide_gfn2xtb_500K_2000.extxyz"
RUNS = BENCH / "runs" / "learn"
RESULTS = BENCH / "results" / "learn"
CONFIG = BENCH / "configs" / "learn_ala_dipeptide.yaml"
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}


def so3krates(*args: str, log: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "so3krates", *args]
    print("$ so3krates " + " ".join(args), flush=True)
    if log is None:
        return subprocess.run(command, check=check, env=ENV, cwd=ROOT)
    with open(log, "w") as handle:
        return subprocess.run(
            command, check=check, env=ENV, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT
        )


def start_structure() -> Path:
    import ase.io
    from ase import Atoms

    if not DATA.is_file():
        sys.exit(f"{DATA}: missing (the shared data folder must sit beside the repository)")
    path = RUNS / "start.extxyz"
    if not path.is_file():
        RUNS.mkdir(parents=True, exist_ok=True)
        frame = ase.io.read(DATA, 0)
        ase.io.write(path, Atoms(numbers=frame.numbers, positions=frame.positions))
    return path


def command_run(args) -> None:
    start_structure()
    started = time.perf_counter()
    so3krates("learn", str(CONFIG), log=RUNS / "learn.log")
    (RUNS / "learn_wall_s.json").write_text(json.dumps({"wall_s": time.perf_counter() - started}))


def final_dir() -> Path:
    return RUNS / "run" / "final"


def committee_dir() -> Path:
    """The final committee: ``final/committee``, or the last iteration's (the same files; runs made before
    the final committee moved into its own folder)."""
    if (final_dir() / "committee").is_dir():
        return final_dir() / "committee"
    return sorted((RUNS / "run").glob("iter_*/committee"))[-1]


def command_validate(args) -> None:
    """Four replicas in two processes of two (one per core), merged into validate/summary.json."""
    out = RUNS / "validate"
    halves = []
    for half, seed in enumerate((0, 2)):
        directory = out / f"half_{half}"
        argv = [
            "md", "--model", str(final_dir() / "best.pt"), "--structure", str(start_structure()),
            "--ensemble", "langevin", "--temperature", "500", "--time-ps", str(args.time_ps), "--timestep",
            "0.5", "--friction", "0.01", "--replicas", "2", "--seed", str(seed), "--dtype", "float32",
            "--threads", "1", "--no-progress", "--out", str(directory),
            *(["--restart"] if (directory / "summary.json").exists() else []),
        ]  # fmt: skip
        print("$ so3krates " + " ".join(argv), flush=True)
        log = open(RUNS / f"validate_{half}.log", "w")  # closed below
        process = subprocess.Popen(
            [sys.executable, "-m", "so3krates", *argv],
            env=ENV,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        halves.append((process, log, directory))
    runs = []
    for process, log, directory in halves:
        process.wait()
        log.close()
        runs += json.loads((directory / "summary.json").read_text())["runs"]
    stable = [run["stable"] for run in runs]
    (out / "summary.json").write_text(
        json.dumps({"replicas": len(runs), "n_stable": sum(stable), "runs": runs}, indent=2)
    )


def learn_steps() -> int:
    """Optimizer steps one member of the final committee received over all iterations."""
    import yaml

    config = yaml.safe_load(CONFIG.read_text())["committee"]
    summary = json.loads((final_dir() / "summary.json").read_text())
    iterations = summary["iterations"]
    return int(config["first_steps"] + config["steps"] * (iterations - 1))


def command_baseline(args) -> None:
    import ase.io
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import Stationary, thermalize_momenta
    from tblite.ase import TBLite

    out = RUNS / "baseline"
    out.mkdir(parents=True, exist_ok=True)
    data = out / "xtb_md_400.extxyz"
    if not data.is_file():
        atoms = ase.io.read(start_structure())
        atoms.calc = TBLite(method="GFN2-xTB", verbosity=0)
        rng = np.random.default_rng(0)
        thermalize_momenta(atoms, 500, rng=rng)
        Stationary(atoms)
        dynamics = Langevin(
            atoms, 0.5 * units.fs, temperature_K=500, friction=0.01 / units.fs, rng=rng, fixcm=False
        )
        frames = []
        started = time.perf_counter()
        for _ in range(args.calls):
            dynamics.run(1)
            frame = atoms.copy()
            frame.calc = None
            frame.info["REF_energy"] = float(atoms.get_potential_energy())
            frame.arrays["REF_forces"] = atoms.get_forces().copy()
            frames.append(frame)
        ase.io.write(data, frames)
        print(f"xTB MD: {args.calls} calls in {time.perf_counter() - started:.1f} s")
    import yaml

    learn_config = yaml.safe_load(CONFIG.read_text())["committee"]
    steps = learn_steps()
    epochs = int(np.ceil(steps * 5 / (0.9 * args.calls)))
    config = {
        "run_dir": str(out / "model"),
        "data": {"train_file": str(data), "energy_key": "REF_energy", "forces_key": "REF_forces",
                 "valid_fraction": 0.1, "n_test": 0},
        "model": learn_config["model"],
        "training": {"max_epochs": epochs, "threads": 1, "progress": False, "seed": 0},
    }  # fmt: skip
    path = out / "train.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    print(f"baseline: {steps} optimizer steps = {epochs} epochs of {int(0.9 * args.calls)} frames")
    so3krates("train", str(path), *(["--resume"] if (out / "model" / "last.pt").exists() else []),
              log=out / "train.log")  # fmt: skip


def command_evaluate(args) -> None:
    targets = {
        "learn_best_member": final_dir() / "best.pt",
        "learn_committee": committee_dir(),
        "baseline": RUNS / "baseline" / "model" / "best.pt",
    }
    for name, model in targets.items():
        if not Path(model).exists():
            print(f"skip {name}: {model} missing")
            continue
        so3krates(
            "evaluate", "--model", str(model), "--data", str(DATA), "--out-dir", str(RUNS / f"eval_{name}"),
            "--dtype", "float32", "--threads", "1", "--overwrite", log=RUNS / f"eval_{name}.log",
        )  # fmt: skip


def command_committee_speed(args) -> None:
    """Energy + forces of the final committee against its best member, through the calculator."""
    import ase.io
    import torch

    from so3krates import So3kratesCalculator

    torch.set_num_threads(args.threads)
    atoms = ase.io.read(start_structure())
    times = {}
    for name, model in (("member", final_dir() / "best.pt"), ("committee", committee_dir())):
        atoms.calc = So3kratesCalculator(model, dtype="float32")
        atoms.get_forces()
        samples = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            for _ in range(50):
                atoms.positions += 1e-4
                atoms.get_forces()
            samples.append((time.perf_counter() - started) / 50)
        times[name] = float(np.median(samples))
    result = {**{f"{k}_ms": 1e3 * v for k, v in times.items()}, "ratio": times["committee"] / times["member"]}
    result["threads"] = args.threads
    (RUNS / "committee_speed.json").write_text(json.dumps(result, indent=2))
    print(result)


def command_kill_test(args) -> None:
    """A smaller loop run twice: once straight, once killed (SIGKILL) at random moments and rerun."""
    import yaml

    start_structure()
    config = yaml.safe_load(CONFIG.read_text())
    config["budget"] = {"max_labels": args.labels, "max_iterations": 2}
    config["committee"].update({"steps": 150, "first_steps": 300})
    config["exploration"].update({"time_ps": 0.5, "first_time_ps": 0.25})
    config["initial"].update({"n_frames": 20, "md_time_ps": 0.5})
    config["selection"]["labels_per_iteration"] = 30
    results = {}
    rng = random.Random(args.seed)
    for name in ("straight", "killed"):
        config["work_dir"] = str(RUNS / f"kill_{name}")
        path = RUNS / f"kill_{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        kills = []
        started = time.perf_counter()
        command = [sys.executable, "-m", "so3krates", "learn", str(path)]
        log = open(RUNS / f"kill_{name}.log", "a")
        if name == "killed":
            for _ in range(args.kills):
                delay = rng.uniform(5, results["straight"]["wall_s"] * 0.8 / args.kills)
                process = subprocess.Popen(command, env=ENV, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
                time.sleep(delay)
                if process.poll() is None:
                    process.send_signal(signal.SIGKILL)
                    process.wait()
                    kills.append(round(delay, 1))
        subprocess.run(command, env=ENV, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
        results[name] = {"wall_s": time.perf_counter() - started, "kills_after_s": kills}
    results.update(compare_runs(RUNS / "kill_straight", RUNS / "kill_killed"))
    (RUNS / "kill_test.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


def compare_runs(a: Path, b: Path) -> dict:
    import ase.io

    from so3krates.learn.reference import read_journal

    frames = [ase.io.read(p / "dataset.extxyz", ":") for p in (a, b)]
    same = len(frames[0]) == len(frames[1]) and all(
        np.array_equal(x.positions, y.positions) and x.info["REF_energy"] == y.info["REF_energy"]
        for x, y in zip(*frames, strict=True)
    )
    calls = []
    for run in (a, b):
        journals = sorted(run.glob("*/labels.jsonl"))
        calls.append(sum(len(read_journal(j)) for j in journals))
        # A repeated call shows as two journal lines with one index.
        repeats = 0
        for journal in journals:
            lines = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
            indices = [line["index"] for line in lines]
            repeats = max(repeats, max((indices.count(i) for i in set(indices)), default=0))
    return {
        "same_dataset": bool(same),
        "frames": [len(f) for f in frames],
        "reference_calls": calls,
        "max_journal_lines_per_call_killed_run": repeats,
    }


def command_report(args) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    run = RUNS / "run"
    rows = [json.loads(p.read_text()) for p in sorted(run.glob("iter_*/summary.json"))]
    final = json.loads((final_dir() / "summary.json").read_text())
    report = {"config": str(CONFIG.relative_to(ROOT)), "final": final, "iterations": rows}
    for name in ("learn_best_member", "learn_committee", "baseline", "learn_tol1.0"):
        metrics = RUNS / f"eval_{name}" / "metrics.json"
        if metrics.is_file():
            report[f"eval_{name}"] = json.loads(metrics.read_text())
    for name in ("validate/summary.json", "committee_speed.json", "kill_test.json", "learn_wall_s.json"):
        path = RUNS / name
        if path.is_file():
            report[name.split("/")[0].removesuffix(".json")] = json.loads(path.read_text())
    # Parts that do not depend on the loop's result (the baseline: when the step count is the same; the
    # committee's call cost; the kill test's smaller run) may come from the last report, marked as such.
    earlier_path = RESULTS / "ala_dipeptide.json"
    earlier = json.loads(earlier_path.read_text()) if earlier_path.is_file() else {}
    report["carried_over"] = dict(earlier.get("carried_over", {}))
    for name in ("eval_baseline", "committee_speed", "kill_test"):
        if name not in report and name in earlier:
            same_steps = name != "eval_baseline" or earlier["final"]["iterations"] == final["iterations"]
            if same_steps:
                report[name] = earlier[name]
                report["carried_over"].setdefault(name, earlier.get("date", "an earlier run"))
        elif name in report:
            report["carried_over"].pop(name, None)
    report["date"] = time.strftime("%Y-%m-%d")
    (RESULTS / "ala_dipeptide.json").write_text(json.dumps(report, indent=2))
    import shutil

    for picture in ("learning.png",):
        if (run / picture).is_file():
            shutil.copyfile(run / picture, RESULTS / picture)
    history = RUNS / "baseline" / "model" / "learning_curve.png"
    if history.is_file():
        shutil.copyfile(history, RESULTS / "baseline_history.png")
    if (RUNS / "eval_learn_committee" / "uncertainty.png").is_file():
        shutil.copyfile(RUNS / "eval_learn_committee" / "uncertainty.png", RESULTS / "uncertainty.png")
    (RESULTS / "ala_dipeptide.md").write_text(markdown(report))
    print((RESULTS / "ala_dipeptide.md").read_text())


def markdown(report: dict) -> str:
    """The tables of results/learn/ala_dipeptide.md from the collected JSON."""
    lines = ["# so3krates learn: alanine dipeptide from one structure (GFN2-xTB)", ""]
    final = report["final"]
    lines += [
        f"Config: `{report['config']}`. Stopped: **{final['reason']}** after {final['iterations']} "
        f"iteration(s), "
        f"{final['reference_calls']} reference calls, {final['elapsed_s'] / 60:.1f} min "
        f"({final['labelled_frames']} labelled frames).",
        "",
        "## Iterations",
        "",
        "| it | train | held-out | calls | held-out F MAE (committee / best member) meV/Å | α | σ* eV/Å "
        "| MD ps | replicas completed | max σ eV/Å | candidates | labelled | failed | wall min |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["iterations"]:
        mae = row.get("holdout_forces_mae")
        best = row.get("best_member_forces_mae")
        lines.append(
            f"| {row['iteration']} | {row['n_train']} | {row['n_holdout']} | {row['labels_used']} | "
            + (f"{mae:.1f} / {best:.1f}" if mae is not None else "—")
            + f" | {row['alpha']:.2f} | {row['threshold']:.3f} | {row.get('exploration_ps', '—')} | "
            f"{row['stable_replicas']}/{row['replicas']} | {row['max_force_uncertainty']:.3f} | "
            f"{row['n_candidates']} | {row['n_selected']} | {row['n_failed']} | {row['wall_s'] / 60:.1f} |"
        )
    lines += ["", "## On the shared 2000-frame trajectory (never seen by the loop)", ""]
    lines += ["| model | training frames | E MAE meV | F MAE meV/Å | F RMSE meV/Å |", "|---|---|---|---|---|"]
    last = final["last_iteration"]
    frames = {
        "learn_best_member": f"{final['labelled_frames']} labelled ({last['n_train']} train, "
        f"{last['n_holdout']} held out)",
        "learn_committee": "the same",
        "baseline": "400 xTB MD frames (360 train, 40 valid)",
        "learn_tol1.0": "40 labelled (max_force_error 1.0)",
    }
    for name in ("learn_best_member", "learn_committee", "baseline", "learn_tol1.0"):
        metrics = report.get(f"eval_{name}")
        if metrics:
            lines.append(
                f"| {name} | {frames[name]} | {metrics['energy_mae_meV']:.1f} | "
                f"{metrics['forces_mae_meV_per_A']:.1f} | {metrics['forces_rmse_meV_per_A']:.1f} |"
            )
    carried = report.get("carried_over", {})
    if carried:
        lines += [
            "",
            "Not re-run for this report (they do not depend on the loop's result; the baseline was trained "
            "for the same number of optimizer steps): "
            + ", ".join(f"{name} ({when})" for name, when in carried.items())
            + ".",
        ]
    committee = report.get("eval_learn_committee")
    if committee:
        lines += [
            "",
            f"Committee uncertainty vs true error on the 2000 frames: Spearman ρ = "
            f"{committee['spearman_force_uncertainty_vs_error']:.3f} (largest atomic force uncertainty vs "
            f"largest atomic force error per frame; mean over atoms "
            f"{committee.get('spearman_mean_force_uncertainty_vs_error', float('nan')):.3f}, all atoms "
            f"pooled "
            f"{committee.get('spearman_atomic_force_uncertainty_vs_error', float('nan')):.3f}), energy ρ = "
            f"{committee['spearman_energy_uncertainty_vs_error']:.3f} (`uncertainty.png`; why it is low: "
            "`committee_resampling.md`).",
        ]
    validate = report.get("validate")
    if validate:
        lines += [
            "",
            f"## Final model in MD: {validate['n_stable']}/{validate['replicas']} replicas stable "
            f"({validate['runs'][0].get('time_ps')} ps each requested), 500 K Langevin, float32",
            "",
        ]
        for run in validate["runs"]:
            lines.append(
                f"- seed {run['seed']}: {run['status']}, {run['time_ps']:.2f} ps, <T> "
                f"{run['mean_temperature_K']:.0f} K, {run['ns_per_day']:.2f} ns/day"
            )
    speed = report.get("committee_speed")
    if speed:
        lines += [
            "",
            f"Committee cost: {speed['committee_ms']:.2f} ms per energy + forces call of the 4-member "
            "committee "
            f"vs {speed['member_ms']:.2f} ms for one member (ratio {speed['ratio']:.2f}, "
            f"{speed['threads']} thread, calculator, 22 atoms, float32, medians).",
        ]
    kill = report.get("kill_test")
    if kill:
        lines += [
            "",
            f"Kill test: killed (SIGKILL) after {kill['killed']['kills_after_s']} s and rerun; same dataset "
            "as "
            f"the uninterrupted run: **{kill['same_dataset']}** (frames {kill['frames']}, reference calls "
            f"{kill['reference_calls']}; most journal lines for one call: "
            f"{kill['max_journal_lines_per_call_killed_run']}).",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run").set_defaults(run=command_run)
    validate = sub.add_parser("validate")
    validate.add_argument("--time-ps", type=float, default=20.0)
    validate.set_defaults(run=command_validate)
    baseline = sub.add_parser("baseline")
    baseline.add_argument("--calls", type=int, default=400)
    baseline.set_defaults(run=command_baseline)
    sub.add_parser("evaluate").set_defaults(run=command_evaluate)
    speed = sub.add_parser("committee-speed")
    speed.add_argument("--threads", type=int, default=1)
    speed.add_argument("--repeats", type=int, default=5)
    speed.set_defaults(run=command_committee_speed)
    kill = sub.add_parser("kill-test")
    kill.add_argument("--kills", type=int, default=3)
    kill.add_argument("--labels", type=int, default=80)
    kill.add_argument("--seed", type=int, default=0)
    kill.set_defaults(run=command_kill_test)
    sub.add_parser("report").set_defaults(run=command_report)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
