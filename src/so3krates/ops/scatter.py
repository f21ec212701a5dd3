"""Sums of rows into buckets: messages over edges into atoms, atomic energies into structures.

Written with ``index_add`` rather than a scatter library: it is differentiable twice (training needs the
gradient of the forces), runs on every backend, and is all the model needs.
"""

from __future__ import annotations

from torch import Tensor


def scatter_sum(src: Tensor, index: Tensor, dim_size: int) -> Tensor:
    """Sums rows of ``src`` into ``dim_size`` buckets.

    Args:
        src: (n, ...) — values, e.g. one message per edge.
        index: (n,) int64 — destination bucket of each row, e.g. ``idx_i``.
        dim_size: number of buckets, e.g. ``n_atoms``.

    Returns:
        (dim_size, ...) — ``out[k] = Σ_{n: index[n] = k} src[n]``; empty buckets are zero.
    """
    out = src.new_zeros((dim_size, *src.shape[1:]))
    return out.index_add(0, index, src)
