"""Keeping freed memory inside the process, so that large per-edge tensors are not re-faulted at every call.

glibc serves allocations above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and returns them
to the kernel on ``free``. A 1000-atom system has per-edge tensors of 30–90 MB: every energy-and-forces
call then faults in and zeroes every page of them again. Measured with the paper model, float32, the
compiled per-equation program, 999 water molecules (54k edges), 1 thread: 75,000 page faults and 0.13 s of
kernel time per call, against 2,500 faults and 0.004 s with the settings below.

Nothing here changes a result; it only changes where freed memory goes. PyTorch has no caching allocator
for CPU tensors, and a preloaded jemalloc or tcmalloc is not something a pip-installed package can
arrange, hence two ``mallopt`` calls through ctypes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys

#: Set to ``0`` to leave the C library's allocator as it is.
ENVIRONMENT_VARIABLE = "SO3KRATES_KEEP_MEMORY"

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
#: Free memory at the top of the heap beyond this is returned to the kernel; -1: never. It was 2 GiB (the
#: largest int) until December 2026: a call whose heap grows by more than that, as a 10,000-atom water box's
#: whole graph does (6.4 GB peak), then gave its memory back after every call and faulted it in again at the
#: next: 3.4–5.8 million page faults in 7 calls against 1.6 million, 3.76–3.99 against 3.07–3.29 s per call
#: (benchmarks/results/memory_trim/).
TRIM_THRESHOLD = -1

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Serve large allocations from the heap and keep freed memory for reuse; True if now in effect.

    Process-wide and applied once: ``mallopt(M_MMAP_MAX, 0)`` (no allocation gets its own mapping) and
    ``mallopt(M_TRIM_THRESHOLD, -1)`` (freed memory is never handed back). The process then keeps its
    peak heap instead of handing it back after every call (its peak resident memory is the same; the
    memory is only not returned to the system while the process lives). Does nothing
    (returns False) outside Linux with glibc, or when ``SO3KRATES_KEEP_MEMORY=0``. Called by the
    calculators, the LAMMPS ML-IAP object, the command line (``so3krates md``, ``explore``, ...) and training.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get(ENVIRONMENT_VARIABLE, "1") == "0":
        return False
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success.
    _applied = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return _applied
