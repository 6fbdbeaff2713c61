"""Step time, XLA FLOPs and memory of AdaHessian against SGD, Adam and optax's Sophia.

One command::

  python benchmarks/step_time.py          # full run: benchmarks/results/step_time_full.json
  python benchmarks/step_time.py --quick  # smoke run on tiny models in seconds (CI), to a temp dir

For each model (a Flax MLP 784-1024-1024-10 at batch 128, a ResNet-style CNN on
32x32x3 at batch 64, a small transformer LM; see ``models.py``) and each group
of optimizers, every optimizer gets its own jitted training step (compiled
ahead of time, parameters and state donated), and the steps are run
round-robin in one process, so that load on the machine hits all of them
alike. A timed *unit* is one Hessian-refresh cycle: ``update_freq`` steps (1
for SGD and Adam), so that a lazy refresh is charged at its true average.
Reported per optimizer:

* ``ms``: median over the timed units of (unit time / steps in the unit),
  after warm-up, with ``jax.block_until_ready`` at the end of every unit;
* ``time/Adam``: that median over Adam's median from the same rounds;
* ``FLOPs/Adam``: XLA's cost analysis of the compiled step, averaged over a
  refresh cycle: the step is compiled once with the state's step counter made
  a compile-time constant on a refresh step and once on a non-refresh step, so
  ``(F_refresh + (k - 1) F_skip) / k``. (XLA's own count for the real step,
  which charges a ``lax.cond`` about its costlier branch, is ``xla_flops_raw``.)
* ``page_faults_per_step``: minor page faults of the process over the timed
  units (``getrusage``; exact at any load), per step;
* ``state``: bytes of the optimizer state; ``peak``: the compiled step's
  arguments + outputs - aliased (donated) + temporaries
  (``compiled.memory_analysis()``).

Before anything is built, glibc's malloc is told to keep freed large blocks for
reuse (``examples/_common.keep_freed_memory``; ``--default-malloc`` leaves it
as it is). XLA:CPU allocates a call's temporaries afresh, and by default glibc
maps a block over 32 MiB from the kernel at every call, so each 4 KiB of it
costs a page fault and a zeroed page (about 0.2 ms per MiB here): a tax on
the program with the larger temporaries, not on its arithmetic. The setting
holds for every optimizer alike and is recorded as ``machine.allocator``.

In ``main`` every optimizer is timed over ``--units`` cycles; in the sweeps
over at least ``--sweep-units`` steps (and at least 10 cycles; Adam over
``--sweep-units`` steps).

Groups: ``main`` (SGD, Adam, AdaHessian closure and fused paths, Sophia with
Hutchinson, all refreshing every step), ``freq`` (refresh interval 1..5 of the
fused path and of Sophia, the paper's Table 6 analogue), ``lazy`` (refresh
interval 2..5 of the fused path three ways: the single program with its
``lax.cond``, the refresh decided on the host with two programs, and the host
route with ``lazy_moment="refresh"``), ``stabilized`` (the fused path at k = 1,
the paper's exact rule against ``RECOMMENDED_STABILIZERS`` of examples/_common.py,
alone and with ``curvature_clip=5``)
and ``n_samples`` (probes 1..4, fused path).

The step of each optimizer is the one a user writes:

* SGD / Adam: ``value_and_grad``, ``tx.update``, ``apply_updates``;
* AdaHessian closure path: ``value_and_grad``, then
  ``tx.update(g, st, p, value_fn=lambda q: loss_fn(q, batch))``;
* AdaHessian fused path: ``loss, g, h = vgh(p, st, batch)`` with
  ``vgh = adahessian_jax.value_grad_and_hessian_diag(loss_fn)``, then
  ``tx.update(g, st, p, hessian_diag=h)``; on the host route the same with
  ``refresh=True`` or ``False`` given to both, one compiled program each, the
  first called when ``step % k == 0``;
* Sophia: ``value_and_grad``, then
  ``tx.update(g, st, p, obj_fn=lambda q: loss_fn(q, batch))`` with
  ``optax.contrib.sophia(..., update_interval=k,
  hessian_diagonal_fn=hutchinson_estimator_diag_hessian(...))``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax.contrib import hutchinson_estimator_diag_hessian, sophia

import adahessian_jax

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "examples")]
import models  # noqa: E402
from _args import (  # noqa: E402  (examples/_args.py)
  comma_list,
  file_name,
  nonnegative_int,
  out_dir,
  positive_int,
  write_json,
)
from _common import (  # noqa: E402  (shared with examples)
  RECOMMENDED_STABILIZERS,
  add_malloc_flag,
  command_line,
  make_step,
  set_malloc,
  tree_bytes,
)

RESULTS_DIR = HERE / "results"
QUICK_DIR = Path(tempfile.gettempdir()) / "adahessian_jax_step_time_quick"  # not over results/
# What each kind's tx.update gets besides the gradient (see examples/_common.make_step).
ROUTES = {
  "sgd": "plain",
  "adam": "plain",
  "closure": "value_fn",
  "fused": "fused",
  "sophia": "obj_fn",
}


@dataclass(frozen=True)
class Config:
  kind: str  # sgd | adam | closure | fused | sophia
  freq: int = 1
  n_samples: int = 1
  host: bool = False  # fused path: refresh decided on the host, two programs
  moment: str = "repeat"  # lazy_moment
  stabilized: bool = False  # fused path with RECOMMENDED_STABILIZERS
  curvature_clip: float | None = None  # the spike stabilizer on top (docs/stability.md)
  stale_only: bool = False  # host route: time the non-refresh program alone

  @property
  def label(self) -> str:
    names = {
      "sgd": "SGD (momentum 0.9)",
      "adam": "Adam",
      "closure": "AdaHessian closure",
      "fused": "AdaHessian fused",
      "sophia": "Sophia-H (optax)",
    }
    out = names[self.kind]
    if self.kind in ("closure", "fused", "sophia"):
      out += f" k={self.freq}"
    if self.kind in ("closure", "fused") and self.n_samples > 1:
      out += f" n={self.n_samples}"
    if self.host:
      out += " host"
    if self.moment != "repeat":
      out += f" {self.moment}-moment"
    if self.stabilized:
      out += " stabilized"
    if self.curvature_clip is not None:
      out += f" + curvature_clip={self.curvature_clip:g}"
    if self.stale_only:
      out += ", non-refresh steps only"
    return out

  @property
  def key(self) -> str:
    extra = ("_host" if self.host else "") + ("_" + self.moment if self.moment != "repeat" else "")
    extra += ("_stab" if self.stabilized else "") + ("_stale" if self.stale_only else "")
    extra += "" if self.curvature_clip is None else f"_cclip{self.curvature_clip:g}"
    return f"{self.kind}_k{self.freq}_n{self.n_samples}{extra}"


def make_tx(cfg: Config) -> optax.GradientTransformation:
  if cfg.kind == "sgd":
    return optax.sgd(0.01, momentum=0.9)
  if cfg.kind == "adam":
    return optax.adam(1e-3)
  if cfg.kind in ("closure", "fused"):
    return adahessian_jax.adahessian(
      0.01,
      update_freq=cfg.freq,
      n_samples=cfg.n_samples,
      lazy_moment=cfg.moment,
      **(RECOMMENDED_STABILIZERS if cfg.stabilized else {}),
      curvature_clip=cfg.curvature_clip,
    )
  if cfg.kind == "sophia":
    return sophia(
      1e-3,
      update_interval=cfg.freq,
      hessian_diagonal_fn=hutchinson_estimator_diag_hessian(jax.random.PRNGKey(0)),
    )
  raise ValueError(cfg.kind)


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, list | tuple):
    cost = cost[0]
  return float(cost.get("flops", float("nan")))


def _is_counter(x) -> bool:
  return (
    isinstance(x, jax.Array | np.ndarray) and x.ndim == 0 and jnp.issubdtype(x.dtype, jnp.integer)
  )


def flops_at_count(step, params, opt_state, batch, count: int) -> float:
  """XLA FLOPs of ``step`` with the state's integer scalars (step counters,
  refresh interval) as compile-time constants and the counters set to ``count``.

  With the counter known, both AdaHessian paths and Sophia's ``lax.cond`` keep
  only the branch taken on that step, so this is the cost of that kind of step.
  """
  leaves, treedef = jax.tree.flatten(opt_state)
  const = {i: x for i, x in enumerate(leaves) if _is_counter(x)}
  for i, x in const.items():
    # Counters (count, zero at init) are set; the refresh interval is kept.
    if int(x) == 0:
      const[i] = jnp.asarray(count, x.dtype)
  free = [x for i, x in enumerate(leaves) if i not in const]

  def fixed(p, free_leaves, b):
    it = iter(free_leaves)
    full = [const[i] if i in const else next(it) for i in range(len(leaves))]
    return step(p, jax.tree.unflatten(treedef, full), b)

  return _flops(jax.jit(fixed).lower(params, free, batch).compile())


class Compiled:
  """The compiled step of one optimizer on one model, and its static costs."""

  def __init__(self, cfg: Config, problem: models.Problem, branch_flops: dict):
    self.tx = make_tx(cfg)
    params = problem.params
    opt_state = self.tx.init(params)
    step = make_step(self.tx, problem.loss_fn, ROUTES[cfg.kind])
    batch = problem.batches[0]
    t0 = time.perf_counter()
    self.stale_executable = None
    if not cfg.host:
      lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, batch)
      self.executable = lowered.compile()
    else:  # the refresh decided on the host: one program per decision, no lax.cond
      self.executable, self.stale_executable = (
        jax.jit(make_step(self.tx, problem.loss_fn, "fused", refresh=r), donate_argnums=(0, 1))
        .lower(params, opt_state, batch)
        .compile()
        for r in (True, False)
      )
    self.compile_s = time.perf_counter() - t0
    self.xla_flops_raw = _flops(self.executable)
    if cfg.host:
      self.flops_refresh, self.flops_skip = self.xla_flops_raw, _flops(self.stale_executable)
    elif cfg.freq == 1:
      self.flops_refresh = self.flops_skip = self.xla_flops_raw
    else:
      # The refresh and the other step are the same programs for every k > 1
      # (k is only a constant in the schedule): compile them once per kind.
      kind = (cfg.kind, cfg.n_samples, cfg.moment)
      if kind not in branch_flops:
        branch_flops[kind] = tuple(
          flops_at_count(step, params, opt_state, batch, c) for c in (0, 1)
        )
      self.flops_refresh, self.flops_skip = branch_flops[kind]
    self.flops = (self.flops_refresh + (cfg.freq - 1) * self.flops_skip) / cfg.freq
    if cfg.stale_only:
      self.flops = self.flops_skip
    mem = self.executable.memory_analysis()
    self.mem = {
      "argument_bytes": int(mem.argument_size_in_bytes),
      "output_bytes": int(mem.output_size_in_bytes),
      "alias_bytes": int(mem.alias_size_in_bytes),
      "temp_bytes": int(mem.temp_size_in_bytes),
    }
    self.peak_bytes = (
      self.mem["argument_bytes"]
      + self.mem["output_bytes"]
      - self.mem["alias_bytes"]
      + self.mem["temp_bytes"]
    )
    self.state_bytes = tree_bytes(opt_state)


class Runner:
  """One optimizer on one model: its compiled step and its own parameters and state."""

  def __init__(self, cfg: Config, problem: models.Problem, cache: dict):
    self.cfg = cfg
    if cfg not in cache:
      cache[cfg] = Compiled(cfg, problem, cache.setdefault("branch_flops", {}))
    c = self.c = cache[cfg]
    self.compiled = c.executable
    self.stale = c.stale_executable
    self.params = jax.tree.map(jnp.array, problem.params)  # own copy: it is donated
    self.opt_state = c.tx.init(self.params)
    self.batches = problem.batches
    self.step_index = 0
    self.compile_s = c.compile_s
    self.xla_flops_raw, self.flops = c.xla_flops_raw, c.flops
    self.flops_refresh, self.flops_skip = c.flops_refresh, c.flops_skip
    self.mem, self.peak_bytes, self.state_bytes = c.mem, c.peak_bytes, c.state_bytes
    self.param_bytes = tree_bytes(self.params)
    self.unit_times: list[float] = []
    self.unit_faults: list[int] = []
    self.loss = float("nan")

  def run_unit(self, record: bool) -> None:
    """Runs one refresh cycle (``freq`` steps) and records its time and page faults."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    loss = None
    for _ in range(self.cfg.freq):
      batch = self.batches[self.step_index % len(self.batches)]
      run = self.compiled
      if self.stale is not None and (self.cfg.stale_only or self.step_index % self.cfg.freq):
        run = self.stale
      self.params, self.opt_state, loss = run(self.params, self.opt_state, batch)
      self.step_index += 1
    jax.block_until_ready((self.params, self.opt_state, loss))
    dt = (time.perf_counter() - t0) / self.cfg.freq
    if record:
      self.unit_times.append(dt)
      self.unit_faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
    self.loss = float(loss)


