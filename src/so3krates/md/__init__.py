"""Molecular dynamics with a trained model through ASE: NVE, Langevin, Nosé–Hoover chain, Bussi and NPT,
a thermo log, a stability monitor that stops runs that broke apart, replicas and exact restarts."""

from so3krates.md.config import MDConfig, StabilityConfig, load_md_config
from so3krates.md.run import run_md
from so3krates.md.stability import StabilityFailure, StabilityMonitor, covalent_bonds
from so3krates.md.summary import MDResult, TrajectoryResult, replica_summary

__all__ = [
    "MDConfig",
    "MDResult",
    "StabilityConfig",
    "StabilityFailure",
    "StabilityMonitor",
    "TrajectoryResult",
    "covalent_bonds",
    "load_md_config",
    "replica_summary",
    "run_md",
]
