"""The message chain of a fused layer in one hand-written CPU kernel, for edges in pair order.

For every edge e = (i, j) of a layer, :func:`so3krates.runtime.fused.edge_messages` forms the per-head sums
s_h = Σ_f q_i[f] w_ij[f] k_j[f] (Eqs. 21–22), the coefficients c_h = s_h φ(d_ij) / norm and the message
[α v_j | β Y_ij], and :meth:`EdgeLayout.sum_i` adds the messages into their centre atoms. In a compiled
program every step writes and reads an (edges × 264) tensor (the paper model: both branches' features), and
the backward pass as many again; at 999 water atoms (54,172 edges) that memory traffic, not arithmetic, is
most of a call (``benchmarks/results/scaling/tries_dec5``). Here the chain is one pass over the pairs,
forward and backward, with every per-edge vector in registers or the L1 cache: each pair p = (a, b) is taken
with both its edges, (a, b) into atom a and its reverse (b, a) into atom b, which share the pair's filter
row (pair order, :mod:`so3krates.runtime.layout`). So every filter row is read once and in order, and each
pair's filter gradient is written once. The pairs are split evenly among torch's threads (or, where torch
runs on one thread of several, between the calling thread and a helper thread: :func:`kernel_threads`);
each thread adds into per-atom rows of its own (the first into the result, the others into scratch rows,
summed afterwards in thread order), so no row is written by two threads, nothing is atomic, and a call gives
the same numbers on every call for one thread count. A first version went atom by atom over each atom's edges
(forward: each atom summing its own edges; backward: each edge with its reverse): it read each filter row
twice, in scattered order, and took 1.7–1.8× the time (999 water atoms, one thread: 11.2 / 35.7 ms forward /
backward per layer against 6.8 / 19.6 ms).

With the radial spline (:class:`RadialSpline`, the plan's ``radial="spline"``), the kernel makes each pair's
filter row itself (Eq. 20; :mod:`so3krates.runtime.radial`): the radial part from the spline's coefficients
at the pair's distance, plus the spherical part, the spherical MLP's last (linear) layer applied to the
pair's hidden row (:class:`SphericalFilters`); its backward pass returns ∂E/∂d and ∂E/∂h per pair. The
filters then never exist as (pairs × B·F) tensors, nor their gradients: a compiled program otherwise
writes the spline's rows, the products and their sum, reads them back in the kernel, forward and backward,
and writes and reads their gradients (999 water atoms: the spline's backward fused with the force sums
alone was the largest generated kernel, 22.7 ms of a 114 ms call; ``benchmarks/results/profile/pairs_dec5``).
The products run over groups of 8 pairs, so that each weight vector loaded serves 8 pairs. Graphs of up to
``KEEP_ROWS_MAX_PAIRS`` pairs keep the filter rows made in the forward pass for the backward pass (they stay
in the cache); larger ones make them again, which costs less than the memory traffic of keeping them.

Edge blocks (:func:`so3krates.runtime.blocks.blocked_kernel_sum`, for graphs whose filters do not fit in
memory at once) call :func:`block_sums` and :func:`block_sums_backward`: one block of pairs on the calling
thread, adding into per-atom buffers of that thread.

Exact to round-off against the fused layers' equations (``tests/test_plans.py`` runs it in the matrix of
plans). Differentiable once (forces, stress): the plan allows it for frozen weights only, as slots.

Why by hand: no library has this operation; the compilers we use (inductor, AOTInductor) keep each step
as its own loop over the edges with its own (edges × features) tensor. The kernel is C++ compiled on first
use with PyTorch's extension builder (``torch.utils.cpp_extension``, a C++ compiler and ninja; ~10 s
once per machine, cached) for this CPU's instruction set; where that fails, the plan is not used and the
reason is in :func:`unavailable_reason`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

SOURCE = Path(__file__).resolve().parent / "csrc" / "pair_messages.cpp"
#: Pairs up to which a whole-graph forward pass keeps the filter rows it makes for the backward pass (the
#: kernel's kKeepRowsMaxPairs; beyond, the backward pass makes them again).
KEEP_ROWS_MAX_PAIRS = 2048
_FAILURE: list[str] = []


def _machine_tag() -> str:
    """This CPU's instruction-set flags and the source, hashed: the kernel is built with ``-march=native``,
    so a build cache shared by different machines keeps one build per kind of CPU."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    for header in sorted(SOURCE.parent.glob("*.h")):  # the headers it includes
        digest.update(header.read_bytes())
    digest.update(platform.machine().encode())
    try:
        flags = next(
            line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
        )
        digest.update(flags.encode())
    except (OSError, StopIteration):  # not Linux: the machine name only
        pass
    return digest.hexdigest()[:12]


