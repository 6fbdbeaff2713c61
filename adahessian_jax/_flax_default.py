"""The default rule, :func:`flax_default`: it reads what each axis of a leaf is from the axis
names' roles (:data:`AXIS_ROLES`), the leaf's parameter name and its rank, and says why (see the
docstring of :mod:`adahessian_jax.spatial` for the readings).

What the tree shows about a leaf beyond its own names (its bias, its module) is read by
:mod:`adahessian_jax._evidence`; the resolver (:mod:`adahessian_jax._resolve`) binds that to the
rule.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType

from adahessian_jax import _evidence, _evidence_names, layout
from adahessian_jax._rules import AxesMean, BlockMean, Choice, NoAveraging, PerLayer, Rule
from adahessian_jax._validation import count
from adahessian_jax.layout import (
  FEATURES,
  HEADS,
  ROLES,
  SPATIAL,
  STACKED,
  VOCAB,
  AxisNames,
  axis_role,
)

#: The roles of axis names known to :func:`flax_default` (see :mod:`adahessian_jax.spatial`).
AXIS_ROLES: Mapping[str, str] = MappingProxyType(
  {
    **dict.fromkeys(
      (
        *("layers", "layer", "stage", "stages", "scan", "repeat", "block", "blocks"),
        *layout.EXPERT_AXES,  # a mixture's experts: stacked kernels
      ),
      STACKED,
    ),
    **dict.fromkeys(
      ("height", "width", "time", "spatial", "window", "conv_window", "kernel_size"), SPATIAL
    ),
    **dict.fromkeys(("heads", "head", "q_heads", "kv_heads", "num_heads"), HEADS),
    **dict.fromkeys(("vocab", "vocab_size", "num_embeddings", "position", "positions"), VOCAB),
    **dict.fromkeys(
      ("embed", "mlp", "kv", "head_dim", "joined_kv", "qkv", "hidden", "features", "channels"),
      FEATURES,
    ),
  }
)


def _axis(i: int, names: AxisNames | None) -> str:
  return f"{i} ({names[i]!r})" if names is not None and names[i] is not None else f"{i}"


def _blocks_text(block_size: int) -> str:
  return f"blocks of {block_size}" if block_size > 1 else "blocks of 1 (block_size 1: none)"


_WEIGHT_BY_BIAS, _BIAS_TABLE = _evidence.WEIGHT_BY_BIAS, _evidence.BIAS_TABLE
_ELEMENTWISE, _INPUT_FIRST = _evidence.ELEMENTWISE, _evidence.WEIGHT_INPUT_FIRST
_LORA_OUTPUT_FIRST = _evidence.LORA_OUTPUT_FIRST
#: What the default reads output axis first (PyTorch's layout).
_OUTPUT_FIRST = ("weight", _WEIGHT_BY_BIAS, _LORA_OUTPUT_FIRST)
#: The parameter names (last path keys, or what the tree shows a leaf is) that
#: :func:`flax_default` reads.
_PARAMS_READ = (
  *_evidence_names.READ_BY_NAME,
  _WEIGHT_BY_BIAS,
  _BIAS_TABLE,
  _ELEMENTWISE,
  _INPUT_FIRST,
  _LORA_OUTPUT_FIRST,
)


def _torch_layout(ndim: int, block_size: int, names, note: str, param: str | None) -> Choice:
  """An unnamed ``weight``: PyTorch's and Equinox's layouts, the output axis first.

  ``Linear`` ``(out, in)`` (and ``Embedding`` ``(num, dim)``): blocks along axis 1, one output
  unit's (row's) inputs; ``Conv`` ``(out, in, *spatial)``: the mean over axes ``2 ..``. Flax
  names its kernels ``kernel``, so ``weight`` is such a port's, but the name is only a name:
  ambiguous where the layout matters, unless its bias (``param`` :data:`_WEIGHT_BY_BIAS`) or its
  LoRA pair (:data:`_LORA_OUTPUT_FIRST`) has settled it.
  """
  flax = "(in, out)" if ndim == 2 else "(*spatial, in, out)"
  if param == _LORA_OUTPUT_FIRST:
    why, guess, ambiguous = "a LoRA factor whose pair's shape shows PyTorch's layout", "", False
  elif param == _WEIGHT_BY_BIAS:
    why, guess, ambiguous = "a bias of its first axis", "", False
  else:
    why, ambiguous = "name 'weight'", ndim > 2 or block_size > 1
    guess = (
      f"; AMBIGUOUS (a Flax-layout kernel {flax} named 'weight' has this rank too: name its axes)"
    )
  if ndim == 2:
    return Choice(
      BlockMean(block_size, 1),
      f"rank 2{note}, {why}: taken for a PyTorch-layout Linear weight (out, in) (PyTorch, "
      f"Equinox, Hugging Face's FlaxConv1D), {_blocks_text(block_size)} along input axis "
      f"{_axis(1, names)}" + (guess if block_size > 1 else ""),
      ambiguous=ambiguous,
    )
  spatial = tuple(range(2, ndim))
  return Choice(
    AxesMean(spatial),
    f"rank {ndim}{note}, {why}: taken for a PyTorch/Equinox Conv weight (out, in, *spatial), "
    f"mean over axes {spatial}{guess}",
    ambiguous=ambiguous,
  )


def _by_rank(shape, block_size, names, note, param=None) -> Choice:
  ndim = len(shape)
  if ndim <= 1:
    return Choice(NoAveraging(), f"rank {ndim}{note}: a bias or scale, none")
  if param == _INPUT_FIRST:  # Hugging Face's PyTorch Conv1D (in, out): a kernel's layout
    note += ", a 'weight' beside a bias of its last axis (Flax's layout, in, out)"
    return _by_rank(shape, block_size, names, note)
  if param in _OUTPUT_FIRST:
    return _torch_layout(ndim, block_size, names, note, param)
  if param == _BIAS_TABLE:
    # T5's relative_attention_bias (num_buckets, heads): rows (positions) and heads kept apart.
    return Choice(
      NoAveraging(),
      f"rank {ndim}{note}, a table's name with the word 'bias': a table of attention biases "
      "(positions, heads), one per position and head: none",
    )
  if param in ("embedding", "table"):
    # nn.Embed/nnx.Embed (num_embeddings, features), a learned position table (1, length,
    # features): blocks along axis 0 would mix tokens' (positions') rows.
    last = ndim - 1
    guess = param == "table" and block_size > 1
    return Choice(
      BlockMean(block_size, last),
      f"rank {ndim}{note}, "
      + (
        "a table's name (Flax's 'embedding', 'pos_embedding', ...)"
        if param == "embedding"
        else "a name with a word of a table ('embed', 'pos', ...) and others"
      )
      + ": taken for an Embed table (..., num_embeddings, features), rows kept apart, "
      f"{_blocks_text(block_size)} along axis {_axis(last, names)}"
      + (
        "; AMBIGUOUS (a kernel (in, out) so named has this layout too: name its axes, "
        f"e.g. ('vocab', 'embed'), or pass spatial.blocks(block_size, axis={last}))"
        if guess
        else ""
      ),
      ambiguous=guess,
    )
  if ndim == 2:
    return Choice(
      BlockMean(block_size, 0),
      f"rank 2{note}: a Dense kernel (in, out), {_blocks_text(block_size)} along input axis "
      f"{_axis(0, names)}",
    )
  spatial = tuple(range(ndim - 2))
  if all(size == 1 for size in shape[:-1]):
    # A ViT class token (1, 1, features): every reading averages or blocks along axes of size 1.
    return Choice(
      NoAveraging(),
      f"rank {ndim}{note}: every axis but the last has size 1, so no reading (Conv kernel, "
      "DenseGeneral kernel, stack of layers) averages anything: none",
    )
  if block_size == 1 and all(shape[i] == 1 for i in spatial):
    # Learned tokens (1, n, features): the Conv reading's mean is over axes of size 1, and the
    # DenseGeneral's and a stack's blocks are of 1 entry.
    return Choice(
      NoAveraging(),
      f"rank {ndim}{note}: axes {spatial} have size 1 and block_size is 1, so no reading (Conv "
      "kernel, DenseGeneral kernel, stack of layers) averages anything: none",
    )
  return Choice(
    AxesMean(spatial),
    f"rank {ndim}{note}: taken for a Conv kernel (*spatial, in, out), mean over axes {spatial}; "
    "AMBIGUOUS (a DenseGeneral/attention kernel or a stack of layers has this rank too)",
    ambiguous=True,
  )


#: The way out of a guess about an axis whose name has no known role.
_NAME_THE_AXIS = (
  "name it, e.g. 'embed', add its name with flax_default(axis_roles=...), or give the leaf a rule"
)


def _unknown_block_axis(other: list[int], kinds: list[str | None], block_size: int) -> str:
  """Why blocks along ``other[0]`` are a guess ("" if they are not).

  They are when that axis has no known role and another axis could have been
  the input: e.g. axis 0 of a ``kv_einsum`` kernel ``(2, kv_heads, embed,
  head_dim)`` tells the key kernel from the value kernel.
  """
  if block_size == 1 or len(other) < 2 or kinds[other[0]] is not None:
    return ""
  return (
    "; AMBIGUOUS (that axis has no name of a known role, so whether it is the input is a "
    f"guess: {_NAME_THE_AXIS})"
  )


def _blocks_beside(
  kept: str,
  along: str,
  other: list[int],
  names: AxisNames,
  kinds: list[str | None],
  block_size: int,
) -> Choice:
  """Blocks along the first of the ``other`` axes, beside the axes kept apart (rows, heads: the
  reason ``kept``); a guess where that axis has no known role (:func:`_unknown_block_axis`)."""
  guess = _unknown_block_axis(other, kinds, block_size)
  return Choice(
    BlockMean(block_size, other[0]),
    f"{kept}, {_blocks_text(block_size)} along {along} {_axis(other[0], names)}{guess}",
    ambiguous=bool(guess),
  )


def _decide(shape, names, block_size, roles, param=None) -> Choice:
  """The default's choice for a leaf of ``shape`` whose axes have ``names`` (or ``None``).

  ``param`` is what the leaf's name or the tree around it shows it is (:class:`FlaxDefault`'s
  ``param``): a ``bias`` or ``scale`` of any rank is never averaged (paper), an ``embedding`` (a
  table's name) of rank >= 2 without a ``vocab`` axis name keeps its rows (tokens, positions)
  apart.
  """
  ndim = len(shape)
  if names is not None and all(n is None for n in names):  # one layer of an unnamed stack
    names = None
  kinds = None if names is None else [axis_role(n, roles) for n in names]
  stacked = () if kinds is None else tuple(i for i, k in enumerate(kinds) if k == STACKED)
  if stacked and names is not None:
    keep = tuple(i for i in range(ndim) if i not in stacked)
    inner = _decide(
      tuple(shape[i] for i in keep), tuple(names[i] for i in keep), block_size, roles, param
    )
    where = ", ".join(_axis(i, names) for i in stacked)
    return Choice(
      PerLayer(inner.rule, stacked),
      f"stacked axis {where} kept apart; per layer: {inner.why}",
      inner.ambiguous,
    )
  if ndim >= 2 and param == "bias":
    # DenseGeneral (*features), attention (heads, head_dim) and Einsum biases: one per output.
    return Choice(NoAveraging(), f"rank {ndim}, Flax name 'bias': a bias (one per output), none")
  if ndim >= 2 and param == _ELEMENTWISE:
    # An Einsum "btd,td->btd": each entry of the kernel meets one output entry, as a scale's.
    return Choice(
      NoAveraging(),
      f"rank {ndim}, a kernel beside a bias of its every axis: an Einsum that contracts no "
      "input (e.g. 'btd,td->btd'), one entry per output, none",
    )
  if ndim >= 2 and param == "scale":
    # A norm's scale over several feature axes (LayerNorm(feature_axes=(-2, -1))), or a stack's
    # (layers, features) scale without names: one entry per feature, like a bias.
    return Choice(
      NoAveraging(), f"rank {ndim}, Flax name 'scale': a norm's scale (one per feature), none"
    )
  if names is None or kinds is None:  # both or neither
    return _by_rank(shape, block_size, None, " without axis names", param)
  if ndim <= 1:  # named, whatever the names: _by_rank's bias or scale
    return _by_rank(shape, block_size, names, "", param)
  if all(k is None for k in kinds):
    return _by_rank(shape, block_size, names, f", names {names} of no known role", param)
  spatial = tuple(i for i, k in enumerate(kinds) if k == SPATIAL)
  if spatial:
    where = ", ".join(_axis(i, names) for i in spatial)
    return Choice(AxesMean(spatial), f"a Conv kernel: mean over its spatial axes {where}")
  if VOCAB in kinds:
    rows = ", ".join(_axis(i, names) for i, k in enumerate(kinds) if k == VOCAB)
    other = [i for i, k in enumerate(kinds) if k not in (VOCAB, HEADS)]
    if not other:
      return Choice(NoAveraging(), f"one entry per row of axis {rows}: none")
    kept = f"a table with a row per token (axis {rows}): rows kept apart"
    return _blocks_beside(kept, "axis", other, names, kinds, block_size)
  if HEADS in kinds:
    heads = ", ".join(_axis(i, names) for i, k in enumerate(kinds) if k == HEADS)
    other = [i for i, k in enumerate(kinds) if k != HEADS]
    if len(other) <= 1:
      return Choice(
        NoAveraging(),
        f"a per-head bias or scale, or a kernel that contracts no input (heads: axis {heads}): "
        "none",
      )
    kept = f"an attention kernel: heads (axis {heads}) kept apart"
    return _blocks_beside(kept, "input axis", other, names, kinds, block_size)
  if ndim == 2:
    choice = _by_rank(shape, block_size, names, "", param)
    unknown_input = kinds[0] is None and names[0] is not None
    if block_size > 1 and unknown_input and choice.rule == BlockMean(block_size, 0):
      # A name of no known role on the axis the blocks go along (not None, an unsharded axis, as
      # a Dense kernel's input often is), e.g. an nn.vmap over "members": (members, features).
      return choice._replace(
        why=f"{choice.why}; AMBIGUOUS (axis 0 has a name of no known role: it may be a stack "
        f"of experts or layers; {_NAME_THE_AXIS})",
        ambiguous=True,
      )
    return choice
  if all(k == FEATURES for k in kinds):
    return Choice(
      BlockMean(block_size, 0),
      f"a DenseGeneral kernel (*in, *out): {_blocks_text(block_size)} along input axis "
      f"{_axis(0, names)}",
    )
  unknown = tuple(n for n, k in zip(names, kinds, strict=True) if k is None)
  return _by_rank(shape, block_size, names, f", names {unknown} of no known role", param)


def check_rank(names: AxisNames, shape, where: str) -> None:
  """Refuses axis names that are not one per axis of the leaf at ``where``.

  By position, one entry per axis: a spec shorter than the rank is refused, not padded, since
  names one short are also what a stack whose transform did not add the stacked axis carries.

  Raises:
    ValueError: naming the leaf, its names and its shape (and that fix, for names one short).
  """
  if len(names) == len(shape):
    return
  stale = (
    " Names one short of the rank are those of one layer of a stack whose transform did not "
    "add the stacked axis: nnx.vmap/nnx.scan need transform_metadata={nnx.PARTITION_NAME: "
    "'layers'}, nn.scan/nn.vmap metadata_params={nn.PARTITION_NAME: 'layers'}."
    if len(names) == len(shape) - 1
    else ""
  )
  raise ValueError(
    f"the axis names {names} of the leaf at {where} have {len(names)} entries, but its "
    f"shape {tuple(shape)} has rank {len(shape)}.{stale}"
  )


@dataclasses.dataclass(frozen=True)
class FlaxDefault(Rule):
  """The default for Flax layouts (see the docstring of :mod:`adahessian_jax.spatial`).

  Attributes:
    block_size: Block size of ``Dense``-like kernels.
    axis_roles: Changes to :data:`AXIS_ROLES`, as sorted ``(name, role)``
      pairs; a role ``None`` removes the name.
    names: The leaf's axis names once bound by :func:`~adahessian_jax.spatial.resolve_rules`,
      else ``None`` (then the rank decides).
    param: What the leaf is by its name (``"bias"``, ``"scale"``, ``"embedding"`` also for a
      ``pos_embedding``, ``"table"``, ``"weight"``:
      :func:`~adahessian_jax._evidence_names.param_name`) or by the tree around it
      (:data:`~adahessian_jax._evidence.WEIGHT_BY_BIAS`,
      :data:`~adahessian_jax._evidence.BIAS_TABLE`,
      :data:`~adahessian_jax._evidence.ELEMENTWISE`,
      :data:`~adahessian_jax._evidence.WEIGHT_INPUT_FIRST`,
      :data:`~adahessian_jax._evidence.LORA_OUTPUT_FIRST`), once set by
      :func:`~adahessian_jax.spatial.resolve_rules`; ``None`` for any other name (``"kernel"``).
    resolved: Whether :func:`~adahessian_jax.spatial.resolve_rules` has read the tree for this
      leaf. A resolved rule is not read again: its reading stays that of the tree it was resolved
      on (the whole model's, not a ``shard_map`` shard's or an ``optax.masked`` part's).
  """

  block_size: int = 1
  axis_roles: tuple[tuple[str, str | None], ...] = ()
  names: AxisNames | None = None
  param: str | None = None
  resolved: bool = False

  def roles(self) -> dict[str, str]:
    """The name-to-role mapping in force."""
    roles = dict(AXIS_ROLES)
    for name, role in self.axis_roles:
      if role is None:
        roles.pop(name, None)
      else:
        roles[name] = role
    return roles

  def bind(self, names):
    return dataclasses.replace(self, names=tuple(names))

  def for_param(self, param):
    # Only the names the default reads are kept, so other leaves' rules stay flax_default(...).
    return dataclasses.replace(self, param=param) if param in _PARAMS_READ else self

  def explain(self, shape):
    names = self.names if self.names is not None and len(self.names) == len(shape) else None
    return _decide(tuple(shape), names, self.block_size, self.roles(), self.param)

  def check(self, shape, where):
    if self.names is not None:
      check_rank(self.names, shape, where)
    self.explain(shape).rule.check(shape, where)

  def __call__(self, d):
    return self.explain(d.shape).rule(d)

  def groups(self, shape):
    return self.explain(shape).rule.groups(shape)

  def __str__(self):
    return f"flax_default({self.block_size})"


def flax_default(
  block_size: int = 1, *, axis_roles: Mapping[str, str | None] | None = None
) -> Rule:
  """The default rule for Flax layouts: by axis names where known, else by rank.

  See :mod:`adahessian_jax.spatial`'s docstring for the mapping. Without names: rank 0-1 none;
  rank 2 ``(in, out)`` blocks of ``block_size`` along axis 0; rank >= 3
  ``(*spatial, in, out)`` mean over axes ``0 .. rank-3`` (ambiguous).

  Args:
    block_size: Block size of ``Dense``-like kernels, an integer >= 1.
    axis_roles: Changes to :data:`AXIS_ROLES`: ``{name: role}`` with a role in
      ``"stacked"``, ``"spatial"``, ``"heads"``, ``"vocab"``, ``"features"``,
      or ``None`` to forget a name. E.g. ``{"depth": "stacked"}``.

  Returns:
    A :class:`Rule`.

  Raises:
    ValueError: for a ``block_size`` that is not an integer >= 1, an ``axis_roles`` that is not
      a mapping, a key of it that is not a string (an axis name) or a role not listed above.
  """
  block_size = count("block_size", block_size)
  if axis_roles is not None and not isinstance(axis_roles, Mapping):
    raise ValueError(
      f"axis_roles must be a mapping {{axis name: role}}, got {axis_roles!r}: e.g. "
      "axis_roles={'depth': 'stacked'}."
    )
  changes = dict(axis_roles or {})
  for name, role in changes.items():
    if not isinstance(name, str):
      # Axis names are strings: another key would match no axis, and the role be dropped.
      raise ValueError(
        f"axis_roles has the key {name!r} ({type(name).__name__}); the keys are axis names, "
        f"strings as in nn.with_logical_partitioning: e.g. {{'depth': {role!r}}}."
      )
    if role is not None and role not in ROLES:
      raise ValueError(
        f"axis_roles[{name!r}] is {role!r}; a role must be one of {ROLES} or None (forget it)."
      )
  return FlaxDefault(block_size, tuple(sorted(changes.items(), key=lambda kv: kv[0])))


def reads_input_first(rule: Rule) -> bool:
  """Whether a rule from :func:`adahessian_jax._resolve.leaf_rules` reads a ``weight`` in Flax's
  layout, input axis first, as its bias shows
  (:func:`adahessian_jax._evidence_biases.weights_by_bias`)."""
  return isinstance(rule, FlaxDefault) and rule.param == _INPUT_FIRST


def reads_output_first(rule: Rule) -> bool:
  """Whether a rule from :func:`adahessian_jax._resolve.leaf_rules` reads its leaf in PyTorch's
  layout, output axis first (a ``weight``, or a kernel whose bias shows it:
  :func:`adahessian_jax._evidence_biases.weights_by_bias`; a LoRA factor whose pair shows it:
  :func:`adahessian_jax._evidence_kernels.torch_lora_factors`)."""
  return isinstance(rule, FlaxDefault) and rule.param in _OUTPUT_FIRST
