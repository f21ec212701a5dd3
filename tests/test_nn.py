"""Layer-level tests: spherical harmonics, contraction, radial bases, cutoff functions, scatter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import random_rotation
from so3krates.nn.cutoff import CUTOFF_FUNCTIONS
from so3krates.nn.radial import RADIAL_BASES
from so3krates.nn.spherical import DegreeContraction, SphericalHarmonics, component_wise, solid_harmonics
from so3krates.ops.scatter import scatter_sum

L_MAX = 6


def _sphere_quadrature(n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss–Legendre in cos θ × uniform φ: exact for spherical polynomials of degree < 2n."""
    cos_theta, weights = np.polynomial.legendre.leggauss(n)
    phi = np.arange(2 * n) * np.pi / n
    ct, ph = np.meshgrid(cos_theta, phi, indexing="ij")
    st = np.sqrt(1 - ct**2)
    points = np.stack([st * np.cos(ph), st * np.sin(ph), ct], -1).reshape(-1, 3)
    w = np.outer(weights, np.full(2 * n, np.pi / n)).ravel()
    return torch.tensor(points, dtype=torch.float64), torch.tensor(w, dtype=torch.float64)


def test_spherical_harmonics_are_orthonormal_on_the_sphere():
    points, weights = _sphere_quadrature()
    y = torch.cat(solid_harmonics(points, L_MAX), dim=-1)  # includes l = 0
    gram = (y.T * weights) @ y
    np.testing.assert_allclose(gram.numpy(), np.eye(y.shape[1]), atol=1e-12)


def test_spherical_harmonics_are_equivariant():
    """Y_l(R r) = D_l(R) Y_l(r) with D_l orthogonal, for each degree separately."""
    rng = np.random.default_rng(0)
    rotation = torch.tensor(random_rotation(rng))
    points = torch.nn.functional.normalize(torch.tensor(rng.normal(size=(200, 3))), dim=-1)
    before = solid_harmonics(points, L_MAX)
    after = solid_harmonics(points @ rotation.T, L_MAX)
    for l in range(L_MAX + 1):
        wigner = torch.linalg.lstsq(before[l], after[l]).solution.T  # after = before @ D^T
        np.testing.assert_allclose((before[l] @ wigner.T).numpy(), after[l].numpy(), atol=1e-10)
        np.testing.assert_allclose((wigner @ wigner.T).numpy(), np.eye(2 * l + 1), atol=1e-10)


@pytest.mark.parametrize("degrees", [(1,), (2,), (1, 2, 3), (1, 2, 3, 4), (2, 5, 8)])
def test_monomial_harmonics_equal_the_recursion(degrees):
    """The module's one-product evaluation against the reference recursion, at any length of vector."""
    vectors = torch.randn(100, 3, dtype=torch.float64) * 3.0
    reference = solid_harmonics(vectors, max(degrees))
    expected = torch.cat([reference[l] for l in degrees], dim=-1)
    np.testing.assert_allclose(SphericalHarmonics(degrees)(vectors).numpy(), expected.numpy(), atol=1e-11)
    # Component by component (what compiled programs trace): the same values and gradients.
    vectors.requires_grad_(True)
    weights = torch.randn(expected.shape, dtype=torch.float64)
    with component_wise():
        y = SphericalHarmonics(degrees)(vectors)
    np.testing.assert_allclose(y.detach().numpy(), expected.numpy(), atol=1e-11)
    (grad,) = torch.autograd.grad((y * weights).sum(), vectors)
    (grad_reference,) = torch.autograd.grad((SphericalHarmonics(degrees)(vectors) * weights).sum(), vectors)
    np.testing.assert_allclose(grad.numpy(), grad_reference.numpy(), atol=1e-10)


def test_degree_one_is_proportional_to_the_unit_vector():
    points = torch.nn.functional.normalize(torch.randn(10, 3, dtype=torch.float64), dim=-1)
    y1 = SphericalHarmonics([1])(points)
    np.testing.assert_allclose(
        y1.numpy(), np.sqrt(3 / (4 * np.pi)) * points[:, [1, 2, 0]].numpy(), atol=1e-14
    )


def test_zero_vector_gives_zero_harmonics_with_finite_second_derivatives():
    vector = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    y = SphericalHarmonics([1, 2, 3, 4])(vector)
    assert torch.all(y == 0)
    (grad,) = torch.autograd.grad(y.square().sum() + y.sum(), vector, create_graph=True)
    (second,) = torch.autograd.grad(grad.sum(), vector)
    assert torch.isfinite(grad).all() and torch.isfinite(second).all()


