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

from adahessian_jax.hessian import _checks
from adahessian_jax.hessian._operator import HessianOperator

__all__ = [
  "Sketch",
  "exchangeable_estimate",
  "exchangeable_sketch",
  "leave_one_out_directions",
]


class Sketch(NamedTuple):
  """Probes, products and an orthonormal basis of the sketch, all as rows.

  Attributes:
    num_probes: ``s``, the number of probes (the sketch costs ``2s`` products).
    omega: ``(s, n)`` Rademacher probes ``Ω``.
    y: ``(s, n)`` products ``HΩ``.
    q: ``(s, n)`` orthonormal basis ``Q`` of ``HΩ`` (``Y = QR``).
    r: ``(s, s)`` the triangular factor ``R``.
    z: ``(s, n)`` products ``HQ``.
    low_rank: Whether ``R`` is numerically singular: ``H`` has rank below
      ``s`` and ``QQᵀH = H`` exactly.
  """

  num_probes: int
  omega: jax.Array
  y: jax.Array
  q: jax.Array
  r: jax.Array
  z: jax.Array
  low_rank: bool


def exchangeable_sketch(op: HessianOperator, key: jax.Array, num_matvecs: int) -> Sketch:
  """Probes ``Ω`` (``s = num_matvecs // 2`` of them, at most ``n``), ``Y = HΩ = QR`` and ``Z = HQ``.

  Raises:
    ValueError: if ``num_matvecs`` is not an integer >= 4.
    NonFiniteError: if a product is not finite.
  """
  num_matvecs = _checks.count("num_matvecs", num_matvecs, 4)
  s = int(min(num_matvecs // 2, op.size))
  omega = op.rademacher(key, s)
  y = op.matmat(omega)
  _checks.finite(y, "the Hessian-vector product of a sketch probe")
  qt, r = jnp.linalg.qr(y.T)
  q = qt.T
  z = op.matmat(q)
  _checks.finite(z, "the Hessian-vector product of a sketch basis vector")
  diag = np.abs(np.diag(np.asarray(r)))
  low_rank = bool(diag.min() <= 1e3 * np.finfo(diag.dtype).eps * s * diag.max())
  return Sketch(s, omega, y, q, r, z, low_rank)


def leave_one_out_directions(r: jax.Array) -> jax.Array:
  """Unit columns ``s_i`` with ``q_i = Q s_i`` the direction removed with probe ``i``.

  The sketch without probe ``i`` spans ``Q`` minus the direction ``Q s_i``
  orthogonal to every other column of ``Y = QR``: ``s_i ∝`` column ``i`` of ``R⁻ᵀ``.
  """
  s = jnp.linalg.inv(r).T
  return s / jnp.linalg.norm(s, axis=0, keepdims=True)


def exchangeable_estimate(
  op: HessianOperator,
  key: jax.Array,
  num_matvecs: int,
  exact: Callable[[jax.Array, jax.Array], jax.Array],
  leave_one_out: Callable[..., jax.Array],
) -> tuple[Any, Any, int]:
  """The mean of the leave-one-out estimates of a sketch and their standard error.

  Args:
    op: The operator.
    key: PRNG key of the probes.
    num_matvecs: Product budget (see :func:`exchangeable_sketch`).
    exact: ``(q, z) -> value`` from ``Q`` and ``HQ`` alone, used when the
      sketch captures all of ``H`` (``low_rank``); its error is zero.
    leave_one_out: ``(omega, y, z, q, r) -> (s, ...)`` the ``s`` estimates.

  Returns:
    ``(mean, stderr, s)``: the estimate, the standard deviation of the
    estimates over ``√s`` (the XTrace papers' heuristic error) and the number
    of probes (the estimate cost ``2s`` products).
  """
  sk = exchangeable_sketch(op, key, num_matvecs)
  if sk.low_rank:  # rank(H) < s: H = QQᵀH exactly
    value = exact(sk.q, sk.z)
    return value, jnp.zeros_like(value), sk.num_probes
  ests = leave_one_out(sk.omega, sk.y, sk.z, sk.q, sk.r)
  return ests.mean(0), ests.std(0, ddof=1) / np.sqrt(sk.num_probes), sk.num_probes
