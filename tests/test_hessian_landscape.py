"""Tests of adahessian_jax.hessian.landscape and .plot."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hessian_problems import mlp, mlp_hessian, mlp_loss

from adahessian_jax import hessian


@pytest.fixture(scope="module")
def op():
  params, (x, y) = mlp()
  return hessian.hessian_operator(mlp_loss, params, batches=[(x[:15], y[:15]), (x[15:], y[15:])])


def _direct(op, flat):
  params, batch = mlp()
  return float(mlp_loss(op.unravel(op.ravel(params) + flat), batch))


def test_1d_along_the_top_eigenvector_has_its_curvature(op):
  h = 1e-3
  ls = hessian.loss_landscape_1d(op, [-h, 0.0, h])
  lam = np.linalg.eigvalsh(mlp_hessian())[-1]
  curvature = (ls.losses[0] - 2 * ls.losses[1] + ls.losses[2]) / h**2
  assert curvature == pytest.approx(lam, rel=1e-4)
  assert ls.losses[1] == pytest.approx(float(op.loss()), rel=1e-14)
  assert float(jnp.linalg.norm(ls.direction)) == pytest.approx(1.0)


def test_1d_given_direction_matches_direct_evaluation(op):
  d = op.unravel(jnp.asarray(np.random.default_rng(0).normal(size=op.size)))
  alphas = np.linspace(-1, 1, 7)
  ls = hessian.loss_landscape_1d(op, alphas, d, normalize="unit", chunk=3)
  unit = op.ravel(d) / jnp.linalg.norm(op.ravel(d))
  want = [_direct(op, a * unit) for a in alphas]
  np.testing.assert_allclose(ls.losses, want, rtol=1e-13)


def test_2d_matches_direct_evaluation(op):
  rng = np.random.default_rng(1)
  d1, d2 = (jnp.asarray(rng.normal(size=op.size)) for _ in range(2))
  alphas, betas = np.linspace(-0.5, 0.5, 4), np.linspace(-1, 1, 3)
  ls = hessian.loss_landscape_2d(op, alphas, betas, (d1, d2))
  assert ls.losses.shape == (4, 3)
  for i, j in [(0, 0), (3, 1), (2, 2)]:
    assert ls.losses[i, j] == pytest.approx(_direct(op, alphas[i] * d1 + betas[j] * d2), rel=1e-13)
  default = hessian.loss_landscape_2d(op, alphas, betas)
  np.testing.assert_allclose(default.directions @ default.directions.T, np.eye(2), atol=1e-10)


def test_layer_normalisation(op):
  d = jnp.ones(op.size)
  ls = hessian.loss_landscape_1d(op, [0.0], d, normalize="layer")
  p = op.ravel(op.params)
  for sl in op.leaf_slices:
    assert float(jnp.linalg.norm(ls.direction[sl])) == pytest.approx(
      float(jnp.linalg.norm(p[sl])), rel=1e-12
    )
  with pytest.raises(ValueError, match="normalize must be one of"):
    hessian.loss_landscape_1d(op, [0.0], d, normalize="filters")


def test_filter_normalisation_gives_every_filter_its_weight_filters_norm():
  # Flax layouts: Conv kernel (h, w, in, out), Dense kernel (in, out); the output is last.
  r = np.random.default_rng(0)
  params = {
    "Conv_0": {"kernel": jnp.asarray(r.normal(size=(3, 3, 2, 4))), "bias": jnp.zeros(4)},
    "Dense_0": {
      "kernel": jnp.asarray(r.normal(size=(6, 5))),
      "bias": jnp.asarray(r.normal(size=5)),
    },
  }

  def loss_fn(p, x):
    h = jnp.tanh(jnp.einsum("hwio,bhwi->bo", p["Conv_0"]["kernel"], x) + p["Conv_0"]["bias"])
    h = jnp.concatenate([h, h[:, :2]], axis=1)
    return jnp.mean((h @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]) ** 2)

  x = jnp.asarray(r.normal(size=(4, 3, 3, 2)))
  op = hessian.hessian_operator(loss_fn, params, x)
  d = op.unravel(hessian.random_direction(op, jax.random.key(0)))
  d["Dense_0"]["kernel"] = d["Dense_0"]["kernel"].at[:, 3].set(0.0)  # a zero filter stays zero
  ls = hessian.loss_landscape_1d(op, [0.0, 0.5], d, normalize="filter")
  got = op.unravel(ls.direction)
  for layer in ("Conv_0", "Dense_0"):
    w, g = np.asarray(params[layer]["kernel"]), np.asarray(got[layer]["kernel"])
    for j in range(w.shape[-1]):
      want = 0.0 if (layer, j) == ("Dense_0", 3) else np.linalg.norm(w[..., j])
      assert np.linalg.norm(g[..., j]) == pytest.approx(want, rel=1e-12, abs=1e-300)
      # Only rescaled: the filter keeps its direction.
      if want:
        cos = np.vdot(g[..., j], np.asarray(d[layer]["kernel"])[..., j])
        assert cos / (np.linalg.norm(g[..., j]) * np.linalg.norm(d[layer]["kernel"][..., j])) == (
          pytest.approx(1.0, rel=1e-12)
        )
    np.testing.assert_array_equal(got[layer]["bias"], 0.0)  # biases: zero direction
  moved = jax.tree.map(lambda p, e: p + 0.5 * e, params, got)
  assert ls.losses[1] == pytest.approx(float(loss_fn(moved, x)), rel=1e-13)
  # 2-D with two filter-normalised random directions.
  d2 = hessian.random_direction(op, jax.random.key(1))
  plane = hessian.loss_landscape_2d(op, [0.0, 1.0], [0.0, 1.0], (d, d2), normalize="filter")
  np.testing.assert_allclose(plane.directions[0], ls.direction, rtol=1e-14)


def test_plots(op):
  matplotlib = pytest.importorskip("matplotlib")
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  sd = hessian.spectral_density(op, jax.random.key(0), num_probes=2, num_steps=10)
  fig, axes = plt.subplots(1, 3)
  ax = hessian.plot_spectral_density(sd, axes[0], label="esd")
  assert ax.get_yscale() == "log" and len(ax.lines[0].get_xdata()) == sd.grid.size
  ls1 = hessian.loss_landscape_1d(op, np.linspace(-1, 1, 5))
  hessian.plot_landscape_1d(ls1, axes[1])
  np.testing.assert_allclose(axes[1].lines[0].get_ydata(), ls1.losses)
  ls2 = hessian.loss_landscape_2d(op, np.linspace(-1, 1, 4), np.linspace(-1, 1, 3))
  hessian.plot_landscape_2d(ls2, axes[2], levels=5)
  plt.close(fig)
