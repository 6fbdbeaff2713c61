"""Reading the axis names Flax attaches to parameters, without importing Flax.

Large Flax models name the axes of their parameters for sharding, and the names
say what each axis is: a stacked-layers axis, a head axis, a convolution's
spatial axis. :mod:`adahessian_jax.spatial` uses them to choose the averaging.
This module finds them, in:

* Linen's boxed parameters, as ``init`` returns them with
  ``nn.with_logical_partitioning`` (``nn.LogicallyPartitioned``, logical names)
  or ``nn.with_partitioning`` (``nn.Partitioned``, mesh axis names), including
  the axis that ``nn.scan``/``nn.vmap`` insert with
  ``metadata_params={nn.PARTITION_NAME: "layers"}``. The boxes are pytree
  nodes, so ``jax.tree`` functions (and the optimizer state built from the
  parameters) keep them;
* NNX variables (``nnx.Param(..., out_sharding=...)`` or its deprecated aliases
  ``sharding`` / ``sharding_names``, and ``nnx.with_partitioning``), including
  the axis that ``nnx.scan``/``nnx.vmap`` insert with
  ``transform_metadata={nnx.PARTITION_NAME: "layers"}``;
* trees of :class:`jax.sharding.PartitionSpec`, e.g. from
  ``nn.get_partition_spec(boxed_params)``.

Flax stays an optional dependency: a box or variable can only exist if its
module was imported, so the checks look the classes up in ``sys.modules``
without importing it.

Every leaf gets a *canonical path*: its path with the box's own ``.value``
step removed, so a boxed tree, its unboxed twin (``nn.unbox``, ``nnx.as_pure``)
and its tree of partition specs give the same paths.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax

from adahessian_jax._extras import loaded

__all__ = ["AxisNames", "LeafLayout", "axis_names_of", "is_annotated", "leaves", "names_by_path"]

#: The axis names of one leaf, one entry per axis (a ``str``, ``None``, or a
#: tuple of names for an axis sharded over several mesh axes).
AxisNames = tuple[Any, ...]

#: The roles an axis name can have (:data:`adahessian_jax.spatial.AXIS_ROLES` maps names to them):
#: a stack of layers or experts, a convolution's spatial axis, attention heads, a table's rows,
#: and the features of a ``Dense``/``DenseGeneral`` kernel.
STACKED, SPATIAL, HEADS, VOCAB, FEATURES = "stacked", "spatial", "heads", "vocab", "features"
#: Axis names of a mixture's experts (stacked, like layers): a layer's own axes come after them.
EXPERT_AXES = ("exp", "expert", "experts", "num_experts")
ROLES = (STACKED, SPATIAL, HEADS, VOCAB, FEATURES)


def axis_role(name: Any, roles: Mapping[str, str]) -> str | None:
  """The role in ``roles`` of an axis name (of a tuple of names: the first known), or ``None``."""
  if isinstance(name, tuple):  # an axis sharded over several mesh axes
    return next((r for r in (axis_role(n, roles) for n in name) if r), None)
  return roles.get(name) if isinstance(name, str) else None


def _linen_metadata_class():
  return loaded("flax.core.meta", "AxisMetadata")


def nnx_variable_class():
  """NNX's variable class, looked up without importing Flax.

  Returns:
    ``flax.nnx.Variable``, or ``None`` if ``flax.nnx`` is not imported (no NNX variable exists
    then).
  """
  return loaded("flax.nnx", "Variable")


def is_nnx_variable(x: Any) -> bool:
  """Whether ``x`` is an NNX variable (never without Flax imported: none exists then).

  Args:
    x: A node of a pytree (usable as ``is_leaf``).

  Returns:
    ``True`` for an NNX variable.
  """
  variable = nnx_variable_class()
  return variable is not None and isinstance(x, variable)


def nnx_nodes(tree: Any) -> list[Any]:
  """The leaves of ``tree``, an NNX variable read as one; none without Flax imported (no NNX
  variable exists then)."""
  if nnx_variable_class() is None:
    return []
  return jax.tree.leaves(tree, is_leaf=is_nnx_variable)


def _is_spec(x: Any) -> bool:
  return isinstance(x, jax.sharding.PartitionSpec)


def is_annotated(x: Any) -> bool:
  """Whether ``x`` is a Linen metadata box, an NNX variable or a partition spec.

  Args:
    x: A node of a pytree (usable as ``is_leaf``).

  Returns:
    ``True`` for such a node, which :func:`leaves` reads axis names from (it may carry none).
  """
  if _is_spec(x):
    return True
  linen = _linen_metadata_class()
  if linen is not None and isinstance(x, linen):
    return True
  return is_nnx_variable(x)


def unboxed(tree: Any, is_box: Callable[[Any], bool] = is_annotated) -> Any:
  """``tree`` with each box around one array (a Linen metadata box, an NNX variable: what
  ``is_box`` accepts) replaced by the array, as ``nnx.as_pure`` and ``nn.unbox`` give it.

  Args:
    tree: A pytree.
    is_box: Which nodes are boxes; default :func:`is_annotated`.

  Returns:
    The tree with plain arrays in place of those boxes.
  """

  def value(x):
    inner = jax.tree.leaves(x)
    return inner[0] if is_box(x) and len(inner) == 1 else x

  return jax.tree.map(value, tree, is_leaf=is_box)


def _as_names(spec: Any) -> AxisNames | None:
  if spec is None:
    return None
  spec = getattr(spec, "spec", spec)  # a NamedSharding
  if isinstance(spec, str):
    return (spec,)
  try:
    names = tuple(tuple(e) if isinstance(e, list) else e for e in spec)
  except TypeError:
    return None
  return names or None  # P() (what nn.get_partition_spec gives an unboxed leaf) names nothing


def _spec_of(node: Any) -> Any:
  """The object ``node``'s names are read from (a spec, a box's names, a variable's metadata)."""
  if _is_spec(node):
    return node
  if is_nnx_variable(node):
    metadata = node.get_metadata()
    for key in ("out_sharding", "sharding_names", "sharding"):
      if metadata.get(key) is not None:
        return metadata[key]
    return None
  return getattr(node, "names", None)


