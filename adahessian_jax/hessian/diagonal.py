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

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from adahessian_jax import _validation
from adahessian_jax.hessian import _checks
from adahessian_jax.hessian._layout import unravel_rows
from adahessian_jax.hessian._operator import HessianOperator
from adahessian_jax.hessian._rows import key_blocks, scale_rows
from adahessian_jax.hessian._sketch import (
  exchangeable_estimate,
  leave_one_out_directions,
  leave_one_out_projectors,
  scale_of,
  wide_dtype,
)
from adahessian_jax.hessian.trace import t_factor

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


def hutchinson_samples(op: HessianOperator, keys: jax.Array) -> jax.Array:
  """Single-probe diagonal estimates ``z_i ⊙ H z_i``, one row per key, shape ``(b, n)``.

  ``z_i = op.probes(keys)[i]``; for an operator from
  :func:`~adahessian_jax.hessian.hessian_operator` that is the probe
  :func:`adahessian_jax.hutchinson.hutchinson_diagonal` draws for that key, so
  the rows are the optimizer's one-probe estimates of the full-data diagonal.

  Args:
    op: The operator.
    keys: PRNG keys, one per sample.

  Returns:
    A ``(len(keys), n)`` array, row ``i`` the estimate ``z_i ⊙ H z_i``.

  Raises:
    NonFiniteError: if a sample is not finite.
  """
  z = op.probes(keys)
  x = scale_rows(z, op.matmat(z))
  _checks.finite(x, "the Hutchinson diagonal sample z ⊙ Hz", op)
  return x


def unravel_wide(op: HessianOperator, v: jax.Array) -> Any:
  """``op.unravel(v)``, except that every leaf keeps ``v``'s dtype.

  (``op.unravel`` casts to the params' dtypes, which would round a float32
  estimate of a bfloat16 model back to bfloat16, and, in a model that mixes
  dtypes, the float32 estimate of its bfloat16 leaves.) One compiled program per layout.
  """
  return unravel_rows(op.layout, v, op.dtype, wide=True)


def _result(op, mean, se, matvecs):
  return DiagonalEstimate(unravel_wide(op, mean), unravel_wide(op, se), mean, se, int(matvecs))


@jax.jit
def _block_moments(x, shift, scale):
  """The mean and summed squared deviations of the rows of ``x / scale − shift``.

  In :func:`wide_dtype` (``shift``'s). Equal rows give deviations of exactly zero.
  """
  d = x.astype(shift.dtype) / scale - shift
  mean = jnp.mean(d, axis=0)
  return mean, jnp.sum((d - mean) ** 2, axis=0)


@jax.jit
def _first_moments(x, scale):
  """``shift``, the first row of ``x / scale`` in :func:`wide_dtype`, and :func:`_block_moments`
  from it: the first block's in one program."""
  x = x.astype(wide_dtype(x.dtype))
  shift = x[0] / scale
  return (shift, *_block_moments(x, shift, scale))


@jax.jit
def _merge_moments(mean_a, m2_a, count_a, mean_b, m2_b, count_b):
  """Mean and summed squared deviations of two sample sets from theirs (Chan et al., 1979).

  The counts are floats (traced: one compilation serves every block).
  """
  count = count_a + count_b
  delta = mean_b - mean_a
  return mean_a + delta * (count_b / count), m2_a + m2_b + delta**2 * (count_a * count_b / count)


