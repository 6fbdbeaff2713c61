"""Tests of adahessian_jax.hessian.eigen against dense eigendecompositions (float64)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CompileCounter
from hessian_problems import SLOW_SPECTRA, mlp, mlp_hessian, mlp_loss, quadratic, quadratic_loss

from adahessian_jax import hessian


@pytest.fixture(scope="module")
def op():
  params, batch = mlp()
  return hessian.hessian_operator(mlp_loss, params, batch)


def test_top_eigenvalues_match_dense_to_1e8(op):
  h = mlp_hessian()
  ev = np.linalg.eigvalsh(h)[::-1]
  top = hessian.top_eigenvalues(op, 4, tol=1e-9)
  np.testing.assert_allclose(top.eigenvalues, ev[:4], rtol=1e-8)
  assert top.converged.all()
  assert top.num_matvecs < op.size  # converged before exhausting the space
  vecs = np.asarray(top.eigenvectors_flat)
  np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-13)
  res = np.linalg.norm(vecs @ h - top.eigenvalues[:, None] * vecs, axis=1)
  assert np.all(res <= 1e-8 * ev[0])
  assert np.all(top.residuals <= 1e-9 * ev[0] * 1.0001)
  # The pytree eigenvectors carry a leading k axis.
  assert top.eigenvectors["hidden"]["kernel"].shape == (4, 5, 8)


def test_smallest_and_largest_magnitude(op):
  ev = np.linalg.eigvalsh(mlp_hessian())
  sa = hessian.top_eigenvalues(op, 2, which="SA", tol=1e-9)
  np.testing.assert_allclose(sa.eigenvalues, ev[:2], rtol=1e-8)
  by_mag = ev[np.argsort(-np.abs(ev))]
  lm = hessian.top_eigenvalues(op, 3, which="LM", tol=1e-9)
  np.testing.assert_allclose(lm.eigenvalues, by_mag[:3], rtol=1e-8)


def test_largest_magnitude_can_be_negative():
  ev = np.concatenate([np.linspace(-0.5, 1.0, 30), [2.0, -3.0]])
  params, a = quadratic(ev)
  op = hessian.hessian_operator(quadratic_loss, params, a)
  lm = hessian.top_eigenvalues(op, 2, which="LM", tol=1e-10)
  np.testing.assert_allclose(lm.eigenvalues, [-3.0, 2.0], rtol=1e-10)
  la = hessian.top_eigenvalues(op, 1, which="LA", tol=1e-10)
  np.testing.assert_allclose(la.eigenvalues, [2.0], rtol=1e-10)


def test_a_large_unwanted_eigenvalue_does_not_end_the_run_early():
  """Top eigenvalue 461 along a direction with 2.2e-4 of the start vector, and -360.

  After two products the top Ritz value (0.18) has not yet seen 461 and barely moves; with the
  tolerance relative to the largest |θ| of all Ritz values (the -360) the gap estimate passed it as
  converged (4 of 600 such problems did). The tolerance is relative to the wanted Ritz values.
  """
  n, key = 60, jax.random.key(2)
  params = {"x": jnp.zeros(n)}
  unit = hessian.hessian_operator(quadratic_loss, params, jnp.eye(n))
  z = np.asarray(hessian.top_eigenvalues(unit, 1, key=key, max_iter=1).eigenvectors_flat[0])
  r = np.random.default_rng(2)
  g = r.normal(size=n)
  g -= (g @ z) * z
  overlap = 10 ** r.uniform(-4, -2)  # 2.2e-4
  top = overlap * z + np.sqrt(1 - overlap**2) * g / np.linalg.norm(g)
  u = np.linalg.qr(np.column_stack([top, r.normal(size=(n, n - 1))]))[0]
  u[:, 0] = top
  a = (u * np.concatenate([[461.0, -360.0], r.uniform(-1.0, 1.0, n - 2)])) @ u.T
  op = hessian.hessian_operator(quadratic_loss, params, jnp.asarray(0.5 * (a + a.T)))
  for stop_on in ("eigenvalue", "residual"):
    got = hessian.top_eigenvalues(op, 1, key=key, tol=1e-4, stop_on=stop_on)
    assert got.converged[0]
    assert got.eigenvalues[0] == pytest.approx(461.0, rel=1e-4), (stop_on, got.eigenvalues)


def test_no_epsilon_bias():
  # PyHessian's ‖v‖ + 1e-6 would bias this eigenvalue low by ~1e-6 relative.
  params, a = quadratic(np.array([1e-3, 2e-3, 3e-3, 5e-3]))
  op = hessian.hessian_operator(quadratic_loss, params, a)
  top = hessian.top_eigenvalues(op, 1, tol=1e-12)
  assert top.eigenvalues[0] == pytest.approx(5e-3, rel=1e-12)
  pw = hessian.power_iteration(op, 1, tol=1e-14, max_iter=2000)
  assert pw.eigenvalues[0] == pytest.approx(5e-3, rel=1e-10)


def test_full_data_eigenvalues(op):
  params, (x, y) = mlp()
  batches = [(x[:13], y[:13]), (x[13:], y[13:])]
  full = hessian.hessian_operator(mlp_loss, params, batches=batches)
  top = hessian.top_eigenvalues(full, 2, tol=1e-9)
  np.testing.assert_allclose(
    top.eigenvalues, np.linalg.eigvalsh(mlp_hessian())[::-1][:2], rtol=1e-8
  )


def test_flax_cnn_eigenvalues():
  import flax.linen as nn

  class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.tanh(nn.Conv(3, (3, 3), param_dtype=jnp.float64)(x))
      return nn.Dense(3, param_dtype=jnp.float64)(x.reshape((x.shape[0], -1)))

  r = np.random.default_rng(0)
  x = jnp.asarray(r.normal(size=(6, 5, 5, 2)))
  labels = jnp.asarray(r.integers(0, 3, size=(6,)))
  model = CNN()
  params = jax.jit(model.init)(jax.random.key(0), x)["params"]

  def loss_fn(p, batch):
    logits = model.apply({"params": p}, batch[0])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), batch[1][:, None], axis=1))

  op = hessian.hessian_operator(loss_fn, params, (x, labels))
  h = np.asarray(op.matmat(jnp.eye(op.size)))
  np.testing.assert_allclose(h, h.T, atol=1e-12)
  ev = np.linalg.eigvalsh(h)[::-1]
  top = hessian.top_eigenvalues(op, 3, tol=1e-10)
  np.testing.assert_allclose(top.eigenvalues, ev[:3], rtol=1e-8)


def test_lanczos_needs_fewer_products_than_power_iteration(op):
  ev = np.linalg.eigvalsh(mlp_hessian())[::-1]
  lz = hessian.top_eigenvalues(op, 3, tol=1e-4)
  # Power iteration stops on its residual: 1e-4 relative leaves errors of ~4e-8 here.
  pw = hessian.power_iteration(op, 3, tol=1e-4, max_iter=1000)
  err_lz = np.max(np.abs(lz.eigenvalues - ev[:3]) / ev[0])
  err_pw = np.max(np.abs(pw.eigenvalues - ev[:3]) / ev[0])
  assert err_lz < 1e-6 and err_lz < err_pw
  assert lz.num_matvecs * 5 < pw.num_matvecs


def test_bad_arguments(op):
  with pytest.raises(ValueError, match=r"^which must be one of \('LA', 'LM', 'SA'\), got 'BE'$"):
    hessian.top_eigenvalues(op, 1, which="BE")
  with pytest.raises(ValueError, match="k must"):
    hessian.top_eigenvalues(op, 0)


def _matrix_operator(a, dtype=jnp.float64):
  """The Hessian of ``0.5 xᵀAx``: ``A`` itself."""
  params = {"x": jnp.zeros(a.shape[0], dtype)}
  return hessian.hessian_operator(quadratic_loss, params, jnp.asarray(a, dtype))


def test_a_start_vector_in_an_invariant_subspace_restarts():
  """A symmetric parameter pair: ``H = [[11, -10], [-10, 11]] ⊕ 3·I₄``, top eigenvalue 21 along
  ``(e₀ − e₁)/√2``. A Rademacher start with equal first entries (half of them) has no component
  along it: its Krylov space is invariant after 2 steps, with Ritz values 1 and 3, exact. That
  run was returned as converged with the top eigenvalue 3; it now restarts from a fresh vector."""
  a = np.zeros((6, 6))
  a[:2, :2] = [[11.0, -10.0], [-10.0, 11.0]]
  a[2:, 2:] = 3.0 * np.eye(4)
  op = _matrix_operator(a)
  ev = np.linalg.eigvalsh(a)[::-1]
  for seed in range(8):
    got = hessian.top_eigenvalues(op, 1, key=jax.random.key(seed))
    assert got.converged[0]
    assert got.eigenvalues[0] == pytest.approx(ev[0], rel=1e-12), seed
  # An eigenvector of the smallest eigenvalue as the start vector.
  v0 = np.array([1.0, 1.0, 0, 0, 0, 0])
  got = hessian.top_eigenvalues(op, 3, v0=v0)
  np.testing.assert_allclose(got.eigenvalues, ev[:3], rtol=1e-12)
  assert got.converged.all()
  vecs = np.asarray(got.eigenvectors_flat)
  assert np.linalg.norm(vecs @ a - got.eigenvalues[:, None] * vecs) <= 1e-12 * ev[0]
  # With no room left to restart (one step), the exact pair of the start is not taken for the top.
  one = hessian.top_eigenvalues(op, 1, v0=v0, max_iter=1)
  assert one.eigenvalues[0] == pytest.approx(1.0, rel=1e-12) and not one.converged[0]
  # A rank-1 Hessian: the Krylov space is invariant after 2 steps; a fresh random vector, which
  # H maps to 0, ends the run at the third step instead of at max_iter (without the check for
  # repeated eigenvalues, whose run H maps to 0 from its start, orthogonal to the pairs found:
  # nothing lies beyond 0; it goes on past that first step, whose residual 0 bounds the distance
  # to some eigenvalue only, and stopped there it reported errors [inf, 3] for values [3, 0]).
  low_op = _matrix_operator(np.diag([3.0] + [0.0] * 99))
  low = hessian.top_eigenvalues(low_op, 2, check_repeated=False)
  np.testing.assert_allclose(low.eigenvalues, [3.0, 0.0], rtol=1e-12, atol=1e-12)
  assert low.converged.all() and low.num_matvecs == 3
  checked = hessian.top_eigenvalues(low_op, 2)
  np.testing.assert_allclose(checked.eigenvalues, [3.0, 0.0], rtol=1e-12, atol=1e-12)
  assert checked.converged.all() and checked.num_matvecs <= 8
  assert (checked.errors <= 1e-12).all(), checked.errors


@pytest.mark.parametrize("k", [2, 3, 4])
def test_a_repeated_top_eigenvalue_is_found_with_its_multiplicity(k):
  """``H = diag(5, 5, 5, 1, 0.5, 0.2)``: a Krylov space holds one copy of 5 and is invariant after
  4 steps; ``k = 2`` gave ``[5, 1]``, converged. The restarts find the other copies. The start
  vector of ones makes the breakdown exact (``β_4 = 0``); from a normal one, rounding leaves
  ``β_4`` near 1e-14, and the check for repeated eigenvalues finds the others (next test)."""
  ev = np.array([5.0, 5.0, 5.0, 1.0, 0.5, 0.2])
  op = _matrix_operator(np.diag(ev))
  got = hessian.top_eigenvalues(op, k, v0=np.ones(6))
  np.testing.assert_allclose(got.eigenvalues, ev[:k], rtol=1e-12)
  assert got.converged.all()


@pytest.mark.parametrize("scale", [1e-20, 1e20])
def test_float32_eigenvalues_at_extreme_scales(scale):
  """``H = s·diag(1, ..., 50)`` in float32: products are finite, but their squares under- or
  overflow float32, which ended Lanczos after one step (``25.5·s``, converged, or "invariant
  after 1 steps" for ``k = 2``) and made power iteration raise NonFiniteError."""
  d = np.arange(1.0, 51.0)
  op = _matrix_operator(scale * np.diag(d), jnp.float32)
  top = hessian.top_eigenvalues(op, 2)
  np.testing.assert_allclose(top.eigenvalues / scale, [50.0, 49.0], rtol=1e-5)
  assert top.converged.all()
  spectrum = hessian.spectral_density(op, jax.random.key(0), num_probes=1, num_steps=50)
  np.testing.assert_allclose(np.sort(spectrum.nodes[0]) / scale, d, rtol=1e-4)
  pw = hessian.power_iteration(op, 1)
  unit = hessian.power_iteration(_matrix_operator(np.diag(d), jnp.float32), 1)
  assert pw.eigenvalues[0] / scale == pytest.approx(unit.eigenvalues[0], rel=1e-5)
  assert abs(pw.eigenvalues[0] - 50.0 * scale) <= pw.residuals[0] * 1.001


def test_float16_lanczos_survives_a_residual_below_the_smallest_normal_number():
  """``H = diag(1, 2, 3)`` in float16: after 3 steps the orthogonalised residual is at rounding
  level, below float16's smallest normal number (6.1e-5). Its norm divided it by a subnormal
  power of two, which XLA computes as a product with the reciprocal (2^19 > 65504): ``inf``, and
  Lanczos raised NonFiniteError blaming the loss; power iteration and the density too."""
  from adahessian_jax.hessian._lanczos import norm

  tiny = jnp.asarray([[1e-6, 5e-7, 0.0]], jnp.float16)
  assert float(norm(tiny)[0]) == pytest.approx(np.hypot(1e-6, 5e-7), rel=2e-2)
  op = _matrix_operator(np.diag([1.0, 2.0, 3.0]), jnp.float16)
  top = hessian.top_eigenvalues(op, 3)
  np.testing.assert_allclose(top.eigenvalues, [3.0, 2.0, 1.0], rtol=5e-3)
  spectrum = hessian.spectral_density(op, jax.random.key(0), num_probes=2)
  np.testing.assert_allclose(np.sort(spectrum.nodes, axis=1), [[1.0, 2.0, 3.0]] * 2, rtol=5e-3)


def test_float16_curvature_below_the_smallest_normal_number_is_measured():
  """``H = 1e-5·diag(1, 2, 3, 5, 7)`` in float16: Hessian-vector products, Lanczos residuals and
  power iterates have norms below 6.1e-5, and dividing by such a norm overflowed (XLA multiplies
  by its reciprocal): ``inf`` in the next product, and NonFiniteError blaming the loss from
  Lanczos, the density, power iteration and tracking. Vectors are now normalised after scaling
  by a power of two, so the divisor is never subnormal."""
  d = np.array([1.0, 2.0, 3.0, 5.0, 7.0])
  # float16 holds 1e-6 as 17 times its smallest subnormal number, 6e-8: about 4 bits.
  for scale, rtol in [(1e-5, 2e-2), (1e-6, 0.15)]:
    op = _matrix_operator(scale * np.diag(d), jnp.float16)
    top = hessian.top_eigenvalues(op, 2)
    np.testing.assert_allclose(top.eigenvalues / scale, [7.0, 5.0], rtol=rtol)
    spectrum = hessian.spectral_density(op, jax.random.key(0), num_probes=2, num_steps=5)
    np.testing.assert_allclose(np.sort(spectrum.nodes, axis=1) / scale, [d] * 2, rtol=rtol)
    pw = hessian.power_iteration(op, 1, tol=1e-2)
    assert pw.eigenvalues[0] / scale == pytest.approx(7.0, rel=rtol)
    tracked = hessian.track_curvature(op, None, tol=1e-2)
    assert tracked.sharpness.eigenvalue / scale == pytest.approx(7.0, rel=rtol)


def test_power_iteration_judges_convergence_by_the_residual():
  """Eigenvalues ±3: the iterates alternate with the Rayleigh quotient 0 unchanged, which the
  relative-change test took for converged although the residual is 3."""
  a = np.diag([3.0, -3.0])
  got = hessian.power_iteration(_matrix_operator(a), 1)
  assert not got.converged[0]
  v = np.asarray(got.eigenvectors_flat[0])
  assert got.eigenvalues[0] == pytest.approx(v @ a @ v, abs=1e-12)
  assert got.residuals[0] == pytest.approx(np.linalg.norm(a @ v - got.eigenvalues[0] * v))
  assert got.residuals[0] > 1.0


def test_float32_power_iteration_meets_its_tolerance_before_claiming_it():
  """The 75-parameter MLP in float32: the rounding-level exception (residual ``≤ 10·√n·eps``
  of ``‖Hv‖``, 1e-5 here) meant for a null space ended the iteration at a residual of 1e-5 of
  ``θ``, marked converged for ``tol=1e-6`` and ``1e-7``. Float32 reaches 1e-7 here."""
  params, batch = mlp()
  f32 = functools.partial(jax.tree.map, lambda x: x.astype(jnp.float32))
  op = hessian.hessian_operator(mlp_loss, f32(params), f32(batch))
  for tol in (1e-6, 1e-7):
    got = hessian.power_iteration(op, 1, tol=tol)
    assert got.converged[0]
    assert got.residuals[0] <= 1.5 * tol * abs(got.eigenvalues[0])


def test_power_iteration_after_an_unconverged_value_claims_nothing():
  """Eigenvalues ±5 and 1: the first iteration cannot settle; deflating its vector, not an
  eigenvector, left the second to settle on a value that is no eigenvalue (1.0, marked
  converged, where ±5 are the next largest in magnitude)."""
  got = hessian.power_iteration(_matrix_operator(np.diag([5.0, -5.0, 1.0, 0.5])), 2, max_iter=200)
  assert not got.converged.any()


def test_power_iteration_on_zero_and_deflated_null_spaces():
  """A rank-1 ``H = uuᵀ`` (eigenvalues 55, 0, 0, 0, 0): the deflated second iteration normalised
  rounding noise and returned 31.1; a zero Hessian divided 0 by 0 (NonFiniteError)."""
  u = np.arange(1.0, 6.0)
  got = hessian.power_iteration(_matrix_operator(np.outer(u, u)), 2)
  np.testing.assert_allclose(got.eigenvalues, [55.0, 0.0], rtol=1e-12, atol=1e-12)
  assert got.converged.all()
  assert np.all(got.residuals <= 1e-12 * 55.0)
  zero = hessian.power_iteration(_matrix_operator(np.zeros((5, 5))), 1)
  assert zero.eigenvalues[0] == 0.0 and zero.residuals[0] == 0.0 and zero.converged[0]


def test_the_top_eigenvector_of_a_symmetric_pair_is_found_from_any_key():
  # Parameters a and b enter the loss alike, so a − b is an eigenvector (eigenvalue 20 here, the
  # top). A Rademacher start has z_a = z_b, hence no component along it, half the time: Lanczos,
  # power iteration and tracking then converged to the second eigenvalue, marked converged.
  rng = np.random.default_rng(0)
  c_mat = rng.normal(size=(30, 30)) / 6
  c_mat, c = jnp.asarray(c_mat @ c_mat.T), jnp.asarray(rng.normal(size=30))

  def loss(p, _):
    s = p["a"] + p["b"]
    return 5 * (p["a"] - p["b"]) ** 2 + 0.5 * p["w"] @ c_mat @ p["w"] + s * (c @ p["w"]) + s**2 / 2

  params = {"a": jnp.asarray(0.1), "b": jnp.asarray(0.1), "w": jnp.zeros(30)}
  op = hessian.hessian_operator(loss, params, jnp.ones(1))
  dense = jax.jit(jax.hessian(lambda v: loss(op.unravel(v), None)))(op.ravel(params))
  top = np.linalg.eigvalsh(np.asarray(dense))[-1]
  assert top == pytest.approx(20.0, rel=1e-12)
  for seed in range(12):
    key = jax.random.key(seed)
    assert hessian.top_eigenvalues(op, 1, key=key).eigenvalues[0] == pytest.approx(top, rel=1e-8)
    power = hessian.power_iteration(op, 1, key=key, tol=1e-10, max_iter=2000)
    assert power.eigenvalues[0] == pytest.approx(top, rel=1e-6)
    tracked = hessian.track_curvature(op, key=key, tol=1e-8)
    assert tracked.sharpness.eigenvalue == pytest.approx(top, rel=1e-6)


def test_repeated_eigenvalues_are_found_from_a_normal_start():
  """A linear model with 3 outputs under the mean squared error: ``H = kron(2XᵀX/m, I₃)``, every
  eigenvalue threefold. One Krylov space holds one copy of each: ``k = 5`` returned the five
  largest distinct values, all converged. The deflated runs of ``check_repeated`` find the
  copies, for every ``which``."""
  r = np.random.default_rng(0)
  x = r.normal(size=(50, 6))
  h = np.kron(2 * x.T @ x / 50, np.eye(3))
  ev = np.linalg.eigvalsh(h)
  op = _matrix_operator(h)
  plain = hessian.top_eigenvalues(op, 5, tol=1e-10, check_repeated=False)
  assert plain.converged.all()
  distinct_ev = np.linalg.eigvalsh(2 * x.T @ x / 50)[::-1]  # each value once
  np.testing.assert_allclose(plain.eigenvalues, distinct_ev[:5], rtol=1e-8)
  expect = {"LA": ev[::-1][:5], "SA": ev[:5], "LM": ev[np.argsort(-np.abs(ev))][:5]}
  for which, want in expect.items():
    got = hessian.top_eigenvalues(op, 5, which=which, tol=1e-10)
    np.testing.assert_allclose(got.eigenvalues, want, rtol=1e-8, err_msg=which)
    assert got.converged.all() and got.num_matvecs > plain.num_matvecs
    vecs = np.asarray(got.eigenvectors_flat)
    np.testing.assert_allclose(vecs @ vecs.T, np.eye(5), atol=1e-8)
    np.testing.assert_allclose(vecs @ h, got.eigenvalues[:, None] * vecs, atol=1e-7)
  distinct = _matrix_operator(np.diag(np.arange(30.0, 0.0, -1.0)))
  cheap = hessian.top_eigenvalues(distinct, 3, tol=1e-10)
  np.testing.assert_allclose(cheap.eigenvalues, [30.0, 29.0, 28.0], rtol=1e-8)
  assert cheap.converged.all()


def test_the_check_for_repeated_eigenvalues_does_not_stop_before_a_copy_shows():
  """Eigenvalues (3, 3, 2, 2, 2) above 35 in [0.1, 1]: the deflated run's top Ritz value, 0.84
  after 2 products (estimated error 0.54) while the copy of 3 still hid in the bulk, passed for
  'nothing beyond the k-th value 2', and [3, 2] came back converged. The run now converges."""
  r = np.random.default_rng(0)
  ev = np.concatenate([[3.0, 3.0, 2.0, 2.0, 2.0], r.uniform(0.1, 1.0, 35)])
  op = hessian.hessian_operator(quadratic_loss, *quadratic(ev))
  got = hessian.top_eigenvalues(op, 2, tol=1e-10)
  np.testing.assert_allclose(got.eigenvalues, [3.0, 3.0], rtol=1e-9)
  assert got.converged.all()


def test_a_check_out_of_max_iter_vouches_for_nothing():
  """Eigenvalues (10, 9) above a dense bulk in [0, 1]: the pairs converge in a few products, the
  deflated run on the bulk does not within max_iter = 10. Its top Ritz value, far below 9, was
  taken for 'nothing beyond the k-th value' and the 9 reported converged; the run had not shown
  that (a copy with a small component in the start vector shows up late)."""
  ev = np.concatenate([[10.0, 9.0], np.linspace(0.0, 1.0, 120)])
  op = hessian.hessian_operator(quadratic_loss, *quadratic(ev))
  plain = hessian.top_eigenvalues(op, 2, tol=1e-8, check_repeated=False, max_iter=10)
  assert plain.converged.all() and plain.num_matvecs == 10
  short = hessian.top_eigenvalues(op, 2, tol=1e-8, max_iter=10)
  np.testing.assert_allclose(short.eigenvalues, [10.0, 9.0], rtol=1e-9)
  assert short.converged.tolist() == [True, False] and short.num_matvecs == 20
  assert hessian.top_eigenvalues(op, 2, tol=1e-8).converged.all()  # the default max_iter: checked


def test_a_later_measurement_compiles_nothing_whatever_its_step_count():
  # A training run measures the same loss_fn at new params, and the number of Lanczos steps
  # changes from one measurement to the next. The Ritz vectors came from the basis sliced to the
  # steps taken: a slice, a product and a squeeze were compiled anew for every new step count
  # (3 programs per run, 6 for k = 3 with its deflated check). A size no other test uses (29), so
  # that no earlier test has compiled these shapes.
  ev = np.concatenate([[9.0, 8.5, 8.0, 3.0], np.linspace(-1.0, 2.0, 25)])
  hessian.top_eigenvalues(hessian.hessian_operator(quadratic_loss, *quadratic(ev)), 1, tol=1e-2)
  hessian.top_eigenvalues(hessian.hessian_operator(quadratic_loss, *quadratic(ev)), 3, tol=1e-2)
  steps = set()
  for seed, tol in [(1, 1e-5), (2, 1e-8), (3, 1e-11)]:
    op = hessian.hessian_operator(quadratic_loss, *quadratic(ev * (1 + 0.1 * seed), seed))
    with CompileCounter() as count:
      one = hessian.top_eigenvalues(op, 1, key=jax.random.key(seed), tol=tol)
      three = hessian.top_eigenvalues(op, 3, key=jax.random.key(seed), tol=tol)
    assert count.count == 0
    np.testing.assert_allclose(one.eigenvalues, 9.0 * (1 + 0.1 * seed), rtol=1e-6)
    np.testing.assert_allclose(three.eigenvalues, ev[:3] * (1 + 0.1 * seed), rtol=1e-6)
    steps |= {one.num_matvecs, three.num_matvecs}
  assert len(steps) >= 4  # the step counts differ from measurement to measurement


def test_a_pair_the_check_for_repeated_eigenvalues_adds_reports_its_residual_on_h():
  """Eigenvalue 5 threefold above 12 in about [-2, 2], k = 5 by magnitude at tol = 1e-5: the
  copies of 5 come from the deflated runs, whose residual is that of the deflated Hessian and
  misses the part of H y along the pairs found (their residuals, up to tol·5). It was reported
  10x below the true ‖H y − θ y‖."""
  ev = np.concatenate([[5.0, 5.0, 5.0], np.random.default_rng(0).normal(size=12)])
  params, a = quadratic(ev, 0)
  op = hessian.hessian_operator(quadratic_loss, params, a)
  got = hessian.top_eigenvalues(op, 5, which="LM", tol=1e-5)
  np.testing.assert_allclose(got.eigenvalues[:3], 5.0, rtol=1e-8)
  vecs = np.asarray(got.eigenvectors_flat)
  true = np.linalg.norm(vecs @ np.asarray(a) - got.eigenvalues[:, None] * vecs, axis=1)
  np.testing.assert_allclose(got.residuals, true, rtol=1e-6, atol=1e-13)
  assert np.all(true[got.converged] <= 1e-5 * 5.0)


def test_float32_does_not_claim_a_tolerance_below_its_rounding():
  """The 75-parameter MLP in float32 with ``tol=1e-9``: float32 products hold the eigenvalues to
  ~1e-7 of ``‖H‖``, but the Lanczos estimate ``|β_j s_j|`` kept falling, and the run returned
  ``converged`` with ``errors`` of ~1e-15 and residuals of 1e-11 to 1e-9 of ``‖H‖``, 1e7 and
  100-10,000 times below the true error and residual against the float64 Hessian. The part of
  the products that ``T`` does not hold (their rounding) now counts in both, and ``converged``
  says no."""
  params, batch = mlp()
  f32 = functools.partial(jax.tree.map, lambda x: x.astype(jnp.float32))
  op = hessian.hessian_operator(mlp_loss, f32(params), f32(batch))
  h = mlp_hessian()
  ev = np.linalg.eigvalsh(h)
  for which, want in [("LA", ev[::-1][:2]), ("SA", ev[:2])]:
    got = hessian.top_eigenvalues(op, 2, which=which, tol=1e-9)
    vecs = np.asarray(got.eigenvectors_flat, np.float64)
    true_residuals = np.linalg.norm(vecs @ h - got.eigenvalues[:, None] * vecs, axis=1)
    assert not got.converged.any(), which
    assert np.all(got.errors >= np.abs(got.eigenvalues - want) / 10), which
    assert np.all(got.residuals >= true_residuals / 10), which
    assert np.all(got.errors <= 1e-5 * np.max(np.abs(ev))), which  # the rounding, no more
    # A tolerance float32 reaches converges as before, in as many products.
    ok = hessian.top_eigenvalues(op, 2, which=which, tol=1e-4)
    assert ok.converged.all(), which
    np.testing.assert_allclose(ok.eigenvalues, want, rtol=1e-4)


@pytest.mark.parametrize("stop_on", ["residual", "eigenvalue"])
def test_a_run_out_of_max_iter_reports_an_infinite_error(stop_on):
  # After 2-4 products the estimate (the change over the last product, the gap) was below the
  # true error by up to 34x on these spectra, reported finite beside converged=False. Only a run
  # whose stopping test was met (or that stopped at the products' rounding) reports one now.
  finite = 0
  for name, ev in SLOW_SPECTRA.items():
    params, a = quadratic(ev, 0)
    op = hessian.hessian_operator(quadratic_loss, params, batch=a)
    top = np.sort(ev)[::-1][:2]
    for max_iter in (2, 3, 4, 20):
      for seed in range(3):
        got = hessian.top_eigenvalues(
          op, 2, key=jax.random.key(seed), max_iter=max_iter, tol=1e-4, stop_on=stop_on
        )
        where = (name, max_iter, seed, got.num_matvecs, got.errors)
        assert np.all(got.errors[~got.converged] == np.inf), where
        assert np.all(got.errors >= np.abs(got.eigenvalues - top) - 1e-14 * top[0]), where
        finite += int(np.sum(np.isfinite(got.errors)))
  assert finite >= 10  # converged pairs keep their estimate


def test_power_iteration_out_of_max_iter_reports_an_infinite_error():
  # Its error was the residual whether converged or not: after 1-5 products below the distance
  # to the largest-magnitude eigenvalue in 43 of 100 runs on these spectra.
  for name, ev in SLOW_SPECTRA.items():
    params, a = quadratic(ev, 0)
    op = hessian.hessian_operator(quadratic_loss, params, batch=a)
    top = ev[np.argmax(np.abs(ev))]
    for max_iter in (1, 2, 3, 100):
      for seed in range(3):
        got = hessian.power_iteration(op, key=jax.random.key(seed), max_iter=max_iter)
        where = (name, max_iter, seed, got.errors, got.converged)
        assert got.errors[0] == (got.residuals[0] if got.converged[0] else np.inf), where
        assert got.errors[0] >= abs(got.eigenvalues[0] - top), where


def test_close_top_pair_error_covers_truth():
  """A top pair 1 % apart above a bulk under 0.5, ``stop_on="eigenvalue"``: each converged run's
  error covers its true error.

  The Ritz values only bound the unknown eigenvalues: before the Krylov space splits the pair, the
  nearest other Ritz value is in the bulk, and ``r²/gap`` with that gap passed for converged
  after 5-6 products, at ``θ`` from 0.990 to 0.9998 with errors 10-230x below the truth (5 of
  these 10 starts). The gap is now taken as at most 1 % of ``|θ|`` (9-10 products, all covered).
  A start with little of the top eigenvector can still stop at ``θ ≈ 0.99`` before the space
  sees ``λ₁`` (8 of 72 starts on six such spectra).
  """
  r = np.random.default_rng(105)
  ev = np.r_[1.0, 0.99, np.sort(r.uniform(0.0, 0.5, 28))[::-1]]
  params, a = quadratic(ev, 5)
  op = hessian.hessian_operator(quadratic_loss, params, a)
  for seed in range(10):
    got = hessian.top_eigenvalues(op, 1, key=jax.random.key(seed), tol=1e-4, stop_on="eigenvalue")
    assert got.converged[0], seed
    true = abs(got.eigenvalues[0] - 1.0)
    assert true <= got.errors[0], (seed, got.eigenvalues[0], true, got.errors[0])


def test_a_close_pair_split_between_the_check_and_the_first_run_is_covered():
  """Top eigenvalues ``1, 1, 1 − d, 1 − 1.7d`` (``d`` 3e-5 to 3e-3) above a bulk under 0.5,
  ``k = 2``, ``tol=1e-4``: each run's gap estimate ``r²/gap`` saw only its own Ritz values, so a
  pair the first run held once (or had not split) and the check for repeated eigenvalues found
  again each showed a gap to the bulk; on these five starts 3 of 10 converged values had errors
  below their true error (by up to 51x). Their gap is now at most the distance to the nearest value
  any run found, and an eigenvalue the check found within the tolerance of the ``k``-th ranks
  in: all covered, with the same products. (A value the first run left a mixture of a close pair
  can still be off by up to ~3 residuals: the five starts are ones without such a mixture.)
  """
  n, under, matvecs = 30, [], 0
  for seed in [6, 10, 11, 13, 15]:
    r = np.random.default_rng([7, seed])
    d = 10 ** r.uniform(-5, -2.5)
    ev = np.r_[1.0, 1.0 - d * np.array([0, 1, 1.7]), np.sort(r.uniform(0, 0.5, n - 4))[::-1]]
    ev = np.sort(ev)[::-1]
    u, _ = np.linalg.qr(r.normal(size=(n, n)))
    got = hessian.top_eigenvalues(
      _matrix_operator((u * ev) @ u.T), 2, key=jax.random.key(seed), tol=1e-4
    )
    assert got.converged.all(), seed
    true = np.abs(got.eigenvalues - ev[:2])
    under += [(seed, i, true[i] / got.errors[i]) for i in range(2) if true[i] > got.errors[i]]
    matvecs += got.num_matvecs
  assert under == []
  assert matvecs == 137


def test_a_single_top_value_checked_for_repeated_eigenvalues_covers_a_cluster():
  """Top clusters of 3-4 eigenvalues within ``d`` (2e-5 to 5e-3) of 1 above a bulk under 0.5,
  ``k = 1``, ``tol=1e-4``: one Krylov space cannot tell a cluster it has not split from an
  isolated eigenvalue, the gap to the next Ritz value is the capped gap to the bulk, and
  ``r²/gap`` under-covered all five (by 30-700x; 24 of 40 such starts). ``check_repeated=True``
  runs the check for ``k = 1`` too (the default still skips it, with the same products): the
  error is at least ``min(r, r²/gap)`` with the gap to the value the deflated run found, and a
  value it found beyond by more than the tolerance replaces the first (seeds 22 and 25: errors
  6.5e-4 and 4.3e-4 of the first run, 2e-7 and 1e-6 after). All five covered, about twice the
  products (4 of the 40 starts, whose first value mixed the cluster, still by up to 1.6x).
  """
  n, under, checked_under, matvecs, checked_matvecs = 30, [], [], 0, 0
  for seed in [0, 7, 9, 22, 25]:
    r = np.random.default_rng([8, seed])
    d = 10 ** r.uniform(-5, -2)
    m = r.integers(3, 5)
    top = np.r_[1.0, 1.0 - np.sort(r.uniform(0, d, m - 1))]
    ev = np.sort(np.r_[top, r.uniform(0, 0.5, n - m)])[::-1]
    u, _ = np.linalg.qr(r.normal(size=(n, n)))
    op = _matrix_operator((u * ev) @ u.T)
    for check, bad in (({}, under), ({"check_repeated": True}, checked_under)):
      got = hessian.top_eigenvalues(op, 1, key=jax.random.key(seed), tol=1e-4, **check)
      assert got.converged[0], (seed, check)
      true = abs(got.eigenvalues[0] - 1.0)
      if true > got.errors[0]:
        bad.append((seed, true / got.errors[0]))
      if check:
        checked_matvecs += got.num_matvecs
      else:
        matvecs += got.num_matvecs
  assert [seed for seed, _ in under] == [0, 7, 9, 22, 25]  # the default's estimate, unchanged
  assert checked_under == []
  assert (matvecs, checked_matvecs) == (34, 82)


@pytest.mark.parametrize("k", [1, 2])
def test_a_block_that_is_a_multiple_of_the_identity_to_rounding_converges_with_a_known_error(k):
  # An MSE output bias's block, 2·I, whose products are rounded to float32 in a float64
  # operator: a random vector is an eigenvector to rounding, and the default stop_on="residual"
  # stopped after one step (k = 1) converged with errors inf, which nothing reports as known.
  def loss(p, b):
    x = p["b"].astype(jnp.float32)
    return jnp.sum((x - b) ** 2).astype(jnp.float64)

  op = hessian.hessian_operator(loss, {"b": jnp.full(4, 0.3)}, batch=jnp.zeros(4, jnp.float32))
  for seed in range(3):
    eig = hessian.top_eigenvalues(op, k=k, key=jax.random.key(seed))
    assert eig.converged.all() and np.isfinite(eig.errors).all(), (seed, eig.errors)
    np.testing.assert_allclose(eig.eigenvalues, 2.0, rtol=1e-6)
    assert (eig.errors <= 1e-6).all() and eig.num_matvecs <= 8


def test_eigenvectors_of_boxed_params_name_their_leading_axis():
  # The Linen boxes kept the params' names, one short of the (k, 3, 4) value: nn.get_partition_spec
  # gave P('embed', 'mlp') for it. The k axis is unnamed now, and the values are those of the flat
  # eigenvectors.
  import flax.linen as nn

  w = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)))
  params = {"w": nn.Partitioned(w, names=("embed", "mlp")), "b": jnp.zeros(4)}
  x = jnp.asarray(np.random.default_rng(1).normal(size=(5, 3)))

  def loss(p, x):
    p = nn.unbox(p)
    return jnp.mean(jnp.tanh(x @ p["w"] + p["b"]) ** 2)

  op = hessian.hessian_operator(loss, params, x)
  eig = hessian.top_eigenvalues(op, k=2)
  box = eig.eigenvectors["w"]
  assert isinstance(box, nn.Partitioned) and box.names == (None, "embed", "mlp")
  assert nn.get_partition_spec(eig.eigenvectors)["w"] == jax.sharding.PartitionSpec(
    None, "embed", "mlp"
  )
  flat = np.concatenate(
    [np.asarray(eig.eigenvectors["b"]), np.asarray(box.value).reshape(2, -1)], 1
  )
  np.testing.assert_array_equal(flat, np.asarray(eig.eigenvectors_flat))


