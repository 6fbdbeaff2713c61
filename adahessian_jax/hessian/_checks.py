"""Argument checks and the non-finite guard of every analysis in :mod:`adahessian_jax.hessian`.

One wording for every size and count (``"<name> must be an integer in [lo, hi], got <value>"``)
and one for a product or loss that is not finite, so that a bad argument or a diverged model
fails the same way whichever function it reaches.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
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


def _real(value: Any) -> float:
  """``float(value)`` for a real number (a 0-d numeric array too); NaN for anything else."""
  if isinstance(value, str | bytes | bool | np.bool_):
    return float("nan")
  try:
    return float(value)
  except (TypeError, ValueError):
    return float("nan")


def positive(name: str, value: Any, allow_zero: bool = False) -> float:
  """Returns ``value`` as a ``float`` if it is finite and ``> 0`` (``>= 0`` if ``allow_zero``).

  A bool or a string (``"3"``) is refused like a non-number.
  """
  v = _real(value)
  if not np.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
    bound = ">= 0" if allow_zero else "> 0"
    raise ValueError(f"{name} must be a finite real number {bound}, got {value!r}.")
  return v


def interval(
  name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False
) -> float:
  """Returns ``value`` as a ``float`` if it is a real number in the interval, else raises.

  The interval is ``[lo, hi]``, open at an end whose flag is set; ``hi`` may be ``inf``
  (the value must still be finite).
  """
  v = _real(value)
  ok = np.isfinite(v) and (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)
  if not ok:
    left, right = "(" if lo_open else "[", ")" if hi_open else "]"
    where = f"{'>' if lo_open else '>='} {lo}" if hi == np.inf else f"in {left}{lo}, {hi}{right}"
    raise ValueError(f"{name} must be a finite real number {where}, got {value!r}.")
  return v


def _paths(tree: Any) -> dict[str, Any]:
  return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def like_params(tree: Any, params: Any, what: str) -> None:
  """Raises ``ValueError`` unless ``tree`` has the structure of ``params`` and its leaves' shapes.

  Two trees of the same total size but other leaves (another model's, or a
  transposed kernel) would otherwise flatten to vectors of the right length
  with every entry in the wrong place.

  Args:
    tree: The pytree given, e.g. a direction or a preconditioner.
    params: The parameter pytree it must match.
    what: What ``tree`` is, as the caller names it (``"the preconditioner"``).
  """
  got, want = _paths(tree), _paths(params)
  must = (
    f"{what} must be a pytree with the structure and leaf shapes of the params (or a flat array)"
  )
  if jax.tree.structure(tree) != jax.tree.structure(params):
    missing = [p for p in want if p not in got]
    extra = [p for p in got if p not in want]
    if missing or extra:
      lacks = f"it lacks the leaves {', '.join(missing[:4]) or '(none)'}"
      detail = f"{lacks} and has {', '.join(extra[:4]) or 'none'} that the params do not"
    else:
      detail = (
        f"its structure {jax.tree.structure(tree)} differs from the params' "
        f"{jax.tree.structure(params)}"
      )
    raise ValueError(f"{must}: {detail}.")
  for path, leaf in got.items():
    if np.shape(leaf) != np.shape(want[path]):
      raise ValueError(
        f"{must}: its leaf at {path} has "
        f"shape {np.shape(leaf)}, the params' leaf there has shape {np.shape(want[path])}."
      )


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
