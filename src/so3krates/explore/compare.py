"""Are two structures the same minimum? RMSD after optimal rotation, translation and atom permutation.

Two local minima are the same when one is a rigid motion of the other with atoms of the same element
relabelled: the energy is invariant under exactly these operations. ``align`` finds the best such
superposition by alternating two exact steps, starting from several orientations:

1. for a fixed rotation, the best relabelling of each element's atoms is an assignment problem
   (Hungarian algorithm on squared distances, ``scipy.optimize.linear_sum_assignment``);
2. for fixed labels, the best rotation is Kabsch's SVD solution.

Each step can only lower the RMSD, so the loop converges, but to a local optimum: the starting
orientations (the given order, principal axes of both structures with all proper sign choices, and, when
principal moments are nearly degenerate as in highly symmetric clusters, a fixed set of random rotations)
make finding the global one very likely. Mirror images count as different structures unless
``allow_reflection`` is set, because enantiomers are different minima of a chiral landscape.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ase import Atoms
from scipy.optimize import linear_sum_assignment

#: RMSD (Å) below which a superposition is taken as exact and no further starts are tried.
_EXACT_A = 1e-6
#: Relative gap between principal moments below which the principal axes are ill-defined.
_DEGENERATE_GAP = 0.05
_N_RANDOM_STARTS = 24
_MAX_ITERATIONS = 20


@dataclass(frozen=True)
class Alignment:
    """The best superposition of structure ``b`` onto structure ``a``.

    Attributes:
        rmsd: Å — root-mean-square distance between ``a`` and the superposed ``b``, over all atoms.
        rotation: (3, 3) float — applied to ``b``'s centred positions as ``positions @ rotation.T``;
            a reflection (det = −1) only with ``allow_reflection``.
        permutation: (n_atoms,) int — atom ``permutation[i]`` of ``b`` is matched to atom ``i`` of ``a``;
            it maps atoms of one element to atoms of the same element only.
        positions: (n_atoms, 3) float, Å — ``b`` superposed on ``a`` and reordered like ``a``.
    """

    rmsd: float
    rotation: np.ndarray
    permutation: np.ndarray
    positions: np.ndarray


def kabsch(
    target: np.ndarray, mobile: np.ndarray, allow_reflection: bool = False
) -> tuple[np.ndarray, float]:
    """The rotation minimising Σᵢ |R mobileᵢ − targetᵢ|² for centred point sets, and the RMSD it gives.

    Args:
        target: (n, 3) float, Å — centred positions.
        mobile: (n, 3) float, Å — centred positions, in the same order as ``target``.
        allow_reflection: also allow improper rotations (det = −1).

    Returns:
        rotation (3, 3) to apply as ``mobile @ rotation.T``, and the RMSD in Å.
    """
    u, _, vt = np.linalg.svd(mobile.T @ target)
    d = np.ones(3)
    if not allow_reflection and np.linalg.det(vt.T @ u.T) < 0:
        d[2] = -1.0
    rotation = vt.T @ np.diag(d) @ u.T
    return rotation, _rmsd(target, mobile @ rotation.T)


def _rmsd(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.sum((x - y) ** 2, axis=1))))


def _principal_axes(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors (columns) of the centred second-moment matrix."""
    return np.linalg.eigh(positions.T @ positions)


def _is_degenerate(moments: np.ndarray) -> bool:
    scale = max(float(moments[-1]), 1e-12)
    return bool(np.min(np.diff(moments)) / scale < _DEGENERATE_GAP)


def _starting_rotations(a: np.ndarray, b: np.ndarray, allow_reflection: bool) -> list[np.ndarray]:
    """Rotations of ``b`` to start the assignment/Kabsch iteration from."""
    starts = [kabsch(a, b, allow_reflection)[0]]
    moments_a, axes_a = _principal_axes(a)
    moments_b, axes_b = _principal_axes(b)
    for signs in np.array(np.meshgrid([1, -1], [1, -1], [1, -1])).T.reshape(-1, 3):
        rotation = axes_a @ np.diag(signs) @ axes_b.T
        if allow_reflection or np.linalg.det(rotation) > 0:
            starts.append(rotation)
    if _is_degenerate(moments_a) or _is_degenerate(moments_b):
        rng = np.random.default_rng(0)  # fixed: the same pair always gives the same answer
        for _ in range(_N_RANDOM_STARTS):
            q, r = np.linalg.qr(rng.normal(size=(3, 3)))
            q = q * np.sign(np.diag(r))
            if np.linalg.det(q) < 0:
                q[:, 0] = -q[:, 0]
            starts.append(q)
    return starts


