"""Vibrational analysis: autograd Hessian, normal modes against ASE, VACF power spectrum, ``spectrum`` CLI."""

from __future__ import annotations

import argparse
import csv

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.calculators.emt import EMT
from ase.io.trajectory import Trajectory
from ase.optimize import BFGS
from ase.vibrations import Vibrations, VibrationsData

from helpers import ethanol, make_force_field, random_rotation, water
from so3krates import So3kratesCalculator, atoms_to_graph, preset
from so3krates.cli.spectrum import register
from so3krates.errors import ConfigError, DataError, So3kratesError
from so3krates.model.checkpoint import save_checkpoint
from so3krates.spectrum import (
    harmonic_analysis,
    hessian,
    normal_modes,
    optimize_structure,
    power_spectrum,
    rigid_body_modes,
    trajectory_velocities,
    velocity_autocorrelation,
)
from so3krates.spectrum.harmonic import SQRT_EIGENVALUE_TO_CM1
from so3krates.spectrum.vacf import INVERSE_FS_TO_CM1, finite_difference_attenuation


@pytest.fixture(scope="module")
def force_field():
    return make_force_field(preset("tiny"), torch.float64)


@pytest.fixture(scope="module")
def ethanol_hessian(force_field):
    atoms = ethanol()
    return atoms, hessian(force_field, atoms)


def _as_real(frequencies: np.ndarray) -> np.ndarray:
    """ASE's complex frequencies with imaginary ones as negative numbers, as ours."""
    return np.where(np.abs(frequencies.imag) > 0, -np.abs(frequencies.imag), frequencies.real)


def _ase_vibrations(atoms: Atoms, calculator, tmp_path) -> VibrationsData:
    atoms = atoms.copy()
    atoms.calc = calculator
    vibrations = Vibrations(atoms, name=str(tmp_path / "vib"), delta=1e-3, nfree=4)
    vibrations.run()
    return vibrations.get_vibrations()


# ---------------------------------------------------------------------------------------------------------
# Hessian


def test_hessian_equals_central_differences_of_forces(force_field, ethanol_hessian):
    atoms, autograd = ethanol_hessian
    step = 1e-4  # Å; central differences: error O(step²), roundoff O(ε / step)
    n = 3 * len(atoms)
    finite = np.zeros((n, n))
    for k in range(n):
        forces = []
        for sign in (1.0, -1.0):
            displaced = atoms.copy()
            displaced.positions.reshape(-1)[k] += sign * step
            graph = atoms_to_graph(displaced, force_field.cutoff)  # full neighbour list there
            forces.append(force_field(graph)["forces"].detach().numpy().reshape(-1))
        finite[k] = -(forces[0] - forces[1]) / (2 * step)
    assert np.abs(autograd).max() > 1e-2  # not trivially zero
    np.testing.assert_allclose(autograd, finite, rtol=0, atol=1e-8)
    np.testing.assert_allclose(finite, finite.T, rtol=0, atol=1e-8)  # symmetric before symmetrising too


def test_hessian_is_symmetric_translation_invariant_and_dtype_independent(force_field, ethanol_hessian):
    atoms, reference = ethanol_hessian
    np.testing.assert_array_equal(reference, reference.T)
    # Acoustic sum rule: E is invariant under translations, so Σ_j ∂²E/∂R_ia ∂R_jb = 0.
    sums = reference.reshape(len(atoms), 3, len(atoms), 3).sum(axis=2)
    assert np.abs(sums).max() < 1e-12
    model32 = make_force_field(preset("tiny"), torch.float32)
    from_float32 = hessian(model32, atoms, dtype=torch.float64)
    assert next(model32.parameters()).dtype == torch.float32  # the caller's model is left alone
    # Same weights up to the float32 rounding of the per-element scale and shift (float64 in that model).
    np.testing.assert_allclose(from_float32, reference, rtol=0, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------
# Normal modes


def test_unit_conversion_is_ase_vibrations_data():
    assert SQRT_EIGENVALUE_TO_CM1 == pytest.approx(521.47, abs=0.01)
    atoms = water()
    rng = np.random.default_rng(0)
    a = rng.normal(size=(9, 9))
    matrix = a @ a.T - 2.0 * np.eye(9)  # some negative eigenvalues: imaginary frequencies
    ours, _ = normal_modes(matrix, atoms.get_masses())
    theirs = _as_real(VibrationsData.from_2d(atoms, matrix).get_frequencies())
    np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-8)


