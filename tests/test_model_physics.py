"""The model test suite: physical properties every SO3krates variant must keep (SPEC §2), in both dtypes.

Each test would fail on a broken model, and did when we broke it on purpose: dropping φ(d_ij) from the
Euclidean attention breaks smoothness at the cutoff, a wrong sign of the image shift breaks the periodic
tests, feeding raw components of x instead of c(x) to the exchange block breaks invariance.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms

from helpers import (
    SYMMETRY_RTOL,
    VARIANTS,
    acetamide,
    ethanol,
    evaluate,
    make_force_field,
    numerical_forces,
    numerical_stress,
    random_rotation,
    triclinic_cell,
    water,
)

DTYPES = [torch.float32, torch.float64]


@pytest.fixture(params=list(VARIANTS), scope="module")
def variant(request):
    return request.param


@pytest.fixture(params=DTYPES, ids=["float32", "float64"], scope="module")
def dtype(request):
    return request.param


@pytest.fixture(scope="module")
def force_field(variant, dtype):
    return make_force_field(VARIANTS[variant], dtype)


@pytest.fixture(scope="module")
def force_field64(variant):
    return make_force_field(VARIANTS[variant], torch.float64)


def assert_close(actual, expected, rtol, what):
    """‖actual − expected‖ / max(‖expected‖, 1e-3) < rtol, with a message that names the quantity."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    error = np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-3)
    assert error < rtol, f"{what}: relative error {error:.3e} ≥ {rtol:.0e}"


# --- symmetries --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make_structure", [ethanol, triclinic_cell], ids=["molecule", "periodic"])
def test_rotation_translation_invariance_and_force_equivariance(force_field, dtype, make_structure):
    rng = np.random.default_rng(42)
    atoms = make_structure()
    reference = evaluate(force_field, [atoms], stress=atoms.pbc.any())
    rotation = random_rotation(rng)
    moved = atoms.copy()
    moved.positions = atoms.positions @ rotation.T + rng.normal(size=3) * 3.0
    moved.cell = atoms.cell.array @ rotation.T
    result = evaluate(force_field, [moved], stress=atoms.pbc.any())
    rtol = SYMMETRY_RTOL[dtype]
    assert_close(result["energy"], reference["energy"], rtol, "energy after rotation + translation")
    assert_close(result["forces"], reference["forces"] @ rotation.T, rtol, "forces after rotation")
    if atoms.pbc.any():
        rotated_stress = rotation @ reference["stress"][0] @ rotation.T
        # The stress sums r ⊗ F over all edges with cancellations, so float32 round-off is a little larger.
        assert_close(result["stress"][0], rotated_stress, 10 * rtol, "stress after rotation")


def test_reflection_invariance(force_field, dtype):
    """Energies depend on x only through per-degree squared norms, so E is O(3)-invariant (no chirality)."""
    atoms = ethanol()
    reference = evaluate(force_field, [atoms])
    mirrored = atoms.copy()
    mirrored.positions[:, 0] *= -1.0
    result = evaluate(force_field, [mirrored])
    rtol = SYMMETRY_RTOL[dtype]
    assert_close(result["energy"], reference["energy"], rtol, "energy after reflection")
    assert_close(result["forces"], reference["forces"] * [-1.0, 1.0, 1.0], rtol, "forces after reflection")


def test_permutation_invariance(force_field, dtype):
    atoms = acetamide()
    permutation = np.random.default_rng(3).permutation(len(atoms))
    reference = evaluate(force_field, [atoms])
    result = evaluate(force_field, [atoms[permutation]])
    rtol = SYMMETRY_RTOL[dtype]
    assert_close(result["energy"], reference["energy"], rtol, "energy after permutation")
    assert_close(result["forces"], reference["forces"][permutation], rtol, "forces after permutation")


# --- derivatives (float64: finite differences need the precision) ----------------------------------------


def _energy(force_field, atoms):
    return evaluate(force_field, [atoms])["energy"][0]


