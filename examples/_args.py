"""Argument types of the examples' and benchmarks' command lines (``argparse`` ``type=``), and
:func:`write_json` for the result files that ``--out`` names.

A bad value becomes argparse's usage error naming the flag (``argument --steps: must be a
positive integer, got '0'``) before anything runs. Standard library only:
``benchmarks/allocator.py`` parses its arguments before it sets up malloc and imports JAX.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
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


def random_seed(text: str) -> int:
  """A seed: an integer in ``[0, 2**32 - 1]``, the range that NumPy's and scikit-learn's
  ``random_state`` and ``jax.random.key`` all take."""
  value = _number(text, int, 0, strict=False)
  if value > 2**32 - 1:
    raise argparse.ArgumentTypeError(f"must be an integer in [0, {2**32 - 1}], got {text!r}")
  return value


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
  """An output directory: one that exists, or a path where one can be made (not a file, and not
  under a file), in a directory where files can be written."""
  if os.path.exists(text) and not os.path.isdir(text):
    raise argparse.ArgumentTypeError(f"is a file, not a directory: {text!r}")
  _check_parent(text, directory=True)
  return text


def out_file(text: str) -> str:
  """An output file: not a directory, and not under a file, in a directory where files can be
  written."""
  if os.path.isdir(text):
    raise argparse.ArgumentTypeError(f"is a directory, not a file: {text!r}")
  _check_parent(text, directory=False)
  return text


def write_json(path: str | os.PathLike, payload: Any) -> str:
  """Writes ``payload`` to ``path`` as indented JSON (a newline at the end), making the
  directory it is in; returns the path as a string. The examples' and ``benchmarks/*.py``'s
  result files (the paper and stability benchmarks keep their own, atomic, writers)."""
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(payload, f, indent=1)
    f.write("\n")
  return path


def _check_parent(text: str, directory: bool) -> None:
  """Refuses a path whose closest existing ancestor (the directory ``text`` itself if it exists
  and ``directory``) is a file, or a directory in which nothing can be written: ``os.makedirs``
  or the write would fail when the results are saved, after the run."""
  path = os.path.abspath(text)
  parent = path if directory and os.path.isdir(path) else os.path.dirname(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise argparse.ArgumentTypeError(f"{parent!r} is a file, not a directory: {text!r}")
  try:  # os.access would let root pass a read-only mount; a file made and removed tells
    with tempfile.TemporaryFile(dir=parent):
      pass
  except OSError as e:
    raise argparse.ArgumentTypeError(
      f"cannot write in {parent!r} ({e.strerror}): {text!r}"
    ) from None


def file_name(text: str) -> str:
  """A part of a file name (``--tag``, ``--name``): not empty, no directory in it (the script
  puts the file in its results directory)."""
  if not text or os.sep in text or (os.altsep and os.altsep in text) or text in (".", ".."):
    raise argparse.ArgumentTypeError(f"must be a file name without a directory, got {text!r}")
  return text


def comma_list(
  item: Callable[[str], Any] | Sequence[str], ignore_case: bool = False
) -> Callable[[str], list[Any]]:
  """A type for a non-empty comma-separated list (of names: each at most once).

  Args:
    item: The names allowed (a sequence of strings), or the type of each item (e.g.
      :func:`positive_int`).
    ignore_case: Match names case-insensitively (see :func:`one_of`).

  Returns:
    The ``type=`` function: text -> the list of items.
  """
  names = None if callable(item) else list(item)
  convert = item if callable(item) else one_of(item, ignore_case)

  def parse(text: str) -> list[Any]:
    parts = [t.strip() for t in text.split(",") if t.strip()]
    if not parts:
      of = "" if names is None else f" of {', '.join(names)}"
      raise argparse.ArgumentTypeError(f"expected a comma-separated list{of}, got {text!r}")
    if names is None:
      return [convert(t) for t in parts]
    found, unknown = [], []
    for t in parts:
      try:
        found.append(convert(t))
      except argparse.ArgumentTypeError:
        unknown.append(t)
    if unknown:
      raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {', '.join(names)}")
    repeated = sorted({n for n in found if found.count(n) > 1})
    if repeated:
      raise argparse.ArgumentTypeError(f"{', '.join(repeated)} given more than once in {text!r}")
    return found

  return parse


class Distinct(argparse.Action):
  """``action=`` of a list flag (``nargs="+"``) that refuses a value given twice (``--tasks cnn
  cnn`` would train the task twice), as :func:`comma_list` does."""

  def __call__(self, parser, namespace, values, option_string=None):
    values = list(values or ())  # nargs="+": a non-empty list
    repeated = [v for i, v in enumerate(values) if v in values[:i]]
    if repeated:
      shown = ", ".join(dict.fromkeys(map(str, repeated)))
      raise argparse.ArgumentError(self, f"{shown} given more than once")
    setattr(namespace, self.dest, values)


def one_of(names: Sequence[str], ignore_case: bool = False) -> Callable[[str], str]:
  """A type for one of ``names`` (an optimizer, a task, a model), checked when parsed.

  Args:
    names: The names allowed.
    ignore_case: Match case-insensitively; the name is returned as ``names`` spells it.

  Returns:
    The ``type=`` function: text -> the name.
  """
  spelled = {(n.lower() if ignore_case else n): n for n in names}

  def parse(text: str) -> str:
    name = spelled.get(text.strip().lower() if ignore_case else text.strip())
    if name is None:
      raise argparse.ArgumentTypeError(f"unknown {text!r}; choose from {', '.join(names)}")
    return name

  return parse


def name_value(
  names: Sequence[str], value: Callable[[str], Any], ignore_case: bool = False
) -> Callable[[str], tuple[str, Any]]:
  """A type for ``NAME=VALUE`` (e.g. ``--lr AdaHessian=0.1``), both parts checked when parsed.

  Args:
    names: The names allowed (see :func:`one_of`).
    value: The type of the value (e.g. :func:`positive_float`).
    ignore_case: Match the name case-insensitively.

  Returns:
    The ``type=`` function: text -> ``(name, value)``.
  """
  name_of = one_of(names, ignore_case)

  def parse(text: str) -> tuple[str, Any]:
    name, equals, rest = text.partition("=")
    if not equals:
      raise argparse.ArgumentTypeError(
        f"expected NAME=VALUE with NAME one of {', '.join(names)}, got {text!r}"
      )
    try:
      return name_of(name), value(rest)
    except argparse.ArgumentTypeError as e:
      raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None

  return parse


def no_options(
  description: str | None,
  argv: Sequence[str] | None = None,
  hidden: Callable[[argparse.ArgumentParser], Any] | None = None,
) -> argparse.Namespace:
  """The command line of a script without options: ``--help`` prints ``description``, and any
  argument is a usage error (rather than ignored while the script runs).

  Args:
    description: The help text.
    argv: The arguments (default ``sys.argv[1:]``).
    hidden: Adds the script's internal arguments (``help=argparse.SUPPRESS``), e.g. the one
      with which it starts copies of itself.

  Returns:
    The parsed arguments (only the hidden ones).
  """
  p = argparse.ArgumentParser(
    description=description, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  if hidden is not None:
    hidden(p)
  return p.parse_args(argv)


def check_heads(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """Refuses, as a usage error, ``--heads`` that does not divide ``--width`` (each attention head
  gets ``width / heads`` features), before the model is built."""
  if args.width % args.heads:
    p.error(
      f"argument --heads: must divide --width {args.width}, got {args.heads} (width / heads "
      "features per head)"
    )


def parse_with_quick(
  p: argparse.ArgumentParser, quick: Mapping[str, Any], argv: Sequence[str] | None = None
) -> argparse.Namespace:
  """Parses a command line whose ``--quick`` changes the defaults of other flags.

  ``--quick`` changes only the defaults: a flag given explicitly keeps its value (``--quick
  --width 48`` is the quick setting with width 48). Each flag's help gets its quick default, and
  its default where the help does not say it (``a divisor of --width (default 4; --quick: 2)``).

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
    if action.help is argparse.SUPPRESS:
      continue
    if action.help is None:
      action.help = f"default {_shown(action.default)}; --quick: {_shown(value)}"
      continue
    # A help that does not state the default gets it too (not a None default: the help says
    # what leaving the flag out means).
    shown = f"--quick: {_shown(value)}"
    if action.default is not None and "default" not in action.help:
      shown = f"default {_shown(action.default)}; {shown}"
    if action.help.endswith(")"):  # "... (default 3)" -> "... (default 3; --quick: 1)"
      action.help = f"{action.help[:-1]}; {shown})"
    else:
      action.help = f"{action.help} ({shown})"
  args = p.parse_args(argv)
  if args.quick:
    p.set_defaults(**quick)  # parsed again: the values given on the command line win
    args = p.parse_args(argv)
  return args


def _shown(value: Any) -> str:
  return ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
