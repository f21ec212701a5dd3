"""The pair-message kernel against the same sums written out in PyTorch, and its gradients by gradcheck.

The kernel's place in the model (every variant, float32 and float64, eager and in compiled programs) is
checked against the reference model in ``test_plans.py`` and ``test_export.py``; here the operation itself:
random inputs, several heads of both kinds, a self-image pair and an atom without edges.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import Tensor

from so3krates.ops import pair_messages as kernel
from so3krates.ops.spline import build_spline, evaluate_spline

pytestmark = pytest.mark.skipif(
    not kernel.available(),
    reason=f"the pair-message kernel cannot be built here: {kernel.unavailable_reason()}",
)

F = 8  # features per branch; invariant heads of 4, one Euclidean head per degree (l = 1, 2)
RANGES_IN = torch.tensor([[0, 4, 0], [4, 8, 1], [8, 12, 2], [12, 16, 3]], dtype=torch.int32)


def graph(euclidean: bool, dtype=torch.float64, seed: int = 0):
    """Seven atoms (atom 6 without edges), pairs in pair order, one of them an atom with its own image."""
    generator = torch.Generator().manual_seed(seed)
    pairs = [(0, 1), (0, 2), (1, 2), (2, 3), (3, 4), (4, 5), (5, 0), (1, 4), (3, 3)]
    idx_i = torch.tensor([i for i, _ in pairs] + [j for _, j in pairs])
    idx_j = torch.tensor([j for _, j in pairs] + [i for i, _ in pairs])
    n, n_edges, width = 7, 2 * len(pairs), 2 * F if euclidean else F
    n_sph = 8 if euclidean else 0

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    inputs = {
        "queries": rand(n, width),
        "keys_values": rand(n, width + F),
        "filters": rand(len(pairs), width),
        "cutoff": torch.rand(n_edges, generator=generator, dtype=dtype),
        "sph": rand(n_edges, n_sph),
    }
    if euclidean:
        heads = (RANGES_IN, torch.tensor([[0, 4, 0], [4, 8, 1], [8, 11, 2], [11, 16, 3]], dtype=torch.int32))
        scale = torch.tensor([0.5, 0.5, 0.25, 0.3], dtype=dtype)
    else:
        heads = (RANGES_IN[:2], torch.tensor([[0, 4, 0], [4, 8, 1]], dtype=torch.int32))
        scale = torch.tensor([0.5, 0.4], dtype=dtype)
    return inputs, idx_i, idx_j, (*heads, scale)


def random_pairs(n: int, n_pairs: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Edges in pair order between random distinct atoms of n: idx_i, idx_j."""
    first = torch.randint(0, n, (n_pairs,), generator=generator)
    second = (first + torch.randint(1, n, (n_pairs,), generator=generator)) % n
    return torch.cat([first, second]), torch.cat([second, first])


def written_out(queries, keys_values, filters, cutoff, sph, idx_i, idx_j, heads):
    """The same sums as :func:`so3krates.runtime.fused.edge_messages` and ``EdgeLayout.sum_i`` compute."""
    ranges_in, ranges_out, scale = heads
    width = queries.shape[1]
    products = queries[idx_i] * torch.cat([filters, filters]) * keys_values[idx_j, :width]
    coefficients = torch.stack([products[:, a:b].sum(1) for a, b, _ in ranges_in.tolist()], 1)
    coefficients = coefficients * scale * cutoff[:, None]
    values = torch.cat([keys_values[idx_j, width:], sph], 1)
    columns = [coefficients[:, h : h + 1] * values[:, a:b] for a, b, h in ranges_out.tolist()]
    messages = torch.cat(columns, 1)
    return torch.zeros(queries.shape[0], messages.shape[1], dtype=messages.dtype).index_add(
        0, idx_i, messages
    )


@pytest.mark.parametrize("euclidean", [True, False], ids=["euclidean", "invariant"])
def test_the_kernel_gives_the_written_out_sums_and_their_gradients(euclidean):
    inputs, idx_i, idx_j, heads = graph(euclidean)
    got = kernel.pair_messages(**inputs, idx_i=idx_i, idx_j=idx_j, heads=heads)
    expected = written_out(**inputs, idx_i=idx_i, idx_j=idx_j, heads=heads)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert not got[6].any()  # the atom without edges

    names = list(inputs)

    def function(*tensors):
        return kernel.pair_messages(
            **dict(zip(names, tensors, strict=True)), idx_i=idx_i, idx_j=idx_j, heads=heads
        )

    leaves = [t.clone().requires_grad_() for t in inputs.values()]
    assert torch.autograd.gradcheck(function, leaves, eps=1e-6, atol=1e-8)
    # And the same gradients as autograd through the written-out sums, for one incoming gradient.
    grad = torch.randn_like(expected)
    ours = torch.autograd.grad(function(*leaves), leaves, grad)
    theirs = torch.autograd.grad(written_out(*leaves, idx_i, idx_j, heads), leaves, grad, allow_unused=True)
    for name, a, b in zip(names, ours, theirs, strict=True):
        torch.testing.assert_close(a, b if b is not None else torch.zeros_like(a), msg=name)


