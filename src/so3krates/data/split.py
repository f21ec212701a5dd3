"""Train/validation/test splits: disjoint index sets from one seeded permutation, saved next to a run so
that evaluation later uses exactly the structures training never saw."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from so3krates.errors import ConfigError, DataError
from so3krates.files import atomic_path

SUBSETS = ("train", "valid", "test")


def split_indices(
    n_structures: int,
    *,
    n_train: int | None = None,
    n_valid: int | None = None,
    n_test: int | None = None,
    fractions: Mapping[str, float] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Disjoint train/valid/test indices into ``n_structures`` structures.

    Sizes come either from counts or from ``fractions`` (e.g. ``{"train": 0.8, "valid": 0.1}``; a fraction
    f gives ⌊f · n_structures⌋ structures). An absent valid size means 0; an absent test size means the
    remainder. The subsets are consecutive slices of ``np.random.default_rng(seed).permutation``, so
    growing ``n_train`` with the same seed keeps the earlier training structures.

    Returns:
        ``{"train", "valid", "test"}`` → sorted (n_subset,) int64 indices.

    Raises:
        ConfigError: both counts and fractions, a negative size or fraction, or more than n_structures in all.
    """
    counts = {"train": n_train, "valid": n_valid, "test": n_test}
    if fractions is not None:
        if any(v is not None for v in counts.values()):
            raise ConfigError("split: give either n_train/n_valid/n_test or fractions, not both")
        unknown = set(fractions) - set(SUBSETS)
        if unknown:
            raise ConfigError(f"split.fractions: unknown subsets {sorted(unknown)}, expected {list(SUBSETS)}")
        for subset, fraction in fractions.items():
            if not 0.0 <= fraction <= 1.0:
                raise ConfigError(f"split.fractions.{subset}: {fraction} is not between 0 and 1")
        if sum(fractions.values()) > 1.0 + 1e-9:
            raise ConfigError(f"split.fractions: {dict(fractions)} add up to more than 1")
        counts = {
            s: math.floor(fractions[s] * n_structures + 1e-9) if s in fractions else None for s in SUBSETS
        }
    elif n_train is None:
        raise ConfigError("split: give n_train (and optionally n_valid, n_test) or fractions")

    for subset, count in counts.items():
        if count is not None and count < 0:
            raise ConfigError(f"split.n_{subset}: {count} is negative")
    n_train, n_valid = counts["train"] or 0, counts["valid"] or 0
    n_test = counts["test"] if counts["test"] is not None else n_structures - n_train - n_valid
    if n_train + n_valid + max(n_test, 0) > n_structures or n_test < 0:
        raise ConfigError(
            f"split: n_train + n_valid + n_test = {n_train} + {n_valid} + {counts['test'] or 0} "
            f"exceeds the {n_structures} structures in the data"
        )
    permutation = np.random.default_rng(seed).permutation(n_structures)
    bounds = np.cumsum([0, n_train, n_valid, n_test])
    return {
        s: np.sort(permutation[bounds[k] : bounds[k + 1]]).astype(np.int64) for k, s in enumerate(SUBSETS)
    }


def save_split(path: str | os.PathLike, split: Mapping[str, np.ndarray]) -> None:
    """Writes the split as an npz with the arrays ``train``, ``valid``, ``test``, atomically."""
    unknown = set(split) - set(SUBSETS)
    if unknown:
        raise ValueError(f"save_split: unknown subsets {sorted(unknown)}, expected {list(SUBSETS)}")
    arrays = {s: np.asarray(split.get(s, []), dtype=np.int64) for s in SUBSETS}
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        # A file handle, not a name: np.savez would append ".npz" to the temporary name.
        np.savez(handle, **arrays)


def load_split(path: str | os.PathLike, n_structures: int) -> dict[str, np.ndarray]:
    """Reads a split written by ``save_split`` and checks it against a dataset of ``n_structures``.

    Raises:
        DataError: the file is missing or unreadable, a subset is missing or not 1-D integers, an index
            is outside [0, n_structures), or an index repeats within or across subsets.
    """
    name = str(path)
    if not Path(path).is_file():
        raise DataError(f"{name}: file not found")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except Exception as exc:
        raise DataError(
            f"{name}: cannot read as npz: {type(exc).__name__}: {' '.join(str(exc).split())}"
        ) from exc
    if set(arrays) != set(SUBSETS):
        raise DataError(f"{name}: expected the keys {list(SUBSETS)}, found {sorted(arrays)}")
    split = {}
    for subset in SUBSETS:
        indices = arrays[subset]
        if indices.ndim != 1 or not (np.issubdtype(indices.dtype, np.integer) or indices.size == 0):
            raise DataError(
                f"{name}: key {subset!r}: expected 1-D integers, got {indices.dtype} {indices.shape}"
            )
        outside = indices[(indices < 0) | (indices >= n_structures)]
        if len(outside):
            raise DataError(
                f"{name}: key {subset!r}: index {outside[0]} is outside [0, {n_structures}), "
                "the structures of the data"
            )
        split[subset] = indices.astype(np.int64)
    everything = np.concatenate(list(split.values()))
    values, counts = np.unique(everything, return_counts=True)
    if (counts > 1).any():
        repeated = int(values[counts > 1][0])
        holders = [s for s in SUBSETS if repeated in split[s]]
        raise DataError(
            f"{name}: keys {holders}: index {repeated} appears more than once ({sum(counts > 1)} such)"
        )
    return split
