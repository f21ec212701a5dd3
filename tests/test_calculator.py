"""The ASE calculator: same numbers as the model, neighbour-list reuse, stress, refusals, checkpoints."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.calculator import PropertyNotImplementedError

from helpers import ethanol, make_force_field, rss_mb, triclinic_cell
from so3krates import So3kratesCalculator, atoms_to_graph, preset
from so3krates.calculators.ase import UnsupportedStructureError
from so3krates.errors import So3kratesError
from so3krates.model.checkpoint import save_checkpoint
from so3krates.runtime import Planner


@pytest.fixture(scope="module")
def model():
    return make_force_field(preset("tiny"), torch.float64).model


def test_matches_the_force_field(model):
    atoms = triclinic_cell()
    calculator = So3kratesCalculator(model, species=[1, 6, 8])
    atoms.calc = calculator
    reference = make_force_field(preset("tiny"), torch.float64)(
        atoms_to_graph(atoms, 4.0), compute_stress=True
    )
    assert atoms.get_potential_energy() == pytest.approx(float(reference["energy"].detach()[0]), rel=1e-12)
    np.testing.assert_allclose(atoms.get_forces(), reference["forces"].detach().numpy(), atol=1e-12)
    stress = reference["stress"].detach().numpy()[0]
    np.testing.assert_allclose(atoms.get_stress(voigt=False), stress, atol=1e-12)
    assert atoms.get_potential_energies().sum() == pytest.approx(atoms.get_potential_energy(), rel=1e-12)


def test_forces_are_the_numerical_gradient(model):
    from ase.calculators.fd import calculate_numerical_forces

    atoms = ethanol()
    atoms.calc = So3kratesCalculator(model)
    numerical = calculate_numerical_forces(atoms, eps=1e-5)
    np.testing.assert_allclose(atoms.get_forces(), numerical, rtol=1e-6, atol=1e-8)


def test_neighbor_list_is_reused_within_the_skin_and_results_are_unchanged(model):
    atoms = triclinic_cell()
    calculator = So3kratesCalculator(model, skin=0.6)
    fresh = So3kratesCalculator(model, skin=0.0)
    atoms.calc = calculator
    atoms.get_forces()
    rng = np.random.default_rng(0)
    for _ in range(5):
        atoms.positions += rng.normal(scale=0.04, size=atoms.positions.shape)  # < skin/2 in total
        forces = atoms.get_forces()
        copy = atoms.copy()
        copy.calc = fresh
        np.testing.assert_allclose(forces, copy.get_forces(), atol=1e-12)
        assert atoms.get_potential_energy() == pytest.approx(copy.get_potential_energy(), rel=1e-13)
    assert calculator.n_neighbor_list_builds == 1
    atoms.positions[0] += 0.5  # beyond skin / 2: rebuild
    atoms.get_forces()
    assert calculator.n_neighbor_list_builds == 2


def edge_set(graph) -> set[tuple[int, ...]]:
    """(i, j, shift) of every edge, order-free."""
    rows = torch.cat([graph.idx_i[:, None], graph.idx_j[:, None], graph.shifts.long()], dim=1)
    return {tuple(row) for row in rows.tolist()}


def test_the_model_sees_only_edges_within_the_cutoff_while_the_list_is_reused(model):
    # The list holds r_c + skin; edges beyond r_c add nothing but cost work, so each call drops them.
    atoms = triclinic_cell()
    calculator = So3kratesCalculator(model, skin=1.0)
    rng = np.random.default_rng(1)
    for _ in range(4):
        graph = calculator.graph(atoms)
        exact = atoms_to_graph(atoms, model.cutoff)
        assert graph.n_edges == exact.n_edges < calculator.n_edges_in_list
        assert edge_set(graph) == edge_set(exact)
        assert graph.edge_vectors().norm(dim=1).max() < model.cutoff
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
    assert calculator.n_neighbor_list_builds == 1


def test_unknown_elements_and_close_atoms_are_refused(model):
    calculator = So3kratesCalculator(model, species=[1, 6, 8], min_distance=0.5)
    atoms = ethanol()
    atoms.numbers[0] = 17
    atoms.calc = calculator
    with pytest.raises(UnsupportedStructureError, match=r"element Cl \(Z=17\) was not in the training data"):
        atoms.get_potential_energy()
    # The check is skipped while the atomic numbers stay those of the last call: a change is still seen.
    known = ethanol()
    known.calc = calculator
    known.get_potential_energy()
    known.get_forces()
    known.numbers[1] = 17
    with pytest.raises(UnsupportedStructureError, match=r"element Cl \(Z=17\)"):
        known.get_potential_energy()
    close = Atoms("CO", positions=[[0, 0, 0], [0.3, 0, 0]])
    close.calc = calculator
    with pytest.raises(UnsupportedStructureError, match=r"0\.300 Å apart, closer than min_distance = 0\.5"):
        close.get_potential_energy()


def test_no_stress_for_molecules(model):
    atoms = ethanol()
    atoms.calc = So3kratesCalculator(model)
    with pytest.raises(PropertyNotImplementedError):
        atoms.get_stress()


def test_loads_a_checkpoint_with_its_species_in_float32_and_float64(model, tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, species=[1, 6, 8])
    atoms = ethanol()
    energies = {}
    for dtype in ("float64", "float32"):
        atoms.calc = So3kratesCalculator(path, dtype=dtype)
        energies[dtype] = atoms.get_potential_energy()
        assert atoms.calc.species == {1, 6, 8}
    reference = make_force_field(preset("tiny"), torch.float64)(atoms_to_graph(atoms, 4.0))["energy"].detach()
    assert energies["float64"] == pytest.approx(float(reference[0]), rel=1e-12)
    assert energies["float32"] == pytest.approx(energies["float64"], abs=1e-4)


def test_atoms_that_approach_without_a_neighbor_list_rebuild_are_refused(model):
    """The per-step distance check is skipped only while no pair can have come closer than min_distance."""
    calculator = So3kratesCalculator(model, skin=1.0, min_distance=0.6)
    atoms = Atoms("CO", positions=[[0, 0, 0], [1.0, 0, 0]])
    atoms.calc = calculator
    atoms.get_potential_energy()
    atoms.positions[1, 0] = 0.55  # moved 0.45 Å < skin / 2: the neighbour list is reused
    with pytest.raises(UnsupportedStructureError, match=r"0\.550 Å apart"):
        atoms.get_potential_energy()
    assert calculator.n_neighbor_list_builds == 1


def test_fast_state_check_still_sees_every_change(model):
    """The exact-equality shortcut of check_state answers "no change" only when nothing changed."""
    calculator = So3kratesCalculator(model)
    atoms = triclinic_cell()
    atoms.calc = calculator
    atoms.get_potential_energy()
    assert calculator.check_state(atoms) == []
    changes = {
        "positions": lambda a: a.positions.__setitem__((0, 0), a.positions[0, 0] + 1e-9),
        "numbers": lambda a: a.numbers.__setitem__(0, 8 if a.numbers[0] != 8 else 1),
        "cell": lambda a: a.set_cell(a.cell.array * 1.001, scale_atoms=False),
        "pbc": lambda a: a.set_pbc([True, True, False]),
    }
    for name, change in changes.items():
        other = atoms.copy()
        change(other)
        assert name in calculator.check_state(other), name
    moved_and_strained = atoms.copy()
    changes["positions"](moved_and_strained)
    changes["cell"](moved_and_strained)
    assert {"positions", "cell"} <= set(calculator.check_state(moved_and_strained))


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc to read memory use")
def test_memory_stays_constant_over_thousands_of_calls(model):
    """Long MD must not leak: 2000 calls with moving atoms, neighbour-list rebuilds and changing sizes."""
    calculator = So3kratesCalculator(model, skin=0.2)
    rng = np.random.default_rng(0)
    structures = [ethanol(), ethanol()[:6], triclinic_cell()]

    def run(n_calls: int) -> None:
        for k in range(n_calls):
            atoms = structures[(k // 50) % 3]  # another size every 50 calls
            atoms.positions += rng.normal(0.0, 0.01, atoms.positions.shape)
            atoms.calc = calculator
            atoms.get_forces()

    run(300)  # warm-up: allocator caches, first neighbour lists
    before = rss_mb()
    run(2000)
    growth = rss_mb() - before
    assert calculator.n_neighbor_list_builds > 100
    assert growth < 8.0, f"resident memory grew by {growth:.1f} MB over 2000 calls"


def test_small_graphs_run_on_one_thread_and_the_setting_is_restored(model):
    """Planner.single_thread_edges: ethanol (72 edges) on one thread, the triclinic cell on all."""
    seen = []
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for limit, atoms, expected in [(1000, ethanol(), 1), (0, ethanol(), 2), (50, triclinic_cell(), 2)]:
            calculator = So3kratesCalculator(model, planner=Planner(single_thread_edges=limit))
            evaluator = calculator.force_field.evaluator

            def spy(plan, n_edges=0, _evaluator=evaluator):
                function = _evaluator(plan, n_edges)
                return lambda *a, **k: seen.append(torch.get_num_threads()) or function(*a, **k)

            calculator.force_field.evaluator = spy
            atoms.calc = calculator
            forces = atoms.get_forces()
            assert seen[-1] == expected
            assert torch.get_num_threads() == 2
            reference = atoms.copy()
            reference.calc = So3kratesCalculator(model, planner=Planner(single_thread_edges=0))
            np.testing.assert_allclose(forces, reference.get_forces(), atol=1e-12)
    finally:
        torch.set_num_threads(threads)


def test_calculator_leaves_the_callers_model_trainable(model):
    trainable = make_force_field(preset("tiny"), torch.float64).model
    calculator = So3kratesCalculator(trainable)
    atoms = ethanol()
    atoms.calc = calculator
    atoms.get_forces()
    assert all(p.requires_grad for p in trainable.parameters())
    assert not any(p.requires_grad for p in calculator.force_field.model.parameters())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "double-ish"])
def test_dtypes_other_than_float32_and_float64_are_refused(model, dtype):
    """float16 gave forces off by 60 % of the model's test error, silently; a typo an AttributeError."""
    with pytest.raises(So3kratesError, match=f"dtype must be float64 or float32, not '{dtype}'"):
        So3kratesCalculator(model, dtype=dtype)
