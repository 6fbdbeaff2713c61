"""PRNG keys as the library takes them: typed (``jax.random.key``) or raw key data
(``jax.random.PRNGKey``, ``uint32`` with a trailing key-data axis)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_typed(x: Any) -> bool:
  """Whether ``x`` (an array or a dtype) holds typed PRNG keys rather than raw key data."""
  return bool(jnp.issubdtype(getattr(x, "dtype", x), jax.dtypes.prng_key))


def default_key_size() -> int:
  """The number of ``uint32`` words of a key of JAX's default PRNG implementation."""
  return jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape[-1]


def batch_ndim(keys: jax.Array) -> int:
  """The number of axes that index the keys of ``keys``: all of a typed array's, all but the
  trailing key-data axis of raw data."""
  return keys.ndim if is_typed(keys) else keys.ndim - 1


def as_typed(keys: jax.Array) -> jax.Array:
  """``keys`` as typed PRNG keys (raw data wrapped with the default implementation)."""
  return keys if is_typed(keys) else jax.random.wrap_key_data(keys)


def prng_key(key: Any, what: str = "key") -> jax.Array:
  """Returns ``key`` if it is one PRNG key, typed (``jax.random.key``) or raw
  (``jax.random.PRNGKey``); else raises ``ValueError`` naming ``what``, the value and the fix.

  Without it an int seed, a batch of keys or raw data of another dtype failed deep inside
  ``jax.random`` ("invalid PRNG key data ... Got 0", "split accepts a single key"), naming
  neither the argument nor the fix.
  """
  dtype, many = getattr(key, "dtype", None), False
  if dtype is None:
    got = f"{key!r} of type {type(key).__name__}"
  elif is_typed(dtype):
    if np.shape(key) == ():
      return key
    many, got = True, f"a batch of typed keys of shape {np.shape(key)}"
  else:
    shape, raw = tuple(np.shape(key)), tuple(np.shape(jax.random.key_data(jax.random.key(0))))
    if shape == raw and dtype == np.uint32:
      return key
    many = dtype == np.uint32 and len(shape) > len(raw) and shape[-len(raw) :] == raw
    got = f"{'a batch of raw keys' if many else 'an array'} of shape {shape} and dtype {dtype}"
  fix = (
    "pass one key: the function splits it into as many as it needs"
    if many
    else "pass jax.random.key(seed)"
  )
  raise ValueError(f"{what} must be a single PRNG key, got {got}; {fix}.")
