"""``so3krates learn``: the loop end to end on a cheap reference (EMT), its pieces, and resume after SIGKILL.

The reference is ASE's EMT (H, C, N, O parameters), given as ``module:Class`` like any user calculator; the
committee is two tiny models; MD runs are tenths of a picosecond. What is checked is the bookkeeping
(budgets, journals, failed calls, outputs, determinism), not the quality of the force field, which
benchmarks/learn_ala_dipeptide.py measures with GFN2-xTB.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import ase.io
import numpy as np
import pytest
import yaml

from helpers import ethanol
from so3krates.cli.main import main
from so3krates.errors import ConfigError
from so3krates.learn import load_learn_config
from so3krates.learn.loop import Learner
from so3krates.learn.reference import label_frames, read_journal
from so3krates.learn.selection import farthest_point_sampling, select_diverse

TESTS = Path(__file__).resolve().parent


def _config(tmp_path: Path, **changes) -> dict:
    start = tmp_path / "start.extxyz"
    if not start.exists():
        ase.io.write(start, ethanol())
    values = {
        "work_dir": str(tmp_path / "run"),
        "structures": [str(start)],
        "seed": 0,
        "reference": {"calculator": "ase.calculators.emt:EMT", "workers": 2},
        "initial": {"method": "reference-md", "n_frames": 10, "reference_md_steps": 30},
        "committee": {
            "size": 2,
            "model": {"preset": "tiny"},
            "steps": 40,
            "first_steps": 60,
            "training": {"batch_size": 4},
            "dtype": "float64",
        },
        "exploration": {"temperatures_K": [300], "replicas": 2, "time_ps": 0.04, "first_time_ps": 0.02},
        "selection": {"labels_per_iteration": 6, "max_force_error": 0.5},
        "budget": {"max_labels": 60, "max_iterations": 2},
        "progress": False,
    }
    for key, value in changes.items():
        section, _, name = key.partition(".")
        if name:
            values[section][name] = value
        else:
            values[section] = value
    return values


def _write(tmp_path: Path, values: dict, name: str = "learn.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """One uninterrupted loop (a flaky EMT reference), run as a user runs it; shared by the end-to-end and
    the kill test. Returns (its config values, its config file, its wall time in s)."""
    root = tmp_path_factory.mktemp("learn")
    values = _config(root, **{"reference.calculator": "learn_references:FlakyEMT"})
    path = _write(root, values)
    started = time.perf_counter()
    subprocess.run([*LEARN, str(path)], env=_environment(), check=True, stdout=subprocess.DEVNULL)
    return values, path, time.perf_counter() - started


LEARN = [sys.executable, "-m", "so3krates", "learn"]


def _environment() -> dict:
    """The loop's worker processes import the test reference calculators from this folder."""
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


