"""A ``loss_fn`` as the compiled functions of the Hessian operator take it, and its loss on a batch.

A ``loss_fn`` that is a pytree of arrays (a ``jax.tree_util.Partial``) is split into its tree
structure, its Python and NumPy scalars and unbound Linen modules, static (in the compilation
cache key, by value), and its arrays, arguments: the same function with new arrays of the same
shapes reuses the compilation. Anything else is static as a whole.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from adahessian_jax._extras import loaded

__all__ = ["LossFn", "batch_loss", "jit_loss"]

LossFn = Callable[[Any, Any], jax.Array]


@jax.jit
def batch_loss(loss_fn, params, batch):
  """``loss_fn(params, batch)``, compiled.

  Args:
    loss_fn: The loss as :func:`jit_loss` returns it.
    params: The params.
    batch: One batch.

  Returns:
    The scalar loss.
  """
  return loss_fn(params, batch)


@dataclasses.dataclass(frozen=True, eq=False)
class _ByIdentity:
  """An unhashable callable, hashed and compared by identity (a static argument of ``jit``)."""

  fn: Callable[..., Any]

  def __call__(self, *args: Any) -> Any:
    return self.fn(*args)

  def __hash__(self) -> int:
    return id(self.fn)

  def __eq__(self, other: object) -> bool:
    return isinstance(other, _ByIdentity) and other.fn is self.fn


def _static(fn: LossFn) -> LossFn:
  """``fn`` itself if it is hashable, else ``fn`` wrapped to be hashed by identity."""
  try:
    hash(fn)
  except TypeError:
    return _ByIdentity(fn)
  return fn


#: Leaves of a pytree ``loss_fn`` kept static, compared by type and value: hyperparameters such as
#: a label smoothing or a class count beside the arrays of a ``Partial``.
_SCALARS = (bool, int, float, complex, str, np.generic)


def _is_argument(leaf: Any) -> bool:
  return isinstance(leaf, jax.Array | np.ndarray)


def _is_static(leaf: Any) -> bool:
  """Whether a leaf of a pytree ``loss_fn`` is kept static by value: a Python or NumPy scalar, or
  an unbound Linen module (a frozen dataclass of its configuration; a bound one also holds
  variables, which its equality does not compare)."""
  module = loaded("flax.linen", "Module")
  unbound = module is not None and isinstance(leaf, module) and leaf.scope is None
  return unbound or isinstance(leaf, _SCALARS)


class _Split(NamedTuple):
  """The static part of a split pytree ``loss_fn``: its tree structure and ``(position, type,
  value)`` of each of its scalar leaves."""

  treedef: Any
  scalars: tuple[tuple[int, type, Any], ...]


@jax.tree_util.register_pytree_node_class
class _JitLoss:
  """A ``loss_fn`` as an argument of the compiled functions: its static part (in their cache key)
  and its arrays (arguments, not constants), from :func:`jit_loss`.

  A split pytree's static part is a :class:`_Split`; ``arrays`` are its other leaves, in
  order."""

  def __init__(self, static: Any, arrays: tuple[Any, ...]):
    self.static, self.arrays = static, arrays

  def __call__(self, params: Any, batch: Any) -> Any:
    if isinstance(self.static, _Split):
      treedef, scalars = self.static
      arrays, consts = iter(self.arrays), dict((i, x) for i, _, x in scalars)
      leaves = [consts[i] if i in consts else next(arrays) for i in range(treedef.num_leaves)]
      return jax.tree.unflatten(treedef, leaves)(params, batch)
    return self.static(params, batch)

  def tree_flatten(self) -> tuple[tuple[Any, ...], Any]:
    # Tagged with the kind of static part: JAX compares a PyTreeDef with any other object as
    # equal inside a tree structure (and hashes them alike), so a Partial without arrays and a
    # later plain function shared the jit cache entry, and the second loss ran the first's Hessian.
    return self.arrays, (isinstance(self.static, _Split), self.static)

  @classmethod
  def tree_unflatten(cls, aux: Any, arrays: Any) -> _JitLoss:
    return cls(aux[1], tuple(arrays))


def jit_loss(loss_fn: LossFn, probe: tuple[Any, Any] | None = None) -> _JitLoss:
  """``loss_fn`` split for ``jit``: a pytree of arrays (a ``jax.tree_util.Partial``) into its tree
  structure, static (the function and e.g. an NNX graphdef, compared by value), and its arrays,
  so that the same function with new arrays of the same shapes (a model's state at a later step)
  reuses the compilation; anything else (a plain function, a pytree with other leaves) is static
  as a whole, hashed (by identity if it is unhashable).

  Python and NumPy scalars and unbound Linen modules among its leaves (``Partial(loss, stats,
  0.1)``, ``Partial(loss, model, stats)``) are static by type and value, not the whole pytree:
  hashed by identity, it compiled the Hessian product anew for every new ``Partial``, its arrays
  baked in as constants.

  With ``probe`` (params and a batch), a pytree whose arrays do not trace as arguments is static
  as a whole too: a NumPy boolean mask or a size its function needs concrete, or a string array.
  """
  leaves, treedef = jax.tree.flatten(loss_fn)
  if not jax.tree_util.treedef_is_leaf(treedef) and all(
    _is_argument(x) or _is_static(x) for x in leaves
  ):
    scalars = tuple((i, type(x), x) for i, x in enumerate(leaves) if not _is_argument(x))
    try:
      hash((treedef, scalars))
    except TypeError:
      pass
    else:
      split = _JitLoss(_Split(treedef, scalars), tuple(x for x in leaves if _is_argument(x)))
      try:
        if probe is not None:
          jax.eval_shape(batch_loss, split, *probe)  # the trace the compilations make
      except Exception:  # loss_fn traced with its arrays concrete (checked by the caller)
        pass
      else:
        return split
  return _JitLoss(_static(loss_fn), ())
