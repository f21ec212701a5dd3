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


# --- the one error policy ---------------------------------------------------------------------------------


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(capsys, monkeypatch):
    """so3krates.errors.user_error_message decides: the package's errors and file-system errors a user can
    fix are one line with status 2; anything else is a bug, shown with its traceback and a request."""
    import errno

    from so3krates.errors import DataError, user_error_message

    assert (
        user_error_message(DataError("x.xyz: frame 3: key 'forces': bad"))
        == "x.xyz: frame 3: key 'forces': bad"
    )
    denied = PermissionError(errno.EACCES, "Permission denied", "/read-only/out")
    assert user_error_message(denied) == "Permission denied: /read-only/out"
    assert (
        user_error_message(IsADirectoryError(errno.EISDIR, "Is a directory", "out")) == "Is a directory: out"
    )
    assert "out of memory" in user_error_message(MemoryError())
    assert user_error_message(KeyError("state_dict")) is None  # a bug
    assert user_error_message(OSError(errno.EIO, "I/O error")) is None  # not the user's to fix

    def fail(error):
        def run(args):
            raise error

        return run

    monkeypatch.setattr("so3krates.cli.main._command_info", fail(denied))
    assert main(["info"]) == 2
    err = capsys.readouterr().err
    assert err == "so3krates info: error: Permission denied: /read-only/out\n"
    monkeypatch.setattr("so3krates.cli.main._command_info", fail(IndexError("list index out of range")))
    assert main(["info"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "IndexError: list index out of range" in err
    assert err.strip().splitlines()[-1].startswith("so3krates info: this is a bug in so3krates")


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["info", "--threads", "0"], "argument --threads: expected an integer ≥ 1, got '0'"),
        (["info", "--threads", "two"], "argument --threads: expected an integer ≥ 1, got 'two'"),
        (["evaluate", "--model", "m.pt", "--data", "d.xyz", "--batch-size", "0"], "--batch-size: expected"),
        (["prepare", "--data", "d.xyz", "--out", "o.h5", "--cutoff", "-1"], "expected a finite number > 0"),
        (["prepare", "--data", "d.xyz", "--out", "o.h5", "--cutoff", "nan"], "expected a finite number > 0"),
        (["export", "--model", "m", "--format", "pt2", "--out", "o.pt2", "--species", "200"], "1 … 118"),
        (["md", "--model", "m", "--structure", "s", "--threads", "-1"], "--threads: expected an integer ≥ 1"),
        (["spectrum", "vacf", "--trajectory", "t", "--skip", "-2"], "--skip: expected an integer ≥ 0"),
        (["train", "c.yaml", "--nproc", "0"], "--nproc: expected an integer ≥ 1"),
        (["evaluate", "--model", "m.pt"], "the following arguments are required: --data"),
    ],
)
def test_option_values_out_of_range_are_one_line(capsys, argv, expected):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and "--help)" in lines[0], lines


def test_outputs_and_devices_are_checked_before_any_work(tmp_path, monkeypatch):
    from so3krates.checks import check_device, check_output_dir, check_output_file, check_results_folder
    from so3krates.errors import So3kratesError

    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    a_dir = tmp_path / "folder"
    a_dir.mkdir()
    assert (
        check_output_file(tmp_path / "new" / "deeper" / "out.json")
        == tmp_path / "new" / "deeper" / "out.json"
    )
    assert check_output_dir(tmp_path / "new" / "run") == tmp_path / "new" / "run"
    with pytest.raises(So3kratesError, match=r"--json .*folder is a folder, not a file"):
        check_output_file(a_dir, "--json")
    with pytest.raises(So3kratesError, match=r"--out-dir .*file.txt is a file, not a folder"):
        check_output_dir(a_file, "--out-dir")
    with pytest.raises(So3kratesError, match=r"file.txt is a file, not a folder"):
        check_output_file(a_file / "inside.json")
    monkeypatch.setattr("os.access", lambda path, mode: False)  # as an unprivileged user in a read-only place
    with pytest.raises(So3kratesError, match=r"cannot write in .* \(permission denied\)"):
        check_output_dir(a_dir)
    with pytest.raises(So3kratesError, match="permission denied"):
        check_output_file(tmp_path / "new.json")
    monkeypatch.undo()
    (a_dir / "vacf.csv").write_text("")
    with pytest.raises(So3kratesError, match=r"already holds vacf.csv; pass --overwrite"):
        check_results_folder(a_dir, ["power_spectrum.csv", "vacf.csv"], False, "--out")
    assert check_results_folder(a_dir, ["vacf.csv"], True, "--out") == a_dir
    assert check_device("cpu") == "cpu"
    with pytest.raises(So3kratesError, match="not a torch device"):
        check_device("gpu0")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(So3kratesError, match="device 'cuda': this torch has no usable CUDA"):
            check_device("cuda")
