"""The pods-style transformer example (``examples/pods_transformer.py``) in its ``--quick`` setting.

One subprocess (8 forced CPU devices, which must be set before JAX starts) trains the scanned,
rematerialised, FSDP-sharded bfloat16 transformer with AdaHessian and AdamW, and first runs the
example's layout check in float64: 20 AdaHessian steps of the stacked model sharded over the 8
devices against the same model with its blocks as separate modules on one device, the
reference drawing the same probe through ``adahessian_jax.hvp``. Float64, because in float32 the
two layouts round differently and AdaHessian divides by near-zero curvature estimates, which
turns rounding into ~1e-3 relative parameter differences after 20 steps (the example's default
float32 check prints them); in float64 any real difference (a probe drawn differently, a rule
averaging across layers) stands out by ten orders of magnitude.
"""

import json
import os
import subprocess
import sys

import pytest
from conftest import with_fast_compile

pytest.importorskip("flax")
pytest.importorskip("matplotlib")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("pods")
  env = dict(os.environ)
  env["XLA_FLAGS"] = with_fast_compile("--xla_force_host_platform_device_count=8")
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("JAX_ENABLE_X64", None)
  cmd = [
    sys.executable,
    os.path.join(ROOT, "examples", "pods_transformer.py"),
    "--quick",
    "--no-progress",
    "--check-dtype",
    "float64",
    "--out",
    str(out),
  ]
  proc = subprocess.run(
    cmd, capture_output=True, text=True, env=env, cwd=str(out), timeout=600, check=False
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "LayoutGuessWarning" not in proc.stderr  # its model's averaging is no guess
  with open(out / "pods_transformer.json") as f:
    summary = json.load(f)
  return out, proc.stdout, summary


def test_stacked_sharded_equals_unstacked_single_device(quick_run):
  _, stdout, summary = quick_run
  check = summary["layout_check"]
  assert check["steps"] == 20 and check["dtype"] == "float64"
  assert summary["devices"] == 8
  # Measured: 1.2e-15 (losses), 8.5e-14 (parameters).
  assert check["max_rel_loss_diff"] < 1e-11, check
  assert check["max_rel_param_diff"] < 1e-10, check
  # ... while every parameter leaf moved: the comparison is not between two untrained models.
  assert check["min_param_change"] > 1e-3, check
  assert "layout check (20 AdaHessian steps, float64 compute)" in stdout


def test_both_optimizers_train_and_state_is_sharded_like_params(quick_run):
  out, stdout, summary = quick_run
  runs = summary["optimizers"]
  assert set(runs) == {"AdaHessian", "AdamW"}
  for name, r in runs.items():
    assert not r["diverged"], name
    val = r["curves"]["val_loss"]
    assert val[-1] < val[0] - 1.0, (name, val)
  mem = summary["per_device_bytes"]
  n_param_bytes = 4 * summary["parameters"]
  # FSDP: one device holds a fraction of the float32 parameters ...
  assert mem["params"] < 0.5 * n_param_bytes, mem
  # ... and of the moments, exactly two of its parameter shards (+ count and PRNG key).
  for name in ("AdaHessian", "AdamW"):
    assert 0 <= mem[f"{name} state"] - 2 * mem["params"] <= 16, mem
  assert summary["step_time_ratio"] > 0
  assert (out / "pods_transformer.png").stat().st_size > 10_000
  assert "step time AdaHessian / AdamW" in stdout
