"""PES exploration: permutation-aware RMSD, minima hopping with its database and resume, reports,
re-scoring with a reference calculator, and ``so3krates explore``.

The search logic runs on Lennard-Jones clusters (ε = 1 eV, σ = 1 Å), whose minima are known: LJ7 has four
(−16.505, −15.935, −15.593, −15.533 ε); the last is chiral, and its two mirror images count as two
minima.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import itertools

import ase.db
import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule
from ase.calculators.lj import LennardJones
from ase.calculators.singlepoint import SinglePointCalculator

from helpers import make_force_field, random_rotation
from so3krates import preset
from so3krates.cli import explore as explore_cli
from so3krates.errors import ConfigError, DataError
from so3krates.explore import (
    MINIMA_COLUMNS,
    HoppingConfig,
    MinimaHopping,
    align,
    discovery_history,
    is_duplicate,
    read_minima,
    rescore,
    rmsd,
    write_report,
    write_rescore,
)
from so3krates.model.checkpoint import save_checkpoint

LJ7_MINIMA = (-16.5053, -15.9353, -15.5933, -15.5330)  # eV with ε = 1 eV


def lj() -> LennardJones:
    return LennardJones(epsilon=1.0, sigma=1.0, rc=10.0)  # rc beyond the cluster: no energy shift


def lj7(seed: int = 1) -> Atoms:
    rng = np.random.default_rng(seed)
    return Atoms("Ar7", positions=rng.uniform(-1.0, 1.0, size=(7, 3)))


# About 0.17 ε/k_B to start; a fragment farther than 2σ from the rest counts as dissociated.
LJ_SETTINGS = {"temperature": 2000.0, "timestep": 5.0, "fmax": 0.005, "fragment_distance": 2.0}


def _with_energy(atoms: Atoms, energy: float) -> Atoms:
    atoms = atoms.copy()
    atoms.calc = SinglePointCalculator(atoms, energy=energy)
    return atoms


def _moved_and_relabelled(atoms: Atoms, seed: int, permutation: np.ndarray) -> Atoms:
    rng = np.random.default_rng(seed)
    moved = atoms[permutation]
    moved.positions = moved.positions @ random_rotation(rng).T + rng.normal(size=3) * 5
    return moved


# ------------------------------------------------------------------------------------------------ RMSD


def ethanol() -> Atoms:
    atoms = molecule("CH3CH2OH")  # C C O H(O) H H(CH2) H H H(CH3)
    assert atoms.get_chemical_symbols() == ["C", "C", "O", "H", "H", "H", "H", "H", "H"]
    return atoms


def test_rmsd_ignores_rigid_motion_and_exchanged_methyl_hydrogens():
    atoms = ethanol()
    permutation = np.arange(len(atoms))
    permutation[[6, 7]] = [7, 6]  # two hydrogens of the methyl group
    copy = _moved_and_relabelled(atoms, 0, permutation)
    # Matched by index the two structures differ; with the exchange they coincide.
    assert align(atoms, copy, allow_permutation=False).rmsd > 0.5
    assert rmsd(atoms, copy) < 1e-8
    result = align(atoms, copy)
    assert np.array_equal(result.permutation, permutation)
    assert np.allclose(result.positions, atoms.positions - atoms.positions.mean(axis=0), atol=1e-8)
    assert np.linalg.det(result.rotation) == pytest.approx(1.0)


def test_rmsd_of_a_random_permutation_within_elements_of_a_cluster():
    rng = np.random.default_rng(3)
    atoms = Atoms("Cu5Al4", positions=rng.uniform(-2, 2, size=(9, 3)))
    copy = _moved_and_relabelled(atoms, 1, rng.permutation(len(atoms)))
    assert rmsd(atoms, copy) < 1e-8


def test_rmsd_finds_the_symmetric_lj13_icosahedron_in_any_orientation():
    from ase.cluster import Icosahedron

    atoms = Icosahedron("Ar", noshells=2)
    copy = _moved_and_relabelled(atoms, 2, np.random.default_rng(2).permutation(len(atoms)))
    assert rmsd(atoms, copy) < 1e-6


def test_a_different_conformer_is_not_the_same_structure():
    trans = ethanol()
    gauche = trans.copy()
    gauche.set_dihedral(0, 1, 2, 3, 60.0, indices=[3])  # hydroxyl H turned about C–O: trans → gauche
    assert trans.get_dihedral(0, 1, 2, 3) == pytest.approx(180.0)
    assert rmsd(trans, gauche) > 0.1
    assert not is_duplicate(_with_energy(trans, -1.0), _with_energy(gauche, -1.0))
    assert is_duplicate(
        _with_energy(trans, -1.0), _with_energy(_moved_and_relabelled(trans, 1, np.arange(9)), -1.0)
    )


def test_mirror_images_differ_unless_reflections_are_allowed():
    rng = np.random.default_rng(4)
    chiral = Atoms("CHFClBr", positions=rng.uniform(-1.5, 1.5, size=(5, 3)))
    mirror = chiral.copy()
    mirror.positions[:, 0] *= -1
    mirror = _moved_and_relabelled(mirror, 5, np.arange(5))
    assert rmsd(chiral, mirror) > 0.1
    assert rmsd(chiral, mirror, allow_reflection=True) < 1e-8


def test_is_duplicate_needs_close_energies_and_close_geometries():
    atoms = ethanol()
    copy = _moved_and_relabelled(atoms, 6, np.arange(len(atoms)))
    assert is_duplicate(_with_energy(atoms, -10.0), _with_energy(copy, -10.005))
    assert not is_duplicate(_with_energy(atoms, -10.0), _with_energy(copy, -10.05))
    assert is_duplicate(_with_energy(atoms, -10.0), _with_energy(copy, -10.05), energy_tol_eV=0.1)
    # Same formula, different molecule (dimethyl ether): same energy is not enough.
    assert not is_duplicate(_with_energy(atoms, -10.0), _with_energy(molecule("CH3OCH3"), -10.0))
    with pytest.raises(ValueError, match="cannot compare"):
        rmsd(atoms, molecule("H2O"))


# ------------------------------------------------------------------------------------- minima hopping


@pytest.fixture(scope="module")
def lj7_search(tmp_path_factory):
    """A 25-step search on LJ7 (≈ 1 s), shared by the tests that read its database."""
    db_path = tmp_path_factory.mktemp("lj7") / "minima.db"
    search = MinimaHopping(lj7(), lj(), db_path, HoppingConfig(**LJ_SETTINGS), log=None)
    assert search.run(steps=25) == 25
    return search, db_path


def test_minima_hopping_finds_several_lj7_minima_and_no_duplicate_as_new(lj7_search):
    _, db_path = lj7_search
    unique = read_minima(db_path)
    energies = [atoms.get_potential_energy() for atoms in unique]
    assert len(unique) >= 2
    assert energies == sorted(energies)
    # Every unique minimum is a known LJ7 minimum, converged, and the global one is among them.
    for energy in energies:
        assert min(abs(energy - known) for known in LJ7_MINIMA) < 1e-3
    assert abs(energies[0] - LJ7_MINIMA[0]) < 1e-3
    assert all(np.linalg.norm(atoms.get_forces(), axis=1).max() < 0.005 for atoms in unique)
    for i, a in enumerate(unique):
        for b in unique[i + 1 :]:
            assert not is_duplicate(a, b), (a.info["id"], b.info["id"])
    # Every duplicate row really repeats the unique minimum it names.
    by_id = {atoms.info["id"]: atoms for atoms in unique}
    duplicates = [atoms for atoms in read_minima(db_path, unique=False) if not atoms.info["is_new"]]
    assert duplicates, "a 25-step search on LJ7 refinds minima"
    for atoms in duplicates:
        assert is_duplicate(atoms, by_id[atoms.info["duplicate_of"]])


def test_the_database_has_every_column(lj7_search):
    _, db_path = lj7_search
    rows = sorted(ase.db.connect(db_path).select(), key=lambda row: row.id)
    # One row per converged, undissociated minimum: step 0 and most of the 25 hops.
    assert 20 <= len(rows) <= 26
    steps = [row.step for row in rows]
    assert steps[0] == 0 and steps == sorted(set(steps)) and steps[-1] <= 25
    for row in rows:
        assert set(MINIMA_COLUMNS) <= set(row.key_value_pairs), set(MINIMA_COLUMNS) - set(row.key_value_pairs)
        assert row.fmax < 0.005 and np.isfinite(row.energy)
    first = rows[0]
    assert first.is_new and first.accepted and first.parent_id == 0 and first.temperature == 0
    assert all(row.temperature > 0 and 1 <= row.parent_id < row.id for row in rows[1:])
    assert all(row.is_new == (row.duplicate_of == 0) for row in rows)
    assert all(row.rmsd < 0.1 and row.duplicate_of < row.id for row in rows)
    metadata = ase.db.connect(db_path).metadata
    assert metadata["state"]["step"] == 25 and metadata["settings"]["seed"] == 0


def test_temperature_feedback_and_acceptance_follow_goedecker(lj7_search):
    """T rises by β₁ = β₂ after a known minimum and falls by β₃ after a new one; a minimum other than
    the current one is accepted if E < E_current + E_diff, and E_diff shrinks by α₁ or grows by α₂."""
    _, db_path = lj7_search
    config = HoppingConfig(**LJ_SETTINGS)
    rows = sorted(ase.db.connect(db_path).select(), key=lambda row: row.id)
    by_id = {row.id: row for row in rows}
    checked = 0
    for row, following in itertools.pairwise(rows[1:]):
        if following.step != row.step + 1:
            continue  # a dissociated escape in between lowered T once more
        factor = config.beta3 if row.is_new else config.beta1
        assert following.temperature == pytest.approx(row.temperature * factor)
        checked += 1
    assert checked >= 10
    ediff = config.ediff
    for row in rows[1:]:
        parent = by_id[row.parent_id]
        if row.duplicate_of == row.parent_id:  # escape failed: no acceptance step
            assert not row.accepted and row.ediff == pytest.approx(ediff)
            continue
        assert row.accepted == (row.energy < parent.energy + ediff)
        ediff *= config.alpha1 if row.accepted else config.alpha2
        assert row.ediff == pytest.approx(ediff)


def test_a_resumed_search_continues_and_matches_an_uninterrupted_one(tmp_path, lj7_search):
    _, reference_db = lj7_search
    db_path = tmp_path / "minima.db"
    first = MinimaHopping(lj7(), lj(), db_path, HoppingConfig(**LJ_SETTINGS), log=None)
    first.run(steps=5)
    lines = []
    # A new object on the same database (as after a crash) continues at step 6 from the stored state,
    # whatever structure it is given.
    second = MinimaHopping(lj7(seed=99), lj(), db_path, HoppingConfig(**LJ_SETTINGS), log=lines.append)
    assert second.state.step == 5 and "continuing the search" in lines[0]
    assert second.run(steps=12) == 7
    rows = sorted(ase.db.connect(db_path).select(), key=lambda row: row.id)
    expected = [row for row in ase.db.connect(reference_db).select() if row.step <= 12]
    expected = sorted(expected, key=lambda row: row.id)
    assert [row.step for row in rows] == [row.step for row in expected]
    assert [row.is_new for row in rows] == [row.is_new for row in expected]
    assert np.allclose([row.energy for row in rows], [row.energy for row in expected], atol=1e-8)
    assert second.run(steps=12) == 0  # the budget counts the whole search


def test_wall_time_budget_and_refused_inputs(tmp_path):
    search = MinimaHopping(lj7(), lj(), tmp_path / "a.db", HoppingConfig(**LJ_SETTINGS), log=None)
    assert search.run(max_time=1e-9) == 0  # only the starting structure is optimised
    assert len(read_minima(tmp_path / "a.db")) == 1
    with pytest.raises(ConfigError, match="budget"):
        search.run()
    with pytest.raises(DataError, match="holds minima of Ar7, not of Ar8"):
        MinimaHopping(
            Atoms("Ar8", positions=np.random.default_rng(0).normal(size=(8, 3))), lj(), tmp_path / "a.db"
        )
    with pytest.raises(DataError, match="periodic"):
        MinimaHopping(
            Atoms("Ar2", positions=[[0, 0, 0], [1, 0, 0]], cell=[5, 5, 5], pbc=True), lj(), tmp_path / "b.db"
        )
    with pytest.raises(ConfigError, match="key 'beta3'"):
        HoppingConfig.from_dict({"beta3": 1.5})
    with pytest.raises(ConfigError, match="key 'temprature'"):
        HoppingConfig.from_dict({"temprature": 1.5})


# ---------------------------------------------------------------------------------------------- report


def test_report_files(tmp_path, lj7_search):
    _, db_path = lj7_search
    paths = write_report(db_path, tmp_path / "report", lowest=2)
    assert all(path.is_file() and path.stat().st_size > 0 for path in paths.values())
    assert sorted(path.name for path in paths.values()) == [
        "energy_histogram.png",
        "lowest_minima.extxyz",
        "unique_minima.csv",
        "unique_minima.png",
    ]
    with open(paths["history_csv"]) as handle:
        history = list(csv.DictReader(handle))
    assert len(history) == ase.db.connect(db_path).count()
    assert int(history[-1]["n_unique"]) == len(read_minima(db_path))
    assert [int(entry["n_unique"]) for entry in history] == sorted(int(e["n_unique"]) for e in history)
    assert history == [{k: str(v) for k, v in entry.items()} for entry in discovery_history(db_path)]
    lowest = ase.io.read(paths["lowest_extxyz"], index=":")
    assert len(lowest) == 2
    assert lowest[0].info["relative_energy"] == 0.0
    assert lowest[0].get_potential_energy() == pytest.approx(LJ7_MINIMA[0], abs=1e-3)
    assert not list((tmp_path / "report").glob(".*.tmp"))  # atomic writes leave no temporary files


def test_rescore_against_a_reference_calculator(tmp_path, lj7_search):
    _, db_path = lj7_search
    minima = read_minima(db_path)[:2]
    # The same potential as reference: no error, same geometry.
    same = rescore(minima, lj(), fmax=0.005, model_calculator=lj())
    for result in same:
        assert abs(result.error_at_model_minimum) < 1e-10
        assert abs(result.error_at_reference_minimum) < 1e-4 and result.rmsd < 0.01 and result.converged
    # A stiffer, slightly larger "reference": energies and minima differ by known amounts.
    reference = LennardJones(epsilon=1.1, sigma=1.05, rc=10.0)
    results = rescore(minima, reference, fmax=0.005, model_calculator=lj())
    for minimum, result in zip(minima, results, strict=True):
        atoms = minimum.copy()
        atoms.calc = reference
        assert result.error_at_model_minimum == pytest.approx(
            minimum.get_potential_energy() - atoms.get_potential_energy()
        )
        # LJ minima scale with σ and their energies with ε.
        assert result.reference_energy == pytest.approx(1.1 * minimum.get_potential_energy(), abs=1e-3)
        scaled = minimum.copy()
        scaled.positions *= 1.05
        assert rmsd(scaled, result.reference_minimum) < 0.01
        probe = result.reference_minimum.copy()
        probe.calc = lj()
        assert result.model_energy_at_reference_minimum == pytest.approx(probe.get_potential_energy())
        assert result.error_at_reference_minimum == pytest.approx(
            probe.get_potential_energy() - result.reference_energy
        )
        assert 0.01 < result.rmsd < 0.2 and result.reference_fmax_at_model_minimum > 0.1
        assert result.id == minimum.info["id"]
    paths = write_rescore(results, tmp_path)
    with open(paths["csv"]) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 and float(rows[0]["reference_relative"]) == 0.0
    assert len(ase.io.read(paths["extxyz"], index=":")) == 2


def test_a_failing_reference_calculation_is_reported_and_the_others_go_on(tmp_path, lj7_search):
    """E.g. xTB's "SCF not converged" on one odd minimum must not lose the comparison of the others."""
    from ase.calculators.calculator import CalculationFailed

    class FailsOnTheFirst(LennardJones):
        def calculate(self, atoms=None, properties=("energy",), system_changes=()):
            if np.allclose(atoms.positions, minima[0].positions):
                raise CalculationFailed("SCF not converged in 250 cycles")
            super().calculate(atoms, properties, system_changes)

    _, db_path = lj7_search
    minima = read_minima(db_path)[:2]
    lines = []
    results = rescore(minima, FailsOnTheFirst(rc=10.0), fmax=0.005, model_calculator=lj(), log=lines.append)
    assert results[0].failure == "SCF not converged in 250 cycles" and results[0].reference_minimum is None
    assert np.isnan(results[0].error_at_model_minimum) and not results[0].converged
    assert results[1].failure == "" and results[1].converged and results[1].rmsd < 0.01
    assert "failed (SCF not converged" in lines[0]
    paths = write_rescore(results, tmp_path)
    with open(paths["csv"]) as handle:
        rows = list(csv.DictReader(handle))
    assert rows[0]["failure"] and float(rows[1]["reference_relative"]) == 0.0
    assert len(ase.io.read(paths["extxyz"], index=":")) == 1