@pytest.mark.parametrize("make_structure", [ethanol, triclinic_cell], ids=["molecule", "periodic"])
def test_forces_equal_finite_differences(force_field64, make_structure):
    atoms = make_structure()
    forces = evaluate(force_field64, [atoms])["forces"]
    numerical = numerical_forces(lambda a: _energy(force_field64, a), atoms)
    np.testing.assert_allclose(forces, numerical, rtol=1e-6, atol=1e-8)


def test_stress_equals_finite_strain_derivative(force_field64):
    atoms = triclinic_cell()
    out = evaluate(force_field64, [atoms], stress=True)
    volume = atoms.get_volume()
    numerical = numerical_stress(lambda a: _energy(force_field64, a), atoms)
    np.testing.assert_allclose(out["stress"][0], numerical, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(out["virial"][0], -numerical * volume, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(out["stress"][0], out["stress"][0].T, atol=1e-12)


# --- smoothness at the cutoff ---------------------------------------------------------------------------


def _three_atoms(distance: float) -> Atoms:
    """O at 0, C at 1.2 Å on the x axis, H at (distance, 0.3, 0): H stays well within r_c of C."""
    return Atoms("OCH", positions=[[0.0, 0.0, 0.0], [1.2, 0.0, 0.0], [distance, 0.3, 0.0]])


def test_smooth_as_a_neighbour_crosses_the_cutoff(force_field64):
    """E and F are continuous as the O–H distance crosses r_c: their jumps across r_c vanish linearly in δ.

    A model without the cutoff in some message (or with a softmax) has a jump that does not shrink.
    """
    cutoff = force_field64.cutoff

    def at(oh_distance):
        return evaluate(force_field64, [_three_atoms(np.sqrt(oh_distance**2 - 0.3**2))])

    jump_energy, jump_forces = {}, {}
    for delta in (1e-3, 1e-6):
        inside, outside = at(cutoff - delta), at(cutoff + delta)
        jump_energy[delta] = abs(inside["energy"][0] - outside["energy"][0])
        jump_forces[delta] = np.abs(inside["forces"] - outside["forces"]).max()
    assert jump_forces[1e-3] > 0 and jump_energy[1e-3] > 0
    # A C¹ energy has jumps ∝ δ (ratio 1e-3 here); a discontinuity keeps a jump that does not shrink.
    assert jump_energy[1e-6] < 1e-2 * jump_energy[1e-3], f"energy not continuous at r_c: {jump_energy}"
    assert jump_forces[1e-6] < 1e-2 * jump_forces[1e-3], f"forces not continuous at r_c: {jump_forces}"


def test_no_interaction_beyond_the_cutoff(force_field64):
    """A dimer just outside r_c has exactly the energy of its two isolated atoms."""
    cutoff = force_field64.cutoff
    dimer = Atoms("CO", positions=[[0.0, 0.0, 0.0], [cutoff + 1e-9, 0.0, 0.0]])
    together = evaluate(force_field64, [dimer])
    apart = evaluate(force_field64, [Atoms("C"), Atoms("O")])
    assert together["energy"][0] == pytest.approx(apart["energy"].sum(), rel=1e-14)
    np.testing.assert_array_equal(together["forces"], 0.0)


# --- size extensivity, batching, periodic images ---------------------------------------------------------


def test_size_extensive(force_field, dtype):
    a, b = ethanol(), water()
    b.positions += [20.0, 0.0, 0.0]
    together = evaluate(force_field, [a + b])
    separate = evaluate(force_field, [a, b])
    rtol = SYMMETRY_RTOL[dtype]
    assert_close(together["energy"][0], separate["energy"].sum(), rtol, "energy of two far-apart molecules")
    assert_close(together["forces"], separate["forces"], rtol, "forces of two far-apart molecules")


def test_batch_equals_one_by_one(force_field, dtype):
    structures = [ethanol(), Atoms("Cu"), water(), triclinic_cell(), acetamide()]
    batch = evaluate(force_field, structures, stress=True)
    singles = [evaluate(force_field, [s], stress=True) for s in structures]
    rtol = SYMMETRY_RTOL[dtype]
    for key in ("energy", "stress"):
        assert_close(batch[key], np.concatenate([s[key] for s in singles]), rtol, f"batched {key}")
    assert_close(batch["forces"], np.concatenate([s["forces"] for s in singles]), rtol, "batched forces")


def test_wrapped_and_unwrapped_cell_agree(force_field, dtype):
    atoms = triclinic_cell()
    unwrapped = atoms.copy()
    shifts = np.random.default_rng(5).integers(-2, 3, size=(len(atoms), 3))
    unwrapped.positions += shifts @ atoms.cell.array
    reference = evaluate(force_field, [atoms], stress=True)
    result = evaluate(force_field, [unwrapped], stress=True)
    rtol = SYMMETRY_RTOL[dtype] * 10  # |R| grows by up to 2 cells; the float32 round-off grows with it
    for key in ("energy", "forces", "stress"):
        assert_close(result[key], reference[key], rtol, f"{key} of the unwrapped cell")


def test_supercell_is_extensive(force_field, dtype):
    atoms = triclinic_cell()
    supercell = atoms.repeat((2, 1, 2))
    reference = evaluate(force_field, [atoms], stress=True)
    result = evaluate(force_field, [supercell], stress=True)
    rtol = SYMMETRY_RTOL[dtype] * 10
    assert_close(result["energy"], 4 * reference["energy"], rtol, "supercell energy")
    assert_close(result["forces"], np.tile(reference["forces"], (4, 1)), rtol, "supercell forces")
    assert_close(result["stress"], reference["stress"], rtol, "supercell stress")


# --- numerical safety ------------------------------------------------------------------------------------


def test_coincident_atoms_give_finite_values_and_gradients(force_field, dtype):
    """A zero-length edge (two atoms on top of each other) must not produce NaN in E, F or training grads."""
    atoms = ethanol() + Atoms("H", positions=[ethanol().positions[3]])
    from so3krates import atoms_to_graph

    graph = atoms_to_graph(atoms, force_field.cutoff, dtype=dtype)
    assert (graph.edge_vectors().norm(dim=-1) == 0).any(), "the test needs a zero-length edge"
    out = force_field(graph, compute_forces=True, create_graph=True)
    assert torch.isfinite(out["energy"]).all() and torch.isfinite(out["forces"]).all()
    loss = out["energy"].sum() + out["forces"].square().sum()
    loss.backward()
    for name, parameter in force_field.named_parameters():
        assert parameter.grad is None or torch.isfinite(parameter.grad).all(), f"NaN gradient in {name}"
    force_field.zero_grad(set_to_none=True)


def test_float32_and_float64_agree(variant):
    structures = [ethanol(), triclinic_cell()]
    single = evaluate(make_force_field(VARIANTS[variant], torch.float32), structures)
    double = evaluate(make_force_field(VARIANTS[variant], torch.float64), structures)
    assert_close(single["energy"], double["energy"], 1e-5, "float32 vs float64 energy")
    assert_close(single["forces"], double["forces"], 1e-4, "float32 vs float64 forces")


def test_float32_graph_and_network(variant):
    """An all-float32 path (graph too) works; the float64 geometry default only adds precision."""
    from so3krates import atoms_to_graph, collate

    force_field = make_force_field(VARIANTS[variant], torch.float32)
    structures = [ethanol(), triclinic_cell()]
    graph = collate([atoms_to_graph(a, force_field.cutoff, dtype=torch.float32) for a in structures])
    out = force_field(graph, compute_stress=True)
    assert out["forces"].dtype == torch.float32 and out["energy"].dtype == torch.float64
    reference = evaluate(make_force_field(VARIANTS[variant], torch.float64), structures, stress=True)
    assert_close(out["energy"].detach().numpy(), reference["energy"], 1e-5, "float32-graph energy")
    assert_close(out["forces"].detach().numpy(), reference["forces"], 1e-4, "float32-graph forces")
