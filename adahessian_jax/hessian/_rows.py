"""Row-block helpers on stacks of flat vectors ``(b, n)``: the operator's products and probes in
blocks of a fixed size, and the columns of one block of the params.

Each is a compiled program of its own, so that a count of vectors, a leaf or a layer does not
compile another: :func:`map_row_blocks` pads a stack to whole blocks, :func:`key_blocks` cuts the
probes' keys on the host, and the column helpers take the offset of a block as an argument.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from adahessian_jax.hessian._layout import ravel
from adahessian_jax.hutchinson import rademacher_like, vmap_invariant

__all__ = [
  "embed_cols",
  "embed_idx",
  "key_blocks",
  "map_row_blocks",
  "rademacher_rows",
  "scale_rows",
  "take_cols",
  "take_idx",
]


@functools.partial(jax.jit, static_argnums=2)
def rademacher_rows(key_data, params, impl):
  """The probe ``ravel(rademacher_like(key, params))`` of each key, whose data are the rows of
  ``key_data`` and whose implementation is ``impl`` (its name: ``"rbg"`` keys wrapped as the
  default threefry failed inside JAX)."""
  keys = jax.random.wrap_key_data(key_data, impl=impl)
  one = lambda k: ravel(rademacher_like(k, params))[0]
  # Keys that draw other numbers under vmap (rbg) go one by one: each row stays its key's probe.
  return jax.vmap(one)(keys) if vmap_invariant(keys) else jax.lax.map(one, keys)


@functools.partial(jax.jit, static_argnums=1)
def _pad_rows(rows, pad):
  return jnp.pad(rows, ((0, pad),) + ((0, 0),) * (rows.ndim - 1))


@functools.partial(jax.jit, static_argnums=2)
def _row_block(rows, start, size):
  return jax.lax.dynamic_slice_in_dim(rows, start, size)


@functools.partial(jax.jit, static_argnums=1)
def _concat_rows(blocks, num):
  return jnp.concatenate(blocks)[:num]


@jax.jit
def scale_rows(vs, scale):
  """``vs * scale`` as one compiled program: the rows of ``vs`` times a mask or scale of the
  operator's size, or a block of rows times another of its shape (``z ⊙ Hz``)."""
  return vs * scale


# ``start`` is traced: one program for every block of a width, not one per leaf or layer.
@functools.partial(jax.jit, static_argnums=2)
def embed_cols(vs, start, n):
  return jax.lax.dynamic_update_slice_in_dim(jnp.zeros((vs.shape[0], n), vs.dtype), vs, start, 1)


@functools.partial(jax.jit, static_argnums=2)
def take_cols(vs, start, size):
  return jax.lax.dynamic_slice_in_dim(vs, start, size, 1)


@functools.partial(jax.jit, static_argnums=2)
def embed_idx(vs, cols, n):
  return jnp.zeros((vs.shape[0], n), vs.dtype).at[:, cols].set(vs)


@jax.jit
def take_idx(vs, cols):
  return vs[:, cols]


def map_row_blocks(fn: Callable[[jax.Array], jax.Array], rows: Any, block_size: int) -> jax.Array:
  """``fn`` applied to the rows of ``rows`` in blocks of exactly ``block_size``.

  One row or ``block_size`` rows go through as they are; any other count is
  zero-padded to a multiple of ``block_size`` and cut back after, so ``fn``
  (typically jit-compiled) sees at most two shapes whatever the count. Zero rows
  are inert for a linear map, and zero key data is a valid key.

  Args:
    fn: ``(b, ...) -> (b, ...)``, row ``i`` of the output depending on row ``i``
      of the input only.
    rows: ``(num, ...)`` array.
    block_size: Rows per call.

  Returns:
    ``fn(rows)``, computed block by block.
  """
  num = rows.shape[0]
  if num in (1, block_size):
    return fn(rows)
  padded = _pad_rows(rows, -num % block_size)
  blocks = [fn(_row_block(padded, i, block_size)) for i in range(0, num, block_size)]
  return _concat_rows(tuple(blocks), num)


def key_blocks(key: jax.Array, num: int, block_size: int) -> list[jax.Array]:
  """``jax.random.split(key, num)`` cut into blocks of ``block_size`` keys.

  One compiled program per count and block size: no slice of a device array is compiled per
  offset, and no block's keys per block shape.
  """
  return list(_key_blocks(key, num, block_size))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _key_blocks(key: jax.Array, num: int, block_size: int) -> tuple[jax.Array, ...]:
  keys = jax.random.split(key, num)
  return tuple(keys[i : i + block_size] for i in range(0, num, block_size))
