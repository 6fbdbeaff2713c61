"""The command lines of the examples and benchmarks: where a quick run writes, bad flags."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = os.path.join(ROOT, "benchmarks", "paper")


@pytest.fixture(scope="module")
def paper_cli():
  sys.path.insert(0, PAPER)
  try:
    import cli
  finally:
    sys.path.remove(PAPER)
  return cli


def test_paper_quick_run_does_not_write_over_the_committed_results(paper_cli, tmp_path):
  args = paper_cli.parse_args("test", ["--quick"])
  for d in (args.out, args.figures):
    assert not os.path.abspath(d).startswith(os.path.join(PAPER, "")), d
  args = paper_cli.parse_args("test", ["--quick", "--out", str(tmp_path)])
  assert (args.out, args.figures) == (str(tmp_path), str(tmp_path))
