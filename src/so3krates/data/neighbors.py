"""Full neighbour lists (both directions, no self-pairs) with vesin, periodic or not, triclinic cells.

vesin's convention matches ours (SPEC §1): ``vec_ij = R[j] − R[i] + shift_ij @ cell``.

vesin bins space into cells of about the cutoff's size and fails (a division by zero that kills the process,
or a silently short list) when there are too many of them; inputs it cannot handle are either sent to a k-d
tree (molecules whose atoms lie far apart) or refused with a ``DataError`` that says why.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import vesin
from scipy.spatial import cKDTree

from so3krates.errors import DataError

#: Most periodic images (2 n_a + 1)(2 n_b + 1)(2 n_c + 1) one search may span: a 0.1 Å cubic cell at a 5 Å
#: cutoff needs 93³ ≈ 8·10⁵; a million is already ~10⁵ edges per atom.
MAX_IMAGES = 1_000_000
#: Longest extent of the atoms along a non-periodic direction, in cutoffs, that vesin bins reliably (it
#: crashed at 1.5·10⁵ for atoms on a line); beyond it molecules go to a k-d tree.
MAX_EXTENT_IN_CUTOFFS = 1_000.0
#: Largest |coordinate|, Å: beyond it float64 resolves distances to worse than 10⁻⁶ Å (and a k-d tree
#: overflows at ~10¹⁵⁰ Å).
MAX_COORDINATE = 1e10
#: Longest periodic cell vector, in Å, accepted (vesin crashed at 10¹⁵⁶ Å; nothing physical comes close).
MAX_CELL_LENGTH = 1e8


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

    Raises:
        DataError: non-finite positions, cell or cutoff; a coordinate beyond ``MAX_COORDINATE``; a periodic
            cell that is degenerate, longer than ``MAX_CELL_LENGTH`` or so small that the cutoff spans more
            than ``MAX_IMAGES`` images; atoms spread over more than ``MAX_EXTENT_IN_CUTOFFS`` cutoffs along a
            non-periodic direction of a partly periodic structure. The message names the problem, not the
            file: callers add that.
    """
    positions = np.ascontiguousarray(positions, dtype=np.float64)
    pbc = np.broadcast_to(np.asarray(pbc, dtype=bool), (3,))
    cutoff = float(cutoff)
    if not (np.isfinite(cutoff) and cutoff > 0):
        raise DataError(f"neighbour list: the cutoff must be a positive finite number of Å, got {cutoff}")
    if len(positions) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return NeighborList(empty, empty, np.zeros((0, 3), dtype=np.int64))
    if not np.isfinite(positions).all():
        raise DataError("neighbour list: positions contain NaN or inf")
    if np.abs(positions).max() > MAX_COORDINATE:
        raise DataError(
            f"neighbour list: a coordinate of {np.abs(positions).max():.3g} Å is beyond ±{MAX_COORDINATE:g} Å"
        )
    if not pbc.any():
        extent = np.ptp(positions, axis=0).max()
        if extent > MAX_EXTENT_IN_CUTOFFS * cutoff:
            return _kd_tree_pairs(positions, cutoff)
    else:
        _check_periodic_cell(np.asarray(cell, dtype=np.float64), pbc, cutoff)
        if not pbc.all():
            extent = _non_periodic_extent(positions, np.asarray(cell, dtype=np.float64)[pbc])
            if extent > MAX_EXTENT_IN_CUTOFFS * cutoff:
                raise DataError(
                    f"neighbour list: the atoms span {extent:.3g} Å along a non-periodic direction, more "
                    f"than {MAX_EXTENT_IN_CUTOFFS:g} cutoffs of {cutoff} Å; make that direction periodic or "
                    "remove the far atoms"
                )
    box = np.ascontiguousarray(cell, dtype=np.float64) if pbc.any() else np.zeros((3, 3))
    calculator = vesin.NeighborList(cutoff=float(cutoff), full_list=True)
    periodic = bool(pbc.all()) if pbc.all() or not pbc.any() else [bool(p) for p in pbc]
    idx_i, idx_j, shifts = calculator.compute(positions, box, periodic, quantities="ijS")
    return NeighborList(idx_i.astype(np.int64), idx_j.astype(np.int64), shifts.astype(np.int64))


