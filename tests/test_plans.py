"""Every way to run the model gives the reference model's numbers; every other way is refused.

The matrix: every legal plan (``helpers.PLANS``, from ``so3krates.runtime.plan.legal_plans``) × every
model variant (``helpers.VARIANTS``) × float32 and float64, against the reference path
(``So3krates.forward``, one module per equation, derivatives through positions and a strain:
``helpers.reference_outputs``). The plans of training (``helpers.TRAINING_PLANS``: trainable weights,
second derivatives) are checked on the gradients of a force-matching loss. Since the physics suite
(``test_model_physics.py``) holds for the planner's choice, it holds for all of them.
"""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch

from helpers import (
    PLANS,
    TRAINING_PLANS,
    VARIANTS,
    ethanol,
    make_model,
    reference_outputs,
    skip_without_kernel,
    triclinic_cell,
)
from so3krates import atoms_to_graph, collate, preset
from so3krates.ops import pair_messages
from so3krates.runtime import (
    EnergyFunction,
    Evaluator,
    ForceField,
    Plan,
    PlanError,
    Planner,
    every_plan,
    legal_plans,
)
from so3krates.runtime.plan import (
    KERNEL_MIN_EDGES,
    WHOLE_GRAPH_BYTES_PER_EDGE,
    WHOLE_GRAPH_BYTES_PER_EDGE_CUDA,
    WHOLE_GRAPH_BYTES_PER_EDGE_KERNEL,
    check_compile_mode,
    physical_memory,
)

DTYPES = {"float64": torch.float64, "float32": torch.float32}
#: Relative to the force scale: round-off of the same function in another arrangement, and the spline's
#: interpolation error (below float32 round-off; bounded against float64 below).
TOLERANCE = {("float64", "network"): 1e-10, ("float64", "spline"): 1e-6, ("float32", "network"): 2e-5}
TOLERANCE[("float32", "spline")] = TOLERANCE[("float32", "network")]


def plan_id(plan: Plan) -> str:
    return plan.describe().replace(" layers", "").replace(", ", "-")


#: Edges per block for plans with blocks: small, so that the test structures span several blocks.
BLOCK_EDGES = 16


def evaluate_plan(model, plan: Plan, structures, frozen: bool = True) -> dict[str, np.ndarray]:
    evaluator = Evaluator(EnergyFunction(model, plan, frozen=frozen, block_edges=BLOCK_EDGES), plan)
    graph = collate([atoms_to_graph(a, model.cutoff, pairs=plan.pairs) for a in structures])
    out = evaluator(graph, compute_stress=True)
    return {key: out[key].detach().double().numpy() for key in ("energy", "forces", "stress")}


@pytest.mark.parametrize("plan", PLANS, ids=plan_id)
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_legal_plan_gives_the_reference_numbers(variant, dtype, plan):
    skip_without_kernel(plan)
    model = make_model(VARIANTS[variant], DTYPES[dtype]).requires_grad_(False)
    structures = [ethanol(0), triclinic_cell()]  # a molecule and a periodic cell in one batch
    expected = reference_outputs(model, structures)
    got = evaluate_plan(model, plan, structures)
    tolerance = TOLERANCE[(dtype, plan.radial)]
    scale = max(np.abs(expected["forces"]).max(), 1.0)
    np.testing.assert_allclose(got["energy"], expected["energy"], rtol=tolerance, atol=tolerance * scale)
    np.testing.assert_allclose(got["forces"], expected["forces"], atol=tolerance * scale)
    stress_scale = max(np.abs(expected["stress"]).max(), 1e-3)
    np.testing.assert_allclose(got["stress"], expected["stress"], atol=10 * tolerance * stress_scale)


