"""The training configuration: one YAML file with ``data``, ``model`` and ``training`` sections.

Unknown keys and wrong types are refused with one line naming the key (``training.learning_rate``);
``--set section.key=value`` overrides any entry; the resolved config is saved in the run directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from so3krates.errors import ConfigError, format_validation_error
from so3krates.model.config import PRESETS, ModelConfig
from so3krates.units import ENERGY_UNITS, LENGTH_UNITS


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class DataConfig(_Section):
    """Where the data is, how to read it, and how to split it."""

    train_file: Path = Field(description="training data: extxyz/ASE-readable, npz (sGDML, rMD17), ASE .db")
    valid_file: Path | None = Field(None, description="validation data; default: split from train_file")
    test_file: Path | None = Field(None, description="test data; default: the rest of train_file")
    energy_key: str | None = Field(None, description="energy key; default: the format's usual key")
    forces_key: str | None = Field(None, description="forces key; default: the format's usual key")
    stress_key: str | None = Field(None, description="stress key; default: 'stress' where present")
    energy_unit: str = Field("eV", description=f"one of {sorted(ENERGY_UNITS)}")
    length_unit: str = Field("Å", description=f"one of {sorted(LENGTH_UNITS)}")
    n_train: int | None = Field(None, ge=1, description="training structures taken from train_file")
    n_valid: int | None = Field(None, ge=1, description="validation structures taken from train_file")
    n_test: int | None = Field(None, ge=0, description="test structures from train_file (default: rest)")
    valid_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="used when n_valid is not given")
    split_seed: int = 0
    split_file: Path | None = Field(None, description="npz with train/valid/test indices into train_file")
    isolated_atom_energies: dict[int, float] | None = Field(
        None, description="E0 per atomic number in energy_unit; default: least squares on element counts"
    )

    @field_validator("energy_unit")
    @classmethod
    def _known_energy_unit(cls, unit: str) -> str:
        if unit not in ENERGY_UNITS:
            raise ValueError(f"unknown energy unit {unit!r}; choose one of {sorted(ENERGY_UNITS)}")
        return unit

    @field_validator("length_unit")
    @classmethod
    def _known_length_unit(cls, unit: str) -> str:
        if unit not in LENGTH_UNITS:
            raise ValueError(f"unknown length unit {unit!r}; choose one of {sorted(LENGTH_UNITS)}")
        return unit


class LossConfig(_Section):
    """λ_E · L(E) + λ_F · L(F) + λ_S · L(σ); defaults are those of the reference code (SPEC §2)."""

    energy_weight: float = Field(0.01, ge=0.0)
    forces_weight: float = Field(0.99, ge=0.0)
    stress_weight: float = Field(0.0, ge=0.0)
    energy_per_atom: bool = Field(True, description="compare E / n_atoms instead of E")
    kind: Literal["mse", "huber"] = "mse"
    huber_delta: float = Field(0.01, gt=0.0, description="eV (per atom), eV/Å or eV/Å³")


class TrainingConfig(_Section):
    """Optimiser, schedule, averaging, stopping and bookkeeping."""

    optimizer: Literal["adam", "adamw"] = "adam"
    amsgrad: bool = False
    learning_rate: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    batch_size: int = Field(5, ge=1)
    eval_batch_size: int = Field(32, ge=1)
    max_epochs: int = Field(1000, ge=1)
    max_time: float | None = Field(None, gt=0.0, description="wall-clock budget in seconds")
    warmup_steps: int = Field(0, ge=0, description="linear learning-rate warm-up")
    scheduler: Literal["exponential", "plateau", "none"] = "exponential"
    decay_rate: float = Field(0.1, gt=0.0, le=1.0, description="exponential: factor per decay_steps")
    decay_steps: int = Field(100_000, ge=1, description="exponential: steps for one decay_rate factor")
    plateau_factor: float = Field(0.5, gt=0.0, lt=1.0)
    plateau_patience: int = Field(10, ge=1, description="validations without improvement")
    min_learning_rate: float = Field(1e-6, ge=0.0)
    ema_decay: float | None = Field(0.99, ge=0.0, lt=1.0, description="EMA of weights; null turns it off")
    grad_clip: float | None = Field(10.0, gt=0.0, description="max gradient norm; null turns it off")
    max_nonfinite_steps: int = Field(
        10,
        ge=1,
        description="a step with a non-finite loss or gradient is skipped (weights untouched); this many "
        "in a row stop the training",
    )
    early_stopping_patience: int | None = Field(None, ge=1, description="validations without improvement")
    valid_every: int = Field(1, ge=1, description="validate every N epochs")
    seed: int = 0
    init_from: str | None = Field(
        None,
        description="start from trained weights: 'so3lr' (the published SO3LR) or a checkpoint (RUN/best.pt, "
        "a warm start); the model section must then stay empty, and the per-element energy shift is refitted "
        "to the training data",
    )
    freeze: list[str] = Field(
        default_factory=list,
        description="parameters kept fixed, by name or name prefix, e.g. [embedding, layers.0, layers.1]",
    )
    dtype: Literal["float32", "float64"] = "float32"
    device: str = "cpu"
    threads: int | None = Field(None, ge=1, description="torch threads; default: torch's choice")
    progress: bool = Field(True, description="show a progress bar per epoch")
    distributed_timeout: float = Field(
        1800.0,
        gt=0.0,
        description="multi-process training: seconds a rank waits for the others (in a step, or while rank 0 "
        "prepares the data) before the job fails",
    )


class TrainConfig(_Section):
    """The whole run: data, model (a preset plus overrides), loss, training, and the run directory."""

    run_dir: Path = Path("runs/so3krates")
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)

    @model_validator(mode="before")
    @classmethod
    def _resolve_model_preset(cls, values: Any) -> Any:
        """``model: {preset: paper, cutoff: 4.5}`` → the preset's fields with the overrides applied."""
        if isinstance(values, dict) and isinstance(values.get("model"), dict):
            section = dict(values["model"])
            name = section.pop("preset", "paper")
            if name not in PRESETS:
                raise ValueError(f"model.preset: unknown preset {name!r}; choose one of {sorted(PRESETS)}")
            values = {**values, "model": {**PRESETS[name], **section}}
        return values


