"""Structures, model variants and evaluation helpers shared by the test modules.

The model test suite (``test_model_physics.py``) runs every variant in ``VARIANTS`` in float32 and float64;
a new model option or architecture joins the suite by adding one entry here.
"""

from __future__ import annotations

import numpy as np
import torch
from ase import Atoms
from ase.build import molecule

from so3krates import ForceField, So3krates, atoms_to_graph, collate, preset
from so3krates.model.config import ModelConfig
from so3krates.runtime import Plan, legal_plans

#: name → config. Together they exercise every option of ModelConfig at least once.
VARIANTS: dict[str, ModelConfig] = {
    "tiny": preset("tiny"),
    "tiny-neighbors-bernstein-polynomial": preset(
        "tiny", ev_init="neighbors", radial_basis="bernstein", cutoff_fn="polynomial", avg_num_neighbors=6.0
    ),
    "tiny-gaussian-exponential-qk-norm-mlp": preset(
        "tiny",
        radial_basis="gaussian",
        cutoff_fn="exponential",
        use_qk_activation=True,
        use_layer_norm=True,
        use_residual_mlp=True,
        message_normalization="avg_num_neighbors",
        avg_num_neighbors=4.0,
    ),
    "tiny-bessel-l4": preset("tiny", radial_basis="bessel", degrees=(1, 2, 3, 4), n_features=48, n_heads=4),
    # SO3LR's backbone: LayerNorms after the residual sums, a pre-activated residual MLP, PhysNet cutoff.
    "tiny-post-norm-physnet": preset(
        "tiny",
        radial_basis="bernstein",
        cutoff_fn="physnet",
        use_layer_norm=True,
        use_residual_mlp=True,
        layer_norm_position="after",
        message_normalization="avg_num_neighbors",
        avg_num_neighbors=4.0,
    ),
    # The ablation of the paper's stability experiment: no Euclidean variables at all.
    "tiny-invariant": preset("tiny", degrees=()),
    "paper": preset("paper"),
}

#: Every legal way to run a model (``so3krates.runtime.plan``), next to the variants: ``test_plans.py`` runs
#: each plan of inference (frozen weights) on every variant in both dtypes against the reference path, and
#: each plan of training (trainable weights, second derivatives) on the gradients of a loss. A new way to
#: run the model becomes a new plan, and so joins this matrix.
PLANS: list[Plan] = legal_plans(frozen=True)
TRAINING_PLANS: list[Plan] = legal_plans(frozen=False, create_graph=True)


def skip_without_kernel(plan: Plan) -> None:
    """Skips the test (with the reason) where ``plan`` needs the pair-message kernel and it cannot build."""
    import pytest

    from so3krates.ops import pair_messages

    if plan.kernel and not pair_messages.available():
        pytest.skip(f"the pair-message kernel cannot be built here: {pair_messages.unavailable_reason()}")


#: Relative tolerance of exact symmetries per dtype (issue 2: < 1e-10 in float64, < 1e-5 in float32).
SYMMETRY_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def make_model(config: ModelConfig, dtype: torch.dtype, seed: int = 0) -> So3krates:
    """A randomly initialised model with non-trivial per-element shift and scale, in eval mode."""
    torch.manual_seed(seed)
    model = So3krates(config)
    with torch.no_grad():
        model.readout.energy_shift.uniform_(-2.0, 2.0)
        model.readout.energy_scale.uniform_(0.5, 2.0)
    return model.to(dtype).eval()


def make_force_field(config: ModelConfig, dtype: torch.dtype, seed: int = 0) -> ForceField:
    """:func:`make_model` in a (live, eager) ForceField: the planner chooses how each call runs."""
    return ForceField(make_model(config, dtype, seed))


