"""What the command-line peer runners share: rMD17 data as extxyz, a watched peer process with a budget.

`so3krates_torch_cli_rmd17.py` and `mace_cli_rmd17.py` train a peer through its own training command.
Neither command has a wall-clock limit, so the runner starts it, watches its log, and stops it by signal
when the budget is over (SIGINT, then SIGTERM and SIGKILL after grace periods); what survives is the
peer's best checkpoint, which the peer's own restart option then turns into its final model. Both
packages log in the same format (so3krates-torch's training code derives from MACE's): time-stamped lines
`YYYY-mm-dd HH:MM:SS.fff INFO: ...`, a line per validation (`Initial: head: ...` / `Epoch N: head: ...`)
and a JSON-lines metrics file with `loss`, `mae_e`, `mae_f` per validation.

Runs in the main `.venv` (numpy, ase, yaml); the peers run in their own environments as subprocesses.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

PROG = Path(sys.argv[0]).name
TIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f"  # the peers' log time stamps (local time)
VALID_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) INFO: (?:Initial|Epoch (\d+)): head: ")
TERM_GRACE_SECONDS = 15.0


def fail(message: str) -> SystemExit:
    return SystemExit(f"{PROG}: {message}")


try:  # the main venv's packages; a clear line instead of a traceback elsewhere
    import numpy as np
    from ase import Atoms, units
    from ase.io import read, write
except ImportError as error:
    raise fail(f"{error}; run it with the main venv (.venv/bin/python)") from None

EV_PER_KCAL_MOL = units.kcal / units.mol


# ------------------------------------------------------------------------------------------------ data


def centred(coords: np.ndarray) -> np.ndarray:
    """Each molecule moved to its centroid: (frames, atoms, 3) Å, float64.

    rMD17 benzene lies ~20 Å from the origin. so3krates-torch (0.2.1) and MACE (0.3.16) put a molecule into a
    box built from its largest absolute coordinate before their neighbour lists, which then took 15 minutes
    for benzene's 950 training frames (4 December) against seconds for molecules near the origin. A
    translation changes no energy or force of an isolated molecule, so every peer gets the molecules centred.
    """
    coords = np.asarray(coords, dtype=float)
    return coords - coords.mean(axis=1, keepdims=True)


def write_frames(npz_path: Path, indices: list[int] | None, xyz_path: Path) -> int:
    """rMD17 frames as extxyz with REF_energy (eV) and REF_forces (eV/Å), each molecule at its centroid
    (`centred`); returns the number written.

    Both peers read these keys by default (kcal/mol → eV with ase.units.kcal / ase.units.mol).
    """
    data = np.load(npz_path)
    numbers = data["nuclear_charges"].astype(int)
    frames = range(len(data["energies"])) if indices is None else indices
    positions = centred(data["coords"])
    atoms_list = []
    for k in frames:
        atoms = Atoms(numbers=numbers, positions=positions[k], pbc=False)
        atoms.info["REF_energy"] = float(data["energies"][k]) * EV_PER_KCAL_MOL
        atoms.arrays["REF_forces"] = np.asarray(data["forces"][k], dtype=float) * EV_PER_KCAL_MOL
        atoms_list.append(atoms)
    write(xyz_path, atoms_list, format="extxyz")
    return len(atoms_list)


def npz_reference(npz_path: Path) -> dict[str, np.ndarray]:
    """Positions (Å, centred as `write_frames` writes them), energies (eV) and forces (eV/Å) of every frame
    of an rMD17 file."""
    data = np.load(npz_path)
    return {
        "positions": centred(data["coords"]),
        "energy": data["energies"] * EV_PER_KCAL_MOL,
        "forces": data["forces"] * EV_PER_KCAL_MOL,
    }


def xyz_reference(xyz_path: Path) -> dict[str, np.ndarray]:
    """Positions, energies and forces of an extxyz file written with REF_energy / REF_forces."""
    frames = read(xyz_path, index=":", format="extxyz")
    return {
        "positions": np.stack([a.positions for a in frames]),
        "energy": np.array([a.info["REF_energy"] for a in frames]),
        "forces": np.stack([a.arrays["REF_forces"] for a in frames]),
    }


def test_errors(predictions: Path, reference: dict, energy_key: str, forces_key: str) -> dict:
    """Energy MAE per structure (meV) and force MAE per component (meV/Å) of a peer's predictions file.

    `predictions` is the extxyz a peer's evaluation command writes, with the predicted energy in
    `info[energy_key]` and forces in `arrays[forces_key]`, frames in the order of `reference`
    (`npz_reference` / `xyz_reference`); the positions are checked to be the reference's.
    """
    frames = read(predictions, index=":", format="extxyz")
    if len(frames) != len(reference["energy"]):
        raise fail(f"{predictions} has {len(frames)} frames, the test set {len(reference['energy'])}")
    if not np.allclose(np.stack([a.positions for a in frames]), reference["positions"], atol=1e-6):
        raise fail(f"{predictions}: the frames are not the test frames in order")
    missing = [k for k, a in enumerate(frames) if energy_key not in a.info or forces_key not in a.arrays]
    if missing:
        raise fail(f"{predictions}: frame {missing[0]} lacks {energy_key!r} or {forces_key!r}")
    energy_error = np.array([a.info[energy_key] for a in frames]) - reference["energy"]
    force_error = np.stack([a.arrays[forces_key] for a in frames]) - reference["forces"]
    return {
        "n_frames": len(frames),
        "energy_mae_meV": float(np.mean(np.abs(energy_error)) * 1e3),
        "energy_rmse_meV": float(np.sqrt(np.mean(energy_error**2)) * 1e3),
        "forces_mae_meV_per_A": float(np.mean(np.abs(force_error)) * 1e3),
        "forces_rmse_meV_per_A": float(np.sqrt(np.mean(force_error**2)) * 1e3),
    }


# ------------------------------------------------------------------------------------------ processes


def peer_env_vars(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        OMP_WAIT_POLICY="PASSIVE",
        PYTHONUNBUFFERED="1",
    )
    return env


def log_time(stamp: str) -> float:
    """Epoch seconds of one of the peers' log time stamps."""
    return datetime.datetime.strptime(stamp, TIME_FORMAT).timestamp()


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def stop(process: subprocess.Popen, grace: float) -> list[dict]:
    """SIGINT; SIGTERM after `grace` s; SIGKILL after TERM_GRACE_SECONDS more. Returns what was sent."""
    sent = []
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, TERM_GRACE_SECONDS), (signal.SIGKILL, None)):
        if process.poll() is not None:
            break
        t_sent = time.time()
        process.send_signal(sig)
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            sent.append({"signal": sig.name, "exited_after_s": None})
            continue
        sent.append({"signal": sig.name, "exited_after_s": round(time.time() - t_sent, 3)})
        break
    return sent


