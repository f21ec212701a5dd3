"""``so3krates md``: molecular dynamics of a trained model through ASE, watched by a stability monitor.

A run directory holds ``config.json``, ``thermo.csv`` and ``trajectory.extxyz`` (append-only),
``restart.npz`` (the state to continue from), ``thermo.png`` and ``summary.json``; a run that broke apart
also holds ``last_good.extxyz``, the last frame that passed the monitor (``restart.npz`` is then that
frame's state). ``replicas > 1`` runs one such directory per seed (``replica_000`` …) and writes the
fraction still stable over time and the mean time to failure to ``summary.json`` and ``stability.png``.

Restarts are exact: ``restart.npz`` holds positions, momenta, cell, the step, the RNG state of Langevin and
Bussi, the Nosé–Hoover and MTK variables and the sizes of the append-only files, so a run of 2N steps and
a run of N steps continued for N more give bit-for-bit identical positions, momenta, thermo.csv and
trajectory (tested for all five ensembles).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ase.io
import numpy as np
from ase import Atoms
from ase.md.velocitydistribution import Stationary, thermalize_momenta

from so3krates.calculators.ase import So3kratesCalculator, UnsupportedStructureError
from so3krates.committee import FORCES_UNCERTAINTY, Committee, load_committee, member_paths
from so3krates.errors import ConfigError, DataError, So3kratesError
from so3krates.files import write_json
from so3krates.interrupt import stop_requests
from so3krates.md import output
from so3krates.md.config import NON_CONSERVING_ENSEMBLES, MDConfig
from so3krates.md.integrators import (
    check_ensemble,
    conserved_energy,
    degrees_of_freedom,
    integrator_state,
    make_integrator,
    restore_integrator_state,
    temperature,
)
from so3krates.md.stability import StabilityFailure, StabilityMonitor
from so3krates.md.summary import (
    MDResult,
    TrajectoryResult,
    conserved_energy_drift,
    mean_temperature,
    replica_summary,
)

_STATE_JSON_KEYS = ("rng", "integrator")
#: eV/Å — a start structure with larger forces is refused: no force field is trained on such structures, and
#: an MD from there only produces numbers without meaning (e.g. a molecule larger than its periodic cell).
MAX_START_FORCE = 1000.0


def run_md(config: MDConfig, log: Callable[[str], None] = print, restart: bool = False) -> MDResult:
    """Runs ``config.replicas`` independent trajectories and writes their outputs and summary.

    Args:
        config: the validated configuration (``load_md_config`` builds one from a dict).
        log: receives one line per event (start, each run's end, the summary).
        restart: continue the runs in ``config.output_dir`` from their ``restart.npz`` (a run that broke
            apart continues from its last good frame; a finished one is only summarised again).

    Raises:
        ConfigError: an impossible combination, or a run directory already in use without ``restart``.
        DataError: an unreadable model or structure, or a structure the model refuses.
    """
    import torch

    from so3krates.checks import check_device, check_output_dir
    from so3krates.model.checkpoint import load_model

    check_output_dir(config.output_dir, "output_dir")
    check_device(config.device)

    if config.threads:
        torch.set_num_threads(config.threads)
    atoms = read_structure(config.structure, config.frame)
    check_ensemble(config, atoms, str(config.structure))
    directories = _run_directories(config)
    states = find_states(directories, restart)
    members = member_paths(config.model)
    if members is not None:  # a committee: one set of force fields shared by the replicas' calculators
        try:
            model, metadata = load_committee(
                members, config.device, getattr(torch, config.dtype), config.compile
            )
        except So3kratesError as error:
            raise DataError(f"{config.model}: {error}") from None
    else:
        model, metadata = load_model(config.model, device=config.device, dtype=getattr(torch, config.dtype))
    species = metadata.get("species")
    if config.uncertainty_threshold is not None and members is None:
        raise ConfigError(
            f"uncertainty_threshold: {config.model} is one model, not a committee (a directory of "
            "member_*/best.pt); one model has no uncertainty"
        )

    def new_calculator() -> So3kratesCalculator:
        return So3kratesCalculator(
            model,
            device=config.device,
            dtype=config.dtype,
            skin=config.skin,
            species=species,
            compile=config.compile,
        )

    _check_start(config, atoms, new_calculator())
    total = config.total_steps
    log(
        f"md: {atoms.get_chemical_formula()} ({len(atoms)} atoms{', periodic' if atoms.pbc.any() else ''}) "
        f"from {config.structure}, {config.ensemble}"
        f"{'' if config.ensemble == 'nve' else f' at {config.temperature_K:g} K'}, "
        f"dt {config.timestep_fs:g} fs, {total} steps ({total * config.timestep_fs / 1000:g} ps), "
        f"model {config.model} ({config.dtype}, {config.device})"
        + (f", a committee of {len(members)}" if members is not None else "")
    )
    config_path = config.output_dir / "config.json"
    resolved = config.model_dump(mode="json")
    if restart and config_path.is_file():
        saved = json.loads(config_path.read_text())
        changed = sorted(key for key in resolved if saved.get(key) != resolved[key])
        if changed:
            log(f"restart with changed settings: {', '.join(changed)}")
    write_json(config_path, resolved)
    runs: list[TrajectoryResult] = []
    summary_path = config.output_dir / "summary.json"
    for k, directory in enumerate(directories):
        if len(directories) > 1:
            log(f"replica {k + 1}/{len(directories)} (seed {config.seed + k}) → {directory}")
        trajectory = Trajectory(config, atoms, new_calculator(), directory, config.seed + k, states[k], log)
        runs.append(trajectory.run())
        if len(directories) > 1:
            summary = replica_summary(runs, total * config.timestep_fs / 1000)
            write_json(summary_path, {**summary, "replicas_requested": len(directories)})
        if runs[-1].status == "interrupted":
            break
    result = MDResult(config.output_dir, runs, summary_path, total * config.timestep_fs / 1000)
    if len(directories) > 1:
        survival = replica_summary(runs, result.total_time_ps)["survival"]
        output.plot_survival(
            config.output_dir / "stability.png", survival["time_ps"], survival["fraction_stable"], len(runs)
        )
        mttf = result.mean_time_to_failure_ps
        log(
            f"stable: {sum(run.stable for run in runs)}/{len(runs)} replicas; mean time to failure "
            f"{'—' if mttf is None else f'{mttf:.4g} ps'}; summary → {summary_path}"
        )
    return result


def read_structure(path: Path, frame: int) -> Atoms:
    """Frame ``frame`` of ``path`` (anything ``ase.io.read`` reads), with finite positions."""
    if not Path(path).is_file():
        raise DataError(f"{path}: structure file not found")
    try:
        atoms = ase.io.read(path, index=frame)
    except Exception as error:  # ASE raises many types for unreadable or foreign files
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"{path}: cannot read frame {frame} ({message})") from None
    if not isinstance(atoms, Atoms) or len(atoms) == 0:
        raise DataError(f"{path}: frame {frame} holds no atoms")
    if not np.isfinite(atoms.positions).all():
        raise DataError(f"{path}: frame {frame}: non-finite positions")
    return atoms


def _check_start(config: MDConfig, atoms: Atoms, calculator: So3kratesCalculator) -> None:
    """Refuses a start structure the model or the monitor rejects, before anything is written."""
    where = f"{config.structure}: frame {config.frame}"
    if config.velocities == "file" and not atoms.has("momenta"):
        raise DataError(f"{where} has no momenta (velocities: file)")
    probe = atoms.copy()
    probe.calc = calculator
    try:
        energy, forces = probe.get_potential_energy(), probe.get_forces()
    except UnsupportedStructureError as error:
        raise DataError(f"{where}: {error}") from None
    largest = float(np.abs(forces).max()) if np.isfinite(forces).all() else math.inf
    if largest > MAX_START_FORCE:
        cell = ""
        if atoms.pbc.any():
            lengths = ", ".join(f"{length:.3g}" for length in atoms.cell.lengths())
            cell = f" (periodic cell of {lengths} Å: does the structure fit in it?)"
        raise DataError(
            f"{where}: the model gives forces up to {largest:.3g} eV/Å and E = {energy:.4g} eV at the "
            f"start, far outside anything it can have been trained on{cell}"
        )
    if config.stability.enabled:
        monitor = StabilityMonitor(
            atoms, bond_scale=config.stability.bond_scale, min_distance=config.stability.min_distance
        )
        failure = monitor.check(atoms, 0, 0.0, energy, forces)
        if failure is not None:
            raise DataError(f"{where}: {failure.reason}")
    elif not (np.isfinite(energy) and np.isfinite(forces).all()):
        raise DataError(f"{where}: the model gives non-finite energy or forces")


def _run_directories(config: MDConfig) -> list[Path]:
    if config.replicas == 1:
        return [config.output_dir]
    return [config.output_dir / f"replica_{k:03d}" for k in range(config.replicas)]


def find_states(directories: list[Path], restart: bool) -> list[dict[str, Any] | None]:
    """Each run's restart state (restart) or None (fresh start); refuses to overwrite or to find nothing."""
    states: list[dict[str, Any] | None] = []
    for directory in directories:
        path = directory / "restart.npz"
        if not restart:
            if path.exists() or (directory / "thermo.csv").exists():
                raise ConfigError(
                    f"{directory}: already holds an MD run; continue it with --restart or choose another "
                    "output directory"
                )
            states.append(None)
        else:
            states.append(output.load_state(path, _STATE_JSON_KEYS) if path.is_file() else None)
    if restart and all(state is None for state in states):
        raise ConfigError(f"{directories[0] / 'restart.npz'}: nothing to restart from")
    return states


class Trajectory:
    """One trajectory: its atoms, integrator, monitor and files, from a fresh start or a restart state.

    Public so that the same protocol can drive another package's ASE calculator (benchmarks/peers/
    mace_stability.py): any ASE calculator with energy and forces works.
    """

    def __init__(
        self,
        config: MDConfig,
        structure: Atoms,
        calculator: So3kratesCalculator,
        directory: Path,
        seed: int,
        state: dict[str, Any] | None,
        log: Callable[[str], None],
    ) -> None:
        self.config, self.directory, self.log = config, Path(directory), log
        self.total = config.total_steps
        self.dt_ps = config.timestep_fs / 1000.0
        self.n_atoms = len(structure)
        self.stop_reason: str | None = None
        self.directory.mkdir(parents=True, exist_ok=True)
        thermostat_seed, velocity_seed = np.random.SeedSequence(seed).spawn(2)
        self.rng = np.random.Generator(np.random.PCG64(thermostat_seed))
        stability = config.stability
        self.monitor = (
            StabilityMonitor(
                structure,
                max_bond_deviation=stability.max_bond_deviation,
                bond_scale=stability.bond_scale,
                min_distance=stability.min_distance,
                reference_steps=stability.reference_steps,
            )
            if stability.enabled
            else None
        )
        self.atoms = Atoms(
            numbers=structure.numbers, positions=structure.positions, cell=structure.cell, pbc=structure.pbc
        )
        self.seed = int(state["seed"]) if state is not None else seed
        self.restarted = state is not None
        if state is None:
            self.start_step = 0
            # leftovers of a run that never saved a state
            for name in ("thermo.csv", "trajectory.extxyz", "flagged.extxyz"):
                output.truncate(self.directory / name, 0)
            self._set_initial_velocities(structure, np.random.Generator(np.random.PCG64(velocity_seed)))
        else:
            self.start_step = int(state["step"])
            self.atoms.positions = state["positions"]
            self.atoms.cell = state["cell"]
            self.atoms.set_momenta(state["momenta"], apply_constraint=False)
            self.rng.bit_generator.state = state["rng"]
            if self.monitor is not None:
                self.monitor.reference_min[:] = state["bond_reference_min"]
                self.monitor.reference_max[:] = state["bond_reference_max"]
            self._prime_neighbor_list(calculator, state["neighbor_list_positions"])
            output.truncate(self.directory / "thermo.csv", int(state["thermo_bytes"]))
            output.truncate(self.directory / "trajectory.extxyz", int(state["trajectory_bytes"]))
            if "flagged_bytes" in state:
                output.truncate(self.directory / "flagged.extxyz", int(state["flagged_bytes"]))
        self.atoms.calc = calculator
        self.dynamics = make_integrator(config, self.atoms, self.rng)
        self.dynamics.nsteps = self.start_step
        if state is not None and state["ensemble"] == config.ensemble:
            missing = restore_integrator_state(self.dynamics, state["integrator"])
            if missing:
                log(f"restart: could not restore {', '.join(missing)}; the thermostat starts afresh")
        self.committee = isinstance(getattr(calculator, "force_field", None), Committee)
        self.thermo = output.ThermoLog(
            self.directory / "thermo.csv", periodic=bool(self.atoms.pbc.any()), uncertainty=self.committee
        )
        self.trajectory = output.AppendOnlyFile(self.directory / "trajectory.extxyz")
        self.flagged = None
        if self.committee and config.uncertainty_threshold is not None:
            self.flagged = output.AppendOnlyFile(self.directory / "flagged.extxyz")
        self.max_uncertainty = (
            float(state["max_uncertainty"]) if state is not None and "max_uncertainty" in state else 0.0
        )
        self.n_flagged = int(state["n_flagged"]) if state is not None and "n_flagged" in state else 0
        self.uncertain_step: int | None = None
        # the previous step was above the threshold (a flagged excursion goes on)
        self._was_uncertain = (
            bool(state["was_uncertain"]) if state is not None and "was_uncertain" in state else False
        )
        self.snapshot: dict[str, Any] | None = None

    def _set_initial_velocities(self, structure: Atoms, rng: np.random.Generator) -> None:
        """Maxwell–Boltzmann rescaled to exactly temperature_K over 3N − 3 degrees of freedom, the file's
        momenta, or zero; the total momentum is removed in every case."""
        source = self.config.velocities
        if source == "maxwell-boltzmann" and self.config.temperature_K > 0 and self.n_atoms > 1:
            thermalize_momenta(self.atoms, self.config.temperature_K, rng=rng)
            Stationary(self.atoms, preserve_temperature=False)
            current = temperature(self.atoms.get_kinetic_energy(), self.n_atoms)
            self.atoms.set_momenta(self.atoms.get_momenta() * math.sqrt(self.config.temperature_K / current))
        elif source == "file":  # presence checked by _check_start
            self.atoms.set_momenta(structure.get_momenta())
            Stationary(self.atoms, preserve_temperature=False)

    def _prime_neighbor_list(self, calculator: So3kratesCalculator, positions: np.ndarray) -> None:
        """Builds the calculator's neighbour list where the saved run last built it, so that the restarted
        run sums the same edges in the same order as an uninterrupted one (bit-for-bit equal forces)."""
        if positions.shape == self.atoms.positions.shape:
            primer = self.atoms.copy()
            primer.positions = positions
            calculator.graph(primer)

    # -- one run ---------------------------------------------------------------------------------------

    def run(self) -> TrajectoryResult:
        config = self.config
        if not self.restarted:  # a restart from step 0 has these rows already
            self._write_thermo(0)
            self._write_frame(0)
            self.snapshot = self._take_snapshot(0)
            self._save_state()
        else:
            self.snapshot = self._take_snapshot(self.start_step)
            self.log(f"restart from step {self.start_step} in {self.directory}")
        failure = None
        wall_start = time.perf_counter()
        bar = self._progress_bar()
        with stop_requests(self._request_stop):
            try:
                while self.dynamics.nsteps < self.total:
                    step = self.dynamics.nsteps + 1
                    try:
                        self.dynamics.step()
                    except So3kratesError as error:  # refused by the model, or a neighbour list of nonsense
                        failure = StabilityFailure(step, step * self.dt_ps, "model-refused", str(error))
                        break
                    self.dynamics.nsteps = step
                    uncertain = self._uncertainty(step)
                    due = (
                        step % config.stability.check_every == 0
                        or step % config.restart_every == 0
                        or step == self.total
                        or self.stop_reason is not None
                        or self.uncertain_step == step
                    )
                    if due:
                        failure = self._check(step)
                        if failure is not None:
                            break
                    if step % config.thermo_every == 0:
                        self._write_thermo(step, bar)
                    if step % config.trajectory_every == 0 or self.uncertain_step == step:
                        self._write_frame(step)
                    if (
                        uncertain
                        and self.flagged is not None
                        and (step % config.stability.check_every == 0 or not self._was_uncertain)
                    ):  # every check_every steps, and the first step of every excursion above the threshold
                        self.flagged.write(output.extxyz_text(self._current_frame(step)))
                    self._was_uncertain = uncertain
                    if due:
                        self.snapshot = self._take_snapshot(step)
                        if (
                            step % config.restart_every == 0
                            or step == self.total
                            or self.stop_reason
                            or self.uncertain_step == step
                        ):
                            self._save_state()
                    if self.uncertain_step is not None:
                        break
                    if bar is not None:
                        bar.update(1)
                    if self.stop_reason is not None:
                        break
            finally:
                if bar is not None:
                    bar.close()
                self.thermo.close()
                self.trajectory.close()
                if self.flagged is not None:
                    self.flagged.close()
        wall = time.perf_counter() - wall_start
        return self._finish(failure, wall)

    def _progress_bar(self):
        if not self.config.progress:
            return None
        from tqdm import tqdm

        return tqdm(
            total=self.total,
            initial=self.start_step,
            desc=f"md {self.directory.name}",
            unit="step",
            leave=False,
            dynamic_ncols=True,
            disable=None,  # None: off when not a terminal
        )

    def _uncertainty(self, step: int) -> bool:
        """Committees: records the step's largest atomic force uncertainty; True above the threshold (and
        marks the step where a run with ``uncertainty_action: stop`` ends)."""
        if not self.committee:
            return False
        largest = float(np.max(self.atoms.calc.results[FORCES_UNCERTAINTY], initial=0.0))
        self.max_uncertainty = max(self.max_uncertainty, largest)
        threshold = self.config.uncertainty_threshold
        if threshold is None or not largest > threshold:
            return False
        if self.config.uncertainty_action == "stop":
            self.uncertain_step = step
        if (
            self.uncertain_step == step
            or step % self.config.stability.check_every == 0
            or not self._was_uncertain
        ):
            self.n_flagged += 1  # the frames flagged.extxyz receives
        return True

    def _request_stop(self, reason: str) -> None:
        self.stop_reason = reason

    def _check(self, step: int) -> StabilityFailure | None:
        energy = self.atoms.get_potential_energy()
        forces = self.atoms.get_forces()
        if self.monitor is not None:
            return self.monitor.check(self.atoms, step, step * self.dt_ps, energy, forces)
        if not (np.isfinite(energy) and np.isfinite(forces).all()):
            return StabilityFailure(step, step * self.dt_ps, "non-finite", "non-finite energy or forces")
        return None

    def _thermo_row(self, step: int) -> dict[str, float]:
        potential = float(self.atoms.get_potential_energy())
        kinetic = float(self.atoms.get_kinetic_energy())
        row = {
            "step": step,
            "time_ps": step * self.dt_ps,
            "E_pot_eV": potential,
            "E_kin_eV": kinetic,
            "T_K": temperature(kinetic, self.n_atoms),
            "E_conserved_eV": conserved_energy(self.dynamics, potential, kinetic),
        }
        if self.atoms.pbc.any():
            row[output.VOLUME_COLUMN] = float(self.atoms.get_volume())
        if self.committee:
            row[output.UNCERTAINTY_COLUMN] = float(
                np.max(self.atoms.calc.results[FORCES_UNCERTAINTY], initial=0.0)
            )
        return row

    def _write_thermo(self, step: int, bar=None) -> None:
        row = self._thermo_row(step)
        self.thermo.append(row)
        if bar is not None and not bar.disable:
            elapsed = bar.format_dict["elapsed"]
            done = step - self.start_step
            ns_per_day = done * self.config.timestep_fs * 1e-6 * 86400 / elapsed if elapsed > 0 else 0.0
            bar.set_postfix_str(f"T = {row['T_K']:.0f} K, {ns_per_day:.3g} ns/day", refresh=False)

    def _current_frame(self, step: int) -> Atoms:
        stress = None
        if "stress" in (self.atoms.calc.results or {}):
            stress = self.atoms.calc.results["stress"]
        frame = output.frame(
            self.atoms,
            self.atoms.get_potential_energy(),
            self.atoms.get_forces(),
            step,
            step * self.dt_ps,
            stress,
        )
        if self.committee:
            uncertainty = self.atoms.calc.results[FORCES_UNCERTAINTY]
            frame.arrays["forces_uncertainty"] = np.asarray(uncertainty, dtype=np.float64).copy()
            frame.info["max_force_uncertainty"] = float(np.max(uncertainty, initial=0.0))
            frame.info["energy_uncertainty"] = float(self.atoms.calc.results["energy_uncertainty"])
        return frame

    def _write_frame(self, step: int) -> None:
        self.trajectory.write(output.extxyz_text(self._current_frame(step)))

    def _take_snapshot(self, step: int) -> dict[str, Any]:
        """Everything a restart from ``step`` needs, plus the frame itself (for last_good.extxyz)."""
        reference = getattr(self.atoms.calc, "_reference", None)
        return {
            "step": step,
            "seed": self.seed,
            "ensemble": self.config.ensemble,
            "positions": self.atoms.positions.copy(),
            "momenta": self.atoms.get_momenta(),
            "cell": self.atoms.cell.array.copy(),
            "pbc": self.atoms.pbc.copy(),
            "numbers": self.atoms.numbers.copy(),
            "rng": self.rng.bit_generator.state,
            "integrator": integrator_state(self.dynamics),
            "neighbor_list_positions": reference[0].copy() if reference else np.zeros((0, 3)),
            "bond_reference_min": self.monitor.reference_min.copy() if self.monitor else np.zeros(0),
            "bond_reference_max": self.monitor.reference_max.copy() if self.monitor else np.zeros(0),
            "thermo_bytes": self.thermo.size,
            "trajectory_bytes": self.trajectory.size,
            "flagged_bytes": self.flagged.size if self.flagged is not None else 0,
            "max_uncertainty": self.max_uncertainty,
            "n_flagged": self.n_flagged,
            "was_uncertain": self._was_uncertain,
            "frame": self._current_frame(step),
        }

    def _save_state(self) -> None:
        state = {key: value for key, value in self.snapshot.items() if key != "frame"}
        output.save_state(self.directory / "restart.npz", state)

    # -- the end ---------------------------------------------------------------------------------------

    def _finish(self, failure: StabilityFailure | None, wall: float) -> TrajectoryResult:
        config = self.config
        last_good = int(self.snapshot["step"])
        if failure is not None:
            status = "unstable"
            output.write_frame(self.directory / "last_good.extxyz", self.snapshot["frame"])
            self._save_state()
            steps_done = failure.step
        elif self.uncertain_step is not None:
            status, steps_done = "uncertain", self.uncertain_step
        else:
            status = "interrupted" if self.stop_reason and last_good < self.total else "completed"
            steps_done = last_good
        thermo = output.read_thermo(self.directory / "thermo.csv")
        output.plot_thermo(
            self.directory / "thermo.png",
            thermo,
            self.n_atoms,
            None if config.ensemble == "nve" else config.temperature_K,
            conserving=config.ensemble not in NON_CONSERVING_ENSEMBLES,
        )
        done = steps_done - self.start_step
        result = TrajectoryResult(
            directory=self.directory,
            seed=self.seed,
            status=status,
            steps_done=steps_done,
            time_ps=steps_done * self.dt_ps,
            failure=failure,
            last_good_step=last_good,
            mean_temperature_K=mean_temperature(thermo),
            drift_eV_per_atom_per_ps=None
            if config.ensemble in NON_CONSERVING_ENSEMBLES
            else conserved_energy_drift(thermo, self.n_atoms),
            wall_time_s=wall,
            ns_per_day=done * config.timestep_fs * 1e-6 * 86400 / wall if wall > 0 and done > 0 else 0.0,
            restarted_from_step=self.start_step or None,
            extra={
                "ensemble": config.ensemble,
                "n_atoms": self.n_atoms,
                "degrees_of_freedom": degrees_of_freedom(self.n_atoms),
                "timestep_fs": config.timestep_fs,
                "target_steps": self.total,
                "temperature_K": config.temperature_K,
                # Builds of this process (a restarted run counts from its restart).
                "neighbor_list_builds": getattr(self.atoms.calc, "n_neighbor_list_builds", None),
                **(
                    {
                        "max_force_uncertainty_eV_per_A": self.max_uncertainty,
                        "uncertainty_threshold_eV_per_A": config.uncertainty_threshold,
                        "n_flagged_checks": self.n_flagged,
                    }
                    if self.committee
                    else {}
                ),
            },
        )
        write_json(self.directory / "summary.json", result.summary())
        self._log_end(result)
        return result

    def _log_end(self, result: TrajectoryResult) -> None:
        if result.failure is not None:
            self.log(
                f"UNSTABLE at step {result.failure.step} ({result.failure.time_ps:.4g} ps): "
                f"{result.failure.reason}; last good frame (step {result.last_good_step}) → "
                f"{self.directory / 'last_good.extxyz'}, restart state → {self.directory / 'restart.npz'}"
            )
            return
        drift = result.drift_eV_per_atom_per_ps
        if result.status == "uncertain":
            self.log(
                f"stopped at step {result.steps_done} ({result.time_ps:.4g} ps): largest atomic force "
                f"uncertainty {self.max_uncertainty:.3g} eV/Å above the threshold "
                f"{self.config.uncertainty_threshold:g} eV/Å; frame in {self.directory / 'trajectory.extxyz'}"
            )
            return
        if result.status == "interrupted":
            head = f"{self.stop_reason} at step {result.steps_done} ({result.time_ps:.4g} ps)"
        else:
            head = f"completed {result.steps_done} steps ({result.time_ps:.4g} ps)"
        self.log(
            f"{head} after {result.wall_time_s:.1f} s ({result.ns_per_day:.3g} ns/day): "
            f"<T> = {result.mean_temperature_K:.1f} K"
            + ("" if drift is None else f", conserved-energy drift {drift:.3g} eV/atom/ps")
            + ("; continue with --restart" if result.status == "interrupted" else "")
            + (
                f"; committee: largest atomic force uncertainty {self.max_uncertainty:.3g} eV/Å"
                + (f", {self.n_flagged} checks flagged" if self.flagged is not None else "")
                if self.committee
                else ""
            )
        )
