"""The loss along one or two directions in parameter space.

``loss(θ + α d)`` (1-D) and ``loss(θ + α d₁ + β d₂)`` (2-D) over the data of a
:class:`~adahessian_jax.hessian.HessianOperator`, for given directions or, by
default, the Hessian's top eigenvectors (the directions of sharpest
curvature). The grid is evaluated by a jit-compiled ``lax.map`` over blocks of
points, once per batch.

References:
  Li, Xu, Taylor, Studer, Goldstein, `Visualizing the Loss Landscape of Neural
  Nets <https://arxiv.org/abs/1712.09913>`_, NeurIPS 2018.

  Yao, Gholami, Keutzer, Mahoney, `PyHessian: Neural Networks Through the Lens
  of the Hessian <https://arxiv.org/abs/1912.07145>`_, 2020.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from adahessian_jax.hessian._operator import HessianOperator
from adahessian_jax.hessian.eigen import top_eigenvalues

__all__ = ["Landscape1D", "Landscape2D", "loss_landscape_1d", "loss_landscape_2d"]


class Landscape1D(NamedTuple):
  """Loss along a line.

  Attributes:
    alphas: ``(g,)`` step sizes along the direction.
    losses: ``(g,)`` ``loss(θ + α d)``.
    direction: ``(n,)`` flat direction used (after normalisation).
  """

  alphas: np.ndarray
  losses: np.ndarray
  direction: jax.Array


class Landscape2D(NamedTuple):
  """Loss on a plane.

  Attributes:
    alphas: ``(g,)`` coordinates along the first direction.
    betas: ``(h,)`` coordinates along the second direction.
    losses: ``(g, h)`` ``loss(θ + α d₁ + β d₂)``.
    directions: ``(2, n)`` flat directions used (after normalisation).
  """

  alphas: np.ndarray
  betas: np.ndarray
  losses: np.ndarray
  directions: jax.Array


def _flat_direction(op: HessianOperator, d: Any, normalize: str | None) -> jax.Array:
  flat = d if isinstance(d, jax.Array | np.ndarray) and np.ndim(d) == 1 else op.ravel(d)
  flat = jnp.asarray(flat, op.dtype)
  if flat.shape != (op.size,):
    raise ValueError(f"a direction must have {op.size} entries, got shape {flat.shape}")
  if normalize is None:
    return flat
  if normalize == "unit":
    return flat / jnp.linalg.norm(flat)
  if normalize == "layer":
    p = op.ravel(op.params)
    out = flat
    for sl in op.leaf_slices:
      scale = jnp.linalg.norm(p[sl]) / jnp.linalg.norm(flat[sl])
      out = out.at[sl].multiply(jnp.where(jnp.isfinite(scale), scale, 0.0))
    return out
  raise ValueError(f"normalize must be None, 'unit' or 'layer', got {normalize!r}")


@functools.partial(jax.jit, static_argnums=(0, 1, 6))
def _grid_losses(loss_fn, unravel, flat, directions, coeffs, batch, chunk):
  def one(c):
    return loss_fn(unravel(flat + c @ directions), batch)

  return jax.lax.map(one, coeffs, batch_size=chunk)


def _losses(op: HessianOperator, directions: jax.Array, coeffs: np.ndarray, chunk: int):
  if op.per_batch_loss is None:
    raise ValueError("a landscape needs an operator from hessian_operator(), not a block")
  flat = op.ravel(op.params)
  coeffs = jnp.asarray(coeffs, op.dtype)
  chunk = int(min(chunk, coeffs.shape[0]))
  out = 0.0
  for w, batch in op.weighted_batches:
    out = out + w * _grid_losses(
      op.per_batch_loss, op.unravel, flat, directions, coeffs, batch, chunk
    )
  return np.asarray(out)


def _directions(op, directions, k, key, normalize):
  if directions is None:
    eig = top_eigenvalues(op, k, key=key)
    return eig.eigenvectors_flat
  return jnp.stack([_flat_direction(op, d, normalize) for d in directions])


def loss_landscape_1d(
  op: HessianOperator,
  alphas: Sequence[float] | np.ndarray,
  direction: Any = None,
  *,
  normalize: str | None = None,
  key: jax.Array | None = None,
  chunk: int = 16,
) -> Landscape1D:
  """``loss(θ + α d)`` for every ``α`` in ``alphas``.

  Args:
    op: The Hessian operator (its params ``θ`` and data define the loss).
    alphas: Step sizes.
    direction: A pytree like the params or a flat ``(n,)`` array; by default
      the top Hessian eigenvector (unit norm, so ``α`` is a Euclidean distance).
    normalize: For a given direction: ``None`` (as given), ``"unit"`` (unit
      norm) or ``"layer"`` (each leaf rescaled to the norm of that leaf of θ).
    key: PRNG key of the eigenvector computation.
    chunk: Grid points evaluated together (``lax.map`` batch size).

  Returns:
    A :class:`Landscape1D`.
  """
  alphas = np.asarray(alphas, dtype=np.float64)
  dirs = _directions(op, None if direction is None else [direction], 1, key, normalize)
  losses = _losses(op, dirs, alphas[:, None], chunk)
  return Landscape1D(alphas, losses, dirs[0])


def loss_landscape_2d(
  op: HessianOperator,
  alphas: Sequence[float] | np.ndarray,
  betas: Sequence[float] | np.ndarray,
  directions: tuple[Any, Any] | None = None,
  *,
  normalize: str | None = None,
  key: jax.Array | None = None,
  chunk: int = 16,
) -> Landscape2D:
  """``loss(θ + α d₁ + β d₂)`` on the grid ``alphas × betas``.

  Args:
    op: The Hessian operator.
    alphas: Coordinates along ``d₁``.
    betas: Coordinates along ``d₂``.
    directions: Two directions (pytrees or flat arrays); by default the top
      two Hessian eigenvectors (orthonormal).
    normalize: As in :func:`loss_landscape_1d`.
    key: PRNG key of the eigenvector computation.
    chunk: Grid points evaluated together.

  Returns:
    A :class:`Landscape2D` with ``losses[i, j]`` at ``(alphas[i], betas[j])``.
  """
  alphas = np.asarray(alphas, dtype=np.float64)
  betas = np.asarray(betas, dtype=np.float64)
  if directions is not None and len(directions) != 2:
    raise ValueError("directions must be a pair")
  dirs = _directions(op, directions, 2, key, normalize)
  aa, bb = np.meshgrid(alphas, betas, indexing="ij")
  coeffs = np.stack([aa.ravel(), bb.ravel()], axis=1)
  losses = _losses(op, dirs, coeffs, chunk).reshape(aa.shape)
  return Landscape2D(alphas, betas, losses, dirs)