def run_watched(
    command: list[str],
    log_path: Path,
    cwd: Path,
    env: dict[str, str],
    budget_seconds: float | None,
    grace: float,
    loop_marker: str | None = None,
    abort_marker: str | None = None,
    timeout: float = 3600.0,
    ready: Callable[[], bool] | None = None,
    extend_to: float | None = None,
) -> dict:
    """Run `command` with output to `log_path`, watching the log.

    With `budget_seconds`, the clock starts at the first line containing `loop_marker` (at its time stamp;
    at the start of the process when there is no marker, or while the marker has not appeared) and the
    process is stopped with `stop` when the budget is over. With `ready`, a process that is not ready at
    the budget (e.g. no checkpoint yet) runs on until it is, or until `extend_to` seconds. A line with
    `abort_marker` stops the process at once.
    """
    cpu_before = children_cpu_seconds()
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(command) + "\n")
        log.flush()
        t_start = time.time()
        process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    record: dict = {"started": t_start, "loop_started": None, "signals": [], "stopped_by": None}
    if loop_marker is None:
        record["loop_started"] = t_start
    offset, pending = 0, ""
    try:
        while process.poll() is None:
            time.sleep(0.5)
            with open(log_path) as handle:
                handle.seek(offset)
                chunk = handle.read()
                offset = handle.tell()
            lines = (pending + chunk).split("\n")
            pending = lines.pop()
            for line in lines:
                if record["loop_started"] is None and loop_marker in line:
                    record["loop_started"] = log_time(line[:23])
                if abort_marker is not None and abort_marker in line and record["stopped_by"] is None:
                    record["signals"] = stop(process, grace=0.0)
                    record["stopped_by"] = f"log line {abort_marker!r}"
            now = time.time()
            if record["stopped_by"] is None and now - t_start > timeout:
                record["signals"] = stop(process, grace)
                record["stopped_by"] = f"timeout {timeout:.0f} s"
            elapsed = now - (record["loop_started"] or t_start)
            if record["stopped_by"] is None and budget_seconds is not None and elapsed >= budget_seconds:
                is_ready = ready is None or ready()
                if is_ready or elapsed >= (extend_to or budget_seconds):
                    record["signals"] = stop(process, grace)
                    record["stopped_by"] = "budget" if is_ready else "budget (never ready)"
                    record["budget_overrun_s"] = round(elapsed - budget_seconds, 3)
    except KeyboardInterrupt:
        stop(process, grace=5.0)
        raise fail("interrupted; the peer process was stopped") from None
    process.wait()
    record["ended"] = time.time()
    record["returncode"] = process.returncode
    record["cpu_seconds"] = children_cpu_seconds() - cpu_before
    return record


