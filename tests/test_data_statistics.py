"""Energy shifts, force RMS, N̄ and the DatasetStatistics model."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule

from helpers import ethanol, triclinic_cell, water
from so3krates.data.neighbors import neighbor_list
from so3krates.data.statistics import (
    DatasetStatistics,
    average_num_neighbors,
    compute_statistics,
    energy_shifts,
    force_rms,
)
from so3krates.data.structure import Structure
from so3krates.errors import ConfigError

#: Made-up per-element energies, eV.
MU = {1: -13.6, 6: -1030.0, 7: -1485.0, 8: -2040.0}


def synthetic(atoms: Atoms, noise: float = 0.0, seed: int = 0) -> Structure:
    """A structure whose energy is exactly Σ_Z μ_Z (plus optional noise), with random forces."""
    rng = np.random.default_rng(seed)
    energy = sum(MU[int(z)] for z in atoms.numbers) + rng.normal(scale=noise)
    return Structure.from_atoms(atoms, energy=energy, forces=rng.normal(size=(len(atoms), 3)))


def test_least_squares_shifts_recover_per_element_energies():
    names = ["H2O", "CH4", "NH3", "CH3OH", "HCN", "C2H6", "CH3CH2OH", "H2"]
    structures = [synthetic(molecule(name)) for name in names]
    shifts = energy_shifts(structures)
    assert sorted(shifts) == [1, 6, 7, 8]
    assert all(isinstance(z, int) and isinstance(mu, float) for z, mu in shifts.items())
    for z, mu in MU.items():
        assert shifts[z] == pytest.approx(mu, abs=1e-8)


def test_least_squares_skips_nan_energies_and_zeroes_unlabelled_elements():
    structures = [synthetic(molecule(name)) for name in ["H2O", "CH4", "CH3OH", "H2"]]
    structures.append(Structure.from_atoms(molecule("NH3")))  # no energy: N occurs only here
    shifts = energy_shifts(structures)
    assert shifts[7] == 0.0
    for z in (1, 6, 8):
        assert shifts[z] == pytest.approx(MU[z], abs=1e-8)
    assert energy_shifts([Structure.from_atoms(water())]) == {1: 0.0, 8: 0.0}


def test_single_composition_spreads_the_mean_energy_over_the_atoms():
    # All frames ethanol: rank 1, so the minimum-norm solution μ ∝ counts reproduces the mean energy.
    structures = [synthetic(ethanol(seed), noise=0.01, seed=seed) for seed in range(5)]
    shifts = energy_shifts(structures)
    predicted = sum(shifts[int(z)] for z in structures[0].atomic_numbers)
    assert predicted == pytest.approx(np.mean([s.energy for s in structures]), abs=1e-9)


def test_isolated_atom_energies_are_used_and_must_cover_every_element():
    structures = [synthetic(water()), synthetic(ethanol())]
    given = {1: -0.5, 6: -37.8, 8: -75.0, 9: -99.7}
    assert energy_shifts(structures, given) == {1: -0.5, 6: -37.8, 8: -75.0}
    with pytest.raises(ConfigError, match=r"isolated_atom_energies: no energy for Z = \[6\]"):
        energy_shifts(structures, {1: -0.5, 8: -75.0})


def test_force_rms_ignores_nan_and_missing_forces():
    forces = np.array([[3.0, 0.0, np.nan], [0.0, 4.0, 0.0]])
    with_nan = Structure.from_atoms(Atoms("H2", positions=[[0, 0, 0], [0, 0, 1]]), forces=forces)
    without = Structure.from_atoms(water())
    assert force_rms([with_nan, without]) == pytest.approx(np.sqrt(25.0 / 5.0))
    assert force_rms([without]) == 1.0


def test_average_num_neighbors_counts_the_full_list_with_periodic_images():
    dimer = Structure.from_atoms(Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]]))
    assert average_num_neighbors([dimer], cutoff=1.0) == 1.0
    assert average_num_neighbors([dimer], cutoff=0.5) == 0.0

    # One atom in a 2 Å simple cubic cell sees its 6 images at 2 Å, 12 at 2.83 Å (cutoff 3 Å).
    crystal = Structure.from_atoms(Atoms("H", cell=np.eye(3) * 2.0, pbc=True))
    assert average_num_neighbors([crystal], cutoff=2.5) == 6.0
    assert average_num_neighbors([crystal], cutoff=3.0) == 18.0

    cell = Structure.from_atoms(triclinic_cell())
    expected = (len(neighbor_list(cell.positions, cell.cell, cell.pbc, 5.0).idx_i) + 2) / (cell.n_atoms + 2)
    assert average_num_neighbors([cell, dimer], cutoff=5.0) == pytest.approx(expected)


def test_compute_statistics_and_its_json_round_trip():
    structures = [synthetic(molecule(name), seed=k) for k, name in enumerate(["H2O", "CH4", "CH3OH", "H2"])]
    stats = compute_statistics(structures, cutoff=5.0)
    assert stats.elements == [1, 6, 8]
    assert stats.n_structures == 4
    assert stats.energy_shifts[8] == pytest.approx(MU[8], abs=1e-8)
    assert stats.force_rms == pytest.approx(force_rms(structures))
    assert stats.avg_num_neighbors == pytest.approx(average_num_neighbors(structures, 5.0))
    assert DatasetStatistics.model_validate_json(stats.model_dump_json()) == stats  # int keys survive JSON
    with pytest.raises(ValueError, match="extra"):
        DatasetStatistics(**stats.model_dump(), mean_energy=0.0)
