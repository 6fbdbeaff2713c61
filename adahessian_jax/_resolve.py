"""The resolver: assigns a concrete rule to every leaf of a parameter tree, from the ``averaging``
specification (:mod:`adahessian_jax._averaging`), the axis names the leaves carry or are given,
and what the tree shows (:mod:`adahessian_jax._evidence`); applies the rules; lists them
(:func:`describe`) and warns of guesses (:mod:`adahessian_jax._layout_warnings`).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple, TypeGuard

import jax
import jax.numpy as jnp

from adahessian_jax import _evidence, _evidence_names, layout
from adahessian_jax._averaging import AveragingSpec, as_averaging, spec_rules
from adahessian_jax._flax_default import FlaxDefault, check_rank, flax_default
from adahessian_jax._layout_warnings import (
  WARN_LEAVES,
  LayoutGuessWarning,
  guess_warning,
  masked_hint,
  nnx_module_hint,
  user_stacklevel,
)
from adahessian_jax._listing import Listing, Row, ambiguity_error
from adahessian_jax._rules import Rule, is_rule, leaf_size
from adahessian_jax._validation import flag, path_str
from adahessian_jax.layout import AxisNames


def _leaf_names(
  info: layout.LeafLayout, where: str, shape, given: dict[str, AxisNames | None] | None
) -> AxisNames | None:
  """The axis names of one leaf: its own, else those :func:`named` gave for its path."""
  names = info.names
  if names is None and given is not None:
    if where not in given:
      raise ValueError(
        f"spatial.named has no entry for the leaf at {where}; its source has "
        f"{len(given)} leaves, e.g. {list(given)[:3]}. Pass names for the same tree the "
        "optimizer sees (same paths)."
      )
    names = given[where]
  if names is not None:
    check_rank(names, shape, where)
  return names


def _averages_nothing(rule: Rule, shape) -> bool:
  """Whether ``rule`` leaves every entry of a leaf of ``shape`` alone (groups of one)."""
  try:
    return rule.groups(shape) == {1: leaf_size(shape)}
  except ValueError:
    return False


def _unread(averaging, params, block_size, given_rules=None):
  """The spec, the leaves' paths as the evidence reads them
  (:func:`~adahessian_jax._evidence_names.read_path`), their rules before the tree is read
  (``given_rules`` if known), paths as text, shapes and the axis names each leaf carries or is
  given."""
  spec = as_averaging(averaging)
  infos = layout.leaves(params)
  paths = [_evidence_names.read_path(x.path) for x in infos]
  unbound = given_rules
  if unbound is None:
    unbound = spec_rules(spec.rules, params, infos, flax_default(block_size))
    unbound = [
      r.for_param(_evidence_names.param_name(path)) for r, path in zip(unbound, paths, strict=True)
    ]
  wheres = [jax.tree_util.keystr(info.path) for info in infos]
  shapes = [tuple(jnp.shape(info.leaf)) for info in infos]
  given = dict(spec.names) if spec.names is not None else None
  names = [_leaf_names(*args, given) for args in zip(infos, wheres, shapes, strict=True)]
  return spec, paths, unbound, wheres, shapes, names


def _unresolved(rule: Rule) -> TypeGuard[FlaxDefault]:
  """Whether ``rule`` is the default rule, not yet resolved on a tree."""
  return isinstance(rule, FlaxDefault) and not rule.resolved


class _Plan(NamedTuple):
  """:func:`_plan`'s reading of a tree, one entry per leaf in ``jax.tree.leaves`` order.

  Attributes:
    rules: Every leaf's rule, bound to its axis names (its own, given, or read from the tree by
      :mod:`adahessian_jax._evidence`).
    rows: :func:`describe`'s row for every leaf.
    given_rules: The rule ``averaging`` gave each leaf before the tree was read (pass those as
      ``given_rules`` to read a tree with the same paths again without calling a user's
      callable again).
    read_off_shapes: The paths of the leaves whose rule the default reads off their shapes (no
      axis names, no rule of their own), whose reading can change when the shapes do, e.g.
      inside ``shard_map``, where the optimizer sees each shard's block of a split parameter.
  """

  rules: list[Rule]
  rows: list[Row]
  given_rules: list[Rule]
  read_off_shapes: list[str]


def _plan(averaging, params, block_size, strict_mode, given_rules=None) -> _Plan:
  """Reads every leaf's rule off ``averaging`` and the tree (see :class:`_Plan`)."""
  strict_mode = flag("strict", strict_mode)  # describe's and resolve_rules'
  spec, paths, unbound, wheres, shapes, names = _unread(averaging, params, block_size, given_rules)
  # What the tree shows about the leaves under the default rule, given the axis roles it knows.
  roles = [r.roles() if _unresolved(r) else None for r in unbound]
  readings = _evidence.read(paths, shapes, names, roles)
  bound, rows = [], []
  for i, (rule, where, shape) in enumerate(zip(unbound, wheres, shapes, strict=True)):
    reading = readings[i]
    unread = rule if reading.param is None else rule.for_param(reading.param)
    rule = unread if reading.names is None else unread.bind(reading.names)
    if isinstance(rule, FlaxDefault):
      rule = dataclasses.replace(rule, resolved=True)
    rule.check(shape, where)
    choice = rule.explain(shape)
    unsure = reading.unsure
    if unsure is not None and _averages_nothing(rule, shape):
      # A leaf that averages nothing with or without the reading (a bias or scale, stacked or
      # not) is no guess.
      own_names = names[i]
      own = unread if own_names is None else unread.bind(own_names)
      if reading.moot or _averages_nothing(own, shape):
        unsure = None
    note = reading.note + (f"; AMBIGUOUS ({unsure})" if unsure is not None else "")
    guess = choice.ambiguous or unsure is not None
    if guess and leaf_size(shape) == 0:
      # Every reading of a leaf without entries averages nothing: no guess to warn of or refuse.
      guess, note = False, note + "; no entries, so any reading averages the same"
    bound.append(rule)
    rows.append(
      Row(where, shape, reading.names, choice.rule, choice.why + note, rule.groups(shape), guess)
    )
  if strict_mode or spec.strict:
    ambiguous = [r for r in rows if r.ambiguous]
    if ambiguous:
      # As the guess warning, name spatial.named(model): nnx.Optimizer's init sees variables.
      raise ambiguity_error(ambiguous, nnx_module_hint(averaging, params))
  read_off_shapes = [
    where
    for rule, where, own in zip(unbound, wheres, names, strict=True)
    if _unresolved(rule) and own is None
  ]
  return _Plan(bound, rows, unbound, read_off_shapes)


