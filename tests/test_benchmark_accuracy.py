"""The accuracy benchmark's decisions on what gets published: the sanity gate, the peers' log parsing."""

from __future__ import annotations

import json
import os
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "benchmarks" / "peers"))
accuracy = pytest.importorskip("accuracy")
cli_runner = pytest.importorskip("cli_runner")


def entry(curve: list[tuple[float, float]], budget: float = 900.0, **extra) -> dict:
    return {
        "budget_seconds": budget,
        "learning_curve": [{"wall_s": t, "valid_forces_mae_meV_per_A": f} for t, f in curve],
        **extra,
    }


def test_a_curve_that_keeps_improving_passes_the_gate():
    curve = [(60.0 * k, 100.0 * 0.9**k) for k in range(1, 15)]
    gate = accuracy.sanity_gate(entry(curve), best_force=10.0)
    assert gate["passed"] and gate["checked"]
    assert gate["flat_seconds"] <= 60.0


def test_a_plateau_far_above_the_best_model_fails_unless_investigated():
    # improves to 72 meV/Å by 5 min, then stays within 5 % for the remaining 10 min of a 15-min budget
    curve = [(60.0, 200.0), (180.0, 100.0), (300.0, 72.0)] + [(300.0 + 60.0 * k, 71.0) for k in range(1, 11)]
    gate = accuracy.sanity_gate(entry(curve), best_force=20.0)
    assert not gate["passed"]
    assert gate["flat_seconds"] == pytest.approx(600.0)
    assert gate["flat_span"]["from_s"] == 300.0
    investigated = accuracy.sanity_gate(
        entry(curve, investigation="checked with the package's example"), 20.0
    )
    assert investigated["passed"]


def test_a_plateau_near_the_best_model_is_not_a_failure():
    curve = [(60.0, 50.0), (120.0, 30.0)] + [(120.0 + 60.0 * k, 29.5) for k in range(1, 13)]
    assert accuracy.sanity_gate(entry(curve), best_force=20.0)["passed"]  # 30 < 2 × 20


def test_a_result_without_a_learning_curve_is_not_published_as_checked():
    gate = accuracy.sanity_gate({"budget_seconds": 900.0, "learning_curve": []}, best_force=20.0)
    assert not gate["passed"] and not gate["checked"]


def test_the_table_withholds_a_number_that_failed_the_gate():
    flat = [(60.0 * k, 80.0) for k in range(1, 15)]
    good = [(60.0 * k, 100.0 * 0.8**k) for k in range(1, 15)]
    test = {"energy_mae_meV": 5.0, "forces_mae_meV_per_A": 20.0}
    results = {
        "molecule": "ethanol",
        "protocol": {
            "n_train": 950,
            "n_valid": 50,
            "train_file": "t",
            "test_file": "s",
            "split_seed": 0,
            "n_test": 1,
        },
        "machine": {"cpu": "x", "cores": 2, "threads_per_model": 2, "torch": "2"},
        "models": {
            "so3krates": entry(good, test=test),
            "mace-small": entry(flat, test={"energy_mae_meV": 9.0, "forces_mae_meV_per_A": 78.5}),
        },
    }
    table = accuracy.markdown_table(accuracy.apply_gate(results))
    assert "78.50" not in table and "(withheld)" in table and "20.00" in table


def test_peer_learning_curve_reads_validations_and_skips_batch_lines(tmp_path):
    log = tmp_path / "train.log"
    log.write_text(
        "2026-12-03 10:00:00.000 INFO: Started training, reporting errors on validation set\n"
        "2026-12-03 10:00:05.000 INFO: Initial: head: Default, loss=64.0, MAE_E=358.07 meV\n"
        "2026-12-03 10:01:05.500 INFO: Epoch 0: head: Default, loss=0.59, MAE_E=4390.36 meV\n"
    )
    metrics = tmp_path / "metrics.txt"
    lines = [
        {"loss": 64.0, "mae_e": 0.358, "mae_f": 0.93, "mode": "eval", "epoch": None},
        {"loss": 1600.0, "time": 0.5, "mode": "opt", "epoch": 0},  # MACE logs every batch too
        {"loss": 0.59, "mae_e": 4.39, "mae_f": 0.0908, "mode": "eval", "epoch": 0},
    ]
    metrics.write_text("\n".join(json.dumps(x) for x in lines) + '\n{"loss": 0.5, "mae')  # cut by a kill
    t0 = cli_runner.log_time("2026-12-03 10:00:00.000")
    curve = cli_runner.learning_curve(log, metrics, t0)
    assert [c["epochs_completed"] for c in curve] == [0, 1]
    assert curve[1]["wall_s"] == pytest.approx(65.5)
    assert curve[1]["valid_mae_f_meV_per_A"] == pytest.approx(90.8)


