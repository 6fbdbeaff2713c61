"""The Hessian's eigenvalue spectral density by stochastic Lanczos quadrature.

For a unit probe ``v``, ``m`` Lanczos steps give a tridiagonal ``T`` whose
eigenvalues ``θ_j`` (nodes) and squared first eigenvector components ``τ_j``
(weights, summing to 1) form the Gauss quadrature of the measure
``Σ_i (vᵀu_i)² δ(t − λ_i)``: ``vᵀf(H)v ≈ Σ_j τ_j f(θ_j)``, exact for
polynomials of degree below ``2m``. With ``v = z/√n`` for Rademacher ``z``, the
expectation of that measure is the spectral density ``(1/n) Σ_i δ(t − λ_i)``;
averaging over probes and replacing each node by a Gaussian of width ``σ``
gives a smooth density that integrates to 1 and whose first two moments are
``tr(H)/n`` and ``tr(H²)/n + σ²`` in expectation.

References:
  Golub, Meurant, *Matrices, Moments and Quadrature with Applications*,
  Princeton, 2010.

  Lin, Saad, Yang, `Approximating spectral densities of large matrices
  <https://arxiv.org/abs/1308.5467>`_, SIAM Review 2016.

  Ghorbani, Krishnan, Xiao, `An Investigation into Neural Net Optimization via
  Hessian Eigenvalue Density <https://arxiv.org/abs/1901.10159>`_, ICML 2019.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import numpy as np

from adahessian_jax import _validation
from adahessian_jax.hessian import _checks
from adahessian_jax.hessian._lanczos import lanczos, tridiagonal_eigh
from adahessian_jax.hessian._operator import HessianOperator

__all__ = ["SpectralDensity", "spectral_density"]


class SpectralDensity(NamedTuple):
  """A smoothed eigenvalue density and the quadrature it is built from.

  Attributes:
    grid: ``(g,)`` eigenvalue grid.
    density: ``(g,)`` density on the grid (integrates to 1 over the real line).
    nodes: ``(p, m)`` Ritz values per probe.
    weights: ``(p, m)`` quadrature weights per probe (each row sums to 1).
    sigma: Width of the Gaussian smoothing.
    num_matvecs: Hessian-vector products spent (``p · m``).
  """

  grid: np.ndarray
  density: np.ndarray
  nodes: np.ndarray
  weights: np.ndarray
  sigma: float
  num_matvecs: int

  def moment(self, order: int) -> float:
    """A moment of the density: the quadrature estimate of ``tr(H^order)/n``.

    Args:
      order: The power, ``>= 0`` (0 gives the total weight, 1 the mean eigenvalue).

    Returns:
      ``(1/p) Σ_probes Σ_j τ_j θ_j^order`` over the ``p`` probes' nodes ``θ_j`` and weights
      ``τ_j``.
    """
    return float(np.mean(np.sum(self.weights * self.nodes**order, axis=1)))


def gaussian_mixture(
  grid: np.ndarray, nodes: np.ndarray, weights: np.ndarray, sigma: float
) -> np.ndarray:
  """``Σ w_j N(t; θ_j, σ²)`` on ``grid``, averaged over the rows of ``nodes``/``weights``."""
  nodes, weights = np.ravel(nodes), np.ravel(weights) / np.shape(np.atleast_2d(weights))[0]
  z = (np.asarray(grid)[:, None] - nodes[None, :]) / sigma
  return np.exp(-0.5 * z * z) @ weights / (sigma * np.sqrt(2.0 * np.pi))


# The default grid spans the nodes' spread (100σ for the default σ) plus 6σ on each side: 112
# steps of σ.
_DEFAULT_SIGMA_POINTS = 113


def spectral_density(
  op: HessianOperator,
  key: jax.Array,
  *,
  num_probes: int = 8,
  num_steps: int = 80,
  sigma: float | None = None,
  grid: jax.typing.ArrayLike | Sequence[float] | None = None,
  num_points: int = 1000,
) -> SpectralDensity:
  """Stochastic Lanczos quadrature estimate of the eigenvalue density.

  The ``num_probes`` Lanczos runs (with full reorthogonalisation) advance
  together, one block product per step.

  Args:
    op: The Hessian operator.
    key: PRNG key of the Rademacher probes.
    num_probes: Number of probes ``p``.
    num_steps: Lanczos steps per probe ``m`` (clipped to ``n``); memory is
      ``p·(m+1)·n`` values.
    sigma: Gaussian width; by default 1% of the spread of the nodes.
    grid: Evaluation points, a 1-D sequence of finite numbers; by default
      ``num_points`` points spanning the nodes plus ``6σ`` on each side (so
      the density integrates to 1 on it; a step wider than ``σ`` is refused).
    num_points: Size of the default grid.

  Returns:
    A :class:`SpectralDensity`.

  Raises:
    ValueError: for a count or width out of range, a grid that is not a 1-D sequence of finite
      numbers, a ``key`` that is not one PRNG key (an int seed, a batch of keys) or a call inside
      ``jax.jit`` (all checked before any product is spent), or a default grid whose step is
      wider than ``σ`` (known before any product is spent for the default ``σ``, which needs
      ``num_points >= 113``; otherwise once the nodes are).
    NonFiniteError: at the first non-finite product (e.g. a NaN loss).
  """
  grid = None if grid is None else _checks.finite_1d("grid", grid, "give at least one point")
  num_probes = _validation.count("num_probes", num_probes)
  num_steps = _validation.count("num_steps", num_steps)
  num_points = _validation.count("num_points", num_points, 2)
  if sigma is not None:
    sigma = _validation.positive("sigma", sigma)
  elif grid is None and num_points < _DEFAULT_SIGMA_POINTS:
    raise ValueError(
      f"num_points={num_points} is too few for the default grid with the default sigma (1% of "
      "the nodes' spread): its step would be wider than sigma, and the density would not integrate "
      f"to 1 on it. Pass num_points >= {_DEFAULT_SIGMA_POINTS}, a sigma, or a grid."
    )
  key = _checks.prng_key(key)
  dec = lanczos(op, op.rademacher(key, num_probes), num_steps)
  nodes, weights = [], []
  for a, b in zip(dec.alphas, dec.betas, strict=True):
    theta, s = tridiagonal_eigh(a, b)
    nodes.append(theta)
    weights.append(s[0] ** 2)
  nodes, weights = np.stack(nodes), np.stack(weights)
  live = nodes[weights > 1e-14]
  lo, hi = float(live.min()), float(live.max())
  if sigma is None:
    sigma = 0.01 * (hi - lo) if hi > lo else max(abs(hi), 1.0) * 1e-3
  if grid is None:
    grid = np.linspace(lo - 6 * sigma, hi + 6 * sigma, num_points)
    # Wider steps than σ step over the Gaussians' peaks: the density no longer integrates to 1
    # (0.69 at 4σ, 7e-8 at 40σ); at σ its trapezoid integral is within 1e-8 of 1.
    step = float(grid[1] - grid[0])
    if step > sigma * (1 + 1e-9):
      need = math.ceil((hi - lo + 12 * sigma) / sigma * (1 - 1e-9)) + 1
      raise ValueError(
        f"the default grid's step {step:.3g} ((max − min node + 12σ)/(num_points − 1), "
        f"num_points={num_points}) is wider than sigma={sigma:.3g}: the density would not "
        f"integrate to 1 on it. Pass num_points >= {need}, a larger sigma, or a grid."
      )
  density = gaussian_mixture(grid, nodes, weights, sigma)
  return SpectralDensity(grid, density, nodes, weights, float(sigma), num_probes * dec.num_steps)
