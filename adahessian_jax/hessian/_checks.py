"""Argument checks and the non-finite guard of every analysis in :mod:`adahessian_jax.hessian`.

One wording for every size and count (``"<name> must be an integer in [lo, hi], got <value>"``)
and one for a product or loss that is not finite, so that a bad argument or a diverged model
fails the same way whichever function it reaches.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np


def count(name: str, value: Any, lo: int = 1, hi: int | None = None) -> int:
  """Returns ``value`` as an ``int`` if it is an integer in ``[lo, hi]``, else raises.

  Args:
    name: The argument's name, as the caller spells it.
    value: The value given.
    lo: Smallest allowed value.
    hi: Largest allowed value (``None``: no upper bound).

  Returns:
    ``int(value)``.

  Raises:
    ValueError: for a bool, a non-integer (``2.5``, ``"3"``, an array that is
      not a scalar integer) or a value outside the range.
  """
  ok = isinstance(value, numbers.Integral | np.integer) and not isinstance(value, bool | np.bool_)
  if ok:
    ok = int(value) >= lo and (hi is None or int(value) <= hi)
  if not ok:
    upper = "∞)" if hi is None else f"{hi}]"
    raise ValueError(f"{name} must be an integer in [{lo}, {upper}, got {value!r}.")
  return int(value)


def positive(name: str, value: Any, allow_zero: bool = False) -> float:
  """Returns ``value`` as a ``float`` if it is finite and ``> 0`` (``>= 0`` if ``allow_zero``)."""
  try:
    v = float(value)
  except (TypeError, ValueError):
    v = float("nan")
  if isinstance(value, bool) or not np.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
    bound = ">= 0" if allow_zero else "> 0"
    raise ValueError(f"{name} must be a finite real number {bound}, got {value!r}.")
  return v


class NonFiniteError(FloatingPointError):
  """A Hessian-vector product (or the loss) at the operator's point is not finite.

  Raised by every analysis function as soon as it sees one, instead of
  spending the rest of its budget on NaNs; the message says where and what to
  check.
  """


def finite(values: Any, what: str) -> None:
  """Raises :class:`NonFiniteError` if any entry of ``values`` is NaN or infinite.

  Args:
    values: A host or device array (fetched to the host: call it where the
      caller synchronises anyway).
    what: Where the values come from, e.g. ``"the Hessian-vector product at
      Lanczos step 3"``.
  """
  arr = np.asarray(values)
  if not np.all(np.isfinite(arr)):
    bad = "nan" if np.any(np.isnan(arr)) else "inf"
    raise NonFiniteError(
      f"{what} is not finite ({bad}). The loss or its curvature at the operator's params is "
      "not finite: check op.loss() and the params (a diverged run, an overflow in low "
      "precision, a log of zero) before analysing this point."
    )
