"""Stacks of layers in a parameter tree: which leading axes of unnamed leaves stack layers.

Readers of :mod:`adahessian_jax._evidence`. ``nn.scan``, ``nn.vmap`` and ``nnx.vmap`` without axis
names leave plain arrays (a ``Dense`` kernel ``(layers, in, out)``, which the rank alone would take
for a 1-D ``Conv`` kernel). A module's own evidence shows its stack (:func:`stacks_by_evidence`: a
bias that repeats its kernel's leading axes, Linen's automatic names of the module and of the scans
above it, an attention's kernels), or its named relatives do (:func:`in_named_stacks`);
:func:`vectors_in_stacks` flags the vectors of a stack that nothing shows. The readers of Linen's
automatic names live in :mod:`adahessian_jax._evidence_linen`.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax

from adahessian_jax._evidence_attention import attention_stacks
from adahessian_jax._evidence_biases import (
  bias_fits,
  bias_pairs,
  flax_fits,
  raw_kernel_of,
  torch_kernel,
  torch_stacks,
)
from adahessian_jax._evidence_linen import (
  dense_stacks_elsewhere,
  linen_class_stack,
  scan_stacks,
  scanned_behind,
)
from adahessian_jax._evidence_names import (
  KERNEL_NAMES,
  READ_BY_NAME,
  by_module,
  param_name,
  under_prefixes,
)
from adahessian_jax._evidence_roles import role_name
from adahessian_jax.layout import STACKED, AxisNames, axis_role


def _key_strings(paths) -> list[tuple[str, ...]]:
  """Each path as a tuple of its keys' ``str``, whose prefixes are its ancestors."""
  return [tuple(str(k) for k in p) for p in paths]


def _stacked_axes(names: AxisNames, shape, roles: Mapping[str, str]) -> tuple:
  """``(position, name, size)`` of each axis of a leaf whose name's role is stacked."""
  return tuple(
    (i, names[i], shape[i]) for i in range(len(shape)) if axis_role(names[i], roles) == STACKED
  )