@pytest.mark.parametrize("plan", TRAINING_PLANS, ids=plan_id)
@pytest.mark.parametrize("variant", ["tiny", "tiny-gaussian-exponential-qk-norm-mlp", "tiny-invariant"])
def test_training_plans_give_the_reference_gradients(variant, plan):
    """The force-matching loss and its gradient with respect to every parameter (double backward)."""
    model = make_model(VARIANTS[variant], torch.float64).train()
    structures = [ethanol(seed) for seed in range(3)] + [triclinic_cell()]
    parameters = [p for p in model.parameters() if p.requires_grad]
    # The reference: the modules, derivatives through the positions.
    graph = collate([atoms_to_graph(a, model.cutoff, pairs=plan.pairs) for a in structures])
    positions = graph.positions.detach().requires_grad_(True)
    energy = model(graph.replace(positions=positions)).sum()
    (forces,) = torch.autograd.grad(energy, positions, create_graph=True)
    loss = energy.square() + forces.square().sum()
    expected = torch.autograd.grad(loss, parameters, allow_unused=True, materialize_grads=True)
    out = Evaluator(EnergyFunction(model, plan), plan)(graph, create_graph=True)
    loss = out["energy"].sum().square() + out["forces"].square().sum()
    got = torch.autograd.grad(loss, parameters, allow_unused=True, materialize_grads=True)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-9, atol=1e-11)


def test_every_illegal_plan_is_refused_with_a_clear_message():
    reasons = {
        "slots need the fused layers": lambda plan, frozen, grad: plan.slots and plan.layers != "fused",
        "a radial spline is built once from the weights: it needs frozen weights": (
            lambda plan, frozen, grad: plan.radial == "spline" and not frozen
        ),
        "slots are differentiable once: they need frozen weights": lambda plan, frozen, grad: (
            plan.slots and not frozen
        ),
        "the spline's second derivatives jump at its nodes": lambda plan, frozen, grad: (
            plan.radial == "spline" and grad
        ),
        "second derivatives need slots=False": lambda plan, frozen, grad: plan.slots and grad,
        "blocks evaluate the fused layers' equations": lambda plan, frozen, grad: (
            plan.blocks and plan.layers != "fused"
        ),
        "blocks sum their edges by scatter-adds, not through slots": lambda plan, frozen, grad: (
            plan.blocks and plan.slots
        ),
        "blocks recompute the messages with the weights as constants: they need frozen weights": (
            lambda plan, frozen, grad: plan.blocks and not frozen
        ),
        "second derivatives need blocks=False": lambda plan, frozen, grad: plan.blocks and grad,
        "the pair-message kernel runs the fused layers on edges in pair order": lambda plan, frozen, grad: (
            plan.kernel and (plan.layers != "fused" or not plan.pairs)
        ),
        "the kernel is differentiable once: it needs frozen weights": lambda plan, frozen, grad: (
            plan.kernel and not frozen
        ),
        "second derivatives need kernel=False": lambda plan, frozen, grad: plan.kernel and grad,
    }
    model = make_model(preset("tiny"), torch.float64)
    frozen_model = copy.deepcopy(model).requires_grad_(False)
    n_refused = 0
    for plan, frozen, create_graph in itertools.product(every_plan(), (False, True), (False, True)):
        expected = [text for text, applies in reasons.items() if applies(plan, frozen, create_graph)]
        if not expected:
            plan.check(frozen, create_graph)  # legal: no error
            EnergyFunction(frozen_model if frozen else model, plan, frozen=frozen)
            continue
        n_refused += 1
        with pytest.raises(PlanError) as error:
            plan.check(frozen, create_graph)
        message = str(error.value)
        assert message.count("\n") == 0 and message.startswith(f"plan {plan.describe()} cannot run: ")
        for text in expected:
            assert text in message, (plan, frozen, create_graph, message)
        if not create_graph:  # an energy function is built for first derivatives
            with pytest.raises(PlanError, match="cannot run"):
                EnergyFunction(frozen_model if frozen else model, plan, frozen=frozen)
    assert n_refused == 4 * len(every_plan()) - len(legal_plans(True)) - len(legal_plans(False)) - 2 * len(
        legal_plans(True, True)
    )
    with pytest.raises(PlanError, match="layers must be one of modules, fused"):
        Plan(layers="fast")
    with pytest.raises(PlanError, match="radial must be one of network, spline"):
        Plan(radial="table")
    with pytest.raises(PlanError, match="frozen=True needs a model whose parameters need no gradient"):
        EnergyFunction(model, Plan(), frozen=True)
    with pytest.raises(PlanError, match="compile must be one of none, inductor, aoti"):
        check_compile_mode("fast", True, "cpu")
    with pytest.raises(PlanError, match="builds a CPU program"):
        check_compile_mode("aoti", True, "meta")
    with pytest.raises(PlanError, match="aoti' compiles the weights into the program: it needs frozen"):
        ForceField(model, compile="aoti")


