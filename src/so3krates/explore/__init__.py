"""Exploration of the potential-energy surface: minima hopping, deduplication of minima, reports.

The search works with any ASE calculator (``So3kratesCalculator`` for a trained model, EMT or
Lennard-Jones in the tests); nothing here depends on the model.
"""

from so3krates.explore.compare import Alignment, align, is_duplicate, kabsch, rmsd
from so3krates.explore.hopping import (
    MINIMA_COLUMNS,
    HoppingConfig,
    HoppingState,
    MinimaHopping,
    read_minima,
)
from so3krates.explore.report import (
    RescoreResult,
    discovery_history,
    rescore,
    write_report,
    write_rescore,
)

__all__ = [
    "MINIMA_COLUMNS",
    "Alignment",
    "HoppingConfig",
    "HoppingState",
    "MinimaHopping",
    "RescoreResult",
    "align",
    "discovery_history",
    "is_duplicate",
    "kabsch",
    "read_minima",
    "rescore",
    "rmsd",
    "write_report",
    "write_rescore",
]
