"""The paper-claim experiments (benchmarks/paper/) run end to end in their --quick modes."""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("flax")
pytest.importorskip("sklearn")  # the digits CNN task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = os.path.join(ROOT, "benchmarks", "paper")
EXPERIMENTS = {
  "lr_robustness": ("scales", "tuning", "results", "table_markdown", "paper", "environment"),
  "block_size": ("blocks", "tuning", "results", "adamw_reference", "table_markdown", "paper"),
  "hessian_frequency": ("freqs", "tuning", "results", "references", "table_markdown", "paper"),
  "headline": ("seeds", "tuning", "results", "tasks", "table_markdown", "paper"),
}

# The headline's quick run also trains AdaHessian (the LM) with extra adahessian() arguments, the
# Hessian-frequency run with two more configurations (one row each).
CONFIG = {"curvature_floor": 0.1}
SMALL_STATE = {"lazy_moment": "refresh"}
EXTRA_ARGS = {
  "headline": ["--adahessian-config", json.dumps(CONFIG)],
  "hessian_frequency": [
    *("--adahessian-config", json.dumps(CONFIG)),
    *("--adahessian-config", json.dumps(SMALL_STATE)),
  ],
}


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
  """Runs every experiment's quick mode, in two parallel lanes.

  Within a lane the second command reuses the first one's compiled programs (persistent XLA
  cache): the LM lane (LR robustness, then block size) and the CNN lane (Hessian frequency, then
  the headline comparison).
  """
  out = tmp_path_factory.mktemp("paper")
  env = dict(os.environ, PYTHONUNBUFFERED="1")  # with conftest's fast-compile XLA_FLAGS
  lanes = (("lr_robustness", "block_size"), ("hessian_frequency", "headline"))

  def start(name):
    d = out / name
    d.mkdir()
    cmd = [sys.executable, os.path.join(PAPER, f"{name}.py"), "--quick", "--out", str(d)]
    cmd += EXTRA_ARGS.get(name, [])
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                         text=True)  # fmt: skip
    return d, p

  def run_lane(lane):
    for name in lane:
      d, p = start(name)
      log, _ = p.communicate(timeout=600)
      results[name] = (d, p.returncode, log)

  results = {}
  with concurrent.futures.ThreadPoolExecutor(len(lanes)) as pool:
    list(pool.map(run_lane, lanes))
  return results


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_quick_mode(quick_runs, name):
  d, rc, log = quick_runs[name]
  assert rc == 0, log[-3000:]
  with open(d / f"{name}.json") as f:
    data = json.load(f)
  assert data["experiment"] == name
  assert data["quick"] is True
  for key in EXPERIMENTS[name]:
    assert key in data, key
  assert "|" in data["table_markdown"]
  # It says where it wrote (--quick's directory is a temporary one unless --out names it).
  assert f"wrote {d / f'{name}.json'}\n" in log
  assert f"wrote {d / f'{name}.png'}\n" in log
  if name == "hessian_frequency":
    rows = data["results"]["cnn"]
    assert list(rows) == ["adahessian", "adahessian_config", "adahessian_config2"]
    configs = {"adahessian_config": CONFIG, "adahessian_config2": SMALL_STATE}
    assert data["adahessian_configs"] == configs
    for key, config in (("adahessian", {}), ("adahessian_config2", SMALL_STATE)):
      assert all(r["config"] == config for row in rows[key] for r in row["runs"])
    for row in (r for key_rows in rows.values() for r in key_rows):
      assert row["cost_x_sgd"] > 0 and row["cost_x_adam"] > 0
      assert row["update_freq"] > 1  # the refresh schedule, which the lazy moment acts on
  try:
    import matplotlib  # noqa: F401
  except ImportError:
    return
  assert (d / f"{name}.png").exists()


def test_adahessian_config_reaches_the_optimizer(quick_runs):
  d, rc, log = quick_runs["headline"]
  assert rc == 0, log[-3000:]
  with open(d / "headline.json") as f:
    data = json.load(f)
  assert data["adahessian_configs"] == {"adahessian_config": CONFIG}
  lm = data["results"]["lm"]
  exact, configured = lm["adahessian"], lm["adahessian_config"]
  assert exact["lr"] == configured["lr"]  # the exact rule's tuned rate
  assert all(r["config"] == {} for r in exact["runs"])
  assert all(r["config"] == CONFIG for r in configured["runs"])
  # Same seeds, data and probes: only the floor differs, and it changes the trajectory.
  assert [r["seed"] for r in exact["runs"]] == [r["seed"] for r in configured["runs"]]
  assert all(
    a["final_train_loss"] != b["final_train_loss"]
    for a, b in zip(exact["runs"], configured["runs"], strict=True)
  )
  assert "curvature_floor=0.1" in data["table_markdown"]
