"""Edge lengths and directions, safe at zero length (coincident atoms, padding)."""

from __future__ import annotations

import torch
from torch import Tensor


def lengths_and_directions(vectors: Tensor) -> tuple[Tensor, Tensor]:
    """vectors: (n_edges, 3) float, Å → d_ij (n_edges,) Å and r̂_ij (n_edges, 3), in the same dtype.

    A zero vector gets d = 0 and r̂ = 0 with finite gradients instead of NaN: sqrt and the division only
    ever see safe values (the double-where pattern).
    """
    squared = (vectors * vectors).sum(-1)
    nonzero = squared > 0
    safe = torch.sqrt(torch.where(nonzero, squared, torch.ones_like(squared)))
    distances = torch.where(nonzero, safe, torch.zeros_like(safe))
    # One reciprocal per edge, then products: the backward pass of a division divides again per component.
    unit = torch.where(nonzero[:, None], vectors * safe.reciprocal()[:, None], torch.zeros_like(vectors))
    return distances, unit