@jax.jit
def _mean_and_stderr(shift, mean_dev, m2, scale, num_samples, factor):
  """The mean ``(shift + mean_dev) · scale`` and the standard error
  ``√(m2 / (num_samples − 1) / num_samples) · factor`` (the counts and scales traced)."""
  var = m2 / (num_samples - 1)
  return (shift + mean_dev) * scale, jnp.sqrt(var / num_samples) * factor


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
    error (the entry's variance is ``Σ_{j≠i} H_ij²`` per probe) times the Student-t factor of
    :func:`~adahessian_jax.hessian.hutchinson_trace`, so that ``diagonal ± 1.96·stderr`` is a
    95 % interval per entry (the plain ``s/√m`` covered 70 % of the entries at 2 samples, 86 %
    at 4, 92 % at 10). The samples
    are in the operator's dtype; their mean and squared deviations (from the
    first sample, merged block by block, so equal samples give exactly that
    sample and a zero error; divided by a power of two near the largest first-block sample, so
    that the squares of float32 samples of 1e20 or 1e-20 neither overflow nor underflow) are in
    ``_sketch.wide_dtype``: float32 for
    float16 and bfloat16 operators, whose results are float32. Every leaf
    of the pytrees has the flat arrays' dtype (a bfloat16 leaf of a model
    that mixes dtypes is not rounded to bfloat16).

  Raises:
    ValueError: for a count that is not an integer in range, a ``key`` that is not one PRNG key (an
      int seed, a batch of keys), or a call inside ``jax.jit``.
    NonFiniteError: at the first non-finite sample (e.g. a NaN loss).
  """
  num_samples = _validation.count("num_samples", num_samples, 2)
  block_size = _validation.count("block_size", op.block_size if block_size is None else block_size)
  shift = mean_dev = m2 = None
  count, scale = 0, 1.0
  key = _checks.prng_key(key)
  for keys in key_blocks(key, num_samples, block_size):
    x = hutchinson_samples(op, keys)
    if shift is None:
      # The Hessian's scale out of the squared deviations: float32 samples of 1e20 gave an
      # infinite stderr, of 1e-20 a zero one (exact, it said).
      scale = scale_of(x)
      shift, mean_dev, m2 = _first_moments(x, scale)
    else:
      block_mean, block_m2 = _block_moments(x, shift, scale)
      mean_dev, m2 = _merge_moments(
        mean_dev, m2, float(count), block_mean, block_m2, float(x.shape[0])
      )
    count += x.shape[0]
  assert shift is not None and mean_dev is not None and m2 is not None  # at least one block
  # The mean as the first sample plus the mean deviation from it: equal samples give exactly
  # that sample (a float32 sum of 1000 equal samples over the count was off by 1e-6). Python
  # floats: they keep the dtype.
  mean, se = _mean_and_stderr(
    shift, mean_dev, m2, scale, num_samples, t_factor(num_samples) * scale
  )
  return _result(op, mean, se, num_samples)


@functools.partial(jax.jit, static_argnames="degenerate")
def _xdiag_estimates(omega, y, z, q, r, degenerate):
  """The ``(s, n)`` leave-one-out XDiag estimates (rows: Ω, Y = HΩ, Z = HQ, Q).

  ``degenerate``: ``P_i`` from :func:`leave_one_out_projectors`, for a singular ``R``.
  """
  omega, y, q, z = omega.T, y.T, q.T, z.T
  if degenerate:  # P_i = Q M_i Qᵀ: diag(P_i H), then ω_i ⊙ (I − P_i) y_i
    m = leave_one_out_projectors(r)
    low_rank = jnp.einsum("ka,iab,kb->ik", q, m, z)
    a = jnp.einsum("ijk,ki->ji", m, q.T @ y)  # M_i Qᵀy_i as columns
    return low_rank + (omega * (y - q @ a)).T
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
    num_matvecs: Product budget (at least 4; an odd one spends one less), as for XTrace.

  Returns:
    A :class:`DiagonalEstimate`, exact with a zero error when
    ``num_matvecs >= n`` (the diagonal of the ``n`` products ``H e_j``, with
    ``num_matvecs = n``) or when ``H`` has rank below ``num_matvecs // 2`` (to the rounding
    of the products, as for :func:`~adahessian_jax.hessian.xtrace`, and for every column of
    ``H`` to the rounding of its own entries: entries far below the others, e.g. a layer with
    1e-8 of the top curvature in float32, get the leave-one-out estimates and their errors).
    Probes, degenerate sketches and 16-bit dtypes are handled as in
    :func:`~adahessian_jax.hessian.xtrace`.

  Raises:
    ValueError: for a bad budget, a ``key`` that is not one PRNG key (an int seed, a batch of keys),
      or a call inside ``jax.jit``.
    NonFiniteError: for a non-finite product.
  """
  mean, se, spent, _ = exchangeable_estimate(
    op, key, num_matvecs, lambda q, z: jnp.sum(q * z, axis=0), _xdiag_estimates, per_entry=True
  )
  return _result(op, mean, se, spent)
