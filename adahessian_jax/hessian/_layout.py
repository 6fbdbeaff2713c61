"""How flat vectors map to the leaves of the params: :class:`ParamLayout` and :func:`ravel`.

The Hessian operator of :mod:`adahessian_jax.hessian` acts on flat vectors, the params' leaves
raveled in ``jax.flatten_util.ravel_pytree`` order. This module holds that correspondence (leaf
names, slices, the entry a flat position is, the part of a leaf a block takes) and the checks that
the params are parameters the Hessian can be taken with respect to: no NNX state or Linen
collection no optimizer trains, no ``jax.pmap`` replicas.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from adahessian_jax import _validation
from adahessian_jax._extras import loaded
from adahessian_jax.hessian import _checks
from adahessian_jax.layout import leaves as canonical_leaves

__all__ = [
  "ParamLayout",
  "check_no_linen_state",
  "check_no_nnx_state",
  "check_not_pmapped",
  "part_entries",
  "part_name",
  "ravel",
  "unravel_rows",
]


@dataclasses.dataclass(frozen=True)
class ParamLayout:
  """How flat vectors of the operator's size map to the leaves of ``params``.

  Attributes:
    params: The point of evaluation (a pytree); also the template of probes.
    names: Readable path of every leaf (``"Conv_0/kernel"``; the full
      ``keystr``, ``"['a']['b']"``, where two paths would read alike), in
      flattening order.
    slices: ``slice`` of every leaf in the flat vector.
    unravel: ``(n,) -> pytree``.
  """

  params: Any
  names: tuple[str, ...]
  slices: tuple[slice, ...]
  unravel: Callable[[jax.Array], Any]

  @classmethod
  def of(cls, params: Any, unravel: Callable[[jax.Array], Any] | None = None) -> ParamLayout:
    """The layout of a pytree of arrays, in ``jax.flatten_util.ravel_pytree`` order.

    Args:
      params: The pytree (Linen boxes and NNX variables are read through).
      unravel: ``(n,) -> pytree`` from :func:`ravel` of ``params``, if the caller has raveled
        them already; ``None`` to ravel them here.

    Returns:
      A :class:`ParamLayout`.
    """
    if unravel is None:
      _, unravel = ravel(params)
    # Canonical paths: a Linen box's or NNX variable's own ``.value`` step is not part of the
    # name ("Dense_0/kernel", not "Dense_0/kernel/value"), as the params' dict keys read.
    infos = canonical_leaves(params)
    short = [jax.tree_util.keystr(x.path, simple=True, separator="/") for x in infos]
    # Paths that read alike ({"a/b": x, "a": {"b": y}}) keep their full keystr, so no leaf is
    # hidden behind another's name.
    names = tuple(
      n if short.count(n) == 1 else jax.tree_util.keystr(x.path)
      for n, x in zip(short, infos, strict=True)
    )
    offsets = np.cumsum([0] + [int(np.size(x.leaf)) for x in infos])
    slices = tuple(slice(int(a), int(b)) for a, b in zip(offsets[:-1], offsets[1:], strict=True))
    return cls(params, names, slices, unravel)

  @staticmethod
  def ravel(tree: Any) -> jax.Array:
    """Flattens a pytree, unchecked (:meth:`flatten` checks it against the params).

    Args:
      tree: A pytree of arrays.

    Returns:
      The ``(n,)`` concatenation of its raveled leaves.
    """
    return ravel(tree)[0]

  def flatten(self, tree: Any, what: str = "the tree") -> jax.Array:
    """A flat vector of the params' size, from a flat array or a pytree like the params.

    Args:
      tree: A real ``(n,)`` array (returned as it is), or a pytree with the params' leaves
        (Linen boxes and NNX variables aside), each of the shape of the params' leaf at its
        path, none complex.
      what: What ``tree`` is, for the error message.

    Returns:
      The ``(n,)`` array.

    Raises:
      ValueError: naming ``what`` and the first leaf that differs or is traced (under
        ``jax.jit``), or the size that does.
    """
    _checks.concrete(tree, what)  # NumPy's TracerArrayConversionError named neither
    if not (isinstance(tree, jax.Array | np.ndarray) and np.ndim(tree) == 1):
      _checks.like_params(tree, self.params, what, flat=True)
      tree = self.ravel(tree)
    else:
      _checks.real(tree, what)
    size = self.slices[-1].stop if self.slices else 0
    if np.shape(tree) != (size,):
      raise ValueError(
        f"{what} must have {size} entries (the params' size), got shape {np.shape(tree)}"
      )
    return jnp.asarray(tree)

  def where(self, index: int) -> str:
    """Where a flat entry lies in the params.

    Args:
      index: A position in the flat vector, ``0 <= index < n``.

    Returns:
      Its leaf path and position in the leaf, e.g. ``"['out']['bias'][1]"``
      (``"entry [1] of the root (the tree is a single array)"`` for params that are one array).
    """
    # Canonical paths, as the names: an NNX variable's ".value" step is no part of the leaf's.
    leaves = canonical_leaves(self.params)
    i = next(i for i, sl in enumerate(self.slices) if sl.start <= index < sl.stop)
    path = jax.tree_util.keystr(leaves[i].path) or self.names[i]
    within = np.unravel_index(index - self.slices[i].start, np.shape(leaves[i].leaf))
    entry = f"[{', '.join(str(int(j)) for j in within)}]" if within else ""
    if not path:  # params that are a single array, whose path is '': "nan at ." named nothing
      return f"entry {entry} of {_validation.ROOT}" if entry else _validation.ROOT
    return path + entry

  def first_not_finite(self, flat: Any) -> str | None:
    """The first non-finite entry of a flat vector, for an error message.

    Args:
      flat: An ``(n,)`` array.

    Returns:
      ``"nan at ['out']['bias'][1]"`` for its first non-finite entry; ``None`` if every entry
      is finite.
    """
    host = np.asarray(flat)
    bad = np.flatnonzero(~np.isfinite(host))
    return f"{host[bad[0]]} at {self.where(int(bad[0]))}" if bad.size else None

  def index(self, leaf: int | str) -> int:
    """The position of a leaf in flattening order.

    Args:
      leaf: Its index, or its name (one of :attr:`names`).

    Returns:
      The index.

    Raises:
      ValueError: for an unknown name or an index out of range.
    """
    if isinstance(leaf, str):
      if leaf not in self.names:
        raise ValueError(f"no leaf named {leaf!r}; the leaves are {list(self.names)}")
      return self.names.index(leaf)
    return _validation.count("leaf", leaf, 0, len(self.names) - 1)


def part_entries(name: str, leaf: Any, where: tuple[Any, ...]) -> np.ndarray:
  """The positions in ``leaf`` (flattened) of its part ``leaf[where]``, shaped like that part.

  Raises:
    ValueError: for a ``where`` that is not a NumPy basic index (ints and slices) into ``leaf``,
      or that selects no entries.
  """
  bad = [w for w in where if not isinstance(w, (int, np.integer, slice)) or isinstance(w, bool)]
  try:
    if bad:
      raise IndexError(f"{bad[0]!r} is not an int or a slice")
    entries = np.arange(int(np.size(leaf))).reshape(jnp.shape(leaf))[where]
  except IndexError as e:
    raise ValueError(
      f"block({name!r}, where={where!r}) needs a NumPy basic index (ints and slices) into the "
      f"leaf of shape {jnp.shape(leaf)}: {e}"
    ) from None
  if entries.size == 0:
    raise ValueError(
      f"the leaf {name!r} has no entries {'' if not where else f'at {where!r} '}(shape "
      f"{np.shape(entries)}): its block has no Hessian to analyse."
    )
  return entries


def ravel(tree: Any) -> tuple[jax.Array, Callable[[jax.Array], Any]]:
  """``jax.flatten_util.ravel_pytree``, also of leaves split over ``Explicit`` mesh axes.

  JAX types the flat vector of such a leaf (``float32[8,16@data]``) with no sharding, so
  ``ravel_pytree`` raises a ``ShardingTypeError`` (``jax.make_mesh``'s axes are ``Explicit`` by
  default: FSDP-sharded params). Such leaves are resharded to replicated on their mesh first: the
  flat vectors of the analyses are replicated over the devices, as XLA makes them for params
  sharded over ``Auto`` axes. ``unravel`` gives replicated leaves.
  """
  return ravel_pytree(jax.tree.map(_replicated, tree))


def unravel_rows(layout: ParamLayout, v: jax.Array, flat_dtype: Any, wide: bool = False) -> Any:
  """``layout.unravel`` of ``v``'s rows, as one compiled program per layout.

  Op by op the leaves cost a slice, a reshape and a conversion each, every one a program of its own
  per leaf shape on its first use; the entries are the same (slices, reshapes and the same
  conversions).

  Args:
    layout: The layout.
    v: ``(..., n)``: one flat vector, or rows of them (leading axes kept in every leaf).
    flat_dtype: The dtype of the operator's flat vectors, of which ``layout.unravel`` gives the
      leaves' dtypes.
    wide: Keep ``v``'s dtype in every leaf, instead of the params' dtypes.

  Returns:
    A pytree of the params' structure whose leaves are ``(..., *leaf_shape)``.
  """
  size = layout.slices[-1].stop if layout.slices else 0
  one = jax.eval_shape(layout.unravel, jax.ShapeDtypeStruct((size,), flat_dtype))
  leaves, treedef = jax.tree.flatten(one)
  parts = tuple(
    (sl.start, sl.stop, tuple(x.shape), None if wide else np.dtype(x.dtype))
    for sl, x in zip(layout.slices, leaves, strict=True)
  )
  if len(parts) == 1 and parts[0][:2] == (0, size):  # one leaf (a block's): a reshape at most
    shape, dtype = parts[0][2:]
    return jax.tree.unflatten(
      treedef, [jnp.reshape(v, v.shape[:-1] + shape).astype(dtype or v.dtype)]
    )
  return jax.tree.unflatten(treedef, _split_cols(v, parts))


@functools.partial(jax.jit, static_argnums=1)
def _split_cols(v: jax.Array, parts: tuple[Any, ...]) -> list[jax.Array]:
  """The columns ``a:b`` of ``v`` reshaped to ``(..., *shape)`` in ``dtype`` (``None``: ``v``'s),
  for each ``(a, b, shape, dtype)`` of ``parts``."""
  lead = v.shape[:-1]
  return [
    jnp.reshape(v[..., a:b], lead + shape).astype(dtype or v.dtype) for a, b, shape, dtype in parts
  ]


def check_no_nnx_state(params: Any) -> None:
  """Raises ``ValueError`` naming the first leaf of ``params`` that is an NNX variable no optimizer
  trains: BatchNorm statistics, RNG state, a cache or an intermediate.

  Such leaves come with ``nnx.state(model)`` or the module itself as params. The Hessian is taken
  with respect to every leaf, so with BatchNorm statistics among them it is not the parameters'
  (in eval mode the statistics move the loss: a larger top eigenvalue, with no error).
  """
  found = (loaded("flax.nnx", n) for n in ("BatchStat", "RngState", "Cache", "Intermediate"))
  kinds = tuple(kind for kind in found if kind is not None)
  if not kinds:
    return
  is_kind = lambda x: isinstance(x, kinds)
  for path, leaf in jax.tree_util.tree_leaves_with_path(params, is_leaf=is_kind):
    if is_kind(leaf):
      raise ValueError(
        f"the params leaf at {_validation.path_str(path)} is an nnx.{type(leaf).__name__}, not a "
        "parameter: the Hessian is taken with respect to every leaf of params. Pass the trained "
        "variables alone, graphdef, params, rest = nnx.split(model, nnx.Param, ...) (or the "
        "nnx.Optimizer's wrt filter), with loss_fn = jax.tree_util.Partial(nnx_loss, graphdef, "
        "rest) where nnx_loss(graphdef, rest, p, b) merges nnx.merge(graphdef, p, rest, "
        "copy=True) (docs/hessian_analysis.md)."
      )


def check_no_linen_state(params: Any) -> None:
  """Raises ``ValueError`` for a whole Linen variables dict as params: ``"params"`` beside
  ``batch_stats``, a cache or intermediates.

  The Hessian would be taken with respect to the running statistics too: in eval mode they move
  the loss (a BatchNorm CNN's top eigenvalue 1.23 for its parameters' 0.99, with no error).
  """
  held = _validation.flax_state_collections(params)
  if held:
    raise ValueError(
      f"params holds the Flax collection(s) {held} beside 'params', as the whole variables dict "
      "of model.init does: the Hessian is taken with respect to every leaf of params, so it "
      "would include the running statistics. Pass variables['params'] as params and the rest "
      "to loss_fn in the batch or as the arrays of a Partial: loss_fn = "
      "jax.tree_util.Partial(f, variables['batch_stats']) with f(stats, p, b) applying "
      "{'params': p, 'batch_stats': stats} (docs/hessian_analysis.md)."
    )


def check_not_pmapped(params: Any) -> None:
  """Raises ``ValueError`` naming the first leaf of ``params`` that is a ``jax.pmap`` output.

  Such a leaf holds one copy of the parameter per device along a leading axis; the Hessian with
  respect to all copies is not the model's (a loss that broadcasts over the extra axis averages
  the copies' losses: its eigenvalues come out divided by the device count, with no error).
  """
  pmap_sharding = getattr(jax.sharding, "PmapSharding", None)  # jax < 0.8
  for info in canonical_leaves(params):  # no NNX variable's ".value" step in the path named
    path, leaf = info.path, info.leaf
    sharding = getattr(leaf, "sharding", None)
    spec = getattr(sharding, "spec", None) or (None,)
    from_pmap = pmap_sharding is not None and isinstance(sharding, pmap_sharding)
    if from_pmap or spec[0] == "_internal_pmap_axis_name":
      raise ValueError(
        f"the params leaf at {_validation.path_str(path)} (shape {np.shape(leaf)}) is a "
        "jax.pmap output: one copy per device along its leading axis. Analyse one replica, "
        "jax.tree.map(lambda x: x[0], params) (and opt_state likewise for a preconditioner), "
        "with the batch's device axis merged into its example axis."
      )


def _replicated(x: Any) -> Any:
  """``x`` replicated on its mesh if its type has a split over a mesh axis, else ``x`` itself."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  if sharding is None or all(axis is None for axis in sharding.spec):
    return x
  return jax.sharding.reshard(x, NamedSharding(sharding.mesh, P()))


def part_name(name: str, where: tuple[int | slice, ...]) -> str:
  """The name of part ``where`` of the leaf ``name``, in NumPy syntax: ``"kernel[:, 3]"``.

  Trailing full slices are left out (``"kernel[3]"`` for ``(3, :, :)``); ``()`` is the leaf.
  """
  where = tuple(where)
  while where and where[-1] == slice(None):
    where = where[:-1]
  return f"{name}[{', '.join(_index_str(w) for w in where)}]" if where else name


def _index_str(w: int | slice) -> str:
  """An index as NumPy syntax: ``3``, ``:``, ``1:4``, ``::2``."""
  if not isinstance(w, slice):
    return str(int(w))
  parts = ["" if x is None else str(x) for x in (w.start, w.stop, w.step)]
  return ":".join(parts[:2] if w.step is None else parts)
