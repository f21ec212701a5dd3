"""SO3LR (SPEC §3): each physical term on its own (limits, hand-computed two-atom values, continuity at its
cutoffs), and the whole model's physics (symmetries, finite-difference forces and stress, batching, charge
conservation, long-range cutoff smoothness) on a small randomly initialised SO3LR.

The agreement of the converted published weights with so3krates-torch is in ``test_so3lr_pretrained.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ase import Atoms

from helpers import (
    PLANS,
    ethanol,
    numerical_forces,
    numerical_stress,
    random_rotation,
    skip_without_kernel,
    triclinic_cell,
    water,
)
from so3krates import ForceField, atoms_to_graph, collate, preset
from so3krates.model.so3lr import So3lr, build_model
from so3krates.nn.embedding import ChargeSpinEmbedding
from so3krates.nn.free_atoms import FREE_ATOM_C6, FREE_ATOM_POLARIZABILITY
from so3krates.nn.physics import (
    Dispersion,
    Electrostatics,
    PartialCharges,
    ZBLRepulsion,
    dipole_moment,
    smooth_switch,
)
from so3krates.runtime import EnergyFunction, PlanError
from so3krates.runtime.long_range import LongRangeEvaluator
from so3krates.units import BOHR, COULOMB_CONSTANT, FINE_STRUCTURE, HARTREE

TINY_SO3LR = preset(
    "so3lr",
    n_features=24,
    n_heads=2,
    degrees=(1, 2),
    n_layers=2,
    n_rbf=8,
    n_readout_features=12,
    cutoff=3.5,
    long_range_cutoff=7.0,
    dispersion_switch_width=1.5,
    avg_num_neighbors=4.0,
)
PAIR = (torch.tensor([0, 1]), torch.tensor([1, 0]))  # both directions of a dimer's pair (short range)
ONCE = (torch.tensor([0]), torch.tensor([1]))  # the pair listed once (long range)


def make_so3lr(dtype=torch.float64, seed=0) -> So3lr:
    """A random tiny SO3LR with non-trivial element tables (charges and Hirshfeld ratios away from 0)."""
    torch.manual_seed(seed)
    model = build_model(TINY_SO3LR)
    with torch.no_grad():
        model.readout.energy_shift.uniform_(-2.0, 2.0)
        model.readout.energy_scale.uniform_(0.5, 2.0)
        model.partial_charges.element.weight.normal_(0.0, 0.3)
        model.hirshfeld_ratios.shift.weight.uniform_(0.7, 1.2)
        for embedding in (model.charge_embedding, model.spin_embedding):
            embedding.value.normal_(0.0, 1.0)
    return model.to(dtype).eval()


@pytest.fixture(scope="module")
def force_field():
    return ForceField(make_so3lr())


def run(force_field, structures, charges=None, spins=None, stress=False):
    graphs = [
        atoms_to_graph(
            a,
            force_field.cutoff,
            long_range_cutoff=force_field.long_range_cutoff,
            total_charge=None if charges is None else charges[k],
            total_spin=None if spins is None else spins[k],
        )
        for k, a in enumerate(structures)
    ]
    out = force_field(collate(graphs), compute_forces=True, compute_stress=stress)
    return {k: v.detach().double().numpy() for k, v in out.items() if isinstance(v, torch.Tensor)}


# --- the terms one by one ----------------------------------------------------------------------------------


def test_smooth_switch_limits_and_smoothness():
    d = torch.linspace(0.0, 5.0, 5001, dtype=torch.float64, requires_grad=True)
    s = smooth_switch(d, 1.0, 3.0)
    assert torch.all(s[d <= 1.0] == 1.0) and torch.all(s[d >= 3.0] == 0.0)
    assert torch.all(s[1:] <= s[:-1]), "the switch is not monotone"
    assert float(smooth_switch(torch.tensor(2.0, dtype=torch.float64), 1.0, 3.0)) == pytest.approx(0.5)
    (slope,) = torch.autograd.grad(s.sum(), d)
    assert torch.isfinite(slope).all()
    # Smooth at both ends: the slope goes to 0 there (C^∞), and there is no jump between neighbouring points.
    assert slope[(d - 1.0).abs() < 2e-3].abs().max() < 1e-10
    assert slope[(d - 3.0).abs() < 2e-3].abs().max() < 1e-10
    assert (s[1:] - s[:-1]).abs().max() < 2e-3


def test_zbl_two_atoms_by_hand():
    zbl = ZBLRepulsion().double()
    d = torch.tensor([0.6, 0.6], dtype=torch.float64)
    cutoff = torch.ones(2, dtype=torch.float64)
    energy = zbl(d, cutoff, torch.tensor([6, 8]), *PAIR).sum()
    # E = k Z1 Z2 / r Σ c_k exp(−a_k r (Z1^p + Z2^p) / (0.8854 a0)) · s(r), the published ZBL constants.
    a, c = ZBLRepulsion.INITIAL["a"], ZBLRepulsion.INITIAL["c"]
    x = 0.6 * (6**0.23 + 8**0.23) / (0.8854 * BOHR)
    screening = sum(ck * math.exp(-ak * x) for ak, ck in zip(a, c, strict=True)) / sum(c)
    switch = float(smooth_switch(torch.tensor(0.6, dtype=torch.float64), 0.0, 1.5))
    expected = COULOMB_CONSTANT * 48 / 0.6 * screening * switch
    assert float(energy.detach()) == pytest.approx(expected, rel=1e-6)
    # Off beyond 1.5 Å, exactly.
    far = zbl(torch.tensor([1.5, 1.5], dtype=torch.float64), cutoff, torch.tensor([6, 8]), *PAIR)
    assert torch.all(far == 0.0)


def test_electrostatics_two_atoms_by_hand_and_smooth_at_the_cutoff():
    term = Electrostatics(width=4.0, cutoff=12.0)
    charges = torch.tensor([0.4, -0.3], dtype=torch.float64)

    def energy(r):
        d = torch.tensor([r], dtype=torch.float64, requires_grad=True)
        e = term(d, charges, *ONCE).sum()
        (g,) = torch.autograd.grad(e, d)
        return float(e.detach()), float(g.sum())

    def v(r):
        return math.erf(r / 4.0) / r

    # Below 0.45 r_lr the switch is 1: the erf-damped Coulomb energy shifted by its value at r_lr.
    expected = COULOMB_CONSTANT * 0.4 * -0.3 * (v(3.0) - v(12.0))
    assert energy(3.0)[0] == pytest.approx(expected, rel=1e-12)
    # Value and slope vanish at r_lr (shifted force), and nothing beyond.
    for delta in (1e-2, 1e-4):
        e, g = energy(12.0 - delta)
        assert abs(e) < 5 * delta**2 and abs(g) < 5 * delta
    assert energy(12.0 + 1e-9) == (0.0, 0.0)


def test_dispersion_two_atoms_by_hand_and_smooth_at_the_cutoff():
    term = Dispersion(scale=1.2, cutoff=12.0, switch_width=2.0)
    ratios = torch.tensor([1.0, 1.0], dtype=torch.float64)
    numbers = torch.tensor([6, 6])

    def energy(r):
        d = torch.tensor([r], dtype=torch.float64, requires_grad=True)
        e = term(d, ratios, numbers, *ONCE).sum()
        (g,) = torch.autograd.grad(e, d)
        return float(e.detach()), float(g.sum())

    # Two free carbon atoms (v = 1) at 5 Å: α = 12 bohr³, C6 = 46.6 hartree bohr⁶ (tables, Z = 6).
    alpha, c6 = FREE_ATOM_POLARIZABILITY[5], FREE_ATOM_C6[5]
    assert (alpha, c6) == (12.0, 46.6)
    radius = FINE_STRUCTURE ** (-4 / 21) * alpha ** (1 / 7)
    sigma = -0.00433008 + 0.24428889 * radius + 0.04125273 * radius**2 - 0.00078893 * radius**3
    gamma = 1 / (2 * sigma**2)
    rho = 1.2 * 2 * 2.54 * alpha ** (1 / 7)
    r = 5.0 / BOHR
    expected = -HARTREE * (
        c6 / (r**6 + rho**6) + 5 * c6 / gamma / (r**8 + rho**8) + 245 / 8 * c6 / gamma**2 / (r**10 + rho**10)
    )
    assert energy(5.0)[0] == pytest.approx(expected, rel=1e-12)
    assert energy(5.0)[0] < 0 and energy(4.0)[0] < energy(5.0)[0], "dispersion must attract"
    # Finite at r = 0 (damped), switched off smoothly at r_lr.
    assert math.isfinite(energy(1e-6)[0])
    for delta in (1e-2, 1e-3):
        e, g = energy(12.0 - delta)
        assert abs(e) < 1e-12 and abs(g) < 1e-10
    assert energy(12.0 + 1e-9) == (0.0, 0.0)


def test_partial_charges_sum_to_the_total_charge_per_structure():
    torch.manual_seed(0)
    head = PartialCharges(8, 8).double()
    h = torch.randn(7, 8, dtype=torch.float64)
    numbers = torch.tensor([1, 6, 8, 1, 1, 7, 8])
    batch = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    total = torch.tensor([-1.0, 2.0], dtype=torch.float64)
    q = head(h, numbers, total, batch, 2).detach()
    assert float(q[:3].sum()) == pytest.approx(-1.0, abs=1e-14)
    assert float(q[3:].sum()) == pytest.approx(2.0, abs=1e-14)
    # The dipole of a neutral structure does not depend on the origin.
    neutral = head(h[:3], numbers[:3], torch.zeros(1, dtype=torch.float64), batch[:3], 1).detach()
    positions = torch.randn(3, 3, dtype=torch.float64)
    mu = dipole_moment(neutral, positions, batch[:3], 1)
    shifted = dipole_moment(
        neutral, positions + torch.tensor([5.0, -3.0, 1.0], dtype=torch.float64), batch[:3], 1
    )
    torch.testing.assert_close(mu, shifted, rtol=0, atol=1e-12)


def test_charge_spin_embedding_is_zero_for_zero_and_depends_on_the_sign():
    torch.manual_seed(0)
    embedding = ChargeSpinEmbedding(8).double()
    numbers, batch = torch.tensor([1, 6, 8]), torch.zeros(3, dtype=torch.long)
    zero = embedding(numbers, torch.zeros(1, dtype=torch.float64), batch, 1)
    assert torch.all(zero == 0.0)
    plus = embedding(numbers, torch.ones(1, dtype=torch.float64), batch, 1)
    minus = embedding(numbers, -torch.ones(1, dtype=torch.float64), batch, 1)
    assert not torch.allclose(plus, -minus), "positive and negative ψ must use their own key and value"


# --- the whole model ---------------------------------------------------------------------------------------


def test_rotation_translation_and_reflection(force_field):
    atoms = ethanol()
    reference = run(force_field, [atoms], charges=[1.0], spins=[0.5])
    rng = np.random.default_rng(0)
    for rotation in (random_rotation(rng), np.diag([1.0, 1.0, -1.0])):
        moved = atoms.copy()
        moved.positions = atoms.positions @ rotation.T + [1.0, -2.0, 0.5]
        out = run(force_field, [moved], charges=[1.0], spins=[0.5])
        assert out["energy"][0] == pytest.approx(reference["energy"][0], rel=1e-12)
        np.testing.assert_allclose(out["forces"], reference["forces"] @ rotation.T, atol=1e-10)
        np.testing.assert_allclose(out["charges"], reference["charges"], atol=1e-12)
        np.testing.assert_allclose(out["hirshfeld_ratios"], reference["hirshfeld_ratios"], atol=1e-12)
        # The dipole of a charged structure follows the origin: compare about the centre of charge.
        shift = np.array([1.0, -2.0, 0.5]) * reference["charges"].sum()
        np.testing.assert_allclose(out["dipole"][0] - shift, reference["dipole"][0] @ rotation.T, atol=1e-10)


@pytest.mark.parametrize("make_structure", [ethanol, triclinic_cell], ids=["molecule", "periodic"])
def test_forces_equal_finite_differences(force_field, make_structure):
    atoms = make_structure()
    forces = run(force_field, [atoms], charges=[-1.0])["forces"]
    numerical = numerical_forces(lambda a: run(force_field, [a], charges=[-1.0])["energy"][0], atoms)
    np.testing.assert_allclose(forces, numerical, rtol=1e-6, atol=1e-8)


def test_stress_equals_finite_strain_derivative(force_field):
    atoms = triclinic_cell()
    out = run(force_field, [atoms], stress=True)
    numerical = numerical_stress(lambda a: run(force_field, [a])["energy"][0], atoms)
    np.testing.assert_allclose(out["stress"][0], numerical, rtol=1e-6, atol=1e-9)


def test_batch_equals_one_by_one_with_different_charges(force_field):
    structures, charges, spins = [ethanol(), water(), triclinic_cell()], [1.0, -1.0, 0.0], [0.5, 0.0, 1.0]
    batch = run(force_field, structures, charges, spins, stress=True)
    singles = [
        run(force_field, [s], [q], [m], stress=True)
        for s, q, m in zip(structures, charges, spins, strict=True)
    ]
    np.testing.assert_allclose(batch["energy"], [s["energy"][0] for s in singles], rtol=1e-12)
    np.testing.assert_allclose(batch["forces"], np.concatenate([s["forces"] for s in singles]), atol=1e-10)
    np.testing.assert_allclose(batch["charges"], np.concatenate([s["charges"] for s in singles]), atol=1e-12)
    np.testing.assert_allclose(batch["stress"], np.concatenate([s["stress"] for s in singles]), atol=1e-12)


def test_total_charge_and_spin_change_the_energy(force_field):
    atoms = ethanol()
    energies = {
        (q, s): run(force_field, [atoms], [q], [s])["energy"][0] for q in (0.0, 1.0) for s in (0.0, 0.5)
    }
    assert len({round(e, 10) for e in energies.values()}) == 4


def test_energy_is_smooth_as_a_dimer_crosses_both_cutoffs(force_field):
    """E(r) and F(r) of a C–O dimer are continuous at r_c (local model, ZBL) and at r_lr (long range)."""

    def at(r):
        return run(force_field, [Atoms("CO", positions=[[0, 0, 0], [r, 0, 0]])], charges=[0.0])

    for cutoff in (force_field.cutoff, force_field.long_range_cutoff):
        jumps = {}
        for delta in (1e-3, 1e-6):
            inside, outside = at(cutoff - delta), at(cutoff + delta)
            jumps[delta] = abs(inside["energy"][0] - outside["energy"][0])
        assert jumps[1e-6] < 1e-2 * jumps[1e-3] + 1e-14, f"energy jumps at {cutoff} Å: {jumps}"
    # Beyond r_lr the two atoms do not interact at all.
    far = at(force_field.long_range_cutoff + 0.1)
    apart = run(force_field, [Atoms("C"), Atoms("O")])
    assert far["energy"][0] == pytest.approx(apart["energy"].sum(), rel=1e-14)


def test_long_range_terms_act_beyond_the_local_cutoff(force_field):
    """Between r_c and r_lr only electrostatics and dispersion act: the local and ZBL terms are constant."""
    out = [run(force_field, [Atoms("CO", positions=[[0, 0, 0], [r, 0, 0]])]) for r in (4.0, 5.0)]
    assert out[0]["energy"][0] != out[1]["energy"][0]
    assert np.abs(out[0]["forces"]).max() > 0


def test_so3lr_models_refuse_compiled_programs_and_plain_graphs():
    model = make_so3lr()
    with pytest.raises(PlanError, match="SO3LR models run eagerly"):
        ForceField(model, compile="aoti", frozen=True)
    with pytest.raises(ValueError, match="long-range edges"):
        ForceField(model)(atoms_to_graph(ethanol(), model.cutoff))


def test_so3lr_checkpoint_round_trip(tmp_path):
    from so3krates.model.checkpoint import load_model, save_checkpoint

    model = make_so3lr()
    save_checkpoint(tmp_path / "m.pt", model, [1, 6, 8])
    loaded, _ = load_model(tmp_path / "m.pt")
    assert isinstance(loaded, So3lr)
    a = run(ForceField(model), [ethanol()], [1.0])
    b = run(ForceField(loaded), [ethanol()], [1.0])
    assert a["energy"][0] == b["energy"][0]


@pytest.mark.parametrize("term", ["zbl", "electrostatics", "dispersion"])
def test_each_term_force_equals_finite_differences(term):
    """dE/dr of each pair term by autograd against central differences, at distances across its range."""
    charges = torch.tensor([0.4, -0.3], dtype=torch.float64)
    ratios = torch.tensor([0.9, 1.1], dtype=torch.float64)
    numbers = torch.tensor([6, 8])
    zbl, coulomb = ZBLRepulsion().double(), Electrostatics(width=4.0, cutoff=12.0)
    dispersion = Dispersion(scale=1.2, cutoff=12.0, switch_width=2.0)

    def energy(r: torch.Tensor) -> torch.Tensor:
        if term == "zbl":
            d = torch.stack([r, r])
            return zbl(d, torch.ones_like(d), numbers, *PAIR).sum()
        if term == "electrostatics":
            return coulomb(r[None], charges, *ONCE).sum()
        return dispersion(r[None], ratios, numbers, *ONCE).sum()

    for r0 in (0.3, 0.8, 1.2, 1.45) if term == "zbl" else (1.0, 3.0, 5.5, 8.0, 10.5, 11.9):
        r = torch.tensor(r0, dtype=torch.float64, requires_grad=True)
        (slope,) = torch.autograd.grad(energy(r), r)
        h = 1e-6
        with torch.no_grad():
            numerical = (
                energy(torch.tensor(r0 + h, dtype=torch.float64))
                - energy(torch.tensor(r0 - h, dtype=torch.float64))
            ) / (2 * h)
        assert float(slope) == pytest.approx(float(numerical), rel=1e-6, abs=1e-10), (term, r0)


# --- every plan of the execution layer on the SO3LR backbone ------------------------------------------------

PLAN_TOLERANCE = {("float64", "network"): 1e-10, ("float64", "spline"): 1e-6, ("float32", "network"): 2e-5}
PLAN_TOLERANCE[("float32", "spline")] = PLAN_TOLERANCE[("float32", "network")]


@pytest.mark.parametrize("plan", [p for p in PLANS if not p.slots], ids=lambda p: p.describe())
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_plan_gives_the_reference_numbers(plan, dtype):
    """The backbone through each plan (fused layers, spline, pairs), heads and terms after it, against the
    model's own reference evaluation (``So3lr.outputs``) differentiated with respect to the positions."""
    skip_without_kernel(plan)
    model = make_so3lr(getattr(torch, dtype)).requires_grad_(False)
    structures, charges = [ethanol(), triclinic_cell()], [1.0, 0.0]
    graph = collate(
        [
            atoms_to_graph(
                a, model.cutoff, pairs=True, long_range_cutoff=model.long_range_cutoff, total_charge=q
            )
            for a, q in zip(structures, charges, strict=True)
        ]
    )
    positions = graph.positions.detach().requires_grad_(True)
    reference_graph = graph.replace(positions=positions)
    outputs = model.outputs(
        reference_graph, reference_graph.edge_vectors(), reference_graph.long_range_vectors()
    )
    energy = torch.zeros(2, dtype=torch.float64).index_add(0, graph.batch, outputs.atomic_energies)
    (gradient,) = torch.autograd.grad(energy.sum(), positions)
    got = LongRangeEvaluator(EnergyFunction(model, plan, frozen=True), plan)(graph)
    tolerance = PLAN_TOLERANCE[(dtype, plan.radial)]
    scale = max(float(gradient.abs().max()), 1.0)
    np.testing.assert_allclose(
        got["energy"].detach().numpy(), energy.detach().numpy(), rtol=tolerance, atol=tolerance * scale
    )
    np.testing.assert_allclose(got["forces"].detach().numpy(), -gradient.numpy(), atol=tolerance * scale)
    np.testing.assert_allclose(
        got["charges"].detach().numpy(), outputs.charges.detach().numpy(), atol=tolerance
    )


