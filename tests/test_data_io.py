"""Readers (npz, ASE database, extxyz), unit conversion, padding, bad input, and the extxyz writer."""

from __future__ import annotations

import warnings
from pathlib import Path

import ase.db
import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.stress import full_3x3_to_voigt_6_stress

from helpers import ethanol, triclinic_cell, water
from so3krates.data.io import read_structures, write_extxyz
from so3krates.data.structure import Structure
from so3krates.errors import DataError
from so3krates.units import BOHR, KCAL_PER_MOL

SHARED_DATA = (
    Path(__file__).resolve().parents[1].parent / "shared" / "data"
)  # ../shared/data from the repo root


def shared_file(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.is_file():
        pytest.skip(f"../shared/data not found ({path}); these tests read the shared reference data")
    return path


def labelled(atoms: Atoms, seed: int, stress: bool = False) -> tuple[float, np.ndarray, np.ndarray | None]:
    """Random but reproducible labels in eV, eV/Å, eV/Å³ (stress symmetric)."""
    rng = np.random.default_rng(seed)
    energy = float(rng.normal(-100.0, 5.0))
    forces = rng.normal(size=(len(atoms), 3))
    sigma = rng.normal(scale=0.01, size=(3, 3)) if stress else None
    return energy, forces, None if sigma is None else sigma + sigma.T


def with_calculator(atoms: Atoms, seed: int, stress: bool = False) -> Atoms:
    energy, forces, sigma = labelled(atoms, seed, stress)
    results = {"energy": energy, "forces": forces}
    if stress:
        results["stress"] = full_3x3_to_voigt_6_stress(sigma)
    atoms.calc = SinglePointCalculator(atoms, **results)
    return atoms


def write_npz(path: Path, n_frames: int = 4, **overrides: np.ndarray) -> dict[str, np.ndarray]:
    """An sGDML-layout npz of rattled ethanol frames (eV, Å); ``overrides`` replace or add arrays."""
    frames = [ethanol(seed) for seed in range(n_frames)]
    arrays = {
        "R": np.stack([a.positions for a in frames]),
        "z": frames[0].numbers.astype(np.uint8),
        "E": np.linspace(-10.0, -9.0, n_frames)[:, None],
        "F": np.random.default_rng(0).normal(size=(n_frames, len(frames[0]), 3)),
    }
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return arrays


def raises_data_error(*fragments: str, **read_kwargs) -> str:
    """Reads ``read_kwargs['path']`` expecting a one-line DataError containing every fragment."""
    with pytest.raises(DataError) as info:
        read_structures(**read_kwargs)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


# ---------------------------------------------------------------------------------------------------------
# extxyz and other ASE formats


def test_extxyz_calculator_labels_with_stress(tmp_path):
    frames = [with_calculator(triclinic_cell(seed), seed, stress=True) for seed in range(3)]
    path = tmp_path / "cells.extxyz"
    ase.io.write(path, frames, format="extxyz")
    structures = read_structures(path)
    assert len(structures) == 3
    for atoms, structure in zip(frames, structures, strict=True):
        energy, forces, sigma = labelled(atoms, frames.index(atoms), stress=True)
        np.testing.assert_allclose(structure.positions, atoms.positions, atol=1e-7)
        np.testing.assert_allclose(structure.cell, atoms.cell.array, atol=1e-7)
        assert structure.pbc.all()
        np.testing.assert_array_equal(structure.atomic_numbers, atoms.numbers)
        assert structure.energy == pytest.approx(energy)
        np.testing.assert_allclose(structure.forces, forces, atol=1e-7)
        np.testing.assert_allclose(structure.stress, sigma, atol=1e-7)
        assert structure.positions.dtype == np.float64 and structure.atomic_numbers.dtype == np.int64


@pytest.mark.parametrize("layout", ["voigt", "flat9", "3x3"])
def test_extxyz_custom_keys_and_stress_layouts(tmp_path, layout):
    atoms = triclinic_cell(1)
    energy, forces, sigma = labelled(atoms, 7, stress=True)
    atoms.info["REF_energy"] = energy
    atoms.arrays["REF_forces"] = forces
    atoms.info["REF_stress"] = {
        "voigt": full_3x3_to_voigt_6_stress(sigma),
        "flat9": sigma.reshape(9),
        "3x3": sigma,
    }[layout]
    path = tmp_path / "ref.xyz"
    ase.io.write(path, atoms, format="extxyz")
    (structure,) = read_structures(
        path, energy_key="REF_energy", forces_key="REF_forces", stress_key="REF_stress"
    )
    assert structure.energy == pytest.approx(energy)
    np.testing.assert_allclose(structure.forces, forces, atol=1e-7)
    np.testing.assert_allclose(structure.stress, sigma, atol=1e-7)


def test_index_selects_frames_and_names_them_in_errors(tmp_path):
    frames = [with_calculator(ethanol(seed), seed) for seed in range(5)]
    frames[3].positions[2] = frames[3].positions[1]  # atoms 1 and 2 coincide in frame 3
    path = tmp_path / "five.xyz"
    ase.io.write(path, frames, format="extxyz")
    picked = read_structures(path, index="1:3")
    assert [s.energy for s in picked] == pytest.approx([labelled(frames[k], k)[0] for k in (1, 2)])
    assert len(read_structures(path, index=-1)) == 1
    raises_data_error(str(path), "frame 3:", "key 'positions'", "atoms 1 and 2", path=path, index="2:")
    raises_data_error("frame 3:", path=path, index=3)


def test_missing_default_labels_warn_and_give_nan(tmp_path):
    path = tmp_path / "bare.xyz"
    ase.io.write(path, [water(), water()], format="extxyz")
    with pytest.warns(UserWarning) as caught:
        structures = read_structures(path)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert "no energy labels under the default key 'energy'" in messages[0]
    assert "no forces labels under the default key 'forces'" in messages[1]
    assert all(np.isnan(s.energy) and s.forces is None and s.stress is None for s in structures)


def test_explicit_key_missing_lists_the_keys_present(tmp_path):
    path = tmp_path / "labelled.xyz"
    atoms = water()
    atoms.info["REF_energy"] = -1.0
    ase.io.write(path, atoms, format="extxyz")
    message = raises_data_error(
        str(path), "key 'DFT_energy'", "REF_energy", path=path, energy_key="DFT_energy"
    )
    assert "not found" in message


def test_bare_key_in_comment_line_is_a_clear_error(tmp_path):
    path = tmp_path / "bare_key.xyz"
    path.write_text("1\nProperties=species:S:1:pos:R:3 -97191.7=T REF_energy=-4214.6\nH 0 0 0\n")
    with pytest.warns(UserWarning, match="no forces labels"):
        (structure,) = read_structures(path, energy_key="REF_energy")
    assert structure.energy == pytest.approx(-4214.6)
    raises_data_error("frame 0", "key '-97191.7'", "bare key", path=path, energy_key="-97191.7")


def test_nan_and_inf_labels_become_nan_with_one_warning(tmp_path):
    frames = [with_calculator(ethanol(seed), seed) for seed in range(3)]
    frames[0].calc.results["energy"] = np.nan
    frames[1].calc.results["forces"][0] = [np.inf, np.nan, 1.0]
    path = tmp_path / "nan.xyz"
    ase.io.write(path, frames, format="extxyz")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        structures = read_structures(path)
    assert len(caught) == 1
    assert "1 energies" in str(caught[0].message) and "2 force components" in str(caught[0].message)
    assert np.isnan(structures[0].energy)
    assert np.isnan(structures[1].forces[0, :2]).all() and structures[1].forces[0, 2] == 1.0
    assert np.isfinite(structures[2].forces).all()


def test_ase_read_failure_becomes_one_line_data_error(tmp_path):
    path = tmp_path / "truncated.xyz"
    path.write_text("3\nenergy=1.0\nH 0 0 0\nH 1 1 1\n")
    raises_data_error(str(path), "frame 0: line 1: 3 atoms, but the file ends before them", path=path)
    garbled = tmp_path / "garbled.xyz"  # the counts are right, a coordinate is not a number
    garbled.write_text("2\nenergy=1.0\nH 0 0 0\nH x 1 1\n")
    raises_data_error(str(garbled), "ase.io.read failed", path=garbled)


def test_a_wrong_atom_count_line_names_its_frame(tmp_path):
    frame = "2\nenergy=1.0\nH 0 0 0\nH 0 0 0.74\n"
    path = tmp_path / "counts.xyz"
    path.write_text(frame * 3 + frame.replace("2\n", "3\n", 1) + frame * 2)  # frame 3 claims 3 atoms
    raises_data_error(
        "frame 4: line 18: expected the atom count of a frame", "frame 3 says 3 atoms on line 13", path=path
    )


def test_frames_without_a_label_that_others_have_are_counted_in_a_warning(tmp_path):
    frames = ["2\nenergy=-1.0\nH 0 0 0\nH 0 0 0.74\n"] * 3 + ["2\nnrg=-1.0\nH 0 0 0\nH 0 0 0.75\n"]
    path = tmp_path / "some.extxyz"
    path.write_text("".join(frames))
    with pytest.warns(
        UserWarning, match=r"1 of 4 frames have no energy label under key 'energy' \(frame 3\)"
    ):
        structures = read_structures(path)
    assert len(structures) == 4 and np.isnan(structures[3].energy)


def test_unknown_element_zero_atoms_nan_positions_in_extxyz(tmp_path):
    unknown = tmp_path / "unknown.xyz"
    unknown.write_text("2\nenergy=1.0\nH 0 0 0\nX 1 1 1\n")
    raises_data_error("frame 0", "key 'species'", "atom 1: unknown element Z = 0", path=unknown)
    empty_frame = tmp_path / "zero_atoms.xyz"
    empty_frame.write_text("1\nenergy=1.0\nH 0 0 0\n0\nenergy=2.0\n")
    raises_data_error("frame 1", "no atoms", path=empty_frame)
    nan = tmp_path / "nan_pos.xyz"
    nan.write_text("2\nenergy=1.0\nH 0 0 0\nH 1 1 nan\n")
    raises_data_error("frame 0", "key 'positions'", "NaN or inf", path=nan)


def test_nan_cell_and_degenerate_cell(tmp_path):
    path = tmp_path / "cell.xyz"
    path.write_text('1\nLattice="5 0 0 0 nan 0 0 0 5" pbc="T T T"\nH 0 0 0\n')
    raises_data_error("frame 0", "key 'cell'", "NaN or inf", path=path)
    flat = tmp_path / "flat.xyz"
    flat.write_text('1\nLattice="5 0 0 5 0 0 0 0 5" pbc="T T T"\nH 0 0 0\n')
    raises_data_error("frame 0", "key 'cell'", "degenerate", path=flat)


def test_close_atoms_including_periodic_images(tmp_path):
    close = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.05]])
    image = Atoms("H2", positions=[[0.02, 1, 1], [2.95, 1, 1]], cell=np.eye(3) * 3.0, pbc=True)
    self_image = Atoms("H", cell=[0.05, 3.0, 3.0], pbc=True)
    for k, atoms in enumerate([close, image, self_image]):
        path = tmp_path / f"close{k}.xyz"
        ase.io.write(path, with_calculator(atoms, k), format="extxyz")
        expected = ["atoms 0 and 1", "atoms 0 and 1 (periodic image)", "atom 0 and its own periodic image"][k]
        raises_data_error(str(path), "frame 0", "key 'positions'", expected, "min_distance", path=path)
        read_structures(path, min_distance=0.0)  # the check can be switched off


