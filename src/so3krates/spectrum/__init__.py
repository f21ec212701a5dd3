"""Vibrational analysis: harmonic frequencies from the model Hessian, power spectra from MD trajectories."""

from so3krates.spectrum.harmonic import (
    HarmonicAnalysis,
    harmonic_analysis,
    harmonic_file,
    hessian,
    normal_modes,
    optimize_structure,
    rigid_body_modes,
)
from so3krates.spectrum.vacf import (
    PowerSpectrum,
    power_spectrum,
    power_spectrum_file,
    trajectory_velocities,
    velocity_autocorrelation,
)

__all__ = [
    "HarmonicAnalysis",
    "PowerSpectrum",
    "harmonic_analysis",
    "harmonic_file",
    "hessian",
    "normal_modes",
    "optimize_structure",
    "power_spectrum",
    "power_spectrum_file",
    "rigid_body_modes",
    "trajectory_velocities",
    "velocity_autocorrelation",
]
