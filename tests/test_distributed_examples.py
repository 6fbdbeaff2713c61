"""The README's multi-device examples run (each sets its own forced host device count)."""

import os
import pathlib
import re
import subprocess
import sys

import pytest
from conftest import with_fast_compile

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("name", ["pmap", "jit", "shard_map", "multihost"])
def test_distributed_example_runs_and_replicas_agree(name):
  proc = subprocess.run(
    [sys.executable, str(EXAMPLES / f"distributed_{name}.py")],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "LayoutGuessWarning" not in proc.stderr  # its model's averaging is no guess
  out = proc.stdout
  if name == "multihost":
    # Both processes print the same final loss and parameter checksum.
    finals = re.findall(r"process \d: (loss [\d.]+, sum\(w1\) [-\d.]+)", out)
    assert len(finals) == 2 and finals[0] == finals[1], out
  else:
    # Forced devices: the test process's XLA_FLAGS (compile options) must not leave it at one.
    assert re.findall(r"(?:between the|on) (\d+) (?:replicas|devices)", out) == ["4"], out
    diffs = [float(d) for d in re.findall(r"max \|difference\|[^:]*: ([-\d.e+]+)", out)]
    # float32: the layouts may fuse and reduce in different orders (seen: 2.4e-7 in one of them).
    assert diffs and max(diffs) <= 1e-6, out


@pytest.mark.parametrize("name", ["jit", "shard_map"])
def test_distributed_example_runs_on_a_device_count_set_in_xla_flags(name):
  # The examples keep a device count XLA_FLAGS sets; 3 divided neither their 256-row batch
  # (IndivisibleError) nor, for FSDP, the 32 hidden units.
  flags = with_fast_compile("--xla_force_host_platform_device_count=3")
  proc = subprocess.run(
    [sys.executable, str(EXAMPLES / f"distributed_{name}.py")],
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ, XLA_FLAGS=flags),
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert re.findall(r"(?:between the|on) (\d+) (?:replicas|devices)", proc.stdout) == ["3"]
