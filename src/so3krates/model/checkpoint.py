"""Checkpoints are data: schema version, package version, model config (JSON), state dict and metadata.

They load with ``torch.load(..., weights_only=True)`` (no pickled code), and older schema versions are
upgraded by explicit functions in ``_UPGRADES`` so that old models keep working.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from so3krates import __version__
from so3krates.errors import DataError, format_validation_error
from so3krates.files import atomic_path
from so3krates.model.config import ModelConfig
from so3krates.model.so3krates import So3krates
from so3krates.model.so3lr import build_model

SCHEMA_VERSION = 1

#: Names that ``load_model`` (and with it the calculator and every command's ``--model``) reads as the
#: pretrained model of :mod:`so3krates.pretrained`, unless a file of that name exists.
PRETRAINED = ("so3lr",)

#: schema version → function that turns a payload of that version into one of the next version.
_UPGRADES: dict[int, Any] = {}


def model_metadata(model: So3krates, species: list[int]) -> dict[str, Any]:
    """What a user of the artefact needs to know without the training code."""
    return {
        "cutoff": model.config.cutoff,
        "species": sorted(int(z) for z in species),
        "units": {"length": "Å", "energy": "eV", "forces": "eV/Å", "stress": "eV/Å³"},
        "so3krates_version": __version__,
    }


def save_checkpoint(path: str | os.PathLike, model: So3krates, species: list[int], **extra: Any) -> None:
    """Writes the model (and any ``extra`` entries, e.g. training state) atomically to ``path``.

    Args:
        path: destination, conventionally ``RUN/best.pt`` or ``RUN/last.pt``.
        model: the model whose weights are saved (EMA weights for ``best.pt``).
        species: atomic numbers the model was trained on; others are refused at inference.
        extra: further entries made of tensors, numbers, strings, lists and dicts only.
    """
    payload = {
        "schema_version": SCHEMA_VERSION,
        "model_config": model.config.model_dump(mode="json"),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "metadata": model_metadata(model, species),
        **extra,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a checkpoint safely (``weights_only=True``) and upgrades it to the current schema."""
    path = Path(path)
    if path.is_dir():  # a run directory: its best checkpoint
        if not (path / "best.pt").is_file():
            raise DataError(f"{path} is a folder without best.pt; give the checkpoint file, e.g. RUN/best.pt")
        path = path / "best.pt"
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or foreign files
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "weights_only" in message or "Weights only" in message:
            # Never repeat torch's advice to load with weights_only=False: that runs code from the file.
            message = "not a file of tensors and plain data written by torch.save, as checkpoints are"
        raise DataError(f"{path}: not a readable so3krates checkpoint ({message})") from None
    if not isinstance(payload, dict) or "schema_version" not in payload:
        raise DataError(f"{path}: not a so3krates checkpoint (no schema_version)")
    version = payload["schema_version"]
    while version < SCHEMA_VERSION:
        payload = _UPGRADES[version](payload)
        version = payload["schema_version"]
    if version > SCHEMA_VERSION:
        raise DataError(
            f"{path}: checkpoint schema {version} is newer than this so3krates ({__version__}, schema "
            f"{SCHEMA_VERSION}); upgrade the package"
        )
    return payload


def model_from_checkpoint(payload: dict[str, Any], source: str = "checkpoint") -> So3krates:
    """Builds the model described by a loaded checkpoint and loads its weights.

    A payload without a config or weights, a config that does not validate, or weights that do not fit
    the config are refused with one :class:`DataError` line naming ``source``.
    """
    missing = [key for key in ("model_config", "state_dict") if key not in payload]
    if missing:
        raise DataError(f"{source}: not a model checkpoint (no {' and no '.join(missing)})")
    try:
        config = ModelConfig.model_validate(payload["model_config"])
    except ValidationError as error:
        raise DataError(format_validation_error(error, f"{source}: model_config")) from None
    model = build_model(config)
    try:
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, TypeError, AttributeError) as error:
        first = str(error).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:2]) if first else type(error).__name__
        raise DataError(f"{source}: the weights do not fit the model config ({detail})") from None
    return model


def load_model(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64
) -> tuple[So3krates, dict[str, Any]]:
    """The model of a checkpoint file (or of a pretrained model's name: ``"so3lr"``) for inference, and its
    metadata.

    The model is in eval mode on ``device`` and ``dtype`` with its parameters frozen (``requires_grad``
    off): forces still flow to the positions. ``path`` may also be a run directory (its ``best.pt``).
    """
    if str(path) in PRETRAINED and not Path(path).exists():
        from so3krates.pretrained import so3lr
        from so3krates.pretrained.so3lr import SO3LR_SPECIES

        model = so3lr(device=device, dtype=dtype)
        return model, model_metadata(model, SO3LR_SPECIES)
    payload = load_checkpoint(path)
    model = model_from_checkpoint(payload, str(path)).to(device=device, dtype=dtype)
    return model.eval().requires_grad_(False), payload.get("metadata", {})