# ------------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="so3krates")
    explore_cli.register(parser.add_subparsers(dest="command"))
    return parser


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_checkpoint(path, make_force_field(preset("tiny"), torch.float64).model, species=[1, 6, 8])
    return path


def test_cli_explores_with_the_tiny_model(tmp_path, tiny_checkpoint, capsys):
    water = molecule("H2O")
    ase.io.write(tmp_path / "water.xyz", water)
    out = tmp_path / "explore"
    argv = ["explore", "--model", str(tiny_checkpoint), "--structure", str(tmp_path / "water.xyz")]
    argv += ["--steps", "2", "--fmax", "0.05", "--max-md-steps", "50", "--out", str(out), "--threads", "1"]
    args = _parser().parse_args(argv)
    assert args.run(args) == 0
    printed = capsys.readouterr().out
    assert "step 2:" in printed and "unique minima after 2 steps" in printed
    db = ase.db.connect(out / "minima.db")
    n_rows = db.count()
    assert 1 <= n_rows <= 3  # an escape that dissociated the molecule stores no minimum
    assert db.metadata["state"]["step"] == 2
    assert db.metadata["settings"]["fragment_distance"] == preset("tiny").cutoff
    for name in ["unique_minima.csv", "unique_minima.png", "energy_histogram.png", "lowest_minima.extxyz"]:
        assert (out / name).is_file()
    # The same command with a larger budget continues the search in the same database.
    argv[argv.index("--steps") + 1] = "3"
    args = _parser().parse_args(argv)
    assert args.run(args) == 0
    printed = capsys.readouterr().out
    assert "continuing the search" in printed and "step 3:" in printed and "step 1:" not in printed
    assert ase.db.connect(out / "minima.db").metadata["state"]["step"] == 3