def resolve_rules(
  averaging: AveragingSpec,
  params: Any,
  block_size: int = 1,
  *,
  strict: bool = False,
  warn: bool = False,
) -> Any:
  """Assigns a :class:`Rule` to every leaf of ``params``.

  Axis names carried by the leaves (Linen boxes, NNX variables; see
  :mod:`adahessian_jax.layout`) or given with :func:`named` are bound into
  the rules, so :func:`flax_default` can keep stacked layers and heads apart.

  Args:
    averaging: ``None`` (use :func:`flax_default` with ``block_size``), a single
      :class:`Rule` for every leaf, a callable ``(path, leaf) -> Rule | None``
      (``None`` meaning the default; ``path`` without a box's ``.value``), a
      pytree prefix of ``params`` whose leaves are rules (or ``None`` for the
      default), or an :class:`Averaging` from :func:`named` / :func:`strict`.
    params: The parameter pytree (arrays or shape-dtype structs), boxed or not.
    block_size: The block size of the default rule.
    strict: Refuse ambiguous leaves (as :func:`strict` does).
    warn: Issue a :class:`LayoutGuessWarning` naming the ambiguous leaves, if any (the
      optimizer's ``init`` does).

  Returns:
    A pytree with the structure of ``params`` (boxes included) whose leaves are
    rules, for :func:`apply_rules`.

  Raises:
    ValueError: if a rule or axis names do not fit their leaf, ``averaging``
      has another structure, or (strict) some leaves are ambiguous, naming them; for a
      ``strict`` or ``warn`` that is not a bool.
    TypeError: for an entry of ``averaging`` that is neither a rule nor ``None``, or an
      ``averaging`` callable that returns anything else for a leaf.
  """
  return resolve_rules_and_read_off(averaging, params, block_size, strict, warn)[0]


def resolve_rules_and_read_off(
  averaging: AveragingSpec, params: Any, block_size: int, strict: bool = False, warn: bool = False
) -> tuple[Any, list[str]]:
  """:func:`resolve_rules`'s tree of rules, and the paths of the leaves read off their shapes
  (:attr:`_Plan.read_off_shapes`, for :func:`warn_shard_shapes`: so the tree is read once).

  Args:
    averaging, params, block_size, strict, warn: As for :func:`resolve_rules`.

  Returns:
    ``(rules, read_off_shapes)``: the tree of rules and a list of leaf paths.
  """
  warn = flag("warn", warn)
  plan = _plan(averaging, params, block_size, strict)
  rows = plan.rows
  guesses = [r for r in rows if r.ambiguous]
  if warn and guesses:
    message = guess_warning(guesses) + masked_hint(averaging, params, block_size)
    message += nnx_module_hint(averaging, params)
    warnings.warn(message, LayoutGuessWarning, stacklevel=user_stacklevel())
  if warn:
    _warn_nnx_names_dropped(averaging, params, block_size, rows, plan.given_rules)
  return jax.tree.unflatten(jax.tree.structure(params), plan.rules), plan.read_off_shapes


def _pure_nnx_twin(params: Any) -> Any | None:
  """``params`` with every NNX variable replaced by its value (what ``nnx.as_pure`` gives), or
  ``None`` if no NNX variable in it carries axis names."""
  nodes = layout.nnx_nodes(params)
  if not any(layout.is_nnx_variable(x) and layout.axis_names_of(x) is not None for x in nodes):
    return None
  return layout.unboxed(params, layout.is_nnx_variable)


