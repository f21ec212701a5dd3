"""Physical energy terms of SO3LR (Kabylda et al., "Molecular simulations with a pretrained neural network
and universal pairwise force fields", 2024; SPEC §3), each a function of edge lengths and per-atom inputs.

- :class:`ZBLRepulsion` — screened nuclear repulsion at short distances (Ziegler, Biersack & Littmark 1985),
  with learnable screening parameters.
- :class:`PartialCharges` / :func:`dipole_moment` — charges that sum exactly to the total charge.
- :class:`Electrostatics` — erf-damped Coulomb energy with a smooth shifted-force cutoff.
- :class:`HirshfeldRatios` / :class:`Dispersion` — vdW-QDO dispersion (Khabibrakhmanov, Fedorov & Tkatchenko,
  J. Chem. Theory Comput. 19, 7895, 2023) from free-atom data scaled by predicted Hirshfeld volume ratios.

ZBL acts on the short-range edges, which hold both directions of every pair (the network's full neighbour
list): each direction counts half. The long-range terms act on a list with every pair once (half the
edges) and give each atom half of every pair energy. All terms are evaluated in the dtype of the distances
(float64 geometry in this package), whatever the network's dtype.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from so3krates.nn.embedding import N_ELEMENTS
from so3krates.nn.free_atoms import FREE_ATOM_C6, FREE_ATOM_POLARIZABILITY
from so3krates.ops.scatter import scatter_sum
from so3krates.units import BOHR, COULOMB_CONSTANT, FINE_STRUCTURE, HARTREE


def smooth_switch(distances: Tensor, switch_on: float, switch_off: float) -> Tensor:
    """1 below ``switch_on``, 0 above ``switch_off``, C^∞ in between: s(c) = g(1 − c) / (g(1 − c) + g(c))
    with g(t) = exp(−1/t) for t > 0, else 0, and c = (d − on) / (off − on)."""
    c = (distances - switch_on) / (switch_off - switch_on)

    def g(t: Tensor) -> Tensor:
        positive = t > 0
        # exp(−1/t) only where t > 0; a safe argument elsewhere keeps the unused branch's gradient finite.
        return torch.where(positive, torch.exp(-1.0 / torch.where(positive, t, torch.ones_like(t))), 0.0)

    rising, falling = g(c), g(1.0 - c)
    return falling / (falling + rising)


class ZBLRepulsion(nn.Module):
    """E_ij = ½ s(d) φ(d) k_e Z_i Z_j / d · Σ_k c_k exp(−a_k d (Z_i^p + Z_j^p) / b), summed over edges into i.

    Universal ZBL screening with its published constants as the initial values (c_k, a_k, p = 0.23 and the
    screening length b = 0.8854 a₀); all are learnable and kept positive through a softplus, the c_k are
    normalised to sum to one. s switches the term off between 0 and 1.5 Å, φ is the model's cutoff function.
    """

    INITIAL: ClassVar[dict[str, Any]] = {
        "a": (3.2, 0.9423, 0.4028, 0.2016),
        "c": (0.1818, 0.5099, 0.2802, 0.02817),
        "p": 0.23,
        "inverse_length": 1.0 / (0.8854 * BOHR),  # 1/Å
    }
    SWITCH_OFF = 1.5  # Å

    def __init__(self) -> None:
        super().__init__()

        def raw(values) -> nn.Parameter:  # the inverse of softplus, so that softplus(raw) = value
            value = torch.as_tensor(values, dtype=torch.float32)
            return nn.Parameter(value + torch.log(-torch.expm1(-value)))

        self.a = raw(self.INITIAL["a"])  # (4,)
        self.c = raw(self.INITIAL["c"])  # (4,)
        self.p = raw(self.INITIAL["p"])  # ()
        self.inverse_length = raw(self.INITIAL["inverse_length"])  # ()

    def forward(
        self, distances: Tensor, cutoff: Tensor, atomic_numbers: Tensor, idx_i: Tensor, idx_j: Tensor
    ) -> Tensor:
        """distances, cutoff: (n_edges,) Å and φ(d); atomic_numbers: (n_atoms,) → (n_atoms,) eV."""
        dtype = distances.dtype
        a, c = F.softplus(self.a).to(dtype), F.softplus(self.c).to(dtype)
        p, inverse_length = F.softplus(self.p).to(dtype), F.softplus(self.inverse_length).to(dtype)
        c = c / c.sum()
        z = atomic_numbers.to(dtype)
        z_i, z_j = z.index_select(0, idx_i), z.index_select(0, idx_j)
        coulomb = COULOMB_CONSTANT * cutoff * z_i * z_j / distances.clamp_min(1e-6)
        scaled = (distances * (z_i**p + z_j**p) * inverse_length)[:, None]
        screening = (c * torch.exp(-a * scaled)).sum(dim=1)
        pair = 0.5 * smooth_switch(distances, 0.0, self.SWITCH_OFF) * coulomb * screening
        return scatter_sum(pair, idx_i, atomic_numbers.shape[0])


class PartialCharges(nn.Module):
    """q_i = q̃_i + (Q − Σ_{j ∈ structure} q̃_j) / N, q̃_i = MLP(h_i) + q_Z: charges that sum to the total Q.

    Args:
        n_features: width of h; n_hidden: hidden width of the MLP.
    """

    def __init__(self, n_features: int, n_hidden: int) -> None:
        super().__init__()
        self.element = nn.Embedding(N_ELEMENTS, 1)  # q_Z, row Z
        self.mlp = nn.Sequential(nn.Linear(n_features, n_hidden), nn.SiLU(), nn.Linear(n_hidden, 1))

    def forward(
        self, h: Tensor, atomic_numbers: Tensor, total_charge: Tensor, batch: Tensor, n_graphs: int
    ) -> Tensor:
        """h: (n_atoms, F); total_charge: (n_graphs,) e → (n_atoms,) e, in the dtype of ``total_charge``."""
        raw = (self.mlp(h).squeeze(-1) + self.element(atomic_numbers).squeeze(-1)).to(total_charge.dtype)
        n_atoms = scatter_sum(torch.ones_like(raw), batch, n_graphs)
        excess = (total_charge - scatter_sum(raw, batch, n_graphs)) / n_atoms.clamp_min(1.0)
        return raw + excess.index_select(0, batch)


def split_between_atoms(pair: Tensor, idx_i: Tensor, idx_j: Tensor, n_atoms: int) -> Tensor:
    """Atomic energies (n_atoms,) from the energies of pairs listed once: half of each to either atom."""
    return 0.5 * (scatter_sum(pair, idx_i, n_atoms) + scatter_sum(pair, idx_j, n_atoms))


def dipole_moment(charges: Tensor, positions: Tensor, batch: Tensor, n_graphs: int) -> Tensor:
    """μ = Σ_i q_i R_i per structure: (n_graphs, 3), e · Å (origin-independent for neutral structures)."""
    return scatter_sum(charges[:, None] * positions.to(charges.dtype), batch, n_graphs)


class Electrostatics(nn.Module):
    """E_ij = k_e q_i q_j V_sf(d_ij) for every pair with d < r_lr (listed once), V(d) = erf(d/σ) / d.

    V_sf(d) = s(d) [V(d) − V(r_lr)] + (1 − s(d)) [V(d) − V(r_lr) − V'(r_lr)(d − r_lr)], with the switch s
    going from 1 at 0.45 r_lr to 0 at r_lr: the plain (shifted) potential at short range, the shifted-force
    form, whose value and slope vanish at r_lr, near the cutoff.

    Args:
        width: σ in Å; cutoff: r_lr in Å.
    """

    SWITCH_ON = 0.45  # fraction of r_lr

    def __init__(self, width: float, cutoff: float) -> None:
        super().__init__()
        self.width, self.cutoff = float(width), float(cutoff)
        r, s = self.cutoff, self.width
        self.value_at_cutoff = math.erf(r / s) / r
        self.slope_at_cutoff = (
            2.0 * r * math.exp(-((r / s) ** 2)) / (math.sqrt(math.pi) * s) - math.erf(r / s)
        ) / r**2

    def forward(self, distances: Tensor, charges: Tensor, idx_i: Tensor, idx_j: Tensor) -> Tensor:
        """distances: (n_pairs,) Å of the long-range pairs; charges: (n_atoms,) e → (n_atoms,) eV."""
        inside = distances < self.cutoff
        d = torch.where(inside, distances, torch.full_like(distances, self.cutoff)).clamp_min(1e-12)
        potential = torch.erf(d / self.width) / d - self.value_at_cutoff
        switch = smooth_switch(d, self.SWITCH_ON * self.cutoff, self.cutoff)
        shifted = potential - self.slope_at_cutoff * (d - self.cutoff) * (1.0 - switch)
        pair = COULOMB_CONSTANT * charges.index_select(0, idx_i) * charges.index_select(0, idx_j) * shifted
        return split_between_atoms(torch.where(inside, pair, 0.0), idx_i, idx_j, charges.shape[0])


class HirshfeldRatios(nn.Module):
    """v_i = |v_Z + Σ_k q_Z,k MLP(h_i)_k / √(F/2)|: Hirshfeld volume ratios (free atom: 1), one per atom.

    Args:
        n_features: width F of h; n_hidden: the MLP's hidden width is n_hidden / 2, its output F / 2.
    """

    def __init__(self, n_features: int, n_hidden: int) -> None:
        super().__init__()
        self.shift = nn.Embedding(N_ELEMENTS, 1)  # v_Z, row Z
        self.query = nn.Embedding(N_ELEMENTS, n_features // 2)  # q_Z, row Z
        self.mlp = nn.Sequential(
            nn.Linear(n_features, n_hidden // 2), nn.SiLU(), nn.Linear(n_hidden // 2, n_features // 2)
        )

    def forward(self, h: Tensor, atomic_numbers: Tensor) -> Tensor:
        """h: (n_atoms, F) → (n_atoms,) dimensionless."""
        keys = self.mlp(h)
        product = (self.query(atomic_numbers) * keys).sum(dim=-1) / math.sqrt(keys.shape[-1])
        return (self.shift(atomic_numbers).squeeze(-1) + product).abs()


class Dispersion(nn.Module):
    """vdW-QDO dispersion: E_ij = s(d_ij) E_QDO(d_ij) for every pair with d < r_lr (listed once;
    Khabibrakhmanov et al. 2023).

    Per atom α_i = α⁰_Z v_i and C₆,i = C₆,Z v_i² (free-atom data in :mod:`so3krates.nn.free_atoms`, v the
    Hirshfeld ratio); per pair α_ij = (α_i + α_j)/2 and C₆,ij = 2 C₆,i C₆,j α_i α_j / (α_i² C₆,j + α_j² C₆,i);
    the QDO frequency parameter γ_ij = 1 / (2 σ²) with σ a cubic fit in R_vdW = α_fs^(−4/21) α_ij^(1/7);
    C₈ = 5 C₆ / γ, C₁₀ = 245/8 C₆ / γ²; E_QDO = −Σ_{n=6,8,10} C_n / (R^n + ρ^n) with ρ = 2 · 2.54 · scale ·
    α_ij^(1/7), everything in atomic units. s switches off over [r_lr − width, r_lr].

    Args:
        scale: the damping-radius scale; cutoff: r_lr in Å; switch_width: Å.
    """

    #: σ(R_vdW) = b₀ + b₁ R + b₂ R² + b₃ R³, bohr (Khabibrakhmanov et al. 2023).
    SIGMA_FIT = (-0.00433008, 0.24428889, 0.04125273, -0.00078893)

    def __init__(self, scale: float, cutoff: float, switch_width: float) -> None:
        super().__init__()
        self.scale, self.cutoff, self.switch_width = float(scale), float(cutoff), float(switch_width)
        # Row Z (row 0 unused), float64 always: the tables are data, not parameters.
        polarizability = torch.tensor((0.0, *FREE_ATOM_POLARIZABILITY), dtype=torch.float64)
        c6 = torch.tensor((0.0, *FREE_ATOM_C6), dtype=torch.float64)
        self.register_buffer("free_polarizability", polarizability, persistent=False)
        self.register_buffer("free_c6", c6, persistent=False)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) would cast the reference tables; keep them float64, follow device moves.
        tables = self.free_polarizability, self.free_c6
        module = super()._apply(fn, recurse)
        device = self.free_c6.device
        self.free_polarizability, self.free_c6 = (t.to(device=device, dtype=torch.float64) for t in tables)
        return module

    def forward(
        self, distances: Tensor, ratios: Tensor, atomic_numbers: Tensor, idx_i: Tensor, idx_j: Tensor
    ) -> Tensor:
        """distances: (n_pairs,) Å of the long-range pairs; ratios: (n_atoms,) → (n_atoms,) eV."""
        dtype = distances.dtype
        ratios = ratios.to(dtype)
        alpha = self.free_polarizability.to(dtype).index_select(0, atomic_numbers) * ratios
        c6 = self.free_c6.to(dtype).index_select(0, atomic_numbers) * ratios**2
        alpha_i, alpha_j = alpha.index_select(0, idx_i), alpha.index_select(0, idx_j)
        c6_i, c6_j = c6.index_select(0, idx_i), c6.index_select(0, idx_j)
        alpha_ij = 0.5 * (alpha_i + alpha_j)
        c6_ij = 2.0 * c6_i * c6_j * alpha_i * alpha_j / (alpha_i**2 * c6_j + alpha_j**2 * c6_i)
        seventh_root = alpha_ij ** (1.0 / 7.0)
        radius = FINE_STRUCTURE ** (-4.0 / 21.0) * seventh_root
        b0, b1, b2, b3 = self.SIGMA_FIT
        sigma = b0 + radius * (b1 + radius * (b2 + radius * b3))
        inverse_gamma = 2.0 * sigma**2  # 1/γ
        rho2 = (self.scale * 2.0 * 2.54 * seventh_root) ** 2
        rho6 = rho2**3
        r2 = (distances / BOHR) ** 2
        r6 = r2**3
        energy = -c6_ij * (
            1.0 / (r6 + rho6)
            + 5.0 * inverse_gamma / (r6 * r2 + rho6 * rho2)
            + 245.0 / 8.0 * inverse_gamma**2 / (r6 * r2 * r2 + rho6 * rho2 * rho2)
        )
        switch = smooth_switch(distances, self.cutoff - self.switch_width, self.cutoff)
        pair = torch.where(distances < self.cutoff, HARTREE * energy * switch, 0.0)
        return split_between_atoms(pair, idx_i, idx_j, ratios.shape[0])
