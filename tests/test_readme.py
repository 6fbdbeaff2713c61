"""The README's code runs (so the documentation cannot rot), and CI runs its test command."""

import pathlib
import re

from _markdown import bash_blocks, python_blocks, run_python_blocks

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_python_blocks_run_in_order():
  assert len(python_blocks(README)) >= 5
  namespace = run_python_blocks(README, "README.md", {"__name__": "readme"})
  # The first block trains; its own assertion checked the loss fell 5x.
  assert namespace["losses"][-1] < namespace["losses"][0]


def test_quickstart_has_two_commands_and_ci_runs_the_test_one():
  quick = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
  commands = [line for b in bash_blocks(quick) for line in b.strip().splitlines()]
  assert len(commands) == 2
  assert "examples/cv_digits.py --quick" in commands[0]
  ci = (ROOT / ".ci" / "run").read_text()
  assert commands[1] in ci


def test_quoted_length_of_quickstart_script_is_its_length():
  quoted = re.search(r"`examples/quickstart\.py` is the smallest .*?\((\d+) lines\)", README, re.S)
  assert quoted, "the README no longer quotes the quickstart script's length"
  lines = (ROOT / "examples" / "quickstart.py").read_text().splitlines()
  assert int(quoted.group(1)) == len(lines), (quoted.group(1), len(lines))
