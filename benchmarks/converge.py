"""Ours trained to convergence on one rMD17 molecule, next to the SO3krates paper's published numbers.

    .venv/bin/python benchmarks/converge.py --molecule ethanol            # train (or resume), test, report
    .venv/bin/python benchmarks/converge.py --molecule ethanol --report   # report the run as it stands

The 15-minute table (`accuracy.py`) compares packages at equal cost; this one asks how far our model goes
when it may train until it stops improving. Same data protocol as `accuracy.py` (950 / 50 frames of
`train_01` with its seed-0 split, all 1000 frames of `test_01`), same model, loss, batch and precision
(`configs/rmd17_converge.yaml`); the schedule is reduce-on-plateau and the run ends after 150 epochs without
a better validation loss or after `--hours`. It runs for hours on one thread: no machine-wide lock (it is
not a timed comparison), and a stopped run resumes where its last checkpoint ended (`so3krates train
--resume`, exact), so it may be spread over several sittings. `--report` tests the current best weights
(`so3krates evaluate`, one thread, about half a minute) and writes `results/converge_<molecule>.{json,md,png}`
while the training goes on; a report of a run that has not stopped says so.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import shlex
import subprocess
from pathlib import Path

import yaml
from accuracy import (
    BENCH,
    MOLECULES,
    ROOT,
    TEST_METRICS,
    _git_commit,
    data_files,
    machine_info,
    make_split,
    our_train_command,
    save_figure,
    write_atomically,
)

CONFIG = BENCH / "configs" / "rmd17_converge.yaml"
PYTHON = ROOT / ".venv" / "bin" / "python"

#: The SO3krates paper's rMD17 test errors (energy MAE meV, force MAE meV/Å) by molecule, with PAPER_SOURCE
#: naming the table. Not filled in yet: the paper's result tables (Frank et al., Nat. Commun. 15, 6539
#: (2024); arXiv:2309.15126) could not be read from this offline machine (4 December 2026), and numbers from
#: memory do not go into a comparison. The report then shows ours alone and says so.
PAPER: dict[str, dict[str, float]] = {}
PAPER_SOURCE = ""


def train(molecule: str, run_dir: Path, hours: float) -> list[str]:
    """Train, or resume the run in ``run_dir``; returns the command."""
    train_file, _ = data_files(molecule)
    train_dir = run_dir / "train"
    command = our_train_command(CONFIG, molecule, run_dir, make_split(train_file), 3600.0 * hours)
    if (train_dir / "last.pt").is_file():
        command.append("--resume")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    with open(run_dir / "train_log.txt", "a") as log:
        log.write(f"\n[{datetime.datetime.now():%Y-%m-%d %H:%M}] $ {shlex.join(command)}\n")
        log.flush()
        status = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if status != 0:
        raise SystemExit(
            f"converge.py: training failed (exit status {status}); see {run_dir / 'train_log.txt'}"
        )
    return command


def evaluate(molecule: str, run_dir: Path) -> tuple[dict, list[str]]:
    """Test metrics of the run's best weights on all frames of the molecule's test file."""
    _, test_file = data_files(molecule)
    metrics_path = run_dir / "test_metrics.json"
    command = [str(PYTHON), "-m", "so3krates", "evaluate", "--model", str(run_dir / "train" / "best.pt")]
    command += ["--data", str(test_file), "--energy-unit", "kcal/mol", "--json", str(metrics_path)]
    command += ["--out-dir", str(run_dir / "test"), "--threads", "1", "--overwrite"]
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"converge.py: evaluation failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(metrics_path.read_text()), command


def history(train_dir: Path) -> list[dict]:
    with open(train_dir / "metrics.csv") as handle:
        return [
            {
                "epoch": int(row["epoch"]),
                "hours": float(row["time_s"]) / 3600.0,
                "lr": float(row["lr"]),
                "valid_energy_mae_meV": float(row["valid_energy_mae_meV"]),
                "valid_forces_mae_meV_per_A": float(row["valid_forces_mae_meV_per_A"]),
                "valid_loss": float(row["valid_loss"]),
            }
            for row in csv.DictReader(handle)
        ]


#: How the trainer's log says that it was stopped by a signal (a clean checkpoint; the run can be resumed).
INTERRUPTED = "stopped by signal"


def stop_reason(log: Path) -> str | None:
    """Why the last training process stopped, from its log; None while it runs (or after a kill)."""
    if not log.is_file():
        return None
    reason = None
    for line in log.read_text().splitlines():
        if line.startswith("[") and "$ " in line:
            reason = None  # a later process: its own stop counts
        elif line.startswith(("time budget of", "early stopping", "finished ", INTERRUPTED)):
            reason = line.strip()
    return reason


def fifteen_minutes(molecule: str) -> dict | None:
    """Ours in the 15-minute table of `accuracy.py`, for the same molecule."""
    path = BENCH / "results" / f"accuracy_{molecule}.json"
    if not path.is_file():
        return None
    entry = json.loads(path.read_text()).get("models", {}).get("so3krates")
    return entry.get("test") if entry else None


def report(molecule: str, run_dir: Path, out_dir: Path, commands: dict) -> dict:
    train_dir = run_dir / "train"
    rows = history(train_dir)
    reason = stop_reason(run_dir / "train_log.txt")
    metrics, evaluate_command = evaluate(molecule, run_dir)
    best = min(rows, key=lambda r: r["valid_loss"])
    config = yaml.safe_load((train_dir / "config.yaml").read_text())
    stopped = reason is not None and not reason.startswith(INTERRUPTED)
    floor = float(config["training"].get("min_learning_rate", 0.0))
    out = {
        "benchmark": "ours trained to convergence on rMD17",
        "molecule": molecule,
        "date": f"{datetime.date.today()}",
        "commit": _git_commit(),
        "machine": machine_info(),
        "finished": stopped,
        "stop_reason": reason or "still training (report of the run so far)",
        "epochs": rows[-1]["epoch"],
        "train_hours": rows[-1]["hours"],
        "best_epoch": best["epoch"],
        "final_learning_rate": rows[-1]["lr"],
        "learning_rate_at_floor": rows[-1]["lr"] <= floor * (1 + 1e-6),
        "test": {k: metrics[k] for k in TEST_METRICS},
        "fifteen_minutes": fifteen_minutes(molecule),
        "paper": PAPER.get(molecule),
        "paper_source": PAPER_SOURCE,
        "commands": {**commands, "evaluate": shlex.join(evaluate_command)},
        "settings": {k: config[k] for k in ("model", "loss", "training")},
        "learning_curve": rows,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(out_dir / f"converge_{molecule}.json", json.dumps(out, indent=2) + "\n")
    write_atomically(out_dir / f"converge_{molecule}.md", markdown(out))
    plot(out, out_dir / f"converge_{molecule}.png")
    return out


def markdown(r: dict) -> str:
    t = r["test"]
    interrupted = r["stop_reason"].startswith(INTERRUPTED)
    if r["finished"]:
        state = f"stopped: {r['stop_reason']}"
    elif interrupted:
        state = f"{r['stop_reason']} (a clean checkpoint; the same command resumes it)"
        if r.get("learning_rate_at_floor"):
            state += ", with the learning rate at its floor"
    else:
        state = "**still training**: the numbers of the run so far"
    lines = [
        f"# rMD17 {r['molecule']}: ours trained to convergence",
        "",
        f"{r['date']}, commit {r['commit']}, {r['machine'].get('cpu', '?')}, 1 thread, float32; "
        f"`python benchmarks/converge.py --molecule {r['molecule']}` (config `configs/rmd17_converge.yaml`). "
        f"{r['epochs']} epochs in {r['train_hours']:.2f} h of training, best validation at epoch "
        f"{r['best_epoch']}, learning rate now {r['final_learning_rate']:.2g}; {state}.",
        "",
        "| model | training | energy MAE (meV) | force MAE (meV/Å) |",
        "|---|---|---:|---:|",
        f"| ours, this run | {r['train_hours']:.2f} h | {t['energy_mae_meV']:.2f} "
        f"| {t['forces_mae_meV_per_A']:.2f} |",
    ]
    if r["fifteen_minutes"]:
        f = r["fifteen_minutes"]
        lines.append(
            f"| ours, equal-budget table (`accuracy_{r['molecule']}.md`) | 15 min "
            f"| {f['energy_mae_meV']:.2f} "
            f"| {f['forces_mae_meV_per_A']:.2f} |"
        )
    if r["paper"]:
        p = r["paper"]
        lines.append(
            f"| SO3krates, published | to convergence | {p['energy_mae_meV']:g} "
            f"| {p['forces_mae_meV_per_A']:g} |"
        )
    source = r["paper_source"] or (
        "not recorded yet: the paper's tables (Frank et al., Nat. Commun. 15, 6539 (2024)) could not be read "
        "from the offline machine this ran on; `PAPER` in `converge.py` takes them with their table number"
    )
    lines += ["", f"Published numbers: {source}.", ""]
    lines.append(
        "Test: all 1000 frames of `test_01`; MAE of the energy per structure and of every force component."
    )
    if not r["finished"] and not interrupted:
        lines += [
            "",
            "While it runs, this run can trail the 15-minute one: its learning rate stays at its start value "
            "until the validation loss stalls, where the 15-minute run's exponential decay is aimed at 15 "
            "minutes.",
        ]
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = r["learning_curve"]
    hours = [x["hours"] for x in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(hours, [x["valid_forces_mae_meV_per_A"] for x in rows], label="validation force MAE (50 frames)")
    ax.plot(hours, [x["valid_energy_mae_meV"] for x in rows], label="validation energy MAE (meV)", alpha=0.7)
    ax.axhline(
        r["test"]["forces_mae_meV_per_A"], color="k", ls="--", lw=1, label="test force MAE, best weights"
    )
    if r["paper"]:
        ax.axhline(
            r["paper"]["forces_mae_meV_per_A"], color="C3", ls=":", lw=1.5, label="SO3krates, published"
        )
    ax.set_xlabel("training time (h, 1 thread)")
    ax.set_ylabel("MAE (meV/Å; energy: meV)")
    ax.set_yscale("log")
    ax.set_title(f"rMD17 {r['molecule']}: ours to convergence")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--molecule", default="ethanol", choices=MOLECULES)
    parser.add_argument("--hours", type=float, default=10.0, help="training wall time in all (resumes count)")
    parser.add_argument("--report", action="store_true", help="test and report the run as it stands")
    parser.add_argument("--runs-dir", type=Path, default=BENCH / "runs" / "converge")
    parser.add_argument("--out-dir", type=Path, default=BENCH / "results")
    args = parser.parse_args(argv)
    if not args.hours > 0:
        parser.error(f"--hours must be positive, got {args.hours}")
    run_dir = args.runs_dir / args.molecule
    commands = {}
    if not args.report:
        commands["train"] = shlex.join(train(args.molecule, run_dir, args.hours))
    elif not (run_dir / "train" / "metrics.csv").is_file():
        raise SystemExit(f"converge.py: no run in {run_dir / 'train'} to report; start one without --report")
    out = report(args.molecule, run_dir, args.out_dir, commands)
    t = out["test"]
    print(
        f"{args.molecule}: test force MAE {t['forces_mae_meV_per_A']:.2f} meV/Å, energy MAE "
        f"{t['energy_mae_meV']:.2f} meV after {out['train_hours']:.2f} h ({out['epochs']} epochs)"
        + ("" if out["finished"] else f", {out['stop_reason']}")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