def test_a_plan_with_pairs_needs_edges_in_pair_order():
    model = make_model(preset("tiny"), torch.float64).requires_grad_(False)
    plan = Plan("fused", "network", pairs=True)
    graph = atoms_to_graph(ethanol(), model.cutoff)
    assert not graph.pairs
    with pytest.raises(PlanError, match="pair order"):
        Evaluator(EnergyFunction(model, plan, frozen=True), plan)(graph)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_the_planner_chooses_by_size_weights_threads_and_compile_mode(dtype):
    planner = Planner(kernel_min_edges=None)  # the pair-message kernel: the next test
    float32 = DTYPES[dtype] == torch.float32

    def plan(n_edges, frozen=True, create_graph=False, pairs=True, threads=1, compile="none"):
        return planner.plan(n_edges, DTYPES[dtype], frozen, create_graph, pairs, threads, compile)

    spline = "spline" if float32 else "network"
    # Inference, eager: fused layers up to 2,000 edges (with the spline in float32), the modules above.
    assert plan(72) == Plan("fused", spline, pairs=True)
    assert plan(2000) == Plan("fused", spline, pairs=True)
    assert plan(2001) == Plan("modules", "network", pairs=True)
    assert plan(72, pairs=False) == Plan("fused", spline)
    # Training and Hessians: exact network, no slots, whatever the size.
    assert plan(72, frozen=False, create_graph=True) == Plan("fused", "network", pairs=True)
    assert plan(72, frozen=True, create_graph=True) == Plan("fused", "network", pairs=True)
    assert plan(5000, frozen=False) == Plan("modules", "network", pairs=True)
    # aoti: fused wherever the whole graph runs, slots where the kernels run on several threads.
    assert plan(54_000, compile="aoti", threads=2) == Plan("fused", spline, pairs=True, slots=True)
    assert plan(54_000, compile="aoti", threads=1) == Plan("fused", spline, pairs=True)
    assert plan(200_000, compile="aoti", threads=2) == Plan("fused", spline, pairs=True, slots=True)
    # Inference where the whole graph would need more than a third of the machine's memory: edge blocks
    # (eager with the radial network; compiled with the spline in float32); never for training.
    eager_limit, aoti_limit = planner.blocks_threshold("none"), planner.blocks_threshold("aoti")
    assert eager_limit == int(physical_memory() / 3 / WHOLE_GRAPH_BYTES_PER_EDGE["none"])
    assert aoti_limit == int(physical_memory() / 3 / WHOLE_GRAPH_BYTES_PER_EDGE["aoti"]) > eager_limit
    blocks = Plan("fused", "network", pairs=True, blocks=True)
    compiled_blocks = Plan("fused", spline, pairs=True, blocks=True)
    assert plan(eager_limit) == Plan("modules", "network", pairs=True)
    assert plan(eager_limit + 1) == blocks
    assert planner.memory_threshold("aoti") == aoti_limit
    assert plan(aoti_limit, compile="aoti", threads=2) == Plan("fused", spline, pairs=True, slots=True)
    assert plan(aoti_limit + 1, compile="aoti", threads=2) == compiled_blocks
    assert plan(10**9, frozen=True, create_graph=True) == Plan("modules", "network", pairs=True)
    assert plan(10**9, frozen=False) == Plan("modules", "network", pairs=True)
    fixed = Planner(blocks_min_edges=200_000, kernel_min_edges=None)
    for compile in ("none", "inductor", "aoti"):
        assert fixed.blocks_threshold(compile) == 200_000
        expected = blocks if compile == "none" else compiled_blocks
        assert fixed.plan(200_001, DTYPES[dtype], True, pairs=True, compile=compile, threads=2) == expected
    without_kernel = Planner(spline=False, kernel_min_edges=None)
    assert without_kernel.plan(10**9, DTYPES[dtype], True, pairs=True, compile="aoti") == blocks
    assert Planner(blocks_min_edges=0).plan(10**9, DTYPES[dtype], True) == Plan("modules", "network")
    # Blocks turned off: beyond the memory budget the modules' program, for its smaller memory per edge.
    no_blocks = Planner(blocks_min_edges=0).plan(10**9, DTYPES[dtype], True, compile="aoti", threads=2)
    assert no_blocks == Plan("modules", "network")
    no_blocks = Planner(blocks_min_edges=0).plan(aoti_limit, DTYPES[dtype], True, compile="aoti", threads=2)
    assert no_blocks == Plan("fused", spline, slots=True)
    assert Planner(aoti_fused_max_edges=100).plan(101, DTYPES[dtype], True, compile="aoti") == Plan(
        "modules", "network"
    )
    # Threads: frozen CPU calls of up to 1,000 edges on one thread.
    assert planner.threads(1000, 2, "cpu", frozen=True) == 1
    assert planner.threads(1001, 2, "cpu", frozen=True) == 2
    assert planner.threads(72, 2, "cpu", frozen=False) == 2
    assert planner.threads(72, 2, "meta", frozen=True) == 2
    # The pair-message kernel: a helper thread where torch runs on one thread of several, else torch's.
    with_kernel = Plan("fused", "spline", pairs=True, kernel=True)
    assert planner.kernel_threads(with_kernel, 446, 1, 2) == 2
    assert planner.kernel_threads(with_kernel, 446, 1, 8) == 2
    assert planner.kernel_threads(with_kernel, 72, 1, 2) == 2  # ethanol
    assert planner.kernel_threads(with_kernel, 49, 1, 2) == 1
    assert planner.kernel_threads(with_kernel, 446, 2, 2) == 1
    assert planner.kernel_threads(with_kernel, 446, 1, 1) == 1
    assert planner.kernel_threads(Plan("fused", "spline", pairs=True), 446, 1, 2) == 1
    assert Planner(kernel_helper_min_edges=None).kernel_threads(with_kernel, 446, 1, 2) == 1
    # Overrides, for comparisons.
    assert Planner(spline=False).plan(72, DTYPES[dtype], True) == Plan("fused", "network")
    assert Planner(spline=True).plan(5000, DTYPES[dtype], True) == Plan("modules", "spline")
    assert Planner(pairs=False).plan(72, DTYPES[dtype], True, pairs=True).pairs is False
    # Every plan the planner can return is legal for the situation it was asked about.
    for n_edges, frozen, create_graph, threads, compile in itertools.product(
        (0, 72, 5000, 300_000, 10**9), (False, True), (False, True), (1, 2), ("none", "inductor", "aoti")
    ):
        if compile == "aoti" and not frozen:
            continue
        chosen = plan(n_edges, frozen, create_graph, True, threads, compile)
        assert not chosen.problems(frozen, create_graph), chosen


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_the_planner_takes_the_pair_kernel_for_large_frozen_cpu_calls_in_pair_order(dtype, monkeypatch):
    if not pair_messages.available():
        pytest.skip(f"the pair-message kernel cannot be built here: {pair_messages.unavailable_reason()}")
    planner = Planner()
    spline = "spline" if DTYPES[dtype] == torch.float32 else "network"

    def plan(n_edges, frozen=True, create_graph=False, pairs=True, threads=2, compile="none", device="cpu"):
        return planner.plan(n_edges, DTYPES[dtype], frozen, create_graph, pairs, threads, compile, device)

    large = KERNEL_MIN_EDGES + 1
    # Fused layers at every size (no per-edge tensors to keep), slots where an aoti program is threaded.
    assert plan(large) == Plan("fused", spline, pairs=True, kernel=True)
    assert plan(large, compile="inductor") == Plan("fused", spline, pairs=True, kernel=True)
    assert plan(large, compile="aoti") == Plan("fused", spline, pairs=True, slots=True, kernel=True)
    assert plan(large, compile="aoti", threads=1) == Plan("fused", spline, pairs=True, kernel=True)
    # Not at or below the threshold, nor without pair order, training, second derivatives, or on a GPU.
    assert not plan(KERNEL_MIN_EDGES).kernel
    assert not plan(large, pairs=False).kernel
    assert not plan(large, frozen=False).kernel
    assert not plan(large, create_graph=True).kernel
    assert not plan(large, device="meta").kernel
    # The kernel's program keeps fewer bytes per edge: the whole graph runs further before edge blocks,
    # whose messages then run in the kernel too.
    kernel_limit = planner.blocks_threshold("aoti", kernel=True)
    # Half the memory for it (its table was measured where it decides), a third for the others.
    assert kernel_limit == int(physical_memory() / 2 / WHOLE_GRAPH_BYTES_PER_EDGE_KERNEL["aoti"])
    third = Planner(blocks_memory_fraction=1 / 3).blocks_threshold("aoti", kernel=True)
    assert third == int(physical_memory() / 3 / WHOLE_GRAPH_BYTES_PER_EDGE_KERNEL["aoti"]) < kernel_limit
    assert kernel_limit > planner.blocks_threshold("aoti")
    whole = Plan("fused", spline, pairs=True, slots=True, kernel=True)
    assert plan(planner.blocks_threshold("aoti") + 1, compile="aoti") == whole
    assert plan(kernel_limit, compile="aoti") == whole
    assert plan(kernel_limit + 1, compile="aoti") == Plan(
        "fused", spline, pairs=True, blocks=True, kernel=True
    )
    assert plan(10**9) == Plan("fused", "network", pairs=True, blocks=True, kernel=True)
    assert not plan(10**9, pairs=False).kernel  # blocks without pair order: messages in PyTorch
    assert planner.blocks_threshold("none", kernel=True) == planner.blocks_threshold("none")  # not measured
    assert not Planner(kernel_min_edges=None).plan(large, DTYPES[dtype], True, pairs=True).kernel
    # Where the kernel cannot be built, the plans stay what they were without it.
    monkeypatch.setattr(pair_messages, "available", lambda: False)
    assert plan(5000) == Plan("modules", "network", pairs=True)
    assert plan(large, compile="aoti") == Plan("fused", spline, pairs=True, slots=True)


