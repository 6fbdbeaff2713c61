"""The benchmarks' allocator setting (``examples/_common.keep_freed_memory``).

XLA:CPU allocates a call's temporaries afresh; glibc maps a block over 32 MiB from the kernel at
every call unless told to keep freed blocks, and each 4 KiB of it then costs a page fault. The
benchmarks' timings rely on the setting removing those faults; page faults are counted exactly
(``getrusage``), so this is not a timing test. Each case runs in its own process, because the
setting lasts for the process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, resource, sys
sys.path.insert(0, sys.argv[1])
from _common import keep_freed_memory
allocator = keep_freed_memory() if sys.argv[2] == "keep" else "default"
import jax, jax.numpy as jnp

def f(x):  # the cumulative sums keep 16 MiB intermediates apart: one 50 MiB temporary block
  return jnp.sum(jnp.cumsum(jnp.sin(x), axis=0) * jnp.cumsum(jnp.cos(x), axis=1))

x = jnp.ones((2048, 2048), jnp.float32)
compiled = jax.jit(f).lower(x).compile()
temp = compiled.memory_analysis().temp_size_in_bytes
faults = []
for _ in range(12):  # the heap may still grow over the first calls (new pages fault once)
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  compiled(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
faults = min(faults[4:])  # the steady state: a call that needed no new pages
print(json.dumps({"allocator": allocator, "temp": temp, "faults_per_call": faults}))
"""


def _faults(mode: str) -> dict:
  # XLA's default compile options, not the tests' fast-compile ones: this program computes more
  # than it compiles (compiled at optimisation level 0 it runs 3x slower).
  env = dict(os.environ, XLA_FLAGS="")
  proc = subprocess.run(
    [sys.executable, "-c", SCRIPT, str(ROOT / "examples"), mode],
    capture_output=True,
    text=True,
    timeout=300,
    env=env,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_keeping_freed_memory_removes_the_page_faults_of_large_temporaries():
  keep = _faults("keep")
  if not keep["allocator"].startswith("glibc"):
    pytest.skip(f"not glibc: {keep['allocator']}")  # the setting is glibc's mallopt
  temp_pages = keep["temp"] / 4096
  # Over glibc's largest mmap threshold (32 MiB), under a thread arena's largest heap (64 MiB;
  # a larger block is mapped regardless, see keep_freed_memory's docstring).
  assert 40 * 2**20 < keep["temp"] < 60 * 2**20, keep
  default = _faults("default")
  # By default even the cheapest call faults in (most of) its temporaries afresh ...
  assert default["faults_per_call"] > 0.5 * temp_pages, default
  # ... and with the setting the freed blocks are reused.
  assert keep["faults_per_call"] < 0.05 * temp_pages, keep


def test_allocator_benchmark_quick_mode_runs():
  proc = subprocess.run(
    [sys.executable, str(ROOT / "benchmarks" / "allocator.py"), "--quick"],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=ROOT,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  lines = [ln for ln in proc.stdout.splitlines() if "ratio" in ln]
  assert [ln.split()[0] for ln in lines] == [
    "default",
    "keep",
    "single-arena",
    "calling-thread",
  ], proc.stdout