def test_frequencies_match_ase_vibrations_of_our_calculator(force_field, ethanol_hessian, tmp_path):
    atoms, ours_hessian = ethanol_hessian
    data = _ase_vibrations(atoms, So3kratesCalculator(force_field.model, dtype="float64"), tmp_path)
    np.testing.assert_allclose(ours_hessian, data.get_hessian_2d(), rtol=0, atol=1e-8)
    ours, _ = normal_modes(ours_hessian, atoms.get_masses())  # no projection, like ASE
    np.testing.assert_allclose(ours, _as_real(data.get_frequencies()), rtol=0, atol=1e-2)


@pytest.mark.parametrize(
    "atoms, n_rigid",
    [
        (Atoms("Cu4", positions=[[0, 0, 0], [2.5, 0, 0], [1.25, 2.1, 0], [1.25, 0.7, 2.0]]), 6),
        (Atoms("CO2", positions=[[0, 0, 0], [0, 0, 1.25], [0, 0, -1.25]]), 5),  # linear
    ],
)
def test_projection_removes_rigid_modes_and_keeps_emt_vibrations(atoms, n_rigid, tmp_path):
    atoms = atoms.copy()
    atoms.calc = EMT()
    BFGS(atoms, logfile=None).run(fmax=1e-6, steps=500)
    data = _ase_vibrations(atoms, EMT(), tmp_path)
    frequencies, modes = normal_modes(data.get_hessian_2d(), atoms.get_masses(), atoms.get_positions())
    assert rigid_body_modes(atoms.get_masses(), atoms.get_positions()).shape[1] == n_rigid
    np.testing.assert_array_equal(frequencies[:n_rigid], 0.0)
    reference = _as_real(data.get_frequencies())
    reference = reference[np.argsort(np.abs(reference))]  # unprojected: rigid modes small but not zero
    assert np.abs(reference[:n_rigid]).max() < 0.1
    np.testing.assert_allclose(frequencies[n_rigid:], np.sort(reference[n_rigid:]), rtol=0, atol=1e-3)
    assert np.abs(frequencies[n_rigid:]).min() > 50.0  # the vibrations did not collapse into the zeros
    assert modes.shape == (3 * len(atoms), len(atoms), 3)


@pytest.mark.parametrize("angle, n_rigid", [(180.0, 5), (179.9999, 5), (179.0, 6), (104.5, 6)])
def test_linear_molecules_have_five_rigid_modes(angle, n_rigid):
    half = np.radians(angle) / 2
    positions = [
        [0, 0, 0],
        [1.16 * np.sin(half), 0, 1.16 * np.cos(half)],
        [-1.16 * np.sin(half), 0, 1.16 * np.cos(half)],
    ]
    atoms = Atoms("COO", positions=positions)
    basis = rigid_body_modes(atoms.get_masses(), atoms.get_positions())
    assert basis.shape == (9, n_rigid)
    np.testing.assert_allclose(basis.T @ basis, np.eye(n_rigid), atol=1e-12)
    assert rigid_body_modes(atoms.get_masses(), atoms.get_positions(), rotations=False).shape == (9, 3)


def test_vibrations_satisfy_eckart_conditions_and_rotation_invariance(force_field, ethanol_hessian):
    atoms, matrix = ethanol_hessian
    masses, positions = atoms.get_masses(), atoms.get_positions()
    frequencies, modes = normal_modes(matrix, masses, positions)
    np.testing.assert_allclose(np.linalg.norm(modes, axis=(1, 2)), 1.0)
    centred = positions - (masses[:, None] * positions).sum(0) / masses.sum()
    for mode in modes[6:]:  # no centre-of-mass motion, no angular momentum
        assert np.abs((masses[:, None] * mode).sum(0)).max() < 1e-10
        assert np.abs((masses[:, None] * np.cross(centred, mode)).sum(0)).max() < 1e-10
    rotated = atoms.copy()
    rotated.positions = positions @ random_rotation(np.random.default_rng(3)).T
    rotated_frequencies, _ = normal_modes(hessian(force_field, rotated), masses, rotated.get_positions())
    np.testing.assert_allclose(rotated_frequencies, frequencies, rtol=0, atol=1e-5)


