"""Layers stacked in one leaf (``nn.scan``, ``nnx.vmap``): which axes index the layers.

A stacked kernel ``(layers, in, out)`` holds one kernel per layer. The per-layer
analyses (:func:`~adahessian_jax.hessian.layer_breakdown`, the ``"layer"`` and
``"filter"`` normalisations of :mod:`~adahessian_jax.hessian.landscape`) treat each
layer's slice as a leaf of its own. The layer axes of a leaf are those its axis
names mark as stacked (``"layers"``, ``"layer"``, ``"scan"``... in boxed Linen params
or NNX state with sharding metadata), read by the same rules as the optimizer's
spatial averaging (:mod:`adahessian_jax.spatial`), which finds the stacks of plain arrays
from their biases, Linen module names and attention kernels; ``layer_axes=`` says which
leaves are stacked where nothing shows it.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from adahessian_jax import _validation, spatial


def layer_axes_of(
  params: Any, layer_axes: Any = None, rules: list[spatial.Rule] | None = None
) -> list[tuple[int, ...]]:
  """The stacked-layer axes of every leaf of ``params``, in ``jax.tree.leaves`` order.

  Args:
    params: The params (a pytree, possibly of Linen boxes or NNX variables).
    layer_axes: ``None`` (from the params' axis names; an unnamed leaf takes the
      stack of its named relatives as the optimizer's averaging does, see
      :mod:`adahessian_jax.spatial`), or the number of leading
      layer axes of each leaf, as an int or a pytree prefix of the params with
      ints as leaves (e.g. ``{"ScanBlock_0": 1, "head": 0}``).
    rules: ``spatial.leaf_rules(None, params)`` if the caller has them already.

  Returns:
    One tuple of axes per leaf (empty for a leaf that is one layer).

  Raises:
    ValueError: for a ``layer_axes`` that is not such a prefix, or a count that is
      negative, not an int, or above the leaf's rank (naming the leaf).
  """
  shapes = [tuple(np.shape(x)) for x in jax.tree.leaves(params)]
  if layer_axes is None:
    rules = spatial.leaf_rules(None, params) if rules is None else rules
    return [tuple(r.layer_axes(s)) for r, s in zip(rules, shapes, strict=True)]
  try:
    counts = jax.tree.leaves(jax.tree.broadcast(layer_axes, params))
  except (ValueError, TypeError) as e:
    raise ValueError(
      "layer_axes must be an int or a pytree prefix of the params with ints as leaves (the "
      f"number of leading layer axes); broadcasting it to the params failed: {e}"
    ) from None
  paths = _validation.leaf_paths(params)
  return [
    tuple(range(_validation.count(f"layer_axes at {p}", n, 0, len(s))))
    for n, p, s in zip(counts, paths, shapes, strict=True)
  ]


def layer_slices(shape: tuple[int, ...], axes: tuple[int, ...]) -> list[tuple[Any, ...]]:
  """Every layer of a leaf of ``shape`` stacked along ``axes``, as its index into the leaf.

  The index keeps the other axes in order (slices). A leaf with no layer axes is one layer,
  indexed by ``()``: the whole leaf.
  """
  counts = [shape[a] for a in axes]
  out = []
  for index in np.ndindex(*counts):
    at = dict(zip(axes, index, strict=True))
    out.append(tuple(at.get(a, slice(None)) for a in range(len(shape))))
  return out
