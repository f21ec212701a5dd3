"""Training end to end on the shipped example data: outputs, learning, exact resumption, run-dir safety."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from so3krates.cli.main import main
from so3krates.errors import ConfigError
from so3krates.model.checkpoint import load_checkpoint
from so3krates.train.config import load_train_config
from so3krates.train.trainer import Trainer, train

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "data" / "ethanol_gfn2xtb_500K.extxyz"


def _config(run_dir: Path, **overrides):
    values = {
        "run_dir": str(run_dir),
        "data.train_file": str(EXAMPLE),
        "data.n_train": 40,
        "data.n_valid": 10,
        "data.n_test": 10,
        "model.preset": "tiny",
        "training.max_epochs": 3,
        "training.batch_size": 4,
        "training.progress": False,
        "training.learning_rate": 3e-3,
    }
    values.update(overrides)
    return load_train_config(None, values)


def _quiet(*args, **kwargs):
    pass


def test_training_writes_a_complete_run_directory(tmp_path):
    rows = train(_config(tmp_path / "run"), log=_quiet)
    run = tmp_path / "run"
    for name in (
        "best.pt",
        "last.pt",
        "metrics.csv",
        "config.yaml",
        "split.npz",
        "learning_curve.png",
        "results.json",
    ):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    assert not (run / ".lock").exists()
    assert set(rows) == {"train", "valid", "test"}
    assert rows["test"]["n_structures"] == 10
    with open(run / "metrics.csv") as handle:
        history = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in history] == [1, 2, 3]
    payload = load_checkpoint(run / "best.pt")
    assert payload["metadata"]["species"] == [1, 6, 8]
    assert payload["metadata"]["cutoff"] == 4.0
    # The resolved config records the model actually trained, N̄ from the data included.
    resolved = load_train_config(run / "config.yaml")
    assert resolved.model.avg_num_neighbors == pytest.approx(payload["model_config"]["avg_num_neighbors"])
    assert resolved.model.avg_num_neighbors > 1.0


def test_training_reduces_the_force_error(tmp_path):
    rows = train(
        _config(tmp_path / "run", **{"training.max_epochs": 12, "training.ema_decay": None}), log=_quiet
    )
    with open(tmp_path / "run" / "metrics.csv") as handle:
        history = list(csv.DictReader(handle))
    first, best = float(history[0]["valid_forces_mae_meV_per_A"]), rows["valid"]["forces_mae_meV_per_A"]
    assert best < 0.8 * first, (first, best)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["state_dict"]


def test_resume_after_epochs_gives_the_same_weights(tmp_path):
    train(_config(tmp_path / "straight", **{"training.max_epochs": 4}), log=_quiet)
    train(_config(tmp_path / "split", **{"training.max_epochs": 2}), log=_quiet)
    train(_config(tmp_path / "split", **{"training.max_epochs": 4}), resume=True, log=_quiet)
    for name in ("last.pt", "best.pt"):
        a, b = _weights(tmp_path / "straight" / name), _weights(tmp_path / "split" / name)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{name}: {key}")


def test_resume_mid_epoch_gives_the_same_weights(tmp_path, monkeypatch):
    train(_config(tmp_path / "straight"), log=_quiet)
    steps = {"n": 0}

    def stop_after_seven_steps(self):
        steps["n"] += 1
        return steps["n"] >= 7  # 10 batches per epoch: stops inside epoch 1

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_out_of_time", stop_after_seven_steps)
        train(_config(tmp_path / "split"), log=_quiet)
    progress = load_checkpoint(tmp_path / "split" / "last.pt")["progress"]
    assert (progress["epoch"], progress["step_in_epoch"]) == (0, 7)
    assert (tmp_path / "split" / "best.pt").is_file(), "a stop inside the first epoch still validates"
    train(_config(tmp_path / "split"), resume=True, log=_quiet)
    a, b = _weights(tmp_path / "straight" / "last.pt"), _weights(tmp_path / "split" / "last.pt")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_a_second_training_in_the_same_run_dir_is_refused(tmp_path):
    run = tmp_path / "run"
    train(_config(run, **{"training.max_epochs": 1}), log=_quiet)
    with pytest.raises(ConfigError, match="holds a training already"):
        train(_config(run), log=_quiet)
    (run / ".lock").write_text(str(os.getpid()))  # a live training owns it
    with pytest.raises(ConfigError, match=f"another training \\(PID {os.getpid()}\\)"):
        train(_config(run), resume=True, log=_quiet)


def test_run_lock_leaves_a_lock_it_does_not_own(tmp_path):
    from so3krates.train.runlock import RunLock

    with RunLock(tmp_path) as lock:
        lock.path.write_text("12345")  # the directory was cleared and another training took it over
    assert lock.path.read_text() == "12345"
    with pytest.raises(ConfigError, match="another training"):
        lock.path.write_text(str(os.getpid()))
        RunLock(tmp_path).__enter__()


def test_run_lock_removes_what_killed_atomic_writes_left(tmp_path):
    """A kill -9 inside atomic_path leaves ``.NAME.XXXX.tmp``; the next owner of the directory removes it."""
    from so3krates.train.runlock import RunLock

    leftover = tmp_path / ".last.pt.abc123.tmp"
    leftover.write_bytes(b"half a checkpoint")
    (tmp_path / "last.pt").write_bytes(b"kept")
    with pytest.raises(ConfigError, match="another training"):
        (tmp_path / ".lock").write_text(str(os.getpid()))  # a live owner: nothing may be touched
        RunLock(tmp_path).__enter__()
    assert leftover.exists()
    (tmp_path / ".lock").unlink()
    with RunLock(tmp_path):
        assert not leftover.exists()
        assert (tmp_path / "last.pt").read_bytes() == b"kept"


def test_a_stale_lock_of_a_killed_run_is_taken_over(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text("999999999")  # no such process
    train(_config(run, **{"training.max_epochs": 1}), log=_quiet)
    assert (run / "best.pt").is_file()


def test_nan_labels_are_masked(tmp_path):
    from ase.io import read, write

    frames = read(EXAMPLE, index=":60")
    for atoms in frames[::3]:
        atoms.calc.results["energy"] = float("nan")
    data = tmp_path / "holes.extxyz"
    write(data, frames)
    with pytest.warns(UserWarning, match="masked"):
        rows = train(_config(tmp_path / "run", **{"data.train_file": str(data)}), log=_quiet)
    assert np.isfinite(rows["train"]["energy_mae_meV"]) and np.isfinite(rows["train"]["forces_mae_meV_per_A"])


def test_cli_train_and_evaluate(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(
        f"run_dir: {tmp_path / 'run'}\n"
        f"data: {{train_file: {EXAMPLE}, n_train: 20, n_valid: 5, n_test: 5}}\n"
        "model: {preset: tiny}\n"
        "training: {max_epochs: 1, progress: false}\n"
    )
    assert main(["train", str(config)]) == 0
    out = capsys.readouterr().out
    assert "best model" in out and "test" in out and "F MAE" in out
    json_path = tmp_path / "metrics.json"
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(tmp_path / "run" / "best.pt"),
                "--data",
                str(EXAMPLE),
                "--json",
                str(json_path),
                "--out-dir",
                str(tmp_path / "eval"),
            ]
        )
        == 0
    )
    import json

    metrics = json.loads(json_path.read_text())
    for key in ("energy_mae_meV", "energy_rmse_meV", "forces_mae_meV_per_A", "forces_rmse_meV_per_A"):
        assert metrics[key] > 0
    assert metrics["n_structures"] == 1000
    for name in ("predictions.extxyz", "parity.png", "metrics.json"):
        assert (tmp_path / "eval" / name).is_file()


@pytest.mark.parametrize(
    "argument, expected",
    [
        ("training.learning_rat=1", "key 'training.learning_rat': Extra inputs are not permitted"),
        ("training.batch_size=0", "key 'training.batch_size': Input should be greater than or equal to 1"),
        ("model.preset=huge", "unknown preset 'huge'"),
        ("data.energy_unit=kJ", "unknown energy unit 'kJ'"),
    ],
)
def test_bad_training_config_gives_one_line(tmp_path, capsys, argument, expected):
    config = tmp_path / "config.yaml"
    config.write_text(f"run_dir: {tmp_path / 'run'}\ndata: {{train_file: {EXAMPLE}}}\n")
    assert main(["train", str(config), "--set", argument]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "run").exists()


def test_missing_config_and_bad_yaml(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not valid YAML" in err[0]


def test_training_streams_from_a_prepared_hdf5_file(tmp_path, capsys):
    """`so3krates prepare` → .h5 → training gives the same run as from the extxyz file it came from."""
    h5 = tmp_path / "ethanol.h5"
    assert main(["prepare", "--data", str(EXAMPLE), "--out", str(h5), "--cutoff", "5.0"]) == 0
    assert "1000 structures" in capsys.readouterr().out
    from_h5 = train(
        _config(tmp_path / "h5", **{"data.train_file": str(h5), "training.max_epochs": 2}), log=_quiet
    )
    from_xyz = train(_config(tmp_path / "xyz", **{"training.max_epochs": 2}), log=_quiet)
    for split in ("train", "valid", "test"):
        for key in ("energy_mae_meV", "forces_mae_meV_per_A"):
            assert from_h5[split][key] == pytest.approx(from_xyz[split][key], rel=1e-6), (split, key)
    with pytest.raises(ConfigError, match="apply to `so3krates prepare`"):
        train(
            _config(tmp_path / "bad", **{"data.train_file": str(h5), "data.energy_unit": "kcal/mol"}),
            log=_quiet,
        )


def _copper_with_stress(path: Path, n: int = 24) -> None:
    """Rattled, strained fcc copper cells labelled with ASE's EMT: energy, forces and stress."""
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    rng = np.random.default_rng(0)
    frames = []
    for _ in range(n):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
        atoms.set_cell(atoms.cell.array @ (np.eye(3) + rng.normal(scale=0.02, size=(3, 3))), scale_atoms=True)
        atoms.rattle(0.05, seed=int(rng.integers(1 << 30)))
        atoms.calc = EMT()
        results = {k: atoms.calc.get_property(k, atoms) for k in ("energy", "forces", "stress")}
        atoms.calc = SinglePointCalculator(atoms, **results)
        frames.append(atoms)
    write(path, frames)


