"""Vibrational power spectrum from the velocity autocorrelation function (VACF) of an MD trajectory.

Data path: trajectory (extxyz / ASE .traj / anything ``ase.io.read`` reads) → velocities (n_frames, n_atoms,
3) Å/fs, stored ones or central finite differences of the positions → mass-weighted VACF
C(τ) = Σ_i m_i ⟨v_i(t)·v_i(t+τ)⟩_t by FFT (zero-padded to avoid circular wrap-around; Wiener–Khinchin) →
one-sided window (Hann by default) → cosine transform → intensity on a wavenumber axis in cm⁻¹.

Unlike the harmonic analysis, this spectrum contains anharmonicity and temperature effects, but not
intensities of any spectroscopy (it is the vibrational density of states).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.geometry import find_mic

from so3krates.errors import ConfigError, DataError
from so3krates.files import atomic_path, save_figure

#: 1/fs → cm⁻¹: ν̃ = f / c with c in cm/fs (≈ 33356.41).
INVERSE_FS_TO_CM1 = 1e15 / (100.0 * units._c)

WINDOWS = ("hann", "blackman", "none")

#: bytes of complex FFT buffer per block of atoms in the autocorrelation.
_BLOCK_BYTES = 64 * 2**20


@dataclass
class TrajectoryVelocities:
    """Velocities of a trajectory.

    Attributes:
        velocities: (n_frames, n_atoms, 3) float, Å/fs.
        masses: (n_atoms,) float, amu.
        timestep_fs: float, fs — time between consecutive frames.
        source: where the velocities come from, in words (stored momenta, or finite differences).
        finite_differences: True when they are central differences of positions, which scale a mode of
            frequency f by sin(2π f Δt) / (2π f Δt) (see :func:`finite_difference_attenuation`).
    """

    velocities: np.ndarray
    masses: np.ndarray
    timestep_fs: float
    source: str
    finite_differences: bool = False


@dataclass
class PowerSpectrum:
    """Result of :func:`power_spectrum`.

    Attributes:
        wavenumbers_cm1: (n_freq,) float, cm⁻¹ — from 0 to the Nyquist wavenumber.
        intensity: (n_freq,) float, amu Å²/fs — ∫ C(τ) w(τ) cos(2π f τ) dτ over τ ∈ (−T, T).
        lag_fs: (n_lags,) float, fs — lag times of the VACF.
        vacf: (n_lags,) float, amu Å²/fs² — mass-weighted VACF, before the window.
        timestep_fs: float, fs.
        window: name of the window applied to the VACF.
    """

    wavenumbers_cm1: np.ndarray
    intensity: np.ndarray
    lag_fs: np.ndarray
    vacf: np.ndarray
    timestep_fs: float
    window: str

    @property
    def resolution_cm1(self) -> float:
        """cm⁻¹ — spacing of the wavenumber axis."""
        return float(self.wavenumbers_cm1[1] - self.wavenumbers_cm1[0])


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def velocity_autocorrelation(
    velocities: np.ndarray, masses: np.ndarray, max_lag: int | None = None
) -> np.ndarray:
    """Mass-weighted VACF C(τ) = Σ_i m_i ⟨v_i(t)·v_i(t+τ)⟩_t, averaged over all time origins.

    Args:
        velocities: (n_frames, n_atoms, 3) float, Å/fs.
        masses: (n_atoms,) float, amu.
        max_lag: largest lag in frames (default: n_frames − 1).

    Returns:
        (n_lags,) float, amu Å²/fs² — C at lags 0 … n_lags − 1 frames; each lag is divided by its number of
        time origins (n_frames − τ).
    """
    velocities = np.asarray(velocities, dtype=np.float64)
    masses = np.asarray(masses, dtype=np.float64)
    n_frames, n_atoms = velocities.shape[:2]
    n_lags = n_frames if max_lag is None else min(int(max_lag) + 1, n_frames)
    n_fft = _next_power_of_two(2 * n_frames)  # ≥ 2 n_frames − 1: the linear, not circular, correlation
    block = max(1, _BLOCK_BYTES // (16 * 3 * (n_fft // 2 + 1)))
    power = np.zeros(n_fft // 2 + 1)
    for start in range(0, n_atoms, block):
        spectrum = np.fft.rfft(velocities[:, start : start + block], n=n_fft, axis=0)
        weights = masses[start : start + block][None, :, None]
        power += (weights * (spectrum.real**2 + spectrum.imag**2)).sum(axis=(1, 2))
    correlation = np.fft.irfft(power, n=n_fft)[:n_lags]  # Wiener–Khinchin
    return correlation / (n_frames - np.arange(n_lags))


def window_function(name: str, n_lags: int) -> np.ndarray:
    """One-sided window over lags 0 … n_lags − 1: 1 at τ = 0, decaying to 0 at τ = n_lags."""
    lag = np.arange(n_lags) / n_lags
    if name == "hann":
        return 0.5 * (1.0 + np.cos(np.pi * lag))
    if name == "blackman":
        return 0.42 + 0.5 * np.cos(np.pi * lag) + 0.08 * np.cos(2.0 * np.pi * lag)
    if name == "none":
        return np.ones(n_lags)
    raise ConfigError(f"key 'window': unknown window {name!r}; choose one of {', '.join(WINDOWS)}")


def power_spectrum(
    velocities: np.ndarray,
    masses: np.ndarray,
    timestep_fs: float,
    *,
    window: str = "hann",
    max_lag: int | None = None,
    zero_padding: int = 2,
) -> PowerSpectrum:
    """Power spectrum (vibrational density of states) from the mass-weighted VACF.

    Args:
        velocities: (n_frames, n_atoms, 3) float, Å/fs.
        masses: (n_atoms,) float, amu.
        timestep_fs: float, fs — time between frames.
        window: ``hann`` (default), ``blackman`` or ``none``, applied to the VACF over its lags.
        max_lag: correlation length in frames (default: the whole trajectory); shorter is smoother.
        zero_padding: the symmetric VACF (2 n_lags − 1 points) is zero-padded to the next power of two of
            ``zero_padding`` × 2 n_lags, which sets the spacing of the wavenumber axis.

    Returns:
        The spectrum on 0 … Nyquist; its axis spacing is ``1 / (n_fft timestep_fs)`` converted to cm⁻¹.
    """
    if timestep_fs <= 0:
        raise ConfigError(f"key 'timestep_fs': must be positive, got {timestep_fs}")
    vacf = velocity_autocorrelation(velocities, masses, max_lag)
    n_lags = len(vacf)
    windowed = vacf * window_function(window, n_lags)
    n_fft = _next_power_of_two(max(1, zero_padding) * 2 * n_lags)
    symmetric = np.zeros(n_fft)
    symmetric[:n_lags] = windowed
    if n_lags > 1:
        symmetric[-(n_lags - 1) :] = windowed[1:][::-1]
    intensity = np.fft.rfft(symmetric).real * timestep_fs
    wavenumbers = np.fft.rfftfreq(n_fft, d=timestep_fs) * INVERSE_FS_TO_CM1
    return PowerSpectrum(
        wavenumbers_cm1=wavenumbers,
        intensity=intensity,
        lag_fs=np.arange(n_lags) * timestep_fs,
        vacf=vacf,
        timestep_fs=float(timestep_fs),
        window=window,
    )


def read_trajectory(path: str | os.PathLike, skip: int = 0) -> list[Atoms]:
    """All frames of a trajectory file after the first ``skip``; one-line ``DataError`` otherwise."""
    import ase.io

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: trajectory file not found")
    try:
        frames = ase.io.read(path, index=":")
    except Exception as error:
        raise DataError(f"{path}: ase.io.read failed: {type(error).__name__}: {error}") from None
    frames = frames[skip:]
    if len(frames) < 4:
        raise DataError(f"{path}: {len(frames)} frames after skipping {skip}; a spectrum needs at least 4")
    first = frames[0]
    for index, atoms in enumerate(frames[1:], start=skip + 1):
        if len(atoms) != len(first) or not np.array_equal(atoms.numbers, first.numbers):
            raise DataError(f"{path}: frame {index}: key 'numbers': atoms differ from frame {skip}")
    return frames


def trajectory_velocities(
    frames: list[Atoms], timestep_fs: float | None, source: str = "trajectory", first_frame: int = 0
) -> TrajectoryVelocities:
    """Velocities of the frames in Å/fs: stored ones (ASE ``momenta``, or a per-atom ``velocities`` array
    taken as Å/fs), else central finite differences of the positions (minimum image for periodic cells).

    Raises ``ConfigError`` without a positive ``timestep_fs``: it puts the spectrum on a frequency axis
    and, without stored velocities, gives the finite differences. ``first_frame`` is the file's index of
    ``frames[0]``, for error messages.
    """
    stored = _stored_velocities(frames, source, first_frame)
    if timestep_fs is None:
        has = "has velocities" if stored is not None else "has no velocities"
        raise ConfigError(
            f"key 'timestep_fs' (--timestep-fs): missing; needed for the frequency axis ({source} {has})"
        )
    if not timestep_fs > 0:
        raise ConfigError(f"key 'timestep_fs' (--timestep-fs): must be positive, got {timestep_fs}")
    masses = frames[0].get_masses()
    if stored is not None:
        velocities, description = stored
        return TrajectoryVelocities(velocities, masses, float(timestep_fs), description)
    positions = np.stack([atoms.positions for atoms in frames])  # (n_frames, n_atoms, 3)
    steps = np.diff(positions, axis=0)
    for index, atoms in enumerate(frames[1:]):
        if atoms.pbc.any():  # unwrap atoms that crossed the cell boundary between frames
            steps[index] = find_mic(steps[index], atoms.cell, atoms.pbc)[0]
    velocities = (steps[1:] + steps[:-1]) / (2.0 * timestep_fs)
    description = (
        f"finite differences of positions (central, {len(velocities)} of {len(frames)} frames; no velocities "
        "stored)"
    )
    return TrajectoryVelocities(velocities, masses, float(timestep_fs), description, finite_differences=True)


def finite_difference_attenuation(wavenumbers_cm1: np.ndarray, timestep_fs: float) -> np.ndarray:
    """Amplitude factor of central-difference velocities, sin(2π f Δt) / (2π f Δt), at ``wavenumbers_cm1``;
    the power spectrum is scaled by its square. Peak positions are unaffected."""
    return np.sinc(2.0 * np.asarray(wavenumbers_cm1) / INVERSE_FS_TO_CM1 * timestep_fs)  # np.sinc has π


def _stored_velocities(frames: list[Atoms], source: str, first_frame: int) -> tuple[np.ndarray, str] | None:
    if all("momenta" in atoms.arrays for atoms in frames):
        # ASE velocities are in Å per ASE time unit; units.fs is one fs in that unit.
        velocities = np.stack([atoms.get_velocities() for atoms in frames]) * units.fs
        if np.any(velocities):
            return velocities, "velocities stored in the trajectory (ASE momenta)"
        return None
    if all("velocities" in atoms.arrays for atoms in frames):
        velocities = np.stack([np.asarray(atoms.arrays["velocities"], dtype=np.float64) for atoms in frames])
        return velocities, "velocities stored in the trajectory ('velocities' array, taken as Å/fs)"
    for key in ("momenta", "velocities"):
        present = [key in atoms.arrays for atoms in frames]
        if any(present):
            missing = present.index(False) + first_frame
            raise DataError(f"{source}: frame {missing}: key {key!r}: velocities stored in some frames only")
    return None


def write_power_spectrum(
    spectrum: PowerSpectrum, out_dir: str | os.PathLike, max_wavenumber_cm1: float = 4000.0, title: str = ""
) -> list[Path]:
    """Writes ``power_spectrum.csv`` (all wavenumbers up to Nyquist), ``vacf.csv`` and ``power_spectrum.png``
    (up to ``max_wavenumber_cm1``) to ``out_dir``, each atomically. Returns the paths."""
    out_dir = Path(out_dir)
    paths = [out_dir / name for name in VACF_FILES]
    with atomic_path(paths[0]) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["wavenumber_cm1", "intensity"])
        writer.writerows(
            (f"{w:.4f}", f"{i:.8e}")
            for w, i in zip(spectrum.wavenumbers_cm1, spectrum.intensity, strict=True)
        )
    with atomic_path(paths[1]) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["lag_fs", "vacf", "vacf_normalized"])
        c0 = spectrum.vacf[0] if spectrum.vacf[0] != 0 else 1.0
        writer.writerows(
            (f"{t:.4f}", f"{c:.8e}", f"{c / c0:.8e}")
            for t, c in zip(spectrum.lag_fs, spectrum.vacf, strict=True)
        )
    plot_power_spectrum(paths[2], spectrum, max_wavenumber_cm1, title)
    return paths


def plot_power_spectrum(
    path: str | os.PathLike, spectrum: PowerSpectrum, max_wavenumber_cm1: float = 4000.0, title: str = ""
) -> None:
    """Normalised power spectrum from 0 to ``max_wavenumber_cm1`` (PNG, matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = spectrum.wavenumbers_cm1 <= max_wavenumber_cm1
    wavenumbers, intensity = spectrum.wavenumbers_cm1[shown], spectrum.intensity[shown]
    peak = np.abs(intensity[wavenumbers > 0]).max(initial=0.0)  # skip ν̃ = 0: drift of the centre of mass
    fig, axis = plt.subplots(figsize=(8, 3.6))
    axis.plot(wavenumbers, intensity / (peak if peak > 0 else 1.0), lw=1.0)
    axis.set_xlim(0.0, min(max_wavenumber_cm1, float(spectrum.wavenumbers_cm1[-1])))
    axis.set_xlabel("wavenumber / cm$^{-1}$")
    axis.set_ylabel("intensity (normalised)")
    axis.set_title(
        title
        or f"VACF power spectrum ({spectrum.window} window, Δν̃ = {spectrum.resolution_cm1:.2f} cm$^{{-1}}$)"
    )
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


#: The files of ``spectrum vacf``.
VACF_FILES = ["power_spectrum.csv", "vacf.csv", "power_spectrum.png"]


def power_spectrum_file(
    trajectory: str | os.PathLike,
    out_dir: str | os.PathLike,
    timestep_fs: float | None,
    *,
    skip: int = 0,
    max_lag_fs: float | None = None,
    window: str = "hann",
    max_wavenumber_cm1: float = 4000.0,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> PowerSpectrum:
    """``so3krates spectrum vacf``: trajectory file → power spectrum CSV and PNG in ``out_dir`` (results
    already there are replaced only with ``overwrite``).

    Args:
        trajectory: extxyz, ASE .traj or any file ``ase.io.read`` reads with all frames.
        timestep_fs: fs between consecutive frames (MD time step × write interval).
        skip: frames to drop at the start (equilibration).
        max_lag_fs: correlation length, fs (default: the whole trajectory).
    """
    if window not in WINDOWS:
        raise ConfigError(f"key 'window': unknown window {window!r}; choose one of {', '.join(WINDOWS)}")
    if skip < 0:
        raise ConfigError(f"key 'skip': must be ≥ 0, got {skip}")
    from so3krates.checks import check_results_folder

    check_results_folder(out_dir, VACF_FILES, overwrite, "--out")
    frames = read_trajectory(trajectory, skip)
    data = trajectory_velocities(frames, timestep_fs, source=str(trajectory), first_frame=skip)
    log(f"{trajectory}: {len(frames)} frames of {len(frames[0])} atoms, {data.timestep_fs:g} fs apart")
    log(f"velocities: {data.source}")
    if data.finite_differences:
        nyquist = INVERSE_FS_TO_CM1 / (2.0 * data.timestep_fs)
        checks = [w for w in (1000.0, 2000.0, 3000.0) if w < nyquist]
        factors = finite_difference_attenuation(np.array(checks), data.timestep_fs) ** 2
        if checks:
            log(
                "finite differences scale the intensity by "
                + ", ".join(f"{100 * f:.0f}% at {w:.0f}" for w, f in zip(checks, factors, strict=True))
                + " cm⁻¹ (peak positions are unaffected; write velocities or frames more often to avoid it)"
            )
    max_lag = None
    if max_lag_fs is not None:
        if not max_lag_fs > 0:
            raise ConfigError(f"key 'max_lag_fs': must be positive, got {max_lag_fs}")
        max_lag = round(max_lag_fs / data.timestep_fs)
    spectrum = power_spectrum(data.velocities, data.masses, data.timestep_fs, window=window, max_lag=max_lag)
    paths = write_power_spectrum(spectrum, out_dir, max_wavenumber_cm1, title=f"{Path(trajectory).name}")
    nyquist = spectrum.wavenumbers_cm1[-1]
    log(
        f"spectrum 0 … {nyquist:.0f} cm⁻¹ (Nyquist), spacing {spectrum.resolution_cm1:.2f} cm⁻¹, "
        f"correlation length {spectrum.lag_fs[-1]:.1f} fs, {window} window"
    )
    log("wrote " + ", ".join(str(p) for p in paths))
    return spectrum
