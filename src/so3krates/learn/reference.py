"""Labelling frames with the reference method in a pool of worker processes, journalled call by call.

Each finished call is appended to a JSON-lines journal (one line per call, flushed and fsynced) before the
next result is taken, so a run killed at any moment repeats at most the calls that were in flight. A call
that raises (an SCF that did not converge, a crashed worker) or returns non-finite numbers is journalled
as failed with its reason and skipped; it never stops the loop.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

from so3krates.errors import ConfigError

_SPEC: tuple[str, dict[str, Any]] | None = None  # the worker's calculator: name and keyword arguments


def make_calculator(name: str, kwargs: dict[str, Any]):
    """The ASE calculator ``name`` ('xtb' or 'module:Class') with ``kwargs``; ConfigError if unavailable."""
    if name == "xtb":
        try:
            from tblite.ase import TBLite
        except ImportError:
            raise ConfigError(
                "reference.calculator: xtb needs the tblite package: pip install 'so3krates[xtb]'"
            ) from None
        return TBLite(**{"method": "GFN2-xTB", "verbosity": 0, **kwargs})
    module_name, _, class_name = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"reference.calculator: cannot import {module_name!r} ({error})") from None
    calculator_class = getattr(module, class_name, None)
    if calculator_class is None:
        raise ConfigError(f"reference.calculator: {module_name} has no {class_name!r}")
    try:
        return calculator_class(**kwargs)
    except Exception as error:  # any constructor error of a foreign calculator
        raise ConfigError(f"reference.calculator: {name}({kwargs}) failed: {error}") from None


def _initialise(name: str, kwargs: dict[str, Any], threads: int) -> None:
    global _SPEC
    os.environ["OMP_NUM_THREADS"] = str(threads)
    make_calculator(name, kwargs)  # imports the library once per worker
    _SPEC = (name, kwargs)


def _label(numbers, positions, cell, pbc) -> dict[str, Any]:
    atoms = Atoms(numbers=numbers, positions=positions, cell=cell, pbc=pbc)
    # A fresh calculator for every structure: calculators that keep state between calls (tblite starts its
    # SCF from the previous wavefunction) would make a label depend on which worker computed what before it
    # (measured: forces differing by up to 9e-4 eV/Å between two runs), and a rerun would not reproduce it.
    atoms.calc = make_calculator(*_SPEC)
    try:
        energy = float(atoms.get_potential_energy())
        forces = np.asarray(atoms.get_forces(), dtype=np.float64)
    except Exception as error:  # a reference that failed on this structure: recorded, skipped
        text = str(error).strip().splitlines()
        return {"ok": False, "reason": f"{type(error).__name__}: {text[0] if text else ''}"[:300]}
    if not (np.isfinite(energy) and np.isfinite(forces).all()):
        return {"ok": False, "reason": "non-finite energy or forces"}
    return {"ok": True, "energy": energy, "forces": forces.tolist()}


def read_journal(path: Path) -> dict[int, dict[str, Any]]:
    """The calls journalled in ``path`` by frame index; a torn last line (a kill mid-write) is cut off."""
    done: dict[int, dict[str, Any]] = {}
    if not path.is_file():
        return done
    raw = path.read_bytes()
    good = raw[: raw.rfind(b"\n") + 1]
    if len(good) != len(raw):
        os.truncate(path, len(good))
    for line in good.decode("utf-8").splitlines():
        record = json.loads(line)
        done[int(record["index"])] = record
    return done


def label_frames(
    frames: list[Atoms],
    journal: Path,
    calculator: str,
    kwargs: dict[str, Any],
    workers: int = 1,
    threads: int = 1,
    progress: Callable[[int], None] | None = None,
) -> dict[int, dict[str, Any]]:
    """Labels ``frames`` (skipping those already in ``journal``); returns every frame's journal record.

    Records: ``{"index", "ok", "energy" eV, "forces" eV/Å}`` or ``{"index", "ok": False, "reason"}``.
    """
    done = read_journal(journal)
    todo = [k for k in range(len(frames)) if k not in done]
    if progress is not None and done:
        progress(len(done))
    if not todo:
        return done
    make_calculator(calculator, kwargs)  # a bad name or keyword fails here, not in a worker
    with open(journal, "a", encoding="utf-8") as handle:
        while todo:
            try:
                _run_pool(frames, todo, done, handle, calculator, kwargs, workers, threads, progress)
            except BrokenProcessPool:
                # A worker died (a crash inside the reference): the calls in flight are journalled as failed
                # by _run_pool; the rest go to a fresh pool.
                pass
            todo = [k for k in todo if k not in done]
    return done


def _run_pool(frames, todo, done, handle, calculator, kwargs, workers, threads, progress) -> None:
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # no forked copy of torch's thread pools
    with ProcessPoolExecutor(
        max_workers=min(workers, len(todo)),
        mp_context=context,
        initializer=_initialise,
        initargs=(calculator, kwargs, threads),
    ) as pool:
        pending = {}
        queue = list(todo)
        while queue or pending:
            while queue and len(pending) < 2 * workers:
                k = queue.pop(0)
                atoms = frames[k]
                future = pool.submit(
                    _label,
                    atoms.numbers,
                    atoms.positions,
                    np.asarray(atoms.cell.array),
                    np.asarray(atoms.pbc),
                )
                pending[future] = k
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                k = pending.pop(future)
                try:
                    record = future.result()
                except BrokenProcessPool:
                    record = {"ok": False, "reason": "the reference's worker process died"}
                    _journal(handle, done, k, record, progress)
                    for other in pending.values():
                        _journal(handle, done, other, dict(record), progress)
                    raise
                _journal(handle, done, k, record, progress)


def _journal(handle, done, index: int, record: dict[str, Any], progress) -> None:
    record = {"index": int(index), **record}
    handle.write(json.dumps(record) + "\n")
    handle.flush()
    os.fsync(handle.fileno())
    done[int(index)] = record
    if progress is not None:
        progress(1)
