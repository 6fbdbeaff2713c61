"""Stacks of layers that Linen's automatic module names show.

Readers for :func:`adahessian_jax._evidence_stacks.stacks_by_evidence`. Linen names a module by its
class (``Dense_0``, ``Conv_1``) and a transformed one by the transform (``ScanBlock_0``,
``Remat_scanBlock_0``, ``VmapBlock_0``). A class fixes the rank of some of its parameters, so more
axes are stacked (:func:`linen_class_stack`); sibling ``Dense_N`` kernels show where their stack
is when it is not in front (:func:`dense_stacks_elsewhere`); the scans above a module show its
stacked axes (:func:`scan_stacks`), and a stack behind where the kernels fit it too
(:func:`scanned_behind`, a guess).
"""

from __future__ import annotations

from collections.abc import Mapping

from adahessian_jax._evidence_biases import bias_fits, bias_pairs, dense_bias
from adahessian_jax._evidence_names import (
  is_scan,
  leaves_under,
  linen_class,
  module_keys,
  named_by,
  stacks_all,
  under_prefixes,
)

#: Linen's automatic module names (``Dense_0``) give the module's class, which fixes the rank of
#: some of its parameters: ``(class, parameter name) -> rank``.
_CLASS_RANKS = {
  ("Dense", "kernel"): 2,
  ("Dense", "bias"): 1,
  ("Embed", "embedding"): 2,
  ("Conv", "bias"): 1,
  # One (window * in, out) kernel and one bias (out,) per output position: kept apart, as layers.
  ("ConvLocal", "kernel"): 2,
  ("ConvLocal", "bias"): 1,
  ("ConvTranspose", "bias"): 1,
  ("GroupNorm", "scale"): 1,  # one per channel (the last axis), always
  ("GroupNorm", "bias"): 1,
}


def linen_class_stack(
  module: tuple, members: Mapping[str, int], shapes
) -> tuple[tuple[int, ...], str] | None:
  """The stack that Linen's automatic name of a module (``Dense_3``: :func:`linen_class`) shows:
  the leading axes of its parameters past the rank its class fixes (:data:`_CLASS_RANKS`), none
  where it has that rank (one layer), and no reading of a ``Dense`` whose bias is not its
  kernel's leading axes and output (``nn.vmap`` with ``variable_axes={"params": 1}``, kernel
  ``(in, members, out)``, bias ``(out, members)``).

  Returns:
    The sizes of the stacked axes (``()``: one layer) and why, or ``None`` where its name shows
    nothing.
  """
  linen = linen_class(module)
  if linen == "Dense" and "kernel" in members and "bias" in members:
    k, b = shapes[members["kernel"]], shapes[members["bias"]]
    if not dense_bias(k, b):  # not stacked in front (nn.vmap variable_axes=1)
      linen = None
  for (cls, param), rank in _CLASS_RANKS.items():
    i = members.get(param) if cls == linen else None
    if i is not None and len(shapes[i]) >= rank:
      return shapes[i][: len(shapes[i]) - rank], (
        f"Linen's name {module[-1]!r} makes it a {cls}, whose {param} has rank {rank}"
      )
  return None


