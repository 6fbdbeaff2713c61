"""Tests of adahessian_jax.hessian.diagonal: Hutchinson (the optimizer's estimator) and XDiag."""

import jax
import numpy as np
import pytest
from hessian_problems import mlp, mlp_hessian, mlp_loss, quadratic, quadratic_loss

from adahessian_jax import hessian, hutchinson_diagonal


@pytest.fixture(scope="module")
def op():
  params, batch = mlp()
  return hessian.hessian_operator(mlp_loss, params, batch)


def test_is_the_optimizers_estimator(op):
  params, batch = mlp()
  key = jax.random.key(4)
  est = hessian.hutchinson_diagonal_estimate(op, key, num_samples=20, block_size=7)
  want = hutchinson_diagonal(lambda p: mlp_loss(p, batch), params, key, n_samples=20)
  np.testing.assert_allclose(op.ravel(est.diagonal), op.ravel(want), atol=1e-13)
  assert est.num_matvecs == 20


def test_standard_errors_are_calibrated(op):
  h = mlp_hessian()
  est = hessian.hutchinson_diagonal_estimate(op, jax.random.key(0), num_samples=200)
  z = (np.asarray(est.diagonal_flat) - np.diag(h)) / np.asarray(est.stderr_flat)
  assert 0.88 <= np.mean(np.abs(z) < 1.96) <= 0.99
  # Per-entry variance Σ_{j≠i} H_ij² per probe.
  sd = np.sqrt((np.sum(h**2, axis=1) - np.diag(h) ** 2) / 200)
  np.testing.assert_allclose(est.stderr_flat, sd, rtol=0.3)
  assert est.stderr["out"]["kernel"].shape == (8, 3)


def test_full_data_diagonal_uses_the_same_probes(op):
  params, (x, y) = mlp()
  full = hessian.hessian_operator(
    mlp_loss, params, batches=[(x[:9], y[:9]), (x[9:30], y[9:30]), (x[30:], y[30:])]
  )
  key = jax.random.key(1)
  a = hessian.hutchinson_diagonal_estimate(op, key, num_samples=10)
  b = hessian.hutchinson_diagonal_estimate(full, key, num_samples=10)
  np.testing.assert_allclose(a.diagonal_flat, b.diagonal_flat, atol=1e-13)


def test_xdiag_is_exact_for_low_rank():
  ev = np.zeros(40)
  ev[:5] = [4.0, 3.0, -2.0, 1.0, 0.5]
  params, a = quadratic(ev)
  op = hessian.hessian_operator(quadratic_loss, params, a)
  est = hessian.xdiag(op, jax.random.key(0), 16)
  np.testing.assert_allclose(est.diagonal_flat, np.diag(np.asarray(a)), atol=1e-12)


def test_xdiag_beats_hutchinson_on_a_decaying_spectrum():
  ev = 1.0 / np.arange(1, 61) ** 2
  params, a = quadratic(ev)
  truth = np.diag(np.asarray(a))
  op = hessian.hessian_operator(quadratic_loss, params, a)

  def err(fn):
    return np.mean([np.linalg.norm(fn(jax.random.key(s)).diagonal_flat - truth) for s in range(20)])

  e_h = err(lambda k: hessian.hutchinson_diagonal_estimate(op, k, num_samples=30))
  e_x = err(lambda k: hessian.xdiag(op, k, 30))
  assert e_x < 0.2 * e_h
  # Its error estimate has the right order of magnitude.
  est = hessian.xdiag(op, jax.random.key(0), 30)
  ratio = np.linalg.norm(est.diagonal_flat - truth) / np.linalg.norm(est.stderr_flat)
  assert 0.2 < ratio < 5