def _checkpoint(path: Path) -> Path:
    """A complete checkpoint as torch.save writes it: a zip archive."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", b"x" * 64)
    return path


def test_checkpoint_of_the_highest_epoch_is_the_one_finalised(tmp_path):
    for name in ("rmd17_run-0_epoch-3.pt", "rmd17_run-0_epoch-12.pt", "rmd17_run-1_epoch-40.pt", "other.pt"):
        _checkpoint(tmp_path / name)
    path, epoch = cli_runner.latest_checkpoint(tmp_path, "rmd17_run-0")
    assert epoch == 12 and path.name == "rmd17_run-0_epoch-12.pt"
    assert cli_runner.latest_checkpoint(tmp_path, "rmd17") is None
    # MACE's Stage Two checkpoints carry "_swa": apart from the stage-one ones
    _checkpoint(tmp_path / "rmd17_run-0_epoch-13_swa.pt")
    assert cli_runner.latest_checkpoint(tmp_path, "rmd17_run-0")[1] == 12
    assert cli_runner.latest_checkpoint(tmp_path, "rmd17_run-0", "_swa")[1] == 13


def test_a_checkpoint_cut_short_by_the_stop_is_skipped_and_set_aside(tmp_path):
    _checkpoint(tmp_path / "rmd17_run-0_epoch-3.pt")
    whole = _checkpoint(tmp_path / "rmd17_run-0_epoch-4.pt").read_bytes()
    (tmp_path / "rmd17_run-0_epoch-4.pt").write_bytes(whole[: len(whole) // 2])  # killed while writing
    assert cli_runner.latest_checkpoint(tmp_path, "rmd17_run-0")[1] == 3
    assert (tmp_path / "rmd17_run-0_epoch-4.pt").exists()  # while the peer may still be writing: untouched
    assert cli_runner.latest_checkpoint(tmp_path, "rmd17_run-0", set_aside=True)[1] == 3
    # the peer's own restart, which takes the highest epoch on disk, can no longer pick it
    assert not (tmp_path / "rmd17_run-0_epoch-4.pt").exists()
    assert (tmp_path / "rmd17_run-0_epoch-4.pt.incomplete").exists()


def _sleeper(tmp_path, ready_after: float | None) -> tuple[list[str], Path]:
    """A process that runs 30 s and, after `ready_after` s, writes the file the runner waits for."""
    flag = tmp_path / "checkpoint.pt"
    code = "import time, pathlib; "
    if ready_after is not None:
        code += f"time.sleep({ready_after}); pathlib.Path({str(flag)!r}).write_text('x'); "
    code += "time.sleep(30)"
    return [sys.executable, "-c", code], flag


@pytest.mark.parametrize("ready_after, stopped_by", [(1.5, "budget"), (None, "budget (never ready)")])
def test_a_run_that_is_not_ready_at_its_budget_runs_on_until_it_is_or_the_whole_budget(
    tmp_path, ready_after, stopped_by
):
    command, flag = _sleeper(tmp_path, ready_after)
    run = cli_runner.run_watched(
        command, tmp_path / "log.txt", tmp_path, dict(os.environ), 0.5, 1.0, ready=flag.exists, extend_to=3.0
    )
    assert run["stopped_by"] == stopped_by
    overrun = run["budget_overrun_s"]
    assert (1.0 <= overrun < 2.0) if ready_after else (2.5 <= overrun < 3.5)
    assert run["signals"][0]["signal"] == "SIGINT"


def test_mace_stage_two_adds_its_time_and_stop_to_the_training_record():
    mace_cli = pytest.importorskip("mace_cli_rmd17")
    curve = [
        {"epoch": None, "epochs_completed": 0, "wall_s": 1.0},
        {"epoch": 0, "epochs_completed": 1, "wall_s": 80.0},
        {"epoch": 0, "epochs_completed": 2, "wall_s": 170.0, "stage": 2},
    ]
    record = {
        "setup_seconds": 3.0,
        "train_seconds": 90.0,
        "wall_seconds": 93.0,
        "cpu_seconds": 180.0,
        "stopped_by": "budget",
        "signals": [{"signal": "SIGINT"}],
        "best_epoch": 0,
        "best_valid": curve[1],
        "learning_curve": curve,
    }
    run = {"started": 100.0, "loop_started": 104.0, "ended": 194.0, "cpu_seconds": 170.0}
    run |= {"stopped_by": "budget", "signals": [{"signal": "SIGTERM"}]}
    record["best_valid"] = cli_runner.training_record(
        {"started": 0.0, "loop_started": 3.0, "ended": 93.0, "cpu_seconds": 180.0, "stopped_by": "budget"}
        | {"signals": [{"signal": "SIGINT"}], "returncode": 0},
        curve,
        Path("rmd17_run-0_epoch-0_swa.pt"),
        0,
        "mace_run_train",
    )["best_valid"]
    combined = mace_cli.combine_stages(record, {"ran": True}, run)
    assert combined["train_seconds"] == 180.0 and combined["setup_seconds"] == 7.0
    assert combined["wall_seconds"] == 187.0 and combined["cpu_seconds"] == 350.0
    assert [s["signal"] for s in combined["signals"]] == ["SIGINT", "SIGTERM"]
    assert combined["best_valid"] is curve[2]  # the resumed run's epoch 0, not the first run's
    assert combined["stage_two"]["first_run"]["train_seconds"] == 90.0


def test_mace_runner_keeps_maces_own_error_tables():
    mace_cli = pytest.importorskip("mace_cli_rmd17")
    log = (
        "2026-12-03 19:52:50.733 INFO: Error-table on TEST:\n"
        "+-----------------+-------------+\n"
        "|   config_type   | MAE E / meV |\n"
        "| Default_Default |     4389.8  |\n"
        "+-----------------+-------------+\n"
        "2026-12-03 19:54:56.050 INFO: Done\n"
    )
    rows = mace_cli.mace_error_tables(log)
    assert rows[0] == "Error-table on TEST:" and len(rows) == 5 and "4389.8" in rows[3]


def test_a_runner_refuses_to_replace_an_earlier_run_or_a_bad_budget(tmp_path):
    import argparse

    args = argparse.Namespace(
        out=str(tmp_path), overwrite=False, budget_minutes=15.0, threads=1, molecule="x"
    )
    (tmp_path / "result.json").write_text("{}")
    with pytest.raises(SystemExit, match="holds an earlier run"):
        cli_runner.check_common_arguments(args, tmp_path, rmd17=False)
    args.overwrite, args.budget_minutes = True, -1.0
    with pytest.raises(SystemExit, match="must be positive"):
        cli_runner.check_common_arguments(args, tmp_path, rmd17=False)


def test_a_reused_run_keeps_the_date_and_investigation_of_its_training_not_of_the_re_evaluation(tmp_path):
    run = {"run_dir": "/runs/aspirin/so3krates", "budget_seconds": 900.0}
    old = {
        **run,
        "date": "2026-12-03T22:10:11+00:00",
        "load_average_1min": {"before": 1.0, "after": 0.9},
        "investigation": "flat because ...",
        "test": {"forces_mae_meV_per_A": 40.0},
    }
    path = tmp_path / "accuracy_aspirin.json"
    path.write_text(json.dumps({"models": {"so3krates": old}}))
    assert accuracy.previous_entry(path, "so3krates", dict(run))["date"] == old["date"]
    fresh = {**run, "date": "2026-12-04T09:00:00+00:00", "test": {"forces_mae_meV_per_A": 39.0}}
    kept = accuracy.keep_run_facts(fresh, accuracy.previous_entry(path, "so3krates", dict(run)))
    # the re-evaluation's own numbers and date win; the run's investigation and load are carried over
    assert kept["test"] == fresh["test"] and kept["date"] == fresh["date"]
    assert kept["investigation"] == old["investigation"]
    assert kept["load_average_1min"] == old["load_average_1min"]
    assert accuracy.keep_run_facts({**run}, old)["date"] == old["date"]
    # another budget, another folder, another model or no file: nothing to carry over
    assert accuracy.previous_entry(path, "so3krates", {**run, "budget_seconds": 600.0}) == {}
    assert accuracy.previous_entry(path, "so3krates", {**run, "run_dir": "/elsewhere"}) == {}
    assert accuracy.previous_entry(path, "mace-small", dict(run)) == {}
    assert accuracy.previous_entry(tmp_path / "missing.json", "so3krates", dict(run)) == {}


def test_a_model_that_finished_no_epoch_is_reported_as_such_and_the_row_still_counts(tmp_path):
    def molecule(name, models):
        return {"molecule": name, "models": models}

    good = [(60.0 * k, 100.0 * 0.8**k) for k in range(1, 15)]
    ours = entry(good, test={"energy_mae_meV": 5.0, "forces_mae_meV_per_A": 20.0})
    peer = entry(good, test={"energy_mae_meV": 9.0, "forces_mae_meV_per_A": 30.0})
    slow = {"budget_seconds": 900.0, "outcome": "no epoch completed within the budget", "epochs": 0}
    (tmp_path / "accuracy_aspirin.json").write_text(
        json.dumps(molecule("aspirin", {"so3krates": ours, "mace-large": slow, "mace-small": peer}))
    )
    text, _ = accuracy.summary(tmp_path)
    assert "no epoch completed within the budget" in text
    assert "**20.0 / 5.0**" in text  # a complete row: ours is the lowest of the models that have a number
    assert "so3krates 1" in text


def test_a_table_whose_models_trained_on_different_cpus_says_which_on_which(tmp_path):
    curve = [(60.0 * k, 100.0 * 0.8**k) for k in range(1, 15)]
    test = {"energy_mae_meV": 5.0, "forces_mae_meV_per_A": 20.0}
    results = {
        "molecule": "ethanol",
        "protocol": {"n_train": 950, "n_valid": 50, "train_file": "t", "test_file": "s", "split_seed": 0},
        "machine": {"cpu": "Xeon", "cores": 2, "threads_per_model": 2, "torch": "2"},
        "models": {"so3krates": entry(curve, test=test), "mace-small": entry(curve, test=test)},
    }
    results["protocol"]["n_test"] = 1
    # entries from before the CPU was recorded count as the header's
    assert "Machine: Xeon," in accuracy.markdown_table(results)
    assert "same CPU" not in accuracy.markdown_table(results)
    results["models"]["mace-small"]["cpu"] = "EPYC"
    table = accuracy.markdown_table(results)
    assert "Machine: several CPUs" in table
    assert "so3krates on Xeon; mace-small on EPYC" in table
    (tmp_path / "accuracy_ethanol.json").write_text(json.dumps(results))
    text, _ = accuracy.summary(tmp_path)
    assert "ethanol: not every model trained on the same CPU" in text
    # a reused run keeps the CPU it trained on
    assert "cpu" in accuracy.RUN_FACTS


def test_peers_get_each_molecule_at_its_centroid_with_unchanged_labels(tmp_path):
    """rMD17 benzene sits ~20 Å from the origin, which made so3krates-torch's neighbour list crawl."""
    coords = np.random.default_rng(0).normal(size=(3, 4, 3)) + np.array([-20.0, 21.0, -19.0])
    forces = np.random.default_rng(1).normal(size=(3, 4, 3))
    npz = tmp_path / "rmd17_test.npz"
    np.savez(
        npz, coords=coords, forces=forces, energies=np.array([1.0, 2.0, 3.0]), nuclear_charges=[6, 6, 1, 1]
    )
    assert cli_runner.write_frames(npz, [2, 0], tmp_path / "frames.xyz") == 2
    written = cli_runner.xyz_reference(tmp_path / "frames.xyz")
    np.testing.assert_allclose(written["positions"].mean(axis=1), 0.0, atol=1e-7)  # extxyz: 8 decimals
    expected = coords[[2, 0]] - coords[[2, 0]].mean(axis=1, keepdims=True)
    np.testing.assert_allclose(written["positions"], expected, atol=1e-7)
    labels = forces[[2, 0]] * cli_runner.EV_PER_KCAL_MOL
    np.testing.assert_allclose(written["forces"], labels, rtol=1e-6, atol=1e-7)
    reference = cli_runner.npz_reference(npz)
    np.testing.assert_allclose(reference["positions"][[2, 0]], written["positions"], atol=1e-7)


