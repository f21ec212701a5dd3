"""One training per run directory: ``RUN/.lock`` holds the owner's PID; a stale lock of a killed run is
taken over."""

from __future__ import annotations

import os
from pathlib import Path

from so3krates.errors import ConfigError


class RunLock:
    """``RUN/.lock`` holds the PID of the training that owns the run directory; a second one refuses.

    Taking the lock also removes the temporary files of atomic writes interrupted by a kill (``.NAME.*.tmp``).
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / ".lock"

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and _alive(pid):
                    raise ConfigError(
                        f"{self.path.parent}: another training (PID {pid}) is using this run directory"
                    ) from None
                self.path.unlink(missing_ok=True)  # stale lock of a killed run
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(str(os.getpid()))
            # Temporary files of atomic writes (so3krates.files.atomic_path) that a killed run left behind:
            # with the lock held no other process writes here, so none of them is still being written.
            for leftover in self.path.parent.glob(".*.tmp"):
                leftover.unlink(missing_ok=True)
            return self
        raise ConfigError(f"{self.path}: cannot take the run-directory lock")

    def __exit__(self, *exc: object) -> None:
        # Remove the lock only if it is still ours: the directory may have been cleared and taken over.
        try:
            if self.path.read_text().strip() == str(os.getpid()):
                self.path.unlink()
        except OSError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
