"""The fused fast path (so3krates.nn.fused) against the per-equation modules, the reference.

The physics suite runs on the fused path (the default); here it must equal the reference in energies,
forces, stress and in the parameter gradients that training uses, and its weight cache must never serve
stale weights.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from helpers import VARIANTS, ethanol, evaluate, make_force_field, triclinic_cell
from so3krates import So3kratesCalculator, atoms_to_graph, collate
from so3krates.model.derivatives import ForceField

TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fused_path_equals_the_reference_modules(variant, dtype):
    force_field = make_force_field(VARIANTS[variant], dtype)
    structures = [ethanol(0), triclinic_cell()]
    force_field.model.fused = True
    fused = evaluate(force_field, structures, stress=True)
    force_field.model.fused = False
    reference = evaluate(force_field, structures, stress=True)
    scale = max(np.abs(reference["forces"]).max(), 1.0)
    for key in ("energy", "forces", "stress"):
        np.testing.assert_allclose(
            fused[key], reference[key], rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype] * scale
        )


@pytest.mark.parametrize("variant", ["tiny", "tiny-gaussian-exponential-qk-norm-mlp", "tiny-invariant"])
def test_fused_path_gives_the_reference_training_gradients(variant):
    """The force-matching loss and its gradient with respect to every parameter (double backward)."""
    force_field = make_force_field(VARIANTS[variant], torch.float64).train()
    graph = collate([atoms_to_graph(ethanol(seed), force_field.cutoff) for seed in range(3)])
    gradients = {}
    for fused in (True, False):
        force_field.model.fused = fused
        out = force_field(graph, create_graph=True)
        loss = out["energy"].square().sum() + out["forces"].square().sum()
        parameters = [p for p in force_field.parameters() if p.requires_grad]
        gradients[fused] = torch.autograd.grad(loss, parameters, allow_unused=True, materialize_grads=True)
    for fused, reference in zip(gradients[True], gradients[False], strict=True):
        np.testing.assert_allclose(fused.numpy(), reference.numpy(), rtol=1e-9, atol=1e-12)


def test_weight_cache_follows_parameter_updates():
    """Frozen parameters are cached; an in-place update, a state-dict load or a dtype change rebuilds."""
    force_field = make_force_field(VARIANTS["tiny"], torch.float64).requires_grad_(False)
    graph = atoms_to_graph(ethanol(), force_field.cutoff)
    model = force_field.model
    first = force_field(graph)["forces"]
    assert torch.equal(force_field(graph)["forces"], first)  # served from the cache
    with torch.no_grad():
        model.layers[0].invariant_attention.value.weight.mul_(1.5)
    changed = force_field(graph)["forces"]
    model.fused = False
    np.testing.assert_allclose(changed.numpy(), force_field(graph)["forces"].numpy(), atol=1e-12)
    model.fused = True
    other = make_force_field(VARIANTS["tiny"], torch.float64, seed=1).model
    model.load_state_dict(other.state_dict())
    reloaded = ForceField(other.requires_grad_(False))
    np.testing.assert_allclose(
        force_field(graph)["forces"].numpy(), reloaded(graph)["forces"].numpy(), atol=1e-12
    )
    model.load_state_dict(
        make_force_field(VARIANTS["tiny"], torch.float64, seed=2).model.state_dict(), assign=True
    )
    model.requires_grad_(False)
    model.fused = False
    expected = force_field(graph)["forces"]
    model.fused = True
    np.testing.assert_allclose(force_field(graph)["forces"].numpy(), expected.numpy(), atol=1e-12)
    model.float()
    assert force_field(graph.to(dtype=torch.float32))["forces"].dtype == torch.float32


def test_automatic_choice_follows_the_graph_size(monkeypatch):
    """fused=None takes the fused path up to FUSED_MAX_EDGES edges and the modules above; same numbers."""
    force_field = make_force_field(VARIANTS["tiny"], torch.float64)
    graph = atoms_to_graph(ethanol(), force_field.cutoff)
    calls = []
    monkeypatch.setattr(
        "so3krates.model.so3krates.fused_layer", lambda *a, **k: calls.append(1) or (a[3], a[4])
    )
    force_field.model(graph)
    assert len(calls) == len(force_field.model.layers)
    monkeypatch.setattr(type(force_field.model), "FUSED_MAX_EDGES", graph.n_edges - 1)
    calls.clear()
    force_field.model(graph)
    assert not calls


def test_calculator_leaves_the_callers_model_trainable():
    force_field = make_force_field(VARIANTS["tiny"], torch.float64)
    calculator = So3kratesCalculator(force_field.model)
    atoms = ethanol()
    atoms.calc = calculator
    atoms.get_forces()
    assert all(p.requires_grad for p in force_field.model.parameters())
    assert not any(p.requires_grad for p in calculator.model.parameters())


@pytest.mark.slow
def test_compiled_calculator_gives_the_same_forces():
    """torch.compile (dynamic shapes): same forces, and new structure sizes do not recompile."""
    model = copy.deepcopy(make_force_field(VARIANTS["tiny"], torch.float64).model)
    plain, compiled = So3kratesCalculator(model), So3kratesCalculator(model, compile=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # inductor's threaded CPU kernels crashed here before (double free)
    try:
        for atoms in (ethanol(0), ethanol(1)[:6], ethanol(2)):
            expected = plain.get_forces(atoms.copy())
            np.testing.assert_allclose(compiled.get_forces(atoms.copy()), expected, atol=1e-10)
        # Further sizes (atoms and edges) reuse the compiled graphs: no recompilation in long runs.
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        for atoms in (ethanol(3)[:4], ethanol(4)[:7], ethanol(5)[:8], ethanol(6)[:5]):
            expected = plain.get_forces(atoms.copy())
            np.testing.assert_allclose(compiled.get_forces(atoms.copy()), expected, atol=1e-10)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    finally:
        torch.set_num_threads(threads)
