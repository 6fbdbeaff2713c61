"""The data a Hessian is taken over: :class:`WeightedData`, and the checks of the batches given.

A loss over several batches is the weighted mean of the per-batch losses, with weights
``w_b = n_b / Σ n_b`` (the example counts given, or inferred from the leaves' leading axis). The
checks here name the batch and leaf that is not an array, is empty, or differs from the first
batch, before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adahessian_jax import _validation
from adahessian_jax.hessian import _loss
from adahessian_jax.hessian._loss import LossFn

__all__ = [
  "ONE_BATCH_HINT",
  "WeightedData",
  "batch_list",
  "batch_weights",
  "first_of_each_shape",
  "is_array",
  "leaf_shapes",
  "looks_like_batches",
]


@dataclasses.dataclass(frozen=True)
class WeightedData:
  """A per-batch loss and the batches it is averaged over, with weights ``w_b`` summing to 1.

  Attributes:
    loss_fn: ``loss_fn(params, batch) -> scalar``.
    weights: ``w_b``, one per batch.
    batches: The batches (held by reference).
    jit_loss: ``loss_fn`` as the compiled functions take it: static, or, for a
      pytree of arrays (a ``jax.tree_util.Partial``), its tree structure static
      and its arrays arguments (see :func:`hessian_operator`); derived from
      ``loss_fn`` if not given.
  """

  loss_fn: LossFn
  weights: tuple[float, ...]
  batches: tuple[Any, ...]
  jit_loss: Any = dataclasses.field(default=None, repr=False, compare=False)

  def __post_init__(self) -> None:
    weights, batches = tuple(self.weights), tuple(self.batches)
    if not batches or len(weights) != len(batches):
      raise ValueError(
        f"WeightedData needs one weight per batch and at least one batch, got {len(weights)} "
        f"weights for {len(batches)} batches."
      )
    weights = tuple(
      _validation.positive(f"weights[{i}]", w, allow_zero=True) for i, w in enumerate(weights)
    )
    if not math.isclose(math.fsum(weights), 1.0, rel_tol=1e-6):
      raise ValueError(
        f"WeightedData's weights must sum to 1 (the loss is their weighted mean), got "
        f"{weights} (sum {math.fsum(weights)!r}): divide them by their sum, or let "
        "hessian_operator(..., batches=, batch_sizes=) weigh the batches."
      )
    object.__setattr__(self, "weights", weights)
    object.__setattr__(self, "batches", batches)
    if self.jit_loss is None:
      object.__setattr__(self, "jit_loss", _loss.jit_loss(self.loss_fn))

  def weighted_sum(self, per_batch: Callable[[Any], Any]) -> Any:
    """``Σ_b w_b · per_batch(batch_b)``: the one loop over batches every full-data quantity uses.

    Over several batches, float16 and bfloat16 parts are summed in float32 (the result's dtype):
    summed in bfloat16, 256 products were off by 1.2 % (one by 0.3 %), 256 losses by 1.3 %.

    Args:
      per_batch: ``batch -> array``, the quantity on one batch.

    Returns:
      The weighted sum over the batches.
    """
    if len(self.batches) == 1:
      part = per_batch(self.batches[0])
      # One batch's weight is 1 (they sum to 1): no multiplication, a pass over the products
      # (and a compiled program per shape) that changed nothing.
      return part if self.weights[0] == 1.0 else self.weights[0] * part
    total = None
    for w, batch in zip(self.weights, self.batches, strict=True):
      part = per_batch(batch)
      part = w * part.astype(jnp.promote_types(part.dtype, jnp.float32))
      total = part if total is None else total + part
    return total

  def loss(self, params: Any) -> jax.Array:
    """The weighted loss.

    Args:
      params: The point to evaluate it at.

    Returns:
      ``Σ_b w_b · loss_fn(params, batch_b)``.
    """
    return self.weighted_sum(lambda b: _loss.batch_loss(self.jit_loss, params, b))

  def not_finite(self, params: Any) -> str:
    """Where a loss that is not finite comes from, as a sentence for an error message.

    Costs one loss per batch up to the first one whose loss is not finite: call it only once
    something is known not finite.

    Args:
      params: The point the loss was evaluated at.

    Returns:
      The first batch whose loss at ``params`` is not finite and its first non-finite entry,
      or that every batch's loss is finite (then the curvature is what is not).
    """
    many = len(self.batches) > 1
    for i, batch in enumerate(self.batches):
      value = np.asarray(_loss.batch_loss(self.jit_loss, params, batch))
      if np.all(np.isfinite(value)):
        continue
      name, on = (f"batches[{i}]", f"batches[{i}]") if many else ("batch", "the batch")
      entry = _first_not_finite_entry(batch)
      return f" The loss on {on} is {value}" + (
        f"; {name}{entry[0]} is {entry[1]}." if entry else " (its entries are all finite)."
      )
    return " The loss is finite on every batch; its curvature is not (e.g. sqrt or |x| at 0)."


def _first_not_finite_entry(batch: Any) -> tuple[str, Any] | None:
  """``("[0][2, 1]", nan)``: where the first NaN or infinite entry of a batch's floating
  leaves is, and its value."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(batch):
    # By dtype first: NumPy cannot hold a PRNG key array (a dropout key in the batch), whose
    # conversion raised a TypeError in place of the NonFiniteError being explained.
    dtype = getattr(leaf, "dtype", None)
    if not jnp.issubdtype(np.result_type(leaf) if dtype is None else dtype, jnp.inexact):
      continue
    host = np.asarray(leaf)
    bad = np.argwhere(~np.isfinite(host))
    if bad.size:
      index = f"[{', '.join(str(int(j)) for j in bad[0])}]" if host.ndim else ""
      return jax.tree_util.keystr(path) + index, host[tuple(bad[0])]
  return None


def _leading_sizes(batch: Any) -> dict[str, int]:
  """``{leaf path: length of its leading axis}`` of every leaf of ``batch`` with an axis."""
  leaves = jax.tree_util.tree_leaves_with_path(batch)
  return {jax.tree_util.keystr(p): int(np.shape(x)[0]) for p, x in leaves if np.ndim(x) >= 1}


def _check_array_leaves(batch: Any, where: str) -> None:
  """Raises ``TypeError`` naming the first leaf of ``batch`` that is not an array or a number.

  The batch is an argument of the compiled functions, where such a leaf (a string, a dataset
  name) fails with JAX's advice to mark it static, which a caller of the analyses cannot do. So
  does a NumPy array or scalar of strings, objects or dates (a text column beside the tokens).
  """
  for path, leaf in jax.tree_util.tree_leaves_with_path(batch):
    host = isinstance(leaf, np.ndarray | np.generic)
    if (host and leaf.dtype.kind not in "biufc") or not isinstance(
      leaf, jax.Array | np.ndarray | np.generic | bool | int | float | complex
    ):
      kind = f" of dtype {leaf.dtype}" if host else ""
      raise TypeError(
        f"the leaf at {where}{jax.tree_util.keystr(path)} is a {type(leaf).__name__}{kind} "
        f"({leaf!r:.40}): a batch is an argument of the compiled Hessian products, so its leaves "
        "must be arrays or numbers. Close over other values in loss_fn (e.g. "
        "functools.partial(loss_fn, name=...)) and leave them out of the batch."
      )


def _check_not_empty(batch: Any, where: str) -> None:
  """Raises ``ValueError`` if a leaf of ``batch`` has a leading axis of length 0 (no examples)."""
  empty = [path for path, size in _leading_sizes(batch).items() if size == 0]
  if empty:
    raise ValueError(
      f"{where} is empty: its leaf at {where}{empty[0]} has a leading axis of length 0. A loss "
      "over no examples is not defined (a mean over them is nan), and its Hessian is not zero; "
      "leave empty batches out."
    )


def is_array(x: Any) -> bool:
  return isinstance(x, jax.Array | np.ndarray)


# batches=(x, y), meant as one batch, is read as the batches x and y.
ONE_BATCH_HINT = (
  " If batches= holds the parts of one batch, e.g. (x, y), pass it as batch=(x, y) instead: "
  "batches= takes a sequence of batches."
)


def looks_like_batches(batch: Any) -> bool:
  """Whether a ``batch=`` could be several batches: a list or tuple of two or more pytrees (not
  arrays) of one structure, e.g. ``[(x1, y1), (x2, y2)]``."""
  if not isinstance(batch, list | tuple) or len(batch) < 2 or any(is_array(b) for b in batch):
    return False
  first = jax.tree.structure(batch[0])
  return not jax.tree_util.treedef_is_leaf(first) and all(
    jax.tree.structure(b) == first for b in batch
  )


def _check_like_first(batch: Any, first: Any, where: str) -> None:
  """Raises ``ValueError`` unless ``batch`` has ``first``'s structure and shapes past axis 0."""
  # The batches differ as the parts of one batch do: the hint to pass batch= applies.
  hint = ONE_BATCH_HINT if is_array(batch) or is_array(first) else ""
  if jax.tree.structure(batch) != jax.tree.structure(first):
    raise ValueError(
      f"{where} has the structure {jax.tree.structure(batch)}, batches[0] has "
      f"{jax.tree.structure(first)}; every batch must be a pytree like the first.{hint}"
    )
  pairs = zip(jax.tree_util.tree_leaves_with_path(batch), jax.tree.leaves(first), strict=True)
  for (path, leaf), ref in pairs:
    got, want = np.shape(leaf), np.shape(ref)
    if len(got) != len(want) or got[1:] != want[1:]:
      raise ValueError(
        f"the leaf at {where}{jax.tree_util.keystr(path)} has shape {got}, that of batches[0] "
        f"{want}; batches may differ in the leading (example) axis only.{hint}"
      )


def leaf_shapes(batch: Any) -> list[tuple[int, ...]]:
  """The shapes of a batch's leaves, in flattening order."""
  return [np.shape(x) for x in jax.tree.leaves(batch)]


def first_of_each_shape(data: list[Any]) -> list[int]:
  """The index of the first batch of each distinct set of leaf shapes and dtypes."""
  seen, first = set(), []
  for i, b in enumerate(data):
    shapes = tuple((np.shape(x), str(getattr(x, "dtype", type(x)))) for x in jax.tree.leaves(b))
    if shapes not in seen:
      seen.add(shapes)
      first.append(i)
  return first


def _inferred_size(batch: Any, where: str) -> int:
  """The example count of ``batch``: the leading size its leaves with an axis all share."""
  sizes = _leading_sizes(batch)
  if not sizes:
    raise ValueError(
      f"cannot infer the size of {where} (no leaf with a leading axis); pass batch_sizes=[...], "
      "the example count of every batch."
    )
  if len(set(sizes.values())) > 1:
    listed = ", ".join(f"{where}{path}: {size}" for path, size in sizes.items())
    raise ValueError(
      f"cannot infer the size of {where}: its leaves disagree on the leading axis ({listed}), so "
      "some are not per-example. Pass batch_sizes=[...], the example count of every batch."
    )
  return next(iter(sizes.values()))


def batch_list(batch: Any, batches: Iterable[Any] | None) -> list[Any]:
  """The batches as a list, checked: each nonempty and shaped like the first."""
  if (batch is None) == (batches is None):
    raise ValueError("give exactly one of batch= or batches=")
  if batch is not None:
    if isinstance(batch, Iterator):  # a data loader: its batches, read one by one
      raise TypeError(
        f"batch is a {type(batch).__name__}, an iterator: pass the batches it yields as "
        "batches=... (read once into a list), or one batch as batch=next(iterator)."
      )
    _check_array_leaves(batch, "batch")
    _check_not_empty(batch, "batch")
    return [batch]
  assert batches is not None  # one of the two is given (checked above)
  if isinstance(batches, Mapping):  # iterating it would give its keys, not batches
    raise ValueError(
      f"batches must be an iterable of batches (a list, a generator), got a "
      f"{type(batches).__name__} with keys {list(batches)[:4]}, whose iteration gives its keys. "
      "For a single batch pass batch=... (or batches=[...] holding it)."
    )
  data = list(batches)  # a sequence's elements, held by reference; an iterator read once
  if not data:
    # A generator (any iterator) is read once: one that yields nothing was most likely read
    # to its end already, by an earlier call given it too.
    consumed = (
      f" It is a {type(batches).__name__}, which an earlier call given it may have consumed "
      "already (an iterator yields its batches once): pass a list, or a fresh iterator."
      if isinstance(batches, Iterator)
      else ""
    )
    raise ValueError(f"batches is empty; give at least one batch.{consumed}")
  for i, b in enumerate(data):
    _check_like_first(b, data[0], f"batches[{i}]")
    _check_array_leaves(b, f"batches[{i}]")
    _check_not_empty(b, f"batches[{i}]")
  return data


def batch_weights(data: list[Any], batch_sizes: Any) -> np.ndarray:
  """``w_b = n_b / Σ n_b``; ``n_b`` given (finite, positive) or inferred from the leaves."""
  if batch_sizes is None:
    if len(data) == 1:
      return np.ones(1)
    sizes = [_inferred_size(b, f"batches[{i}]") for i, b in enumerate(data)]
  else:
    # A 0-d array is Iterable to isinstance, and list() of it raised "iteration over a 0-d array".
    if (
      isinstance(batch_sizes, str)
      or not isinstance(batch_sizes, Iterable)
      or getattr(batch_sizes, "ndim", 1) == 0
    ):
      raise ValueError(f"batch_sizes must be a sequence of numbers, got {batch_sizes!r}")
    given = list(batch_sizes)
    if len(given) != len(data):
      raise ValueError(f"got {len(given)} batch_sizes for {len(data)} batches; give one per batch")
    sizes = [_validation.positive(f"batch_sizes[{i}]", n) for i, n in enumerate(given)]
  sizes = np.asarray(sizes, dtype=np.float64)
  sizes = sizes / sizes.max()  # first: a sum of sizes near 1e308 would overflow
  return sizes / sizes.sum()