def test_contraction_is_rotation_invariant_and_expands_back():
    degrees = (1, 2, 3)
    contraction = DegreeContraction(degrees).double()
    sph = SphericalHarmonics(degrees)
    rng = np.random.default_rng(1)
    rotation = torch.tensor(random_rotation(rng))
    points = torch.tensor(rng.normal(size=(7, 3)))
    coefficients = torch.tensor(rng.normal(size=(7, 1)))
    x = (coefficients * sph(torch.nn.functional.normalize(points, dim=-1))).sum(0)  # a Euclidean variable
    x_rotated = (coefficients * sph(torch.nn.functional.normalize(points @ rotation.T, dim=-1))).sum(0)
    np.testing.assert_allclose(contraction(x).numpy(), contraction(x_rotated).numpy(), atol=1e-12)
    # c_l(Y(r̂)) = Σ_m Y_lm² / √(2l+1) = √(2l+1) / (4π) by the addition theorem.
    single = contraction(sph(torch.nn.functional.normalize(points[:1], dim=-1)))
    expected = [np.sqrt(2 * l + 1) / (4 * np.pi) for l in degrees]
    np.testing.assert_allclose(single[0].numpy(), expected, atol=1e-12)
    expanded = contraction.expand(torch.tensor([1.0, 2.0, 3.0]))
    assert expanded.tolist() == [1.0] * 3 + [2.0] * 5 + [3.0] * 7


@pytest.mark.parametrize("degrees", [(1, 2, 3), (2,), (1, 3, 4)])
def test_contraction_expands_the_same_component_wise(degrees):
    """What compiled programs trace (broadcasts side by side) equals the gather, values and gradients."""
    contraction = DegreeContraction(degrees).double()
    per_degree = torch.randn(4, 6, len(degrees), dtype=torch.float64, requires_grad=True)
    weights = torch.randn(4, 6, contraction.n_sph, dtype=torch.float64)
    expected = contraction.expand(per_degree)
    with component_wise():
        expanded = contraction.expand(per_degree)
    assert torch.equal(expanded, expected)
    (grad,) = torch.autograd.grad((expanded * weights).sum(), per_degree)
    (grad_reference,) = torch.autograd.grad((expected * weights).sum(), per_degree)
    np.testing.assert_allclose(grad.numpy(), grad_reference.numpy(), atol=1e-12)


@pytest.mark.parametrize("name", sorted(RADIAL_BASES))
def test_radial_bases_are_finite_and_twice_differentiable_at_zero(name):
    basis = RADIAL_BASES[name](n_rbf=16, cutoff=5.0).double()
    d = torch.tensor([0.0, 1e-12, 0.5, 2.5, 4.999], dtype=torch.float64, requires_grad=True)
    values = basis(d)
    assert values.shape == (5, 16)
    assert torch.isfinite(values).all()
    assert values.abs().max() > 1e-3, "the basis should not vanish"
    (grad,) = torch.autograd.grad(values.sum(), d, create_graph=True)
    (second,) = torch.autograd.grad(grad.sum(), d)
    assert torch.isfinite(grad).all() and torch.isfinite(second).all()
    # Continuous at d = 0: the value at 0 is the limit from above.
    np.testing.assert_allclose(values[0].detach().numpy(), values[1].detach().numpy(), rtol=1e-6, atol=1e-7)


def test_physnet_basis_matches_its_definition():
    k, cutoff = 32, 5.0
    basis = RADIAL_BASES["physnet"](k, cutoff).double()
    d = torch.tensor([1.3], dtype=torch.float64)
    centers = np.linspace(np.exp(-cutoff), 1.0, k)
    beta = ((2 / k) * (1 - np.exp(-cutoff))) ** -2
    expected = np.exp(-beta * (np.exp(-1.3) - centers) ** 2)
    np.testing.assert_allclose(basis(d)[0].numpy(), expected, rtol=1e-12)


def test_bernstein_basis_is_a_partition_of_unity():
    """Σ_k C(n,k) x^k (1−x)^(n−k) = 1 for every x: a check of the log-space binomials."""
    basis = RADIAL_BASES["bernstein"](n_rbf=64, cutoff=4.5).double()
    d = torch.linspace(0.0, 4.5, 50, dtype=torch.float64)
    np.testing.assert_allclose(basis(d).sum(-1).numpy(), 1.0, rtol=1e-10)


@pytest.mark.parametrize("name", sorted(CUTOFF_FUNCTIONS))
def test_cutoff_functions_are_one_at_zero_zero_beyond_and_c1_at_the_cutoff(name):
    cutoff = 5.0
    fn = CUTOFF_FUNCTIONS[name](cutoff)
    d = torch.tensor([0.0, 2.0, cutoff - 1e-4, cutoff, cutoff + 1.0], dtype=torch.float64, requires_grad=True)
    values = fn(d)
    (grad,) = torch.autograd.grad(values.sum(), d)
    assert values[0].item() == pytest.approx(1.0)
    assert 0.0 < values[1].item() < 1.0
    assert values[2].item() < 1e-6 and values[3].item() == 0.0 and values[4].item() == 0.0
    assert abs(grad[2].item()) < 1e-3, "first derivative must vanish at the cutoff"
    assert torch.isfinite(grad).all()


def test_scatter_sum_adds_rows_into_buckets_and_leaves_empty_ones_zero():
    src = torch.tensor([[1.0], [2.0], [3.0]])
    out = scatter_sum(src, torch.tensor([0, 2, 0]), dim_size=4)
    assert out.squeeze(-1).tolist() == [4.0, 0.0, 2.0, 0.0]
