"""Spatial averaging of a Hessian-diagonal estimate, by reshaping.

AdaHessian replaces every entry of the (absolute) Hessian-diagonal estimate by
the mean over a small group of entries that share structure (paper, Eq. 7):
the spatial positions of one convolution filter, or a block of consecutive
inputs of one output unit of a dense layer. This module implements the groups
as *rules*, small immutable objects mapping an array to an array of the same
shape, and a resolver that assigns a rule to every leaf of a parameter tree.

The default rule (:func:`flax_default`) follows Flax's parameter layouts:

===========  ==========================  =======================================
rank         Flax meaning                averaging
===========  ==========================  =======================================
0, 1         scalar, bias, scale         none
2            ``Dense`` kernel (in, out)  blocks of ``block_size`` consecutive
                                         inputs (axis 0) of each output unit;
                                         ``block_size=1`` means none
3, 4, 5      ``Conv`` kernel             mean over the spatial axes
             (``*spatial, in, out``)     ``0 .. rank-3``, broadcast back
===========  ==========================  =======================================

Rank 3 is ambiguous: a ``Conv`` 1-D kernel ``(width, in, out)`` and a
``DenseGeneral`` attention kernel ``(embed, heads, head_dim)`` share it. The
default treats it as a convolution (mean over axis 0). For attention kernels
pass a rule explicitly, e.g. ``blocks(32, axis=0)`` for query/key/value
kernels, through the ``averaging`` argument of
:func:`adahessian_jax.scale_by_adahessian` (a rule, a pytree prefix of rules,
or a callable on ``(path, leaf)``).

Any size works: a last block shorter than ``block_size`` is averaged over its
own members (the reference PyTorch code raises an error there).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from adahessian_jax._validation import positive_int

__all__ = [
  "Rule",
  "blocks",
  "flax_default",
  "mean_over",
  "none",
  "resolve_rules",
  "apply_rules",
]


class Rule(abc.ABC):
  """A spatial-averaging rule: maps an array to one of the same shape."""

  @abc.abstractmethod
  def __call__(self, d: jax.Array) -> jax.Array:
    """Returns ``d`` with every entry replaced by the mean over its group."""

  def check(self, shape: tuple[int, ...], where: str) -> None:  # noqa: B027
    """Raises ``ValueError`` if the rule cannot apply to ``shape``."""


def _normalize_axis(axis: int, ndim: int, where: str, rule: Rule) -> int:
  if not -ndim <= axis < ndim:
    raise ValueError(
      f"{rule!r} averages over axis {axis}, but the leaf at {where} has rank {ndim}."
    )
  return axis % ndim


@dataclasses.dataclass(frozen=True)
class NoAveraging(Rule):
  """Leaves the estimate as it is."""

  def __call__(self, d):
    return d


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
    axis = self.axis % d.ndim
    x = jnp.moveaxis(d, axis, 0)
    n, rest = x.shape[0], x.shape[1:]
    b = min(self.block_size, n)
    n_full = (n // b) * b
    parts = []
    if n_full:
      full = x[:n_full].reshape((n // b, b) + rest)
      full = jnp.broadcast_to(full.mean(axis=1, keepdims=True), full.shape)
      parts.append(full.reshape((n_full,) + rest))
    if n_full < n:
      tail = x[n_full:]
      parts.append(jnp.broadcast_to(tail.mean(axis=0, keepdims=True), tail.shape))
    x = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)
    return jnp.moveaxis(x, 0, axis)


@dataclasses.dataclass(frozen=True)
class AxesMean(Rule):
  """Mean over ``axes``, broadcast back to the original shape."""

  axes: tuple[int, ...]

  def check(self, shape, where):
    for a in self.axes:
      _normalize_axis(a, len(shape), where, self)

  def __call__(self, d):
    if not self.axes:
      return d
    return jnp.broadcast_to(d.mean(axis=self.axes, keepdims=True), d.shape)


@dataclasses.dataclass(frozen=True)
class FlaxDefault(Rule):
  """The rank-based default for Flax layouts (see the module docstring)."""

  block_size: int = 1

  def _for_rank(self, ndim: int) -> Rule:
    if ndim <= 1:
      return NoAveraging()
    if ndim == 2:
      return BlockMean(self.block_size, axis=0)
    return AxesMean(tuple(range(ndim - 2)))

  def __call__(self, d):
    return self._for_rank(d.ndim)(d)


def none() -> Rule:
  """No averaging."""
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
  """
  return BlockMean(positive_int("block_size", block_size), int(axis))


