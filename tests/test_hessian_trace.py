"""Tests of adahessian_jax.hessian.trace: accuracy, calibration, stopping rule."""

import functools

import jax
import jax.numpy as jnp
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


@pytest.fixture(scope="module")
def spread():
  """n = 40, eigenvalues 1 + 0.3·N(0, 1): roughly normal samples ``zᵀHz``."""
  ev = 1.0 + 0.3 * np.random.default_rng(3).normal(size=40)
  params, a = quadratic(ev)
  return hessian.hessian_operator(quadratic_loss, params, a), ev.sum()


@pytest.mark.parametrize("estimator", ["hutchinson", "hutch++"])
def test_few_samples_cover_at_the_stated_rate(spread, estimator):
  # With 4 samples the plain s/√m covered 88.2 % (Hutchinson) and 87.5 % (Hutch++) at ±1.96 over
  # these 400 seeds (normal samples: a t₃ variable, 85.5 %); scaled by t₃(0.975)/1.96 = 1.62 it
  # covers 97.0 % and 95.2 %.
  op, truth = spread
  m = 4
  if estimator == "hutchinson":
    fn = functools.partial(hessian.hutchinson_trace, op, min_samples=m, max_samples=m)
  else:
    fn = functools.partial(hessian.hutchpp_trace, op, sketch_size=4, min_samples=m, max_samples=m)
  runs = [fn(jax.random.key(s)) for s in range(400)]
  assert {r.num_samples for r in runs} == {m}
  z, _ = _z_scores(runs, truth)
  coverage = np.mean(np.abs(z) < 1.96)
  assert 0.92 <= coverage <= 0.99, (estimator, coverage)


def test_stderr_is_the_student_t_scaled_standard_error(op):
  # t₁₅(0.975) = 2.131449545559776, t₃(0.975) = 3.182446305283708, t₉₉₉(0.975) = 1.962339080826408
  # (scipy.stats.t.ppf), over z(0.975) = 1.959963984540054.
  z975 = 1.959963984540054
  for m, t in [(4, 3.182446305283708), (16, 2.131449545559776), (1000, 1.962339080826408)]:
    est = hessian.hutchinson_trace(op, jax.random.key(1), min_samples=m, max_samples=m)
    probes = op.probes(jax.random.split(jax.random.key(1), m))
    x = np.sum(np.asarray(probes) * np.asarray(op.matmat(probes)), axis=1)
    assert est.trace == pytest.approx(x.mean(), rel=1e-12)
    assert est.stderr == pytest.approx(x.std(ddof=1) / np.sqrt(m) * t / z975, rel=2e-4)


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
  # A heuristic (the leave-one-out estimates share the sketch): over 1,000 seeds it covered
  # 82-83 % here at 16-64 products, 74-88 % on the problems of docs/hessian_analysis.md.
  assert 0.75 <= np.mean(np.abs(z) < 1.96) <= 0.99


def test_xtrace_is_exact_for_low_rank():
  ev = np.zeros(30)
  ev[:4] = [3.0, -1.0, 0.5, 2.0]
  params, a = quadratic(ev)
  op = hessian.hessian_operator(quadratic_loss, params, a)
  est = hessian.xtrace(op, jax.random.key(0), 12)
  assert est.trace == pytest.approx(4.5, rel=1e-10)
  assert est.stderr == 0.0


def test_hutchpp_is_exact_when_the_sketch_would_cost_n_products(op):
  # n = 75: a sketch of 38 probes costs 76 products, more than the 75 products H e_j.
  truth = np.trace(mlp_hessian())
  est = hessian.hutchpp_trace(op, jax.random.key(0), sketch_size=38)
  assert est.trace == pytest.approx(truth, rel=1e-10)
  assert (est.stderr, est.num_matvecs, est.num_samples) == (0.0, 75, 0)
  below = hessian.hutchpp_trace(op, jax.random.key(0), sketch_size=37, min_samples=4, max_samples=4)
  assert (below.num_matvecs, below.num_samples) == (74 + 4, 4) and below.stderr > 0


