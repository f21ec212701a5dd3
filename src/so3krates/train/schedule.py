"""Learning-rate schedule: linear warm-up × (exponential decay or reduce-on-plateau), floored.

Written by hand because torch's schedulers do not compose warm-up with ReduceLROnPlateau, and because a
schedule whose whole state is three numbers makes exact resumption trivial.
"""

from __future__ import annotations

import math

import torch

from so3krates.train.config import TrainingConfig


class LearningRateSchedule:
    """Sets the optimiser's learning rate before every step and reacts to validation losses."""

    def __init__(self, optimizer: torch.optim.Optimizer, config: TrainingConfig) -> None:
        self.optimizer = optimizer
        self.config = config
        self.plateau_scale = 1.0
        self.plateau_best = math.inf
        self.plateau_bad = 0

    def learning_rate(self, step: int) -> float:
        c = self.config
        rate = c.learning_rate
        if c.warmup_steps:
            rate *= min(1.0, (step + 1) / c.warmup_steps)
        if c.scheduler == "exponential":
            rate *= c.decay_rate ** (step / c.decay_steps)
        elif c.scheduler == "plateau":
            rate *= self.plateau_scale
        return max(rate, c.min_learning_rate)

    def before_step(self, step: int) -> float:
        rate = self.learning_rate(step)
        for group in self.optimizer.param_groups:
            group["lr"] = rate
        return rate

    def after_validation(self, valid_loss: float) -> None:
        if self.config.scheduler != "plateau":
            return
        if valid_loss < self.plateau_best:
            self.plateau_best, self.plateau_bad = valid_loss, 0
            return
        self.plateau_bad += 1
        if self.plateau_bad >= self.config.plateau_patience:
            self.plateau_scale *= self.config.plateau_factor
            self.plateau_bad = 0

    def state_dict(self) -> dict[str, float]:
        return {
            "plateau_scale": self.plateau_scale,
            "plateau_best": self.plateau_best,
            "plateau_bad": self.plateau_bad,
        }

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.plateau_scale = float(state["plateau_scale"])
        self.plateau_best = float(state["plateau_best"])
        self.plateau_bad = int(state["plateau_bad"])