# ---------------------------------------------------------------------------------------------------------
# npz


def test_npz_sgdml_layout(tmp_path):
    path = tmp_path / "md17.npz"
    arrays = write_npz(path)
    structures = read_structures(path)
    assert len(structures) == 4
    for k, structure in enumerate(structures):
        np.testing.assert_allclose(structure.positions, arrays["R"][k])
        np.testing.assert_array_equal(structure.atomic_numbers, arrays["z"])
        assert structure.energy == pytest.approx(arrays["E"][k, 0])
        np.testing.assert_allclose(structure.forces, arrays["F"][k])
        assert not structure.pbc.any() and not structure.cell.any() and structure.stress is None


def test_npz_rmd17_layout_and_explicit_keys(tmp_path):
    path = tmp_path / "rmd17.npz"
    source = write_npz(tmp_path / "source.npz")
    old = source["E"][:, 0] + 1.0
    np.savez(
        path,
        coords=source["R"],
        nuclear_charges=source["z"],
        energies=source["E"][:, 0],
        forces=source["F"],
        old_energies=old,
    )
    assert [s.energy for s in read_structures(path)] == pytest.approx(source["E"][:, 0])
    assert [s.energy for s in read_structures(path, energy_key="old_energies")] == pytest.approx(old)
    raises_data_error(str(path), "key 'stress'", path=path, stress_key="stress")


