"""The batched graph that the model consumes, built from ASE ``Atoms`` and concatenated over structures.

Many structures of different sizes go through one forward pass as one disconnected graph: atoms are
concatenated, edge indices are offset, and ``batch`` says which structure each atom belongs to.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from ase import Atoms
from torch import Tensor

from so3krates.data.neighbors import neighbor_list, one_per_pair, pair_order


@dataclass(frozen=True)
class Graph:
    """A batch of ``n_graphs`` structures with their neighbour lists.

    Attributes:
        positions: (n_atoms, 3) float, Å — Cartesian coordinates.
        atomic_numbers: (n_atoms,) int64 — nuclear charges Z.
        idx_i: (n_edges,) int64 — centre atom of each edge (receives the message).
        idx_j: (n_edges,) int64 — neighbour atom of each edge (sends the message).
        shifts: (n_edges, 3) float — integer image offsets, ``vec_ij = R_j − R_i + shifts @ cell``.
        cell: (n_graphs, 3, 3) float, Å — lattice vectors as rows; zeros for molecules.
        pbc: (n_graphs, 3) bool — periodicity along each lattice vector.
        batch: (n_atoms,) int64 — structure index of each atom, sorted ascending.
        pairs: the edges are in pair order (:func:`so3krates.data.neighbors.pair_order`: edge k + n/2 is
            edge k reversed), which lets the execution layer evaluate the filters once per pair.
        total_charge: (n_graphs,) float, e — total charge of each structure (SO3LR models; None: neutral).
        total_spin: (n_graphs,) float — total spin S of each structure, ħ (0 singlet, ½ doublet; None: 0).
        lr_idx_i, lr_idx_j, lr_shifts: the long-range edges, for models with long-range terms (None
            otherwise): every pair of atoms (or of an atom and a periodic image) closer than the model's
            long-range cutoff, once (:func:`so3krates.data.neighbors.one_per_pair`).
    """

    positions: Tensor
    atomic_numbers: Tensor
    idx_i: Tensor
    idx_j: Tensor
    shifts: Tensor
    cell: Tensor
    pbc: Tensor
    batch: Tensor
    pairs: bool = False
    total_charge: Tensor | None = None
    total_spin: Tensor | None = None
    lr_idx_i: Tensor | None = None
    lr_idx_j: Tensor | None = None
    lr_shifts: Tensor | None = None

    @property
    def n_atoms(self) -> int:
        return self.positions.shape[0]

    @property
    def n_edges(self) -> int:
        return self.idx_i.shape[0]

    @property
    def n_graphs(self) -> int:
        return self.cell.shape[0]

    def edge_vectors(self) -> Tensor:
        """(n_edges, 3) float, Å — ``vec_ij = R[idx_j] − R[idx_i] + shifts_ij @ cell`` (SPEC §1)."""
        return self._vectors(self.idx_i, self.idx_j, self.shifts)

    def long_range_vectors(self) -> Tensor:
        """(n_lr_edges, 3) float, Å — the vectors of the long-range edges (as :meth:`edge_vectors`)."""
        if self.lr_idx_i is None:
            raise ValueError("this graph has no long-range edges (build it with a long_range_cutoff)")
        return self._vectors(self.lr_idx_i, self.lr_idx_j, self.lr_shifts)

    def _vectors(self, idx_i: Tensor, idx_j: Tensor, shifts: Tensor) -> Tensor:
        # Always add the image term (zero shifts for molecules): no data-dependent branch, and the
        # derivative with respect to the cell that the stress needs is always there.
        cell_per_edge = self.cell[self.batch[idx_i]]  # (n_edges, 3, 3)
        offsets = torch.einsum("ek,ekc->ec", shifts, cell_per_edge)
        return self.positions[idx_j] - self.positions[idx_i] + offsets

    def charges_and_spins(self) -> tuple[Tensor, Tensor]:
        """(total_charge, total_spin), each (n_graphs,) in the graph's float dtype; zeros where not given."""
        zeros = self.positions.new_zeros(self.n_graphs)
        charge = zeros if self.total_charge is None else self.total_charge.to(zeros.dtype)
        spin = zeros if self.total_spin is None else self.total_spin.to(zeros.dtype)
        return charge, spin

    def replace(self, **changes: Tensor) -> Graph:
        """A copy with some fields replaced (e.g. strained positions and cell)."""
        return dataclasses.replace(self, **changes)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Graph:
        """Moves all tensors to ``device`` and casts the floating-point ones to ``dtype``."""
        changes = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, Tensor):
                continue
            target_dtype = dtype if value.is_floating_point() else None
            changes[field.name] = value.to(device=device, dtype=target_dtype)
        return dataclasses.replace(self, **changes)


