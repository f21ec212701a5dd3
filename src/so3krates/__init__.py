"""SO3krates: a Euclidean transformer for fast and stable machine-learned force fields.

PyTorch implementation of J. T. Frank, O. T. Unke, K.-R. Müller, S. Chmiela,
"A Euclidean transformer for fast and stable machine learned force fields",
Nat. Commun. 15, 6539 (2024), arXiv:2309.15126.

The public surface is re-exported here; everything else is an implementation detail.
"""

__version__ = "0.1.0"

from so3krates.calculators.ase import So3kratesCalculator
from so3krates.data.graph import Graph, atoms_to_graph, collate
from so3krates.model.config import ModelConfig, preset
from so3krates.model.so3krates import So3krates
from so3krates.runtime.force_field import ForceField

__all__ = [
    "ForceField",
    "Graph",
    "ModelConfig",
    "So3krates",
    "So3kratesCalculator",
    "__version__",
    "atoms_to_graph",
    "collate",
    "preset",
]
