"""From a DataConfig to train/valid/test structures, the saved split, and the training-set statistics."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from so3krates.data.io import read_structures
from so3krates.data.split import load_split, save_split, split_indices
from so3krates.data.statistics import DatasetStatistics, compute_statistics
from so3krates.data.structure import Structure
from so3krates.errors import ConfigError
from so3krates.train.config import DataConfig
from so3krates.units import ENERGY_UNITS


@dataclass
class Splits:
    train: list[Structure]
    valid: list[Structure]
    test: list[Structure]

    def items(self) -> list[tuple[str, list[Structure]]]:
        return [("train", self.train), ("valid", self.valid), ("test", self.test)]


def _read(config: DataConfig, path: Path) -> list[Structure]:
    return read_structures(
        path,
        energy_key=config.energy_key,
        forces_key=config.forces_key,
        stress_key=config.stress_key,
        energy_unit=config.energy_unit,
        length_unit=config.length_unit,
    )


def load_splits(config: DataConfig, run_dir: Path, log=print) -> Splits:
    """Reads the data files and splits ``train_file``; the indices go to ``RUN/split.npz``.

    ``valid_file`` / ``test_file``, when given, are used whole; otherwise validation and test structures
    are drawn from ``train_file`` by a seeded permutation (or the given ``split_file``).
    """
    pool = _read(config, config.train_file)
    split_path = Path(run_dir) / "split.npz"
    if config.split_file is not None:
        split = load_split(config.split_file, len(pool))
    elif split_path.is_file():  # a resumed run keeps its split
        split = load_split(split_path, len(pool))
    else:
        n_valid = config.n_valid
        if config.valid_file is not None:
            n_valid = 0
        elif n_valid is None:
            n_valid = max(1, round(config.valid_fraction * len(pool)))
        n_test = config.n_test if config.test_file is None else 0
        n_train = config.n_train
        if n_train is None:  # everything that is neither validation nor test is for training
            n_test = n_test or 0
            n_train = len(pool) - n_valid - n_test
            if n_train < 1:
                raise ConfigError(
                    f"{config.train_file}: {len(pool)} structures leave none for training after "
                    f"{n_valid} validation and {n_test} test structures"
                )
        split = split_indices(
            len(pool), n_train=n_train, n_valid=n_valid, n_test=n_test, seed=config.split_seed
        )
    save_split(split_path, split)
    splits = Splits(
        train=[pool[i] for i in split["train"]],
        valid=[pool[i] for i in split["valid"]],
        test=[pool[i] for i in split["test"]],
    )
    if config.valid_file is not None:
        splits.valid = _read(config, config.valid_file)
    if config.test_file is not None:
        splits.test = _read(config, config.test_file)
    if not splits.train:
        raise ConfigError(f"{config.train_file}: no training structures left after the split")
    if not splits.valid:
        raise ConfigError(
            f"{config.train_file}: no validation structures; set data.n_valid or data.valid_file"
        )
    log(f"data: {len(splits.train)} train, {len(splits.valid)} valid, {len(splits.test)} test structures")
    return splits


def training_statistics(config: DataConfig, train: list[Structure], cutoff: float) -> DatasetStatistics:
    """E0s (least squares or the given isolated-atom energies, converted to eV), force RMS and N̄."""
    isolated = None
    if config.isolated_atom_energies is not None:
        factor = ENERGY_UNITS[config.energy_unit]
        isolated = {int(z): e * factor for z, e in config.isolated_atom_energies.items()}
    return compute_statistics(train, cutoff, isolated_atom_energies=isolated)