def test_harmonic_analysis_warns_off_minimum_and_optimizes_to_a_minimum(force_field):
    messages: list[str] = []
    result = harmonic_analysis(force_field.model, water(), log=messages.append)
    assert any("warning: max |F|" in m and "--optimize" in m for m in messages)
    assert not result.optimized and result.max_force > 1e-3
    messages.clear()
    result = harmonic_analysis(force_field.model, water(), optimize=True, log=messages.append)
    assert result.converged and result.max_force <= 1e-4
    assert not any("warning" in m for m in messages)
    # The tiny model's water minimum is (quasi-)linear: 6 or 5 rigid-body modes depending on how straight.
    assert result.n_rigid in (5, 6) and result.n_rigid + len(result.vibrational_frequencies_cm1) == 9
    assert (result.vibrational_frequencies_cm1 > 0).all()  # a minimum: all frequencies real
    assert result.zero_point_energy == pytest.approx(
        0.5 * result.vibrational_frequencies_cm1.sum() * units.invcm
    )


def test_optimize_structure_reaches_fmax_with_emt():
    atoms = Atoms("Cu4", positions=[[0, 0, 0], [2.5, 0, 0], [1.25, 2.1, 0], [1.25, 0.7, 2.0]])
    relaxed, converged, steps = optimize_structure(atoms, EMT(), fmax=1e-4, optimizer="FIRE")
    relaxed.calc = EMT()
    assert converged and steps > 0 and np.linalg.norm(relaxed.get_forces(), axis=1).max() <= 1e-4
    assert atoms.calc is None and np.allclose(atoms.positions[1], [2.5, 0, 0])  # the input is untouched


# ---------------------------------------------------------------------------------------------------------
# VACF power spectrum

TRUE_WAVENUMBERS = np.array([430.0, 1170.0, 1730.0, 3050.0])  # cm⁻¹
TIMESTEP_FS = 0.5


def _oscillators(n_frames: int = 1200) -> tuple[np.ndarray, np.ndarray]:
    """Four uncoupled 3D harmonic oscillators (one atom each), equal kinetic energy per oscillator.

    Returns positions and velocities, (n_frames, 4, 3), Å and Å/fs.
    """
    rng = np.random.default_rng(0)
    omega = 2 * np.pi * TRUE_WAVENUMBERS / INVERSE_FS_TO_CM1  # rad/fs
    amplitude = rng.normal(size=(4, 3)) * 0.005 / omega[:, None]
    phase = rng.uniform(0.0, 2 * np.pi, size=4)
    angle = omega[None, :] * (np.arange(n_frames) * TIMESTEP_FS)[:, None] + phase  # (n_frames, 4)
    centres = 3.0 * np.eye(4)[:, :3]
    positions = centres + amplitude * np.cos(angle)[:, :, None]
    velocities = -amplitude * omega[:, None] * np.sin(angle)[:, :, None]
    return positions, velocities


def _peaks(spectrum) -> np.ndarray:
    intensity = spectrum.intensity
    inner = (intensity[1:-1] > intensity[:-2]) & (intensity[1:-1] >= intensity[2:])
    inner &= intensity[1:-1] > 0.05 * intensity.max()
    return spectrum.wavenumbers_cm1[1:-1][inner]


def _assert_peaks_on_true_wavenumbers(spectrum) -> None:
    peaks = _peaks(spectrum)
    assert len(peaks) == len(TRUE_WAVENUMBERS), peaks
    assert np.abs(peaks - TRUE_WAVENUMBERS).max() <= spectrum.resolution_cm1


def test_vacf_equals_direct_average_over_time_origins():
    rng = np.random.default_rng(1)
    velocities = rng.normal(size=(37, 5, 3))
    masses = rng.uniform(1.0, 16.0, size=5)
    direct = [
        np.mean(np.einsum("tia,tia,i->t", velocities[: 37 - lag], velocities[lag:], masses))
        for lag in range(37)
    ]
    np.testing.assert_allclose(velocity_autocorrelation(velocities, masses), direct, rtol=1e-10)
    np.testing.assert_allclose(
        velocity_autocorrelation(velocities, masses, max_lag=5), direct[:6], rtol=1e-10
    )


