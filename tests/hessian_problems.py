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


def dense_hessian(loss_fn, params, batch, jit=False):
  """The Hessian of ``loss_fn(params, batch)`` in ``ravel_pytree`` order, as a NumPy array.

  ``jit=True`` compiles one program per ``loss_fn`` and shapes (op by op: some 80 for the MLP).
  Its rounding can differ from op by op's: by 3e-8 relative on test_hessian_operator's flax
  BatchNorm model, beyond that test's 1e-8, which therefore keeps the default.
  """
  return np.asarray((_jitted_hessian if jit else _hessian)(loss_fn, params, batch))


def _hessian(loss_fn, params, batch):
  flat, unravel = ravel_pytree(params)
  return jax.hessian(lambda f: loss_fn(unravel(f), batch))(flat)


_jitted_hessian = jax.jit(_hessian, static_argnums=0)


@functools.cache
def mlp_hessian(seed=0, num=40):
  params, batch = mlp(seed, num)
  return dense_hessian(mlp_loss, params, batch, jit=True)


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
