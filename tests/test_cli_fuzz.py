"""The command line under generated misuse: every outcome is success, or one error line; nothing is lost.

Hypothesis drives ``so3krates.cli.main.main`` in-process with argument lists built from good and bad pieces
— missing, truncated, corrupted, empty and foreign files, folders where files belong and files where folders
belong, outputs that exist already, numbers out of range or not numbers at all, unknown devices — for
every command. Whatever it draws, the command must either succeed (status 0) or fail with status 2 and
exactly one error line on stderr (warnings, one line each, may come before it), never a traceback; and no
file that existed before may change.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import ethanol, make_force_field
from so3krates import preset
from so3krates.cli.main import main
from so3krates.model.checkpoint import save_checkpoint

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "data" / "ethanol_gfn2xtb_500K_test.extxyz"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Good and bad inputs, and outputs that exist already; the tests run with it as working directory."""
    root = tmp_path_factory.mktemp("fuzz")
    save_checkpoint(root / "good.pt", make_force_field(preset("tiny"), torch.float64).model, [1, 6, 8])
    frames = ase.io.read(EXAMPLE, index=":6")
    ase.io.write(root / "good.extxyz", frames)
    text = (root / "good.extxyz").read_text()
    (root / "truncated.extxyz").write_text(text[: len(text) // 3])
    (root / "garbage.bin").write_bytes(bytes(range(256)) * 8)
    (root / "empty.xyz").write_text("")
    (root / "good.pt").with_name("truncated.pt").write_bytes((root / "good.pt").read_bytes()[:2000])
    nan = [atoms.copy() for atoms in frames]
    nan[2].positions[1, 0] = np.nan
    ase.io.write(root / "nan.extxyz", nan)
    nitrogen = [atoms.copy() for atoms in frames]
    nitrogen[1].numbers[0] = 7
    ase.io.write(root / "nitrogen.extxyz", nitrogen)
    positions = np.stack([atoms.positions for atoms in frames])
    energies = np.array([atoms.get_potential_energy() for atoms in frames])
    forces = np.stack([atoms.get_forces() for atoms in frames])
    np.savez(
        root / "shapes.npz", R=positions, z=frames[0].numbers, E=energies, F=forces[:, :5]
    )  # wrong shape
    np.savez(root / "no_forces_key.npz", R=positions, z=frames[0].numbers, E=energies)
    (root / "no_data.yaml").write_text("model: {preset: tiny}\n")
    ase.io.write(root / "water.xyz", Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]))
    ase.io.write(root / "ethanol.xyz", ethanol())
    (root / "config.yaml").write_text(
        "run_dir: runs/fuzz\ndata: {train_file: good.extxyz, n_train: 4, n_valid: 2}\n"
        "model: {preset: tiny}\ntraining: {max_epochs: 1, batch_size: 2, progress: false}\n"
    )
    (root / "bad.yaml").write_text("data: [unclosed\n")
    (root / "folder").mkdir()
    (root / "existing.json").write_text("{}")
    (root / "existing.pt2").write_text("an export from before")
    (root / "existing.h5").write_text("a prepared file from before")
    (root / "outputs").mkdir()
    (root / "outputs" / "metrics.json").write_text("{}")
    (root / "outputs" / "vacf.csv").write_text("")
    return root


MODELS = ["good.pt", "missing.pt", "folder", "garbage.bin", "truncated.pt", "good.extxyz", "empty.xyz"]
DATA = ["good.extxyz", "truncated.extxyz", "garbage.bin", "empty.xyz", "missing.xyz", "folder", "nan.extxyz"]
DATA += ["nitrogen.extxyz", "shapes.npz", "no_forces_key.npz"]
STRUCTURES = ["water.xyz", "ethanol.xyz", "nitrogen.extxyz", "missing.xyz", "garbage.bin", "folder"]
FILE_OUTPUTS = ["new.json", "existing.json", "folder", "existing.json/inside.json", "new/deeper/out.json"]
DIR_OUTPUTS = ["new_dir", "folder", "outputs", "existing.json", "existing.json/below"]
NUMBERS = ["1", "2", "0", "-1", "1e9", "nan", "inf", "two", ""]
DEVICES = ["cpu", "cuda", "cuda:7", "gpu", "mps", "meta"]


def optional(draw, flag: str, values: list[str]) -> list[str]:
    return [flag, draw(st.sampled_from(values))] if draw(st.booleans()) else []


