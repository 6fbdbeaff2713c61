"""Stochastic estimates of the Hessian diagonal.

* :func:`hutchinson_diag`: the optimizer's own estimator,
  :func:`adahessian_jax.hutchinson.hutchinson_diagonal` (``z ⊙ Hz`` with
  Rademacher ``z``), averaged over probes and batches, with a per-entry
  standard error.
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

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from adahessian_jax.hessian._operator import HessianOperator, _concat_rows, key_blocks
from adahessian_jax.hessian.trace import exchangeable_sketch
from adahessian_jax.hutchinson import value_grad_and_diagonal

__all__ = ["DiagonalEstimate", "hutchinson_diag", "xdiag"]


class DiagonalEstimate(NamedTuple):
  """An estimate of ``diag(H)``.

  Attributes:
    diagonal: The estimate, a pytree like the params.
    stderr: Per-entry standard error, a pytree like the params.
    diagonal_flat: ``(n,)`` flat estimate.
    stderr_flat: ``(n,)`` flat standard error.
    num_matvecs: Hessian-vector products spent (per batch).
  """

  diagonal: Any
  stderr: Any
  diagonal_flat: jax.Array
  stderr_flat: jax.Array
  num_matvecs: int


@functools.partial(jax.jit, static_argnums=0)
def _diag_samples(loss_fn, params, batch, keys):
  def one(k):
    # One probe, rademacher_like(k, params): the optimizer's estimator, exactly
    # as hutchinson_diagonal(..., key, n_samples) draws its probe for split key k.
    est = value_grad_and_diagonal(lambda p: loss_fn(p, batch), params, k[None])[2]
    return ravel_pytree(est)[0]

  return jax.vmap(one)(keys)


def hutchinson_samples(op: HessianOperator, keys: jax.Array) -> jax.Array:
  """Single-probe diagonal estimates ``z_i ⊙ H z_i``, one row per key, shape ``(b, n)``.

  Calls the optimizer's estimator
  (:func:`adahessian_jax.hutchinson.value_grad_and_diagonal`, the engine of
  :func:`~adahessian_jax.hutchinson.hutchinson_diagonal`) on every batch with
  the same key (hence the same probe ``rademacher_like(key, params)``) and
  weights the results, so each row is a one-probe estimate of the full-data
  diagonal.
  """
  if op.per_batch_loss is None:
    raise ValueError("diagonal estimates need an operator from hessian_operator(), not a block")
  # Blocks of op.block_size keys (the last padded): one compilation.
  num, size = keys.shape[0], op.block_size
  data = np.asarray(jax.random.key_data(keys))
  data = np.concatenate([data, np.repeat(data[:1], -num % size, axis=0)])
  rows = []
  for i in range(0, num, size):
    block = jax.random.wrap_key_data(data[i : i + size])
    out = None
    for w, batch in op.weighted_batches:
      part = w * _diag_samples(op.per_batch_loss, op.params, batch, block)
      out = part if out is None else out + part
    rows.append(out)
  return _concat_rows(rows, num)


def _result(op, mean, se, matvecs):
  return DiagonalEstimate(op.unravel(mean), op.unravel(se), mean, se, int(matvecs))


def hutchinson_diag(
  op: HessianOperator, key: jax.Array, num_samples: int = 100, block_size: int | None = None
) -> DiagonalEstimate:
  """Hutchinson's diagonal estimate (the optimizer's estimator) with standard errors.

  Args:
    op: The Hessian operator (not a block).
    key: PRNG key; sample ``i`` uses ``jax.random.split(key, num_samples)[i]``,
      so the mean equals ``hutchinson_diagonal(fn, params, key, num_samples)``.
    num_samples: Number of probes (at least 2, for the standard error).
    block_size: Probes per vectorised call (default ``op.block_size``).

  Returns:
    A :class:`DiagonalEstimate`; ``stderr`` is the per-entry sample standard
    error (the entry's variance is ``Σ_{j≠i} H_ij²`` per probe).
  """
  if num_samples < 2:
    raise ValueError(f"num_samples must be >= 2, got {num_samples}")
  block_size = op.block_size if block_size is None else block_size
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
  s = jnp.linalg.inv(r).T
  s = s / jnp.linalg.norm(s, axis=0, keepdims=True)
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
    num_matvecs: Product budget (even; at least 4).

  Returns:
    A :class:`DiagonalEstimate`.
  """
  s, omega, y, q, r, z, low_rank = exchangeable_sketch(op, key, num_matvecs)
  if low_rank:
    exact = jnp.sum(q * z, axis=0)  # rank(H) < s: H = QQᵀH exactly
    return _result(op, exact, jnp.zeros_like(exact), 2 * s)
  ests = _xdiag_estimates(omega, y, z, q, r)
  mean = ests.mean(0)
  se = ests.std(0, ddof=1) / np.sqrt(s)
  return _result(op, mean, se, 2 * s)