def test_on_a_gpu_edge_blocks_start_where_the_gpus_own_memory_would_run_out(monkeypatch):
    """A GPU node has more host memory than GPU memory: the whole graph must fit the GPU's memory."""
    model = make_model(VARIANTS["tiny"], torch.float32).requires_grad_(False)
    graph = atoms_to_graph(ethanol(0), model.cutoff, pairs=True)
    # A GPU whose memory holds the whole graph of one edge fewer than this one has.
    gpu_memory = 3 * WHOLE_GRAPH_BYTES_PER_EDGE_CUDA["inductor"] * (graph.n_edges - 1)
    monkeypatch.setattr("so3krates.runtime.plan._cuda_memory", lambda index: gpu_memory)
    planner = Planner(kernel_min_edges=None)  # the CPU's plans without the pair-message kernel (its own test)
    assert planner.blocks_threshold("inductor", "cuda:0") == graph.n_edges - 1
    eager_edges = int(gpu_memory / 3 / WHOLE_GRAPH_BYTES_PER_EDGE_CUDA["none"])
    assert planner.blocks_threshold("none", "cuda:0") == eager_edges < graph.n_edges - 1
    cpu_limit = int(physical_memory() / 3 / WHOLE_GRAPH_BYTES_PER_EDGE["inductor"])
    assert planner.blocks_threshold("inductor", "cpu") == planner.blocks_threshold("inductor") == cpu_limit
    kwargs = {"dtype": torch.float32, "frozen": True, "pairs": True, "compile": "inductor"}
    blocks = Plan("fused", "spline", pairs=True, blocks=True)
    assert planner.plan(graph.n_edges, device="cuda:0", **kwargs) == blocks
    assert planner.plan(graph.n_edges - 1, device="cuda:0", **kwargs) == Plan("fused", "spline", pairs=True)
    assert planner.plan(graph.n_edges, device="cpu", **kwargs) == Plan("fused", "spline", pairs=True)
    # A force field asks about its own device (the plan needs no GPU to be made).
    force_field = ForceField(model, frozen=True, planner=planner)
    assert force_field.plan(graph) == Plan("fused", "spline", pairs=True)
    monkeypatch.setattr(force_field, "device", torch.device("cuda:0"))
    assert force_field.plan(graph).blocks