def test_training_on_stress(tmp_path):
    data = tmp_path / "cu.extxyz"
    _copper_with_stress(data)
    overrides = {
        "data.train_file": str(data),
        "data.n_train": 16,
        "data.n_valid": 4,
        "data.n_test": 4,
        "loss.stress_weight": 1.0,
        "training.max_epochs": 2,
    }
    rows = train(_config(tmp_path / "run", **overrides), log=_quiet)
    assert rows["test"]["stress_mae_meV_per_A3"] > 0
    with open(tmp_path / "run" / "metrics.csv") as handle:
        assert "valid_stress_mae_meV_per_A3" in next(csv.DictReader(handle))


def test_early_stopping(tmp_path, monkeypatch):
    import so3krates.train.trainer as trainer_module

    real = trainer_module.evaluate_dataset

    def flat_validation(force_field, dataset, *args, **kwargs):
        metrics, loss = real(force_field, dataset, *args, **kwargs)
        return metrics, 1.0 if kwargs.get("loss_config", args[2] if len(args) > 2 else None) else loss

    monkeypatch.setattr(trainer_module, "evaluate_dataset", flat_validation)
    messages = []
    train(
        _config(tmp_path / "run", **{"training.max_epochs": 50, "training.early_stopping_patience": 2}),
        log=messages.append,
    )
    assert any(m.startswith("early stopping: no improvement in 2 validations") for m in messages), messages
    assert load_checkpoint(tmp_path / "run" / "last.pt")["progress"]["epoch"] == 3


