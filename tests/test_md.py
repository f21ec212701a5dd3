"""Molecular dynamics (``so3krates md``): energy conservation, thermostats, the stability monitor, replicas,
exact restarts, refusals, the output files and the command line.

The model is the untrained ``tiny`` preset: a smooth potential (good for conservation and mechanics) with
no chemistry, so a molecule comes apart within ~10–40 fs at 300 K. Tests of the integrators therefore turn
the stability monitor off; the monitor's own tests use exactly that break-up.
"""

from __future__ import annotations

import argparse
import json
import re

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule

from helpers import ethanol, make_force_field, triclinic_cell
from so3krates import preset
from so3krates.cli.md import register
from so3krates.errors import ConfigError, DataError
from so3krates.md import MDConfig, StabilityMonitor, load_md_config, run_md
from so3krates.md.output import THERMO_COLUMNS, load_state, read_thermo
from so3krates.model.checkpoint import save_checkpoint

QUIET = {"progress": False}
NO_MONITOR = {"stability": {"enabled": False}}


def _log(lines: list[str]):
    return lines.append


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny float64 checkpoint and three start structures: ethanol, a periodic cell, an ideal gas."""
    root = tmp_path_factory.mktemp("md")
    paths = {"model": root / "tiny.pt", "ethanol": root / "ethanol.extxyz", "cell": root / "cell.extxyz"}
    save_checkpoint(paths["model"], make_force_field(preset("tiny"), torch.float64).model, species=[1, 6, 8])
    ase.io.write(paths["ethanol"], ethanol())
    ase.io.write(paths["cell"], triclinic_cell())
    # 125 atoms 8 Å apart: no pair within cutoff + skin, so no forces at all — an ideal gas.
    grid = np.stack(np.meshgrid(*[np.arange(5)] * 3, indexing="ij"), -1).reshape(-1, 3) * 8.0
    paths["gas"] = root / "gas.extxyz"
    ase.io.write(paths["gas"], Atoms(numbers=np.resize([1, 6, 8], len(grid)), positions=grid))
    return paths


def _config(files, tmp_path, structure="ethanol", **values) -> MDConfig:
    return load_md_config(
        {
            "model": files["model"],
            "structure": files[structure],
            "output_dir": tmp_path / "run",
            **QUIET,
            **values,
        }
    )


def test_nve_conserves_energy_and_writes_parseable_outputs(files, tmp_path):
    config = _config(
        files, tmp_path, timestep_fs=0.25, n_steps=200, thermo_every=1, trajectory_every=20, **NO_MONITOR
    )
    lines = []
    result = run_md(config, log=_log(lines))
    run_dir = tmp_path / "run"
    (run,) = result.runs
    assert run.status == "completed" and run.steps_done == 200

    thermo = read_thermo(run_dir / "thermo.csv")
    assert tuple(thermo) == THERMO_COLUMNS
    np.testing.assert_array_equal(thermo["step"], np.arange(201))
    np.testing.assert_allclose(thermo["time_ps"], thermo["step"] * 0.25e-3)
    assert thermo["T_K"][0] == pytest.approx(300.0, rel=1e-12)  # rescaled exactly, over 3N − 3 = 24 dof
    np.testing.assert_allclose(thermo["E_conserved_eV"], thermo["E_pot_eV"] + thermo["E_kin_eV"], rtol=1e-14)
    # Measured: E_kin std 0.045 eV, E_pot + E_kin 1e-6 eV peak to peak, drift ≈ 2e-6 eV/atom/ps.
    kinetic_spread = np.std(thermo["E_kin_eV"])
    assert kinetic_spread > 0.01
    assert np.ptp(thermo["E_conserved_eV"]) < 1e-4 * kinetic_spread
    assert abs(run.drift_eV_per_atom_per_ps) < 1e-4

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["stable"] and summary["failure"] is None
    assert summary["conserved_energy_drift_eV_per_atom_per_ps"] == pytest.approx(run.drift_eV_per_atom_per_ps)
    assert json.loads((run_dir / "config.json").read_text())["ensemble"] == "nve"
    assert (run_dir / "thermo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert int(load_state(run_dir / "restart.npz")["step"]) == 200

    frames = ase.io.read(run_dir / "trajectory.extxyz", index=":")
    assert [f.info["step"] for f in frames] == list(range(0, 201, 20))
    for atoms in frames:
        row = int(atoms.info["step"])
        assert atoms.get_potential_energy() == pytest.approx(thermo["E_pot_eV"][row], rel=1e-12)
        assert atoms.get_forces().shape == (9, 3)
        assert atoms.get_kinetic_energy() == pytest.approx(thermo["E_kin_eV"][row], rel=1e-6)
    assert any("completed 200 steps" in line and "drift" in line for line in lines)


def test_langevin_brings_an_ideal_gas_to_the_target_temperature(files, tmp_path):
    """Free particles (zero forces) isolate the thermostat: friction and temperature units, 3N − 3 dof."""
    config = _config(
        files,
        tmp_path,
        structure="gas",
        ensemble="langevin",
        velocities="zero",
        temperature_K=300.0,
        friction_per_fs=0.1,
        timestep_fs=0.5,
        n_steps=200,
        thermo_every=1,
    )
    run_md(config, log=_log([]))
    thermo = read_thermo(tmp_path / "run" / "thermo.csv")
    assert thermo["T_K"][0] == 0.0
    # Kinetic energy relaxes at rate 2γ = 0.2/fs; average after 25 fs (5 relaxation times). Over 8 seeds this
    # mean was 300.0 K with a spread of 6.5 K between seeds, so ±20 K is a 3σ band.
    late = thermo["T_K"][thermo["time_ps"] >= 0.025]
    assert np.mean(late) == pytest.approx(300.0, abs=20.0)


def test_stability_monitor_stops_a_run_that_breaks_apart(files, tmp_path):
    config = _config(
        files, tmp_path, temperature_K=1000.0, n_steps=200, trajectory_every=5, stability={"check_every": 5}
    )
    lines = []
    (run,) = run_md(config, log=_log(lines)).runs
    run_dir = tmp_path / "run"
    assert run.status == "unstable" and not run.stable
    failure = run.failure
    assert failure.kind == "bond" and "outside its reference" in failure.reason
    assert 0 < failure.step < 200 and failure.step % 5 == 0
    assert failure.time_ps == pytest.approx(failure.step * 0.5e-3)
    assert run.last_good_step == failure.step - 5

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "unstable"
    assert summary["failure"]["step"] == failure.step
    assert summary["failure_time_ps"] == pytest.approx(failure.time_ps)
    last_good = ase.io.read(run_dir / "last_good.extxyz")
    state = load_state(run_dir / "restart.npz")
    assert last_good.info["step"] == run.last_good_step == int(state["step"])
    np.testing.assert_allclose(last_good.positions, state["positions"], atol=1e-6)
    monitor = StabilityMonitor(ase.io.read(files["ethanol"]))
    assert monitor.check(last_good, run.last_good_step, 0.0) is None  # the last good frame is good
    assert any(line.startswith(f"UNSTABLE at step {failure.step}") for line in lines)


def test_replicas_summarise_the_fraction_stable_and_the_time_to_failure(files, tmp_path):
    config = _config(files, tmp_path, n_steps=50, replicas=3, seed=0, stability={"check_every": 5})
    result = run_md(config, log=_log([]))
    run_dir = tmp_path / "run"
    assert [run.directory.name for run in result.runs] == ["replica_000", "replica_001", "replica_002"]
    assert [run.seed for run in result.runs] == [0, 1, 2]
    final = [load_state(run.directory / "restart.npz")["positions"] for run in result.runs]
    assert not np.array_equal(final[0], final[1]) and not np.array_equal(final[1], final[2])
    failed = [run for run in result.runs if not run.stable]
    assert failed, "the untrained model should break ethanol apart at 300 K within 25 fs in some replica"

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["replicas"] == 3 and summary["n_stable"] == 3 - len(failed)
    assert summary["fraction_stable"] == pytest.approx(1 - len(failed) / 3)
    assert result.fraction_stable == pytest.approx(summary["fraction_stable"])
    mean_failure = np.mean([run.failure.time_ps for run in failed])
    assert summary["mean_time_to_failure_ps"] == pytest.approx(mean_failure)
    assert result.mean_time_to_failure_ps == pytest.approx(mean_failure)
    survival = summary["survival"]
    assert survival["fraction_stable"][0] == 1.0 and survival["time_ps"][-1] == pytest.approx(0.025)
    assert survival["fraction_stable"][-1] == pytest.approx(summary["fraction_stable"])
    assert [r["seed"] for r in summary["runs"]] == [0, 1, 2]
    assert (run_dir / "stability.png").read_bytes()[:4] == b"\x89PNG"
    for run in result.runs:
        assert (run.directory / "thermo.csv").is_file() and (run.directory / "summary.json").is_file()


@pytest.fixture(scope="module")
def continuous_runs(files, tmp_path_factory):
    """One 20-step run per ensemble, to compare restarts with and to check conserved quantities on."""
    runs = {}
    for ensemble in ("nve", "langevin", "nose-hoover", "bussi", "npt"):
        out = tmp_path_factory.mktemp(ensemble)
        config = _restart_config(files, out, ensemble, n_steps=20)
        run_md(config, log=_log([]))
        runs[ensemble] = out / "run"
    return runs


def _restart_config(files, tmp_path, ensemble, n_steps):
    return _config(
        files,
        tmp_path,
        structure="cell" if ensemble == "npt" else "ethanol",
        ensemble=ensemble,
        timestep_fs=0.25,
        n_steps=n_steps,
        thermo_every=1,
        trajectory_every=5,
        restart_every=5,
        tdamp_fs=5.0,
        pdamp_fs=20.0,
        **NO_MONITOR,
    )


@pytest.mark.parametrize("ensemble", ["nve", "langevin", "nose-hoover", "bussi", "npt"])
def test_restart_is_exact(files, tmp_path, continuous_runs, ensemble):
    """10 steps, a crash that left rows and a half frame after the state, a restart for 10 more = 20 steps."""
    run_md(_restart_config(files, tmp_path, ensemble, n_steps=10), log=_log([]))
    run_dir = tmp_path / "run"
    with open(run_dir / "thermo.csv", "a") as handle:
        handle.write("11,0.00275,1.0,2.0")  # a torn row written after the state, before a crash
    with open(run_dir / "trajectory.extxyz", "a") as handle:
        handle.write("9\nProperties=species:S:1:pos:R:3\nC 0.0 0.0\n")
    lines = []
    run_md(_restart_config(files, tmp_path, ensemble, n_steps=20), log=_log(lines), restart=True)
    assert any("restart from step 10" in line for line in lines)

    reference, restarted = continuous_runs[ensemble], run_dir
    a, b = load_state(reference / "restart.npz"), load_state(restarted / "restart.npz")
    assert int(a["step"]) == int(b["step"]) == 20
    np.testing.assert_array_equal(a["positions"], b["positions"])
    np.testing.assert_array_equal(a["momenta"], b["momenta"])
    np.testing.assert_array_equal(a["cell"], b["cell"])
    for name in ("thermo.csv", "trajectory.extxyz"):
        assert (reference / name).read_bytes() == (restarted / name).read_bytes(), name
    assert json.loads((restarted / "summary.json").read_text())["restarted_from_step"] == 10


@pytest.mark.parametrize("ensemble", ["nose-hoover", "bussi", "npt"])
def test_thermostats_log_their_conserved_quantity(continuous_runs, ensemble):
    """With a 5 fs thermostat E_pot + E_kin changes in 5 fs; the logged conserved energy does not.

    Measured (peak to peak, eV): E_pot + E_kin 6e-4 / 0.12 / 5e-3, conserved energy 6e-8 / 7e-8 / 1.3e-6 for
    Nosé–Hoover / Bussi / NPT.
    """
    thermo = read_thermo(continuous_runs[ensemble] / "thermo.csv")
    exchanged = np.ptp(thermo["E_pot_eV"] + thermo["E_kin_eV"])
    assert exchanged > 1e-4
    assert np.ptp(thermo["E_conserved_eV"]) < 1e-3 * exchanged
    if ensemble == "npt":
        assert np.ptp(thermo["volume_A3"]) > 0


def test_npt_refuses_a_molecule(files, tmp_path):
    with pytest.raises(ConfigError, match=r"ensemble 'npt' needs a periodic cell"):
        run_md(_config(files, tmp_path, ensemble="npt"), log=_log([]))
    assert not (tmp_path / "run").exists()


def test_refusals(files, tmp_path):
    run_md(_config(files, tmp_path, n_steps=2, **NO_MONITOR), log=_log([]))
    with pytest.raises(ConfigError, match="already holds an MD run; continue it with --restart"):
        run_md(_config(files, tmp_path, n_steps=2), log=_log([]))
    with pytest.raises(ConfigError, match="nothing to restart from"):
        run_md(_config(files, tmp_path / "other", n_steps=2), log=_log([]), restart=True)
    with pytest.raises(ConfigError, match="give n_steps or time_ps, not both"):
        _config(files, tmp_path, n_steps=2, time_ps=1.0)
    with pytest.raises(ConfigError, match=r"key 'stability\.check_evry': Extra inputs are not permitted"):
        _config(files, tmp_path, stability={"check_evry": 2})
    missing = {"model": files["model"], "structure": tmp_path / "missing.xyz", "output_dir": tmp_path / "m"}
    with pytest.raises(DataError, match=r"missing\.xyz: structure file not found"):
        run_md(load_md_config(missing), log=_log([]))
    with pytest.raises(DataError, match="has no momenta"):
        run_md(_config(files, tmp_path / "v", velocities="file"), log=_log([]))
    ase.io.write(tmp_path / "ammonia.xyz", molecule("NH3"))
    unknown = {"model": files["model"], "structure": tmp_path / "ammonia.xyz", "output_dir": tmp_path / "n"}
    with pytest.raises(DataError, match=r"ammonia\.xyz: frame 0: element N \(Z=7\) was not in the training"):
        run_md(load_md_config(unknown), log=_log([]))
    assert not (tmp_path / "v").exists() and not (tmp_path / "n").exists()  # refused before writing
    assert _config(files, tmp_path, time_ps=0.1, timestep_fs=0.25).total_steps == 400


def test_a_start_far_outside_any_training_data_is_refused(files, tmp_path):
    """E.g. a molecule in a periodic cell smaller than itself, where a trained model gave 10¹⁶ eV: forces
    beyond 1000 eV/Å at the start are refused with the cell named, before anything is written. (The untrained
    tiny model stays tame there, so its energy scale is blown up instead.)"""
    model = make_force_field(preset("tiny"), torch.float64).model
    with torch.no_grad():
        model.readout.energy_scale.mul_(1e6)
    save_checkpoint(tmp_path / "wild.pt", model, species=[1, 6, 8])
    config = load_md_config(
        {"model": tmp_path / "wild.pt", "structure": files["cell"], "output_dir": tmp_path / "run", **QUIET}
    )
    lengths = ", ".join(f"{length:.3g}" for length in triclinic_cell().cell.lengths())
    with pytest.raises(
        DataError, match=rf"forces up to .* eV/Å .* far outside .*periodic cell of {lengths} Å"
    ):
        run_md(config, log=_log([]))
    assert not (tmp_path / "run").exists()


def test_a_model_error_in_the_middle_of_a_run_ends_it_with_its_records(files, tmp_path, monkeypatch):
    """E.g. a neighbour list of atoms that flew to 10¹⁵ Å: status, summary.json, last_good.extxyz and a
    restart state of the last good frame, not a traceback."""
    from so3krates.calculators.ase import So3kratesCalculator

    calculate = So3kratesCalculator.calculate
    calls = {"n": 0}

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 25:
            raise DataError("neighbour list: a coordinate of 8.21e+14 Å is beyond ±1e+10 Å")
        return calculate(self, *args, **kwargs)

    monkeypatch.setattr(So3kratesCalculator, "calculate", failing)
    (run,) = run_md(_config(files, tmp_path, n_steps=40, **NO_MONITOR), log=_log([])).runs
    assert run.status == "unstable" and run.failure.kind == "model-refused"
    assert "coordinate of 8.21e+14" in run.failure.reason
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "unstable"
    assert (tmp_path / "run" / "last_good.extxyz").is_file()
    assert int(load_state(tmp_path / "run" / "restart.npz")["step"]) == run.last_good_step


def test_a_restart_from_step_zero_does_not_repeat_it(files, tmp_path):
    """A run killed before its first restart interval left restart.npz of step 0 (with thermo row 0 and
    frame 0 written): the continued run must not log step 0 twice."""
    from so3krates import So3kratesCalculator
    from so3krates.md.run import Trajectory, read_structure

    config = _config(files, tmp_path, n_steps=20, restart_every=1000, thermo_every=5, **NO_MONITOR)
    run_dir = tmp_path / "run"
    uninterrupted = tmp_path / "straight"
    run_md(config.model_copy(update={"output_dir": uninterrupted}), log=_log([]))
    structure = read_structure(files["ethanol"], 0)
    calculator = So3kratesCalculator(files["model"], min_distance=0.0)
    started = Trajectory(config, structure, calculator, run_dir, 0, None, _log([]))
    started.total = 0  # killed right after the start: row 0, frame 0 and restart.npz of step 0
    started.run()
    assert int(load_state(run_dir / "restart.npz")["step"]) == 0
    run_md(config, log=_log([]), restart=True)
    steps = [line.split(",")[0] for line in (run_dir / "thermo.csv").read_text().splitlines()[1:]]
    assert steps == ["0", "5", "10", "15", "20"], steps
    assert (run_dir / "thermo.csv").read_text() == (uninterrupted / "thermo.csv").read_text()


def test_the_thermo_plot_does_not_call_langevin_energies_conserved(monkeypatch, tmp_path):
    from so3krates.md import output

    labels = {}

    def keep(figure, path, dpi=110):
        labels[path.name] = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]

    monkeypatch.setattr(output, "save_figure", keep)
    thermo = {key: np.arange(3.0) for key in ("time_ps", "E_pot_eV", "E_kin_eV", "E_conserved_eV", "T_K")}
    thermo["step"] = np.arange(3)
    output.plot_thermo(tmp_path / "nve.png", thermo, 9, None)
    output.plot_thermo(tmp_path / "langevin.png", thermo, 9, 300.0, conserving=False)
    assert labels["nve.png"][-1] == "conserved"
    assert labels["langevin.png"][-1] == "E_pot + E_kin (not conserved)"


# -- the stability monitor on its own ---------------------------------------------------------------------


def test_monitor_finds_the_covalent_bonds_and_a_broken_one():
    atoms = ethanol()
    monitor = StabilityMonitor(atoms)
    assert monitor.n_bonds == 8  # C–C, C–O, O–H and five C–H
    stretched = atoms.copy()
    i, j = monitor.bonds[0]
    direction = stretched.positions[j] - stretched.positions[i]
    stretched.positions[j] += 0.4 * direction / np.linalg.norm(direction)
    assert monitor.check(stretched, step=10, time_ps=0.005) is None
    stretched.positions[j] += 0.2 * direction / np.linalg.norm(direction)
    failure = monitor.check(stretched, step=20, time_ps=0.01)
    assert failure.kind == "bond" and failure.step == 20 and failure.time_ps == 0.01
    assert f"{i}–" in failure.reason and "stretched" in failure.reason
    assert monitor.failure == failure


def test_monitor_reference_range_over_the_first_steps():
    atoms = ethanol()
    monitor = StabilityMonitor(atoms, reference_steps=10)
    i, j = monitor.bonds[0]
    unit = (atoms.positions[j] - atoms.positions[i]) / np.linalg.norm(atoms.positions[j] - atoms.positions[i])
    atoms.positions[j] += 0.3 * unit
    assert monitor.check(atoms, step=5, time_ps=0.0) is None  # widens the range to +0.3 Å
    atoms.positions[j] += 0.45 * unit
    assert monitor.check(atoms, step=20, time_ps=0.0) is None  # 0.75 Å from the start, 0.45 Å from the range
    assert StabilityMonitor(ethanol()).check(atoms, step=20, time_ps=0.0).kind == "bond"


def test_monitor_overlap_and_non_finite_numbers():
    argon = Atoms("Ar2", positions=[[0, 0, 0], [3.0, 0, 0]])
    monitor = StabilityMonitor(argon)
    assert monitor.n_bonds == 0
    argon.positions[1, 0] = 0.3
    failure = monitor.check(argon, step=1, time_ps=0.0)
    assert failure.kind == "overlap" and "0.300 Å apart" in failure.reason
    assert StabilityMonitor(ethanol()).check(ethanol(), 1, 0.0, energy=np.nan).kind == "non-finite"
    forces = np.zeros((9, 3))
    forces[3, 1] = np.inf
    assert StabilityMonitor(ethanol()).check(ethanol(), 1, 0.0, forces=forces).kind == "non-finite"


def test_monitor_uses_the_minimum_image_in_periodic_cells():
    atoms = ethanol()
    atoms.cell = np.diag([7.0, 7.5, 8.0])
    atoms.pbc = True
    atoms.positions -= atoms.positions.mean(axis=0)  # straddles the corner, so wrapping splits the molecule
    monitor = StabilityMonitor(atoms)
    wrapped = atoms.copy()
    wrapped.wrap()
    assert np.abs(wrapped.positions - atoms.positions).max() > 3.0
    np.testing.assert_allclose(monitor.bond_lengths(wrapped), monitor.bond_lengths(atoms), atol=1e-12)
    assert monitor.check(wrapped, step=1, time_ps=0.0) is None


# -- the command line ---------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="so3krates")
    register(parser.add_subparsers(dest="command"))
    return parser


def test_cli_runs_md(files, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["md", "--model", str(files["model"]), "--structure", str(files["ethanol"]), "--out", str(out)]
    options = ["--ensemble", "bussi", "--steps", "10", "--timestep", "0.25", "--seed", "3", "--no-progress"]
    stability = ["--check-every", "2", "--max-bond-deviation", "0.8", "--threads", "1"]
    args = _parser().parse_args([*argv, *options, *stability])
    assert args.run(args) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["ensemble"] == "bussi" and config["n_steps"] == 10 and config["seed"] == 3
    assert config["stability"]["check_every"] == 2 and config["stability"]["max_bond_deviation"] == 0.8
    assert config["timestep_fs"] == 0.25 and config["threads"] == 1
    assert "completed 10 steps" in capsys.readouterr().out
    args = _parser().parse_args([*argv, "--steps", "20", "--restart", "--no-progress"])
    assert args.run(args) == 0
    assert int(load_state(out / "restart.npz")["step"]) == 20


def test_cli_names_the_option_in_errors(files):
    argv = ["md", "--model", str(files["model"]), "--structure", str(files["ethanol"])]
    args = _parser().parse_args([*argv, "--timestep", "-1", "--check-every", "0"])
    with pytest.raises(ConfigError) as error:
        args.run(args)
    assert str(error.value) == (
        "--timestep: Input should be greater than 0; "
        "--check-every: Input should be greater than or equal to 1"
    )
    with pytest.raises(SystemExit):
        _parser().parse_args([*argv, "--steps", "10", "--time-ps", "1"])


def test_cli_help_shows_the_config_defaults():
    """Help texts quote defaults; they must be MDConfig's (the CLI builds its parser without importing it)."""
    from so3krates.cli.md import _OPTIONS, _STABILITY_OPTIONS
    from so3krates.md.config import StabilityConfig

    md = register(argparse.ArgumentParser().add_subparsers())
    checked = 0
    for action in md._actions:
        match = re.search(r"\(([-\w./]+)\)$", action.help or "")
        if match is None or action.dest not in {**_OPTIONS, **_STABILITY_OPTIONS}:
            continue
        if action.dest in _OPTIONS:
            default = MDConfig.model_fields[_OPTIONS[action.dest]].default
        else:
            default = StabilityConfig.model_fields[_STABILITY_OPTIONS[action.dest]].default
        if default is None and action.dest == "steps":
            default = 1000
        quoted = match.group(1)
        assert str(default) == quoted or float(default) == float(quoted), action.dest
        checked += 1
    assert checked >= 15
