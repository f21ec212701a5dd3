"""Edge blocks: sums over edges evaluated one block of edges at a time, recomputed in the backward pass.

Energy and forces of a graph need one backward pass, and autograd keeps every intermediate per-edge tensor
of the forward pass for it: with the paper model that is ~20 KB per edge (filters, gathered queries, keys
and values, products, messages of every layer), 1.3 MB per atom of liquid water. Most of the model is a sum
over edges of a function of per-edge inputs,

    U_i = Σ_{e: i_e = i} m(vec_e, a_{i_e}, b_{j_e}, ...),

where a, b are per-atom tensors (queries, keys and values, Euclidean variables). :func:`blocked_sum`
evaluates such a sum block by block under ``no_grad`` and keeps only its per-atom inputs and the edge
vectors. Its backward pass recomputes each block's messages with autograd, takes their vector-Jacobian
product with ∂E/∂U gathered to the block's edges, and adds the result into the gradients of the edge
vectors and of the per-atom inputs. Memory then grows with atoms (a few per-atom tensors per layer) and the
edge list, not with (edges × features); the price is a second evaluation of the messages.

With the plan's ``kernel`` (:func:`blocked_kernel_sum`), a block's messages and their sum are the pair-message
kernel's (:mod:`so3krates.ops.pair_messages`): the only per-edge tensors of a block are then the kernel's
inputs (filters once per pair, cutoff, spherical harmonics), recomputed in the backward pass; queries, keys
and values are read by the kernel from the per-atom tensors, and their gradients added straight into
per-thread buffers. Compiled, that halves the time of a block (3,000 water atoms: 178 against 375 µs per
atom, ``benchmarks/results/scaling/kernel_blocks_dec5``).

Only first derivatives, for weights that do not change (the weights are constants of the recomputation,
:class:`so3krates.runtime.plan.Plan` refuses the rest). Why by hand: ``torch.utils.checkpoint`` of each block
would also recompute, but every block's gradients of the per-atom inputs would then be a full
(n_atoms × width) tensor filled by a scatter; here they go straight into one buffer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, NamedTuple

import torch
from torch import Tensor

from so3krates.ops.pair_messages import RadialSpline, SphericalFilters, block_sums, block_sums_backward
from so3krates.runtime.layout import EdgeLayout

#: Edges per block: large enough that the ~30 operations of a block are not dominated by dispatch (a few µs
#: each), small enough that a block's tensors (≈ 30 × 128 floats per edge) stay near the caches.
BLOCK_EDGES = 8192
#: Edges per block where the pair-message kernel evaluates the blocks: its blocks hold no (edges × features)
#: tensors (only the kernel's inputs, ~100 floats per pair), and larger blocks cost less per edge in large
#: graphs. 99,999 water atoms, aoti, 2 threads, in turn against the whole graph: blocks of 8,192 edges
#: 1.25×, 16,384 0.99×, 32,768 0.94–1.02×, 65,536 0.93×; 9,999 atoms: 8,192 and 32,768 alike
#: (benchmarks/results/scaling/blocks_dec5).
KERNEL_BLOCK_EDGES = 32768

#: Which atom of an edge a per-atom input is gathered at: centre ``i`` or neighbour ``j``, on all edges of
#: the block or (``i1``, ``j1``) on its first rows only (:meth:`EdgeLayout.first`, one edge per pair).
SIDES = ("i", "j", "i1", "j1")


class Block(NamedTuple):
    """The edges of one block: one range of the edge list, or with pairs a range of pairs and their reverses.

    ranges: the slices of the full edge list, in block order.
    layout: the block's own layout (its idx_i, idx_j; pair order if the graph's edges are in it).
    """

    ranges: tuple[slice, ...]
    layout: EdgeLayout

    def take(self, per_edge: Tensor) -> Tensor:
        """The block's rows of a per-edge tensor (a view for one range)."""
        if len(self.ranges) == 1:
            return per_edge[self.ranges[0]]
        return torch.cat([per_edge[r] for r in self.ranges])

    def put(self, target: Tensor, rows: Tensor) -> None:
        """Writes the block's rows back into a per-edge tensor (each edge is in exactly one block)."""
        start = 0
        for r in self.ranges:
            length = r.stop - r.start
            target[r] = rows[start : start + length]
            start += length

    def index(self, side: str) -> Tensor:
        """The atom of every row for ``side`` (see ``SIDES``)."""
        layout = self.layout
        index = layout.idx_i if side[0] == "i" else layout.idx_j
        return layout.first(index) if side.endswith("1") else index