def test_evaluate_refuses_unseen_elements_before_writing(tmp_path, capsys):
    from ase.io import read, write

    train(_config(tmp_path / "run", **{"training.max_epochs": 1}), log=_quiet)
    frames = read(EXAMPLE, index=":5")
    frames[3].numbers[0] = 7  # nitrogen: never seen in training
    data = tmp_path / "with_n.extxyz"
    write(data, frames)
    out_dir = tmp_path / "eval"
    argv = [
        "evaluate",
        "--model",
        str(tmp_path / "run" / "best.pt"),
        "--data",
        str(data),
        "--out-dir",
        str(out_dir),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "frame 3: key 'numbers': element N (Z=7) was not in the training data" in err[0]
    assert not out_dir.exists()


def test_resume_refuses_changes_that_cannot_apply_and_keeps_the_runs_config(tmp_path):
    """A changed model or split is refused naming the keys, before anything is written; the run's own
    config.yaml stays as it was, so a plain resume still works; budget and schedule may change."""
    run = tmp_path / "run"
    train(_config(run, **{"training.max_epochs": 1}), log=_quiet)
    saved = (run / "config.yaml").read_text()
    changed = _config(run, **{"training.max_epochs": 2, "model.n_features": 36, "data.n_train": 30})
    with pytest.raises(ConfigError) as error:
        train(changed, resume=True, log=_quiet)
    message = str(error.value)
    assert "data.n_train: 40 → 30" in message and "model.n_features: 24 → 36" in message
    assert "training.max_epochs" not in message and "\n" not in message
    assert (run / "config.yaml").read_text() == saved
    lines = []
    train(
        _config(run, **{"training.max_epochs": 2, "training.learning_rate": 1e-3}),
        resume=True,
        log=lines.append,
    )
    assert (
        "resume: training.learning_rate 0.003 → 0.001" in lines
        and "resume: training.max_epochs 1 → 2" in lines
    )
    resolved = load_train_config(run / "config.yaml")
    assert resolved.training.max_epochs == 2 and resolved.training.learning_rate == 1e-3  # after the restore
    assert load_checkpoint(run / "last.pt")["progress"]["epoch"] == 2


def test_validation_and_test_data_with_elements_the_training_split_lacks_are_refused(tmp_path):
    from ase.io import read, write

    frames = read(EXAMPLE, index=":6")
    frames[4].numbers[0] = 7
    test_file = tmp_path / "test_with_n.extxyz"
    write(test_file, frames)
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"test_with_n.extxyz: the test data contain elements \[7\]"):
        train(_config(run, **{"data.test_file": str(test_file)}), log=_quiet)
    assert not (run / "split.npz").exists() and not (run / "last.pt").exists()