def test_npz_padding_per_frame_and_shared(tmp_path):
    water_z, water_r = water().numbers, water().positions
    eth = ethanol()
    z = np.zeros((2, 9), dtype=np.int64)
    z[0, :3], z[1] = water_z, eth.numbers
    positions = np.zeros((2, 9, 3))
    positions[0, :3], positions[1] = water_r, eth.positions
    forces = np.zeros((2, 9, 3))
    forces[0, :3], forces[1] = 1.0, 2.0
    path = tmp_path / "padded.npz"
    np.savez(path, R=positions, z=z, E=np.array([[-1.0], [-2.0]]), F=forces)
    small, big = read_structures(path)
    assert small.n_atoms == 3 and big.n_atoms == 9
    np.testing.assert_array_equal(small.atomic_numbers, water_z)
    np.testing.assert_allclose(small.positions, water_r)
    assert (small.forces == 1.0).all() and (big.forces == 2.0).all()

    shared = tmp_path / "shared_padding.npz"
    np.savez(shared, R=positions[:, :4], z=np.array([8, 1, 1, 0]), E=np.zeros(2), F=forces[:, :4])
    assert [s.n_atoms for s in read_structures(shared)] == [3, 3]


def test_npz_bad_shapes_and_keys(tmp_path):
    path = tmp_path / "bad.npz"
    write_npz(path, E=np.zeros(3))
    raises_data_error(str(path), "key 'E'", "(4,)", path=path)
    write_npz(path, F=np.zeros((4, 8, 3)))
    raises_data_error("key 'F'", "(4, 8, 3)", "(4, 9, 3)", path=path)
    write_npz(path, z=np.ones(8, dtype=int))
    raises_data_error("key 'z'", "(8,)", path=path)
    write_npz(path, R=None)
    raises_data_error("no positions", "'R'", "'coords'", "['E', 'F', 'z']", path=path)
    write_npz(path, R=np.zeros((0, 9, 3)), E=np.zeros(0), F=np.zeros((0, 9, 3)))
    raises_data_error("key 'R'", "no frames", path=path)
    write_npz(path)
    raises_data_error(
        "key 'forces_dft'", "not found", "['E', 'F', 'R', 'z']", path=path, forces_key="forces_dft"
    )


