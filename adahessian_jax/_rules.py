"""The spatial-averaging rules: small immutable objects that map a leaf's estimate to an array of
the same shape, and the functions that make them (:func:`none`, :func:`blocks`, :func:`mean_over`,
:func:`per_layer`).

The default rule, which reads a leaf's layout, is in :mod:`adahessian_jax._flax_default`; users
import all of them from :mod:`adahessian_jax.spatial`.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from adahessian_jax._validation import count
from adahessian_jax.layout import AxisNames


class Choice(NamedTuple):
  """A concrete rule for one leaf and the reason it was chosen.

  Attributes:
    rule: The rule applied to the leaf (never :func:`flax_default` itself).
    why: A sentence saying why.
    ambiguous: Whether the rule is a guess (see :func:`strict`, which refuses
      these).
  """

  rule: Rule
  why: str
  ambiguous: bool = False


class Rule(abc.ABC):
  """A spatial-averaging rule: maps an array to one of the same shape.

  Subclasses implement ``__call__``; ``check`` (raise ``ValueError`` if the
  rule cannot apply to a shape) and ``groups`` (for :func:`describe`) are
  optional. ``bind`` and ``explain`` matter only for rules that depend on the
  leaf's axis names, like :func:`flax_default`.
  """

  @abc.abstractmethod
  def __call__(self, d: jax.Array) -> jax.Array:
    """Averages over the rule's groups.

    Args:
      d: The leaf's ``|estimate|``.

    Returns:
      ``d`` with every entry replaced by the mean over its group (same shape and dtype).
    """

  def check(self, shape: tuple[int, ...], where: str) -> None:  # noqa: B027
    """Checks that the rule can apply to a leaf (by default it can).

    Args:
      shape: The leaf's shape.
      where: The leaf's path, for the error message.

    Raises:
      ValueError: naming ``where``, if the rule cannot apply to ``shape``.
    """

  def bind(self, names: AxisNames) -> Rule:
    """This rule for a leaf whose axes carry names (by default the rule itself).

    Args:
      names: One axis name (or ``None``) per axis of the leaf.

    Returns:
      The rule to apply to that leaf.
    """
    del names
    return self

  def explain(self, shape: tuple[int, ...]) -> Choice:
    """The concrete rule applied to a leaf, and why.

    Args:
      shape: The leaf's shape.

    Returns:
      A :class:`Choice` (for a rule given explicitly: itself, "given explicitly in averaging").
    """
    del shape
    return Choice(self, "given explicitly in averaging")

  def groups(self, shape: tuple[int, ...]) -> dict[int, int] | None:
    """The sizes of the groups the rule averages over, for :func:`describe`.

    Args:
      shape: The leaf's shape.

    Returns:
      ``{group size: number of groups}`` on a leaf of ``shape``; ``None`` if unknown.
    """
    del shape
    return None

  def layer_axes(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The stacked-layer axes of a leaf, which leaf-wide statistics keep apart.

    Args:
      shape: The leaf's shape.

    Returns:
      The axes (``()`` for a leaf of one layer).
    """
    return self.explain(shape).rule._own_layer_axes(shape)

  def _own_layer_axes(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    del shape
    return ()

  def for_param(self, param: str | None) -> Rule:
    """This rule for a leaf with a Flax parameter name (by default the rule itself).

    Args:
      param: The leaf's last path key (``"kernel"``, ``"bias"``), or ``None``.

    Returns:
      The rule to apply to that leaf.
    """
    del param
    return self


def _normalize_axis(
  axis: int, ndim: int, where: str, rule: Rule, verb: str = "averages over"
) -> int:
  if not -ndim <= axis < ndim:
    fits = f"whose axes lie in {-ndim}..{ndim - 1}" if ndim else "without axes, spatial.none()"
    raise ValueError(
      f"{rule} {verb} axis {axis}, but {_leaf_at(where)} has rank {ndim}: give that leaf a "
      f"rule {fits} (or None for the default)."
    )
  return axis % ndim


#: How a rule called on an array directly (not through :func:`resolve_rules`) names it.
_APPLIED = "the array it is applied to"


def _leaf_at(where: str) -> str:
  """The subject of an error about the leaf at ``where`` (a path, or :data:`_APPLIED`)."""
  return where if where == _APPLIED else f"the leaf at {where}"


def _slice_where(where: str, axes: tuple[int, ...]) -> str:
  """``where`` for the rule applied to each layer of a leaf (``per_layer``'s inner rule)."""
  return f"{where} (one layer's slice, stacked axes {axes} set apart)"


def leaf_size(shape: tuple[int, ...]) -> int:
  """The number of entries of a leaf of ``shape``."""
  return math.prod(shape)


@dataclasses.dataclass(frozen=True)
class NoAveraging(Rule):
  """Leaves the estimate as it is."""

  def __call__(self, d):
    return d

  def groups(self, shape):
    return {1: leaf_size(shape)} if leaf_size(shape) else {}

  def __str__(self):
    return "none()"


def _blocks_within_shards(n: int, block_size: int, mesh: Any, entry: Any) -> bool:
  """Whether every block of ``block_size`` along an axis of length ``n`` split over the mesh
  axes ``entry`` lies within one shard: then each device averages its own blocks, with no
  gather."""
  names = entry if isinstance(entry, tuple) else (entry,)
  shards = math.prod(mesh.shape[name] for name in names)
  return n % shards == 0 and (n // shards) % min(block_size, n) == 0


@dataclasses.dataclass(frozen=True)
class BlockMean(Rule):
  """Mean over blocks of ``block_size`` consecutive entries along ``axis``.

  A last block shorter than ``block_size`` is averaged over its own members.
  """

  block_size: int
  axis: int = 0

  def check(self, shape, where):
    _normalize_axis(self.axis, len(shape), where, self)

  def __call__(self, d):
    if self.block_size == 1 or d.ndim == 0 or d.size == 0:
      return d
    # Not self.axis % d.ndim: an axis beyond the rank would silently pick another axis.
    axis = _normalize_axis(self.axis, d.ndim, _APPLIED, self)
    sharding = getattr(jax.typeof(d), "sharding", None)
    spec = getattr(sharding, "spec", ())
    if (
      sharding is not None
      and axis < len(spec)
      and spec[axis] is not None
      and not _blocks_within_shards(d.shape[axis], self.block_size, sharding.mesh, spec[axis])
    ):
      # Split over Explicit mesh axes (FSDP on a jax.make_mesh mesh): JAX refuses the reshape into
      # blocks that straddle shards. Gather that axis (what XLA does under Auto axes).
      whole = tuple(None if i == axis else a for i, a in enumerate(spec))
      gathered = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*whole))
      return jax.sharding.reshard(self(jax.sharding.reshard(d, gathered)), sharding)
    x = jnp.moveaxis(d, axis, 0)
    n, rest = x.shape[0], x.shape[1:]
    b = min(self.block_size, n)
    n_full = (n // b) * b  # >= b: n >= 1 (d.size != 0) and b <= n
    full = x[:n_full].reshape((n // b, b) + rest)
    full = jnp.broadcast_to(full.mean(axis=1, keepdims=True), full.shape)
    parts = [full.reshape((n_full,) + rest)]
    if n_full < n:
      tail = x[n_full:]
      parts.append(jnp.broadcast_to(tail.mean(axis=0, keepdims=True), tail.shape))
    x = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)
    return jnp.moveaxis(x, 0, axis)

  def groups(self, shape):
    size = leaf_size(shape)
    if not size:
      return {}
    if not shape or self.block_size == 1:
      return {1: size}
    n = shape[self.axis % len(shape)]
    b = min(self.block_size, n)
    out = {b: (n // b) * (size // n)}
    if n % b:
      out[n % b] = size // n
    return out

  def __str__(self):
    return f"blocks({self.block_size}, axis={self.axis})"


def _split_like(x: jax.Array, d: jax.Array) -> jax.Array:
  """``x`` split over Explicit mesh axes as ``d`` is (``x`` itself elsewhere).

  A mean broadcast back along an axis split over them comes back whole along it (the mean is
  the same for every shard), and then differs from ``D``'s sharding: the update refused it
  ("select cases must have the same shardings"; with lazy refresh, "cond branches must have
  equal output types"). Splitting it again is local: every device keeps its part.
  """
  sharding = getattr(jax.typeof(d), "sharding", None)
  if all(a is None for a in getattr(sharding, "spec", ())):
    return x
  if getattr(jax.typeof(x), "sharding", None) == sharding:
    return x
  return jax.sharding.reshard(x, sharding)


@dataclasses.dataclass(frozen=True)
class AxesMean(Rule):
  """Mean over ``axes``, broadcast back to the original shape."""

  axes: tuple[int, ...]

  def check(self, shape, where):
    axes = [_normalize_axis(a, len(shape), where, self) for a in self.axes]
    if len(set(axes)) != len(axes):
      raise ValueError(f"{self} names an axis twice for {_leaf_at(where)} (rank {len(shape)}).")

  def __call__(self, d):
    if not self.axes:
      return d
    self.check(d.shape, _APPLIED)
    return _split_like(jnp.broadcast_to(d.mean(axis=self.axes, keepdims=True), d.shape), d)

  def groups(self, shape):
    size = leaf_size(shape)
    group = leaf_size(tuple(shape[a] for a in {a % len(shape) for a in self.axes}))
    return {group: size // group} if size else {}

  def __str__(self):
    return f"mean_over({self.axes})"


@dataclasses.dataclass(frozen=True)
class PerLayer(Rule):
  """Applies ``inner`` to every slice along the stacked ``axes``, on its own.

  Nothing is averaged across the stacked axes. ``inner``'s axes count within
  one slice, i.e. with the stacked axes removed.
  """

  inner: Rule
  axes: tuple[int, ...] = (0,)

  def _split(self, shape, where=_APPLIED):
    ndim = len(shape)
    axes = tuple(_normalize_axis(a, ndim, where, self, "keeps apart stacked") for a in self.axes)
    if len(set(axes)) != len(axes):
      raise ValueError(f"{self!r} names a stacked axis twice (at {where}).")
    keep = tuple(i for i in range(ndim) if i not in axes)
    return axes, keep

  def check(self, shape, where):
    axes, keep = self._split(shape, where)
    self.inner.check(tuple(shape[i] for i in keep), _slice_where(where, axes))

  def bind(self, names):
    try:
      _, keep = self._split(tuple(names))
    except ValueError:  # reported by check with the leaf's path
      return self
    return dataclasses.replace(self, inner=self.inner.bind(tuple(names[i] for i in keep)))

  def for_param(self, param):
    return dataclasses.replace(self, inner=self.inner.for_param(param))

  def __call__(self, d):
    if d.size == 0:
      return d
    axes, keep = self._split(d.shape)
    x = jnp.transpose(d, axes + keep)
    lead = x.shape[: len(axes)]
    x = jax.vmap(self.inner)(x.reshape((-1,) + x.shape[len(axes) :]))
    x = x.reshape(lead + x.shape[1:])
    return jnp.transpose(x, [(axes + keep).index(i) for i in range(d.ndim)])

  def _own_layer_axes(self, shape):
    axes, keep = self._split(shape)
    inner = self.inner.layer_axes(tuple(shape[i] for i in keep))  # a nested stack's axes
    return tuple(sorted(axes + tuple(keep[i] for i in inner)))

  def explain(self, shape):
    axes, keep = self._split(shape)
    inner = self.inner.explain(tuple(shape[i] for i in keep))
    return Choice(
      PerLayer(inner.rule, axes),
      f"each slice along stacked axes {axes} on its own; per slice: {inner.why}",
      inner.ambiguous,
    )

  def groups(self, shape):
    axes, keep = self._split(shape)
    inner = self.inner.groups(tuple(shape[i] for i in keep))
    n = leaf_size(tuple(shape[a] for a in axes))
    return None if inner is None else {s: c * n for s, c in inner.items() if c * n}

  def __str__(self):
    return f"per_layer({self.inner}, axes={self.axes})"


def _axis_arg(name: str, axis: Any) -> int:
  """``axis`` as an ``int`` if it is an integer (negative counts from the end), else raises."""
  if isinstance(axis, bool | np.bool_) or not isinstance(axis, numbers.Integral | np.integer):
    raise ValueError(f"{name} must be an integer (an axis of the leaf), got {axis!r}.")
  return int(axis)


def _axes_arg(name: str, axes: Any) -> tuple[int, ...]:
  """``axes`` (an axis or a sequence of them) as a tuple of ``int``, else raises."""
  if isinstance(axes, numbers.Integral | np.integer) and not isinstance(axes, bool | np.bool_):
    return (int(axes),)
  if not isinstance(axes, Sequence) or isinstance(axes, str):
    raise ValueError(f"{name} must be an integer or a sequence of integers, got {axes!r}.")
  out = tuple(_axis_arg(f"{name}[{i}]", a) for i, a in enumerate(axes))
  twice = sorted({a for a in out if out.count(a) > 1})
  if twice:  # (0, -1) on a rank-2 leaf is found once the rank is known (check)
    raise ValueError(f"{name} names axis {twice[0]} twice, got {axes!r}: give each axis once.")
  return out


def none() -> Rule:
  """No averaging: every entry keeps its own estimate (the rule of biases and scales).

  Returns:
    A :class:`Rule` that returns its input unchanged.
  """
  return NoAveraging()


def blocks(block_size: int, axis: int = 0) -> Rule:
  """Mean over blocks of ``block_size`` consecutive entries along ``axis``.

  For a Flax ``Dense`` kernel ``(in, out)`` use ``axis=0`` (the inputs of one
  output unit); for a ``DenseGeneral`` query kernel ``(embed, heads, head_dim)``
  also ``axis=0``.

  Args:
    block_size: Number of consecutive entries per block, an integer >= 1. A
      last block that is shorter is averaged over its own members.
    axis: The axis along which blocks are formed.

  Returns:
    A :class:`Rule`.

  Raises:
    ValueError: for a ``block_size`` that is not an integer >= 1, or an ``axis`` that is not an
      integer.
  """
  return BlockMean(count("block_size", block_size), _axis_arg("axis", axis))


def mean_over(axes: int | Sequence[int]) -> Rule:
  """Mean over ``axes`` (e.g. a convolution's spatial axes), broadcast back.

  Args:
    axes: An axis or a sequence of axes, each once.

  Returns:
    A :class:`Rule`.

  Raises:
    ValueError: for an axis that is not an integer, or one given twice.
  """
  return AxesMean(_axes_arg("axes", axes))


def per_layer(inner: Rule, n_axes: int = 1, *, axes: int | Sequence[int] | None = None) -> Rule:
  """Applies ``inner`` to every layer of a stack on its own (nothing averaged across layers).

  For parameters stacked by ``nn.scan``/``nn.vmap``/``nnx.scan``/``nnx.vmap``
  (a leading ``layers`` axis) whose axes carry no names, e.g. Dense kernels
  ``(layers, in, out)``: ``per_layer(flax_default(32))`` gives each layer's
  ``(in, out)`` kernel blocks of 32 inputs. Boxed or named parameters need no
  wrapper: the default finds the stacked axis by its name.

  Args:
    inner: The rule for one slice; its axes count within the slice.
    n_axes: Number of leading stacked axes (used when ``axes`` is ``None``).
    axes: The stacked axes, if not the leading ``n_axes``.

  Returns:
    A :class:`Rule`.

  Raises:
    TypeError: for an ``inner`` that is not a rule.
    ValueError: for an ``n_axes`` that is not an integer >= 1, ``axes`` that are not integers
      or name one twice, or both ``n_axes`` (other than 1) and ``axes``.
  """
  if not isinstance(inner, Rule):
    raise TypeError(f"per_layer needs an adahessian_jax.spatial rule, got {inner!r}.")
  if axes is not None and (isinstance(n_axes, bool | np.bool_) or n_axes != 1):  # 1: the default
    raise ValueError(
      f"per_layer was given n_axes={n_axes!r} and axes={axes!r}: give one, the leading n_axes "
      "or the stacked axes themselves."
    )
  if axes is None:
    return PerLayer(inner, tuple(range(count("n_axes", n_axes))))
  return PerLayer(inner, _axes_arg("axes", axes))


def is_rule(x: Any) -> bool:
  """Whether ``x`` is a :class:`Rule` (as ``is_leaf``: a tree of rules stops at them).

  Args:
    x: A node of a tree of rules.

  Returns:
    ``True`` for a :class:`Rule`.
  """
  return isinstance(x, Rule)
