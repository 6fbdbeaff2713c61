"""Orbax checkpoints: resuming in a fresh process continues bit-identically."""

import pathlib
import subprocess
import sys

import numpy as np

WORKER = pathlib.Path(__file__).with_name("_checkpoint_worker.py")


def _run(*args):
  proc = subprocess.run(
    [sys.executable, str(WORKER), *map(str, args)],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]


def test_resume_from_orbax_checkpoint_is_bit_identical(tmp_path):
  steps = 7  # odd, so the checkpoint falls between two lazy Hessian refreshes (k=3)
  ckpt = tmp_path / "ckpt"
  _run("straight", steps, ckpt, tmp_path / "straight.npz")
  _run("first", steps, ckpt, "-")
  _run("resume", steps, ckpt, tmp_path / "resumed.npz")
  a, b = np.load(tmp_path / "straight.npz"), np.load(tmp_path / "resumed.npz")
  assert len(a.files) == len(b.files) > 5
  for name in a.files:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)
  # The key and the lazy Hessian are in the checkpoint, and training moved the
  # parameters (b1 starts at zero), so the comparison is not vacuous.
  assert any("key" in name for name in a.files) and any("hessian" in name for name in a.files)
  assert np.abs(a["['params']['b1']"]).max() > 1e-3
