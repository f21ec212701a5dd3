"""Multi-process training: N ranks take the steps of one process, only rank 0 writes, a failing rank ends
the job, and training from HDF5 streams.

The multi-process runs go through the real launchers (``so3krates train --nproc 2`` and
``python -m torch.distributed.run ... -m so3krates train``) with the gloo backend on the CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from ase.build import molecule

from so3krates.cli.main import main
from so3krates.data.hdf5 import FORMAT_NAME, FORMAT_VERSION, LAYOUT
from so3krates.data.neighbors import neighbor_list
from so3krates.errors import ConfigError
from so3krates.model.checkpoint import load_checkpoint
from so3krates.train.config import load_train_config
from so3krates.train.distributed import Distributed, Placement, backend_for, detect_placement
from so3krates.train.trainer import train

# float64 on both sides; one epoch differs only by the order of floating-point sums (measured ~4e-16).
RTOL = 1e-10


def _quiet(*args, **kwargs):
    pass


def _environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _torchrun(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 ARGS`` (a free port picked by the rendezvous)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_environment())


def _mixed_molecules(path: Path, n: int = 24) -> None:
    """Molecules of 3 to 12 atoms with random labels; every fifth energy is missing (NaN)."""
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    rng = np.random.default_rng(0)
    names = ["H2O", "CH3CH2OH", "C6H6", "CH4", "CH3CONH2"]
    frames = []
    for k in range(n):
        atoms = molecule(names[k % len(names)])
        atoms.rattle(0.05, seed=k)
        energy = float("nan") if k % 5 == 2 else float(-3.0 * len(atoms) + rng.normal())
        forces = rng.normal(scale=0.5, size=(len(atoms), 3))
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
        frames.append(atoms)
    write(path, frames)


def _write_config(path: Path, run_dir: Path, data: Path, **training) -> Path:
    """11 training structures in batches of 5 (on 2 ranks: 2 + 3, 2 + 3, 0 + 1), 4 validation ones in
    batches of 3 (rank 0 validates 3, rank 1 one)."""
    values = {
        "run_dir": str(run_dir),
        "data": {"train_file": str(data), "n_train": 11, "n_valid": 4, "n_test": 3},
        "model": {"preset": "tiny", "n_layers": 1},
        "training": {
            "max_epochs": 1,
            "batch_size": 5,
            "eval_batch_size": 3,
            "learning_rate": 3e-3,
            "grad_clip": 1.0,
            "dtype": "float64",
            "threads": 1,
            "progress": False,
            "distributed_timeout": 60,
            **training,
        },
    }
    path.write_text(yaml.safe_dump(values))
    return path


def _assert_same_weights(a: Path, b: Path) -> float:
    """Model, EMA and optimiser state of two checkpoints agree to RTOL; returns the largest relative gap."""
    first, second = load_checkpoint(a), load_checkpoint(b)
    worst = 0.0
    for part in ("state_dict", "ema"):
        if first.get(part) is None:
            continue
        for key, x in first[part].items():
            y = second[part][key]
            if not x.is_floating_point() or not x.numel():
                assert torch.equal(x, y), key
                continue
            gap = float((x - y).abs().max() / x.abs().max().clamp_min(1e-300))
            worst = max(worst, gap)
            torch.testing.assert_close(x, y, rtol=RTOL, atol=0, msg=f"{a.name} {part}: {key}")
    for name in ("epoch", "step", "step_in_epoch", "skipped_steps"):
        if "progress" in first:
            assert first["progress"][name] == second["progress"][name], name
    return worst


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One epoch of the same training in one process and, through ``so3krates train --nproc 2``, in two."""
    root = tmp_path_factory.mktemp("distributed")
    data = root / "mixed.extxyz"
    _mixed_molecules(data)
    one = _write_config(root / "one.yaml", root / "one", data)
    with pytest.warns(UserWarning, match="masked"):
        train(load_train_config(one), log=_quiet)
    two = _write_config(root / "two.yaml", root / "two", data)
    start = time.perf_counter()
    command = [sys.executable, "-m", "so3krates", "train", str(two), "--nproc", "2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, env=_environment())
    assert done.returncode == 0, done.stdout + done.stderr
    return {"root": root, "data": data, "two": done, "two_s": time.perf_counter() - start}


@pytest.mark.slow
def test_two_processes_take_the_same_steps_as_one(runs):
    root = runs["root"]
    worst = max(
        _assert_same_weights(root / "one" / name, root / "two" / name) for name in ("last.pt", "best.pt")
    )
    print(f"largest relative weight difference, 1 vs 2 processes: {worst:.1e} ({runs['two_s']:.1f} s)")
    one, two = (json.loads((root / run / "results.json").read_text()) for run in ("one", "two"))
    for split in one:
        assert one[split]["n_structures"] == two[split]["n_structures"]
        for key, value in one[split].items():
            assert two[split][key] == pytest.approx(value, rel=1e-10), (split, key)
    one_rows, two_rows = ((root / run / "metrics.csv").read_text().splitlines() for run in ("one", "two"))
    header = one_rows[0].split(",")
    for a, b in zip(one_rows[1:], two_rows[1:], strict=True):
        for key, x, y in zip(header, a.split(","), b.split(","), strict=True):
            if key != "time_s":
                assert float(y) == pytest.approx(float(x), rel=1e-10), key


@pytest.mark.slow
def test_only_rank_0_writes_and_logs(runs):
    root = runs["root"]
    one, two = (sorted(p.name for p in (root / run).iterdir()) for run in ("one", "two"))
    assert one == two  # the same files, and no lock left behind
    assert len(list((root / "two" / "tensorboard").iterdir())) == 1
    out = runs["two"].stdout
    for line in ("data: 11 train, 4 valid, 3 test structures", "finished 1 epochs", "best model"):
        assert out.count(line) == 1, out
    assert "2 processes" in out
    assert len((root / "two" / "metrics.csv").read_text().splitlines()) == 2


@pytest.mark.slow
def test_resume_with_two_processes(runs, tmp_path):
    """torchrun -m so3krates train --resume continues the two-process run as one process would."""
    root = runs["root"]
    shutil.copytree(root / "two", tmp_path / "two")
    config = _write_config(tmp_path / "two.yaml", tmp_path / "two", runs["data"], max_epochs=2)
    done = _torchrun("-m", "so3krates", "train", str(config), "--resume")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("resumed from") == 1
    straight = _write_config(tmp_path / "one.yaml", tmp_path / "one", runs["data"], max_epochs=2)
    with pytest.warns(UserWarning, match="masked"):
        train(load_train_config(straight), log=_quiet)
    _assert_same_weights(tmp_path / "one" / "last.pt", tmp_path / "two" / "last.pt")
    assert len((tmp_path / "two" / "metrics.csv").read_text().splitlines()) == 3


_FAILING_RANK = """
import sys, time
from so3krates.cli.main import main
from so3krates.train.trainer import Trainer

real_step = Trainer._train_step

def step(self, indices):
    if self.distributed.rank == 1 and self.progress.step == 1:
        {action}
    return real_step(self, indices)

Trainer._train_step = step
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_failing_rank_ends_the_job(runs, tmp_path):
    """An exception on rank 1 in its second step, while rank 0 waits for it in an all-reduce: the job ends
    long before the 300 s timeout, naming the rank and the error."""
    script = tmp_path / "fail.py"
    script.write_text(_FAILING_RANK.format(action='raise RuntimeError("injected failure")'))
    config = _write_config(tmp_path / "c.yaml", tmp_path / "run", runs["data"], distributed_timeout=300)
    start = time.perf_counter()
    done = _torchrun(str(script), "train", str(config), timeout=120)
    elapsed = time.perf_counter() - start
    print(f"failing rank: job ended after {elapsed:.1f} s")
    assert done.returncode != 0
    assert "so3krates train: rank 1 of 2 failed: RuntimeError: injected failure" in done.stderr
    assert elapsed < 60


# --- streaming ------------------------------------------------------------------------------------------


def _synthetic_hdf5(path: Path, n_structures: int, cutoff: float = 2.0) -> None:
    """A file in the layout of ``write_hdf5``: eight displaced ethanol molecules per structure (72 atoms,
    ~6.5 kB a structure), the neighbour list of the undisplaced ones, random labels. Written in bulk."""
    base = molecule("CH3CH2OH")
    grid = 4.5 * np.array([[a, b, c] for a in range(2) for b in range(2) for c in range(2)], dtype=float)
    positions = np.concatenate([base.positions + offset for offset in grid])
    numbers = np.tile(base.numbers, len(grid)).astype(np.int8)
    edges = neighbor_list(positions, np.zeros((3, 3)), np.zeros(3, dtype=bool), cutoff)
    n_atoms, n_edges = len(positions), len(edges.idx_i)
    rng = np.random.default_rng(0)
    rows = {
        "atoms/atomic_numbers": np.tile(numbers, n_structures),
        "structures/energy": rng.normal(size=n_structures) - 200.0,
        "structures/cell": np.zeros((n_structures, 3, 3)),
        "structures/pbc": np.zeros((n_structures, 3), dtype=bool),
        "structures/stress": np.full((n_structures, 3, 3), np.nan),
        "structures/atom_offset": n_atoms * np.arange(n_structures),
        "structures/n_atoms": np.full(n_structures, n_atoms),
        "structures/edge_offset": n_edges * np.arange(n_structures),
        "structures/n_edges": np.full(n_structures, n_edges),
        "edges/idx_i": np.tile(edges.idx_i, n_structures),
        "edges/idx_j": np.tile(edges.idx_j, n_structures),
        "edges/shifts": np.zeros((n_structures * n_edges, 3)),
    }
    with h5py.File(path, "w") as file:
        file.attrs.update(format=FORMAT_NAME, format_version=FORMAT_VERSION, cutoff=cutoff)
        file.attrs["n_structures"] = n_structures
        for key, values in rows.items():
            file.create_dataset(key, data=values.astype(LAYOUT[key][0]), chunks=True)
        for key in ("atoms/positions", "atoms/forces"):  # in slices: no second copy of the file in memory
            dataset = file.create_dataset(
                key, shape=(n_structures * n_atoms, 3), dtype=np.float64, chunks=True
            )
            for start in range(0, n_structures, 4096):
                count = min(4096, n_structures - start)
                block = rng.normal(scale=0.05 if key == "atoms/positions" else 1.0, size=(count, n_atoms, 3))
                if key == "atoms/positions":
                    block += positions
                dataset[start * n_atoms : (start + count) * n_atoms] = block.reshape(-1, 3)


# VmHWM, the peak resident memory of this program; not ru_maxrss, which keeps the peak of the process before
# exec, here the forked copy of pytest.
_PEAK_MEMORY = """
import json, re, sys
from pathlib import Path
from so3krates.train.config import load_train_config
from so3krates.train.trainer import train

train(load_train_config(sys.argv[1]), log=lambda *args: None)
peak_kib = int(re.search(r"VmHWM:\\s*(\\d+) kB", Path("/proc/self/status").read_text()).group(1))
print(json.dumps({"peak_bytes": 1024 * peak_kib}))
"""


def _peak_training_memory(tmp_path: Path, data: Path, name: str) -> int:
    config = {
        "run_dir": str(tmp_path / name),
        "data": {"train_file": str(data), "n_train": 100, "n_valid": 10, "n_test": 0},
        "model": {"preset": "tiny", "cutoff": 2.0, "n_layers": 1},
        "training": {"max_epochs": 1, "batch_size": 10, "threads": 1, "progress": False},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    script = tmp_path / "peak.py"
    script.write_text(_PEAK_MEMORY)
    done = subprocess.run(
        [sys.executable, str(script), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=_environment(),
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc to read memory use")
def test_training_streams_a_large_hdf5_file(tmp_path):
    """Training on a 200 MB file peaks at nearly the memory of training on a 30 MB one.

    Both runs read the whole file: the training statistics pass over the 100 training structures, spread
    over the file, reads every block. A dataset, statistics or split held in memory would need about the
    file size (more as tensors); what grows is the per-structure bookkeeping (offsets, 35 B a structure).
    """
    small, large = tmp_path / "small.h5", tmp_path / "large.h5"
    _synthetic_hdf5(small, 4_500)
    _synthetic_hdf5(large, 30_000)
    size = large.stat().st_size
    assert size > 150e6
    baseline = _peak_training_memory(tmp_path, small, "small")
    peak = _peak_training_memory(tmp_path, large, "large")
    print(
        f"peak RSS: {baseline / 1e6:.0f} MB with {small.stat().st_size / 1e6:.0f} MB of data, "
        f"{peak / 1e6:.0f} MB with {size / 1e6:.0f} MB"
    )
    assert peak - baseline < 0.1 * size


# --- pieces ---------------------------------------------------------------------------------------------


def test_placement_from_torchrun_srun_or_nothing():
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "8"}
    assert detect_placement(torchrun) == Placement(3, 4, 1, "torchrun")
    srun = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "MASTER_ADDR": "n1",
        "MASTER_PORT": "1",
    }
    assert detect_placement(srun) == Placement(5, 8, 1, "srun")
    assert detect_placement({}) == Placement()
    # An sbatch script with several tasks runs its own commands once: task 0 trains alone.
    assert detect_placement({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}) == Placement()
    with pytest.raises(ConfigError, match="export MASTER_ADDR and MASTER_PORT"):
        detect_placement({"SLURM_PROCID": "2", "SLURM_NTASKS": "8"})


def test_shards_cover_a_batch_once_and_differ_by_at_most_one():
    for size in range(8):
        for world in (1, 2, 3, 5):
            shards = [Distributed(Placement(rank, world)).shard(list(range(size))) for rank in range(world)]
            assert [i for shard in shards for i in shard] == list(range(size))
            assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_backend_follows_the_device_unless_overridden(monkeypatch):
    monkeypatch.delenv("SO3KRATES_DIST_BACKEND", raising=False)
    assert (backend_for("cpu"), backend_for("cuda"), backend_for("cuda:1")) == ("gloo", "nccl", "nccl")
    monkeypatch.setenv("SO3KRATES_DIST_BACKEND", "gloo")
    assert backend_for("cuda") == "gloo"


def test_nproc_inside_a_job_is_refused(tmp_path, monkeypatch, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{train_file: {tmp_path / 'x.extxyz'}}}\n")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", str(config), "--nproc", "2"]) == 2
    assert "already rank 0 of a torchrun job" in capsys.readouterr().err