def run_group(
  problem, configs, units: int, warmup: int, cache: dict, log, sweep: bool = False
) -> list[dict]:
  runners = []
  for cfg in configs:
    fresh = cfg not in cache
    r = Runner(cfg, problem, cache)
    if fresh:
      log(f"    compiled {cfg.label:<28} in {r.compile_s:5.1f} s")
    runners.append(r)

  # Each optimizer runs ``units`` refresh cycles, or in the sweeps at least
  # ``units`` steps (and 10 cycles), round-robin, until all have their count.
  def cycles(r):
    if not sweep or r.cfg.kind == "adam":
      return units
    return max(min(10, units), -(-units // r.cfg.freq))

  need = {id(r): cycles(r) for r in runners}
  for i in range(warmup + max(need.values())):
    for r in runners:
      if i < warmup + need[id(r)]:
        r.run_unit(record=i >= warmup)
  adam = next(r for r in runners if r.cfg.kind == "adam")
  adam_ms = statistics.median(adam.unit_times) * 1e3
  rows = []
  for r in runners:
    ms = statistics.median(r.unit_times) * 1e3
    q1, _, q3 = statistics.quantiles(r.unit_times, n=4) if len(r.unit_times) > 1 else (0, 0, 0)
    rows.append(
      {
        "optimizer": r.cfg.label,
        "key": r.cfg.key,
        "kind": r.cfg.kind,
        "update_freq": r.cfg.freq,
        "n_samples": r.cfg.n_samples,
        "host": r.cfg.host,
        "lazy_moment": r.cfg.moment,
        "stabilized": r.cfg.stabilized,
        "curvature_clip": r.cfg.curvature_clip,
        "stale_only": r.cfg.stale_only,
        "units_timed": len(r.unit_times),
        "steps_timed": len(r.unit_times) * r.cfg.freq,
        "ms_per_step_median": ms,
        "ms_per_step_iqr": [q1 * 1e3, q3 * 1e3],
        "time_ratio_adam": ms / adam_ms,
        "page_faults_per_step": sum(r.unit_faults) / (len(r.unit_faults) * r.cfg.freq),
        "flops": r.flops,
        "flops_refresh_step": r.flops_refresh,
        "flops_other_step": r.flops_skip,
        "xla_flops_raw": r.xla_flops_raw,
        "flops_ratio_adam": r.flops / adam.flops,
        "state_bytes": r.state_bytes,
        "state_ratio_adam": r.state_bytes / adam.state_bytes,
        "param_bytes": r.param_bytes,
        "peak_bytes": r.peak_bytes,
        "peak_ratio_adam": r.peak_bytes / adam.peak_bytes,
        "memory_analysis": r.mem,
        "compile_s": r.compile_s,
        "final_loss": r.loss,
      }
    )
  return rows


GROUPS = ("main", "freq", "lazy", "stabilized", "n_samples")


def groups(quick: bool, freqs=(1, 2, 3, 4, 5), ns=(1, 2, 3, 4)) -> dict[str, list[Config]]:
  main = [Config("sgd"), Config("adam"), Config("closure"), Config("fused"), Config("sophia")]
  stabilized = [
    Config("adam"),
    Config("fused"),
    Config("fused", stabilized=True),
    Config("fused", stabilized=True, curvature_clip=5.0),
  ]
  if quick:
    return {
      "main": main,
      "freq": [Config("adam"), Config("fused", 2)],
      "lazy": [Config("adam"), Config("fused", 2, host=True)],
      "stabilized": stabilized,
      "n_samples": [Config("adam"), Config("fused", 1, 2)],
    }
  freq = [Config("adam")]
  for k in freqs:
    freq += [Config("fused", k), Config("sophia", k)]
  lazy = [Config("adam")]
  for k in (k for k in freqs if k > 1):
    lazy += [
      Config("fused", k),
      Config("fused", k, host=True),
      Config("fused", k, host=True, moment="refresh"),
    ]
  # A non-refresh step costs the same at every k: timed alone once per moment mode.
  k = min((k for k in freqs if k > 1), default=2)
  lazy += [Config("fused", k, host=True, moment=m, stale_only=True) for m in ("repeat", "refresh")]
  n_samples = [Config("adam")] + [Config("fused", 1, n) for n in ns]
  return {
    "main": main,
    "freq": freq,
    "lazy": lazy,
    "stabilized": stabilized,
    "n_samples": n_samples,
  }


def _mb(b: float) -> str:
  return f"{b / 2**20:.2f}"


def markdown_table(rows: list[dict]) -> str:
  head = (
    "| optimizer | ms/step | time / Adam | FLOPs / Adam | state MiB (/ Adam) "
    "| peak MiB (/ Adam) |\n|---|---:|---:|---:|---:|---:|\n"
  )
  lines = []
  for r in rows:
    lines.append(
      f"| {r['optimizer']} | {r['ms_per_step_median']:.2f} | {r['time_ratio_adam']:.2f} | "
      f"{r['flops_ratio_adam']:.2f} | {_mb(r['state_bytes'])} ({r['state_ratio_adam']:.2f}) | "
      f"{_mb(r['peak_bytes'])} ({r['peak_ratio_adam']:.2f}) |"
    )
  return head + "\n".join(lines) + "\n"


def sweep_table(rows: list[dict], axis: str) -> str:
  """Time / Adam (FLOPs / Adam) per value of ``axis`` for closure, fused and Sophia."""
  rows = [r for r in rows if not r.get("stale_only")]  # in the group's main table only
  values = sorted({r[axis] for r in rows if r["kind"] != "adam"})
  variant = lambda r: (
    r["kind"]
    + (" host" if r.get("host") else "")
    + (f" {r['lazy_moment']}-moment" if r.get("lazy_moment", "repeat") != "repeat" else "")
  )
  kinds = list(dict.fromkeys(variant(r) for r in rows if r["kind"] != "adam"))
  name = {"update_freq": "k", "n_samples": "n"}[axis]
  head = f"| {name} | " + " | ".join(f"{k}: time / Adam (FLOPs / Adam)" for k in kinds)
  if axis == "update_freq":
    head += " | bound 1 + 2/k"
  lines = [head + " |", "|---" * (len(kinds) + 1 + (axis == "update_freq")) + "|"]
  for v in values:
    cells = []
    for k in kinds:
      r = next((r for r in rows if variant(r) == k and r[axis] == v), None)
      cells.append(
        "–" if r is None else f"{r['time_ratio_adam']:.2f} ({r['flops_ratio_adam']:.2f})"
      )
    extra = f" | {1 + 2 / v:.2f}" if axis == "update_freq" else ""
    lines.append(f"| {v} | " + " | ".join(cells) + extra + " |")
  return "\n".join(lines) + "\n"


def machine() -> dict:
  cpu = platform.processor() or "unknown"
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  try:
    load = os.getloadavg()
  except OSError:
    load = None
  return {
    "cpu": cpu,
    "cores": os.cpu_count(),
    "platform": platform.platform(),
    "python": platform.python_version(),
    "jax": jax.__version__,
    "jaxlib": getattr(jax.lib, "__version__", None) or jax.__version__,
    "optax": optax.__version__,
    "flax": __import__("flax").__version__,
    "device": str(jax.devices()[0]),
    "device_kind": jax.devices()[0].device_kind,
    "loadavg_start": load,
  }


def report(payload: dict) -> str:
  """The markdown tables of a results JSON (what ``benchmarks/README.md`` carries)."""
  out = []
  for name, res in payload["results"].items():
    out.append(f"#### {name}: {res['description']} ({res['n_params']:,} parameters)\n")
    g = res["groups"]
    if "main" in g:
      out.append(markdown_table(g["main"]))
    if "freq" in g:
      out.append("Refresh interval k (per-step averages over whole refresh cycles):\n")
      out.append(sweep_table(g["freq"], "update_freq"))
    if "lazy" in g:
      out.append("Lazy refresh, single program (lax.cond) vs decided on the host:\n")
      out.append(sweep_table(g["lazy"], "update_freq"))
    if "stabilized" in g:
      clip = any(r.get("curvature_clip") for r in g["stabilized"])
      with_clip = ", without and with curvature_clip" if clip else ""
      out.append(f"Exact rule vs the recommended stabilizers{with_clip}:\n")
      out.append(markdown_table(g["stabilized"]))
    if "n_samples" in g:
      out.append("Probes per refresh n (k = 1):\n")
      out.append(sweep_table(g["n_samples"], "n_samples"))
  return "\n".join(out)


def save(args, argv, mode, info, results, units, sweep_units, warmup, t_start):
  """Writes the JSON (after every group, so that a long run keeps what it measured)."""
  info = dict(info)
  try:
    info["loadavg_end"] = os.getloadavg()
  except OSError:
    pass
  payload = {
    "command": command_line(argv),
    "mode": mode,
    "machine": info,
    "elapsed_s": time.perf_counter() - t_start,
    "units_main": units,
    "units_sweeps": sweep_units,
    "warmup_units": warmup,
    "results": results,
  }
  name = f"step_time_{mode}{'_' + args.tag if args.tag else ''}.json"
  return Path(write_json(args.out / name, payload))


def planned(args: argparse.Namespace, name: str) -> dict[str, list[Config]]:
  """The groups of optimizers to time on model ``name``: ``--groups``, by default every group
  (with ``--quick`` the sweeps on the MLP only)."""
  wanted = args.groups or [g for g in GROUPS if not args.quick or g == "main" or name == "mlp"]
  return {g: c for g, c in groups(args.quick, args.freqs, args.ns).items() if g in wanted}


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--quick", action="store_true", help="tiny models, few steps (CI smoke)")
  ap.add_argument(
    "--out",
    type=lambda text: Path(out_dir(text)),
    default=None,
    help="directory of the JSON output (default benchmarks/results; --quick: a temporary one)",
  )
  ap.add_argument(
    "--models",
    type=comma_list(list(models.MODELS)),
    default=None,
    help="comma-separated subset (default: mlp,transformer,cnn; gpt, the accelerator-sized "
    "model, only when named; with --quick: mlp)",
  )
  ap.add_argument(
    "--groups",
    type=comma_list(GROUPS),
    default=None,
    help=f"comma-separated subset of {','.join(GROUPS)} (default: all; with --quick the sweeps "
    "on the MLP only)",
  )
  ap.add_argument(
    "--units",
    type=positive_int,
    default=None,
    help="timed units (cycles) per optimizer (default 30; --quick: 5)",
  )
  ap.add_argument(
    "--sweep-units",
    type=positive_int,
    default=None,
    help="timed units in the sweeps (default 30; --quick: 3)",
  )
  ap.add_argument(
    "--warmup",
    type=nonnegative_int,
    default=None,
    help="untimed units per optimizer (default 3; --quick: 1)",
  )
  ap.add_argument(
    "--freqs",
    type=comma_list(positive_int),
    default=[1, 2, 3, 4, 5],
    help="refresh intervals of the freq sweep (default 1,2,3,4,5)",
  )
  ap.add_argument(
    "--ns",
    type=comma_list(positive_int),
    default=[1, 2, 3, 4],
    help="probe counts of the n_samples sweep (default 1,2,3,4)",
  )
  ap.add_argument("--tag", type=file_name, default=None, help="suffix of the JSON file name")
  add_malloc_flag(ap)
  ap.add_argument(
    "--report", type=Path, default=None, help="print the markdown tables of a results JSON; no run"
  )
  args = ap.parse_args(argv)
  if args.report is not None:
    if not args.report.is_file():
      ap.error(f"argument --report: no such file: {str(args.report)!r}")
    try:
      args.report_payload = json.loads(args.report.read_text())
      results = args.report_payload["results"]
      if not all("groups" in res for res in results.values()):
        raise KeyError("groups")
    except (ValueError, KeyError, TypeError, AttributeError):  # JSON of another kind, or none
      ap.error(
        f"argument --report: not a step_time results JSON (models with their timed groups, as "
        f"step_time_full.json): {str(args.report)!r}"
      )
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.report is not None:
    print(report(args.report_payload))
    return 0

  if args.out is None:
    args.out = QUICK_DIR if args.quick else RESULTS_DIR
  if args.models is None:
    args.models = ["mlp"] if args.quick else ["mlp", "transformer", "cnn"]
  size = "tiny" if args.quick else "full"
  units = args.units or (5 if args.quick else 30)
  sweep_units = args.sweep_units or (3 if args.quick else 30)
  warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
  mode = "quick" if args.quick else "full"
  log = lambda s: print(s, flush=True)

  allocator = set_malloc(args)
  info = machine()
  info["allocator"] = allocator
  log(f"{info['cpu']}, {info['cores']} cores, jax {info['jax']}, load {info['loadavg_start']}")
  log(f"allocator: {allocator}")
  results = {}
  t_start = time.perf_counter()
  for name in args.models:
    problem = models.MODELS[name](size)
    n_params = sum(x.size for x in jax.tree.leaves(problem.params))
    log(f"\n== {name}: {problem.description}; {n_params:,} parameters")
    model_res = {"description": problem.description, "n_params": int(n_params), "groups": {}}
    cache: dict = {}
    for gname, configs in planned(args, name).items():
      n_units = units if gname == "main" else sweep_units
      log(f"  group {gname}: {len(configs)} optimizers, {n_units} timed units each")
      rows = run_group(problem, configs, n_units, warmup, cache, log, sweep=gname != "main")
      model_res["groups"][gname] = rows
      log("")
      log(markdown_table(rows))
      if gname in ("freq", "lazy"):
        log(sweep_table(rows, "update_freq"))
      elif gname == "n_samples":
        log(sweep_table(rows, "n_samples"))
      results[name] = model_res
      save(args, argv, mode, info, results, units, sweep_units, warmup, t_start)
    results[name] = model_res

  path = save(args, argv, mode, info, results, units, sweep_units, warmup, t_start)
  elapsed = time.perf_counter() - t_start
  log(f"\nwrote {path} ({elapsed:.0f} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