@st.composite
def command_lines(draw) -> list[str]:
    command = draw(
        st.sampled_from(["evaluate", "export", "md", "harmonic", "vacf", "prepare", "info", "train"])
    )
    pick = lambda values: draw(st.sampled_from(values))  # noqa: E731
    if command == "evaluate":
        argv = ["evaluate", "--model", pick(MODELS), "--data", pick(DATA)]
        argv += optional(draw, "--out-dir", DIR_OUTPUTS) + optional(draw, "--json", FILE_OUTPUTS)
        argv += optional(draw, "--batch-size", NUMBERS) + optional(draw, "--device", DEVICES)
    elif command == "export":
        fmt = pick(["pt2", "lammps-mliap", "torchscript"])
        out = pick(["new.pt2", "new.pkl", "existing.pt2", "folder", "new.bin"])
        argv = ["export", "--model", pick(MODELS), "--format", fmt, "--out", out]
        argv += optional(draw, "--species", ["1", "6", "7", "0", "200", "x"]) + optional(
            draw, "--layers", ["fused"]
        )
    elif command == "md":
        argv = ["md", "--model", pick(MODELS), "--structure", pick(STRUCTURES), "--no-progress"]
        argv += ["--steps", pick(["2", "0", "-5", "x"]), "--out", pick(DIR_OUTPUTS)]
        argv += optional(draw, "--timestep", NUMBERS) + optional(draw, "--device", DEVICES)
        argv += optional(draw, "--temperature", NUMBERS) + optional(draw, "--frame", ["0", "-1", "99"])
    elif command == "harmonic":
        argv = ["spectrum", "harmonic", "--model", pick(MODELS), "--structure", pick(STRUCTURES)]
        argv += ["--out", pick(DIR_OUTPUTS), *optional(draw, "--device", DEVICES)]
    elif command == "vacf":
        argv = ["spectrum", "vacf", "--trajectory", pick(DATA), "--out", pick(DIR_OUTPUTS)]
        argv += optional(draw, "--timestep-fs", NUMBERS) + optional(draw, "--skip", NUMBERS)
    elif command == "prepare":
        argv = ["prepare", "--data", pick(DATA), "--out", pick(["new.h5", "existing.h5", "folder"])]
        argv += ["--cutoff", pick(["4.0", "0", "-1", "nan", "x"])]
        argv += optional(draw, "--energy-unit", ["eV", "kcal/mol", "furlongs"])
    elif command == "info":
        argv = ["info", "--preset", pick(["tiny", "paper", "huge"])]
        argv += optional(draw, "--set", ["n_layers=1", "cutoff=-1", "colour=blue", "cutoff", "degrees=[9]"])
        argv += optional(draw, "--threads", NUMBERS)
    else:
        argv = [
            "train",
            pick(["config.yaml", "bad.yaml", "missing.yaml", "folder", "no_data.yaml", "garbage.bin"]),
        ]
        argv += optional(
            draw,
            "--set",
            [
                "training.device=cuda",
                "run_dir=existing.json",
                "data.train_file=garbage.bin",
                "data.n_train=999",
                "training.batch_size=0",
                "data.test_file=nitrogen.extxyz",
                "data.train_file=shapes.npz",
                "data.forces_key=F",
                "model.n_features=[1]",
            ],
        )
    return argv


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@settings(
    max_examples=int(os.environ.get("SO3KRATES_FUZZ_EXAMPLES", "60")),
    deadline=None,
    derandomize=os.environ.get("SO3KRATES_FUZZ_RANDOM") is None,  # the same examples in every CI run
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(argv=command_lines())
def test_every_command_line_succeeds_or_fails_in_one_line_and_changes_nothing(workspace, argv):
    before = snapshot(workspace)
    threads, cwd = torch.get_num_threads(), os.getcwd()
    stdout, stderr = io.StringIO(), io.StringIO()
    os.chdir(workspace)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                status = main(argv)
            except SystemExit as exit_:  # argparse
                status = exit_.code
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    err = stderr.getvalue()
    assert "Traceback" not in err, (argv, err)
    lines = [line for line in err.splitlines() if line.strip() and ": warning: " not in line]
    assert status in (0, 2), (argv, status, err)
    if status == 2:
        assert len(lines) == 1 and ": error: " in lines[0], (argv, err)
    after = snapshot(workspace)
    changed = [name for name, digest in before.items() if after.get(name) != digest]
    assert not changed, (argv, changed)