def test_eigenvectors_keep_a_box_of_another_kind_as_it_is():
  # flax.core.meta.add_axis called every AxisMetadata's add_axis with {"partition_name": None}:
  # a user's box whose add_axis needs a parameter of its own (a transform's metadata_params)
  # raised KeyError after the whole solve, where the eigenvectors came back before. Such a box is
  # kept as it is (Flax's nn.Partitioned is the one the k axis is named in).
  import flax.struct
  from flax.core import meta

  class Tagged(flax.struct.PyTreeNode, meta.AxisMetadata):
    value: object
    tag: str = flax.struct.field(pytree_node=False, default="w")

    def unbox(self):
      return self.value

    def replace_boxed(self, val):
      return self.replace(value=val)

    def add_axis(self, index, params):
      return self.replace(tag=self.tag + params["layers"])

    def remove_axis(self, index, params):
      return self

  w = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)))
  x = jnp.asarray(np.random.default_rng(1).normal(size=(5, 3)))

  def loss(p, x):
    return jnp.mean(jnp.tanh(x @ p["w"].unbox() + p["b"]) ** 2)

  op = hessian.hessian_operator(loss, {"w": Tagged(w), "b": jnp.zeros(4)}, x)
  eig = hessian.top_eigenvalues(op, k=2)
  box = eig.eigenvectors["w"]
  assert isinstance(box, Tagged) and box.tag == "w"
  flat = np.concatenate(
    [np.asarray(eig.eigenvectors["b"]), np.asarray(box.value).reshape(2, -1)], 1
  )
  np.testing.assert_array_equal(flat, np.asarray(eig.eigenvectors_flat))
