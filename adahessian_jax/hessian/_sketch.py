"""The shared first stage of XTrace and XDiag: a sketch ``Y = HΩ = QR`` and ``Z = HQ``.

References:
  Epperly, Tropp, Webber, `XTrace: Making the most of every sample in
  stochastic trace estimation <https://arxiv.org/abs/2301.07825>`_, SIMAX 2024.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from adahessian_jax import _validation
from adahessian_jax.hessian import _checks
from adahessian_jax.hessian._operator import HessianOperator

__all__ = [
  "Sketch",
  "basis_products",
  "exchangeable_estimate",
  "exchangeable_sketch",
  "independent_probes",
  "leave_one_out_directions",
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

  Attributes:
    num_probes: ``s``, the number of probes (the sketch costs ``2s`` products).
    omega: ``(s, n)`` Rademacher probes ``Ω``.
    y: ``(s, n)`` products ``HΩ``.
    q: ``(s, n)`` orthonormal basis ``Q`` of ``HΩ`` (``Y = QR``).
    r: ``(s, s)`` the triangular factor ``R``.
    z: ``(s, n)`` products ``HQ``.
    low_rank: Whether ``R`` is numerically singular and ``H(I − QQᵀ)Ω = 0``:
      the sketch has captured ``H`` (``QQᵀH = H``, as when ``H`` has rank below ``s``).
    degenerate: Whether ``R`` is numerically singular but the sketch has not
      captured ``H`` (``H`` has a null vector in the span of the probes): the
      leave-one-out directions are then undefined.
  """

  num_probes: int
  omega: jax.Array
  y: jax.Array
  q: jax.Array
  r: jax.Array
  z: jax.Array
  low_rank: bool
  degenerate: bool


def _singular(r: jax.Array) -> bool:
  """Whether the triangular factor ``r`` is numerically singular."""
  diag = np.abs(np.diag(np.asarray(r)))
  return bool(diag.min() <= 1e3 * np.finfo(diag.dtype).eps * diag.size * diag.max())


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
def _outside_residual(omega, y, q, z):
  """``‖H(I − QQᵀ)Ω‖_F / ‖HΩ‖_F`` from ``Y = HΩ`` and ``Z = HQ`` (rows)."""
  res = y - (q @ omega.T).T @ z
  return jnp.linalg.norm(res) / jnp.linalg.norm(y)


def exchangeable_sketch(op: HessianOperator, key: jax.Array, num_probes: int) -> Sketch:
  """Independent probes ``Ω`` (``num_probes`` of them), ``Y = HΩ = QR`` and ``Z = HQ``.

  The products are computed in the operator's dtype, everything else in
  :func:`wide_dtype`. ``low_rank`` needs both a singular ``R`` and a zero
  ``H(I − QQᵀ)Ω`` (up to ``√eps``), so that probes or a null space of ``H``
  that make ``R`` singular are not taken for a captured ``H``.

  Raises:
    NonFiniteError: if a product is not finite.
  """
  omega = independent_probes(op, key, num_probes)
  y = op.matmat(omega)
  _checks.finite(y, "the Hessian-vector product of a sketch probe", op)
  wide = wide_dtype(op.dtype)
  omega, y = omega.astype(wide), y.astype(wide)
  qt, r = jnp.linalg.qr(y.T)
  q = qt.T
  z = op.matmat(q).astype(wide)
  _checks.finite(z, "the Hessian-vector product of a sketch basis vector", op)
  singular = _singular(r)
  captured = singular and float(_outside_residual(omega, y, q, z)) <= np.sqrt(np.finfo(wide).eps)
  return Sketch(num_probes, omega, y, q, r, z, captured, singular and not captured)


def leave_one_out_directions(r: jax.Array) -> jax.Array:
  """Unit columns ``s_i`` with ``q_i = Q s_i`` the direction removed with probe ``i``.

  The sketch without probe ``i`` spans ``Q`` minus the direction ``Q s_i``
  orthogonal to every other column of ``Y = QR``: ``s_i ∝`` column ``i`` of ``R⁻ᵀ``.
  """
  s = jnp.linalg.inv(r).T
  return s / jnp.linalg.norm(s, axis=0, keepdims=True)


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
) -> tuple[Any, Any, int, int]:
  """The mean of the leave-one-out estimates of a sketch and their standard error.

  With a budget of at least ``n`` products the value is computed exactly from
  the ``n`` products ``H e_j`` (error zero). Otherwise the sketch has
  ``s = num_matvecs // 2`` independent probes (:func:`exchangeable_sketch`);
  if it captures ``H`` the value is exact on it (error zero); if ``R`` is
  singular without capturing ``H`` every estimate uses the whole sketch
  (Hutch++ with the probes reused as residual probes, slightly biased);
  otherwise the ``s`` leave-one-out estimates are averaged.

  Args:
    op: The operator.
    key: PRNG key of the probes.
    num_matvecs: Product budget (an integer >= 4).
    exact: ``(q, z) -> value`` from orthonormal rows ``Q`` and ``HQ`` alone,
      exact when ``QQᵀH = H``.
    leave_one_out: ``(omega, y, z, q, r, degenerate) -> (s, ...)`` the ``s``
      estimates; ``degenerate`` (static) says to project on the whole sketch.

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
  if sk.low_rank:  # H = QQᵀH exactly
    value = exact(sk.q, sk.z)
    return value, jnp.zeros_like(value), 2 * s, s
  ests = leave_one_out(sk.omega, sk.y, sk.z, sk.q, sk.r, sk.degenerate)
  return ests.mean(0), ests.std(0, ddof=1) / np.sqrt(s), 2 * s, s
