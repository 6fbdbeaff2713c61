"""Lanczos tridiagonalisation with full reorthogonalisation, for blocks of start vectors.

Shared by :mod:`~adahessian_jax.hessian.eigen` (one start vector, stopped when
the wanted Ritz pairs converge) and :mod:`~adahessian_jax.hessian.density`
(several probes, a fixed number of steps). The Hessian product is the
operator's compiled block product; the orthogonalisation step is compiled once
per block shape and reused at every step (the step index is a traced argument).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from adahessian_jax.hessian._operator import HessianOperator


class Lanczos(NamedTuple):
  """A Lanczos decomposition ``H V_j^T = V_j^T T_j + β_j v_{j+1} e_j^T`` per start vector.

  Attributes:
    alphas: ``(b, j)`` diagonals of the tridiagonal matrices ``T``.
    betas: ``(b, j)`` off-diagonals; ``betas[:, -1]`` couples to the next vector.
    basis: ``(b, m + 1, n)`` orthonormal Lanczos vectors (rows past ``j`` are 0).
    num_steps: ``j``, the number of Hessian products per start vector.
  """

  alphas: np.ndarray
  betas: np.ndarray
  basis: jax.Array
  num_steps: int


def breakdown_tolerance(n: int, dtype) -> float:
  """Relative size of ``β_j`` below which the Krylov space is taken to be invariant."""
  return float(min(1e-3, 10.0 * np.sqrt(n) * jnp.finfo(dtype).eps))


@functools.partial(jax.jit, donate_argnums=0)
def _extend(basis, v, w, j, tol):
  """One Lanczos step given ``w = H v_j``; returns the basis with ``v_{j+1}``, it, α_j, β_j."""
  alpha = jnp.sum(w * v, axis=-1)
  raw = jnp.linalg.norm(w, axis=-1)
  # Full reorthogonalisation, twice ("twice is enough", Parlett): classical
  # Gram-Schmidt against every stored vector, which also removes the three-term
  # recurrence components α_j v_j and β_{j-1} v_{j-1}. Unused rows are zero.
  for _ in range(2):
    w = w - jnp.einsum("bm,bmn->bn", jnp.einsum("bmn,bn->bm", basis, w), basis)
  beta = jnp.linalg.norm(w, axis=-1)
  ok = beta > tol * raw
  beta = jnp.where(ok, beta, 0.0)
  nxt = jnp.where(ok[:, None], w / jnp.where(ok, beta, 1.0)[:, None], 0.0)
  return basis.at[:, j + 1].set(nxt), nxt, jnp.stack([alpha, beta])


@jax.jit
def _first(v0):
  v0 = v0 / jnp.linalg.norm(v0, axis=-1, keepdims=True)
  return v0


def lanczos(
  op: HessianOperator,
  v0: jax.Array,
  num_steps: int,
  stop: Callable[[np.ndarray, np.ndarray], bool] | None = None,
) -> Lanczos:
  """Runs up to ``num_steps`` Lanczos steps from each row of ``v0``.

  Args:
    op: The Hessian operator.
    v0: ``(b, n)`` start vectors (normalised here, exactly: no epsilon).
    num_steps: Maximum number of steps (Hessian products per start vector);
      clipped to ``n``.
    stop: Optional ``stop(alphas, betas) -> bool`` called on the host after
      every step with the ``(b, j)`` coefficients so far; ``True`` stops.

  Returns:
    A :class:`Lanczos` decomposition. Steps stop early when every start vector
    has reached an invariant subspace (``β = 0``).
  """
  b, n = v0.shape
  m = int(min(num_steps, n))
  v = _first(jnp.asarray(v0, op.dtype))
  basis = jnp.zeros((b, m + 1, n), op.dtype).at[:, 0].set(v)
  tol = jnp.asarray(breakdown_tolerance(n, op.dtype), op.dtype)
  coefs = []
  for j in range(m):
    basis, v, coef = _extend(basis, v, op.matmat(v), j, tol)
    coefs.append(coef)
    if stop is not None:
      coefs[-1] = np.asarray(coef)
      c = np.stack(coefs, axis=2)
      if stop(c[0], c[1]) or np.all(c[1, :, -1] == 0):
        break
  c = np.stack(jax.device_get(coefs), axis=2)
  a, bt = c[0], c[1]
  return Lanczos(alphas=a, betas=bt, basis=basis, num_steps=a.shape[1])


def tridiagonal_eigh(alphas: np.ndarray, betas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Eigen-decomposition of the symmetric tridiagonal matrix with diagonal ``alphas``.

  Args:
    alphas: ``(j,)`` diagonal.
    betas: ``(j - 1,)`` (or longer; extra entries ignored) off-diagonal.

  Returns:
    ``(theta, s)``: ascending eigenvalues and the eigenvectors as columns.
  """
  j = alphas.shape[0]
  t = np.diag(alphas) + np.diag(betas[: j - 1], 1) + np.diag(betas[: j - 1], -1)
  return np.linalg.eigh(t)
