"""Lanczos tridiagonalisation with full reorthogonalisation, for blocks of start vectors.

Shared by :mod:`~adahessian_jax.hessian.eigen` (one start vector, stopped when
the wanted Ritz pairs converge, restarted with a fresh random vector when the
Krylov space becomes invariant) and :mod:`~adahessian_jax.hessian.density`
(several probes, a fixed number of steps, each probe stopped at its invariant
space). The Hessian product is the operator's compiled block product; the
orthogonalisation step is compiled once per block shape and reused at every
step (the step index is a traced argument). Vector norms are scaled by a power
of two near ``max|x|`` (:func:`norm`), so that they neither underflow nor
overflow in float32 for any operator whose products are finite.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from adahessian_jax.hessian import _checks
from adahessian_jax.hessian._operator import HessianOperator


class Lanczos(NamedTuple):
  """A Lanczos decomposition ``H V_j^T = V_j^T T_j + β_j v_{j+1} e_j^T`` per start vector.

  Attributes:
    alphas: ``(b, j)`` diagonals of the tridiagonal matrices ``T`` (float64).
    betas: ``(b, j)`` off-diagonals (float64); ``betas[:, -1]`` couples to the
      next vector. A zero ``β_i`` with ``i < j - 1`` is a restart: ``T`` is
      block diagonal there (:func:`blocks`).
    basis: ``(b, m + 1, n)`` orthonormal Lanczos vectors (rows past ``j`` are 0).
    num_steps: ``j``, the number of Hessian products per start vector.
    offsets: ``(b, j + 1, j)`` what the products hold beyond ``T``: column ``i`` is ``H v_i``'s
      coefficients on ``v_0, ..., v_i`` less ``T``'s (``β_{i-1}``, ``α_i``), and below them a
      ``β_i`` a breakdown set to 0. ``H V_jᵀ s = V_jᵀ T s + β_j s_j v_j + V_{j+1}ᵀ offsets s``:
      zero in exact arithmetic, the rounding and asymmetry of the products otherwise (float32
      products near a minimum: 1e-5 of ``‖H‖`` where ``|β_j s_j|`` fell to 1e-10).
  """

  alphas: np.ndarray
  betas: np.ndarray
  basis: jax.Array
  num_steps: int
  offsets: np.ndarray


def padded(s: np.ndarray, shape: tuple[int, int], dtype) -> jax.Array:
  """The host matrix ``s`` with zero rows and columns appended up to ``shape``, in ``dtype``: the
  coefficients of Ritz vectors in a basis of fixed size, so that their products with it compile
  once whatever the number of steps taken."""
  out = np.zeros(shape, np.float64)
  out[: s.shape[0], : s.shape[1]] = s
  # Cast on the host, as jnp.asarray(out, dtype) does, but put on the device without the program
  # per shape jnp.asarray compiles.
  return jax.device_put(np.asarray(out, dtype))


def breakdown_tolerance(n: int, dtype) -> float:
  """Relative size of ``β_j`` below which the Krylov space is taken to be invariant."""
  return float(min(1e-3, 10.0 * np.sqrt(n) * jnp.finfo(dtype).eps))


def power_of_two_above(peak: jax.Array) -> jax.Array:
  """``2^e`` with ``2^(e-1) <= peak < 2^e`` entrywise (``2`` for a non-finite peak, taken as 1),
  at least the smallest normal number of the dtype: XLA divides by a subnormal one as a product
  with its reciprocal, which overflows (float16: a peak below ``6.1e-5`` gave ``inf``). The scale
  that keeps the squares of entries up to ``peak`` from overflowing or underflowing."""
  info = jnp.finfo(peak.dtype)
  peak = jnp.where(jnp.isfinite(peak), peak, 1.0)
  # A subnormal peak takes the floor itself: from jax 0.12 on jnp.frexp flushes it to zero, whose
  # exponent 0 gave the scale 1 and squares that underflowed (a float16 norm of 1e-6 was 0).
  _, e = jnp.frexp(peak)
  e = jnp.where(peak < info.smallest_normal, info.minexp, e)
  return jnp.ldexp(jnp.ones_like(peak), e)


@functools.partial(jax.jit, static_argnums=1)  # one compilation per shape, not three
def _new_basis(v: jax.Array, m: int) -> jax.Array:
  """The Lanczos basis ``(b, m + 1, n)`` of the start vectors ``v`` ``(b, n)``: ``v`` first,
  zeros for the ``m`` vectors to come."""
  return jnp.zeros((v.shape[0], m + 1, v.shape[1]), v.dtype).at[:, 0].set(v)


@functools.partial(jax.jit, static_argnames="axis")  # one compilation per shape, not one per op
def _power_of_two_scale(x: jax.Array, axis: int) -> jax.Array:
  """:func:`power_of_two_above` of ``max|x|`` along ``axis`` (kept)."""
  return power_of_two_above(jnp.max(jnp.abs(x), axis=axis, keepdims=True))


def norm(x: jax.Array, axis: int = -1) -> jax.Array:
  """``‖x‖₂`` along ``axis``, without underflow or overflow of the squares.

  ``x`` is divided by a power of two ``s`` near ``max|x|`` before squaring and the norm
  multiplied back; scaling by a power of two is exact, so the result is bit-for-bit
  ``jnp.linalg.norm(x)`` wherever that does not under- or overflow.
  """
  s = _power_of_two_scale(x, axis)
  return jnp.squeeze(s, axis) * jnp.linalg.norm(x / s, axis=axis)


def unit(x: jax.Array, axis: int = -1) -> tuple[jax.Array, jax.Array]:
  """``x / ‖x‖`` along ``axis`` (zero stays zero) and ``‖x‖`` (as :func:`norm`).

  Divides ``x / s`` by its norm, which is at least 1/2 for a nonzero ``x``: never by a
  subnormal number, which XLA turns into a product with an overflowing reciprocal (float16
  vectors of norm below ``6.1e-5`` became ``inf``). Bit-for-bit ``x / norm(x)`` otherwise.
  """
  s = _power_of_two_scale(x, axis)
  y = x / s
  size = jnp.linalg.norm(y, axis=axis, keepdims=True)
  return y / jnp.where(size > 0, size, 1.0), jnp.squeeze(s * size, axis)


def project_out(basis, w):
  """``(w less its projection on the rows of basis, the coefficients removed)``, projected
  twice ("twice is enough", Parlett); the coefficients ``(..., m)`` are both passes' together.

  ``basis`` is ``(..., m, n)`` with orthonormal (or zero) rows, ``w`` is ``(..., n)``; leading
  axes are batch axes.
  """
  coefs = jnp.zeros(basis.shape[:-1], w.dtype)
  for _ in range(2):
    c = jnp.einsum("...mn,...n->...m", basis, w)
    w, coefs = w - jnp.einsum("...m,...mn->...n", c, basis), coefs + c
  return w, coefs


def orthogonalise(basis, w):
  """``w`` minus its projection on the rows of ``basis`` (:func:`project_out`)."""
  return project_out(basis, w)[0]


@functools.partial(jax.jit, donate_argnums=0)
def _extend(basis, v, w, j, tol):
  """One Lanczos step given ``w = H v_j``; returns the basis with ``v_{j+1}``, it, α_j, β_j, the
  ``β_j`` a breakdown set to 0 (else 0) and ``w``'s ``(b, m + 1)`` coefficients on the basis."""
  alpha = jnp.sum(w * v, axis=-1)
  raw = norm(w)
  # Full reorthogonalisation: classical Gram-Schmidt against every stored vector, twice, which
  # also removes the three-term recurrence components α_j v_j and β_{j-1} v_{j-1}. Unused rows
  # are 0. The coefficients removed are kept: beyond those two, they are what T misses.
  rest, coefs = project_out(basis, w)
  direction, beta = unit(rest)
  ok = beta > tol * raw
  dropped = jnp.where(ok, 0.0, beta)
  beta = jnp.where(ok, beta, 0.0)
  nxt = jnp.where(ok[:, None], direction, 0.0)
  return basis.at[:, j + 1].set(nxt), nxt, jnp.stack([alpha, beta, dropped]), coefs


