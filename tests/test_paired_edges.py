"""Paired edges: the filters evaluated once per pair give the numbers of the plain full list."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms

from helpers import VARIANTS, ethanol, make_force_field, triclinic_cell
from so3krates import atoms_to_graph, preset
from so3krates.data.graph import collate
from so3krates.data.neighbors import NeighborList, neighbor_list, paired_edges


def paired_graph(graph):
    edges = paired_edges(NeighborList(graph.idx_i.numpy(), graph.idx_j.numpy(), graph.shifts.long().numpy()))
    assert edges is not None
    return graph.replace(
        idx_i=torch.from_numpy(edges.idx_i),
        idx_j=torch.from_numpy(edges.idx_j),
        shifts=torch.from_numpy(edges.shifts).to(graph.shifts.dtype),
        paired=True,
    )


def test_atoms_to_graph_builds_the_paired_order():
    atoms = triclinic_cell()
    graph = atoms_to_graph(atoms, 4.0, paired=True)
    expected = paired_graph(atoms_to_graph(atoms, 4.0))
    assert graph.paired
    for name in ("idx_i", "idx_j", "shifts"):
        torch.testing.assert_close(getattr(graph, name), getattr(expected, name))
    assert graph.to(dtype=torch.float32).paired  # the flag survives conversions


def edge_set(i, j, s) -> set[tuple[int, ...]]:
    return {(int(a), int(b), *map(int, c)) for a, b, c in zip(i, j, s, strict=True)}


def test_paired_order_holds_the_same_edges_and_each_reverse_half_way():
    atoms = triclinic_cell()  # atoms see their own images: i = j edges pair up by the sign of the shift
    full = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, 5.0)
    paired = paired_edges(full)
    assert edge_set(*paired) == edge_set(*full)
    half = len(paired.idx_i) // 2
    assert 2 * half == len(full.idx_i)
    np.testing.assert_array_equal(paired.idx_i[half:], paired.idx_j[:half])
    np.testing.assert_array_equal(paired.idx_j[half:], paired.idx_i[:half])
    np.testing.assert_array_equal(paired.shifts[half:], -paired.shifts[:half])
    assert (paired.idx_i[:half] == paired.idx_j[:half]).any()  # self-images are among the pairs
    # A list that is not symmetric cannot be paired.
    assert paired_edges(NeighborList(full.idx_i[1:], full.idx_j[1:], full.shifts[1:])) is None


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("tabulate", [False, True])
def test_paired_edges_give_the_plain_numbers(variant, fused, tabulate):
    force_field = make_force_field(VARIANTS[variant], torch.float64)
    force_field.model.requires_grad_(False)
    force_field.model.fused, force_field.model.tabulate = fused, tabulate
    for atoms in (ethanol(), triclinic_cell()):
        graph = atoms_to_graph(atoms, force_field.cutoff)
        plain = force_field(graph, compute_stress=True)
        paired = force_field(paired_graph(graph), compute_stress=True)
        assert paired["energy"].item() == pytest.approx(plain["energy"].item(), abs=1e-11)
        np.testing.assert_allclose(paired["forces"].numpy(), plain["forces"].numpy(), atol=1e-12)
        np.testing.assert_allclose(paired["stress"].numpy(), plain["stress"].numpy(), atol=1e-12)


@pytest.mark.parametrize("fused", [True, False])
def test_paired_edges_evaluate_the_spherical_filters_once_per_pair(fused):
    """MLP_s(s_ij) is symmetric like MLP_r (s_ij = c(x_j − x_i) = s_ji): half as many rows as edges."""
    force_field = make_force_field(VARIANTS["paper"], torch.float64)
    model = force_field.model
    model.fused = fused
    graph = paired_graph(atoms_to_graph(triclinic_cell(), force_field.cutoff))
    rows = []
    if fused:  # the fused path multiplies the invariants with the fused first-layer weights
        original = torch.addmm

        def counting_addmm(bias, a, b, **kwargs):
            if a.shape[1] == model.config.n_degrees:
                rows.append(a.shape[0])
            return original(bias, a, b, **kwargs)

        torch.addmm = counting_addmm
        try:
            force_field(graph)
        finally:
            torch.addmm = original
    else:
        hooks = [
            net.spherical[0].register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
            for layer in model.layers
            for net in (layer.invariant_filter, layer.euclidean_filter)
        ]
        force_field(graph)
        for hook in hooks:
            hook.remove()
    assert rows and all(n == graph.n_edges // 2 for n in rows), (rows, graph.n_edges)


def test_a_paired_layer_without_the_first_halfs_radial_filters_is_refused():
    model = make_force_field(VARIANTS["paper"], torch.float64).model
    graph = paired_graph(atoms_to_graph(ethanol(), model.cutoff))
    edges = model.edge_features(graph.edge_vectors(), graph.idx_i, graph.idx_j)
    h = model.embedding(graph.atomic_numbers)
    x = model.initial_euclidean(edges, graph.n_atoms)
    with pytest.raises(ValueError, match="paired edges need this layer's radial filters"):
        model.layers[0](h, x, edges, None, paired=True)


def test_paired_edges_give_the_plain_gradients_of_trainable_weights():
    # Training on forces differentiates the forces with respect to the weights: both orders must agree.
    force_field = make_force_field(preset("tiny"), torch.float64)
    graph = atoms_to_graph(triclinic_cell(), force_field.cutoff)
    gradients = []
    for g in (graph, paired_graph(graph)):
        out = force_field(g, create_graph=True)
        loss = out["energy"].sum() + (out["forces"] ** 2).sum()
        gradients.append(torch.autograd.grad(loss, list(force_field.model.parameters()), allow_unused=True))
    for plain, paired in zip(*gradients, strict=True):
        if plain is None:
            assert paired is None
        else:
            np.testing.assert_allclose(paired.numpy(), plain.numpy(), atol=1e-11)


def test_a_batch_of_paired_graphs_is_paired_and_gives_the_plain_numbers():
    force_field = make_force_field(VARIANTS["tiny"], torch.float64)
    structures = [ethanol(), triclinic_cell(), Atoms("O", positions=[[0.0, 0.0, 0.0]]), ethanol(1)]
    plain = collate([atoms_to_graph(atoms, force_field.cutoff) for atoms in structures])
    paired = collate([atoms_to_graph(atoms, force_field.cutoff, paired=True) for atoms in structures])
    assert paired.paired and not plain.paired
    half = paired.n_edges // 2
    torch.testing.assert_close(paired.idx_i[half:], paired.idx_j[:half])
    torch.testing.assert_close(paired.shifts[half:], -paired.shifts[:half])
    assert edge_set(paired.idx_i, paired.idx_j, paired.shifts) == edge_set(
        plain.idx_i, plain.idx_j, plain.shifts
    )
    results = []
    for graph in (plain, paired):
        out = force_field(graph, compute_stress=True, create_graph=True)
        loss = (out["forces"] ** 2).sum() + out["energy"].sum()
        results.append(
            (out, torch.autograd.grad(loss, list(force_field.model.parameters()), allow_unused=True))
        )
    (a, grads_a), (b, grads_b) = results
    for key in ("energy", "forces", "stress"):
        np.testing.assert_allclose(b[key].detach().numpy(), a[key].detach().numpy(), atol=1e-12)
    for x, y in zip(grads_a, grads_b, strict=True):
        assert (x is None) == (y is None)
        if x is not None:
            np.testing.assert_allclose(y.numpy(), x.numpy(), atol=1e-11)
    # One unpaired graph makes the whole batch a plain list.
    mixed = collate([atoms_to_graph(structures[0], 4.0, paired=True), atoms_to_graph(structures[1], 4.0)])
    assert not mixed.paired