def reference_outputs(
    model: So3krates, structures: list[Atoms], stress: bool = True, pairs: bool = False
) -> dict[str, np.ndarray]:
    """Energies, forces and stress from the reference path alone, as float64 numpy arrays.

    ``model(graph)`` (one module per equation), and the derivatives by a route independent of
    ``so3krates.runtime.derivatives``: autograd with respect to positions and a symmetric strain.
    """
    graph = collate([atoms_to_graph(a, model.cutoff, pairs=pairs) for a in structures])
    positions = graph.positions.detach().requires_grad_(True)
    strain = torch.zeros_like(graph.cell, requires_grad=True)
    symmetric = 0.5 * (strain + strain.transpose(1, 2))
    strained = graph.replace(
        positions=positions + torch.einsum("na,nab->nb", positions, symmetric[graph.batch]),
        cell=graph.cell + torch.bmm(graph.cell, symmetric),
    )
    energy = torch.zeros(graph.n_graphs, dtype=torch.float64).index_add(0, graph.batch, model(strained))
    forces, strain_gradient = torch.autograd.grad(energy.sum(), [positions, strain], allow_unused=True)
    out = {"energy": energy.detach().numpy(), "forces": -forces.numpy()}
    if stress:
        volume = torch.linalg.det(graph.cell).abs()
        safe = torch.where(volume > 0, volume, torch.ones_like(volume))
        value = torch.where((volume > 0)[:, None, None], strain_gradient / safe[:, None, None], 0.0)
        out["stress"] = value.numpy()
    return out


def evaluate(force_field: ForceField, structures: list[Atoms], stress: bool = False) -> dict[str, np.ndarray]:
    """Energies, forces (and stress) of a batch of ASE structures, as float64 numpy arrays.

    Graphs are float64 (the default of ``atoms_to_graph``) whatever the network's dtype, as in production.
    """
    graph = collate([atoms_to_graph(a, force_field.cutoff) for a in structures])
    out = force_field(graph, compute_forces=True, compute_stress=stress)
    return {k: v.detach().double().numpy() for k, v in out.items()}


def numerical_forces(energy, atoms: Atoms, step: float = 1e-5) -> np.ndarray:
    """−∂E/∂R by central differences, (n_atoms, 3); ``energy(atoms)`` returns a float, eV."""
    numerical = np.zeros((len(atoms), 3))
    for a in range(len(atoms)):
        for c in range(3):
            plus, minus = atoms.copy(), atoms.copy()
            plus.positions[a, c] += step
            minus.positions[a, c] -= step
            numerical[a, c] = -(energy(plus) - energy(minus)) / (2 * step)
    return numerical


def numerical_stress(energy, atoms: Atoms, step: float = 1e-5) -> np.ndarray:
    """(1/V) ∂E/∂ε by central differences of a symmetric strain of positions and cell, (3, 3) eV/Å³."""
    numerical = np.zeros((3, 3))
    for a in range(3):
        for b in range(3):
            energies = []
            for sign in (1.0, -1.0):
                strain = np.zeros((3, 3))
                strain[a, b] += 0.5 * sign * step
                strain[b, a] += 0.5 * sign * step
                strained = atoms.copy()
                strained.set_cell(atoms.cell.array @ (np.eye(3) + strain), scale_atoms=True)
                energies.append(energy(strained))
            numerical[a, b] = (energies[0] - energies[1]) / (2 * step) / atoms.get_volume()
    return numerical


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random proper rotation matrix (3, 3)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def ethanol(seed: int = 0) -> Atoms:
    """Ethanol, rattled so that it has no symmetry."""
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=seed)
    return atoms


def water() -> Atoms:
    atoms = molecule("H2O")
    atoms.rattle(0.02, seed=1)
    return atoms


def acetamide() -> Atoms:
    atoms = molecule("CH3CONH2")
    atoms.rattle(0.05, seed=2)
    return atoms


def triclinic_cell(seed: int = 0) -> Atoms:
    """A small periodic triclinic cell (9 atoms, C/H/O) whose shortest lattice vector is below 2 r_c.

    So every atom sees several images of its neighbours and of itself.
    """
    rng = np.random.default_rng(seed)
    cell = np.array([[4.6, 0.0, 0.0], [0.9, 4.9, 0.0], [0.6, -0.7, 5.3]])
    fractional = rng.uniform(size=(9, 3))
    atoms = Atoms("C2OH6", scaled_positions=fractional, cell=cell, pbc=True)
    # Push apart atoms that came too close so the structure is chemically sane-ish (no d < 0.9 Å).
    for _ in range(200):
        d = atoms.get_all_distances(mic=True)
        np.fill_diagonal(d, 10.0)
        i, j = np.unravel_index(np.argmin(d), d.shape)
        if d[i, j] > 0.9:
            break
        atoms.positions[j] += rng.normal(scale=0.5, size=3)
    atoms.wrap()
    return atoms


def rss_mb() -> float:
    """Current resident memory of this process, MB (Linux /proc)."""
    import os

    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
