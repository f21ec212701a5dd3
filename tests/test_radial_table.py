"""Tabulated radial filters (so3krates.nn.radial_table): the spline, and the model that reads from it.

The table replaces MLP_r(K(d)) of every layer by a cubic Hermite spline once the weights are frozen. It is
an approximation, so the tests bound its error against the exact network, check that forces stay the exact
gradient of the (tabulated) energy, and that the table is never used where it would be wrong: training,
changed weights, float64 unless asked for.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from helpers import VARIANTS, ethanol, evaluate, make_force_field, triclinic_cell
from so3krates import atoms_to_graph
from so3krates.export.core import export_model, load_exported, read_metadata
from so3krates.nn.radial_table import build_radial_table, evaluate_radial_table


def _function(d: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.sin(3.0 * d), torch.exp(-((d - 1.5) ** 2) / 0.1), d**3], dim=1)


def _derivative(d: torch.Tensor) -> torch.Tensor:
    return torch.stack(
        [3.0 * torch.cos(3.0 * d), -2.0 * (d - 1.5) / 0.1 * torch.exp(-((d - 1.5) ** 2) / 0.1), 3 * d**2], 1
    )


def test_spline_converges_at_fourth_order_and_is_c1():
    d = torch.linspace(0.013, 4.99, 997, dtype=torch.float64, requires_grad=True)
    errors = []
    for n in (64, 128, 256):
        table = build_radial_table(_function, 5.0, n, torch.float64)
        values = evaluate_radial_table(table, d)
        slopes = torch.autograd.grad(
            values.sum(0), d, torch.eye(3, dtype=torch.float64), is_grads_batched=True
        )
        value_error = (values - _function(d)).abs().max().item()
        slope_error = (slopes[0].T - _derivative(d)).abs().max().item()
        errors.append((value_error, slope_error))
    for coarse, fine in itertools.pairwise(errors):
        assert coarse[0] / fine[0] > 12.0  # O(h⁴): 16 per halving
        assert coarse[1] / fine[1] > 6.0  # O(h³): 8 per halving
    # The cubic d³ is reproduced exactly (a cubic Hermite spline is exact on cubics).
    np.testing.assert_allclose(values[:, 2].detach(), (d**3).detach(), rtol=1e-12, atol=1e-12)
    # C¹ at the nodes: value and slope from the left and the right interval agree.
    table = build_radial_table(_function, 5.0, 64, torch.float64)
    node = 17 * 5.0 / 64
    around = torch.tensor([node - 1e-9, node + 1e-9], dtype=torch.float64, requires_grad=True)
    values = evaluate_radial_table(table, around)
    (slopes,) = torch.autograd.grad(values[:, 0].sum(), around)
    assert abs(values[0, 0] - values[1, 0]) < 1e-7
    assert abs(slopes[0] - slopes[1]) < 1e-6


def test_distances_beyond_the_table_are_clamped_with_zero_gradient():
    table = build_radial_table(_function, 5.0, 64, torch.float64)
    d = torch.tensor([5.0, 5.3, 7.0], dtype=torch.float64, requires_grad=True)
    values = evaluate_radial_table(table, d)
    np.testing.assert_allclose(values[1:].detach(), values[:1].detach().expand(2, 3), atol=1e-14)
    (gradient,) = torch.autograd.grad(values[1:].sum(), d)
    assert torch.all(gradient == 0)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "modules"])
@pytest.mark.parametrize("variant", [v for v in sorted(VARIANTS) if v != "paper"])
def test_tabulated_model_matches_the_exact_network(variant, fused):
    """float64 with the table forced on, every model variant, both paths: energies, forces and stress."""
    force_field = make_force_field(VARIANTS[variant], torch.float64).requires_grad_(False)
    force_field.model.fused = fused
    structures = [ethanol(0), triclinic_cell()]
    force_field.model.tabulate = False
    exact = evaluate(force_field, structures, stress=True)
    force_field.model.tabulate = True
    tabulated = evaluate(force_field, structures, stress=True)
    scale = np.abs(exact["forces"]).max()
    np.testing.assert_allclose(tabulated["energy"], exact["energy"], rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(tabulated["forces"], exact["forces"], atol=1e-6 * scale)
    np.testing.assert_allclose(
        tabulated["stress"], exact["stress"], atol=1e-6 * np.abs(exact["stress"]).max()
    )


def test_paper_model_in_float32_is_as_close_to_float64_as_without_the_table():
    """The default (float32 → table): its error against exact float64 is float32 round-off, no more."""
    exact_ff = make_force_field(VARIANTS["paper"], torch.float64).requires_grad_(False)
    single = make_force_field(VARIANTS["paper"], torch.float32).requires_grad_(False)
    structures = [ethanol(3)]
    exact = evaluate(exact_ff, structures)
    assert single.model._radial_table() is not None  # the default for frozen float32
    tabulated = evaluate(single, structures)
    single.model.tabulate = False
    plain = evaluate(single, structures)
    table_error = np.abs(tabulated["forces"] - exact["forces"]).max()
    round_off = np.abs(plain["forces"] - exact["forces"]).max()
    assert table_error < 3.0 * round_off + 1e-6 * np.abs(exact["forces"]).max()


def test_forces_are_the_gradient_of_the_tabulated_energy():
    """Finite differences of the tabulated energy: what energy conservation in MD relies on."""
    force_field = make_force_field(VARIANTS["tiny"], torch.float64).requires_grad_(False)
    force_field.model.tabulate = True
    atoms = ethanol(1)
    forces = evaluate(force_field, [atoms])["forces"]
    step = 1e-5
    for atom, axis in [(0, 0), (3, 1), (8, 2)]:
        energies = []
        for sign in (1, -1):
            displaced = atoms.copy()
            displaced.positions[atom, axis] += sign * step
            energies.append(evaluate(force_field, [displaced])["energy"][0])
        assert -(energies[0] - energies[1]) / (2 * step) == pytest.approx(forces[atom, axis], abs=1e-7)


def test_table_is_used_only_with_frozen_weights():
    force_field = make_force_field(VARIANTS["tiny"], torch.float32)
    model = force_field.model
    assert model._radial_table() is None  # trainable parameters, gradients on: exact network
    with torch.no_grad():
        assert model._radial_table() is not None
    model.tabulate = True
    graph = atoms_to_graph(ethanol(), force_field.cutoff)
    with pytest.raises(ValueError, match="frozen weights"):
        force_field(graph)
    model.requires_grad_(False)
    force_field(graph)  # frozen now
    float64 = make_force_field(VARIANTS["tiny"], torch.float64).requires_grad_(False).model
    assert float64._radial_table() is None  # float64 stays exact unless asked


def test_table_follows_weight_updates():
    force_field = make_force_field(VARIANTS["tiny"], torch.float64).requires_grad_(False)
    model = force_field.model
    model.tabulate = True
    graph = atoms_to_graph(ethanol(), force_field.cutoff)
    first = force_field(graph)["forces"]
    with torch.no_grad():
        model.layers[1].euclidean_filter.radial[2].weight.mul_(1.7)
    changed = force_field(graph)["forces"]
    model.tabulate = False
    exact = force_field(graph)["forces"]
    tolerance = 1e-6 * exact.abs().max().item()
    assert (changed - first).abs().max() > 1000 * tolerance  # a stale table would fail below
    np.testing.assert_allclose(changed.numpy(), exact.numpy(), atol=tolerance)


def test_skin_edges_beyond_the_cutoff_change_nothing():
    force_field = make_force_field(VARIANTS["tiny"], torch.float64).requires_grad_(False)
    force_field.model.tabulate = True
    atoms = triclinic_cell()
    plain = force_field(atoms_to_graph(atoms, force_field.cutoff))
    skin = force_field(atoms_to_graph(atoms, force_field.cutoff + 1.0))
    assert skin["energy"].item() == pytest.approx(plain["energy"].item(), abs=1e-12)
    np.testing.assert_allclose(skin["forces"].numpy(), plain["forces"].numpy(), atol=1e-12)


def test_float32_torchscript_export_with_the_table(tmp_path):
    """A fused float32 export carries the table, says so in its metadata and gives the exact numbers."""
    force_field = make_force_field(VARIANTS["tiny"], torch.float64)
    path = tmp_path / "model.ts"
    export_model(force_field.model, path, fmt="torchscript", dtype="float32", fused=True)
    assert read_metadata(path)["radial_table_intervals"] == force_field.model.TABLE_INTERVALS
    exported = load_exported(path)
    graph = atoms_to_graph(ethanol(2), force_field.cutoff)
    energy, _, forces, _ = exported(
        graph.positions, graph.atomic_numbers, graph.idx_i, graph.idx_j, graph.shifts, graph.cell[0]
    )
    exact = force_field.requires_grad_(False)(graph)
    assert energy.item() == pytest.approx(exact["energy"].item(), abs=1e-4)
    scale = exact["forces"].abs().max().item()
    np.testing.assert_allclose(forces.numpy(), exact["forces"].numpy(), atol=2e-5 * scale)
    export_model(force_field.model, tmp_path / "exact.ts", fmt="torchscript", dtype="float32")
    assert read_metadata(tmp_path / "exact.ts")["radial_table_intervals"] is None
    assert math.isfinite(energy.item())


def test_hessians_use_the_exact_network(monkeypatch):
    """so3krates spectrum: no spline (its second derivatives jump at the nodes), the model left as it was."""
    from so3krates.spectrum.harmonic import hessian

    force_field = make_force_field(VARIANTS["tiny"], torch.float32).requires_grad_(False)
    calls = []
    monkeypatch.setattr(
        "so3krates.model.so3krates.evaluate_radial_table", lambda *a: calls.append(1) or pytest.fail()
    )
    result = hessian(force_field.model, ethanol(), dtype=torch.float32)
    assert not calls and np.isfinite(result).all()
    assert force_field.model.tabulate is None
