"""The ``so3krates`` command: help, version, ``info``, and one-line errors for bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest

from so3krates import __version__
from so3krates.cli.main import main


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"so3krates {__version__}"


def test_help_lists_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "usage: so3krates" in out and "info" in out


def test_info_prints_the_paper_parameter_count(capsys):
    assert main(["info", "--preset", "paper"]) == 0
    out = capsys.readouterr().out
    assert "n_features: 132" in out
    assert "312,877" in out  # documented in the README next to the paper's ~311 k


def test_info_with_override_and_timing(capsys):
    assert main(["info", "--preset", "tiny", "--set", "degrees=[1,2]", "--time", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "- 2" in out and "energy + forces, ethanol" in out


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["colour=blue"], "key 'colour': Extra inputs are not permitted"),
        (["n_heads=5"], "n_features = 132 must be divisible by n_heads (5)"),
        (["cutoff=-1"], "key 'cutoff': Input should be greater than 0"),
        (["degrees=[0,1]"], "key 'degrees'"),
        (["n_layers=three"], "key 'n_layers'"),
        (["cutoff"], "--set expects key=value"),
    ],
)
def test_bad_config_gives_one_clear_line(capsys, overrides, expected):
    argv = ["info"]
    for item in overrides:
        argv += ["--set", item]
    assert main(argv) == 2
    captured = capsys.readouterr()
    error_lines = captured.err.strip().splitlines()
    assert len(error_lines) == 1, captured.err
    assert error_lines[0].startswith("so3krates info: error: ")
    assert expected in error_lines[0]


def test_unknown_preset(capsys):
    assert main(["info", "--preset", "huge"]) == 2
    assert "unknown model preset 'huge'" in capsys.readouterr().err


def test_console_script_and_module_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "so3krates", "--version"], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == f"so3krates {__version__}"
