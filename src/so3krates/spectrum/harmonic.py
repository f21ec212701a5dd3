"""Harmonic vibrational analysis: the model's Hessian by automatic differentiation, normal modes, frequencies.

Data path: structure → (optional local optimisation with ASE) → full neighbour list at that geometry →
Hessian H = ∂²E/∂R² = −∂F/∂R (autograd through the forces) → mass-weighted Hessian M^{-1/2} H M^{-1/2},
with the rigid-body motions projected out (Eckart) → eigenvalues λ (eV/Å²/amu) → wavenumbers in cm⁻¹.

Frequencies are only meaningful at a minimum of the model's energy: ``harmonic_analysis`` warns when the
largest force is above ``FORCE_WARNING`` and no optimisation was asked for.
"""

from __future__ import annotations

import copy
import csv
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from ase import Atoms, units
from torch import nn

from so3krates import keys
from so3krates.data.graph import atoms_to_graph
from so3krates.data.structure import unknown_elements
from so3krates.errors import DataError
from so3krates.files import atomic_path, save_figure
from so3krates.runtime.force_field import ForceField

#: sqrt(eV/Å²/amu) → cm⁻¹, the conversion of ``ase.vibrations.VibrationsData`` (ħω in eV, then / invcm).
SQRT_EIGENVALUE_TO_CM1 = units._hbar * units.m / np.sqrt(units._e * units._amu) / units.invcm  # ≈ 521.47

#: eV/Å — above this largest force the structure is not a stationary point for the purpose of frequencies.
FORCE_WARNING = 1e-3

#: Å — a rotation whose radius of gyration sqrt(I_k / M) is below this counts as absent: the molecule is
#: linear (a bend of 0.01° in CO₂ gives 1e-4 Å). A near-linear minimum found by an optimiser is bent by
#: ~1e-5 Å; counting that axial "rotation" would project out one component of the bending mode.
LINEAR_TOLERANCE = 1e-3


def hessian(model: nn.Module, atoms: Atoms, dtype: torch.dtype = torch.float64) -> np.ndarray:
    """The Hessian of the model's energy at the geometry of ``atoms``, by automatic differentiation.

    The neighbour list is the full one within the model's cutoff at this geometry (no skin); edges that
    cross the cutoff under an infinitesimal displacement do not exist, so the result is exact.

    Args:
        model: a ``So3krates`` energy model or a ``ForceField`` around one; it is not modified (a copy is
            cast when its dtype differs from ``dtype``).
        atoms: the structure (molecule or periodic cell; for a cell this is the Γ-point Hessian).
        dtype: dtype of the network during the computation; float64 for frequencies.

    Returns:
        (3 n_atoms, 3 n_atoms) float64, eV/Å² — ``H[3i+a, 3j+b] = ∂²E / ∂R_ia ∂R_jb``, symmetrised.
    """
    energy_model = model.model if isinstance(model, ForceField) else model
    parameter = next(energy_model.parameters())
    if parameter.dtype != dtype:
        energy_model = copy.deepcopy(energy_model).to(dtype)
    # create_graph below: the planner takes the exact radial network (the spline's second derivatives
    # jump at its nodes).
    force_field = ForceField(energy_model).eval()
    graph = atoms_to_graph(
        atoms, force_field.cutoff, pairs=True, long_range_cutoff=force_field.long_range_cutoff
    ).to(device=parameter.device)
    positions = graph.positions.detach().requires_grad_(True)
    out = force_field(graph.replace(positions=positions), compute_forces=True, create_graph=True)
    forces = out[keys.FORCES].reshape(-1)
    n = forces.numel()
    result = torch.zeros((n, n), dtype=torch.float64)
    if forces.requires_grad:  # False only when no atom has a neighbour: H = 0
        # One backward pass per row. Measured with 1 CPU thread (ethanol, 22-atom alanine dipeptide, a
        # 50-atom molecule; paper and tiny presets): batching the rows with vmap (is_grads_batched in
        # chunks of 8…all rows, torch.func jacrev/jacfwd, autograd.functional.hessian(vectorize=True))
        # wins for ethanol (paper 96–140 ms vs 190 ms) and the tiny model at 22 atoms, but loses at 22–50
        # atoms with the paper model (22: 1.1 s loop vs 1.3–2.3 s; 50: 10.5 s vs 11.7–36 s), where the
        # vmapped buffers grow with n_edges × 3 n_atoms. forward-mode (jvp) fails on index_put under
        # vmap. The loop also keeps memory at one backward pass.
        for row in range(n):
            (gradient,) = torch.autograd.grad(
                forces[row], positions, retain_graph=True, allow_unused=True, materialize_grads=True
            )
            result[row] = -gradient.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
    result = result.numpy()
    return 0.5 * (result + result.T)


