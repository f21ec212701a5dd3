"""The SO3krates model: Graph → per-atom energies (Frank et al., Nat. Commun. 15, 6539, 2024).

Data path: atomic numbers → embedding h (Eq. 10); edge geometry → radial basis, cutoff and spherical
harmonics, once per call; Euclidean variables x (zeros or Eq. 11); T transformer layers update (h, x)
(Eqs. 15–25); readout h → E_i with per-element scale and shift.

This is the reference: every equation once, in the order of the paper. Faster ways to evaluate the same
function (fused layers, radial filters from a spline, filters once per pair of atoms, sums through edge
slots, compiled programs) and the derivatives (forces, virial) live in :mod:`so3krates.runtime`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from so3krates.data.graph import Graph
from so3krates.model.config import ModelConfig
from so3krates.nn.cutoff import CUTOFF_FUNCTIONS
from so3krates.nn.embedding import AtomEmbedding
from so3krates.nn.geometry import lengths_and_directions
from so3krates.nn.radial import RADIAL_BASES
from so3krates.nn.readout import EnergyReadout
from so3krates.nn.spherical import DegreeContraction, SphericalHarmonics
from so3krates.nn.transformer import EdgeFeatures, TransformerLayer
from so3krates.ops.scatter import scatter_sum


class So3krates(nn.Module):
    """SO3krates energy model. ``model(graph)`` returns atomic energies, (n_atoms,) float64, eV.

    Args:
        config: validated hyper-parameters (see :func:`so3krates.model.config.preset`).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.cutoff = config.cutoff
        f = config.n_features
        self.embedding = AtomEmbedding(f)
        self.radial_basis = RADIAL_BASES[config.radial_basis](config.n_rbf, config.cutoff)
        self.cutoff_fn = CUTOFF_FUNCTIONS[config.cutoff_fn](config.cutoff)
        self.spherical_harmonics = SphericalHarmonics(config.degrees)
        self.contraction = DegreeContraction(config.degrees)
        if config.message_normalization == "sqrt_head_dim":  # Eqs. (21–22)
            invariant_norm = math.sqrt(f / config.n_heads)
            euclidean_norm = math.sqrt(f / max(config.n_degrees, 1))
        else:
            invariant_norm = euclidean_norm = config.avg_num_neighbors
        self.layers = nn.ModuleList(
            TransformerLayer(
                n_features=f,
                n_heads=config.n_heads,
                n_rbf=config.n_rbf,
                contraction=self.contraction,
                invariant_norm=invariant_norm,
                euclidean_norm=euclidean_norm,
                use_qk_activation=config.use_qk_activation,
                use_layer_norm=config.use_layer_norm,
                use_residual_mlp=config.use_residual_mlp,
                layer_norm_position=config.layer_norm_position,
            )
            for _ in range(config.n_layers)
        )
        self.readout = EnergyReadout(f, config.n_readout_features)

    @property
    def dtype(self) -> torch.dtype:
        """The network's floating-point dtype."""
        return self.embedding.table.weight.dtype

    def edge_features(
        self, vectors: Tensor, idx_i: Tensor, idx_j: Tensor, with_rbf: bool = True
    ) -> EdgeFeatures:
        """Radial basis, cutoff and spherical harmonics of every edge, shared by all layers.

        Args:
            vectors: (n_edges, 3) float, Å — ``R_j − R_i`` (plus the image offset) of each edge.
            idx_i, idx_j: (n_edges,) int64 — centre and neighbour atom of each edge.
            with_rbf: also the radial basis K(d_ij) (``rbf`` is None otherwise).
        """
        distances, unit = lengths_and_directions(vectors)
        # Geometry is computed in the graph's dtype and only then cast to the network's: with float64
        # positions, a float32 network avoids the cancellation in R_j − R_i + shift @ cell.
        distances, unit = distances.to(self.dtype), unit.to(self.dtype)
        return EdgeFeatures(
            rbf=self.radial_basis(distances) if with_rbf else None,
            cutoff=self.cutoff_fn(distances),
            sph=self.spherical_harmonics(unit),
            idx_i=idx_i,
            idx_j=idx_j,
            distances=distances,
        )

    def initial_euclidean(
        self, edges: EdgeFeatures, n_atoms: int, sum_over_edges: Callable[[Tensor, int], Tensor] | None = None
    ) -> Tensor:
        """x_i at input: zeros, or x_i = (1/N̄) Σ_j φ(d_ij) Y_ij (Eq. 11). Returns (n_atoms, n_sph).

        ``sum_over_edges(per_edge, n_atoms)`` sums edges into their centre atoms (default: ``scatter_sum``
        over ``idx_i``).
        """
        if self.config.ev_init == "zeros":
            return edges.sph.new_zeros((n_atoms, self.contraction.n_sph))
        sum_over_edges = sum_over_edges or (lambda per_edge, n: scatter_sum(per_edge, edges.idx_i, n))
        return sum_over_edges(edges.cutoff[:, None] * edges.sph, n_atoms) / self.config.avg_num_neighbors

    def forward(self, graph: Graph) -> Tensor:
        """graph: a batch of structures (float64 geometry recommended) → (n_atoms,) float64, eV."""
        return self.energies(graph.edge_vectors(), graph.atomic_numbers, graph.idx_i, graph.idx_j)

    def energies(self, vectors: Tensor, atomic_numbers: Tensor, idx_i: Tensor, idx_j: Tensor) -> Tensor:
        """The model as a function of edge vectors (the reference evaluation, one module per equation).

        Args:
            vectors: (n_edges, 3) float, Å — ``R_j − R_i`` (plus image offset) of each edge.
            atomic_numbers: (n_atoms,) int64.
            idx_i, idx_j: (n_edges,) int64 — centre and neighbour atom of each edge.

        Returns:
            (n_atoms,) float64, eV — atomic energies E_i (float64 whatever the network's dtype).
        """
        edges = self.edge_features(vectors, idx_i, idx_j)
        h = self.embedding(atomic_numbers)
        x = self.initial_euclidean(edges, atomic_numbers.shape[0])
        for layer in self.layers:
            h, x = layer(h, x, edges)
        return self.readout(h, atomic_numbers)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable parameters per top-level submodule, plus ``"total"``."""
    counts: dict[str, int] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            top = name.split(".")[0] if not name.startswith("layers.") else ".".join(name.split(".")[:3])
            counts[top] = counts.get(top, 0) + parameter.numel()
    counts["total"] = sum(counts.values())
    return counts
