"""The Hessian of a loss over one batch or many, as a jitted flat-vector operator.

Every analysis in :mod:`adahessian_jax.hessian` works on a
:class:`HessianOperator`: the map ``v ↦ H v`` on flat vectors of the
parameters' size, where ``H`` is the Hessian at ``params`` of the loss over the
data. Over several batches the loss and its Hessian are the batch-size-weighted
averages of the per-batch ones, so that for a ``loss_fn`` that averages over
examples, ``H`` is the Hessian of the full-data loss.

The per-batch product reuses :func:`adahessian_jax.hutchinson.hvp`
(forward-over-reverse), ``vmap``-ed over a block of vectors and jit-compiled once
per batch shape and block size; the batch is an argument of the compiled
function, not a constant baked into it, so one compilation serves every batch
of the same shape, and a batch whose arrays are sharded over devices (e.g.
``jax.device_put(batch, NamedSharding(mesh, P("data")))``) is partitioned by the
compiler, with the reduction over the batch inserted automatically.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from adahessian_jax.hutchinson import check_scalar_loss, hvp, rademacher_like

__all__ = ["HessianOperator", "hessian_operator"]

LossFn = Callable[[Any, Any], jax.Array]


@dataclasses.dataclass(frozen=True)
class HessianOperator:
  """The Hessian of a loss at fixed parameters over fixed data.

  Build it with :func:`hessian_operator`. Vectors are flat: ``ravel`` and
  ``unravel`` convert to and from the parameters' pytree.

  Attributes:
    params: The point of evaluation (a pytree).
    size: Number of parameters ``n``.
    dtype: dtype of the flat vectors.
    leaf_names: Readable path of every leaf of ``params``, in flattening order.
    leaf_slices: ``slice`` of every leaf in the flat vector.
    matmat_fn: ``(b, n) -> (b, n)`` block product ``V ↦ (H V^T)^T``.
    loss_fn: ``params -> loss`` over all the data (weighted average).
    ravel: ``pytree -> (n,)``.
    unravel: ``(n,) -> pytree``.
    num_batches: Number of batches the Hessian is averaged over.
    per_batch_loss: The ``loss_fn(params, batch)`` it was built from (``None``
      for a block operator).
    weighted_batches: ``(w_b, batch_b)`` pairs (empty for a block operator).
    block_size: Vectors per compiled product (see :func:`hessian_operator`);
      estimators draw their probes in blocks of this size by default.
    probes_fn: If set, replaces the probe generator (used by derived operators).
  """

  params: Any
  size: int
  dtype: Any
  leaf_names: tuple[str, ...]
  leaf_slices: tuple[slice, ...]
  matmat_fn: Callable[[jax.Array], jax.Array]
  loss_fn: Callable[[Any], jax.Array]
  ravel: Callable[[Any], jax.Array]
  unravel: Callable[[jax.Array], Any]
  num_batches: int = 1
  block_size: int = 8
  probes_fn: Callable[[jax.Array], jax.Array] | None = None
  per_batch_loss: LossFn | None = None
  weighted_batches: tuple[tuple[float, Any], ...] = ()

  def matvec(self, v: jax.Array) -> jax.Array:
    """``H v`` for a flat vector ``v`` of shape ``(n,)``."""
    return self.matmat_fn(v[None])[0]

  def matmat(self, vs: jax.Array) -> jax.Array:
    """``H v`` for every row ``v`` of ``vs``, shape ``(b, n)``."""
    return self.matmat_fn(vs)

  def loss(self, params: Any | None = None) -> jax.Array:
    """The loss over all the data at ``params`` (default: the operator's point)."""
    return self.loss_fn(self.params if params is None else params)

  def rademacher(self, key: jax.Array, num: int) -> jax.Array:
    """``num`` Rademacher probes as rows of a ``(num, n)`` array.

    Probe ``i`` is ``ravel(rademacher_like(jax.random.split(key, num)[i], params))``,
    the probe :func:`adahessian_jax.hutchinson.hutchinson_diagonal` draws from
    the same key.
    """
    return self.probes(jax.random.split(key, num))

  def probes(self, keys: jax.Array) -> jax.Array:
    """One Rademacher probe per key, as rows: ``ravel(rademacher_like(key, params))``.

    Drawn in blocks of :attr:`block_size` keys (the last padded), so the probe
    generator is compiled at most twice whatever the number of keys.
    """
    if self.probes_fn is not None:
      return self.probes_fn(keys)
    num, size = keys.shape[0], self.block_size
    if num in (1, size):
      return _rademacher_rows(keys, self.params)
    data = np.asarray(jax.random.key_data(keys))
    data = np.concatenate([data, np.repeat(data[:1], -num % size, axis=0)])
    rows = [
      _rademacher_rows(jax.random.wrap_key_data(data[i : i + size]), self.params)
      for i in range(0, num, size)
    ]
    return _concat_rows(rows, num)

  def block(self, leaf: int | str) -> HessianOperator:
    """The diagonal block ``H_ll`` of one leaf, as an operator on that leaf alone.

    Args:
      leaf: Index into :attr:`leaf_names`, or the name itself.

    Returns:
      A :class:`HessianOperator` of size ``leaf.size`` whose products cost one
      full Hessian-vector product each (the vector is zero outside the leaf).
    """
    index = self.leaf_names.index(leaf) if isinstance(leaf, str) else leaf
    sl = self.leaf_slices[index]
    n, full = self.size, self.matmat_fn

    def matmat(vs):
      return _take_cols(full(_embed_cols(vs, sl.start, n)), sl.start, sl.stop - sl.start)

    def probes(keys):
      return _take_cols(self.probes(keys), sl.start, sl.stop - sl.start)

    leaf_params = jax.tree.leaves(self.params)[index]
    shape = jnp.shape(leaf_params)

    def unravel(v):
      return jnp.reshape(v, shape)

    def ravel(x):
      return jnp.ravel(x)

    return HessianOperator(
      params=leaf_params,
      size=sl.stop - sl.start,
      dtype=self.dtype,
      leaf_names=(self.leaf_names[index],),
      leaf_slices=(slice(0, sl.stop - sl.start),),
      matmat_fn=matmat,
      loss_fn=_no_block_loss,
      ravel=ravel,
      unravel=unravel,
      num_batches=self.num_batches,
      block_size=self.block_size,
      probes_fn=probes,
    )

  def masked(self, leaf: int | str) -> HessianOperator:
    """``M H M`` with ``M`` the 0/1 mask of one leaf, on full-size vectors.

    Same spectrum as :meth:`block` on the leaf (plus zeros off it), but with
    the shapes of the full operator, so solvers compiled for it are reused for
    every leaf. Its probes are the full probes, masked.
    """
    index = self.leaf_names.index(leaf) if isinstance(leaf, str) else leaf
    sl = self.leaf_slices[index]
    mask = jnp.zeros(self.size, self.dtype).at[sl].set(1.0)
    full, full_probes = self.matmat, self.probes
    return dataclasses.replace(
      self,
      matmat_fn=lambda vs: _mask_rows(full(_mask_rows(vs, mask)), mask),
      probes_fn=lambda keys: _mask_rows(full_probes(keys), mask),
      loss_fn=_no_block_loss,
      per_batch_loss=None,
      weighted_batches=(),
    )


def _no_block_loss(params):
  raise NotImplementedError("a block operator has no loss of its own; use the parent operator")


@jax.jit
def _rademacher_rows(keys, params):
  return jax.vmap(lambda k: ravel_pytree(rademacher_like(k, params))[0])(keys)


@functools.partial(jax.jit, static_argnums=0)
def _batch_matmat(loss_fn, params, batch, vs):
  """``(H_b v)`` for every row ``v`` of ``vs``: the per-batch block product."""
  _, unravel = ravel_pytree(params)

  def one(v):
    return ravel_pytree(hvp(lambda q: loss_fn(q, batch), params, unravel(v)))[0]

  return jax.vmap(one)(vs)


@functools.partial(jax.jit, static_argnums=0)
def _batch_loss(loss_fn, params, batch):
  return loss_fn(params, batch)


@functools.partial(jax.jit, static_argnums=1)
def _pad_rows(vs, pad):
  return jnp.pad(vs, ((0, pad), (0, 0)))


@functools.partial(jax.jit, static_argnums=2)
def _row_block(vs, start, size):
  return jax.lax.dynamic_slice_in_dim(vs, start, size)


def _concat_rows(blocks, num):
  return _concat_jit(tuple(blocks), num)


@functools.partial(jax.jit, static_argnums=1)
def _concat_jit(blocks, num):
  return jnp.concatenate(blocks)[:num]


@jax.jit
def _mask_rows(vs, mask):
  return vs * mask


@functools.partial(jax.jit, static_argnums=(1, 2))
def _embed_cols(vs, start, n):
  return jnp.zeros((vs.shape[0], n), vs.dtype).at[:, start : start + vs.shape[1]].set(vs)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _take_cols(vs, start, size):
  return vs[:, start : start + size]


def key_blocks(key: jax.Array, num: int, block_size: int) -> list[jax.Array]:
  """``jax.random.split(key, num)`` cut into blocks of ``block_size`` keys.

  Sliced on the host, so that no slice of a device array is compiled per offset.
  """
  data = np.asarray(jax.random.key_data(jax.random.split(key, num)))
  return [jax.random.wrap_key_data(data[i : i + block_size]) for i in range(0, num, block_size)]


def _leading_size(batch: Any) -> int:
  leaves = jax.tree.leaves(batch)
  if not leaves or not jnp.shape(leaves[0]):
    raise ValueError(
      "cannot infer the batch size (no leaf with a leading axis); pass batch_sizes=..."
    )
  return int(jnp.shape(leaves[0])[0])


def _as_list(batches: Iterable[Any]) -> Sequence[Any]:
  if isinstance(batches, Sequence):
    return batches
  return list(batches)


def hessian_operator(
  loss_fn: LossFn,
  params: Any,
  batch: Any = None,
  *,
  batches: Iterable[Any] | None = None,
  batch_sizes: Sequence[float] | None = None,
  block_size: int = 8,
) -> HessianOperator:
  """The Hessian of ``loss_fn(params, batch)`` at ``params``, as an operator.

  Give exactly one of ``batch`` (one batch) or ``batches`` (several). With
  several, the loss and the Hessian are ``Σ_b w_b · loss_b`` with
  ``w_b = n_b / Σ n_b``: for a ``loss_fn`` that averages over the examples of its
  batch, the Hessian of the mean loss over all examples.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``.
    params: Point of evaluation, a pytree of real floating arrays.
    batch: A single batch (any pytree ``loss_fn`` accepts).
    batches: An iterable of batches. A sequence (list, tuple) is kept as is; any
      other iterable is read once into a list (the batches are held by
      reference: device arrays stay where they are).
    batch_sizes: Example counts ``n_b`` of the batches; by default the leading
      dimension of each batch's first leaf. Ignored for a single batch.
    block_size: Vectors per compiled block product. A product with one vector
      or ``block_size`` vectors runs as is; any other count runs in blocks of
      ``block_size`` (the last zero-padded), so the per-batch Hessian product is
      compiled at most twice (1 and ``block_size`` vectors) per batch shape.

  Returns:
    A :class:`HessianOperator`. Its block product is ``jax.jit``-compiled and
    reused by every product; compilations are shared between operators built
    from the same ``loss_fn`` object with the same shapes.
  """
  if block_size < 1:
    raise ValueError(f"block_size must be >= 1, got {block_size}")
  if (batch is None) == (batches is None):
    raise ValueError("give exactly one of batch= or batches=")
  if batch is not None:
    data, weights = [batch], np.ones(1)
  else:
    data = _as_list(batches)
    if not data:
      raise ValueError("batches is empty")
    sizes = [_leading_size(b) for b in data] if batch_sizes is None else list(batch_sizes)
    if len(sizes) != len(data):
      raise ValueError(f"{len(sizes)} batch_sizes for {len(data)} batches")
    sizes = np.asarray(sizes, dtype=np.float64)
    if np.any(sizes <= 0):
      raise ValueError("batch_sizes must be positive")
    weights = sizes / sizes.sum()

  flat, unravel = ravel_pytree(params)
  if not jnp.issubdtype(flat.dtype, jnp.floating):
    raise TypeError(f"params must be real floating arrays, got {flat.dtype}")
  check_scalar_loss(jax.eval_shape(loss_fn, params, data[0]), "loss_fn")

  def ravel(tree):
    return ravel_pytree(tree)[0]

  w = [float(x) for x in weights]

  def weighted(vs):
    out = w[0] * _batch_matmat(loss_fn, params, data[0], vs)
    for wb, b in zip(w[1:], data[1:], strict=True):
      out = out + wb * _batch_matmat(loss_fn, params, b, vs)
    return out

  def matmat(vs):
    vs = jnp.asarray(vs, flat.dtype)
    num = vs.shape[0]
    if num in (1, block_size):
      return weighted(vs)
    # Fixed-size blocks (the last zero-padded): one compilation serves any count.
    padded = _pad_rows(vs, -num % block_size)
    blocks = [weighted(_row_block(padded, i, block_size)) for i in range(0, num, block_size)]
    return _concat_rows(blocks, num)

  def loss(p):
    out = w[0] * _batch_loss(loss_fn, p, data[0])
    for wb, b in zip(w[1:], data[1:], strict=True):
      out = out + wb * _batch_loss(loss_fn, p, b)
    return out

  paths_leaves = jax.tree_util.tree_leaves_with_path(params)
  names = tuple(jax.tree_util.keystr(path, simple=True, separator="/") for path, _ in paths_leaves)
  offsets = np.cumsum([0] + [int(np.size(x)) for _, x in paths_leaves])
  slices = tuple(slice(int(a), int(b)) for a, b in zip(offsets[:-1], offsets[1:], strict=True))

  return HessianOperator(
    params=params,
    size=int(flat.size),
    dtype=flat.dtype,
    leaf_names=names,
    leaf_slices=slices,
    matmat_fn=matmat,
    loss_fn=loss,
    ravel=ravel,
    unravel=unravel,
    num_batches=len(data),
    block_size=block_size,
    per_batch_loss=loss_fn,
    weighted_batches=tuple(zip(w, data, strict=True)),
  )