def rigid_body_modes(masses: np.ndarray, positions: np.ndarray, rotations: bool = True) -> np.ndarray:
    """Orthonormal basis of the rigid-body motions in mass-weighted coordinates (Eckart conditions).

    Args:
        masses: (n_atoms,) float, amu.
        positions: (n_atoms, 3) float, Å.
        rotations: include the rotations (free molecules); False for periodic cells (translations only).

    Returns:
        (3 n_atoms, n_rigid) float — 3 translations and 3 rotations (2 for a linear molecule, 0 for a
        single atom), orthonormal columns.
    """
    masses = np.asarray(masses, dtype=np.float64)
    positions = np.asarray(positions, dtype=np.float64)
    sqrt_m = np.sqrt(masses)[:, None]  # (n_atoms, 1)
    vectors = [(sqrt_m * e[None, :]).reshape(-1) for e in np.eye(3)]
    if rotations:
        centred = positions - (masses[:, None] * positions).sum(0) / masses.sum()
        vectors += [(sqrt_m * np.cross(e[None, :], centred)).reshape(-1) for e in np.eye(3)]
    # Translations have singular values sqrt(M); rotations about the centre of mass are orthogonal to
    # them and have sqrt(I_k), I_k the principal moments of inertia.
    basis, singular, _ = np.linalg.svd(np.stack(vectors, axis=1), full_matrices=False)
    return basis[:, singular > LINEAR_TOLERANCE * np.sqrt(masses.sum())]


