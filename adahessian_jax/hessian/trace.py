"""Stochastic estimates of the Hessian trace, each with a standard error.

* :func:`hutchinson_trace`: the mean of ``zᵀHz`` over Rademacher probes ``z``,
  with its standard error and a stopping rule on it (stop when the standard
  error falls below a relative or absolute tolerance). Variance per probe
  ``2(‖H‖²_F − Σ H_ii²)``: the error falls like ``1/√m`` in the number of
  products ``m``.
* :func:`hutchpp_trace`: Hutch++: the exact trace of ``H`` on a sketched
  dominant subspace plus Hutchinson on the deflated remainder, whose variance
  no longer contains the top eigenvalues. Error ``O(1/m)`` for matrices with a
  decaying spectrum; the remainder is sampled with the same stopping rule.
* :func:`xtrace`: XTrace, the exchangeable version of Hutch++ that uses every
  product both for the sketch and for the residual; its error estimate is the
  spread of its ``m/2`` leave-one-out estimates.

References:
  Hutchinson, `A stochastic estimator of the trace of the influence matrix for
  Laplacian smoothing splines <https://doi.org/10.1080/03610918908812806>`_, 1989.

  Meyer, Musco, Musco, Woodruff, `Hutch++: Optimal Stochastic Trace Estimation
  <https://arxiv.org/abs/2010.09649>`_, SOSA 2021.

  Epperly, Tropp, Webber, `XTrace: Making the most of every sample in
  stochastic trace estimation <https://arxiv.org/abs/2301.07825>`_, SIMAX 2024.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from adahessian_jax.hessian._operator import HessianOperator, key_blocks

__all__ = ["TraceEstimate", "hutchinson_trace", "hutchpp_trace", "xtrace"]


class TraceEstimate(NamedTuple):
  """An estimate of ``tr(H)``.

  Attributes:
    trace: The estimate.
    stderr: Its standard error (see each estimator for what it covers).
    num_matvecs: Hessian-vector products spent.
    num_samples: Hutchinson samples averaged (the residual ones for Hutch++,
      the leave-one-out estimates for XTrace).
  """

  trace: float
  stderr: float
  num_matvecs: int
  num_samples: int


@jax.jit
def _quadratic_forms(z, hz):
  return jnp.sum(z * hz, axis=-1)


def _sample_until(sample_block, keys, *, rtol, atol, min_samples, block_size, offset=0.0):
  """Draws blocks of samples until the standard error meets the tolerance.

  The relative tolerance is relative to ``|offset + mean|``.

  ``keys`` is a list of key blocks (see ``key_blocks``). Returns the ``(m,)``
  samples drawn.
  """
  samples, m = [], 0
  for block in keys:
    samples.append(np.asarray(sample_block(block)))
    m += block.shape[0]
    if m >= max(min_samples, 2):
      x = np.concatenate(samples)
      se = x.std(ddof=1) / np.sqrt(m)
      if se <= max(atol, rtol * abs(offset + x.mean())):
        break
  return np.concatenate(samples)


def _validate(op, min_samples, max_samples, block_size):
  block_size = op.block_size if block_size is None else block_size
  if not 1 <= min_samples <= max_samples:
    raise ValueError(f"need 1 <= min_samples <= max_samples, got {min_samples}, {max_samples}")
  if block_size < 1:
    raise ValueError(f"block_size must be >= 1, got {block_size}")
  return block_size


def hutchinson_trace(
  op: HessianOperator,
  key: jax.Array,
  *,
  rtol: float = 1e-2,
  atol: float = 0.0,
  min_samples: int = 10,
  max_samples: int = 1000,
  block_size: int | None = None,
) -> TraceEstimate:
  """Hutchinson's trace estimate with a standard error and a stopping rule.

  Probes are drawn ``block_size`` at a time (one vectorised block product);
  after at least ``min_samples`` it stops as soon as the standard error
  ``s/√m`` (``s`` the sample standard deviation of ``zᵀHz``) is at most
  ``max(atol, rtol·|estimate|)``, or at ``max_samples``. Set
  ``min_samples = max_samples`` for a fixed budget.

  Args:
    op: The Hessian operator.
    key: PRNG key; probe ``i`` is drawn from ``jax.random.split(key,
      max_samples)[i]`` (the probe of :func:`~adahessian_jax.hutchinson_diagonal`
      for that key).
    rtol: Relative standard-error target.
    atol: Absolute standard-error target.
    min_samples: Samples before the rule is checked.
    max_samples: Sample budget.
    block_size: Probes per block product (default ``op.block_size``).

  Returns:
    A :class:`TraceEstimate`; ``stderr`` is the sample standard error.
  """
  block_size = _validate(op, min_samples, max_samples, block_size)
  keys = key_blocks(key, max_samples, block_size)

  def block(ks):
    z = op.probes(ks)
    return _quadratic_forms(z, op.matmat(z))

  x = _sample_until(
    block, keys, rtol=rtol, atol=atol, min_samples=min_samples, block_size=block_size
  )
  m = x.shape[0]
  return TraceEstimate(float(x.mean()), float(x.std(ddof=1) / np.sqrt(m)), m, m)


@jax.jit
def _orthonormal_rows(y):
  q, _ = jnp.linalg.qr(y.T)
  return q.T


@jax.jit
def _deflate(q, z):
  return z - (z @ q.T) @ q


def hutchpp_trace(
  op: HessianOperator,
  key: jax.Array,
  *,
  sketch_size: int = 16,
  rtol: float = 1e-2,
  atol: float = 0.0,
  min_samples: int = 10,
  max_samples: int = 1000,
  block_size: int | None = None,
) -> TraceEstimate:
  """Hutch++: exact trace on a sketched subspace plus Hutchinson on the rest.

  With ``Q`` an orthonormal basis of ``H S`` (``S`` ``sketch_size`` Rademacher
  probes), ``tr(H) = tr(QᵀHQ) + tr((I−QQᵀ) H (I−QQᵀ))``; the first term is
  computed exactly (``sketch_size`` products), the second by Hutchinson with
  deflated probes ``(I−QQᵀ)z`` and the stopping rule of
  :func:`hutchinson_trace`. The classic fixed-budget Hutch++ with ``m``
  products is ``sketch_size = min_samples = max_samples = m/3``.

  Args:
    op: The Hessian operator.
    key: PRNG key (split into a sketch key and a residual-probe key).
    sketch_size: Columns of the sketch ``S`` (costs ``2·sketch_size`` products).
    rtol: Relative standard-error target of the whole estimate.
    atol: Absolute standard-error target.
    min_samples: Residual samples before the rule is checked.
    max_samples: Residual sample budget.
    block_size: Probes per block product (default ``op.block_size``).

  Returns:
    A :class:`TraceEstimate`; ``stderr`` is the sample standard error of the
    residual term (the sketched term is exact given the sketch), so it is
    calibrated conditionally on the sketch.
  """
  block_size = _validate(op, min_samples, max_samples, block_size)
  k_sketch, k_res = jax.random.split(key)
  s = int(min(sketch_size, op.size))
  if s > 0:
    q = _orthonormal_rows(op.matmat(op.rademacher(k_sketch, s)))
    exact = float(jnp.sum(_quadratic_forms(q, op.matmat(q))))
  else:
    q, exact = jnp.zeros((0, op.size), op.dtype), 0.0
  keys = key_blocks(k_res, max_samples, block_size)

  def block(ks):
    z = _deflate(q, op.probes(ks))
    return _quadratic_forms(z, op.matmat(z))

  x = _sample_until(
    block,
    keys,
    rtol=rtol,
    atol=atol,
    min_samples=min_samples,
    block_size=block_size,
    offset=exact,
  )
  m = x.shape[0]
  return TraceEstimate(exact + float(x.mean()), float(x.std(ddof=1) / np.sqrt(m)), 2 * s + m, m)


@jax.jit
def _xtrace_estimates(omega, y, z, q, r):
  """The ``s`` leave-one-out XTrace estimates; rows of ``omega, y = HΩ, z = HQ, q``."""
  # Column layout: Ω, Y, Q, Z are (n, s).
  omega, y, q, z = omega.T, y.T, q.T, z.T
  h = q.T @ z  # QᵀHQ
  w = q.T @ omega  # Qᵀω_i as columns
  s = jnp.linalg.inv(r).T  # columns ∝ the direction q_i = Q s_i removed with y_i
  s = s / jnp.linalg.norm(s, axis=0, keepdims=True)
  c = jnp.sum(s * w, axis=0)  # s_iᵀ w_i
  # Leave-one-out projector P_i = QQᵀ − q_i q_iᵀ, q_i = Q s_i.
  low_rank = jnp.trace(h) - jnp.sum(s * (h @ s), axis=0)  # tr(P_i H)
  u = omega - q @ w + (q @ s) * c  # (I − P_i) ω_i
  hu = y - z @ w + (z @ s) * c  # H (I − P_i) ω_i
  return low_rank + jnp.sum(u * hu, axis=0)


class Sketch(NamedTuple):
  """The shared first stage of XTrace and XDiag (see :func:`exchangeable_sketch`)."""

  s: int
  omega: jax.Array
  y: jax.Array
  q: jax.Array
  r: jax.Array
  z: jax.Array
  low_rank: bool


def exchangeable_sketch(op: HessianOperator, key: jax.Array, num_matvecs: int) -> Sketch:
  """Probes ``Ω`` (``s = num_matvecs // 2`` of them), ``Y = HΩ = QR`` and ``Z = HQ``.

  ``low_rank`` is set when ``R`` is numerically singular: ``H`` has rank below
  ``s`` and ``QQᵀH = H`` exactly.
  """
  s = int(min(num_matvecs // 2, op.size))
  if s < 2:
    raise ValueError(f"num_matvecs must be at least 4, got {num_matvecs}")
  omega = op.rademacher(key, s)
  y = op.matmat(omega)
  qt, r = jnp.linalg.qr(y.T)
  q = qt.T
  z = op.matmat(q)
  diag = np.abs(np.diag(np.asarray(r)))
  low_rank = bool(diag.min() <= 1e3 * np.finfo(diag.dtype).eps * s * diag.max())
  return Sketch(s, omega, y, q, r, z, low_rank)


def xtrace(op: HessianOperator, key: jax.Array, num_matvecs: int = 32) -> TraceEstimate:
  """XTrace: exchangeable Hutch++ with a built-in error estimate.

  Draws ``s = num_matvecs // 2`` Rademacher probes ``Ω``, computes ``Y = HΩ``,
  ``Q R = Y`` and ``Z = HQ``; estimate ``i`` is Hutch++ with the sketch of every
  probe but ``i`` and the residual probe ``ω_i``, all in closed form from
  ``Ω, Y, Q, R, Z``. The result is their mean; the error estimate is their
  standard deviation over ``√s`` (the paper's estimate; the ``s`` estimates are
  exchangeable but not independent, so this is a heuristic).

  If ``H`` has rank below ``s`` the sketch captures it and the exact trace is
  returned with a zero error.

  Args:
    op: The Hessian operator.
    key: PRNG key of the probes.
    num_matvecs: Product budget (even; at least 4).

  Returns:
    A :class:`TraceEstimate`.
  """
  s, omega, y, q, r, z, low_rank = exchangeable_sketch(op, key, num_matvecs)
  if low_rank:
    exact = float(jnp.sum(_quadratic_forms(q, z)))
    return TraceEstimate(exact, 0.0, 2 * s, s)
  ests = np.asarray(_xtrace_estimates(omega, y, z, q, r))
  return TraceEstimate(float(ests.mean()), float(ests.std(ddof=1) / np.sqrt(s)), 2 * s, s)