def _warn_nnx_names_dropped(
  averaging: AveragingSpec,
  params: Any,
  block_size: int,
  rows: Sequence[Row],
  given_rules: Sequence[Rule],
) -> None:
  """Warns when ``params`` holds NNX variables whose axis names decide a leaf's rule that the
  plain arrays (``nnx.as_pure``) would not: ``nnx.Optimizer`` calls ``init`` on the variables
  but ``update`` on the plain arrays, where the names are gone. A stack of layers without biases
  (kernels ``(layers, in, out)``) was then averaged across its layers at every update, though
  ``init`` had read the names and warned of nothing.

  ``rows`` and ``given_rules`` are :func:`_plan`'s for ``params``. The plain arrays have the same
  canonical paths and leaves, so ``averaging`` gives them the same rules: the plain reading
  reuses ``given_rules`` (an averaging callable runs once per leaf at ``init``)."""
  twin = _pure_nnx_twin(params)
  if twin is None or len(layout.leaves(twin)) != len(rows):
    return
  spec = as_averaging(averaging)
  try:  # the plain arrays' reading, never refused here (strict mode refuses it at update)
    plain = _plan(
      dataclasses.replace(spec, strict=False), twin, block_size, False, given_rules
    ).rows
  except ValueError:
    return
  # In strict mode update refuses an ambiguous plain reading itself.
  lost = [
    (r, p)
    for r, p in zip(rows, plain, strict=True)
    if r.rule != p.rule and not (spec.strict and p.ambiguous)
  ]
  if not lost:
    return
  listed = "".join(
    f"\n  {r.path}: shape {r.shape}, names {r.names}: {r.rule} by its names, {p.rule} without"
    for r, p in lost[:WARN_LEAVES]
  )
  more = f"\n  ... and {len(lost) - WARN_LEAVES} more" if len(lost) > WARN_LEAVES else ""
  n = f"{len(lost)} {'leaf' if len(lost) == 1 else 'leaves'}"
  warnings.warn(
    f"the axis names of the NNX variables decide the spatial averaging of {n}, but "
    "nnx.Optimizer.update hands the transform plain arrays (nnx.as_pure), without the names, "
    f"and there the default rule reads them otherwise:{listed}{more}\n"
    "Give the optimizer the names: adahessian(..., averaging=spatial.named(model)), with the "
    "nnx.Module (its variables' names, and for those without, the layouts of their modules' "
    "types), or spatial.named(nnx.state(model, wrt)) with the nnx.Optimizer's wrt filter. (A "
    "tx.update called with the variables themselves, not through nnx.Optimizer, does see the "
    "names; named() is right there too.)",
    LayoutGuessWarning,
    stacklevel=user_stacklevel(),
  )


def leaf_rules(averaging: AveragingSpec, params: Any, block_size: int = 1) -> list[Rule]:
  """:func:`resolve_rules`'s rules as a list, one per leaf in ``jax.tree.leaves`` order."""
  return _plan(averaging, params, block_size, False).rules


def apply_rules(rules: Any, tree: Any) -> Any:
  """Applies a tree of rules (from :func:`resolve_rules`) leaf by leaf.

  Args:
    rules: A pytree whose leaves are :class:`Rule` objects, from :func:`resolve_rules`.
    tree: A pytree like the params, e.g. ``|Hessian diagonal estimate|``.

  Returns:
    ``tree`` with every leaf replaced by its rule's average of it.

  Raises:
    ValueError: naming the leaf's path, if a rule does not fit its leaf (an axis beyond its rank).
    TypeError: naming the leaf's path, for a leaf of ``rules`` that is not a :class:`Rule`.
  """

  def apply(path, rule, d):
    if not is_rule(rule):  # Python's "'int' object has no attribute 'check'" names no leaf
      raise TypeError(
        f"apply_rules: rules has {rule!r} at {path_str(path)}, which is not a spatial rule: pass "
        "the tree of rules spatial.resolve_rules(averaging, params) returns."
      )
    rule.check(tuple(jnp.shape(d)), path_str(path))
    return rule(d)

  return jax.tree_util.tree_map_with_path(apply, rules, tree, is_leaf=is_rule)


def describe(
  params: Any, averaging: AveragingSpec = None, block_size: int = 1, *, strict: bool = False
) -> Listing:
  """Lists what the averaging does to every leaf: path, shape, names, rule, why, groups.

  Example::

    print(spatial.describe(params, block_size=32))

  Args:
    params: The parameter pytree, boxed or not (arrays or shape-dtype structs,
      e.g. from ``jax.eval_shape``).
    averaging: As for :func:`resolve_rules` (the optimizer's ``averaging``).
    block_size: The block size of the default rule (the optimizer's).
    strict: Raise instead of listing if some leaves are ambiguous.

  Returns:
    A :class:`Listing`; ``str()`` of it is a table, ``.rows`` the rows and
    ``.ambiguous`` the rows :func:`strict` would refuse.

  Raises:
    ValueError: as :func:`resolve_rules` raises it; with ``strict``, for ambiguous leaves,
      naming them.
    TypeError: as :func:`resolve_rules` raises it (an entry of ``averaging`` that is no rule).
  """
  return Listing(tuple(_plan(averaging, params, block_size, strict).rows))