@functools.cache
def _extension() -> bool:
    """Builds (on first use) and loads the kernel, registers its shapes and gradient; False where it cannot be
    built (reason in _FAILURE). The operators ``torch.ops.so3krates.pair_messages`` and ``..._backward`` are
    registered with the dispatcher by the library, so compiled programs call them without Python."""
    if os.environ.get("SO3KRATES_NO_KERNELS"):
        _FAILURE.append("turned off by SO3KRATES_NO_KERNELS")
        return False
    from torch.utils.cpp_extension import load

    if shutil.which("ninja") is None:  # the builder runs `ninja`; the pip package's is not always on PATH
        with contextlib.suppress(ImportError):
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load(
                name=f"so3krates_pair_messages_{_machine_tag()}",
                sources=[str(SOURCE)],
                # OpenMP: at::parallel_for is torch's thread pool only in code built with it (the header
                # runs the loop in an OpenMP region), and the simd pragmas vectorize the feature loops.
                extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                is_python_module=False,
                verbose=False,
            )
    except Exception as error:  # no compiler, no ninja, a build error: the other plans still work
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        _FAILURE.append(f"the pair-message kernel could not be built ({first})")
        return False
    _register()
    return True


def available() -> bool:
    """Whether the kernel is built or can be built here (builds it on the first call: ~10 s)."""
    return _extension()


def unavailable_reason() -> str | None:
    """Why the kernel cannot be used here, or None where it can."""
    return None if available() else _FAILURE[-1]


def require() -> None:
    """Loads the kernel (a program traced with it calls it by name), or raises with the reason."""
    if not _extension():
        raise RuntimeError(f"so3krates: {_FAILURE[-1]}")


@contextlib.contextmanager
def kernel_threads(threads: int) -> Iterator[None]:
    """Lets the kernel's whole-graph calls of this thread, and the products of ``so3krates::products``, run
    on up to ``threads`` threads (at most 2) while torch runs on one.

    Small molecules run on one torch thread (``Planner.single_thread_edges``): there, a second OpenMP thread
    costs more in wake-ups than it gains (each parallel region wakes a sleeping thread under
    ``OMP_WAIT_POLICY=PASSIVE``). The kernel, the largest part of such a call, can still use a second core:
    it splits its pairs with a helper thread of its own, which after each task waits actively for 300 µs for
    the next (an evaluation's kernel calls and large products follow each other within that) and then
    sleeps, so it holds a core only while evaluations run. Where the helper is late for a task, or has been
    slower than the caller alone over its last 32 tasks (its core shared with another busy process), the
    caller runs both parts itself for a while (``so3krates::helper_skipped`` counts those tasks). Numbers:
    the same on every call for one setting; to round-off against one thread (the two parts' sums are added
    in a fixed order).
    """
    if threads <= 1:
        yield
        return
    require()
    before = torch.ops.so3krates.set_kernel_threads(threads)
    try:
        yield
    finally:
        torch.ops.so3krates.set_kernel_threads(before)


class RadialSpline(NamedTuple):
    """The radial parts of one layer's filters as the kernel reads them: a spline in the pair distances.

    distances: (n_pairs,) d of each pair; table: (n_intervals, 4, B·F), the coefficient rows c0..c3 of each
    interval side by side (:func:`spline_table`); spacing: the width of an interval (the spline's end is
    ``spacing · n_intervals``, as :func:`so3krates.ops.spline.build_spline` makes it).
    """

    distances: Tensor
    table: Tensor
    spacing: float


class SphericalFilters(NamedTuple):
    """The spherical parts of one layer's filters as the kernel computes them: the last (linear, bias-free)
    layer of the spherical filter MLP, applied pair by pair.

    hidden: (n_pairs, B·K), the MLP's hidden rows (both branches side by side); weights: (B, K, F), each
    branch's last layer (``LayerWeights.spherical_out`` stacked).
    """

    hidden: Tensor
    weights: Tensor


def spline_table(coefficients: tuple[Tensor, Tensor, Tensor, Tensor]) -> Tensor:
    """A spline's four (n_intervals, columns) coefficient tensors as one (n_intervals, 4, columns) table."""
    return torch.stack(coefficients, dim=1).contiguous()