def test_hutchpp_is_exact_for_low_rank():
  # Rank 4 < 6 probes: the sketch captures H, and no residual sample (all zero) is drawn.
  ev = np.zeros(30)
  ev[:4] = [3.0, -1.0, 0.5, 2.0]
  params, a = quadratic(ev)
  op = hessian.hessian_operator(quadratic_loss, params, a)
  est = hessian.hutchpp_trace(op, jax.random.key(0), sketch_size=6)
  assert est.trace == pytest.approx(4.5, rel=1e-10)
  assert (est.stderr, est.num_matvecs, est.num_samples) == (0.0, 12, 0)


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
  assert est.converged and tight.converged and pp.converged
  # A budget that runs out before the target says so (it returned the same fields as a success).
  short = hessian.hutchinson_trace(op, jax.random.key(0), rtol=0.02, max_samples=12)
  assert short.num_samples == 12 and short.stderr > 0.02 * abs(short.trace)
  assert not short.converged
  short_pp = hessian.hutchpp_trace(
    op, jax.random.key(0), sketch_size=2, rtol=1e-4, min_samples=4, max_samples=4
  )
  assert not short_pp.converged


def test_zero_variance_stops_at_min_samples():
  # zᵀDz = tr(D) exactly for a diagonal D and Rademacher z.
  params = {"x": np.ones(6)}
  d = np.diag(np.arange(1.0, 7.0))
  op = hessian.hessian_operator(quadratic_loss, params, d)
  est = hessian.hutchinson_trace(op, jax.random.key(0), min_samples=10, block_size=5)
  assert est.num_samples == 10 and est.trace == pytest.approx(21.0) and est.stderr == 0.0


def test_a_budget_below_the_default_min_samples_is_the_min_samples():
  """max_samples=4 alone: min_samples defaults to the budget (it was refused, naming the default
  min_samples=10 the caller never passed); zero variance stops there, 4 samples, the exact trace."""
  params = {"x": np.ones(6)}
  op = hessian.hessian_operator(quadratic_loss, params, np.diag(np.arange(1.0, 7.0)))
  for fn in (hessian.hutchinson_trace, functools.partial(hessian.hutchpp_trace, sketch_size=0)):
    est = fn(op, jax.random.key(0), max_samples=4)
    assert est.num_samples == 4 and est.trace == pytest.approx(21.0) and est.stderr == 0.0
  with pytest.raises(ValueError, match=r"min_samples.*\[1, 4\].*5"):
    hessian.hutchinson_trace(op, jax.random.key(0), min_samples=5, max_samples=4)


def test_bad_arguments(op):
  with pytest.raises(ValueError):
    hessian.hutchinson_trace(op, jax.random.key(0), min_samples=5, max_samples=2)
  with pytest.raises(ValueError):
    hessian.xtrace(op, jax.random.key(0), 2)


def _diagonal_operator(d, dtype):
  """The Hessian ``diag(d)`` of ``0.5 Σ d_i w_i²`` at ``w = 1``, with params of ``dtype``."""
  d = jnp.asarray(d, dtype)
  return hessian.hessian_operator(
    lambda p, b: 0.5 * jnp.sum(d * p["w"] ** 2), {"w": jnp.ones(d.size, dtype)}, batch=jnp.zeros(1)
  )


def test_bfloat16_samples_are_averaged_in_float64():
  # zᵀ diag(d) z = Σ d_i for every probe; summed in bfloat16 it came out 262 (of 1011).
  d = np.array([0.1, 3.3, 1e3, 7.77])
  op = _diagonal_operator(d, jnp.bfloat16)
  est = hessian.hutchinson_trace(op, jax.random.key(0), min_samples=1000, max_samples=1000)
  exact = float(np.sum(np.asarray(jnp.asarray(d, jnp.bfloat16), np.float64)))
  assert est.trace == pytest.approx(exact, rel=1e-6) and est.stderr == 0.0


