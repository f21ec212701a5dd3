"""Committees (``so3krates.committee``): the mean and spread of K models against each member evaluated alone,
the ASE calculator, ``so3krates md`` with a committee (uncertainty logging, flagging, stopping, exact
restarts), ``so3krates evaluate`` on a committee directory, and warm starts (``training.init_from`` with a
checkpoint).

The members are untrained ``tiny`` models from different seeds (``helpers.make_model``): their energies and
forces differ by design, so every spread below is far from zero and every comparison can fail.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from ase.constraints import FixCom
from scipy.stats import spearmanr

from helpers import ethanol, evaluate, make_force_field, make_model, triclinic_cell, water
from so3krates import atoms_to_graph, collate, preset
from so3krates.calculators.ase import So3kratesCalculator
from so3krates.cli.main import main
from so3krates.committee import Committee, load_committee, member_paths
from so3krates.data.io import read_structures
from so3krates.errors import ConfigError, So3kratesError
from so3krates.evaluate import uncertainty_against_error
from so3krates.md import load_md_config, run_md
from so3krates.md.output import THERMO_COLUMNS, load_state, read_thermo
from so3krates.model.checkpoint import load_checkpoint, save_checkpoint
from so3krates.train.config import load_train_config
from so3krates.train.trainer import Trainer, train

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "data" / "ethanol_gfn2xtb_500K.extxyz"
SEEDS = (0, 1, 2)
QUIET = {"progress": False}
NO_MONITOR = {"stability": {"enabled": False}}


def _quiet(*args, **kwargs):
    pass


def _spread(values: np.ndarray) -> np.ndarray:
    """The reference spread: sample standard deviation over the members (axis 0), K − 1 in the denominator."""
    return np.std(values, axis=0, ddof=1)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A committee directory of three tiny float64 members, one of them alone, and start structures."""
    root = tmp_path_factory.mktemp("committee")
    committee = root / "committee"
    for seed in SEEDS:
        (committee / f"member_{seed}").mkdir(parents=True)
        model = make_force_field(preset("tiny"), torch.float64, seed=seed).model
        save_checkpoint(committee / f"member_{seed}" / "best.pt", model, species=[1, 6, 8])
    paths = {
        "committee": committee,
        "members": [committee / f"member_{seed}" / "best.pt" for seed in SEEDS],
        "single": committee / "member_0" / "best.pt",
        "ethanol": root / "ethanol.extxyz",
    }
    ase.io.write(paths["ethanol"], ethanol())
    paths["data"] = root / "data.extxyz"  # 12 labelled frames of the example data
    ase.io.write(paths["data"], ase.io.read(EXAMPLE, index=":12"))
    return paths


def _alone(atoms, path) -> dict[str, np.ndarray]:
    """One member's energy and forces, by its own calculator."""
    atoms = atoms.copy()
    atoms.calc = So3kratesCalculator(path)
    return {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}


def _reference(atoms, paths) -> dict[str, np.ndarray]:
    """The committee's numbers computed here: every member alone, then numpy's mean and spread."""
    alone = [_alone(atoms, path) for path in paths]
    energies = np.array([a["energy"] for a in alone])
    forces = np.stack([a["forces"] for a in alone])
    return {
        "energy": energies.mean(),
        "forces": forces.mean(axis=0),
        "energy_uncertainty": float(_spread(energies)),
        "forces_uncertainty": np.linalg.norm(_spread(forces), axis=-1),
        "member_energy": energies,
        "member_forces": forces,
    }


# -- Committee, member_paths, load_committee ----------------------------------------------------------------