def test_long_range_edges_hold_every_pair_once():
    from so3krates.data.neighbors import neighbor_list

    atoms = triclinic_cell()
    graph = atoms_to_graph(atoms, 3.5, long_range_cutoff=7.0)
    full = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, 7.0)
    assert 2 * graph.lr_idx_i.shape[0] == len(full.idx_i)
    seen = set()
    for i, j, shift in zip(
        graph.lr_idx_i.tolist(), graph.lr_idx_j.tolist(), graph.lr_shifts.tolist(), strict=True
    ):
        key, reverse = (i, j, tuple(shift)), (j, i, tuple(-s for s in shift))
        assert key not in seen and reverse not in seen
        seen.add(key)


def test_calculator_takes_the_total_charge_and_spin_and_refuses_them_for_local_models():
    from helpers import make_model
    from so3krates import So3kratesCalculator
    from so3krates.errors import So3kratesError

    model = make_so3lr()
    energies = []
    for kwargs in ({"total_charge": 1.0, "total_spin": 0.5}, {"total_charge": 1.0, "spin": 0.5}):
        atoms = ethanol()
        atoms.calc = So3kratesCalculator(model, **kwargs)
        energies.append(atoms.get_potential_energy())
        assert atoms.calc.results["charges"].sum() == pytest.approx(1.0, abs=1e-12)
    assert energies[0] == energies[1]
    # The structure's own charge and spin (atoms.info) when the calculator is not given any.
    atoms = ethanol()
    atoms.info.update(charge=1.0, total_spin=0.5)
    atoms.calc = So3kratesCalculator(model)
    assert atoms.get_potential_energy() == energies[0]
    atoms.info["charge"] = 0.0  # a change of charge alone triggers a new calculation
    assert atoms.get_potential_energy() != energies[0]
    with pytest.raises(So3kratesError, match="disagree"):
        So3kratesCalculator(model, total_spin=0.5, spin=1.0)
    with pytest.raises(So3kratesError, match="takes no total charge"):
        So3kratesCalculator(make_model(preset("tiny"), torch.float64), total_charge=1.0)


def test_training_graphs_carry_the_structures_charge_spin_and_long_range_edges():
    from so3krates.data.dataset import GraphDataset, collate_batch
    from so3krates.data.structure import Structure

    charged = Structure.from_atoms(ethanol(), energy=-1.0)
    charged.total_charge, charged.total_spin = -1.0, 0.5
    dataset = GraphDataset([charged, Structure.from_atoms(water(), energy=-2.0)], 3.5, long_range_cutoff=7.0)
    graph, _ = collate_batch([dataset[0], dataset[1]])
    assert graph.total_charge.tolist() == [-1.0, 0.0] and graph.total_spin.tolist() == [0.5, 0.0]
    assert graph.lr_idx_i is not None and graph.pairs
    out = ForceField(make_so3lr())(graph)
    sums = torch.zeros(2, dtype=torch.float64).index_add(0, graph.batch, out["charges"].detach())
    torch.testing.assert_close(sums, torch.tensor([-1.0, 0.0], dtype=torch.float64))
