"""Edge slots: sums over edges without scatter-adds give the numbers of index_add (so3krates.nn.slots)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import VARIANTS, ethanol, make_force_field, triclinic_cell
from so3krates import atoms_to_graph
from so3krates.data.graph import collate
from so3krates.errors import DataError
from so3krates.export.core import (
    EnergyFunction,
    SlottedForceField,
    TensorForceField,
    export_model,
    graph_inputs,
)
from so3krates.nn.slots import edge_slots, gather_rows, slot_sum, sum_rows


def test_edge_slots_list_every_edge_once_under_its_atom():
    index = torch.tensor([2, 0, 2, 2, 4, 0])
    slots = edge_slots(index, 6)
    pad = len(index)
    assert slots.shape == (3, 6)  # three edges point to atom 2
    expected = [[1, pad, 0, pad, 4, pad], [5, pad, 2, pad, pad, pad], [pad, pad, 3, pad, pad, pad]]
    assert slots.tolist() == expected  # in edge order within an atom; atoms without edges: padding only
    assert edge_slots(index, 6, min_width=5).shape == (5, 6)
    empty = edge_slots(torch.zeros(0, dtype=torch.long), 3)
    assert empty.shape == (1, 3) and (empty == 0).all()  # width at least one, all padding


def test_sums_and_gathers_through_slots_give_index_add_and_its_gradients():
    generator = torch.Generator().manual_seed(0)
    n_atoms, n_edges = 7, 40
    index = torch.randint(0, n_atoms - 1, (n_edges,), generator=generator)  # atom 6 has no edge
    slots = edge_slots(index, n_atoms)
    src = torch.randn(n_edges, 5, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    x = torch.randn(n_atoms, 4, dtype=torch.float64, generator=generator, requires_grad=True)

    plain = torch.zeros(n_atoms, 5, 3, dtype=torch.float64).index_add(0, index, src)
    torch.testing.assert_close(slot_sum(src.detach(), slots), plain.detach(), rtol=0, atol=1e-14)
    summed = sum_rows(src, index, n_atoms, slots)
    torch.testing.assert_close(summed, plain, rtol=0, atol=1e-14)
    weights = torch.randn_like(plain)
    (grad_slots,) = torch.autograd.grad((summed * weights).sum(), src)
    (grad_plain,) = torch.autograd.grad((plain * weights).sum(), src)
    torch.testing.assert_close(grad_slots, grad_plain, rtol=0, atol=0)

    gathered = gather_rows(x, index, slots)
    torch.testing.assert_close(gathered, x[index], rtol=0, atol=0)
    weights = torch.randn_like(gathered)
    (grad_slots,) = torch.autograd.grad((gathered * weights).sum(), x)
    (grad_plain,) = torch.autograd.grad((x[index] * weights).sum(), x)
    torch.testing.assert_close(grad_slots, grad_plain, rtol=0, atol=1e-14)
    assert grad_slots[n_atoms - 1].abs().max() == 0
    assert torch.autograd.gradcheck(lambda t: sum_rows(t, index, n_atoms, slots), (src,))
    assert torch.autograd.gradcheck(lambda t: gather_rows(t, index, slots), (x,))
    # Without a table: index_add and index_select.
    torch.testing.assert_close(sum_rows(src, index, n_atoms), plain)
    torch.testing.assert_close(gather_rows(x, index), x[index])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("paired", [False, True])
def test_the_slotted_force_field_gives_the_plain_numbers(variant, paired):
    force_field = make_force_field(VARIANTS[variant], torch.float64)
    model = force_field.model.requires_grad_(False)
    model.fused = True
    plain = TensorForceField(EnergyFunction(model, paired))
    slotted = SlottedForceField(model, paired)
    for atoms in (ethanol(), triclinic_cell()):
        graph = atoms_to_graph(atoms, model.cutoff, paired=paired)
        expected = plain(*graph_inputs(graph))
        got = slotted(*graph_inputs(graph, slots=True))
        for name, a, b in zip(("energy", "atomic energies", "forces", "virial"), got, expected, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=name)


def test_slots_are_for_the_fused_path_and_its_exports(tmp_path):
    force_field = make_force_field(VARIANTS["tiny"], torch.float64)
    model = force_field.model.requires_grad_(False)
    graph = collate([atoms_to_graph(ethanol(), model.cutoff)])
    slots = tuple(edge_slots(index, graph.n_atoms) for index in (graph.idx_i, graph.idx_j))
    model.fused = False
    with pytest.raises(ValueError, match="edge slots are for the fused path"):
        model.atomic_energies(
            graph.edge_vectors(), graph.atomic_numbers, graph.idx_i, graph.idx_j, slots=slots
        )
    with pytest.raises(DataError, match="edge slots need a pt2 or aoti export of the fused path"):
        export_model(model, tmp_path / "model.pt2", fmt="pt2", slotted=True)
    with pytest.raises(DataError, match="edge slots need a pt2 or aoti export of the fused path"):
        export_model(model, tmp_path / "model.ts", fmt="torchscript", fused=True, slotted=True)


def test_a_slotted_pt2_program_gives_the_plain_numbers(tmp_path):
    """Symbolic sizes: one trace serves structures of any number of atoms, edges and slots."""
    from so3krates.export.core import load_exported, read_metadata

    force_field = make_force_field(VARIANTS["tiny"], torch.float64)
    model = force_field.model.requires_grad_(False)
    path = tmp_path / "slotted.pt2"
    export_model(model, path, fmt="pt2", fused=True, paired=True, slotted=True)
    metadata = read_metadata(path)
    assert metadata["edge_slots"] is True and metadata["inputs"][-2:] == ["slots_i", "slots_j"]
    program = load_exported(path)
    model.fused = True
    plain = TensorForceField(EnergyFunction(model, True))
    for atoms in (ethanol(), triclinic_cell(), triclinic_cell().repeat((2, 1, 1))):
        graph = atoms_to_graph(atoms, model.cutoff, paired=True)
        expected = plain(*graph_inputs(graph))
        got = program(*graph_inputs(graph, slots=True))
        np.testing.assert_allclose(got[2].numpy(), expected[2].numpy(), atol=1e-12)
        np.testing.assert_allclose(got[3].numpy(), expected[3].numpy(), atol=1e-12)
        assert float(got[0]) == pytest.approx(float(expected[0]), abs=1e-12)
