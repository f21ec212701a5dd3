"""Edge blocks (``Plan.blocks``): the same sums and gradients as the whole graph, in a fraction of the memory.

The plans with blocks run in the matrix of ``test_plans.py`` (every variant, both dtypes, several blocks per
structure); here the summation machinery itself, what the backward pass keeps, and how the force field
runs them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule
from torch import Tensor

from helpers import make_model, reference_outputs, skip_without_kernel
from so3krates import So3kratesCalculator, atoms_to_graph, preset
from so3krates.ops import pair_messages
from so3krates.runtime import EnergyFunction, Evaluator, ForceField, Plan, Planner
from so3krates.runtime.blocks import blocked_sum, edge_blocks
from so3krates.runtime.layout import EdgeLayout


def water_box(n_side: int = 3, spacing: float = 3.1, seed: int = 0) -> Atoms:
    """n_side³ water molecules on a cubic lattice in a periodic cell, randomly rotated."""
    rng = np.random.default_rng(seed)
    parts = []
    for index in np.ndindex(n_side, n_side, n_side):
        water = molecule("H2O")
        water.rotate(rng.uniform(0, 360), rng.normal(size=3))
        water.translate(spacing * (np.array(index) + 0.5))
        parts.append(water)
    atoms = sum(parts[1:], parts[0])
    atoms.cell = np.eye(3) * spacing * n_side
    atoms.pbc = True
    return atoms


def _rows(layout: EdgeLayout, vectors: Tensor, a_i: Tensor, b_j: Tensor, c_i1: Tensor, c_j1: Tensor):
    """A smooth, non-linear message of every edge that uses every kind of input."""
    lengths = vectors.norm(dim=1, keepdim=True)
    pair_term = layout.both(torch.tanh(c_j1 - c_i1) * torch.cos(layout.first(lengths)))
    return torch.sin(a_i * b_j[:, :4]) * lengths + vectors[:, :1] * b_j[:, 4:] + pair_term


def _unblocked(idx_i, idx_j, pairs, n_atoms, vectors, a, b, c):
    layout = EdgeLayout(idx_i, idx_j, pairs=pairs)
    rows = _rows(
        layout,
        vectors,
        a[idx_i],
        b[idx_j],
        c[layout.first(idx_i)],
        c[layout.first(idx_j)],
    )
    return torch.zeros(n_atoms, 4, dtype=rows.dtype).index_add(0, idx_i, rows)


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("pairs", [False, True])
@pytest.mark.parametrize("block_edges", [2, 6, 7, 1000])
def test_blocked_sums_and_their_gradients_equal_the_whole_graph(pairs, block_edges, workers):
    """Also with the blocks shared among threads (``workers``, ``in_workers``)."""
    generator = torch.Generator().manual_seed(1)
    n_atoms, n_pairs = 7, 19
    first_i = torch.randint(0, n_atoms, (n_pairs,), generator=generator)
    first_j = (first_i + torch.randint(1, n_atoms, (n_pairs,), generator=generator)) % n_atoms
    idx_i, idx_j = torch.cat([first_i, first_j]), torch.cat([first_j, first_i])
    vectors = torch.randn(2 * n_pairs, 3, dtype=torch.float64, generator=generator)
    if pairs:
        vectors[n_pairs:] = -vectors[:n_pairs]
    a = torch.randn(n_atoms, 4, dtype=torch.float64, generator=generator)
    b = torch.randn(n_atoms, 8, dtype=torch.float64, generator=generator)
    c = torch.randn(n_atoms, 4, dtype=torch.float64, generator=generator)
    inputs = (vectors, a, b, c)
    blocks = edge_blocks(EdgeLayout(idx_i, idx_j, pairs=pairs), block_edges)
    covered = torch.cat([torch.arange(2 * n_pairs)[r] for block in blocks for r in block.ranges])
    assert sorted(covered.tolist()) == list(range(2 * n_pairs))  # every edge in exactly one block
    assert all(sum(r.stop - r.start for r in block.ranges) <= max(block_edges, 2) for block in blocks)

    def blocked(vectors, a, b, c):
        sides = [(a, "i"), (b, "j"), (c, "i1"), (c, "j1")]
        return blocked_sum(_rows, blocks, n_atoms, 4, torch.float64, vectors, sides, workers)

    def whole(vectors, a, b, c):
        return _unblocked(idx_i, idx_j, pairs, n_atoms, vectors, a, b, c)

    leaves = [t.clone().requires_grad_(True) for t in inputs]
    got, expected = blocked(*leaves), whole(*inputs)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    weights = torch.randn(n_atoms, 4, dtype=torch.float64, generator=generator)
    gradients = torch.autograd.grad((got * weights).sum(), leaves)
    reference_leaves = [t.clone().requires_grad_(True) for t in inputs]
    expected_gradients = torch.autograd.grad((whole(*reference_leaves) * weights).sum(), reference_leaves)
    for g, e in zip(gradients, expected_gradients, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(blocked, tuple(t.clone().requires_grad_(True) for t in inputs))


def test_blocks_shared_among_threads_give_the_same_numbers_on_every_call():
    """The threads' partial sums are added in a fixed order: bit for bit the same result on every call,
    whichever thread finishes first; torch's thread count is the caller's again afterwards, and an error in
    a thread reaches the caller."""
    generator = torch.Generator().manual_seed(2)
    n_atoms, n_edges = 50, 400
    idx_i = torch.randint(0, n_atoms, (n_edges,), generator=generator)
    idx_j = (idx_i + torch.randint(1, n_atoms, (n_edges,), generator=generator)) % n_atoms
    blocks = edge_blocks(EdgeLayout(idx_i, idx_j), 16)
    vectors = torch.randn(n_edges, 3, generator=generator).requires_grad_(True)
    a = torch.randn(n_atoms, 4, generator=generator).requires_grad_(True)

    def rows(layout, vectors, a_i, a_j):
        return torch.sin(a_i * a_j) * vectors.norm(dim=1, keepdim=True)

    threads = torch.get_num_threads()
    results = []
    for _ in range(5):
        total = blocked_sum(rows, blocks, n_atoms, 4, torch.float32, vectors, [(a, "i"), (a, "j")], 3)
        results.append((total, *torch.autograd.grad(total.square().sum(), [vectors, a])))
        assert torch.get_num_threads() == threads
    for other in results[1:]:
        for got, first in zip(other, results[0], strict=True):
            torch.testing.assert_close(got, first, rtol=0, atol=0)

    def broken(layout, vectors, a_i, a_j):
        if layout.idx_i.shape[0] and int(layout.idx_i[0]) == int(blocks[-1].layout.idx_i[0]):
            raise RuntimeError("a block failed")
        return rows(layout, vectors, a_i, a_j)

    with pytest.raises(RuntimeError, match="a block failed"):
        blocked_sum(broken, blocks, n_atoms, 4, torch.float32, vectors, [(a, "i"), (a, "j")], 3)
    assert torch.get_num_threads() == threads


def test_the_block_threads_scratch_sums_are_reused_but_never_returned():
    """The sums of the block threads after the first are kept between calls (``blocks._SCRATCH``, so that
    large graphs do not fault their memory in anew at every layer and call); what a call returns must
    still be its own: a later call may not change an earlier call's result or gradients."""
    from so3krates.runtime import blocks as block_module

    generator = torch.Generator().manual_seed(3)
    n_atoms, n_edges = 40, 300
    idx_i = torch.randint(0, n_atoms, (n_edges,), generator=generator)
    idx_j = (idx_i + torch.randint(1, n_atoms, (n_edges,), generator=generator)) % n_atoms
    blocks = edge_blocks(EdgeLayout(idx_i, idx_j), 16)

    def rows(layout, vectors, a_i, a_j):
        return torch.sin(a_i * a_j) * vectors.norm(dim=1, keepdim=True)

    def call(seed):
        g = torch.Generator().manual_seed(seed)
        vectors = torch.randn(n_edges, 3, generator=g).requires_grad_(True)
        a = torch.randn(n_atoms, 4, generator=g).requires_grad_(True)
        total = blocked_sum(rows, blocks, n_atoms, 4, torch.float32, vectors, [(a, "i"), (a, "j")], 2)
        return (total, *torch.autograd.grad(total.square().sum(), [vectors, a]))

    first = call(0)
    kept = [t.clone() for t in first]
    assert block_module._SCRATCH  # the second thread's sums were kept
    scratch = {id(t) for t in block_module._SCRATCH.values()}
    assert not scratch & {id(t) for t in first}
    call(1)  # other inputs, same scratch tensors
    for got, expected in zip(first, kept, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for got, expected in zip(call(0), kept, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_kernel_blocks_are_larger_by_default():
    """The kernel's blocks hold no (edges × features) tensors: 32,768 edges by default, 8,192 for blocks of
    messages; an explicit ``block_edges`` holds for both."""
    from so3krates.runtime.blocks import BLOCK_EDGES, KERNEL_BLOCK_EDGES

    kernel, messages = (
        Plan("fused", "spline", True, blocks=True, kernel=True),
        Plan("fused", "spline", True, blocks=True),
    )
    assert (BLOCK_EDGES, KERNEL_BLOCK_EDGES) == (8192, 32768)
    assert Planner().edges_per_block(kernel) == KERNEL_BLOCK_EDGES
    assert Planner().edges_per_block(messages) == BLOCK_EDGES
    assert Planner(block_edges=100).edges_per_block(kernel) == 100
    model = make_model(preset("tiny"), torch.float32).requires_grad_(False)
    assert EnergyFunction(model, kernel, frozen=True).block_edges == KERNEL_BLOCK_EDGES
    assert EnergyFunction(model, messages, frozen=True).block_edges == BLOCK_EDGES


def test_blocks_need_two_edges_and_an_empty_graph_has_no_blocks():
    layout = EdgeLayout(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), pairs=True)
    assert edge_blocks(layout, 16) == []
    with pytest.raises(ValueError, match="at least 2 edges per block"):
        edge_blocks(layout, 1)


@pytest.mark.parametrize("kernel", [False, True], ids=["messages", "kernel"])
def test_an_isolated_atom_and_a_lone_atom_give_zero_forces_in_blocks(kernel):
    model = make_model(preset("tiny", ev_init="neighbors"), torch.float64).requires_grad_(False)
    plan = Plan("fused", "network", pairs=True, blocks=True, kernel=kernel)
    skip_without_kernel(plan)
    evaluator = Evaluator(EnergyFunction(model, plan, frozen=True, block_edges=4), plan)
    lone = Atoms("C", positions=[[0.0, 0.0, 0.0]])
    separate = molecule("H2O") + Atoms("C", positions=[[30.0, 0.0, 0.0]])
    for atoms in (lone, separate):
        out = evaluator(atoms_to_graph(atoms, model.cutoff, pairs=True))
        expected = reference_outputs(model, [atoms], stress=False)
        np.testing.assert_allclose(out["energy"].detach().numpy(), expected["energy"], atol=1e-10)
        np.testing.assert_allclose(out["forces"].numpy(), expected["forces"], atol=1e-10)
        assert np.all(out["forces"].numpy()[-1] == 0.0)


def _saved_bytes(evaluator, graph) -> int:
    """Bytes of the tensors autograd keeps from the energy evaluation for its backward pass (each storage
    once: a tensor saved by several operations is kept once)."""
    storages = {}
    graph = graph.replace(positions=graph.positions.detach().requires_grad_(True))

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        energy = evaluator(graph, compute_forces=False)["energy"]
    assert energy.requires_grad
    return sum(storages.values())


def test_blocks_keep_per_atom_tensors_and_the_edge_vectors_not_edges_times_features():
    """What the backward pass keeps (no timing): with blocks, a few per-atom tensors per layer and the edge
    list, bytes per edge independent of the features; the whole graph keeps several (edges × F) tensors."""
    model = make_model(preset("paper"), torch.float32).requires_grad_(False)
    atoms = water_box(3)
    graph = atoms_to_graph(atoms, model.cutoff, pairs=True)
    n_atoms, n_edges, n_features = len(atoms), graph.n_edges, model.config.n_features
    saved = {}
    plans = {
        "whole": Plan("fused", "spline", pairs=True),
        "blocks": Plan("fused", "spline", pairs=True, blocks=True),
        "kernel blocks": Plan("fused", "spline", pairs=True, blocks=True, kernel=True),
    }
    if not pair_messages.available():
        del plans["kernel blocks"]
    for name, plan in plans.items():
        evaluator = Evaluator(EnergyFunction(model, plan, frozen=True, block_edges=256), plan)
        saved[name] = _saved_bytes(evaluator, graph)
        forces = evaluator(graph)["forces"]
        saved[name + " forces"] = forces
    # The whole graph: more than ten (edges × F) float32 tensors.
    assert saved["whole"] > 10 * n_edges * n_features * 4
    # Blocks: per layer a few (atoms × 5F) tensors; per edge only vectors and indices (< 100 bytes), with
    # the kernel the edge geometry computed once for all layers and what its autograd keeps (< 300 bytes,
    # whatever F).
    per_atom = 3 * 12 * n_features * 4
    per_edge = {"blocks": 100, "kernel blocks": 300}
    for name in set(plans) - {"whole"}:
        torch.testing.assert_close(saved[name + " forces"], saved["whole forces"], rtol=0, atol=2e-5)
        assert saved[name] < n_atoms * per_atom + per_edge[name] * n_edges, (name, saved[name])
        assert saved[name] < saved["whole"] / 8, name


def _compiled_and_eager_blocks(model, graph, planner, kernel: bool):
    from so3krates.runtime.evaluator import _kernel_rows, _layer_rows

    rows = _kernel_rows if kernel else _layer_rows
    outputs = {}
    for compile in ("none", "aoti"):  # inductor mode takes the same path as aoti
        force_field = ForceField(model, compile=compile, frozen=True, planner=planner)
        plan = force_field.plan(graph)
        assert plan == Plan("fused", "spline", pairs=True, blocks=True, kernel=kernel)
        for _ in range(2):  # the second call runs the programs the first one made
            out = force_field(graph, compute_stress=True)
            outputs[compile] = {key: out[key].detach().numpy() for key in ("energy", "forces", "stress")}
        evaluator = force_field.evaluator(plan)
        assert isinstance(evaluator, Evaluator)
        assert (evaluator.energy.layer_rows is rows) == (compile == "none")
    outputs["force field"] = force_field
    return outputs


@pytest.mark.parametrize("kernel", [False, True], ids=["messages", "kernel"])
def test_the_force_field_runs_large_graphs_in_blocks_compiled_where_it_compiles(kernel):
    """Eager blocks without compile; with ``inductor`` or ``aoti``, each block's messages and their
    gradients run compiled (``compile_messages``): the eager blocks' numbers to round-off, stress included.
    With the pair-message kernel, what is compiled is each block's kernel inputs (from the edge geometry).
    The spline, as compiled blocks take it in float32; float64, so that a dropped term cannot hide."""
    skip_without_kernel(Plan("fused", pairs=True, kernel=kernel))
    model = make_model(preset("tiny", ev_init="neighbors"), torch.float64).requires_grad_(False)
    atoms = water_box(2)
    # 64 edges per block: several full blocks and a shorter last one (two compiled shapes).
    # Several threads even on this small graph: threaded generated kernels crashed in the backward pass;
    # two threads also share out the blocks (``in_workers``).
    planner = Planner(
        blocks_min_edges=10,
        block_edges=64,
        spline=True,
        single_thread_edges=0,
        kernel_min_edges=0 if kernel else None,
    )
    graph = atoms_to_graph(atoms, model.cutoff, pairs=True)
    assert graph.n_edges % 64 != 0 and graph.n_edges > 3 * 64
    expected = reference_outputs(model, [atoms], stress=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    # Another number of edges (a new neighbour list in MD): the same programs, nothing compiled anew
    # (Dynamo guards on the thread count: the same as for the first graph).
    import torch._dynamo.config as dynamo_config
    from torch._dynamo.utils import counters

    limit = dynamo_config.recompile_limit

    other = water_box(2, spacing=2.95, seed=1)
    other_graph = atoms_to_graph(other, model.cutoff, pairs=True)
    # (a last block of one pair, 2 edges, would get programs of its own once)
    assert other_graph.n_edges != graph.n_edges and other_graph.n_edges % 64 not in (0, 2)
    try:
        outputs = _compiled_and_eager_blocks(model, graph, planner, kernel)
        compiled_graphs = counters["stats"]["unique_graphs"]
        out = outputs["force field"](other_graph)
        assert counters["stats"]["unique_graphs"] == compiled_graphs
        # raised only while compiled messages run (in several threads at once: two blocks per call)
        assert dynamo_config.recompile_limit == limit
    finally:
        torch.set_num_threads(threads)
    for key in ("energy", "forces", "stress"):
        np.testing.assert_allclose(outputs["aoti"][key], outputs["none"][key], rtol=0, atol=1e-11)
    np.testing.assert_allclose(
        out["forces"].numpy(), reference_outputs(model, [other], stress=False)["forces"], atol=1e-6
    )
    # and the model's: the spline's interpolation error only
    np.testing.assert_allclose(outputs["aoti"]["forces"], expected["forces"], atol=1e-6)
    np.testing.assert_allclose(outputs["aoti"]["stress"], expected["stress"], atol=1e-7)
    calculator = So3kratesCalculator(model, dtype="float64", planner=planner)
    atoms.calc = calculator
    np.testing.assert_allclose(atoms.get_forces(), outputs["none"]["forces"], atol=1e-11)


def test_a_traced_program_refuses_blocks():
    from so3krates.runtime.plan import PlanError
    from so3krates.runtime.programs import example_inputs, trace

    model = make_model(preset("tiny"), torch.float32).requires_grad_(False)
    plan = Plan("fused", "network", pairs=True, blocks=True)
    energy = EnergyFunction(model, plan, frozen=True)
    with pytest.raises(PlanError, match="edge blocks are a Python loop that runs eagerly"):
        trace(energy, example_inputs(model, [1, 8], plan))


def test_so3lr_runs_its_local_layers_in_blocks():
    from so3krates.model.so3lr import So3lr

    torch.manual_seed(0)
    model = So3lr(preset("so3lr")).double().eval().requires_grad_(False)
    atoms = molecule("C6H6")
    graph = atoms_to_graph(atoms, model.cutoff, pairs=True, long_range_cutoff=model.long_range_cutoff)
    whole = ForceField(model, frozen=True, planner=Planner(blocks_min_edges=0, kernel_min_edges=None))
    expected = whole(graph, compute_stress=False)
    # Blocks with the messages in PyTorch, and (where it builds) in the pair-message kernel.
    for kernel in [None, 0] if pair_messages.available() else [None]:
        planner = Planner(blocks_min_edges=1, block_edges=16, kernel_min_edges=kernel)
        blocked = ForceField(model, frozen=True, planner=planner)
        assert blocked.plan(graph).blocks and not whole.plan(graph).blocks
        assert blocked.plan(graph).kernel == (kernel is not None)
        got = blocked(graph, compute_stress=False)
        torch.testing.assert_close(got["energy"], expected["energy"], rtol=0, atol=1e-10)
        torch.testing.assert_close(got["forces"], expected["forces"], rtol=0, atol=1e-10)


def test_compiled_kernels_release_the_interpreter_lock():
    """Blocks run on several threads at once; inductor's kernels must not hold Python's lock while they
    compute (``release_interpreter_lock_in_kernels``): the generated binding releases it, and the kernel
    built through it gives the eager numbers."""
    import sys
    from pathlib import Path

    from torch._inductor.codecache import CppPythonBindingsCodeCache

    from so3krates.runtime.block_programs import release_interpreter_lock_in_kernels

    assert release_interpreter_lock_in_kernels()
    assert release_interpreter_lock_in_kernels()  # a second call changes nothing

    def function(x):
        return (x.sin() * 2.5 + x.cos() * x).sum(0)

    loaded_before = set(CppPythonBindingsCodeCache._loaded_module_names)
    compiled = torch.compile(function, dynamic=True, options={"cpp.threads": 1})
    x = torch.randn(300, 7, dtype=torch.float64)
    torch.testing.assert_close(compiled(x), function(x), rtol=0, atol=1e-12)
    # The kernels of this function (other tests may have compiled kernels before the change).
    sources = [
        Path(sys.modules[name].__file__).with_suffix(".cpp")
        for name in set(CppPythonBindingsCodeCache._loaded_module_names) - loaded_before
    ]
    sources = [path.read_text() for path in sources if path.exists()]
    assert sources, "no kernel of inductor's was loaded"
    assert all("PyEval_SaveThread" in source for source in sources)