@pytest.mark.parametrize("window", ["hann", "blackman", "none"])
def test_power_spectrum_peaks_on_synthetic_oscillators(window):
    _, velocities = _oscillators()
    spectrum = power_spectrum(velocities, np.full(4, 12.0), TIMESTEP_FS, window=window)
    assert spectrum.resolution_cm1 < 20.0
    assert spectrum.wavenumbers_cm1[-1] == pytest.approx(INVERSE_FS_TO_CM1 / (2 * TIMESTEP_FS))  # Nyquist
    if window == "none":  # side lobes of the rectangular window also count as local maxima
        for true in TRUE_WAVENUMBERS:
            near = np.abs(spectrum.wavenumbers_cm1 - true) < 100
            assert abs(spectrum.wavenumbers_cm1[near][np.argmax(spectrum.intensity[near])] - true) <= (
                spectrum.resolution_cm1
            )
    else:
        _assert_peaks_on_true_wavenumbers(spectrum)


def test_trajectory_velocities_stored_or_finite_differences(tmp_path):
    positions, velocities = _oscillators()
    frames = [Atoms("C4", positions=p) for p in positions]
    from_positions = trajectory_velocities(frames, TIMESTEP_FS)
    assert "finite differences" in from_positions.source
    assert from_positions.velocities.shape == (len(frames) - 2, 4, 3)
    # Central differences scale each oscillator's velocity by sinc(2 f Δt), exactly for a sinusoid.
    attenuation = finite_difference_attenuation(TRUE_WAVENUMBERS, TIMESTEP_FS)[None, :, None]
    np.testing.assert_allclose(from_positions.velocities, attenuation * velocities[1:-1], rtol=0, atol=1e-12)
    _assert_peaks_on_true_wavenumbers(
        power_spectrum(from_positions.velocities, from_positions.masses, TIMESTEP_FS)
    )
    with Trajectory(tmp_path / "md.traj", "w") as trajectory:
        for p, v in zip(positions, velocities, strict=True):
            atoms = Atoms("C4", positions=p)
            atoms.set_velocities(v / units.fs)  # Å/fs → ASE units
            trajectory.write(atoms)
    stored = trajectory_velocities(ase.io.read(tmp_path / "md.traj", index=":"), TIMESTEP_FS)
    assert "stored" in stored.source
    np.testing.assert_allclose(stored.velocities, velocities, rtol=1e-10, atol=1e-14)


def test_finite_differences_unwrap_periodic_frames():
    cell = np.diag([3.0, 3.0, 3.0])
    frames = [Atoms("C", positions=[[0.4 * k, 1.0, 1.0]], cell=cell, pbc=True) for k in range(12)]
    for atoms in frames:
        atoms.wrap()  # the atom crosses the boundary twice
    data = trajectory_velocities(frames, 2.0)
    np.testing.assert_allclose(data.velocities[:, 0], [[0.2, 0.0, 0.0]] * 10, atol=1e-12)


def test_trajectory_velocities_refuse_missing_time_step():
    frames = [Atoms("C", positions=[[0.0, 0.0, 0.1 * k]]) for k in range(5)]
    with pytest.raises(ConfigError, match=r"timestep_fs.*has no velocities"):
        trajectory_velocities(frames, None)
    with pytest.raises(ConfigError, match="must be positive"):
        trajectory_velocities(frames, 0.0)


# ---------------------------------------------------------------------------------------------------------
# CLI


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="so3krates")
    register(parser.add_subparsers(dest="command"))
    return parser


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("model") / "best.pt"
    save_checkpoint(path, make_force_field(preset("tiny"), torch.float64).model, species=[1, 6, 8])
    return str(path)


def _run(parser, argv):
    args = parser.parse_args(argv)
    return args.run(args)