def test_a_run_directory_stands_for_its_best_checkpoint_and_bad_checkpoints_are_one_line(tmp_path, capsys):

    run = tmp_path / "run"
    train(_config(run, **{"training.max_epochs": 1}), log=_quiet)
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(run), "--data", str(EXAMPLE), "--out-dir", str(out)]) == 0
    assert (out / "metrics.json").is_file()
    capsys.readouterr()
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a checkpoint")
    payload = load_checkpoint(run / "best.pt")
    payload["model_config"]["n_features"] = 48  # weights of 24 features
    mismatched = tmp_path / "mismatched.pt"
    torch.save(payload, mismatched)
    for model, expected in [
        (tmp_path, "is a folder without best.pt"),
        (garbage, "not a readable so3krates checkpoint (not a file of tensors and plain data"),
        (mismatched, "the weights do not fit the model config"),
    ]:
        argv = ["evaluate", "--model", str(model), "--data", str(EXAMPLE), "--out-dir", str(tmp_path / "e")]
        assert main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0] and "weights_only" not in lines[0], lines


def test_non_finite_steps_are_skipped_and_too_many_in_a_row_stop(tmp_path, monkeypatch):
    """A NaN loss leaves weights, optimiser and EMA untouched; max_nonfinite_steps in a row end the run."""
    import so3krates.train.trainer as trainer_module
    from so3krates.errors import TrainingError

    real_loss = trainer_module.compute_loss
    calls = {"n": 0}
    poisoned = {3, 4}  # 0-based calls of the loss that return NaN

    def flaky_loss(predictions, labels, config):
        loss, parts = real_loss(predictions, labels, config)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] - 1 in poisoned else loss), parts

    monkeypatch.setattr(trainer_module, "compute_loss", flaky_loss)
    lines = []
    trainer = Trainer(_config(tmp_path / "run", **{"training.max_epochs": 1}), log=lines.append)
    trainer.run_dir.mkdir(parents=True)
    trainer._build()
    steps = iter(trainer._epoch_order(0)[i : i + 4] for i in range(0, 40, 4))
    for _ in range(3):
        trainer._train_step(next(steps))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    for _ in range(2):
        _, _, taken = trainer._train_step(next(steps))
        assert not taken
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert trainer.progress.skipped_steps == 2 and trainer.progress.step == 5
    _, _, taken = trainer._train_step(next(steps))
    assert taken and trainer.progress.consecutive_nonfinite == 0

    poisoned.update(range(0, 1000))  # from now on every step fails
    calls["n"] = 0
    with pytest.raises(TrainingError, match="3 steps in a row with a non-finite loss"):
        train(_config(tmp_path / "run2", **{"training.max_nonfinite_steps": 3}), log=lines.append)
    assert sum("update skipped" in line for line in lines) == 3