def in_named_stacks(
  paths, shapes, names, roles, alone: frozenset[int] | set[int] = frozenset()
) -> tuple[dict[int, tuple[AxisNames, int]], dict[int, str]]:
  """Stacked axes for unnamed leaves that sit in a stack of layers whose other leaves are named.

  ``nn.scan``/``nn.vmap``/``nnx.vmap`` stack every parameter of the module they
  transform, but only boxed parameters get the stacked axis' name: a LayerNorm
  scale or a bias left unboxed comes out as a plain ``(layers, features)``
  array, which the rank alone would take for a ``Dense`` kernel and average
  across layers. An unnamed leaf under the default rule takes the stacked axes
  of its nearest named relatives (the named leaves under its deepest ancestor
  that holds any) that they all have and every leaf under that ancestor has the
  sizes of (an inner stack's or a mixture's axes, which some relatives add below
  the ancestor, are left out): the transform stacks *every* parameter of
  the module, so an ancestor holding a leaf without them (a head's bias beside a
  scanned block) is above the stack, and a leaf of another module that merely
  has the stack's sizes (a 3x3 ``Conv`` kernel beside a stack of 3) keeps its own
  rule. The leaves in ``alone`` (of modules that show they are one layer, from
  :func:`stacks_by_evidence`) take no stacked axes and are not listed, and an ancestor
  holding any is above the stack.

  Returns:
    ``{leaf index: (inferred names, index of a relative)}``, and ``{leaf index:
    why}`` for the unnamed leaves that stay ambiguous: those that fit a
    relative's stacked axes beyond the ones inferred (their relatives
    disagree), and those inferred at the root, sharing no key with their
    relatives (a stack at the root, or a leaf of another module that happens to
    have the stack's sizes, in a tree that holds nothing else). Strict mode
    refuses these.
  """
  keys = _key_strings(paths)
  below = under_prefixes((key, j) for j, key in enumerate(keys))  # path prefix -> leaves under it
  named = under_prefixes((key, j) for j, key in enumerate(keys) if names[j] is not None)
  named_below = {prefix: sorted(leaves) for prefix, leaves in named.items()}  # ... in order

  def fits(stack, shape) -> bool:
    return bool(stack) and all(a < len(shape) and shape[a] == size for a, _, size in stack)

  kept_at: dict[tuple, tuple] = {}  # (prefix, axes) -> those axes every leaf under it has
  inferred: dict[int, tuple[AxisNames, int]] = {}
  unsure: dict[int, str] = {}  # leaf index -> why its inference is a guess
  for i, leaf_roles in enumerate(roles):
    if names[i] is not None or i in alone or leaf_roles is None or not named_below:
      continue
    # The named leaves under its deepest ancestor that holds any (the root, at worst).
    depth = next(d for d in range(len(keys[i]), -1, -1) if keys[i][:d] in named_below)
    ancestor = keys[i][:depth]
    nearest = named_below[ancestor]
    stacks = {j: _stacked_axes(names[j], shapes[j], leaf_roles) for j in nearest}
    signatures = {tuple((a, size) for a, _, size in st) for st in stacks.values()}
    # The stacked axes all of them have: a stack of stacks or a mixture's experts inside a
    # scanned block add axes of their own to the leaves below them, not to the block's.
    common = tuple(x for x in stacks[nearest[0]] if all((x[0], x[2]) in sig for sig in signatures))
    memo = (ancestor, common)
    if memo not in kept_at:
      kept_at[memo] = tuple(
        x for x in common if all(fits((x,), shapes[k]) and k not in alone for k in below[ancestor])
      )
    kept = kept_at[memo]
    if kept:
      own = [None] * len(shapes[i])
      for a, name, _ in kept:
        own[a] = name
      inferred[i] = (tuple(own), nearest[0])
      if depth == 0:
        unsure[i] = "it shares no module with that relative"
    if len(signatures) > 1 and any(
      fits(st, shapes[i]) and len(st) > len(kept) for st in stacks.values()
    ):
      unsure[i] = "its nearest named relatives disagree on whether " + (
        "more of its axes are stacked" if kept else "it is part of a stack of layers"
      )
  return inferred, unsure


def vectors_in_stacks(paths, shapes, names, roles) -> dict[int, str]:
  """The unnamed rank-2 leaves that may be one vector per layer of a stack nothing names.

  ``nn.scan`` over a block without biases (RWKV's, a Llama-style one) leaves no evidence of its
  stack (:func:`stacks_by_evidence`): its kernels ``(layers, in, out)`` keep the rank's guess,
  flagged, but a raw vector parameter of each layer (RWKV's ``time_decay``, a layer scale
  ``gamma``) comes out as ``(layers, features)``, which the rank takes for a ``Dense`` kernel and
  blocks across the layers. A norm's unnamed ``scale`` of rank 2 is such a stack's sign (one
  layer's has rank 1 but over several feature axes): a rank-2 leaf read by rank (no name that
  the default reads, no names) under an ancestor that holds such a scale of its first size,
  every leaf under which has that first size, is a guess.

  Returns:
    ``{leaf index: why its reading is a guess}``.
  """
  keys = _key_strings(paths)
  # Ancestor -> the first sizes of the leaves under it (None: rank < 2), and those of the unnamed
  # rank-2 scales under it.
  firsts = under_prefixes(
    (key[:-1], shapes[j][0] if len(shapes[j]) >= 2 else None) for j, key in enumerate(keys) if key
  )
  scales = under_prefixes(
    (key[:-1], shapes[j][0])
    for j, key in enumerate(keys)
    if key and names[j] is None and len(shapes[j]) == 2 and param_name(paths[j]) == "scale"
  )
  found: dict[int, str] = {}
  for i, key in enumerate(keys):
    if roles[i] is None or names[i] is not None or len(shapes[i]) != 2:
      continue
    if param_name(paths[i]) in (*READ_BY_NAME, *KERNEL_NAMES):
      continue
    for depth in range(len(key) - 1, -1, -1):
      if shapes[i][0] in scales.get(key[:depth], ()) and firsts[key[:depth]] == {shapes[i][0]}:
        where = jax.tree_util.keystr(tuple(paths[i][:depth])) or "the root"
        found[i] = (
          f"every leaf under {where} has a first axis of {shapes[i][0]}, as has a norm's "
          "rank-2 scale there: it may be one vector per layer of a stack of layers (nn.scan "
          "without axis names), which these blocks would mix: name its axes or give it a rule"
        )
        break
  return found