def axis_names_of(node: Any) -> AxisNames | None:
  """The axis names carried by one annotated node, or ``None``.

  Args:
    node: A Linen box (``Partitioned``/``LogicallyPartitioned``: its
      ``names``), an NNX variable (its ``out_sharding``, ``sharding_names`` or
      ``sharding`` metadata), or a ``PartitionSpec``.

  Returns:
    A tuple with one entry per axis, or ``None`` when the node carries no names.
  """
  return _as_names(_spec_of(node))


class LeafLayout(NamedTuple):
  """One array leaf of a parameter tree and what is known about its axes.

  Attributes:
    path: The canonical path (the box's ``.value`` step removed).
    leaf: The leaf (an array, a shape-dtype struct or a ``PartitionSpec``).
    names: Its axis names, or ``None``.
  """

  path: tuple[Any, ...]
  leaf: Any
  names: AxisNames | None


def leaves(tree: Any) -> list[LeafLayout]:
  """The leaves of ``tree`` in ``jax.tree.leaves`` order, with their axis names.

  A partition spec counts as a leaf (``jax.tree`` treats it as one). Names whose
  length is not the leaf's rank are still returned; callers check them.

  Args:
    tree: A pytree, possibly with Linen boxes or NNX variables.

  Returns:
    A list of :class:`LeafLayout`, one per leaf.
  """
  out = []
  nodes = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_annotated)[0]
  for path, node in nodes:
    if _is_spec(node) or not is_annotated(node):
      out.append(LeafLayout(tuple(path), node, axis_names_of(node) if _is_spec(node) else None))
      continue
    names = axis_names_of(node)
    inner = jax.tree_util.tree_flatten_with_path(node)[0]
    if len(inner) == 1:
      out.append(LeafLayout(tuple(path), inner[0][1], names))
    else:  # a box around a tree: its names describe no single leaf
      out.extend(LeafLayout(tuple(path) + tuple(p), x, None) for p, x in inner)
  return out


def names_by_path(source: Any) -> dict[str, AxisNames | None]:
  """Axis names keyed by ``jax.tree_util.keystr`` of each leaf's canonical path.

  Args:
    source: Boxed Linen params, an NNX state of variables (``nnx.state(model,
      nnx.Param)``), or a tree of ``PartitionSpec`` (``nn.get_partition_spec``).

  Returns:
    A dict from path string to names (``None`` for leaves without names).
  """
  return {jax.tree_util.keystr(x.path): x.names for x in leaves(source)}
