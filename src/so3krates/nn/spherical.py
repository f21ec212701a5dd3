"""Real spherical harmonics and the per-degree contraction of Euclidean variables.

Written by hand (instead of taking e3nn) because the model needs only a handful of degrees evaluated on
edge vectors, and the closed recursion below is short, exact, and has no singularities: it evaluates the
*solid* harmonics r^l Y_lm(r̂), homogeneous polynomials in (x, y, z), so a zero vector (coincident atoms)
maps to zero for every l ≥ 1 with finite gradients, and stays exactly equivariant.

Basis: real, orthonormal on the unit sphere (∫ Y_lm² dΩ = 1), ordered m = −l..l within each degree, no
Condon–Shortley phase. Any orthonormal real basis per degree gives the same model outputs (SPEC §1).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn


def _normalisation(l: int, m: int) -> float:
    """K_lm = √((2l+1)/(4π) · (l−m)!/(l+m)!), times √2 for m ≠ 0 (real harmonics)."""
    k = math.sqrt((2 * l + 1) / (4 * math.pi) * math.factorial(l - m) / math.factorial(l + m))
    return k * (math.sqrt(2.0) if m > 0 else 1.0)


def _double_factorial(n: int) -> int:
    return math.prod(range(n, 0, -2)) if n > 0 else 1


def solid_harmonics(vectors: Tensor, l_max: int) -> list[Tensor]:
    """r^l Y_lm(r̂) for l = 0..l_max of vectors of any length.

    Associated Legendre recursion in homogeneous form, (l−m) Q_l^m = (2l−1) z Q_{l−1}^m − (l+m−1) r² Q_{l−2}^m
    with Q_m^m = (2m−1)!!, times Re/Im (x + i y)^m for the azimuthal part.

    Args:
        vectors: (..., 3) float — Cartesian vectors (unit vectors give the spherical harmonics).
        l_max: highest degree.

    Returns:
        A list over l of (..., 2l+1) tensors, m = −l..l.
    """
    x, y, z = vectors.unbind(-1)
    r2 = x * x + y * y + z * z
    # cos_m[m] = Re (x+iy)^m, sin_m[m] = Im (x+iy)^m, both homogeneous of degree m.
    cos_m, sin_m = [torch.ones_like(x)], [torch.zeros_like(x)]
    for _ in range(l_max):
        c, s = cos_m[-1], sin_m[-1]
        cos_m.append(x * c - y * s)
        sin_m.append(x * s + y * c)
    # legendre[l][m] = Q_l^m(z, r²), homogeneous of degree l − m.
    legendre: list[list[Tensor]] = [[] for _ in range(l_max + 1)]
    for m in range(l_max + 1):
        for l in range(m, l_max + 1):
            if l == m:
                q = torch.full_like(x, float(_double_factorial(2 * m - 1)))
            elif l == m + 1:
                q = (2 * m + 1) * z * legendre[m][m]
            else:
                q = ((2 * l - 1) * z * legendre[l - 1][m] - (l + m - 1) * r2 * legendre[l - 2][m]) / (l - m)
            legendre[l].append(q)
    out = []
    for l in range(l_max + 1):
        components = []
        for m in range(-l, l + 1):
            value = _normalisation(l, abs(m)) * legendre[l][abs(m)]
            if m > 0:
                value = value * cos_m[m]
            elif m < 0:
                value = value * sin_m[-m]
            components.append(value)
        out.append(torch.stack(components, dim=-1))
    return out


Monomial = tuple[int, int, int]
Polynomial = dict[Monomial, float]


def _add(*terms: tuple[float, Polynomial]) -> Polynomial:
    out: Polynomial = {}
    for factor, polynomial in terms:
        for monomial, coefficient in polynomial.items():
            out[monomial] = out.get(monomial, 0.0) + factor * coefficient
    return out


def _multiply(p: Polynomial, q: Polynomial) -> Polynomial:
    out: Polynomial = {}
    for (a, b, c), u in p.items():
        for (d, e, f), v in q.items():
            key = (a + d, b + e, c + f)
            out[key] = out.get(key, 0.0) + u * v
    return out


def harmonic_polynomials(l_max: int) -> list[list[Polynomial]]:
    """The solid harmonics of :func:`solid_harmonics` as polynomials {(a, b, c): coefficient of x^a y^b z^c}.

    Same recursion, carried out on coefficients instead of tensors: out[l][m + l] is r^l Y_lm.
    """
    x, y, z = {(1, 0, 0): 1.0}, {(0, 1, 0): 1.0}, {(0, 0, 1): 1.0}
    r2 = {(2, 0, 0): 1.0, (0, 2, 0): 1.0, (0, 0, 2): 1.0}
    cos_m, sin_m = [{(0, 0, 0): 1.0}], [{}]
    for _ in range(l_max):
        c, s = cos_m[-1], sin_m[-1]
        cos_m.append(_add((1.0, _multiply(x, c)), (-1.0, _multiply(y, s))))
        sin_m.append(_add((1.0, _multiply(x, s)), (1.0, _multiply(y, c))))
    legendre: list[list[Polynomial]] = [[] for _ in range(l_max + 1)]
    for m in range(l_max + 1):
        for l in range(m, l_max + 1):
            if l == m:
                q = {(0, 0, 0): float(_double_factorial(2 * m - 1))}
            elif l == m + 1:
                q = _add((2 * m + 1.0, _multiply(z, legendre[m][m])))
            else:
                q = _add(
                    ((2 * l - 1) / (l - m), _multiply(z, legendre[l - 1][m])),
                    (-(l + m - 1) / (l - m), _multiply(r2, legendre[l - 2][m])),
                )
            legendre[l].append(q)
    out = []
    for l in range(l_max + 1):
        row = []
        for m in range(-l, l + 1):
            azimuthal = cos_m[m] if m > 0 else sin_m[-m] if m < 0 else {(0, 0, 0): 1.0}
            row.append(_add((_normalisation(l, abs(m)), _multiply(legendre[l][abs(m)], azimuthal))))
        out.append(row)
    return out


class SphericalHarmonics(nn.Module):
    """Y_ij = ⊕_l Y_l(r̂_ij) ∈ R^{n_sph} for the degrees in ``degrees`` (SPEC §2).

    Evaluated as one product: the monomials x^a y^b z^c of each needed degree (built degree by degree, one
    outer product and one gather each) times a constant coefficient matrix from
    :func:`harmonic_polynomials`. That is a handful of kernels instead of the recursion's ~60, which
    matters when a 9-atom molecule's forward and backward passes are all dispatch; the recursion
    (:func:`solid_harmonics`) stays the reference that a test compares against.
    """

    def __init__(self, degrees: Sequence[int]) -> None:
        super().__init__()
        self.degrees = tuple(degrees)
        self.l_max = max(self.degrees, default=0)
        polynomials = harmonic_polynomials(self.l_max)
        # monomials[l]: exponents of the distinct monomials of degree l, in the order the gathers make them.
        monomials: list[list[Monomial]] = [[(0, 0, 0)], [(1, 0, 0), (0, 1, 0), (0, 0, 1)]]
        for l in range(2, self.l_max + 1):
            products = [(a + d, b + e, c + f) for a, b, c in monomials[-1] for d, e, f in monomials[1]]
            first = {}
            for column, monomial in enumerate(products):
                first.setdefault(monomial, column)
            monomials.append(list(first))
            self.register_buffer(f"gather_{l}", torch.tensor(list(first.values())), persistent=False)
        used = [monomial for l in self.degrees for monomial in monomials[l]]
        coefficients = torch.zeros(len(used), sum(2 * l + 1 for l in self.degrees), dtype=torch.float64)
        row, column = 0, 0
        for l in self.degrees:
            for m_index, polynomial in enumerate(polynomials[l]):
                for k, monomial in enumerate(monomials[l]):
                    coefficients[row + k, column + m_index] = polynomial.get(monomial, 0.0)
            row, column = row + len(monomials[l]), column + 2 * l + 1
        self.register_buffer("coefficients", coefficients, persistent=False)  # (n_monomials, n_sph)
        # The same polynomials term by term, for component_wise(): per component [(coefficient, monomial)].
        self.terms = [
            [(c, monomial) for monomial, c in sorted(polynomial.items()) if abs(c) > 1e-12]
            for l in self.degrees
            for polynomial in polynomials[l]
        ]

    def forward(self, unit_vectors: Tensor) -> Tensor:
        """unit_vectors: (n_edges, 3) float (unit, or zero for d = 0) → (n_edges, n_sph) float."""
        if not self.degrees:  # the invariant-only model
            return unit_vectors.new_zeros((unit_vectors.shape[0], 0))
        if getattr(_tracing, "component_wise", False):
            return self._component_wise(unit_vectors)
        by_degree = [None, unit_vectors]
        for l in range(2, self.l_max + 1):
            outer = (by_degree[-1][:, :, None] * unit_vectors[:, None, :]).flatten(1)
            by_degree.append(outer.index_select(1, getattr(self, f"gather_{l}")))
        monomials = (
            torch.cat([by_degree[l] for l in self.degrees], dim=1)
            if len(self.degrees) > 1
            else (by_degree[self.degrees[0]])
        )
        return monomials @ self.coefficients.to(unit_vectors.dtype)

    def _component_wise(self, unit_vectors: Tensor) -> Tensor:
        """Each component as its polynomial in the columns x, y, z (elementwise products and sums only)."""
        columns = unit_vectors.unbind(1)
        powers: dict[Monomial, Tensor] = {}

        def monomial(exponents: Monomial) -> Tensor:
            if exponents not in powers:  # x^a y^b z^c from the monomial with one power less
                axis = next(k for k in (2, 1, 0) if exponents[k] > 0)
                lower = tuple(e - (k == axis) for k, e in enumerate(exponents))
                powers[exponents] = columns[axis] if sum(lower) == 0 else monomial(lower) * columns[axis]
            return powers[exponents]

        components = []
        for terms in self.terms:
            total = None
            for coefficient, exponents in terms:
                term = coefficient * monomial(exponents)
                total = term if total is None else total + term
            components.append(total)
        return torch.stack(components, dim=1)


_tracing = threading.local()  # component_wise() of this thread


@contextlib.contextmanager
def component_wise() -> Iterator[None]:
    """While tracing a compiled program: :class:`SphericalHarmonics` evaluates each component as its own
    polynomial in x, y and z, a few dozen elementwise products and sums over the edges, instead of the
    monomials times a coefficient matrix. Eagerly that is a few dozen dispatched calls (the product form
    is a handful); in a program inductor fuses them into one loop over the edges, vectorised along the
    edges, where the product form's gathers of monomials run along rows of 3 to 10 entries (892 edges,
    forward and backward in float32 on one thread: ~60 → ~20 µs). :meth:`DegreeContraction.expand` likewise
    repeats each degree's value by broadcasting instead of gathering. For the calling thread only."""
    before = getattr(_tracing, "component_wise", False)
    _tracing.component_wise = True
    try:
        yield
    finally:
        _tracing.component_wise = before


