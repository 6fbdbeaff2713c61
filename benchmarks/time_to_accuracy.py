"""Time to accuracy: wall-clock seconds to a fixed validation target, compilation excluded.

For the three tasks of ``benchmarks/paper/`` (digits CNN, character LM, synthetic DLRM) this trains
SGD (momentum 0.9), Adam (AdamW on the LM) and AdaHessian with Hessian refresh interval
``k = 1, 2, 4``, each at its tuned learning rate (``benchmarks/paper/results/tuning.json``; k = 2
and 4 use the k = 1 rate, as the cache has no entry per k), 4 seeds each, and records the
validation metric against training seconds and the seconds to reach each of the task's targets.

Method (the clock sees training steps only):

* Each optimizer's training runs as a jit-compiled *chunk* of ``chunk`` steps (a ``lax.scan``
  over steps, parameters and state donated), compiled ahead of time once per optimizer and run
  once on a throw-away state (warm-up); compilation and warm-up are not timed.
* Every run (optimizer x seed) alternates: one chunk, ``jax.block_until_ready``, then an
  evaluation on the held-out data, which is not timed. The runs are interleaved round-robin, one
  chunk each in turn (the starting run rotating every round), in one process, so that slow drift
  of the machine affects every optimizer alike.
* AdaHessian runs with the README's recommended stabilizers (``--adahessian-config``; ``'{}'``
  for the paper's exact rule, whose lazy runs collapse on the CNN and the DLRM).
* AdaHessian with ``k > 1`` uses the fused route with the refresh decided on the host: one
  period of the chunk's scan is a step compiled with ``refresh=True`` followed by ``k - 1`` steps
  compiled with ``refresh=False`` (an inner scan), so no step contains a ``lax.cond``. Chunks are
  a multiple of 4 steps, so every chunk starts a period.
* glibc's malloc keeps freed large blocks for reuse (``--default-malloc`` to leave it as it
  is): otherwise every call of a program whose temporaries exceed 32 MiB is charged fresh,
  zeroed pages (``examples/_common.keep_freed_memory``).
* A run stops at its step budget (the steps of the tuned schedule, as in the headline runs),
  when its time budget is spent, or when the training loss or the metric becomes non-finite.
* Seconds to target: the cumulative training seconds at the first evaluation that meets the
  target (an upper bound, within one chunk); "not reached" otherwise. Medians over seeds count a
  run that did not reach the target as infinitely slow (so the median is "not reached" when
  half of the seeds or more did not reach it).
* ``uptime`` load averages are recorded (and printed) before and after each task: take timings
  only on an idle machine (load average < 1 before and after). The load average after a task
  includes this process's own work (up to ~1-2), so the CPU time other processes used during the
  timed loop is recorded too (``other_processes_cores``, from ``/proc/stat``; ~0 when idle).

Commands (one per task; each updates its task in the results JSON and writes its figure):

  python benchmarks/time_to_accuracy.py --tasks cnn
  python benchmarks/time_to_accuracy.py --tasks lm
  python benchmarks/time_to_accuracy.py --tasks dlrm
  python benchmarks/time_to_accuracy.py              # all three (a few minutes on 2 idle cores)
  python benchmarks/time_to_accuracy.py --quick      # tiny smoke run, seconds (CI)

Outputs: ``benchmarks/results/time_to_accuracy.json`` and
``benchmarks/figures/time_to_accuracy_<task>.png``; the figures go to ``--out`` when it is given
without ``--figures`` (``--quick``: both to a temporary directory unless given).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

HERE = os.path.dirname(os.path.abspath(__file__))
PAPER = os.path.join(HERE, "paper")
sys.path[:0] = [PAPER, os.path.join(HERE, "..", "examples")]

import cli  # noqa: E402
from _args import comma_list, json_object, out_dir, positive_float, positive_int  # noqa: E402  (examples/_args.py)
from _common import RECOMMENDED_STABILIZERS, add_malloc_flag, command_line, set_malloc  # noqa: E402  (examples/_common.py)
from tasks import Task, get_task  # noqa: E402
from training import make_optimizer, make_step, reseed_probes  # noqa: E402
from tuning import tune  # noqa: E402

# Per task: the step budget (the headline runs' steps, for which the learning rates are tuned),
# the steps per timed chunk (a multiple of 4, so that every chunk starts a refresh period), and
# the validation targets. Targets: the final means of the headline runs (4 seeds, same steps) are
# CNN accuracy SGD 97.7 %, Adam 98.5 %, AdaHessian 98.9 %; LM loss SGD 2.357, AdamW 2.223,
# AdaHessian 2.250; DLRM accuracy SGD 64.0 %, Adam 65.2 %, AdaHessian 65.1 % (Bayes 70.4 %). The
# first target of each task is met by all three in the headline runs, the second by Adam(W) and
# AdaHessian but not SGD.
SETUP = {
  "cnn": dict(steps=300, chunk=12, targets=(0.97, 0.98)),
  "lm": dict(steps=300, chunk=12, targets=(2.40, 2.30)),
  "dlrm": dict(steps=1500, chunk=60, targets=(0.635, 0.645)),
}
# Quick mode: the tiny tasks, 24 steps; the first target is easy, so that both outcomes show up.
QUICK_SETUP = {
  "cnn": dict(steps=24, chunk=8, targets=(0.3, 0.98)),
  "lm": dict(steps=24, chunk=8, targets=(4.4, 2.30)),
  "dlrm": dict(steps=24, chunk=8, targets=(0.58, 0.645)),
}
TASK_NAMES = tuple(SETUP)
UPDATE_FREQS = (1, 2, 4)
SEEDS, QUICK_SEEDS = 4, 1
TIME_BUDGET_S, QUICK_TIME_BUDGET_S = 120.0, 10.0  # per run: a cap, the step budget ends first
NOT_REACHED = "not reached"
DEFAULT_OUT = os.path.join(HERE, "results")
DEFAULT_FIGURES = os.path.join(HERE, "figures")
LABELS = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}
COLORS = {"sgd": "tab:green", "adam": "tab:blue", "adamw": "tab:blue"}
K_COLORS = {1: "tab:red", 2: "tab:orange", 4: "tab:purple"}


def optimizers_for(task_name: str) -> list[tuple[str, str, int]]:
  """``(key, optimizer name, update_freq)`` of every optimizer compared on ``task_name``."""
  adam = "adamw" if task_name == "lm" else "adam"
  rows = [("sgd", "sgd", 1), (adam, adam, 1)]
  return rows + [(f"adahessian_k{k}", "adahessian", k) for k in UPDATE_FREQS]


def label(key: str) -> str:
  if key.startswith("adahessian_k"):
    return f"AdaHessian k={key.removeprefix('adahessian_k')}"
  return LABELS[key]


def color(key: str) -> str:
  if key.startswith("adahessian_k"):
    return K_COLORS[int(key.removeprefix("adahessian_k"))]
  return COLORS[key]


# Training chunks ------------------------------------------------------------------------------


def make_chunk(task: Task, tx: optax.GradientTransformation, hessian: bool, update_freq: int):
  """``(params, opt_state, keys, data) -> (params, opt_state, losses)``: ``len(keys)`` steps.

  One step per key (the key draws the step's mini-batch), one ``lax.scan`` iteration per step.
  For AdaHessian with ``update_freq`` ``k > 1`` the scan runs over periods of ``k`` steps: one
  step compiled with ``refresh=True``, then an inner scan of ``k - 1`` steps compiled with
  ``refresh=False``, so no step has a conditional and the program holds each kind of step once
  whatever ``k``. ``len(keys)`` must then be a multiple of ``k``, and the state's step count a
  multiple of ``k`` when the chunk starts. Not jitted.
  """
  if not hessian or update_freq == 1:
    period = 1
    step = make_step(tx, task.loss, "fused" if hessian else "plain")
  else:
    period = update_freq
    fresh, stale = (make_step(tx, task.loss, "fused", refresh=r) for r in (True, False))

  def scan_steps(step, params, opt_state, keys, data):
    def body(carry, key):
      params, opt_state, loss = step(*carry, task.sample(data, key))
      return (params, opt_state), loss

    return jax.lax.scan(body, (params, opt_state), keys)

  def chunk(params, opt_state, keys, data):
    if keys.shape[0] % period:
      raise ValueError(f"a chunk of {keys.shape[0]} steps is not a multiple of k={period}")
    if period == 1:
      (params, opt_state), losses = scan_steps(step, params, opt_state, keys, data)
      return params, opt_state, losses

    def one_period(carry, period_keys):
      params, opt_state, loss = fresh(*carry, task.sample(data, period_keys[0]))
      carry, losses = scan_steps(stale, params, opt_state, period_keys[1:], data)
      return carry, jnp.concatenate([loss[None], losses])

    carry, losses = jax.lax.scan(one_period, (params, opt_state), keys.reshape(-1, period))
    return *carry, losses.reshape(-1)

  return chunk


# Results --------------------------------------------------------------------------------------


def seconds_to_target(
  seconds: Sequence[float],
  metric: Sequence[float | None],
  target: float,
  higher_is_better: bool,
) -> tuple[float | str, int | None]:
  """``(seconds, index)`` of the first evaluation that meets ``target``, or ``("not reached",
  None)``. ``None`` or NaN metric values (a diverged run) never meet it."""
  for i, (s, m) in enumerate(zip(seconds, metric, strict=True)):
    if m is None or not math.isfinite(m):
      continue
    if (m >= target) if higher_is_better else (m <= target):
      return float(s), i
  return NOT_REACHED, None


def median_time(values: Sequence[float | str]) -> float | str:
  """Median of seconds-to-target over seeds, "not reached" counted as infinitely slow."""
  if not values:
    return NOT_REACHED
  med = float(np.median([math.inf if v == NOT_REACHED else v for v in values]))
  return NOT_REACHED if math.isinf(med) else med


def target_key(target: float) -> str:
  return f"{target:g}"


def load_average() -> dict[str, Any]:
  """``uptime``'s line and the 1/5/15-minute load averages."""
  try:
    line = subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    line = ""
  return {"uptime": line, "loadavg": [round(x, 2) for x in os.getloadavg()]}


def _cpu_seconds() -> tuple[float, float] | None:
  """(CPU seconds all processes have used, CPU seconds this process has used), from
  ``/proc/stat`` (Linux); ``None`` elsewhere."""
  try:
    with open("/proc/stat") as f:
      fields = [float(x) for x in f.readline().split()[1:9]]  # up to steal; guest is in user
  except (OSError, ValueError):
    return None
  busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0.0)  # minus idle, iowait
  own = os.times()
  return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system