def log_tail(path: Path, n: int = 15) -> str:
    return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-n:])


def peer_versions(python: Path, package: str) -> dict[str, str]:
    """Versions of `package`, torch and Python in a peer's environment."""
    code = (
        "from importlib.metadata import version; import json, platform; "
        f"print(json.dumps({{{package!r}: version({package!r}), 'torch': version('torch'), "
        "'python': platform.python_version()}))"
    )
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    if result.returncode != 0:
        raise fail(
            f"cannot read the package version with {python}: {result.stderr.strip().splitlines()[-1:]}"
        )
    return json.loads(result.stdout)


def count_parameters(python: Path, model_path: Path) -> int | None:
    """Parameters of a peer's saved model (a pickled torch module), counted in the peer's environment."""
    code = (
        "import sys, torch; m = torch.load(sys.argv[1], map_location='cpu', weights_only=False); "
        "print(sum(p.numel() for p in m.parameters()))"
    )
    out = subprocess.run([str(python), "-c", code, str(model_path)], capture_output=True, text=True)
    text = out.stdout.strip().splitlines()[-1:] if out.returncode == 0 else []
    return int(text[0]) if text and text[0].isdigit() else None


# ---------------------------------------------------------------------------------- config and outputs


def fill_placeholders(template: str, values: dict[str, object]) -> str:
    """The template with every ${NAME} replaced by a YAML scalar (strings as JSON, i.e. double-quoted)."""

    def scalar(match: re.Match) -> str:
        name = match.group(1)
        if name not in values:
            raise fail(f"the config has a placeholder ${{{name}}} that the runner does not fill")
        return json.dumps(values[name])

    return re.sub(r"\$\{(\w+)\}", scalar, template)


def latest_checkpoint(
    checkpoints_dir: Path, tag: str, suffix: str = "", set_aside: bool = False
) -> tuple[Path, int] | None:
    """The peer's complete checkpoint `<tag>_epoch-N<suffix>.pt` with the highest N (with keep_checkpoints
    false and only improvements saved: the best one) and N. MACE's Stage Two checkpoints have the suffix
    `_swa`.

    Both peers write checkpoints with `torch.save`, a zip archive whose directory comes last: a file the
    stop cut short is not a zip file and is skipped. The peers' own restart options take the highest N
    whatever its state (MACE then logs "Loading checkpoint", fails to load it and trains from scratch), so
    once the peer has stopped, `set_aside` renames such a file to `<name>.incomplete`.
    """
    found = []
    for path in checkpoints_dir.glob(f"{tag}_epoch-*{suffix}.pt"):
        match = re.fullmatch(rf"{re.escape(tag)}_epoch-(\d+){re.escape(suffix)}\.pt", path.name)
        if match:
            found.append((int(match.group(1)), path))
    for epoch, path in sorted(found, reverse=True):
        if zipfile.is_zipfile(path):
            return path, epoch
        if set_aside:
            path.rename(path.with_name(path.name + ".incomplete"))
    return None


def learning_curve(log_path: Path, valid_metrics_path: Path, t0: float) -> list[dict]:
    """Validation errors per epoch (the peer's JSON lines) with wall time since `t0` (its log lines)."""
    stamps: dict[int | None, float] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        match = VALID_LINE.match(line)
        if match:
            epoch = None if match.group(2) is None else int(match.group(2))
            stamps[epoch] = log_time(match.group(1))
    curve = []
    if not valid_metrics_path.exists():
        return curve
    for line in valid_metrics_path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the interrupt
            continue
        if entry.get("mode", "eval") != "eval" or "mae_f" not in entry:  # MACE also logs every batch
            continue
        epoch = entry.get("epoch")
        stamp = stamps.get(epoch)
        curve.append(
            {
                "epoch": epoch,  # the peer's index (0: after the first epoch; None: before training)
                "epochs_completed": 0 if epoch is None else epoch + 1,
                "wall_s": None if stamp is None else round(stamp - t0, 3),
                "valid_loss": entry.get("loss"),
                "valid_mae_e_meV": 1e3 * entry["mae_e"],
                "valid_mae_f_meV_per_A": 1e3 * entry["mae_f"],
            }
        )
    return curve