def _stack_count(
  module: tuple, members: dict[str, int], shapes
) -> tuple[tuple[int, ...] | None, str]:
  """How many leading axes of a module's unnamed leaves stack layers, by its own evidence.

  Two kinds: Linen's automatic name (``Dense_3``, :func:`linen_class_stack`) fixes the rank of a
  ``Dense`` kernel (2) and bias (1), so more axes are stacked (where it has a bias, only if that is
  the kernel's leading axes and output: not for ``nn.vmap`` with ``variable_axes={"params": 1}``,
  kernel ``(in, members, out)``, bias ``(out, members)``); and a bias that repeats its kernel's
  leading axes (kernel ``(layers, in, out)``, bias ``(layers, out)``), where one layer's bias is its
  kernel's trailing axes (``(out,)``; ``(heads, head_dim)`` for an attention projection), and it
  fits one way only (``(2, 3, 3, 4)`` beside ``(2, 3, 4)`` repeats 1 axis or 2: no count here, which
  Linen's scan names give, else at least the fewest, :func:`_fewest_stacked`). Both also show a
  module that is one layer: a ``Dense_0`` kernel of rank 2, a ``Conv_0`` bias of rank 1, a bias that
  is its kernel's trailing axes and cannot be read as repeating its leading ones
  (:func:`bias_fits`). Raw kernels and biases paired by name (``w_in``/``b_in``) show a stack the
  same way (:func:`_raw_pair_stacks`), a PyTorch-layout ``weight`` and its ``bias`` by the output
  axis (:func:`torch_stacks`), as does a ``kernel`` whose bias is its first axis past the stacked
  ones and fits no Flax layout (Hugging Face's ``FlaxConv1D`` ``(layers, out, in)`` beside
  ``(layers, out)``: :func:`torch_kernel`, :func:`flax_fits`), and ``nnx.LoRA``'s ``lora_a`` ``(in,
  rank)`` and ``lora_b`` ``(rank, out)`` by their shared rank.

  Returns:
    The sizes of the stacked axes (``()``: one layer for sure; ``None``: no evidence) and why.
  """
  by_name = linen_class_stack(module, members, shapes)
  if by_name is not None:
    return by_name
  if "lora_a" in members and "lora_b" in members:  # nnx.LoRA: (in, rank) and (rank, out)
    a, b = shapes[members["lora_a"]], shapes[members["lora_b"]]
    if len(a) == len(b) >= 2 and a[:-2] == b[:-2] and a[-1] == b[-2]:
      return a[:-2], f"its lora_a {a} and lora_b {b} are nnx.LoRA's (in, rank) and (rank, out)"
  for pair in bias_pairs(members, shapes):
    k, b = pair.k, pair.b
    if pair.counts == (0,):  # one layer's bias is its kernel's output axes, and nothing else
      return (), f"its {pair.bias} {b} is its {pair.kernel}'s trailing axes: one layer"
    if len(pair.counts) == 1:  # not several: (2, 3, 3, 4) beside (2, 3, 4) fits 1 or 2
      n = pair.counts[0]
      return k[:n], pair.repeats(n) + ": one per layer"
    if torch_kernel(k, b) and not flax_fits(k, b):  # FlaxConv1D's (out, in), stacked
      return k[:-2], pair.repeats(len(k) - 2) + (
        " before its output axis (Hugging Face's FlaxConv1D layout (out, in)): one per layer"
      )
  raw = _raw_pair_stacks(members, shapes)
  if raw is not None:
    return raw
  if "weight" in members and "bias" in members:
    w, b = shapes[members["weight"]], shapes[members["bias"]]
    readings = torch_stacks(w, b)
    if readings == [0]:
      return (), f"its bias {b} is its weight's output axis (PyTorch/Equinox layout): one layer"
    if len(readings) == 1:
      n = readings[0]
      return w[:n], (
        f"its bias {b} repeats its weight's leading axes {w[:n]} before its output axis "
        "(PyTorch/Equinox layout): one per layer"
      )
  return None, ""


