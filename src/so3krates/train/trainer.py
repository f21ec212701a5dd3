"""The training loop: data → model with dataset statistics → optimiser steps → validation → checkpoints.

Exact resumption: the batch order of epoch e is a permutation seeded by (seed, e), and ``last.pt`` holds the
model, EMA, optimiser and schedule state plus the position inside the epoch, so a resumed run on CPU
produces the same numbers as an uninterrupted one.

Several processes (``torchrun``, ``srun``, ``so3krates train --nproc``; see ``train/distributed.py``) split
every batch: each rank computes the same epoch order, takes its slice of each batch of ``batch_size``
structures, and weights its loss so that DistributedDataParallel's average of the ranks' gradients is the
gradient of the whole batch's loss. A run on N processes therefore takes the same steps as one process, up
to rounding. Only rank 0 reads and writes the run directory and logs.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from ase.data import chemical_symbols
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from so3krates.checks import check_device, check_output_dir
from so3krates.data.dataset import batches, collate_batch
from so3krates.data.statistics import energy_shifts
from so3krates.errors import ConfigError, TrainingError
from so3krates.files import atomic_path, write_json
from so3krates.interrupt import stop_requests
from so3krates.memory import keep_freed_memory
from so3krates.model.checkpoint import load_checkpoint, load_model, save_checkpoint
from so3krates.model.so3krates import So3krates, count_parameters
from so3krates.model.so3lr import build_model
from so3krates.runtime.force_field import ForceField
from so3krates.train.config import TrainConfig, check_resume, dump_config, load_train_config
from so3krates.train.data import prepare_data
from so3krates.train.distributed import Distributed, ShardForceField, process_group, run_on_main
from so3krates.train.evaluation import evaluate_dataset
from so3krates.train.history import History
from so3krates.train.loss import compute_loss, loss_terms, loss_weights
from so3krates.train.metrics import format_table
from so3krates.train.runlock import RunLock
from so3krates.train.schedule import LearningRateSchedule


@dataclass
class Progress:
    """Where the run stands; saved in ``last.pt``."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps done
    step_in_epoch: int = 0  # batches of the current epoch already done
    best_valid_loss: float = math.inf
    stale_validations: int = 0  # for early stopping
    elapsed: float = 0.0  # seconds of training, all processes together, at the last save
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient
    consecutive_nonfinite: int = 0  # of those, in a row up to now


def _device_batch(graph, labels, device):
    return graph.to(device=device), {k: v.to(device) for k, v in labels.items()}


def _quiet(*args: object, **kwargs: object) -> None:
    pass