# ---------------------------------------------------------------------------------- the runners' steps


def add_common_arguments(parser, peer: str, eval_tool: str, default_env: Path, default_config: Path | None):
    """The options every command-line peer runner has."""
    parser.add_argument("--molecule", default="ethanol", help="rMD17 molecule (default: ethanol)")
    parser.add_argument("--budget-minutes", type=float, default=15.0, help="training wall time (default 15)")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the peer (default 2)")
    parser.add_argument("--out", default=None, help="run folder (default: benchmarks/runs/peers/...)")
    parser.add_argument("--seed", type=int, default=0, help="the peer's training seed (default 0)")
    parser.add_argument(
        "--config", default=None if default_config is None else str(default_config), help="YAML template"
    )
    parser.add_argument("--peer-env", default=str(default_env), help=f"{peer} environment")
    parser.add_argument(
        "--grace-seconds",
        type=float,
        default=5.0,
        help="wait after SIGINT before SIGTERM (default 5; the best checkpoint is already on disk)",
    )
    parser.add_argument("--eval-batch-size", type=int, default=50, help=f"{eval_tool} --batch_size")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")


def check_common_arguments(args, default_out: Path, rmd17: bool = True) -> None:
    """Fills in --out and refuses bad values, one line each, before anything is written.

    With `rmd17`, `args.molecule` must name an rMD17 molecule whose train and test files exist.
    """
    if rmd17:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from accuracy import data_files

        try:
            data_files(args.molecule)
        except SystemExit as error:  # accuracy.py's one line, with this runner's name instead
            raise fail(str(error).split(": ", 1)[-1]) from None
    if args.out is None:
        args.out = str(default_out)
    if (Path(args.out) / "result.json").exists() and not args.overwrite:
        raise fail(f"{args.out}: holds an earlier run (result.json); pass --overwrite to replace it")
    if not args.budget_minutes > 0:
        raise fail(f"--budget-minutes must be positive, got {args.budget_minutes}")
    if args.threads < 1:
        raise fail(f"--threads must be at least 1, got {args.threads}")


def check_peer(peer_env: str, tools: tuple[str, ...], config: str) -> tuple[Path, Path]:
    """The peer's bin folder and the config template, or one line saying what is missing."""
    peer_bin = Path(peer_env) / "bin"
    for tool in ("python", *tools):
        if not os.access(peer_bin / tool, os.X_OK):
            raise fail(
                f"{peer_bin / tool} not found: set up the peer venv (python benchmarks/accuracy.py --setup)"
            )
    template = Path(config)
    if not template.is_file():
        raise fail(f"config {template} not found")
    return peer_bin, template


def fresh_run_dir(out: Path) -> tuple[Path, Path]:
    """`<out>/train` emptied (a stale checkpoint there would be taken as this run's best) and `<out>/data`."""
    work = out / "train"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    data_dir = out / "data"
    data_dir.mkdir(exist_ok=True)
    return work, data_dir


