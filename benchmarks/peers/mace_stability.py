"""Stability of a MACE model in Langevin MD, with the protocol of `ala_dipeptide.py stability`.

Runs inside `benchmarks/.envs/mace-torch`, with `so3krates` installed there without its dependencies
(`pip install --no-deps -e .` plus pydantic and vesin; see benchmarks/README.md). The forces come from MACE's
own ASE calculator (`mace.calculators.MACECalculator`, float64, CPU); everything else is the code path of
`so3krates md`: the same `MDConfig` (defaults included), start frame, seeds (replica k: seed 0 + k),
Maxwell–Boltzmann velocities rescaled to the target over 3N − 3 degrees of freedom, ASE Langevin with
`FixCom`, stability monitor (checked every 10 steps), thermo log and per-replica `summary.json`. For that
the runner drives `so3krates.md.run.Trajectory` directly: it takes any ASE calculator, so the loop is not
copied and the two protocols cannot drift apart.

Two processes may share the work: each claims the next unclaimed (temperature, replica) in order and
rewrites the temperature's `summary.json` after every replica it finishes. `--stop-at HH:MM` (UTC) stops
the current replica cleanly at that time (status "interrupted", resumable with `--restart`) and starts no
new one; interrupted replicas are listed apart from the survival statistics. `--restart` with a longer
`--time-ps` extends the replicas that stayed stable (exactly, from their `restart.npz`); those that broke
apart keep their failure. Two workers finishing at
the same moment can each miss the other's replica, so `--summarise-only` rewrites the summaries at the end.

    python mace_stability.py --model M.model --structure data.extxyz --out runs/ala_dipeptide/stability \
        --temperatures 700,500 --time-ps 10 --replicas 4 [--stop-at 09:55]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import threading
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="MACE model file (torch.save of the module)")
    parser.add_argument("--structure", required=True)
    parser.add_argument("--frame", type=int, default=0)
    parser.add_argument("--out", required=True, help="folder of the mace_<T>K run directories")
    parser.add_argument("--name", default="mace", help="prefix of the run directories")
    parser.add_argument("--temperatures", default="700,500", help="K, in the order they are run")
    parser.add_argument("--time-ps", type=float, default=10.0)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--friction", type=float, default=0.01, help="1/fs")
    parser.add_argument("--timestep", type=float, default=0.5, help="fs")
    parser.add_argument("--stop-at", default=None, help="HH:MM UTC: stop cleanly then")
    parser.add_argument(
        "--restart", action="store_true", help="continue interrupted replicas, start unbegun ones"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--summarise-only", action="store_true", help="rewrite the summaries, run nothing")
    return parser.parse_args(argv)


def seconds_until(hh_mm: str) -> float:
    now = datetime.datetime.now(datetime.timezone.utc)
    hour, minute = (int(x) for x in hh_mm.split(":"))
    return (now.replace(hour=hour, minute=minute, second=0, microsecond=0) - now).total_seconds()


def claim(directory: Path, restart: bool, total_steps: int) -> bool:
    """True if this process may run `directory` (first to create its claim file, or a restart of it).

    A restart's claim names the number of steps asked for: extending finished replicas to a longer time
    is a new round of claims.
    """
    directory.mkdir(parents=True, exist_ok=True)
    name = f"claim_restart_{total_steps}" if restart else "claim"
    try:
        os.close(os.open(directory / name, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False
    return True


def summarise(config_dir: Path, total_time_ps: float) -> None:
    """The temperature's `summary.json` from every finished replica's `summary.json` (any process's)."""
    from so3krates.md import output
    from so3krates.md.stability import StabilityFailure
    from so3krates.md.summary import TrajectoryResult, replica_summary

    finished, interrupted = [], []
    for path in sorted(config_dir.glob("replica_*/summary.json")):
        entry = json.loads(path.read_text())
        short = entry["status"] == "completed" and entry["time_ps"] < total_time_ps - 1e-9
        if entry["status"] == "interrupted" or short:
            # Stopped by a deadline, or stable to the end of a shorter run that is not yet extended:
            # stable so far, listed apart from the survival statistics.
            interrupted.append({"directory": str(path.parent), **entry, "status": "interrupted"})
            continue
        own = set(TrajectoryResult.__dataclass_fields__) | {"stable", "failure_time_ps"}
        own |= {"conserved_energy_drift_eV_per_atom_per_ps"}
        finished.append(
            TrajectoryResult(
                directory=path.parent,
                seed=entry["seed"],
                status=entry["status"],
                steps_done=entry["steps_done"],
                time_ps=entry["time_ps"],
                failure=StabilityFailure(**entry["failure"]) if entry["failure"] else None,
                last_good_step=entry["last_good_step"],
                mean_temperature_K=entry["mean_temperature_K"],
                drift_eV_per_atom_per_ps=entry["conserved_energy_drift_eV_per_atom_per_ps"],
                wall_time_s=entry["wall_time_s"],
                ns_per_day=entry["ns_per_day"],
                restarted_from_step=entry["restarted_from_step"],
                extra={key: value for key, value in entry.items() if key not in own},
            )
        )
    if finished:
        summary = replica_summary(finished, total_time_ps)
    else:
        summary = {"replicas": 0, "runs": []}
    summary["interrupted"] = interrupted
    summary["calculator"] = "mace.calculators.MACECalculator (float64, cpu)"
    output.write_json(config_dir / "summary.json", summary)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    from mace.calculators import MACECalculator

    from so3krates.md import output
    from so3krates.md.config import MDConfig
    from so3krates.md.run import Trajectory, find_states, read_structure

    atoms = read_structure(Path(args.structure), args.frame)
    for temperature in args.temperatures.split(","):
        config = MDConfig(
            model=Path(args.model),
            structure=Path(args.structure),
            frame=args.frame,
            ensemble="langevin",
            temperature_K=float(temperature),
            friction_per_fs=args.friction,
            timestep_fs=args.timestep,
            time_ps=args.time_ps,
            replicas=args.replicas,
            dtype="float64",
            threads=args.threads,
            trajectory_every=200,
            thermo_every=20,
            output_dir=Path(args.out) / f"{args.name}_{temperature}K",
            progress=False,
        )
        if args.summarise_only:
            summarise(config.output_dir, config.total_steps * config.timestep_fs / 1000)
            continue
        output.write_json(config.output_dir / "config.json", config.model_dump(mode="json"))
        for k in range(config.replicas):
            if args.stop_at and seconds_until(args.stop_at) <= 0:
                print(f"{args.stop_at} UTC reached: no new replica", flush=True)
                return 0
            directory = config.output_dir / f"replica_{k:03d}"
            done = directory / "summary.json"
            if args.restart and done.is_file():
                previous = json.loads(done.read_text())
                if previous["status"] == "unstable" or previous["steps_done"] >= config.total_steps:
                    continue  # broke apart (it stays so), or already as long as asked: nothing to continue
            if not claim(directory, args.restart, config.total_steps):
                print(f"{directory}: claimed by another worker (a stale claim_* file? remove it)", flush=True)
                continue
            # --restart continues interrupted replicas and starts the ones never begun
            (state,) = find_states([directory], args.restart and (directory / "restart.npz").is_file())
            calculator = MACECalculator(model_paths=args.model, device="cpu", default_dtype="float64")
            print(f"{temperature} K, replica {k} (seed {config.seed + k}) → {directory}", flush=True)
            trajectory = Trajectory(config, atoms, calculator, directory, config.seed + k, state, print)
            timer = None
            if args.stop_at:
                reason = f"stopped at {args.stop_at} UTC (deadline)"
                timer = threading.Timer(seconds_until(args.stop_at), trajectory._request_stop, (reason,))
                timer.daemon = True
                timer.start()
            result = trajectory.run()
            if timer is not None:
                timer.cancel()
            steps = result.steps_done - (result.restarted_from_step or 0)
            print(
                f"{temperature} K, replica {k}: {result.status} at {result.time_ps:g} ps, "
                f"{steps / result.wall_time_s:.1f} steps/s",
                flush=True,
            )
            summarise(config.output_dir, config.total_steps * config.timestep_fs / 1000)
    return 0


if __name__ == "__main__":
    sys.exit(main())
