"""Curvature over a training run: sharpness and preconditioned sharpness, warm-started.

:func:`track_curvature` is what a training loop calls every ``N`` steps: the top
Hessian eigenvalue (the sharpness ``λ_max(H)``), the top eigenvalue of the
preconditioned Hessian ``λ_max(P⁻¹H)`` for the optimizer's own ``P`` (see
:mod:`~adahessian_jax.hessian.preconditioned`), and optionally their traces.
Each measurement starts from the previous one's top ``block_size`` Ritz vectors: a Rayleigh-Ritz
step on the block, then one product per step along the top Ritz vector's residual (from a single
vector, the Lanczos space). It runs on the host between training steps and costs nothing in
between.

What a warm start saves depends on how far the top eigenvector moves between measurements:
while it moves little a measurement costs ~4 products per eigenvalue against a cold start's ~10
(tested on a slowly rotating family), but on the digits CNN measured every 10 steps consecutive top
eigenvectors are far apart for most of the run and a warm start saves only ~2-10 % (~25 %
measuring every step). No stopping rule could do much better: even from the previous *converged*
eigenvector, the fewest products to 1e-4 are 0.62-0.89 of a cold start's over a run
(``benchmarks/tracking_oracle.py``; docs/hessian_analysis.md has the counts and the runs that
returned the second eigenvalue).

A small random probe is mixed into the start block (``warm_mix``): without it, old Ritz vectors
that the new Hessian maps into their own span (e.g. dead units, ``Hv = 0``) are an invariant
subspace the iteration never leaves. A new eigenvalue that overtakes the tracked one along a
direction orthogonal to the block is seen only through that probe, and is usually missed: the
tracked pair, still an eigenpair, converges first and is returned ``converged`` (a 50-parameter
quadratic whose bulk eigenvalue rose from below 1 to 6 above the tracked 5: 5 returned in 17-19
of 20 seeds (two eigenbases), with ``block_size`` 1 or 2; ``warm_mix=0.3`` found 6 in 19-20 of 20,
cold starts in all 20, at 7 products); pass ``previous=None`` now and then when that matters.

References:
  Cohen, Kaur, Li, Kolter, Talwalkar, `Gradient Descent on Neural Networks
  Typically Occurs at the Edge of Stability <https://arxiv.org/abs/2103.00065>`_,
  ICLR 2021.

  Cohen et al., `Adaptive Gradient Methods at the Edge of Stability
  <https://arxiv.org/abs/2207.14484>`_, 2022.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from adahessian_jax import _validation
from adahessian_jax.hessian import _checks, eigen
from adahessian_jax.hessian._lanczos import (
  GAP_CAP,
  breakdown_tolerance,
  change_guarded,
  norm,
  orthogonalise,
  padded,
  reported_errors,
  unit,
)
from adahessian_jax.hessian._operator import HessianOperator
from adahessian_jax.hessian._sketch import wide_dtype
from adahessian_jax.hessian.preconditioned import preconditioned_operator
from adahessian_jax.hessian.trace import TraceEstimate, xtrace

__all__ = ["CurvatureRecord", "Sharpness", "track_curvature"]


class Sharpness(NamedTuple):
  """The top eigenvalue of one operator at one point.

  Attributes:
    eigenvalue: The top Ritz value ``θ``.
    error: Estimated error of ``θ``, ``min(r, r²/gap)`` from the residual
      ``r`` and the gap to the next Ritz value, taken as at most 1 % of ``|θ|``
      (a pair of top eigenvalues closer than that that the subspace has not
      split shows no second Ritz value near ``θ``, and no estimate from one subspace can see
      it: on top clusters of 3-4 within 1e-6..1e-2 above a bulk, ``tol=1e-4``, the error was
      below the true one in 13 of 25 cold and 22 of 25 warm measurements, by up to 70x, with
      ``stop_on="residual"`` in 19 and 8, by up to 1100x; with ``check_repeated=True`` in 2
      and 1, by up to 1.4x (``"residual"``: 5 and 6, by up to 3.4x), for 1.9-2.7x the
      products; after that check, also at most the distance to the value it found), at least
      the rounding the products' asymmetry shows (a ``tol`` below it stops
      the run unconverged: bfloat16's ~1e-3 of ``θ``); once the subspace is the
      whole space, where ``θ`` is exact, at most the larger of ``r`` and that rounding;
      ``inf`` for a run that ran out of ``max_iter`` before its test was met (an estimate nothing
      vouches for: after 1-6 products it was up to 100x below the true error).
    residual: ``r = ‖H y − θ y‖`` for the Ritz vector ``y``: some eigenvalue
      of ``H`` lies within ``r`` of ``θ`` (a bound, where ``error`` is an
      estimate).
    num_matvecs: Hessian-vector products spent (the check for repeated
      eigenvalues' included).
    converged: Whether the stopping rule was met within ``max_iter`` (or the
      subspace grew to the whole space, where the Ritz values are exact), and the
      check's run, if any, converged within it (else ``error`` is ``inf``);
      a 16-bit run stops unconverged where its rows become linearly
      dependent to their rounding (a ``tol`` past what 16 bits resolve).
    eigenvector: The flat unit Ritz vector ``y``.
    ritz_vectors: ``(b, n)`` the top ``b`` (``block_size``) unit Ritz vectors,
      ``eigenvector`` first: the next measurement's start block (a value the check
      found beyond ``θ`` leads it, ``θ``'s vector second).
    history: ``(j − b + 1,)`` the top Ritz value after ``b``, ``b + 1``, ...,
      ``j`` products of the first run (``j = num_matvecs`` without the check;
      host array; nondecreasing up to rounding, since the subspaces are nested; its last
      entry is ``eigenvalue`` unless the check replaced it): how fast the run converged, e.g.
      the first product count within a target of a reference value.
  """

  eigenvalue: float
  error: float
  residual: float
  num_matvecs: int
  converged: bool
  eigenvector: jax.Array
  ritz_vectors: jax.Array
  history: np.ndarray


class CurvatureRecord(NamedTuple):
  """One measurement of :func:`track_curvature`.

  Attributes:
    sharpness: ``λ_max(H)``.
    preconditioned: ``λ_max(P⁻¹H)`` (``None`` without a preconditioner).
    trace: ``tr(H)`` by XTrace (``None`` unless asked for).
    preconditioned_trace: ``tr(P⁻¹H)`` by XTrace (``None`` unless asked for).
    num_matvecs: Hessian-vector products spent in all.
  """

  sharpness: Sharpness
  preconditioned: Sharpness | None
  trace: TraceEstimate | None
  preconditioned_trace: TraceEstimate | None
  num_matvecs: int


# Rows of the subspace buffers at first (a measurement on the digits CNN takes 5-25 products); a
# subspace that outgrows them doubles them (up to max_iter). Every array of a run has the
# buffers' shape, zero rows past the subspace, so its programs are compiled once per buffer size,
# not once per subspace size: after the first measurement of a training run, later ones compile
# nothing unless one needs more products than any before it had buffer rows for (then ~7 small
# programs, once).
_FIRST_ROWS = 16


@jax.jit
def _ritz(q, w, s):
  """Ritz vectors ``y = sᵀQ``, their residuals ``Hy − θy`` and the residuals' norms.

  ``Hy = sᵀW`` comes from the stored products: no new ones. Zero rows of ``q``, ``w`` and ``s``
  (past the subspace) are inert.
  """
  y, hy = s.T @ q, s.T @ w
  size = jnp.sum(y * y, axis=-1)
  theta = jnp.sum(y * hy, axis=-1) / jnp.where(size > 0, size, 1.0)  # zero columns of s: 0
  r = hy - theta[:, None] * y
  return y, r, norm(r)


@jax.jit
def _orthonormal(q, v):
  """``v`` orthogonalised against the rows of ``q``, normalised, its norm before that, and the
  norm of ``v`` itself (one program, where the last one's ops compiled five)."""
  return (*unit(orthogonalise(q, v)), norm(v))


@jax.jit
def _rayleigh(q, w):
  """The Rayleigh-Ritz matrix ``Q Wᵀ`` (zero past the subspace), in at least float32."""
  wide = wide_dtype(q.dtype)
  return q.astype(wide) @ w.astype(wide).T


@jax.jit
def _set_row(x, i, row):
  return x.at[i].set(row)


@functools.partial(jax.jit, static_argnums=1)  # one program per shape, not three
def _with_rows(x: jax.Array, rows: int) -> jax.Array:
  """``x`` with zero rows appended up to ``rows``."""
  return jnp.zeros((rows, x.shape[1]), x.dtype).at[: x.shape[0]].set(x)


def _next_vector(op, q, grow, key, tol_break):
  """The unit vector that extends the subspace ``q``: ``grow`` orthogonalised against it, or,
  when there is no ``grow`` or nothing of it is left, a normal random vector drawn from ``key``
  and orthogonalised; ``None`` when neither keeps more than ``tol_break`` of its norm (``q``
  spans the space to rounding). Also whether it is the random one."""
  if grow is not None:
    v, size, raw = _orthonormal(q, grow)
    if float(size) > tol_break * float(raw):
      return v, False
  z = jax.random.normal(key, (op.size,), op.dtype)
  v, size, raw = _orthonormal(q, z)
  return (v if float(size) > tol_break * float(raw) else None), True


def _ritz_step(op, q, w, used: int) -> tuple[np.ndarray, np.ndarray, float]:
  """``(θ, s, rounding)`` on the first ``used`` rows of ``q`` (products ``w``): the Ritz values,
  descending, their coefficients, and how far the asymmetry of the products moves ``θ₁``.

  What symmetrising the Rayleigh-Ritz matrix removes, the asymmetry of the products (their
  rounding: 1e-2 of ``θ`` in bfloat16), moves ``θ`` to first order, not by ``r²/gap``: a floor
  under the error.
  """
  t = np.asarray(_rayleigh(q, w), np.float64)[:used, :used]
  _checks.finite(t, f"the Rayleigh-Ritz matrix after {used} Hessian-vector products", op)
  theta, s = _ritz_values(0.5 * (t + t.T), q, used)
  theta, s = theta[::-1], s[:, ::-1]
  return theta, s, float(np.linalg.norm(0.5 * (t - t.T) @ s[:, 0]))


def _estimated_error(theta: np.ndarray, res: np.ndarray, history: list, grown: bool) -> Any:
  """``θ₁``'s estimated error, ``min(r₁, r₁²/gap)`` (:func:`_top`'s stopping rule), and once the
  subspace has ``grown`` past the start block at least the change of ``θ₁`` over the last
  product (before that a warm block's gap estimate stands alone: it may stop at ``b`` products).
  """
  err = res[0]
  if theta.size > 1:
    # θ₂ is only a lower bound on λ₂: a pair near the top that the subspace has not yet split
    # (a start with little of the top eigenvector) shows no second Ritz value near θ₁, and a
    # gap to the bulk below let r²/gap pass for converged 100x below the true error (λ = 1 and
    # 0.99 above a bulk under 0.5: θ₁ = 0.991 after 7 products, r = 3e-3, estimate 6e-5, in
    # 5 of 40 cold starts). The gap is taken as at most 1 % of |θ₁|: the estimate then holds
    # for any λ₂ at least that far below, at about one product more per measurement.
    gap = min(theta[0] - theta[1] - res[1], GAP_CAP * abs(float(theta[0])))
    err = min(err, err * err / gap) if gap > 0 else err
  if grown:
    err = float(change_guarded(err, history[-1], history[-2]))
  return err


def _meets(residual: Any, err: Any, rounding: float, tol: float, stop_on: str) -> tuple:
  """``(converged, stuck)``: whether the stopping test (``stop_on``: the residual or the
  estimated ``err`` at most ``tol``) holds, and whether it holds but the products' ``rounding``
  does not (done, not converged)."""
  ok = (residual if stop_on == "residual" else err) <= tol
  stuck = ok and rounding > tol
  return ok and not stuck, stuck


def _top(op, start: jax.Array, key, *, tol, max_iter, stop_on, keep) -> Sharpness:
  """The top eigenpair by Rayleigh-Ritz on a subspace grown from ``start`` by residuals.

  The subspace starts as the span of ``start``'s ``b`` rows (``b`` products) and grows by one
  vector per product: the top Ritz vector's residual, orthogonalised. From a single start vector
  this is the Lanczos (Krylov) space; from a block of previous Ritz vectors it is the block plus
  the Krylov space of the residual, and its second Ritz value, close to the next eigenvalue,
  gives a gap estimate from the first products.

  Stopping rule: the estimated error is ``min(r₁, r₁²/gap)`` with ``gap = θ₁ − (θ₂ + r₂)``, at
  most ``0.01·|θ₁|`` (the gap theorem, with ``θ₂ + r₂`` standing in for the unknown next
  eigenvalue: an estimate, not a bound) and, once the subspace has grown past the start block,
  at least the change of ``θ₁`` over the last product, which guards against a ``θ₂`` still far
  below ``λ₂``.

  A top Ritz vector with a residual at the rounding level of ``|θ₁|`` (and below ``tol/100``) is
  an eigenvector, but not necessarily of the top eigenvalue: the start block may lie in an
  invariant subspace (an eigenvector of a smaller eigenvalue, e.g. of a pair of symmetric
  parameters, or dead units), and its residual, zero, cannot grow the subspace. Then the
  subspace grows along the residual of the first Ritz vector that is not an eigenvector to
  rounding (its Krylov space explores the rest of the spectrum) or, when all are, a fresh normal
  random vector (key ``fold_in(key, j)`` after ``j`` products) orthogonalised against it. The run
  stops when that Ritz vector's residual is at most ``tol·|θ₁|``, or when the subspace is
  invariant (every Ritz vector an eigenvector) after a fresh random vector joined it: it then
  holds that vector's Krylov space, which almost surely has a component along the top
  eigenvector, so ``θ₁`` is the top eigenvalue.
  """
  q = _orthonormal_rows(start)
  w = op.matmat(q)
  used, b, history, randomised = q.shape[0], q.shape[0], [], False
  rows = min(max(_FIRST_ROWS, b), max_iter, op.size)  # the buffers' rows; used <= all three
  q, w = _with_rows(q, rows), _with_rows(w, rows)
  tol_break = breakdown_tolerance(op.size, op.dtype)
  # A residual this small is an eigenvector's to rounding. Well below tol: in float32 the
  # breakdown tolerance (up to 1e-3) can exceed tol, and a run converging normally must not be
  # taken for one stuck in an invariant subspace.
  exact = min(tol_break, 0.01 * tol)
  while True:
    theta, s, rounding = _ritz_step(op, q, w, used)
    history.append(float(theta[0]))
    m = min(max(keep, 2), theta.size)
    y, res_vecs, res = _ritz(q, w, padded(s[:, :m], (rows, m), op.dtype))
    res = np.asarray(res, np.float64)
    # Relative to the tracked value itself, not to the largest |θ|: early in a run a large
    # negative Ritz value next to a top Ritz value that has not yet found the top eigenvalue
    # would otherwise make a poor pair look converged (seen on the digits CNN's P⁻¹H).
    scale = max(abs(float(theta[0])), float(np.finfo(np.float64).tiny))
    err = _estimated_error(theta, res, history, grown=used > b)
    ok, stuck = _meets(res[0], err, rounding, tol * scale, stop_on)
    err = max(err, rounding)  # the products' rounding is a floor under the error
    grow = res_vecs[0]
    if res[0] <= exact * scale:  # an eigenvector to rounding, but maybe not the top one's
      ok, grow = _beyond_eigenvector(q, w, s, tol * scale, exact * scale, op.dtype)
      ok = ok or (grow is None and randomised)
    # Once the subspace is the whole space the Ritz values are exact: the residual (rounding)
    # bounds the error, where the change over the last product (up to |λ₁ − λ_n|) would not.
    exact_err = min(err, max(float(res[0]), rounding))
    full = theta.size >= op.size
    dependent = theta.size < used  # 16-bit rows dependent to rounding: no growth is left
    if ok or stuck or full or dependent or used >= max_iter:
      # Out of max_iter with the test unmet: nothing vouches for the estimate (reported_errors).
      err = exact_err if full else float(reported_errors(err, ok or stuck or dependent))
      ok = ok or full
      break
    v, fresh = _next_vector(op, q, grow, jax.random.fold_in(key, used), tol_break)
    randomised = randomised or fresh
    if v is None:
      ok, err = True, exact_err  # the subspace spans the space to rounding: the values are exact
      break
    if used == rows:
      rows = min(2 * rows, max_iter, op.size)
      q, w = _with_rows(q, rows), _with_rows(w, rows)
    q, w = _set_row(q, used, v), _set_row(w, used, op.matvec(v))
    used += 1
  return Sharpness(
    eigenvalue=float(theta[0]),
    error=float(err),
    residual=float(res[0]),
    num_matvecs=used,
    converged=bool(ok),
    eigenvector=y[0],
    ritz_vectors=y[:keep],
    history=np.asarray(history),
  )


def _ritz_values(t: np.ndarray, q: jax.Array, used: int) -> tuple[np.ndarray, np.ndarray]:
  """Ascending Ritz values and coefficients of the symmetric ``t`` on the first ``used`` rows of
  ``q``.

  The rows are orthonormal to the rounding of their dtype. In float16 and bfloat16 that is not
  enough: their Gram matrix is off the identity by ~1e-2 after tens of rows, which moved the top
  Ritz value of a bfloat16 MLP 5 % above the operator's top eigenvalue once the subspace was the
  whole space (and called it exact). There the Ritz pairs solve ``t s = θ G s`` with the Gram
  matrix ``G`` of the rows as stored, so that each Ritz vector ``sᵀQ`` has unit norm and its
  Rayleigh quotient is ``θ``. Rows that are linearly dependent to that rounding (``G`` not
  positive definite: a run asked for more than 16 bits resolve, e.g. ``tol=1e-6``, grows
  its subspace by rounding noise) are dropped, the directions of ``G``'s eigenvalues below
  ``eps·max``: fewer columns than ``used`` then say that the subspace has stopped growing.
  """
  if jnp.finfo(q.dtype).bits >= 32:
    return np.linalg.eigh(t)
  g = np.asarray(_rayleigh(q, q), np.float64)[:used, :used]
  # G = U Λ Uᵀ: the pencil (t, G) on G's range has the eigenvalues of Xᵀ t X, X = U Λ^{-1/2},
  # whose eigenvectors z give s = X z. A Cholesky factor of G failed on dependent rows and,
  # before that, an ill-conditioned one gave spurious Ritz values (80x the top eigenvalue).
  lam, u = np.linalg.eigh(0.5 * (g + g.T))
  keep = lam > float(jnp.finfo(q.dtype).eps) * lam[-1]
  x = u[:, keep] / np.sqrt(lam[keep])
  inner = x.T @ t @ x
  theta, z = np.linalg.eigh(0.5 * (inner + inner.T))
  return theta, x @ z


def _beyond_eigenvector(q, w, s, tol, exact, dtype):
  """For a top Ritz vector that is an eigenvector: whether the first Ritz vector that is not
  (residual ``> exact``, descending ``θ``) meets ``tol``, and its residual to grow along
  (``None`` when every Ritz vector is an eigenvector to rounding)."""
  # s padded to the buffers' rows and columns (its zero columns give zero, dropped).
  rows = q.shape[0]
  _, res_vecs, res = _ritz(q, w, padded(s, (rows, rows), dtype))
  res = np.asarray(res, np.float64)[: s.shape[1]]
  live = np.flatnonzero(res > exact)
  if live.size == 0:
    return False, None
  return bool(res[live[0]] <= tol), res_vecs[live[0]]


def _orthonormal_rows(v: jax.Array) -> jax.Array:
  rows, d = _qr_rows(v)
  d = np.asarray(d)
  good = d > breakdown_tolerance(v.shape[1], v.dtype) * d.max()
  return rows if good.all() else rows[np.flatnonzero(good)]


@jax.jit
def _qr_rows(v):
  """The orthonormal rows of ``v``'s QR, in ``v``'s dtype, and ``|diag(R)|``: one program (op by
  op, five). The QR in at least float32 (LAPACK has no 16-bit routines)."""
  q, r = jnp.linalg.qr(v.T.astype(wide_dtype(v.dtype)))
  return q.T.astype(v.dtype), jnp.abs(jnp.diagonal(r))


def _check_start(previous: Sharpness | None, what: str, n: int) -> None:
  """Refuses a previous measurement's Ritz vectors that cannot start one on ``n`` parameters."""
  if previous is None:
    return
  start = np.asarray(previous.ritz_vectors)
  if not _validation.real_dtype(start.dtype):
    # Strings failed in NumPy's isfinite ("ufunc 'isfinite' not supported"), complex vectors lost
    # their imaginary part silently.
    raise ValueError(
      f"previous: its {what} Ritz vectors have dtype {start.dtype}, not real numbers; pass the "
      "record of an earlier measurement of the same model, or previous=None for a cold start"
    )
  if start.ndim != 2 or start.shape[0] < 1:
    raise ValueError(
      f"previous: its {what} Ritz vectors have shape {start.shape}, but the operator has {n} "
      f"parameters (one row of {n} per vector); pass the record of an earlier measurement of the "
      "same model, or previous=None for a cold start"
    )
  if start.shape[1] != n:
    raise ValueError(
      f"previous: its {what} Ritz vectors have shape {start.shape}, rows of {start.shape[1]} "
      f"parameters, but the operator has {n}: the params are not the ones the record measured "
      "(another model, or other leaves: layers frozen or unfrozen, a changed nnx.split or "
      "partition filter). Pass a record of these params, or previous=None for a cold start (once, "
      "after changing which parameters are measured)"
    )
  if not np.all(np.isfinite(start)):
    raise ValueError(
      f"previous: its {what} Ritz vectors are not finite; pass previous=None for a cold start"
    )
  if not np.any(start):  # with warm_mix=0 the start block was empty: NumPy's "need at least one
    # array to concatenate"; no measurement returns zero Ritz vectors (they have unit norm)
    raise ValueError(
      f"previous: its {what} Ritz vectors are all zero (a measurement's have unit norm: a record "
      "restored into zeros, or built by hand?); pass the record track_curvature returned, or "
      "previous=None for a cold start"
    )


def _measure(op, previous, key, tol, max_iter, stop_on, mix, block_size, check) -> Sharpness:
  if previous is None:
    start = op.gaussian(key, 1)
  else:
    # A little of a fresh random probe in the first vector: previous Ritz vectors can span an
    # invariant subspace of the new Hessian (e.g. dead units: Hv = 0) that the subspace would
    # never leave; with the probe no direction is invisible, and the top Ritz vector, whose
    # residual the stopping rule tests, keeps the probe's image in that residual.
    start = jnp.asarray(previous.ritz_vectors)
    z = op.gaussian(key, 1)[0]
    # The probe's scale as a Python float and the block in the operator's dtype: a NumPy float64
    # scalar would promote a float32 probe under jax_enable_x64 (a FutureWarning, later an error).
    start = start[:block_size].astype(op.dtype)
    start = start.at[0].add(float(mix / np.sqrt(op.size)) * z)
  out = _top(op, start, key, tol=tol, max_iter=max_iter, stop_on=stop_on, keep=block_size)
  if not (check and out.converged and op.size > 1):
    return out
  return _checked(op, out, jax.random.fold_in(key, max_iter + 1), tol, max_iter, stop_on)


def _checked(op, out: Sharpness, key, tol, max_iter, stop_on) -> Sharpness:
  """``out`` after ``top_eigenvalues``' check for repeated eigenvalues (``check_repeated``): a
  run on ``H`` deflated by the top Ritz vector, from a random vector, until its top pair
  converges; a value it finds beyond ``θ`` replaces it (``θ`` then second in the start block),
  one below sets the gap (key ``key``: none of ``_top``'s ``fold_in(key, j)``, ``j ≤ max_iter``)."""
  one = eigen.Eigen(
    eigenvalues=np.asarray([out.eigenvalue]),
    eigenvectors=None,
    eigenvectors_flat=out.eigenvector[None],
    residuals=np.asarray([out.residual]),
    errors=np.asarray([out.error]),
    num_matvecs=out.num_matvecs,
    converged=np.asarray([True]),
  )
  c = eigen.with_repeated(op, one, "LA", key, tol, max_iter, stop_on)
  top = c.eigenvectors_flat[0]
  swapped = float(c.eigenvalues[0]) != out.eigenvalue
  block = out.ritz_vectors
  if swapped:  # the value found beyond θ first, θ's vector second
    block = jnp.concatenate([top[None], out.eigenvector[None], block[1:]])[: block.shape[0]]
  return out._replace(
    eigenvalue=float(c.eigenvalues[0]),
    error=float(c.errors[0]),
    residual=float(c.residuals[0]),
    num_matvecs=c.num_matvecs,
    converged=bool(c.converged[0]),
    eigenvector=top if swapped else out.eigenvector,
    ritz_vectors=block,
  )


def track_curvature(
  op: HessianOperator,
  previous: CurvatureRecord | None = None,
  *,
  preconditioner: Any = None,
  key: jax.Array | None = None,
  tol: float = 1e-4,
  max_iter: int = 200,
  stop_on: str = "eigenvalue",
  warm_mix: float = 0.01,
  block_size: int | None = None,
  trace_matvecs: int = 0,
  check_repeated: bool = False,
) -> CurvatureRecord:
  """Sharpness and preconditioned sharpness at ``op``'s point, warm-started from ``previous``.

  Example (every 50 steps of an AdaHessian run)::

    record = None
    for step in range(num_steps):
      params, opt_state = train_step(params, opt_state, next(batches))
      if step % 50 == 0:
        op = hessian.hessian_operator(loss_fn, params, batch=probe_batch)
        P = hessian.adahessian_preconditioner(opt_state)
        record = hessian.track_curvature(op, record, preconditioner=P)
        print(step, record.sharpness.eigenvalue, record.preconditioned.eigenvalue)

  Args:
    op: The Hessian operator at the current params (a fixed batch, or the
      batches, whose Hessian is tracked).
    previous: The last record, whose top Ritz vectors start this
      measurement's runs (``None``: random starts).
    preconditioner: The optimizer's ``P`` (a pytree like the params or a flat
      array), e.g. from :func:`~adahessian_jax.hessian.adahessian_preconditioner`;
      ``None`` skips the preconditioned quantities.
    key: PRNG key of the random starts and trace probes (default ``key(0)``).
    tol: Tolerance of each run in ``(0, 1)``, relative to the tracked eigenvalue ``|θ₁|`` (a
      top eigenvalue near zero next to large negative ones may then take up to
      ``max_iter`` products; ``converged`` says whether it was met).
    max_iter: Maximum Hessian-vector products per run (the block's included,
      so at least ``block_size``). Memory is ``2·r·n`` values, ``r`` = 16 rows (at most
      ``max_iter`` and ``n``), doubled when a run needs more products.
    stop_on: ``"eigenvalue"`` stops when the estimated eigenvalue error
      ``min(r, r²/gap)`` is below ``tol·|θ₁|`` (the default: tracking wants the
      eigenvalue); ``"residual"`` when the residual ``r`` is, which bounds the
      error (costs more products).
    warm_mix: Norm (about) of the normal random probe added to a warm start's first vector
      (whose norm is 1), so that no direction is invisible to it.
    block_size: Number ``b`` of Ritz vectors kept in the record and used as the
      next start block (``b`` products up front). With ``b >= 2`` the block's
      second Ritz value gives the gap estimate from the first products; ``1``
      is a plain Lanczos warm start, guarded by the change of ``θ`` per step.
      Default (``None``): 2, or ``op.size`` for a 1-parameter operator.
    trace_matvecs: If positive, also estimate the traces by XTrace with this
      many products each (at least 4).
    check_repeated: After each converged run, run ``top_eigenvalues``' check for
      repeated eigenvalues (``check_repeated``): a run on the operator deflated by the top
      Ritz vector, from a random vector, until its top pair converges. A value it finds beyond
      ``θ`` is returned instead; one below bounds the gap. It makes ``error`` honest on a top
      cluster the subspace has not split (see :class:`Sharpness`), for about a cold start's
      products more per measurement. ``False`` (the default) skips it.

  Returns:
    A :class:`CurvatureRecord`.

  Raises:
    ValueError: for an argument out of range (``check_repeated`` not a bool), a
      ``previous`` record of another model, or a preconditioner that is not positive
      (``inf`` allowed) or not shaped like the params (all refused before any product is
      spent).
    TypeError: for a ``previous`` that is not a :class:`CurvatureRecord` (e.g. the dict of a
      checkpoint restored without a target).
    NonFiniteError: if a product is not finite (a diverged run): record
      ``nan`` and stop measuring, or measure before the divergence.
  """
  key = _checks.prng_key(key, default=0)
  k_plain, k_pre, k_tr, k_pre_tr = jax.random.split(key, 4)
  trace_matvecs = _validation.count("trace_matvecs", trace_matvecs, 0)
  if 0 < trace_matvecs < 4:  # XTrace's least budget, checked before the measurements spend any
    raise ValueError(
      f"trace_matvecs must be 0 (no traces) or an integer >= 4 (XTrace's budget), got "
      f"{trace_matvecs}."
    )
  block_size = min(2, op.size) if block_size is None else block_size
  block_size = _validation.count("block_size", block_size, 1, op.size)
  max_iter = _validation.count("max_iter", max_iter, block_size)  # the block's products count
  tol = _validation.relative_tolerance("tol", tol)
  _checks.stop_on(stop_on)
  mix = _validation.positive("warm_mix", warm_mix, allow_zero=True)
  check = _validation.flag("check_repeated", check_repeated)
  args = (tol, max_iter, stop_on, mix, block_size, check)
  if previous is not None and not isinstance(previous, CurvatureRecord):
    # A checkpoint (orbax) restored without a target gives the record's fields as a dict.
    untyped = isinstance(previous, dict) and set(previous) == set(CurvatureRecord._fields)
    hint = (
      ": its keys are a CurvatureRecord's, as a checkpoint restored without a target gives "
      "them; restore it with a record of this model as the target (e.g. one measurement with "
      "previous=None), or pass previous=None for a cold start"
      if untyped
      else ""
    )
    raise TypeError(
      f"previous must be the CurvatureRecord an earlier track_curvature call returned (or None), "
      f"got {type(previous).__name__}{hint}"
    )
  # Both start blocks and the preconditioner (building the operator checks it) are checked before
  # either measurement spends a product.
  _check_start(previous and previous.sharpness, "sharpness", op.size)
  pop = None
  if preconditioner is not None:
    _check_start(previous and previous.preconditioned, "preconditioned", op.size)
    pop = preconditioned_operator(op, preconditioner)
  plain = _measure(op, previous and previous.sharpness, k_plain, *args)
  trace = None if trace_matvecs == 0 else xtrace(op, k_tr, trace_matvecs)
  pre = pre_trace = None
  if pop is not None:
    pre = _measure(pop, previous and previous.preconditioned, k_pre, *args)
    pre_trace = None if trace_matvecs == 0 else xtrace(pop, k_pre_tr, trace_matvecs)
  spent = [plain, pre, trace, pre_trace]
  total = int(np.sum([x.num_matvecs for x in spent if x is not None]))
  return CurvatureRecord(plain, pre, trace, pre_trace, total)