def write_rmd17_split(molecule: str, data_dir: Path) -> dict:
    """The benchmark's shared split of an rMD17 molecule as train/valid/test extxyz in `data_dir`."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from accuracy import data_files, make_split  # the split every model of the benchmark uses

    train_npz, test_npz = data_files(molecule)
    split = make_split(train_npz)
    files = {part: data_dir / f"{part}.xyz" for part in ("train", "valid", "test")}
    n_frames = {
        "train": write_frames(train_npz, split["train"], files["train"]),
        "valid": write_frames(train_npz, split["valid"], files["valid"]),
        "test": write_frames(test_npz, None, files["test"]),
    }
    return {
        "files": files,
        "reference": npz_reference(test_npz),
        "record": {
            "train_file": str(train_npz),
            "test_file": str(test_npz),
            "split_seed": split["seed"],
            "n_frames": n_frames,
            "units": f"eV, eV/Å (1 kcal/mol = ase.units.kcal / ase.units.mol = {EV_PER_KCAL_MOL:.10f} eV)",
            "keys": {"energy": "info['REF_energy']", "forces": "arrays['REF_forces']"},
        },
    }


def training_record(run: dict, curve: list[dict], checkpoint: Path, best_epoch: int, tool: str) -> dict:
    """The `training` part of a result: times, how it stopped, epochs, best checkpoint, learning curve."""
    t_loop = run["loop_started"]
    return {
        "setup_seconds": round(t_loop - run["started"], 3),
        "train_seconds": round(run["ended"] - t_loop, 3),
        "wall_seconds": round(run["ended"] - run["started"], 3),
        "cpu_seconds": round(run["cpu_seconds"], 3),
        "stopped_by": run["stopped_by"] or f"{tool} finished by itself",
        "signals": run["signals"],
        "returncode": run["returncode"],
        "epochs_completed": max((c["epochs_completed"] for c in curve), default=0),
        "best_checkpoint": checkpoint.name,
        "best_epoch": best_epoch,
        # The last validation of that epoch index: a restarted run repeats indices, and its checkpoint of
        # the same name replaced the earlier one.
        "best_valid": next((c for c in reversed(curve) if c["epoch"] == best_epoch), None),
        "learning_curve": curve,
    }


def run_record(args, env: dict[str, str], versions: dict[str, str], package: str) -> dict:
    """What every result records about the run itself: versions, machine, command line, threads, budget."""
    return {
        "molecule": args.molecule,
        "package": package,
        "package_version": versions[package],
        "torch": versions["torch"],
        "peer_python": versions["python"],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "runner_command": shlex.join([sys.executable, *sys.argv]),
        "environment": {k: env[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")},
        "threads": args.threads,
        "budget_minutes": args.budget_minutes,
        "budget_seconds": 60.0 * args.budget_minutes,
    }


def write_result(out: Path, result: dict, t_begin: float, load_start: tuple[float, ...]) -> Path:
    """`<out>/result.json`, written atomically, with the total wall time and the load average around it."""
    result["wall_seconds_total"] = round(time.time() - t_begin, 3)
    result["load_average"] = {"start": list(load_start), "end": list(os.getloadavg())}
    path = out / "result.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
    return path


def summary_line(result: dict, label: str) -> str:
    training, test = result["training"], result["test"]
    last = training["learning_curve"][-1] if training["learning_curve"] else {}
    return (
        f"{result['molecule']}: {label}, {training['epochs_completed']} epochs in "
        f"{training['train_seconds']:.0f} s; "
        f"valid F MAE (last) {last.get('valid_mae_f_meV_per_A', float('nan')):.1f} meV/Å; test E MAE "
        f"{test['energy_mae_meV']:.1f} meV, F MAE {test['forces_mae_meV_per_A']:.1f} meV/Å"
    )


def train_under_budget(
    command: list[str],
    log: Path,
    work: Path,
    env: dict,
    args,
    loop_marker: str,
    budget: float | None = None,
    ready: Callable[[], bool] | None = None,
) -> dict:
    """The peer's training command, stopped `budget` seconds (default: `args.budget_minutes`) after its
    `loop_marker` log line; with `ready`, not before it is ready, up to the whole `args.budget_minutes`."""
    tool = Path(command[0]).name
    whole = 60.0 * args.budget_minutes
    budget = whole if budget is None else budget
    span = f"{budget / 60:.3g} min"
    if ready is not None:
        span += f" or until ready (at most {whole / 60:g})"
    print(f"training for {span}: {shlex.join(command)} (log {log})", flush=True)
    run = run_watched(
        command,
        log,
        work,
        env,
        budget,
        args.grace_seconds,
        loop_marker=loop_marker,
        timeout=whole + 1800,
        ready=ready,
        extend_to=whole,
    )
    if run["stopped_by"] is None and run["returncode"] != 0:
        raise fail(f"{tool} failed (exit {run['returncode']}); {log}:\n{log_tail(log)}")
    if run["loop_started"] is None:
        raise fail(f"{tool} never reached its training loop; see {log}")
    return run


def run_step(
    what: str, command: list[str], log: Path, cwd: Path, env: dict, args, produces: Path, abort_marker=None
) -> dict:
    """One of the peer's commands after training (finalise, test); it must end well and write `produces`."""
    print(f"{what}: {shlex.join(command)}", flush=True)
    run = run_watched(
        command, log, cwd, env, None, args.grace_seconds, abort_marker=abort_marker, timeout=3600
    )
    if run["stopped_by"] is not None or run["returncode"] != 0 or not produces.exists():
        how = run["stopped_by"] or f"exit {run['returncode']}"
        raise fail(f"{what}: {Path(command[0]).name} failed ({how}); {log}:\n{log_tail(log)}")
    return run
