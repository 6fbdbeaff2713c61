"""Attention projections in a parameter tree: the axes of their unnamed kernels, and the stack of
layers they show.

Readers of :mod:`adahessian_jax._evidence`: Flax's attention modules by their submodules' names,
``query``, ``key``, ``value`` and ``out`` (:func:`flax_attention_names`), attentions of other
names (``q_proj``/``o_proj``, Gemma's einsums) by their kernels' shapes beside an output kernel
(:func:`_attention_by_shapes`), and the stack of layers that their kernels show without a bias
(:func:`attention_stacks`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from adahessian_jax._evidence_kernels import conv_kernels, kernel_leaves
from adahessian_jax._evidence_names import KERNEL_NAMES, READ_BY_NAME, module_keys, param_name
from adahessian_jax._evidence_roles import lead_names, leading_stack, role_name
from adahessian_jax.layout import STACKED, AxisNames

#: The axis names of the projection kernels of Flax's attention modules, by module name.
_ATTENTION_AXES = {
  "query": ("embed", "heads", "head_dim"),
  "key": ("embed", "heads", "head_dim"),
  "value": ("embed", "heads", "head_dim"),
  "out": ("heads", "head_dim", "embed"),
}


def flax_attention_names(
  paths, shapes, names, roles, convs: Mapping[int, Any] | None = None
) -> tuple[dict[int, AxisNames], set[int]]:
  """Axis names for the unnamed projection kernels of Flax attention modules.

  ``nn.MultiHeadDotProductAttention`` and ``nnx.MultiHeadAttention`` project with
  ``DenseGeneral``/``LinearGeneral`` submodules named ``query``, ``key``, ``value``
  (kernels ``(embed, heads, head_dim)``) and ``out`` (``(heads, head_dim, embed)``).
  Unboxed, the rank would take these for 1-D ``Conv`` kernels: the query kernel
  averaged over all its inputs, the output kernel across heads. A module is taken for
  attention when it holds a rank-3 ``query`` and a rank-3 ``out`` kernel whose first
  two axes are the query's last two (heads, head size), so a lone ``Conv`` named
  ``out`` or ``value`` keeps the rank's guess; its ``key`` and ``value`` kernels
  (another ``embed`` for cross-attention) when their last two axes are those too.
  Kernels whose only names are leading stacked axes (a stack found by
  :func:`~adahessian_jax._evidence_stacks.stacks_by_evidence` or from named relatives) are
  read past those axes, the stack the same for all of the module's kernels.

  A query kernel whose first two axes have one size (embed = heads) is also what an
  ``nn.scan`` stack of ``Dense`` kernels ``(layers, in, out)`` named ``query`` and ``out`` is
  when ``in`` = ``layers``: its module's kernels are taken for attention but listed as unsure.

  Args:
    paths, shapes, names, roles: The leaves' paths, shapes and axis names, and the axis roles of
      each leaf's default rule (``None`` for a leaf with a rule of its own).
    convs: The kernels that are a convolution's for sure (:func:`conv_kernels`), which are no
      attention's, if the caller has them already.

  Returns:
    ``{leaf index: axis names}`` for the unnamed leaves under the default rule, and the
    indices among them whose module could be such a stack.
  """
  kernels: dict[tuple[tuple[str, ...], str], tuple[int, int]] = {}  # -> (leaf, stacked axes)
  for i, path in enumerate(paths):
    if roles[i] is None:
      continue
    lead = leading_stack(names[i], roles[i])
    if lead is None or len(shapes[i]) != lead + 3:
      continue
    module = tuple(map(str, module_keys(path)))  # also a flattened key's ("attn/query/kernel")
    if param_name(path) == "kernel" and module and module[-1] in _ATTENTION_AXES:
      kernels[module[:-1], module[-1]] = (i, lead)
  found: dict[int, AxisNames] = {}
  unsure: set[int] = set()
  for (module, projection), (out, lead) in kernels.items():
    query, q_lead = kernels.get((module, "query"), (None, None))
    if projection != "out" or query is None or q_lead != lead:
      continue
    if not _query_fits_out(shapes[query], shapes[out], lead):
      continue
    stack, one = shapes[out][:lead], shapes[query][lead:]
    members = []
    for name in ("query", "key", "value", "out"):
      j, j_lead = kernels.get((module, name), (None, None))
      if j is None or j_lead != lead or shapes[j][:lead] != stack:
        continue
      if name != "out" and not _fewer_heads(shapes[j][lead + 1 :], one[1:]):  # out: fits above
        continue
      found[j] = lead_names(names[j], lead) + _ATTENTION_AXES[name]
      members.append(j)
    if one[0] == one[1]:
      unsure.update(members)
  if convs is None:  # no attention's, by their names or biases
    convs = conv_kernels(paths, shapes, names, roles)
  found.update(_attention_by_shapes(paths, shapes, names, roles, {*found, *convs}))
  return found, unsure


def _query_fits_out(q: tuple[int, ...], o: tuple[int, ...], n: int) -> bool:
  """Whether a query kernel ``q`` ``(*layers, embed, heads, head_dim)`` and an output kernel ``o``
  ``(*layers, heads, head_dim, out)`` are one attention's: the same ``n`` stacked axes, the
  output's next two axes the query's last two (heads, head size)."""
  return len(q) == len(o) == n + 3 and q[:n] == o[:n] and q[n + 1 :] == o[n : n + 2]


def _output_kernel(one: tuple[int, ...]) -> bool:
  """Whether a kernel's axes past its stacked ones can be an attention's output kernel ``(heads,
  head_dim, embed)`` by their sizes alone: ``embed`` not the size of ``heads`` or ``head_dim``
  (as it would be in a ``Conv`` kernel or a bias-less ``Dense`` stack of such sizes)."""
  return len(one) == 3 and one[2] not in one[:2]


#: The axes of a heads-first input kernel (Gemma's ``q_einsum``), past any packed or stacked axes.
_HEADS_FIRST = ("heads", "embed", "head_dim")


def _fewer_heads(kv: tuple[int, ...], q: tuple[int, ...]) -> bool:
  """Whether a key/value kernel's ``(heads, head_dim)`` fit a query's ``q``: the same head size
  and a number of heads that divides the query's (grouped-query and multi-query attention)."""
  return len(kv) == 2 and kv[1] == q[1] and kv[0] >= 1 and q[0] % kv[0] == 0


