"""Smoke test of examples/curvature_tracking.py in its ``--quick`` setting (a subprocess)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_curvature_tracking_quick(tmp_path):
  env = dict(os.environ)
  env.pop("JAX_ENABLE_X64", None)
  script = os.path.join(ROOT, "examples", "curvature_tracking.py")
  proc = subprocess.run(
    [sys.executable, script, "--quick", "--compare-cold", "--out", str(tmp_path)],
    capture_output=True,
    text=True,
    env=env,
    cwd=str(tmp_path),
    timeout=600,
  )
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
  assert "LayoutGuessWarning" not in proc.stderr  # its model's averaging is no guess
  for png in ("curvature_tracking.png", "curvature_landscapes.png"):
    assert (tmp_path / png).stat().st_size > 10_000
  with open(tmp_path / "curvature_tracking.json") as f:
    runs = json.load(f)["runs"]
  assert {r["name"] for r in runs} == {"AdaHessian", "Adam"}
  for r in runs:
    assert "diverged_at" not in r
    assert r["measured"] == [1, 4, 8]
    sharp, pre = np.asarray(r["sharpness"]), np.asarray(r["preconditioned"])
    assert np.all(sharp > 0) and np.all(pre > 0)
    # Every measurement costs products; a warm start can't cost more than the step limit.
    assert all(1 <= m <= 400 for m in r["warm_matvecs"])
    assert len(r["cold_matvecs"]) == len(r["measured"])
  assert "AdaHessian 1x" in proc.stdout and "warm starts" in proc.stdout
