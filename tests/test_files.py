"""Atomic writes."""

import json
import math

import pytest

from so3krates.files import atomic_path, write_json


def test_atomic_path_replaces_on_success(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("new")
        assert not target.exists()
    assert target.read_text() == "new"
    assert list(target.parent.iterdir()) == [target]


def test_atomic_path_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_write_json_writes_strict_json_with_null_for_non_finite_numbers(tmp_path):
    target = tmp_path / "summary.json"
    write_json(target, {"mae": math.nan, "rho": [0.5, math.inf, -math.inf], "n": 3, "nested": {"x": 1.5}})

    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    assert json.loads(target.read_text(), parse_constant=refuse) == {
        "mae": None,
        "rho": [0.5, None, None],
        "n": 3,
        "nested": {"x": 1.5},
    }
    assert list(tmp_path.iterdir()) == [target]
