"""Canonical names of the quantities that flow through the package, with shape, dtype and unit.

Every dictionary of model outputs uses these keys, so a reader can grep one name across data, model,
training and simulation code.
"""

# Inputs (per atom / per edge / per structure).
POSITIONS = "positions"  # (n_atoms, 3) float, Å — Cartesian coordinates
ATOMIC_NUMBERS = "atomic_numbers"  # (n_atoms,) int64 — nuclear charge Z, 1..118
CELL = "cell"  # (n_graphs, 3, 3) float, Å — lattice vectors as rows; zeros for non-periodic
PBC = "pbc"  # (n_graphs, 3) bool — periodicity along each lattice vector
IDX_I = "idx_i"  # (n_edges,) int64 — centre atom that receives the message
IDX_J = "idx_j"  # (n_edges,) int64 — neighbour atom that sends it
SHIFTS = "shifts"  # (n_edges, 3) float — integer image offsets: vec_ij = R_j − R_i + shifts @ cell
BATCH = "batch"  # (n_atoms,) int64 — index of the structure each atom belongs to

# Outputs.
ENERGY = "energy"  # (n_graphs,) float, eV — total potential energy
ATOMIC_ENERGIES = "atomic_energies"  # (n_atoms,) float, eV — E_i after per-element scale and shift
FORCES = "forces"  # (n_atoms, 3) float, eV/Å — −∂E/∂R
STRESS = "stress"  # (n_graphs, 3, 3) float, eV/Å³ — (1/V) ∂E/∂ε, ASE sign convention
VIRIAL = "virial"  # (n_graphs, 3, 3) float, eV — −∂E/∂ε