def test_committee_is_the_mean_and_spread_of_its_members():
    members = [make_force_field(preset("tiny"), torch.float64, seed=seed) for seed in SEEDS]
    structures = [ethanol(0), water(), ethanol(3)]
    alone = [evaluate(member, structures) for member in members]
    graph = collate([atoms_to_graph(a, members[0].cutoff) for a in structures])
    out = {k: v.detach().double().numpy() for k, v in Committee(members)(graph).items()}

    energies = np.stack([a["energy"] for a in alone])  # (K, n_graphs)
    forces = np.stack([a["forces"] for a in alone])  # (K, n_atoms, 3)
    np.testing.assert_allclose(out["energy"], energies.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out["forces"], forces.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out["energy_uncertainty"], _spread(energies), rtol=1e-10)
    np.testing.assert_allclose(
        out["forces_uncertainty"], np.linalg.norm(_spread(forces), axis=-1), rtol=1e-10, atol=1e-14
    )
    np.testing.assert_array_equal(out["member_energy"], energies)
    np.testing.assert_array_equal(out["member_forces"], forces)
    assert out["energy_uncertainty"].shape == (3,) and out["forces_uncertainty"].shape == (9 + 3 + 9,)
    assert np.all(out["energy_uncertainty"] > 1e-3) and np.all(out["forces_uncertainty"] > 1e-6)

    # Stress of a periodic cell is averaged too; without forces there is no force spread.
    cell = triclinic_cell()
    stress = np.stack([evaluate(member, [cell], stress=True)["stress"] for member in members])
    cell_graph = collate([atoms_to_graph(cell, members[0].cutoff)])
    with_stress = Committee(members)(cell_graph, compute_stress=True)
    np.testing.assert_allclose(with_stress["stress"].numpy(), stress.mean(axis=0), rtol=1e-10, atol=1e-14)
    energy_only = Committee(members)(cell_graph, compute_forces=False)
    assert "forces_uncertainty" not in energy_only and energy_only["energy_uncertainty"].shape == (1,)


def test_a_committee_needs_two_members_of_the_same_cutoff():
    one = make_force_field(preset("tiny"), torch.float64, seed=0)
    with pytest.raises(So3kratesError, match="at least two members, got 1"):
        Committee([one])
    other = make_force_field(preset("tiny", cutoff=3.0), torch.float64, seed=1)
    with pytest.raises(So3kratesError, match=r"cutoff 3\.0 differs from"):
        Committee([one, other])


def test_member_paths(tmp_path):
    committee = tmp_path / "committee"
    for name in ("member_1", "member_0", "member_10"):
        (committee / name).mkdir(parents=True)
        (committee / name / "best.pt").write_bytes(b"")
    (committee / "notes").mkdir()  # no member
    assert member_paths(committee) == [
        committee / "member_0" / "best.pt",
        committee / "member_1" / "best.pt",
        committee / "member_10" / "best.pt",
    ]
    assert member_paths(str(committee)) == member_paths(committee)
    (committee / "best.pt").write_bytes(b"")  # a run directory of its own: one model
    assert member_paths(committee) is None
    assert member_paths(committee / "member_0" / "best.pt") is None  # a file
    assert member_paths(tmp_path / "missing") is None
    (tmp_path / "empty").mkdir()
    assert member_paths(tmp_path / "empty") is None


def test_load_committee_refuses_members_that_differ_in_one_line(files, tmp_path):
    committee, metadata = load_committee(files["members"])
    assert len(committee) == 3 and committee.species == [1, 6, 8] and metadata["species"] == [1, 6, 8]
    assert committee.cutoff == pytest.approx(preset("tiny").cutoff)

    other_species = tmp_path / "species.pt"
    save_checkpoint(other_species, make_model(preset("tiny"), torch.float64, 3), species=[1, 6, 7, 8])
    other_cutoff = tmp_path / "cutoff.pt"
    save_checkpoint(other_cutoff, make_model(preset("tiny", cutoff=3.5), torch.float64, 4), species=[1, 6, 8])
    for paths, expected in [
        ([files["single"], other_species], "members must share them"),
        ([files["single"], other_cutoff], "cutoff 3.5 differs"),
        ([files["single"], tmp_path / "missing.pt"], "committee member not found"),
    ]:
        with pytest.raises(So3kratesError, match=expected) as error:
            load_committee(paths)
        assert "\n" not in str(error.value)


# -- the ASE calculator -------------------------------------------------------------------------------------