def normal_modes(
    hessian: np.ndarray,
    masses: np.ndarray,
    positions: np.ndarray | None = None,
    *,
    project_rotations: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Harmonic frequencies and normal modes of a Hessian.

    Args:
        hessian: (3 n_atoms, 3 n_atoms) float, eV/Å².
        masses: (n_atoms,) float, amu.
        positions: (n_atoms, 3) float, Å — give them to project out the rigid-body motions (translations
            and, with ``project_rotations``, rotations: 6, or 5 for a linear molecule); None: no projection.
        project_rotations: False for periodic cells, where only translations are free.

    Returns:
        ``frequencies_cm1``: (3 n_atoms,) float, cm⁻¹ — imaginary frequencies as negative numbers. With
        projection the first n_rigid entries are the rigid-body modes (exactly 0), then the vibrations in
        ascending order; without, all 3 n_atoms in ascending order.
        ``modes``: (3 n_atoms, n_atoms, 3) float — Cartesian displacement of each mode, unit norm.
    """
    masses = np.asarray(masses, dtype=np.float64)
    n = 3 * len(masses)
    if hessian.shape != (n, n):
        raise ValueError(f"hessian has shape {hessian.shape}, expected ({n}, {n}) for {len(masses)} atoms")
    inv_sqrt_m = np.repeat(1.0 / np.sqrt(masses), 3)
    weighted = hessian * inv_sqrt_m[:, None] * inv_sqrt_m[None, :]
    weighted = 0.5 * (weighted + weighted.T)
    if positions is None:
        eigenvalues, vectors = np.linalg.eigh(weighted)
    else:
        rigid = rigid_body_modes(masses, positions, rotations=project_rotations)
        # Diagonalise in the orthogonal complement of the rigid-body space (Eckart): the vibrations do not
        # mix with translations and rotations, and the rigid-body modes get exactly 0.
        complement = np.linalg.svd(np.eye(n) - rigid @ rigid.T)[0][:, : n - rigid.shape[1]]
        internal_eigenvalues, internal_vectors = np.linalg.eigh(complement.T @ weighted @ complement)
        eigenvalues = np.concatenate([np.zeros(rigid.shape[1]), internal_eigenvalues])
        vectors = np.concatenate([rigid, complement @ internal_vectors], axis=1)
    frequencies = np.sign(eigenvalues) * np.sqrt(np.abs(eigenvalues)) * SQRT_EIGENVALUE_TO_CM1
    displacements = (vectors * inv_sqrt_m[:, None]).T  # mass-weighted → Cartesian
    displacements /= np.linalg.norm(displacements, axis=1, keepdims=True)
    return frequencies, displacements.reshape(n, len(masses), 3)


def optimize_structure(
    atoms: Atoms, calculator, fmax: float = 1e-4, max_steps: int = 1000, optimizer: str = "BFGS"
) -> tuple[Atoms, bool, int]:
    """Local optimisation of a copy of ``atoms`` with ``calculator`` (ASE BFGS or FIRE).

    Returns:
        The optimised copy (without calculator), whether max |F| ≤ ``fmax`` eV/Å was reached, and the
        number of steps taken.
    """
    from ase.optimize import BFGS, FIRE

    optimizers = {"BFGS": BFGS, "FIRE": FIRE}
    if optimizer not in optimizers:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {sorted(optimizers)}")
    work = atoms.copy()
    work.calc = calculator
    dynamics = optimizers[optimizer](work, logfile=None)
    converged = bool(dynamics.run(fmax=fmax, steps=max_steps))
    work.calc = None
    return work, converged, int(dynamics.get_number_of_steps())


@dataclass
class HarmonicAnalysis:
    """Result of :func:`harmonic_analysis`.

    Attributes:
        atoms: the structure at which the Hessian was taken (optimised when asked).
        energy: float, eV — the model's energy there.
        max_force: float, eV/Å — largest atomic force norm there.
        hessian: (3 n_atoms, 3 n_atoms) float, eV/Å².
        frequencies_cm1: (3 n_atoms,) float, cm⁻¹ — rigid-body modes first (0), imaginary ones negative.
        modes: (3 n_atoms, n_atoms, 3) float — unit Cartesian displacements.
        n_rigid: number of projected rigid-body modes (6, 5 for linear molecules, 3 for periodic cells).
        optimized: whether a local optimisation ran; converged: whether it reached ``fmax``.
    """

    atoms: Atoms
    energy: float
    max_force: float
    hessian: np.ndarray
    frequencies_cm1: np.ndarray
    modes: np.ndarray
    n_rigid: int
    optimized: bool = False
    converged: bool = True

    @property
    def vibrational_frequencies_cm1(self) -> np.ndarray:
        """(3 n_atoms − n_rigid,) float, cm⁻¹ — the vibrations only, ascending."""
        return self.frequencies_cm1[self.n_rigid :]

    @property
    def zero_point_energy(self) -> float:
        """eV — ½ Σ ħω over the real vibrational frequencies."""
        real = self.vibrational_frequencies_cm1[self.vibrational_frequencies_cm1 > 0]
        return float(0.5 * real.sum() * units.invcm)


def harmonic_analysis(
    model: nn.Module,
    atoms: Atoms,
    *,
    optimize: bool = False,
    fmax: float = 1e-4,
    max_steps: int = 1000,
    optimizer: str = "BFGS",
    log: Callable[[str], None] = print,
) -> HarmonicAnalysis:
    """Frequencies and normal modes of a ``So3krates`` model (float64) at ``atoms``, optionally optimised.

    Rotations are projected out for molecules (no periodic direction), translations always.
    """
    from so3krates.calculators.ase import So3kratesCalculator

    energy_model = model.model if isinstance(model, ForceField) else model
    device = str(next(energy_model.parameters()).device)
    if next(energy_model.parameters()).dtype != torch.float64:
        energy_model = copy.deepcopy(energy_model)
    calculator = So3kratesCalculator(energy_model, device=device, dtype="float64")
    converged = True
    if optimize:
        atoms, converged, steps = optimize_structure(atoms, calculator, fmax, max_steps, optimizer)
        state = "converged" if converged else "NOT converged"
        log(f"{optimizer} optimisation {state} after {steps} steps (fmax {fmax:g} eV/Å)")
    work = atoms.copy()
    work.calc = calculator
    energy = float(work.get_potential_energy())
    max_force = float(np.linalg.norm(work.get_forces(), axis=1).max(initial=0.0))
    if max_force > FORCE_WARNING:
        advice = "increase --max-steps" if optimize else "use --optimize"
        log(
            f"warning: max |F| = {max_force:.3g} eV/Å > {FORCE_WARNING:g} eV/Å: not a stationary point of "
            f"the model, low frequencies may be wrong ({advice})"
        )
    hessian_ = hessian(energy_model, atoms)
    periodic = bool(np.any(atoms.pbc))
    frequencies, modes = normal_modes(
        hessian_, atoms.get_masses(), atoms.get_positions(), project_rotations=not periodic
    )
    n_rigid = rigid_body_modes(atoms.get_masses(), atoms.get_positions(), rotations=not periodic).shape[1]
    return HarmonicAnalysis(
        atoms=atoms.copy(),
        energy=energy,
        max_force=max_force,
        hessian=hessian_,
        frequencies_cm1=frequencies,
        modes=modes,
        n_rigid=n_rigid,
        optimized=optimize,
        converged=converged,
    )


def read_structure(path: str | os.PathLike, index: str | int = -1) -> Atoms:
    """One structure from any file ``ase.io.read`` reads; one-line ``DataError`` naming the file otherwise."""
    import ase.io

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: structure file not found")
    try:
        atoms = ase.io.read(path, index=index)
    except Exception as error:
        raise DataError(f"{path}: ase.io.read failed: {type(error).__name__}: {error}") from None
    if isinstance(atoms, list):
        if len(atoms) != 1:
            raise DataError(f"{path}: index {index!r} selects {len(atoms)} structures, expected one")
        atoms = atoms[0]
    if len(atoms) == 0:
        raise DataError(f"{path}: the structure has no atoms")
    return atoms


def check_species(atoms: Atoms, species: list[int] | None, source: str) -> None:
    """Refuses elements the model was not trained on with one line naming the file."""
    if species is None:
        return
    reason = unknown_elements(atoms.numbers, species)
    if reason:
        raise DataError(f"{source}: key 'numbers': {reason}")


#: The files of ``spectrum harmonic``.
HARMONIC_FILES = ["frequencies.csv", "modes.txt", "hessian.npy", "structure.extxyz", "stick_spectrum.png"]


def write_harmonic(result: HarmonicAnalysis, out_dir: str | os.PathLike) -> list[Path]:
    """Writes ``frequencies.csv``, ``modes.txt``, ``hessian.npy``, ``structure.extxyz`` and
    ``stick_spectrum.png`` to ``out_dir``, each atomically. Returns the paths."""
    import ase.io

    out_dir = Path(out_dir)
    kinds = ["rigid"] * result.n_rigid + [
        "imaginary" if f < 0 else "real" for f in result.vibrational_frequencies_cm1
    ]
    paths = {name: out_dir / name for name in HARMONIC_FILES}
    with atomic_path(paths["frequencies.csv"]) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["mode", "frequency_cm1", "energy_meV", "kind"])
        for index, (frequency, kind) in enumerate(zip(result.frequencies_cm1, kinds, strict=True)):
            writer.writerow([index, f"{frequency:.4f}", f"{1e3 * frequency * units.invcm:.5f}", kind])
    symbols = result.atoms.get_chemical_symbols()
    lines = [
        f"# harmonic normal modes: {len(symbols)} atoms, E = {result.energy:.6f} eV, "
        f"max |F| = {result.max_force:.2e} eV/Å, zero-point energy {result.zero_point_energy:.4f} eV",
        "# unit Cartesian displacement per mode (dx dy dz per atom); imaginary frequencies are negative",
    ]
    for index, (frequency, kind, mode) in enumerate(
        zip(result.frequencies_cm1, kinds, result.modes, strict=True)
    ):
        lines.append(f"mode {index}  {frequency:12.4f} cm-1  {kind}")
        lines += [
            f"  {s:<2s} {d[0]:10.6f} {d[1]:10.6f} {d[2]:10.6f}" for s, d in zip(symbols, mode, strict=True)
        ]
    with atomic_path(paths["modes.txt"]) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    with atomic_path(paths["hessian.npy"]) as tmp, open(tmp, "wb") as handle:
        np.save(handle, result.hessian)
    with atomic_path(paths["structure.extxyz"]) as tmp:
        ase.io.write(tmp, result.atoms, format="extxyz")
    plot_sticks(paths["stick_spectrum.png"], result.vibrational_frequencies_cm1)
    return list(paths.values())


def plot_sticks(path: str | os.PathLike, frequencies_cm1: np.ndarray) -> None:
    """A stick spectrum: one unit stick per vibrational frequency (no intensities: the model has no
    dipoles), imaginary modes in red at negative wavenumbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(8, 3.2))
    real = frequencies_cm1[frequencies_cm1 >= 0]
    imaginary = frequencies_cm1[frequencies_cm1 < 0]
    axis.vlines(real, 0.0, 1.0, color="tab:blue", lw=1.2, label="harmonic modes")
    if imaginary.size:
        axis.vlines(imaginary, 0.0, 1.0, color="tab:red", lw=1.2, label="imaginary (shown negative)")
    axis.axhline(0.0, color="black", lw=0.6)
    extent = 1.05 * max(float(np.abs(frequencies_cm1).max(initial=0.0)), 10.0)
    axis.set_xlim(-extent if imaginary.size else 0.0, extent)
    axis.set_ylim(0.0, 1.35)  # room for the legend above the sticks
    axis.set_yticks([])
    axis.set_xlabel("wavenumber / cm$^{-1}$")
    axis.set_title(f"harmonic frequencies ({len(frequencies_cm1)} vibrations)")
    axis.legend(loc="upper left", frameon=False, ncols=2)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def harmonic_file(
    model_path: str | os.PathLike,
    structure_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    index: str | int = -1,
    optimize: bool = False,
    fmax: float = 1e-4,
    max_steps: int = 1000,
    optimizer: str = "BFGS",
    device: str = "cpu",
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> HarmonicAnalysis:
    """``so3krates spectrum harmonic``: checkpoint + structure file → frequencies, modes and plots in
    ``out_dir``. Inputs are checked and everything computed before anything is written; results already in
    ``out_dir`` are replaced only with ``overwrite``."""
    from so3krates.checks import check_device, check_results_folder
    from so3krates.model.checkpoint import load_model

    check_results_folder(out_dir, HARMONIC_FILES, overwrite, "--out")
    check_device(device)

    model, metadata = load_model(model_path, device=device, dtype=torch.float64)
    atoms = read_structure(structure_path, index)
    check_species(atoms, metadata.get("species"), str(structure_path))
    log(f"harmonic analysis of {structure_path} ({atoms.get_chemical_formula()}, {len(atoms)} atoms)")
    result = harmonic_analysis(
        model, atoms, optimize=optimize, fmax=fmax, max_steps=max_steps, optimizer=optimizer, log=log
    )
    paths = write_harmonic(result, out_dir)
    vibrations = result.vibrational_frequencies_cm1
    n_imaginary = int((vibrations < 0).sum())
    log(
        f"{len(vibrations)} vibrations ({result.n_rigid} rigid-body modes projected out), "
        f"{vibrations.min(initial=0):.1f} … {vibrations.max(initial=0):.1f} cm⁻¹, "
        f"zero-point energy {result.zero_point_energy:.4f} eV"
    )
    if n_imaginary:
        log(f"warning: {n_imaginary} imaginary mode(s): the structure is not a minimum of the model")
    log("wrote " + ", ".join(str(p) for p in paths))
    return result
