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

from adahessian_jax import _validation
from adahessian_jax.hessian import _checks
from adahessian_jax.hessian._lanczos import (
  blocks,
  breakdown_tolerance,
  lanczos,
  norm,
  ritz_pairs,
  tridiagonal_eigh,
  unit,
)
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
    converged: ``(k,)`` booleans, whether each pair met the tolerance (Lanczos:
      an exact pair of a Krylov space that became invariant counts only once
      the run's stopping test is met, since a larger eigenvalue may lie
      outside it).
  """

  eigenvalues: np.ndarray
  eigenvectors: Any
  eigenvectors_flat: jax.Array
  residuals: np.ndarray
  errors: np.ndarray
  num_matvecs: int
  converged: np.ndarray


_ORDER = {
  "LA": lambda theta: -theta,
  "SA": lambda theta: theta,
  "LM": lambda theta: -np.abs(theta),
}  # which -> a key that is smaller for the more wanted value


def _selector(k: int, which: str):
  return lambda theta: np.argsort(_ORDER[which](theta), kind="stable")[:k]


def _check(k: Any, which: str, op: HessianOperator) -> int:
  if which not in _WHICH:
    raise ValueError(f"which must be one of {_WHICH}, got {which!r}")
  return _validation.count("k", k, 1, op.size)


def _start_vector(op: HessianOperator, v0: Any, key: jax.Array) -> jax.Array:
  """``v0`` as a ``(1, n)`` row, checked finite and nonzero; by default a normal row from key."""
  if v0 is None:
    return op.gaussian(key, 1)
  flat = jnp.asarray(op.layout.flatten(v0, "v0"), op.dtype)
  bad = op.layout.first_not_finite(flat)
  if bad is not None:
    raise ValueError(f"v0 must be finite, got {bad}")
  if not np.any(np.asarray(flat)):
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

  The default start vector is normal (:meth:`HessianOperator.gaussian`), so
  it has a component along every eigenvector almost surely; a Rademacher one
  misses the top eigenvector of a pair of symmetric parameters half the time.
  When the Krylov space becomes invariant (``β_j = 0``: e.g. a given ``v0``
  is an eigenvector, or has no component along the top one), the run
  continues from a fresh random vector
  orthogonal to it; the pairs found so far are exact, and the stopping test
  then applies to the new block's own wanted pairs (a pair from an earlier
  block only counts as converged once that test is met), so an eigenvalue the
  start vector missed is still found, and an exactly repeated one is found
  once per block that reaches it. Without a breakdown, a single Krylov space
  holds one copy of a repeated eigenvalue, and from a normal start vector
  rounding rarely lets ``β`` reach exactly zero: a repeated eigenvalue is
  then found once (neural-network Hessians' top eigenvalues are distinct in
  practice).

  Args:
    op: The Hessian operator (:func:`~adahessian_jax.hessian.hessian_operator`).
    k: Number of eigenpairs.
    which: ``"LA"`` largest algebraic, ``"LM"`` largest magnitude, ``"SA"``
      smallest algebraic (the most negative curvature).
    key: PRNG key of the normal start vector (default ``jax.random.key(0)``).
    v0: A start vector instead (flat ``(n,)`` or a pytree like the params),
      e.g. the previous eigenvector for a warm start
      (:func:`~adahessian_jax.hessian.track_curvature` does this). A warm
      start converges in fewer steps when it is close to the wanted
      eigenvector, but an eigenvector it is orthogonal to stays invisible.
    tol: Tolerance relative to the largest magnitude among the wanted Ritz
      values (``k`` wanted eigenvalues all near zero may then take up to
      ``max_iter`` products; ``converged`` says whether it was met).
    max_iter: Maximum Lanczos steps (Hessian products); memory is
      ``max_iter · n`` values. Raised to ``k`` (``k`` Ritz pairs need ``k``
      steps; ``converged`` then says whether they are eigenpairs), clipped to ``n``.
    stop_on: ``"residual"`` (a bound) or ``"eigenvalue"`` (the gap estimate).

  Returns:
    An :class:`Eigen`.

  Raises:
    ValueError: for a ``k`` or ``max_iter`` that is not an integer in range, a
      bad ``which``, ``tol``, ``stop_on`` or ``v0`` (unlike the params, not
      finite, or zero), or if no fresh vector can extend a basis of fewer than
      ``k`` vectors.
    NonFiniteError: if a product is not finite (e.g. a NaN loss at ``params``).
  """
  k = _check(k, which, op)
  max_iter = _validation.count("max_iter", max_iter)
  tol = _validation.positive("tol", tol)
  select = _selector(k, which)
  if stop_on not in ("residual", "eigenvalue"):
    raise ValueError(f"stop_on must be 'residual' or 'eigenvalue', got {stop_on!r}")

  def ritz_and_errors(alphas, betas):
    ritz = ritz_pairs(alphas, betas, select)
    change = np.full(k, np.inf)
    if alphas.shape[0] > k:
      change = np.abs(ritz.values - ritz_pairs(alphas[:-1], betas[:-1], select).values)
    return ritz, np.maximum(ritz.errors, change)

  def met(ritz, errors, scale):
    err = ritz.residuals if stop_on == "residual" else errors
    return err <= tol * scale

  def live_converged(alphas, betas):
    # Whether the wanted pairs of all of T are the wanted eigenpairs of H. Earlier blocks are
    # invariant and their pairs exact, but not necessarily the wanted ones: only the last block
    # explores the rest of the spectrum. An open last block (all of T without a restart): its
    # wanted pairs meet the tolerance, relative to the largest wanted Ritz value of the block or
    # of T. A closed one started from a normal random vector has almost surely seen every
    # distinct eigenvalue left outside the earlier blocks, and every eigenvalue left outside it
    # is one of its values: none may beat the k-th wanted one. A closed first block (from the
    # start vector, which may be structured, e.g. a given v0) proves nothing.
    j = alphas.shape[0]
    live = blocks(betas, j)[-1]
    if betas[-1] == 0:
      if live.start == 0 or j < k:
        return False
      theta = tridiagonal_eigh(alphas[live], betas[live])[0]
      kth = ritz_pairs(alphas, betas, select).values[-1]
      return bool(np.all(_ORDER[which](theta) >= _ORDER[which](kth)))
    if live.stop - live.start < k:
      return False
    ritz, errors = ritz_and_errors(alphas[live], betas[live])
    scale = (
      ritz.scale if live.start == 0 else max(ritz.scale, ritz_pairs(alphas, betas, select).scale)
    )
    return bool(np.all(met(ritz, errors, scale)))

  def converged(alphas, betas):
    return live_converged(alphas[0], betas[0])

  key = jax.random.key(0) if key is None else key
  restart = jax.random.fold_in(key, 1)
  dec = lanczos(op, _start_vector(op, v0, key), max(max_iter, k), converged, restart)
  j, alphas, betas = dec.num_steps, dec.alphas[0], dec.betas[0]
  if j < k:
    raise ValueError(f"the Krylov space is invariant after {j} steps, fewer than k={k}")
  # The Ritz pairs, derived once from the final decomposition.
  ritz, errors = ritz_and_errors(alphas, betas)
  vecs = jnp.asarray(ritz.coefficients.T, op.dtype) @ dec.basis[0, :j]
  vecs = unit(vecs)[0]
  exhausted = j == op.size  # T is H in an orthonormal basis: every Ritz value is exact
  errors = np.where(exhausted or betas[-1] == 0, ritz.residuals, errors)  # exact Ritz values
  # Pairs of an open last block are judged one by one; those of closed blocks, exact, are the
  # wanted ones only once the blocks as a whole pass the test that stops the run.
  live = blocks(betas, j)[-1]
  from_live = np.any(ritz.coefficients[live] != 0, axis=0) & (betas[-1] != 0)
  trusted = exhausted or live_converged(alphas, betas)
  conv = (met(ritz, errors, ritz.scale) & (from_live | trusted)) | exhausted
  return _finish(op, ritz.values, vecs, ritz.residuals, errors, j, conv)


