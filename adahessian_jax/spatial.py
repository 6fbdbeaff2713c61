"""Spatial averaging of a Hessian-diagonal estimate, by reshaping.

AdaHessian replaces every entry of the (absolute) Hessian-diagonal estimate by
the mean over a small group of entries that share structure (paper, Eq. 7):
the spatial positions of one convolution filter, or a block of consecutive
inputs of one output unit of a dense layer. This module implements the groups
as *rules*, small immutable objects mapping an array to an array of the same
shape, and a resolver that assigns a rule to every leaf of a parameter tree.

The default rule (:func:`flax_default`) follows Flax's layouts. Where a leaf's
axes are named (Linen's boxed ``nn.LogicallyPartitioned``/``nn.Partitioned``
params, NNX sharding metadata, or names given with :func:`named`; see
:mod:`adahessian_jax.layout`), each name's *role* decides (``AXIS_ROLES``,
extensible with ``flax_default(axis_roles=...)``):

===========  ==========================  ========================================
role         default names               averaging
===========  ==========================  ========================================
stacked      layers, layer, stage,       never across: each slice (one layer, one
             stages, scan, repeat,       expert) is averaged on its own by the
             block, blocks, exp,         rules below
             expert, experts,
             num_experts
spatial      height, width, time,        mean over these axes (``Conv`` kernel)
             spatial, window,
             conv_window, kernel_size
vocab        vocab, vocab_size,          never across (a row per token): blocks
             num_embeddings, position,   of ``block_size`` along the first other
             positions                   axis (``embed``), as the reference code
                                         averages ``(num, dim)`` tables
heads        heads, head, q_heads,       never across: blocks of ``block_size``
             kv_heads, num_heads         along the first other axis, the input
                                         (``embed`` of a query kernel ``(embed,
                                         heads, head_dim)``, ``head_dim`` of an
                                         output kernel ``(heads, head_dim,
                                         embed)``); per-head bias: none
features     embed, mlp, kv, head_dim,   ``Dense``/``DenseGeneral`` axes: blocks
             joined_kv, qkv, hidden,     of ``block_size`` along axis 0, the
             features, channels          input
===========  ==========================  ========================================

The checks run in this order: stacked axes are split off first, then rank
<= 1 (none), spatial, vocab, heads, rank 2 (blocks along axis 0), all axes
``features`` (blocks along axis 0). Vocab and heads blocks along an axis of no
known role, where another axis could be the input, and rank-2 blocks along an
axis 0 whose name has no known role beside one that has (``(members, embed)``) are
a guess (ambiguous with ``block_size > 1``). What remains, and every leaf without
names or with names of no known role, follows the rank:

===========  ==========================  =======================================
rank         Flax meaning                averaging
===========  ==========================  =======================================
0, 1         scalar, bias, scale         none
2            ``Dense`` kernel (in, out)  blocks of ``block_size`` consecutive
                                         inputs (axis 0) of each output unit;
                                         ``block_size=1`` means none
3 or more    ``Conv`` kernel             mean over the spatial axes
             (``*spatial, in, out``)     ``0 .. rank-3``, broadcast back
===========  ==========================  =======================================

Whatever the names and rank, a leaf whose Flax name (last path key) is
``bias`` (or Haiku's ``offset``; a ``b`` or ``<name>_b`` beside its ``w`` or ``<name>_w``; a
name with the word ``bias``, ``q_bias``; a mixture's ``(experts, out)`` beside its ``(experts,
in, out)`` kernel) is not averaged (a ``DenseGeneral`` ``(*features)``,
attention ``(heads, head_dim)`` or ``Einsum`` bias is one entry per output), nor one
named ``scale`` (a norm's scale, stacked or over several feature axes; also
``nn.WeightNorm``'s ``"<layer>/<path>/scale"``), and an ``embedding`` of rank >= 2
without a ``vocab`` axis name (``nn.Embed``/``nnx.Embed`` ``(num_embeddings,
features)``, unnamed or e.g. ``(None, "embed")``; Haiku's ``embeddings``; any name with a
word of a table: ``pos_embed``, ``position_embeddings``) keeps its rows apart: blocks along
its last axis, ambiguous when ``block_size > 1`` for a name with other words too
(``w_embed``: a kernel could have that name); one with the word ``bias`` in its name or its
module's (T5's ``relative_attention_bias`` ``(num_buckets, heads)``) is not averaged. An
unnamed ``weight`` (also ``in_proj_weight``,
``weight_ih_l0``) is taken for a PyTorch/Equinox weight, output axis first:
``(out, in)`` blocks along axis 1, ``(out, in, *spatial)`` the mean over axes ``2 ..``
(ambiguous where the layout matters, unless its bias is its first axis, which also makes a
``kernel`` ``(out, in)``, past any stacked axes: Hugging Face's ``FlaxConv1D``); its ``bias``
(``(out,)``, Equinox's ``Conv`` ``(out, 1, ..., 1)``) shows the stacked axes of an
``eqx.filter_vmap`` ensemble (weight ``(members, out, in)``, bias ``(members, out)``).

The projections of Flax's attention modules (``nn.MultiHeadDotProductAttention``,
``nnx.MultiHeadAttention``) are recognised without names by their module names and
shapes: a module holding a rank-3 ``query`` kernel ``(embed, heads, head_dim)``
and a rank-3 ``out`` kernel ``(heads, head_dim, embed)`` gives these and its
``key``/``value`` kernels of the same head size (and as many heads, or a divisor of them)
those axis names. Attention of other names (``q_proj``/``o_proj``, ``wq``/``wo``) is told by
the same shapes where ``embed`` differs from ``heads`` and ``head_dim``. A mixture's weights
``(experts, in, out)`` with a word ``moe``, ``expert`` or ``experts`` in their name or their
module's (``moe/wi``; not further up the path) keep each expert apart.

A stack of layers without names (``nn.scan``/``nnx.vmap`` without axis metadata) is found
from a bias that repeats its kernel's leading axes (kernel ``(layers, in, out)``, bias
``(layers, out)``), from Linen's automatic module name (``Dense_0``: a kernel of rank 2; an
``nn.scan``'s ``ScanBlock_0`` above it), from ``nnx.LoRA``'s ``lora_a`` and ``lora_b``, or from
a Flax attention module's ``query`` and ``out`` kernels of rank 4 or more (one layer's have rank 3);
the module's leaves, and their unnamed relatives in the stack, are kept apart per layer.
A kernel with two spatial axes or more of one size (a square window, 3x3) beside its bias
``(out,)``, or under a convolution's name (``Conv_0``, ``conv2_d``, ``conv1``), is a
convolution's for sure, and a kernel beside a bias that is its trailing axes, two or more
(``(heads, head_dim)``; any under Linen's name ``DenseGeneral_0``), a ``DenseGeneral``'s (blocks
along its last input axis, the input axes before it kept apart as heads).

Other leaves of rank >= 3 without names are ambiguous: a ``Conv`` 1-D kernel
``(width, in, out)``, a ``DenseGeneral`` kernel ``(embed, heads, head_dim)`` and a
bias-less stack of ``Dense`` kernels ``(layers, in, out)``, under names you chose, share it.
The default treats it as a convolution, and the optimizer's ``init`` warns
(:class:`LayoutGuessWarning`) naming such leaves; :func:`describe` lists every leaf with the
rule chosen and why, and :func:`strict` (or ``resolve_rules(..., strict=True)``) refuses such
leaves with an error naming them all. Explicit rules always win: pass a rule, a
pytree prefix of rules, or a callable on ``(path, leaf)`` through the
``averaging`` argument of :func:`adahessian_jax.scale_by_adahessian`;
:func:`per_layer` applies a rule to each slice of a stack.

Any size works: a last block shorter than ``block_size`` is averaged over its
own members (the reference PyTorch code raises an error there).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple, TypeGuard

import jax
import jax.numpy as jnp

from adahessian_jax import _evidence, layout
from adahessian_jax._averaging import Averaging, named, spec_rules, strict
from adahessian_jax._averaging import AveragingSpec as AveragingSpec
from adahessian_jax._averaging import as_averaging as as_averaging
from adahessian_jax._averaging import check_averaging as check_averaging
from adahessian_jax._flax_default import AXIS_ROLES, flax_default
from adahessian_jax._flax_default import FlaxDefault as FlaxDefault
from adahessian_jax._flax_default import reads_output_first as reads_output_first
from adahessian_jax._layout_warnings import (
  WARN_LEAVES,
  LayoutGuessWarning,
  guess_warning,
  masked_hint,
  nnx_module_hint,
  nnx_nodes,
)
from adahessian_jax._layout_warnings import user_stacklevel as user_stacklevel
from adahessian_jax._layout_warnings import warn_shard_shapes as warn_shard_shapes
from adahessian_jax._listing import Listing, Row, ambiguity_error
from adahessian_jax._rules import AxesMean as AxesMean
from adahessian_jax._rules import BlockMean as BlockMean
from adahessian_jax._rules import Choice, Rule, blocks, leaf_size, mean_over, none, per_layer
from adahessian_jax._rules import NoAveraging as NoAveraging
from adahessian_jax._rules import PerLayer as PerLayer
from adahessian_jax._rules import is_rule as is_rule
from adahessian_jax._validation import flag, path_str
from adahessian_jax.layout import (
  AxisNames,
)

__all__ = [
  "AXIS_ROLES",
  "Averaging",
  "Choice",
  "LayoutGuessWarning",
  "Listing",
  "Row",
  "Rule",
  "apply_rules",
  "blocks",
  "describe",
  "flax_default",
  "mean_over",
  "named",
  "none",
  "per_layer",
  "resolve_rules",
  "strict",
]


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
  if names is None:
    return None
  # By position, one entry per axis: a spec shorter than the rank is refused, not padded, since
  # names one short are also what a stack whose transform did not add the stacked axis carries.
  if len(names) != len(shape):
    stale = (
      " Names one short of the rank are those of one layer of a stack whose transform did not "
      "add the stacked axis: nnx.vmap/nnx.scan need transform_metadata={nnx.PARTITION_NAME: "
      "'layers'}, nn.scan/nn.vmap metadata_params={nn.PARTITION_NAME: 'layers'}."
      if len(names) == len(shape) - 1
      else ""
    )
    raise ValueError(
      f"the axis names {names} of the leaf at {where} have {len(names)} entries, but its "
      f"shape {shape} has rank {len(shape)}.{stale}"
    )
  return names


def _averages_nothing(rule: Rule, shape) -> bool:
  """Whether ``rule`` leaves every entry of a leaf of ``shape`` alone (groups of one)."""
  try:
    return rule.groups(shape) == {1: leaf_size(shape)}
  except ValueError:
    return False


def _unread(averaging, params, block_size, given_rules=None):
  """The spec, the leaves, their rules before the tree is read (``given_rules`` if known), paths
  as text, shapes and the axis names each leaf carries or is given."""
  spec = as_averaging(averaging)
  infos = layout.leaves(params)
  unbound = given_rules
  if unbound is None:
    unbound = spec_rules(spec.rules, params, infos, flax_default(block_size))
    unbound = [
      r.for_param(_evidence.param_name(x.path)) for r, x in zip(unbound, infos, strict=True)
    ]
  wheres = [jax.tree_util.keystr(info.path) for info in infos]
  shapes = [tuple(jnp.shape(info.leaf)) for info in infos]
  given = dict(spec.names) if spec.names is not None else None
  names = [_leaf_names(*args, given) for args in zip(infos, wheres, shapes, strict=True)]
  return spec, infos, unbound, wheres, shapes, names


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
  spec, infos, unbound, wheres, shapes, names = _unread(averaging, params, block_size, given_rules)
  paths = [x.path for x in infos]
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
    bound.append(rule)
    rows.append(
      Row(
        where,
        shape,
        reading.names,
        choice.rule,
        choice.why + note,
        rule.groups(shape),
        choice.ambiguous or unsure is not None,
      )
    )
  if strict_mode or spec.strict:
    ambiguous = [r for r in rows if r.ambiguous]
    if ambiguous:
      raise ambiguity_error(ambiguous)
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
  nodes = nnx_nodes(params)
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


# The classes keep this module as their home: their repr, pickles and the docs name
# adahessian_jax.spatial, where users import them from.
for _cls in (
  Averaging,
  AxesMean,
  BlockMean,
  Choice,
  FlaxDefault,
  LayoutGuessWarning,
  Listing,
  NoAveraging,
  PerLayer,
  Row,
  Rule,
):
  _cls.__module__ = __name__
del _cls
