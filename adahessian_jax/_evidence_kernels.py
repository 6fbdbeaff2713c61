"""Kernels in a parameter tree, past their stacked axes: convolutions, ``DenseGeneral`` layers
and the experts of a mixture.

Readers of :mod:`adahessian_jax._evidence` that name the axes of unnamed kernels (Flax's
``kernel``, Haiku's ``w``, TensorFlow's ``filters``: :func:`kernel_leaves`) by their biases, their
modules' names and the tree around them: a convolution's spatial axes (:func:`conv_kernels`), a
``DenseGeneral``'s input and output axes (:func:`dense_general_kernels`), a mixture's experts
(:func:`expert_stacks`) and their biases (:func:`expert_biases`); the kernels that a bias of
their every axis shows contract no input (:func:`elementwise_kernels`); and LoRA factors stored
output axis first (:func:`torch_lora_factors`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from adahessian_jax._evidence_biases import bias_fits, dense_bias
from adahessian_jax._evidence_names import (
  KERNEL_BIAS,
  READ_BY_NAME,
  by_leaf_name,
  by_module,
  key_name,
  leaves_under,
  linen_class,
  module_keys,
  named_by,
  param_name,
  stacks_all,
  words,
)
from adahessian_jax._evidence_roles import lead_names, leading_stack, role_name, stacked_prefix
from adahessian_jax.layout import FEATURES, HEADS, SPATIAL, STACKED, AxisNames, axis_role

#: Words (of a module name, :func:`words`) that make a module a convolution: Linen's ``Conv_0``
#: and ``ConvTranspose_0``, Haiku's ``conv2_d``, ``conv1``, ``conv_proj``, ``Conv2d``; the
#: depthwise and pointwise ones of MobileNets and ConvNeXts (``depthwise``, ``dwconv``).
_CONV_WORDS = frozenset(
  ("conv", "convolution", "deconv", "dwconv", "pwconv", "depthwise", "pointwise", "sepconv")
)


#: Words (of a module name) that make a "conv" a graph's or a point cloud's, no window over axes:
#: an R-GCN's kernel ``(relations, in, out)``, a ChebConv's ``(K, in, out)``, a GAT's ``(in,
#: heads, out)`` hold weights of their own along the first axis, as a mixture's experts do.
_GRAPH_WORDS = frozenset(
  ("graph", "gcn", "rgcn", "gat", "gatv2", "sage", "gin", "gine", "cheb", "tag", "arma", "gmm")
  + ("edge", "point", "spline", "hypergraph", "relational", "gnn", "mpnn", "message")
)


def _is_conv_module(module: tuple) -> bool:
  """Whether a module's name is a convolution's (a word of :data:`_CONV_WORDS` in it, and none of
  :data:`_GRAPH_WORDS`)."""
  found = words(module[-1] if module else None)
  return bool(_CONV_WORDS & found) and not _GRAPH_WORDS & found


class _Kernel(NamedTuple):
  """An unnamed kernel under the default rule, past its leading stacked axes."""

  index: int
  module: tuple
  bias: tuple[int, ...] | None  # its module's bias's shape, if it has one
  lead: int  # how many leading axes are stacked (named so)
  roles: Mapping[str, str]


def kernel_leaves(paths, shapes, names, roles, lead_of=None):
  """The kernels (:data:`~adahessian_jax._evidence_names.KERNEL_NAMES`: Flax's ``kernel``,
  Haiku's ``w``, TensorFlow's ``filters``) under the default rule whose only names are leading
  stacked axes (:func:`leading_stack`, or ``lead_of``), if any, with their module's bias.

  Yields:
    A :class:`_Kernel` for each.
  """
  lead_of = lead_of or leading_stack
  for module, members in by_module(paths).items():
    for kernel, bias in KERNEL_BIAS:
      i, b = members.get(kernel), members.get(bias)
      if i is None or roles[i] is None:
        continue
      lead = lead_of(names[i], roles[i])
      if lead is not None:
        yield _Kernel(i, module, None if b is None else shapes[b], lead, roles[i])


def _unnamed_spatial(names: AxisNames | None, roles: Mapping[str, str]) -> int | None:
  """For a boxed kernel whose leading axes are unnamed and its last two named as features or by
  names of no role (mesh axes), ``(*stacked, None, ..., "embed", "mlp")`` or ``(None, None,
  "embed", "model")`` (a ``Conv`` kernel whose spatial axes the model left unnamed), the number
  of leading stacked axes; else ``None``."""
  if names is None or len(names) < 3:
    return None
  if any(x is None or axis_role(x, roles) not in (FEATURES, None) for x in names[-2:]):
    return None
  n = stacked_prefix(names, roles)
  middle = names[n:-2]
  return n if middle and all(x is None for x in middle) else None


class _StackFacts(NamedTuple):
  """What the whole tree shows of its stacks of layers (:func:`_stack_facts`), which
  :func:`conv_kernels` needs to tell a bias-less convolution's kernel ``(*spatial, in, out)`` from
  a stack of them.

  Attributes:
    stack_axes: The stacks of layers known in the tree (named, or found from the evidence):
      ``{(axis, size)}``.
    shown: By a module, the leading stacked shapes of the vectors of one entry per channel (a
      norm's scale, a bias: ``(layers, channels)``) found stacked under it.
    norm_sizes: By a module, the first sizes of the unnamed scales and biases of rank >= 2 under
      it: a sign of a stack.
    scaled: The modules with an unnamed scale of rank >= 2 under them, which nothing shows
      stacked: the members of an ``nn.vmap`` over another axis (``variable_axes={"params": 1}``:
      ``(channels, members)``), whatever its first size.
    firsts: By a kernel's parent module and its number of leading stacked axes, the first sizes
      past those of the leaves under the module (``None`` for one with no axis to spare): a stack
      shows as one size in front of them all.
    mixed: The keys of ``firsts`` with a leaf outside a convolution's module.
  """

  stack_axes: set[tuple[int, int]]
  shown: dict[tuple, set[tuple[int, ...]]]
  norm_sizes: dict[tuple, set[int]]
  scaled: set[tuple]
  firsts: dict[tuple[tuple, int], set[int | None]]
  mixed: set[tuple[tuple, int]]


def _known_stacks(shapes, names, roles) -> set[tuple[int, int]]:
  """The ``(axis, size)`` of every axis named stacked in a leaf under the default rule."""
  return {
    (a, shape[a])
    for n, r, shape in zip(names, roles, shapes, strict=True)
    if n is not None and r is not None
    for a, x in enumerate(n)
    if axis_role(x, r) == STACKED
  }


def _shown_stacks(paths, shapes, names, roles, leaf_modules) -> dict[tuple, set[tuple[int, ...]]]:
  """The stacks that a vector of one entry per channel shows for the modules beside its own: the
  leading stacked shape of a norm's scale or a bias ``(layers, channels)`` found stacked, by the
  module above theirs."""
  shown: dict[tuple, set[tuple[int, ...]]] = {}
  for i, path in enumerate(paths):
    if names[i] is None or roles[i] is None or param_name(path) not in ("scale", "bias"):
      continue
    lead = stacked_prefix(names[i], roles[i])
    if lead and len(shapes[i]) == lead + 1:
      shown.setdefault(leaf_modules[i][:-1], set()).add(shapes[i][:lead])
  return shown


def _unnamed_norms(paths, shapes, names, leaf_modules) -> tuple[dict[tuple, set[int]], set[tuple]]:
  """The first sizes of the unnamed scales and biases of rank >= 2, by the module above theirs,
  and the modules above such a scale (:class:`_StackFacts`' ``norm_sizes`` and ``scaled``)."""
  norm_sizes: dict[tuple, set[int]] = {}
  scaled: set[tuple] = set()
  for i, path in enumerate(paths):
    if names[i] is None and param_name(path) in ("scale", "bias") and len(shapes[i]) >= 2:
      norm_sizes.setdefault(leaf_modules[i][:-1], set()).add(shapes[i][0])
      if param_name(path) == "scale":
        scaled.add(leaf_modules[i][:-1])
  return norm_sizes, scaled


def _first_sizes(
  kernels: list[_Kernel], shapes, leaf_modules
) -> tuple[dict[tuple[tuple, int], set[int | None]], set[tuple[tuple, int]]]:
  """The first sizes (past ``lead`` stacked axes) of the leaves under each kernel's parent module,
  and which of those modules hold a leaf outside a convolution's module (:class:`_StackFacts`'
  ``firsts`` and ``mixed``)."""
  firsts: dict[tuple[tuple, int], set[int | None]] = {
    (k.module[:-1], k.lead): set() for k in kernels
  }
  mixed: set[tuple[tuple, int]] = set()
  under = leaves_under({parent for parent, _ in firsts}, leaf_modules)
  for (parent, lead), sizes in firsts.items():
    for i in under[parent]:
      sizes.add(shapes[i][lead] if len(shapes[i]) > lead + 1 else None)
      if not _is_conv_module(leaf_modules[i]):
        mixed.add((parent, lead))
  return firsts, mixed


def _stack_facts(paths, shapes, names, roles, kernels: list[_Kernel]) -> _StackFacts:
  """What the tree shows of its stacks of layers (:class:`_StackFacts`)."""
  leaf_modules = [module_keys(path) for path in paths]
  norm_sizes, scaled = _unnamed_norms(paths, shapes, names, leaf_modules)
  firsts, mixed = _first_sizes(kernels, shapes, leaf_modules)
  return _StackFacts(
    stack_axes=_known_stacks(shapes, names, roles),
    shown=_shown_stacks(paths, shapes, names, roles, leaf_modules),
    norm_sizes=norm_sizes,
    scaled=scaled,
    firsts=firsts,
    mixed=mixed,
  )


def _shows_a_stack(
  k: _Kernel, shape: tuple[int, ...], facts: _StackFacts, anywhere: bool = True
) -> bool:
  """Whether a bias-less kernel's first size past its known stacked axes may be a stack of layers'
  (then its leading axis is no window's); with ``anywhere=False`` only by the leaves around it
  (not by a stack known elsewhere in the tree).

  Its stacked axes known, shown beside it (a GroupNorm's ``(layers, channels)`` in its block: a
  stack of 3 bias-less 3x3 Convs), a size past them is another stack's only if one is known that
  deep (a stack of stacks), or if the kernel's own module is stacked (``VmapConv_0``). Else it is
  if it is the size of a stack known in the tree, or the first size of an unnamed norm's scale or
  bias beside its module, or if a scale beside it shows an ``nn.vmap``'s members, or if every leaf
  under the module above it, one of them no convolution's, has that size first.
  """
  first = shape[k.lead]  # past the stacks known: a stack's size here would be one more
  parent = (k.module[:-1], k.lead)
  own = k.lead and not (k.module and stacks_all(k.module[-1]))
  if own and shape[: k.lead] in facts.shown.get(k.module[:-1], ()):
    known = {size for a, size in facts.stack_axes if a >= k.lead}
  else:
    known = {size for _, size in facts.stack_axes}
  return (
    (anywhere and first in known)
    or first in facts.norm_sizes.get(k.module[:-1], ())
    or k.module[:-1] in facts.scaled
    or (parent in facts.mixed and facts.firsts[parent] == {first})
  )


def _conv_reason(k: _Kernel, shape: tuple[int, ...], facts: _StackFacts) -> str | None:
  """Why an unnamed kernel is a convolution's for sure (:func:`conv_kernels`), or ``None``."""
  rank = len(shape) - k.lead
  named = _is_conv_module(k.module)
  beside_bias = k.bias == shape[: k.lead] + shape[-1:]
  # A window of one size (3x3, a 16x16 patch): a DenseGeneral kernel (a, b, c, out) over three
  # input axes of other sizes beside its bias (out,) is no convolution's, where the mean over
  # its leading axes would average a * b of its inputs even at block_size 1.
  square = len(set(shape[k.lead : -2])) == 1
  if beside_bias and rank >= 4 and (square or named):
    return f"beside its bias {k.bias}: a Conv kernel's (*spatial, in, out), spatial axes named"
  if not named:
    return None
  if beside_bias:
    return f"by its module's name {k.module[-1]!r}: a Conv kernel, spatial axes named"
  # Under Linen's name of an nn.vmap (VmapBlock_0, VmapConv_0), a bias-less kernel with a
  # spatial axis to spare may have the vmap's axis in front ((members, kh, kw, in, out)) or
  # none (params broadcast): the rank's guess, flagged. A rank-3 one (a 1-D convolution's; a
  # stack of them has rank 4) is a guess only where the leaves around it show a stack: a scanned
  # raw depthwise kernel (layers, width, channels), Mamba's conv1d beside its in_proj.
  vmapped = rank > 3 and not k.lead and any(named_by(key, ("Vmap",)) for key in k.module)
  if k.bias is None and not (vmapped or _shows_a_stack(k, shape, facts, rank > 3)):
    return f"by its module's name {k.module[-1]!r}: a Conv kernel, spatial axes named"
  return None


def conv_kernels(paths, shapes, names, roles) -> dict[int, tuple[AxisNames, str]]:
  """Axis names for the unnamed kernels that are a convolution's for sure.

  A kernel ``(*spatial, in, out)`` (past its leading stacked axes, a stack found from its bias
  ``(layers, out)``) is a convolution's, its leading axes spatial, which the rank alone could
  only guess:

  - beside a bias ``(out,)`` when it has two spatial axes or more (rank >= 4) of one size (a
    square window): no other layer has such a kernel and bias but a ``DenseGeneral`` over three
    input axes (a rank-3 kernel beside such a bias is also an attention's output projection
    ``(heads, head_dim, embed)``), and one over a square patch ``(p, p, channels)`` is a patch
    embedding's convolution written otherwise; a window of several sizes (``(4, 12, 3, 8)``)
    is that only under a convolution's name (below);
  - under a convolution's name (Linen's ``Conv_0``/``ConvTranspose_0``, Haiku's ``conv2_d``,
    ``conv1``, ``conv_proj``: :data:`_CONV_WORDS`), beside its bias or without one: rank 3
    (one spatial axis; a stack of them would have rank 4) where the leaves around it show no
    stack (a norm's scale or bias of rank >= 2 in the module above it, the first size of every
    leaf under it: a scanned raw depthwise ``(layers, width, channels)``), or, without a bias,
    rank >= 4 where
    the kernel's first size is not that of a stack of layers known in the tree (an ``nn.scan``
    of 1-D convolutions without a bias would leave no evidence of its own; past the kernel's own
    stack, where a scale or bias beside its module shows that, only a stack known that deep) nor
    of an unnamed ``scale`` or ``bias`` of rank >= 2 in the module above it (a norm's ``(layers,
    channels)`` in a scanned block of bias-less convolutions and norms: ``(layers, kh, kw, in,
    out)`` is no 3-D kernel), nor the first size of every leaf under the module above it where
    one of them is no convolution's (a mixture's raw ``(layers, experts, in, out)`` beside the
    kernel in an ``nn.vmap`` or ``nnx.vmap`` block: a stack's leaves all have its size first),
    and that is not under Linen's name of an ``nn.vmap`` (``VmapBlock_0``: its members stacked
    in front or elsewhere, or not at all, the params broadcast).

  What the tree shows of its stacks is read once (:func:`_stack_facts`), then each kernel is
  decided by these cases (:func:`_conv_reason`, :func:`_shows_a_stack`).

  Returns:
    ``{leaf index: (axis names, why)}``.
  """
  found: dict[int, tuple[AxisNames, str]] = {}
  kernels = list(kernel_leaves(paths, shapes, names, roles))
  facts = _stack_facts(paths, shapes, names, roles, kernels)
  for k in kernels:
    spatial = role_name(k.roles, SPATIAL)
    shape = shapes[k.index]
    rank = len(shape) - k.lead
    if spatial is None or rank < 3:
      continue
    why = _conv_reason(k, shape, facts)
    if why is not None:
      stacked = lead_names(names[k.index], k.lead)
      found[k.index] = (stacked + (spatial,) * (rank - 2) + (None, None), why)
  # Boxed with only the spatial axes unnamed, (None, None, "embed", "mlp"): the same evidence
  # from the bias, which a stack of layers' kernel would not sit beside ((layers, out) is its).
  for k in kernel_leaves(paths, shapes, names, roles, _unnamed_spatial):
    spatial = role_name(k.roles, SPATIAL)
    shape, own = shapes[k.index], names[k.index]
    rank = len(shape) - k.lead
    if spatial is None or k.bias != shape[: k.lead] + shape[-1:]:
      continue
    if rank >= 4 or _is_conv_module(k.module):
      why = f"beside its bias {k.bias}: a Conv kernel's (*spatial, in, out), spatial axes named"
      found[k.index] = (tuple(own[: k.lead]) + (spatial,) * (rank - 2) + tuple(own[-2:]), why)
  return found


def dense_general_kernels(paths, shapes, names, roles) -> dict[int, tuple[AxisNames, str]]:
  """Axis names for the unnamed kernels of ``DenseGeneral`` layers, by their bias.

  A kernel ``(*batch, *in, *out)`` whose bias ``(*batch, *out)`` fits it with as many ``batch``
  axes as the kernel's leading stacked axes and with no more (none for one layer; a stack found
  from that bias, or by other evidence: under ``ScanBlock_0`` a kernel ``(3, 3, 2, 4)`` beside
  ``(3, 2, 4)``, which alone could be one layer's with ``features=(3, 2, 4)``), is a
  ``DenseGeneral``'s (``nnx.LinearGeneral``'s, an ``Einsum``'s with that layout) when the bias
  has two output axes or more (``(heads, head_dim)``: a convolution's bias has one), or under
  Linen's automatic name (``DenseGeneral_0``). Its last
  input axis and its output axes are named ``features`` (blocks along that input axis,
  consecutive inputs of the flattened ``Dense``), and its other input axes ``heads`` (kept
  apart: ``axis=(-2, -1)`` over ``(heads, head_dim)`` is an attention's output projection),
  where the rank alone (rank >= 3) would take it for a ``Conv`` kernel. A bias that fits with
  more axes than the stacked ones (the kernel ``(6, 6, 4)``, bias ``(6, 4)``, no stack found: one
  layer or a batch of 6) leaves the rank's guess, and so does a bias of several axes beside a
  convolution's kernel stacked behind (``nn.vmap`` over axis -1: ``(kh, kw, in, out, members)``
  beside ``(out, members)``), known by its module's name or by two input axes or more before
  the last of one size (a window, 3x3), unless Linen's name makes it a ``DenseGeneral``.

  Returns:
    ``{leaf index: (axis names, why)}``.
  """
  found: dict[int, tuple[AxisNames, str]] = {}
  for k in kernel_leaves(paths, shapes, names, roles):
    features, heads = role_name(k.roles, FEATURES), role_name(k.roles, HEADS)
    shape, bias = shapes[k.index], k.bias
    if features is None or heads is None or bias is None or len(shape) - k.lead < 3:
      continue
    if len(shape) <= len(bias):
      continue
    named = linen_class(k.module) == "DenseGeneral"
    if not named and len(bias) - k.lead < 2:
      continue
    n_in = len(shape) - len(bias)  # the bias is (*batch, *out)
    window = shape[k.lead : k.lead + n_in - 1]  # the input axes before the last
    # A convolution stacked behind (nn.vmap over axis -1: (kh, kw, in, out, members) beside
    # (out, members)), by its module's name or its window of one size (3x3).
    if not named and (_is_conv_module(k.module) or (len(window) >= 2 and len(set(window)) == 1)):
      continue
    fits = bias_fits(shape, bias) or []
    if k.lead in fits and fits[-1] == k.lead:  # more: a batch axis or a layer axis, unsure
      stacked = lead_names(names[k.index], k.lead)
      found[k.index] = (
        stacked + (heads,) * (n_in - 1) + (features,) * (len(shape) - k.lead - n_in + 1),
        (f"by its module's name {k.module[-1]!r}" if named else f"by its bias {bias}")
        + ": a DenseGeneral kernel, its last input axis and output axes named features, any "
        "input axes before it heads",
      )
  return found


def elementwise_kernels(paths, shapes, names, roles) -> set[int]:
  """The unnamed kernels whose bias has their every axis: an ``Einsum`` that contracts none.

  Linen's ``nn.Einsum`` (and an ``nnx.Einsum`` given a bias) makes its bias of the kernel's axes
  that its output keeps, the contracted (input) ones dropped: ``"btd,td->btd"`` (a learned gate
  per position and channel) has a kernel ``(t, d)`` beside a bias ``(t, d)``, ``"btd,dt->btd"``
  one ``(d, t)`` beside ``(t, d)``. Each entry of such a kernel meets one output entry and no
  other, like a norm's scale, where the rank's reading blocks a rank-2 kernel along axis 0 as a
  ``Dense`` kernel's inputs (across its positions) and averages a rank-3 one over axis 0 as a
  ``Conv`` kernel's window. A kernel of rank >= 2 (:func:`kernel_leaves`: its only names leading
  stacked ones) beside a bias of its rank and sizes, in any order (a stack's ``(layers, t, d)``
  beside ``(layers, t, d)`` too), is one; no other layer sits beside such a bias (a ``Dense`` or
  ``Conv`` bias drops the input axes, a stack's keeps only its layers and outputs).

  Returns:
    The indices of these leaves under the default rule.
  """
  found = set()
  for k in kernel_leaves(paths, shapes, names, roles):
    shape = shapes[k.index]
    if k.bias is not None and len(shape) >= 2 and sorted(k.bias) == sorted(shape):
      found.add(k.index)
  return found


#: The names of a LoRA pair's factors, ``(A, B)``: loralib's and most ports' (PyTorch's layout,
#: ``A`` ``(rank, in)``, ``B`` ``(out, rank)``) and ``nnx.LoRA``'s (Flax's, ``(in, rank)`` and
#: ``(rank, out)``).
_LORA_PAIRS = (("lora_A", "lora_B"), ("lora_a", "lora_b"))


def torch_lora_factors(paths, shapes, names, roles) -> set[int]:
  """The LoRA factors stored output axis first, as PyTorch's ``loralib`` does: ``lora_A`` ``(rank,
  in)`` and ``lora_B`` ``(out, rank)`` side by side in a module, whose one shared size (the rank)
  is ``A``'s first and ``B``'s last axis, and not ``A``'s last and ``B``'s first as in Flax's
  layout (``nnx.LoRA``'s ``lora_a`` ``(in, rank)``, ``lora_b`` ``(rank, out)``). Read by their
  rank as ``Dense`` kernels, they would be blocked along axis 0: across the rank's rows and
  across outputs. Both of rank 2, unnamed, under the default rule; a pair whose shapes fit both
  layouts is left to the rank's reading.

  Returns:
    The indices of these leaves.
  """
  found = set()
  for members in by_leaf_name(paths).values():
    for pair in _LORA_PAIRS:
      a, b = (members.get(name) for name in pair)
      if a is None or b is None or any(roles[i] is None or names[i] for i in (a, b)):
        continue
      if len(shapes[a]) == len(shapes[b]) == 2:
        (a0, a1), (b0, b1) = shapes[a], shapes[b]
        if a0 == b1 and a1 != b0:
          found |= {a, b}
  return found


#: Words (of a module or parameter name, :func:`words`) that stack a leaf's experts.
_EXPERT_WORDS = frozenset(("moe", "expert", "experts"))


def expert_stacks(paths, shapes, names, roles, read: set[int]) -> dict[int, tuple[AxisNames, str]]:
  """Axis names for the unnamed kernels of a mixture of experts, by the names on their path.

  A mixture's experts are often one array per weight, ``(experts, in, out)`` (a raw
  ``self.param`` in a module ``moe``, MaxText's ``MoeBlock_0``/``wi``), which the rank alone
  would take for a 1-D ``Conv`` kernel and average across experts. A leaf of rank >= 3 (past
  its leading stacked axes) with a word of :data:`_EXPERT_WORDS` in its name or its module's
  (not further up: a ``MoETransformer_0`` around a whole model) has its first axis (after the
  stacked ones) named a stacked axis; its bias, scale or table are not
  touched, nor is the module of one expert (``experts_3``, ``experts/3/...``), nor the leaves
  in ``read`` (kernels already read by their shapes: an attention, a convolution).

  Returns:
    ``{leaf index: (axis names, why)}``.
  """
  found: dict[int, tuple[AxisNames, str]] = {}
  for i, path in enumerate(paths):
    leaf_roles, param = roles[i], param_name(path)
    if i in read or leaf_roles is None or param in READ_BY_NAME:
      continue
    lead = leading_stack(names[i], leaf_roles)
    stacked = role_name(leaf_roles, STACKED)
    if lead is None or stacked is None or len(shapes[i]) - lead < 3:
      continue
    keys = [key_name(k) for k in path]
    # Its own name or its module's: a word further up (a MoETransformer_0 around the whole
    # model) says nothing of an attention's packed qkv (embed, 3, hidden) under it.
    near = range(max(len(keys) - 2, 0), len(keys))
    at = [j for j in near if _EXPERT_WORDS & words(keys[j])]
    if not at:
      continue
    j = at[-1]
    # A module experts_3 is one expert (a parameter experts_w1 is not).
    one = j < len(keys) - 1 and "moe" not in words(keys[j]) and keys[j][-1].isdigit()
    if one or any(not isinstance(k, str) or k.isdigit() for k in keys[j + 1 :]):
      continue
    name = "experts" if leaf_roles.get("experts") == STACKED else stacked
    own: list[str | None] = list(names[i]) if names[i] else [None] * len(shapes[i])
    own[lead] = name
    found[i] = (tuple(own), f"axis {lead} taken for a mixture's experts: {keys[j]!r} in its path")
  return found


def expert_biases(paths, shapes, names, roles, experts: Mapping[int, Any]) -> set[int]:
  """The biases of a mixture's experts, by their shapes beside the experts' kernels.

  A kernel ``(experts, in, out)`` that :func:`expert_stacks` found has its bias ``(experts,
  out)`` beside it under a name of the author's (``b_in``, ``b1``, ``wi_b``), which the rank
  would take for a ``Dense`` kernel and block across the experts. An unnamed leaf of the
  kernel's module (its only names leading stacked ones) whose shape is the kernel's without its
  input axis (``kernel.shape[:-2] + kernel.shape[-1:]``, rank >= 2; one of rank 3 is itself taken
  for an expert's kernel) is such a bias: one entry per expert and output unit.

  Returns:
    The indices of these leaves under the default rule.
  """
  found = set()
  for members in by_leaf_name(paths).values():
    kernels = [i for i in members.values() if i in experts]
    for i in kernels:
      for j in members.values():
        if j == i or roles[j] is None or param_name(paths[j]) in READ_BY_NAME:
          continue
        # A bias (layers, experts, out) of rank 3 is itself taken for an expert's kernel.
        own = names[j] if j not in experts else None
        if dense_bias(shapes[i], shapes[j]) and leading_stack(own, roles[j]) is not None:
          found.add(j)
  return found