def _input_axes(shape: tuple[int, ...], embed: int, query: tuple[int, int]) -> AxisNames | None:
  """The axis names of an attention's input kernel ``shape`` (past its stacked axes) beside an
  output kernel ``(*query, embed)``, or ``None`` if it is none: ``(embed, heads, head_dim)``
  (Flax's), ``(heads, embed, head_dim)`` (Gemma's ``q_einsum``), either after a leading axis of
  2 or 3 packed projections (Gemma's ``kv_einsum`` ``(2, kv_heads, embed, head_dim)``, kept
  apart as a stack), with as many heads as the query or a divisor (grouped-query attention) and
  ``embed`` not their number (where both orders fit).
  """
  packed = len(shape) == 4 and shape[0] in (2, 3)
  one = shape[1:] if packed else shape
  if len(one) != 3 or one[2] != query[1]:
    return None
  lead: AxisNames = (STACKED,) if packed else ()
  if one[0] == embed and one[1] != embed and _fewer_heads(one[1:], query):
    return lead + ("embed", "heads", "head_dim")
  if one[1] == embed and one[0] != embed and _fewer_heads((one[0], one[2]), query):
    return lead + _HEADS_FIRST
  return None


def _attention_by_shapes(paths, shapes, names, roles, done: set[int]) -> dict[int, AxisNames]:
  """Axis names for the projection kernels of attention modules of other names, by shapes.

  Beside an output kernel ``(heads, head_dim, embed)`` (``o_proj``, ``wo``, Gemma's
  ``attn_vec_einsum``), an input kernel ``(embed, heads, head_dim)`` (``q_proj``, ``wq``) or
  ``(heads, embed, head_dim)`` (Gemma's ``q_einsum``) with ``embed`` not the size of ``heads``
  or ``head_dim`` shows an attention: ``Conv`` kernels or stacks of ``Dense`` kernels have such
  shapes only by a coincidence of sizes that this excludes. So are its other input kernels, with
  fewer heads or packed (:func:`_input_axes`), but for one beside a bias of one axis (a
  convolution's ``(out,)``; an input projection's is ``(heads, head_dim)``). Kernels are
  grouped by module: Flax's ``kernel``, Haiku's ``w`` and TensorFlow's ``filters``
  (:data:`KERNEL_NAMES`) by the module above theirs (``attn/q_proj/kernel``), other names by
  their own (``attn/wq``). Kernels whose only names are
  leading stacked axes are read past them, the stack the same for all of the module's kernels.

  Returns:
    ``{leaf index: axis names}``, for the leaves not in ``done`` (those read already, and the
    kernels that are a convolution's for sure: :func:`conv_kernels`).
  """
  biases = {
    k.index: k.bias for k in kernel_leaves(paths, shapes, names, roles) if k.bias is not None
  }
  one_axis_bias = set()  # beside a bias (out,), as a Conv: no input projection's (heads, head_dim)
  groups: dict[tuple, list[tuple[int, int]]] = {}
  for i, path in enumerate(paths):
    param = param_name(path)
    if i in done or roles[i] is None or param in (*READ_BY_NAME, None):
      continue
    lead = leading_stack(names[i], roles[i])
    if lead is not None and len(shapes[i]) - lead in (3, 4):
      module = module_keys(path)
      group = module[:-1] if param in KERNEL_NAMES else module
      if i in biases and len(biases[i]) <= lead + 1:
        one_axis_bias.add(i)
      groups.setdefault(tuple(map(str, group)), []).append((i, lead))
  found: dict[int, AxisNames] = {}
  for members in groups.values():
    readings = []  # one per output kernel that fits: {leaf: its axes past the stacked ones}
    for out, lead in members:
      stack, one = shapes[out][:lead], shapes[out][lead:]
      if not _output_kernel(one):
        continue
      heads, head_dim, embed = one
      inputs = {
        j: axes
        for j, j_lead in members
        if j != out and j_lead == lead and shapes[j][:lead] == stack and j not in one_axis_bias
        if (axes := _input_axes(shapes[j][lead:], embed, (heads, head_dim))) is not None
      }
      if any(shapes[j][lead + axes.index("heads")] == heads for j, axes in inputs.items()):
        readings.append({out: _ATTENTION_AXES["out"], **inputs})
    # A heads-first query kernel (heads, embed, head_dim) and the output kernel (heads, head_dim,
    # embed) fit each other both ways round: the reading that explains the most kernels wins (a
    # Gemma kv_einsum fits one way only); a tie leaves the rank's guess.
    best = [r for r in readings if len(r) == max(map(len, readings))]
    merged: dict[int, AxisNames] = {}
    for reading in best:
      for j, axes in reading.items():
        merged[j] = axes if merged.get(j, axes) == axes else ()
    if any(axes == () for axes in merged.values()):
      continue
    # Alone, the pair fits the other way round whatever the sizes, though where embed is the
    # size of heads or head_dim (a bias-less Dense stack (layers, in, out), (layers, out, in) of
    # as many layers as in or out) that reading was excluded above: a tie all the same.
    if len(merged) == 2 and _HEADS_FIRST in merged.values():
      continue
    for j, axes in merged.items():
      if axes[0] == STACKED:  # packed projections: kept apart, as a stack
        axes = (role_name(roles[j], STACKED),) + axes[1:]
      lead = len(shapes[j]) - len(axes)
      found[j] = lead_names(names[j], lead) + axes
  return found


