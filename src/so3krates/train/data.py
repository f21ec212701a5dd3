"""From a DataConfig to train/valid/test datasets, the saved split, and the training-set statistics.

Files readable by ``read_structures`` are held in memory (``GraphDataset``); HDF5 files prepared with
``so3krates prepare`` are streamed structure by structure (``HDF5Dataset``), for data larger than memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from so3krates.data.dataset import GraphDataset
from so3krates.data.hdf5 import HDF5Dataset, open_hdf5
from so3krates.data.hdf5_statistics import hdf5_statistics
from so3krates.data.io import read_structures
from so3krates.data.split import load_split, save_split, split_indices
from so3krates.data.statistics import DatasetStatistics, compute_statistics, elements
from so3krates.data.structure import Structure
from so3krates.errors import ConfigError, DataError
from so3krates.train.config import DataConfig
from so3krates.units import ENERGY_UNITS

HDF5_SUFFIXES = (".h5", ".hdf5")


def is_hdf5(path: Path) -> bool:
    return Path(path).suffix.lower() in HDF5_SUFFIXES


@dataclass
class PreparedData:
    """The three datasets (GraphDataset or HDF5Dataset), the statistics of the training split, and the split:
    (n_subset,) int64 indices into ``train_file`` per subset."""

    datasets: dict[str, Dataset]
    statistics: DatasetStatistics
    split: dict[str, np.ndarray]


def _read(config: DataConfig, path: Path) -> list[Structure]:
    return read_structures(
        path,
        energy_key=config.energy_key,
        forces_key=config.forces_key,
        stress_key=config.stress_key,
        energy_unit=config.energy_unit,
        length_unit=config.length_unit,
    )


def _whole_file(config: DataConfig, path: Path, cutoff: float, long_range_cutoff: float | None) -> Dataset:
    if is_hdf5(path):
        _no_long_range_hdf5(path, long_range_cutoff)
        return HDF5Dataset(path, cutoff=cutoff)
    return GraphDataset(_read(config, path), cutoff, long_range_cutoff)


def _no_long_range_hdf5(path: Path, long_range_cutoff: float | None) -> None:
    if long_range_cutoff is not None:
        raise ConfigError(
            f"{path}: HDF5 datasets have no long-range edges yet; train models with long-range terms "
            "(SO3LR) from an extxyz/ASE-readable file"
        )


def _split(config: DataConfig, n_structures: int, split_path: Path) -> dict:
    if config.split_file is not None:
        return load_split(config.split_file, n_structures)
    if split_path.is_file():  # a resumed run keeps its split
        return load_split(split_path, n_structures)
    n_valid = 0 if config.valid_file is not None else config.n_valid
    if n_valid is None:
        n_valid = max(1, round(config.valid_fraction * n_structures))
    n_test = 0 if config.test_file is not None else config.n_test
    n_train = config.n_train
    if n_train is None:  # everything that is neither validation nor test is for training
        n_test = n_test or 0
        n_train = n_structures - n_valid - n_test
        if n_train < 1:
            raise ConfigError(
                f"{config.train_file}: {n_structures} structures leave none for training after "
                f"{n_valid} validation and {n_test} test structures"
            )
    return split_indices(
        n_structures, n_train=n_train, n_valid=n_valid, n_test=n_test, seed=config.split_seed
    )


def _dataset_elements(dataset: Dataset) -> set[int]:
    if isinstance(dataset, GraphDataset):
        return set(elements(dataset.structures)) if len(dataset) else set()
    return {int(z) for k in range(len(dataset)) for z in np.unique(dataset.structure(k).atomic_numbers)}


def _check_elements(config: DataConfig, datasets: dict[str, Dataset], trained: set[int]) -> None:
    """Validation and test data with an element the training split lacks are refused: the model has no
    energy shift and no learned embedding for it, and its errors there would be meaningless."""
    for name, source in (("valid", config.valid_file), ("test", config.test_file)):
        unknown = _dataset_elements(datasets[name]) - trained
        if unknown:
            where = source if source is not None else f"{config.train_file} ({name} split)"
            raise ConfigError(
                f"{where}: the {name} data contain elements {sorted(unknown)} that the training split "
                f"({sorted(trained)}) does not; the model cannot describe them"
            )


def _isolated_energies(config: DataConfig) -> dict[int, float] | None:
    if config.isolated_atom_energies is None:
        return None
    factor = ENERGY_UNITS[config.energy_unit]
    return {int(z): e * factor for z, e in config.isolated_atom_energies.items()}


def prepare_data(
    config: DataConfig,
    run_dir: Path,
    cutoff: float,
    log=print,
    *,
    split: dict[str, np.ndarray] | None = None,
    statistics: DatasetStatistics | None = None,
    long_range_cutoff: float | None = None,
) -> PreparedData:
    """Reads (or opens) the data, splits ``train_file`` (indices to ``RUN/split.npz``), computes statistics.

    ``valid_file`` / ``test_file``, when given, are used whole; otherwise validation and test structures are
    drawn from ``train_file`` by a seeded permutation (or the given ``split_file``).

    ``split`` and ``statistics`` given (rank 0's, on the other ranks of a multi-process training): the data
    is only opened; nothing is computed, and nothing is read from or written to ``run_dir``.
    ``long_range_cutoff`` (Å): the graphs also get long-range edges (models with long-range terms).
    """
    split_path = Path(run_dir) / "split.npz"
    known_split = split is not None
    isolated = _isolated_energies(config)
    if is_hdf5(config.train_file):
        _no_long_range_hdf5(config.train_file, long_range_cutoff)
        reader_options = {
            key: getattr(config, key)
            for key in ("energy_key", "forces_key", "stress_key")
            if getattr(config, key) is not None
        }
        reader_options.update(
            {
                k: getattr(config, k)
                for k in ("energy_unit", "length_unit")
                if getattr(config, k) not in ("eV", "Å")
            }
        )
        if reader_options:
            raise ConfigError(
                f"{config.train_file}: an HDF5 file is already in eV and Å with its labels chosen; "
                f"{', '.join('data.' + k for k in reader_options)} apply to `so3krates prepare`, not here"
            )
        with open_hdf5(config.train_file) as file:
            n_structures = int(file.attrs["n_structures"])
        if split is None:
            split = _split(config, n_structures, split_path)
        datasets = {
            name: HDF5Dataset(config.train_file, split[name], cutoff) for name in ("train", "valid", "test")
        }
        if statistics is None:
            statistics = hdf5_statistics(
                config.train_file, split["train"], cutoff, isolated_atom_energies=isolated
            )
    else:
        pool = _read(config, config.train_file)
        if pool and all(np.isnan(s.energy) and s.forces is None for s in pool):
            raise DataError(
                f"{config.train_file}: no structure has an energy or forces label to train on; set "
                "data.energy_key / data.forces_key to the file's keys"
            )
        if split is None:
            split = _split(config, len(pool), split_path)
        datasets = {
            name: GraphDataset([pool[i] for i in split[name]], cutoff, long_range_cutoff)
            for name in ("train", "valid", "test")
        }
        if statistics is None:
            statistics = compute_statistics(
                datasets["train"].structures, cutoff, isolated_atom_energies=isolated
            )
    if config.valid_file is not None:
        datasets["valid"] = _whole_file(config, config.valid_file, cutoff, long_range_cutoff)
    if config.test_file is not None:
        datasets["test"] = _whole_file(config, config.test_file, cutoff, long_range_cutoff)
    if len(datasets["train"]) == 0:
        raise ConfigError(f"{config.train_file}: no training structures left after the split")
    if len(datasets["valid"]) == 0:
        raise ConfigError(
            f"{config.train_file}: no validation structures; set data.n_valid or data.valid_file"
        )
    if not known_split:
        _check_elements(config, datasets, set(statistics.elements))
        save_split(split_path, split)  # only for data that passed every check
    sizes = ", ".join(f"{len(d)} {name}" for name, d in datasets.items())
    log(f"data: {sizes} structures" + (" (streamed from HDF5)" if is_hdf5(config.train_file) else ""))
    return PreparedData(datasets=datasets, statistics=statistics, split=split)