def _fewest_stacked(
  members: dict[str, int], shapes, scanned: int | None
) -> tuple[tuple[int, ...], str] | None:
  """The stacked axes of a module whose bias can repeat several counts of its kernel's leading
  axes (kernel ``(2, 3, 3, 4)``, bias ``(2, 3, 4)``: 1 or 2, a stack of 2 ``DenseGeneral((3,
  4))`` or of 2 x 3 ``DenseGeneral(4)``; :func:`bias_fits`), where the count of Linen's scan
  names above it (``scanned``) is none of them: the fewest, stacked either way.

  Returns:
    The stacked axes' sizes and why, or ``None`` where it has no such bias or the scan names'
    count is one of them.
  """
  for pair in bias_pairs(members, shapes):
    if len(pair.counts) > 1 and pair.counts[0] > 0 and scanned not in pair.counts:
      n = pair.counts[0]
      return pair.k[:n], pair.repeats(n) + " or more: at least one per layer"
  return None


def _raw_pair_stacks(members: dict[str, int], shapes) -> tuple[tuple[int, ...], str] | None:
  """The stack that a module's raw kernels and biases paired by name (:func:`raw_kernel_of`:
  ``w_in``/``b_in``, ``w1``/``b1``, ``gating_w``/``gating_b``) show, where each pair that shows
  any shows the same: a bias that repeats its kernel's leading axes and its output axis (``w_in``
  ``(experts, in, out)`` beside ``b_in`` ``(experts, out)``) and could not be one layer's
  (its kernel's trailing axes). Else ``None`` (a pair of one layer shows no stack here: such a
  module may hold other raw leaves than its pairs).
  """
  leads, why = set(), ""
  for name, j in members.items():
    kernel = raw_kernel_of(name, members)
    if kernel is None or kernel == "w":  # Haiku's w/b: read as Flax's kernel/bias
      continue
    k, b = shapes[members[kernel]], shapes[j]
    fits = bias_fits(k, b)
    if fits is None:
      continue
    if not fits or fits[0] == 0:
      leads.add(None)  # one layer's, or either: no stack shown
      continue
    leads.add(k[: fits[0]])
    why = f"its {name} {b} repeats its {kernel}'s leading axes {k[: fits[0]]}: one per layer"
  if len(leads) != 1 or None in leads:
    return None
  return leads.pop(), why