def test_a_live_force_field_follows_weight_updates_and_a_frozen_one_keeps_its_copy():
    """Training updates the weights in place; an inference force field must not serve stale numbers, and
    must not change when the caller's model does."""
    model = make_model(preset("tiny"), torch.float32).requires_grad_(False)
    live, frozen = ForceField(model), ForceField(model, frozen=True)
    graph = atoms_to_graph(ethanol(), model.cutoff, pairs=True)
    before = live(graph)["forces"]
    torch.testing.assert_close(frozen(graph)["forces"], before, rtol=0, atol=1e-4)
    with torch.no_grad():
        model.layers[0].invariant_attention.value.weight.mul_(1.5)
        model.layers[1].euclidean_filter.radial_out.weight.mul_(1.7)
    changed = live(graph)["forces"]
    assert (changed - before).abs().max() > 1e-3
    np.testing.assert_allclose(
        changed.numpy(), reference_outputs(model, [ethanol()], stress=False)["forces"], atol=1e-4
    )
    torch.testing.assert_close(frozen(graph)["forces"], before, rtol=0, atol=1e-4)  # its own copy
    assert frozen.model is not model and not any(p.requires_grad for p in frozen.model.parameters())
    frozen.double()  # a frozen force field rebuilds its evaluators after a conversion
    np.testing.assert_allclose(frozen(graph)["forces"].numpy(), before.numpy(), atol=1e-4)


