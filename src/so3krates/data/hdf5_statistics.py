"""Dataset statistics (energy shifts, force RMS, N̄) of a so3krates-hdf5 file in bounded memory.

The file is read in blocks of structures; per-element energy shifts come from a least-squares fit that is
accumulated block by block, so the statistics of a file larger than memory need no more than one block.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import h5py
import numpy as np

from so3krates.data.hdf5 import (
    N_ELEMENTS,
    _checked_cutoff,
    _checked_indices,
    _edge_lengths,
    open_hdf5,
)
from so3krates.data.statistics import DatasetStatistics, isolated_atom_shifts


def hdf5_statistics(
    path: str | os.PathLike,
    indices: Sequence[int] | np.ndarray | None,
    cutoff: float,
    isolated_atom_energies: dict[int, float] | None = None,
) -> DatasetStatistics:
    """``compute_statistics`` of the file's structures ``indices`` (default all), in one streaming pass.

    Reads the file in blocks of consecutive structures (at most ~2²⁰ atoms each), so memory stays bounded
    whatever the file's size; blocks without a wanted structure are skipped, the others read whole. A
    structure listed twice counts twice, as in ``compute_statistics``.

    Args:
        path: a file written by ``write_hdf5``.
        indices: (n,) int — the structures (e.g. the training split); None means all.
        cutoff: float, Å — the model's cutoff, at most the file's; N̄ counts edges shorter than it.
        isolated_atom_energies: Z → eV; used as the energy shifts when given, as in ``energy_shifts``.

    Raises:
        DataError: not a so3krates HDF5 file, an index outside it, or ``cutoff`` larger than the file's.
        ConfigError: ``isolated_atom_energies`` lacks an element present in the structures.
        ValueError: the structures hold no atoms.
    """
    name = str(path)
    with open_hdf5(path) as file:
        file_cutoff = float(file.attrs["cutoff"])
        _checked_cutoff(name, file_cutoff, cutoff)
        n_structures = int(file.attrs["n_structures"])
        weights = np.bincount(_checked_indices(name, indices, n_structures), minlength=n_structures)
        atom_offset = file["structures/atom_offset"][:]
        n_atoms = file["structures/n_atoms"][:]
        edge_offset = file["structures/edge_offset"][:]
        n_edges = file["structures/n_edges"][:]
        filter_edges = cutoff < file_cutoff

        element_counts = np.zeros(N_ELEMENTS)
        squared_forces, n_force_components = 0.0, 0
        total_edges = 0
        shifts_fit = _StreamingLeastSquares(N_ELEMENTS)
        for start, stop in _blocks(n_atoms, n_edges if filter_edges else None, weights):
            weight = weights[start:stop]
            atoms = slice(int(atom_offset[start]), int(atom_offset[stop - 1] + n_atoms[stop - 1]))
            owner = np.repeat(np.arange(stop - start), n_atoms[start:stop])  # (n_block_atoms,)
            atom_weight = weight[owner]
            numbers = file["atoms/atomic_numbers"][atoms].astype(np.int64)
            element_counts += np.bincount(numbers, weights=atom_weight, minlength=N_ELEMENTS)

            forces = file["atoms/forces"][atoms]
            finite = np.isfinite(forces)
            squared_forces += float((atom_weight[:, None] * np.where(finite, forces, 0.0) ** 2).sum())
            n_force_components += int((atom_weight[:, None] * finite).sum())

            energy = file["structures/energy"][start:stop]
            labelled = (weight > 0) & np.isfinite(energy)
            composition = np.bincount(
                owner * N_ELEMENTS + numbers, minlength=(stop - start) * N_ELEMENTS
            ).reshape(stop - start, N_ELEMENTS)
            shifts_fit.add(composition[labelled], energy[labelled], weight[labelled])

            if filter_edges:
                edges = slice(int(edge_offset[start]), int(edge_offset[stop - 1] + n_edges[stop - 1]))
                edge_owner = np.repeat(np.arange(stop - start), n_edges[start:stop])
                within = _edges_within(file, cutoff, start, stop, atoms, edges, edge_owner, atom_offset)
                total_edges += int(np.bincount(edge_owner, weights=within, minlength=stop - start) @ weight)
            else:
                total_edges += int((weight * n_edges[start:stop]).sum())

    present = [int(z) for z in np.flatnonzero(element_counts)]
    total_atoms = int((weights * n_atoms).sum())
    if total_atoms == 0:
        raise ValueError(f"{name}: no atoms in the selected structures")
    if isolated_atom_energies is not None:
        shifts = isolated_atom_shifts(present, isolated_atom_energies)
    else:
        shifts = shifts_fit.solve(present)
    return DatasetStatistics(
        energy_shifts=shifts,
        force_rms=float(np.sqrt(squared_forces / n_force_components)) if n_force_components else 1.0,
        avg_num_neighbors=total_edges / total_atoms,
        elements=present,
        n_structures=int(weights.sum()),
    )


def _blocks(
    n_atoms: np.ndarray,
    n_edges: np.ndarray | None,
    weights: np.ndarray,
    max_structures: int = 4096,
    max_atoms: int = 1 << 20,
    max_edges: int = 1 << 21,
) -> Iterator[tuple[int, int]]:
    """Ranges [start, stop) of consecutive structures, each under the size limits (or one structure),
    skipping ranges that hold none of the wanted structures (weight 0)."""
    cumulative_atoms = np.cumsum(n_atoms)
    cumulative_edges = None if n_edges is None else np.cumsum(n_edges)
    start, n_structures = 0, len(n_atoms)
    while start < n_structures:
        stop = min(n_structures, start + max_structures)
        before = cumulative_atoms[start - 1] if start else 0
        stop = min(stop, int(np.searchsorted(cumulative_atoms, before + max_atoms, side="right")))
        if cumulative_edges is not None:
            before = cumulative_edges[start - 1] if start else 0
            stop = min(stop, int(np.searchsorted(cumulative_edges, before + max_edges, side="right")))
        stop = max(stop, start + 1)
        if weights[start:stop].any():
            yield start, stop
        start = stop


def _edges_within(
    file: h5py.File,
    cutoff: float,
    start: int,
    stop: int,
    atoms: slice,
    edges: slice,
    edge_owner: np.ndarray,
    atom_offset: np.ndarray,
) -> np.ndarray:
    """(n_block_edges,) bool — which stored edges of structures [start, stop) are shorter than ``cutoff``.

    ``atoms`` and ``edges`` are the structures' rows; ``edge_owner`` the block structure of each edge.
    """
    first_atom = atom_offset[start:stop][edge_owner] - atoms.start  # block row of each edge's atom 0
    pbc = file["structures/pbc"][start:stop].any(axis=1)
    cells = file["structures/cell"][start:stop] * pbc[:, None, None]
    lengths = _edge_lengths(
        file["atoms/positions"][atoms],
        cells,
        first_atom + file["edges/idx_i"][edges],
        first_atom + file["edges/idx_j"][edges],
        file["edges/shifts"][edges],
        edge_owner,
    )
    return lengths < cutoff


class _StreamingLeastSquares:
    """min_μ Σ_f w_f (c_f · μ − e_f)² over rows that arrive in chunks, holding only a (k+1) × (k+1) matrix.

    Keeps R of the QR factorisation of the weighted rows [c_f, e_f]: ‖Cμ − e‖ = ‖R [μ; −1]‖ for every μ,
    so R answers the least-squares problem like C itself, without squaring C's condition number as the
    normal equations CᵀC μ = Cᵀe would.
    """

    def __init__(self, n_columns: int) -> None:
        self.r = np.zeros((0, n_columns + 1))
        self.n_rows = 0

    def add(self, counts: np.ndarray, energies: np.ndarray, weights: np.ndarray) -> None:
        """counts: (n, k) int — element counts; energies: (n,) eV; weights: (n,) int — multiplicities."""
        if not len(counts):
            return
        # Frames of one composition are one row: Σ w (c·μ − e)² = W (c·μ − ē)² + a constant.
        unique, inverse = np.unique(counts, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        total = np.bincount(inverse, weights=weights)
        mean = np.bincount(inverse, weights=weights * energies) / total
        rows = np.sqrt(total)[:, None] * np.column_stack([unique, mean])
        self.r = np.linalg.qr(np.vstack([self.r, rows]), mode="r")
        self.n_rows += int(weights.sum())

    def solve(self, columns: list[int]) -> dict[int, float]:
        """Minimum-norm μ over ``columns`` (others are absent); 0 for columns without a labelled row."""
        if self.n_rows == 0:
            return dict.fromkeys(columns, 0.0)
        a, b = self.r[:, columns], self.r[:, -1]
        # The rank threshold of np.linalg.lstsq on the full (n_rows, k) matrix, as energy_shifts uses.
        rcond = np.finfo(np.float64).eps * max(self.n_rows, len(columns))
        shifts, *_ = np.linalg.lstsq(a, b, rcond=rcond)
        labelled = np.abs(a).sum(axis=0) > 0
        return {z: float(mu) if seen else 0.0 for z, mu, seen in zip(columns, shifts, labelled, strict=True)}
