"""benchmarks/time_to_accuracy.py: its --quick run end to end, its chunks and its bookkeeping."""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("sklearn")  # the digits CNN task

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import adahessian_jax  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import time_to_accuracy as tta  # noqa: E402
from tasks import Task  # noqa: E402  (benchmarks/paper, put on the path by time_to_accuracy)
from training import make_step  # noqa: E402


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  """The --quick run of the three tasks, in two parallel lanes of one command per task.

  Lane 1: the LM. Lane 2: the CNN, then the DLRM into the same directory, which checks that a
  one-task command keeps the other tasks' entries of the results file.
  """
  root = tmp_path_factory.mktemp("tta")
  env = dict(os.environ, PYTHONUNBUFFERED="1")  # with conftest's fast-compile XLA_FLAGS
  script = os.path.join(ROOT, "benchmarks", "time_to_accuracy.py")
  lanes = {"lane1": ["lm"], "lane2": ["cnn", "dlrm"]}

  def run_lane(lane):
    out, logs = root / lane, []
    for name in lanes[lane]:
      cmd = [sys.executable, script, "--quick", "--tasks", name]
      cmd += ["--out", str(out), "--figures", str(out)]
      p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
      assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
      logs.append(p.stdout)
    with open(out / "time_to_accuracy.json") as f:
      return out, json.load(f), "".join(logs)

  with concurrent.futures.ThreadPoolExecutor(len(lanes)) as pool:
    results = dict(zip(lanes, pool.map(run_lane, lanes), strict=True))
  assert list(results["lane1"][1]["tasks"]) == ["lm"]
  assert list(results["lane2"][1]["tasks"]) == ["cnn", "dlrm"]  # merged, in the fixed order
  tasks = {**results["lane1"][1]["tasks"], **results["lane2"][1]["tasks"]}
  data = {**results["lane2"][1], "tasks": {n: tasks[n] for n in tta.TASK_NAMES}}
  dirs = {n: results[lane][0] for lane in lanes for n in lanes[lane]}
  return dirs, data, results["lane1"][2] + results["lane2"][2]


def test_quick_json_structure(quick):
  dirs, data, log = quick
  assert data["experiment"] == "time_to_accuracy" and data["quick"] is True
  assert list(data["tasks"]) == list(tta.TASK_NAMES)
  assert "interleaved" in data["method"] and "not timed" in data["method"]
  for name, entry in data["tasks"].items():
    setup = tta.QUICK_SETUP[name]
    assert entry["targets"] == list(setup["targets"])
    assert entry["steps"] == setup["steps"] and entry["chunk_steps"] == setup["chunk"]
    assert entry["seeds"] == [0]
    for when in ("load_before", "load_after"):
      assert len(entry[when]["loadavg"]) == 3
      assert all(math.isfinite(x) and x >= 0 for x in entry[when]["loadavg"])
      assert f"[{name}] load {when.split('_')[1]}" in log
    others = entry["other_processes_cores"]
    assert others is None or (math.isfinite(others) and others >= 0)
    assert f"[{name}] 1-min load" in log  # the idle verdict
    keys = [key for key, _, _ in tta.optimizers_for(name)]
    assert list(entry["optimizers"]) == keys
    assert ("adamw" in keys) == (name == "lm")
    for key, opt in entry["optimizers"].items():
      assert opt["lr"] > 0 and opt["update_freq"] == (int(key[-1]) if "_k" in key else 1)
      assert len(opt["runs"]) == 1
      for t in entry["targets"]:
        assert opt["targets"][tta.target_key(t)]["runs"] == 1
    # The figure of every task, and its row of the table.
    if importlib.util.find_spec("matplotlib") is not None:  # the figure is skipped without it
      assert (dirs[name] / f"time_to_accuracy_{name}.png").stat().st_size > 0
    assert f"| {name}: ms per step |" in tta.table({name: entry})