def mean_over(axes: int | Sequence[int]) -> Rule:
  """Mean over ``axes`` (e.g. a convolution's spatial axes), broadcast back.

  Args:
    axes: An axis or a sequence of axes.

  Returns:
    A :class:`Rule`.
  """
  if isinstance(axes, int):
    axes = (axes,)
  return AxesMean(tuple(int(a) for a in axes))


def flax_default(block_size: int = 1) -> Rule:
  """The rank-based default rule for Flax layouts.

  Rank 0-1: none; rank 2 ``(in, out)``: blocks of ``block_size`` along axis 0;
  rank >= 3 ``(*spatial, in, out)``: mean over axes ``0 .. rank-3``.

  Args:
    block_size: Block size for rank-2 kernels, an integer >= 1.

  Returns:
    A :class:`Rule`.
  """
  return FlaxDefault(positive_int("block_size", block_size))


AveragingSpec = Any  # Rule | Callable[[path, leaf], Rule | None] | pytree prefix of Rule | None


def resolve_rules(averaging: AveragingSpec, params: Any, block_size: int = 1) -> Any:
  """Assigns a :class:`Rule` to every leaf of ``params``.

  Args:
    averaging: ``None`` (use :func:`flax_default` with ``block_size``), a single
      :class:`Rule` for every leaf, a callable ``(path, leaf) -> Rule | None``
      (``None`` meaning the default), or a pytree prefix of ``params`` whose
      leaves are rules.
    params: The parameter pytree (arrays or shape-dtype structs).
    block_size: The block size of the default rule.

  Returns:
    A pytree with the structure of ``params`` whose leaves are rules.

  Raises:
    ValueError: if a rule does not fit its leaf or ``averaging`` has another
      structure.
  """
  default = flax_default(block_size)
  is_rule = lambda x: isinstance(x, Rule)
  if averaging is None:
    rules = jax.tree.map(lambda _: default, params)
  elif is_rule(averaging):
    rules = jax.tree.map(lambda _: averaging, params)
  elif callable(averaging):

    def pick(path, leaf):
      rule = averaging(path, leaf)
      if rule is None:
        return default
      if not is_rule(rule):
        raise TypeError(
          f"averaging callable returned {rule!r} for {jax.tree_util.keystr(path)}; "
          "expected an adahessian_jax.spatial rule or None."
        )
      return rule

    rules = jax.tree_util.tree_map_with_path(pick, params)
  else:
    try:
      rules = jax.tree.broadcast(averaging, params, is_leaf=is_rule)
    except (ValueError, TypeError) as e:
      raise ValueError(
        "averaging must be None, a spatial rule, a callable (path, leaf) -> rule, or a "
        f"pytree prefix of params with rules as leaves; broadcasting failed: {e}"
      ) from e
    for r in jax.tree.leaves(rules, is_leaf=is_rule):
      if not is_rule(r):
        raise TypeError(f"averaging tree contains {r!r}, which is not a spatial rule.")

  def check(path, rule, leaf):
    rule.check(tuple(jnp.shape(leaf)), jax.tree_util.keystr(path))
    return rule

  return jax.tree_util.tree_map_with_path(check, rules, params, is_leaf=is_rule)


def apply_rules(rules: Any, tree: Any) -> Any:
  """Applies a tree of rules (from :func:`resolve_rules`) leaf by leaf."""
  return jax.tree.map(lambda rule, d: rule(d), rules, tree, is_leaf=lambda x: isinstance(x, Rule))