def edge_blocks(edges: EdgeLayout, block_edges: int = BLOCK_EDGES) -> list[Block]:
    """Splits the edges into blocks of at most ``block_edges`` edges (pairs stay in one block)."""
    if block_edges < 2:
        raise ValueError(f"edge blocks need at least 2 edges per block, not {block_edges}")
    n_edges = edges.idx_i.shape[0]
    blocks = []
    if edges.pairs:
        half = n_edges // 2
        step = block_edges // 2
        for start in range(0, half, step):
            stop = min(start + step, half)
            ranges = (slice(start, stop), slice(half + start, half + stop))
            idx_i = torch.cat([edges.idx_i[r] for r in ranges])
            idx_j = torch.cat([edges.idx_j[r] for r in ranges])
            blocks.append(Block(ranges, EdgeLayout(idx_i, idx_j, pairs=True)))
    else:
        for start in range(0, n_edges, block_edges):
            r = slice(start, min(start + block_edges, n_edges))
            blocks.append(Block((r,), EdgeLayout(edges.idx_i[r], edges.idx_j[r])))
    return blocks


#: messages(block layout, edge vectors of the block, *inputs gathered to its rows) → (rows, width).
Messages = Callable[..., Tensor]


class _BlockedSum(torch.autograd.Function):
    """U = Σ over the edges of each centre atom of ``messages``, block by block (module docstring)."""

    @staticmethod
    def forward(
        ctx,
        messages: Messages,
        blocks: Sequence[Block],
        sides: tuple[str, ...],
        workers: int,
        n_atoms: int,
        width: int,
        dtype: torch.dtype,
        vectors: Tensor,
        *inputs: Tensor,
    ) -> Tensor:
        def part(own: Sequence[Block], total: Tensor) -> Tensor:
            with torch.no_grad():
                for block in own:
                    gathered = [
                        x.index_select(0, block.index(side)) for x, side in zip(inputs, sides, strict=True)
                    ]
                    rows = messages(block.layout, block.take(vectors), *gathered)
                    total.index_add_(0, block.layout.idx_i, rows)
            return total

        totals = in_workers(
            part, blocks, workers, lambda slot: _zeros(slot, "sum", vectors, (n_atoms, width), dtype)
        )
        ctx.messages, ctx.blocks, ctx.sides, ctx.workers = messages, blocks, sides, workers
        ctx.save_for_backward(vectors, *inputs)
        return _sum(totals, "sum")

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total: Tensor) -> tuple[Tensor | None, ...]:
        vectors, *inputs = ctx.saved_tensors
        wanted = ctx.needs_input_grad[7:]
        grad_vectors = torch.zeros_like(vectors) if wanted[0] else None

        def make(slot: int) -> list[Tensor | None]:
            # Each slot sums into gradients of its own; the rows of the edge vectors are disjoint.
            pairs = enumerate(zip(inputs, wanted[1:], strict=True))
            return [_zeros(slot, f"grad{k}", x) if w else None for k, (x, w) in pairs]

        def part(own: Sequence[Block], grad_inputs: list[Tensor | None]) -> list[Tensor | None]:
            for block in own:
                with torch.enable_grad():
                    block_vectors = block.take(vectors).detach().requires_grad_(wanted[0])
                    gathered = [
                        x.detach().index_select(0, block.index(side)).requires_grad_(w)
                        for x, side, w in zip(inputs, ctx.sides, wanted[1:], strict=True)
                    ]
                    rows = ctx.messages(block.layout, block_vectors, *gathered)
                leaves = [t for t in [block_vectors, *gathered] if t.requires_grad]
                if not leaves or not rows.requires_grad:
                    continue
                grads = torch.autograd.grad(
                    rows, leaves, grad_total.index_select(0, block.layout.idx_i), allow_unused=True
                )
                grads = iter(grads)
                if wanted[0]:
                    g = next(grads)
                    if g is not None:
                        block.put(grad_vectors, g)
                for x_grad, side, w in zip(grad_inputs, ctx.sides, wanted[1:], strict=True):
                    if w:
                        g = next(grads)
                        if g is not None:
                            x_grad.index_add_(0, block.index(side), g)
            return grad_inputs

        parts = in_workers(part, ctx.blocks, ctx.workers, make)
        grad_inputs = [
            _sum(list(g), f"grad{k}") if g[0] is not None else None
            for k, g in enumerate(zip(*parts, strict=True))
        ]
        return (None, None, None, None, None, None, None, grad_vectors, *grad_inputs)


_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0