@functools.partial(jax.jit, donate_argnums=0)
def _restart(basis, v, z, j, dead, tol):
  """Rows ``dead`` (whose ``β_j`` is 0) continue from ``z`` orthogonalised against their basis.

  Returns the basis with the new ``v_{j+1}``, it, and per row whether the fresh vector kept more
  than ``tol`` of its norm (it always does unless the basis already spans the space).
  """
  fresh, size = unit(orthogonalise(basis, z))
  ok = dead & (size > tol * norm(z))
  nxt = jnp.where(ok[:, None], fresh, v)
  return basis.at[:, j + 1].set(nxt), nxt, ok


@jax.jit
def _first(v0):
  return unit(v0)[0]


def lanczos(
  op: HessianOperator,
  v0: jax.Array,
  num_steps: int,
  stop: Callable[[np.ndarray, np.ndarray, np.ndarray], bool] | None = None,
  restart: jax.Array | None = None,
) -> Lanczos:
  """Runs up to ``num_steps`` Lanczos steps from each row of ``v0``.

  Args:
    op: The Hessian operator.
    v0: ``(b, n)`` start vectors (normalised here, exactly: no epsilon).
    num_steps: Maximum number of steps (Hessian products per start vector);
      clipped to ``n``.
    stop: Optional ``stop(alphas, betas, offsets) -> bool`` called on the host
      after every step (before a restart) with the ``(b, j)`` coefficients and
      the ``(b, j + 1, j)`` offsets (:class:`Lanczos`) so far; ``True`` stops.
    restart: PRNG key, or ``None``. With a key, a breakdown (``β_j = 0``: the
      Krylov space is invariant) before the last step continues from a normal
      random vector (key ``fold_in(restart, j)``) orthogonalised against the
      basis, with ``β_j = 0`` in ``T`` (block diagonal), so that the run goes
      on to the eigenvectors the start vector has no component along; only a
      basis of ``n`` vectors exhausts the space. Without one, each start
      vector stops at its breakdown (its Krylov space, all that quadrature
      needs, is then exact).

  Returns:
    A :class:`Lanczos` decomposition. Without ``restart``, steps stop early
    when every start vector has reached an invariant subspace (``β = 0``).

  Raises:
    NonFiniteError: as soon as a start vector or a step's coefficients are not
      finite (a NaN loss or an overflowing product), instead of running on.
  """
  b, n = v0.shape
  m = int(min(num_steps, n))
  _checks.finite(v0, "the Lanczos start vector")
  v = _first(jnp.asarray(v0, op.dtype))
  basis = _new_basis(v, m)
  tol = jnp.asarray(breakdown_tolerance(n, op.dtype), op.dtype)
  coefs, offsets = [], np.zeros((b, m + 1, m))
  for j in range(m):
    basis, v, coef, proj = _extend(basis, v, op.matmat(v), j, tol)
    coefs.append(np.asarray(coef, np.float64))
    _checks.finite(coefs[-1], f"the Hessian-vector product at Lanczos step {j + 1}", op)
    c = np.stack(coefs, axis=2)
    # Column j of the offsets: H v_j's coefficients less T's α_j and β_{j-1}, and a dropped β_j.
    offsets[:, : j + 1, j] = np.asarray(proj, np.float64)[:, : j + 1]
    offsets[:, j, j] -= c[0, :, j]
    if j > 0:
      offsets[:, j - 1, j] -= c[1, :, j - 1]
    offsets[:, j + 1, j] = c[2, :, j]
    if stop is not None and stop(c[0], c[1], offsets[:, : j + 2, : j + 1]):
      break
    dead = c[1, :, -1] == 0
    if restart is not None and dead.any() and j + 1 < m:
      z = op.gaussian(jax.random.fold_in(restart, j), b)
      basis, v, fresh = _restart(basis, v, z, j, jnp.asarray(dead), tol)
      dead = dead & ~np.asarray(fresh)
    if np.all(dead):
      break
  c = np.stack(coefs, axis=2)
  j = c.shape[2]
  return Lanczos(alphas=c[0], betas=c[1], basis=basis, num_steps=j, offsets=offsets[:, : j + 1, :j])


