"""160 GFN2-xTB frames: 1,600 steps of 500 K Langevin MD, every 10th kept (see run.sh)."""

import time
from pathlib import Path

import ase.io
import numpy as np
from ase import units
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import Stationary, thermalize_momenta
from tblite.ase import TBLite

DATA = Path(__file__).resolve().parents[3] / "shared/data/generated/ala_dipeptide_gfn2xtb_500K_2000.extxyz"
atoms = ase.io.read(DATA, index=0)
atoms.calc = TBLite(method="GFN2-xTB", verbosity=0)
rng = np.random.default_rng(123)
thermalize_momenta(atoms, 500, rng=rng)
Stationary(atoms)
dyn = Langevin(atoms, 0.5 * units.fs, temperature_K=500, friction=0.01 / units.fs, rng=rng, fixcm=False)
frames = []
t = time.perf_counter()
for i in range(1600):
    dyn.run(1)
    if i % 10 == 9:
        f = atoms.copy()
        f.calc = None
        f.info["REF_energy"] = float(atoms.get_potential_energy())
        f.arrays["REF_forces"] = atoms.get_forces().copy()
        frames.append(f)
ase.io.write("train160.extxyz", frames)
print(len(frames), time.perf_counter() - t)
