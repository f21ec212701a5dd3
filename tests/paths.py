"""Which execution paths the test session ran, and how many tests ran each.

A path is (how, plan, dtype): ``eager`` (an :class:`EnergyFunction` called directly), ``inductor``
(``torch.compile``, of the energy function or of the messages of edge blocks), ``pt2`` or ``aoti`` (a
traced or compiled :class:`Program`). ``conftest.py`` installs the recorder and prints the table at the
end of the session, with the legal plans that no test ran in eager mode (there should be none:
``tests/test_plans.py`` runs them all in both dtypes).
"""

from __future__ import annotations

import collections

import torch

from so3krates.runtime import evaluator, programs
from so3krates.runtime.plan import legal_plans

#: (how, plan description, dtype) → node ids of the tests that ran it.
RECORD: dict[tuple[str, str, str], set[str]] = collections.defaultdict(set)
CURRENT_TEST = {"id": "outside a test"}


def _record(how: str, plan, dtype: torch.dtype) -> None:
    RECORD[(how, plan.describe(), str(dtype).removeprefix("torch."))].add(CURRENT_TEST["id"])


def install() -> None:
    """Wraps the three places where a plan runs, so that every run is recorded."""
    energy_forward = evaluator.EnergyFunction.forward
    evaluator_forward = evaluator.Evaluator.forward
    program_call = programs.Program.__call__

    def recorded_energy(self, vectors, atomic_numbers, edges):
        tracing = torch.compiler.is_compiling() or torch._subclasses.fake_tensor.is_fake(vectors)
        if not tracing:  # with compiled blocks, each block's messages run compiled by inductor
            _record("inductor" if self.compile_blocks else "eager", self.plan, self.model.dtype)
        return energy_forward(self, vectors, atomic_numbers, edges)

    def recorded_evaluator(self, graph, *args, **kwargs):
        if not isinstance(self.energy, evaluator.EnergyFunction):  # torch.compile of one
            _record("inductor", self.plan, self.energy._orig_mod.model.dtype)
        return evaluator_forward(self, graph, *args, **kwargs)

    def recorded_program(self, graph, *args, **kwargs):
        _record(self.kind, self.plan, self.dtype)
        return program_call(self, graph, *args, **kwargs)

    evaluator.EnergyFunction.forward = recorded_energy
    evaluator.Evaluator.forward = recorded_evaluator
    programs.Program.__call__ = recorded_program


def report(write_line) -> None:
    """Prints one line per path with the number of tests that ran it, then the eager plans not run."""
    if not RECORD:
        return
    write_line(f"execution paths run: {len(RECORD)} (how, plan, dtype → tests that ran it)")
    for (how, plan, dtype), tests in sorted(RECORD.items()):
        write_line(f"  {how:<8} {plan:<40} {dtype:<8} {len(tests):>4} tests")
    missing = [
        f"{plan.describe()} ({dtype})"
        for plan in legal_plans(frozen=True)
        for dtype in ("float32", "float64")
        if ("eager", plan.describe(), dtype) not in RECORD
    ]
    total = 2 * len(legal_plans(frozen=True))
    listed = ", ".join(missing) if len(missing) <= 4 else f"{', '.join(missing[:4])}, …"
    write_line(f"legal plans (× dtype) not run in eager mode: {len(missing)} of {total}: {listed or 'none'}")
