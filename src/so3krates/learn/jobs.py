"""Child processes of ``so3krates learn``: ``so3krates train`` and ``so3krates md`` runs, a few at a time.

Each job is a ``so3krates`` command in a process of its own, with its log in a file; the processes die with
the loop (a killed loop leaves no orphans writing into the directories that a rerun continues in), and a job
that fails stops the stage with the last line of its log.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from so3krates.errors import So3kratesError


class LearnError(So3kratesError):
    """A stage of the loop failed (a training or MD process exited with an error)."""


def _die_with_parent() -> None:
    """In a child process: SIGKILL when the parent dies (Linux), so a killed loop leaves no orphans that
    would go on writing into the directories a rerun continues in."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_jobs(jobs: list[tuple[str, list[str], Path]], parallel: int, threads: int, bar=None) -> None:
    """Runs ``so3krates`` commands (name, argv after ``so3krates``, log file), ``parallel`` at a time.

    A job that fails raises LearnError with the last line of its log.
    """
    environment = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "OMP_WAIT_POLICY": "PASSIVE",
        "PYTHONUNBUFFERED": "1",
    }
    queue, running, failed = list(jobs), [], []
    while queue or running:
        while queue and len(running) < parallel:
            name, argv, log_path = queue.pop(0)
            log_path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(log_path, "w", encoding="utf-8")  # closed when the process ends
            process = subprocess.Popen(
                [sys.executable, "-m", "so3krates", *argv],
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=environment,
                preexec_fn=_die_with_parent,  # children die with the loop
            )
            running.append((name, process, handle, log_path))
        time.sleep(0.2)
        for entry in list(running):
            name, process, handle, log_path = entry
            if process.poll() is None:
                continue
            running.remove(entry)
            handle.close()
            if bar is not None:
                bar.update(1)
            if process.returncode != 0:
                lines = [line for line in log_path.read_text(encoding="utf-8").splitlines() if line.strip()]
                failed.append(
                    f"{name}: {lines[-1] if lines else f'exit status {process.returncode}'} ({log_path})"
                )
    if failed:
        raise LearnError("; ".join(failed))


def progress_bar(total: int, description: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total, desc=description, leave=False, dynamic_ncols=True, disable=None if enabled else True
    )
