"""Each edge block's messages as programs compiled by ``torch.compile`` (:func:`compile_messages`).

:mod:`so3krates.runtime.blocks` runs the block loop in Python; with a compile mode, what a block computes
(its messages, or the pair-message kernel's inputs) and its gradients run as inductor programs, compiled once
per layer for any number of rows. Here: the compilation, the release of Python's interpreter lock in the
generated kernels (two threads of blocks overlap), and Dynamo's recompile limits raised while they run.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import Tensor

from so3krates.runtime.blocks import Messages

#: Compiled variants of one messages function a process may hold: per layer, with and without gradients,
#: for every force field in the process (a committee has several).
RECOMPILE_LIMIT = 256


def compile_messages(messages: Messages) -> Messages:
    """``messages`` compiled by ``torch.compile`` (inductor) for any number of rows.

    The forward pass calls it under ``no_grad`` (an inference program) and the backward pass with
    gradients (inductor's forward and backward programs of the block, the recomputation included), so
    one block costs a few fused kernels instead of the ~30 eager operations of each pass. The programs are
    compiled once for any number of rows (dynamic shapes): the full blocks, the shorter last block of a
    graph and those of every later neighbour list (MD) run the same programs (a block of a single pair
    gets programs of its own once: the pair layout's reshape guards on more than one pair). Programs for
    the static shape of the full blocks measured 7 % faster, within this machine's noise (999 water,
    1 thread, in turn: 1.26 against 1.35 ms per atom, calls spread ±15 %), but would compile anew for
    every other size, and two compiled wrappers of one function share Dynamo's cache. The programs are
    made at the first calls (tens of seconds on a CPU; inductor caches them on disk for later processes).

    The gathers and the sums over centre atoms stay outside, in :class:`_BlockedSum`: inside, autograd
    would scatter each block's gradients into full per-atom tensors. The generated kernels run on one
    thread (the matrix products on all): with threaded kernels, the backward programs of torch 2.13
    crashed (segmentation fault, 999 water on 2 threads), as threaded kernels corrupted memory in the
    whole-graph programs before (``programs.compile_program``). A layer's weights are constants of its
    messages, so every layer has programs of its own; Dynamo's default limit of 8 compiled variants per
    function would send the rest back to eager mode silently.
    """
    release_interpreter_lock_in_kernels()
    compiled = torch.compile(messages, dynamic=True, options={"cpp.threads": 1})

    def run(*args: object) -> Tensor:
        with _raised_recompile_limits():
            return compiled(*args)

    return run


#: How inductor's Python bindings call a generated CPU kernel (torch 2.13): with the interpreter lock held.
_KERNEL_CALL_HELD = "kernel({}); Py_RETURN_NONE;"
#: The same call with the lock released while the kernel runs. The arguments are read from the Python
#: tuple first, with the lock (they are the arguments of the generic lambda); inside, a guard releases the
#: lock and takes it back when the kernel returns or throws.
_KERNEL_CALL_RELEASED = (
    "[](auto... so3krates_args) {{ struct Released {{ PyThreadState* state = PyEval_SaveThread(); "
    "~Released() {{ PyEval_RestoreThread(state); }} }} released; kernel(so3krates_args...); }}({}); "
    "Py_RETURN_NONE;"
)


def release_interpreter_lock_in_kernels() -> bool:
    """Makes the CPU kernels that inductor compiles from now on release Python's interpreter lock.

    Two threads of compiled blocks (``blocks.in_workers``) overlapped only in part: ATen's operations release
    the lock while they compute, the Python bindings that inductor generates for its own kernels do not
    (``CppPythonBindingsCodeCache.call_entry_function``), so one thread's fused kernels waited for the
    other's. The kernels read and write only the buffers they are given (no Python objects), so they may
    run without the lock. Why by hand: torch has no option for it. The binding's source is part of the key
    of inductor's code cache, so kernels compiled before (or by another process without this) are not
    reused with the other binding. Returns whether the bindings release the lock; a torch whose binding is
    not the one this was written for is left alone (the kernels then hold the lock: slower, same numbers).
    """
    try:
        from torch._inductor.codecache import CppPythonBindingsCodeCache as bindings
    except ImportError:  # pragma: no cover - a torch without this class
        return False
    if bindings.call_entry_function == _KERNEL_CALL_HELD:
        bindings.call_entry_function = _KERNEL_CALL_RELEASED
    return bindings.call_entry_function == _KERNEL_CALL_RELEASED


_LIMITS_LOCK = threading.Lock()
_LIMITS_USERS = 0
_LIMITS_SAVED: dict[str, int] = {}


@contextlib.contextmanager
def _raised_recompile_limits() -> Iterator[None]:
    """Dynamo's recompile limits raised to ``RECOMPILE_LIMIT`` while any compiled messages run.

    Blocks run in several threads at once (``blocks.in_workers``), and Dynamo's ``config.patch`` is not
    thread-safe (two overlapping patches can leave the raised values behind for good): the first thread in
    raises the limits, the last one out restores them.
    """
    import torch._dynamo.config as dynamo_config

    global _LIMITS_USERS
    with _LIMITS_LOCK:
        if _LIMITS_USERS == 0:
            for name, value in (
                ("recompile_limit", RECOMPILE_LIMIT),
                ("accumulated_recompile_limit", 4 * RECOMPILE_LIMIT),
            ):
                _LIMITS_SAVED[name] = getattr(dynamo_config, name)
                setattr(dynamo_config, name, max(value, _LIMITS_SAVED[name]))
        _LIMITS_USERS += 1
    try:
        yield
    finally:
        with _LIMITS_LOCK:
            _LIMITS_USERS -= 1
            if _LIMITS_USERS == 0:
                for name, value in _LIMITS_SAVED.items():
                    setattr(dynamo_config, name, value)
