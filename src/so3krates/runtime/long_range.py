"""Evaluation of SO3LR models (:class:`~so3krates.model.so3lr.So3lr`): the reference computation over the
short- and long-range edges, with forces and virial from one differentiation.

The energy depends on the positions through two sets of edge vectors (r < r_c for the network and ZBL,
r < r_lr for electrostatics and dispersion). Both are handed to :func:`~so3krates.runtime.derivatives.
derivatives` as one concatenated edge list, so forces and virial come out of the same function as for every
other model. The backbone (embedding to the last layer) runs through the plan's
:class:`~so3krates.runtime.evaluator.EnergyFunction` (fused layers, radial spline, pairs as for any model);
the heads and physical terms after it are the model's own (:meth:`So3lr.heads`). Slots and compiled programs
are not available for SO3LR models yet.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from so3krates import keys
from so3krates.data.graph import Graph
from so3krates.model.so3lr import So3lr
from so3krates.nn.physics import dipole_moment
from so3krates.ops.scatter import scatter_sum
from so3krates.runtime.derivatives import graph_derivatives
from so3krates.runtime.evaluator import EnergyFunction
from so3krates.runtime.layout import EdgeLayout
from so3krates.runtime.plan import Plan, PlanError


class LongRangeEvaluator(nn.Module):
    """Graphs with long-range edges → energy, atomic energies, forces, virial, stress, and SO3LR's own
    outputs: partial ``charges`` (n_atoms,) e, ``dipole`` (n_graphs, 3) e·Å, ``hirshfeld_ratios``
    (n_atoms,). The atomic energies of each term separately: ``model.outputs(...).terms``.

    Args:
        energy: the :class:`~so3krates.runtime.evaluator.EnergyFunction` of an SO3LR model and ``plan``.
        plan: its plan (no slots).
    """

    def __init__(self, energy: EnergyFunction, plan: Plan) -> None:
        super().__init__()
        if plan.slots:
            raise PlanError("SO3LR models do not run with slots yet")
        self.energy = energy
        self.model: So3lr = energy.model
        self.plan = plan

    def forward(
        self,
        graph: Graph,
        compute_forces: bool = True,
        compute_stress: bool = False,
        create_graph: bool = False,
    ) -> dict[str, Tensor]:
        model = self.model
        if self.plan.pairs and not graph.pairs:
            raise PlanError(f"plan {self.plan.describe()} needs the edges in pair order (Graph.pairs)")
        long_range = model.long_range_cutoff is not None
        if long_range and graph.lr_idx_i is None:
            raise ValueError(
                "an SO3LR model needs graphs with long-range edges: atoms_to_graph(..., "
                f"long_range_cutoff={model.long_range_cutoff})"
            )
        derive = compute_forces or compute_stress
        if derive and not graph.positions.requires_grad:
            graph = graph.replace(positions=graph.positions.detach().requires_grad_(True))
        n_short = graph.n_edges
        if long_range:
            idx_i = torch.cat([graph.idx_i, graph.lr_idx_i])
            idx_j = torch.cat([graph.idx_j, graph.lr_idx_j])
            vectors = graph.replace(
                idx_i=idx_i, idx_j=idx_j, shifts=torch.cat([graph.shifts, graph.lr_shifts])
            )
            vectors = vectors.edge_vectors()
            short, lr = vectors[:n_short], vectors[n_short:]
        else:
            idx_i, idx_j = graph.idx_i, graph.idx_j
            vectors = short = graph.edge_vectors()
            lr = None
        layout = EdgeLayout.build(graph.idx_i, graph.idx_j, graph.n_atoms, self.plan.pairs, False)
        h0 = model.initial_features(graph.atomic_numbers, graph)
        h = self.energy.features(short, graph.atomic_numbers, layout, h0)
        outputs = model.heads(h, graph, short, lr)
        energy = scatter_sum(outputs.atomic_energies, graph.batch, graph.n_graphs)
        out = {keys.ENERGY: energy, keys.ATOMIC_ENERGIES: outputs.atomic_energies}
        if outputs.charges is not None:
            out["charges"] = outputs.charges
            out["dipole"] = dipole_moment(outputs.charges, graph.positions, graph.batch, graph.n_graphs)
        if outputs.hirshfeld_ratios is not None:
            out["hirshfeld_ratios"] = outputs.hirshfeld_ratios
        if not derive:
            return out
        edges = EdgeLayout.build(idx_i, idx_j, graph.n_atoms, False, False)
        out.update(
            graph_derivatives(energy, vectors, edges, graph, compute_forces, compute_stress, create_graph)
        )
        return out