def _assign(a: np.ndarray, b: np.ndarray, groups: list[np.ndarray]) -> np.ndarray:
    """The permutation of ``b`` closest to ``a`` with atoms exchanged within each group only."""
    permutation = np.empty(len(a), dtype=np.int64)
    for group in groups:
        if len(group) == 1:
            permutation[group] = group
            continue
        cost = np.sum((a[group, None, :] - b[None, group, :]) ** 2, axis=-1)
        rows, cols = linear_sum_assignment(cost)
        permutation[group[rows]] = group[cols]
    return permutation


def align(a: Atoms, b: Atoms, allow_permutation: bool = True, allow_reflection: bool = False) -> Alignment:
    """The superposition of ``b`` onto ``a`` with the lowest RMSD (see the module docstring).

    Args:
        a: reference structure (not periodic).
        b: structure with the same elements (in any order) as ``a``.
        allow_permutation: exchange atoms of the same element; off, atoms are matched by index.
        allow_reflection: count mirror images as the same structure.

    Raises:
        ValueError: the structures have different compositions, or (without permutations) a different
            order of elements.
    """
    if sorted(a.numbers.tolist()) != sorted(b.numbers.tolist()):
        raise ValueError(f"cannot compare {a.get_chemical_formula()} with {b.get_chemical_formula()}")
    if not allow_permutation and not np.array_equal(a.numbers, b.numbers):
        raise ValueError("without permutations both structures need their atoms in the same order")
    x = a.positions - a.positions.mean(axis=0)
    y = b.positions - b.positions.mean(axis=0)
    # Put b's atoms in a's element order so that the groups index both structures alike.
    order_b = np.argsort(b.numbers, kind="stable")[np.argsort(np.argsort(a.numbers, kind="stable"))]
    y = y[order_b]
    if not allow_permutation:
        rotation, rmsd = kabsch(x, y, allow_reflection)
        return Alignment(rmsd, rotation, order_b, y @ rotation.T)
    groups = [np.flatnonzero(a.numbers == z) for z in np.unique(a.numbers)]
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for rotation in _starting_rotations(x, y, allow_reflection):
        permutation = None
        for _ in range(_MAX_ITERATIONS):
            new_permutation = _assign(x, y @ rotation.T, groups)
            if permutation is not None and np.array_equal(new_permutation, permutation):
                break
            permutation = new_permutation
            rotation, rmsd = kabsch(x, y[permutation], allow_reflection)
        if best is None or rmsd < best[0]:
            best = (rmsd, rotation, permutation)
        if best[0] < _EXACT_A:
            break
    rmsd, rotation, permutation = best
    return Alignment(rmsd, rotation, order_b[permutation], y[permutation] @ rotation.T)


def rmsd(a: Atoms, b: Atoms, allow_permutation: bool = True, allow_reflection: bool = False) -> float:
    """Å — RMSD between ``a`` and ``b`` after the best rotation, translation and (by default)
    exchange of atoms of the same element; see ``align``."""
    return align(a, b, allow_permutation, allow_reflection).rmsd


def is_duplicate(
    a: Atoms,
    b: Atoms,
    energy_tol_eV: float = 0.01,
    rmsd_tol_A: float = 0.1,
    allow_reflection: bool = False,
) -> bool:
    """Whether ``a`` and ``b`` are the same minimum: same composition, potential energies within
    ``energy_tol_eV`` (eV) AND permutation-aware aligned RMSD below ``rmsd_tol_A`` (Å).

    The energies are those of the attached calculators (e.g. a ``SinglePointCalculator`` from a database);
    the cheap energy test comes first.
    """
    if sorted(a.numbers.tolist()) != sorted(b.numbers.tolist()):
        return False
    if abs(a.get_potential_energy() - b.get_potential_energy()) > energy_tol_eV:
        return False
    return rmsd(a, b, allow_reflection=allow_reflection) < rmsd_tol_A