def in_workers(
    part: Callable[[Sequence[Block], Any], Any],
    blocks: Sequence[Block],
    workers: int,
    make: Callable[[int], Any] = lambda slot: None,
) -> list[Any]:
    """``part(share, make(slot))`` for each thread's share of the blocks, one accumulator per thread: the
    first block on the calling thread, block k ≥ 1 on pool thread (k − 1) mod ``workers``; the result of
    each slot's last ``part``.

    ``make(slot)`` is called on the thread of the slot before its blocks, and its accumulators are what
    ``part`` adds into (slot 0's serve the first block and then the first pool thread's share, one after
    the other). One worker: ``part(blocks, make(0))`` on the calling thread. Several: every thread, the
    calling one included, runs on one intra-op thread (so that compiled messages meet one thread count,
    which Dynamo guards on); the first block runs first, alone, on the calling thread (compiled messages
    compile there, once), then each worker's share on a pool thread; the results come back in slot order,
    so the sums that follow are the same on every call. Why threads over blocks: the kernels that inductor
    generates for a block run on one thread (threaded ones crashed, ``block_programs.compile_messages``),
    and the eager operations of a block hardly divide over threads; two blocks at once keep both cores
    busier. ATen's operations release the interpreter lock while they compute; inductor's generated kernels
    held it (torch 2.13) until ``block_programs.release_interpreter_lock_in_kernels`` (3,000 water atoms, 2
    threads: 1.47 → 1.77 cores busy). The pair-message kernel runs on the calling thread as well.
    """
    workers = min(workers, len(blocks) - 1)
    if workers <= 1:
        return [part(blocks, make(0))]
    global _POOL, _POOL_SIZE
    if _POOL is None or _POOL_SIZE < workers:
        _POOL, _POOL_SIZE = ThreadPoolExecutor(workers, thread_name_prefix="so3krates-blocks"), workers
    shares = [list(blocks[w + 1 :: workers]) for w in range(workers)]
    threads = torch.get_num_threads()

    def run(share: Sequence[Block], slot: int, accumulators: Any = None) -> Any:
        torch.set_num_threads(1)
        return part(share, make(slot) if accumulators is None else accumulators)

    try:
        first = make(0)
        run(blocks[:1], 0, first)
        futures = [_POOL.submit(run, share, w, first if w == 0 else None) for w, share in enumerate(shares)]
        wait(futures)  # all of them, also when one fails: none may still be writing when this returns
        return [f.result() for f in futures]
    finally:
        torch.set_num_threads(threads)


#: Zeroed per-atom sums of the block threads after the first, kept between calls (slot, role) → tensor:
#: made afresh at every layer and call, these (n_atoms × width) tensors were mapped and faulted in anew by
#: the allocator each time (glibc maps allocations of more than 32 MB on their own): at 100,000 water
#: atoms 0.4–0.6 million page faults and 1.6–4 s of system time per call. Slot 0's sums are the result
#: and are made afresh. A call takes its tensors out of the cache and puts them back when done, so calls
#: from two threads at once never share one.
_SCRATCH: dict[tuple[int, str], Tensor] = {}
_SCRATCH_LOCK = threading.Lock()


def _zeros(slot: int, role: str, like: Tensor, shape: tuple[int, ...] | None = None, dtype=None) -> Tensor:
    """Zeros on ``like``'s device, of its shape and dtype or ``shape`` and ``dtype``, for block thread
    ``slot``: a new tensor for slot 0, a cached one for the others (returned by :func:`_sum`)."""
    shape = tuple(like.shape) if shape is None else tuple(shape)
    dtype = like.dtype if dtype is None else dtype
    if slot == 0:
        return like.new_zeros(shape, dtype=dtype)
    with _SCRATCH_LOCK:
        cached = _SCRATCH.pop((slot, role), None)
    if cached is None or cached.shape != shape or cached.dtype != dtype or cached.device != like.device:
        return like.new_zeros(shape, dtype=dtype)
    return cached.zero_()


def _release(parts: Sequence[Tensor | None], role: str) -> None:
    """Puts the scratch sums of slots ≥ 1 back into the cache, once they have been added."""
    with _SCRATCH_LOCK:
        for slot, t in enumerate(parts):
            if slot > 0 and t is not None:
                _SCRATCH[(slot, role)] = t


def _sum(parts: Sequence[Tensor], role: str | None = None) -> Tensor:
    """Σ of the parts in their order (the same order on every call: reproducible numbers), into the first;
    with ``role``, the others go back to the scratch cache."""
    total = parts[0]
    for other in parts[1:]:
        total = total.add_(other)
    if role is not None:
        _release(parts, role)
    return total


