"""Extreme eigenvalues and eigenvectors of the Hessian.

:func:`top_eigenvalues` runs Lanczos with full reorthogonalisation from one
random start vector and stops as soon as the wanted Ritz pairs have converged
(a residual test that costs no extra products). All ``k`` pairs come out of a
single Krylov space, plus a deflated run that checks for copies of repeated
eigenvalues (which one space cannot hold), so they cost far fewer
Hessian-vector products than :func:`power_iteration`, the power method with
deflation (one eigenvalue at a time, each restarted from scratch), kept here as
the baseline PyHessian uses.

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

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from adahessian_jax import _validation
from adahessian_jax._extras import loaded
from adahessian_jax.hessian import _checks
from adahessian_jax.hessian._lanczos import (
  blocks,
  breakdown_tolerance,
  change_guarded,
  gap_error,
  lanczos,
  norm,
  padded,
  reported_errors,
  ritz_pairs,
  tridiagonal_eigh,
  unit,
)
from adahessian_jax.hessian._layout import unravel_rows
from adahessian_jax.hessian._operator import HessianOperator
from adahessian_jax.hessian._sketch import wide_dtype

__all__ = ["Eigen", "power_iteration", "top_eigenvalues"]


class Eigen(NamedTuple):
  """Eigenpairs of the Hessian.

  Attributes:
    eigenvalues: ``(k,)`` eigenvalues, in the order asked for (``"LA"``:
      descending; ``"LM"``: descending magnitude; ``"SA"``: ascending).
    eigenvectors: Unit-norm eigenvectors as a pytree like the params whose
      leaves carry a leading axis of size ``k`` (unnamed in Linen boxes; ``eigenvectors_flat``
      is the ``(k, n)`` array). Signs are fixed so the largest-magnitude entry is positive.
    eigenvectors_flat: ``(k, n)`` flat eigenvectors.
    residuals: ``(k,)`` residual norms ``‖H v − λ v‖`` (Lanczos: the estimate
      ``|β_j s_j|`` with the rounding of the products, the part of them the
      tridiagonal matrix does not hold, added in quadrature; measured for a pair the check
      for repeated eigenvalues adds; power iteration: measured). An eigenvalue of the Hessian
      lies within the residual of each value.
    errors: ``(k,)`` estimated eigenvalue errors: Lanczos, the larger of
      ``min(r, r²/gap)`` (``gap`` the distance to the nearest other Ritz
      value, at most 1 % of the largest wanted ``|θ|``: the gap theorem with
      Ritz values for the unknown eigenvalues, which they only bound, so a top
      pair the Krylov space has not split yet shows a gap to the values below
      it; after the check for repeated eigenvalues, at most the distance to any other value
      a run found, and a value that check found beyond a returned one by less than the
      tolerance is ranked in: each error reaches the value of its rank), the rounding of the
      products, and the change of the Ritz value over the last step (which guards the gap
      estimate in the first steps, when the other Ritz values are far off;
      ``inf`` after a single step);
      an estimate, not a bound (eigenvalues 1 and 0.99 above a bulk under 0.5, ``tol=1e-4``,
      ``stop_on="eigenvalue"``: 8 of 72 cold starts stopped at ``θ ≈ 0.99``, ``converged``,
      before the space saw ``λ₁``, with errors below 1e-4 against a true 1e-2; a pair 0.1 %
      apart, closer than the cap, was under-covered in 34 of 36, by up to 200x; a top cluster
      of 3-4 within 1e-6..1e-2 above a bulk, ``tol=1e-4`` (``1e-8``: none), ``k=1``: 17 of
      25, by up to 4000x, true errors up to 6x the tolerance, which no estimate from one Krylov
      space can see (with ``check_repeated=True``: none, for 1.9x the products; with
      ``stop_on="eigenvalue"`` 14 of 25 at ``tol`` 1e-4 and 1e-8, by up to 1e4x, with it 2, by
      up to 3x); ``k=2..4``: 5 of 450 values, by up to 3x, where the first run left a mixture of
      a close pair);
      ``inf`` for a pair not converged because the run (or the check
      for repeated eigenvalues) ran out of ``max_iter``, whose estimate nothing vouches for
      (finite only where the tolerance was met or the products' rounding stopped it).
      Power iteration: the residual (``inf`` where not converged).
    num_matvecs: Hessian-vector products spent.
    converged: ``(k,)`` booleans, whether each pair met the tolerance (Lanczos:
      an exact pair of a Krylov space that became invariant counts only once
      the run's stopping test is met, since a larger eigenvalue may lie
      outside it). The check for repeated eigenvalues can leave a converged pair's
      ``errors`` above ``tol``: a value it found within the gap the stopping test assumed
      raises the error and not ``converged`` (an exact repeat, whose own error stays small,
      and a close pair look the same to it); read ``errors`` for the accuracy.
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
  _checks.which(which)
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


def _unravel_rows(op, vecs: jax.Array) -> Any:
  """The rows of ``vecs`` as one pytree like the params with a leading axis, whose Linen boxes
  (``nn.Partitioned``) name that axis ``None``: their names kept the params' rank, one short of
  the value's, which ``nn.get_partition_spec`` then gave. Other ``AxisMetadata`` stay as they
  are: their ``add_axis`` may need parameters of their own (a transform's ``metadata_params``)."""
  tree = unravel_rows(op.layout, vecs, op.dtype)  # jax.vmap(op.unravel), one compiled program
  partitioned = loaded("flax.core.meta", "Partitioned")  # boxes only exist once Flax is imported
  if partitioned is None:
    return tree
  is_box = lambda x: isinstance(x, partitioned)
  name = lambda x: x.add_axis(0, {"partition_name": None}) if is_box(x) else x
  return jax.tree.map(name, tree, is_leaf=is_box)


def _finish(op, values, vecs, residuals, errors, matvecs, converged) -> Eigen:
  vecs = _fix_signs(vecs)
  return Eigen(
    eigenvalues=np.asarray(values),
    eigenvectors=_unravel_rows(op, vecs),
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
  check_repeated: bool | None = None,
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
  rounding rarely lets ``β`` reach exactly zero: a repeated eigenvalue (a
  symmetry: the output-kernel block ``kron(hᵀh, I)`` of an MSE head, a
  linear model with several outputs) would be found once. So for ``k ≥ 2``
  (by default; for ``k = 1`` too with ``check_repeated=True``),
  once the pairs have converged, ``check_repeated`` runs Lanczos again on the
  Hessian deflated by the eigenvectors found, from a fresh random vector, for
  one pair, until that pair converges by the same test (about as many products
  as one more eigenpair costs, even when the spectrum has no copies: an early
  Ritz value below the ``k``-th does not show that nothing lies beyond it); a
  value it finds beyond the ``k``-th by more than the tolerance (another copy,
  or any eigenvalue the first space missed) takes the ``k``-th's place, and the
  check repeats until none does. The residual of a pair it takes in is measured on ``H``
  (one more product; the run's own is that of the deflated Hessian, which misses the part of
  ``H y`` along the pairs found). Its products are
  counted in ``num_matvecs``; if a check reaches ``max_iter`` before its pair
  converges, the ``k``-th pair is reported not converged.

  Args:
    op: The Hessian operator (:func:`~adahessian_jax.hessian.hessian_operator`).
    k: Number of eigenpairs.
    which: ``"LA"`` largest algebraic, ``"LM"`` largest magnitude, ``"SA"``
      smallest algebraic (the most negative curvature).
    key: PRNG key of the normal start vector and of the fresh vectors a breakdown restarts
      from (with ``v0`` too; default ``jax.random.key(0)``).
    v0: A start vector instead (flat ``(n,)`` or a pytree like the params),
      e.g. the previous eigenvector for a warm start
      (:func:`~adahessian_jax.hessian.track_curvature` does this). A warm
      start converges in fewer steps when it is close to the wanted
      eigenvector, but an eigenvector it is orthogonal to stays invisible to
      that run (for ``k ≥ 2`` the check for repeated eigenvalues may find it).
    tol: Tolerance in ``(0, 1)`` relative to the largest magnitude among the wanted Ritz
      values (``k`` wanted eigenvalues all near zero may then take up to
      ``max_iter`` products; ``converged`` says whether it was met). One below
      the rounding of the products (float32: about 1e-7 of ``‖H‖``, up to
      1e-4 near a minimum) stops once more steps cannot help, not converged,
      with that rounding in ``errors`` and ``residuals``.
    max_iter: Maximum Lanczos steps (Hessian products) of a run; memory is
      ``max_iter · n`` values. Raised to ``k`` (``k`` Ritz pairs need ``k``
      steps; ``converged`` then says whether they are eigenpairs), clipped to ``n``.
      Each deflated run of the check for repeated eigenvalues has the same limit,
      so ``num_matvecs`` can exceed it.
    stop_on: ``"residual"`` (a bound) or ``"eigenvalue"`` (the gap estimate).
    check_repeated: Whether to check for eigenvalues the Krylov space could not hold
      (above); ``None`` (the default): for ``k ≥ 2``. ``True`` runs it for ``k = 1`` too, where
      it makes the error honest on a top cluster the space has not split (which shows a gap
      to the bulk: above), for about twice the products; ``False`` skips it and its products.

  Returns:
    An :class:`Eigen`.

  Raises:
    ValueError: for a ``k`` or ``max_iter`` that is not an integer in range, a bad ``which``,
      ``tol``, ``stop_on``, ``check_repeated`` (not a bool or ``None``) or ``v0`` (unlike the
      params, not finite, or zero), a ``key`` that is not one PRNG key (an int seed, a batch of
      keys), or a call inside ``jax.jit``, or if no fresh vector can extend a basis of fewer than
      ``k`` vectors.
    NonFiniteError: if a product is not finite (e.g. a NaN loss at ``params``).
  """
  k = _check(k, which, op)
  max_iter = _validation.count("max_iter", max_iter)
  tol = _validation.relative_tolerance("tol", tol)
  _checks.stop_on(stop_on)
  if check_repeated is not None:
    check_repeated = _validation.flag("check_repeated", check_repeated)
  _checks.concrete(v0, "v0")  # a traced v0 named by its leaf, before prng_key's general refusal
  key = _checks.prng_key(key, default=0)
  eig = _lanczos_eigen(op, k, which, key, v0, tol, max_iter, stop_on)
  check = k >= 2 if check_repeated is None else check_repeated
  if not (check and k < op.size and np.all(eig.converged)):
    return eig
  return with_repeated(op, eig, which, key, tol, max_iter, stop_on)


def _deflated_operator(op: HessianOperator, basis: jax.Array, shift: float) -> HessianOperator:
  """``H`` on the complement of ``basis`` (orthonormal rows), ``shift`` on their span."""
  full = op.matmat_fn

  def matmat(vs):
    w, c = _project_out(vs, basis)
    return _recombine(full(w), c, basis, shift)

  return dataclasses.replace(op, matmat_fn=matmat, data=None)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _span(known, wide, dtype):
  """Orthonormal rows spanning the rows of ``known``: a QR in ``wide`` (LAPACK has no 16-bit
  routines), in ``dtype``. One program per shape (op by op it compiled five)."""
  return jnp.linalg.qr(known.T.astype(wide))[0].T.astype(dtype)


@jax.jit
def _project_out(vs, basis):
  c = vs @ basis.T
  return vs - c @ basis, c


@jax.jit
def _recombine(hw, c, basis, shift):
  return hw - (hw @ basis.T) @ basis + shift * (c @ basis)


def _beyond(which: str, kth: float, margin: float, theta: float, error: float) -> bool:
  """Whether an eigenvalue within ``error`` of ``theta`` may beat ``kth`` by over ``margin``."""
  if which == "LA":
    return theta + error > kth + margin
  if which == "SA":
    return theta - error < kth - margin
  return abs(theta) + error > abs(kth) + margin


def _ranked_errors(which: str, values: list, errors: list, theta: float, err: float) -> list:
  """``errors`` of the ordered ``values`` raised to cover an eigenvalue outside their span that
  lies within ``err`` of ``theta``: each value's error is at least its distance (in magnitude for
  ``"LM"``) to the value of its rank among ``values`` and that eigenvalue at its most wanted.

  A close pair or a repeated eigenvalue that the first Krylov space held once (or not split)
  leaves the k-th value a lower eigenvalue, by less than the tolerance the check for repeated
  eigenvalues takes a value in at; its own error (``r²/gap``) said nothing of that.
  """
  key = _ORDER[which]  # for "LM" the distance in magnitude: a ±λ tie is no error
  ranked = np.sort(key(np.asarray([*values, theta])) - np.r_[np.zeros(len(values)), err])
  return list(np.maximum(errors, np.abs(ranked[: len(values)] - key(np.asarray(values)))))


def _neighbour_errors(values: list, residuals: list, errors: list, found: list) -> np.ndarray:
  """``errors`` at least ``min(r, r²/gap)`` with ``gap`` the distance from each of ``values`` to
  the nearest other value in ``found`` (all the values the runs found, ``values`` among them).

  Each run's gap estimate saw only its own Ritz values: a close pair split between the first run
  and a deflated one (or held once by the first, and found again) showed each a gap to the bulk.
  """
  if len(found) < 2:  # one value (k = 1) and no other found (the first deflated run stopped)
    return np.asarray(errors, np.float64)
  distances = np.abs(np.asarray(values)[:, None] - np.asarray(found)[None, :])
  gap = np.sort(distances, axis=1)[:, 1]  # the smallest, 0, is the value itself
  return np.maximum(errors, gap_error(np.asarray(residuals), gap))


def with_repeated(op, eig, which, key, tol, max_iter, stop_on) -> Eigen:
  """``eig`` with every eigenvalue a deflated run finds beyond its ``k``-th taken in (see
  :func:`top_eigenvalues`' ``check_repeated``)."""
  k = len(eig.eigenvalues)
  values, vecs = list(np.asarray(eig.eigenvalues)), eig.eigenvectors_flat
  residuals, errors, met = list(eig.residuals), list(eig.errors), [True] * k
  known, matvecs, found = vecs, eig.num_matvecs, list(values)
  scale = float(max(np.max(np.abs(values)), np.finfo(np.float64).tiny))
  order, checked = _ORDER[which], True
  wide = wide_dtype(op.dtype)  # QR has no 16-bit kernels
  for attempt in range(k):
    if known.shape[0] >= op.size:
      break
    basis = _span(known, wide, op.dtype)
    # The span of what is known gets a value that is never wanted: below the k-th for "LA",
    # above it for "SA", zero (the smallest magnitude) for "LM".
    # A Python float: a NumPy one would promote a 16-bit operator's products to float64.
    shift = float({"LA": values[-1] - 2 * scale, "SA": values[-1] + 2 * scale, "LM": 0.0}[which])
    # The run goes on until its top pair converges, as the first run's pairs did. No earlier
    # stop: neither a residual (it bounds the distance to some eigenvalue, not to the top one)
    # nor the error estimate (the change over a step, the gap) of an early top Ritz value says
    # that no eigenvalue lies beyond it: a copy with a small component in the start vector, above
    # a wide bulk, left the top Ritz value below the k-th for a few steps, and stopping there
    # returned e.g. [3, 2] for eigenvalues (3, 3, 2, ...), converged, a third of such problems.
    kth, margin = values[-1], tol * scale
    beyond = functools.partial(_beyond, which, kth, margin)
    # From a normal vector with the known span projected out: the run never sees the shift.
    probe_key = jax.random.fold_in(key, 2 + attempt)
    start = _project_out(op.gaussian(probe_key, 1), basis)[0][0]
    probe = _lanczos_eigen(
      _deflated_operator(op, basis, shift),
      1,
      which,
      probe_key,
      start,
      tol,
      max_iter,
      stop_on,
      min_scale=scale,
    )
    matvecs += probe.num_matvecs
    theta, err = float(probe.eigenvalues[0]), float(probe.errors[0])
    # Out of max_iter before converging: the k-th value cannot be vouched for, even with the
    # top Ritz value far below it (a copy with a small component in the start vector shows up
    # late; see above).
    if not probe.converged[0]:
      checked = False
      break
    found.append(theta)
    if not (beyond(theta, err) and order(theta) < order(kth) - margin):
      # Nothing beyond the k-th by more than the tolerance, but an eigenvalue within err of
      # theta may still beat some values by less: their errors must reach where it would rank.
      errors = _ranked_errors(which, values, errors, theta, err)
      break
    # Orthogonal to the pairs found to rounding, not only to the run's residual.
    new = unit(_project_out(probe.eigenvectors_flat, basis)[0])[0]
    # The run's residual is the deflated operator's: it misses the part of H y along the known
    # span (up to the known pairs' residuals), 20x the reported one on a triple eigenvalue with
    # tol=1e-5. Measured on H instead, one product.
    residual = float(jnp.linalg.norm(op.matvec(new[0]) - theta * new[0]))
    _checks.finite(residual, "the residual of a pair the check for repeated eigenvalues found", op)
    matvecs += 1
    known = jnp.concatenate([known, new])
    values.append(theta)
    residuals.append(residual)
    errors.append(float(probe.errors[0]))
    met.append(stop_on != "residual" or residual <= tol * max(scale, abs(theta)))
    vecs = jnp.concatenate([vecs, new])
    keep = np.argsort(order(np.asarray(values)), kind="stable")[:k]
    values = [values[i] for i in keep]
    residuals, errors = [residuals[i] for i in keep], [errors[i] for i in keep]
    met = [met[i] for i in keep]
    vecs = vecs[jnp.asarray(keep)]
  checked_pairs = np.arange(k) < k - 1 + checked  # an unchecked k-th: a copy may lie beyond it
  errors = _neighbour_errors(values, residuals, errors, found)
  errors = reported_errors(errors, checked_pairs)
  return _finish(op, values, vecs, residuals, errors, matvecs, checked_pairs & np.asarray(met))


def _lanczos_eigen(
  op: HessianOperator,
  k: int,
  which: str,
  key: jax.Array,
  v0: Any,
  tol: float,
  max_iter: int,
  stop_on: str,
  min_scale: float = 0.0,
) -> Eigen:
  """:func:`top_eigenvalues` without the check for repeated eigenvalues; the tolerance is
  relative to at least ``min_scale``."""
  select = _selector(k, which)

  def ritz_and_errors(alphas, betas, offsets=None):
    ritz = ritz_pairs(alphas, betas, select, offsets)
    before = None if alphas.shape[0] <= k else ritz_pairs(alphas[:-1], betas[:-1], select).values
    return ritz, change_guarded(ritz.errors, ritz.values, before)

  def met(ritz, errors, scale):
    err = ritz.residuals if stop_on == "residual" else errors
    # Also by the residual only once the error is known (finite): after a single step (k steps
    # for k pairs) a residual under the tolerance (a block that is a multiple of the identity to
    # rounding, an MSE output bias's) stopped the run converged with errors inf.
    return (err <= tol * max(scale, min_scale)) & np.isfinite(errors)

  def live_converged(alphas, betas, offsets):
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
    ritz, errors = ritz_and_errors(alphas[live], betas[live], offsets[:, live])
    scale = (
      ritz.scale if live.start == 0 else max(ritz.scale, ritz_pairs(alphas, betas, select).scale)
    )
    done = met(ritz, errors, scale)
    # A pair whose rounding alone exceeds the tolerance (float32 products asked for more than
    # they hold) is done once the part more steps reduce meets it; it is not converged.
    floor = ~done & (ritz.rounding > tol * max(scale, min_scale))
    if np.any(floor):
      done |= floor & met(*ritz_and_errors(alphas[live], betas[live]), scale)
    return bool(np.all(done))

  def converged(alphas, betas, offsets):
    return live_converged(alphas[0], betas[0], offsets[0])

  restart = jax.random.fold_in(key, 1)
  dec = lanczos(op, _start_vector(op, v0, key), max(max_iter, k), converged, restart)
  j, alphas, betas = dec.num_steps, dec.alphas[0], dec.betas[0]
  if j < k:
    raise ValueError(f"the Krylov space is invariant after {j} steps, fewer than k={k}")
  # The Ritz pairs, derived once from the final decomposition.
  ritz, errors = ritz_and_errors(alphas, betas, dec.offsets[0])
  k_found, rows = ritz.coefficients.shape[1], dec.basis.shape[1]
  vecs = _ritz_vectors(padded(ritz.coefficients.T, (k_found, rows), dec.basis.dtype), dec.basis)
  exhausted = j == op.size  # T is H in an orthonormal basis: every Ritz value is exact
  errors = np.where(exhausted or betas[-1] == 0, ritz.residuals, errors)  # exact Ritz values
  # Pairs of an open last block are judged one by one; those of closed blocks, exact, are the
  # wanted ones only once the blocks as a whole pass the test that stops the run.
  live = blocks(betas, j)[-1]
  from_live = np.any(ritz.coefficients[live] != 0, axis=0) & (betas[-1] != 0)
  trusted = exhausted or live_converged(alphas, betas, dec.offsets[0])
  conv = (met(ritz, errors, ritz.scale) & (from_live | trusted)) | exhausted
  # A trusted run met its stopping test: a pair of it that is not converged stopped at the
  # products' rounding, which its error holds. The others ran out of max_iter.
  errors = reported_errors(errors, conv | trusted)
  return _finish(op, ritz.values, vecs, ritz.residuals, errors, j, conv)


@jax.jit
def _ritz_vectors(coefficients, basis):
  """Unit Ritz vectors ``s_i^T V`` of the first run of a Lanczos ``basis`` ``(b, m + 1, n)`` from
  zero-padded ``(k, m + 1)`` ``coefficients`` (:func:`padded`).

  Compiled once per ``k`` and basis shape: sliced to the ``j`` steps taken (``basis[0, :j]``),
  the slice and the product would be compiled anew for every step count, i.e. at nearly every
  measurement of a training run. The basis rows past ``j`` are zero.
  """
  return unit(coefficients @ basis[0])[0]


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
  Rayleigh quotient ``θ = vᵀHv`` is at most ``tol·|θ|``, or both it and ``θ``
  are at the rounding level of the operator's scale (``‖Hv‖`` and the first
  eigenvalue found): a zero Hessian, or a deflated space the Hessian maps to
  zero, gives ``θ = 0`` with residual 0. (A change of ``θ`` is no test: for eigenvalues ``±λ``
  the iterates alternate with ``θ ≈ 0`` unchanged, and ``converged`` is then
  ``False``.) A baseline for :func:`top_eigenvalues`, which needs fewer
  products for the same accuracy.

  Args:
    op: The Hessian operator.
    k: Number of eigenpairs.
    key: PRNG key of the start vectors (default ``jax.random.key(0)``).
    tol: Residual, relative to ``|θ|``, that stops an iteration (in ``(0, 1)``).
    max_iter: Maximum products per eigenvalue.

  Returns:
    An :class:`Eigen`; each eigenvalue is the Rayleigh quotient of its
    returned vector; ``residuals`` are measured (on ``H``, not deflated) with
    ``k`` extra products that are not counted in ``num_matvecs``. A value
    after one that did not converge is not marked converged either: it was
    found with a deflation by a vector that is not an eigenvector.

  Raises:
    ValueError: for a ``k`` or ``max_iter`` that is not an integer in range, a ``tol`` not in
      ``(0, 1)``, a ``key`` that is not one PRNG key (an int seed, a batch of keys), or a call
      inside ``jax.jit``.
    NonFiniteError: if a Rayleigh quotient is not finite (e.g. a NaN loss).
  """
  k = _check(k, "LM", op)
  max_iter = _validation.count("max_iter", max_iter)
  tol = _validation.relative_tolerance("tol", tol)
  floor = breakdown_tolerance(op.size, op.dtype)
  key = _checks.prng_key(key, default=0)
  found = jnp.zeros((k, op.size), op.dtype)
  values, converged, matvecs = [], [], 0
  for i, ki in enumerate(jax.random.split(key, k)):
    v = _deflated(op.gaussian(ki, 1)[0], found)
    for step in range(max_iter):
      theta, residual, scale, nxt = _power_step(v, op.matvec(v), found)
      matvecs += 1
      lam = float(theta)
      _checks.finite(lam, f"the Rayleigh quotient at power step {matvecs}", op)
      residual = float(residual)
      reference = max(float(scale), abs(values[0]) if values else 0.0)
      # The rounding level only excuses a θ that is itself at it (a null space): for any other θ,
      # float32's 10·√n·eps (4e-5 at n = 1210) let residuals 35x tol·|θ| pass for converged.
      rounding = floor * reference
      ok = residual <= tol * abs(lam) or (residual <= rounding and abs(lam) <= rounding)
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
  errors = reported_errors(residuals, np.asarray(converged))  # the same rule as Lanczos'
  return _finish(op, values, found, residuals, errors, matvecs, converged)
