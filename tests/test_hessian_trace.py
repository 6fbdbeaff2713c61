"""Tests of adahessian_jax.hessian.trace: accuracy, calibration, stopping rule."""

import jax
import numpy as np
import pytest
from hessian_problems import mlp, mlp_hessian, mlp_loss, quadratic, quadratic_loss

from adahessian_jax import hessian

SEEDS = 200


@pytest.fixture(scope="module")
def op():
  params, batch = mlp()
  return hessian.hessian_operator(mlp_loss, params, batch)


@pytest.fixture(scope="module")
def decaying():
  """A quadratic with eigenvalues 1/i², the regime Hutch++ and XTrace are built for."""
  ev = 1.0 / np.arange(1, 101) ** 2
  params, a = quadratic(ev)
  return hessian.hessian_operator(quadratic_loss, params, a), ev.sum()


def _z_scores(estimate, truth):
  z = np.array([(e.trace - truth) / e.stderr for e in estimate])
  return z, np.array([e.trace - truth for e in estimate])


def test_hutchinson_standard_error_is_calibrated(op):
  truth = np.trace(mlp_hessian())
  runs = [
    hessian.hutchinson_trace(op, jax.random.key(s), min_samples=40, max_samples=40)
    for s in range(SEEDS)
  ]
  assert all(r.num_matvecs == 40 for r in runs)
  z, err = _z_scores(runs, truth)
  coverage = np.mean(np.abs(z) < 1.96)
  assert 0.90 <= coverage <= 0.985, coverage
  assert 0.7 <= np.mean(z**2) <= 1.4
  # The variance matches the closed form 2(‖H‖²_F − Σ H_ii²)/m.
  h = mlp_hessian()
  sd = np.sqrt(2 * (np.sum(h**2) - np.sum(np.diag(h) ** 2)) / 40)
  assert np.std(err) == pytest.approx(sd, rel=0.15)
  assert abs(np.mean(err)) < 4 * sd / np.sqrt(SEEDS)


def test_hutchpp_standard_error_is_calibrated(decaying):
  op, truth = decaying
  runs = [
    hessian.hutchpp_trace(op, jax.random.key(s), sketch_size=10, min_samples=40, max_samples=40)
    for s in range(SEEDS)
  ]
  assert runs[0].num_matvecs == 60
  z, err = _z_scores(runs, truth)
  coverage = np.mean(np.abs(z) < 1.96)
  assert 0.90 <= coverage <= 0.985, coverage
  assert abs(np.mean(err)) < 4 * np.std(err) / np.sqrt(SEEDS)  # unbiased


def test_better_estimators_beat_hutchinson_at_equal_budget(decaying):
  op, truth = decaying
  budget = 60

  def rmse(fn):
    return np.sqrt(np.mean([(fn(jax.random.key(s)).trace - truth) ** 2 for s in range(50)]))

  e_h = rmse(lambda k: hessian.hutchinson_trace(op, k, min_samples=budget, max_samples=budget))
  e_pp = rmse(
    lambda k: hessian.hutchpp_trace(op, k, sketch_size=20, min_samples=20, max_samples=20)
  )
  e_x = rmse(lambda k: hessian.xtrace(op, k, budget))
  assert e_pp < 0.1 * e_h
  assert e_x < e_pp


def test_xtrace_error_estimate_is_the_right_order(decaying):
  op, truth = decaying
  runs = [hessian.xtrace(op, jax.random.key(s), 40) for s in range(SEEDS)]
  z, _ = _z_scores(runs, truth)
  # A heuristic (the leave-one-out estimates are dependent): measured 84-88 %
  # coverage at a nominal 95 %.
  assert 0.75 <= np.mean(np.abs(z) < 1.96) <= 0.99


def test_xtrace_is_exact_for_low_rank():
  ev = np.zeros(30)
  ev[:4] = [3.0, -1.0, 0.5, 2.0]
  params, a = quadratic(ev)
  op = hessian.hessian_operator(quadratic_loss, params, a)
  est = hessian.xtrace(op, jax.random.key(0), 12)
  assert est.trace == pytest.approx(4.5, rel=1e-10)
  assert est.stderr == 0.0


def test_stopping_rule_stops_on_the_standard_error(op):
  truth = np.trace(mlp_hessian())
  est = hessian.hutchinson_trace(op, jax.random.key(0), rtol=0.05, max_samples=5000)
  assert est.stderr <= 0.05 * abs(est.trace)
  assert 10 <= est.num_samples < 5000
  assert abs(est.trace - truth) < 4 * est.stderr
  tight = hessian.hutchinson_trace(op, jax.random.key(0), rtol=0.02, max_samples=5000)
  assert tight.num_samples > est.num_samples
  # Hutch++ reaches the same target with fewer products here.
  pp = hessian.hutchpp_trace(op, jax.random.key(0), sketch_size=20, rtol=0.05, max_samples=5000)
  assert pp.stderr <= 0.05 * abs(pp.trace) and abs(pp.trace - truth) < 4 * pp.stderr


def test_zero_variance_stops_at_min_samples():
  # zᵀDz = tr(D) exactly for a diagonal D and Rademacher z.
  params = {"x": np.ones(6)}
  d = np.diag(np.arange(1.0, 7.0))
  op = hessian.hessian_operator(quadratic_loss, params, d)
  est = hessian.hutchinson_trace(op, jax.random.key(0), min_samples=10, block_size=5)
  assert est.num_samples == 10 and est.trace == pytest.approx(21.0) and est.stderr == 0.0


def test_bad_arguments(op):
  with pytest.raises(ValueError):
    hessian.hutchinson_trace(op, jax.random.key(0), min_samples=5, max_samples=2)
  with pytest.raises(ValueError):
    hessian.xtrace(op, jax.random.key(0), 2)
