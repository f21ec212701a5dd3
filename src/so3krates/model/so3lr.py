"""SO3LR: the SO3krates backbone with total charge and spin as inputs and physical long-range terms added to
the energy (Kabylda et al., "Molecular simulations with a pretrained neural network and universal pairwise
force fields", 2024; SPEC §3).

E = Σ_i E_i^local + E_ZBL + E_electrostatics + E_dispersion, where

- h_i^(0) = (Embed(Z_i) + e_i(Q) + e_i(2S)) / √3 with the charge and spin embeddings of
  :class:`~so3krates.nn.embedding.ChargeSpinEmbedding` (2S = number of unpaired electrons);
- the local part is the SO3krates backbone (here with post-LayerNorms, a residual MLP, degrees 1–4) and its
  per-element scaled and shifted readout;
- ZBL repulsion acts on the short-range edges (r < r_c); electrostatics of the partial charges and vdW-QDO
  dispersion scaled by the Hirshfeld ratios act on the long-range edges (r < r_lr), see
  :mod:`so3krates.nn.physics`.

Each physical term is switched by its own config flag. ``model(graph)`` is the reference computation; the
execution layer (:mod:`so3krates.runtime.long_range`) evaluates the backbone by any plan and then calls
:meth:`So3lr.heads`. Graphs need long-range edges and total charges/spins (``atoms_to_graph(...,
long_range_cutoff=...)``; the ASE calculator builds them itself).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from so3krates.data.graph import Graph
from so3krates.model.config import ModelConfig
from so3krates.model.so3krates import So3krates
from so3krates.nn.embedding import ChargeSpinEmbedding
from so3krates.nn.physics import Dispersion, Electrostatics, HirshfeldRatios, PartialCharges, ZBLRepulsion


class So3lrOutputs(NamedTuple):
    """atomic_energies: (n_atoms,) float64 eV (all terms); charges: (n_atoms,) e or None; hirshfeld_ratios:
    (n_atoms,) or None; terms: name → (n_atoms,) eV, each term's atomic energies (``local`` included)."""

    atomic_energies: Tensor
    charges: Tensor | None
    hirshfeld_ratios: Tensor | None
    terms: dict[str, Tensor]


class So3lr(So3krates):
    """The SO3LR energy model. ``model(graph)`` returns atomic energies, (n_atoms,) float64, eV."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        f = config.n_features
        self.long_range_cutoff = config.long_range_cutoff if config.long_range else None
        self.charge_embedding = ChargeSpinEmbedding(f) if config.charge_spin_embedding else None
        self.spin_embedding = ChargeSpinEmbedding(f) if config.charge_spin_embedding else None
        self.zbl = ZBLRepulsion() if config.zbl else None
        self.partial_charges = PartialCharges(f, config.n_readout_features) if config.electrostatics else None
        self.electrostatics = (
            Electrostatics(config.electrostatics_width, config.long_range_cutoff)
            if config.electrostatics
            else None
        )
        self.hirshfeld_ratios = HirshfeldRatios(f, config.n_readout_features) if config.dispersion else None
        self.dispersion = (
            Dispersion(config.dispersion_scale, config.long_range_cutoff, config.dispersion_switch_width)
            if config.dispersion
            else None
        )

    def forward(self, graph: Graph) -> Tensor:
        """graph: a batch of structures with long-range edges → (n_atoms,) float64, eV."""
        lr_vectors = graph.long_range_vectors() if self.long_range_cutoff is not None else None
        return self.outputs(graph, graph.edge_vectors(), lr_vectors).atomic_energies

    def initial_features(self, atomic_numbers: Tensor, graph: Graph) -> Tensor:
        """h_i at input: the element embedding plus, if configured, the charge and spin embeddings."""
        h = self.embedding(atomic_numbers)
        if self.charge_embedding is None:
            return h
        charge, spin = graph.charges_and_spins()
        h = h + self.charge_embedding(atomic_numbers, charge, graph.batch, graph.n_graphs)
        h = h + self.spin_embedding(atomic_numbers, 2.0 * spin, graph.batch, graph.n_graphs)
        return h / math.sqrt(3.0)

    def outputs(self, graph: Graph, vectors: Tensor, lr_vectors: Tensor | None) -> So3lrOutputs:
        """Every output of the model as a function of the edge vectors (the graph gives the rest).

        Args:
            graph: the batch (atomic numbers, edge indices, total charges and spins, structure of each atom).
            vectors: (n_edges, 3) float, Å — short-range edge vectors (``graph.edge_vectors()``).
            lr_vectors: (n_lr_edges, 3) float, Å — long-range edge vectors, or None without long-range terms.
        """
        atomic_numbers, idx_i, idx_j = graph.atomic_numbers, graph.idx_i, graph.idx_j
        edges = self.edge_features(vectors, idx_i, idx_j)
        h = self.initial_features(atomic_numbers, graph)
        x = self.initial_euclidean(edges, atomic_numbers.shape[0])
        for layer in self.layers:
            h, x = layer(h, x, edges)
        return self.heads(h, graph, vectors, lr_vectors)

    def heads(self, h: Tensor, graph: Graph, vectors: Tensor, lr_vectors: Tensor | None) -> So3lrOutputs:
        """From the final features h (n_atoms, F) and the edge vectors: the local energy, the physical terms,
        charges and Hirshfeld ratios (the part after the backbone, which the execution layer may evaluate
        by any plan)."""
        atomic_numbers, idx_i, idx_j = graph.atomic_numbers, graph.idx_i, graph.idx_j
        terms = {"local": self.readout(h, atomic_numbers)}
        if self.zbl is not None:
            distances = torch.linalg.vector_norm(vectors, dim=-1)
            terms["zbl"] = self.zbl(distances, self.cutoff_fn(distances), atomic_numbers, idx_i, idx_j)
        charges = ratios = None
        if self.long_range_cutoff is not None:
            if lr_vectors is None:
                raise ValueError("this SO3LR model needs the long-range edges of the graph")
            lr_distances = torch.linalg.vector_norm(lr_vectors, dim=-1)
            lr_i, lr_j = graph.lr_idx_i, graph.lr_idx_j
            if self.electrostatics is not None:
                charge, _ = graph.charges_and_spins()
                charges = self.partial_charges(
                    h, atomic_numbers, charge.double(), graph.batch, graph.n_graphs
                )
                terms["electrostatics"] = self.electrostatics(lr_distances, charges, lr_i, lr_j)
            if self.dispersion is not None:
                ratios = self.hirshfeld_ratios(h, atomic_numbers)
                terms["dispersion"] = self.dispersion(lr_distances, ratios, atomic_numbers, lr_i, lr_j)
        atomic_energies = torch.stack(list(terms.values())).sum(dim=0) if len(terms) > 1 else terms["local"]
        return So3lrOutputs(atomic_energies, charges, ratios, terms)


def build_model(config: ModelConfig) -> So3krates:
    """The model class that ``config`` describes: :class:`So3lr` when it asks for any SO3LR input or term."""
    return So3lr(config) if config.so3lr else So3krates(config)
