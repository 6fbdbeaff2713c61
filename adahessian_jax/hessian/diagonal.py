"""Stochastic estimates of the Hessian diagonal.

* :func:`hutchinson_diagonal_estimate`: the optimizer's estimator
  (``z ⊙ Hz`` with Rademacher ``z``, the probes of
  :func:`adahessian_jax.hutchinson.hutchinson_diagonal`), averaged over probes,
  with a per-entry standard error.
* :func:`xdiag`: XDiag, the exchangeable low-rank-plus-Hutchinson estimator of
  the diagonal, far more accurate when the Hessian has a few dominant
  eigenvalues (as network Hessians do).

References:
  Bekas, Kokiopoulou, Saad, `An estimator for the diagonal of a matrix
  <https://doi.org/10.1016/j.apnum.2007.01.003>`_, 2007.

  Epperly, Tropp, Webber, `XTrace: Making the most of every sample in
  stochastic trace estimation <https://arxiv.org/abs/2301.07825>`_, SIMAX 2024
  (§5, XDiag).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from adahessian_jax.hessian import _checks
from adahessian_jax.hessian._operator import HessianOperator, key_blocks
from adahessian_jax.hessian._sketch import exchangeable_estimate, leave_one_out_directions

__all__ = ["DiagonalEstimate", "hutchinson_diagonal_estimate", "hutchinson_samples", "xdiag"]


class DiagonalEstimate(NamedTuple):
  """An estimate of ``diag(H)``.

  Attributes:
    diagonal: The estimate, a pytree like the params.
    stderr: Per-entry standard error, a pytree like the params.
    diagonal_flat: ``(n,)`` flat estimate.
    stderr_flat: ``(n,)`` flat standard error.
    num_matvecs: Hessian-vector products spent.
  """

  diagonal: Any
  stderr: Any
  diagonal_flat: jax.Array
  stderr_flat: jax.Array
  num_matvecs: int


@jax.jit
def _probe_products(z, hz):
  return z * hz


def hutchinson_samples(op: HessianOperator, keys: jax.Array) -> jax.Array:
  """Single-probe diagonal estimates ``z_i ⊙ H z_i``, one row per key, shape ``(b, n)``.

  ``z_i = op.probes(keys)[i]``; for an operator from
  :func:`~adahessian_jax.hessian.hessian_operator` that is the probe
  :func:`adahessian_jax.hutchinson.hutchinson_diagonal` draws for that key, so
  the rows are the optimizer's one-probe estimates of the full-data diagonal.

  Raises:
    NonFiniteError: if a sample is not finite.
  """
  z = op.probes(keys)
  x = _probe_products(z, op.matmat(z))
  _checks.finite(x, "the Hutchinson diagonal sample z ⊙ Hz")
  return x


def _result(op, mean, se, matvecs):
  return DiagonalEstimate(op.unravel(mean), op.unravel(se), mean, se, int(matvecs))


def hutchinson_diagonal_estimate(
  op: HessianOperator, key: jax.Array, num_samples: int = 100, block_size: int | None = None
) -> DiagonalEstimate:
  """Hutchinson's diagonal estimate (the optimizer's estimator) with standard errors.

  Args:
    op: The Hessian operator.
    key: PRNG key; sample ``i`` uses ``jax.random.split(key, num_samples)[i]``,
      so the mean equals ``hutchinson_diagonal(fn, params, key, num_samples)``
      for an operator from :func:`~adahessian_jax.hessian.hessian_operator`.
    num_samples: Number of probes (at least 2, for the standard error).
    block_size: Probes per vectorised call (default ``op.block_size``).

  Returns:
    A :class:`DiagonalEstimate`; ``stderr`` is the per-entry sample standard
    error (the entry's variance is ``Σ_{j≠i} H_ij²`` per probe).

  Raises:
    ValueError: for a count that is not an integer in range.
    NonFiniteError: at the first non-finite sample (e.g. a NaN loss).
  """
  num_samples = _checks.count("num_samples", num_samples, 2)
  block_size = _checks.count("block_size", op.block_size if block_size is None else block_size)
  total = jnp.zeros(op.size, op.dtype)
  total_sq = jnp.zeros(op.size, op.dtype)
  for keys in key_blocks(key, num_samples, block_size):
    x = hutchinson_samples(op, keys)
    total, total_sq = total + x.sum(0), total_sq + (x * x).sum(0)
  mean = total / num_samples
  var = jnp.maximum(total_sq / num_samples - mean * mean, 0.0) * num_samples / (num_samples - 1)
  return _result(op, mean, jnp.sqrt(var / num_samples), num_samples)


@jax.jit
def _xdiag_estimates(omega, y, z, q, r):
  """The ``(s, n)`` leave-one-out XDiag estimates (rows: Ω, Y = HΩ, Z = HQ, Q)."""
  omega, y, q, z = omega.T, y.T, q.T, z.T
  s = leave_one_out_directions(r)
  qs, zs = q @ s, z @ s  # q_i = Q s_i and H q_i, as columns
  # diag(P_i H) with P_i = QQᵀ − q_i q_iᵀ, then ω_i ⊙ (I − P_i) H ω_i, where
  # (I − P_i) y_i = (y_i − QQᵀy_i) + q_i (q_iᵀ y_i).
  low_rank = jnp.sum(q * z, axis=1)[:, None] - qs * zs
  resid = y - q @ (q.T @ y) + qs * jnp.sum(qs * y, axis=0)
  return (low_rank + omega * resid).T


def xdiag(op: HessianOperator, key: jax.Array, num_matvecs: int = 32) -> DiagonalEstimate:
  """XDiag: exchangeable low-rank-plus-Hutchinson diagonal estimate.

  With ``s = num_matvecs // 2`` Rademacher probes ``Ω``, ``Y = HΩ = QR`` and
  ``Z = HQ``, estimate ``i`` is ``diag(P_i H) + ω_i ⊙ (I − P_i) H ω_i`` where
  ``P_i`` projects on the sketch of every probe but ``i``; the result is their
  mean, exact on the sketched subspace. The error is their standard deviation
  over ``√s`` (a heuristic, as for :func:`~adahessian_jax.hessian.xtrace`).

  Args:
    op: The Hessian operator.
    key: PRNG key of the probes.
    num_matvecs: Product budget (even; at least 4), as for XTrace.

  Returns:
    A :class:`DiagonalEstimate` (exact with a zero error when ``H`` has rank
    below ``num_matvecs // 2``).

  Raises:
    ValueError: for a bad budget; NonFiniteError: for a non-finite product.
  """
  mean, se, s = exchangeable_estimate(
    op, key, num_matvecs, lambda q, z: jnp.sum(q * z, axis=0), _xdiag_estimates
  )
  return _result(op, mean, se, 2 * s)