def test_the_kernel_in_float32_matches_float64_to_round_off():
    inputs, idx_i, idx_j, heads = graph(True)
    single = {k: v.float() for k, v in inputs.items()}
    heads32 = (*heads[:2], heads[2].float())
    got = kernel.pair_messages(**single, idx_i=idx_i, idx_j=idx_j, heads=heads32)
    expected = kernel.pair_messages(**inputs, idx_i=idx_i, idx_j=idx_j, heads=heads)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_no_edges_give_zeros_and_bad_input_one_clear_error():
    inputs, idx_i, idx_j, heads = graph(True)
    empty = {
        "queries": inputs["queries"],
        "keys_values": inputs["keys_values"],
        "filters": inputs["filters"][:0],
        "cutoff": inputs["cutoff"][:0],
        "sph": inputs["sph"][:0],
    }
    none = torch.zeros(0, dtype=torch.long)
    out = kernel.pair_messages(**empty, idx_i=none, idx_j=none, heads=heads)
    assert out.shape == (7, 2 * F) and not out.any()
    with pytest.raises(RuntimeError, match="edges must come in pairs"):
        kernel.pair_messages(**inputs, idx_i=idx_i[:-1], idx_j=idx_j[:-1], heads=heads)
    with pytest.raises(RuntimeError, match="out of range for 7 atoms"):
        kernel.pair_messages(**inputs, idx_i=idx_i + 7, idx_j=idx_j + 7, heads=heads)
    shuffled = torch.cat([idx_i[:9], idx_i[9:].roll(1)])
    with pytest.raises(RuntimeError, match="not in pair order"):
        kernel.pair_messages(**inputs, idx_i=shuffled, idx_j=idx_j, heads=heads)


def in_two_blocks(inputs, idx_i, idx_j, heads, grad, filter_parts):
    """The block operations over two blocks of pairs, each in pair order (the self-image pair in the second),
    adding into the same sums and gradient buffers: (sums, ∂E/∂queries, ∂E/∂keys_values, and per block its
    pairs, edges and the gradients block_sums_backward returns). ``filter_parts(pairs)``: the block's
    filters, radial spline and spherical part."""
    n_pairs = idx_i.shape[0] // 2
    sums = torch.zeros_like(grad)
    grad_queries = torch.zeros_like(inputs["queries"])
    grad_keys_values = torch.zeros_like(inputs["keys_values"])
    results = []
    for pairs in (torch.arange(0, 4), torch.arange(4, n_pairs)):
        edges = torch.cat([pairs, pairs + n_pairs])
        block = {
            "queries": inputs["queries"],
            "keys_values": inputs["keys_values"],
            "cutoff": inputs["cutoff"][edges],
            "sph": inputs["sph"][edges],
            "idx_i": idx_i[edges],
            "idx_j": idx_j[edges],
            "heads": heads,
            **filter_parts(pairs),
        }
        kernel.block_sums(sums, **block)
        results.append(
            (pairs, edges, kernel.block_sums_backward(grad_queries, grad_keys_values, grad, **block))
        )
    return sums, grad_queries, grad_keys_values, results


