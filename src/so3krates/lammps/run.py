"""One call from an ASE structure or a LAMMPS data file to a finished LAMMPS run with a SO3krates model."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ase import Atoms

from so3krates.calculators.ase import So3kratesCalculator
from so3krates.errors import So3kratesError
from so3krates.lammps.driver import LammpsDriver, load_lammps
from so3krates.lammps.structure import create_structure, elements_of, read_structure
from so3krates.model.so3krates import So3krates


def run_lammps(
    model: str | os.PathLike | So3krates | So3kratesCalculator,
    structure: Atoms | str | os.PathLike,
    commands: str | Sequence[str],
    elements: Sequence[str] | str | None = None,
    cmdargs: Sequence[str] = ("-log", "none", "-screen", "none", "-nocite"),
    **driver_options: Any,
) -> Atoms:
    """Set up LAMMPS (``units metal``, ``atom_style atomic``), attach the model, run ``commands``.

    Args:
        model: path to a checkpoint, a ``So3krates`` instance or a ``So3kratesCalculator``.
        structure: ASE atoms (positions, cell, pbc, masses and velocities are passed on; periodic directions
            become ``p`` boundaries, the others ``s``) or the path of a LAMMPS data file (read with
            ``read_data``; it or ``commands`` sets the masses).
        commands: LAMMPS input after the structure and the ``fix external``: timestep, velocities,
            integrators, thermo and dump settings, ``run``. One string or a list of lines.
        elements: element symbol of each atom type; default for ASE atoms: one type per element, in order of
            atomic number. Required for a data file.
        cmdargs: LAMMPS command-line arguments; ``()`` prints LAMMPS' screen output.
        driver_options: passed to ``LammpsDriver`` (``fix_id``, ``compute_virial``) and on to
            ``So3kratesCalculator`` (``device``, ``dtype``, ``skin``, ``min_distance``, ``species``, ...).

    Returns:
        The final structure in ASE's frame and units, with its velocities and the model's energy, forces (and
        stress) attached.
    """
    lmp = load_lammps(cmdargs)
    try:
        lmp.commands_string("units metal\natom_style atomic")
        rotation = None
        if isinstance(structure, Atoms):
            elements = elements_of(structure) if elements is None else elements
            rotation = create_structure(lmp, structure, elements)
        else:
            if elements is None:
                raise So3kratesError("give the element symbol of each atom type (elements=) for a data file")
            path = Path(structure)
            if not path.is_file():
                raise So3kratesError(f"{path}: no such LAMMPS data file")
            lmp.command(f'read_data "{path}"')
        driver = LammpsDriver(lmp, model, elements, **driver_options)
        driver.command(commands)
        return read_structure(lmp, driver, rotation)
    finally:
        lmp.close()
