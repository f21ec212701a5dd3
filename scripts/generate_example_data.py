"""Generates the example dataset in examples/data/: Langevin MD of a small molecule with GFN2-xTB.

The script needs tblite, ase and numpy, which are NOT dependencies of so3krates; it runs in a separate
virtual environment and does not import so3krates:

    python3 -m venv /tmp/xtb-venv
    /tmp/xtb-venv/bin/pip install tblite ase numpy
    OMP_NUM_THREADS=1 /tmp/xtb-venv/bin/python scripts/generate_example_data.py \\
        --out examples/data/ethanol_gfn2xtb_500K.extxyz

With the defaults (ethanol, 500 K, 0.5 fs, friction 0.01/fs, 2000 equilibration steps, 1000 frames every
10 steps, seed 0, tblite accuracy 0.01) this reproduces examples/data/ethanol_gfn2xtb_500K.extxyz; see
examples/data/README.md for the versions used and the statistics of the result. The run is deterministic
for a given seed, tblite/ASE/NumPy versions and machine (the last digits may differ across BLAS builds
and thread counts).

Each frame is written as extxyz with the GFN2-xTB total energy (key ``energy``, eV, in the comment line)
and forces (key ``forces``, eV/Å, per atom); positions are in Å, the structure is non-periodic. The
output is written to ``OUT.tmp`` and renamed onto ``OUT`` only when complete.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from ase import Atoms, units
from ase.build import molecule
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixCom
from ase.data import covalent_radii
from ase.io import read, write
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import Stationary
from tblite.ase import TBLite

try:  # ASE >= 3.29; the same Maxwell-Boltzmann draw as the deprecated MaxwellBoltzmannDistribution
    from ase.md.velocitydistribution import thermalize_momenta
except ImportError:  # older ASE
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    def thermalize_momenta(atoms, temperature_K, *, rng=None):
        MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--molecule", default="CH3CH2OH", help="name for ase.build.molecule (ethanol)")
    parser.add_argument("--temperature", type=float, default=500.0, help="thermostat temperature, K")
    parser.add_argument("--timestep", type=float, default=0.5, help="MD time step, fs")
    parser.add_argument("--friction", type=float, default=0.01, help="Langevin friction, 1/fs")
    parser.add_argument("--equilibration-steps", type=int, default=2000, help="steps run and discarded")
    parser.add_argument("--frames", type=int, default=1000, help="number of frames written")
    parser.add_argument("--stride", type=int, default=10, help="MD steps between written frames")
    parser.add_argument(
        "--accuracy",
        type=float,
        default=0.01,
        help="tblite accuracy (SCF convergence; smaller is tighter): 0.01 gives forces to ~1e-6 eV/Å, "
        "tblite's default 1.0 to ~1e-4 eV/Å",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the velocities and the thermostat")
    parser.add_argument("--out", default="examples/data/ethanol_gfn2xtb_500K.extxyz", help="output file")
    args = parser.parse_args(argv)
    if args.frames < 1 or args.stride < 1 or args.equilibration_steps < 0:
        parser.error("--frames and --stride must be positive, --equilibration-steps non-negative")
    return args


def bonded_pairs(atoms: Atoms, factor: float = 1.2) -> list[tuple[int, int]]:
    """Pairs closer than ``factor`` times the sum of their covalent radii."""
    d = atoms.get_all_distances()
    r = covalent_radii[atoms.numbers]
    n = len(atoms)
    return [(i, j) for i in range(n) for j in range(i + 1, n) if d[i, j] < factor * (r[i] + r[j])]


def frame(atoms: Atoms) -> Atoms:
    """A bare copy (symbols, positions, no cell, no velocities) carrying only energy and forces."""
    out = Atoms(atoms.get_chemical_symbols(), positions=atoms.get_positions(), pbc=False)
    # apply_constraint=False: the true -dE/dR, not the forces as altered by the FixCom of the dynamics.
    forces = atoms.get_forces(apply_constraint=False).copy()
    out.calc = SinglePointCalculator(out, energy=float(atoms.get_potential_energy()), forces=forces)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)

    atoms = molecule(args.molecule)
    atoms.center()
    atoms.pbc = False
    atoms.calc = TBLite(method="GFN2-xTB", accuracy=args.accuracy, verbosity=0)
    atoms.set_constraint(FixCom())  # the recommended replacement of Langevin(fixcm=True)
    bonds = bonded_pairs(atoms)
    print(f"{args.molecule}: {len(atoms)} atoms, {len(bonds)} bonds, GFN2-xTB (tblite)", flush=True)

    thermalize_momenta(atoms, args.temperature, rng=rng)  # Maxwell-Boltzmann, same rng as the thermostat
    Stationary(atoms)
    dyn = Langevin(
        atoms,
        timestep=args.timestep * units.fs,
        temperature_K=args.temperature,
        friction=args.friction / units.fs,
        fixcm=False,
        rng=rng,
    )

    start = time.perf_counter()
    if args.equilibration_steps:
        temps = []
        chunk = max(1, args.equilibration_steps // 10)
        done = 0
        while done < args.equilibration_steps:
            n = min(chunk, args.equilibration_steps - done)
            dyn.run(n)
            done += n
            temps.append(atoms.get_temperature())
            print(
                f"equilibration {done:6d}/{args.equilibration_steps}  T={temps[-1]:7.1f} K  "
                f"E={atoms.get_potential_energy():.4f} eV  {time.perf_counter() - start:7.1f} s",
                flush=True,
            )

    frames: list[Atoms] = []
    temps = np.empty(args.frames)
    symbols = atoms.get_chemical_symbols()
    pair_names = ["-".join(sorted((symbols[i], symbols[j]))) for i, j in bonds]
    max_bond = dict.fromkeys(pair_names, 0.0)
    nonbonded = ~np.eye(len(atoms), dtype=bool)
    for i, j in bonds:
        nonbonded[i, j] = nonbonded[j, i] = False
    min_nonbonded = np.inf
    for k in range(args.frames):
        dyn.run(args.stride)
        temps[k] = atoms.get_temperature()
        d = atoms.get_all_distances()
        for name, (i, j) in zip(pair_names, bonds, strict=True):
            max_bond[name] = max(max_bond[name], d[i, j])
        min_nonbonded = min(min_nonbonded, d[nonbonded].min())
        frames.append(frame(atoms))
        if (k + 1) % max(1, args.frames // 20) == 0 or k + 1 == args.frames:
            print(
                f"frame {k + 1:6d}/{args.frames}  T={temps[k]:7.1f} K  "
                f"E={frames[-1].get_potential_energy():.4f} eV  {time.perf_counter() - start:7.1f} s",
                flush=True,
            )
    elapsed = time.perf_counter() - start

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    try:
        write(tmp, frames, format="extxyz", write_results=True)
        back = read(tmp, index=":", format="extxyz")
        energies = np.array([a.get_potential_energy() for a in back])
        forces = np.stack([a.get_forces() for a in back])
        if len(back) != args.frames or not (np.isfinite(energies).all() and np.isfinite(forces).all()):
            raise RuntimeError("the written file does not read back as the frames computed")
        ref_e = np.array([a.get_potential_energy() for a in frames])
        ref_f = np.stack([a.get_forces() for a in frames])
        if np.abs(energies - ref_e).max() > 1e-6 or np.abs(forces - ref_f).max() > 1e-6:
            raise RuntimeError("energies or forces read back differ from those computed")
        os.replace(tmp, args.out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

    fmax = np.linalg.norm(forces, axis=-1).max()
    print(f"wrote {args.out}: {len(back)} frames, {os.path.getsize(args.out)} bytes, MD {elapsed:.1f} s")
    print(f"temperature over frames: mean {temps.mean():.1f} K, std {temps.std():.1f} K")
    print(
        f"energy (eV): min {energies.min():.4f}, max {energies.max():.4f}, "
        f"range {np.ptp(energies):.4f}, std {energies.std():.4f}"
    )
    print(f"forces (eV/Å): max |F_i| {fmax:.4f}, std of components {forces.std():.4f}")
    print(f"largest |sum of forces| of a frame (should be ~0): {np.abs(forces.sum(axis=1)).max():.2e} eV/Å")
    print(
        "longest bond of each kind over all frames (Å): "
        + ", ".join(f"{k} {v:.3f}" for k, v in max_bond.items())
    )
    print(f"shortest distance between atoms not bonded at the start, over all frames: {min_nonbonded:.3f} Å")
    return 0


if __name__ == "__main__":
    sys.exit(main())
