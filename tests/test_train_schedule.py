"""Learning-rate schedule and loss details."""

from __future__ import annotations

import math

import pytest
import torch

from so3krates.train.config import LossConfig, TrainingConfig
from so3krates.train.loss import compute_loss
from so3krates.train.schedule import LearningRateSchedule


def _schedule(**fields) -> LearningRateSchedule:
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return LearningRateSchedule(optimizer, TrainingConfig(**fields))


def test_warmup_then_exponential_decay():
    schedule = _schedule(
        learning_rate=1e-3, warmup_steps=10, decay_rate=0.5, decay_steps=100, min_learning_rate=0
    )
    assert schedule.learning_rate(0) == pytest.approx(1e-4 * 0.5 ** (0 / 100))
    assert schedule.learning_rate(9) == pytest.approx(1e-3 * 0.5 ** (9 / 100))
    assert schedule.learning_rate(100) == pytest.approx(0.5e-3)
    assert schedule.before_step(200) == pytest.approx(0.25e-3)
    assert schedule.optimizer.param_groups[0]["lr"] == pytest.approx(0.25e-3)


def test_reduce_on_plateau_and_floor():
    schedule = _schedule(
        learning_rate=1e-3,
        scheduler="plateau",
        plateau_patience=2,
        plateau_factor=0.5,
        min_learning_rate=3e-4,
    )
    for loss in (1.0, 0.9, 0.95, 0.95):  # two validations without improvement
        schedule.after_validation(loss)
    assert schedule.learning_rate(0) == pytest.approx(0.5e-3)
    for loss in (0.95, 0.95, 0.95, 0.95):
        schedule.after_validation(loss)
    assert schedule.learning_rate(0) == pytest.approx(3e-4)  # 1.25e-4 is below the floor
    restored = _schedule(scheduler="plateau")
    restored.load_state_dict(schedule.state_dict())
    assert restored.plateau_scale == schedule.plateau_scale and restored.plateau_best == 0.9


def test_loss_masks_nan_labels_and_weights_terms():
    predictions = {"energy": torch.tensor([1.0, 2.0]), "forces": torch.zeros(3, 3)}
    labels = {
        "energy": torch.tensor([0.0, math.nan]),
        "forces": torch.tensor([[1.0, 1.0, 1.0], [math.nan] * 3, [1.0, 1.0, 1.0]]),
        "n_atoms": torch.tensor([1, 2]),
    }
    config = LossConfig(energy_weight=0.5, forces_weight=2.0, energy_per_atom=True)
    loss, parts = compute_loss(predictions, labels, config)
    assert parts == {"energy": 1.0, "forces": 1.0}
    assert float(loss) == pytest.approx(0.5 + 2.0)
    huber = LossConfig(kind="huber", huber_delta=0.1, energy_weight=0.0, forces_weight=1.0)
    _, parts = compute_loss(predictions, labels, huber)
    assert parts["forces"] == pytest.approx(0.1 * (1.0 - 0.05))  # linear branch: δ(|x| − δ/2)