def test_the_float32_spline_is_as_close_to_float64_as_float32_round_off():
    """The default for frozen float32 fused layers: its error against exact float64 is round-off, no more."""
    exact = make_model(preset("paper"), torch.float64).requires_grad_(False)
    single = copy.deepcopy(exact).float()
    structures = [ethanol(3)]
    expected = reference_outputs(exact, structures, stress=False)["forces"]
    spline = evaluate_plan(single, Plan("fused", "spline"), structures)["forces"]
    network = evaluate_plan(single, Plan("fused", "network"), structures)["forces"]
    round_off = np.abs(network - expected).max()
    assert np.abs(spline - expected).max() < 3.0 * round_off + 1e-6 * np.abs(expected).max()


def test_forces_of_the_spline_are_the_gradient_of_its_energy():
    """Finite differences of the spline's energy in float64: what energy conservation in MD relies on."""
    model = make_model(preset("tiny"), torch.float64).requires_grad_(False)
    plan = Plan("fused", "spline")
    evaluator = Evaluator(EnergyFunction(model, plan, frozen=True), plan)
    atoms = ethanol(1)
    forces = evaluator(atoms_to_graph(atoms, model.cutoff))["forces"].numpy()
    step = 1e-5
    for atom, axis in [(0, 0), (3, 1), (8, 2)]:
        energies = []
        for sign in (1, -1):
            displaced = atoms.copy()
            displaced.positions[atom, axis] += sign * step
            energies.append(
                float(evaluator(atoms_to_graph(displaced, model.cutoff), compute_forces=False)["energy"])
            )
        assert -(energies[0] - energies[1]) / (2 * step) == pytest.approx(forces[atom, axis], abs=1e-7)


