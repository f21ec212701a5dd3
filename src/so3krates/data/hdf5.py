"""A preprocessed dataset in one HDF5 file, for data larger than memory: written once by streaming
structures through, read structure by structure during training.

Layout (format ``so3krates-hdf5``, version 1), rows of all structures concatenated; units Å, eV, eV/Å, eV/Å³::

    / (attributes)            format, format_version, cutoff (Å), n_structures, so3krates_version, units
    /atoms/positions          (n_total_atoms, 3) float64, Å
    /atoms/atomic_numbers     (n_total_atoms,) int8
    /atoms/forces             (n_total_atoms, 3) float64, eV/Å — NaN where missing
    /structures/energy        (n_structures,) float64, eV — NaN where missing
    /structures/cell          (n_structures, 3, 3) float64, Å — lattice vectors as rows, as read
    /structures/pbc           (n_structures, 3) bool
    /structures/stress        (n_structures, 3, 3) float64, eV/Å³ — NaN where missing
    /structures/atom_offset   (n_structures,) int64 — first row of the structure in /atoms
    /structures/n_atoms       (n_structures,) int64
    /structures/edge_offset   (n_structures,) int64 — first row of the structure in /edges
    /structures/n_edges       (n_structures,) int64 — edges within the file's cutoff
    /edges/idx_i              (n_total_edges,) int32 — centre atom, local to the structure
    /edges/idx_j              (n_total_edges,) int32 — neighbour atom, local to the structure
    /edges/shifts             (n_total_edges, 3) int8 — image offsets, vec_ij = R_j − R_i + shifts @ cell

The neighbour lists are computed once at the file's cutoff; a model with a smaller cutoff reads them
filtered by distance, a larger one needs the file prepared again.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import h5py
import numpy as np
import torch

from so3krates import __version__
from so3krates.data.dataset import Labels
from so3krates.data.graph import Graph
from so3krates.data.neighbors import NeighborList, neighbor_list, pair_order
from so3krates.data.structure import Structure
from so3krates.errors import ConfigError, DataError
from so3krates.files import atomic_path

FORMAT_NAME = "so3krates-hdf5"
FORMAT_VERSION = 1
N_ELEMENTS = 119  # columns Z = 0 … 118 of the composition matrix

# Chunk rows: ~100 KiB per chunk, so reading one structure pulls little more than it needs.
_ATOM_CHUNK_ROWS = 4096
_EDGE_CHUNK_ROWS = 16384
# The writer also flushes when its buffer holds this many bytes of rows (large structures).
_MAX_BUFFER_BYTES = 64 << 20
_ATOM_BYTES = 49  # positions, forces, atomic number
_EDGE_BYTES = 11  # idx_i, idx_j, shifts
# HDF5's chunk cache per dataset (default 1 MiB, × 14 datasets, × processes): a few chunks are enough
# to append and to read structure by structure, and measured ~6× less memory while writing.
_CACHE_BYTES = 1 << 18

#: dataset → (dtype, shape of one row). The group says which rows: atoms, structures or edges.
LAYOUT: dict[str, tuple[type, tuple[int, ...]]] = {
    "atoms/positions": (np.float64, (3,)),
    "atoms/atomic_numbers": (np.int8, ()),
    "atoms/forces": (np.float64, (3,)),
    "structures/energy": (np.float64, ()),
    "structures/cell": (np.float64, (3, 3)),
    "structures/pbc": (np.bool_, (3,)),
    "structures/stress": (np.float64, (3, 3)),
    "structures/atom_offset": (np.int64, ()),
    "structures/n_atoms": (np.int64, ()),
    "structures/edge_offset": (np.int64, ()),
    "structures/n_edges": (np.int64, ()),
    "edges/idx_i": (np.int32, ()),
    "edges/idx_j": (np.int32, ()),
    "edges/shifts": (np.int8, (3,)),
}
_UNITS = {
    "atoms/positions": "Å",
    "atoms/forces": "eV/Å",
    "structures/energy": "eV",
    "structures/cell": "Å",
    "structures/stress": "eV/Å³",
}


# ---------------------------------------------------------------------------------------------------------
# Writing.


def write_hdf5(
    path: str | os.PathLike, structures: Iterable[Structure], cutoff: float, *, chunk_frames: int = 1024
) -> int:
    """Streams structures with their neighbour lists within ``cutoff`` Å into one HDF5 file.

    At most ``chunk_frames`` structures (and 64 MiB of rows) are held at a time, so ``structures`` may be
    a generator over more data than fits in memory. The file is replaced atomically: an exception while
    writing (also one raised by the iterable) leaves ``path`` as it was.

    Args:
        path: the output file (conventionally ``.h5``).
        structures: the structures, in internal units; missing labels are stored as NaN.
        cutoff: float, Å — neighbour-list cutoff; models with a cutoff up to this can read the file.
        chunk_frames: structures per write (and rows per chunk of the per-structure datasets).

    Returns:
        The number of structures written.

    Raises:
        DataError: a structure is malformed (wrong shapes, unknown element, an image offset beyond ±127).
    """
    if not 0 < cutoff < math.inf:
        raise ConfigError(f"write_hdf5: cutoff must be positive and finite, got {cutoff}")
    if chunk_frames < 1:
        raise ConfigError(f"write_hdf5: chunk_frames must be at least 1, got {chunk_frames}")
    name = str(path)
    n_structures = n_atoms_total = n_edges_total = buffered_bytes = 0
    cache_bytes = max(_CACHE_BYTES, 2 * chunk_frames * 9 * 8)  # two chunks of /structures/cell
    with atomic_path(path) as tmp, h5py.File(tmp, "w", rdcc_nbytes=cache_bytes) as file:
        file.attrs.update(
            format=FORMAT_NAME,
            format_version=FORMAT_VERSION,
            cutoff=float(cutoff),
            n_structures=0,
            so3krates_version=__version__,
            units="Å, eV, eV/Å, eV/Å³",
        )
        datasets = {}
        for key, (dtype, shape) in LAYOUT.items():
            rows = {"atoms": _ATOM_CHUNK_ROWS, "edges": _EDGE_CHUNK_ROWS}.get(key.split("/")[0], chunk_frames)
            datasets[key] = file.create_dataset(
                key, shape=(0, *shape), maxshape=(None, *shape), dtype=dtype, chunks=(rows, *shape)
            )
            if key in _UNITS:
                datasets[key].attrs["unit"] = _UNITS[key]
        buffer: dict[str, list] = {key: [] for key in LAYOUT}
        for structure in structures:
            rows = _structure_rows(name, n_structures, structure, cutoff)
            rows["structures/atom_offset"] = n_atoms_total
            rows["structures/edge_offset"] = n_edges_total
            for key, value in rows.items():
                buffer[key].append(value)
            n_structures += 1
            n_atoms_total += rows["structures/n_atoms"]
            n_edges_total += rows["structures/n_edges"]
            buffered_bytes += (
                _ATOM_BYTES * rows["structures/n_atoms"] + _EDGE_BYTES * rows["structures/n_edges"]
            )
            if len(buffer["structures/energy"]) == chunk_frames or buffered_bytes > _MAX_BUFFER_BYTES:
                _append(datasets, buffer)
                buffered_bytes = 0
        _append(datasets, buffer)
        file.attrs["n_structures"] = n_structures
    return n_structures


def _structure_rows(name: str, k: int, structure: Structure, cutoff: float) -> dict[str, object]:
    """The rows one structure adds to each dataset, checked."""
    where = f"{name}: structure {k}"
    if structure.total_charge or structure.total_spin:
        # Not stored yet: refuse rather than lose them (only models with charge inputs would read them).
        raise DataError(
            f"{where}: total charge {structure.total_charge:g} / spin {structure.total_spin:g}; the HDF5 "
            "format does not store total charges and spins yet (train from the extxyz file)"
        )
    positions = np.asarray(structure.positions, dtype=np.float64)
    n_atoms = len(positions)
    if positions.shape != (n_atoms, 3):
        raise DataError(f"{where}: positions have shape {positions.shape}, expected (n_atoms, 3)")
    numbers = np.asarray(structure.atomic_numbers)
    if numbers.shape != (n_atoms,):
        raise DataError(f"{where}: atomic_numbers have shape {numbers.shape}, expected ({n_atoms},)")
    if n_atoms and (numbers.min() < 1 or numbers.max() >= N_ELEMENTS):
        raise DataError(f"{where}: unknown element Z = {numbers[(numbers < 1) | (numbers >= N_ELEMENTS)][0]}")
    cell = np.asarray(structure.cell, dtype=np.float64).reshape(3, 3)
    pbc = np.broadcast_to(np.asarray(structure.pbc, dtype=bool), (3,))
    forces = _label(where, "forces", structure.forces, (n_atoms, 3))
    stress = _label(where, "stress", structure.stress, (3, 3))
    try:
        edges = neighbor_list(positions, cell, pbc, cutoff)
    except DataError as error:
        raise DataError(f"{where}: {error}") from None
    if len(edges.shifts) and np.abs(edges.shifts).max() > np.iinfo(np.int8).max:
        raise DataError(
            f"{where}: an image offset of {np.abs(edges.shifts).max()} cells does not fit the file's int8 "
            f"shifts (at most ±127): the cutoff {cutoff} Å spans too many periodic images of this cell"
        )
    return {
        "atoms/positions": positions,
        "atoms/atomic_numbers": numbers.astype(np.int8),
        "atoms/forces": forces,
        "structures/energy": float(structure.energy),
        "structures/cell": cell,
        "structures/pbc": pbc,
        "structures/stress": stress,
        "structures/n_atoms": n_atoms,
        "structures/n_edges": len(edges.idx_i),
        "edges/idx_i": edges.idx_i.astype(np.int32),
        "edges/idx_j": edges.idx_j.astype(np.int32),
        "edges/shifts": edges.shifts.astype(np.int8),
    }


def _label(where: str, key: str, value: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if value is None:
        return np.full(shape, np.nan)
    array = np.asarray(value, dtype=np.float64)
    if array.shape != shape:
        raise DataError(f"{where}: {key} have shape {array.shape}, expected {shape}")
    return array


def _append(datasets: dict[str, h5py.Dataset], buffer: dict[str, list]) -> None:
    """Appends the buffered rows to the resizable datasets and empties the buffer."""
    for key, values in buffer.items():
        if not values:
            continue
        rows = np.concatenate(values) if key.split("/")[0] in ("atoms", "edges") else np.asarray(values)
        dataset = datasets[key]
        start = dataset.shape[0]
        dataset.resize(start + len(rows), axis=0)
        dataset[start:] = rows
        values.clear()


# ---------------------------------------------------------------------------------------------------------
# Reading.


def open_hdf5(path: str | os.PathLike) -> h5py.File:
    """Opens a file written by ``write_hdf5`` read-only, after checking that it is one.

    Raises:
        DataError: the file is missing, not HDF5, not in this format or version, or lacks a dataset.
    """
    name = str(path)
    if not Path(path).is_file():
        raise DataError(f"{name}: file not found")
    try:
        file = h5py.File(path, "r", rdcc_nbytes=_CACHE_BYTES)
    except OSError as exc:
        raise DataError(
            f"{name}: not an HDF5 file ({' '.join(str(exc).split())}); "
            f"write one from structures with `so3krates prepare`"
        ) from exc
    try:
        found = file.attrs.get("format")
        found = found.decode() if isinstance(found, bytes) else found
        if found != FORMAT_NAME:
            raise DataError(
                f"{name}: not a so3krates HDF5 dataset (attribute 'format' is {found!r}, expected "
                f"{FORMAT_NAME!r}); write one from structures with `so3krates prepare`"
            )
        version = file.attrs.get("format_version")
        if version != FORMAT_VERSION:
            raise DataError(
                f"{name}: {FORMAT_NAME} format version {version}; so3krates {__version__} reads version "
                f"{FORMAT_VERSION}: prepare the file again with this version"
            )
        missing = [key for key in LAYOUT if key not in file]
        if missing:
            raise DataError(f"{name}: key {missing[0]!r}: missing (damaged file?)")
    except BaseException:
        file.close()
        raise
    return file


def _checked_cutoff(name: str, file_cutoff: float, cutoff: float | None) -> float:
    if cutoff is None:
        return file_cutoff
    if cutoff > file_cutoff:
        raise DataError(
            f"{name}: neighbour lists were computed at cutoff {file_cutoff} Å, smaller than the model's "
            f"{cutoff} Å: prepare the file again with a cutoff of at least {cutoff} Å"
        )
    return float(cutoff)


def _checked_indices(name: str, indices: Sequence[int] | np.ndarray | None, n_structures: int) -> np.ndarray:
    if indices is None:
        return np.arange(n_structures, dtype=np.int64)
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    outside = indices[(indices < 0) | (indices >= n_structures)]
    if len(outside):
        raise DataError(
            f"{name}: index {outside[0]} is outside [0, {n_structures}), the structures in the file"
        )
    return indices


def _edge_lengths(
    positions: np.ndarray,
    cells: np.ndarray,
    idx_i: np.ndarray,
    idx_j: np.ndarray,
    shifts: np.ndarray,
    owner: np.ndarray | None = None,
) -> np.ndarray:
    """(n_edges,) float64, Å — |R_j − R_i + shifts @ cell| (SPEC §1).

    ``cells`` is one (3, 3) cell, or (n_structures, 3, 3) with ``owner`` (n_edges,) the structure of each
    edge; zeros for molecules, as in ``Graph``.
    """
    if owner is None:
        offsets = shifts.astype(np.float64) @ cells
    else:  # lattice vector by lattice vector: no (n_edges, 3, 3) copy of the cells
        offsets = sum(shifts[:, k, None] * cells[owner, k] for k in range(3))
    return np.linalg.norm(positions[idx_j] - positions[idx_i] + offsets, axis=-1)


class HDF5Dataset(torch.utils.data.Dataset):
    """(graph, labels) pairs read structure by structure from a file written by ``write_hdf5``.

    Items are those of ``GraphDataset`` on the same structures at the same cutoff. Only the structures'
    offsets and periodicity are held in memory (35 bytes per structure); the file is opened on first
    access in each process, so the dataset can be handed to DataLoader workers and DDP ranks, forked or
    spawned.

    Args:
        path: the file.
        indices: (n,) int — the file's structures this dataset holds, in this order; default all.
        cutoff: float, Å — the model's cutoff; default the file's. Smaller than the file's: the stored
            edges are filtered by distance.

    Raises:
        DataError: the file is not a so3krates HDF5 dataset, an index is outside it, or ``cutoff`` is
            larger than the file's.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        indices: Sequence[int] | np.ndarray | None = None,
        cutoff: float | None = None,
    ) -> None:
        self.path = Path(path)
        with open_hdf5(path) as file:
            self.file_cutoff = float(file.attrs["cutoff"])
            self._cutoff = _checked_cutoff(str(path), self.file_cutoff, cutoff)
            self.indices = _checked_indices(str(path), indices, int(file.attrs["n_structures"]))
            offsets = {
                key: file[f"structures/{key}"][:]
                for key in ("atom_offset", "n_atoms", "edge_offset", "n_edges", "pbc")
            }
        self._atom_offset = offsets["atom_offset"][self.indices]
        self._n_atoms = offsets["n_atoms"][self.indices]
        self._edge_offset = offsets["edge_offset"][self.indices]
        self._n_edges = offsets["n_edges"][self.indices]
        # In memory too (3 bytes a structure): h5py reads HDF5 booleans ~10× slower than numbers.
        self._pbc = offsets["pbc"][self.indices]
        self._file: h5py.File | None = None
        self._datasets: dict[str, h5py.Dataset] = {}
        self._pid: int | None = None

    @property
    def cutoff(self) -> float:
        """float, Å — the cutoff of the graphs this dataset returns."""
        return self._cutoff

    @property
    def n_atoms(self) -> np.ndarray:
        """(n,) int64 — number of atoms of each item, e.g. to batch by size."""
        return self._n_atoms

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[Graph, Labels]:
        rows = self._read(k)
        pbc = rows["pbc"]
        cell = rows["cell"] if pbc.any() else np.zeros((3, 3))
        idx_i, idx_j, shifts = rows["idx_i"], rows["idx_j"], rows["shifts"]
        if self._cutoff < self.file_cutoff:
            keep = _edge_lengths(rows["positions"], cell, idx_i, idx_j, shifts) < self._cutoff
            idx_i, idx_j, shifts = idx_i[keep], idx_j[keep], shifts[keep]
        ordered = pair_order(NeighborList(idx_i, idx_j, shifts))  # filters once per atom pair
        if ordered is not None:
            idx_i, idx_j, shifts = ordered
        n_atoms = len(rows["positions"])
        graph = Graph(
            positions=torch.from_numpy(rows["positions"]),
            atomic_numbers=torch.from_numpy(rows["atomic_numbers"].astype(np.int64)),
            idx_i=torch.from_numpy(idx_i.astype(np.int64)),
            idx_j=torch.from_numpy(idx_j.astype(np.int64)),
            shifts=torch.from_numpy(shifts.astype(np.float64)),
            cell=torch.from_numpy(cell).unsqueeze(0),
            pbc=torch.from_numpy(pbc).unsqueeze(0),
            batch=torch.zeros(n_atoms, dtype=torch.long),
            pairs=ordered is not None,
        )
        labels = {
            "energy": torch.tensor([rows["energy"]], dtype=torch.float64),
            "forces": torch.from_numpy(rows["forces"]),
            "stress": torch.from_numpy(rows["stress"]).reshape(1, 3, 3),
            "n_atoms": torch.tensor([n_atoms], dtype=torch.long),
        }
        return graph, labels

    def structure(self, k: int) -> Structure:
        """Item ``k`` as a ``Structure`` (forces and stress that are all NaN come back as None)."""
        rows = self._read(k, edges=False)
        forces, stress = rows["forces"], rows["stress"]
        return Structure(
            positions=rows["positions"],
            atomic_numbers=rows["atomic_numbers"].astype(np.int64),
            cell=rows["cell"],
            pbc=rows["pbc"],
            energy=float(rows["energy"]),
            forces=None if np.isnan(forces).all() else forces,
            stress=None if np.isnan(stress).all() else stress,
        )

    def close(self) -> None:
        """Closes this process's file handle; the next access opens it again."""
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file, self._datasets, self._pid = None, {}, None

    def __getstate__(self) -> dict:
        # Handles do not survive pickling (spawned workers): each process opens its own.
        return {**self.__dict__, "_file": None, "_datasets": {}, "_pid": None}

    def _read(self, k: int, edges: bool = True) -> dict[str, np.ndarray]:
        """The rows of item ``k`` as numpy arrays, keyed by the dataset's last name."""
        if self._pid != os.getpid():
            # After a fork the parent's handle is not ours to use: HDF5 state is per process.
            self._file = open_hdf5(self.path)
            self._datasets = {key: self._file[key] for key in LAYOUT}
            self._pid = os.getpid()
        index = int(self.indices[k])
        atoms = slice(int(self._atom_offset[k]), int(self._atom_offset[k] + self._n_atoms[k]))
        keys = ["atoms/positions", "atoms/atomic_numbers", "atoms/forces"]
        rows = {key.split("/")[1]: self._datasets[key][atoms] for key in keys}
        for key in ("structures/energy", "structures/cell", "structures/stress"):
            rows[key.split("/")[1]] = self._datasets[key][index]
        rows["pbc"] = self._pbc[k].copy()
        if edges:
            edge_rows = slice(int(self._edge_offset[k]), int(self._edge_offset[k] + self._n_edges[k]))
            for key in ("edges/idx_i", "edges/idx_j", "edges/shifts"):
                rows[key.split("/")[1]] = self._datasets[key][edge_rows]
        return rows