def _register() -> None:
    """Shapes for tracing (fake tensors) and the gradient of the forward operator. Inputs 0–13 are tensors
    (queries, keys_values, filters, cutoff, sph, distances, spline, hidden, spherical_out, the edge indices
    and head ranges), 14 the spacing, 15 F; an absent filter part is an empty 1-d tensor, as is its
    gradient."""

    @torch.library.register_fake("so3krates::pair_messages")
    def _(queries, keys_values, filters, cutoff, sph, distances, spline, hidden, spherical_out, idx_i, *rest):
        n_features = keys_values.shape[1] - queries.shape[1]
        sums = queries.new_empty((queries.shape[0], n_features + sph.shape[1]))
        kept = torch.sym_min(idx_i.shape[0] // 2, KEEP_ROWS_MAX_PAIRS)  # rows kept for the backward pass
        n_heads = rest[3].shape[0]  # scale: per pair its filter row and its two edges' head sums
        return sums, queries.new_empty((kept, queries.shape[1] + 2 * n_heads))

    @torch.library.register_fake("so3krates::pair_messages_backward")
    def _(grad, rows, queries, keys_values, filters, cutoff, sph, distances, spline, hidden, *rest):
        inputs = (queries, keys_values, filters, cutoff, sph, distances, hidden)
        return tuple(torch.empty_like(t) for t in inputs)

    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(output[1], *inputs[:14])
        ctx.spacing, ctx.n_features = inputs[14], inputs[15]

    def backward(ctx, grad: Tensor, grad_rows: Tensor | None):
        rows, *saved = ctx.saved_tensors
        dq, dkv, dw, dphi, dy, dd, dh = torch.ops.so3krates.pair_messages_backward(
            grad, rows, *saved, ctx.spacing, ctx.n_features
        )
        dw = dw if saved[2].dim() == 2 else None
        dd = dd if saved[6].dim() == 3 else None
        dh = dh if saved[8].dim() == 3 else None
        return (dq, dkv, dw, dphi, dy, dd, None, dh, *(None,) * 8)

    torch.library.register_autograd("so3krates::pair_messages", backward, setup_context=setup_context)

    @torch.library.register_fake("so3krates::products")
    def _(a, b):
        return a.new_empty((a.shape[0], b.shape[1]))

    _register_flops()


def _register_flops() -> None:
    """The matrix-product FLOPs that the operators execute, for ``torch.utils.flop_counter`` (the speed
    benchmark's roofline counts matrix-product FLOPs): the spherical MLP's last layer, 2·P·(B·K)·F per pass
    over the pairs, applied in the forward pass, again in the backward pass where the rows were not kept,
    and transposed for ∂E/∂h. The rest of the kernel is elementwise work, not counted (as for the compiled
    programs' own kernels)."""
    from torch.utils.flop_counter import register_flop_formula

    def products(shapes, first: int) -> int:
        """2·P·(B·K)·F from the shapes of ``hidden`` and ``spherical_out``, which come after ``first``
        leading arguments (sums or gradients) and the 7 filter inputs' tensors before them."""
        hidden, weights = shapes[first + 7], shapes[first + 8]
        return 2 * hidden[0] * hidden[1] * weights[2] if len(weights) == 3 else 0

    @register_flop_formula(torch.ops.so3krates.pair_messages)
    def _(*shapes, **kwargs):
        return products(shapes, 0)

    @register_flop_formula(torch.ops.so3krates.pair_messages_backward)
    def _(*shapes, **kwargs):  # grad, rows, inputs: ∂E/∂h, and the products again where rows were not kept
        again = shapes[2 + 7][0] > KEEP_ROWS_MAX_PAIRS
        return products(shapes, 2) * (2 if again else 1)

    @register_flop_formula(torch.ops.so3krates.pair_messages_block)
    def _(*shapes, **kwargs):
        return products(shapes, 1)

    @register_flop_formula(torch.ops.so3krates.pair_messages_block_backward)
    def _(*shapes, **kwargs):  # blocks never keep rows
        return 2 * products(shapes, 3)


def pair_messages(
    queries: Tensor,
    keys_values: Tensor,
    filters: Tensor | None,
    cutoff: Tensor,
    sph: Tensor,
    idx_i: Tensor,
    idx_j: Tensor,
    heads: tuple[Tensor, Tensor, Tensor],
    radial: RadialSpline | None = None,
    spherical: SphericalFilters | None = None,
) -> Tensor:
    """Σ over the edges of each centre atom of [α_ij v_j | β_ij Y_ij]: (n_atoms, F + n_sph).

    Args:
        queries: (n_atoms, B·F) of all branches; keys_values: (n_atoms, B·F + F), keys then values (so F,
            the values' width, is the difference of the two widths).
        filters: (n_pairs, B·F), one row per pair (the first half of the edges); with ``radial``, the part
            of the filters that the spline does not hold (the spherical part), or None for none.
        cutoff: (n_edges,) φ(d_ij); sph: (n_edges, n_sph) Y(r̂_ij) (n_sph = 0 without Euclidean branch).
        idx_i, idx_j: (n_edges,) in pair order.
        heads: ``LayerWeights.heads``: (R, 3) int32 ranges [start, stop, head] of the products' features,
            (R', 3) of the message's columns, and (H,) the heads' 1/norm.
        radial: the radial parts of the filters as a spline (added to ``filters``), or None.
        spherical: the spherical parts from the MLP's hidden rows (added too), or None.
    """
    require()
    sums, _ = torch.ops.so3krates.pair_messages(
        *_arguments(queries, keys_values, filters, cutoff, sph, idx_i, idx_j, heads, radial, spherical)
    )
    return sums


def block_sums(
    sums: Tensor,
    queries: Tensor,
    keys_values: Tensor,
    filters: Tensor | None,
    cutoff: Tensor,
    sph: Tensor,
    idx_i: Tensor,
    idx_j: Tensor,
    heads: tuple[Tensor, Tensor, Tensor],
    radial: RadialSpline | None = None,
    spherical: SphericalFilters | None = None,
) -> None:
    """Adds the messages of one block of edges (in pair order) into ``sums`` (n_atoms, F + n_sph), on the
    calling thread: the forward pass of :func:`so3krates.runtime.blocks.blocked_kernel_sum`. The arguments
    are those of :func:`pair_messages` for the block's edges; no autograd (the caller does the backward)."""
    require()
    torch.ops.so3krates.pair_messages_block(
        sums, *_arguments(queries, keys_values, filters, cutoff, sph, idx_i, idx_j, heads, radial, spherical)
    )


def block_sums_backward(
    grad_queries: Tensor,
    grad_keys_values: Tensor,
    grad: Tensor,
    queries: Tensor,
    keys_values: Tensor,
    filters: Tensor | None,
    cutoff: Tensor,
    sph: Tensor,
    idx_i: Tensor,
    idx_j: Tensor,
    heads: tuple[Tensor, Tensor, Tensor],
    radial: RadialSpline | None = None,
    spherical: SphericalFilters | None = None,
) -> tuple[Tensor | None, Tensor, Tensor, Tensor | None, Tensor | None]:
    """The backward pass of :func:`block_sums` for ∂E/∂sums = ``grad``: adds into ``grad_queries`` and
    ``grad_keys_values`` and returns the gradients of the block's filters, cutoff, sph, distances (with
    ``radial``) and hidden rows (with ``spherical``); None for the parts that were not given."""
    require()
    dw, dphi, dy, dd, dh = torch.ops.so3krates.pair_messages_block_backward(
        grad_queries,
        grad_keys_values,
        grad,
        *_arguments(queries, keys_values, filters, cutoff, sph, idx_i, idx_j, heads, radial, spherical),
    )
    return (
        dw if filters is not None else None,
        dphi,
        dy,
        dd if radial is not None else None,
        dh if spherical is not None else None,
    )


def _arguments(
    queries: Tensor,
    keys_values: Tensor,
    filters: Tensor | None,
    cutoff: Tensor,
    sph: Tensor,
    idx_i: Tensor,
    idx_j: Tensor,
    heads: tuple[Tensor, Tensor, Tensor],
    radial: RadialSpline | None,
    spherical: SphericalFilters | None,
) -> tuple[Tensor | int | float, ...]:
    """The operators' arguments from ``queries`` to ``n_features`` (F: the values' width), the float inputs
    contiguous as the kernel reads them (queries and keys are column slices of one product); an absent
    filter part is an empty 1-d tensor."""
    if filters is None and radial is None:
        raise ValueError("pair_messages: filters or a radial spline (or both) are needed")
    n_features = keys_values.shape[1] - queries.shape[1]
    none = cutoff.new_empty(0)
    distances, table, spacing = radial if radial is not None else (none, none, 1.0)
    hidden, weights = spherical if spherical is not None else (none, none)
    parts = (none if filters is None else filters, cutoff, sph, distances, table, hidden, weights)
    floats = (t.contiguous() for t in (queries, keys_values, *parts))
    return (*floats, idx_i, idx_j, *heads, spacing, n_features)