def atoms_to_graph(
    atoms: Atoms,
    cutoff: float,
    dtype: torch.dtype | None = None,
    pairs: bool = False,
    long_range_cutoff: float | None = None,
    total_charge: float | None = None,
    total_spin: float | None = None,
) -> Graph:
    """Builds the one-structure graph of ``atoms`` with a full neighbour list within ``cutoff`` Å.

    Args:
        atoms: an ASE structure; its ``pbc`` and ``cell`` decide about periodic images.
        cutoff: float, Å — the model's cutoff radius.
        dtype: floating-point dtype of positions, cell and shifts. Default float64, also for float32
            models: the model computes edge vectors in this dtype before casting to its own.
        pairs: put the edges in pair order (:func:`so3krates.data.neighbors.pair_order`, ``Graph.pairs``),
            as the ASE calculator does: the filters are then evaluated once per pair.
        long_range_cutoff: Å — also build the long-range edges (models with long-range terms).
        total_charge, total_spin: e and ħ — the structure's total charge and spin S (default:
            ``atoms.info["charge"]`` and ``atoms.info["total_spin"]``, else 0).
    """
    dtype = dtype or torch.float64
    pbc = np.asarray(atoms.pbc, dtype=bool)
    cell = np.asarray(atoms.cell.array, dtype=np.float64)
    positions = atoms.get_positions()
    edges = neighbor_list(positions, cell, pbc, cutoff)
    if pairs:
        edges = pair_order(edges)
    n_atoms = len(atoms)
    long_range = {}
    if long_range_cutoff is not None:
        lr_edges = one_per_pair(neighbor_list(positions, cell, pbc, long_range_cutoff))
        long_range = {
            "lr_idx_i": torch.from_numpy(lr_edges.idx_i),
            "lr_idx_j": torch.from_numpy(lr_edges.idx_j),
            "lr_shifts": torch.tensor(lr_edges.shifts, dtype=dtype),
        }
    charge = atoms.info.get("charge", 0.0) if total_charge is None else total_charge
    spin = atoms.info.get("total_spin", 0.0) if total_spin is None else total_spin
    return Graph(
        total_charge=torch.tensor([float(charge)], dtype=dtype),
        total_spin=torch.tensor([float(spin)], dtype=dtype),
        **long_range,
        positions=torch.tensor(positions, dtype=dtype),
        atomic_numbers=torch.tensor(atoms.numbers, dtype=torch.long),
        idx_i=torch.from_numpy(edges.idx_i),
        idx_j=torch.from_numpy(edges.idx_j),
        shifts=torch.tensor(edges.shifts, dtype=dtype),
        cell=torch.tensor(cell if pbc.any() else np.zeros((3, 3)), dtype=dtype).unsqueeze(0),
        pbc=torch.tensor(pbc).unsqueeze(0),
        batch=torch.zeros(n_atoms, dtype=torch.long),
        pairs=pairs,
    )


def collate(graphs: Sequence[Graph]) -> Graph:
    """Concatenates graphs into one batch, offsetting edge indices and structure indices.

    When every graph is in pair order (``Graph.pairs``), so is the batch: the first halves of all graphs' edge
    lists come first, then all second halves, in the same order.
    """
    if not graphs:
        raise ValueError("collate() needs at least one graph")
    atom_offsets = np.cumsum([0] + [g.n_atoms for g in graphs[:-1]])
    graph_offsets = np.cumsum([0] + [g.n_graphs for g in graphs[:-1]])
    pairs = all(g.pairs for g in graphs)
    idx_i = [g.idx_i + int(o) for g, o in zip(graphs, atom_offsets, strict=True)]
    idx_j = [g.idx_j + int(o) for g, o in zip(graphs, atom_offsets, strict=True)]
    shifts = [g.shifts for g in graphs]
    if pairs:
        idx_i, idx_j, shifts = _halves_first(idx_i), _halves_first(idx_j), _halves_first(shifts)
    long_range = {}
    if all(g.lr_idx_i is not None for g in graphs):
        long_range = {
            "lr_idx_i": torch.cat([g.lr_idx_i + int(o) for g, o in zip(graphs, atom_offsets, strict=True)]),
            "lr_idx_j": torch.cat([g.lr_idx_j + int(o) for g, o in zip(graphs, atom_offsets, strict=True)]),
            "lr_shifts": torch.cat([g.lr_shifts for g in graphs]),
        }
    charges_spins = [g.charges_and_spins() for g in graphs]
    return Graph(
        total_charge=torch.cat([c for c, _ in charges_spins]),
        total_spin=torch.cat([s for _, s in charges_spins]),
        **long_range,
        positions=torch.cat([g.positions for g in graphs]),
        atomic_numbers=torch.cat([g.atomic_numbers for g in graphs]),
        idx_i=torch.cat(idx_i),
        idx_j=torch.cat(idx_j),
        shifts=torch.cat(shifts),
        cell=torch.cat([g.cell for g in graphs]),
        pbc=torch.cat([g.pbc for g in graphs]),
        batch=torch.cat([g.batch + int(o) for g, o in zip(graphs, graph_offsets, strict=True)]),
        pairs=pairs,
    )


def _halves_first(parts: list[Tensor]) -> list[Tensor]:
    """[a1, a2, b1, b2] for edge lists [a, b] of graphs in pair order: first halves, then second halves."""
    return [t[: t.shape[0] // 2] for t in parts] + [t[t.shape[0] // 2 :] for t in parts]
