"""The ASE integrator of each ensemble, its conserved quantity, and its restartable state.

| ensemble      | ASE class                                      | conserved quantity                      |
|---------------|------------------------------------------------|-----------------------------------------|
| `nve`         | `ase.md.verlet.VelocityVerlet` + `FixCom`      | E_pot + E_kin                           |
| `langevin`    | `ase.md.langevin.Langevin` + `FixCom`          | none (E_pot + E_kin is logged)          |
| `bussi`       | `ase.md.bussi.Bussi` + `FixCom`                | E_pot + E_kin − transferred energy      |
| `nose-hoover` | `ase.md.nose_hoover_chain.NoseHooverChainNVT`  | `get_conserved_energy()`                |
| `npt`         | `IsotropicMTKNPT` or `MTKNPT` (same module)    | `get_conserved_energy()`                |

Velocities always start with zero total momentum, which every integrator here keeps (forces of a
translation-invariant model sum to zero), so a run has 3N − 3 degrees of freedom; that is what the
temperature is measured over and what the thermostats are set up for.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ase import Atoms, units
from ase.constraints import FixCom
from ase.md.bussi import Bussi
from ase.md.langevin import Langevin
from ase.md.md import MolecularDynamics
from ase.md.nose_hoover_chain import MTKNPT, IsotropicMTKNPT, NoseHooverChainNVT
from ase.md.verlet import VelocityVerlet

from so3krates.errors import ConfigError
from so3krates.md.config import MDConfig

#: attributes (dotted paths) of ASE's integrators that a restart must carry over; those an integrator
#: lacks are skipped. They are private in ASE, so a future ASE may rename them: a restart then re-initialises
#: the thermostat instead of failing.
_STATE_ATTRIBUTES = (
    "transferred_energy",  # Bussi
    "_thermostat._eta",  # Nosé–Hoover chain (NVT and NPT)
    "_thermostat._p_eta",
    "_barostat._xi",  # MTK barostat chain
    "_barostat._p_xi",
    "_cell0",  # IsotropicMTKNPT: cell = _cell0 · exp(_eps)
    "_volume0",
    "_eps",
    "_p_eps",
    "_p_g",  # MTKNPT cell momenta
)


def degrees_of_freedom(n_atoms: int) -> int:
    """3N − 3: the total momentum is zero and stays zero."""
    return 3 * n_atoms - 3 if n_atoms > 1 else 3


def temperature(kinetic_energy: float, n_atoms: int) -> float:
    """K — the kinetic temperature over ``degrees_of_freedom(n_atoms)``."""
    return 2.0 * kinetic_energy / (degrees_of_freedom(n_atoms) * units.kB)


def check_ensemble(config: MDConfig, atoms: Atoms, source: str) -> None:
    """Refuses combinations that cannot run (NPT without a periodic cell, a thermostat at 0 K)."""
    if config.ensemble == "npt" and not (atoms.pbc.all() and atoms.cell.volume > 0):
        raise ConfigError(
            f"{source}: ensemble 'npt' needs a periodic cell in all three directions, but the structure has "
            f"pbc={atoms.pbc.tolist()}; use nve, langevin, nose-hoover or bussi for a molecule"
        )
    if config.ensemble != "nve" and config.temperature_K <= 0:
        raise ConfigError(f"key 'temperature_K': must be > 0 for ensemble {config.ensemble!r}")


def make_integrator(config: MDConfig, atoms: Atoms, rng: np.random.Generator) -> MolecularDynamics:
    """The ASE dynamics for ``config.ensemble`` on ``atoms`` (which carry their momenta and calculator).

    ``FixCom`` is added for the integrators that accept constraints (NPT does not); it removes the 3
    centre-of-mass degrees of freedom from ASE's own count, which Bussi uses for its target kinetic energy.
    """
    dt = config.timestep_fs * units.fs
    tdamp = config.thermostat_time_fs * units.fs
    if config.ensemble in ("nve", "langevin", "bussi"):
        atoms.set_constraint(FixCom())
    if config.ensemble == "nve":
        return VelocityVerlet(atoms, timestep=dt)
    if config.ensemble == "langevin":
        # fixcm=False with the FixCom constraint is ASE's recommended, correctly sampling replacement.
        return Langevin(
            atoms,
            timestep=dt,
            temperature_K=config.temperature_K,
            friction=config.friction_per_fs / units.fs,
            fixcm=False,
            rng=rng,
        )
    if config.ensemble == "bussi":
        if atoms.get_kinetic_energy() <= 0:
            raise ConfigError("ensemble 'bussi' needs non-zero initial velocities (velocities: zero given)")
        return Bussi(atoms, timestep=dt, temperature_K=config.temperature_K, taut=tdamp, rng=rng)
    if config.ensemble == "nose-hoover":
        # ASE's chain thermostats 3N degrees of freedom; with the total momentum fixed only 3N − 3 move,
        # so the target is scaled to make their kinetic temperature equal temperature_K.
        n_atoms = len(atoms)
        target = config.temperature_K * degrees_of_freedom(n_atoms) / (3 * n_atoms)
        return NoseHooverChainNVT(atoms, timestep=dt, temperature_K=target, tdamp=tdamp, tchain=config.tchain)
    npt_class = IsotropicMTKNPT if config.barostat == "isotropic" else MTKNPT
    return npt_class(
        atoms,
        timestep=dt,
        temperature_K=config.temperature_K,
        pressure_au=config.pressure_bar * units.bar,
        tdamp=tdamp,
        pdamp=config.barostat_time_fs * units.fs,
        tchain=config.tchain,
    )


def conserved_energy(dynamics: MolecularDynamics, potential_energy: float, kinetic_energy: float) -> float:
    """eV — the integrator's conserved quantity (E_pot + E_kin where it has none of its own)."""
    if hasattr(dynamics, "get_conserved_energy"):  # NoseHooverChainNVT, IsotropicMTKNPT, MTKNPT
        return float(dynamics.get_conserved_energy())
    if isinstance(dynamics, Bussi):
        return potential_energy + kinetic_energy - float(dynamics.transferred_energy)
    return potential_energy + kinetic_energy


def _resolve(obj: Any, path: str) -> tuple[Any, str] | None:
    *parents, name = path.split(".")
    for parent in parents:
        obj = getattr(obj, parent, None)
        if obj is None:
            return None
    return (obj, name) if hasattr(obj, name) else None


def integrator_state(dynamics: MolecularDynamics) -> dict[str, Any]:
    """The thermostat/barostat variables of ``dynamics`` as JSON-ready numbers and lists."""
    state = {}
    for path in _STATE_ATTRIBUTES:
        found = _resolve(dynamics, path)
        if found is not None:
            value = getattr(*found)
            state[path] = np.asarray(value, dtype=np.float64).tolist()
    return state


def restore_integrator_state(dynamics: MolecularDynamics, state: dict[str, Any]) -> list[str]:
    """Sets the variables saved by ``integrator_state``; returns the names it could not set."""
    missing = []
    for path, value in state.items():
        found = _resolve(dynamics, path)
        if found is None:
            missing.append(path)
            continue
        current = getattr(*found)
        restored = np.asarray(value, dtype=np.float64)
        setattr(*found, restored.copy() if isinstance(current, np.ndarray) else float(restored))
    return missing
