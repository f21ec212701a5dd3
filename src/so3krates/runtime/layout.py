"""How the edges of a graph are laid out for the execution layer: pair order and slots, as data.

Two layouts make the same sums cheaper, and code that does not need them never sees them:

- **pairs**: the full neighbour list ordered as [one direction of every pair; the reverses in the same
  order] (:func:`so3krates.data.neighbors.pair_order`), so edge k + n/2 is edge k reversed. The filters
  w_ij = MLP_r(K(d_ij)) + MLP_s(s_ij) are symmetric in the pair (d_ij = d_ji, s_ij = c(x_j − x_i) = s_ji),
  so they are evaluated on the first half (``first``) and repeated (``both``).
- **slots**: for every atom the edges that point to it, in a padded table (:mod:`so3krates.ops.slots`), so
  that sums over edges and the gradients of gathers need no scatter-add.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from so3krates.ops.slots import build_slots, gather_rows, sum_rows


class EdgeLayout(NamedTuple):
    """The edges of one call.

    idx_i, idx_j: (n_edges,) int64 — centre and neighbour atom of each edge.
    pairs: the edges are in pair order (see the module docstring).
    slots_i, slots_j: (K, n_atoms) int64 — ``build_slots`` of ``idx_i`` and of ``idx_j``, or None.
    """

    idx_i: Tensor
    idx_j: Tensor
    pairs: bool = False
    slots_i: Tensor | None = None
    slots_j: Tensor | None = None

    @classmethod
    def build(cls, idx_i: Tensor, idx_j: Tensor, n_atoms: int, pairs: bool, slots: bool) -> EdgeLayout:
        """The layout of a neighbour list; ``slots`` builds the two tables (a sort of the edges)."""
        if not slots:
            return cls(idx_i, idx_j, pairs)
        return cls(idx_i, idx_j, pairs, build_slots(idx_i, n_atoms), build_slots(idx_j, n_atoms))

    def first(self, per_edge: Tensor) -> Tensor:
        """The rows whose filters are evaluated: the first of each pair, or all rows without pairs.

        A view, not a slice: a slice would give an exported program a guard n_pairs ≥ 2.
        """
        if not self.pairs:
            return per_edge
        return per_edge.view(2, per_edge.shape[0] // 2, *per_edge.shape[1:])[0]

    def both(self, per_pair: Tensor) -> Tensor:
        """Rows of the first half repeated for the second (the reverses); unchanged without pairs."""
        return torch.cat([per_pair, per_pair]) if self.pairs else per_pair

    def gather_i(self, x: Tensor) -> Tensor:
        """``x[idx_i]``; with slots its gradient is a gather and a sum, not a scatter-add."""
        return gather_rows(x, self.idx_i, self.slots_i)

    def gather_j(self, x: Tensor) -> Tensor:
        """``x[idx_j]``; with slots its gradient is a gather and a sum, not a scatter-add."""
        return gather_rows(x, self.idx_j, self.slots_j)

    def sum_i(self, per_edge: Tensor, n_atoms: int) -> Tensor:
        """Σ over the edges of each centre atom i: (n_edges, ...) → (n_atoms, ...)."""
        return sum_rows(per_edge, self.idx_i, n_atoms, self.slots_i)

    def sum_j(self, per_edge: Tensor, n_atoms: int) -> Tensor:
        """Σ over the edges of each neighbour atom j: (n_edges, ...) → (n_atoms, ...)."""
        return sum_rows(per_edge, self.idx_j, n_atoms, self.slots_j)

    def difference(self, x: Tensor) -> Tensor:
        """x_j − x_i for the rows of ``first``: (n_atoms, ...) → (n_first, ...)."""
        if self.slots_i is not None:
            # Gathered on all edges, so that the gradient goes through the tables of the full list.
            return self.first(self.gather_j(x) - self.gather_i(x))
        return x.index_select(0, self.first(self.idx_j)) - x.index_select(0, self.first(self.idx_i))
