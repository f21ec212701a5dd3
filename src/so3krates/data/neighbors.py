"""Full neighbour lists (both directions, no self-pairs) with vesin, periodic or not, triclinic cells.

vesin's convention matches ours (SPEC §1): ``vec_ij = R[j] − R[i] + shift_ij @ cell``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import vesin


class NeighborList(NamedTuple):
    """Edges of one structure.

    idx_i: (n_edges,) int64 — centre atom that receives the message.
    idx_j: (n_edges,) int64 — neighbour atom that sends it.
    shifts: (n_edges, 3) int64 — image offsets along the lattice vectors.
    """

    idx_i: np.ndarray
    idx_j: np.ndarray
    shifts: np.ndarray


def neighbor_list(
    positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray | bool, cutoff: float
) -> NeighborList:
    """All ordered pairs (i, j), i ≠ j or a periodic image of i, closer than ``cutoff``.

    Args:
        positions: (n_atoms, 3) float, Å — Cartesian coordinates.
        cell: (3, 3) float, Å — lattice vectors as rows; ignored along non-periodic directions.
        pbc: bool or (3,) bool — periodicity along each lattice vector.
        cutoff: float, Å — pairs with distance < cutoff are returned.

    Cutoffs larger than half the cell are handled: an atom then sees several images of the same
    neighbour (and of itself), each as its own edge.
    """
    positions = np.ascontiguousarray(positions, dtype=np.float64)
    pbc = np.broadcast_to(np.asarray(pbc, dtype=bool), (3,))
    if len(positions) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return NeighborList(empty, empty, np.zeros((0, 3), dtype=np.int64))
    box = np.ascontiguousarray(cell, dtype=np.float64) if pbc.any() else np.zeros((3, 3))
    calculator = vesin.NeighborList(cutoff=float(cutoff), full_list=True)
    periodic = bool(pbc.all()) if pbc.all() or not pbc.any() else [bool(p) for p in pbc]
    idx_i, idx_j, shifts = calculator.compute(positions, box, periodic, quantities="ijS")
    return NeighborList(idx_i.astype(np.int64), idx_j.astype(np.int64), shifts.astype(np.int64))
