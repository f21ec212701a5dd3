"""The only unit constants of the package.

Internal units are Å, eV, eV/Å, eV/Å³, fs, K, amu and elementary charge (SPEC §1). Conversions happen
when reading input and when talking to a simulator, never inside the model.
"""

from ase import units as _ase_units

KCAL_PER_MOL = _ase_units.kcal / _ase_units.mol  # eV — 1 kcal/mol ≈ 0.0433641 eV
HARTREE = _ase_units.Hartree  # eV — ≈ 27.211386 eV
BOHR = _ase_units.Bohr  # Å — ≈ 0.529177 Å
COULOMB_CONSTANT = HARTREE * BOHR  # eV·Å — e² / (4π ε₀) ≈ 14.399645 eV·Å
FINE_STRUCTURE = _ase_units.alpha  # dimensionless — α ≈ 1/137.036
MEV = 1e-3  # eV — metrics are printed in meV and meV/Å

ENERGY_UNITS = {"eV": 1.0, "meV": MEV, "kcal/mol": KCAL_PER_MOL, "Hartree": HARTREE}  # → eV
LENGTH_UNITS = {"Å": 1.0, "Angstrom": 1.0, "Bohr": BOHR, "nm": 10.0}  # → Å

#: Å/ps (LAMMPS `units metal` velocity) per ASE velocity unit (Å per ASE time unit).
VELOCITY_TO_METAL = 1000.0 * _ase_units.fs
