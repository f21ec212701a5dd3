"""Neighbour lists and batched graphs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.neighborlist import neighbor_list as ase_neighbor_list

from helpers import ethanol, triclinic_cell, water
from so3krates import atoms_to_graph, collate
from so3krates.data.neighbors import NeighborList, neighbor_list, pair_order


def _edge_set(i, j, shifts):
    return sorted(zip(i.tolist(), j.tolist(), map(tuple, np.asarray(shifts).tolist()), strict=True))


@pytest.mark.parametrize(
    "make_structure, cutoff",
    [(ethanol, 2.0), (triclinic_cell, 4.0), (triclinic_cell, 7.5)],
    ids=["molecule", "periodic", "cutoff-above-half-cell"],
)
def test_neighbor_list_matches_ase(make_structure, cutoff):
    atoms = make_structure()
    ours = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, cutoff)
    i, j, shifts = ase_neighbor_list("ijS", atoms, cutoff)
    assert _edge_set(ours.idx_i, ours.idx_j, ours.shifts) == _edge_set(i, j, shifts)


def test_mixed_periodicity_slab():
    atoms = triclinic_cell()
    atoms.pbc = [True, True, False]
    ours = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, 4.0)
    i, j, shifts = ase_neighbor_list("ijS", atoms, 4.0)
    assert _edge_set(ours.idx_i, ours.idx_j, ours.shifts) == _edge_set(i, j, shifts)


def test_edge_vectors_follow_the_convention():
    """vec_ij = R[idx_j] − R[idx_i] + shifts @ cell, and |vec_ij| < r_c (SPEC §1)."""
    atoms = triclinic_cell()
    graph = atoms_to_graph(atoms, 4.0, dtype=torch.float64)
    i, j, d = ase_neighbor_list("ijD", atoms, 4.0)
    ours = {
        (a, b, tuple(np.round(v, 8)))
        for a, b, v in zip(
            graph.idx_i.tolist(), graph.idx_j.tolist(), graph.edge_vectors().numpy(), strict=True
        )
    }
    theirs = {(a, b, tuple(np.round(v, 8))) for a, b, v in zip(i.tolist(), j.tolist(), d, strict=True)}
    assert ours == theirs
    assert graph.edge_vectors().norm(dim=-1).max() < 4.0


def test_collate_offsets_indices_and_batch():
    graphs = [atoms_to_graph(a, 3.0) for a in (ethanol(), Atoms("Ar"), water())]
    batch = collate(graphs)
    assert batch.n_atoms == 9 + 1 + 3 and batch.n_graphs == 3
    assert batch.batch.tolist() == [0] * 9 + [1] + [2] * 3
    assert batch.n_edges == sum(g.n_edges for g in graphs)
    water_edges = batch.idx_i >= 10
    assert water_edges.sum() == graphs[2].n_edges and batch.idx_j[water_edges].min() >= 10
    assert batch.cell.shape == (3, 3, 3) and batch.pbc.shape == (3, 3)


def test_graph_to_casts_floats_only():
    graph = atoms_to_graph(ethanol(), 3.0, dtype=torch.float32).to(dtype=torch.float64)
    assert graph.positions.dtype == torch.float64 and graph.shifts.dtype == torch.float64
    assert graph.idx_i.dtype == torch.int64 and graph.atomic_numbers.dtype == torch.int64
    assert graph.pbc.dtype == torch.bool


def test_empty_structure():
    graph = atoms_to_graph(Atoms(), 5.0)
    assert graph.n_atoms == 0 and graph.n_edges == 0


# --- pair order ---------------------------------------------------------------------------------------------


def test_pair_order_holds_the_same_edges_and_each_reverse_half_way():
    atoms = triclinic_cell()  # atoms see their own images: i = j edges pair up by the sign of the shift
    full = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, 5.0)
    ordered = pair_order(full)
    assert _edge_set(*ordered) == _edge_set(*full)
    half = len(ordered.idx_i) // 2
    assert 2 * half == len(full.idx_i)
    np.testing.assert_array_equal(ordered.idx_i[half:], ordered.idx_j[:half])
    np.testing.assert_array_equal(ordered.idx_j[half:], ordered.idx_i[:half])
    np.testing.assert_array_equal(ordered.shifts[half:], -ordered.shifts[:half])
    assert (ordered.idx_i[:half] == ordered.idx_j[:half]).any()  # self-images are among the pairs
    # A list that is not symmetric cannot be put in pair order.
    assert pair_order(NeighborList(full.idx_i[1:], full.idx_j[1:], full.shifts[1:])) is None


def test_atoms_to_graph_builds_the_pair_order_and_keeps_it_through_conversions():
    atoms = triclinic_cell()
    graph = atoms_to_graph(atoms, 4.0, pairs=True)
    plain = atoms_to_graph(atoms, 4.0)
    expected = pair_order(NeighborList(plain.idx_i.numpy(), plain.idx_j.numpy(), plain.shifts.long().numpy()))
    assert graph.pairs and not plain.pairs
    np.testing.assert_array_equal(graph.idx_i.numpy(), expected.idx_i)
    np.testing.assert_array_equal(graph.idx_j.numpy(), expected.idx_j)
    np.testing.assert_array_equal(graph.shifts.numpy(), expected.shifts)
    assert graph.to(dtype=torch.float32).pairs


def test_a_batch_of_graphs_in_pair_order_is_in_pair_order():
    structures = [ethanol(), triclinic_cell(), Atoms("O", positions=[[0.0, 0.0, 0.0]]), ethanol(1)]
    plain = collate([atoms_to_graph(atoms, 4.0) for atoms in structures])
    ordered = collate([atoms_to_graph(atoms, 4.0, pairs=True) for atoms in structures])
    assert ordered.pairs and not plain.pairs
    half = ordered.n_edges // 2
    torch.testing.assert_close(ordered.idx_i[half:], ordered.idx_j[:half])
    torch.testing.assert_close(ordered.shifts[half:], -ordered.shifts[:half])
    assert _edge_set(ordered.idx_i, ordered.idx_j, ordered.shifts) == _edge_set(
        plain.idx_i, plain.idx_j, plain.shifts
    )
    # One graph in plain order makes the whole batch a plain list.
    mixed = collate([atoms_to_graph(structures[0], 4.0, pairs=True), atoms_to_graph(structures[1], 4.0)])
    assert not mixed.pairs
