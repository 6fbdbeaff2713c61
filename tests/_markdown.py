"""The code blocks of Markdown files, for the tests that run the documentation.

A block fenced as ```` ```python ```` runs. A block that cannot run in a test (it needs several
processes, a coordinator, minutes of compute) is fenced as ```` ```python no-run: REASON ````;
the reason is required, so no block is left out without saying why.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import pytest

_FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<code>.*?)^```[ \t]*$", flags=re.S | re.M)
_NO_RUN = re.compile(r"^no-run(?::\s*(?P<reason>.*))?$")


class Block(NamedTuple):
  """A fenced code block: its language, the rest of its info string, code and first line."""

  language: str
  info: str
  code: str
  line: int


def blocks(text: str) -> list[Block]:
  """Every fenced code block of ``text``, in order."""
  found = []
  for m in _FENCE.finditer(text):
    language, _, info = m["info"].strip().partition(" ")
    found.append(Block(language, info.strip(), m["code"], text.count("\n", 0, m.start()) + 1))
  return found


def no_run_reason(block: Block) -> str | None:
  """The stated reason of a ``no-run`` block, ``None`` for a block that runs.

  Raises:
    ValueError: for a ``no-run`` mark without a reason, or an info string that is not one.
  """
  if not block.info:
    return None
  m = _NO_RUN.match(block.info)
  if m is None:
    raise ValueError(
      f"line {block.line}: unknown info string {block.info!r} after ```{block.language}; "
      "the only one is 'no-run: REASON'."
    )
  if not (m["reason"] or "").strip():
    raise ValueError(f"line {block.line}: 'no-run' needs a reason: ```python no-run: REASON")
  return m["reason"].strip()


def python_blocks(text: str) -> list[str]:
  """The code of the Python blocks of ``text`` that run, in order."""
  return [b.code for b in blocks(text) if b.language == "python" and no_run_reason(b) is None]


def bash_blocks(text: str) -> list[str]:
  """The code of the bash blocks of ``text``, in order."""
  return [b.code for b in blocks(text) if b.language == "bash"]


def run_python_blocks(text: str, where: str, namespace: dict | None = None) -> dict:
  """Runs the Python blocks of ``text`` in order in one namespace and returns it.

  A failing block fails the calling test with its name (``where`` and the block's first line),
  the error and the block's code.
  """
  namespace = {"__name__": "__docs__"} if namespace is None else namespace
  for block in blocks(text):
    if block.language != "python" or no_run_reason(block) is not None:
      continue
    name = f"{where}:{block.line}"
    try:
      exec(compile(block.code, name, "exec"), namespace)
    except Exception as e:  # pragma: no cover - the message is the point
      pytest.fail(f"the python block at {name} failed: {e!r}\n{block.code}")
  return namespace
