"""Pretrained models.

- :func:`so3lr` — SO3LR (Kabylda et al. 2024), a general force field for organic and biomolecular systems
  with long-range electrostatics and dispersion, trained by its authors. Its published weights are read from
  the ``so3krates-torch`` package (``pip install "so3krates[so3lr]"``), converted once into this package's
  model and kept in the cache directory.
"""

from so3krates.pretrained.so3lr import convert_so3krates_torch, so3lr

__all__ = ["convert_so3krates_torch", "so3lr"]
