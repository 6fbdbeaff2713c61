"""The shared first stage of XTrace and XDiag: a sketch ``Y = HΩ = QR`` and ``Z = HQ``.

References:
  Epperly, Tropp, Webber, `XTrace: Making the most of every sample in
  stochastic trace estimation <https://arxiv.org/abs/2301.07825>`_, SIMAX 2024.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from adahessian_jax import _validation
from adahessian_jax.hessian import _checks
from adahessian_jax.hessian._lanczos import power_of_two_above
from adahessian_jax.hessian._operator import HessianOperator

__all__ = [
  "Sketch",
  "basis_products",
  "captures_columns",
  "exchangeable_estimate",
  "exchangeable_sketch",
  "independent_probes",
  "leave_one_out_directions",
  "leave_one_out_projectors",
  "scale_of",
  "wide_dtype",
]

# Draws of the whole probe set before giving up on linearly independent probes (a probe
# distribution confined to fewer than ``s`` dimensions, e.g. a masked operator's, never gives any).
_MAX_DRAWS = 20


def wide_dtype(dtype: Any) -> np.dtype:
  """The dtype of sums and dense linear algebra on vectors of ``dtype``.

  ``dtype`` itself for float32 and wider; float32 for float16 and bfloat16, which
  LAPACK does not support and in which a sum of a few hundred terms keeps no digit.
  """
  dtype = jnp.dtype(dtype)
  return dtype if dtype.itemsize >= 4 else jnp.dtype(jnp.float32)


class Sketch(NamedTuple):
  """Probes, products and an orthonormal basis of the sketch, all as rows, in the wide dtype.

  The products, and so ``R``, are divided by ``scale``: the Hessian's scale is taken out before
  any square of them is formed (float32 products of 1e20 overflowed, and of 1e-20 underflowed,
  in the leave-one-out directions and the spread of the estimates).

  Attributes:
    num_probes: ``s``, the number of probes (the sketch costs ``2s`` products).
    omega: ``(s, n)`` Rademacher probes ``Ω``.
    y: ``(s, n)`` products ``HΩ``, divided by ``scale``.
    q: ``(s, n)`` orthonormal basis ``Q`` of ``HΩ`` (``Y = QR``).
    r: ``(s, s)`` the triangular factor ``R`` (of the scaled ``Y``).
    z: ``(s, n)`` products ``HQ``, divided by ``scale``.
    low_rank: Whether ``R`` is numerically singular and what the sketch leaves out is below
      the rounding of the products' dtype: the sketch has captured ``H`` (``QQᵀH = H``, as
      when ``H`` has rank below ``s``).
    degenerate: Whether ``R`` is numerically singular but the sketch has not
      captured ``H`` (``H`` has a null vector in the span of the probes, or small
      eigenvalues that a float32 sketch does not resolve): the leave-one-out
      directions ``R⁻ᵀeᵢ`` are then inaccurate (:func:`leave_one_out_projectors`).
    scale: A power of two near ``max|HΩ|`` (1 for zero products): multiply a value linear in
      ``y`` and ``z`` by it.
  """

  num_probes: int
  omega: jax.Array
  y: jax.Array
  q: jax.Array
  r: jax.Array
  z: jax.Array
  low_rank: bool
  degenerate: bool
  scale: float = 1.0


def scale_of(x: jax.Array) -> float:
  """A power of two near ``max|x|`` (1 if ``x`` is zero): dividing by it is exact, and leaves
  the squares of ``x``'s entries neither overflowing nor underflowing. Found in
  :func:`wide_dtype` (float16's power of two above 32768 is ``inf``)."""
  peak, above = _peak(x)
  return float(above) if float(peak) > 0 else 1.0


@jax.jit  # one program per shape, not eight
def _peak(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``max|x|`` in :func:`wide_dtype`, and its :func:`power_of_two_above`."""
  peak = jnp.max(jnp.abs(x)).astype(wide_dtype(x.dtype))
  return peak, power_of_two_above(peak)


def _singular_threshold(r: jax.Array) -> jax.Array:
  """The size at or below which a diagonal entry (or singular value) of the triangular factor
  ``r`` counts as zero: rounding of the largest one, with room (traceable)."""
  return 1e3 * jnp.finfo(r.dtype).eps * r.shape[0] * jnp.max(jnp.abs(jnp.diag(r)))


def _singular(r: jax.Array) -> bool:
  """Whether the triangular factor ``r`` is numerically singular."""
  sizes, threshold = _diagonal_and_threshold(r)
  return bool(np.asarray(sizes).min() <= float(threshold))


@jax.jit  # one program per shape, not five
def _diagonal_and_threshold(r: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``|diag(r)|`` and :func:`_singular_threshold` of ``r``."""
  return jnp.abs(jnp.diag(r)), _singular_threshold(r)


@jax.jit
def _triangular_factor(rows):
  return jnp.linalg.qr(rows.astype(wide_dtype(rows.dtype)).T, mode="r")


def independent_probes(op: HessianOperator, key: jax.Array, s: int) -> jax.Array:
  """``s`` Rademacher probes as rows, drawn again until they are linearly independent.

  The first draw is ``op.rademacher(key, s)``; draw ``a`` is ``op.rademacher(fold_in(key, a),
  s)``. Redrawing the whole set keeps the probes exchangeable. After ``_MAX_DRAWS`` dependent
  draws (probes confined to fewer than ``s`` dimensions) the first draw is returned.
  """
  first = omega = op.rademacher(key, s)
  for attempt in range(1, _MAX_DRAWS + 1):
    if not _singular(_triangular_factor(omega)):
      return omega
    if attempt < _MAX_DRAWS:
      omega = op.rademacher(jax.random.fold_in(key, attempt), s)
  return first


@jax.jit
def _outside(omega, y, q, z):
  """What the sketch leaves out, on the trace's scale: ``(rms_i tᵢ, Σ|eig(QᵀHQ)|)``.

  ``tᵢ = ωᵢᵀ(I − QQᵀ) H (I − QQᵀ)ωᵢ`` from ``Y = HΩ`` and ``Z = HQ`` (rows) is the probe's
  sample of the trace outside the sketch; the second value, the scale at which ``tr(QᵀHQ)`` is
  computed, does not cancel for an indefinite ``H``.
  """
  w = omega @ q.T  # (s, s): Qᵀω_i as rows
  t = jnp.sum((omega - w @ q) * (y - w @ z), axis=1)
  a = q @ z.T
  scale = jnp.sum(jnp.abs(jnp.linalg.eigvalsh(0.5 * (a + a.T))))
  return jnp.sqrt(jnp.mean(t**2)), scale


# Slack of :func:`captures_columns` over the rounding of the products' entry ``j`` (at most
# ``eps·√n·‖(HQ)_j‖`` when ``H`` is captured): genuinely low-rank quadratics reach 40, an entry
# 1e-8 of the top curvature in float32 1e7.
_COLUMN_SLACK = 100.0


@jax.jit
def _outside_columns(omega, y, q, z):
  """Per column ``j`` of ``H``, what the sketch leaves out: ``(rms_i (dᵢ)_j, ‖(HQ)_j‖)``.

  ``dᵢ = H(I − QQᵀ)ωᵢ = yᵢ − Z Qᵀωᵢ`` samples the columns ``(I − QQᵀ)He_j`` outside the sketch;
  it is computed from the products and ``s``-vectors alone, so an entry of ``H`` far below the
  others keeps its own scale (``(I − QQᵀ)Hωᵢ`` has the projection's rounding, ``eps‖Hωᵢ‖``).
  """
  d = y - (omega @ q.T) @ z
  return jnp.sqrt(jnp.mean(d**2, axis=0)), jnp.linalg.norm(z, axis=0)


def captures_columns(sketch: Sketch, dtype: Any) -> bool:
  """Whether the sketch captures every column of ``H`` to the rounding of that column's products.

  :func:`exchangeable_sketch`'s ``low_rank`` tests the trace: a part of ``H`` far below its top
  (float32: a layer with 1e-8 of the top curvature) passes it, and ``diag(QQᵀH)`` is then wrong
  for that part's entries. This needs, for every ``j``, the samples of :func:`_outside_columns`
  below ``_COLUMN_SLACK · eps·√n·‖(HQ)_j‖`` (``eps`` of the products' ``dtype``).
  """
  outside, scale = _outside_columns(sketch.omega, sketch.y, sketch.q, sketch.z)
  tol = _COLUMN_SLACK * float(jnp.finfo(dtype).eps) * np.sqrt(sketch.y.shape[1])
  return bool(jnp.all(outside <= tol * scale))


def exchangeable_sketch(op: HessianOperator, key: jax.Array, num_probes: int) -> Sketch:
  """Independent probes ``Ω`` (``num_probes`` of them), ``Y = HΩ = QR`` and ``Z = HQ``.

  The products are computed in the operator's dtype, everything else in
  :func:`wide_dtype`. ``low_rank`` needs both a singular ``R`` and samples ``tᵢ`` of the trace
  outside the sketch (:func:`_outside`) below the products' ``eps`` times the sketched trace's
  scale, so that probes or a null space of ``H`` that make ``R`` singular, or eigenvalues too
  small for the sketch but not for the trace (float32: a few hundred of 1e-5 of the top one),
  are not taken for a captured ``H``.

  Raises:
    NonFiniteError: if a product is not finite.
  """
  omega = independent_probes(op, key, num_probes)
  y = op.matmat(omega)
  _checks.finite(y, "the Hessian-vector product of a sketch probe", op)
  unit = scale_of(y)
  omega, y, q, r = _sketch_basis(omega, y, unit)
  wide = y.dtype
  z = op.matmat(q)
  _checks.finite(z, "the Hessian-vector product of a sketch basis vector", op)
  z = z.astype(wide) / unit
  singular = _singular(r)
  captured = False
  if singular:
    outside, scale = (float(x) for x in _outside(omega, y, q, z))
    captured = outside <= float(jnp.finfo(op.dtype).eps) * scale
  return Sketch(num_probes, omega, y, q, r, z, captured, singular and not captured, unit)


@jax.jit  # one program per shape, not five
def _sketch_basis(omega, y, unit):
  """The probes ``omega`` and the products ``y / unit`` in :func:`wide_dtype`, and the QR of the
  latter's columns, ``Q`` as rows and ``R``."""
  wide = wide_dtype(y.dtype)
  omega, y = omega.astype(wide), y.astype(wide) / unit
  qt, r = jnp.linalg.qr(y.T)
  return omega, y, qt.T, r


def leave_one_out_directions(r: jax.Array) -> jax.Array:
  """Unit columns ``s_i`` with ``q_i = Q s_i`` the direction removed with probe ``i``.

  The sketch without probe ``i`` spans ``Q`` minus the direction ``Q s_i``
  orthogonal to every other column of ``Y = QR``: ``s_i ∝`` column ``i`` of ``R⁻ᵀ``.
  """
  s = jnp.linalg.inv(r).T
  return s / jnp.linalg.norm(s, axis=0, keepdims=True)


def leave_one_out_projectors(r: jax.Array) -> jax.Array:
  """``(s, s, s)`` projectors ``M_i`` with ``P_i = Q M_i Qᵀ`` onto the sketch without probe ``i``.

  For a numerically singular ``R``, where the directions of
  :func:`leave_one_out_directions` are lost to rounding: ``M_i`` projects on the left singular
  vectors of ``R`` with column ``i`` zeroed (the coordinates of ``HΩ`` without column ``i`` in
  ``Q``) whose singular values exceed the threshold of a singular ``R``
  (:func:`_singular_threshold`). Both depend on the other probes alone, so that estimate ``i``,
  with residual probe ``ω_i``, stays unbiased.
  """
  s = r.shape[0]
  tol = _singular_threshold(r)

  def projector(i):
    u, sv, _ = jnp.linalg.svd(r.at[:, i].set(0.0))
    u = u * (sv > tol)
    return u @ u.T

  return jax.vmap(projector)(jnp.arange(s))


def basis_products(op: HessianOperator) -> tuple[jax.Array, jax.Array]:
  """The ``n`` unit vectors ``e_j`` and the products ``H e_j``, as rows in :func:`wide_dtype`.

  ``n`` products give ``H`` itself: estimators whose sketch would cost as many compute their
  value exactly from these instead.

  Raises:
    NonFiniteError: if a product is not finite.
  """
  wide = wide_dtype(op.dtype)
  basis = jnp.eye(op.size, dtype=op.dtype)
  products = op.matmat(basis)
  _checks.finite(products, "the Hessian-vector product of a basis vector", op)
  return basis.astype(wide), products.astype(wide)


def exchangeable_estimate(
  op: HessianOperator,
  key: jax.Array,
  num_matvecs: int,
  exact: Callable[[jax.Array, jax.Array], jax.Array],
  leave_one_out: Callable[..., jax.Array],
  per_entry: bool = False,
) -> tuple[Any, Any, int, int]:
  """The mean of the leave-one-out estimates of a sketch and their standard error.

  With a budget of at least ``n`` products the value is computed exactly from
  the ``n`` products ``H e_j`` (error zero). Otherwise the sketch has
  ``s = num_matvecs // 2`` independent probes (:func:`exchangeable_sketch`);
  if it captures ``H`` (``per_entry``: also :func:`captures_columns`) the value is exact on it
  (error zero); otherwise the ``s``
  leave-one-out estimates are averaged (for a singular ``R``, on the projectors of
  :func:`leave_one_out_projectors`).

  Args:
    op: The operator.
    key: PRNG key of the probes.
    num_matvecs: Product budget (an integer >= 4).
    exact: ``(q, z) -> value`` from orthonormal rows ``Q`` and ``HQ`` alone,
      exact when ``QQᵀH = H``.
    leave_one_out: ``(omega, y, z, q, r, degenerate) -> (s, ...)`` the ``s``
      estimates; ``degenerate`` (static) says to use :func:`leave_one_out_projectors`.
    per_entry: Whether the value has an entry per coordinate (a diagonal), each of which
      needs its column of ``H`` captured, rather than a sum over them (a trace).

  Returns:
    ``(mean, stderr, num_matvecs, num_samples)``: the estimate (in
    :func:`wide_dtype`), the standard deviation of the estimates over ``√s``
    (the XTrace papers' heuristic error; zero when exact), the products spent
    and the number of estimates averaged (``s``; 0 for the exact basis products).

  Raises:
    ValueError: if ``num_matvecs`` is not an integer >= 4.
    NonFiniteError: if a product is not finite.
  """
  num_matvecs = _validation.count("num_matvecs", num_matvecs, 4)
  key = _checks.prng_key(key)
  if num_matvecs >= op.size:  # H e_j for every j: tr(H) and diag(H) exactly
    value = exact(*basis_products(op))
    return value, jnp.zeros_like(value), op.size, 0
  sk = exchangeable_sketch(op, key, num_matvecs // 2)
  s = sk.num_probes
  if sk.low_rank and per_entry and not captures_columns(sk, op.dtype):
    sk = sk._replace(low_rank=False, degenerate=True)  # R is singular
  if sk.low_rank:  # H = QQᵀH exactly
    value = exact(sk.q, sk.z) * sk.scale
    return value, jnp.zeros_like(value), 2 * s, s
  ests = leave_one_out(sk.omega, sk.y, sk.z, sk.q, sk.r, sk.degenerate)
  # Over sqrt(s) as a Python float: a NumPy float64 is no weak type, and promoted a float32 (or
  # bfloat16's float32) error to float64 under x64, unlike the estimate beside it.
  return ests.mean(0) * sk.scale, ests.std(0, ddof=1) / math.sqrt(s) * sk.scale, 2 * s, s
