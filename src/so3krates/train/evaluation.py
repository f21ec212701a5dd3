"""Metrics and mean loss of a model on a dataset, on one process or split over the ranks of a job."""

from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset, Subset

from so3krates.data.dataset import batches
from so3krates.runtime.force_field import ForceField
from so3krates.runtime.predict import predict_batches
from so3krates.train.config import LossConfig
from so3krates.train.distributed import Distributed
from so3krates.train.loss import compute_loss
from so3krates.train.metrics import ErrorAccumulator


def evaluate_dataset(
    force_field: ForceField,
    dataset: Dataset,
    batch_size: int,
    device: str,
    loss_config: LossConfig | None = None,
    compute_stress: bool = False,
    distributed: Distributed | None = None,
) -> tuple[dict[str, float], float]:
    """Metrics (meV, meV/Å) of ``force_field`` on ``dataset`` and its mean loss (NaN without a config).

    ``distributed``: rank r evaluates batches r, r + N, r + 2N, … of the N ranks and the sums are added up,
    so every rank returns the numbers of one process evaluating every batch (the mean loss depends on the
    batches, which stay the same).
    """
    if distributed is not None and distributed.enabled:
        mine = batches(dataset, batch_size)[distributed.rank :: distributed.world_size]
        # Only the last batch of all can be short, and it is the last of its rank: the same batches again.
        dataset = Subset(dataset, [i for batch in mine for i in batch])
    accumulator = ErrorAccumulator()
    loss_sum, count = 0.0, 0
    for indices, predictions, labels in predict_batches(
        force_field, dataset, batch_size, device, compute_stress
    ):
        accumulator.update(predictions, labels)
        if loss_config is not None:
            loss, _ = compute_loss(predictions, labels, loss_config)
            loss_sum += float(loss) * len(indices)
            count += len(indices)
    if distributed is not None and distributed.enabled:
        totals = distributed.all_reduce_sum(
            torch.cat([accumulator.totals(), torch.tensor([loss_sum, count], dtype=torch.float64)])
        )
        accumulator.set_totals(totals[:-2])
        loss_sum, count = float(totals[-2]), round(float(totals[-1]))
    return accumulator.results(), (loss_sum / count if count else math.nan)