def _train_command(run_dir: Path, resume: bool = False) -> list[str]:
    import sys

    sets = {
        "run_dir": run_dir,
        "data.train_file": EXAMPLE,
        "data.n_train": 40,
        "data.n_valid": 8,
        "data.n_test": 0,
        "model.preset": "tiny",
        "training.max_epochs": 6,
        "training.batch_size": 4,
        "training.progress": False,
        "training.threads": 1,
    }
    config = run_dir.parent / "config.yaml"
    config.write_text("{}\n")
    command = [sys.executable, "-m", "so3krates", "train", str(config)]
    command += [f"--set={key}={value}" for key, value in sets.items()]
    return command + (["--resume"] if resume else [])


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_weights(tmp_path):
    """kill -9 a training three times at random moments (checkpoint writes included), resume each time:
    the final weights equal an uninterrupted run's exactly, and no checkpoint is ever unreadable."""
    import random
    import signal
    import subprocess
    import time

    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    (tmp_path / "straight").mkdir()
    subprocess.run(_train_command(tmp_path / "straight" / "run"), check=True, env=env, capture_output=True)
    run = tmp_path / "killed" / "run"
    run.parent.mkdir()
    rng = random.Random(7)
    kills = 0
    for attempt in range(3):
        process = subprocess.Popen(
            _train_command(run, resume=attempt > 0), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        # Wait for a checkpoint to exist (resuming needs one), then kill at a random later moment.
        deadline = time.monotonic() + 120
        while not (run / "last.pt").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait()
        progress = load_checkpoint(run / "last.pt")["progress"]  # readable after every kill
        assert progress["epoch"] <= 6
    assert kills >= 2, "the run finished before it could be killed; the test proves nothing"
    finished = subprocess.run(_train_command(run, resume=True), env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    for name in ("last.pt", "best.pt"):
        a, b = _weights(tmp_path / "straight" / "run" / name), _weights(run / name)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{name}: {key}")
    with open(run / "metrics.csv") as handle:
        assert [int(r["epoch"]) for r in csv.DictReader(handle)] == [1, 2, 3, 4, 5, 6]
    assert not list(run.glob(".*.tmp")), "temporary files of interrupted writes were left behind"