def test_cli_rescores_with_a_reference(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    """The --reference path, with EMT (which knows H and O) standing in for GFN2-xTB."""
    from ase.calculators.emt import EMT

    monkeypatch.setattr(explore_cli, "reference_calculator", lambda name: EMT())
    ase.io.write(tmp_path / "water.xyz", molecule("H2O"))
    out = tmp_path / "explore"
    argv = ["explore", "--model", str(tiny_checkpoint), "--structure", str(tmp_path / "water.xyz")]
    argv += ["--steps", "1", "--fmax", "0.05", "--max-md-steps", "50", "--out", str(out)]
    argv += ["--reference", "xtb", "--rescore", "1"]
    args = _parser().parse_args(argv)
    assert args.run(args) == 0
    assert "rescored #" in capsys.readouterr().out
    with open(out / "rescore.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1 and np.isfinite(float(rows[0]["error_at_reference_minimum"]))
    assert (out / "reference_minima.extxyz").is_file()


def test_cli_bad_input_gives_one_line_errors(tmp_path, tiny_checkpoint):
    ase.io.write(tmp_path / "water.xyz", molecule("H2O"))
    ase.io.write(tmp_path / "nh3.xyz", molecule("NH3"))
    base = ["explore", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "out")]

    def error(extra: list[str], kind=DataError) -> str:
        args = _parser().parse_args(base + extra)
        with pytest.raises(kind) as info:
            args.run(args)
        message = str(info.value)
        assert "\n" not in message
        return message

    assert "missing.xyz: structure file not found" in error(["--structure", str(tmp_path / "missing.xyz")])
    assert "nh3.xyz: key 'numbers': element N (Z=7)" in error(["--structure", str(tmp_path / "nh3.xyz")])
    water = ["--structure", str(tmp_path / "water.xyz")]
    assert "key 'temperature'" in error([*water, "--temperature", "-5"], ConfigError)
    assert "--steps: must be at least 1" in error([*water, "--steps", "0"], ConfigError)
    assert "--rescore: needs a reference" in error([*water, "--rescore", "3"], ConfigError)
    args = _parser().parse_args(["explore", "--model", str(tmp_path / "none.pt"), *water])
    with pytest.raises(DataError, match=r"none\.pt: checkpoint not found"):
        args.run(args)
    if importlib.util.find_spec("tblite") is None:
        assert "pip install tblite" in error([*water, "--reference", "xtb"], ConfigError)


def test_cli_module_imports_neither_torch_nor_the_search_at_import_time():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(explore_cli))
    top_level = [node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]
    modules = {alias.name for node in top_level if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module for node in top_level if isinstance(node, ast.ImportFrom)}
    assert modules <= {"__future__", "argparse", "pathlib"}, modules


def test_keep_topology_discards_minima_with_other_bonds(tmp_path):
    """A conformer search: every stored minimum keeps the starting minimum's covalent bonds.

    LJ7 scaled to σ = 1.6 Å, so that nearest neighbours (1.8 Å) are "bonded" by argon's covalent radius and
    second neighbours are not: escapes that rearrange the contacts must be skipped, naming the bonds.
    """
    from so3krates.md.stability import covalent_bonds

    lines = []
    atoms = lj7()
    atoms.positions *= 1.6
    settings = {**LJ_SETTINGS, "timestep": 8.0, "fragment_distance": 3.2, "keep_topology": True}
    calculator = LennardJones(epsilon=1.0, sigma=1.6, rc=16.0)
    search = MinimaHopping(
        atoms, calculator, tmp_path / "minima.db", HoppingConfig(**settings), log=lines.append
    )
    search.run(steps=15)
    stored = read_minima(tmp_path / "minima.db", unique=False)
    reference = covalent_bonds(stored[0]).tolist()
    assert all(covalent_bonds(atoms).tolist() == reference for atoms in stored)
    assert any("bonds changed" in line and ("broke Ar" in line or "formed Ar" in line) for line in lines)
