"""The README's code runs (so the documentation cannot rot), and CI runs its test command."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def python_blocks(text):
  return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def bash_blocks(text):
  return re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_python_blocks_run_in_order():
  blocks = python_blocks(README)
  assert len(blocks) >= 5
  namespace = {"__name__": "readme"}
  for i, block in enumerate(blocks):
    try:
      exec(compile(block, f"README.md python block {i}", "exec"), namespace)
    except Exception as e:  # pragma: no cover - the message is the point
      pytest.fail(f"README python block {i} failed: {e!r}\n{block}")
  # The first block trains; its own assertion checked the loss fell 5x.
  assert namespace["losses"][-1] < namespace["losses"][0]


def test_quickstart_has_two_commands_and_ci_runs_the_test_one():
  quick = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
  commands = [line for b in bash_blocks(quick) for line in b.strip().splitlines()]
  assert len(commands) == 2
  assert "examples/cv_digits.py --quick" in commands[0]
  ci = (ROOT / ".ci" / "run").read_text()
  assert commands[1] in ci