def dense_stacks_elsewhere(
  modules: dict[tuple, dict[str, int]], counts: dict[tuple, tuple], shapes
) -> tuple[dict[tuple, tuple[int | None, str]], set[tuple]]:
  """Where the stacked axis of sibling ``Dense_N`` modules is, when it is not in front.

  Linen's name ``Dense_0`` fixes its kernel's rank (2), and :func:`linen_class_stack` takes more
  axes for stacked ones in front, as ``nn.scan`` and ``nn.vmap`` put them with ``variable_axes=
  {"params": 0}``. With ``{"params": 1}`` (an ensemble stacked along another axis) a bias-less
  ``Dense_0`` kernel is ``(in, members, out)``, and axis 0 would keep the inputs apart and
  average across members. The ``Dense_N`` modules under one parent are all under the same
  transforms, so their stacked axis has one size: where their kernels' first sizes differ, it
  is not in front. It is the one other axis where all of them have one size (read there), or,
  if none is or several are, unknown (the rank's guess stays, flagged). Where their first sizes
  agree but another axis's do too (a lone ``Dense_0`` ``(in, members, out)``), and no bias shows
  the stack in front, it is there or elsewhere: unplaced.

  Returns:
    ``{module: (the stacked axis, or None if unknown; why)}`` for the modules so re-read, and the
    unplaced modules (read with the stack in front, unless other evidence shows it there).
  """
  by_parent: dict[tuple, list[tuple]] = {}
  for module, members in modules.items():
    lead = counts[module][0]
    if lead and len(lead) == 1 and linen_class(module) == "Dense" and "kernel" in members:
      by_parent.setdefault(module[:-1], []).append(module)
  found: dict[tuple, tuple[int | None, str]] = {}
  unplaced: set[tuple] = set()
  for siblings in by_parent.values():
    kernels = {m: shapes[modules[m]["kernel"]] for m in siblings}
    if len({k[0] for k in kernels.values()}) < 2:
      # In front, unless none has a bias that shows it and the kernels share another size too
      # (a lone Dense_0 (in, members, out) shares all of its own): then where is unsure.
      shared = [a for a in (1, 2) if len({k[a] for k in kernels.values()}) == 1]
      if shared and not any("bias" in modules[m] for m in siblings):
        unplaced.update(siblings)
      continue
    ranks = {len(k) for k in kernels.values()}
    axes = [a for a in range(1, min(ranks)) if len({k[a] for k in kernels.values()}) == 1]
    axis = axes[0] if len(axes) == 1 and ranks == {3} else None
    names = ", ".join(f"{m[-1]!r} {k}" for m, k in kernels.items())
    why = (
      f"the kernels of its sibling Dense layers ({names}) differ in their first size and share "
      f"only axis {axis}'s: one per layer (nn.vmap over axis {axis})"
    )
    for module in siblings:
      found[module] = (axis, why)
  return found, unplaced


def scan_stacks(
  modules: dict[tuple, dict[str, int]],
  paths,
  shapes,
  counts: dict[tuple, tuple],
  unstacked: set[tuple] | frozenset[tuple] = frozenset(),
) -> tuple[dict[tuple, tuple[tuple[int, ...], str]], dict[tuple, str]]:
  """Stacks shown by Linen's automatic names of the scans a module sits in.

  ``nn.scan(Block)`` names its instance ``ScanBlock_0`` (``nn.remat_scan(Block)``
  ``Remat_scanBlock_0``) and stacks every parameter under it along one more axis in front
  (``variable_axes`` 0, as scans of layers are written): a block of nothing but bias-less
  convolutions leaves no other trace, and its ``(layers, kh, kw, in, out)`` kernel would be read
  as a 3-D convolution's. A module under ``n`` such names (a scan of a scan, ``ScanOuter_0`` /
  ``ScanInner_0``) has ``n`` stacked axes, where every leaf under the ``j``-th name has the same
  size on axis ``j``. ``nn.remat_scan`` stacks one axis per entry of its ``lengths``, and its
  name does not say how many: where the modules under the innermost scan that show their stacks
  themselves (``counts``: a bias, Linen's ``Dense_0``) show ``n`` axes, the names are right; where
  they show another number (a remat_scan of several lengths, a scan under a name of your own
  inside), the names say nothing and :func:`~adahessian_jax._evidence_stacks.in_named_stacks`
  passes those modules' stacks on; where none shows any and every leaf under the innermost scan
  has one size on axis ``n`` too, a remat_scan's count is a guess. (``nn.vmap``'s ``VmapBlock_0``
  is no such sign: ensembles are also mapped over other axes, ``(in, members, out)``.)

  Args:
    modules: ``{module path: {parameter name: leaf index}}`` of the modules to read.
    paths: The leaves' paths.
    shapes: The leaves' shapes.
    counts: ``{module path: (stacked sizes or None, why)}``, what each module shows itself
      (:func:`~adahessian_jax._evidence_stacks._stack_count`).
    unstacked: The modules that show they are stacked in front by nothing
      (:func:`~adahessian_jax._evidence_stacks._not_stacked_in_front`): a scan name above one of
      them shows no stack.

  Returns:
    ``{module: (the stacked axes' sizes, why)}`` for the modules in ``modules`` so placed, and
    ``{module: why}`` for those among them whose number of stacked axes is a guess.
  """
  scans: dict[tuple, tuple[int, ...]] = {}  # module -> the depths of the scans it sits in
  for module in modules:
    at = tuple(d for d in range(1, len(module) + 1) if is_scan(module[d - 1]))
    if at:
      scans[module] = at
  prefixes = {module[:d] for module, at in scans.items() for d in at}
  under = leaves_under(prefixes, [module_keys(path) for path in paths])
  counted = under_prefixes((other, len(lead)) for other, (lead, _) in counts.items() if lead)
  shown = {prefix: counted.get(prefix, set()) for prefix in prefixes}  # the counts shown there

  def shared(prefix: tuple, axis: int) -> int | None:
    """The size every leaf under ``prefix`` has on ``axis``, if one."""
    sizes = {shapes[i][axis] if len(shapes[i]) > axis else None for i in under[prefix]}
    return next(iter(sizes)) if len(sizes) == 1 else None

  found: dict[tuple, tuple[tuple[int, ...], str]] = {}
  guessed: dict[tuple, str] = {}
  for module, at in scans.items():
    sizes = [shared(module[:d], j) for j, d in enumerate(at)]
    inner, n = module[: at[-1]], len(at)
    if None in sizes or shown[inner] - {n}:
      continue
    if any(other[: at[0]] == module[: at[0]] for other in unstacked):
      continue  # the scan broadcasts its parameters or stacks them along another axis
    lead = tuple(s for s in sizes if s is not None)
    names = " in ".join(repr(module[d - 1]) for d in reversed(at))
    if n == 1:
      why = (
        f"under {names}, Linen's name of an nn.scan, whose leaves all have a first axis of "
        f"{lead[0]}: one per layer"
      )
    else:
      why = (
        f"under {names}, Linen's names of nn.scans (a scan of scans), whose leaves have "
        f"leading axes {lead}: one per layer"
      )
    found[module] = (lead, why)
    remat = any(named_by(module[d - 1], ("Remat_scan",)) for d in at)
    if remat and not shown[inner] and shared(inner, n) is not None:
      guessed[module] = (
        f"nn.remat_scan stacks one axis per entry of its lengths, and its leaves all have "
        f"leading axes {(*lead, shared(inner, n))}: {n} of them read as stacked; name its axes "
        "or give it spatial.per_layer(<its rule>, n_axes=len(lengths))"
      )
  return found, guessed