def test_npz_bad_frames(tmp_path):
    path = tmp_path / "frames.npz"
    arrays = write_npz(path)
    arrays["R"][2, 4, 1] = np.nan
    np.savez(path, **arrays)
    raises_data_error(str(path), "frame 2:", "key 'R'", "positions contain NaN or inf", path=path)

    per_frame_z = np.tile(arrays["z"].astype(np.int64), (4, 1))
    per_frame_z[1, 5] = 119
    write_npz(path, z=per_frame_z)
    raises_data_error("frame 1:", "key 'z'", "atom 5: unknown element Z = 119", path=path)
    per_frame_z[1, 5], per_frame_z[3] = 1, 0  # frame 3 is all padding
    write_npz(path, z=per_frame_z)
    raises_data_error("frame 3:", "key 'z'", "no atoms", path=path)
    write_npz(path, z=np.full(9, -1))
    raises_data_error("frame 0:", "unknown element Z = -1", path=path)


def test_npz_not_a_zip(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_text("not an archive")
    raises_data_error(str(path), "cannot read as npz", path=path)


# ---------------------------------------------------------------------------------------------------------
# ASE database


def test_db_calculator_results_key_value_pairs_and_data(tmp_path):
    path = tmp_path / "set.db"
    cells = [with_calculator(triclinic_cell(seed), seed, stress=True) for seed in range(2)]
    with ase.db.connect(path) as db:
        for k, atoms in enumerate(cells):
            db.write(
                atoms, dft_energy=float(k), data={"dft_forces": np.full((9, 3), k), "dft_stress": np.eye(3)}
            )
    structures = read_structures(path)
    for k, (atoms, structure) in enumerate(zip(cells, structures, strict=True)):
        energy, forces, sigma = labelled(atoms, k, stress=True)
        assert structure.energy == pytest.approx(energy)
        np.testing.assert_allclose(structure.forces, forces)
        np.testing.assert_allclose(structure.stress, sigma)
        np.testing.assert_allclose(structure.cell, atoms.cell.array)
    custom = read_structures(path, energy_key="dft_energy", forces_key="dft_forces", stress_key="dft_stress")
    assert [s.energy for s in custom] == [0.0, 1.0]
    assert (custom[1].forces == 1.0).all() and (custom[0].stress == np.eye(3)).all()
    raises_data_error(str(path), "key 'virial'", "not found", path=path, stress_key="virial")


def test_db_empty_and_not_a_database(tmp_path):
    empty = tmp_path / "empty.db"
    with ase.db.connect(empty) as db:
        db.write(water())
        db.delete([1])
    raises_data_error(str(empty), "no frames", path=empty)
    junk = tmp_path / "junk.db"
    junk.write_text("hello")
    raises_data_error(str(junk), "cannot read as ASE database", path=junk)


# ---------------------------------------------------------------------------------------------------------
# files and units


def test_missing_and_empty_files(tmp_path):
    raises_data_error(str(tmp_path / "nope.xyz"), "file not found", path=tmp_path / "nope.xyz")
    raises_data_error(str(tmp_path / "nope.db"), "file not found", path=tmp_path / "nope.db")
    assert not (tmp_path / "nope.db").exists()  # ase.db.connect would have created it
    for suffix in ("xyz", "npz", "db"):
        empty = tmp_path / f"empty.{suffix}"
        empty.touch()
        raises_data_error(str(empty), "empty", path=empty)


def test_unknown_unit_lists_the_allowed_ones(tmp_path):
    path = tmp_path / "x.npz"
    write_npz(path)
    raises_data_error("energy_unit 'kcal'", "kcal/mol", "Hartree", path=path, energy_unit="kcal")
    raises_data_error("length_unit 'bohr'", "Bohr", "Å", path=path, length_unit="bohr")


def test_kcal_per_mol_and_bohr_convert_to_ev_and_angstrom(tmp_path):
    cells = [with_calculator(triclinic_cell(seed), seed, stress=True) for seed in range(2)]
    reference = read_structures(_written(tmp_path / "ev.extxyz", cells))
    for atoms in cells:  # the same data, in kcal/mol and Bohr
        results = atoms.calc.results
        atoms.set_cell(atoms.cell / BOHR, scale_atoms=True)
        atoms.calc = SinglePointCalculator(
            atoms,
            energy=results["energy"] / KCAL_PER_MOL,
            forces=results["forces"] / KCAL_PER_MOL * BOHR,
            stress=results["stress"] / KCAL_PER_MOL * BOHR**3,
        )
    converted = read_structures(
        _written(tmp_path / "kcal.extxyz", cells), energy_unit="kcal/mol", length_unit="Bohr"
    )
    for a, b in zip(reference, converted, strict=True):
        np.testing.assert_allclose(b.positions, a.positions, atol=1e-6)
        np.testing.assert_allclose(b.cell, a.cell, atol=1e-6)
        assert b.energy == pytest.approx(a.energy, rel=1e-9)
        np.testing.assert_allclose(b.forces, a.forces, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(b.stress, a.stress, rtol=1e-6, atol=1e-9)

    path = tmp_path / "hartree.npz"
    arrays = write_npz(path)
    np.savez(path, R=arrays["R"] / BOHR, z=arrays["z"], E=arrays["E"] / 27.211386245988, F=arrays["F"])
    (structure, *_) = read_structures(path, energy_unit="Hartree", length_unit="Bohr")
    np.testing.assert_allclose(structure.positions, arrays["R"][0])
    assert structure.energy == pytest.approx(arrays["E"][0, 0], rel=1e-8)
    np.testing.assert_allclose(structure.forces, arrays["F"][0] * 27.211386245988 / BOHR, rtol=1e-8)


def _written(path: Path, frames: list[Atoms]) -> Path:
    ase.io.write(path, frames, format="extxyz")
    return path


# ---------------------------------------------------------------------------------------------------------
# writer


def test_write_extxyz_round_trip_with_predictions(tmp_path):
    energy, forces, sigma = labelled(triclinic_cell(), 3, stress=True)
    cell = Structure.from_atoms(triclinic_cell(), energy=energy, forces=forces, stress=sigma)
    molecule = Structure.from_atoms(ethanol())  # no labels
    structures = [cell, molecule]
    predictions = {
        "energy": [1.5, -2.5],
        "forces": [np.full((9, 3), 0.1), np.full((9, 3), -0.2)],
        "stress": [np.eye(3) * 0.01, np.zeros((3, 3))],
    }
    path = tmp_path / "out" / "predictions.extxyz"
    write_extxyz(path, structures, predictions)
    assert [p.name for p in path.parent.iterdir()] == ["predictions.extxyz"]

    images = ase.io.read(path, index=":")
    assert images[0].info["REF_energy"] == pytest.approx(energy)
    np.testing.assert_allclose(images[0].arrays["REF_forces"], forces, atol=1e-8)  # ASE writes %16.8f
    assert "REF_energy" not in images[1].info and "REF_forces" not in images[1].arrays
    for atoms, k in zip(images, range(2), strict=True):
        assert atoms.get_potential_energy() == pytest.approx(predictions["energy"][k])
        np.testing.assert_allclose(atoms.get_forces(), predictions["forces"][k])
        np.testing.assert_allclose(atoms.get_stress(voigt=False), predictions["stress"][k], atol=1e-12)

    references = read_structures(
        path, energy_key="REF_energy", forces_key="REF_forces", stress_key="REF_stress"
    )
    assert references[0].energy == pytest.approx(energy)
    np.testing.assert_allclose(references[0].forces, forces, atol=1e-8)
    np.testing.assert_allclose(references[0].stress, sigma, atol=1e-12)
    np.testing.assert_allclose(references[0].cell, cell.cell, atol=1e-8)
    assert np.isnan(references[1].energy) and references[1].forces is None

    write_extxyz(path, structures)  # no predictions: references only
    assert ase.io.read(path, index=0).calc is None
    with pytest.raises(ValueError, match="one per structure"):
        write_extxyz(path, structures, {"energy": [1.0]})


# ---------------------------------------------------------------------------------------------------------
# shared reference data (../shared/data)


def test_shared_rmd17_ethanol_kcal_per_mol():
    path = shared_file("rmd17/rmd17_ethanol_train_01.npz")
    raw = np.load(path)
    structures = read_structures(path, energy_unit="kcal/mol")
    assert len(structures) == 1000 and structures[0].n_atoms == 9
    assert structures[0].energy == pytest.approx(raw["energies"][0] * KCAL_PER_MOL)
    np.testing.assert_allclose(structures[5].forces, raw["forces"][5] * KCAL_PER_MOL)
    assert -4215 < structures[0].energy < -4205  # eV, not kcal/mol


def test_shared_md17_ethanol_sgdml_npz():
    path = shared_file("md17/mlff_md17_ethanol_2000.npz")
    structures = read_structures(path, energy_unit="kcal/mol")
    assert len(structures) == 2000
    np.testing.assert_array_equal(structures[0].atomic_numbers, [6, 6, 8, 1, 1, 1, 1, 1, 1])
    assert all(-4216 < s.energy < -4213 for s in structures[:50])


def test_shared_qm7x_padded_npz():
    path = shared_file("mixed/mlff_qm7x_250_small.npz")
    raw = np.load(path)
    structures = read_structures(path)
    assert len(structures) == 2500
    n_atoms = [s.n_atoms for s in structures]
    np.testing.assert_array_equal(n_atoms, (raw["z"] != 0).sum(axis=1))
    assert min(n_atoms) == 4 and max(n_atoms) == 23
    assert all((s.atomic_numbers > 0).all() for s in structures)
    assert {int(z) for s in structures for z in s.atomic_numbers} == {1, 6, 7, 8, 16, 17}


def test_shared_so3krates_torch_xyz_with_bare_key():
    path = shared_file("md17/so3krates-torch_md17_ethanol_small_100.xyz")
    structures = read_structures(path, energy_key="REF_energy", forces_key="REF_forces")
    assert len(structures) == 100
    assert all(-4216 < s.energy < -4213 and s.forces.shape == (9, 3) for s in structures)
    bare_key = next(k for k in ase.io.read(path, index=0).info if k != "REF_energy")  # "-97191.7...": a flag
    raises_data_error("frame 0", "bare key", path=path, energy_key=bare_key)


def test_total_charge_and_spin_are_read_written_and_checked(tmp_path):
    charged = ethanol()
    charged.info.update(charge=-1, total_spin=0.5)
    path = tmp_path / "charged.extxyz"
    ase.io.write(path, [charged, water()])
    structures = read_structures(path)
    assert [(s.total_charge, s.total_spin) for s in structures] == [(-1.0, 0.5), (0.0, 0.0)]
    write_extxyz(tmp_path / "again.extxyz", structures)
    again = read_structures(tmp_path / "again.extxyz")
    assert [(s.total_charge, s.total_spin) for s in again] == [(-1.0, 0.5), (0.0, 0.0)]
    assert structures[0].to_atoms().info == {"charge": -1.0, "total_spin": 0.5}
    db = ase.db.connect(tmp_path / "charged.db")
    in_db = ethanol()
    in_db.set_initial_charges([2.0] + [0.0] * (len(in_db) - 1))  # ASE databases: charge = Σ initial charges
    db.write(in_db, total_spin=1.0)
    assert [(s.total_charge, s.total_spin) for s in read_structures(tmp_path / "charged.db")] == [(2.0, 1.0)]
    for info, message in (({"total_spin": -0.5}, "total spin S is ≥ 0"), ({"charge": "x"}, "charge")):
        bad = ethanol()
        bad.info.update(info)
        ase.io.write(tmp_path / "bad.extxyz", [water(), bad])
        with pytest.raises(DataError, match=message) as error:
            read_structures(tmp_path / "bad.extxyz")
        assert "frame 1" in str(error.value) and "\n" not in str(error.value)


def test_hdf5_refuses_structures_with_a_total_charge(tmp_path):
    from so3krates.data.hdf5 import write_hdf5

    structure = Structure.from_atoms(ethanol())
    structure.total_charge = 1.0
    with pytest.raises(DataError, match="does not store total charges"):
        write_hdf5(tmp_path / "x.h5", [structure], cutoff=4.0)
    assert not (tmp_path / "x.h5").exists()
