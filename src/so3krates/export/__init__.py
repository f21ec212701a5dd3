"""Exported models: files that evaluate a trained SO3krates model without the training code.

See :mod:`so3krates.export.formats` for the formats and their common interface, and
:mod:`so3krates.export.mliap` for LAMMPS' ML-IAP unified interface.
"""

from so3krates.export.formats import FORMATS, ExportedModel, export_model, load_exported, read_metadata

__all__ = ["FORMATS", "ExportedModel", "export_model", "load_exported", "read_metadata"]