def other_processes_cores(start: tuple[float, float] | None, wall_s: float) -> float | None:
  """Mean number of cores that other processes kept busy since ``start`` (``_cpu_seconds()``).

  The load average after a run includes the run itself (up to ~1-2 on its own); this measures
  only the rest of the machine over the timed part.
  """
  end = _cpu_seconds()
  if start is None or end is None or wall_s <= 0:
    return None
  return round(max(0.0, (end[0] - start[0]) - (end[1] - start[1])) / wall_s, 3)


def idle_verdict(entry: dict[str, Any]) -> str:
  """Whether a task's times were taken on an idle machine, in words."""
  before, after = entry["load_before"]["loadavg"][0], entry["load_after"]["loadavg"][0]
  others = entry["other_processes_cores"]
  line = f"1-min load {before} before, {after} after; other processes {others} cores: "
  if before < 1 and after < 1:
    return line + "idle (load < 1 before and after)"
  if before < 1 and others is not None and others < 0.25:
    return line + "load after >= 1 is this run's own (other processes stayed under 0.25 core)"
  return line + "NOT idle: do not use these times"


def _summarize(runs: list[dict[str, Any]], targets: Sequence[float]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for t in targets:
    key = target_key(t)
    secs = [r["seconds_to_target"][key] for r in runs]
    steps = [r["steps_to_target"][key] for r in runs]
    med_steps = median_time(steps)
    out[key] = {
      "median_s": median_time(secs),
      "median_steps": med_steps if isinstance(med_steps, str) else int(round(med_steps)),
      "reached": sum(s != NOT_REACHED for s in secs),
      "runs": len(runs),
    }
  ms = [1000 * r["seconds"][-1] / r["steps"][-1] for r in runs if r["steps"][-1] > 0]
  return {"targets": out, "median_ms_per_step": float(np.median(ms)) if ms else None}


# One task -------------------------------------------------------------------------------------


class _Run:
  """One optimizer and seed: its state and its time series."""

  def __init__(self, key, seed, params, opt_state, step_keys, metrics0, metric):
    self.key, self.seed = key, seed
    self.params, self.opt_state = params, opt_state
    self.step_keys = step_keys  # one device array of keys per chunk
    self.steps, self.seconds = [0], [0.0]
    self.metric, self.val_loss = [float(metrics0[metric])], [float(metrics0["loss"])]
    self.train_loss: list[float | None] = [None]
    self.stopped: str | None = None

  def record(self) -> dict[str, Any]:
    return {
      "seed": self.seed,
      "steps": self.steps,
      "seconds": [round(s, 6) for s in self.seconds],
      "metric": self.metric,
      "val_loss": self.val_loss,
      "train_loss": self.train_loss,
      "stopped": self.stopped,
      "diverged": self.stopped == "non-finite",
    }


def run_task(
  name: str,
  quick: bool,
  seeds: Sequence[int],
  time_budget: float,
  steps=None,
  adahessian_config: dict[str, Any] | None = None,
):
  """Trains every optimizer on task ``name`` for ``seeds``, interleaved; returns the task entry."""
  setup = dict((QUICK_SETUP if quick else SETUP)[name])
  tuned_steps = setup["steps"]  # the tuning cache's key: always the headline budget
  if steps is not None:
    setup["steps"] = steps
  steps, chunk = setup["steps"], setup["chunk"]
  if steps % chunk or chunk % math.lcm(*UPDATE_FREQS):
    raise ValueError(f"steps={steps} must be a multiple of chunk={chunk}, itself of 4")
  task = get_task(name, quick)
  metric, targets = task.metric, setup["targets"]
  load_before = load_average()
  print(f"[{name}] load before: {load_before['uptime'] or load_before['loadavg']}", flush=True)

  evaluate = jax.jit(task.evaluate)
  opts, runs, compiled = {}, [], {}
  for key, opt, k in optimizers_for(name):
    entry = tune(task, opt, tuned_steps, os.path.join(PAPER, "results"), quick)
    lr = entry["lr"]
    extra = (adahessian_config or {}) if opt == "adahessian" else {}
    tx = make_optimizer(opt, lr, steps, task, update_freq=k, **extra)
    hessian = opt == "adahessian"

    def fresh_state(seed, tx=tx, hessian=hessian):
      k_init, k_data, k_probe = jax.random.split(jax.random.key(seed), 3)
      params = jax.jit(task.init)(k_init)
      opt_state = tx.init(params)
      if hessian:
        opt_state = reseed_probes(opt_state, k_probe)
      return params, opt_state, jax.random.split(k_data, steps).reshape(-1, chunk)

    fn = jax.jit(make_chunk(task, tx, hessian, k), donate_argnums=(0, 1))
    # Compile once (not timed), then warm up on a throw-away state (not timed either).
    params, opt_state, keys = fresh_state(10_000)
    t0 = time.perf_counter()
    fn = fn.lower(params, opt_state, keys[0], task.data).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(fn(params, opt_state, keys[0], task.data))
    compiled[key] = fn
    opts[key] = {
      "optimizer": opt,
      "label": label(key),
      "update_freq": k,
      "adahessian_config": extra,
      "lr": lr,
      "lr_source": entry.get("note") or f"tuning.json ({opt}, k=1, {tuned_steps} steps)",
      "compile_s": round(compile_s, 2),
    }
    for seed in seeds:
      params, opt_state, keys = fresh_state(seed)
      metrics0 = {k_: float(v) for k_, v in evaluate(params, task.data).items()}
      runs.append(_Run(key, seed, params, opt_state, list(keys), metrics0, metric))
    print(f"[{name}] {label(key)}: lr {lr:g}, compiled", flush=True)

  n_chunks = steps // chunk
  cpu_start, wall_start = _cpu_seconds(), time.perf_counter()
  for round_ in range(n_chunks):
    shift = round_ % len(runs)
    for run in runs[shift:] + runs[:shift]:
      if run.stopped:
        continue
      keys = run.step_keys[round_]
      t0 = time.perf_counter()
      run.params, run.opt_state, losses = compiled[run.key](
        run.params, run.opt_state, keys, task.data
      )
      jax.block_until_ready((run.params, run.opt_state, losses))
      elapsed = time.perf_counter() - t0
      m = {k_: float(v) for k_, v in evaluate(run.params, task.data).items()}  # not timed
      losses = np.asarray(losses)
      run.steps.append(run.steps[-1] + chunk)
      run.seconds.append(run.seconds[-1] + elapsed)
      run.metric.append(m[metric])
      run.val_loss.append(m["loss"])
      run.train_loss.append(float(np.mean(losses)))
      if not (np.all(np.isfinite(losses)) and math.isfinite(m[metric])):
        run.stopped = "non-finite"
      elif run.seconds[-1] >= time_budget:
        run.stopped = "time budget"
  others = other_processes_cores(cpu_start, time.perf_counter() - wall_start)
  load_after = load_average()
  print(f"[{name}] load after: {load_after['uptime'] or load_after['loadavg']}", flush=True)
  print(f"[{name}] other processes kept {others} cores busy during the timed loop", flush=True)

  for key in opts:
    records = []
    for run in (r for r in runs if r.key == key):
      run.stopped = run.stopped or "steps"
      rec = run.record()
      rec["seconds_to_target"], rec["steps_to_target"] = {}, {}
      for t in targets:
        s, i = seconds_to_target(run.seconds, run.metric, t, task.higher_is_better)
        rec["seconds_to_target"][target_key(t)] = s
        rec["steps_to_target"][target_key(t)] = NOT_REACHED if i is None else run.steps[i]
      records.append(rec)
    opts[key]["runs"] = records
    opts[key].update(_summarize(records, targets))
  return {
    "metric": metric,
    "higher_is_better": task.higher_is_better,
    "targets": list(targets),
    "steps": steps,
    "chunk_steps": chunk,
    "seeds": list(seeds),
    "time_budget_s": time_budget,
    "task_config": task.config,
    "load_before": load_before,
    "load_after": load_after,
    "other_processes_cores": others,
    "optimizers": opts,
  }


# Table and figure -----------------------------------------------------------------------------


def _fmt_target(name: str, entry: dict[str, Any], target: float) -> str:
  if entry["metric"] == "acc":
    return f"{name}: acc. ≥ {100 * target:g} %"
  return f"{name}: {entry['metric']} {'≥' if entry['higher_is_better'] else '≤'} {target:g}"


def table(tasks: dict[str, Any]) -> str:
  """One markdown table: per task and target, the median seconds (runs that reached it / runs);
  per task, the median milliseconds per training step."""
  head = ["SGD", "Adam(W)"] + [f"AdaHessian k={k}" for k in UPDATE_FREQS]
  lines = ["| task: target | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
  for name, entry in tasks.items():
    opts = [entry["optimizers"][key] for key, _, _ in optimizers_for(name)]
    for t in entry["targets"]:
      cells = []
      for opt in opts:
        s = opt["targets"][target_key(t)]
        med = s["median_s"]
        time_s = med if isinstance(med, str) else f"{med:.2f} s"
        cells.append(f"{time_s} ({s['reached']}/{s['runs']})")
      lines.append(f"| {_fmt_target(name, entry, t)} | " + " | ".join(cells) + " |")
    ms = [opt["median_ms_per_step"] for opt in opts]
    cells = ["—" if v is None else f"{v:.2f}" for v in ms]
    lines.append(f"| {name}: ms per step | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(name: str, entry: dict[str, Any], plt):
  """Two panels: the validation metric against training seconds and against steps."""
  fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=90)
  values = []
  for key, opt in entry["optimizers"].items():
    for i, run in enumerate(opt["runs"]):
      y = np.array([np.nan if v is None else v for v in run["metric"]], float)
      values.append(y[1:])
      lab = f"{opt['label']} (lr {opt['lr']:g})" if i == 0 else None
      ax_t.plot(run["seconds"], y, color=color(key), alpha=0.7, lw=1, label=lab)
      ax_s.plot(run["steps"], y, color=color(key), alpha=0.7, lw=1)
  for t in entry["targets"]:
    for ax in (ax_t, ax_s):
      ax.axhline(t, color="k", ls=":", lw=1)
  ylabel = f"validation {entry['metric']}"
  ax_t.set(xlabel="training seconds (compilation and evaluation excluded)", ylabel=ylabel)
  ax_s.set(xlabel="step", ylabel=ylabel)
  vals = np.concatenate(values + [np.asarray(entry["targets"], float)])
  vals = vals[np.isfinite(vals)]
  if vals.size:  # zoom on the part of the curves around the targets
    lo, hi = (
      (np.percentile(vals, 10), vals.max())
      if entry["higher_is_better"]
      else (
        vals.min(),
        np.percentile(vals, 90),
      )
    )
    pad = 0.05 * (hi - lo) or 0.01
    for ax in (ax_t, ax_s):
      ax.set_ylim(lo - pad, hi + pad)
      ax.grid(alpha=0.3)
  ax_t.legend(fontsize=8)
  load = entry["load_before"]["loadavg"][0], entry["load_after"]["loadavg"][0]
  fig.suptitle(
    f"Time to accuracy, {name} ({len(entry['seeds'])} seeds; dotted: targets; "
    f"1-min load {load[0]:g} before, {load[1]:g} after)"
  )
  fig.tight_layout()
  return fig


# Command line ---------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--quick", action="store_true", help="tiny tasks, 24 steps, 1 seed (seconds)")
  p.add_argument(
    "--tasks",
    type=comma_list(TASK_NAMES),
    default=list(TASK_NAMES),
    help=f"comma-separated subset of {','.join(TASK_NAMES)}",
  )
  p.add_argument("--seeds", type=positive_int, default=None, help=f"seeds 0..N-1 (default {SEEDS})")
  p.add_argument(
    "--steps",
    type=positive_int,
    default=None,
    help="override each task's step budget (default 300, DLRM 1500; --quick: 24) for smoke runs: "
    "a multiple of each task's chunk (12 steps, DLRM 60; --quick: 8)",
  )
  p.add_argument("--time-budget", type=positive_float, default=None, help="seconds per run (a cap)")
  quick_dir = os.path.join(tempfile.gettempdir(), "adahessian_jax_time_to_accuracy_quick")
  p.add_argument(
    "--out",
    type=out_dir,
    default=None,
    help=f"results directory (default benchmarks/results; --quick: {quick_dir})",
  )
  p.add_argument(
    "--figures",
    type=out_dir,
    default=None,
    help=f"figures directory (default benchmarks/figures, or --out if given; --quick: {quick_dir})",
  )
  add_malloc_flag(p)
  p.add_argument(
    "--adahessian-config",
    type=json_object,
    default=RECOMMENDED_STABILIZERS,
    metavar="JSON",
    help=f"adahessian() arguments of the AdaHessian rows (default: the README's recommended "
    f"{json.dumps(RECOMMENDED_STABILIZERS)}; '{{}}' for the paper's exact rule; not "
    f"{', '.join(cli.SET_BY_EXPERIMENT)}, which the benchmark sets)",
  )
  args = p.parse_args(argv)
  cli.check_adahessian_config(p, args.adahessian_config)
  chunks = {t: (QUICK_SETUP if args.quick else SETUP)[t]["chunk"] for t in args.tasks}
  if args.steps is not None and any(args.steps % c for c in chunks.values()):
    # Checked here, not when the task's turn comes: a later task's failure lost the earlier ones.
    p.error(
      f"argument --steps: must be a multiple of each task's chunk of steps {chunks}, "
      f"got {args.steps}"
    )
  if args.figures is None and (args.quick or args.out is not None):
    # Not over the committed figures: a run written elsewhere draws its figures there too.
    args.figures = args.out or quick_dir
  args.out = args.out or (quick_dir if args.quick else DEFAULT_OUT)
  args.figures = args.figures or DEFAULT_FIGURES
  args.seeds = tuple(range(args.seeds or (QUICK_SEEDS if args.quick else SEEDS)))
  if args.time_budget is None:
    args.time_budget = QUICK_TIME_BUDGET_S if args.quick else TIME_BUDGET_S
  return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  allocator = set_malloc(args)
  cli.enable_compilation_cache()
  os.makedirs(args.out, exist_ok=True)
  os.makedirs(args.figures, exist_ok=True)
  path = os.path.join(args.out, "time_to_accuracy.json")
  # One command per task: keep the other tasks' entries of an earlier run of the same mode.
  payload: dict[str, Any] = {}
  if os.path.exists(path):
    with open(path) as f:
      payload = json.load(f)
    if payload.get("quick") != args.quick:
      payload = {}
  environment = cli.environment()  # at the start of this command
  environment["allocator"] = allocator
  tasks = payload.get("tasks", {})
  for name in args.tasks:
    t_start = time.perf_counter()
    tasks[name] = run_task(
      name, args.quick, args.seeds, args.time_budget, args.steps, args.adahessian_config
    )
    tasks[name]["command"] = command_line()
    tasks[name]["environment"] = environment
    tasks[name]["wall_s"] = round(time.perf_counter() - t_start, 1)
  tasks = {n: tasks[n] for n in TASK_NAMES if n in tasks}
  payload.update(
    experiment="time_to_accuracy",
    quick=args.quick,
    method=__doc__.split("Method")[1].split("Commands")[0].strip(" :\n"),
    tasks=tasks,
    table_markdown=table(tasks),
  )
  print(payload["table_markdown"])
  for name in args.tasks:
    print(f"[{name}] {idle_verdict(tasks[name])}")
  cli.write_json(args.out, "time_to_accuracy", payload)
  print(f"wrote {path}")
  plt = cli.pyplot()
  if plt is not None:
    for name in args.tasks:
      fig = plot(name, tasks[name], plt)
      fig_path = os.path.join(args.figures, f"time_to_accuracy_{name}.png")
      fig.savefig(fig_path)
      plt.close(fig)
      print(f"wrote {fig_path}")
  return payload


if __name__ == "__main__":
  main()