def stacks_by_evidence(
  paths, shapes, names, roles
) -> tuple[dict[int, tuple[AxisNames, str]], set[int], set[int], dict[int, str]]:
  """Stacked axes for unnamed leaves whose own module shows it is a stack of layers.

  ``nn.scan``/``nn.vmap``/``nnx.vmap`` without axis names (no boxes, no transform metadata)
  leave plain arrays: a ``Dense`` kernel ``(layers, in, out)``, which the rank alone would take
  for a 1-D ``Conv`` kernel and average across layers. A module whose automatic Linen name or
  whose bias says how many leading axes are stacked (:func:`_stack_count`) has those axes named
  for every unnamed leaf under the default rule that has them, and so has a Flax attention
  module's stack that its kernels show (:func:`attention_stacks`), and a module under Linen's
  automatic names of the scans above it (:func:`scan_stacks`); bias-less ``Dense_N`` siblings
  whose first sizes differ have their stacked axis where :func:`dense_stacks_elsewhere` finds
  it; :func:`in_named_stacks` then passes them to the module's unnamed relatives in the stack,
  as it does real names. A module that shows it is one layer (a ``Conv_0`` beside a stack of as
  many layers as its kernel is wide) takes no stacked axes from its relatives.

  Returns:
    ``{leaf index: (names with the stacked axes, None elsewhere; why)}``, the unnamed
    leaves of the modules that are one layer for sure, and the leaves read with the stack in
    front by a bias-less ``Dense_N``'s name alone, where it may be elsewhere
    (:func:`dense_stacks_elsewhere`: ``nn.vmap`` with ``variable_axes={"params": 1}``), and
    ``{leaf index: why}`` for those whose number of stacked axes is a guess (an
    ``nn.remat_scan``'s, :func:`scan_stacks`), or whose place is (:func:`scanned_behind`).
  """
  modules = by_module(paths, lambda i: names[i] is None and roles[i] is not None)
  found: dict[int, tuple[AxisNames, str]] = {}
  alone: set[int] = set()
  counts = {module: _stack_count(module, members, shapes) for module, members in modules.items()}
  unstacked = _not_stacked_in_front(modules, counts, shapes)
  moved, unplaced = dense_stacks_elsewhere(modules, counts, shapes)
  # An nn.scan's name over them shows the stack in front (as scans of layers put it).
  shown, _ = scan_stacks({m: modules[m] for m in unplaced}, paths, shapes, counts, unstacked)
  unplaced = {m for m in unplaced if shown.get(m, (None,))[0] != counts[m][0]}
  for module, (axis, why) in moved.items():
    counts[module] = (None, "") if axis is None else ((), why)
  # The modules whose own evidence shows no stack (their name, their bias, their Dense_N
  # siblings'): their attention's kernels, then the scans above them, may.
  unknown = {m: ms for m, ms in modules.items() if m not in moved and counts[m][0] is None}
  by_attention = attention_stacks(unknown, shapes)  # a stack for each module it reads, never None
  counts.update(by_attention)
  for module in by_attention:
    del unknown[module]
  by_scans, guessed_modules = scan_stacks(unknown, paths, shapes, counts, unstacked)
  counts.update(by_scans)
  for module, members in unknown.items():  # a bias's counts that no scan names pick: the fewest
    lead = counts[module][0]
    least = _fewest_stacked(members, shapes, None if lead is None else len(lead))
    if least is not None:
      counts[module] = least
  for module, members in modules.items():
    lead, why = counts[module]
    axis = moved[module][0] if module in moved else None
    if axis is not None:
      for i in members.values():
        stacked = role_name(roles[i], STACKED)
        if stacked is not None and len(shapes[i]) > axis:
          own: list[str | None] = [None] * len(shapes[i])
          own[axis] = stacked
          found[i] = (tuple(own), why)
      continue
    if lead == ():
      alone.update(members.values())
    n = len(lead or ())
    if not n:
      continue
    for i in members.values():
      stacked = role_name(roles[i], STACKED)
      if stacked is not None and len(shapes[i]) > n and shapes[i][:n] == lead:
        found[i] = ((stacked,) * n + (None,) * (len(shapes[i]) - n), why)
  unsure = {i for module in unplaced for i in modules[module].values() if i in found}
  guessed_modules.update(scanned_behind(modules, paths, shapes, counts))
  guessed = {
    i: why for m, why in guessed_modules.items() for i in modules[m].values() if i in found
  }
  return found, alone, unsure, guessed


def _not_stacked_in_front(
  modules: dict[tuple, dict[str, int]], counts: dict[tuple, tuple], shapes
) -> set[tuple]:
  """The modules whose own evidence shows their parameters are stacked in front by no transform:
  one layer for sure (``counts``, :func:`_stack_count`: a bias that is its kernel's trailing axes
  only), or a kernel beside a bias that fits it in no layout (:func:`bias_fits`: ``nn.scan`` with
  ``variable_axes={"params": 1}``, kernel ``(in, layers, out)`` beside ``(out, layers)``).

  Under Linen's name of an ``nn.scan`` such a module shows the scan stacks nothing in front: it
  broadcasts its parameters (``variable_broadcast="params"``, a cell scanned over time) or stacks
  them along another axis.
  """
  found = {module for module, (lead, _) in counts.items() if lead == ()}
  for module, members in modules.items():
    if any(1 <= len(p.b) < len(p.k) and not p.counts for p in bias_pairs(members, shapes)):
      found.add(module)
  return found
