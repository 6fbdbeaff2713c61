"""Tests of adahessian_jax.hessian.layers (per-leaf breakdown)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hessian_problems import mlp, mlp_hessian, mlp_loss

from adahessian_jax import hessian


def test_layer_breakdown_matches_dense_blocks():
  params, batch = mlp()
  op = hessian.hessian_operator(mlp_loss, params, batch)
  h = mlp_hessian()
  key = jax.random.key(0)
  out = hessian.layer_breakdown(op, key, num_samples=200, tol=1e-10)
  assert list(out) == list(op.leaf_names)
  diag = hessian.hutchinson_diagonal_estimate(op, jax.random.split(key)[0], num_samples=200)
  z = []
  for name, sl in zip(op.leaf_names, op.leaf_slices, strict=True):
    blk, lc = h[sl, sl], out[name]
    assert lc.size == sl.stop - sl.start
    assert lc.top_eigenvalue == pytest.approx(np.linalg.eigvalsh(blk)[-1], rel=1e-8)
    np.testing.assert_allclose(np.ravel(lc.diagonal), diag.diagonal_flat[sl], atol=1e-13)
    assert lc.trace == pytest.approx(float(np.sum(lc.diagonal)), rel=1e-10)
    z.append((lc.trace - np.trace(blk)) / lc.trace_stderr)
  assert np.all(np.abs(z) < 4), z
  assert sum(lc.trace for lc in out.values()) == pytest.approx(
    float(np.sum(diag.diagonal_flat)), rel=1e-10
  )


def test_without_eigenvalues():
  params, batch = mlp()
  op = hessian.hessian_operator(mlp_loss, params, batch)
  out = hessian.layer_breakdown(op, jax.random.key(0), num_samples=10, eigenvalues=False)
  assert all(np.isnan(lc.top_eigenvalue) and lc.num_matvecs == 0 for lc in out.values())


def _operator(loss_fn, params):
  return hessian.hessian_operator(loss_fn, params, batch=jnp.zeros(1))


def test_zero_size_leaf():
  # "e" has no entries: trace 0, no eigenvalue (top_eigenvalues raised on the empty block).
  def loss_fn(p, b):
    return jnp.sum(jnp.arange(1.0, 5.0) * p["v"] ** 2) + jnp.sum(p["e"])

  op = _operator(loss_fn, {"e": jnp.zeros((0, 3)), "v": jnp.ones(4)})
  out = hessian.layer_breakdown(op, jax.random.key(0), num_samples=4, tol=1e-10)
  e, v = out["e"], out["v"]
  assert e.size == 0 and e.trace == 0.0 and e.trace_stderr == 0.0 and e.diagonal.shape == (0, 3)
  assert np.isnan(e.top_eigenvalue) and e.num_matvecs == 0
  assert v.trace == pytest.approx(20.0, rel=1e-12) and v.top_eigenvalue == pytest.approx(8.0)


def test_colliding_leaf_names_keep_both_leaves():
  def loss_fn(p, b):
    return jnp.sum(p["a/b"] ** 2) + 5.0 * jnp.sum(p["a"]["b"] ** 2)

  op = _operator(loss_fn, {"a/b": jnp.ones(2), "a": {"b": jnp.ones(3)}})
  out = hessian.layer_breakdown(op, jax.random.key(0), num_samples=4)
  assert {k: (v.size, v.trace) for k, v in out.items()} == {
    "['a']['b']": (3, 30.0),
    "['a/b']": (2, 4.0),
  }
  assert out["['a']['b']"].top_eigenvalue == pytest.approx(10.0)


def test_bfloat16_traces_are_accumulated_in_float64():
  d = jnp.asarray([0.1, 3.3, 1e3, 7.77], jnp.bfloat16)
  op = _operator(lambda p, b: 0.5 * jnp.sum(d * p["w"] ** 2), {"w": jnp.ones(4, jnp.bfloat16)})
  lc = hessian.layer_breakdown(op, jax.random.key(0), num_samples=1000, eigenvalues=False)["w"]
  exact = np.asarray(d, np.float64)  # z ⊙ Hz = diag(H) exactly, for every probe
  assert lc.trace == pytest.approx(exact.sum(), rel=1e-7) and lc.trace_stderr == 0.0
  assert lc.diagonal.dtype == jnp.float32
  np.testing.assert_allclose(lc.diagonal, exact, rtol=1e-6)
