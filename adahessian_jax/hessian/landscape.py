"""The loss along one or two directions in parameter space.

``loss(θ + α d)`` (1-D) and ``loss(θ + α d₁ + β d₂)`` (2-D) over the data of a
:class:`~adahessian_jax.hessian.HessianOperator`, for given directions or, by
default, the Hessian's top eigenvectors (the directions of sharpest
curvature). The grid is evaluated by a jit-compiled ``lax.map`` over blocks of
points, once per batch.

A given direction can be rescaled to the parameters' scale, which makes
landscapes of differently scaled networks comparable (Li et al. 2018):

* ``normalize="layer"``: each leaf of the direction gets the norm of that leaf
  of the params;
* ``normalize="filter"``: each *filter* gets the norm of the corresponding
  weight filter, a filter being one output unit of a Dense kernel or one output
  channel of a Conv kernel. In Flax layouts the output is the kernel's last axis
  (``(in, out)``, ``(h, w, in, out)``), so a filter is a slice along the last
  axis of any leaf with two or more axes. Leaves with fewer axes (biases,
  normalisation scales) get a zero direction, as in Li et al.'s
  experiments: a per-entry rescaling would give ``±|b_i|``, which is zero for
  zero-initialised biases anyway and carries no filter structure.

:func:`random_direction` draws the Gaussian directions those papers normalise.

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

from adahessian_jax.hessian import _checks
from adahessian_jax.hessian._operator import HessianOperator
from adahessian_jax.hessian.eigen import top_eigenvalues

__all__ = [
  "Landscape1D",
  "Landscape2D",
  "loss_landscape_1d",
  "loss_landscape_2d",
  "normalize_direction",
  "random_direction",
]

_NORMALIZE = (None, "unit", "layer", "filter")


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


def _groups(op: HessianOperator, normalize: str) -> tuple[np.ndarray, int]:
  """Group id of every flat entry (``-1``: zeroed) for per-leaf or per-filter scaling."""
  ids, offset = [], 0
  for leaf, sl in zip(jax.tree.leaves(op.params), op.leaf_slices, strict=True):
    shape = np.shape(leaf)
    if normalize == "layer":
      ids.append(np.full(sl.stop - sl.start, offset))
      offset += 1
    elif len(shape) < 2:
      ids.append(np.full(sl.stop - sl.start, -1))
    else:  # one group per index of the last (output) axis, row-major flattening
      ids.append(np.broadcast_to(offset + np.arange(shape[-1]), shape).ravel())
      offset += shape[-1]
  return np.concatenate(ids).astype(np.int32), offset


@functools.partial(jax.jit, static_argnums=3)
def _rescale_groups(direction, params, ids, num_groups):
  """``direction`` with each group scaled to the norm of the same group of ``params``."""
  seg = jnp.where(ids < 0, num_groups, ids)  # zeroed entries: an extra group, dropped
  norm = lambda x: jnp.sqrt(jax.ops.segment_sum(x * x, seg, num_groups + 1))
  scale = norm(params) / norm(direction)
  scale = jnp.where(jnp.isfinite(scale), scale, 0.0).at[num_groups].set(0.0)
  return direction * scale[seg]


def normalize_direction(op: HessianOperator, direction: Any, normalize: str | None) -> jax.Array:
  """A direction as a flat ``(n,)`` array, rescaled as ``normalize`` says.

  Args:
    op: The operator whose params set the scale.
    direction: A pytree like the params or a flat ``(n,)`` array.
    normalize: ``None`` (as given), ``"unit"`` (unit norm), ``"layer"`` (each
      leaf to the norm of that leaf of the params) or ``"filter"`` (each
      filter to the norm of that weight filter; leaves with fewer than two axes
      zeroed; see the module docstring).

  Returns:
    The ``(n,)`` direction. A group whose direction is zero stays zero.
  """
  if normalize not in _NORMALIZE:
    raise ValueError(f"normalize must be one of {_NORMALIZE}, got {normalize!r}")
  flat = direction
  if not (isinstance(direction, jax.Array | np.ndarray) and np.ndim(direction) == 1):
    flat = op.ravel(direction)
  flat = jnp.asarray(flat, op.dtype)
  if flat.shape != (op.size,):
    raise ValueError(f"a direction must have {op.size} entries, got shape {flat.shape}")
  if normalize is None:
    return flat
  if normalize == "unit":
    return flat / jnp.linalg.norm(flat)
  if op.coordinates is not None:
    raise ValueError(
      f"normalize={normalize!r} compares a direction with the params, which a rescaled "
      "(preconditioned) operator's directions are not in; use the plain operator."
    )
  ids, num_groups = _groups(op, normalize)
  return _rescale_groups(flat, op.ravel(op.params), jnp.asarray(ids), num_groups)


def random_direction(op: HessianOperator, key: jax.Array) -> jax.Array:
  """A standard Gaussian direction, flat ``(n,)`` (normalise it with ``normalize="filter"``)."""
  return jax.random.normal(key, (op.size,), op.dtype)


@functools.partial(jax.jit, static_argnums=(0, 1, 6))
def _grid_losses(loss_fn, unravel, flat, directions, coeffs, batch, chunk):
  def one(c):
    return loss_fn(unravel(flat + c @ directions), batch)

  return jax.lax.map(one, coeffs, batch_size=chunk)


def _losses(op: HessianOperator, directions: jax.Array, coeffs: np.ndarray, chunk: int):
  data = op.require_data("a loss landscape")
  chunk = _checks.count("chunk", chunk)
  flat = op.ravel(op.params)
  if op.coordinates is not None:  # a step d in the operator's coordinates moves θ by S d
    directions = directions * op.coordinates
  grid = jnp.asarray(coeffs, op.dtype)
  chunk = int(min(chunk, grid.shape[0]))
  out = data.weighted_sum(
    lambda b: _grid_losses(data.loss_fn, op.unravel, flat, directions, grid, b, chunk)
  )
  return np.asarray(out)


def _directions(op, directions, k, key, normalize):
  if directions is None:
    eig = top_eigenvalues(op, k, key=key)
    return eig.eigenvectors_flat
  return jnp.stack([normalize_direction(op, d, normalize) for d in directions])


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
      the top Hessian eigenvector (unit norm, so ``α`` is a Euclidean distance;
      for a preconditioned operator, a distance in its coordinates).
    normalize: For a given direction: ``None`` (as given), ``"unit"`` (unit
      norm), ``"layer"`` (each leaf rescaled to the norm of that leaf of θ) or
      ``"filter"`` (each filter rescaled to the norm of that filter of θ, Li et
      al. 2018; see :func:`normalize_direction`).
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