def check_blocks(result, whole, expected, names):
    """``in_two_blocks``'s result against the whole graph's sums and gradients (``expected``): ``names`` of
    the five gradients a block returns (None: not given, so None), per edge (cutoff, sph) or per pair."""
    sums, grad_queries, grad_keys_values, blocks = result
    for pairs, edges, grads in blocks:
        for name, got in zip(names, grads, strict=True):
            if name is None:
                assert got is None
            else:
                rows = edges if name in ("cutoff", "sph") else pairs
                torch.testing.assert_close(got, expected[name][rows], rtol=1e-12, atol=1e-12, msg=name)
    torch.testing.assert_close(sums, whole.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_queries, expected["queries"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_keys_values, expected["keys_values"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("euclidean", [True, False], ids=["euclidean", "invariant"])
def test_blocks_of_pairs_add_up_to_the_whole_graph_forward_and_backward(euclidean):
    """The block operations (edge blocks, runtime/blocks.py): two blocks of pairs add into the same sums and
    gradient buffers; together they give the whole-graph kernel's numbers."""
    inputs, idx_i, idx_j, heads = graph(euclidean)
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    whole = kernel.pair_messages(**leaves, idx_i=idx_i, idx_j=idx_j, heads=heads)
    grad = torch.randn_like(whole)
    expected = dict(zip(leaves, torch.autograd.grad(whole, list(leaves.values()), grad), strict=True))

    result = in_two_blocks(
        inputs, idx_i, idx_j, heads, grad, lambda pairs: {"filters": inputs["filters"][pairs]}
    )
    # No spline, no spherical part: no gradients of distances or hidden rows.
    check_blocks(result, whole, expected, ("filters", "cutoff", "sph", None, None))


def test_block_operations_refuse_buffers_of_the_wrong_shape():
    inputs, idx_i, idx_j, heads = graph(True)
    wrong = torch.zeros(7, 2 * F + 1, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="sums must be a contiguous"):
        kernel.block_sums(wrong, **inputs, idx_i=idx_i, idx_j=idx_j, heads=heads)
    grad = torch.zeros(7, 2 * F, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="gradient buffers must be contiguous"):
        kernel.block_sums_backward(
            wrong, inputs["keys_values"], grad, **inputs, idx_i=idx_i, idx_j=idx_j, heads=heads
        )


def test_pairs_shared_among_threads_give_the_written_out_sums_the_same_on_every_call():
    """Enough pairs for several threads (each adds into rows of its own, summed in a fixed order)."""
    generator = torch.Generator().manual_seed(3)
    n, n_pairs = 200, 3000
    idx_i, idx_j = random_pairs(n, n_pairs, generator)
    inputs, _, _, heads = graph(True)
    inputs = {
        "queries": torch.randn(n, 2 * F, generator=generator, dtype=torch.float64),
        "keys_values": torch.randn(n, 3 * F, generator=generator, dtype=torch.float64),
        "filters": torch.randn(n_pairs, 2 * F, generator=generator, dtype=torch.float64),
        "cutoff": torch.rand(2 * n_pairs, generator=generator, dtype=torch.float64),
        "sph": torch.randn(2 * n_pairs, 8, generator=generator, dtype=torch.float64),
    }
    leaves = [t.clone().requires_grad_() for t in inputs.values()]
    expected = written_out(*leaves, idx_i, idx_j, heads)
    grad = torch.randn_like(expected)
    theirs = torch.autograd.grad(expected, leaves, grad)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 2):
            torch.set_num_threads(count)
            got = kernel.pair_messages(*leaves, idx_i, idx_j, heads)
            results.append((got, *torch.autograd.grad(got, leaves, grad)))
    finally:
        torch.set_num_threads(threads)
    for result in results:
        for a, b in zip(result, (expected, *theirs), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-11)
    for a, b in zip(results[1], results[2], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def helper_graph(n_pairs: int = 120, seed: int = 4):
    """A graph of enough pairs for the kernel's helper thread, its inputs leaves of autograd."""
    generator = torch.Generator().manual_seed(seed)
    n = 30
    idx_i, idx_j = random_pairs(n, n_pairs, generator)
    _, _, _, heads = graph(True)
    shapes = [(n, 2 * F), (n, 3 * F), (n_pairs, 2 * F), (2 * n_pairs,), (2 * n_pairs, 8)]
    leaves = [torch.randn(*shape, generator=generator, dtype=torch.float64) for shape in shapes]
    return [leaf.requires_grad_() for leaf in leaves], idx_i, idx_j, heads


def sums_and_gradients(leaves, idx_i, idx_j, heads, seed: int = 5):
    """The kernel's sums and the gradients of ⟨sums, G⟩ for a fixed random G."""
    got = kernel.pair_messages(*leaves, idx_i, idx_j, heads)
    grad = torch.randn(got.shape, generator=torch.Generator().manual_seed(seed), dtype=got.dtype)
    return (got, *torch.autograd.grad(got, leaves, grad))


def test_the_helper_thread_gives_the_written_out_sums_the_same_on_every_call():
    """Torch on one thread, the kernel allowed two: the pairs split with the kernel's helper thread, which
    adds into rows of its own; busy (two callers at once) or late (asleep), both parts run on the caller,
    with the same numbers."""
    leaves, idx_i, idx_j, heads = helper_graph()
    expected = written_out(*leaves, idx_i, idx_j, heads)
    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(5), dtype=expected.dtype)
    theirs = (expected, *torch.autograd.grad(expected, leaves, grad))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = sums_and_gradients(leaves, idx_i, idx_j, heads)
        with kernel.kernel_threads(2):
            helped = [sums_and_gradients(leaves, idx_i, idx_j, heads) for _ in range(3)]
            for _ in range(3):  # the helper asleep (300 µs without work): it may be late, the caller then
                time.sleep(0.002)  # runs the second part itself, into the same rows
                helped.append(sums_and_gradients(leaves, idx_i, idx_j, heads))
            with ThreadPoolExecutor(2) as pool:  # two callers at once: one of them without the helper
                at_once = list(pool.map(lambda _: sums_and_gradients(leaves, idx_i, idx_j, heads), range(4)))
        assert torch.ops.so3krates.set_kernel_threads(1) == 1  # restored on leaving
    finally:
        torch.set_num_threads(threads)
    for result in (alone, *helped):
        for a, b in zip(result, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-11)
    # Two parts, summed in a fixed order: not the one-thread order, but the same on every call.
    assert not torch.equal(alone[0], helped[0][0])
    for result in helped[1:]:
        for a, b in zip(result, helped[0], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Pool threads run with the default (one kernel thread): their calls are the one-thread numbers.
    for result in at_once:
        for a, b in zip(result, alone, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_callers_of_a_slow_helper_run_both_parts_themselves_with_the_same_numbers():
    """A helper slower than its callers alone (here: a delay before each of its tasks, as where its core is
    shared with a busy process) is left out for a while: the callers run both parts themselves, into the
    same rows, so every call gives the same numbers; a helper that keeps up is used again."""
    leaves, idx_i, idx_j, heads = helper_graph()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ops = torch.ops.so3krates
    try:
        with kernel.kernel_threads(2):
            reference = sums_and_gradients(leaves, idx_i, idx_j, heads)
            ops.helper_test_delay(2000)  # 2 ms per task: every caller waits longer than it worked
            before = ops.helper_skipped()
            # Calls (2 tasks each) until the helper is left out. Its record counts only the tasks it took:
            # where it slept between two calls (the interpreter's work between them took longer than its
            # 300 µs of waiting actively), the caller ran that task, and the window fills later.
            slow = []
            while len(slow) < 200 and ops.helper_skipped() - before < 8:
                slow.append(sums_and_gradients(leaves, idx_i, idx_j, heads))
            skipped = ops.helper_skipped() - before
            ops.helper_test_delay(0)  # clears the record: the helper takes its parts again
            before = ops.helper_skipped()
            again = [sums_and_gradients(leaves, idx_i, idx_j, heads) for _ in range(20)]
            skipped_after = ops.helper_skipped() - before
    finally:
        ops.helper_test_delay(0)
        torch.set_num_threads(threads)
    # 32 tasks taken by the helper (its record's window) before any of its parts ran here.
    assert 8 <= skipped <= 2 * len(slow) - 32
    assert skipped_after <= 40 - 32  # the record cleared: the first window's tasks go to the helper again
    for result in (*slow, *again):
        for a, b in zip(result, reference, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_helpers_matrix_products_run_on_one_thread_whatever_mkl_num_threads_says():
    """The helper's share of a product is one library call on its own thread: MKL_NUM_THREADS=2 (as job
    scripts set it) takes precedence over OpenMP's setting there and made each such call open a team of two
    (3BPA 0.92 ms per evaluation against 0.72). In a fresh process, where the variables are read."""
    code = (
        "import torch; from so3krates.ops import pair_messages as kernel; kernel.require(); "
        "print(torch.ops.so3krates.helper_library_threads())"
    )
    env = {**os.environ, "MKL_NUM_THREADS": "2", "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "1"


def _child_with_helper(queue) -> None:
    torch.set_num_threads(1)
    leaves, idx_i, idx_j, heads = helper_graph()
    with kernel.kernel_threads(2):
        # As a NumPy array: a tensor would travel as shared memory that the exiting child takes along.
        queue.put(sums_and_gradients(leaves, idx_i, idx_j, heads)[0].detach().numpy())


def test_a_forked_child_starts_a_helper_of_its_own():
    """After fork() the child has the parent's helper object but not its thread: it must not wait for it."""
    leaves, idx_i, idx_j, heads = helper_graph()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with kernel.kernel_threads(2):  # the parent's helper exists and has served
            expected = sums_and_gradients(leaves, idx_i, idx_j, heads)[0].detach()
    finally:
        torch.set_num_threads(threads)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_with_helper, args=(queue,))
    child.start()
    try:
        got = torch.from_numpy(queue.get(timeout=120))
    finally:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_products_split_with_the_helper_equal_the_matrix_product_the_same_on_every_call(dtype):
    """``so3krates::products`` splits the columns into chunks that the caller and the helper take in turn
    where allowed: the result is the product (the weights as given and as a transposed view, two and four
    chunks, odd widths, a product too small to split), also with the helper asleep before each call."""
    generator = torch.Generator().manual_seed(6)

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    cases = [
        (rand(27, 132), rand(132, 660)),
        (rand(27, 660), rand(132, 660).t()),
        (rand(40, 135), rand(135, 135)),
    ]
    cases += [(rand(9, 101), rand(101, 301)), (rand(5, 200), rand(200, 661)), (rand(3, 15), rand(15, 19))]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = [torch.ops.so3krates.products(a, b) for a, b in cases]
        with kernel.kernel_threads(2):
            helped = [[torch.ops.so3krates.products(a, b) for a, b in cases] for _ in range(3)]
            late = []
            for a, b in cases:
                time.sleep(0.002)  # the helper asleep: the caller may take every chunk
                late.append(torch.ops.so3krates.products(a, b))
            helped.append(late)
    finally:
        torch.set_num_threads(threads)
    for (a, b), one, results in zip(cases, alone, zip(*helped, strict=True), strict=True):
        torch.testing.assert_close(one, a @ b)
        for result in results:
            torch.testing.assert_close(result, a @ b)
            torch.testing.assert_close(result, results[0], rtol=0, atol=0)


def test_large_products_of_a_traced_program_go_through_the_helper():
    """``rewrites.products_with_helper`` swaps ``mm``/``addmm`` with large static weights for
    ``so3krates::products`` (plus the bias), keeps the small ones and gives the same numbers."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from so3krates.runtime.rewrites import products_with_helper

    generator = torch.Generator().manual_seed(7)
    big, bias, small = (torch.randn(*s, generator=generator) for s in ((135, 135), (135,), (135, 3)))

    def function(x):
        return torch.nn.functional.linear(x @ big, big.t(), bias) @ small

    graph_module = make_fx(function, tracing_mode="symbolic", _allow_non_fake_inputs=True)(
        torch.randn(20, 135)
    )
    assert products_with_helper(graph_module) == 2
    targets = [node.target for node in graph_module.graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.so3krates.products.default) == 2
    assert torch.ops.aten.mm.default in targets  # the (135, 3) product stays ATen's
    x = torch.randn(33, 135, generator=generator)
    torch.testing.assert_close(graph_module(x), function(x))


def test_small_products_of_a_traced_program_become_generated_loops():
    """``rewrites.small_products_as_loops`` turns ``mm``/``addmm`` with small static second factors into
    broadcast products and sums (the same numbers up to round-off, rows of any count), and keeps the
    products with large or dynamic second factors."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from so3krates.runtime.rewrites import SMALL_PRODUCT_MAX_WEIGHTS, small_products_as_loops

    generator = torch.Generator().manual_seed(3)
    coefficients, bias, big = (
        torch.randn(*s, generator=generator, dtype=torch.float64) for s in ((19, 15), (15,), (15, 21))
    )
    assert 19 * 15 <= SMALL_PRODUCT_MAX_WEIGHTS < 15 * 21

    def function(x, y):
        hidden = torch.nn.functional.linear(x, coefficients.t(), bias)  # addmm, small
        return (hidden @ big) @ y.t(), x @ coefficients  # large; dynamic second factor; small mm

    x, y = torch.randn(7, 19, dtype=torch.float64), torch.randn(4, 21, dtype=torch.float64)
    graph_module = make_fx(function, tracing_mode="symbolic", _allow_non_fake_inputs=True)(x, y)
    assert small_products_as_loops(graph_module) == 2
    targets = [node.target for node in graph_module.graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.aten.mm.default) == 2 and torch.ops.aten.addmm.default not in targets
    for rows in (1, 30):
        x = torch.randn(rows, 19, generator=generator, dtype=torch.float64)
        y = torch.randn(5, 21, generator=generator, dtype=torch.float64)
        for result, expected in zip(graph_module(x, y), function(x, y), strict=True):
            torch.testing.assert_close(result, expected)


def radial_spline(width: int, n_pairs: int, dtype=torch.float64, seed: int = 1):
    """A spline of a smooth (n,) → (n, width) function on [0, 4] in 12 intervals and one distance per pair:
    most inside, one at 0, one at the end and one beyond it (clamped: no gradient there)."""
    generator = torch.Generator().manual_seed(seed)
    frequencies = torch.rand(width, generator=generator, dtype=torch.float64) * 2
    phases = torch.rand(width, generator=generator, dtype=torch.float64) * 6

    def function(d):
        return torch.sin(d[:, None] * frequencies + phases) * torch.exp(-0.3 * d[:, None])

    spline = build_spline(function, 4.0, 12, dtype=dtype)
    distances = 0.3 + 3.5 * torch.rand(n_pairs, generator=generator, dtype=dtype)
    distances[:3] = torch.tensor([0.0, 4.0, 4.5])
    return spline, distances


def spherical_part(n_pairs: int, n_branches: int, width: int, hidden: int = 5, seed: int = 2):
    """Hidden rows (pairs, B·K) and last-layer weights (B, K, F) of a spherical filter MLP."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(n_pairs, n_branches * hidden, generator=generator, dtype=torch.float64)
    weights = torch.randn(n_branches, hidden, width, generator=generator, dtype=torch.float64)
    return rows, weights


def products(rows: Tensor, weights: Tensor) -> Tensor:
    """Σ_k h[p, b, k] V[b, k, f] per branch, branches side by side: (pairs, B·F)."""
    n_branches, hidden, _ = weights.shape
    per_branch = rows.view(-1, n_branches, hidden)
    return torch.einsum("pbk,bkf->pbf", per_branch, weights).reshape(rows.shape[0], -1)


@pytest.mark.parametrize("part", ["given", "alone", "hidden"], ids=lambda p: f"spline-{p}")
@pytest.mark.parametrize("euclidean", [True, False], ids=["euclidean", "invariant"])
def test_the_spline_and_products_in_the_kernel_equal_the_filters_they_add_up_to(euclidean, part):
    """Filters = spline(d) per pair plus a given part, or alone, or plus the spherical MLP's last layer of
    hidden rows: the kernel making the filters itself gives the sums and the gradients (of the given part or
    hidden rows, and of the distances) of the kernel fed the written-out filters."""
    inputs, idx_i, idx_j, heads = graph(euclidean)
    n_pairs, width = inputs["filters"].shape
    spline, distances = radial_spline(width, n_pairs)
    table = kernel.spline_table(spline.coefficients)
    names = [n for n in inputs if n != "filters"]
    leaves = {n: inputs[n].clone().requires_grad_() for n in names}
    given = inputs["filters"].clone().requires_grad_()
    n_branches = 2 if euclidean else 1
    rows, weights = spherical_part(n_pairs, n_branches, width // n_branches)
    rows.requires_grad_()
    d = distances.clone().requires_grad_()

    radial = evaluate_spline(spline, d)
    extra = {"given": given, "alone": 0.0, "hidden": products(rows, weights) if part == "hidden" else 0.0}[
        part
    ]
    written = kernel.pair_messages(**leaves, filters=radial + extra, idx_i=idx_i, idx_j=idx_j, heads=heads)
    read = kernel.pair_messages(
        **leaves,
        filters=given if part == "given" else None,
        idx_i=idx_i,
        idx_j=idx_j,
        heads=heads,
        radial=kernel.RadialSpline(d, table, spline.spacing),
        spherical=kernel.SphericalFilters(rows, weights) if part == "hidden" else None,
    )
    torch.testing.assert_close(read, written, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(written)
    wrt = [*leaves.values(), d] + {"given": [given], "alone": [], "hidden": [rows]}[part]
    ours = torch.autograd.grad(read, wrt, grad)
    for a, b in zip(ours, torch.autograd.grad(written, wrt, grad), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert ours[len(leaves)][2] == 0 and ours[len(leaves)][0] != 0  # beyond the end: clamped; at 0: not

    # ∂E/∂d by finite differences too (inside the intervals, where the spline is smooth).
    def energy(dd):
        radial_ = kernel.RadialSpline(dd, table, spline.spacing)
        sums = kernel.pair_messages(**inputs, idx_i=idx_i, idx_j=idx_j, heads=heads, radial=radial_)
        return (sums * grad).sum()

    inner = distances.clone()
    inner[:3] = torch.tensor([0.5, 1.7, 3.9], dtype=inner.dtype)
    assert torch.autograd.gradcheck(energy, [inner.requires_grad_()], eps=1e-7, atol=1e-7)


def test_blocks_of_pairs_making_their_filters_add_up_to_the_whole_graph():
    """As edge blocks run with the spline: each block's kernel makes its filters from the spline and the
    spherical part's hidden rows; the blocks give the whole-graph kernel's sums and gradients."""
    inputs, idx_i, idx_j, heads = graph(True)
    n_pairs, width = inputs["filters"].shape
    spline, distances = radial_spline(width, n_pairs)
    table = kernel.spline_table(spline.coefficients)
    rows, weights = spherical_part(n_pairs, 2, width // 2)
    leaves = {n: v.clone().requires_grad_() for n, v in inputs.items() if n != "filters"}
    d, hidden = distances.clone().requires_grad_(), rows.clone().requires_grad_()
    whole = kernel.pair_messages(
        **leaves, filters=None, idx_i=idx_i, idx_j=idx_j, heads=heads,
        radial=kernel.RadialSpline(d, table, spline.spacing),
        spherical=kernel.SphericalFilters(hidden, weights),
    )  # fmt: skip
    grad = torch.randn_like(whole)
    wrt = [*leaves.values(), d, hidden]
    expected = dict(zip([*leaves, "d", "hidden"], torch.autograd.grad(whole, wrt, grad), strict=True))

    def filter_parts(pairs):
        return {
            "filters": None,
            "radial": kernel.RadialSpline(distances[pairs], table, spline.spacing),
            "spherical": kernel.SphericalFilters(rows[pairs], weights),
        }

    result = in_two_blocks(inputs, idx_i, idx_j, heads, grad, filter_parts)
    check_blocks(result, whole, expected, (None, "cutoff", "sph", "d", "hidden"))


def test_a_bad_spline_gives_one_clear_error():
    inputs, idx_i, idx_j, heads = graph(True)
    spline, distances = radial_spline(inputs["filters"].shape[1], inputs["filters"].shape[0])
    table = kernel.spline_table(spline.coefficients)
    with pytest.raises(RuntimeError, match=r"radial spline must be \(intervals, 4, queries' width\)"):
        kernel.pair_messages(
            **inputs, idx_i=idx_i, idx_j=idx_j, heads=heads,
            radial=kernel.RadialSpline(distances[:-1], table, spline.spacing),
        )  # fmt: skip
    with pytest.raises(RuntimeError, match="radial spline must be"):
        kernel.pair_messages(
            **inputs, idx_i=idx_i, idx_j=idx_j, heads=heads,
            radial=kernel.RadialSpline(distances, table[:, :, :-1].contiguous(), spline.spacing),
        )  # fmt: skip
    with pytest.raises(ValueError, match="filters or a radial spline"):
        kernel.pair_messages(**{**inputs, "filters": None}, idx_i=idx_i, idx_j=idx_j, heads=heads)
    rows, weights = spherical_part(distances.shape[0], 2, F)
    with pytest.raises(RuntimeError, match="spherical part must be hidden rows"):
        kernel.pair_messages(
            **inputs, idx_i=idx_i, idx_j=idx_j, heads=heads,
            spherical=kernel.SphericalFilters(rows[:, :-1].contiguous(), weights),
        )  # fmt: skip


def wide_heads(n_sph: int):
    """Head ranges of 132 features: two invariant heads of 66 and one Euclidean head (queries and keys of
    132, values the n_sph components)."""
    ranges_in = torch.tensor([[0, 66, 0], [66, 132, 1], [132, 264, 2]], dtype=torch.int32)
    ranges_out = torch.tensor([[0, 66, 0], [66, 132, 1], [132, 132 + n_sph, 2]], dtype=torch.int32)
    return ranges_in, ranges_out, torch.tensor([0.3, 0.2, 0.1], dtype=torch.float64)


def test_the_spherical_products_over_wide_rows_as_in_the_paper_model():
    """Branches of 132 features (the paper model's: 8 register chunks of 16 columns and a last chunk of 4,
    padded) and 33 hidden units (∂E/∂h: 2 chunks and one dot product), more pairs than the forward pass
    keeps rows for, on two threads: the filters' products equal the written-out filters, and so do their
    gradients."""
    generator = torch.Generator().manual_seed(5)
    n, n_pairs, width, n_sph = 40, 2501, 132, 8
    idx_i, idx_j = random_pairs(n, n_pairs, generator)
    heads = wide_heads(n_sph)

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    q, kv = rand(n, 2 * width), rand(n, 3 * width)
    cutoff, sph = torch.rand(2 * n_pairs, generator=generator, dtype=torch.float64), rand(2 * n_pairs, n_sph)
    spline, distances = radial_spline(2 * width, n_pairs)
    table = kernel.spline_table(spline.coefficients)
    rows, weights = spherical_part(n_pairs, 2, width, hidden=33)
    rows.requires_grad_()
    d = distances.clone().requires_grad_()
    written = kernel.pair_messages(
        q, kv, evaluate_spline(spline, d) + products(rows, weights), cutoff, sph, idx_i, idx_j, heads
    )
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        read = kernel.pair_messages(
            q, kv, None, cutoff, sph, idx_i, idx_j, heads,
            radial=kernel.RadialSpline(d, table, spline.spacing),
            spherical=kernel.SphericalFilters(rows, weights),
        )  # fmt: skip
        grad = torch.randn_like(written)
        ours = torch.autograd.grad(read, [rows, d], grad)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(read, written, rtol=1e-12, atol=1e-11)
    for a, b in zip(ours, torch.autograd.grad(written, [rows, d], grad), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("n_pairs", [40, 2501], ids=["rows-kept", "rows-made-again"])
def test_spherical_weights_changed_in_place_are_the_ones_used(n_pairs):
    """The kernel keeps its padded and transposed copies of the spherical weights between calls: weights
    changed in place (same memory, as a training step or a loaded checkpoint does) give the numbers of a
    fresh tensor with the new entries, forward and backward, and so do weights of several layers in turn."""
    generator = torch.Generator().manual_seed(8)
    n, width, n_sph = 20, 132, 4
    idx_i, idx_j = random_pairs(n, n_pairs, generator)
    heads = wide_heads(n_sph)

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    q, kv, cutoff, sph = rand(n, 2 * width), rand(n, 3 * width), rand(2 * n_pairs), rand(2 * n_pairs, n_sph)
    spline, distances = radial_spline(2 * width, n_pairs)
    table = kernel.spline_table(spline.coefficients)
    rows = spherical_part(n_pairs, 2, width, hidden=33)[0].requires_grad_()
    grad = rand(n, width + n_sph)

    def call(weights):
        sums = kernel.pair_messages(
            q, kv, None, cutoff, sph, idx_i, idx_j, heads,
            radial=kernel.RadialSpline(distances, table, spline.spacing),
            spherical=kernel.SphericalFilters(rows, weights),
        )  # fmt: skip
        return sums, torch.autograd.grad(sums, rows, grad)[0]

    layers = [spherical_part(n_pairs, 2, width, hidden=33, seed=s)[1] for s in (3, 4)]
    before = [call(w) for w in layers]
    for weights in layers:
        weights.mul_(-0.5).add_(0.01)  # same memory, new entries
    for weights, old in zip(layers, before, strict=True):
        new, fresh = call(weights), call(weights.clone())
        for a, b, c in zip(new, fresh, old, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
            assert not torch.allclose(a, c)


@pytest.mark.parametrize("n_pairs", [40, 2501], ids=["rows-kept", "rows-made-again"])
def test_float32_at_the_paper_widths_matches_float64_forward_and_backward(n_pairs):
    """The float32 kernel has its own vector code (head sums and coefficient gradients over ranges that
    start and end inside a 16-lane chunk, the spherical products' last 4 of 132 columns as a padded chunk):
    the paper model's widths (4 invariant heads of 33 features, 3 Euclidean heads of 44, 33 hidden units),
    spline and spherical parts, every gradient, against the same call in float64."""
    generator = torch.Generator().manual_seed(11)
    n, width, n_sph = 30, 132, 15
    idx_i, idx_j = random_pairs(n, n_pairs, generator)
    invariant = [[33 * h, 33 * (h + 1), h] for h in range(4)]
    ranges_in = torch.tensor(invariant + [[132 + 44 * h, 176 + 44 * h, 4 + h] for h in range(3)])
    ranges_out = torch.tensor([*invariant, [132, 135, 4], [135, 140, 5], [140, 147, 6]])
    scale = torch.rand(7, generator=generator, dtype=torch.float64)
    spline, distances = radial_spline(2 * width, n_pairs)
    rows, weights = spherical_part(n_pairs, 2, width, hidden=33)
    inputs = {
        "queries": torch.randn(n, 2 * width, generator=generator, dtype=torch.float64),
        "keys_values": torch.randn(n, 3 * width, generator=generator, dtype=torch.float64),
        "cutoff": torch.rand(2 * n_pairs, generator=generator, dtype=torch.float64),
        "sph": torch.randn(2 * n_pairs, n_sph, generator=generator, dtype=torch.float64),
        "distances": distances,
        "hidden": rows / 4,
        "weights": weights / 4,
    }
    grad = torch.randn(n, width + n_sph, generator=generator, dtype=torch.float64)

    def call(dtype):
        leaves = {k: v.to(dtype).requires_grad_() for k, v in inputs.items()}
        table = kernel.spline_table(tuple(c.to(dtype) for c in spline.coefficients))
        sums = kernel.pair_messages(
            leaves["queries"], leaves["keys_values"], None, leaves["cutoff"], leaves["sph"], idx_i, idx_j,
            (ranges_in.int(), ranges_out.int(), scale.to(dtype)),
            radial=kernel.RadialSpline(leaves["distances"], table, spline.spacing),
            spherical=kernel.SphericalFilters(leaves["hidden"], leaves["weights"]),
        )  # fmt: skip
        names = ["queries", "keys_values", "cutoff", "sph", "distances", "hidden"]
        grads = torch.autograd.grad(sums, [leaves[k] for k in names], grad.to(dtype))
        return {"sums": sums, **dict(zip(names, grads, strict=True))}

    single, double = call(torch.float32), call(torch.float64)
    for name, expected in double.items():
        scale_of = expected.abs().max().item()
        torch.testing.assert_close(
            single[name].double(), expected, rtol=1e-4, atol=1e-5 * scale_of, msg=f"∂/∂{name}"
        )


@pytest.mark.parametrize("n_pairs", [9, 2501], ids=["rows-kept", "rows-made-again"])
def test_the_flop_counter_sees_the_products_the_kernel_executes(n_pairs):
    """The speed benchmark's roofline counts matrix-product FLOPs with torch's flop counter: the spherical
    products inside the kernel count, forward, again in the backward pass where the rows were not kept, and
    transposed for ∂E/∂h."""
    from torch.utils.flop_counter import FlopCounterMode

    generator = torch.Generator().manual_seed(7)
    n = 30
    idx_i, idx_j = random_pairs(n, n_pairs, generator)
    inputs, _, _, heads = graph(True)
    width = inputs["queries"].shape[1]
    spline, distances = radial_spline(width, n_pairs)
    rows, weights = spherical_part(n_pairs, 2, width // 2)
    rows.requires_grad_()
    with FlopCounterMode(display=False) as counter:
        sums = kernel.pair_messages(
            torch.randn(n, width, dtype=torch.float64),
            torch.randn(n, width + F, dtype=torch.float64),
            None,
            torch.rand(2 * n_pairs, dtype=torch.float64),
            torch.randn(2 * n_pairs, 8, dtype=torch.float64),
            idx_i,
            idx_j,
            heads,
            radial=kernel.RadialSpline(distances, kernel.spline_table(spline.coefficients), spline.spacing),
            spherical=kernel.SphericalFilters(rows, weights),
        )
        sums.sum().backward()
    once = 2 * n_pairs * rows.shape[1] * weights.shape[2]
    passes = 3 if n_pairs > kernel.KEEP_ROWS_MAX_PAIRS else 2
    assert counter.get_total_flops() == passes * once
