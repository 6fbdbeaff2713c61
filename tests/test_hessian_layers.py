"""Tests of adahessian_jax.hessian.layers (per-leaf breakdown)."""

import jax
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
