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

# The code lives in private modules, one concept each; this module is the public face:
#   _rules.py            the rule objects and none/blocks/mean_over/per_layer
#   _flax_default.py     the default rule (flax_default, AXIS_ROLES) and its readings of a leaf
#   _averaging.py        the averaging specification (Averaging, named, strict) and its checks
#   _listing.py          describe's rows and table, and strict mode's error
#   _layout_warnings.py  LayoutGuessWarning and the texts of its warnings
#   _resolve.py          the resolver: resolve_rules, apply_rules, describe
# Names imported ``as`` themselves are not in __all__ but are used by the package's other modules
# and tests: the alias marks them re-exported (for ruff, and for type checkers of py.typed users).
# Any and AxisNames are here for typing.get_type_hints (Sphinx), which reads the annotations of
# Averaging's and Row's fields in this module, the one they name as their home.

from collections.abc import Mapping
from typing import Any  # noqa: F401

from adahessian_jax import _flax_default
from adahessian_jax._averaging import Averaging, named, strict
from adahessian_jax._averaging import AveragingSpec as AveragingSpec
from adahessian_jax._averaging import as_averaging as as_averaging
from adahessian_jax._averaging import check_averaging as check_averaging
from adahessian_jax._flax_default import FlaxDefault as FlaxDefault
from adahessian_jax._flax_default import flax_default
from adahessian_jax._flax_default import reads_input_first as reads_input_first
from adahessian_jax._flax_default import reads_output_first as reads_output_first
from adahessian_jax._layout_warnings import LayoutGuessWarning
from adahessian_jax._layout_warnings import user_stacklevel as user_stacklevel
from adahessian_jax._layout_warnings import warn_shard_shapes as warn_shard_shapes
from adahessian_jax._listing import Listing, Row
from adahessian_jax._resolve import apply_rules, describe, resolve_rules
from adahessian_jax._resolve import leaf_rules as leaf_rules
from adahessian_jax._resolve import resolve_rules_and_read_off as resolve_rules_and_read_off
from adahessian_jax._rules import AxesMean as AxesMean
from adahessian_jax._rules import BlockMean as BlockMean
from adahessian_jax._rules import Choice, Rule, blocks, mean_over, none, per_layer
from adahessian_jax._rules import NoAveraging as NoAveraging
from adahessian_jax._rules import PerLayer as PerLayer
from adahessian_jax._rules import is_rule as is_rule
from adahessian_jax.layout import AxisNames  # noqa: F401

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

# Assigned with its annotation, not only imported, so that the docs show its type.
#: The roles of axis names known to :func:`flax_default` (see the module docstring).
AXIS_ROLES: Mapping[str, str] = _flax_default.AXIS_ROLES
