"""Reading a parameter tree for what the axes of its unnamed leaves are.

Flax's default layouts leave most parameters without axis names, and the rank
alone cannot tell a ``Conv`` kernel ``(width, in, out)`` from an attention's
``DenseGeneral`` kernel ``(embed, heads, head_dim)`` or a stack of ``Dense``
kernels ``(layers, in, out)``. The tree around a leaf often can: its module's
name (Linen's ``Dense_0``, ``conv1``, ``q_proj``, ``moe``), its bias's shape, the
shapes of its module's other kernels, its named relatives in a stack. This module
reads that evidence and gives such leaves the axis names it shows, which
:mod:`adahessian_jax.spatial` then binds into the default rule like names the
user gave. Every reader takes the leaves as parallel lists (those of paths, shapes,
axis names, and the axis roles of each leaf's default rule, ``None`` for a leaf with a
rule of its own, which no reader touches, that it needs) and returns what it found by
leaf index (``{leaf index: ...}``, or a set of indices); :func:`read` runs them in
order and gives every leaf a :class:`Reading`.

The readers live in modules by what they read: a leaf's path
(:mod:`adahessian_jax._evidence_names`), biases (:mod:`adahessian_jax._evidence_biases`), stacks of
layers (:mod:`adahessian_jax._evidence_stacks`, those Linen's automatic names show in
:mod:`adahessian_jax._evidence_linen`), kernels past their stacks
(:mod:`adahessian_jax._evidence_kernels`) and attention projections
(:mod:`adahessian_jax._evidence_attention`), with the axis names by their roles
(:mod:`adahessian_jax._evidence_roles`). This module keeps :class:`Reading` and :func:`read`, which
runs them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax

from adahessian_jax._evidence_attention import flax_attention_names
from adahessian_jax._evidence_biases import (
  bias_tables,
  haiku_biases,
  named_biases,
  weights_by_bias,
)
from adahessian_jax._evidence_kernels import (
  conv_kernels,
  dense_general_kernels,
  elementwise_kernels,
  expert_biases,
  expert_stacks,
  torch_lora_factors,
)
from adahessian_jax._evidence_names import param_name
from adahessian_jax._evidence_roles import role_name, stacked_prefix
from adahessian_jax._evidence_stacks import in_named_stacks, stacks_by_evidence, vectors_in_stacks
from adahessian_jax.layout import EXPERT_AXES, STACKED, AxisNames, axis_role


class Reading(NamedTuple):
  """What the tree shows about one leaf (:func:`read`).

  Attributes:
    names: Its axis names: its own, or those the evidence gives it (``None``: neither).
    note: How the evidence read it, to append to :func:`adahessian_jax.spatial.describe`'s
      reason (``""`` if it did not).
    unsure: Why that reading is a guess, if it is, else ``None``.
    param: What the evidence says the leaf is, where its own name (:func:`param_name`) does not:
      :data:`WEIGHT_BY_BIAS` and :data:`WEIGHT_INPUT_FIRST` (:func:`weights_by_bias`),
      :data:`LORA_OUTPUT_FIRST` (:func:`torch_lora_factors`),
      :data:`BIAS_TABLE`
      (:func:`bias_tables`), :data:`ELEMENTWISE` (:func:`elementwise_kernels`) or ``"bias"``
      (:func:`haiku_biases`, :func:`named_biases`, :func:`expert_biases`); else ``None``.
    moot: Whether the guess is only of where a ``Dense`` kernel's stacked axis is, which no
      rule that averages nothing depends on.
  """

  names: AxisNames | None
  note: str
  unsure: str | None
  param: str | None
  moot: bool = False


def read(
  paths: Sequence[Any],
  shapes: Sequence[tuple[int, ...]],
  names: Sequence[AxisNames | None],
  roles: Sequence[Mapping[str, str] | None],
) -> list[Reading]:
  """Reads the tree for what the axes of its unnamed leaves are.

  First the stacked axes that boxed leaves left unnamed (:func:`_unnamed_leading_stacks`), then
  stacks of layers, from a module's own evidence (:func:`stacks_by_evidence`) and from named
  relatives (:func:`in_named_stacks`), and the vectors of a stack that nothing names
  (:func:`vectors_in_stacks`, a guess); the layouts a weight's bias shows, PyTorch's or Flax's
  (:func:`weights_by_bias`), and a LoRA pair's
  (:func:`torch_lora_factors`); the tables of attention biases (:func:`bias_tables`),
  Haiku's biases (:func:`haiku_biases`) and biases by their names (:func:`named_biases`);
  then, past any stacked axes, convolutions (:func:`conv_kernels`), attention projections
  (:func:`flax_attention_names`, which wins over the others), DenseGeneral kernels
  (:func:`dense_general_kernels`) and the experts of a mixture (:func:`expert_stacks`), with their
  biases (:func:`expert_biases`); and the kernels that contract no input
  (:func:`elementwise_kernels`).

  Where readers meet on one leaf: its names are an attention projection's, else the last found of
  a mixture's, a convolution's and a ``DenseGeneral``'s, else its stacks' (its own where nothing
  was read); its note is its stacks' (:func:`_stack_note`) and the winning kernel reading's; why
  it is a
  guess, the first reason in the order the body gives (:func:`_first_reason`); its ``param``, as
  :func:`_params` orders them.

  Args:
    paths: Each leaf's canonical path (:func:`adahessian_jax.layout.leaves`).
    shapes: Each leaf's shape.
    names: Each leaf's own axis names (annotated or given), or ``None``.
    roles: The axis roles of each leaf's default rule (``None`` for a leaf with a rule of its own,
      which is not read).

  Returns:
    A :class:`Reading` per leaf, in order.
  """
  own = list(names)
  cleared = [_roleless_unnamed(n, r) for n, r in zip(names, roles, strict=True)]
  # Stacks of layers. Each stage reads the names the one before it left, and names only axes
  # those left unnamed: the leading axes of boxed leaves, then a module's own evidence, then its
  # named relatives.
  names, leading = _unnamed_leading_stacks(paths, shapes, cleared, roles)
  evident, alone, front_by_name, guessed = stacks_by_evidence(paths, shapes, names, roles)
  names = [evident[i][0] if i in evident else n for i, n in enumerate(names)]
  inferred, related_unsure = in_named_stacks(paths, shapes, names, roles, alone)
  # Bias-less Dense_N kernels whose stack's place is a guess (not one their relatives disagree on).
  unplaced = _unplaced_stacks(paths, shapes, names, roles, alone, front_by_name)
  unplaced -= set(related_unsure)
  stacked = [inferred[i][0] if i in inferred else n for i, n in enumerate(names)]
  by_bias = weights_by_bias(paths, shapes, roles)
  output_first = _output_first(by_bias.output_first, paths, shapes, stacked, roles)
  # Kernels past their stacked axes.
  convs = conv_kernels(paths, shapes, stacked, roles)
  attention, attention_unsure = flax_attention_names(paths, shapes, stacked, roles, convs)
  generals = dense_general_kernels(paths, shapes, stacked, roles)
  done = {*attention, *convs, *generals}  # an attention in a module "experts" is no mixture
  experts = expert_stacks(paths, shapes, stacked, roles, done)
  params = _params(
    flax_weights=by_bias.input_first,
    by_bias=output_first,
    lora=torch_lora_factors(paths, shapes, stacked, roles),
    tables=bias_tables(paths, roles),
    elementwise=elementwise_kernels(paths, shapes, stacked, roles),
    biases=haiku_biases(paths, roles)
    | named_biases(paths, roles)
    | expert_biases(paths, shapes, stacked, roles, experts),
  )
  # Why a reading is a guess: the first of these that has a reason for a leaf gives it. An
  # attention's guess first, of the names that win over every other reading (below); then the
  # stacks' (relatives that disagree, a Dense kernel's stack of no known place, a scan's count or
  # place), a weight's by its bias, and last the vectors of a stack that nothing names.
  unsure = _first_reason(
    {i: _ATTENTION_UNSURE for i in attention_unsure},
    related_unsure,
    {i: _UNPLACED_WHY for i in unplaced},
    guessed,  # how many axes an nn.remat_scan stacks, or where a scan does
    by_bias.unsure,
    vectors_in_stacks(paths, shapes, stacked, roles),
  )
  # Unsure only of where a Dense kernel's stacked axis is: moot where its rule averages nothing.
  # (The one reason that wins over it, an attention's, is no such guess.)
  moot = unplaced - set(attention_unsure)
  readings = []
  for i in range(len(paths)):
    leaf_names, note = stacked[i], _stack_note(i, paths, leading, evident, inferred)
    if i in attention:  # an attention projection wins over the other kernels' readings
      leaf_names = attention[i]
      note += _ATTENTION_NOTE
    else:  # the last that read it wins, with its note alone: a DenseGeneral's over a conv's
      won = [found[i] for found in (experts, convs, generals) if i in found]
      if won:
        leaf_names = won[-1][0]
        note += f" ({won[-1][1]})"
    if leaf_names == cleared[i]:  # nothing read: its own names (mesh axes: no role), if any
      leaf_names = own[i]
    readings.append(Reading(leaf_names, note, unsure.get(i), params.get(i), i in moot))
  return readings


def _first_reason(*reasons: Mapping[int, str]) -> dict[int, str]:
  """Per leaf, the reason of the first of ``reasons`` (``{leaf index: why}``) that has one."""
  out: dict[int, str] = {}
  for by_leaf in reasons:
    for i, why in by_leaf.items():
      out.setdefault(i, why)
  return out


def _stack_note(i: int, paths, leading, evident, inferred) -> str:
  """How leaf ``i``'s stacked axes were read, for :class:`Reading`'s note: by its module's own
  evidence (:func:`stacks_by_evidence`), else from a named relative (:func:`in_named_stacks`),
  else as its unnamed leading axes (:func:`_unnamed_leading_stacks`, whose note the first two
  replace: they read it again, whole); ``""`` if none."""
  if i in evident:
    return f" (stacked axes inferred: {evident[i][1]})"
  if i in inferred:
    relative = jax.tree_util.keystr(tuple(paths[inferred[i][1]]))
    return f" (stacked axes taken from its named relative {relative})"
  return leading.get(i, "")


def _output_first(by_bias: set[int], paths, shapes, stacked, roles) -> set[int]:
  """The leaves of ``by_bias`` (:func:`weights_by_bias`) read output axis first: a ``weight`` or a
  rank-2 kernel, and a kernel ``(layers, out, in)`` only where its leading axes are found stacked
  (else the rank's guess stays, flagged)."""
  return {
    i
    for i in by_bias
    if len(shapes[i]) == 2
    or param_name(paths[i]) == "weight"
    or stacked_prefix(stacked[i] or (), roles[i] or {}) == len(shapes[i]) - 2
  }


def _params(
  flax_weights: set[int],
  by_bias: set[int],
  lora: set[int],
  tables: set[int],
  elementwise: set[int],
  biases: set[int],
) -> dict[int, str]:
  """:class:`Reading`'s ``param`` by leaf, where a leaf is in several the later winning: a weight
  in Flax's layout by its bias (:data:`WEIGHT_INPUT_FIRST`), a weight or kernel output axis first
  by its bias (:data:`WEIGHT_BY_BIAS`), a LoRA factor so by its pair
  (:data:`LORA_OUTPUT_FIRST`), a table of attention biases
  (:data:`BIAS_TABLE`), a kernel that contracts no input (:data:`ELEMENTWISE`), a bias.

  Names can put a leaf in two (a table's word and a bias's: ``pos_b`` beside ``pos_w``,
  ``emb_bias`` beside ``emb_weight``): a bias wins over a table over a weight. A leaf with a bias
  paired by name (``pos_w``, ``emb_weight``) is no table of biases under a module named with
  ``bias`` (:func:`bias_tables`): a weight by its bias or a table.
  """
  params = {i: WEIGHT_INPUT_FIRST for i in flax_weights} | {i: WEIGHT_BY_BIAS for i in by_bias}
  params |= {i: LORA_OUTPUT_FIRST for i in lora}
  params |= {i: BIAS_TABLE for i in tables}
  params |= {i: ELEMENTWISE for i in elementwise}
  params |= {i: "bias" for i in biases}
  return params


#: The note of an attention projection (:func:`flax_attention_names`), by :func:`read`.
_ATTENTION_NOTE = (
  " (an attention projection: its module's query and output kernels, by their names or shapes)"
)
#: Why an attention projection's reading is a guess (:func:`flax_attention_names`'s unsure ones).
_ATTENTION_UNSURE = (
  "its query kernel's embed and heads axes have one size, as the kernels (layers, in, "
  "out) of an nn.scan stack of Dense layers named query/out whose in = layers would: "
  "name its axes"
)


def _roleless_unnamed(names: AxisNames | None, roles: Mapping[str, str] | None) -> AxisNames | None:
  """A leaf's names as the evidence reads them: where no name has a known role but ``stacked``
  (``nn.with_partitioning``'s mesh axes: ``(None, None, None, "model")``; ``("layers", None,
  "model")``), those of no role are ``None`` (all of them: no names), so the leaf gets the
  evidence of an unboxed one; other names (``(None, "embed")``) as they are."""
  if names is None or roles is None:
    return names
  known = [axis_role(x, roles) for x in names]
  if any(r not in (None, STACKED) for r in known):
    return names
  kept = tuple(x if r == STACKED else None for x, r in zip(names, known, strict=True))
  return None if all(x is None for x in kept) else kept


def _unnamed_leading_stacks(
  paths, shapes, names, roles
) -> tuple[list[AxisNames | None], dict[int, str]]:
  """``names`` with the stack named in leaves whose leading axes have no names and the rest do,
  and why, by leaf.

  Boxed params of an ``nn.scan`` with ``metadata_params={nn.PARTITION_NAME: None}`` carry a
  ``None`` for the stacked axis: a kernel ``(None, "embed", "mlp")``, its bias
  ``(None, "mlp")``. By the names alone the kernel is a 1-D convolution's (a guess, averaged
  across the layers), though the same tree unboxed shows the stack. Such leaves are read as
  unnamed ones are, among themselves (:func:`stacks_by_evidence`: a bias that repeats its
  kernel's leading axes, Linen's name of the scan, then :func:`in_named_stacks` for their
  relatives, a ``LayerNorm``'s ``(None, "embed")`` scale): where exactly their unnamed leading
  axes are found stacked, those take the stacked name (the others, a convolution's window in a
  stack, keep theirs). A convolution's kernel ``(None, None, "embed", "mlp")`` beside its bias
  ``("mlp",)`` shows no stack and keeps its names. Unnamed axes in front of a stacked one (a
  mixture's raw bias ``(None, "exp", "mlp")``, which no bias or module name shows) are stacked
  too: a layer's own axes come after its experts, a transform's before. (Not in front of a
  stack of layers: an ``nn.vmap`` over axis 1 gives a kernel ``(in, layers, out)``.)
  """

  def leading(n):  # unnamed axes after a named one too: a depthwise kernel's (h, w, None, out)
    k = next((j for j, x in enumerate(n) if x is not None), len(n))
    return k if 0 < k < len(n) else 0

  partial = {i: leading(n) for i, n in enumerate(names) if n is not None and roles[i] is not None}
  partial = {i: k for i, k in partial.items() if k}
  if not partial:
    return list(names), {}
  hidden = [None if i in partial else n for i, n in enumerate(names)]
  only = [roles[i] if i in partial else None for i in range(len(names))]
  evident, alone, _, _ = stacks_by_evidence(paths, shapes, hidden, only)
  # ... and the stack passes to their relatives, as in plain arrays: a LayerNorm's (None,
  # "embed") scale, a bias-less (None, "embed", "mlp") kernel beside attention that shows it.
  shown = [evident[i][0] if i in evident else n for i, n in enumerate(hidden)]
  related, unsure = in_named_stacks(paths, shapes, shown, only, alone)
  related = {i: r for i, r in related.items() if i not in unsure}
  out, why = list(names), {}
  for i, k in partial.items():
    if i in evident or i in related:
      found = evident[i][0] if i in evident else related[i][0]
      n = sum(x is not None for x in found)  # the stacked axes lead (stacks_by_evidence)
      # A stack under a scan's unnamed convolution (layers, kh, kw, in, out) too.
      if 0 < n <= k and all(x is not None for x in found[:n]):
        out[i] = tuple(found[:n]) + tuple(names[i][n:])
        if i in evident:
          why[i] = f" (its unnamed leading axes stacked: {evident[i][1]})"
        else:
          relative = jax.tree_util.keystr(tuple(paths[related[i][1]]))
          why[i] = f" (its unnamed leading axes stacked as in its relative {relative})"
    # Only in front of experts: a kernel (in, layers, out) of an nn.vmap over axis 1 has an
    # unnamed axis in front of its stacked one too, its input.
    elif names[i][k] in EXPERT_AXES and (stacked := role_name(roles[i], STACKED)) is not None:
      out[i] = (stacked,) * k + tuple(names[i][k:])
      why[i] = f" (its unnamed leading axes stacked: in front of the stacked axis {names[i][k]!r})"
  return out, why


#: What :func:`read` calls a ``weight`` (or a rank-2 ``kernel``) whose bias shows its output axis
#: first (:func:`weights_by_bias`).
WEIGHT_BY_BIAS = "weight, by its bias"
#: What :func:`read` calls a ``weight`` whose bias shows Flax's layout, output axis last
#: (:func:`weights_by_bias`): Hugging Face's PyTorch ``Conv1D`` ``(in, out)``.
WEIGHT_INPUT_FIRST = "weight, input axis first by its bias"
#: What :func:`read` calls a LoRA factor stored output axis first (:func:`torch_lora_factors`):
#: loralib's ``lora_A`` ``(rank, in)`` and ``lora_B`` ``(out, rank)``.
LORA_OUTPUT_FIRST = "a LoRA factor, output axis first by its pair"
#: What :func:`read` calls a table of attention biases (:func:`bias_tables`): T5's
#: ``relative_attention_bias`` ``(num_buckets, heads)``.
BIAS_TABLE = "a table of attention biases"
#: What :func:`read` calls a kernel whose bias has its every axis (:func:`elementwise_kernels`):
#: an ``Einsum`` ``"btd,td->btd"``'s ``(t, d)``.
ELEMENTWISE = "a kernel that contracts no input, by its bias"


#: Why a bias-less ``Dense_N`` kernel read with its stack in front is a guess (:func:`read`).
_UNPLACED_WHY = (
  "Linen's name makes it a Dense kernel, but not which axis is stacked: nn.scan and nn.vmap "
  "put it in front, nn.vmap with variable_axes={'params': 1} behind the input; name its axes "
  "or give it spatial.per_layer(spatial.blocks(block_size), axes=(<the stacked axis>,))"
)


def _unplaced_stacks(paths, shapes, names, roles, alone, unplaced: set[int]) -> set[int]:
  """The leaves in ``unplaced`` (bias-less ``Dense_N`` kernels read with their stack in front by
  their name alone, :func:`stacks_by_evidence`) that stay a guess: those whose stacked relatives
  do not show the stack there (read without it, :func:`in_named_stacks` does not give them the
  same axes, surely)."""
  if not unplaced:
    return set()
  hidden = [None if i in unplaced else n for i, n in enumerate(names)]
  inferred, unsure = in_named_stacks(paths, shapes, hidden, roles, alone)
  return {i for i in unplaced if i not in inferred or i in unsure or inferred[i][0] != names[i]}
