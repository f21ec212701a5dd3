"""Batched prediction over a dataset, shared by validation during training and by ``so3krates evaluate``."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from so3krates.data.dataset import Labels, batches, collate_batch
from so3krates.runtime.force_field import ForceField


def predict_batches(
    force_field: ForceField,
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    device: str | torch.device = "cpu",
    compute_stress: bool = False,
) -> Iterator[tuple[list[int], dict[str, Tensor], Labels]]:
    """Yields (indices, predictions, labels) per batch; predictions are detached, labels on ``device``."""
    for indices in batches(dataset, batch_size):
        graph, labels = collate_batch([dataset[i] for i in indices])
        graph = graph.to(device=device)
        labels = {key: value.to(device) for key, value in labels.items()}
        predictions = force_field(graph, compute_forces=True, compute_stress=compute_stress)
        yield indices, {key: value.detach() for key, value in predictions.items()}, labels
