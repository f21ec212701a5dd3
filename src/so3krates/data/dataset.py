"""Structures → cached graphs with labels, and batching for training and evaluation.

The neighbour list of each structure is computed once (on first access) and kept, so epochs after the
first cost only the model. Labels stay float64; NaN marks a missing label (masked in the loss).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from so3krates.data.graph import Graph, atoms_to_graph, collate
from so3krates.data.structure import Structure

Labels = dict[str, Tensor]


def structure_labels(structure: Structure) -> Labels:
    """energy (1,) eV, forces (n_atoms, 3) eV/Å, stress (1, 3, 3) eV/Å³ — float64, NaN where missing."""
    n = structure.n_atoms
    forces = structure.forces if structure.forces is not None else np.full((n, 3), np.nan)
    stress = structure.stress if structure.stress is not None else np.full((3, 3), np.nan)
    return {
        "energy": torch.tensor([structure.energy], dtype=torch.float64),
        "forces": torch.as_tensor(forces, dtype=torch.float64),
        "stress": torch.as_tensor(stress, dtype=torch.float64).reshape(1, 3, 3),
        "n_atoms": torch.tensor([n], dtype=torch.long),
    }


class GraphDataset(torch.utils.data.Dataset):
    """Indexable (graph, labels) pairs of a list of structures at a given cutoff (Å).

    ``long_range_cutoff`` (Å): also build the long-range edges, for models with long-range terms (SO3LR).
    """

    def __init__(
        self, structures: Sequence[Structure], cutoff: float, long_range_cutoff: float | None = None
    ) -> None:
        self.structures = list(structures)
        self.cutoff = float(cutoff)
        self.long_range_cutoff = long_range_cutoff
        self._graphs: list[Graph | None] = [None] * len(self.structures)

    def __len__(self) -> int:
        return len(self.structures)

    def graph(self, index: int) -> Graph:
        cached = self._graphs[index]
        if cached is None:
            # Pair order: the filters once per atom pair (faster training: benchmarks/results/thresholds.md).
            cached = atoms_to_graph(
                self.structures[index].to_atoms(),
                self.cutoff,
                pairs=True,
                long_range_cutoff=self.long_range_cutoff,
            )
            self._graphs[index] = cached
        return cached

    def __getitem__(self, index: int) -> tuple[Graph, Labels]:
        return self.graph(index), structure_labels(self.structures[index])


def collate_batch(items: Sequence[tuple[Graph, Labels]]) -> tuple[Graph, Labels]:
    """A list of (graph, labels) → one batched graph and concatenated labels."""
    graphs, labels = zip(*items, strict=True)
    return collate(graphs), {key: torch.cat([item[key] for item in labels]) for key in labels[0]}


def batches(
    dataset: torch.utils.data.Dataset, batch_size: int, order: Sequence[int] | None = None
) -> list[list[int]]:
    """Splits ``order`` (default: dataset order) into lists of at most ``batch_size`` indices."""
    order = list(range(len(dataset))) if order is None else list(order)
    return [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
