"""The HDF5 dataset: write_hdf5 → HDF5Dataset gives GraphDataset's items, hdf5_statistics gives
compute_statistics' numbers, in bounded memory."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import pickle
import resource
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from ase.build import molecule

from helpers import ethanol, triclinic_cell
from so3krates.data.dataset import GraphDataset, collate_batch
from so3krates.data.hdf5 import HDF5Dataset, write_hdf5
from so3krates.data.hdf5_statistics import hdf5_statistics
from so3krates.data.io import read_structures
from so3krates.data.statistics import DatasetStatistics, compute_statistics
from so3krates.data.structure import Structure
from so3krates.errors import DataError

EXAMPLE = Path(__file__).parents[1] / "examples" / "data" / "ethanol_gfn2xtb_500K.extxyz"
CUTOFF = 5.0  # Å


def molecules() -> list[Structure]:
    """50 ethanol frames of the example data, some of them with missing or partly NaN labels."""
    structures = read_structures(EXAMPLE, index=":50")
    structures[3] = dataclasses.replace(structures[3], energy=float("nan"))
    structures[5] = dataclasses.replace(structures[5], forces=None)
    forces = structures[7].forces.copy()
    forces[2, 1] = np.nan
    structures[7] = dataclasses.replace(structures[7], forces=forces)
    return structures


def crystals() -> list[Structure]:
    """Triclinic cells of four compositions (one periodic in two directions only) and a molecule with a
    cell but no periodicity, with made-up labels, some missing."""
    rng = np.random.default_rng(7)
    structures = []
    for seed in range(7):
        atoms = triclinic_cell(seed)  # C2OH6
        variant = seed % 4
        if variant == 1:
            atoms.numbers[0] = 7  # N for C
        elif variant == 2:
            atoms.numbers[2] = 1  # H for O
        elif variant == 3:
            atoms.numbers[1] = 1  # H for C
        if seed == 4:
            atoms.pbc = [True, True, False]
        stress = rng.normal(scale=0.01, size=(3, 3))
        structures.append(
            Structure.from_atoms(
                atoms,
                energy=rng.normal(-400.0, 5.0),
                forces=rng.normal(size=(len(atoms), 3)),
                stress=stress + stress.T,
            )
        )
    structures[1] = dataclasses.replace(structures[1], energy=float("nan"))
    structures[2] = dataclasses.replace(structures[2], stress=None)
    structures[6] = dataclasses.replace(structures[6], forces=None)
    boxed = ethanol()
    boxed.cell = [7.0, 8.0, 9.0]
    structures.append(Structure.from_atoms(boxed, energy=-300.0, forces=rng.normal(size=(9, 3))))
    return structures


DATASETS = {"molecules": molecules, "crystals": crystals}


@pytest.fixture(scope="module", params=list(DATASETS))
def written(request, tmp_path_factory) -> tuple[Path, list[Structure]]:
    structures = DATASETS[request.param]()
    path = tmp_path_factory.mktemp(request.param) / "data.h5"
    # A small chunk_frames: several flushes, and the last one partial.
    assert write_hdf5(path, iter(structures), CUTOFF, chunk_frames=16) == len(structures)
    return path, structures


def edge_set(graph) -> set[tuple[int, ...]]:
    rows = torch.cat([graph.idx_i[:, None], graph.idx_j[:, None], graph.shifts.long()], dim=1)
    return {tuple(row) for row in rows.tolist()}


def assert_same_item(item, expected) -> None:
    (graph, labels), (expected_graph, expected_labels) = item, expected
    for field in ("positions", "atomic_numbers", "cell", "pbc", "batch"):
        value, reference = getattr(graph, field), getattr(expected_graph, field)
        assert value.dtype == reference.dtype, field
        assert torch.equal(value, reference), field
    for field in ("idx_i", "idx_j", "shifts"):
        assert getattr(graph, field).dtype == getattr(expected_graph, field).dtype, field
    assert graph.n_edges == expected_graph.n_edges
    assert edge_set(graph) == edge_set(expected_graph)
    assert labels.keys() == expected_labels.keys()
    for key, value in labels.items():
        reference = expected_labels[key]
        assert value.dtype == reference.dtype and value.shape == reference.shape, key
        torch.testing.assert_close(value, reference, rtol=0, atol=0, equal_nan=True)


def assert_same_statistics(statistics: DatasetStatistics, expected: DatasetStatistics) -> None:
    assert statistics.elements == expected.elements
    assert statistics.n_structures == expected.n_structures
    assert statistics.energy_shifts.keys() == expected.energy_shifts.keys()
    for z, shift in expected.energy_shifts.items():
        assert statistics.energy_shifts[z] == pytest.approx(shift, rel=1e-8, abs=1e-10), z
    assert statistics.force_rms == pytest.approx(expected.force_rms, rel=1e-8)
    assert statistics.avg_num_neighbors == pytest.approx(expected.avg_num_neighbors, rel=1e-12)


def test_items_equal_graph_dataset_items(written):
    path, structures = written
    dataset = HDF5Dataset(path)
    reference = GraphDataset(structures, CUTOFF)
    assert len(dataset) == len(structures)
    assert dataset.cutoff == CUTOFF
    assert dataset.n_atoms.tolist() == [s.n_atoms for s in structures]
    for k in range(len(dataset)):
        assert_same_item(dataset[k], reference[k])


def test_indices_select_and_order_structures(written):
    path, structures = written
    indices = [4, 0, 2]
    dataset = HDF5Dataset(path, indices=np.array(indices))
    reference = GraphDataset([structures[i] for i in indices], CUTOFF)
    assert len(dataset) == 3
    for k in range(3):
        assert_same_item(dataset[k], reference[k])
    with pytest.raises(DataError, match=f"index {len(structures)} is outside"):
        HDF5Dataset(path, indices=[0, len(structures)])


def test_structure_round_trip(written):
    path, structures = written
    dataset = HDF5Dataset(path)
    for k, expected in enumerate(structures):
        structure = dataset.structure(k)
        for field in ("positions", "atomic_numbers", "cell", "pbc"):
            value, reference = getattr(structure, field), getattr(expected, field)
            assert value.dtype == reference.dtype and np.array_equal(value, reference), field
        np.testing.assert_equal(structure.energy, expected.energy)
        for field in ("forces", "stress"):
            value, reference = getattr(structure, field), getattr(expected, field)
            assert (value is None) == (reference is None), field
            if value is not None:
                np.testing.assert_array_equal(value, reference)


def test_statistics_match_compute_statistics(written):
    path, structures = written
    assert_same_statistics(hdf5_statistics(path, None, CUTOFF), compute_statistics(structures, CUTOFF))
    subset = [0, 2, 3, 4, 4, 5, 7]  # a repeated structure counts twice, as in compute_statistics
    picked = [structures[i] for i in subset]
    assert_same_statistics(hdf5_statistics(path, subset, CUTOFF), compute_statistics(picked, CUTOFF))
    # A smaller model cutoff: N̄ counts only the stored edges below it.
    assert_same_statistics(hdf5_statistics(path, subset, 3.0), compute_statistics(picked, 3.0))
    isolated = {1: -13.6, 6: -1030.0, 7: -1485.0, 8: -2040.0}
    assert_same_statistics(
        hdf5_statistics(path, subset, CUTOFF, isolated_atom_energies=isolated),
        compute_statistics(picked, CUTOFF, isolated_atom_energies=isolated),
    )


def test_statistics_of_several_blocks_with_mixed_compositions(tmp_path, monkeypatch):
    # Blocks of 3 structures: the least-squares rows arrive in several pieces, as in a large file.
    import so3krates.data.hdf5_statistics as hdf5

    original = hdf5._blocks
    monkeypatch.setattr(hdf5, "_blocks", lambda *args: original(*args, max_structures=3))
    structures = crystals() + molecules()[:10]
    write_hdf5(tmp_path / "data.h5", structures, CUTOFF)
    subset = [0, 1, 2, 5, 6, 7, 8, 12, 13]
    for cutoff in (CUTOFF, 3.5):
        assert_same_statistics(
            hdf5_statistics(tmp_path / "data.h5", subset, cutoff),
            compute_statistics([structures[i] for i in subset], cutoff),
        )


def test_smaller_model_cutoff_filters_edges(written):
    path, structures = written
    dataset, full = HDF5Dataset(path, cutoff=3.0), HDF5Dataset(path)
    reference = GraphDataset(structures, 3.0)
    assert dataset.cutoff == 3.0
    for k in range(len(dataset)):
        assert dataset[k][0].n_edges < full[k][0].n_edges
        assert_same_item(dataset[k], reference[k])


def test_larger_model_cutoff_is_an_error(written):
    path, _ = written
    for call in (lambda: HDF5Dataset(path, cutoff=6.0), lambda: hdf5_statistics(path, None, 6.0)):
        with pytest.raises(
            DataError, match=r"prepare the file again with a cutoff of at least 6\.0 Å"
        ) as error:
            call()
        assert str(path) in str(error.value)


def test_foreign_files_are_one_line_errors(tmp_path):
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5\nat all\n")
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as file:
        file["positions"] = np.zeros((3, 3))
    newer = tmp_path / "newer.h5"
    write_hdf5(newer, molecules()[:2], CUTOFF)
    with h5py.File(newer, "a") as file:
        file.attrs["format_version"] = 2
    cases = {
        text: "not an HDF5 file",
        other: "not a so3krates HDF5 dataset",
        newer: "format version 2",
        tmp_path / "missing.h5": "file not found",
    }
    for path, message in cases.items():
        with pytest.raises(DataError, match=message) as error:
            HDF5Dataset(path)
        assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)


def test_interrupted_write_leaves_nothing_behind(tmp_path):
    structures = molecules()

    def failing():
        yield from structures[:40]  # past two flushes of 16
        raise RuntimeError("reader failed")

    with pytest.raises(RuntimeError, match="reader failed"):
        write_hdf5(tmp_path / "data.h5", failing(), CUTOFF, chunk_frames=16)
    assert list(tmp_path.iterdir()) == []

    write_hdf5(tmp_path / "data.h5", structures[:5], CUTOFF)
    with pytest.raises(RuntimeError, match="reader failed"):
        write_hdf5(tmp_path / "data.h5", failing(), CUTOFF, chunk_frames=16)
    assert list(tmp_path.iterdir()) == [tmp_path / "data.h5"]
    assert len(HDF5Dataset(tmp_path / "data.h5")) == 5


def test_malformed_structures_are_errors(tmp_path):
    good = molecules()[0]
    thin = Structure.from_atoms(molecule("H2"), energy=0.0)
    thin.cell = np.diag([0.03, 20.0, 20.0])
    thin.pbc = np.array([True, False, False])
    cases = {
        "structure 1: forces have shape": dataclasses.replace(good, forces=np.zeros((3, 3))),
        "structure 1: unknown element Z = 0": dataclasses.replace(
            good, atomic_numbers=np.r_[0, good.atomic_numbers[1:]]
        ),
        "structure 1: an image offset of 1[0-9][0-9] cells does not fit": thin,
    }
    for message, bad in cases.items():
        with pytest.raises(DataError, match=message):
            write_hdf5(tmp_path / "bad.h5", [good, bad], CUTOFF)
        assert not (tmp_path / "bad.h5").exists()


def test_workers_after_fork_and_pickling(written):
    path, structures = written
    dataset = HDF5Dataset(path)
    reference = collate_batch([GraphDataset(structures, CUTOFF)[k] for k in range(len(structures))])
    dataset[0]  # the parent opens the file before the workers fork
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=len(dataset) // 2 + 1,
        num_workers=2,
        collate_fn=collate_batch,
        multiprocessing_context=multiprocessing.get_context("fork"),
    )
    batches = list(loader)
    assert len(batches) == 2
    graph = torch.cat([b[0].positions for b in batches])
    torch.testing.assert_close(graph, reference[0].positions, rtol=0, atol=0)
    energies = torch.cat([b[1]["energy"] for b in batches])
    torch.testing.assert_close(energies, reference[1]["energy"], rtol=0, atol=0, equal_nan=True)

    copy = pickle.loads(pickle.dumps(dataset))  # what a spawned worker receives
    assert_same_item(copy[1], dataset[1])
    dataset.close()
    assert_same_item(dataset[1], copy[1])


def ethanol_clusters(n_structures: int, seed: int = 0):
    """Eight ethanol molecules 4.5 Å apart (72 atoms, ~1900 edges at 5 Å) with random displacements
    and labels, generated one at a time."""
    base = molecule("CH3CH2OH")
    grid = 4.5 * np.array([[a, b, c] for a in range(2) for b in range(2) for c in range(2)], dtype=float)
    positions = np.concatenate([base.positions + offset for offset in grid])
    numbers = np.tile(base.numbers, len(grid))
    rng = np.random.default_rng(seed)
    for _ in range(n_structures):
        yield Structure(
            positions=positions + rng.normal(scale=0.05, size=positions.shape),
            atomic_numbers=numbers,
            cell=np.zeros((3, 3)),
            pbc=np.zeros(3, dtype=bool),
            energy=float(rng.normal()),
            forces=rng.normal(size=positions.shape),
        )


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_resident_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc to read memory use")
def test_writing_and_reading_stream_in_bounded_memory(tmp_path):
    path = tmp_path / "large.h5"
    peak = peak_resident_bytes()
    assert write_hdf5(path, ethanol_clusters(3000), CUTOFF, chunk_frames=64) == 3000
    size = path.stat().st_size
    assert size > 60e6
    # Holding all rows before writing would need about the file size, and twice that to concatenate.
    # (The peak is the process's: earlier tests may have set it higher, which only loosens this check.)
    assert peak_resident_bytes() - peak < size / 3

    dataset = HDF5Dataset(path)
    dataset[0]
    before = resident_bytes()
    n_edges = sum(dataset[k][0].n_edges for k in range(len(dataset)))
    with h5py.File(path) as file:
        assert n_edges == file["structures/n_edges"][:].sum()
    assert resident_bytes() - before < size / 10