class DegreeContraction(nn.Module):
    """c_l(x) = Σ_m x_lm² / √(2l+1): one invariant per degree (the l = 0 part of x ⊗ x, SPEC §1).

    Also expands per-degree scalars back to the n_sph components (``expand``), e.g. to scale each degree of
    a Euclidean variable (Eq. 25) or to weight spherical harmonics per degree.
    """

    def __init__(self, degrees: Sequence[int]) -> None:
        super().__init__()
        degrees = tuple(degrees)
        n_sph = sum(2 * l + 1 for l in degrees)
        degree_index = torch.cat(
            [torch.full((2 * l + 1,), k, dtype=torch.long) for k, l in enumerate(degrees)]
            + [torch.zeros(0, dtype=torch.long)]  # no degrees at all (the invariant-only model) works too
        )
        weights = torch.zeros(n_sph, len(degrees), dtype=torch.float64)
        weights[torch.arange(n_sph), degree_index] = torch.tensor(
            [1.0 / math.sqrt(2 * degrees[k] + 1) for k in degree_index.tolist()], dtype=torch.float64
        )
        self.register_buffer("degree_index", degree_index, persistent=False)  # (n_sph,) int64
        self.register_buffer("weights", weights, persistent=False)  # (n_sph, n_degrees)
        self.n_sph = n_sph
        self.n_degrees = len(degrees)
        self.widths = [2 * l + 1 for l in degrees]

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., n_sph) → (..., n_degrees) invariants."""
        return (x * x) @ self.weights.to(x.dtype)

    def expand(self, per_degree: Tensor) -> Tensor:
        """per_degree: (..., n_degrees) → (..., n_sph), each value repeated over its 2l+1 components.

        Under :func:`component_wise` (tracing a compiled program), as the degrees' values broadcast over
        their components side by side: inductor then writes the repeat with masks inside the loops that use
        it, where the gather by ``degree_index`` became one indirect load per component through a buffer
        (3BPA: the loop that gathers both atoms' updated Euclidean variables per pair, ~13 of its ~25 µs)."""
        if getattr(_tracing, "component_wise", False) and self.n_degrees > 0:
            parts = [
                per_degree[..., k : k + 1].expand(*per_degree.shape[:-1], width)
                for k, width in enumerate(self.widths)
            ]
            return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
        return per_degree.index_select(-1, self.degree_index)
