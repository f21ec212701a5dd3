"""Which frames ``so3krates learn`` labels: diverse ones, by farthest-point sampling of inverse distances."""

from __future__ import annotations

import numpy as np
from ase import Atoms


def inverse_distances(atoms: Atoms) -> np.ndarray:
    """The descriptor of farthest-point sampling: all inverse interatomic distances (1/Å) in atom order.

    Frames of one trajectory keep their atom order, so this compares like with like; it is invariant to
    rotations and translations and sensitive to every bond and angle.
    """
    positions = atoms.positions
    i, j = np.triu_indices(len(atoms), k=1)
    return 1.0 / np.linalg.norm(positions[i] - positions[j], axis=1)


def farthest_point_sampling(descriptors: np.ndarray, n: int, first: int = 0) -> list[int]:
    """``n`` indices of ``descriptors`` (rows), each the farthest from those chosen before it."""
    if len(descriptors) == 0 or n <= 0:
        return []
    chosen = [int(first)]
    distance = np.linalg.norm(descriptors - descriptors[first], axis=1)
    while len(chosen) < min(n, len(descriptors)):
        k = int(np.argmax(distance))
        if distance[k] <= 0:
            break
        chosen.append(k)
        distance = np.minimum(distance, np.linalg.norm(descriptors - descriptors[k], axis=1))
    return chosen


def select_diverse(frames: list[Atoms], n: int, scores: np.ndarray | None = None) -> list[int]:
    """``n`` diverse frames: per group of equal composition and atom order, farthest-point sampling that
    starts from the frame with the highest score (the uncertainty); the quota is shared in proportion to
    the groups' sizes."""
    if n >= len(frames):
        return list(range(len(frames)))
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, atoms in enumerate(frames):
        groups.setdefault(tuple(atoms.numbers.tolist()), []).append(k)
    scores = np.zeros(len(frames)) if scores is None else np.asarray(scores)
    chosen: list[int] = []
    remaining = n
    for g, (_, members) in enumerate(sorted(groups.items(), key=lambda item: -len(item[1]))):
        quota = remaining if g == len(groups) - 1 else max(1, round(n * len(members) / len(frames)))
        quota = min(quota, remaining, len(members))
        descriptors = np.stack([inverse_distances(frames[k]) for k in members])
        first = int(np.argmax(scores[members]))
        chosen += [members[k] for k in farthest_point_sampling(descriptors, quota, first)]
        remaining = n - len(chosen)
        if remaining <= 0:
            break
    return sorted(chosen)
