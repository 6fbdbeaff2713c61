"""Argument types of the examples' and benchmarks' command lines (``argparse`` ``type=``).

A bad value becomes argparse's usage error naming the flag (``argument --steps: must be a
positive integer, got '0'``) before anything runs. Standard library only:
``benchmarks/allocator.py`` parses its arguments before it sets up malloc and imports JAX.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from typing import Any


def _number(text: str, kind: type, lowest: float, strict: bool) -> Any:
  what = f"{'a positive' if strict else 'a non-negative'} {'integer' if kind is int else 'number'}"
  try:
    value = kind(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
  if not math.isfinite(value) or value < lowest or (strict and value == lowest):
    raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
  return value


def positive_int(text: str) -> int:
  """An integer > 0."""
  return _number(text, int, 0, strict=True)


def nonnegative_int(text: str) -> int:
  """An integer >= 0."""
  return _number(text, int, 0, strict=False)


def positive_float(text: str) -> float:
  """A finite number > 0."""
  return _number(text, float, 0.0, strict=True)


def nonnegative_float(text: str) -> float:
  """A finite number >= 0."""
  return _number(text, float, 0.0, strict=False)


def json_object(text: str) -> dict[str, Any]:
  """A JSON object (keyword arguments), e.g. ``'{"curvature_floor": 0.1}'``."""
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise argparse.ArgumentTypeError(f"not JSON: {text!r} ({e})") from None
  if not isinstance(value, dict):
    raise argparse.ArgumentTypeError(f"expected a JSON object of keyword arguments, got {text!r}")
  return value


def comma_list(
  item: Callable[[str], Any] | Sequence[str],
) -> Callable[[str], list[Any]]:
  """A type for a non-empty comma-separated list.

  Args:
    item: The names allowed (a sequence of strings), or the type of each item (e.g.
      :func:`positive_int`).

  Returns:
    The ``type=`` function: text -> the list of items.
  """

  def parse(text: str) -> list[Any]:
    parts = [t.strip() for t in text.split(",") if t.strip()]
    if not parts:
      raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    if callable(item):
      return [item(t) for t in parts]
    unknown = [t for t in parts if t not in item]
    if unknown:
      raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {', '.join(item)}")
    return parts

  return parse