def attention_stacks(
  modules: dict[tuple, dict[str, int]], shapes
) -> dict[tuple, tuple[tuple[int, ...], str]]:
  """The stack of layers that a Flax attention module's rank-4 kernels show, without a bias.

  One layer's query kernel is ``(embed, heads, head_dim)`` and its output kernel ``(heads,
  head_dim, out_features)`` (rank 3, :func:`flax_attention_names`; ``out_features`` is ``embed``
  unless given); an ``nn.scan`` adds a leading ``layers`` axis to both (a scan of scans or an
  ``nn.remat_scan`` of several lengths, one per scan or length). A module with a ``query`` kernel
  ``(*layers, embed, heads, head_dim)`` and an ``out`` kernel ``(*layers, heads, head_dim,
  out_features)`` (and no other evidence, as with
  ``use_bias=False``) is taken for one stacked by those axes, and so are its
  ``key``/``value`` kernels of the same layers and head size (their heads as many as the
  query's, or a divisor). Where embed = heads the same shapes are also those of 2-D ``Conv``
  kernels or a stack of stacks of ``Dense`` kernels named ``query``/``out``: no evidence. Under
  other names (``q_proj``/``o_proj``), a module's output kernel ``(*layers, heads,
  head_dim, embed)`` beside an input kernel ``(*layers, embed, heads, head_dim)`` of the same
  layers, with ``embed`` not the size of ``heads`` or ``head_dim``
  (:func:`_attention_by_shapes`), shows the same stack.

  Args:
    modules: ``{module path: {parameter name: leaf index}}`` of the modules without evidence of
      their own (:func:`adahessian_jax._evidence_stacks._stack_count`).
    shapes: The leaves' shapes.

  Returns:
    ``{module path: (the stacked axes' sizes, why)}`` for the projection modules read so.
  """
  kernels = {m: next((ms[k] for k in KERNEL_NAMES if k in ms), None) for m, ms in modules.items()}
  kernels = {m: i for m, i in kernels.items() if m and i is not None and len(shapes[i]) >= 4}
  found: dict[tuple, tuple[tuple[int, ...], str]] = {}
  for (*parent, projection), out in kernels.items():  # a module's path: (*parent, name)
    query = kernels.get((*parent, "query"))
    if projection != "out" or query is None:
      continue
    q, o = shapes[query], shapes[out]
    n = len(q) - 3  # the stacked axes
    if not _query_fits_out(q, o, n):
      continue
    if q[n] == q[n + 1]:
      continue
    why = (
      f"its attention module's query kernel {q} and out kernel {o} are those of one layer "
      f"(embed, heads, head_dim) and (heads, head_dim, embed) with leading axes {q[:n]}"
    )
    for name in ("query", "key", "value", "out"):
      j = kernels.get((*parent, name))
      if j is None or len(shapes[j]) != len(q) or shapes[j][:n] != q[:n]:
        continue
      if name == "out" or _fewer_heads(shapes[j][n + 1 :], q[n + 1 :]):  # out: fits above
        found[(*parent, name)] = (q[:n], why)
  by_parent: dict[tuple, list[tuple]] = {}
  for module in kernels:
    if module not in found:
      by_parent.setdefault(module[:-1], []).append(module)
  for members in by_parent.values():
    for out in members:
      *layers, heads, head_dim, embed = shapes[kernels[out]]
      if not _output_kernel((heads, head_dim, embed)):
        continue
      lead, n = tuple(layers), len(layers)
      inputs = [
        m
        for m in members
        if shapes[kernels[m]][: n + 1] == (*lead, embed)
        and _fewer_heads(shapes[kernels[m]][n + 1 :], (heads, head_dim))
      ]
      if m_q := next((m for m in inputs if shapes[kernels[m]][n + 1] == heads), None):
        why = (
          f"its attention's kernels {out[-1]!r} {shapes[kernels[out]]} and {m_q[-1]!r} "
          f"{shapes[kernels[m_q]]} are those of one layer (heads, head_dim, embed) and (embed, "
          f"heads, head_dim) with leading axes {lead}"
        )
        for m in (out, *inputs):
          found[m] = (lead, why)
  return found
