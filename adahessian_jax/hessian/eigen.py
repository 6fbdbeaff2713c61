"""Extreme eigenvalues and eigenvectors of the Hessian.

:func:`top_eigenvalues` runs Lanczos with full reorthogonalisation from one
random start vector and stops as soon as the wanted Ritz pairs have converged
(a residual test that costs no extra products). All ``k`` pairs come out of a
single Krylov space, so they cost far fewer Hessian-vector products than
:func:`power_iteration`, the power method with deflation (one eigenvalue at a
time, each restarted from scratch), kept here as the baseline PyHessian uses.

Neither adds an epsilon to vector norms: PyHessian normalises by
``‖v‖ + 1e-6``, which biases its eigenvalue estimates low.

References:
  Lanczos, `An iteration method for the solution of the eigenvalue problem of
  linear differential and integral operators
  <https://doi.org/10.6028/jres.045.026>`_, 1950.

  Parlett, *The Symmetric Eigenvalue Problem*, SIAM, 1998 (§13, full
  reorthogonalisation and the residual bound ``‖H y − θ y‖ = |β_j s_j|``).

  Yao, Gholami, Keutzer, Mahoney, `PyHessian: Neural Networks Through the Lens
  of the Hessian <https://arxiv.org/abs/1912.07145>`_, 2020.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from adahessian_jax.hessian import _checks
from adahessian_jax.hessian._lanczos import lanczos, ritz_pairs
from adahessian_jax.hessian._operator import HessianOperator

__all__ = ["Eigen", "power_iteration", "top_eigenvalues"]

_WHICH = ("LA", "LM", "SA")


class Eigen(NamedTuple):
  """Eigenpairs of the Hessian.

  Attributes:
    eigenvalues: ``(k,)`` eigenvalues, in the order asked for (``"LA"``:
      descending; ``"LM"``: descending magnitude; ``"SA"``: ascending).
    eigenvectors: Unit-norm eigenvectors as a pytree like the params whose
      leaves carry a leading axis of size ``k`` (``eigenvectors_flat`` is the
      ``(k, n)`` array). Signs are fixed so the largest-magnitude entry is positive.
    eigenvectors_flat: ``(k, n)`` flat eigenvectors.
    residuals: ``(k,)`` residual norms ``‖H v − λ v‖`` (Lanczos: the estimate
      ``|β_j s_j|``; power iteration: measured). An eigenvalue of the Hessian
      lies within the residual of each value.
    errors: ``(k,)`` estimated eigenvalue errors: Lanczos, the larger of
      ``min(r, r²/gap)`` (``gap`` the distance to the nearest other Ritz
      value: the gap theorem with Ritz values for the unknown eigenvalues) and
      the change of the Ritz value over the last step (which guards the gap
      estimate in the first steps, when the other Ritz values are far off);
      an estimate, not a bound. Power iteration: the residual.
    num_matvecs: Hessian-vector products spent.
    converged: ``(k,)`` booleans, whether each pair met the tolerance.
  """

  eigenvalues: np.ndarray
  eigenvectors: Any
  eigenvectors_flat: jax.Array
  residuals: np.ndarray
  errors: np.ndarray
  num_matvecs: int
  converged: np.ndarray


def _selector(k: int, which: str):
  order = {
    "LA": lambda theta: -theta,
    "SA": lambda theta: theta,
    "LM": lambda theta: -np.abs(theta),
  }[which]
  return lambda theta: np.argsort(order(theta), kind="stable")[:k]


def _check(k: Any, which: str, op: HessianOperator) -> int:
  if which not in _WHICH:
    raise ValueError(f"which must be one of {_WHICH}, got {which!r}")
  return _checks.count("k", k, 1, op.size)


def _start_vector(op: HessianOperator, v0: Any, key: jax.Array | None) -> jax.Array:
  if v0 is None:
    return op.rademacher(jax.random.key(0) if key is None else key, 1)
  flat = v0 if isinstance(v0, jax.Array | np.ndarray) and np.ndim(v0) == 1 else op.ravel(v0)
  flat = jnp.asarray(flat, op.dtype)
  if flat.shape != (op.size,):
    raise ValueError(f"v0 must have {op.size} entries (the operator's size), got {flat.shape}")
  if not float(jnp.linalg.norm(flat)) > 0:
    raise ValueError("v0 must be a nonzero vector")
  return flat[None]


@jax.jit
def _fix_signs(vs):
  idx = jnp.argmax(jnp.abs(vs), axis=-1)
  sign = jnp.sign(jnp.take_along_axis(vs, idx[:, None], axis=-1))
  return vs * jnp.where(sign == 0, 1.0, sign)


def _finish(op, values, vecs, residuals, errors, matvecs, converged) -> Eigen:
  vecs = _fix_signs(vecs)
  return Eigen(
    eigenvalues=np.asarray(values),
    eigenvectors=jax.vmap(op.unravel)(vecs),
    eigenvectors_flat=vecs,
    residuals=np.asarray(residuals),
    errors=np.asarray(errors),
    num_matvecs=int(matvecs),
    converged=np.asarray(converged, dtype=bool),
  )


def top_eigenvalues(
  op: HessianOperator,
  k: int = 1,
  *,
  which: str = "LA",
  key: jax.Array | None = None,
  v0: Any = None,
  tol: float = 1e-6,
  max_iter: int = 200,
  stop_on: str = "residual",
) -> Eigen:
  """The ``k`` extreme eigenpairs of the Hessian by Lanczos.

  A Ritz pair ``(θ, y)`` from ``j`` steps has residual ``‖H y − θ y‖ = β_j |s_j|``
  (``s`` the eigenvector of the tridiagonal matrix); by default the iteration
  stops when every wanted pair has ``residual ≤ tol · max|θ|``, the maximum over
  the wanted Ritz values. The eigenvalue error is then at most the residual,
  and typically ``residual² / gap``: with
  ``stop_on="eigenvalue"`` it stops when that estimate (``Eigen.errors``)
  is below ``tol · max|θ|``, which needs far fewer steps when only the
  eigenvalues matter (the eigenvectors are then accurate to about
  ``residual / gap``).

  Lanczos finds one copy of a repeated eigenvalue (an exactly repeated one is
  invisible to a single Krylov space); neural-network Hessians' top
  eigenvalues are distinct in practice.

  Args:
    op: The Hessian operator (:func:`~adahessian_jax.hessian.hessian_operator`).
    k: Number of eigenpairs.
    which: ``"LA"`` largest algebraic, ``"LM"`` largest magnitude, ``"SA"``
      smallest algebraic (the most negative curvature).
    key: PRNG key of the Rademacher start vector (default ``jax.random.key(0)``).
    v0: A start vector instead (flat ``(n,)`` or a pytree like the params),
      e.g. the previous eigenvector for a warm start
      (:func:`~adahessian_jax.hessian.track_curvature` does this). A warm
      start converges in fewer steps when it is close to the wanted
      eigenvector, but an eigenvector it is orthogonal to stays invisible.
    tol: Tolerance relative to the largest magnitude among the wanted Ritz
      values (``k`` wanted eigenvalues all near zero may then take up to
      ``max_iter`` products; ``converged`` says whether it was met).
    max_iter: Maximum Lanczos steps (Hessian products); memory is
      ``max_iter · n`` values. Clipped to ``n``.
    stop_on: ``"residual"`` (a bound) or ``"eigenvalue"`` (the gap estimate).

  Returns:
    An :class:`Eigen`.

  Raises:
    ValueError: for a ``k`` or ``max_iter`` that is not an integer in range, or
      if the Krylov space is invariant before it holds ``k`` vectors.
    NonFiniteError: if a product is not finite (e.g. a NaN loss at ``params``).
  """
  k = _check(k, which, op)
  max_iter = _checks.count("max_iter", max_iter)
  tol = _checks.positive("tol", tol)
  select = _selector(k, which)
  if stop_on not in ("residual", "eigenvalue"):
    raise ValueError(f"stop_on must be 'residual' or 'eigenvalue', got {stop_on!r}")

  def ritz_and_errors(alphas, betas):
    ritz = ritz_pairs(alphas, betas, select)
    change = np.full(k, np.inf)
    if alphas.shape[0] > k:
      change = np.abs(ritz.values - ritz_pairs(alphas[:-1], betas[:-1], select).values)
    return ritz, np.maximum(ritz.errors, change)

  def met(ritz, errors):
    err = ritz.residuals if stop_on == "residual" else errors
    return err <= tol * ritz.scale

  def converged(alphas, betas):
    return alphas.shape[1] >= k and bool(np.all(met(*ritz_and_errors(alphas[0], betas[0]))))

  dec = lanczos(op, _start_vector(op, v0, key), max(max_iter, k), stop=converged)
  j = dec.num_steps
  if j < k:
    raise ValueError(f"the Krylov space is invariant after {j} steps, fewer than k={k}")
  # The Ritz pairs, derived once from the final decomposition.
  ritz, errors = ritz_and_errors(dec.alphas[0], dec.betas[0])
  vecs = jnp.asarray(ritz.coefficients.T, op.dtype) @ dec.basis[0, :j]
  vecs = vecs / jnp.linalg.norm(vecs, axis=-1, keepdims=True)
  invariant = dec.betas[0, -1] == 0  # the Ritz values are exact
  errors = np.where(invariant, ritz.residuals, errors)
  conv = met(ritz, errors) | invariant
  return _finish(op, ritz.values, vecs, ritz.residuals, errors, j, conv)


@jax.jit
def _power_step(v, found):
  # Deflation: project out the eigenvectors found so far (zero rows are inert).
  v = v - (found @ v) @ found
  return v / jnp.linalg.norm(v)


def power_iteration(
  op: HessianOperator,
  k: int = 1,
  *,
  key: jax.Array | None = None,
  tol: float = 1e-3,
  max_iter: int = 100,
) -> Eigen:
  """The ``k`` largest-magnitude eigenpairs by power iteration with deflation.

  PyHessian's algorithm, without its epsilon: for each eigenvalue in turn,
  iterate ``v ← H v / ‖H v‖`` with ``v`` projected orthogonal to the
  eigenvectors already found, until the Rayleigh quotient changes by less than
  ``tol`` relative. A baseline for :func:`top_eigenvalues`, which needs fewer
  products for the same accuracy.

  Args:
    op: The Hessian operator.
    k: Number of eigenpairs.
    key: PRNG key of the start vectors (default ``jax.random.key(0)``).
    tol: Relative change of the eigenvalue estimate that stops an iteration.
    max_iter: Maximum products per eigenvalue.

  Returns:
    An :class:`Eigen`; ``residuals`` are measured with ``k`` extra products
    that are not counted in ``num_matvecs``.
  """
  k = _check(k, "LM", op)
  max_iter = _checks.count("max_iter", max_iter)
  tol = _checks.positive("tol", tol)
  key = jax.random.key(0) if key is None else key
  found = jnp.zeros((k, op.size), op.dtype)
  values, converged, matvecs = [], [], 0
  for i, ki in enumerate(jax.random.split(key, k)):
    v = _power_step(op.rademacher(ki, 1)[0], found)
    lam, ok = None, False
    for _ in range(max_iter):
      hv = op.matvec(v)
      matvecs += 1
      new = float(jnp.vdot(v, hv))
      _checks.finite(new, f"the Rayleigh quotient at power step {matvecs}")
      v = _power_step(hv, found)
      if lam is not None and abs(new - lam) <= tol * abs(lam):
        lam, ok = new, True
        break
      lam = new
    found = found.at[i].set(v)
    values.append(lam)
    converged.append(ok)
  values = np.asarray(values)
  residuals = np.linalg.norm(
    np.asarray(op.matmat(found)) - values[:, None] * np.asarray(found), axis=-1
  )
  return _finish(op, values, found, residuals, residuals, matvecs, converged)
