"""Atomic file output: a reader sees the old file or the new one, never a half-written one."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yields a temporary path next to ``path``; on success it is fsynced and renamed onto ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was. ``suffix`` ends the
    temporary name, for writers that insist on an extension (``torch.export`` wants ``.pt2``).

    Example::

        with atomic_path("run/best.pt") as tmp:
            torch.save(state, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_figure(figure, path: str | os.PathLike, dpi: int = 110) -> None:
    """Writes a matplotlib figure as PNG atomically and closes it (figures otherwise accumulate in memory)."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi)
    plt.close(figure)


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """``payload`` as indented JSON, written atomically (non-finite numbers become null: strict JSON)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_finite(payload), indent=2) + "\n", encoding="utf-8")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value
