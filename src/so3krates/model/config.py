"""Validated model hyper-parameters and the named presets.

A config is data: it serialises to JSON/YAML, rejects unknown keys and inconsistent values with a message
that names the field, and is stored inside every checkpoint.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ModelConfig(BaseModel):
    """Hyper-parameters of the SO3krates model (SPEC §2). Defaults are the ``paper`` preset."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    n_features: int = Field(132, ge=4, description="F, width of the invariant features")
    n_heads: int = Field(4, ge=1, description="H, heads of the invariant attention")
    degrees: tuple[int, ...] = Field(
        (1, 2, 3),
        description="degrees l of the Euclidean variables (no l = 0); [] gives the invariant-only model",
    )
    n_layers: int = Field(3, ge=1, description="T, number of transformer layers (no weight sharing)")
    cutoff: float = Field(5.0, gt=0.0, description="r_c in Å")
    cutoff_fn: Literal["cosine", "polynomial", "exponential", "physnet"] = "cosine"
    radial_basis: Literal["physnet", "bernstein", "gaussian", "bessel"] = "physnet"
    n_rbf: int = Field(32, ge=1, description="K, number of radial basis functions")
    n_readout_features: int = Field(66, ge=1, description="F_r, hidden width of the energy readout")
    ev_init: Literal["zeros", "neighbors"] = Field(
        "zeros", description="x_i at input: zeros (reference code) or (1/N̄) Σ_j φ(d_ij) Y_ij (Eq. 11)"
    )
    use_qk_activation: bool = Field(False, description="SiLU on queries and keys")
    use_layer_norm: bool = Field(False, description="LayerNorm on h before attention and before exchange")
    use_residual_mlp: bool = Field(False, description="residual MLPs before and after the exchange block")
    layer_norm_position: Literal["before", "after"] = Field(
        "before",
        description="LayerNorms on h before attention and exchange, or after their residual sums (SO3LR)",
    )
    message_normalization: Literal["sqrt_head_dim", "avg_num_neighbors"] = Field(
        "sqrt_head_dim", description="divide attention coefficients by √(head width) or by N̄"
    )
    avg_num_neighbors: float = Field(
        1.0, gt=0.0, description="N̄, mean neighbour count of the training set (set by data statistics)"
    )
    # SO3LR (Kabylda et al. 2024, SPEC §3): inputs and physical energy terms beyond the local model.
    charge_spin_embedding: bool = Field(
        False, description="embed the total charge and spin of each structure into h (SpookyNet-style)"
    )
    zbl: bool = Field(False, description="add Ziegler–Biersack–Littmark nuclear repulsion within r_c")
    electrostatics: bool = Field(
        False, description="add erf-damped Coulomb energy of predicted charge-conserving partial charges"
    )
    dispersion: bool = Field(
        False, description="add vdW-QDO dispersion with free-atom data scaled by predicted Hirshfeld ratios"
    )
    long_range_cutoff: float = Field(12.0, gt=0.0, description="r_lr in Å, cutoff of both long-range terms")
    electrostatics_width: float = Field(4.0, gt=0.0, description="σ in Å of the erf(r/σ)/r Coulomb damping")
    dispersion_scale: float = Field(1.2, gt=0.0, description="scale of the vdW-QDO damping radius")
    dispersion_switch_width: float = Field(
        2.0, gt=0.0, description="Å; the dispersion energy is switched off over [r_lr − width, r_lr]"
    )

    @field_validator("degrees")
    @classmethod
    def _check_degrees(cls, degrees: tuple[int, ...]) -> tuple[int, ...]:
        if any(l < 1 or l > 8 for l in degrees):
            raise ValueError(
                f"degrees must lie in 1..8 (l = 0 is carried by the invariant features), got {degrees}"
            )
        if list(degrees) != sorted(set(degrees)):
            raise ValueError(f"degrees must be strictly increasing, got {degrees}")
        return degrees

    @model_validator(mode="after")
    def _check_divisibility(self) -> ModelConfig:
        f = self.n_features
        for divisor, what in (
            (self.n_heads, "n_heads"),
            (len(self.degrees), "the number of degrees"),
            (4, "4"),
        ):
            if divisor and f % divisor:
                raise ValueError(f"n_features = {f} must be divisible by {what} ({divisor})")
        return self

    @model_validator(mode="after")
    def _check_long_range(self) -> ModelConfig:
        if self.long_range and self.dispersion_switch_width >= self.long_range_cutoff:
            raise ValueError(
                f"dispersion_switch_width = {self.dispersion_switch_width} Å must be smaller than "
                f"long_range_cutoff = {self.long_range_cutoff} Å"
            )
        return self

    @property
    def so3lr(self) -> bool:
        """The model needs SO3LR's inputs or terms (total charge and spin, long-range edges)."""
        return self.charge_spin_embedding or self.zbl or self.long_range

    @property
    def long_range(self) -> bool:
        """The model has a term that needs the long-range edges (r < ``long_range_cutoff``)."""
        return self.electrostatics or self.dispersion

    @property
    def n_degrees(self) -> int:
        """D, number of degrees."""
        return len(self.degrees)

    @property
    def n_sph(self) -> int:
        """Number of spherical-harmonic components, Σ_l (2l + 1)."""
        return sum(2 * l + 1 for l in self.degrees)


PRESETS: dict[str, dict[str, Any]] = {
    # Frank et al., Nat. Commun. 2024: F = 132, H = 4, degrees 1–3, T = 3, r_c = 5 Å, 32 PhysNet functions.
    "paper": {},
    # Small and fast, for tests and quick experiments; exercises the same code paths.
    "tiny": {
        "n_features": 24,
        "n_heads": 2,
        "n_layers": 2,
        "n_rbf": 8,
        "n_readout_features": 12,
        "cutoff": 4.0,
    },
    # SO3LR (Kabylda et al. 2024): the size and settings of the published pretrained model.
    "so3lr": {
        "n_features": 128,
        "n_heads": 4,
        "degrees": (1, 2, 3, 4),
        "n_layers": 3,
        "cutoff": 4.5,
        "cutoff_fn": "physnet",
        "radial_basis": "bernstein",
        "n_rbf": 32,
        "n_readout_features": 128,
        "use_layer_norm": True,
        "use_residual_mlp": True,
        "layer_norm_position": "after",
        "message_normalization": "avg_num_neighbors",
        "charge_spin_embedding": True,
        "zbl": True,
        "electrostatics": True,
        "dispersion": True,
    },
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset with some fields overridden, e.g. ``preset("paper", cutoff=4.5)``."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
