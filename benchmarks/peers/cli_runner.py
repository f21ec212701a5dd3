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
import re
import resource
import shlex
import signal
import subprocess
import sys
import time
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


def write_frames(npz_path: Path, indices: list[int] | None, xyz_path: Path) -> int:
    """rMD17 frames as extxyz with REF_energy (eV) and REF_forces (eV/Å); returns the number written.

    Both peers read these keys by default (kcal/mol → eV with ase.units.kcal / ase.units.mol).
    """
    data = np.load(npz_path)
    numbers = data["nuclear_charges"].astype(int)
    frames = range(len(data["energies"])) if indices is None else indices
    atoms_list = []
    for k in frames:
        atoms = Atoms(numbers=numbers, positions=data["coords"][k], pbc=False)
        atoms.info["REF_energy"] = float(data["energies"][k]) * EV_PER_KCAL_MOL
        atoms.arrays["REF_forces"] = np.asarray(data["forces"][k], dtype=float) * EV_PER_KCAL_MOL
        atoms_list.append(atoms)
    write(xyz_path, atoms_list, format="extxyz")
    return len(atoms_list)


def npz_reference(npz_path: Path) -> dict[str, np.ndarray]:
    """Positions (Å), energies (eV) and forces (eV/Å) of every frame of an rMD17 file."""
    data = np.load(npz_path)
    return {
        "positions": np.asarray(data["coords"], dtype=float),
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
) -> dict:
    """Run `command` with output to `log_path`, watching the log.

    With `budget_seconds`, the clock starts at the first line containing `loop_marker` (at its time stamp;
    at the start of the process when there is no marker, or while the marker has not appeared) and the
    process is stopped with `stop` when the budget is over. A line with `abort_marker` stops the process
    at once.
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
            if (
                record["stopped_by"] is None
                and budget_seconds is not None
                and now - (record["loop_started"] or t_start) >= budget_seconds
            ):
                record["signals"] = stop(process, grace)
                record["stopped_by"] = "budget"
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


def latest_checkpoint(checkpoints_dir: Path, tag: str) -> tuple[Path, int] | None:
    """The peer's checkpoint `<tag>_epoch-N.pt` with the highest N (with keep_checkpoints false and only
    improvements saved: the best one) and N."""
    found = []
    for path in checkpoints_dir.glob(f"{tag}_epoch-*.pt"):
        match = re.fullmatch(rf"{re.escape(tag)}_epoch-(\d+)\.pt", path.name)
        if match:
            found.append((int(match.group(1)), path))
    if not found:
        return None
    epoch, path = max(found)
    return path, epoch


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
