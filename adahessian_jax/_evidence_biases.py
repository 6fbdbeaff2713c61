"""Biases in a parameter tree: which leaves are biases, and what a bias shows of its kernel.

Readers of :mod:`adahessian_jax._evidence`: the tables of attention biases (:func:`bias_tables`),
raw biases by their names (:func:`haiku_biases`, :func:`named_biases`), the weights and kernels
whose bias shows PyTorch's layout, output axis first, or a weight's Flax's
(:func:`weights_by_bias`). And the arithmetic of a kernel's and its bias's shapes that they share
with the readers of stacks and kernels: raw pairs by name (:func:`raw_kernel_of`), how many of the
kernel's leading axes a bias repeats (:func:`bias_fits`), Flax's layouts (:func:`dense_bias`,
:func:`flax_fits`) and PyTorch's (:func:`torch_kernel`, :func:`torch_stacks`), and a module's kernel
and bias pairs with the counts of stacked axes they fit (:func:`bias_pairs`). For other modules: a
module's kernel and bias (:func:`kernel_biases`, for :mod:`adahessian_jax.hessian.landscape`) and
whether a name says a table holds attention biases (:func:`names_a_bias_table`, for
:mod:`adahessian_jax.nnx`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple

from adahessian_jax._evidence_names import (
  KERNEL_BIAS,
  READ_BY_NAME,
  by_leaf_name,
  by_module,
  leaf_name,
  linen_class,
  module_keys,
  param_name,
  under_prefixes,
  words,
)


def bias_tables(paths, roles) -> set[int]:
  """The tables of attention biases: a ``(num_buckets, heads)`` table of relative positions.

  Hugging Face's Flax T5 keeps its relative position biases in an ``nn.Embed(num_buckets,
  heads)`` named ``relative_attention_bias``, BEiT in a raw ``relative_position_bias_table``
  ``(num_distances, heads)``: tables (:func:`param_name`) whose rows are positions and whose
  columns are heads, one bias per entry, that the table rule (blocks along the last axis) would
  average across heads. A table with the word ``bias`` in its name or its module's name is one,
  but for a leaf paired by name with a bias of its own (``emb_weight`` beside ``emb_bias``,
  ``pos_w`` beside ``pos_b``, under a module ``pos_bias``): a layer's weight, not a table of
  biases, which has none (:func:`_paired_with_biases`).

  Returns:
    The indices of these leaves under the default rule.
  """
  found, paired = set(), _paired_with_biases(paths)
  for i, path in enumerate(paths):
    if roles[i] is not None and i not in paired and names_a_bias_table(path):
      found.add(i)
  return found


def names_a_bias_table(path) -> bool:
  """Whether a leaf's name says it is a table of attention biases (:func:`bias_tables`): a table
  (:func:`param_name`) with the word ``bias`` (:func:`words`) in its name or its module's (T5's
  ``relative_attention_bias`` ``nn.Embed``/``nnx.Embed``, Linen's ``RelativeAttentionBias_0``),
  or, for an ``nn.Embed`` Linen named ``Embed_0``, in its parent's name; pairing aside.

  Args:
    path: The leaf's canonical path (:func:`adahessian_jax.layout.leaves`).

  Returns:
    ``True`` if its name and its module's say so.
  """
  if param_name(path) not in ("embedding", "table"):
    return False
  module = module_keys(path)
  found = words(leaf_name(path))
  if module:  # Linen names a module of class RelativeAttentionBias 'RelativeAttentionBias_0'
    found |= words(module[-1])
  if len(module) > 1 and linen_class(module) == "Embed":  # its unnamed nn.Embed: its parent's
    found |= words(module[-2])
  return "bias" in found


def _paired_with_biases(paths) -> set[int]:
  """The leaves that a bias beside them is paired with by name: a ``<name>_weight`` with its
  ``<name>_bias`` (:func:`_named_weight_pairs`), a raw kernel with its raw bias
  (:func:`raw_kernel_of`: ``pos_w`` with ``pos_b``, ``w_in`` with ``b_in``)."""
  found = {pair.weight for pair in _named_weight_pairs(paths)}
  for members in by_leaf_name(paths).values():
    for name in members:
      kernel = raw_kernel_of(name, members)
      if kernel is not None:
        found.add(members[kernel])
  return found


def haiku_biases(paths, roles) -> set[int]:
  """Raw biases by name: Haiku's ``b`` beside its ``w``, a ``<name>_b`` beside its ``<name>_w``,
  a ``b_<name>`` beside its ``w_<name>`` and a ``b<digits>`` beside its ``w<digits>``.

  ``hk.Linear`` and ``hk.Conv`` name theirs ``w``/``b``, and Haiku code that makes its own
  parameters often follows suit: AlphaFold's attention holds ``gating_w`` ``(channels, heads,
  head_dim)`` beside ``gating_b`` ``(heads, head_dim)``, and its ``Linear`` of several outputs a
  bias ``(heads, head_dim)``; a mixture of raw params holds ``b_in`` ``(experts, out)`` beside
  ``w_in`` ``(experts, in, out)`` (:func:`raw_kernel_of`). One entry per output unit, like a
  Flax ``bias``: read as a ``Dense`` kernel, it would be blocked across heads or experts.

  Returns:
    The indices of these leaves under the default rule.
  """
  found = set()
  for members in by_leaf_name(paths).values():
    for name, i in members.items():
      if roles[i] is not None and raw_kernel_of(name, members) is not None:
        found.add(i)
  return found


def raw_kernel_of(bias: str, members: Mapping[str, Any]) -> str | None:
  """The name of the raw kernel in ``members`` that a raw bias named ``bias`` goes with, if any:
  Haiku's ``w`` for ``b``, ``<name>_w`` for ``<name>_b`` (AlphaFold's ``gating_w``), ``w_<name>``
  for ``b_<name>`` (a mixture's ``w_in``/``b_in``) and ``w<digits>`` for ``b<digits>``
  (``w1``/``b1``); either letter in either case (TransformerLens's ``W_Q``/``b_Q``)."""
  if bias in ("b", "B") or bias.endswith(("_b", "_B")):
    kernels = [bias[:-1] + w for w in "wW"]
  elif bias.startswith(("b_", "B_")) or re.fullmatch(r"[bB]\d+", bias):
    kernels = [w + bias[1:] for w in "wW"]
  else:
    return None
  return next((kernel for kernel in kernels if kernel in members), None)


def named_biases(paths, roles) -> set[int]:
  """Biases by their name: a leaf whose name has the word ``bias`` (split at ``_``).

  A raw bias is often named after its kernel: a mixture's ``wi_0_bias`` or gpt-oss's
  ``gate_up_proj_bias`` ``(experts, out)``, a custom attention's ``q_bias`` ``(heads,
  head_dim)``. One entry per output unit, like a Flax ``bias``: read as a ``Dense`` kernel by its
  rank, it was blocked across experts or heads. Tables (``relative_attention_bias``) and
  weights are left to :func:`bias_tables` and :func:`weights_by_bias`.

  Returns:
    The indices of these leaves under the default rule.
  """
  found = set()
  for i, path in enumerate(paths):
    name = leaf_name(path)
    if roles[i] is None or name is None or param_name(path) in READ_BY_NAME:
      continue
    if {"bias", "biases"} & set(name.lower().split("_")):
      found.add(i)
  return found


def kernel_biases(paths) -> dict[int, int]:
  """``{kernel leaf index: bias leaf index}`` for the modules holding both (:data:`KERNEL_BIAS`:
  Flax's ``kernel`` and ``bias``, Haiku's ``w`` and ``b``, TensorFlow's ``filters`` and
  ``bias``)."""
  found: dict[int, int] = {}
  for members in by_module(paths).values():
    for kernel, bias in KERNEL_BIAS:
      if kernel in members and bias in members:
        found[members[kernel]] = members[bias]
  return found


def dense_bias(k: tuple[int, ...], b: tuple[int, ...]) -> bool:
  """Whether a bias is its kernel without the input axis, as Flax lays out a ``Dense``: ``(in,
  out)`` beside ``(out,)``, stacked or not (``(layers, in, out)`` beside ``(layers, out)``)."""
  return len(k) >= 2 and b == k[:-2] + k[-1:]


def bias_fits(kernel: tuple[int, ...], bias: tuple[int, ...]) -> list[int] | None:
  """How a bias can sit beside its kernel: the numbers ``n`` of the kernel's leading axes that it
  repeats before the kernel's trailing axes (``bias == kernel[:n] + kernel[-(len(bias) - n):]``),
  in increasing order.

  ``0`` is one layer's bias, the kernel's trailing axes (``(out,)``; ``(heads, head_dim)`` for an
  attention projection); ``n > 0`` a stack of ``n`` axes (kernel ``(layers, in, out)``, bias
  ``(layers, out)``), or a ``DenseGeneral``'s batch axes. Both can fit (kernel ``(6, 6, 4)``, bias
  ``(6, 4)``). ``None`` where the bias has no axes or no fewer than the kernel: no such pair.
  """
  if not 1 <= len(bias) < len(kernel):
    return None
  cut = len(kernel) - len(bias)
  return [n for n in range(len(bias)) if bias == kernel[:n] + kernel[cut + n :]]


def torch_kernel(k: tuple[int, ...], b: tuple[int, ...]) -> bool:
  """Whether a bias is its kernel's first axis past any stacked ones, as a ``Linear``'s
  ``(out, in)`` beside ``(out,)`` (Hugging Face's ``FlaxConv1D``): ``b == k[:-1]``, rank 2 or
  more (a stack ``(layers, out, in)`` beside ``(layers, out)``)."""
  return len(k) >= 2 and b == k[:-1]


def flax_fits(k: tuple[int, ...], b: tuple[int, ...]) -> bool:
  """Whether a bias fits its kernel as Flax lays them out: its kernel's trailing (output) axes
  after any stacked ones in front (:func:`bias_fits`: a ``Dense``'s ``(in, out)`` beside
  ``(out,)``, a stack's ``(layers, in, out)`` beside ``(layers, out)``, a ``DenseGeneral``'s
  ``(embed, heads, head_dim)`` beside ``(heads, head_dim)``), or with a stacked axis behind the
  input, at the same place in both (``nn.vmap`` with ``variable_axes={"params": 1}``: kernel
  ``(in, members, out)``, bias ``(out, members)``)."""
  if bias_fits(k, b):
    return True
  return any(
    k[p] == b[p] and flax_fits(k[:p] + k[p + 1 :], b[:p] + b[p + 1 :])
    for p in range(1, min(len(k) - 1, len(b)))
  )


def torch_stacks(w: tuple[int, ...], b: tuple[int, ...]) -> list[int]:
  """The numbers of leading stacked axes with which ``w``, ``b`` are a PyTorch-layout pair.

  One layer's weight has its output axis first: ``Linear`` ``(out, in)`` with bias ``(out,)``,
  Equinox's ``Conv`` ``(out, in, *spatial)`` with bias ``(out, 1, ..., 1)`` (PyTorch's
  ``(out,)``); ``eqx.filter_vmap`` adds the stacked axes to both. More than one reading (an
  output or input axis of size 1) leaves the stack unknown.
  """
  found = []
  for n in range(len(w) - 1):
    if len(b) == len(w) - 1 and b[: n + 1] == w[: n + 1] and all(x == 1 for x in b[n + 1 :]):
      found.append(n)
  if len(w) >= 3 and b == w[:1]:  # PyTorch's Conv bias (out,)
    found.insert(0, 0)
  return found


class _WeightPair(NamedTuple):
  """A weight or kernel and its bias, side by side in a module (:func:`weights_by_bias`)."""

  module: tuple  # their module's path (:func:`by_module`, :func:`by_leaf_name`)
  weight: int  # the weight's or kernel's leaf index
  bias: int  # its bias's leaf index
  is_weight: bool  # whether a PyTorch ``weight`` (or a name with that word), not a kernel


def _named_weight_pairs(paths) -> list[_WeightPair]:
  """A :class:`_WeightPair` (a weight) for each leaf whose name has the word ``weight`` and other
  words (``in_proj_weight``, ``weight_ih_l0``) beside the leaf of that name with ``bias`` for
  ``weight`` (``in_proj_bias``, ``bias_ih_l0``), else beside the module's ``bias`` (Equinox's
  ``GRUCell`` and ``LSTMCell``: ``weight_ih`` and ``weight_hh`` share one)."""
  pairs = []
  for module, members in by_leaf_name(paths).items():
    for name, w in members.items():
      words = name.split("_")
      if "weight" in words and len(words) > 1:
        bias = "_".join("bias" if x == "weight" else x for x in words)
        if bias in members:
          pairs.append(_WeightPair(module, w, members[bias], is_weight=True))
        elif "bias" in members:  # one bias for several weights: Equinox's GRUCell, LSTMCell
          pairs.append(_WeightPair(module, w, members["bias"], is_weight=True))
  return pairs


def _nearest(under: dict[tuple, set], module: tuple) -> set:
  """The values :func:`under_prefixes` holds under the nearest module above ``module`` that
  holds any (its parent first), the nearest relatives' evidence; empty if none does."""
  for n in range(len(module) - 1, -1, -1):
    if under.get(module[:n]):
      return under[module[:n]]
  return set()


class WeightLayouts(NamedTuple):
  """What the biases beside weights and kernels show of their layouts (:func:`weights_by_bias`).

  Attributes:
    output_first: The leaves read output axis first, PyTorch's layout.
    input_first: The ``weight`` leaves read in Flax's layout, output axis last.
    unsure: Why some of ``output_first`` and the square kernels beside a bias that fits both
      layouts are guesses, by leaf.
  """

  output_first: set[int]
  input_first: set[int]
  unsure: dict[int, str]


def weights_by_bias(paths, shapes, roles) -> WeightLayouts:
  """The leaves under the default rule whose bias settles their layout: PyTorch's, output axis
  first, or for a ``weight``, Flax's.

  A ``weight`` beside a bias that is its output axis first (``Linear`` ``(out, in)`` beside
  ``(out,)``; Equinox's ``Conv`` ``(out, in, kh, kw)`` beside ``(out, 1, 1)``), after any
  stacked axes, one way only (:func:`torch_stacks`), and that is not its last axis as a Flax
  kernel's bias would be (a square ``(6, 6)`` beside ``(6,)`` is either). And a ``kernel``
  (Haiku's ``w``) beside a bias of its first axis past any stacked ones (:func:`torch_kernel`)
  that fits no Flax layout (:func:`flax_fits`): Hugging Face's ``FlaxConv1D`` (GPT-2's
  ``c_attn``, ``c_fc``, ``c_proj``) keeps a kernel ``(out, in)``, scanned ``(layers, out, in)``
  beside ``(layers, out)``. A square one (``(d, d)``, ``(layers, d, d)``; also a stacked
  ``weight``) beside its bias fits both layouts, as does a kernel that ``nn.vmap`` over axis 1
  gives a square ``Dense`` (``(in, members, out)`` beside ``(out, members)``); it is read as the
  nearest others show (those under the nearest module above it that holds any that show a
  layout): PyTorch's where some show it and none Flax's (a kernel beside a bias of its last axis
  past stacked ones, and not its first). A ``weight``'s layout is not a kernel's: only kernels
  show it for a square kernel. (:func:`adahessian_jax._evidence.read` takes a kernel of rank 3 or
  more output axis first only where its leading axes are found stacked.) A name with the word
  ``weight`` pairs with the same name with ``bias`` for it (PyTorch's ``in_proj_weight``
  and ``in_proj_bias``, an LSTM's ``weight_ih_l0`` and ``bias_ih_l0``). A ``weight`` whose input
  axis has size 1 fits one layer and a stack of layers of output size 1 (Equinox's ``Conv2d(1,
  out)`` ``(out, 1, kh, kw)`` beside ``(out, 1, 1)``, or ``out`` stacked ``Conv1d(kh, 1)``): one
  layer, output axis first, where it has 2 or more spatial axes and the nearest weights whose
  biases show their stacks all show one layer; where they all show one stack, as they are read
  (:func:`adahessian_jax._evidence_stacks.in_named_stacks`); else output axis first, a guess
  (also ``Conv1d(1, out)``, which ``out`` stacked ``Linear(kw, 1)`` fit as well).

  A ``weight`` beside a bias that is its last axis past any stacked ones and fits no PyTorch
  reading (not a square ``(d, d)``, which fits both) is in Flax's layout: Hugging Face's PyTorch
  ``Conv1D`` keeps GPT-2's ``c_attn.weight`` ``(in, out)`` beside ``c_attn.bias`` ``(out,)``.

  Returns:
    A :class:`WeightLayouts`.
  """
  pairs = [
    _WeightPair(module, members[weight], members[bias], is_weight=weight == "weight")
    for module, members in by_module(paths).items()
    for weight, bias in (("weight", "bias"), *KERNEL_BIAS)
    if weight in members and bias in members
  ]
  pairs = list(dict.fromkeys(pairs + _named_weight_pairs(paths)))  # a weight_ih is both
  found, input_first, square, several = set(), set(), {}, {}
  shown: list[tuple[tuple, str]] = []  # (module, "torch" | "weight" | "flax") for each that shows
  stacks: list[tuple[tuple, int]] = []  # (module, stacked axes) of each weight whose bias shows it
  for pair in pairs:
    module, w, is_weight = pair.module, pair.weight, pair.is_weight
    if roles[w] is None:
      continue
    k, v = shapes[w], shapes[pair.bias]
    dense = dense_bias(k, v)
    if is_weight:
      readings = torch_stacks(k, v)
      flax = any(v == k[:n] + k[-1:] for n in range(len(k) - 1))
      if torch_kernel(k, v) and dense and len(readings) == 1:  # (*stack, d, d)
        square[w] = (module, is_weight)
      elif len(readings) == 1 and not flax:
        found.add(w)
        shown.append((module, "weight"))
        stacks.append((module, readings[0]))
      elif len(readings) > 1 and readings[0] == 0 and not flax:  # an input axis of size 1
        several[w] = (module, k, v)
      elif flax and not readings and not torch_kernel(k, v):  # (in, out) beside (out,)
        input_first.add(w)
      continue
    if not torch_kernel(k, v):
      if dense:
        shown.append((module, "flax"))
    elif flax_fits(k, v):  # (*stack, d, d) beside (*stack, d), or a Flax nn.vmap's over axis 1
      square[w] = (module, is_weight)
    else:
      found.add(w)
      shown.append((module, "torch"))
  below = {  # kernels only: the layouts a Flax kernel's relatives show
    False: under_prefixes(shown),
    True: under_prefixes((m, x) for m, x in shown if x != "weight"),
  }
  unsure = {}
  for w, (module, is_weight) in square.items():
    layouts = _nearest(below[not is_weight], module)
    if layouts and "flax" not in layouts:
      found.add(w)
    elif len(layouts) > 1 and not is_weight:
      unsure[w] = (
        "a square kernel beside a bias that fits both layouts, Flax's (in, out) and Hugging "
        "Face's FlaxConv1D (out, in), and the nearest kernels beside their biases show both: "
        "name its axes or give it a rule"
      )
  stacks_below = under_prefixes(stacks) if several else {}
  for w, (module, k, v) in several.items():
    near = _nearest(stacks_below, module)
    if len(near) == 1 and 0 not in near:
      continue  # the nearest show a stack: read as their relative (in_named_stacks)
    found.add(w)
    if near != {0} or len(k) < 4:  # one Conv1d(1, out) or out stacked Linear(in, 1): alike
      unsure[w] = (
        f"its bias {v} is one layer's, output axis first, and, its input axis having size 1, "
        f"also a stack of {k[0]} layers' of output size 1 {k[1:]}: give it a rule"
      )
  return WeightLayouts(found, input_first, unsure)


class BiasPair(NamedTuple):
  """A module's kernel and bias (:data:`KERNEL_BIAS`), and how many of the kernel's leading axes
  the bias can repeat (:func:`bias_pairs`)."""

  kernel: str  # its parameter names, a pair of KERNEL_BIAS: "kernel" and "bias", "w" and "b", ...
  bias: str
  k: tuple[int, ...]  # their shapes
  b: tuple[int, ...]
  counts: tuple[int, ...]  # the numbers of stacked axes the bias fits (bias_fits), () if none

  def repeats(self, n: int) -> str:
    """Why the bias shows ``n`` stacked axes: ``"its bias (3, 5) repeats the kernel's leading
    axes (3,)"``."""
    return f"its {self.bias} {self.b} repeats the {self.kernel}'s leading axes {self.k[:n]}"


def bias_pairs(members: Mapping[str, int], shapes) -> list[BiasPair]:
  """The kernel and bias pairs (:data:`KERNEL_BIAS`) of a module's ``members`` (``{parameter
  name: leaf index}``), in that order, each with every number of stacked axes its bias fits
  (:func:`bias_fits`): what the readers of stacks read a stack by
  (:mod:`adahessian_jax._evidence_stacks`, :mod:`adahessian_jax._evidence_linen`)."""
  pairs = []
  for kernel, bias in KERNEL_BIAS:
    if kernel in members and bias in members:
      k, b = shapes[members[kernel]], shapes[members[bias]]
      pairs.append(BiasPair(kernel, bias, k, b, tuple(bias_fits(k, b) or ())))
  return pairs
