"""The Hessian of a loss over one batch or many, as a jitted flat-vector operator.

Every analysis in :mod:`adahessian_jax.hessian` works on a
:class:`HessianOperator`: a symmetric linear map ``v ↦ H v`` on flat vectors,
where ``H`` is the Hessian at ``params`` of the loss over the data. Over
several batches the loss and its Hessian are the batch-size-weighted averages
of the per-batch ones, so that for a ``loss_fn`` that averages over examples,
``H`` is the Hessian of the full-data loss.

The operator is the linear map first (:attr:`HessianOperator.matmat_fn`); the
rest is context the analyses need: how flat vectors map to the params' leaves
(:class:`ParamLayout`), how probes are drawn, and the loss and data it came
from (:class:`WeightedData`), which the landscapes evaluate.

The per-batch product reuses :func:`adahessian_jax.hutchinson.value_grad_hvp`
(forward-over-reverse), ``vmap``-ed over a block of vectors and jit-compiled once
per batch shape and block size; the batch is an argument of the compiled
function, not a constant baked into it, so one compilation serves every batch
of the same shape, and a batch whose arrays are sharded over devices (e.g.
``jax.device_put(batch, NamedSharding(mesh, P("data")))``) is partitioned by the
compiler, with the reduction over the batch inserted automatically.

This module holds the operator and :func:`hessian_operator`, which builds it; the parts it is
made of have modules of their own: the layout of flat vectors and the checks of the params
(``_layout``), the data and the checks of the batches (``_data``), the loss as the compiled
functions take it (``_loss``), and the row-block helpers on stacks of flat vectors (``_rows``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.core
import jax.numpy as jnp
import numpy as np

from adahessian_jax import _validation
from adahessian_jax._extras import loaded
from adahessian_jax.hessian import _checks, _loss
from adahessian_jax.hessian._checks import NonFiniteError
from adahessian_jax.hessian._data import (
  ONE_BATCH_HINT,
  WeightedData,
  batch_list,
  batch_weights,
  first_of_each_shape,
  is_array,
  leaf_shapes,
  looks_like_batches,
)
from adahessian_jax.hessian._layout import (
  ParamLayout,
  check_no_linen_state,
  check_no_nnx_state,
  check_not_pmapped,
  part_entries,
  part_name,
  ravel,
)
from adahessian_jax.hessian._loss import LossFn
from adahessian_jax.hessian._rows import (
  embed_cols,
  embed_idx,
  map_row_blocks,
  rademacher_rows,
  scale_rows,
  take_cols,
  take_idx,
)
from adahessian_jax.hutchinson import check_scalar_loss, value_grad_hvp

__all__ = [
  "HessianOperator",
  "hessian_operator",
]


@dataclasses.dataclass(frozen=True)
class HessianOperator:
  """A symmetric linear map ``v ↦ H v`` on flat vectors, with the context analyses need.

  Build it with :func:`hessian_operator`; derive others with :meth:`block`,
  :meth:`masked` or :func:`~adahessian_jax.hessian.preconditioned_operator`.

  Attributes:
    matmat_fn: ``(b, n) -> (b, n)`` block product ``V ↦ (H Vᵀ)ᵀ``: the operator itself.
    size: ``n``.
    dtype: dtype of the flat vectors.
    layout: How flat vectors map to the params' leaves (:class:`ParamLayout`).
    probes_fn: ``keys -> (len(keys), n)`` Rademacher probes, one row per key.
    data: The loss and batches ``H`` is the Hessian of (:class:`WeightedData`);
      ``None`` for a block or masked operator, which has no loss of its own.
    coordinates: For an operator in rescaled coordinates ``θ + S y``
      (:func:`~adahessian_jax.hessian.preconditioned_operator`), the ``(n,)``
      diagonal of ``S``, so that the operator is the Hessian in ``y`` at
      ``y = 0`` and a direction ``d`` moves the params by ``S d``; ``None``
      for the plain coordinates (``S = I``).
    block_size: Vectors per compiled product; estimators draw their probes in
      blocks of this size by default.
  """

  matmat_fn: Callable[[jax.Array], jax.Array]
  size: int
  dtype: np.dtype[Any]
  layout: ParamLayout
  probes_fn: Callable[[jax.Array], jax.Array]
  data: WeightedData | None = None
  coordinates: jax.Array | None = None
  block_size: int = 8

  def matvec(self, v: jax.Array) -> jax.Array:
    """The product ``H v``.

    Args:
      v: A real flat vector of shape ``(n,)`` (:meth:`ravel` turns a pytree like the params
        into one).

    Returns:
      ``H v``, shape ``(n,)``.

    Raises:
      ValueError: for another shape or a complex vector.
    """
    if np.shape(v) != (self.size,):
      raise ValueError(
        f"matvec needs a flat vector of shape ({self.size},) (the operator's size), got shape "
        f"{np.shape(v)}; ravel a pytree like the params with op.ravel."
      )
    _checks.real(v, "matvec's vector")  # cast to the operator's dtype, it would lose a part
    return self.matmat_fn(jnp.asarray(v)[None])[0]

  def matmat(self, vs: jax.Array) -> jax.Array:
    """The products ``H v`` of several vectors at once.

    Args:
      vs: Real vectors as the rows of a ``(b, n)`` array.

    Returns:
      ``(b, n)``: row ``i`` is ``H vs[i]``.

    Raises:
      ValueError: for another shape or complex vectors.
    """
    if np.ndim(vs) != 2 or np.shape(vs)[1] != self.size:
      raise ValueError(
        f"matmat needs vectors as rows of a (b, {self.size}) array (the operator's size), got "
        f"shape {np.shape(vs)}."
      )
    _checks.real(vs, "matmat's vectors")
    return self.matmat_fn(vs)

  def probes(self, keys: jax.Array) -> jax.Array:
    """Rademacher probes, one per key.

    Args:
      keys: ``b`` PRNG keys, as ``jax.random.split(key, b)`` gives them.

    Returns:
      ``(b, n)``: row ``i`` the probe of ``keys[i]``.
    """
    return self.probes_fn(keys)

  def gaussian(self, key: jax.Array, num: int) -> jax.Array:
    """Standard normal vectors: the start vectors of the eigensolvers.

    Unlike a Rademacher vector, which has no component along ``e_a − e_b`` whenever its
    entries ``a`` and ``b`` agree (probability 1/2), a normal vector has a component along
    every direction almost surely: the top eigenvector of a pair of symmetric parameters is
    then not invisible to a Krylov space started from it.

    Args:
      key: A PRNG key.
      num: How many vectors.

    Returns:
      ``(num, n)`` of the operator's dtype.
    """
    return jax.random.normal(key, (num, self.size), self.dtype)

  def rademacher(self, key: jax.Array, num: int) -> jax.Array:
    """Rademacher probes, probe ``i`` from ``jax.random.split(key, num)[i]``.

    For an operator from :func:`hessian_operator` that probe is
    ``ravel(rademacher_like(key_i, params))``, the one
    :func:`adahessian_jax.hutchinson.hutchinson_diagonal` draws from the same key.

    Args:
      key: A PRNG key.
      num: How many probes.

    Returns:
      ``(num, n)``, one probe per row.
    """
    return self.probes(jax.random.split(key, num))

  # The leaf layout, for convenience.
  @property
  def params(self) -> Any:
    """The point of evaluation."""
    return self.layout.params

  @property
  def leaf_names(self) -> tuple[str, ...]:
    """Readable path of every leaf, in flattening order."""
    return self.layout.names

  @property
  def leaf_slices(self) -> tuple[slice, ...]:
    """``slice`` of every leaf in the flat vector."""
    return self.layout.slices

  def ravel(self, tree: Any, what: str = "the tree") -> jax.Array:
    """Flattens a pytree like the params into a vector the operator takes.

    Args:
      tree: A pytree with the params' leaves and shapes (Linen boxes and NNX variables aside).
      what: What ``tree`` is, for the error message.

    Returns:
      The ``(n,)`` vector, in the operator's order.

    Raises:
      ValueError: naming ``what`` and the first leaf path that differs (two trees of the same
        size but other leaves would flatten to the right length).
    """
    _checks.like_params(tree, self.params, what)
    return self.layout.ravel(tree)

  def unravel(self, v: jax.Array) -> Any:
    """The inverse of :meth:`ravel`.

    Args:
      v: A flat ``(n,)`` vector.

    Returns:
      A pytree of the params' structure (Linen boxes and NNX variables included) whose leaves
      hold the entries of ``v`` in the params' leaf shapes.

    Raises:
      ValueError: for another shape (JAX's split raised "axis 0 is out of bounds" for a scalar).
    """
    if np.shape(v) != (self.size,):
      raise ValueError(
        f"unravel needs a flat vector of shape ({self.size},) (the operator's size), got shape "
        f"{np.shape(v)}; for several, jax.vmap(op.unravel)(vs)."
      )
    return self.layout.unravel(v)

  @property
  def num_batches(self) -> int:
    """Number of batches the Hessian is averaged over (0 without data)."""
    return 0 if self.data is None else len(self.data.batches)

  def loss(self, params: Any | None = None) -> jax.Array:
    """The loss over all the operator's data.

    Args:
      params: Where to evaluate it; ``None`` for the operator's point. A pytree with the
        params' leaves and shapes (Linen boxes and NNX variables aside).

    Returns:
      The weighted loss over the batches.

    Raises:
      ValueError: for an operator without data (a block or masked one), or ``params`` whose
        tree or leaf shapes are not the operator's params' (naming the first leaf that differs).
    """
    data = self.require_data("the loss")
    if params is None:
      return data.loss(self.params)
    # Other params (a smaller bias) broadcast in the loss and gave a wrong number without a word.
    _checks.like_params(params, self.params, "loss's params")
    return data.loss(params)

  def require_data(self, what: str) -> WeightedData:
    """The operator's loss and batches, for an analysis that needs them.

    Args:
      what: The analysis, for the error message.

    Returns:
      Its :class:`WeightedData`.

    Raises:
      ValueError: saying that ``what`` needs data, for a block or masked operator.
    """
    if self.data is None:
      raise ValueError(
        f"{what} needs the loss and data of an operator from hessian_operator(); this one (a "
        "block or masked operator) has none. Use the operator it was derived from."
      )
    return self.data

  def block(self, leaf: int | str, where: tuple[int | slice, ...] = ()) -> HessianOperator:
    """The diagonal block ``H_ll`` of one leaf, or of part of it, as an operator on it alone.

    Args:
      leaf: Index into :attr:`leaf_names`, or the name itself.
      where: A NumPy basic index into the leaf (ints and slices) selecting part of it, e.g.
        ``(3,)`` for layer 3 of a stacked kernel ``(layers, in, out)``; ``()`` (the default)
        for the whole leaf.

    Returns:
      A :class:`HessianOperator` on the selected entries (size ``leaf[where].size``, params
      ``leaf[where]``) whose products cost one full Hessian-vector product each (the vector
      is zero outside the selection).

    Raises:
      ValueError: for an unknown leaf, an index that is not ints and slices or lies outside
        the leaf, or a selection of size 0 (as :func:`hessian_operator` refuses params
        without entries).
    """
    index = self.layout.index(leaf)
    name, leaf_params = self.leaf_names[index], jax.tree.leaves(self.params)[index]
    where = where if isinstance(where, tuple) else (where,)
    flat = part_entries(name, leaf_params, where) + self.leaf_slices[index].start
    n, full, full_probes = self.size, self.matmat_fn, self.probes_fn
    name = part_name(name, where)
    shape, flat, width = np.shape(flat), flat.ravel(), flat.size
    if flat[-1] - flat[0] + 1 == width:  # contiguous (a whole leaf, a leading-axis layer)
      first = int(flat[0])
      take = lambda vs: take_cols(vs, first, width)
      embed = lambda vs: embed_cols(vs, first, n)
    else:
      cols = jnp.asarray(flat)
      take = lambda vs: take_idx(vs, cols)
      embed = lambda vs: embed_idx(vs, cols, n)
    layout = ParamLayout(
      params=leaf_params[where] if where else leaf_params,  # a Python float leaf too
      names=(name,),
      slices=(slice(0, width),),
      unravel=lambda v: jnp.reshape(v, shape),
    )
    return HessianOperator(
      matmat_fn=lambda vs: take(full(embed(vs))),
      size=width,
      dtype=self.dtype,
      layout=layout,
      probes_fn=lambda keys: take(full_probes(keys)),
      coordinates=None if self.coordinates is None else self.coordinates[flat],
      block_size=self.block_size,
    )

  def masked(self, leaf: int | str) -> HessianOperator:
    """``M H M`` with ``M`` the 0/1 mask of one leaf, on full-size vectors.

    Same spectrum as :meth:`block` on the leaf (plus zeros off it), but with
    the shapes of the full operator, so solvers compiled for it are reused for
    every leaf. Its probes are the full probes, masked.

    Args:
      leaf: Index into :attr:`leaf_names`, or the name itself.

    Returns:
      A :class:`HessianOperator` of the full size, without data.

    Raises:
      ValueError: for an unknown leaf name or an index out of range.
    """
    sl = self.leaf_slices[self.layout.index(leaf)]
    mask = jnp.zeros(self.size, self.dtype).at[sl].set(1.0)
    full, full_probes = self.matmat_fn, self.probes_fn
    return dataclasses.replace(
      self,
      matmat_fn=lambda vs: scale_rows(full(scale_rows(vs, mask)), mask),
      probes_fn=lambda keys: scale_rows(full_probes(keys), mask),
      data=None,
    )


def _note_nnx_mutation(error: Exception) -> None:
  """Adds the fix to NNX's ``TraceContextError`` from a ``loss_fn`` that writes state of a model
  built outside it ("Cannot mutate BatchStat from a different trace level")."""
  kind = loaded("flax.errors", "TraceContextError")
  if kind is not None and isinstance(error, kind):
    error.add_note(
      "hessian_operator: loss_fn writes NNX variables made outside it (BatchNorm statistics in "
      "training mode, a Dropout's RNG count): build the model on copies, nnx.merge(graphdef, p, "
      "rest, copy=True), as docs/hessian_analysis.md's NNX recipe does."
    )


def _takes_batch_first(loss_fn: Any, params: Any, batch: Any) -> bool:
  """Whether ``loss_fn(batch, params)`` traces to a scalar, for a ``loss_fn(params, batch)`` that
  failed: a loss written with the other argument order."""
  try:
    value = jax.eval_shape(loss_fn, batch, params)
  except Exception:
    return False
  return (
    isinstance(value, jax.ShapeDtypeStruct)
    and value.shape == ()
    and jnp.issubdtype(value.dtype, jnp.floating)
  )


# What the error for a loss_fn that ignores the params it is given says (the optimizer's advice is
# about its value_fn and steps).
_CONSTANT_FIX = (
  "It probably uses other params than its argument: write lambda p, b: loss(p, b), not "
  "lambda p, b: loss(params, b); for NNX, merge the params it is passed, nnx.merge(graphdef, p, "
  "rest, copy=True), not a model it closes over (docs/hessian_analysis.md)."
)


@jax.jit
def _batch_matmat(loss_fn, params, batch, vs):
  """``(H_b v)`` for every row ``v`` of ``vs``: the per-batch block product.

  NaN where the loss itself is not finite (computed by the same pass, which evaluates it
  anyway), so that the analyses' check of each product also stops on a loss that is NaN while
  its curvature is finite (e.g. the log of a negative number).
  """
  _, unravel = ravel(params)

  def one(v):
    loss, _, hv = value_grad_hvp(
      lambda q: loss_fn(q, batch), params, unravel(v), name="loss_fn", constant_fix=_CONSTANT_FIX
    )
    return jnp.where(jnp.isfinite(loss), ravel(hv)[0], jnp.nan)

  return jax.vmap(one)(vs)


def hessian_operator(
  loss_fn: LossFn,
  params: Any,
  batch: Any = None,
  *,
  batches: Iterable[Any] | None = None,
  batch_sizes: Iterable[float] | None = None,
  block_size: int = 8,
) -> HessianOperator:
  """The Hessian of ``loss_fn(params, batch)`` at ``params``, as an operator.

  Give exactly one of ``batch`` (one batch) or ``batches`` (several). With
  several, the loss and the Hessian are ``Σ_b w_b · loss_b`` with
  ``w_b = n_b / Σ n_b``: for a ``loss_fn`` that averages over the examples of its
  batch, the Hessian of the mean loss over all examples.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, a pure function: its
      compilation is reused, so state it reads from outside its arguments
      (a global, BatchNorm statistics) is fixed at its first call; pass such
      state in ``batch``, or as the arrays of a ``jax.tree_util.Partial``
      (e.g. ``Partial(f, graphdef, rest)`` for an NNX model, with ``f`` defined
      once): the arrays of a pytree ``loss_fn`` are arguments of the compiled
      functions, not constants (unless its function needs one concrete, e.g. a
      NumPy boolean mask: then it is static as a whole); its Python and NumPy
      scalars (a label smoothing) and unbound Linen modules are static, compared by value.
    params: Point of evaluation, a pytree of real floating arrays (close over
      integer or bool leaves, such as step counters, in ``loss_fn``). The operator keeps
      its own tree over these arrays: an NNX state's Variables, shared with the model,
      that later training steps write in place do not move it.
    batch: A single batch: a pytree ``loss_fn`` accepts whose leaves are arrays or numbers
      (close over strings and other values in ``loss_fn``).
    batches: An iterable of batches. A sequence (list, tuple) is kept as is; any
      other iterable is read once into a list (the batches are held by
      reference: device arrays stay where they are). Not a mapping: a dict
      batch goes in ``batch`` (or in a list).
    batch_sizes: Example counts ``n_b`` of the batches, finite positive
      numbers. By default the leading dimension that all leaves of a batch
      with an axis share; a batch whose leaves disagree (e.g. a per-class
      weight vector next to the examples) raises ``ValueError`` naming the
      leaves and their sizes: pass ``batch_sizes`` then. A single batch has weight 1: its
      size is not inferred, and a ``batch_sizes`` given with it must still be one such number.
    block_size: Vectors per compiled block product. A product with one vector
      or ``block_size`` vectors runs as is; any other count runs in blocks of
      ``block_size`` (the last zero-padded), so the per-batch Hessian product is
      compiled at most twice (1 and ``block_size`` vectors) per batch shape.

  Returns:
    A :class:`HessianOperator`. Its block product is ``jax.jit``-compiled and
    reused by every product; compilations are shared between operators built
    from the same ``loss_fn`` object, or from pytrees ``loss_fn`` of equal
    structure (a ``Partial`` of the same function), with the same shapes. Over
    several batches, 16-bit products and losses are summed in float32 (the
    products then rounded once, the loss kept in float32). An unhashable
    ``loss_fn`` (e.g. an instance of a plain ``@dataclass``) is compiled per
    object (hashed by identity).

  Raises:
    TypeError: if a leaf of ``params`` is not a real floating array (named by
      its path), a leaf of a batch is not an array or a number (named), ``batch`` is an
      iterator (a data loader: pass ``batches``), or ``loss_fn`` cannot
      be called as ``loss_fn(params, batch)`` or does not return a real scalar (traced on the
      first batch of each shape: one its loss fails on is named).
    NonFiniteError: if an entry of ``params`` is not finite (named by its
      path). A loss that is not finite makes every product NaN, so the
      analyses stop on it at their first product.
    ValueError: for params or a batch that is traced (a call inside ``jax.jit``: the analyses
      run on the host), params without entries or with a ``jax.pmap`` output's device axis (a
      leaf of stacked replicas: pass one replica), with an NNX variable no optimizer trains
      (``nnx.BatchStat``, RNG state, a cache: ``nnx.state(model)`` or the module itself, not
      its ``nnx.Param``; named), a whole Linen variables dict (``batch_stats``, a cache or
      intermediates beside ``"params"``), ``batches`` that is a mapping (whose
      iteration gives its keys), an empty batch (a leaf with a
      leading axis of length 0), a batch whose structure or leaf shapes past
      the leading axis differ from the first batch's, or bad ``batch_sizes``;
      the message names the batch and leaf.
  """
  block_size = _validation.count("block_size", block_size)
  _checks.concrete(params, "params")
  check_no_nnx_state(params)
  check_no_linen_state(params)
  _validation.float_leaves(
    params,
    "params",
    "The Hessian is taken with respect to every leaf: keep integer, bool and complex values "
    "(and functions) out of params and close over them in loss_fn instead.",
  )
  check_not_pmapped(params)
  # A copy of the tree over the same arrays: an NNX state from nnx.split holds the model's own
  # Variables, which later training steps write in place; the operator stays at its point.
  params = jax.tree.unflatten(jax.tree.structure(params), jax.tree.leaves(params))
  data = batch_list(batch, batches)
  for i, b in enumerate(data):
    _checks.concrete(b, "the batch" if batches is None else f"batches[{i}]")
  weights = batch_weights(data, batch_sizes)
  flat, unravel = ravel(params)
  # Not by flat.size alone: jax 0.7.0 ravels a tree without leaves to a scalar, of size 1.
  if flat.size == 0 or not jax.tree.leaves(params):
    raise ValueError("params has no entries: there is no Hessian to analyse.")
  layout = ParamLayout.of(params, unravel)
  bad = layout.first_not_finite(flat)
  if bad is not None:
    raise NonFiniteError(f"params are not finite: {bad}. Analyse a point the loss is defined at.")
  # loss_fn takes the batch too: the way out of (loss, aux) is not the optimizer's lambda p.
  fix = "wrap it: lambda p, b: loss_fn(p, b)[0]."
  # A loss of the params alone (the optimizer's value_fn) failed with Python's bare "takes 1
  # positional argument but 2 were given".
  _validation.callable_with(
    loss_fn,
    (params, data[0]),
    {},
    "loss_fn(params, batch)",
    "The operator evaluates it on each batch: give it the batch as its second argument, "
    "lambda p, b: loss(p, b), or lambda p, b: loss(p, *b) for a loss(params, x, y) and a batch "
    "(x, y) (not the optimizer's value_fn, lambda p: loss(p, batch)).",
  )
  # Traced on the first batch of each shape, so that a loss that fails on a shorter last batch
  # (a reshape to a fixed size) fails here, naming it, not inside the first analysis.
  for i in first_of_each_shape(data):
    try:
      value = jax.eval_shape(loss_fn, params, data[i])
    except Exception as e:
      _note_nnx_mutation(e)
      if i:
        e.add_note(
          f"hessian_operator: loss_fn failed on batches[{i}] (leaf shapes {leaf_shapes(data[i])}), "
          f"though it runs on batches[0] ({leaf_shapes(data[0])}): the loss is evaluated on every "
          "batch, so it must take each batch's size (or drop or pad a short last batch)."
        )
      elif batches is not None and all(is_array(b) for b in data):
        e.add_note(f"hessian_operator: loss_fn was called on batches[0], an array.{ONE_BATCH_HINT}")
      elif batches is None and looks_like_batches(batch):
        e.add_note(
          f"hessian_operator: batch= is a {type(batch).__name__} of {len(batch)} pytrees of one "
          "structure. If they are several batches, pass them as batches=[...]: batch= takes "
          "one batch, which loss_fn is called on as a whole."
        )
      elif _takes_batch_first(loss_fn, params, data[0]):
        # A loss(batch, params) failed inside its own code (a tracer "is not a mapping", a shape
        # mismatch), naming neither the order nor the fix.
        e.add_note(
          "hessian_operator: loss_fn runs with its arguments swapped, loss_fn(batch, params): it "
          "is called as loss_fn(params, batch). Pass lambda p, b: loss_fn(b, p)."
        )
      raise
    check_scalar_loss(value, f"loss_fn on batches[{i}]" if i else "loss_fn", fix)
  jit_loss = _loss.jit_loss(loss_fn, (params, data[0]))
  weighted = WeightedData(loss_fn, tuple(float(w) for w in weights), tuple(data), jit_loss)

  def block_product(vs):  # 16-bit products over several batches: summed wide, rounded once
    return weighted.weighted_sum(lambda b: _batch_matmat(jit_loss, params, b, vs)).astype(
      flat.dtype
    )

  def probes(keys):
    key_data, impl = jax.random.key_data(keys), str(jax.random.key_impl(keys))
    return map_row_blocks(lambda d: rademacher_rows(d, params, impl), key_data, block_size)

  return HessianOperator(
    matmat_fn=lambda vs: map_row_blocks(block_product, jnp.asarray(vs, flat.dtype), block_size),
    size=int(flat.size),
    dtype=flat.dtype,
    layout=layout,
    probes_fn=probes,
    data=weighted,
    block_size=block_size,
  )