def test_edges_between_the_cutoff_and_a_skin_change_nothing():
    """The calculator's list reaches r_c + skin: there φ = φ' = 0, with the spline (clamped) too."""
    model = make_model(preset("tiny"), torch.float64).requires_grad_(False)
    atoms = triclinic_cell()
    for plan in legal_plans(frozen=True):
        if plan.kernel and not pair_messages.available():
            continue  # where it cannot be built (the matrix above says so, skipping its plans)
        evaluator = Evaluator(EnergyFunction(model, plan, frozen=True), plan)
        plain = evaluator(atoms_to_graph(atoms, model.cutoff, pairs=plan.pairs))
        skin = evaluator(atoms_to_graph(atoms, model.cutoff + 1.0, pairs=plan.pairs))
        assert skin["energy"].item() == pytest.approx(plain["energy"].item(), abs=1e-12)
        np.testing.assert_allclose(skin["forces"].numpy(), plain["forces"].numpy(), atol=1e-12)


def spherical_rows(model, plan: Plan, graph, monkeypatch) -> list[int]:
    """Rows fed to the first layer of MLP_s in one call, through the modules or the fused layers."""
    rows = []
    original = torch.addmm

    def counting_addmm(bias, a, b, **kwargs):
        if a.shape[1] == model.config.n_degrees:  # the fused layers' first spherical layer
            rows.append(a.shape[0])
        return original(bias, a, b, **kwargs)

    monkeypatch.setattr(torch, "addmm", counting_addmm)
    hooks = [  # the modules'
        net.spherical_in.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
        for layer in model.layers
        for net in layer.filter_nets
    ]
    Evaluator(EnergyFunction(model, plan, frozen=True), plan)(graph)
    for hook in hooks:
        hook.remove()
    monkeypatch.undo()
    return rows


@pytest.mark.parametrize("layers", ["modules", "fused"])
def test_pairs_evaluate_the_spherical_filters_once_per_pair(layers, monkeypatch):
    """MLP_s(s_ij) is symmetric like MLP_r (s_ij = c(x_j − x_i) = s_ji): half as many rows as edges."""
    model = make_model(preset("paper"), torch.float64).requires_grad_(False)
    graph = atoms_to_graph(triclinic_cell(), model.cutoff, pairs=True)
    rows = spherical_rows(model, Plan(layers, "network", pairs=True), graph, monkeypatch)
    assert len(rows) == (2 if layers == "modules" else 1) * model.config.n_layers  # per branch, or both
    assert all(n == graph.n_edges // 2 for n in rows), (rows, graph.n_edges)
    rows = spherical_rows(model, Plan(layers, "network"), graph, monkeypatch)
    assert all(n == graph.n_edges for n in rows)


def test_hessians_use_the_exact_network(monkeypatch):
    """so3krates spectrum: never the spline (its second derivatives jump), and the model left as it was."""
    from so3krates.spectrum.harmonic import hessian

    model = make_model(preset("tiny"), torch.float32).requires_grad_(False)
    monkeypatch.setattr("so3krates.runtime.radial.evaluate_spline", lambda *a: pytest.fail("spline used"))
    result = hessian(model, ethanol(), dtype=torch.float32)
    assert np.isfinite(result).all() and model.dtype == torch.float32