def pair_order(edges: NeighborList) -> NeighborList | None:
    """The same full list ordered as [one direction of every pair; the reverses in the same order].

    Edge k + n/2 is then edge k reversed, (j, i, −shift), which lets the model evaluate its filters once
    per pair (``Graph.pairs``). Which direction comes first: i < j, or for an atom and its own image
    (i = j), the shift whose first non-zero component is positive. Returns None when the list is not
    symmetric (never for a list of this module).
    """
    i, j, s = edges.idx_i, edges.idx_j, edges.shifts
    positive_shift = (s[:, 0] > 0) | ((s[:, 0] == 0) & ((s[:, 1] > 0) | ((s[:, 1] == 0) & (s[:, 2] > 0))))
    first = (i < j) | ((i == j) & positive_shift)
    if 2 * int(first.sum()) != len(i):
        return None
    fi, fj, fs = i[first], j[first], s[first]
    return NeighborList(np.concatenate([fi, fj]), np.concatenate([fj, fi]), np.concatenate([fs, -fs]))


def one_per_pair(edges: NeighborList) -> NeighborList:
    """Every pair of a full list once: the first half of its pair order (i < j, or for an atom and its own
    image the shift whose first non-zero component is positive). The long-range terms of SO3LR use it."""
    ordered = pair_order(edges)
    if ordered is None:
        raise ValueError("one_per_pair needs a symmetric (full) neighbour list")
    half = len(ordered.idx_i) // 2
    return NeighborList(ordered.idx_i[:half], ordered.idx_j[:half], ordered.shifts[:half])


def _check_periodic_cell(cell: np.ndarray, pbc: np.ndarray, cutoff: float) -> None:
    """Refuses periodic cells vesin cannot search: degenerate, absurdly large, or too many images."""
    if cell.shape != (3, 3) or not np.isfinite(cell).all():
        raise DataError("neighbour list: the cell must be a finite (3, 3) array")
    lattice = cell[pbc]
    if np.abs(lattice).max() > MAX_CELL_LENGTH:
        raise DataError(
            f"neighbour list: a periodic cell vector of {np.abs(lattice).max():.3g} Å is longer than "
            f"{MAX_CELL_LENGTH:g} Å; make that direction non-periodic"
        )
    if np.linalg.matrix_rank(lattice) < len(lattice):
        raise DataError(f"neighbour list: periodic along {pbc.tolist()} but the cell is degenerate")
    # Planes of the periodic lattice lie d_k = 1 / |g_k| apart (g_k: reciprocal vectors of the periodic
    # rows); images up to ⌈cutoff / d_k⌉ cells away can be within the cutoff.
    layers = np.ceil(cutoff * np.linalg.norm(np.linalg.pinv(lattice), axis=0))
    images = float(np.prod(2 * layers + 1))
    if images > MAX_IMAGES:
        spacings = np.round(1 / np.linalg.norm(np.linalg.pinv(lattice), axis=0), 3).tolist()
        raise DataError(
            f"neighbour list: the cutoff {cutoff} Å spans {images:.3g} periodic images of a cell with plane "
            f"spacings {spacings} Å, more than {MAX_IMAGES:,}; use a supercell or a smaller cutoff"
        )


def _non_periodic_extent(positions: np.ndarray, lattice: np.ndarray) -> float:
    """float, Å — how far the atoms spread perpendicular to the periodic lattice vectors (rows)."""
    basis = np.linalg.svd(lattice, full_matrices=False)[2]  # orthonormal rows spanning the periodic vectors
    perpendicular = positions - (positions @ basis.T) @ basis
    return float(np.ptp(perpendicular, axis=0).max())


def _kd_tree_pairs(positions: np.ndarray, cutoff: float) -> NeighborList:
    """All ordered pairs of a non-periodic structure closer than ``cutoff``, sorted like a full list."""
    pairs = cKDTree(positions).query_pairs(cutoff, output_type="ndarray").astype(np.int64)
    pairs = pairs[np.linalg.norm(positions[pairs[:, 1]] - positions[pairs[:, 0]], axis=1) < cutoff]
    idx_i = np.concatenate([pairs[:, 0], pairs[:, 1]])
    idx_j = np.concatenate([pairs[:, 1], pairs[:, 0]])
    order = np.lexsort((idx_j, idx_i))
    return NeighborList(idx_i[order], idx_j[order], np.zeros((len(idx_i), 3), dtype=np.int64))
