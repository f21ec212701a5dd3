"""Checks of user input that several commands share, made before any work starts: outputs and devices.

A run that fails on an unwritable output folder after minutes of work loses those minutes; so every command
checks its output paths first (:func:`check_output_file`, :func:`check_output_dir`), and every device a user
names is checked against the torch that is installed (:func:`check_device`). Each raises
:class:`~so3krates.errors.So3kratesError` with one line that names the path or the option.
"""

from __future__ import annotations

import os
from pathlib import Path

from so3krates.errors import So3kratesError


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")  # pragma: no cover - a relative path always has the working directory


def _check_parent(path: Path, what: str) -> None:
    """The folder ``path`` would be created in: a writable folder, or one that can be made in one."""
    ancestor = _nearest_existing(path.parent)
    if not ancestor.is_dir():
        raise So3kratesError(f"{what} {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise So3kratesError(f"{what} {path}: cannot write in {ancestor} (permission denied)")


def check_output_file(path: str | os.PathLike, what: str = "output file", overwrite: bool = True) -> Path:
    """``path`` can be written as a file: not a folder, in a folder that exists or can be made, writable;
    without ``overwrite``, it must not exist yet."""
    path = Path(path)
    if path.is_dir():
        raise So3kratesError(f"{what} {path} is a folder, not a file")
    if path.exists() and not overwrite:
        raise So3kratesError(f"{what} {path} exists; pass --overwrite to replace it")
    if path.exists() and not os.access(path, os.W_OK):
        raise So3kratesError(f"{what} {path}: cannot replace it (permission denied)")
    _check_parent(path, what)
    return path


def check_output_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """``path`` can hold output files: a writable folder, or one that can be made."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise So3kratesError(f"{what} {path} is a file, not a folder")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise So3kratesError(f"{what} {path}: cannot write in it (permission denied)")
        return path
    _check_parent(path, what)
    return path


def check_results_folder(path: str | os.PathLike, names: list[str], overwrite: bool, what: str) -> Path:
    """An output folder for the files ``names``: writable, and holding none of them unless ``overwrite``."""
    path = check_output_dir(path, what)
    existing = [name for name in names if (path / name).exists()]
    if existing and not overwrite:
        raise So3kratesError(
            f"{what} {path} already holds {', '.join(existing)}; pass --overwrite to replace them, or choose "
            "another folder"
        )
    return path


def check_device(device: str) -> str:
    """``device`` names a device this torch can use (``cpu``, ``cuda``, ``cuda:1``, ``mps``); returns it."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise So3kratesError(f"device {device!r} is not a torch device ({error})") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise So3kratesError(
                f"device {device!r}: this torch has no usable CUDA (torch {torch.__version__}); use cpu"
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise So3kratesError(f"device {device!r}: only {torch.cuda.device_count()} CUDA devices")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise So3kratesError(f"device {device!r}: MPS is not available here; use cpu")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise So3kratesError(f"device {device!r}: use cpu, cuda or mps")
    return device
