"""The loss along one or two directions in parameter space.

``loss(θ + α d)`` (1-D) and ``loss(θ + α d₁ + β d₂)`` (2-D) over the data of a
:class:`~adahessian_jax.hessian.HessianOperator`, for given directions or, by
default, the Hessian's top eigenvectors (the directions of sharpest
curvature). The grid is evaluated by a jit-compiled ``lax.map`` over blocks of
points, once per batch.

A given direction can be rescaled to the parameters' scale, which makes
landscapes of differently scaled networks comparable (Li et al. 2018):

* ``normalize="layer"``: each leaf of the direction gets the norm of that leaf
  of the params;
* ``normalize="filter"``: each *filter* gets the norm of the corresponding
  weight filter, a filter being one output unit of a Dense kernel or one output
  channel of a Conv kernel. In Flax layouts the output is the kernel's last axis
  (``(in, out)``, ``(h, w, in, out)``), so a filter is a slice along the last
  axis of any leaf with two or more axes, except attention projections, whose
  output has two axes: a query/key/value kernel ``(embed, heads, head_dim)``
  has a filter per head and ``head_dim`` entry, never pooled across heads (the
  heads axis found by its name, e.g. ``"heads"``, or, without axis names, in
  Flax's attention modules as the optimizer's averaging finds it, in each layer of a stack
  given by ``layer_axes=`` too); the output kernel ``(heads,
  head_dim, embed)`` one per ``embed`` entry; a kernel whose bias has two axes or more and
  shows which of its axes are the outputs (a ``DenseGeneral`` or ``nnx.LinearGeneral`` with
  several output axes, an ``Einsum`` with a bias, its output in any order) one per output unit,
  i.e. per entry of its bias (without a bias, or with one that fits the kernel's axes two ways,
  ``(6, 6, 4)`` beside ``(6, 4)``, nothing shows its output axes: the last axis); and embedding
  tables ``(num_embeddings,
  features)`` (a Flax ``embedding``, or a ``"vocab"`` axis name), which have a
  filter per row (token), as Li et al.'s code rescales PyTorch's ``(num, dim)``
  tables row by row; a PyTorch/Equinox ``weight`` ``(out, in, *spatial)`` (unnamed
  axes, each member of an ensemble's ``(members, out, in)`` too) has one per slice along
  its output axis. Biases and normalisation scales get
  a zero direction, as in Li et al.'s experiments: a per-entry rescaling would
  give ``±|b_i|``, which is zero for zero-initialised biases anyway and carries
  no filter structure. They are the leaves with fewer than two axes and those
  whose Flax name (last path key) is ``bias`` or ``scale``, whatever their rank
  (a ``DenseGeneral`` bias ``(heads, head_dim)``, a ``LayerNorm`` scale over
  two feature axes), as :mod:`adahessian_jax.spatial` reads them.

Layers stacked in one leaf (``nn.scan``, ``nnx.vmap``: a kernel ``(layers, in,
out)``, a bias ``(layers, out)``) are told apart by their *layer axes*: each
layer's slice is a leaf of its own for both rules above (its own norm for
``"layer"``; its own filters, and a zero direction for a per-layer bias, for
``"filter"``). By default the layer axes are those the params' axis names
mark as stacked (``"layers"``, ``"layer"``, ``"scan"``... in boxed Linen params
or NNX state with sharding metadata), or, in plain arrays, those the optimizer's
averaging finds from a stack's biases, Linen module names and attention kernels
(:mod:`adahessian_jax.spatial`, docs/layouts.md); a stack nothing shows (a bias-less
kernel under a name you chose) is taken for one layer: pass ``layer_axes=`` to say
which leaves are stacked.

The loss at the operator's point must be finite: a non-finite one raises
:class:`~adahessian_jax.hessian.NonFiniteError` before the grid is evaluated.
Away from it, a non-finite loss (an overflow far along a direction) is part of
the landscape and returned as it is. Steps must be finite (at least one along each
direction) and directions finite and nonzero, the two of a 2-D landscape not parallel once
normalised (``ValueError`` otherwise).

:func:`random_direction` draws the Gaussian directions those papers normalise.

References:
  Li, Xu, Taylor, Studer, Goldstein, `Visualizing the Loss Landscape of Neural
  Nets <https://arxiv.org/abs/1712.09913>`_, NeurIPS 2018.

  Yao, Gholami, Keutzer, Mahoney, `PyHessian: Neural Networks Through the Lens
  of the Hessian <https://arxiv.org/abs/1912.07145>`_, 2020.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from adahessian_jax import (
  _evidence_attention,
  _evidence_biases,
  _evidence_names,
  _validation,
  layout,
  spatial,
)
from adahessian_jax.hessian import _checks, _lanczos, _stacks
from adahessian_jax.hessian._operator import HessianOperator
from adahessian_jax.hessian.eigen import top_eigenvalues

__all__ = [
  "Landscape1D",
  "Landscape2D",
  "loss_landscape_1d",
  "loss_landscape_2d",
  "normalize_direction",
  "random_direction",
]

_NORMALIZE = (None, "unit", "layer", "filter")
#: The advice for empty steps, refused before the default directions spend their products.
_NO_STEPS = "give at least one step (an empty grid has no losses)"


class Landscape1D(NamedTuple):
  """Loss along a line.

  Attributes:
    alphas: ``(g,)`` step sizes along the direction.
    losses: ``(g,)`` ``loss(θ + α d)``.
    direction: ``(n,)`` flat direction used (after normalisation).
  """

  alphas: np.ndarray
  losses: np.ndarray
  direction: jax.Array


class Landscape2D(NamedTuple):
  """Loss on a plane.

  Attributes:
    alphas: ``(g,)`` coordinates along the first direction.
    betas: ``(h,)`` coordinates along the second direction.
    losses: ``(g, h)`` ``loss(θ + α d₁ + β d₂)``.
    directions: ``(2, n)`` flat directions used (after normalisation).
  """

  alphas: np.ndarray
  betas: np.ndarray
  losses: np.ndarray
  directions: jax.Array


class _LeafAxes(NamedTuple):
  """What filter normalisation needs to know about one leaf of the params."""

  shape: tuple[int, ...]
  layer: tuple[int, ...]  # its stacked-layer axes
  param: str | None  # its Flax name (last path key): "kernel", "bias", "scale", ...
  roles: tuple[str | None, ...] | None  # each axis' role from its name (spatial), if named
  outputs: tuple[int, ...]  # a kernel's output axes its bias of two axes or more shows, else ()


def _leaf_axes(op: HessianOperator, layer_axes: Any) -> list[_LeafAxes]:
  """Every leaf of the params with its stacked-layer axes (``layer_axes`` or axis names)."""
  infos = layout.leaves(op.params)  # canonical paths: a box's ``.value`` step removed
  paths = [_evidence_names.read_path(x.path) for x in infos]  # as the evidence reads them
  shapes = [tuple(np.shape(x.leaf)) for x in infos]
  rules = spatial.leaf_rules(None, op.params)
  # As the averaging reads them: a weight, or a kernel whose bias shows PyTorch's layout (Hugging
  # Face's FlaxConv1D (out, in)), output axis first; a weight whose bias shows Flax's (Hugging
  # Face's PyTorch Conv1D (in, out)), a kernel; a Haiku b beside its w, a bias.
  params = [
    "weight"
    if spatial.reads_output_first(r)
    else "kernel"
    if spatial.reads_input_first(r)
    else "bias"
    if isinstance(r, spatial.FlaxDefault) and r.param == "bias"
    else _evidence_names.param_name(path)
    for path, r in zip(paths, rules, strict=True)
  ]
  roles = []
  for r in rules:  # the default rule, bound to each leaf's names (a stack's inferred ones too)
    if isinstance(r, spatial.FlaxDefault) and r.names is not None:
      roles.append(tuple(layout.axis_role(n, r.roles()) for n in r.names))
    else:
      roles.append(None)
  layers = _stacks.layer_axes_of(op.params, layer_axes, rules)
  # Unnamed attention projections stacked by layer_axes= (a (layers, embed, heads, head_dim)
  # kernel): their heads as the optimizer's averaging finds them in one layer's kernels.
  one_layer = [
    tuple(n for a, n in enumerate(s) if a not in ax) for s, ax in zip(shapes, layers, strict=True)
  ]
  unnamed = [None] * len(infos)
  defaults = [r.roles() if isinstance(r, spatial.FlaxDefault) else None for r in rules]
  attention, _ = _evidence_attention.flax_attention_names(paths, one_layer, unnamed, defaults)
  for i, names in attention.items():
    leaf_roles = defaults[i]
    if roles[i] is None and layers[i] and leaf_roles is not None:
      per_axis = iter(layout.axis_role(n, leaf_roles) for n in names)
      roles[i] = tuple(
        "stacked" if a in layers[i] else next(per_axis) for a in range(len(shapes[i]))
      )
  outputs = _bias_outputs(paths, shapes, layers)
  return [_LeafAxes(*a) for a in zip(shapes, layers, params, roles, outputs, strict=True)]


def _bias_outputs(paths, shapes, layers) -> list[tuple[int, ...]]:
  """For each kernel whose module's bias has two axes or more besides its layer axes, each
  the size of a kernel axis, and names which kernel axes they are one way only: those axes,
  one filter per output unit (per entry of the bias). ``()`` for every other leaf.

  The bias is read first as the kernel's axes in order, ``(*batch, *out)`` of a kernel ``(*batch,
  *in, *out)`` (a ``DenseGeneral``/``nnx.LinearGeneral`` with several output axes, an attention
  projection ``(embed, heads, head_dim)``, an ``Einsum`` whose output keeps the kernel's order);
  where no such reading fits, as the kernel's axes in any order (an ``Einsum`` whose output
  reorders them, ``"bd,dhk->bkh"``: kernel ``(d, h, k)``, bias ``(k, h)``; or keeps them all,
  ``"btd,td->btd"``: kernel ``(t, d)``, bias ``(t, d)``, a filter per entry). Every reading is one
  filter per bias entry; a bias that two readings fit on different axes says nothing."""
  outputs: list[tuple[int, ...]] = [()] * len(shapes)
  for i, j in _evidence_biases.kernel_biases(paths).items():
    if len(layers[i]) != len(layers[j]):
      continue
    rest = [a for a in range(len(shapes[i])) if a not in layers[i]]
    kernel = tuple(shapes[i][a] for a in rest)
    bias = tuple(shapes[j][a] for a in range(len(shapes[j])) if a not in layers[j])
    if not 2 <= len(bias) <= len(kernel):
      continue
    # As the averaging reads DenseGeneral kernels: a bias that fits two ways ((6, 6, 4) beside
    # (6, 4): a batch of 6, or two output axes) says nothing.
    cut = len(kernel) - len(bias)
    fits = [
      tuple(range(n)) + tuple(range(cut + n, len(kernel)))
      for n in _evidence_biases.bias_fits(kernel, bias) or ()
    ]
    if not fits:  # an Einsum's output in another order than its kernel's axes
      fits = [
        axes
        for axes in itertools.combinations(range(len(kernel)), len(bias))
        if sorted(bias) == sorted(kernel[a] for a in axes)
      ]
    if len(fits) == 1:
      outputs[i] = tuple(rest[a] for a in fits[0])
  return outputs


def _filter_axes(leaf: _LeafAxes) -> tuple[int, ...] | None:
  """The axes that index one filter of a leaf besides its layer axes; ``None``: zeroed.

  A ``bias`` or ``scale`` of any rank (a ``DenseGeneral``/attention ``(heads, head_dim)`` bias,
  a ``LayerNorm`` scale over two feature axes, a stack's unnamed ``(layers, features)`` bias;
  Haiku's ``b`` or ``<name>_b`` beside its ``w`` or ``<name>_w``) is zeroed like a 1-D one, as
  are leaves with fewer than two axes besides their layer axes.
  An attention projection (a ``DenseGeneral`` kernel ``(*in, *out)`` with a heads axis) has a
  filter per output unit: per head and ``head_dim`` entry for a query/key/value kernel ``(embed,
  heads, head_dim)``, per ``embed`` entry for the output kernel ``(heads, head_dim, embed)``. Its
  input axes end at the one :mod:`adahessian_jax.spatial` blocks along (the first that is not a
  heads axis); the projections of Flax's attention modules have these names without boxes too
  (:mod:`adahessian_jax.spatial` finds them). Otherwise a filter is a slice along the last
  other axis (the output), but an embedding table ``(num_embeddings, features)`` (a Flax
  ``embedding``, or axes named ``"vocab"``...) has a filter per row (token), as the reference
  code does with PyTorch's ``(num, dim)`` tables, and an unembedding ``(embed, vocab)`` one per
  token too.
  """
  rest = [a for a in range(len(leaf.shape)) if a not in leaf.layer]
  if leaf.param in ("bias", "scale") or len(rest) < 2:
    return None
  if leaf.outputs:  # its bias shows its output axes: a filter per output unit
    return leaf.outputs
  roles = leaf.roles or (None,) * len(leaf.shape)
  vocab = tuple(a for a in rest if roles[a] == "vocab")
  if vocab:  # a table (vocab, embed) or an unembedding (embed, vocab): a filter per token
    return vocab
  if leaf.param in ("embedding", "table"):  # nn.Embed (num, features), positions (1, L, D)
    return tuple(rest[:-1])
  # PyTorch/Equinox (out, in, *spatial), one layer's axes unnamed (a stack found without names too)
  if leaf.param == "weight" and all(roles[a] is None for a in rest):
    return (rest[0],)
  heads = [a for a in rest if roles[a] == "heads"]
  if heads:
    first_input = next((a for a in rest if a not in heads), None)
    outputs = tuple(a for a in rest if first_input is not None and a > first_input)
    if outputs:
      return outputs
  return (rest[-1],)


def _axis_index(shape: tuple[int, ...], axis: int) -> np.ndarray:
  """``arange(shape[axis])`` shaped to broadcast along ``axis`` of an array of ``shape``."""
  return np.arange(shape[axis]).reshape(
    [shape[axis] if a == axis else 1 for a in range(len(shape))]
  )


def _leaf_groups(leaf: _LeafAxes, normalize: str):
  """Group ids from 0 (``-1``: zeroed) of a leaf's entries, row-major, and their count.

  ``"layer"``: one group per layer (index along the layer axes). ``"filter"``: one per layer
  and filter (index along :func:`_filter_axes`), or none if that zeroes the leaf.
  """
  shape = leaf.shape
  by = leaf.layer if normalize == "layer" else _filter_axes(leaf)
  if by is None:
    return np.full(int(np.prod(shape)), -1), 0
  if normalize != "layer":
    by = leaf.layer + by
  ids, count = np.zeros([1] * len(shape), np.int64), 1
  for a in by:
    ids, count = ids * shape[a] + _axis_index(shape, a), count * shape[a]
  return np.broadcast_to(ids, shape).ravel(), count


def _groups(op: HessianOperator, normalize: str, layer_axes: Any) -> tuple[np.ndarray, int]:
  """Group id of every flat entry (``-1``: zeroed) for per-leaf or per-filter scaling."""
  ids, offset = [], 0
  for leaf in _leaf_axes(op, layer_axes):
    leaf_ids, count = _leaf_groups(leaf, normalize)
    ids.append(np.where(leaf_ids < 0, -1, leaf_ids + offset))
    offset += count
  return np.concatenate(ids).astype(np.int32), offset


@functools.partial(jax.jit, static_argnums=3)
def _rescale_groups(direction, params, ids, num_groups):
  """``direction`` with each group scaled to the norm of the same group of ``params``."""
  seg = jnp.where(ids < 0, num_groups, ids)  # zeroed entries: an extra group, dropped

  def norm(x):  # per group, each scaled by a power of two near its largest entry: no overflow
    s = _lanczos.power_of_two_above(jax.ops.segment_max(jnp.abs(x), seg, num_groups + 1))
    return s * jnp.sqrt(jax.ops.segment_sum(jnp.square(x / s[seg]), seg, num_groups + 1))

  to, of = norm(params), norm(direction)
  keep = (of > 0) & (jnp.arange(num_groups + 1) < num_groups)
  out = direction / jnp.where(keep, of, 1.0)[seg] * to[seg]  # no ratio of norms to overflow
  return jnp.where(keep[seg], out, 0.0)


def _check_normalize(normalize: Any) -> None:
  if not any(normalize is n or normalize == n for n in _NORMALIZE):
    raise ValueError(f"normalize must be one of {_NORMALIZE}, got {normalize!r}")


def _check_direction(op: HessianOperator, flat: jax.Array, what: str) -> None:
  """Raises ``ValueError`` for a direction with a non-finite entry (named) or no nonzero one."""
  bad = op.layout.first_not_finite(flat)
  if bad is not None:
    raise ValueError(f"{what} is not finite: {bad}.")
  if not np.any(np.asarray(flat)):
    raise ValueError(f"{what} is zero: the loss along it is constant; give a nonzero direction.")


def normalize_direction(
  op: HessianOperator,
  direction: Any,
  normalize: str | None,
  *,
  layer_axes: Any = None,
  what: str = "the direction",
) -> jax.Array:
  """A direction as a flat ``(n,)`` array, rescaled as ``normalize`` says.

  Args:
    op: The operator whose params set the scale.
    direction: A pytree like the params (same structure and leaf shapes) or a
      flat ``(n,)`` array; finite and nonzero.
    normalize: ``None`` (as given), ``"unit"`` (unit norm), ``"layer"`` (each
      leaf to the norm of that leaf of the params) or ``"filter"`` (each
      filter to the norm of that weight filter; biases, scales and leaves with
      fewer than two axes besides their layer axes zeroed; see the module
      docstring).
    layer_axes: For ``"layer"`` and ``"filter"``: the number of leading
      stacked-layer axes of each leaf, as an int or a pytree prefix of the
      params with ints as leaves (e.g. ``{"ScanBlock_0": 1, "head": 0}``; matched by
      path, boxes aside: a plain dict serves ``nnx.split``'s ``State``).
      ``None``: the axes the params' axis names mark as stacked or, in plain
      arrays, the optimizer's averaging finds stacked (see the module docstring).
    what: The direction's name in error messages.

  Returns:
    The ``(n,)`` direction. A group whose direction is zero stays zero.

  Raises:
    ValueError: for an unknown ``normalize``, a pytree unlike the params or a
      flat array of another size, a complex or non-finite entry (named by leaf
      path), a zero direction, one that ``normalize`` zeroes, or a ``layer_axes``
      that does not fit the params (named by leaf path).
  """
  _check_normalize(normalize)
  flat = jnp.asarray(op.layout.flatten(direction, what), op.dtype)
  _check_direction(op, flat, what)
  if normalize is None:
    return flat
  if normalize == "unit":
    return _lanczos.unit(flat)[0]  # scaled: entries of 1e20 or 1e-25 in float32 too
  if op.coordinates is not None:
    raise ValueError(
      f"normalize={normalize!r} compares a direction with the params, which a rescaled "
      "(preconditioned) operator's directions are not in; use the plain operator."
    )
  ids, num_groups = _groups(op, normalize, layer_axes)
  out = _rescale_groups(flat, op.ravel(op.params), jnp.asarray(ids), num_groups)
  if not np.any(np.asarray(out)):
    raise ValueError(
      f"normalize={normalize!r} zeroes {what}: it is nonzero only on leaves that rule zeroes "
      "(biases, scales and other leaves with fewer than two axes besides their layer axes) or "
      "where the params are zero."
    )
  return out


def random_direction(op: HessianOperator, key: jax.Array) -> jax.Array:
  """A standard Gaussian direction, flat ``(n,)`` (normalise it with ``normalize="filter"``).

  Args:
    op: The operator whose size and dtype the direction takes.
    key: PRNG key.

  Returns:
    An ``(n,)`` array of independent standard normal entries in ``op.dtype``.

  Raises:
    ValueError: for a ``key`` that is not one PRNG key (an int seed, a batch of keys).
  """
  return jax.random.normal(_checks.prng_key(key, traced=True), (op.size,), op.dtype)


@functools.partial(jax.jit, static_argnums=(1, 6))
def _grid_losses(loss_fn, unravel, flat, directions, coeffs, batch, chunk):
  def one(c):
    return loss_fn(unravel(flat + c @ directions), batch)

  return jax.lax.map(one, coeffs, batch_size=chunk)


def _losses(op: HessianOperator, directions: jax.Array, coeffs: np.ndarray, chunk: int):
  data = op.require_data("a loss landscape")
  _checks.finite(op.loss(), "the loss at the operator's params", op)
  flat = op.ravel(op.params)
  if op.coordinates is not None:  # a step d in the operator's coordinates moves θ by S d
    directions = directions * op.coordinates
  grid = jnp.asarray(coeffs, op.dtype)
  chunk = int(min(chunk, grid.shape[0]))
  out = data.weighted_sum(
    lambda b: _grid_losses(data.jit_loss, op.layout.unravel, flat, directions, grid, b, chunk)
  )
  return np.asarray(out)


def _directions(op, directions, k, key, normalize, layer_axes, names):
  _check_normalize(normalize)
  if directions is None:
    if normalize is not None:
      raise ValueError(
        f"normalize={normalize!r} applies to a given direction; without one the directions are "
        "the Hessian's top eigenvectors, of unit norm. Pass a direction or leave normalize out."
      )
    if k > op.size:
      raise ValueError(
        f"the default directions are the Hessian's top {k} eigenvectors, but the operator has "
        f"{op.size} parameter(s); pass the directions (a 1-D landscape needs one)."
      )
    eig = top_eigenvalues(op, k, key=key)
    return eig.eigenvectors_flat
  return jnp.stack(
    [
      normalize_direction(op, d, normalize, layer_axes=layer_axes, what=name)
      for d, name in zip(directions, names, strict=True)
    ]
  )


def _check_not_parallel(dirs: jax.Array, normalize: str | None) -> None:
  """Raises ``ValueError`` if the two (normalised) rows of ``dirs`` are parallel to the
  precision of their dtype (an angle under ``sqrt(eps)``: 3e-4 rad in float32, 1.5e-8 in
  float64): the grid would lie on a line, each loss repeated along it, without an error."""
  rows = np.asarray(dirs, np.float64)
  rows = rows / np.max(np.abs(rows), axis=1, keepdims=True)  # nonzero rows: no overflow below
  u, v = rows / np.linalg.norm(rows, axis=1, keepdims=True)
  cos = float(u @ v)
  angle = 2.0 * np.arcsin(min(np.linalg.norm(u - np.copysign(1.0, cos) * v) / 2.0, 1.0))
  if angle <= np.sqrt(np.finfo(dirs.dtype).eps):  # from the difference: exact near 0
    raise ValueError(
      f"directions[0] and directions[1] are parallel (cosine {cos:.9g}"
      + ("" if normalize is None else f" after normalize={normalize!r}")
      + "): their plane is a line, so the grid would repeat the losses along it. Give two "
      "independent directions (e.g. hessian.random_direction with two keys), or use "
      "loss_landscape_1d for the loss along one."
    )


def _check_pair(op: HessianOperator, directions: Any) -> None:
  """Raises ``ValueError`` unless ``directions`` is ``None`` or a pair ``(d1, d2)``.

  A single direction shaped like params with two top-level entries has length 2 too: its
  entries were read as the two directions, and the error named ``directions[0]`` a single value.
  """
  if directions is None:
    return
  one = isinstance(directions, jax.Array | np.ndarray) and np.shape(directions) == (op.size,)
  generator = isinstance(directions, Iterator)  # which JAX's tree functions take for a leaf
  if not one and not generator:
    try:
      _checks.like_params(directions, op.params, "directions")
      one = True
    except ValueError:
      pass
  pair = isinstance(directions, tuple | list) or (
    isinstance(directions, jax.Array | np.ndarray) and np.ndim(directions) >= 2
  )
  if one or not pair or len(directions) != 2:
    if one:
      got = "one direction shaped like the params"
    elif isinstance(directions, jax.Array | np.ndarray):
      got = f"an array of shape {np.shape(directions)}"
    else:
      got = f"a {type(directions).__name__}" + (f" of {len(directions)}" if pair else "")
    raise ValueError(
      f"directions must be a pair (d1, d2) of directions (a tuple or list, or an array of 2 rows), "
      f"got {got}; for the loss along one direction use loss_landscape_1d."
    )


def loss_landscape_1d(
  op: HessianOperator,
  alphas: jax.typing.ArrayLike | Sequence[float],
  direction: Any = None,
  *,
  normalize: str | None = None,
  layer_axes: Any = None,
  key: jax.Array | None = None,
  chunk: int = 16,
) -> Landscape1D:
  """``loss(θ + α d)`` for every ``α`` in ``alphas``.

  Args:
    op: The Hessian operator (its params ``θ`` and data define the loss).
    alphas: Step sizes, a nonempty 1-D array of finite numbers.
    direction: A pytree like the params or a flat ``(n,)`` array, finite and
      nonzero; by default
      the top Hessian eigenvector (unit norm, so ``α`` is a Euclidean distance;
      for a preconditioned operator, a distance in its coordinates).
    normalize: For a given direction: ``None`` (as given), ``"unit"`` (unit
      norm), ``"layer"`` (each leaf rescaled to the norm of that leaf of θ) or
      ``"filter"`` (each filter rescaled to the norm of that filter of θ, Li et
      al. 2018; see :func:`normalize_direction`). Only with a given direction.
    layer_axes: Stacked-layer axes for ``"layer"`` and ``"filter"`` (see
      :func:`normalize_direction`).
    key: PRNG key of the eigenvector computation.
    chunk: Grid points evaluated together (``lax.map`` batch size).

  Returns:
    A :class:`Landscape1D`.

  Raises:
    NonFiniteError: if the loss at the operator's params is not finite.
    ValueError: for bad steps, directions, ``normalize`` or ``chunk`` (see the module
      docstring), or an operator without data (a block or masked one), before any product.
  """
  alphas = _checks.finite_1d("alphas", alphas, _NO_STEPS)
  # Checked before the default direction spends products.
  op.require_data("a loss landscape")
  chunk = _validation.count("chunk", chunk)
  given = None if direction is None else [direction]
  dirs = _directions(op, given, 1, key, normalize, layer_axes, ["the direction"])
  losses = _losses(op, dirs, alphas[:, None], chunk)
  return Landscape1D(alphas, losses, dirs[0])


def loss_landscape_2d(
  op: HessianOperator,
  alphas: jax.typing.ArrayLike | Sequence[float],
  betas: jax.typing.ArrayLike | Sequence[float],
  directions: tuple[Any, Any] | None = None,
  *,
  normalize: str | None = None,
  layer_axes: Any = None,
  key: jax.Array | None = None,
  chunk: int = 16,
) -> Landscape2D:
  """``loss(θ + α d₁ + β d₂)`` on the grid ``alphas × betas``.

  Args:
    op: The Hessian operator.
    alphas: Coordinates along ``d₁``.
    betas: Coordinates along ``d₂``.
    directions: A pair ``(d1, d2)`` (a tuple or list, or an array of 2 rows) of
      directions, each a pytree like the params or a flat array, not parallel once
      normalised; by default the top two Hessian eigenvectors (orthonormal).
    normalize: As in :func:`loss_landscape_1d`.
    layer_axes: As in :func:`loss_landscape_1d`.
    key: PRNG key of the eigenvector computation.
    chunk: Grid points evaluated together.

  Returns:
    A :class:`Landscape2D` with ``losses[i, j]`` at ``(alphas[i], betas[j])``.

  Raises:
    NonFiniteError: if the loss at the operator's params is not finite.
    ValueError: for bad steps, directions, ``normalize`` or ``chunk`` (see the module
      docstring), or an operator without data (a block or masked one), before any product.
  """
  alphas = _checks.finite_1d("alphas", alphas, _NO_STEPS)
  betas = _checks.finite_1d("betas", betas, _NO_STEPS)
  # Checked before the default directions spend products.
  op.require_data("a loss landscape")
  chunk = _validation.count("chunk", chunk)
  _check_pair(op, directions)
  names = ["directions[0]", "directions[1]"]
  dirs = _directions(op, directions, 2, key, normalize, layer_axes, names)
  if directions is not None:  # the default, the top two eigenvectors, are orthonormal
    _check_not_parallel(dirs, normalize)
  aa, bb = np.meshgrid(alphas, betas, indexing="ij")
  coeffs = np.stack([aa.ravel(), bb.ravel()], axis=1)
  losses = _losses(op, dirs, coeffs, chunk).reshape(aa.shape)
  return Landscape2D(alphas, betas, losses, dirs)