class Trainer:
    """Builds everything a run needs from a TrainConfig and runs it; ``run()`` returns the final metrics.

    ``distributed``: this process's rank in a multi-process run (default: a one-process run).
    """

    def __init__(
        self, config: TrainConfig, resume: bool = False, log=print, distributed: Distributed | None = None
    ) -> None:
        self.config = config
        self.run_dir = Path(config.run_dir)
        self.resume = resume
        self.distributed = distributed or Distributed.single()
        self.log = log if self.distributed.is_main else _quiet
        self.device = self.distributed.device_for(config.training.device)
        self.dtype = getattr(torch, config.training.dtype)
        self._stop_reason: str | None = None
        self._stop_request: str | None = None  # multi-process: a stop not yet agreed by all ranks

    # --- set-up ------------------------------------------------------------------------------------------

    def _check_run_dir(self) -> None:
        last = self.run_dir / "last.pt"
        if self.resume and not last.is_file():
            raise ConfigError(f"{self.run_dir}: nothing to resume (no last.pt)")
        if not self.resume and last.is_file():
            raise ConfigError(
                f"{self.run_dir}: holds a training already; continue it with --resume or pick another run_dir"
            )
        saved_path = self.run_dir / "config.yaml"
        if self.resume and saved_path.is_file():
            changes = check_resume(load_train_config(saved_path), self.config, str(saved_path))
            for key, (old, new) in changes.items():
                self.log(f"resume: {key} {old!r} → {new!r}")

    def _build(self) -> None:
        c = self.config
        if c.training.threads:
            torch.set_num_threads(c.training.threads)
        torch.manual_seed(c.training.seed)
        pretrained = self._pretrained()
        model_config = pretrained.config if pretrained is not None else c.model
        prepared = self._prepare_data(model_config)
        self.datasets = prepared.datasets
        stats = self.statistics = prepared.statistics
        if pretrained is not None:
            self.model = pretrained.to(device=self.device, dtype=self.dtype)
        else:
            if "avg_num_neighbors" not in c.model.model_fields_set:
                model_config = model_config.model_copy(update={"avg_num_neighbors": stats.avg_num_neighbors})
            self.model = build_model(model_config)
            self.model.readout.set_statistics(stats.energy_shifts, stats.force_rms)
            self.model.to(device=self.device, dtype=self.dtype)
        self.model_config = model_config
        self._freeze()
        self.species = list(stats.elements)
        self.force_field = ForceField(self.model)
        if pretrained is not None:
            self._refit_energy_shift()
        t = c.training
        optimizer_class = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = optimizer_class(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=t.learning_rate,
            weight_decay=t.weight_decay,
            amsgrad=t.amsgrad,
        )
        self.schedule = LearningRateSchedule(self.optimizer, t)
        self.ema = None
        if t.ema_decay is not None:
            # Buffers (radial constants, per-element statistics) are fixed before this copy: no averaging.
            self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(t.ema_decay))
        self.compute_stress = c.loss.stress_weight > 0
        self.progress = Progress()
        self._started = time.perf_counter()
        n_parameters = count_parameters(self.model)["total"]
        d = self.distributed
        self.log(
            f"model: {n_parameters:,d} parameters, cutoff {model_config.cutoff} Å, "
            f"N̄ = {model_config.avg_num_neighbors:.2f}, force RMS {stats.force_rms:.4f} eV/Å, "
            f"{t.dtype} on {self.device}" + (f", {d.world_size} processes" if d.enabled else "")
        )
        self.shard_model = None
        if d.enabled:
            from torch.nn.parallel import DistributedDataParallel

            # The readout's (1, n) weight gets gradients with strides (1, 1) instead of (n, 1): the same
            # layout for a dimension of size 1, which DDP's stride check still reports.
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
            self.shard_model = DistributedDataParallel(
                ShardForceField(self.force_field, self.compute_stress),
                device_ids=[torch.device(self.device).index] if self.device.startswith("cuda") else None,
                gradient_as_bucket_view=True,
            )

    def _pretrained(self) -> So3krates | None:
        """The pretrained model that ``training.init_from`` names, trainable; None without one."""
        c = self.config
        if c.training.init_from is None:
            return None
        if c.model.model_fields_set:
            raise ConfigError(
                f"training.init_from: {c.training.init_from} takes the model from the pretrained weights; "
                f"remove the model section (it sets {', '.join(sorted(c.model.model_fields_set))})"
            )
        if c.training.init_from == "so3lr":
            from so3krates.pretrained import so3lr

            model = so3lr(dtype=self.dtype)
            self.log(f"init_from: {c.training.init_from} (pretrained weights)")
            return model.train().requires_grad_(True)
        path = Path(c.training.init_from)
        if not path.is_file():
            raise ConfigError(
                f"training.init_from: {path}: no such checkpoint (give 'so3lr' or a checkpoint such as "
                "RUN/best.pt)"
            )
        model, _ = load_model(path, dtype=self.dtype)
        self.log(f"init_from: {path} (warm start)")
        return model.train().requires_grad_(True)

    def _refit_energy_shift(self) -> None:
        """Adds to the pretrained per-element shift μ_Z the least-squares fit of the training energies'
        residuals on element counts: the pretrained model's energies refer to its own level of theory and
        reference energies, the data's to theirs; a per-element offset absorbs most of the difference."""
        if self.resume:
            return  # the shift is in the checkpoint that the run resumes from
        train = self.datasets["train"]
        residual = []
        with torch.no_grad():
            for indices in batches(train, self.config.training.eval_batch_size):
                graph, labels = collate_batch([train[k] for k in indices])
                graph, labels = _device_batch(graph, labels, self.device)
                predicted = self.force_field(graph, compute_forces=False)["energy"].double().cpu().numpy()
                residual += list(labels["energy"].double().cpu().numpy() - predicted)
        structures = train.structures  # a GraphDataset: models with long-range terms refuse HDF5 data
        shifts = energy_shifts(
            [replace(s, energy=float(r)) for s, r in zip(structures, residual, strict=True)]
        )
        with torch.no_grad():
            for z, value in shifts.items():
                self.model.readout.energy_shift[int(z)] += value
        before = np.sqrt(np.nanmean(np.square(residual)))
        self.log(
            f"energy shift refitted on {len(residual)} training structures (energy RMSE of the pretrained "
            f"model {before:.3f} eV before the refit): "
            + ", ".join(f"{chemical_symbols[z]} {v:+.4f} eV" for z, v in sorted(shifts.items()))
        )

    def _freeze(self) -> None:
        prefixes = self.config.training.freeze
        if not prefixes:
            return
        names = [name for name, _ in self.model.named_parameters()]
        for prefix in prefixes:
            if not any(name == prefix or name.startswith(prefix + ".") for name in names):
                tops = sorted({name.split(".")[0] for name in names})
                raise ConfigError(
                    f"training.freeze: no parameter is named {prefix!r} or starts with '{prefix}.'; the "
                    f"model's parts are {', '.join(tops)} (and layers.0, layers.1, …)"
                )
        frozen = 0
        for name, parameter in self.model.named_parameters():
            if any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes):
                parameter.requires_grad_(False)
                frozen += parameter.numel()
        self.log(f"freeze: {frozen:,d} parameters kept fixed ({', '.join(prefixes)})")

    def _prepare_data(self, model_config):
        """``prepare_data`` on rank 0 (the only one writing the split); the others open the same data with
        rank 0's split and statistics."""
        c = self.config
        cutoff = model_config.cutoff
        long_range = model_config.long_range_cutoff if model_config.long_range else None
        if not self.distributed.enabled:
            return prepare_data(c.data, self.run_dir, cutoff, log=self.log, long_range_cutoff=long_range)
        prepared = None

        def on_main():
            nonlocal prepared
            prepared = prepare_data(c.data, self.run_dir, cutoff, log=self.log, long_range_cutoff=long_range)
            return prepared.split, prepared.statistics

        split, statistics = run_on_main(self.distributed, on_main)
        if prepared is None:
            prepared = prepare_data(
                c.data,
                self.run_dir,
                cutoff,
                log=self.log,
                split=split,
                statistics=statistics,
                long_range_cutoff=long_range,
            )
        return prepared

    def _evaluation_model(self) -> So3krates:
        return self.ema.module if self.ema is not None else self.model

    # --- checkpoints -------------------------------------------------------------------------------------

    def _save_last(self) -> None:
        if not self.distributed.is_main:
            return
        p = self.progress
        save_checkpoint(
            self.run_dir / "last.pt",
            self.model,
            self.species,
            optimizer=self.optimizer.state_dict(),
            schedule=self.schedule.state_dict(),
            ema=self.ema.state_dict() if self.ema is not None else None,
            progress={**asdict(p), "elapsed": self._elapsed()},
            rng=torch.get_rng_state(),
            statistics=self.statistics.model_dump(mode="json"),
        )

    def _save_best(self) -> None:
        if not self.distributed.is_main:
            return
        save_checkpoint(
            self.run_dir / "best.pt",
            self._evaluation_model(),
            self.species,
            statistics=self.statistics.model_dump(mode="json"),
            epoch=self.progress.epoch,
            valid_loss=self.progress.best_valid_loss,
        )

    def _restore(self) -> None:
        payload = run_on_main(self.distributed, lambda: load_checkpoint(self.run_dir / "last.pt"))
        self.model.load_state_dict(payload["state_dict"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.schedule.load_state_dict(payload["schedule"])
        if self.ema is not None and payload.get("ema") is not None:
            self.ema.load_state_dict(payload["ema"])
        for key, value in payload["progress"].items():
            setattr(self.progress, key, value)
        torch.set_rng_state(payload["rng"])
        self._started = time.perf_counter()
        p = self.progress
        self.log(f"resumed from {self.run_dir / 'last.pt'}: epoch {p.epoch}, step {p.step}")

    # --- the loop ----------------------------------------------------------------------------------------

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """(n_train,) int64 — the order of epoch ``epoch``, the same on every rank; an array, not a list:
        8 bytes a structure for a streamed dataset of millions."""
        generator = torch.Generator().manual_seed(self.config.training.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.datasets["train"]), generator=generator).numpy()

    def _elapsed(self) -> float:
        """Seconds of training so far, this process and the ones it resumed from."""
        return self.progress.elapsed + time.perf_counter() - self._started

    def _out_of_time(self) -> bool:
        budget = self.config.training.max_time
        return budget is not None and self._elapsed() >= budget

    def _train_step(self, indices: Sequence[int]) -> tuple[float, dict[str, float], bool]:
        """One optimiser step; returns (loss, loss parts, whether the step was taken).

        A non-finite loss or gradient norm skips the update (weights, optimiser state and EMA untouched);
        the batch still counts as done, so the data order and a resume stay exact.
        """
        t = self.config.training
        self.model.train()
        self.schedule.before_step(self.progress.step)
        self.optimizer.zero_grad(set_to_none=True)
        if self.distributed.enabled:
            shares = self._sharded_backward(indices)
        else:
            dataset = self.datasets["train"]
            graph, labels = _device_batch(*collate_batch([dataset[i] for i in indices]), self.device)
            predictions = self.force_field(
                graph, compute_forces=True, compute_stress=self.compute_stress, create_graph=True
            )
            loss, parts = compute_loss(predictions, labels, self.config.loss)
            loss.backward()
        # The norm is computed either way (max_norm = inf clips nothing): it is the finiteness check.
        max_norm = t.grad_clip if t.grad_clip is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if self.distributed.enabled:
            # One all-reduce: the batch's loss parts, and whether any rank saw a non-finite gradient norm
            # (the same on all, as the gradients are, but the ranks must not disagree on a step).
            flag = (~torch.isfinite(grad_norm)).to(torch.float64).cpu().reshape(1)
            totals = self.distributed.all_reduce_sum(torch.cat([shares, flag]))
            parts = dict(zip(loss_weights(self.config.loss), totals[:-1].tolist(), strict=True))
            value = 0.0
            for name, weight in loss_weights(self.config.loss).items():
                value += weight * parts[name]
            taken = math.isfinite(value) and float(totals[-1]) == 0
        else:
            value = float(loss.detach())
            taken = math.isfinite(value) and bool(torch.isfinite(grad_norm))
        if taken:
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            self.progress.consecutive_nonfinite = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.progress.skipped_steps += 1
            self.progress.consecutive_nonfinite += 1
        self.progress.step += 1
        self.progress.step_in_epoch += 1
        return value, parts, taken

    def _sharded_backward(self, indices: Sequence[int]) -> torch.Tensor:
        """This rank's share of the batch ``indices``: forward, weighted loss, backward (gradients all-reduced
        by DistributedDataParallel). Returns this rank's share of each loss term, (n_terms,) float64 on CPU.

        A term's loss is a mean over the batch's n finite entries; a rank holding n_r of them with mean m_r
        contributes (n_r / n) · m_r, and the shares add up to the mean. DDP averages gradients over the N
        ranks, so each rank's loss is N × its shares.
        """
        d = self.distributed
        weights = loss_weights(self.config.loss)
        mine = d.shard(indices)
        terms = {}
        if len(mine):
            dataset = self.datasets["train"]
            graph, labels = _device_batch(*collate_batch([dataset[i] for i in mine]), self.device)
            predictions = self.shard_model(graph)
            terms = loss_terms(predictions, labels, self.config.loss)
        else:  # fewer structures than ranks: this rank takes part with a zero loss
            predictions = self.shard_model(None)
        counts = torch.tensor([terms[name][1] if terms else 0 for name in weights], dtype=torch.float64)
        totals = d.all_reduce_sum(counts)
        loss = predictions["zero"]
        shares = torch.zeros(len(weights), dtype=torch.float64)
        for k, (name, weight) in enumerate(weights.items()):
            if counts[k] > 0:
                share = terms[name][0] * float(counts[k] / totals[k])
                loss = loss + weight * d.world_size * share
                shares[k] = float(share.detach())
        loss.backward()
        return shares

    def _skipped_step(self) -> None:
        """Warns about a skipped step; too many in a row end the training with an explanation."""
        p = self.progress
        self.log(
            f"warning: non-finite loss or gradient at step {p.step}: update skipped "
            f"({p.skipped_steps} skipped so far)"
        )
        if p.consecutive_nonfinite >= self.config.training.max_nonfinite_steps:
            raise TrainingError(
                f"{p.consecutive_nonfinite} steps in a row with a non-finite loss or gradient (up to step "
                f"{p.step}); the weights are those before them (last.pt, best.pt). Lower "
                "training.learning_rate or check the data for outliers"
            )

    def _validate(self, train_loss: float, final: bool = False) -> bool:
        """Validates the EMA model, logs, writes checkpoints; returns True when training should stop.

        ``final``: a last validation after a mid-epoch stop; it leaves the schedule and early stopping alone.
        """
        t = self.config.training
        p = self.progress
        model = self._evaluation_model().eval()
        metrics, valid_loss = evaluate_dataset(
            ForceField(model),
            self.datasets["valid"],
            t.eval_batch_size,
            self.device,
            self.config.loss,
            self.compute_stress,
            distributed=self.distributed,
        )
        improved = valid_loss < p.best_valid_loss
        if not final:
            self.schedule.after_validation(valid_loss)
            p.stale_validations = 0 if improved else p.stale_validations + 1
        if improved:
            p.best_valid_loss = valid_loss
        elapsed = self._elapsed()
        row = {
            "epoch": p.epoch,
            "step": p.step,
            "time_s": round(elapsed, 3),
            "lr": self.schedule.learning_rate(max(p.step - 1, 0)),
            "train_loss": train_loss,
            "valid_loss": valid_loss,
            **{f"valid_{k}": v for k, v in metrics.items() if k != "n_structures"},
        }
        if self.history is not None:
            self.history.append(row)
        if improved:
            self._save_best()
        self._save_last()
        mark = "*" if improved else " "
        self.log(
            f"epoch {p.epoch:>4d} step {p.step:>7d} {elapsed:>7.0f}s lr {row['lr']:.2e} "
            f"loss {train_loss:.3e} "
            f"valid E {metrics.get('energy_mae_meV', math.nan):7.2f} meV F "
            f"{metrics.get('forces_mae_meV_per_A', math.nan):7.2f} meV/Å {mark}"
        )
        if t.early_stopping_patience is not None and p.stale_validations >= t.early_stopping_patience:
            self._stop_reason = f"early stopping: no improvement in {p.stale_validations} validations"
            return True
        return False

    def _request_stop(self, reason: str) -> None:
        if self.distributed.enabled:
            self._stop_request = reason  # a stop only once every rank knows of it: _agree_on_stop
        else:
            self._stop_reason = reason

    def _agree_on_stop(self) -> None:
        """Multi-process: a stop asked of any rank (a signal, its clock passing max_time) becomes the stop of
        every rank, at the same step."""
        if self.distributed.enabled and self._stop_reason is None:
            if self.distributed.any(self._stop_request is not None):
                self._stop_reason = self._stop_request or "stopped: another process was asked to stop"

    def _train(self) -> None:
        t = self.config.training
        p = self.progress
        with stop_requests(self._request_stop):
            while p.epoch < t.max_epochs:
                self._agree_on_stop()
                if self._stop_reason is not None:
                    break
                order = self._epoch_order(p.epoch)
                n_batches = math.ceil(len(order) / t.batch_size)
                losses = []
                bar = None
                if t.progress and self.distributed.is_main:
                    from tqdm import tqdm

                    bar = tqdm(
                        total=n_batches,
                        initial=p.step_in_epoch,
                        desc=f"epoch {p.epoch + 1}",
                        leave=False,
                        dynamic_ncols=True,
                        disable=None,  # None: off when not a terminal
                    )
                for k in range(p.step_in_epoch, n_batches):
                    loss, _, taken = self._train_step(order[k * t.batch_size : (k + 1) * t.batch_size])
                    if taken:
                        losses.append(loss)
                    else:
                        self._skipped_step()
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{loss:.3e}")
                    if self._out_of_time():
                        self._request_stop(f"time budget of {t.max_time} s reached")
                    self._agree_on_stop()
                    if self._stop_reason is not None:
                        break
                if bar is not None:
                    bar.close()
                if self._stop_reason is not None and p.step_in_epoch < n_batches:
                    self._save_last()  # mid-epoch: resumable at this exact step
                    # The run ends here: validate what was trained since the last validation, so that
                    # a budget shorter than an epoch still yields a best.pt. The schedule is not touched.
                    self._validate(float(np.mean(losses)) if losses else math.nan, final=True)
                    break
                p.epoch += 1
                p.step_in_epoch = 0
                if p.epoch % t.valid_every == 0 or p.epoch == t.max_epochs or self._stop_reason is not None:
                    if self._validate(float(np.mean(losses)) if losses else math.nan):
                        break
                else:
                    self._save_last()
        self.log(self._stop_reason or f"finished {p.epoch} epochs")

    def _final_table(self) -> dict[str, dict[str, float]]:
        best = self.run_dir / "best.pt"
        model = self._evaluation_model()
        state = run_on_main(
            self.distributed, lambda: load_checkpoint(best)["state_dict"] if best.is_file() else None
        )
        if state is not None:
            model = build_model(self.model_config)
            model.load_state_dict(state)
            model.to(device=self.device, dtype=self.dtype)
        force_field = ForceField(model.eval())
        rows = {}
        for name, dataset in self.datasets.items():
            if len(dataset):
                rows[name], _ = evaluate_dataset(
                    force_field,
                    dataset,
                    self.config.training.eval_batch_size,
                    self.device,
                    compute_stress=self.compute_stress,
                    distributed=self.distributed,
                )
        return rows

    def run(self) -> dict[str, dict[str, float]]:
        main = self.distributed.is_main
        with contextlib.ExitStack() as stack:

            def take_run_dir() -> None:
                self._check_run_dir()
                stack.enter_context(RunLock(self.run_dir))

            run_on_main(self.distributed, take_run_dir)
            self._build()
            self.history = History(self.run_dir) if main else None
            if self.resume:
                self._restore()
                if self.history is not None:
                    self.history.truncate(self.progress.epoch)
            if main:  # a resumed run's config only once its checkpoint has been restored
                with atomic_path(self.run_dir / "config.yaml") as tmp:
                    tmp.write_text(dump_config(self.config.model_copy(update={"model": self.model_config})))
            try:
                self._train()
            finally:
                if self.history is not None:
                    self.history.close()
            if self.history is not None:
                self.history.plot()
            rows = self._final_table()
            if main:
                write_json(self.run_dir / "results.json", rows)
            self.log(
                "\nbest model ("
                + ("EMA weights" if self.ema is not None else "weights")
                + f"), {self.run_dir / 'best.pt'}:"
            )
            self.log(format_table(rows))
            return rows


def train(config: TrainConfig, resume: bool = False, log=print) -> dict[str, dict[str, float]]:
    """Runs a training described by ``config``; returns the final MAE/RMSE per split (meV, meV/Å).

    Started by torchrun or srun, this process joins the job's process group and trains its share (see
    ``train/distributed.py``); every rank returns the same numbers.
    """
    t = config.training
    check_output_dir(config.run_dir, "run_dir")
    check_device(t.device)
    keep_freed_memory()
    with process_group(t.device, t.distributed_timeout) as distributed:
        return Trainer(config, resume=resume, log=log, distributed=distributed).run()
