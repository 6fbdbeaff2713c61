"""PRNG keys as the library takes them: typed (``jax.random.key``) or raw key data
(``jax.random.PRNGKey``, ``uint32`` with a trailing key-data axis)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def is_typed(x: Any) -> bool:
  """Whether ``x`` (an array or a dtype) holds typed PRNG keys rather than raw key data."""
  return bool(jnp.issubdtype(getattr(x, "dtype", x), jax.dtypes.prng_key))


def batch_ndim(keys: jax.Array) -> int:
  """The number of axes that index the keys of ``keys``: all of a typed array's, all but the
  trailing key-data axis of raw data."""
  return keys.ndim if is_typed(keys) else keys.ndim - 1


def as_typed(keys: jax.Array) -> jax.Array:
  """``keys`` as typed PRNG keys (raw data wrapped with the default implementation)."""
  return keys if is_typed(keys) else jax.random.wrap_key_data(keys)