def test_bfloat16_mlp_trace_is_the_float64_mean_of_the_samples():
  params, batch = mlp()
  params16 = jax.jit(lambda t: jax.tree.map(lambda a: a.astype(jnp.bfloat16), t))(params)
  op = hessian.hessian_operator(mlp_loss, params16, batch)
  m = 1000
  est = hessian.hutchinson_trace(op, jax.random.key(0), min_samples=m, max_samples=m)
  z = op.probes(jax.random.split(jax.random.key(0), m))
  hz = op.matmat(z)
  x = np.sum(np.asarray(z, np.float64) * np.asarray(hz, np.float64), axis=1)
  assert est.trace == pytest.approx(x.mean(), rel=1e-5)
  t_factor = 1.962339080826408 / 1.959963984540054  # t₉₉₉(0.975) / z(0.975)
  assert est.stderr == pytest.approx(x.std(ddof=1) / np.sqrt(m) * t_factor, rel=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_sketched_estimators_run_in_16_bit(dtype):
  # Rank 3: the sketch captures it, so XTrace and Hutch++ are exact up to the rounding of the
  # sketch basis Q to 16 bits in the products HQ (the linear algebra crashed in 16 bits).
  d = np.zeros(40)
  d[[3, 17, 30]] = [2.0, 5.0, -1.0]
  op = _diagonal_operator(d, dtype)
  tol = 8 * float(jnp.finfo(dtype).eps)
  est = hessian.xtrace(op, jax.random.key(0), 12)
  assert est.trace == pytest.approx(6.0, rel=tol) and est.stderr == 0.0
  pp = hessian.hutchpp_trace(op, jax.random.key(0), sketch_size=8, min_samples=4, max_samples=4)
  assert pp.trace == pytest.approx(6.0, rel=tol)
  dg = hessian.xdiag(op, jax.random.key(0), 12)
  assert dg.diagonal_flat.dtype == jnp.float32 and dg.diagonal["w"].dtype == jnp.float32
  np.testing.assert_allclose(dg.diagonal_flat, d, atol=5 * tol)


def _xtrace_by_definition(h, omega):
  """XTrace from its definition: estimate i is tr(Q_iᵀHQ_i) + ω_iᵀ(I−Q_iQ_iᵀ)H(I−Q_iQ_iᵀ)ω_i
  with Q_i an orthonormal basis of H Ω without column i."""
  y = h @ omega
  ests = []
  for i in range(omega.shape[1]):
    q, _ = np.linalg.qr(np.delete(y, i, axis=1))
    u = omega[:, i] - q @ (q.T @ omega[:, i])
    ests.append(np.trace(q.T @ h @ q) + u @ h @ u)
  ests = np.array(ests)
  return ests.mean(), ests.std(ddof=1) / np.sqrt(len(ests))


def test_xtrace_dependent_probes_are_drawn_again():
  # n = 10, H = diag(1..10) of full rank: with key 131 the first 4 probes are linearly
  # dependent, which made R singular and returned tr(QᵀHQ) (not 55) with a zero error.
  d = np.arange(1.0, 11.0)
  op = _diagonal_operator(d, jnp.float64)
  key = jax.random.key(131)
  assert np.linalg.matrix_rank(np.asarray(op.rademacher(key, 4))) < 4
  omega = np.asarray(op.rademacher(jax.random.fold_in(key, 1), 4))  # the second draw
  assert np.linalg.matrix_rank(omega) == 4
  est = hessian.xtrace(op, key, 8)
  mean, se = _xtrace_by_definition(np.diag(d), omega.T)
  assert est.trace == pytest.approx(mean, rel=1e-10)
  assert est.stderr == pytest.approx(se, rel=1e-8) and est.stderr > 0
  dg = hessian.xdiag(op, key, 8)
  assert np.all(np.asarray(dg.stderr_flat) > 0)
  for s in range(200):
    e = hessian.xtrace(op, jax.random.key(s), 8)
    assert e.stderr > 0 or e.trace == pytest.approx(55.0, rel=1e-12), (s, e)


def test_xtrace_with_a_budget_of_n_products_is_exact():
  # n = 6 <= num_matvecs: tr(H) from H e_j; the leave-one-out mean was off in 38 of 100 keys.
  # (Also n = 10 with 12 products, where dependent probes returned e.g. 38.47 for 55.)
  ev = np.array([3.0, -1.0, 0.5, 2.0, 7.0, 0.1])
  params, a = quadratic(ev)
  op = hessian.hessian_operator(quadratic_loss, params, a)
  for s in range(20):
    est = hessian.xtrace(op, jax.random.key(s), 32)
    assert est.trace == pytest.approx(ev.sum(), rel=1e-12)
    assert est.stderr == 0.0 and est.num_matvecs == 6
  ten = _diagonal_operator(np.arange(1.0, 11.0), jnp.float64)
  est = hessian.xtrace(ten, jax.random.key(14), 12)
  assert est.trace == pytest.approx(55.0, rel=1e-12) and est.num_matvecs == 10
  one = _diagonal_operator([3.0], jnp.float64)  # n = 1: the error was nan
  est = hessian.xtrace(one, jax.random.key(0), 4)
  assert est.trace == 3.0 and est.stderr == 0.0 and est.num_matvecs == 1


def _float32_gapped(small, seed=0):
  """A float32 quadratic (n = 400): 10 eigenvalues in [1, 2], 390 of ``small``; float64 truth."""
  ev = np.full(400, small)
  ev[:10] = np.linspace(1.0, 2.0, 10)
  params, a = quadratic(ev, seed)
  a32 = np.asarray(a).astype(np.float32)  # cast in NumPy, not a program per shape
  x32 = jnp.asarray(np.asarray(params["x"]).astype(np.float32))
  op = hessian.hessian_operator(quadratic_loss, {"x": x32}, jnp.asarray(a32))
  return op, a32.astype(np.float64)


def test_float32_sketch_is_exact_only_below_the_rounding():
  # 390 eigenvalues of 1e-5 are 2.6e-4 of the trace, far above float32's rounding: the sketch's
  # residual passed the √eps test, and Hutch++ and XTrace returned stderr 0 that far off.
  op, a = _float32_gapped(1e-5)
  truth = np.trace(a)
  for s in range(3):
    key = jax.random.key(s)
    for est in [
      hessian.xtrace(op, key, 32),
      hessian.hutchpp_trace(op, key, sketch_size=16, min_samples=16, max_samples=16),
    ]:
      assert 0 < est.stderr < 1e-5 * truth and abs(est.trace - truth) < 4 * est.stderr, (s, est)
  # No eigenvalue outside the sketch: exact, to float32's rounding.
  op, a = _float32_gapped(0.0)
  est = hessian.xtrace(op, jax.random.key(0), 32)
  assert est.stderr == 0.0 and est.trace == pytest.approx(np.trace(a), rel=1e-6)


def test_xtrace_error_covers_a_float32_sketch_with_a_singular_factor():
  # Eigenvalues 1e-4 of the top ones make R singular to float32: every estimate took the whole
  # sketch with its own probe reused as residual probe, 9.5e-4 low with an error 11x smaller
  # (coverage 0 of 30).
  op, a = _float32_gapped(1e-4)
  truth = np.trace(a)
  z = np.array(
    [
      (e.trace - truth) / e.stderr
      for e in (hessian.xtrace(op, jax.random.key(s), 32) for s in range(30))
    ]
  )
  assert np.mean(np.abs(z) < 1.96) >= 0.8, z


@pytest.mark.parametrize(
  "dtype, scale, rtol",
  [(jnp.float32, 1e-20, 1e-4), (jnp.float32, 1e20, 1e-4), (jnp.float16, 1e4, 1e-2)],
)
def test_sketches_at_extreme_scales_equal_the_scaled_unit_ones(dtype, scale, rtol):
  """``s·A``, ``A`` of eigenvalues in ``[-1, 3]``: the products are finite, but the squares of
  them (the leave-one-out directions' norms, the estimates' spread) under- or overflowed
  float32: XTrace and XDiag returned NaN at 1e20, and at 1e-20 values off by a third with a
  zero error, which says exact. (float16: products above 32768, whose power of two is inf.)"""
  _, a = quadratic(np.r_[np.linspace(0.5, 2.0, 27), -1.0, 3.0, 0.0])
  ops = [
    hessian.hessian_operator(quadratic_loss, {"x": jnp.zeros(30, dtype)}, jnp.asarray(c * a, dtype))
    for c in (1.0, scale)
  ]
  unit, scaled = (hessian.xtrace(o, jax.random.key(0), 16) for o in ops)
  assert unit.stderr > 0  # not the exact case
  assert scaled.trace / scale == pytest.approx(unit.trace, rel=rtol / 10)
  assert scaled.stderr / scale == pytest.approx(unit.stderr, rel=rtol)
  unit, scaled = (hessian.xdiag(o, jax.random.key(0), 16) for o in ops)
  np.testing.assert_allclose(scaled.diagonal_flat / scale, unit.diagonal_flat, rtol=rtol, atol=rtol)
  np.testing.assert_allclose(scaled.stderr_flat / scale, unit.stderr_flat, rtol=rtol, atol=rtol)
  unit, scaled = (hessian.hutchpp_trace(o, jax.random.key(0), sketch_size=4) for o in ops)
  assert scaled.trace / scale == pytest.approx(unit.trace, rel=rtol / 10)
