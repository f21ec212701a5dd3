"""Reference calculators for tests/test_learn.py, importable by the loop's worker processes (PYTHONPATH)."""

from __future__ import annotations

import numpy as np
from ase.calculators.emt import EMT


class FlakyEMT(EMT):
    """EMT that fails, like an SCF that does not converge, on about one structure in four (deterministic:
    decided by the positions, so a rerun fails on the same structures)."""

    def calculate(self, atoms=None, properties=("energy",), system_changes=None):
        if int(abs(np.sum(atoms.positions)) * 1e4) % 4 == 0:
            raise RuntimeError("SCF did not converge in 250 iterations")
        if system_changes is None:
            super().calculate(atoms, properties)
        else:
            super().calculate(atoms, properties, system_changes)


class StatefulEMT(EMT):
    """EMT plus 1 meV for every structure this instance computed before: a calculator whose answer
    depends on its history (like an SCF started from the previous wavefunction)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.history = 0

    def calculate(self, atoms=None, properties=("energy",), system_changes=None):
        super().calculate(atoms, properties, system_changes or ["positions"])
        self.results["energy"] += 1e-3 * self.history
        self.history += 1