@pytest.fixture
def worker_path(monkeypatch):
    """The loop's worker processes import the test reference calculators from here."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))


# -- pieces -----------------------------------------------------------------------------------------------


def test_farthest_point_sampling_takes_the_extremes_first():
    points = np.array([[0.0], [1.0], [10.0], [5.0], [9.0]])
    assert farthest_point_sampling(points, 3, first=0) == [0, 2, 3]
    assert farthest_point_sampling(points, 10, first=1) == [1, 2, 3, 0, 4]


def test_select_diverse_starts_at_the_most_uncertain_frame_and_spreads():
    base = ethanol()
    frames = []
    for k in range(6):
        frame = base.copy()
        frame.positions[0, 0] += 0.05 * k  # one bond stretched further and further
        frames.append(frame)
    chosen = select_diverse(frames, 2, scores=np.array([0, 0, 5, 0, 0, 0.0]))
    assert chosen == [2, 5]  # the most uncertain, then the frame farthest from it
    assert select_diverse(frames, 10) == list(range(6))


def test_journal_cuts_a_torn_line_and_labelling_skips_what_it_holds(tmp_path):
    journal = tmp_path / "labels.jsonl"
    known = {"index": 0, "ok": True, "energy": 123.0, "forces": np.zeros((9, 3)).tolist()}
    journal.write_text(json.dumps(known) + "\n" + '{"index": 1, "ok": tr')  # killed mid-line
    assert list(read_journal(journal)) == [0]
    assert journal.read_text().endswith("\n")
    frames = [ethanol(seed) for seed in range(3)]
    records = label_frames(frames, journal, "ase.calculators.emt:EMT", {}, workers=1)
    assert records[0]["energy"] == 123.0  # taken from the journal, not recomputed
    expected = frames[1].copy()
    from ase.calculators.emt import EMT

    expected.calc = EMT()
    assert records[1]["energy"] == pytest.approx(expected.get_potential_energy(), abs=1e-10)
    lines = journal.read_text().splitlines()
    assert sorted(json.loads(line)["index"] for line in lines) == [0, 1, 2]


def test_failed_reference_calls_are_recorded_and_skipped(tmp_path, worker_path):
    frames = []
    for seed in range(12):
        frame = ethanol(seed)
        frame.positions += 0.001 * seed
        frames.append(frame)
    records = label_frames(frames, tmp_path / "labels.jsonl", "learn_references:FlakyEMT", {}, workers=2)
    failed = [k for k, r in records.items() if not r["ok"]]
    assert 0 < len(failed) < len(frames)
    assert all("SCF did not converge" in records[k]["reason"] for k in failed)
    assert all(np.isfinite(records[k]["energy"]) for k in records if records[k]["ok"])


def test_labels_do_not_depend_on_the_order_of_the_calls(tmp_path, worker_path):
    """Every structure gets a fresh calculator: a stateful reference answers the same in any order and on
    any worker, so a rerun after a kill reproduces the labels."""
    from ase.calculators.emt import EMT

    frames = [ethanol(seed) for seed in range(6)]
    forward = label_frames(frames, tmp_path / "a.jsonl", "learn_references:StatefulEMT", {}, workers=2)
    backward = label_frames(frames[::-1], tmp_path / "b.jsonl", "learn_references:StatefulEMT", {}, workers=1)
    for k, atoms in enumerate(frames):
        atoms.calc = EMT()
        assert forward[k]["energy"] == pytest.approx(atoms.get_potential_energy(), abs=1e-12)
        assert backward[len(frames) - 1 - k]["energy"] == forward[k]["energy"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"reference.calculator": "xtb2"}, "module:Class"),
        ({"exploration.replicas": 0}, "exploration.replicas"),
        ({"budget.max_labels": "many"}, "budget.max_labels"),
        ({"committee.sizes": 3}, "committee.sizes"),
        ({"committee.model": {"preset": "tiny", "n_featurs": 8}}, "committee.model.n_featurs"),
    ],
)
def test_bad_config_is_one_line(tmp_path, change, message):
    values = _config(tmp_path, **change)
    with pytest.raises(ConfigError, match=message) as error:
        from so3krates.learn.loop import Learner

        Learner(load_learn_config(_write(tmp_path, values)))._check_member_config()
    assert "\n" not in str(error.value)


def test_unknown_calculator_module_is_one_line(tmp_path, capsys):
    path = _write(tmp_path, _config(tmp_path, **{"reference.calculator": "no_such_module:Calc"}))
    assert main(["learn", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_such_module" in err[0]


# -- the loop ---------------------------------------------------------------------------------------------


def _positions(path: Path) -> list[bytes]:
    return [frame.positions.tobytes() for frame in ase.io.read(path, ":")]


def test_bootstrap_draws_differ_per_member_and_validate_on_the_frames_left_out(tmp_path):
    learner = Learner(load_learn_config(_write(tmp_path, _config(tmp_path))))
    frames = [ethanol() for _ in range(20)]
    for n, frame in enumerate(frames):
        frame.positions += 0.01 * n
    learner.iteration_dir(0).mkdir(parents=True)
    ase.io.write(learner.iteration_dir(0) / "train.extxyz", frames)
    every = set(_positions(learner.iteration_dir(0) / "train.extxyz"))
    draws = []
    for m in range(2):
        files = learner.bootstrap_files(0, m)
        train, valid = _positions(Path(files["train_file"])), _positions(Path(files["valid_file"]))
        assert len(train) == len(frames) and len(set(train)) < len(frames)  # with replacement
        assert valid and set(valid) == every - set(train)  # out of bag
        draws.append(train)
        # The draw depends only on seed, iteration and member: a resumed run draws it again.
        Path(files["train_file"]).unlink()
        assert _positions(Path(learner.bootstrap_files(0, m)["train_file"])) == train
    assert draws[0] != draws[1]


@pytest.mark.slow
def test_loop_end_to_end(straight_run, worker_path):
    values, path, _ = straight_run
    run = Path(values["work_dir"])
    summary = json.loads((run / "final" / "summary.json").read_text())
    assert summary["reference_calls"] <= values["budget"]["max_labels"]
    dataset = ase.io.read(run / "dataset.extxyz", ":")
    assert len(dataset) == summary["labelled_frames"] > values["initial"]["n_frames"] // 2
    assert all(np.isfinite(a.info["REF_energy"]) and a.arrays["REF_forces"].shape == (9, 3) for a in dataset)
    assert {a.info["split"] for a in dataset} <= {"train", "holdout"}
    # Failed calls are in the journals, and their frames are not in the dataset.
    records = [json.loads(line) for j in run.glob("*/labels.jsonl") for line in j.read_text().splitlines()]
    assert any(not r["ok"] for r in records)
    rows = (run / "iterations.csv").read_text().splitlines()
    assert len(rows) == 1 + summary["iterations"]
    for name in (
        "learning.png",
        "final/best.pt",
        "final/committee/member_0/best.pt",
        "final/committee/member_1/best.pt",
    ):
        assert (run / name).is_file(), name
    # Warm start: iteration 1's members start from iteration 0's weights.
    member = yaml.safe_load((run / "iter_001" / "committee" / "member_0.yaml").read_text())
    assert member["training"]["init_from"].endswith("iter_000/committee/member_0/best.pt")
    # Bootstrap: every member trains on its own draw and validates on the frames it left out.
    assert member["data"]["train_file"].endswith("iter_001/committee/member_0_train.extxyz")
    assert member["data"]["valid_file"].endswith("iter_001/committee/member_0_valid.extxyz")
    # The committee's MD logged the uncertainty per frame.
    trajectory = ase.io.read(next(run.glob("iter_000/md/*/trajectory.extxyz")), ":")
    assert all("max_force_uncertainty" in frame.info for frame in trajectory)
    # A finished run is only summarised when started again.
    assert main(["learn", str(path)]) == 0
    assert json.loads((run / "final" / "summary.json").read_text()) == summary


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_gives_the_same_dataset(tmp_path, straight_run):
    """Two kills at random moments of one run; it ends with the dataset of an uninterrupted run, and no
    reference call is in a journal twice."""
    values, _, duration = straight_run
    killed = {**values, "work_dir": str(tmp_path / "killed")}
    rng = random.Random(1)
    path = _write(tmp_path, killed, "b.yaml")
    for _ in range(2):
        process = subprocess.Popen([*LEARN, str(path)], env=_environment(), stdout=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.2, 0.6) * duration)
        process.send_signal(signal.SIGKILL)
        process.wait()
    subprocess.run([*LEARN, str(path)], env=_environment(), check=True, stdout=subprocess.DEVNULL)
    a = ase.io.read(Path(values["work_dir"]) / "dataset.extxyz", ":")
    b = ase.io.read(tmp_path / "killed" / "dataset.extxyz", ":")
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.positions, y.positions)
        assert x.info["REF_energy"] == y.info["REF_energy"]
    for journal in (tmp_path / "killed").glob("*/labels.jsonl"):
        indices = [json.loads(line)["index"] for line in journal.read_text().splitlines()]
        assert len(indices) == len(set(indices)), journal


def test_start_structure_errors_name_the_file(tmp_path):
    values = _config(tmp_path)
    values["structures"] = [str(tmp_path / "missing.xyz")]
    with pytest.raises(Exception, match=r"missing\.xyz"):
        from so3krates.learn import learn

        learn(load_learn_config(_write(tmp_path, values)), log=lambda _: None)
