"""Multi-process training: where this process stands in the job, the process group, and the few collectives
the trainer needs.

A job is started by ``torchrun`` (it sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``), by SLURM's ``srun`` (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``; the user
exports ``MASTER_ADDR`` and ``MASTER_PORT``), or by ``so3krates train --nproc N``, which runs torchrun on
this machine. Without any of these the training is one process and nothing here talks to anyone.

Backend: ``nccl`` when the config's device is CUDA (one GPU per rank: ``cuda:LOCAL_RANK``), ``gloo``
otherwise; ``SO3KRATES_DIST_BACKEND`` overrides.

Failures: a rank whose training raises prints its rank and error and exits non-zero; torchrun then stops the
other workers (SIGTERM, SIGKILL 30 s later), and srun does the same with ``--kill-on-bad-exit=1``. A rank
waiting for a dead one fails at once with gloo (the connection closes) and otherwise after
``training.distributed_timeout`` seconds, the limit of every collective.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from so3krates.data.graph import Graph
from so3krates.errors import ConfigError

BACKEND_VARIABLE = "SO3KRATES_DIST_BACKEND"

T = TypeVar("T")


@dataclass(frozen=True)
class Placement:
    """Where this process stands in the job, read from the launcher's environment variables."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # rank on this machine: selects the GPU
    launcher: str = "none"  # "torchrun", "srun" or "none"


def detect_placement(environ: Mapping[str, str] | None = None) -> Placement:
    """The job layout given by torchrun (preferred) or srun; one process when neither started this one.

    Raises:
        ConfigError: srun started several tasks but ``MASTER_ADDR`` / ``MASTER_PORT`` are not exported.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return Placement(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            launcher="torchrun",
        )
    n_tasks = int(env.get("SLURM_NTASKS", 1))
    if "SLURM_PROCID" in env and n_tasks > 1:
        missing = [key for key in ("MASTER_ADDR", "MASTER_PORT") if key not in env]
        if not missing:
            return Placement(
                rank=int(env["SLURM_PROCID"]),
                world_size=n_tasks,
                local_rank=int(env.get("SLURM_LOCALID", 0)),
                launcher="srun",
            )
        # Task 0 of a multi-task allocation is also what a plain command in an sbatch script sees: it trains
        # alone. Any other task can only come from srun, and without an address it cannot join.
        if int(env["SLURM_PROCID"]) > 0:
            raise ConfigError(
                f"srun task {env['SLURM_PROCID']} of {n_tasks}: export {' and '.join(missing)} (the first "
                "node's host name and a free port) for a multi-process training"
            )
    return Placement()


def backend_for(device: str) -> str:
    """``SO3KRATES_DIST_BACKEND`` if set, else ``nccl`` for a CUDA device and ``gloo`` for the CPU."""
    return os.environ.get(BACKEND_VARIABLE) or ("nccl" if str(device).startswith("cuda") else "gloo")


class Distributed:
    """This process's rank in an initialised process group, and the collectives of a training.

    ``world_size == 1`` (``Distributed.single()``) is an ordinary one-process run: every collective returns
    its input.
    """

    def __init__(self, placement: Placement, collective_device: str = "cpu") -> None:
        self.rank = placement.rank
        self.world_size = placement.world_size
        self.local_rank = placement.local_rank
        self.collective_device = torch.device(collective_device)  # where tensors of collectives live

    @classmethod
    def single(cls) -> Distributed:
        return cls(Placement())

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that reads and writes the run directory and logs."""
        return self.rank == 0

    def describe(self) -> str:
        return f"rank {self.rank} of {self.world_size}"

    def device_for(self, device: str) -> str:
        """The device this rank computes on: ``cuda:LOCAL_RANK`` for a CUDA config, else ``device``."""
        if self.enabled and str(device).startswith("cuda"):
            return f"cuda:{self.local_rank}"
        return device

    def shard(self, items: Sequence[T]) -> Sequence[T]:
        """This rank's contiguous slice of ``items``; slice lengths differ by at most one, and a rank gets
        an empty slice when there are fewer items than ranks."""
        n = len(items)
        start, stop = self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size
        return items[start:stop]

    def all_reduce_sum(self, values: Tensor) -> Tensor:
        """Σ over ranks of ``values`` (any float tensor); the result is the same on every rank."""
        if not self.enabled:
            return values
        buffer = values.detach().to(self.collective_device, torch.float64, copy=True)
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
        return buffer.to(values.device)

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on at least one."""
        if not self.enabled:
            return flag
        return bool(self.all_reduce_sum(torch.tensor([float(flag)])).item() > 0)

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` (any picklable object) on every rank."""
        if not self.enabled:
            return value
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self.collective_device)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