def blocked_sum(
    messages: Messages,
    blocks: Sequence[Block],
    n_atoms: int,
    width: int,
    dtype: torch.dtype,
    vectors: Tensor,
    inputs: Sequence[tuple[Tensor, str]] = (),
    workers: int = 1,
) -> Tensor:
    """Σ_{e: i_e = i} messages(block layout, vec_e, inputs gathered at e) → (n_atoms, width).

    Args:
        messages: computes the rows of one block from its layout, its edge vectors and the per-atom
            ``inputs`` gathered to its rows; its weights must be constants.
        blocks: :func:`edge_blocks` of the graph.
        n_atoms, width, dtype: shape and dtype of the result (the messages' dtype).
        vectors: (n_edges, 3) edge vectors (autograd flows to them).
        inputs: (per-atom tensor, side) pairs, ``side`` in ``SIDES``.
        workers: threads that evaluate blocks at once (:func:`in_workers`).
    """
    tensors = tuple(x for x, _ in inputs)
    sides = tuple(side for _, side in inputs)
    return _BlockedSum.apply(messages, blocks, sides, workers, n_atoms, width, dtype, vectors, *tensors)


#: rows(block layout, the block's rows of the per-edge inputs, x at i1, x at j1) → (filters (n_pairs, B·F),
#: cutoff (rows,), sph (rows, n_sph), pair distances, hidden rows): the inputs of the pair-message kernel for
#: one block (x: None, None without Euclidean variables). Filters None where the kernel makes them from the
#: layer's spline at the distances and the spherical MLP's hidden rows (None without a Euclidean branch);
#: else the distances and hidden rows are None.
KernelRows = Callable[..., tuple[Tensor | None, Tensor, Tensor, Tensor | None, Tensor | None]]


class KernelSpline(NamedTuple):
    """What the kernel needs besides a block's rows to make a layer's filters itself: the radial spline's
    (intervals, 4, B·F) table and spacing, and the spherical MLP's last layer (B, K, F) or None."""

    table: Tensor
    spacing: float
    spherical_out: Tensor | None


class _BlockedKernelSum(torch.autograd.Function):
    """One fused layer's summed messages, block by block, each block's messages in the pair-message kernel.

    As :class:`_BlockedSum`, but a block's per-edge tensors are only the kernel's inputs (filters, cutoff,
    sph, and with a radial spline the pair distances; recomputed from the per-edge inputs and x in the
    backward pass); the queries, keys and values are not gathered to the edges, and their gradients are
    added by the kernel straight into per-thread buffers.
    """

    @staticmethod
    def forward(
        ctx,
        rows: KernelRows,
        blocks: Sequence[Block],
        heads: tuple[Tensor, Tensor, Tensor],
        spline: KernelSpline | None,
        workers: int,
        edge_inputs: Tensor,
        queries: Tensor,
        keys_values: Tensor,
        x: Tensor | None,
    ) -> Tensor:
        # F + n_sph columns; F is the values' width (keys_values: keys as wide as the queries, then values).
        n_atoms = queries.shape[0]
        width = keys_values.shape[1] - queries.shape[1] + (x.shape[1] if x is not None else 0)

        def part(own: Sequence[Block], total: Tensor) -> Tensor:
            with torch.no_grad():
                for block in own:
                    layout = block.layout
                    x_i, x_j = _at_first(x, layout)
                    filters, cutoff, sph, distances, hidden = rows(layout, block.take(edge_inputs), x_i, x_j)
                    block_sums(
                        total,
                        queries,
                        keys_values,
                        filters,
                        cutoff,
                        sph,
                        layout.idx_i,
                        layout.idx_j,
                        heads,
                        *_parts(distances, hidden, spline),
                    )
            return total

        totals = in_workers(
            part, blocks, workers, lambda slot: _zeros(slot, "sum", queries, (n_atoms, width))
        )
        ctx.rows, ctx.blocks, ctx.heads, ctx.spline, ctx.workers = rows, blocks, heads, spline, workers
        ctx.save_for_backward(edge_inputs, queries, keys_values, x)
        return _sum(totals, "sum")

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total: Tensor) -> tuple[Tensor | None, ...]:
        edge_inputs, queries, keys_values, x = ctx.saved_tensors
        grad_total = grad_total.contiguous()
        grad_edge_inputs = torch.zeros_like(edge_inputs)

        def make(slot: int) -> tuple[Tensor, Tensor, Tensor | None]:
            grad_x = _zeros(slot, "grad_x", x) if x is not None else None
            return (
                _zeros(slot, "grad_queries", queries),
                _zeros(slot, "grad_keys_values", keys_values),
                grad_x,
            )

        def part(own: Sequence[Block], grads: tuple[Tensor, Tensor, Tensor | None]) -> tuple[Tensor, ...]:
            grad_queries, grad_keys_values, grad_x = grads
            for block in own:
                layout = block.layout
                with torch.enable_grad():
                    block_inputs = block.take(edge_inputs).detach().requires_grad_(True)
                    x_i, x_j = _at_first(x, layout, requires_grad=True)
                    inputs = ctx.rows(layout, block_inputs, x_i, x_j)
                detached = [t.detach() if t is not None else None for t in inputs]
                grads = block_sums_backward(
                    grad_queries,
                    grad_keys_values,
                    grad_total,
                    queries,
                    keys_values,
                    *detached[:3],
                    layout.idx_i,
                    layout.idx_j,
                    ctx.heads,
                    *_parts(*detached[3:], ctx.spline),
                )
                outputs = [
                    (t, g) for t, g in zip(inputs, grads, strict=True) if t is not None and t.requires_grad
                ]
                leaves = [block_inputs] + ([x_i, x_j] if x_i is not None else [])
                found = torch.autograd.grad(
                    [t for t, _ in outputs], leaves, [g for _, g in outputs], allow_unused=True
                )
                if found[0] is not None:
                    block.put(grad_edge_inputs, found[0])
                if grad_x is not None:
                    for g, side in zip(found[1:], ("i1", "j1"), strict=True):
                        if g is not None:
                            grad_x.index_add_(0, block.index(side), g)
            return grad_queries, grad_keys_values, grad_x

        parts = in_workers(part, ctx.blocks, ctx.workers, make)
        grad_queries, grad_keys_values, grad_x = (
            _sum(list(g), role) if g[0] is not None else None
            for g, role in zip(
                zip(*parts, strict=True), ("grad_queries", "grad_keys_values", "grad_x"), strict=True
            )
        )
        return (None, None, None, None, None, grad_edge_inputs, grad_queries, grad_keys_values, grad_x)


