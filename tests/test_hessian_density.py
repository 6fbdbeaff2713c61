"""Tests of adahessian_jax.hessian.density (stochastic Lanczos quadrature)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hessian_problems import mlp, mlp_hessian, mlp_loss, quadratic, quadratic_loss

from adahessian_jax import hessian


@pytest.fixture(scope="module")
def op():
  params, batch = mlp()
  return hessian.hessian_operator(mlp_loss, params, batch)


def test_density_integrates_to_one_and_matches_dense_moments(op):
  h = mlp_hessian()
  n, p = h.shape[0], 100
  sd = hessian.spectral_density(op, jax.random.key(0), num_probes=p, num_steps=20)
  assert sd.nodes.shape == (p, 20) and sd.num_matvecs == p * 20
  np.testing.assert_allclose(sd.weights.sum(axis=1), 1.0, rtol=1e-12)
  g, rho = sd.grid, sd.density
  assert np.trapezoid(rho, g) == pytest.approx(1.0, abs=1e-6)
  m1 = np.trapezoid(g * rho, g)
  m2 = np.trapezoid(g**2 * rho, g) - sd.sigma**2  # smoothing adds σ² to the second moment
  assert m1 == pytest.approx(sd.moment(1), abs=1e-6)
  assert m2 == pytest.approx(sd.moment(2), abs=1e-6)
  # Monte-Carlo error of vᵀAv with v = z/√n: var = 2(‖A‖²_F − Σ A_ii²)/n².
  for got, a in [(m1, h), (m2, h @ h)]:
    se = np.sqrt(2 * (np.sum(a**2) - np.sum(np.diag(a) ** 2)) / n**2 / p)
    assert abs(got - np.trace(a) / n) < 4 * se, (got, np.trace(a) / n, se)


def test_first_moment_is_hutchinson_with_the_same_probes(op):
  key = jax.random.key(2)
  sd = hessian.spectral_density(op, key, num_probes=8, num_steps=10)
  tr = hessian.hutchinson_trace(op, key, min_samples=8, max_samples=8, block_size=8)
  assert sd.moment(1) == pytest.approx(tr.trace / op.size, rel=1e-10)


def test_a_given_grid_is_where_the_density_is_evaluated():
  # A diagonal Hessian: every Rademacher probe puts weight 1/3 on each eigenvalue.
  params = {"x": jnp.ones(3)}
  op = hessian.hessian_operator(quadratic_loss, params, jnp.diag(jnp.array([1.0, 2.0, 3.0])))
  grid = [0.0, 1.0, 2.0, 3.0]
  sd = hessian.spectral_density(op, jax.random.key(0), num_probes=2, num_steps=3, grid=grid)
  np.testing.assert_array_equal(sd.grid, grid)
  peak = (1 / 3) / (sd.sigma * np.sqrt(2 * np.pi))  # sigma: 1 % of the spectrum's width, 0.02
  np.testing.assert_allclose(sd.density, [0.0, peak, peak, peak], rtol=1e-10, atol=1e-300)


@pytest.mark.parametrize(
  "kwargs, message, need",
  [
    ({"sigma": 1e-4}, r"default grid's step 0.00401 .* wider than sigma", 40013),
    ({"sigma": 0.5, "num_points": 8}, r"default grid's step 1.43 .* wider than sigma", 21),
    # With the default σ the count is known before any product is spent.
    ({"num_points": 8}, r"num_points=8 is too few .* default sigma", 113),
  ],
  ids=["narrow-sigma", "few-points", "few-points-default-sigma"],
)
def test_a_default_grid_coarser_than_sigma_is_refused(kwargs, message, need):
  """A step wider than σ stepped over the Gaussians' peaks: the density integrated to 7e-8 at
  σ = 1e-4 (step 0.004) and to 0.86 with 8 points, documented as integrating to 1."""
  params, a = quadratic([3.0, -1.0, 0.5, 2.0])
  op = hessian.hessian_operator(quadratic_loss, params, a)
  message = rf"{message}.*Pass num_points >= {need},"
  with pytest.raises(ValueError, match=message):
    hessian.spectral_density(op, jax.random.key(1), num_probes=2, num_steps=4, **kwargs)
  # The num_points the message asks for is enough.
  fine = hessian.spectral_density(
    op, jax.random.key(1), num_probes=2, num_steps=4, **{**kwargs, "num_points": need}
  )
  assert np.trapezoid(fine.density, fine.grid) == pytest.approx(1.0, abs=1e-8)


def test_few_distinct_eigenvalues_are_found_exactly():
  ev = np.repeat([1.0, 2.0, 5.0], [10, 20, 30])
  params, a = quadratic(ev)
  op = hessian.hessian_operator(quadratic_loss, params, a)
  sd = hessian.spectral_density(op, jax.random.key(0), num_probes=40, num_steps=10, sigma=0.05)
  live = sd.nodes[sd.weights > 1e-12]
  assert np.min(np.abs(live[:, None] - np.array([1.0, 2.0, 5.0])), axis=1).max() < 1e-10
  for value, frac in [(1.0, 1 / 6), (2.0, 1 / 3), (5.0, 1 / 2)]:
    mass = np.mean(np.sum(sd.weights * np.isclose(sd.nodes, value), axis=1))
    assert mass == pytest.approx(frac, abs=0.06)
  assert np.trapezoid(sd.density, sd.grid) == pytest.approx(1.0, abs=1e-6)
  assert sd.grid[np.argmax(sd.density)] == pytest.approx(5.0, abs=0.05)
