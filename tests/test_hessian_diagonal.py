"""Tests of adahessian_jax.hessian.diagonal: Hutchinson (the optimizer's estimator) and XDiag."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
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
  # One jitted program (op by op it compiled some 150 primitives).
  estimate = jax.jit(
    lambda p, k: hutchinson_diagonal(lambda q: mlp_loss(q, batch), p, k, n_samples=20)
  )
  want = estimate(params, key)
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


@pytest.mark.parametrize("dtype, atol", [(jnp.float64, 1e-12), (jnp.float32, 1e-6)])
def test_xdiag_is_exact_for_low_rank(dtype, atol):
  ev = np.zeros(40)
  ev[:5] = [4.0, 3.0, -2.0, 1.0, 0.5]
  params, a = quadratic(ev)
  a = a.astype(dtype)
  op = hessian.hessian_operator(quadratic_loss, {"x": params["x"].astype(dtype)}, a)
  est = hessian.xdiag(op, jax.random.key(0), 16)
  np.testing.assert_allclose(est.diagonal_flat, np.diag(np.asarray(a)), atol=atol)
  np.testing.assert_array_equal(est.stderr_flat, np.zeros(40))


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


def _diagonal_operator(d, dtype):
  """The Hessian ``diag(d)`` of ``0.5 Σ d_i w_i²`` at ``w = 1``, with params of ``dtype``."""
  d = jnp.asarray(d, dtype)
  return hessian.hessian_operator(
    lambda p, b: 0.5 * jnp.sum(d * p["w"] ** 2), {"w": jnp.ones(d.size, dtype)}, batch=jnp.zeros(1)
  )


def _samples(op, key, num):
  """The ``num`` samples ``z ⊙ Hz`` of ``key``, in float64."""
  z = op.rademacher(key, num)
  return np.asarray(z, np.float64) * np.asarray(op.matmat(z), np.float64)


def test_float32_standard_error_has_no_cancellation():
  # Every sample z ⊙ Hz equals diag(H): the error is exactly 0 (E[x²] − E[x]² gave 1.8e-4), and
  # so is the mean's (the float32 sum of the samples over the count was off by up to 1.01e-6).
  d = np.array([0.1, 3.3, 1e3, 7.77], np.float32)
  est = hessian.hutchinson_diagonal_estimate(
    _diagonal_operator(d, jnp.float32), jax.random.key(0), 1000
  )
  np.testing.assert_array_equal(est.diagonal_flat, d)
  np.testing.assert_array_equal(est.stderr_flat, np.zeros(4))
  # A large diagonal with a small coupling: the error is the float64 spread of the samples.
  a = np.diag([1e3, 2e3, 3e3]) + 1e-2 * (np.ones((3, 3)) - np.eye(3))
  params = {"x": jnp.ones(3, jnp.float32)}
  op = hessian.hessian_operator(quadratic_loss, params, jnp.asarray(a, jnp.float32))
  est = hessian.hutchinson_diagonal_estimate(op, jax.random.key(1), 200)
  x = _samples(op, jax.random.key(1), 200)
  np.testing.assert_allclose(est.stderr_flat, x.std(0, ddof=1) / np.sqrt(200) * _t(200), rtol=1e-3)


def test_bfloat16_diagonal_is_accumulated_in_float32():
  d = np.array([0.1, 3.3, 1e3, 7.77])
  est = hessian.hutchinson_diagonal_estimate(
    _diagonal_operator(d, jnp.bfloat16), jax.random.key(0), 1000
  )
  d16 = np.asarray(jnp.asarray(d, jnp.bfloat16), np.float64)  # the products are exact in bfloat16
  assert est.diagonal_flat.dtype == jnp.float32 and est.diagonal["w"].dtype == jnp.float32
  np.testing.assert_allclose(est.diagonal_flat, d16, rtol=1e-6)
  np.testing.assert_array_equal(est.stderr_flat, np.zeros(4))
  # An MLP: the mean and error are those of the same bfloat16 samples in float64.
  params, batch = mlp()
  op = hessian.hessian_operator(
    mlp_loss, jax.tree.map(lambda a: a.astype(jnp.bfloat16), params), batch
  )
  est = hessian.hutchinson_diagonal_estimate(op, jax.random.key(2), 300)
  x = _samples(op, jax.random.key(2), 300)
  np.testing.assert_allclose(est.diagonal_flat, x.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(est.stderr_flat, x.std(0, ddof=1) / np.sqrt(300) * _t(300), rtol=1e-4)


def test_a_bfloat16_leaf_of_a_float32_model_keeps_its_float32_estimate():
  # The operator's dtype is float32, so the pytree estimates were cast to each leaf's dtype: the
  # bfloat16 leaf's mean of 300 samples (and its error) rounded to 3 significant digits, unlike
  # diagonal_flat and unlike the same leaf in an all-bfloat16 model.
  params, batch = mlp()
  params = {**params, "hidden": jax.tree.map(lambda a: a.astype(jnp.bfloat16), params["hidden"])}
  params = jax.tree.map(lambda a: a if a.dtype == jnp.bfloat16 else a.astype(jnp.float32), params)
  op = hessian.hessian_operator(
    mlp_loss, params, jax.tree.map(lambda a: a.astype(jnp.float32), batch)
  )
  kernel = op.leaf_slices[op.leaf_names.index("hidden/kernel")]
  est = hessian.hutchinson_diagonal_estimate(op, jax.random.key(0), 300)
  xd = hessian.xdiag(op, jax.random.key(0), 40)
  per_leaf = hessian.layer_breakdown(op, jax.random.key(0), num_samples=300, eigenvalues=False)
  for tree, flat in [
    (est.diagonal, est.diagonal_flat),
    (est.stderr, est.stderr_flat),
    (xd.diagonal, xd.diagonal_flat),
  ]:
    assert tree["hidden"]["kernel"].dtype == jnp.float32
    np.testing.assert_array_equal(tree["hidden"]["kernel"].ravel(), flat[kernel])
  assert per_leaf["hidden/kernel"].diagonal.dtype == jnp.float32


def test_xdiag_is_exact_with_a_budget_of_n_products():
  # n = 6 <= num_matvecs: diag(H) from H e_j with a zero error (the leave-one-out mean was not).
  ev = np.array([3.0, -1.0, 0.5, 2.0, 7.0, 0.1])
  params, a = quadratic(ev)
  op = hessian.hessian_operator(quadratic_loss, params, a)
  for s in range(10):
    est = hessian.xdiag(op, jax.random.key(s), 32)
    np.testing.assert_allclose(est.diagonal_flat, np.diag(np.asarray(a)), rtol=1e-12)
    np.testing.assert_array_equal(est.stderr_flat, np.zeros(6))
    assert est.num_matvecs == 6


def _float32_gapped(small):
  """A float32 quadratic (n = 400): 10 eigenvalues in [1, 2], 390 of ``small``; float64 truth."""
  ev = np.full(400, small)
  ev[:10] = np.linspace(1.0, 2.0, 10)
  params, a = quadratic(ev)
  a32 = jnp.asarray(a, jnp.float32)
  op = hessian.hessian_operator(quadratic_loss, {"x": params["x"].astype(jnp.float32)}, a32)
  return op, np.diag(np.asarray(a32, np.float64))


@pytest.mark.parametrize("small", [1e-5, 1e-4])
def test_xdiag_error_covers_a_float32_sketch_with_a_singular_factor(small):
  # R is singular to float32. 1e-5: taken for a captured H, stderr 0 for an error 1e-5 of the
  # entries; 1e-4: the remainder ω_i ⊙ (I − QQᵀ)Hω_i was zero by construction (Hω_i is in the
  # sketch), stderr 1.2e-8 for an error 1e-4.
  op, truth = _float32_gapped(small)
  cover = []
  for s in range(5):
    est = hessian.xdiag(op, jax.random.key(s), 32)
    err, se = np.asarray(est.diagonal_flat, np.float64) - truth, np.asarray(est.stderr_flat)
    assert np.all(se > 0)
    cover.append(np.mean(np.abs(err) < 1.96 * se))
  assert np.mean(cover) >= 0.75, cover


@pytest.mark.parametrize("big, small", [([3.0, 2.0, 1.0], 1e-8), ([3.0, -3.0, 1.0], -1e-8)])
def test_xdiag_is_not_exact_for_entries_far_below_the_others(big, small):
  # float32: a rank-3 block (20 params) and a block of 40 with curvature 1e-8 (``small < 0``:
  # eigenvalues from -1e-8 to 1e-8). What the sketch leaves out of the trace (40e-8) is below
  # float32's eps times the trace: the old code took H for captured and returned diag(QQᵀH),
  # about 0 for the small block, with stderr 0.
  _, a = quadratic(np.r_[big, np.zeros(17)])
  _, b = quadratic(np.linspace(small, abs(small), 40), seed=1)
  h = jax.scipy.linalg.block_diag(a, b).astype(jnp.float32)
  op = hessian.hessian_operator(quadratic_loss, {"x": jnp.ones(60, jnp.float32)}, h)
  truth = np.diag(np.asarray(h, np.float64))
  cover = []
  for s in range(3):
    est = hessian.xdiag(op, jax.random.key(s), 16)
    err = np.abs(np.asarray(est.diagonal_flat, np.float64) - truth)
    se = np.asarray(est.stderr_flat, np.float64)
    assert np.all(se[20:] > 0)
    assert np.all(err[:20] < 1e-6)
    cover.append(np.mean(err[20:] < 1.96 * se[20:]))
  assert np.mean(cover) >= 0.65, cover


def _t(m):
  """The Student-t factor ``t₍m−1₎(0.975)/1.96`` of a mean of ``m`` samples."""
  return scipy.stats.t.ppf(0.975, m - 1) / 1.959963984540054


def test_diagonal_stderr_is_student_t_scaled_and_covers_95_percent_at_two_samples():
  # stderr was the plain s/√m: diagonal ± 1.96·stderr covered 70 % of the entries at 2 samples
  # (86 % at 4, 92 % at 10), where the trace's, Student-t scaled, covered ~95 %.
  params, batch = mlp()
  op = hessian.hessian_operator(mlp_loss, params, batch)
  truth = np.diag(mlp_hessian())
  covered = []
  for seed in range(200):
    est = hessian.hutchinson_diagonal_estimate(op, jax.random.key(seed), 2, block_size=1)
    x = _samples(op, jax.random.key(seed), 2)
    np.testing.assert_allclose(est.stderr_flat, x.std(0, ddof=1) / np.sqrt(2) * _t(2), rtol=1e-12)
    covered.append(np.abs(np.asarray(est.diagonal_flat) - truth) <= 1.96 * est.stderr_flat)
  assert 0.93 <= np.mean(covered) <= 0.97  # 0.949


@pytest.mark.parametrize("scale", [1e-20, 1e20])
def test_float32_hutchinson_stderr_at_extreme_scales_is_the_scaled_unit_one(scale):
  """``s·A`` in float32: the samples are finite, but their squared deviations under- or
  overflowed float32: the stderr was inf at 1e20 and 0 at 1e-20 (exact, it said)."""
  _, a = quadratic(np.linspace(-1.0, 3.0, 20))
  unit, scaled = (
    hessian.hutchinson_diagonal_estimate(
      hessian.hessian_operator(quadratic_loss, {"x": jnp.zeros(20, jnp.float32)}, c * a),
      jax.random.key(0),
      8,
    )
    for c in (1.0, scale)
  )
  assert np.all(unit.stderr_flat > 0)
  np.testing.assert_allclose(scaled.diagonal_flat / scale, unit.diagonal_flat, rtol=1e-5)
  np.testing.assert_allclose(scaled.stderr_flat / scale, unit.stderr_flat, rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_xdiag_error_keeps_the_estimates_dtype_under_x64(dtype):
  # The tests run with x64 on: the error was divided by NumPy's float64 sqrt(s), no weak type, so
  # a float32 (or bfloat16's float32) model's xdiag error came back float64 beside its float32
  # diagonal, unlike hutchinson_diagonal_estimate's.
  params, batch = mlp()
  op = hessian.hessian_operator(
    mlp_loss,
    jax.tree.map(lambda a: a.astype(dtype), params),
    jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, batch),
  )
  xd = hessian.xdiag(op, jax.random.key(0), 12)
  assert xd.diagonal_flat.dtype == jnp.float32
  assert xd.stderr_flat.dtype == jnp.float32
  assert {a.dtype for a in jax.tree.leaves(xd.stderr)} == {np.dtype(jnp.float32)}
  assert np.all(np.asarray(xd.stderr_flat) > 0)  # the leave-one-out branch, not an exact sketch
  hutch = hessian.hutchinson_diagonal_estimate(op, jax.random.key(0), 3)
  assert hutch.stderr_flat.dtype == xd.stderr_flat.dtype
