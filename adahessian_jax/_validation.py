"""Checks of hyperparameters, run at construction time.

Values that are traced (e.g. hyperparameters injected by
``optax.inject_hyperparams`` inside ``jit``) cannot be checked and are let
through; they were checked when the optimizer was first built.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.core
import numpy as np


def concrete_float(value: Any) -> float | None:
  """Returns ``value`` as a Python float, or ``None`` if it is traced."""
  if isinstance(value, jax.core.Tracer):
    return None
  if isinstance(value, bool):
    raise TypeError(f"expected a number, got the bool {value!r}")
  if isinstance(value, str | bytes):
    raise TypeError(f"expected a number, got the string {value!r}")
  arr = np.asarray(value)
  if arr.shape != ():
    raise TypeError(f"expected a scalar, got an array of shape {arr.shape}")
  return float(arr)


def in_interval(
  name: str, value: Any, lo: float, hi: float, hi_open: bool = False, lo_open: bool = False
) -> None:
  """Raises ``ValueError`` unless ``lo <= value <= hi`` (strict at an open end)."""
  try:
    v = concrete_float(value)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{name} must be a real scalar, got {value!r} ({e}).") from None
  if v is None:
    return
  ok = (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)
  if not ok or np.isnan(v):
    left, right = "(" if lo_open else "[", ")" if hi_open else "]"
    raise ValueError(f"{name} must be in {left}{lo}, {hi}{right}, got {value!r}.")


def positive_int(name: str, value: Any, hi: int | None = None) -> int:
  """``value`` as an ``int`` if it is an integer in ``[1, hi]``, else ``ValueError``."""
  if isinstance(value, jax.core.Tracer):
    raise ValueError(
      f"{name} sets array shapes and control flow, so it must be a concrete Python int, "
      f"got a traced value. With optax.inject_hyperparams pass "
      f"static_args=adahessian_jax.STATIC_ARGS."
    )
  if isinstance(value, bool) or not isinstance(value, numbers.Integral | np.ndarray | jax.Array):
    raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
  arr = np.asarray(value)
  if arr.shape != () or not np.issubdtype(arr.dtype, np.integer) or int(arr) < 1:
    raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
  if hi is not None and int(arr) > hi:
    raise ValueError(f"{name} must be an integer in [1, {hi}], got {value!r}.")
  return int(arr)


def integer(name: str, value: Any) -> None:
  """Raises ``ValueError`` unless ``value`` is an integer (traced values pass)."""
  if isinstance(value, jax.core.Tracer):
    return
  arr = np.asarray(value)
  if isinstance(value, bool) or arr.shape != () or not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"{name} must be an integer, got {value!r}.")


def is_static_zero(value: Any) -> bool:
  """Whether ``value`` is a concrete zero (so a term it scales can be left out of the graph)."""
  if isinstance(value, jax.core.Tracer):
    return False
  return bool(np.all(np.asarray(value) == 0))
