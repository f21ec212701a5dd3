"""The molecular-dynamics configuration: what to simulate, how, for how long, and what to write.

Unknown keys and wrong types are refused with one line naming the key (``load_md_config``); defaults are
the ones ``so3krates md --help`` shows. Times are in fs (the timestep, thermostat and barostat damping) or
ps (the run length), temperatures in K, pressures in bar, lengths in Å.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from so3krates.errors import ConfigError, format_validation_error

Ensemble = Literal["nve", "langevin", "nose-hoover", "bussi", "npt"]

#: ensembles whose integrator has no conserved quantity (its drift is not reported).
NON_CONSERVING_ENSEMBLES = ("langevin",)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StabilityConfig(_Section):
    """When a trajectory counts as broken (Fu et al. 2023, "Forces are not enough", arXiv:2210.07237)."""

    enabled: bool = Field(True, description="stop a run whose structure broke apart")
    check_every: int = Field(10, ge=1, description="steps between checks (and in-memory snapshots)")
    max_bond_deviation: float = Field(
        0.5, gt=0.0, description="Å — a bond further than this outside its reference range breaks the run"
    )
    bond_scale: float = Field(
        1.2, gt=0.0, description="atoms closer than bond_scale × (sum of covalent radii) are bonded"
    )
    min_distance: float = Field(0.5, ge=0.0, description="Å — two atoms closer than this overlap")
    reference_steps: int = Field(
        0, ge=0, description="bond ranges are the min/max over the checks up to this step (0: first frame)"
    )


class MDConfig(_Section):
    """One molecular-dynamics run (or ``replicas`` independent runs) of a trained model through ASE."""

    model: Path = Field(
        description="checkpoint, e.g. RUN/best.pt, or a committee: a directory of member_*/best.pt"
    )
    structure: Path = Field(description="start structure: any file ase.io.read reads (extxyz, xyz, cif, ...)")
    frame: int = Field(0, description="frame of the structure file (negative counts from the end)")
    ensemble: Ensemble = "nve"
    temperature_K: float = Field(
        300.0, ge=0.0, description="K — thermostat target and Maxwell–Boltzmann start temperature"
    )
    timestep_fs: float = Field(0.5, gt=0.0, description="fs")
    n_steps: int | None = Field(None, ge=0, description="steps to run (default 1000 unless time_ps)")
    time_ps: float | None = Field(None, ge=0.0, description="ps to run, instead of n_steps")
    friction_per_fs: float = Field(0.01, gt=0.0, description="1/fs — Langevin friction (0.01 = 10 /ps)")
    tdamp_fs: float | None = Field(
        None, gt=0.0, description="fs — thermostat time (Nosé–Hoover, Bussi, NPT); default 100 × timestep"
    )
    tchain: int = Field(3, ge=1, description="Nosé–Hoover chain length")
    pressure_bar: float = Field(1.0, description="bar — NPT target pressure")
    pdamp_fs: float | None = Field(
        None, gt=0.0, description="fs — NPT barostat time; default 1000 × timestep"
    )
    barostat: Literal["isotropic", "anisotropic"] = Field(
        "isotropic", description="NPT: volume only (IsotropicMTKNPT) or the full cell (MTKNPT)"
    )
    seed: int = Field(0, ge=0, description="seed of the velocities and of the thermostat noise")
    velocities: Literal["maxwell-boltzmann", "file", "zero"] = Field(
        "maxwell-boltzmann", description="initial velocities; total momentum is always removed"
    )
    trajectory_every: int = Field(10, ge=1, description="steps between trajectory frames")
    thermo_every: int = Field(10, ge=1, description="steps between thermo.csv rows")
    restart_every: int = Field(1000, ge=1, description="steps between restart.npz writes")
    output_dir: Path = Field(Path("runs/md"), description="run directory")
    dtype: Literal["float32", "float64"] = "float64"
    device: str = "cpu"
    threads: int | None = Field(None, ge=1, description="torch threads; default: torch's choice")
    skin: float = Field(0.5, ge=0.0, description="Å — neighbour-list skin of the calculator")
    compile: Literal["none", "inductor", "aoti"] = Field(
        "none",
        description="inductor: torch.compile (~1 min at every start); aoti: one ahead-of-time compiled "
        "program for forces (~1 min once per model, cached; fastest on CPUs)",
    )

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_flag(cls, value: object) -> object:
        # Older configs and restart files say true/false.
        return ("inductor" if value else "none") if isinstance(value, bool) else value

    replicas: int = Field(1, ge=1, description="independent runs with seeds seed … seed + replicas − 1")
    uncertainty_threshold: float | None = Field(
        None,
        gt=0.0,
        description="eV/Å — committees: a frame whose largest atomic force uncertainty exceeds this is "
        "flagged (written to flagged.extxyz: the first frame of every excursion above it, then one every "
        "check_every steps) or stops the run (uncertainty_action)",
    )
    uncertainty_action: Literal["flag", "stop"] = Field(
        "flag", description="committees: what a frame above uncertainty_threshold does"
    )
    progress: bool = Field(True, description="progress bar with ns/day (only on a terminal)")
    stability: StabilityConfig = Field(default_factory=StabilityConfig)

    @model_validator(mode="after")
    def _one_length(self) -> MDConfig:
        if self.n_steps is not None and self.time_ps is not None:
            raise ValueError("give n_steps or time_ps, not both")
        return self

    @model_validator(mode="after")
    def _stop_needs_threshold(self) -> MDConfig:
        if self.uncertainty_action == "stop" and self.uncertainty_threshold is None:
            raise ValueError("uncertainty_action 'stop' needs an uncertainty_threshold")
        return self

    @property
    def total_steps(self) -> int:
        """Steps of each run: ``n_steps``, or ``time_ps`` / ``timestep_fs`` rounded, or 1000."""
        if self.n_steps is not None:
            return self.n_steps
        if self.time_ps is not None:
            return round(1000.0 * self.time_ps / self.timestep_fs)
        return 1000

    @property
    def thermostat_time_fs(self) -> float:
        return self.tdamp_fs if self.tdamp_fs is not None else 100.0 * self.timestep_fs

    @property
    def barostat_time_fs(self) -> float:
        return self.pdamp_fs if self.pdamp_fs is not None else 1000.0 * self.timestep_fs


def load_md_config(values: dict[str, Any], source: str = "md options") -> MDConfig:
    """Validates ``values`` (a nested ``stability`` dict allowed); ``ConfigError`` names a bad key."""
    try:
        return MDConfig.model_validate(values)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, source)) from None