def _stacked_behind(k: tuple[int, ...], b: tuple[int, ...]) -> bool:
  """Whether a kernel and its bias fit one layer's stacked along their last axis (``nn.scan``
  with ``variable_axes={"params": -1}``): a ``Dense`` kernel ``(in, out, layers)`` beside ``(out,
  layers)``, one layer's bias its kernel's trailing axes (:func:`bias_fits`)."""
  return len(b) >= 2 and k[-1] == b[-1] and 0 in (bias_fits(k[:-1], b[:-1]) or ())


def scanned_behind(
  modules: dict[tuple, dict[str, int]], paths, shapes, counts: dict[tuple, tuple]
) -> dict[tuple, str]:
  """The modules under Linen's name of an ``nn.scan`` or ``nn.vmap`` (:func:`stacks_all`) read
  with one stacked axis in front whose kernel and bias fit a stack behind as well
  (:func:`_stacked_behind`), as every leaf under the innermost such name does by its last size,
  their siblings there too: a residual block stacked with ``variable_axes={"params": -1}``,
  kernel ``(in, out, layers)`` beside ``(out, layers)`` with in = out and a norm's ``(out,
  layers)``, which Linen's ``Dense_0`` name or the scan's would read as ``in`` layers, blocked
  across output units. (A module alone under the name is read stacked in front, as stacks of
  layers are written: its shapes fit both ways alike.)

  Returns:
    ``{module: why its stack is a guess}``.
  """
  found: dict[tuple, str] = {}
  inners: dict[tuple, tuple] = {}  # module -> the innermost such name above it
  for module in modules:
    depths = [d for d in range(1, len(module) + 1) if stacks_all(module[d - 1])]
    lead = counts[module][0]
    if depths and lead and len(lead) == 1:
      inners[module] = module[: depths[-1]]
  leaves = leaves_under(set(inners.values()), [module_keys(path) for path in paths])
  for module, inner in inners.items():
    members, lead = modules[module], counts[module][0]
    for pair in bias_pairs(members, shapes):
      if pair.k[:1] != lead or not _stacked_behind(pair.k, pair.b):
        continue
      under = leaves[inner]
      siblings = set(under) - set(members.values())
      if siblings and all(shapes[i] and shapes[i][-1] == pair.k[-1] for i in under):
        found[module] = (
          f"its {pair.bias} {pair.b} fits its {pair.kernel} {pair.k} stacked in front and "
          f"behind (nn.scan or nn.vmap with variable_axes={{'params': -1}}), and every leaf under "
          f"{inner[-1]!r} has the last size {pair.k[-1]}: name its axes or give it a rule"
        )
        break
  return found
