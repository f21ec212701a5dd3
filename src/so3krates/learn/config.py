"""The ``so3krates learn`` configuration: start structures, reference, committee, exploration, budget.

Unknown keys and wrong types are refused with one line naming the key; relative paths are relative to the
working directory. Lengths in Å, times in ps (MD length) and fs (timestep), temperatures in K, forces in
eV/Å, budgets in reference calls and minutes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from so3krates.errors import ConfigError, format_validation_error
from so3krates.train.config import read_config_values


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ReferenceConfig(_Section):
    """The reference method that labels frames, called in a pool of worker processes."""

    calculator: str = Field(
        "xtb",
        description="'xtb' (GFN2-xTB through tblite: pip install 'so3krates[xtb]') or any ASE calculator as "
        "'module:Class', e.g. 'ase.calculators.emt:EMT'",
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments of the calculator (xtb: method, accuracy, …)"
    )
    workers: int = Field(2, ge=1, description="worker processes calling the reference")
    threads: int = Field(1, ge=1, description="OpenMP threads of each worker")

    @field_validator("calculator")
    @classmethod
    def _known(cls, value: str) -> str:
        if value != "xtb" and (":" not in value or not all(value.split(":", 1))):
            raise ValueError(f"{value!r}: give 'xtb' or an ASE calculator as 'module:Class'")
        return value


class InitialConfig(_Section):
    """The first labelled frames, before any model exists.

    ``so3lr``: MD at the first temperature with the pretrained SO3LR (no reference calls), frames chosen
    by farthest-point sampling, then labelled. Thermal structures near the start at no reference cost; the
    reference relabels them, so SO3LR's own level of theory does not enter the data. ``reference-md``: MD
    with the reference itself (every step is a reference call and counts against the budget).
    ``auto``: ``so3lr`` where it is installed and knows every element, else ``reference-md``.
    """

    method: Literal["auto", "so3lr", "reference-md"] = "auto"
    n_frames: int = Field(
        32, ge=2, description="labelled frames to start from (the start structures included)"
    )
    md_time_ps: float = Field(2.0, gt=0.0, description="ps of SO3LR MD to choose the frames from")
    reference_md_steps: int = Field(
        200, ge=1, description="reference-md: steps (= reference calls) from which n_frames are taken"
    )


class CommitteeConfig(_Section):
    """The committee trained in every iteration: K members, different seeds and bootstrap draws of the data,
    warm-started from the last."""

    size: int = Field(4, ge=2, description="members K")
    model: dict[str, Any] = Field(
        default_factory=lambda: {"preset": "paper"},
        description="model section of the first iteration (a preset plus overrides, as in so3krates train)",
    )
    training: dict[str, Any] = Field(
        default_factory=dict,
        description="training-section overrides (learning_rate, batch_size, …) of every member",
    )
    loss: dict[str, Any] = Field(default_factory=dict, description="loss-section overrides")
    steps: int = Field(
        1500, ge=1, description="optimizer steps per member and iteration (epochs = steps × batch / frames)"
    )
    first_steps: int | None = Field(
        None, ge=1, description="optimizer steps of the first iteration (from scratch); default: 2 × steps"
    )
    warm_start: bool = Field(True, description="start each member from its previous weights")
    resample: Literal["bootstrap", "none"] = Field(
        "bootstrap",
        description="bootstrap: every member trains on its own draw with replacement of the training frames "
        "and validates on the frames its draw left out (more diverse members); none: all members train on "
        "the same frames, each with its own 10 % validation split",
    )
    parallel: int = Field(2, ge=1, description="members trained at the same time (one process each)")
    threads: int = Field(1, ge=1, description="torch threads per member")
    dtype: Literal["float32", "float64"] = "float32"
    holdout_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="labelled frames kept out of training: test error and calibration"
    )


class ExplorationConfig(_Section):
    """Committee MD that finds where the committee disagrees: Langevin replicas from the start structures."""

    temperatures_K: list[float] = Field(default_factory=lambda: [500.0], min_length=1)
    replicas: int = Field(4, ge=1, description="replicas per temperature (and start structure)")
    time_ps: float = Field(
        20.0, gt=0.0, description="ps each replica must stay stable and certain for the loop to end"
    )
    first_time_ps: float = Field(
        1.0, gt=0.0, description="ps of the first iteration's replicas, doubled every iteration up to time_ps"
    )
    timestep_fs: float = Field(0.5, gt=0.0)
    friction_per_fs: float = Field(0.01, gt=0.0)
    trajectory_every: int = Field(10, ge=1, description="steps between frames (candidates)")
    dtype: Literal["float32", "float64"] = "float32"
    parallel: int = Field(2, ge=1, description="replicas run at the same time (one process each)")
    threads: int = Field(1, ge=1)
    stop_factor: float | None = Field(
        None,
        ge=1.0,
        description="a replica stops where the uncertainty exceeds stop_factor × threshold; default: only "
        "a broken structure (the stability monitor) stops it; every frame above the threshold is a candidate",
    )


class SelectionConfig(_Section):
    """Which frames get labelled: those the committee is unsure about, spread out."""

    max_force_error: float = Field(
        1.0,
        gt=0.0,
        description="eV/Å — the largest atomic force error tolerated in a frame. The committee's spread is "
        "calibrated into an error estimate on the held-out labelled frames in every iteration; frames whose "
        "estimate exceeds this are candidates",
    )
    labels_per_iteration: int = Field(48, ge=1, description="frames labelled per iteration (at most)")


class BudgetConfig(_Section):
    max_labels: int = Field(400, ge=2, description="reference calls in all, failed ones included")
    max_time_min: float | None = Field(
        None, gt=0.0, description="wall-clock minutes (checked between stages)"
    )
    max_iterations: int = Field(20, ge=1)


class LearnConfig(_Section):
    """One active-learning run."""

    work_dir: Path = Path("runs/learn")
    structures: list[Path] = Field(min_length=1, description="start structures (frame 0 of each file)")
    seed: int = Field(0, ge=0)
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig)
    initial: InitialConfig = Field(default_factory=InitialConfig)
    committee: CommitteeConfig = Field(default_factory=CommitteeConfig)
    exploration: ExplorationConfig = Field(default_factory=ExplorationConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    progress: bool = Field(True, description="progress bars (only on a terminal)")


def load_learn_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> LearnConfig:
    """Reads and validates a learn YAML file (``overrides``: ``{"budget.max_labels": 100}``)."""
    values, source = read_config_values(path, overrides, "work_dir, structures, reference, committee, …")
    try:
        return LearnConfig.model_validate(values)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, source)) from None
