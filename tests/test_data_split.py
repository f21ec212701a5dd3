"""Train/valid/test splits: sizes, disjointness, reproducibility, and the saved file."""

from __future__ import annotations

import numpy as np
import pytest

from so3krates.data.split import load_split, save_split, split_indices
from so3krates.errors import ConfigError, DataError


def assert_partition(split: dict[str, np.ndarray], n_structures: int) -> None:
    assert set(split) == {"train", "valid", "test"}
    everything = np.concatenate(list(split.values()))
    assert len(np.unique(everything)) == len(everything)
    assert everything.min(initial=0) >= 0 and everything.max(initial=0) < n_structures
    for indices in split.values():
        assert indices.dtype == np.int64 and (np.diff(indices) > 0).all()


def test_counts_with_the_remainder_going_to_test():
    split = split_indices(100, n_train=60, n_valid=15)
    assert [len(split[s]) for s in ("train", "valid", "test")] == [60, 15, 25]
    assert_partition(split, 100)
    explicit = split_indices(100, n_train=60, n_valid=15, n_test=5)
    assert [len(explicit[s]) for s in ("train", "valid", "test")] == [60, 15, 5]
    assert len(split_indices(10, n_train=10)["test"]) == 0


def test_fractions():
    split = split_indices(100, fractions={"train": 0.29, "valid": 0.2})  # 0.29 · 100 = 28.999… in floats
    assert [len(split[s]) for s in ("train", "valid", "test")] == [29, 20, 51]
    split = split_indices(1000, fractions={"train": 0.5, "valid": 0.1, "test": 0.1})
    assert [len(split[s]) for s in ("train", "valid", "test")] == [500, 100, 100]
    assert_partition(split, 1000)


def test_seed_reproduces_and_changes_the_split():
    a, b = split_indices(50, n_train=20, seed=3), split_indices(50, n_train=20, seed=3)
    assert all(np.array_equal(a[s], b[s]) for s in a)
    assert not np.array_equal(a["train"], split_indices(50, n_train=20, seed=4)["train"])
    # A larger training set with the same seed keeps the earlier training structures.
    assert set(a["train"]) <= set(split_indices(50, n_train=30, seed=3)["train"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_train": 80, "n_valid": 30}, "exceeds the 100 structures"),
        ({"n_train": 50, "n_valid": 30, "n_test": 30}, "50 \\+ 30 \\+ 30"),
        ({"n_train": -1}, "n_train: -1 is negative"),
        ({}, "give n_train"),
        ({"n_train": 10, "fractions": {"train": 0.5}}, "not both"),
        ({"fractions": {"train": 0.8, "valid": 0.3}}, "add up to more than 1"),
        ({"fractions": {"train": 1.5}}, "not between 0 and 1"),
        ({"fractions": {"training": 0.5}}, "unknown subsets"),
    ],
)
def test_bad_sizes_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        split_indices(100, **kwargs)


def test_save_and_load_round_trip(tmp_path):
    split = split_indices(30, n_train=20, n_valid=5)
    path = tmp_path / "run" / "split.npz"
    save_split(path, split)
    assert [p.name for p in path.parent.iterdir()] == ["split.npz"]  # no temporary left, no "split.npz.npz"
    loaded = load_split(path, 30)
    assert all(np.array_equal(loaded[s], split[s]) for s in split)


@pytest.mark.parametrize(
    ("arrays", "fragments"),
    [
        ({"train": [0, 1], "valid": [2], "test": [40]}, ["key 'test'", "index 40", "30"]),
        ({"train": [0, 1], "valid": [-1], "test": []}, ["key 'valid'", "index -1"]),
        ({"train": [0, 1, 2], "valid": [2], "test": [3]}, ["['train', 'valid']", "index 2"]),
        ({"train": [0, 0], "valid": [], "test": []}, ["['train']", "index 0"]),
        ({"train": [0, 1], "val": [2]}, ["expected the keys", "'val'"]),
        ({"train": [0.5], "valid": [1], "test": [2]}, ["key 'train'", "1-D integers"]),
    ],
)
def test_load_rejects_bad_splits(tmp_path, arrays, fragments):
    path = tmp_path / "split.npz"
    np.savez(path, **{k: np.asarray(v) for k, v in arrays.items()})  # [] is float64: allowed when empty
    with pytest.raises(DataError) as info:
        load_split(path, 30)
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_load_missing_or_unreadable_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_split(tmp_path / "split.npz", 10)
    (tmp_path / "junk.npz").write_text("junk")
    with pytest.raises(DataError, match="cannot read as npz"):
        load_split(tmp_path / "junk.npz", 10)