@jax.jit
def _deflated(v, found):
  """``v`` projected orthogonal to the eigenvectors found so far (zero rows are inert), unit norm.

  A ``v`` inside their span (or zero) comes back as zero.
  """
  return unit(v - (found @ v) @ found)[0]


@jax.jit
def _power_step(v, hv, found):
  """The Rayleigh quotient ``θ = vᵀHv``, the residual ``‖PHv − θv‖`` of the deflated operator
  (``P`` the projector orthogonal to ``found``), ``‖Hv‖`` and the next iterate ``PHv/‖PHv‖``."""
  scale = norm(hv[None])[0]
  hv = hv - (found @ hv) @ found
  theta = jnp.vdot(v, hv)
  residual = norm((hv - theta * v)[None])[0]
  return theta, residual, scale, unit(hv)[0]


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
  iterate ``v ← PHv / ‖PHv‖``, ``P`` the projector orthogonal to the
  eigenvectors already found, until the residual ``‖PHv − θv‖`` of the
  Rayleigh quotient ``θ = vᵀHv`` is at most ``tol·|θ|``, or is at the rounding
  level of the operator's scale (``‖Hv‖`` and the first eigenvalue found): a
  zero Hessian, or a deflated space the Hessian maps to zero, gives ``θ = 0``
  with residual 0. (A change of ``θ`` is no test: for eigenvalues ``±λ``
  the iterates alternate with ``θ ≈ 0`` unchanged, and ``converged`` is then
  ``False``.) A baseline for :func:`top_eigenvalues`, which needs fewer
  products for the same accuracy.

  Args:
    op: The Hessian operator.
    k: Number of eigenpairs.
    key: PRNG key of the start vectors (default ``jax.random.key(0)``).
    tol: Residual, relative to ``|θ|``, that stops an iteration.
    max_iter: Maximum products per eigenvalue.

  Returns:
    An :class:`Eigen`; each eigenvalue is the Rayleigh quotient of its
    returned vector; ``residuals`` are measured (on ``H``, not deflated) with
    ``k`` extra products that are not counted in ``num_matvecs``. A value
    after one that did not converge is not marked converged either: it was
    found with a deflation by a vector that is not an eigenvector.

  Raises:
    ValueError: for a ``k`` or ``max_iter`` that is not an integer in range,
      or a ``tol`` that is not positive.
    NonFiniteError: if a Rayleigh quotient is not finite (e.g. a NaN loss).
  """
  k = _check(k, "LM", op)
  max_iter = _validation.count("max_iter", max_iter)
  tol = _validation.positive("tol", tol)
  floor = breakdown_tolerance(op.size, op.dtype)
  key = jax.random.key(0) if key is None else key
  found = jnp.zeros((k, op.size), op.dtype)
  values, converged, matvecs = [], [], 0
  for i, ki in enumerate(jax.random.split(key, k)):
    v = _deflated(op.gaussian(ki, 1)[0], found)
    for step in range(max_iter):
      theta, residual, scale, nxt = _power_step(v, op.matvec(v), found)
      matvecs += 1
      lam = float(theta)
      _checks.finite(lam, f"the Rayleigh quotient at power step {matvecs}")
      residual = float(residual)
      reference = max(float(scale), abs(values[0]) if values else 0.0)
      ok = residual <= tol * abs(lam) or residual <= floor * reference
      if ok or step == max_iter - 1:
        break
      v = nxt
    found = found.at[i].set(v)
    values.append(lam)
    # Deflating a vector that is not an eigenvector leaves its eigenvector's component in the
    # operator the later iterations see: their values are not eigenvalues even if they settle.
    converged.append(ok and all(converged))
  values = np.asarray(values)
  residuals = np.linalg.norm(
    np.asarray(op.matmat(found), np.float64) - values[:, None] * np.asarray(found, np.float64),
    axis=-1,
  )
  return _finish(op, values, found, residuals, residuals, matvecs, converged)
