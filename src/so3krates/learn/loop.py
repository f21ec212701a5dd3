"""``so3krates learn``: from start structures and a reference method to a committee that simulates stably.

Every iteration trains a committee on all labelled frames (each member warm-started from its previous
weights, energy shift refitted), calibrates the committee's spread into an error estimate on held-out
labelled frames, runs Langevin replicas with the committee, and labels a diverse subset of the frames whose
estimated error exceeds the tolerance. The loop ends when every replica stayed stable and below the
tolerance for the target time, or when the label, time or iteration budget is spent.

Layout of ``work_dir`` (every file written atomically or append-only with a journal; a rerun continues):

- ``config.yaml`` — the resolved configuration; ``progress.json`` — elapsed time;
- ``initial/`` — the first frames: ``md_*/`` (SO3LR MD) or ``reference_md.extxyz``, ``selection.extxyz``,
  ``labels.jsonl`` (the reference calls' journal), ``labelled.extxyz``;
- ``iter_NNN/`` — ``train.extxyz``, ``holdout.extxyz``, ``committee/member_K/`` (training runs) with
  ``committee/member_K_{train,valid}.extxyz`` (the member's bootstrap draw and the frames it left out),
  ``calibration.json``, ``md/<replica>/`` (committee MD), ``selection.extxyz``, ``labels.jsonl``,
  ``labelled.extxyz``, ``summary.json``;
- ``dataset.extxyz`` — every labelled frame (``REF_energy``/``REF_forces``, ``iteration``, ``split``);
- ``iterations.csv``, ``learning.png`` — one row/point per iteration;
- ``final/`` — the final committee (``committee/member_K/best.pt``), the best single member (``best.pt``) and
  ``summary.json``.

Training and MD run as ``so3krates train`` / ``so3krates md`` processes (their own restart logic; they die
with this process), reference calls in a pool of worker processes (``so3krates.learn.reference``). With
the same seeds and thread counts the run is deterministic, so a run killed at any point and rerun ends
with the same dataset as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ase.io
import numpy as np
import yaml
from ase import Atoms

from so3krates.errors import ConfigError
from so3krates.files import atomic_path, write_json
from so3krates.learn.config import LearnConfig
from so3krates.learn.jobs import progress_bar, run_jobs
from so3krates.learn.reference import label_frames, make_calculator, read_journal
from so3krates.learn.report import iteration_line, write_iterations
from so3krates.learn.selection import select_diverse

#: MD statuses that end a replica (anything else is continued with --restart).
_FINISHED = ("completed", "unstable", "uncertain")


# -- small utilities ----------------------------------------------------------------------------------------


def _write_frames(path: Path, frames: list[Atoms]) -> None:
    with atomic_path(path, suffix=".extxyz") as tmp:
        ase.io.write(tmp, frames, format="extxyz")


def _read_frames(path: Path) -> list[Atoms]:
    if not path.is_file() or path.stat().st_size == 0:
        return []
    return list(ase.io.read(path, index=":", format="extxyz"))


def _bare(atoms: Atoms) -> Atoms:
    """Numbers, positions and cell only (no model energies or forces that could pass for labels)."""
    return Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)


def _key(atoms: Atoms) -> tuple:
    return tuple(np.round(atoms.positions, 8).ravel().tolist())


def labelled_frame(atoms: Atoms, record: dict[str, Any], **info: Any) -> Atoms:
    """A clean copy of ``atoms`` with the reference energy and forces as REF_energy / REF_forces."""
    frame = _bare(atoms)
    frame.info["REF_energy"] = float(record["energy"])
    frame.arrays["REF_forces"] = np.asarray(record["forces"], dtype=np.float64)
    frame.info.update(info)
    return frame


# -- the loop ----------------------------------------------------------------------------------------------


class Learner:
    """The state of one ``work_dir``; ``run()`` continues wherever the files say the loop stands."""

    def __init__(self, config: LearnConfig, log: Callable[[str], None] = print) -> None:
        self.config = config
        self.work = Path(config.work_dir)
        self.log = log
        self.starts: list[Atoms] = []
        self.start_files: list[Path] = []
        self._clock = time.perf_counter()
        self.elapsed_before = 0.0

    # -- bookkeeping -----------------------------------------------------------------------------------

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self._clock

    def _save_elapsed(self) -> None:
        write_json(self.work / "progress.json", {"elapsed_s": self.elapsed()})

    def out_of_time(self) -> bool:
        budget = self.config.budget.max_time_min
        return budget is not None and self.elapsed() > 60.0 * budget

    def journals(self) -> list[Path]:
        return sorted(self.work.glob("*/labels.jsonl")) + sorted(self.work.glob("initial/reference_md.jsonl"))

    def labels_used(self) -> int:
        """Reference calls made so far (failed ones included; labels reused from the reference MD not)."""
        return sum(
            sum(not record.get("reused") for record in read_journal(path).values())
            for path in self.journals()
        )

    def labels_left(self) -> int:
        return max(0, self.config.budget.max_labels - self.labels_used())

    def labelled_batches(self) -> list[Path]:
        return [self.work / "initial" / "labelled.extxyz", *sorted(self.work.glob("iter_*/labelled.extxyz"))]

    # -- set-up ----------------------------------------------------------------------------------------

    def prepare(self) -> None:
        from so3krates.md.run import read_structure

        c = self.config
        for path in c.structures:
            self.starts.append(read_structure(Path(path), 0))
            self.start_files.append(Path(path).resolve())
        make_calculator(c.reference.calculator, c.reference.kwargs)  # a bad name or keyword fails here, once
        self._check_member_config()
        self.work.mkdir(parents=True, exist_ok=True)
        saved = self.work / "config.yaml"
        resolved = c.model_dump(mode="json")
        if saved.is_file():
            old = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
            changed = sorted(key for key in resolved if old.get(key) != resolved[key])
            if changed:
                self.log(f"learn: continuing {self.work} with changed settings: {', '.join(changed)}")
        with atomic_path(saved) as tmp:
            tmp.write_text(yaml.safe_dump(resolved, sort_keys=False), encoding="utf-8")
        progress = self.work / "progress.json"
        if progress.is_file():
            self.elapsed_before = float(json.loads(progress.read_text())["elapsed_s"])

    def _check_member_config(self) -> None:
        """The committee's model, loss and training sections, validated as ``so3krates train`` will: a bad
        key fails here, in one line, not in a training process an hour into the run."""
        from pydantic import ValidationError

        from so3krates.errors import format_validation_error
        from so3krates.train.config import TrainConfig

        cc = self.config.committee
        values = {
            "data": {"train_file": "dataset.extxyz"},
            "model": dict(cc.model),
            "loss": dict(cc.loss),
            "training": dict(cc.training),
        }
        try:
            TrainConfig.model_validate(values)
        except ValidationError as error:
            message = format_validation_error(error, "committee")
            raise ConfigError(
                message.replace("key 'model", "key 'committee.model")
                .replace("key 'training", "key 'committee.training")
                .replace("key 'loss", "key 'committee.loss")
            ) from None

    # -- labelling -------------------------------------------------------------------------------------

    def label(self, directory: Path, frames: list[Atoms], iteration: int) -> list[Atoms]:
        """Labels ``frames`` (journal ``directory/labels.jsonl``) and writes ``labelled.extxyz``: the frames
        the reference answered, each marked ``train`` or ``holdout``."""
        done_path = directory / "labelled.extxyz"
        if done_path.is_file():
            return _read_frames(done_path)
        c = self.config
        bar = progress_bar(len(frames), f"label {directory.name}", c.progress)
        try:
            records = label_frames(
                frames,
                directory / "labels.jsonl",
                c.reference.calculator,
                c.reference.kwargs,
                c.reference.workers,
                c.reference.threads,
                progress=bar.update,
            )
        finally:
            bar.close()
        good = [k for k in range(len(frames)) if records[k]["ok"]]
        failed = [k for k in range(len(frames)) if not records[k]["ok"]]
        for k in failed[:3]:
            self.log(f"reference failed on {directory.name} frame {k}: {records[k]['reason']}")
        rng = np.random.default_rng([c.seed, iteration + 1])
        n_holdout = round(c.committee.holdout_fraction * len(good))
        holdout = set(rng.choice(len(good), size=n_holdout, replace=False).tolist()) if n_holdout else set()
        labelled = [
            labelled_frame(
                frames[k], records[k], iteration=iteration, split="holdout" if n in holdout else "train"
            )
            for n, k in enumerate(good)
        ]
        _write_frames(done_path, labelled)
        self._write_dataset()
        return labelled

    def _write_dataset(self) -> None:
        frames = [frame for path in self.labelled_batches() for frame in _read_frames(path)]
        _write_frames(self.work / "dataset.extxyz", frames)

    # -- the first frames ------------------------------------------------------------------------------

    def initial_method(self) -> str:
        method = self.config.initial.method
        if method != "auto":
            return method
        try:
            import so3krates_torch  # noqa: F401 - only asks whether the SO3LR weights are installed

            from so3krates.pretrained.so3lr import SO3LR_SPECIES
        except ImportError:
            return "reference-md"
        elements = {int(z) for atoms in self.starts for z in atoms.numbers}
        return "so3lr" if elements <= set(SO3LR_SPECIES) else "reference-md"

    def initial(self) -> list[Atoms]:
        directory = self.work / "initial"
        if (directory / "labelled.extxyz").is_file():
            return _read_frames(directory / "labelled.extxyz")
        directory.mkdir(parents=True, exist_ok=True)
        c = self.config
        selection_path = directory / "selection.extxyz"
        if not selection_path.is_file():
            method = self.initial_method()
            if method == "so3lr":
                pool = self._so3lr_md(directory)
            else:
                pool = self._reference_md(directory)
            n_extra = max(0, c.initial.n_frames - len(self.starts))
            n_extra = min(n_extra, self.labels_left() - len(self.starts))
            chosen = select_diverse(pool, n_extra) if pool and n_extra > 0 else []
            _write_frames(selection_path, [_bare(a) for a in self.starts] + [_bare(pool[k]) for k in chosen])
            self.log(
                f"initial frames: {len(self.starts)} start structure(s) + {len(chosen)} of {len(pool)} "
                f"{method} MD frames (farthest-point sampling)"
            )
        frames = _read_frames(selection_path)
        reference_md = directory / "reference_md.extxyz"
        if reference_md.is_file():
            # The reference MD labelled its frames already: their labels are reused, not asked for again.
            known = {_key(a): a for a in _read_frames(reference_md)}
            records = {}
            for k, frame in enumerate(frames):
                match = known.get(_key(frame))
                if match is not None:
                    records[k] = {
                        "index": k,
                        "ok": True,
                        "energy": float(match.info["REF_energy"]),
                        "forces": match.arrays["REF_forces"].tolist(),
                        "reused": True,
                    }
            self._prefill_journal(directory / "labels.jsonl", records)
        return self.label(directory, frames, iteration=-1)

    def _prefill_journal(self, path: Path, records: dict[int, dict[str, Any]]) -> None:
        if path.is_file() or not records:
            return
        with atomic_path(path) as tmp:
            tmp.write_text("".join(json.dumps(record) + "\n" for record in records.values()))

    def _so3lr_md(self, directory: Path) -> list[Atoms]:
        c = self.config
        temperature = c.exploration.temperatures_K[0]
        jobs = []
        for s, path in enumerate(self.start_files):
            out = directory / f"md_{s}"
            argv = self._md_argv(
                "so3lr", path, out, temperature, c.initial.md_time_ps, c.seed + 7919 * s, None
            )
            jobs.append(self._md_job(f"SO3LR MD of start {s}", argv, out))
        self._run_md_jobs(jobs, "initial MD (SO3LR)")
        pool = []
        for s in range(len(self.start_files)):
            pool += _read_frames(directory / f"md_{s}" / "trajectory.extxyz")[1:]
        return pool

    def _reference_md(self, directory: Path) -> list[Atoms]:
        """Langevin MD with the reference itself; every step is a reference call (counted in the budget).

        Written as one file at the end: a run killed during it repeats it.
        """
        from ase import units
        from ase.md.langevin import Langevin
        from ase.md.velocitydistribution import Stationary, thermalize_momenta

        c = self.config
        temperature = c.exploration.temperatures_K[0]
        steps = min(c.initial.reference_md_steps, max(1, self.labels_left() // max(1, len(self.starts)) - 1))
        pool, journal = [], []
        calculator = make_calculator(c.reference.calculator, c.reference.kwargs)
        for s, start in enumerate(self.starts):
            atoms = Atoms(numbers=start.numbers, positions=start.positions, cell=start.cell, pbc=start.pbc)
            atoms.calc = calculator
            rng = np.random.default_rng([c.seed, 104729, s])
            thermalize_momenta(atoms, temperature, rng=rng)
            Stationary(atoms)
            dynamics = Langevin(
                atoms,
                c.exploration.timestep_fs * units.fs,
                temperature_K=temperature,
                friction=c.exploration.friction_per_fs / units.fs,
                rng=rng,
                fixcm=False,  # the momentum was removed at the start; the sampling needs no more
            )
            for step in range(steps):
                try:
                    dynamics.run(1)
                    record = {
                        "ok": True,
                        "energy": float(atoms.get_potential_energy()),
                        "forces": atoms.get_forces().tolist(),
                    }
                except Exception as error:  # a failed reference call ends this MD; its frames so far count
                    reason = f"{type(error).__name__}: {str(error).strip()[:200]}"
                    journal.append({"index": len(journal), "ok": False, "reason": reason})
                    self.log(f"reference MD of start {s} stopped at step {step + 1}: {reason}")
                    break
                frame = labelled_frame(atoms, record)
                pool.append(frame)
                journal.append({"index": len(journal), **record})
        with atomic_path(directory / "reference_md.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in journal))
        _write_frames(directory / "reference_md.extxyz", pool)
        return pool

    # -- one iteration ---------------------------------------------------------------------------------

    def iteration_dir(self, k: int) -> Path:
        return self.work / f"iter_{k:03d}"

    def write_data(self, k: int) -> tuple[int, int]:
        directory = self.iteration_dir(k)
        train_path, holdout_path = directory / "train.extxyz", directory / "holdout.extxyz"
        if not train_path.is_file():
            frames = [
                frame for path in self.labelled_batches() if path.is_file() for frame in _read_frames(path)
            ]
            holdout = [f for f in frames if f.info.get("split") == "holdout"]
            _write_frames(holdout_path, holdout)
            _write_frames(train_path, [f for f in frames if f.info.get("split") != "holdout"])
        return len(_read_frames(train_path)), len(_read_frames(holdout_path))

    def bootstrap_files(self, k: int, m: int) -> dict[str, str]:
        """Member ``m``'s bootstrap draw of iteration ``k``'s training frames (with replacement, as many as
        there are frames) and the frames the draw left out as its validation set (Breiman's out-of-bag
        frames, about a third): members see different data and so disagree more (calibration factor α
        closer to 1; the rank correlation of spread and error rose only slightly, see
        benchmarks/results/learn/committee_resampling.md). The draw depends only on seed, k and m, so a
        resumed run draws the same."""
        directory = self.iteration_dir(k) / "committee"
        train_path = directory / f"member_{m}_train.extxyz"
        valid_path = directory / f"member_{m}_valid.extxyz"
        if not (train_path.is_file() and valid_path.is_file()):
            frames = _read_frames(self.iteration_dir(k) / "train.extxyz")
            rng = np.random.default_rng([self.config.seed, 7, k, m])
            while True:  # a draw that leaves no frame out has no validation set (only for tiny sets)
                draw = rng.integers(0, len(frames), size=len(frames))
                left_out = sorted(set(range(len(frames))) - set(draw.tolist()))
                if left_out:
                    break
            directory.mkdir(parents=True, exist_ok=True)
            _write_frames(valid_path, [frames[i] for i in left_out])
            _write_frames(train_path, [frames[i] for i in draw])
        return {"train_file": str(train_path), "valid_file": str(valid_path)}

    def train(self, k: int, n_train: int, n_holdout: int) -> Path:
        c = self.config
        cc = c.committee
        directory = self.iteration_dir(k)
        committee_dir = directory / "committee"
        jobs = []
        batch_size = int(cc.training.get("batch_size", 5))
        steps = cc.steps if k > 0 else (cc.first_steps or 2 * cc.steps)
        bootstrap = cc.resample == "bootstrap" and n_train >= 4
        n_fit = n_train if bootstrap else max(1, n_train - max(1, round(0.1 * n_train)))
        epochs = max(1, math.ceil(steps * batch_size / n_fit))
        for m in range(cc.size):
            run_dir = committee_dir / f"member_{m}"
            if (run_dir / "results.json").is_file() and (run_dir / "best.pt").is_file():
                continue
            previous = self.iteration_dir(k - 1) / "committee" / f"member_{m}" / "best.pt"
            warm = cc.warm_start and k > 0 and previous.is_file()
            if bootstrap:
                split = self.bootstrap_files(k, m)
            else:
                split = {
                    "train_file": str(directory / "train.extxyz"),
                    "valid_fraction": 0.1,
                    "split_seed": c.seed * 1000 + m,
                }
            values: dict[str, Any] = {
                "run_dir": str(run_dir),
                "data": {
                    **split,
                    "energy_key": "REF_energy",
                    "forces_key": "REF_forces",
                    **({"test_file": str(directory / "holdout.extxyz")} if n_holdout else {"n_test": 0}),
                },
                "loss": dict(cc.loss),
                "training": {
                    "progress": False,
                    **cc.training,
                    "max_epochs": epochs,
                    "seed": c.seed * 1000 + m,
                    "threads": cc.threads,
                    "dtype": cc.dtype,
                    **({"init_from": str(previous)} if warm else {}),
                },
            }
            if not warm:
                values["model"] = dict(cc.model)
            config_path = committee_dir / f"member_{m}.yaml"
            with atomic_path(config_path) as tmp:
                tmp.write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
            resume = (run_dir / "last.pt").is_file()
            if not resume and run_dir.exists():
                shutil.rmtree(run_dir)  # a start killed before its first checkpoint
            argv = ["train", str(config_path)] + (["--resume"] if resume else [])
            jobs.append((f"member {m}", argv, committee_dir / f"member_{m}.log"))
        if jobs:
            bar = progress_bar(len(jobs), f"train iteration {k} ({epochs} epochs)", c.progress)
            try:
                run_jobs(jobs, cc.parallel, cc.threads, bar)
            finally:
                bar.close()
        return committee_dir

    def calibrate(self, k: int, committee_dir: Path) -> dict[str, Any]:
        """α from the held-out frames and the threshold on the largest atomic force spread."""
        path = self.iteration_dir(k) / "calibration.json"
        if path.is_file():
            return json.loads(path.read_text())
        import torch

        from so3krates.committee import FORCES_UNCERTAINTY, load_committee, member_paths
        from so3krates.data.io import read_structures
        from so3krates.evaluate import predict, uncertainty_against_error

        c = self.config
        members = member_paths(committee_dir)
        torch.set_num_threads(1)  # the same sums in the same order on every machine and rerun
        committee, _ = load_committee(members, dtype=torch.float64)
        holdout_path = self.iteration_dir(k) / "holdout.extxyz"
        result: dict[str, Any] = {"n_holdout": 0, "alpha": 1.0}
        if _read_frames(holdout_path):
            structures = read_structures(holdout_path, energy_key="REF_energy", forces_key="REF_forces")
            predictions, metrics = predict(committee, structures)
            errors = np.concatenate(
                [
                    np.linalg.norm(p - s.forces, axis=1)
                    for p, s in zip(predictions["forces"], structures, strict=True)
                ]
            )
            sigma = np.concatenate(predictions[FORCES_UNCERTAINTY])
            # Musil et al., J. Chem. Theory Comput. 15, 906 (2019): the factor α that makes α·σ a calibrated
            # error estimate, α² = ⟨|ΔF|² / σ²⟩ over the held-out atoms (σ² is the expected |ΔF|² of a
            # calibrated committee: the sum of the three component variances).
            alpha = float(np.sqrt(np.mean(errors**2 / np.maximum(sigma, 1e-8) ** 2)))
            member_mae = []
            for member in committee.members:
                _, member_metrics = predict(member, structures)
                member_mae.append(member_metrics["forces_mae_meV_per_A"])
            rho = uncertainty_against_error(structures, predictions)["spearman_forces"]
            result = {
                "n_holdout": len(structures),
                "alpha": alpha,
                "committee_forces_mae": metrics["forces_mae_meV_per_A"],
                "committee_energy_mae": metrics["energy_mae_meV"],
                "member_forces_mae": member_mae,
                "spearman_largest_uncertainty_vs_error": rho if math.isfinite(rho) else None,
            }
        result["threshold"] = c.selection.max_force_error / result["alpha"]
        result["best_member"] = (
            int(np.argmin(result["member_forces_mae"])) if "member_forces_mae" in result else 0
        )
        write_json(path, result)
        return json.loads(path.read_text())  # as a rerun reads it (a non-finite number is None in both)

    def _md_argv(
        self,
        model,
        structure: Path,
        out: Path,
        temperature: float,
        time_ps: float,
        seed: int,
        stop: float | None,
        flag: float | None = None,
    ) -> list[str]:
        e = self.config.exploration
        argv = [
            "md",
            "--model",
            str(model),
            "--structure",
            str(structure),
            "--ensemble",
            "langevin",
            "--temperature",
            repr(float(temperature)),
            "--time-ps",
            repr(float(time_ps)),
            "--timestep",
            repr(float(e.timestep_fs)),
            "--friction",
            repr(float(e.friction_per_fs)),
            "--seed",
            str(seed),
            "--trajectory-every",
            str(e.trajectory_every),
            "--restart-every",
            "200",
            "--dtype",
            e.dtype,
            "--threads",
            str(e.threads),
            "--no-progress",
            "--out",
            str(out),
        ]
        if stop is not None:
            argv += ["--uncertainty-threshold", repr(float(stop)), "--uncertainty-action", "stop"]
        elif flag is not None:
            argv += ["--uncertainty-threshold", repr(float(flag))]
        return argv

    def _md_job(self, name: str, argv: list[str], out: Path) -> tuple[str, list[str], Path] | None:
        summary = out / "summary.json"
        if summary.is_file() and json.loads(summary.read_text()).get("status") in _FINISHED:
            return None
        if (out / "restart.npz").is_file():
            argv = [*argv, "--restart"]
        elif out.exists():
            shutil.rmtree(out)  # started, killed before its first state
        return (name, argv, out.parent / f"{out.name}.log")

    def _run_md_jobs(self, jobs: list, description: str) -> None:
        jobs = [job for job in jobs if job is not None]
        if not jobs:
            return
        bar = progress_bar(len(jobs), description, self.config.progress)
        try:
            run_jobs(jobs, self.config.exploration.parallel, self.config.exploration.threads, bar)
        finally:
            bar.close()

    def replicas(self, k: int) -> list[tuple[str, Path, float, int]]:
        e = self.config.exploration
        out = []
        for s, path in enumerate(self.start_files):
            for temperature in e.temperatures_K:
                for r in range(e.replicas):
                    name = f"s{s}_T{temperature:g}_r{r}"
                    seed = self.config.seed * 1_000_003 + 10_007 * k + 101 * s + r + int(temperature)
                    out.append((name, path, temperature, seed))
        return out

    def exploration_time(self, k: int) -> float:
        """ps of iteration ``k``'s replicas: first_time_ps, doubled every iteration up to time_ps."""
        e = self.config.exploration
        return min(e.time_ps, e.first_time_ps * 2.0**k)

    def explore(
        self, k: int, committee_dir: Path, threshold: float, time_ps: float, folder: str = "md"
    ) -> list[dict[str, Any]]:
        e = self.config.exploration
        md_dir = self.iteration_dir(k) / folder
        stop = e.stop_factor * threshold if e.stop_factor is not None else None
        jobs = []
        for name, path, temperature, seed in self.replicas(k):
            out = md_dir / name
            argv = self._md_argv(committee_dir, path, out, temperature, time_ps, seed, stop, threshold)
            jobs.append(self._md_job(f"replica {name}", argv, out))
        self._run_md_jobs(jobs, f"explore iteration {k} ({time_ps:g} ps)")
        return [
            {"name": name, "folder": folder, **json.loads((md_dir / name / "summary.json").read_text())}
            for name, *_ in self.replicas(k)
        ]

    def candidates(
        self, k: int, threshold: float, runs: list[dict[str, Any]]
    ) -> tuple[list[Atoms], np.ndarray]:
        """Frames above the threshold (with their uncertainty), and for broken runs the frames before."""
        frames, scores, everything = [], [], []
        for run in runs:
            folder = self.iteration_dir(k) / run["folder"] / run["name"]
            trajectory = _read_frames(folder / "trajectory.extxyz")
            steps = set()
            # The trajectory's frames and the flagged ones: every excursion above the threshold leaves one in
            # flagged.extxyz, also between trajectory frames.
            for frame in trajectory + _read_frames(folder / "flagged.extxyz"):
                step = int(frame.info.get("step", -1))
                if step in steps:
                    continue
                steps.add(step)
                sigma = float(frame.info.get("max_force_uncertainty", 0.0))
                everything.append((sigma, frame))
                if sigma > threshold:
                    frames.append(frame)
                    scores.append(sigma)
            if run["status"] == "unstable":
                # Confidently wrong: the committee agreed on a path that broke the molecule. The frames that
                # led there are candidates too.
                tail = trajectory[-max(1, len(trajectory) // 5) :]
                for frame in tail:
                    if not any(frame is f for f in frames):
                        frames.append(frame)
                        scores.append(float(frame.info.get("max_force_uncertainty", 0.0)))
        if not frames and everything:
            # Not converged, yet no frame on record above the threshold: the most uncertain fifth of the
            # frames on record are the candidates.
            everything.sort(key=lambda item: -item[0])
            top = everything[: max(1, len(everything) // 5)]
            frames, scores = [f for _, f in top], [sigma for sigma, _ in top]
        clean = [_bare(f) for f in frames]
        for frame, score in zip(clean, scores, strict=True):
            frame.info["max_force_uncertainty"] = score
        return clean, np.array(scores)

    # -- the whole run ---------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        from so3krates.train.runlock import RunLock

        self.prepare()
        final_summary = self.work / "final" / "summary.json"
        if final_summary.is_file():
            summary = json.loads(final_summary.read_text())
            self.log(
                f"learn: {self.work} finished already ({summary['reason']}); final models in "
                f"{self.work / 'final'}"
            )
            return summary
        with RunLock(self.work):
            return self._run()

    def _run(self) -> dict[str, Any]:
        c = self.config
        self.log(
            f"learn: {len(self.starts)} start structure(s), reference {c.reference.calculator}, committee of "
            f"{c.committee.size}, {c.exploration.replicas} replica(s) × {len(c.exploration.temperatures_K)} "
            f"temperature(s) × {c.exploration.time_ps:g} ps, budget {c.budget.max_labels} reference calls"
            + (f" / {c.budget.max_time_min:g} min" if c.budget.max_time_min else "")
            + f" → {self.work}"
        )
        self.initial()
        self._save_elapsed()
        reason = None
        k = 0
        rows = []
        while True:
            directory = self.iteration_dir(k)
            directory.mkdir(parents=True, exist_ok=True)
            summary_path = directory / "summary.json"
            if summary_path.is_file():
                row = json.loads(summary_path.read_text())
                rows.append(row)
                if row.get("stop"):
                    reason = row["stop"]
                    break
                k += 1
                continue
            started = time.perf_counter()
            n_train, n_holdout = self.write_data(k)
            committee_dir = self.train(k, n_train, n_holdout)
            self._save_elapsed()
            calibration = self.calibrate(k, committee_dir)
            threshold = calibration["threshold"]
            time_ps = self.exploration_time(k)
            runs = self.explore(k, committee_dir, threshold, time_ps)
            self._save_elapsed()

            def certain(runs: list[dict[str, Any]], threshold: float = threshold) -> bool:
                return (
                    all(run["status"] == "completed" for run in runs)
                    and max((run.get("max_force_uncertainty_eV_per_A") or 0.0) for run in runs) <= threshold
                )

            if certain(runs) and time_ps < c.exploration.time_ps:
                # Stable and certain for the shorter time: the runs of the target length decide.
                time_ps = c.exploration.time_ps
                runs = self.explore(k, committee_dir, threshold, time_ps, folder="md_full")
                self._save_elapsed()
            max_sigma = max((run.get("max_force_uncertainty_eV_per_A") or 0.0) for run in runs)
            stable = [run["status"] == "completed" for run in runs]
            converged = certain(runs) and time_ps >= c.exploration.time_ps
            left = self.labels_left()
            stop = None
            if converged:
                stop = "converged"
            elif left == 0:
                stop = "label budget spent"
            elif k + 1 >= c.budget.max_iterations:
                stop = "iteration budget spent"
            elif self.out_of_time():
                stop = "time budget spent"
            n_candidates = n_selected = n_failed = 0
            if stop is None:
                selection_path = directory / "selection.extxyz"
                if not selection_path.is_file():
                    frames, scores = self.candidates(k, threshold, runs)
                    n = min(c.selection.labels_per_iteration, left)
                    chosen = select_diverse(frames, n, scores)
                    _write_frames(selection_path, [frames[j] for j in chosen])
                    write_json(directory / "candidates.json", {"n_candidates": len(frames)})
                selected = _read_frames(selection_path)
                n_candidates = json.loads((directory / "candidates.json").read_text())["n_candidates"]
                n_selected = len(selected)
                if selected:
                    labelled = self.label(directory, selected, iteration=k)
                    n_failed = n_selected - len(labelled)
                else:
                    stop = "no frame to label"  # unstable runs without frames: nothing left to learn from
            row = {
                "iteration": k,
                "n_train": n_train,
                "n_holdout": n_holdout,
                "labels_used": self.labels_used(),
                "holdout_forces_mae": calibration.get("committee_forces_mae"),
                "best_member_forces_mae": min(calibration["member_forces_mae"])
                if "member_forces_mae" in calibration
                else None,
                "alpha": calibration["alpha"],
                "threshold": threshold,
                "spearman": calibration.get("spearman_largest_uncertainty_vs_error"),
                "replicas": len(runs),
                "exploration_ps": time_ps,
                "stable_replicas": sum(stable),
                "stable_time_ps": [
                    run["time_ps"] if run["status"] != "unstable" else run.get("failure_time_ps")
                    for run in runs
                ],
                "statuses": [run["status"] for run in runs],
                "max_force_uncertainty": max_sigma,
                "n_candidates": n_candidates,
                "n_selected": n_selected,
                "n_failed": n_failed,
                "wall_s": time.perf_counter() - started,
                "elapsed_s": self.elapsed(),
                "stop": stop,
            }
            write_json(summary_path, row)
            rows.append(row)
            self._save_elapsed()
            self.log(iteration_line(row))
            write_iterations(self.work, rows, self.config.exploration.time_ps)
            if stop is not None:
                reason = stop
                break
            k += 1
        return self._finish(rows, reason)

    def _finish(self, rows: list[dict[str, Any]], reason: str) -> dict[str, Any]:
        last = rows[-1]
        k = last["iteration"]
        committee_dir = self.iteration_dir(k) / "committee"
        calibration = json.loads((self.iteration_dir(k) / "calibration.json").read_text())
        final = self.work / "final"
        final.mkdir(exist_ok=True)
        for m in range(self.config.committee.size):
            target = final / "committee" / f"member_{m}" / "best.pt"
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(target) as tmp:
                shutil.copyfile(committee_dir / f"member_{m}" / "best.pt", tmp)
        best = calibration.get("best_member", 0)
        with atomic_path(final / "best.pt") as tmp:
            shutil.copyfile(committee_dir / f"member_{best}" / "best.pt", tmp)
        summary = {
            "reason": reason,
            "iterations": len(rows),
            "reference_calls": self.labels_used(),
            "labelled_frames": sum(len(_read_frames(p)) for p in self.labelled_batches() if p.is_file()),
            "best_member": best,
            "final_committee": str(final / "committee"),
            "last_iteration": last,
            "elapsed_s": self.elapsed(),
        }
        write_json(final / "summary.json", summary)
        self.log(
            f"learn: stopped ({reason}) after {len(rows)} iteration(s), {summary['reference_calls']} "
            f"reference calls, {summary['elapsed_s'] / 60:.1f} min; committee → {final / 'committee'}, "
            f"best member (held-out force MAE) → {final / 'best.pt'}, dataset → "
            f"{self.work / 'dataset.extxyz'}"
        )
        return summary


def learn(config: LearnConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs (or continues) the loop of ``config``; returns the final summary."""
    if not config.structures:
        raise ConfigError("structures: give at least one start structure")
    return Learner(config, log).run()
