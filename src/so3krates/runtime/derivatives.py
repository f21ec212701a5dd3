"""Energy → forces and virial, by one automatic differentiation with respect to the edge vectors.

Every consumer derives through :func:`derivatives`: batched graphs (training, evaluation, the calculator),
the traced programs of :mod:`so3krates.runtime.programs`, and LAMMPS' ML-IAP interface, which wants the
edge gradients themselves.

The model's energy depends on the positions only through the edge vectors
``vec_e = R[j_e] − R[i_e] + shift_e @ cell``. With g_e = ∂E/∂vec_e:

- forces F_k = −∂E/∂R_k = Σ_{e: i_e = k} g_e − Σ_{e: j_e = k} g_e, conservative by construction;
- virial W = −∂E/∂ε for a symmetric strain ε of positions and cell (vec → vec (1 + ε)):
  W = −sym(Σ_e vec_e ⊗ g_e), and stress σ = −W / V (ASE's sign convention).

The sums over edges go through the edge layout, so they use slots where the plan has them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from so3krates import keys
from so3krates.data.graph import Graph
from so3krates.ops.scatter import scatter_sum
from so3krates.runtime.layout import EdgeLayout


class Derivatives(NamedTuple):
    """edge_gradients: (n_edges, 3) eV/Å, ∂E/∂vec; forces: (n_atoms, 3) eV/Å or None; virial:
    (n_graphs, 3, 3) eV or None."""

    edge_gradients: Tensor
    forces: Tensor | None
    virial: Tensor | None


def derivatives(
    energy: Tensor,
    vectors: Tensor,
    edges: EdgeLayout,
    n_atoms: int,
    compute_forces: bool = True,
    compute_virial: bool = False,
    create_graph: bool = False,
    edge_graph: Tensor | None = None,
    n_graphs: int = 1,
) -> Derivatives:
    """Derivatives of ``energy.sum()`` with respect to the edge vectors, and forces and virial from them.

    Args:
        energy: the energy to differentiate, any shape (summed), eV — e.g. (n_graphs,) per structure.
        vectors: (n_edges, 3) float, Å — the edge vectors the energy was computed from; they must be part
            of its autograd graph (a leaf that requires grad, or computed from positions that do).
        edges: their layout (sums over edges use its slots, if any).
        n_atoms: atoms of the graph.
        compute_forces, compute_virial: which outputs to return (the edge gradients always).
        create_graph: keep the graph of the derivatives (training on forces, Hessians).
        edge_graph: (n_edges,) int64 — the structure of each edge, for a batch of several; None for one.
        n_graphs: structures in the batch.
    """
    if energy.requires_grad:
        (gradients,) = torch.autograd.grad(
            energy.sum(), [vectors], create_graph=create_graph, allow_unused=True, materialize_grads=True
        )
    else:  # nothing the energy depends on needs a gradient, e.g. frozen weights and no edges
        gradients = torch.zeros_like(vectors)
    forces = edges.sum_i(gradients, n_atoms) - edges.sum_j(gradients, n_atoms) if compute_forces else None
    virial = None
    if compute_virial:
        if edge_graph is None:
            outer = torch.mm(vectors.transpose(0, 1), gradients).unsqueeze(0)
        else:
            outer = scatter_sum(vectors[:, :, None] * gradients[:, None, :], edge_graph, n_graphs)
        virial = -0.5 * (outer + outer.transpose(1, 2))
    return Derivatives(gradients, forces, virial)


def stress_from_virial(virial: Tensor, cell: Tensor) -> Tensor:
    """σ = −W / V per structure, (n_graphs, 3, 3) eV/Å³; zero for structures without a periodic cell."""
    volume = torch.linalg.det(cell).abs()  # (n_graphs,), Å³; 0 for molecules
    safe_volume = torch.where(volume > 0, volume, torch.ones_like(volume))
    return torch.where((volume > 0)[:, None, None], -virial / safe_volume[:, None, None], 0.0)


def graph_derivatives(
    energy: Tensor,
    vectors: Tensor,
    edges: EdgeLayout,
    graph: Graph,
    compute_forces: bool,
    compute_stress: bool,
    create_graph: bool,
) -> dict[str, Tensor]:
    """:func:`derivatives` of a batch's energies (n_graphs,) at the edge vectors of ``edges`` (whose
    ``idx_i`` index ``graph``'s atoms): ``forces`` and/or ``virial`` and ``stress``, under their keys."""
    result = derivatives(
        energy,
        vectors,
        edges,
        graph.n_atoms,
        compute_forces=compute_forces,
        compute_virial=compute_stress,
        create_graph=create_graph,
        edge_graph=graph.batch.index_select(0, edges.idx_i) if graph.n_graphs > 1 else None,
        n_graphs=graph.n_graphs,
    )
    out = {}
    if compute_forces:
        out[keys.FORCES] = result.forces
    if compute_stress:
        out[keys.VIRIAL] = result.virial
        out[keys.STRESS] = stress_from_virial(result.virial, graph.cell)
    return out
