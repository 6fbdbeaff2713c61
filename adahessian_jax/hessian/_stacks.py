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

from adahessian_jax import _validation, layout, spatial
from adahessian_jax.hessian import _checks


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
      ints as leaves (e.g. ``{"ScanBlock_0": 1, "head": 0}``), matched by path where its
      containers are not the params' (a plain dict for an NNX ``State``, boxes aside).
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
  except (ValueError, TypeError):
    counts = _by_path(layer_axes, params)
    if counts is None:
      raise ValueError(
        "layer_axes must be an int or a pytree prefix of the params with ints as leaves (the "
        f"number of leading layer axes of each leaf), but it {_not_a_prefix(layer_axes, params)}."
      ) from None
  # Canonical paths, as _by_path matches them: no NNX variable's ".value" step in the name.
  paths = _validation.canonical_leaf_paths(params)
  return [
    tuple(range(_validation.count(f"layer_axes at {p}", n, 0, len(s))))
    for n, p, s in zip(counts, paths, shapes, strict=True)
  ]


def _by_path(prefix: Any, params: Any) -> list[Any] | None:
  """The entry of ``prefix`` over each leaf of ``params``, matched by path, boxes aside; ``None``
  unless every leaf has one and every entry covers a leaf.

  A prefix of other containers than the params' but the same keys (a plain dict for an NNX
  ``State``, or for params in Linen boxes or NNX variables), as the directions and
  preconditioners are taken: ``{"blocks": 1, "head": 0}`` was refused for ``nnx.split``'s
  params, which only an ``nnx.State`` prefix matched.
  """
  entries = jax.tree_util.tree_leaves_with_path(prefix)
  counts, used = [], set()
  for info in layout.leaves(params):  # canonical paths: a box's ``.value`` step left out
    over = [i for i, (p, _) in enumerate(entries) if tuple(info.path[: len(p)]) == tuple(p)]
    if len(over) != 1:
      return None
    used.add(over[0])
    counts.append(entries[over[0]][1])
  return counts if len(used) == len(entries) else None


def _not_a_prefix(prefix: Any, params: Any) -> str:
  """Where ``prefix`` first fails to be a pytree prefix of ``params``, as the end of a sentence
  (JAX's own error dumps both trees' key sets, a screenful for a model)."""
  # The params' canonical paths, as _by_path matches them: with an NNX variable's ".value" step
  # in them, no entry of a plain prefix was inside a leaf, and the leaf was named with the step.
  leaves = _checks.leaves_with_path(params)
  entries = [p for p, _ in jax.tree_util.tree_leaves_with_path(prefix)]
  extra, missing = _validation.prefix_mismatch(entries, [p for p, _ in leaves])
  if extra is not None:
    leaf = next(((p, x) for p, x in leaves if extra[: len(p)] == p and len(p) < len(extra)), None)
    if leaf is not None:  # a tuple (0, 0), a list or a dict where the params have one array
      return (
        f"has an entry at {_validation.path_str(extra)}, inside the params leaf at "
        f"{_validation.path_str(leaf[0])} of shape {np.shape(leaf[1])}: give that leaf one int"
      )
    return f"has an entry at {_validation.path_str(extra)}, where the params have none"
  if missing is not None:
    return f"has no entry for the params leaf at {_validation.path_str(missing)}"
  return (
    f"has other containers than the params ({jax.tree.structure(prefix)} against the params' "
    f"{jax.tree.structure(params)}): build it of the params' containers"
  )


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