def _set_nested(values: dict[str, Any], dotted_key: str, value: Any) -> None:
    keys = dotted_key.split(".")
    node = values
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted_key}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def read_config_values(
    path: str | Path | None, overrides: dict[str, Any] | None, expected: str
) -> tuple[dict[str, Any], str]:
    """The mapping of a YAML config file with ``--set`` overrides applied, and its name for messages.

    ``expected`` names the sections a mapping should have, for the message about a file that is not one.
    """
    values: dict[str, Any] = {}
    source = str(path) if path is not None else "--set"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as error:
            raise ConfigError(
                f"{path}: not UTF-8 text (byte {error.start}); a YAML config is expected"
            ) from None
        except yaml.YAMLError as error:
            first = str(error).replace("\n", " ")
            raise ConfigError(f"{path}: not valid YAML ({first})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping with {expected}")
    for key, value in (overrides or {}).items():
        _set_nested(values, key, value)
    return values, source


def load_train_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Reads a YAML config (or none, if everything comes from ``overrides``) and validates it.

    Relative paths (data files, run_dir) are relative to the working directory, as on the command line.

    Args:
        path: YAML file with ``data``, ``model``, ``loss``, ``training`` and ``run_dir``.
        overrides: ``{"training.learning_rate": 1e-4, ...}`` applied on top.
    """
    values, source = read_config_values(path, overrides, "data/model/loss/training sections")
    try:
        config = TrainConfig.model_validate(values)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, source)) from None
    return config


#: What a resumed run may change: its budget, the learning-rate schedule (stateless but for the plateau
#: counters, which carry over), how it runs, and where its files are (a project that moved: the run keeps
#: its own split.npz). Every other key describes what the run is — data selection and split, model, loss,
#: optimiser, batches, precision, seeds — and the restored state depends on it.
RESUMABLE_KEYS = frozenset(
    ["run_dir", "data.train_file", "data.valid_file", "data.test_file", "data.split_file"]
) | frozenset(
    "training." + key
    for key in (
        "max_epochs",
        "max_time",
        "early_stopping_patience",
        "max_nonfinite_steps",
        "learning_rate",
        "warmup_steps",
        "scheduler",
        "decay_rate",
        "decay_steps",
        "plateau_factor",
        "plateau_patience",
        "min_learning_rate",
        "grad_clip",
        "valid_every",
        "eval_batch_size",
        "threads",
        "progress",
        "device",
        "distributed_timeout",
    )
)


def _flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(values, dict):
        return {prefix: values}
    flat: dict[str, Any] = {}
    for key, value in values.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def config_changes(saved: TrainConfig, new: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """Dotted key → (saved value, new value) for every key that differs.

    ``model.avg_num_neighbors`` counts only when the new config sets it: otherwise training takes it from
    the data, as the saved run did. With ``training.init_from`` the model section counts only when set.
    """
    old, current = _flatten(saved.model_dump(mode="json")), _flatten(new.model_dump(mode="json"))
    if "avg_num_neighbors" not in new.model.model_fields_set:
        current["model.avg_num_neighbors"] = old.get("model.avg_num_neighbors")
    if new.training.init_from is not None and not new.model.model_fields_set:
        # The model of a run started from pretrained weights comes from them, not from the config file.
        current.update({key: value for key, value in old.items() if key.startswith("model.")})
    keys = sorted(set(old) | set(current))
    return {key: (old.get(key), current.get(key)) for key in keys if old.get(key) != current.get(key)}


def check_resume(saved: TrainConfig, new: TrainConfig, source: str) -> dict[str, tuple[Any, Any]]:
    """The changes a resumed run may apply; raises ConfigError naming those it may not (``source``: the
    saved config's path)."""
    changes = config_changes(saved, new)
    refused = {key: change for key, change in changes.items() if key not in RESUMABLE_KEYS}
    if refused:
        listed = "; ".join(f"{key}: {old!r} → {value!r}" for key, (old, value) in refused.items())
        raise ConfigError(
            f"--resume cannot change what the run is ({listed}); undo the change (the run's config is "
            f"{source}) or start a new run_dir. A resume may change the budget, the learning-rate schedule, "
            "threads, device and file locations"
        )
    return changes


def dump_config(config: TrainConfig) -> str:
    """The resolved config as YAML (every default written out)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