def test_the_speed_table_takes_each_peer_at_its_faster_thread_count():
    """speed.py --peer-threads best: a peer also runs on one thread and the faster count is the one in the
    table (so3krates-torch's molecules were 2–3× slower on two threads here); ours keep --threads."""
    import argparse

    speed = pytest.importorskip("speed")
    args = argparse.Namespace(threads=2, peer_threads="best")
    assert speed.thread_counts("so3krates-torch", args) == [2, 1]
    assert speed.thread_counts("so3krates-aoti", args) == [2]
    assert speed.thread_counts("so3krates-torch", argparse.Namespace(threads=2, peer_threads="same")) == [2]
    assert speed.thread_counts("so3krates-torch", argparse.Namespace(threads=1, peer_threads="best")) == [1]
    two = {"ef_ms": {"median": 43.3}, "threads": 2}
    one = {"ef_ms": {"median": 16.7}, "threads": 1}
    best = speed.faster_thread_count({2: two, 1: one})
    assert best["threads"] == 1 and best["ef_ms"]["median"] == 16.7
    assert best["ef_ms_by_threads"] == {"2": 43.3, "1": 16.7}
    failed = speed.faster_thread_count({2: two, 1: {"error": "timeout"}})
    assert failed["threads"] == 2
    results = {
        "machine": {"cpu": "test", "torch": "2.13"},
        "date": "2026-12-04",
        "commit": "x",
        "threads": 2,
        "peer_threads": "best",
        "dtype": "float32",
        "models": ["so3krates-aoti", "so3krates-torch"],
        "cases": {
            "3bpa": {
                "n_atoms": 27,
                "n_edges": 446,
                "so3krates-aoti": {"ef_ms": {"median": 4.08}},
                "so3krates-torch": best,
            }
        },
        "matmul_gflops": {"float32": 100.0, "float64": 50.0},
    }
    table = speed.markdown(results)
    assert "16.70 (4.1×), 1 thread" in table


