"""so3krates.memory: freed memory stays in the process, so large tensors are not faulted in again."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="mallopt tuning is for Linux/glibc"
)

# Allocates and frees a 64 MiB tensor eleven times; reports the page faults of the last nine.
PROBE = """
import json, resource, sys, torch
from so3krates.memory import keep_freed_memory
applied = keep_freed_memory()
def touch():
    torch.ones(16 * 1024 * 1024)  # 64 MiB, written, then freed
for _ in range(3):  # the first allocations may still extend the heap
    touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(9):
    touch()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"applied": applied, "again": keep_freed_memory(), "faults": faults}))
"""


def _probe(env_value: str | None) -> dict:
    import os

    env = dict(os.environ)
    env.pop("SO3KRATES_KEEP_MEMORY", None)
    if env_value is not None:
        env["SO3KRATES_KEEP_MEMORY"] = env_value
    result = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True, timeout=120
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_freed_tensors_are_reused_without_page_faults():
    kept = _probe(None)
    assert kept["applied"] and kept["again"]
    # 9 × 64 MiB is 147k pages of 4 KiB when every allocation is a fresh mapping; reused memory needs none
    # (the heap was seen to grow once more by one allocation, 16,384 pages, on a loaded machine).
    assert kept["faults"] < 20_000, kept


# Allocates and frees 2.25 GiB six times (more than glibc's largest trim threshold, 2 GiB); reports the
# page faults of the last three. The first ones fault in their pages whatever the settings: a small
# allocation may land in a freed block, and the heap grows once more (to two such blocks) before the large
# one is always served from freed memory.
LARGE_PROBE = """
import json, resource, torch
from so3krates.memory import keep_freed_memory
keep_freed_memory()
for _ in range(3):
    torch.ones(int(2.25 * 2**30) // 4)  # written, then freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    torch.ones(int(2.25 * 2**30) // 4)
print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def test_memory_beyond_two_gib_is_kept_too():
    """A call that grows the heap by more than 2 GiB (a 10,000-atom box) must not fault it in again at every
    call: 1.8 million pages of 4 KiB in three calls if the freed memory was handed back (as with the 2 GiB
    trim threshold)."""
    result = subprocess.run(
        [sys.executable, "-c", LARGE_PROBE], capture_output=True, text=True, check=True, timeout=120
    )
    faults = json.loads(result.stdout.strip().splitlines()[-1])["faults"]
    assert faults < 20_000, faults


def test_environment_variable_leaves_the_allocator_alone():
    default = _probe("0")
    assert not default["applied"] and not default["again"]
    assert default["faults"] > 100_000, default  # the behaviour the tuning removes


def test_calculator_applies_it(tmp_path):
    code = (
        "import json, so3krates.memory as m\n"
        "from so3krates.calculators.ase import So3kratesCalculator\n"
        "from so3krates.model.config import preset\n"
        "from so3krates.model.so3krates import So3krates\n"
        "So3kratesCalculator(So3krates(preset('tiny')))\n"
        "print(json.dumps(m._applied))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert json.loads(result.stdout.strip().splitlines()[-1]) is True
