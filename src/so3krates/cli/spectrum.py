"""``so3krates spectrum harmonic | vacf``: argv → library call in :mod:`so3krates.spectrum`.

Nothing heavy is imported here at module level (torch, the model): ``so3krates --help`` stays fast.
"""

from __future__ import annotations

import argparse

from so3krates.cli import non_negative_int, positive_float, positive_int, set_torch_threads


def _run_harmonic(args: argparse.Namespace) -> int:
    from so3krates.spectrum.harmonic import harmonic_file

    set_torch_threads(args.threads)
    harmonic_file(
        args.model,
        args.structure,
        args.out,
        index=args.index,
        optimize=args.optimize,
        fmax=args.fmax,
        max_steps=args.max_steps,
        optimizer=args.optimizer,
        device=args.device,
        overwrite=args.overwrite,
    )
    return 0


def _run_vacf(args: argparse.Namespace) -> int:
    from so3krates.spectrum.vacf import power_spectrum_file

    power_spectrum_file(
        args.trajectory,
        args.out,
        args.timestep_fs,
        skip=args.skip,
        max_lag_fs=args.max_lag_fs,
        window=args.window,
        max_wavenumber_cm1=args.max_wavenumber,
        overwrite=args.overwrite,
    )
    return 0


def _index(text: str) -> int | str:
    """``--index``: an integer frame, or an ASE slice string such as ``-1``."""
    try:
        return int(text)
    except ValueError:
        return text


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``spectrum`` with its modes ``harmonic`` and ``vacf`` to a ``add_subparsers()`` object."""
    spectrum = subparsers.add_parser(
        "spectrum",
        help="vibrational spectra: harmonic frequencies (model Hessian) or VACF power spectrum of MD",
        description="Vibrational analysis. 'harmonic': normal modes and frequencies from the Hessian of a "
        "model; 'vacf': power spectrum from the velocity autocorrelation of an MD trajectory.",
    )
    modes = spectrum.add_subparsers(dest="spectrum_mode", metavar="MODE", required=True)

    harmonic = modes.add_parser(
        "harmonic",
        help="harmonic frequencies and normal modes from the model Hessian (autograd)",
        description="Writes frequencies.csv, modes.txt, hessian.npy (eV/Å²), structure.extxyz and "
        "stick_spectrum.png. Translations and rotations are projected out (Eckart).",
    )
    harmonic.add_argument("--model", required=True, help="checkpoint, e.g. RUN/best.pt")
    harmonic.add_argument("--structure", required=True, help="structure file (xyz, extxyz, traj, ...), Å")
    harmonic.add_argument("--index", type=_index, default=-1, help="frame of the file (default: last)")
    harmonic.add_argument(
        "--optimize", action="store_true", help="relax the structure with the model first (recommended)"
    )
    harmonic.add_argument(
        "--fmax", type=positive_float, default=1e-4, help="optimisation target, eV/Å (1e-4)"
    )
    harmonic.add_argument(
        "--max-steps", type=non_negative_int, default=1000, help="optimisation steps at most (1000)"
    )
    harmonic.add_argument("--optimizer", choices=["BFGS", "FIRE"], default="BFGS")
    harmonic.add_argument("--out", default="spectrum", help="output folder (default: spectrum)")
    harmonic.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    harmonic.add_argument("--device", default="cpu")
    harmonic.add_argument("--threads", type=positive_int, help="torch threads")
    harmonic.set_defaults(run=_run_harmonic)

    vacf = modes.add_parser(
        "vacf",
        help="power spectrum from the velocity autocorrelation of an MD trajectory",
        description="Writes power_spectrum.csv (wavenumber_cm1, intensity), vacf.csv and "
        "power_spectrum.png. Uses the stored velocities, else finite differences of the positions.",
    )
    vacf.add_argument("--trajectory", required=True, help="MD trajectory (extxyz, ASE .traj, ...)")
    vacf.add_argument(
        "--timestep-fs", type=positive_float, help="time between frames, fs (MD step × interval)"
    )
    vacf.add_argument(
        "--skip", type=non_negative_int, default=0, help="frames to drop at the start (equilibration)"
    )
    vacf.add_argument(
        "--max-lag-fs", type=positive_float, help="correlation length, fs (default: whole trajectory)"
    )
    vacf.add_argument("--window", choices=["hann", "blackman", "none"], default="hann")
    vacf.add_argument("--max-wavenumber", type=positive_float, default=4000.0, help="plot range, cm⁻¹ (4000)")
    vacf.add_argument("--out", default="spectrum", help="output folder (default: spectrum)")
    vacf.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    vacf.set_defaults(run=_run_vacf)