class RankFailure(RuntimeError):
    """Another rank failed while this one waited for it; the job stops."""


def peer_failure(error: Exception) -> str | None:
    """One line for an error another rank caused (it failed, and this one lost it or was told); None for an
    error of this rank's own."""
    if isinstance(error, RankFailure):
        return str(error)
    # gloo reports a peer's exit as a plain RuntimeError from its TCP transport.
    if isinstance(error, dist.DistError) or "closed by peer" in str(error) or "reset by peer" in str(error):
        return f"lost contact with the other ranks (one failed or was stopped): {error}"
    return None


def run_on_main(distributed: Distributed, function: Callable[[], T]) -> T:
    """Calls ``function()`` on rank 0 only and gives its result to every rank.

    An exception on rank 0 is raised there and turns into a ``RankFailure`` on the others, so that they
    stop at once instead of waiting in the next collective until the timeout.
    """
    if not distributed.enabled:
        return function()
    result, failure = None, None
    if distributed.is_main:
        try:
            result = function()
        except BaseException as error:
            distributed.broadcast((None, f"{type(error).__name__}: {error}"))
            raise
    result, failure = distributed.broadcast((result, None))
    if failure is not None:
        raise RankFailure(f"rank 0 failed: {failure}")
    return result


@contextlib.contextmanager
def process_group(device: str, timeout_s: float, placement: Placement | None = None) -> Iterator[Distributed]:
    """Joins the job's process group for the duration of a training; a one-process run joins nothing.

    A group initialised by the caller is used as it is and left open.

    Args:
        device: the config's device; it picks the backend (``backend_for``) and each rank's GPU.
        timeout_s: seconds any collective waits for the other ranks before it fails.
        placement: default ``detect_placement()``.
    """
    if dist.is_available() and dist.is_initialized():
        group_placement = Placement(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
            launcher="caller",
        )
        yield Distributed(group_placement, _collective_device(dist.get_backend(), group_placement))
        return
    placement = placement or detect_placement()
    if placement.world_size == 1:
        yield Distributed.single()
        return
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(placement.local_rank)
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=placement.rank,
        world_size=placement.world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    try:
        yield Distributed(placement, _collective_device(backend, placement))
        # Leave together: a rank that tore down its gloo connections while another still used them was
        # aborted at exit ("terminate called without an active exception", seen once under load).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _collective_device(backend: str, placement: Placement) -> str:
    return f"cuda:{placement.local_rank}" if backend == "nccl" else "cpu"


class ShardForceField(nn.Module):
    """The module DistributedDataParallel wraps: the force field on this rank's share of a batch.

    ``zero`` (0 · Σ parameters) joins every loss, so that every parameter has a gradient to all-reduce in
    every step, also a parameter the batch does not reach and every parameter on a rank with no structures
    (``graph`` None) — a rank that skipped the backward pass would leave the others waiting.
    """

    def __init__(self, force_field: nn.Module, compute_stress: bool) -> None:
        super().__init__()
        self.force_field = force_field
        self.compute_stress = compute_stress

    def forward(self, graph: Graph | None) -> dict[str, Tensor]:
        zero = sum(parameter.sum() for parameter in self.force_field.parameters()) * 0.0
        if graph is None:
            return {"zero": zero}
        predictions = self.force_field(
            graph, compute_forces=True, compute_stress=self.compute_stress, create_graph=True
        )
        return {**predictions, "zero": zero}


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Runs ``python -m so3krates ARGV`` in ``nproc`` processes on this machine through torchrun.

    Returns:
        0 when every process succeeded, else the exit status of the first that failed (torchrun stops the
        others as soon as one fails).
    """
    import sys

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(["--standalone", f"--nproc_per_node={nproc}", "-m", "so3krates", *argv])
    try:
        run(args)
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        print(
            f"so3krates: the job failed: rank {rank} of {nproc} was the first to end with an error (exit "
            f"status {failure.exitcode}; its message is above); the other processes were stopped",
            file=sys.stderr,
        )
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0
