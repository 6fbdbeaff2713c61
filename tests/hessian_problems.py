"""Small float64 problems with dense Hessians for the tests of adahessian_jax.hessian."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

jax.config.update("jax_enable_x64", True)


def mlp_loss(p, batch):
  xb, yb = batch
  h = jnp.tanh(xb @ p["hidden"]["kernel"] + p["hidden"]["bias"])
  return jnp.mean((h @ p["out"]["kernel"] + p["out"]["bias"] - yb) ** 2)


@functools.cache
def mlp(seed=0, num=40):
  """A 5-8-3 tanh MLP (75 params) and a regression batch; indefinite Hessian."""
  r = np.random.default_rng(seed)
  params = {
    "hidden": {"kernel": r.normal(size=(5, 8)) * 0.7, "bias": r.normal(size=(8,)) * 0.1},
    "out": {"kernel": r.normal(size=(8, 3)) * 0.7, "bias": np.zeros(3)},
  }
  params = jax.tree.map(jnp.asarray, params)
  batch = (jnp.asarray(r.normal(size=(num, 5))), jnp.asarray(r.normal(size=(num, 3))))
  return params, batch


def dense_hessian(loss_fn, params, batch):
  """The Hessian of ``loss_fn(params, batch)`` in ``ravel_pytree`` order, as a NumPy array.

  One compiled program per ``loss_fn`` and shapes: built op by op it compiled some 80 small ones.
  """
  return np.asarray(_dense_hessian(loss_fn, params, batch))


@functools.partial(jax.jit, static_argnums=0)
def _dense_hessian(loss_fn, params, batch):
  flat, unravel = ravel_pytree(params)
  return jax.hessian(lambda f: loss_fn(unravel(f), batch))(flat)


@functools.cache
def mlp_hessian(seed=0, num=40):
  params, batch = mlp(seed, num)
  return dense_hessian(mlp_loss, params, batch)


def quadratic_loss(p, batch):
  """``0.5 xᵀAx`` with ``A = batch`` (an (n, n) matrix), on a flat parameter vector."""
  return 0.5 * p["x"] @ (batch @ p["x"])


def quadratic(eigenvalues, seed=0):
  """Params and the matrix ``A = U diag(eigenvalues) Uᵀ`` (random orthogonal ``U``)."""
  ev = np.asarray(eigenvalues, dtype=np.float64)
  r = np.random.default_rng(seed)
  u, _ = np.linalg.qr(r.normal(size=(ev.size, ev.size)))
  a = (u * ev) @ u.T
  a = 0.5 * (a + a.T)
  return {"x": jnp.asarray(r.normal(size=ev.size))}, jnp.asarray(a)


# Spectra on which a few Lanczos products leave the top Ritz value far from the top eigenvalue:
# flat, a large negative part below the top, decaying, and a clear top.
SLOW_SPECTRA = {
  "flat": np.linspace(0.1, 1.0, 30),
  "negative": np.r_[1.0, np.linspace(-3.0, 0.5, 29)],
  "decaying": 1.0 / np.arange(1, 31) ** 2,
  "spike": np.r_[10.0, np.linspace(0.0, 1.0, 29)],
}