def test_the_convergence_report_tells_a_run_stopped_by_hand_from_a_finished_one(tmp_path):
    converge = pytest.importorskip("converge")
    log = tmp_path / "train_log.txt"
    log.write_text("[2026-12-05 01:24] $ so3krates train ...\nepoch 1 ...\nstopped by signal SIGINT\n")
    assert converge.stop_reason(log) == "stopped by signal SIGINT"
    with log.open("a") as handle:  # a later process (a resume) that is still running
        handle.write("[2026-12-05 02:00] $ so3krates train ... --resume\nepoch 2 ...\n")
    assert converge.stop_reason(log) is None
    record = {
        "molecule": "ethanol",
        "date": "2026-12-05",
        "commit": "abc",
        "machine": {"cpu": "test"},
        "finished": False,
        "stop_reason": "stopped by signal SIGINT",
        "epochs": 2,
        "train_hours": 1.0,
        "best_epoch": 2,
        "final_learning_rate": 1e-5,
        "learning_rate_at_floor": True,
        "test": {"energy_mae_meV": 1.0, "forces_mae_meV_per_A": 7.0},
        "fifteen_minutes": None,
        "paper": None,
        "paper_source": "",
    }
    text = converge.markdown(record)
    assert "the same command resumes it), with the learning rate at its floor" in text
    assert "still training" not in text and "While it runs" not in text
    running = converge.markdown({**record, "stop_reason": "still training (report of the run so far)"})
    assert "**still training**" in running and "While it runs" in running