def test_quick_curves_monotone_finite_and_targets_consistent(quick):
  _, data, _ = quick
  reached = 0
  for entry in data["tasks"].values():
    sign = 1.0 if entry["higher_is_better"] else -1.0
    chunk, steps = entry["chunk_steps"], entry["steps"]
    for opt in entry["optimizers"].values():
      for run in opt["runs"]:
        s = np.array(run["seconds"], float)
        m = np.array([np.nan if v is None else v for v in run["metric"]], float)
        assert run["steps"] == list(range(0, steps + 1, chunk))  # quick runs use every step
        assert run["stopped"] == "steps" and not run["diverged"]
        assert s[0] == 0 and np.all(np.diff(s) > 0) and np.all(np.isfinite(s))
        assert len(m) == len(s) and np.all(np.isfinite(m))
        assert np.all(np.isfinite(run["val_loss"])) and len(run["train_loss"]) == len(s)
        for t in entry["targets"]:
          key = tta.target_key(t)
          hit = np.flatnonzero(sign * m >= sign * t)  # NumPy: every evaluation meeting it
          got_s, got_step = run["seconds_to_target"][key], run["steps_to_target"][key]
          if hit.size:
            reached += 1
            assert got_s == pytest.approx(s[hit[0]], abs=1e-6)
            assert got_step == run["steps"][hit[0]]
          else:
            assert got_s == got_step == tta.NOT_REACHED
          summary = opt["targets"][key]
          assert summary["reached"] == int(hit.size > 0)
          assert summary["median_s"] == got_s or summary["median_s"] == pytest.approx(got_s)
  assert reached > 0  # the quick mode's first targets are easy: some run reaches one


def test_seconds_to_target_and_median():
  secs, metric = [0.0, 1.0, 2.5, 4.0], [0.1, 0.5, None, 0.9]
  assert tta.seconds_to_target(secs, metric, 0.5, True) == (1.0, 1)
  assert tta.seconds_to_target(secs, metric, 0.6, True) == (4.0, 3)  # None never meets it
  assert tta.seconds_to_target(secs, metric, 0.95, True) == (tta.NOT_REACHED, None)
  assert tta.seconds_to_target(secs, [3.0, 2.0, float("nan"), 1.0], 1.5, False) == (4.0, 3)
  nr = tta.NOT_REACHED
  assert tta.median_time([4.0, 1.0, 2.0, 3.0]) == 2.5
  assert tta.median_time([4.0, 1.0, nr, 3.0]) == 3.5  # (3 + 4) / 2: one seed missed
  assert tta.median_time([4.0, nr, nr, 3.0]) == nr  # half of the seeds missed
  assert tta.median_time([nr, 2.0, 1.0]) == 2.0
  assert tta.median_time([]) == nr


def _toy_task() -> Task:
  """Logistic regression on 64 fixed points: a model whose chunks compile in a blink."""
  x = jax.random.normal(jax.random.key(1), (64, 5))
  y = (x @ jnp.arange(1.0, 6.0) > 0).astype(jnp.float32)

  def loss(params, batch):
    xb, yb = batch
    logits = jnp.tanh(xb @ params["w"]) @ params["v"] + params["b"]
    return optax.sigmoid_binary_cross_entropy(logits, yb).mean()

  def sample(data, key):
    idx = jax.random.randint(key, (16,), 0, data[0].shape[0])
    return data[0][idx], data[1][idx]

  def init(key):
    k1, k2 = jax.random.split(key)
    return {
      "w": jax.random.normal(k1, (5, 4)),
      "v": jax.random.normal(k2, (4,)),
      "b": jnp.zeros(()),
    }

  evaluate = lambda params, data: {"loss": loss(params, data)}
  return Task("toy", init, loss, sample, evaluate, (x, y), lambda b: None, "loss", False, {})


@pytest.mark.parametrize("k", [2, 4])
def test_host_refresh_chunk_equals_the_scheduled_route(k):
  """The chunk's period (one refresh=True step, k-1 refresh=False steps, no conditional) gives
  the trajectory of the library's single-program schedule (refresh read from the state)."""
  task = _toy_task()
  tx = adahessian_jax.adahessian(0.1, update_freq=k, seed=3)
  params = task.init(jax.random.key(0))
  keys = jax.random.split(jax.random.key(2), 3 * k)
  step = make_step(tx, task.loss, "fused")  # refresh=None: the schedule, under lax.cond

  def scheduled(params, opt_state, keys, data):
    def body(carry, key):
      params, opt_state, loss = step(*carry, task.sample(data, key))
      return (params, opt_state), loss

    (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), keys)
    return params, opt_state, losses

  chunk = tta.make_chunk(task, tx, True, k)
  args = (params, tx.init(params), keys, task.data)
  assert "cond[" in str(jax.make_jaxpr(scheduled)(*args))
  assert "cond[" not in str(jax.make_jaxpr(chunk)(*args))  # the refresh is decided on the host
  want = jax.jit(scheduled)(*args)
  got = jax.jit(chunk)(*args)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match="not a multiple of k"):
    chunk(params, tx.init(params), keys[:-1], task.data)