def test_calculator_takes_a_committee_as_paths_a_directory_or_models(files):
    atoms = ethanol(5)
    expected = _reference(atoms, files["members"])
    models = [make_model(preset("tiny"), torch.float64, seed) for seed in SEEDS]
    for model in (files["members"], [str(p) for p in files["members"]], files["committee"], models):
        calc = So3kratesCalculator(model)
        assert isinstance(calc.force_field, Committee) and len(calc.force_field) == 3
        copy = atoms.copy()
        copy.calc = calc
        assert copy.get_potential_energy() == pytest.approx(expected["energy"], rel=1e-12, abs=1e-12)
        np.testing.assert_allclose(copy.get_forces(), expected["forces"], rtol=1e-10, atol=1e-12)
        uncertainty = calc.get_property("energy_uncertainty", copy)
        assert isinstance(uncertainty, float)
        assert uncertainty == pytest.approx(expected["energy_uncertainty"], rel=1e-10)
        forces_uncertainty = calc.get_property("forces_uncertainty", copy)
        assert forces_uncertainty.shape == (len(atoms),)
        np.testing.assert_allclose(forces_uncertainty, expected["forces_uncertainty"], rtol=1e-9)
    assert expected["energy_uncertainty"] > 1e-3 and expected["forces_uncertainty"].min() > 1e-6

    # A list of one is that one model, without uncertainty.
    single = So3kratesCalculator([files["single"]])
    assert not isinstance(single.force_field, Committee)
    copy = atoms.copy()
    copy.calc = single
    assert copy.get_potential_energy() == pytest.approx(_alone(atoms, files["single"])["energy"], rel=1e-12)
    assert "forces_uncertainty" not in single.results


# -- molecular dynamics -------------------------------------------------------------------------------------


def _md_config(files, out: Path, model=None, **values):
    return load_md_config(
        {
            "model": model if model is not None else files["committee"],
            "structure": files["ethanol"],
            "output_dir": out,
            # From rest under a Langevin thermostat the members' spread first falls, then rises: a threshold
            # between its extremes is first crossed in the middle of the run.
            "ensemble": "langevin",
            "velocities": "zero",
            "friction_per_fs": 0.05,
            "timestep_fs": 1.0,
            "thermo_every": 1,
            "trajectory_every": 5,
            "restart_every": 5,
            **QUIET,
            **NO_MONITOR,
            **values,
        }
    )


@pytest.fixture(scope="module")
def plain_run(files, tmp_path_factory):
    """A 20-step committee run without a threshold: the uncertainties the other runs are judged against."""
    out = tmp_path_factory.mktemp("plain") / "run"
    run_md(_md_config(files, out, n_steps=20), log=_quiet)
    return out


def _sigma(plain_run) -> np.ndarray:
    """The largest atomic force spread of every step of the run without threshold."""
    return read_thermo(plain_run / "thermo.csv")["max_force_uncertainty_eV_A"]


def _flag_threshold(plain_run) -> float:
    """The median over steps 1…20: flags early and late in the run."""
    return float(np.median(_sigma(plain_run)[1:]))


def _stop_threshold(plain_run) -> float:
    """Above the spread of steps 1…10, below the largest of the run: first crossed late in the run."""
    sigma = _sigma(plain_run)
    early, highest = sigma[1:11].max(), sigma[1:].max()
    assert highest > 1.005 * early, sigma  # the members' spread grows late in the run
    return float(early + 0.75 * (highest - early))


def test_md_with_a_committee_logs_its_uncertainty(files, plain_run):
    thermo = read_thermo(plain_run / "thermo.csv")
    assert tuple(thermo) == (*THERMO_COLUMNS, "max_force_uncertainty_eV_A")
    np.testing.assert_array_equal(thermo["step"], np.arange(21))
    frames = ase.io.read(plain_run / "trajectory.extxyz", index=":")
    assert [f.info["step"] for f in frames] == [0, 5, 10, 15, 20]
    for frame in frames:
        step = frame.info["step"]
        assert frame.info["max_force_uncertainty"] == pytest.approx(
            thermo["max_force_uncertainty_eV_A"][step]
        )
        assert frame.info["max_force_uncertainty"] == pytest.approx(frame.arrays["forces_uncertainty"].max())
        assert frame.arrays["forces_uncertainty"].shape == (9,)
        assert frame.get_potential_energy() == pytest.approx(thermo["E_pot_eV"][step], rel=1e-12)

    # The last frame against the members evaluated alone at the exact final positions.
    state = load_state(plain_run / "restart.npz")
    assert int(state["step"]) == 20
    atoms = ethanol()
    atoms.positions = state["positions"]
    expected = _reference(atoms, files["members"])
    last = frames[-1]
    assert last.get_potential_energy() == pytest.approx(expected["energy"], rel=1e-9)
    # The trajectory records the forces the integrator used: the mean, under the FixCom constraint.
    fixed = expected["forces"].copy()
    FixCom().adjust_forces(atoms, fixed)
    assert np.abs(fixed - expected["forces"]).max() > 1e-4  # the constraint is visible: a real check
    np.testing.assert_allclose(last.get_forces(), fixed, rtol=1e-6, atol=1e-7)
    assert last.info["energy_uncertainty"] == pytest.approx(expected["energy_uncertainty"], rel=1e-9)
    np.testing.assert_allclose(last.arrays["forces_uncertainty"], expected["forces_uncertainty"], rtol=1e-6)
    assert thermo["max_force_uncertainty_eV_A"][20] == pytest.approx(
        expected["forces_uncertainty"].max(), rel=1e-9
    )

    summary = json.loads((plain_run / "summary.json").read_text())
    assert summary["status"] == "completed"
    # The largest spread of the run (late in it; steps 1…20 are the ones checked against a threshold).
    assert summary["max_force_uncertainty_eV_per_A"] == pytest.approx(
        thermo["max_force_uncertainty_eV_A"][1:].max(), rel=1e-9
    )
    assert summary["n_flagged_checks"] == 0
    assert not (plain_run / "flagged.extxyz").exists()


