"""Sums over edges without scatter-adds: every atom's edges listed in a padded table, its "slots".

``index_add`` sums rows into atoms by scattering; a compiled CPU program can run such a loop on several
threads only with an atomic addition per element (inductor then emits ``atomic_add_vec``, a
compare-and-swap loop), which is slower on two threads than the same loop on one (measured in
``benchmarks/results/profile``). With a table that lists, for every atom, the edges that point to it, the
same sum is a gather followed by a reduction over the table's first axis: each output row is written by
one thread, and the kernels can be threaded without atomics.

The two autograd functions below use the table for the sum in their forward pass (``sum_rows``) or in their
backward pass (``gather_rows``: the gradient of ``x[index]`` is a sum into the rows of ``x``). They are
differentiable once: enough for forces and stress of a frozen model, which is what the calculator's
compiled program computes; training keeps ``index_add`` (the gradient of the forces needs the second
derivative). :mod:`so3krates.runtime.plan` allows slots only where that holds.

No library does this for us: ``torch_scatter``'s CSR segment sums are separate compiled kernels that a
compiled program cannot fuse with the products around them, and PyTorch's ``segment_reduce`` runs on one
thread.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from so3krates.ops.scatter import scatter_sum


def build_slots(index: Tensor, n_rows: int, min_width: int = 0) -> Tensor:
    """(K, n_rows) int64: column r lists the positions e with ``index[e] == r``, padded with len(index).

    K is the largest count (at least ``min_width``). Built outside the compiled program, once per
    neighbour list: a stable sort of ``index``.
    """
    n = index.shape[0]
    counts = torch.bincount(index, minlength=n_rows)
    width = max(int(counts.max()) if n else 0, min_width)
    order = torch.argsort(index, stable=True)
    sorted_index = index[order]
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(n, device=index.device) - starts[sorted_index]
    slots = torch.full((width, n_rows), n, dtype=torch.long, device=index.device)
    slots[position, sorted_index] = order
    return slots


def slot_sum(src: Tensor, slots: Tensor) -> Tensor:
    """(n, ...) rows summed into (n_rows, ...) as ``slots`` lists them (padding: entries equal to n)."""
    n = src.shape[0]
    valid = slots < n
    # Padding entries read row 0 and are then masked: a where, not a zero row appended to src (that would
    # copy all of src).
    gathered = src.index_select(0, torch.where(valid, slots, 0).flatten())
    gathered = gathered.view(*slots.shape, *src.shape[1:])
    mask = valid.view(*slots.shape, *([1] * (src.dim() - 1)))
    return torch.where(mask, gathered, 0).sum(0)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, slots: Tensor) -> Tensor:
        ctx.save_for_backward(slots)
        return x.index_select(0, index)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        (slots,) = ctx.saved_tensors
        return slot_sum(grad, slots), None, None


class _SumRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, src: Tensor, index: Tensor, slots: Tensor) -> Tensor:
        ctx.save_for_backward(index)
        return slot_sum(src, slots)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        (index,) = ctx.saved_tensors
        return grad.index_select(0, index), None, None


def gather_rows(x: Tensor, index: Tensor, slots: Tensor | None = None) -> Tensor:
    """``x[index]``; with ``slots = build_slots(index, len(x))``, its gradient sums without scatter-adds."""
    if slots is None:
        return x.index_select(0, index)
    return _GatherRows.apply(x, index, slots)


def sum_rows(src: Tensor, index: Tensor, n_rows: int, slots: Tensor | None = None) -> Tensor:
    """``out[r] = Σ_{e: index[e] = r} src[e]``; with ``slots = build_slots(index, n_rows)``: no scatter."""
    if slots is None:
        return scatter_sum(src, index, n_rows)
    return _SumRows.apply(src, index, slots)
