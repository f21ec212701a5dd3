"""Evaluate the paper-sized SO3krates model on structures built with ASE: the Python API in one page.

Run: ``python examples/quickstart.py``. The weights are untrained (training arrives with `so3krates train`),
so the numbers show the data path, shapes, symmetry and speed, not chemistry.
"""

import time

import numpy as np
import torch
from ase import Atoms
from ase.build import molecule

from so3krates import ForceField, So3krates, atoms_to_graph, collate, preset


def water_box(n_per_side: int, seed: int = 0) -> Atoms:
    """n³ water molecules on a rattled cubic grid at roughly liquid density (periodic)."""
    spacing = 3.1  # Å, ≈ 1 g/cm³
    rng = np.random.default_rng(seed)
    box = Atoms(cell=[n_per_side * spacing] * 3, pbc=True)
    for index in np.ndindex(n_per_side, n_per_side, n_per_side):
        h2o = molecule("H2O")
        h2o.rotate(rng.uniform(0, 360), rng.normal(size=3))
        h2o.translate((np.array(index) + 0.5) * spacing)
        box += h2o
    return box


def median_ms(function, repeats: int = 15) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = preset("paper")
    force_field = ForceField(So3krates(config)).eval()

    structures = {
        "ethanol": molecule("CH3CH2OH"),
        "benzene": molecule("C6H6"),
        "water box (periodic)": water_box(4),
    }
    print(f"{'structure':<22s} {'atoms':>6s} {'edges':>7s} {'E / eV':>10s} {'max|F| / eV/Å':>14s} {'ms':>8s}")
    for name, atoms in structures.items():
        graph = atoms_to_graph(atoms, config.cutoff)
        periodic = bool(atoms.pbc.any())
        out = force_field(graph, compute_stress=periodic)
        ms = median_ms(lambda g=graph, p=periodic: force_field(g, compute_stress=p))
        f_max = out["forces"].norm(dim=-1).max().item()
        print(
            f"{name:<22s} {graph.n_atoms:>6d} {graph.n_edges:>7d} {out['energy'].item():>10.4f} "
            f"{f_max:>14.4f} {ms:>8.2f}"
        )

    # Rotating a molecule leaves E unchanged and rotates F.
    atoms = structures["ethanol"]
    rotated = atoms.copy()
    rotated.rotate(37.0, (1.0, 2.0, 0.5), center="COM")
    out, out_rotated = (force_field(atoms_to_graph(a, config.cutoff)) for a in (atoms, rotated))
    print(f"\nethanol rotated by 37°: |ΔE| = {abs(out['energy'] - out_rotated['energy']).item():.2e} eV")

    # A batch of different molecules gives the same numbers as one by one.
    batch = collate([atoms_to_graph(a, config.cutoff) for a in structures.values()])
    energies = force_field(batch, compute_stress=True)["energy"]
    print("batched energies / eV:", ", ".join(f"{e:.4f}" for e in energies.tolist()))


if __name__ == "__main__":
    main()
