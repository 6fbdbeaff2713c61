"""Argument types of the examples' and benchmarks' command lines (``argparse`` ``type=``).

A bad value becomes argparse's usage error naming the flag (``argument --steps: must be a
positive integer, got '0'``) before anything runs. Standard library only:
``benchmarks/allocator.py`` parses its arguments before it sets up malloc and imports JAX.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
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


def out_dir(text: str) -> str:
  """An output directory: one that exists, or a path where one can be made (not a file)."""
  if os.path.exists(text) and not os.path.isdir(text):
    raise argparse.ArgumentTypeError(f"is a file, not a directory: {text!r}")
  return text


def out_file(text: str) -> str:
  """An output file: not a directory, and not under a file."""
  if os.path.isdir(text):
    raise argparse.ArgumentTypeError(f"is a directory, not a file: {text!r}")
  parent = os.path.dirname(os.path.abspath(text))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise argparse.ArgumentTypeError(f"{parent!r} is a file, not a directory: {text!r}")
  return text


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


def no_options(description: str | None, argv: Sequence[str] | None = None) -> None:
  """The command line of a script without options: ``--help`` prints ``description``, and any
  argument is a usage error (rather than ignored while the script runs).
  """
  p = argparse.ArgumentParser(
    description=description, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.parse_args(argv)


def parse_with_quick(
  p: argparse.ArgumentParser, quick: Mapping[str, Any], argv: Sequence[str] | None = None
) -> argparse.Namespace:
  """Parses a command line whose ``--quick`` changes the defaults of other flags.

  ``--quick`` changes only the defaults: a flag given explicitly keeps its value (``--quick
  --width 48`` is the quick setting with width 48), where a quick run used to overwrite it
  silently. Each flag's help gets its quick default.

  Args:
    p: The parser; it has a ``--quick`` flag.
    quick: The quick defaults by ``dest`` (e.g. ``{"width": 32}``).
    argv: The arguments (default ``sys.argv[1:]``).

  Returns:
    The parsed arguments.
  """
  actions = {a.dest: a for a in p._actions}
  for dest, value in quick.items():
    action = actions[dest]  # a KeyError here is a typo in the script
    shown = _shown(value)
    if action.help is None:
      action.help = f"default {_shown(action.default)}; --quick: {shown}"
    elif action.help.endswith(")"):  # "... (default 3)" -> "... (default 3; --quick: 1)"
      action.help = f"{action.help[:-1]}; --quick: {shown})"
    elif action.help is not argparse.SUPPRESS:
      action.help = f"{action.help} (--quick: {shown})"
  args = p.parse_args(argv)
  if args.quick:
    p.set_defaults(**quick)  # parsed again: the values given on the command line win
    args = p.parse_args(argv)
  return args


def _shown(value: Any) -> str:
  return ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