def blocks(betas: np.ndarray, j: int) -> list[slice]:
  """The diagonal blocks of a ``j × j`` tridiagonal ``T``: split after each ``β_i = 0``, i < j-1."""
  cuts = [0, *(int(i) + 1 for i in np.flatnonzero(betas[: j - 1] == 0)), j]
  return [slice(a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


def tridiagonal_eigh(alphas: np.ndarray, betas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Eigen-decomposition of the symmetric tridiagonal matrix with diagonal ``alphas``.

  Block by block (:func:`blocks`), so that every eigenvector is supported on one block (a
  repeated eigenvalue shared by two blocks is not mixed across them).

  Args:
    alphas: ``(j,)`` diagonal.
    betas: ``(j - 1,)`` (or longer; extra entries ignored) off-diagonal.

  Returns:
    ``(theta, s)``: ascending eigenvalues and the eigenvectors as columns.
  """
  j = alphas.shape[0]
  t = np.diag(alphas) + np.diag(betas[: j - 1], 1) + np.diag(betas[: j - 1], -1)
  parts = blocks(betas, j)
  if len(parts) == 1:
    return np.linalg.eigh(t)
  theta, s = np.zeros(j), np.zeros((j, j))
  for part in parts:
    theta[part], s[part, part] = np.linalg.eigh(t[part, part])
  order = np.argsort(theta, kind="stable")
  return theta[order], s[:, order]


# Largest gap, relative to the largest wanted |θ|, that the error estimate r²/gap assumes (in
# ritz_pairs and track_curvature). The other Ritz values only bound the unknown eigenvalues: a
# top pair the Krylov space has not split yet (1 and 0.99 above a bulk under 0.5) shows a gap to
# the bulk, and r²/gap passed for converged up to 2000x below the true error (29 of 72 cold starts
# with stop_on="eigenvalue", tol=1e-4; 8 with the cap, whose spaces had not yet seen λ₁ at all).
GAP_CAP = 0.01


def gap_error(residuals: np.ndarray, gap: np.ndarray) -> np.ndarray:
  """The gap theorem's ``min(r, r²/gap)``: ``r`` where ``gap`` is 0 or not finite."""
  with np.errstate(divide="ignore", invalid="ignore"):
    quadratic = np.where(np.isfinite(gap) & (gap > 0), residuals * residuals / gap, np.inf)
  return np.minimum(residuals, quadratic)


def change_guarded(
  errors: np.ndarray | float, values: np.ndarray | float, previous: np.ndarray | float | None
) -> np.ndarray:
  """``errors`` of the Ritz ``values``, at least their change over the last product (``previous``,
  the values one product earlier), and ``inf`` where there is no earlier value.

  The gap estimate ``r²/gap`` assumes the other Ritz values near the unknown eigenvalues, which
  they are not in the first products; the change guards it. From a single product nothing does:
  its residual bounds the distance to *some* eigenvalue, not to the wanted one (a cold start's
  one-product residual was 0.5-0.7x the true error of a flat spectrum's top eigenvalue).
  """
  if previous is None:
    return np.full(np.shape(errors), np.inf)
  return np.maximum(errors, np.abs(np.asarray(values) - np.asarray(previous)))


def reported_errors(errors: np.ndarray | float, vouched: np.ndarray | bool) -> np.ndarray:
  """``errors`` where ``vouched``, ``inf`` elsewhere: what the eigenvalue solvers report.

  A value is vouched for when its run's stopping test was met, or when only the rounding of the
  products kept it from being met (the error is then that rounding). A run cut short by its
  budget (``max_iter``) has no such test behind its estimate, which on small quadratics was
  below the true error by up to 100x after 2-6 products (flat spectra, a large negative
  eigenvalue below the top one): an error that does not cover the true one is reported as
  ``inf`` (not known), never as a smaller number.
  """
  return np.where(vouched, errors, np.inf)


class RitzPairs(NamedTuple):
  """Selected Ritz pairs of one Lanczos run (host arrays).

  Attributes:
    values: ``(k,)`` Ritz values ``θ``, in the order selected.
    coefficients: ``(j, k)`` their eigenvectors ``s`` in the Lanczos basis.
    residuals: ``(k,)`` residual norms ``‖H y − θ y‖``: ``β_j |s_j|`` and,
      given offsets, the rounding ``‖offsets s‖`` (:class:`Lanczos`) with it
      (root of the sum of squares); an eigenvalue of ``H`` lies within the
      residual of ``θ``.
    errors: ``(k,)`` estimated eigenvalue errors ``min(r, r²/gap)``, ``gap``
      the distance from ``θ`` to the nearest other Ritz value but at most
      ``GAP_CAP·scale`` (the gap theorem's bound with the Ritz values standing
      in for the unknown eigenvalues; an estimate, not a bound; ``r`` with a
      single Ritz value),
      and at least the rounding, which moves ``θ`` to first order.
    rounding: ``(k,)`` ``‖offsets s‖``, the part of the residual that more
      steps do not reduce (0 without offsets).
    scale: ``max|θ|`` over the selected Ritz values (the tolerance's
      reference; over all of them, a large unwanted one, e.g. a negative
      eigenvalue next to the wanted top one, let a top Ritz value that had not
      yet seen the top eigenvalue pass for converged).
  """

  values: np.ndarray
  coefficients: np.ndarray
  residuals: np.ndarray
  errors: np.ndarray
  scale: float
  rounding: np.ndarray


def ritz_pairs(
  alphas: np.ndarray, betas: np.ndarray, select, offsets: np.ndarray | None = None
) -> RitzPairs:
  """The Ritz pairs ``select(theta)`` picks, from one run's coefficients ``(j,)``.

  Args:
    alphas: ``(j,)`` diagonal of ``T``.
    betas: ``(j,)`` off-diagonal; ``betas[-1]`` couples to the next vector.
    select: ``theta -> indices`` of the wanted pairs (ascending ``theta``).
    offsets: ``(r, j)`` the run's offsets (:class:`Lanczos`) in these steps' columns, or
      ``None`` for exact products.
  """
  theta, s = tridiagonal_eigh(alphas, betas)
  sel = select(theta)
  rounding = np.zeros(sel.size)
  if offsets is not None:
    rounding = np.linalg.norm(offsets @ s[:, sel], axis=0)
  res = np.hypot(betas[-1] * s[-1, sel], rounding)
  scale = float(max(np.max(np.abs(theta[sel])), np.finfo(np.float64).tiny))
  dist = np.abs(theta[sel][:, None] - theta[None, :])
  dist[np.arange(sel.size), sel] = np.inf
  gap = dist.min(axis=1)
  gap = np.where(np.isfinite(gap), np.minimum(gap, GAP_CAP * scale), gap)
  errors = gap_error(res, gap)
  return RitzPairs(
    values=theta[sel],
    coefficients=s[:, sel],
    residuals=res,
    errors=np.maximum(errors, rounding),
    scale=scale,
    rounding=rounding,
  )