def _parts(
    distances: Tensor | None, hidden: Tensor | None, spline: KernelSpline | None
) -> tuple[RadialSpline | None, SphericalFilters | None]:
    """The kernel's filter parts for a block's pair distances and hidden rows (None without a spline)."""
    if spline is None:
        return None, None
    spherical = SphericalFilters(hidden, spline.spherical_out) if hidden is not None else None
    return RadialSpline(distances, spline.table, spline.spacing), spherical


def _at_first(x: Tensor | None, layout: EdgeLayout, requires_grad: bool = False) -> tuple[Tensor | None, ...]:
    """x at the centre and neighbour atoms of a block's first rows (one per pair), or (None, None)."""
    if x is None:
        return None, None
    return tuple(
        x.detach().index_select(0, layout.first(index)).requires_grad_(requires_grad)
        for index in (layout.idx_i, layout.idx_j)
    )


def blocked_kernel_sum(
    rows: KernelRows,
    blocks: Sequence[Block],
    heads: tuple[Tensor, Tensor, Tensor],
    edge_inputs: Tensor,
    queries: Tensor,
    keys_values: Tensor,
    x: Tensor | None = None,
    workers: int = 1,
    spline: KernelSpline | None = None,
) -> Tensor:
    """One fused layer's Σ_{e: i_e = i} [α_e v_j | β_e Y_e] → (n_atoms, F + n_sph) over edge blocks in pair
    order, each block's messages in the pair-message kernel (:func:`so3krates.ops.pair_messages.block_sums`).

    Args:
        rows: the kernel's per-edge inputs of one block (``KernelRows``); its weights must be constants.
        blocks: :func:`edge_blocks` of a graph in pair order.
        heads: ``LayerWeights.heads``.
        edge_inputs: (n_edges, c), what ``rows`` computes a block's rows from besides x: the edge vectors,
            or their geometry computed once for all layers (autograd flows to it);
        queries, keys_values: per atom (``fused.projections``), copied to contiguous memory once here
            rather than by every block;
        x: (n_atoms, n_sph) Euclidean variables, or None without the Euclidean branch (no Y columns).
        workers: threads that evaluate blocks at once (:func:`in_workers`).
        spline: where the kernel makes the layer's filters itself, its spline and spherical weights;
            ``rows`` then gives the pair distances and hidden rows instead of filters.
    """
    return _BlockedKernelSum.apply(
        rows, blocks, heads, spline, workers, edge_inputs, queries.contiguous(), keys_values.contiguous(), x
    )