def test_cli_harmonic_writes_outputs(parser, checkpoint, tmp_path, capsys):
    structure = tmp_path / "ethanol.xyz"
    ase.io.write(structure, ethanol())
    out = tmp_path / "out"
    argv = ["spectrum", "harmonic", "--model", checkpoint, "--structure", str(structure), "--out", str(out)]
    assert _run(parser, argv) == 0
    printed = capsys.readouterr().out
    assert "warning: max |F|" in printed and "wrote" in printed
    for name in ("frequencies.csv", "modes.txt", "hessian.npy", "structure.extxyz", "stick_spectrum.png"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "frequencies.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 27 and [r["kind"] for r in rows[:6]] == ["rigid"] * 6
    assert np.load(out / "hessian.npy").shape == (27, 27)
    assert not list(out.glob(".*.tmp"))


def test_cli_harmonic_optimizes(parser, checkpoint, tmp_path, capsys):
    structure = tmp_path / "water.extxyz"
    ase.io.write(structure, water())
    argv = ["spectrum", "harmonic", "--model", checkpoint, "--structure", str(structure), "--optimize"]
    assert _run(parser, [*argv, "--out", str(tmp_path / "out")]) == 0
    assert "BFGS optimisation converged" in capsys.readouterr().out
    relaxed = ase.io.read(tmp_path / "out" / "structure.extxyz")
    assert not np.allclose(relaxed.positions, water().positions)


def test_cli_vacf_writes_outputs(parser, tmp_path, capsys):
    positions, _ = _oscillators()
    trajectory = tmp_path / "md.extxyz"
    ase.io.write(trajectory, [Atoms("C4", positions=p) for p in positions])
    out = tmp_path / "out"
    argv = ["spectrum", "vacf", "--trajectory", str(trajectory), "--timestep-fs", str(TIMESTEP_FS)]
    assert _run(parser, [*argv, "--out", str(out)]) == 0
    assert "finite differences" in capsys.readouterr().out
    for name in ("power_spectrum.csv", "vacf.csv", "power_spectrum.png"):
        assert (out / name).stat().st_size > 0, name
    table = np.loadtxt(out / "power_spectrum.csv", delimiter=",", skiprows=1)
    assert table.shape[1] == 2 and table[-1, 0] == pytest.approx(INVERSE_FS_TO_CM1, rel=1e-6)


def test_cli_bad_input_is_one_line_naming_the_file(parser, checkpoint, tmp_path):
    missing = str(tmp_path / "nope.xyz")
    with pytest.raises(DataError, match=r"nope\.xyz: structure file not found"):
        _run(parser, ["spectrum", "harmonic", "--model", checkpoint, "--structure", missing])
    with pytest.raises(DataError, match=r"nope\.xyz: trajectory file not found"):
        _run(parser, ["spectrum", "vacf", "--trajectory", missing, "--timestep-fs", "1"])
    nitrogen = tmp_path / "nh3.xyz"
    ase.io.write(nitrogen, Atoms("NH3", positions=[[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]))
    with pytest.raises(DataError, match=r"nh3\.xyz: key 'numbers': element N \(Z=7\)"):
        _run(parser, ["spectrum", "harmonic", "--model", checkpoint, "--structure", str(nitrogen)])
    trajectory = tmp_path / "md.extxyz"
    ase.io.write(trajectory, [Atoms("C", positions=[[0.0, 0.0, 0.1 * k]]) for k in range(5)])
    with pytest.raises(ConfigError, match="--timestep-fs"):
        _run(parser, ["spectrum", "vacf", "--trajectory", str(trajectory), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit):
        parser.parse_args(["spectrum"])  # a mode is required


def test_cli_refuses_to_replace_results_without_overwrite(parser, tmp_path, capsys):
    """As md refuses a run directory in use: results already in --out stay unless --overwrite is given."""
    positions, _ = _oscillators()
    trajectory = tmp_path / "md.extxyz"
    ase.io.write(trajectory, [Atoms("C4", positions=p) for p in positions])
    out = tmp_path / "out"
    argv = [
        "spectrum",
        "vacf",
        "--trajectory",
        str(trajectory),
        "--timestep-fs",
        str(TIMESTEP_FS),
        "--out",
        str(out),
    ]
    assert _run(parser, argv) == 0
    before = (out / "power_spectrum.csv").read_bytes()
    with pytest.raises(
        So3kratesError,
        match=r"already holds power_spectrum.csv, vacf.csv, power_spectrum.png; pass --overwrite",
    ):
        _run(parser, [*argv, "--skip", "5"])
    assert (out / "power_spectrum.csv").read_bytes() == before
    assert _run(parser, [*argv, "--skip", "5", "--overwrite"]) == 0
    assert (out / "power_spectrum.csv").read_bytes() != before
