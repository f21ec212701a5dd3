"""Any energy model → energy, forces, and for periodic input stress and virial, by automatic differentiation.

Forces are F = −∂E/∂R, conservative by construction. Stress uses a symmetric strain ε applied to positions
and cell, σ = (1/V) ∂E/∂ε and virial W = −∂E/∂ε (ASE's sign convention: σ = −W / V).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from so3krates import keys
from so3krates.data.graph import Graph
from so3krates.nn.scatter import scatter_sum


class ForceField(nn.Module):
    """Wraps an energy model (``Graph → (n_atoms,)`` atomic energies in eV) into a force field.

    Args:
        model: the energy model; it must expose ``cutoff`` (Å), used to build neighbour lists.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.cutoff = float(model.cutoff)

    def forward(
        self,
        graph: Graph,
        compute_forces: bool = True,
        compute_stress: bool = False,
        create_graph: bool = False,
    ) -> dict[str, Tensor]:
        """Evaluates the model and the derivatives asked for.

        Args:
            graph: a batch of structures.
            compute_forces: also return forces.
            compute_stress: also return stress and virial (zeros for structures without a periodic cell).
            create_graph: keep the graph of the derivatives, as training on forces needs; leave it off for
                inference, where it only costs memory.

        Returns:
            A dict with ``energy`` (n_graphs,) eV and ``atomic_energies`` (n_atoms,) eV, plus ``forces``
            (n_atoms, 3) eV/Å, and ``stress`` (n_graphs, 3, 3) eV/Å³ and ``virial`` (n_graphs, 3, 3) eV when
            asked for.
        """
        positions, cell = graph.positions, graph.cell
        wrt: list[Tensor] = []
        if compute_forces or compute_stress:
            if not positions.requires_grad:
                positions = positions.detach().requires_grad_(True)
            wrt.append(positions)
        if compute_stress:
            strain = torch.zeros_like(cell, requires_grad=True)  # (n_graphs, 3, 3)
            symmetric = 0.5 * (strain + strain.transpose(1, 2))
            positions = positions + torch.einsum("na,nab->nb", positions, symmetric[graph.batch])
            cell = cell + torch.bmm(cell, symmetric)
            wrt.append(strain)
        atomic_energies = self.model(graph.replace(positions=positions, cell=cell))
        energy = scatter_sum(atomic_energies, graph.batch, graph.n_graphs)
        out = {keys.ENERGY: energy, keys.ATOMIC_ENERGIES: atomic_energies}
        if not wrt:
            return out
        gradients = torch.autograd.grad(
            energy.sum(), wrt, create_graph=create_graph, allow_unused=True, materialize_grads=True
        )
        if compute_forces:
            out[keys.FORCES] = -gradients[0]
        if compute_stress:
            virial = -gradients[-1]
            volume = torch.linalg.det(graph.cell).abs()  # (n_graphs,), Å³; 0 for molecules
            safe_volume = torch.where(volume > 0, volume, torch.ones_like(volume))
            stress = torch.where((volume > 0)[:, None, None], -virial / safe_volume[:, None, None], 0.0)
            out[keys.VIRIAL] = virial
            out[keys.STRESS] = stress
        return out