def _flag_config(files, out, threshold, n_steps):
    return _md_config(
        files,
        out,
        n_steps=n_steps,
        uncertainty_threshold=threshold,
        stability={"enabled": False, "check_every": 2},
    )


@pytest.fixture(scope="module")
def flagged_run(files, plain_run, tmp_path_factory):
    threshold = _flag_threshold(plain_run)
    out = tmp_path_factory.mktemp("flagged") / "run"
    out.mkdir()
    (out / "flagged.extxyz").write_text("junk of a run that never saved a state\n")  # the new run clears it
    run_md(_flag_config(files, out, threshold, 20), log=_quiet)
    return out


def test_md_flags_every_excursion_and_every_check_above_the_threshold(files, plain_run, flagged_run):
    threshold, sigma = _flag_threshold(plain_run), _sigma(plain_run)
    # Flagging watches the run and changes nothing of it.
    for name in ("thermo.csv", "trajectory.extxyz"):
        assert (plain_run / name).read_bytes() == (flagged_run / name).read_bytes(), name
    above = [step for step in range(1, 21) if sigma[step] > threshold]
    # Every check_every (2) steps above the threshold, and the first step of every excursion above it.
    expected = [step for step in above if step % 2 == 0 or step - 1 not in above]
    checks = [step for step in above if step % 2 == 0]
    assert min(checks) <= 10 < max(checks) and len(checks) < 10, (sigma, threshold)
    flagged = ase.io.read(flagged_run / "flagged.extxyz", index=":")
    assert [f.info["step"] for f in flagged] == expected
    for frame in flagged:
        assert frame.info["max_force_uncertainty"] == pytest.approx(sigma[frame.info["step"]])
        assert frame.info["max_force_uncertainty"] > threshold
    summary = json.loads((flagged_run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps_done"] == 20
    assert summary["n_flagged_checks"] == len(expected)
    assert summary["uncertainty_threshold_eV_per_A"] == threshold


def test_md_committee_restart_is_exact(files, plain_run, flagged_run, tmp_path):
    """10 steps, a crash that left torn lines after the state, a restart for 10 more: the files of the
    uninterrupted 20-step run, bit for bit (the flags of both halves and their count included)."""
    threshold = _flag_threshold(plain_run)
    out = tmp_path / "run"
    run_md(_flag_config(files, out, threshold, 10), log=_quiet)
    assert (out / "flagged.extxyz").stat().st_size > 0  # flags before the restart and after it
    for name in ("thermo.csv", "trajectory.extxyz", "flagged.extxyz"):  # what a crash after the state left
        with open(out / name, "a") as handle:
            handle.write("9\nProperties=species:S:1:pos:R:3\nC 0.0 0.0\n")
    lines = []
    run_md(_flag_config(files, out, threshold, 20), log=lines.append, restart=True)
    assert any("restart from step 10" in line for line in lines)
    a, b = load_state(flagged_run / "restart.npz"), load_state(out / "restart.npz")
    assert int(a["step"]) == int(b["step"]) == 20
    np.testing.assert_array_equal(a["positions"], b["positions"])
    np.testing.assert_array_equal(a["momenta"], b["momenta"])
    for name in ("thermo.csv", "trajectory.extxyz", "flagged.extxyz"):
        assert (flagged_run / name).read_bytes() == (out / name).read_bytes(), name
    reference = json.loads((flagged_run / "summary.json").read_text())
    restarted = json.loads((out / "summary.json").read_text())
    assert restarted["restarted_from_step"] == 10
    for key in ("max_force_uncertainty_eV_per_A", "n_flagged_checks", "status", "steps_done"):
        assert restarted[key] == reference[key], key


def test_md_stops_at_the_first_uncertain_step_from_the_command_line(files, plain_run, tmp_path, capsys):
    threshold, sigma = _stop_threshold(plain_run), _sigma(plain_run)
    first = next(step for step in range(1, 21) if sigma[step] > threshold)
    assert 10 < first < 20 and first % 5 != 0  # not a frame trajectory_every writes anyway
    out = tmp_path / "stop"
    argv = ["md", "--model", str(files["committee"]), "--structure", str(files["ethanol"])]
    options = ["--out", str(out), "--steps", "20", "--timestep", "1", "--thermo-every", "1"]
    options += ["--ensemble", "langevin", "--velocities", "zero", "--friction", "0.05"]
    options += ["--trajectory-every", "5", "--restart-every", "5", "--no-stability", "--no-progress"]
    options += ["--threads", "1"]
    committee = ["--uncertainty-threshold", str(threshold), "--uncertainty-action", "stop"]
    assert main([*argv, *options, *committee]) == 0
    assert "a committee of 3" in capsys.readouterr().out

    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "uncertain" and summary["steps_done"] == first
    assert summary["max_force_uncertainty_eV_per_A"] == pytest.approx(sigma[first])
    assert summary["max_force_uncertainty_eV_per_A"] > threshold
    thermo = read_thermo(out / "thermo.csv")
    np.testing.assert_array_equal(thermo["step"], np.arange(first + 1))
    np.testing.assert_array_equal(thermo["max_force_uncertainty_eV_A"], sigma[: first + 1])
    frames = ase.io.read(out / "trajectory.extxyz", index=":")
    assert frames[-1].info["step"] == first  # the uncertain frame is kept
    assert frames[-1].info["max_force_uncertainty"] == pytest.approx(sigma[first])
    assert int(load_state(out / "restart.npz")["step"]) == first


def test_md_flagging_leaves_the_stability_monitor_alone(files, plain_run, tmp_path):
    threshold, sigma = _flag_threshold(plain_run), _sigma(plain_run)
    assert any(sigma[step] > threshold for step in range(1, 10) if step % 5), sigma
    stability = {"enabled": True, "check_every": 5, "reference_steps": 10}
    run_md(_md_config(files, tmp_path / "plain", n_steps=20, stability=stability), log=_quiet)
    flagging = _md_config(
        files, tmp_path / "flag", n_steps=20, stability=stability, uncertainty_threshold=threshold
    )
    run_md(flagging, log=_quiet)
    a, b = load_state(tmp_path / "plain" / "restart.npz"), load_state(tmp_path / "flag" / "restart.npz")
    np.testing.assert_array_equal(a["bond_reference_min"], b["bond_reference_min"])
    np.testing.assert_array_equal(a["bond_reference_max"], b["bond_reference_max"])


def test_md_uncertainty_options_are_refused_without_a_committee(files, tmp_path):
    with pytest.raises(ConfigError, match=r"uncertainty_threshold: .* is one model, not a committee"):
        run_md(
            _md_config(files, tmp_path / "a", model=files["single"], uncertainty_threshold=0.1), log=_quiet
        )
    assert not (tmp_path / "a").exists()
    with pytest.raises(ConfigError, match="uncertainty_action 'stop' needs an uncertainty_threshold") as e:
        _md_config(files, tmp_path / "b", uncertainty_action="stop")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="uncertainty_threshold"):
        _md_config(files, tmp_path / "c", uncertainty_threshold=-1.0)


# -- evaluate -----------------------------------------------------------------------------------------------


def test_evaluate_a_committee_directory(files, tmp_path, capsys):
    data = files["data"]
    out = tmp_path / "eval"
    assert (
        main(["evaluate", "--model", str(files["committee"]), "--data", str(data), "--out-dir", str(out)])
        == 0
    )
    assert "committee of 3" in capsys.readouterr().out
    for name in ("predictions.extxyz", "parity.png", "metrics.json", "uncertainty.png"):
        assert (out / name).is_file(), name
    assert (out / "uncertainty.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Every member alone on every structure; the correlations computed here with scipy.
    structures = read_structures(data)
    references = ase.io.read(data, index=":")
    predicted = ase.io.read(out / "predictions.extxyz", index=":")
    sigma_f, error_f, sigma_e, error_e, sigma_atoms, error_atoms = [], [], [], [], [], []
    for atoms, structure, frame in zip(references, structures, predicted, strict=True):
        expected = _reference(atoms, files["members"])
        assert frame.get_potential_energy() == pytest.approx(expected["energy"], rel=1e-9)
        np.testing.assert_allclose(frame.get_forces(), expected["forces"], rtol=1e-7, atol=1e-8)
        assert frame.info["energy_uncertainty"] == pytest.approx(expected["energy_uncertainty"], rel=1e-7)
        np.testing.assert_allclose(
            frame.arrays["forces_uncertainty"], expected["forces_uncertainty"], rtol=1e-6
        )
        assert frame.info["max_force_uncertainty"] == pytest.approx(
            expected["forces_uncertainty"].max(), rel=1e-6
        )
        sigma_atoms.append(expected["forces_uncertainty"])
        error_atoms.append(np.linalg.norm(expected["forces"] - structure.forces, axis=1))
        sigma_f.append(sigma_atoms[-1].max())
        error_f.append(error_atoms[-1].max())
        sigma_e.append(expected["energy_uncertainty"])
        error_e.append(abs(expected["energy"] - structure.energy))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["committee_size"] == 3
    assert metrics["spearman_force_uncertainty_vs_error"] == pytest.approx(
        spearmanr(sigma_f, error_f).statistic
    )
    assert metrics["spearman_energy_uncertainty_vs_error"] == pytest.approx(
        spearmanr(sigma_e, error_e).statistic
    )
    means = [np.mean(x, axis=1) for x in (np.array(sigma_atoms), np.array(error_atoms))]
    assert metrics["spearman_mean_force_uncertainty_vs_error"] == pytest.approx(
        spearmanr(*means).statistic, rel=1e-6
    )
    pooled = [np.concatenate(x) for x in (sigma_atoms, error_atoms)]
    assert metrics["spearman_atomic_force_uncertainty_vs_error"] == pytest.approx(
        spearmanr(*pooled).statistic, rel=1e-6
    )
    assert metrics["mean_max_force_uncertainty"] == pytest.approx(np.mean(sigma_f), rel=1e-6)
    assert metrics["n_structures"] == 12


def test_evaluate_a_committee_on_one_frame_writes_null_not_nan(files, tmp_path, capsys):
    """One structure has no rank correlation: metrics.json says null (strict JSON), not a bare NaN."""
    data = tmp_path / "one.extxyz"
    ase.io.write(data, ase.io.read(files["data"], index=0))
    out = tmp_path / "eval"
    assert (
        main(["evaluate", "--model", str(files["committee"]), "--data", str(data), "--out-dir", str(out)])
        == 0
    )
    capsys.readouterr()

    def refuse(constant):
        raise AssertionError(f"metrics.json holds the non-standard JSON constant {constant}")

    metrics = json.loads((out / "metrics.json").read_text(), parse_constant=refuse)
    assert metrics["committee_size"] == 3
    assert metrics["spearman_force_uncertainty_vs_error"] is None
    assert metrics["spearman_energy_uncertainty_vs_error"] is None


def test_uncertainty_against_error_on_chosen_numbers(files):
    structures = read_structures(files["data"])[:5]
    rng = np.random.default_rng(0)
    # Force errors 0.1, 0.2, … on atom 0 with uncertainties in the same order; energy errors in reverse order.
    predictions = {"forces": [], "energy": [], "forces_uncertainty": [], "energy_uncertainty": []}
    for k, s in enumerate(structures):
        forces = s.forces.copy()
        forces[0] += [0.1 * (k + 1), 0.0, 0.0]
        predictions["forces"].append(forces)
        uncertainty = rng.uniform(0.0, 0.01, size=s.n_atoms)
        uncertainty[3] = 1.0 + k
        predictions["forces_uncertainty"].append(uncertainty)
        predictions["energy"].append(s.energy + 0.5 * (k + 1))
        predictions["energy_uncertainty"].append(1.0 / (k + 1))
    analysis = uncertainty_against_error(structures, predictions)
    np.testing.assert_allclose(analysis["max_force_error"], 0.1 * np.arange(1, 6), rtol=1e-9)
    np.testing.assert_allclose(analysis["max_force_uncertainty"], np.arange(1, 6))
    np.testing.assert_allclose(analysis["energy_error"], 0.5 * np.arange(1, 6), rtol=1e-9)
    assert analysis["spearman_forces"] == pytest.approx(1.0)
    assert analysis["spearman_energy"] == pytest.approx(-1.0)

    # A structure without reference forces is left out; fewer than three left, or no spread: no correlation.
    unlabeled = [dataclasses.replace(structures[0], forces=None), *structures[1:]]
    analysis = uncertainty_against_error(unlabeled, predictions)
    assert np.isnan(analysis["max_force_error"][0]) and analysis["spearman_forces"] == pytest.approx(1.0)
    two = {key: value[:2] for key, value in predictions.items()}
    assert np.isnan(uncertainty_against_error(structures[:2], two)["spearman_forces"])
    flat = {**predictions, "energy_uncertainty": [0.3] * 5}
    assert np.isnan(uncertainty_against_error(structures, flat)["spearman_energy"])


# -- warm starts --------------------------------------------------------------------------------------------


def _train_config(run_dir: Path, **overrides):
    values = {
        "run_dir": str(run_dir),
        "data.train_file": str(EXAMPLE),
        "data.n_train": 20,
        "data.n_valid": 5,
        "data.n_test": 5,
        "training.max_epochs": 1,
        "training.batch_size": 4,
        "training.progress": False,
        "training.learning_rate": 3e-3,
        **overrides,
    }
    return load_train_config(None, values)


def test_init_from_a_checkpoint_starts_from_its_weights(tmp_path, monkeypatch):
    first = tmp_path / "first"
    train(_train_config(first, **{"model.preset": "tiny"}), log=_quiet)
    checkpoint = load_checkpoint(first / "best.pt")["state_dict"]

    initial = {}
    real_step = Trainer._train_step

    def record_first_step(self, indices):
        if not initial:
            initial.update({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        return real_step(self, indices)

    monkeypatch.setattr(Trainer, "_train_step", record_first_step)
    lines = []
    train(
        _train_config(tmp_path / "warm", **{"training.init_from": str(first / "best.pt")}), log=lines.append
    )
    assert any(line.startswith(f"init_from: {first / 'best.pt'} (warm start)") for line in lines)
    assert set(initial) == set(checkpoint)
    for name, value in checkpoint.items():
        if name != "readout.energy_shift":
            torch.testing.assert_close(initial[name], value, rtol=0, atol=0, msg=name)
    # The per-element shift is refitted to the training data: C, H and O moved, nothing else.
    shift, before = initial["readout.energy_shift"], checkpoint["readout.energy_shift"]
    changed = torch.nonzero(shift != before).flatten().tolist()
    assert set(changed) <= {1, 6, 8} and changed, changed
    torch.testing.assert_close(shift[[0, 2, 7, 9]], before[[0, 2, 7, 9]], rtol=0, atol=0)

    # The warm start keeps the checkpoint's architecture (the model section stays empty).
    warm = load_checkpoint(tmp_path / "warm" / "best.pt")
    assert warm["model_config"] == load_checkpoint(first / "best.pt")["model_config"]


def test_init_from_refuses_a_missing_checkpoint_and_a_model_section(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "best.pt"
    with pytest.raises(ConfigError, match=r"training\.init_from: .*no such checkpoint") as error:
        train(_train_config(tmp_path / "a", **{"training.init_from": str(missing)}), log=_quiet)
    assert "\n" not in str(error.value) and str(missing) in str(error.value)
    config = tmp_path / "config.yaml"
    config.write_text(
        f"run_dir: {tmp_path / 'b'}\n"
        f"data: {{train_file: {EXAMPLE}, n_train: 20, n_valid: 5, n_test: 5}}\n"
        f"training: {{max_epochs: 1, progress: false, init_from: {missing}}}\n"
    )
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training.init_from" in err[0] and "no such checkpoint" in err[0], err
    checkpoint = tmp_path / "model.pt"
    save_checkpoint(checkpoint, make_model(preset("tiny"), torch.float32, 0), species=[1, 6, 8])
    overrides = {"training.init_from": str(checkpoint), "model.n_layers": 2}
    with pytest.raises(ConfigError, match="remove the model section"):
        train(_train_config(tmp_path / "c", **overrides), log=_quiet)
