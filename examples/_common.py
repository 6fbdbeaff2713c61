"""Shared parts of the paper-domain examples: arguments, training loop, tuning, summary, plot.

:func:`make_step` is also the training step of the benchmarks (``benchmarks/``), which import this
module; so it imports matplotlib only when plotting.

Every optimizer in an example sees the same initial parameters and the same sequence of
mini-batches (both drawn from ``--seed``), and is evaluated on the same held-out split at the
same steps. AdaHessian uses the fused route
(``adahessian_jax.value_grad_and_hessian_diag``); the other optimizers use the usual
``jax.value_and_grad`` step. The reported training time excludes compilation (timed separately)
and evaluation.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import dataclasses
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from _args import (
  comma_list,
  name_value,
  out_dir,
  positive_float,
  positive_int,
  random_seed,
  write_json,
)

import adahessian_jax

try:
  from tqdm.auto import tqdm
except ImportError:  # tqdm is optional: fall back to a plain printed bar
  tqdm = None

HERE = os.path.dirname(os.path.abspath(__file__))
#: The 1-, 5- and 15-minute load averages when the example started (its timings mean something
#: only on an idle machine), recorded in its JSON with those at the end.
LOAD_AVERAGE_AT_START = list(os.getloadavg())
#: The README's recommended AdaHessian stabilizers (docs/stability.md), shared by the benchmarks.
RECOMMENDED_STABILIZERS = {"curvature_floor": 0.3, "update_clip": 0.05}
DEFAULT_OUT = os.path.join(HERE, "figures")
COLORS = {
  "AdaHessian": "tab:red",
  "Adam": "tab:blue",
  "AdamW": "tab:blue",
  "SGD+momentum": "tab:green",
  "Adagrad": "tab:purple",
}


@dataclasses.dataclass
class Optimizer:
  """An optimizer to compare.

  Attributes:
    name: Display name.
    make: ``make(lr, steps) -> optax.GradientTransformation``; ``lr`` is the peak learning rate,
      ``steps`` the run's length (for schedules).
    lr: The learning rate used by default (picked with ``--tune``, see the docs).
    grid: The learning rates tried by ``--tune``.
    hessian: Whether ``make`` returns an AdaHessian transform (then the fused route is used).
  """

  name: str
  make: Callable[[float, int], optax.GradientTransformation]
  lr: float
  grid: Sequence[float]
  hessian: bool = False


@dataclasses.dataclass
class Run:
  """The record of one training run."""

  name: str
  lr: float
  steps: list[int]  # steps at which the model was evaluated (0 = initialisation)
  train_loss: list[float]  # mean mini-batch loss over the steps since the previous evaluation
  val: dict[str, list[float]]  # metric name -> values at ``steps``
  time: list[float]  # cumulative training seconds at ``steps``
  compile_s: float
  diverged: bool = False

  @property
  def train_s(self) -> float:
    return self.time[-1]

  @classmethod
  def start(cls, name: str, lr: float, metrics: dict[str, float], compile_s: float) -> Run:
    """The record of a run before its first step: ``metrics`` of the initial parameters."""
    val = {k: [float(v)] for k, v in metrics.items()}
    return cls(name, lr, [0], [math.nan], val, [0.0], compile_s)

  def record(self, step: int, window: Sequence[float], seconds: float, metrics, bar=None) -> None:
    """Appends an evaluation and shows it on the progress bar ``bar`` (if any).

    Args:
      step: The number of steps trained.
      window: The mini-batch losses since the previous evaluation.
      seconds: Cumulative training seconds.
      metrics: The held-out metrics, or ``None`` once the run diverged (recorded as NaN).
    """
    self.steps.append(step)
    self.train_loss.append(float(np.mean(window)))
    self.time.append(seconds)
    for k in self.val:
      self.val[k].append(math.nan if metrics is None else float(metrics[k]))
    if bar is not None:
      bar.set_postfix_str(
        f"train {self.train_loss[-1]:.4f} val {self.val['loss'][-1]:.4f}", refresh=False
      )


def glibc_mallopt() -> Callable[[int, int], int] | None:
  """glibc's ``mallopt(param, value)`` (1 on success), or ``None`` where there is none."""
  try:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
  except (OSError, AttributeError):
    return None


def keep_freed_memory() -> str:
  """Makes glibc's malloc keep freed large blocks for reuse instead of unmapping them.

  XLA:CPU allocates each call's temporary buffer afresh. By default glibc serves a block over
  its largest mmap threshold (32 MiB) with new pages from the kernel and unmaps it on free, so a
  program whose temporaries exceed 32 MiB pays a page fault and a zeroed page per 4 KiB on every
  call, while a smaller one reuses its heap. A second-order step has about twice a first-order
  step's temporaries, so the default allocator charges it more than its FLOPs. This sets three
  of glibc's ``mallopt`` parameters: no mmap for allocations (``M_MMAP_MAX=0``), no return of
  freed memory at a heap's top (``M_TRIM_THRESHOLD``), and a 64 MiB top pad (``M_TOP_PAD``), which
  also stops a thread's arena from unmapping an emptied heap. Each thread keeps its own arena: a
  single arena (``M_ARENA_MAX=1``) would also cover larger blocks, but it made Adam's step 6-35 %
  slower here (``benchmarks/allocator.py``).

  Limit: a thread's arena grows in heaps of at most 64 MiB, and glibc maps a larger block from
  the kernel regardless of ``M_MMAP_MAX``; so a program with a temporary block over 64 MiB, run
  on XLA's worker threads, still faults it in at every call. (``jax_cpu_enable_async_dispatch``
  off runs programs on the calling thread, whose arena has no such limit, at some cost in
  dispatch.)

  The benchmarks call it before they build anything, for every optimizer alike (their warm-up
  covers the first calls, over which the heaps may still grow). The process then keeps its peak
  memory until it exits.

  Returns:
    A description of the allocator setting, for the results file.
  """
  mallopt = glibc_mallopt()
  if mallopt is None:
    return "default (no glibc mallopt)"
  m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4  # <malloc.h>
  settings = ((m_mmap_max, 0), (m_trim_threshold, 2**31 - 1), (m_top_pad, 64 << 20))
  if not all(mallopt(param, value) == 1 for param, value in settings):
    return "default (mallopt refused)"
  return (
    "glibc, freed blocks kept (mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=2**31-1, M_TOP_PAD=64 MiB)"
  )


def add_malloc_flag(p: argparse.ArgumentParser) -> None:
  """Adds ``--default-malloc`` (a benchmark's opt-out of :func:`keep_freed_memory`)."""
  p.add_argument(
    "--default-malloc",
    action="store_true",
    help="leave glibc's malloc as it is (by default large freed blocks are kept for reuse; "
    "see examples/_common.keep_freed_memory)",
  )


def set_malloc(args: argparse.Namespace) -> str:
  """Applies :func:`keep_freed_memory` unless ``--default-malloc``; returns what was set."""
  return "default" if args.default_malloc else keep_freed_memory()


class _ComparisonParser(argparse.ArgumentParser):
  """Checks ``--lr`` against itself and ``--only`` once both are parsed: a name given twice kept
  its last rate, and a rate for an optimizer ``--only`` leaves out was dropped, without a word."""

  def parse_known_args(self, args=None, namespace=None):
    parsed, rest = super().parse_known_args(args, namespace)
    names = [name for name, _ in getattr(parsed, "lr", [])]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
      self.error(f"argument --lr: {twice[0]} is given twice; give each optimizer's rate once")
    only = getattr(parsed, "only", None)
    unused = [n for n in names if only is not None and n not in only]
    if unused:
      self.error(
        f"argument --lr: {unused[0]} is not among --only {','.join(only)}, so its rate would "
        "not be used"
      )
    return parsed, rest


def parser(
  description: str, steps: int, quick_steps: int, names: Sequence[str], tune: bool = True
) -> argparse.ArgumentParser:
  """The command line of an example that compares the optimizers ``names``.

  ``--lr NAME=LR`` and ``--only NAME[,NAME]`` are checked against ``names`` when parsed
  (case-insensitively): ``args.lr`` is a list of ``(name, lr)``, ``args.only`` a list of names or
  ``None`` (all). ``tune=False`` leaves out ``--tune`` (an example that has no grids to sweep).
  """
  p = _ComparisonParser(
    description=description, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument(
    "--steps", type=positive_int, default=None, help=f"training steps (default {steps})"
  )
  p.add_argument(
    "--seed", type=random_seed, default=0, help="seed of data split, init and batches (default 0)"
  )
  p.add_argument(
    "--quick",
    action="store_true",
    help=f"tiny model and {quick_steps} steps: a smoke test that runs in seconds",
  )
  p.add_argument(
    "--out",
    type=out_dir,
    default=None,
    help="directory for the PNG and JSON summary (default examples/figures/, with --quick "
    "examples/figures/quick/ so the committed figures are not overwritten)",
  )
  p.add_argument(
    "--lr",
    action="append",
    type=name_value(names, positive_float, ignore_case=True),
    default=[],
    metavar="NAME=LR",
    help=f"override an optimizer's learning rate, e.g. --lr {names[0]}=0.1 (repeatable; NAME "
    f"one of {', '.join(names)})",
  )
  if tune:
    p.add_argument(
      "--tune",
      action="store_true",
      help="first sweep every optimizer's learning-rate grid (same budget each) and use the "
      "learning rate with the lowest final validation loss (an optimizer given --lr is not swept)",
    )
  p.add_argument(
    "--only",
    type=comma_list(names, ignore_case=True),
    default=None,
    metavar="NAME[,NAME]",
    help=f"run only these optimizers (of {', '.join(names)})",
  )
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.set_defaults(default_steps=steps, quick_steps=quick_steps)
  return p


def resolve_steps(args) -> int:
  """The number of steps to run; also fills in the default output directory."""
  if args.out is None:
    args.out = os.path.join(DEFAULT_OUT, "quick") if args.quick else DEFAULT_OUT
  if args.steps is not None:
    return args.steps
  return args.quick_steps if args.quick else args.default_steps


class _Bar:
  """A minimal text progress bar for when tqdm is not installed."""

  def __init__(self, total, desc):
    self.total, self.desc, self.n, self.post, self._last = total, desc, 0, "", -1

  def update(self, n=1):
    self.n += n
    pct = int(100 * self.n / max(self.total, 1))
    if pct // 5 != self._last // 5 or self.n == self.total:
      self._last = pct
      bar = "#" * (pct // 5) + "." * (20 - pct // 5)
      sys.stderr.write(f"\r{self.desc} [{bar}] {self.n}/{self.total} {self.post}")
      sys.stderr.flush()

  def set_postfix_str(self, s, refresh=True):
    self.post = s

  def close(self):
    sys.stderr.write("\n")


def progress_bar(total: int, desc: str, disable: bool):
  if disable:
    return None
  if tqdm is not None:
    return tqdm(total=total, desc=desc, leave=True, dynamic_ncols=True, mininterval=1.0)
  return _Bar(total, desc)


ROUTES = ("plain", "fused", "value_fn", "obj_fn")


def make_step(
  tx: optax.GradientTransformation,
  loss_fn: Callable,
  route: str = "plain",
  refresh: bool | None = None,
):
  """The training step ``(params, opt_state, batch) -> (params, opt_state, loss)``, not jitted.

  Args:
    tx: The optimizer.
    loss_fn: ``loss_fn(params, batch)``, a scalar.
    route: What ``tx.update`` gets besides the gradient. ``"plain"``: nothing (first-order
      optimizers). ``"fused"``: AdaHessian's Hessian-diagonal estimate from the same pass as the
      gradient (:func:`adahessian_jax.value_grad_and_hessian_diag`) as ``hessian_diag``.
      ``"value_fn"``: the loss on the batch as ``value_fn`` (AdaHessian's closure route).
      ``"obj_fn"``: the loss on the batch as ``obj_fn`` (``optax.contrib.sophia``).
    refresh: For the fused route with ``update_freq > 1``: ``None`` follows the schedule in the
      state (``lax.cond`` under ``jit``); a Python bool fixes the step to a refresh (``True``) or a
      non-refresh step (``False``), decided on the host, with no conditional.

  Returns:
    The step function.
  """
  if route not in ROUTES:
    raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
  if refresh is not None and route != "fused":
    raise ValueError(f"refresh is for the fused route, got route={route!r}")
  if route == "fused":
    value_grad_hdiag = adahessian_jax.value_grad_and_hessian_diag(loss_fn, refresh=refresh)

  def step(params, opt_state, batch):
    if route == "fused":
      loss, grads, hdiag = value_grad_hdiag(params, opt_state, batch)
      extra = {"hessian_diag": hdiag}
      if refresh is not None:
        extra["refresh"] = refresh
    else:
      loss, grads = jax.value_and_grad(loss_fn)(params, batch)
      extra = {} if route == "plain" else {route: lambda p: loss_fn(p, batch)}
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def train(
  opt: Optimizer,
  lr: float,
  params: Any,
  loss_fn: Callable,
  batches: Callable[[np.random.Generator], Iterator[Any]],
  evaluate: Callable[[Any], dict[str, float]],
  steps: int,
  eval_every: int,
  seed: int,
  progress: bool = True,
  desc: str | None = None,
) -> Run:
  """Trains one optimizer from ``params``.

  ``batches(rng)`` yields the training batches; ``evaluate(params)`` returns the held-out metrics,
  including "loss".
  """
  tx = opt.make(lr, steps)
  opt_state = tx.init(params)
  stream = batches(np.random.default_rng(seed + 1))  # the same batches for every optimizer
  batch = next(stream)
  t0 = time.perf_counter()
  step = jax.jit(make_step(tx, loss_fn, "fused" if opt.hessian else "plain"))
  step = step.lower(params, opt_state, batch).compile()
  compile_s = time.perf_counter() - t0

  run = Run.start(opt.name, lr, evaluate(params), compile_s)
  bar = progress_bar(steps, desc or f"{opt.name} lr={lr:g}", not progress)
  elapsed, window = 0.0, []
  for i in range(1, steps + 1):
    t0 = time.perf_counter()
    params, opt_state, loss = step(params, opt_state, batch)
    loss = float(loss)  # waits for the step
    elapsed += time.perf_counter() - t0
    window.append(loss)
    if not math.isfinite(loss):
      run.diverged = True
    batch = next(stream)
    if bar is not None:
      bar.update(1)
    if i % eval_every == 0 or i == steps or run.diverged:
      # A step's loss is of the parameters before it: the last step's own blow-up shows here only.
      run.diverged = run.diverged or not finite(params)
      run.record(i, window, elapsed, None if run.diverged else evaluate(params), bar)
      window = []
    if run.diverged:
      break
  if bar is not None:
    bar.close()
  return run


def finite(tree: Any) -> bool:
  """Whether every entry of the arrays in ``tree`` is finite."""
  return all(bool(np.isfinite(x).all()) for x in jax.tree.leaves(tree))


def tune(optimizers, params, loss_fn, batches, evaluate, steps, eval_every, seed, progress):
  """Sweeps every optimizer's grid with the same budget; sets ``opt.lr`` to the best one.

  The criterion is the final validation loss. Returns ``{name: {lr: final val loss}}``.
  """
  table = {}
  for opt in optimizers:
    results = {}
    for lr in opt.grid:
      run = train(
        opt,
        lr,
        params,
        loss_fn,
        batches,
        evaluate,
        steps,
        eval_every,
        seed,
        progress,
        desc=f"tune {opt.name} lr={lr:g}",
      )
      results[lr] = math.inf if run.diverged else run.val["loss"][-1]
    opt.lr = min(results, key=results.get)
    table[opt.name] = results
  print("\nLearning-rate sweep (final validation loss; inf = diverged):")
  for name, results in table.items():
    cells = "  ".join(
      f"{lr:g}: {v:.4f}{'*' if v == min(results.values()) else ''}" for lr, v in results.items()
    )
    print(f"  {name:<12} {cells}")
  return table


def summarize(
  example: str,
  runs: list[Run],
  metric: str,
  metric_label: str,
  out: str,
  args,
  extra: dict | None = None,
  tuning: dict | None = None,
) -> dict:
  """Prints the summary table and writes ``<out>/<example>.json``."""
  header = (
    f"{'optimizer':<12} {'lr':>8} {'train loss':>11} {'val loss: start -> end':>22} "
    f"{metric_label:>10} "
    f"{'best ' + metric_label:>14} {'train s':>8} {'ms/step':>8} {'compile s':>9}"
  )
  print("\n" + header + "\n" + "-" * len(header))
  summary = {
    "example": example,
    "command": command_line(),
    "steps": resolve_steps(args),  # not a run's last step: a diverged run stopped early
    "seed": args.seed,
    "quick": bool(args.quick),
    "load_average_at_start": LOAD_AVERAGE_AT_START,
    "load_average_at_end": list(os.getloadavg()),
    "metric": metric,
    "optimizers": {},
  }
  if extra:
    summary.update(extra)
  if tuning:
    summary["lr_sweep"] = {n: {f"{lr:g}": v for lr, v in r.items()} for n, r in tuning.items()}
  higher_better = metric != "loss"
  for r in runs:
    vals = r.val[metric]
    best = (np.nanmax if higher_better else np.nanmin)(vals)
    n_steps = r.steps[-1]
    ms = 1000 * r.train_s / max(n_steps, 1)
    print(
      f"{r.name:<12} {r.lr:>8g} {r.train_loss[-1]:>11.4f} "
      f"{r.val['loss'][0]:>12.4f} -> {r.val['loss'][-1]:<6.4f} "
      f"{vals[-1]:>10.4f} {best:>14.4f} {r.train_s:>8.1f} {ms:>8.2f} {r.compile_s:>9.1f}"
      + ("  DIVERGED" if r.diverged else "")
    )
    summary["optimizers"][r.name] = {
      "lr": r.lr,
      "diverged": r.diverged,
      "first_train_loss": r.train_loss[1] if len(r.train_loss) > 1 else math.nan,
      "final_train_loss": r.train_loss[-1],
      "final_val_loss": r.val["loss"][-1],
      f"final_val_{metric}": vals[-1],
      f"best_val_{metric}": float(best),
      "train_seconds": round(r.train_s, 3),
      "ms_per_step": round(ms, 3),
      "compile_seconds": round(r.compile_s, 3),
      "curves": {
        "step": r.steps,
        "train_loss": [_round(v) for v in r.train_loss],
        "train_seconds": [round(t, 3) for t in r.time],
        **{f"val_{k}": [_round(v) for v in vs] for k, vs in r.val.items()},
      },
    }
  print(f"wrote {write_json(os.path.join(out, f'{example}.json'), summary)}")
  return summary


def _round(v: float) -> float:
  return v if not math.isfinite(v) else float(f"{v:.5g}")


def plot(
  example: str,
  runs: list[Run],
  metric: str,
  metric_label: str,
  title: str,
  out: str,
  reference: dict[str, float] | None = None,
) -> str:
  """Four panels: train loss and validation loss vs step; the metric vs step and vs seconds."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(2, 2, figsize=(10, 7), dpi=90)
  (ax_tr, ax_vl), (ax_m, ax_t) = axes
  for r in runs:
    c = COLORS.get(r.name)
    label = f"{r.name} (lr {r.lr:g})"
    ax_tr.plot(r.steps[1:], r.train_loss[1:], color=c, label=label)
    ax_vl.plot(r.steps, r.val["loss"], color=c, label=label)
    ax_m.plot(r.steps, r.val[metric], color=c, label=label)
    ax_t.plot(r.time, r.val[metric], color=c, label=label)
  for ax, name in ((ax_vl, "loss"), (ax_m, metric), (ax_t, metric)):
    if reference and name in reference:
      ax.axhline(reference[name], color="k", ls=":", lw=1, label="generator (oracle)")
  ax_tr.set(xlabel="step", ylabel="train loss (mean over interval)", title="training loss")
  ax_vl.set(xlabel="step", ylabel="validation loss", title="validation loss")
  ax_m.set(xlabel="step", ylabel=metric_label, title=f"validation {metric_label}")
  ax_t.set(
    xlabel="training seconds (excl. compile, eval)",
    ylabel=metric_label,
    title=f"validation {metric_label} vs wall clock",
  )
  for ax in axes.flat:
    ax.grid(alpha=0.3)
  tr = np.concatenate([np.asarray(r.train_loss[1:], dtype=float) for r in runs])
  tr = tr[np.isfinite(tr) & (tr > 0)]
  if tr.size and tr.max() / tr.min() > 30:  # log scale only where it spans decades
    ax_tr.set_yscale("log")
  else:
    _zoom(ax_tr, [r.train_loss[1:] for r in runs], high=100)
  ref = reference or {}
  _zoom(ax_vl, [r.val["loss"] for r in runs] + [[ref["loss"]] if "loss" in ref else []])
  skip = max(len(runs[0].steps) // 10, 1)  # the metric's axes start after the first 10 %
  for ax in (ax_m, ax_t):
    series = [r.val[metric][skip:] for r in runs] + [[ref[metric]] if metric in ref else []]
    _zoom(ax, series, high=100)
  ax_vl.legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, f"{example}.png")
  fig.savefig(path)
  plt.close(fig)
  print(f"wrote {path}")
  return path


def _zoom(ax, series, high=95):
  """Clips the y axis so that a huge first value does not flatten the rest of the curves."""
  vals = np.concatenate([np.asarray(s, dtype=float) for s in series])
  vals = vals[np.isfinite(vals)]
  if vals.size:
    lo, hi = vals.min(), np.percentile(vals, high)
    if hi == lo:  # one finite value (a run that diverged at once): Matplotlib's own limits
      return
    ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.1 * (hi - lo))


def param_count(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def tree_bytes(tree) -> int:
  """The bytes of a pytree's arrays (or ``jax.ShapeDtypeStruct`` leaves)."""
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def command_line(argv: Sequence[str] | None = None) -> str:
  """The command that ran this script, for its results file: shell-quoted (a JSON argument
  pastes back as it was given), the script's path from the repository root.

  Args:
    argv: The arguments (default ``sys.argv[1:]``).
  """
  script = os.path.relpath(os.path.abspath(sys.argv[0]), os.path.dirname(HERE))
  return shlex.join(["python", script, *(sys.argv[1:] if argv is None else argv)])


def compare(optimizers, params, loss_fn, batches, evaluate, steps, eval_every, args):
  """Optionally tunes, then trains every optimizer; returns (runs, tuning table or None).

  ``--tune`` sweeps the optimizers whose rate ``--lr`` does not set: the sweep overwrote a rate
  given with ``--lr`` without a word, and a rate typed out is the one meant.
  """
  by_name = {o.name: o for o in optimizers}
  for name, lr in args.lr:  # checked against the names when parsed
    by_name[name].lr = lr
  optimizers = [o for o in optimizers if args.only is None or o.name in args.only]
  tuning = None
  progress = not args.no_progress
  given = dict(args.lr)
  swept = [o for o in optimizers if o.name not in given]
  if args.tune:
    for o in optimizers:
      if o.name in given:
        print(f"--tune: {o.name} is not swept, its learning rate {o.lr:g} is set by --lr")
  if args.tune and swept:
    tuning = tune(swept, params, loss_fn, batches, evaluate, steps, eval_every, args.seed, progress)
  runs = []
  for opt in optimizers:
    runs.append(
      train(opt, opt.lr, params, loss_fn, batches, evaluate, steps, eval_every, args.seed, progress)
    )
  return runs, tuning


def digits_images() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's handwritten digits as images (``load_digits``, bundled with it).

  Returns:
    ``(x, y)``: ``x`` float32 ``(1797, 8, 8, 1)`` in ``[0, 1]``, ``y`` the int32 labels 0-9.
  """
  from sklearn.datasets import load_digits

  digits = load_digits()
  return (digits.images / 16.0).astype(np.float32)[..., None], digits.target.astype(np.int32)


class DigitsCNN(nn.Module):
  """The digits CNN of the vision examples: two 3x3 convolutions (``width`` and ``2·width``
  channels, ReLU), 2x2 average pooling, a dense layer of 64 and the 10 logits."""

  width: int = 16

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(self.width, (3, 3))(x))
    x = nn.relu(nn.Conv(2 * self.width, (3, 3))(x))
    x = nn.avg_pool(x, (2, 2), (2, 2))  # 8x8 -> 4x4
    x = nn.relu(nn.Dense(64)(x.reshape((x.shape[0], -1))))
    return nn.Dense(10)(x)


def pydoc_text(val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """CPython's bundled help texts (``pydoc_data.topics``) as character ids.

  The topics are concatenated in sorted order; the last ``val_fraction`` of the characters is the
  held-out split.

  Returns:
    ``(train_ids, val_ids, chars)``: int32 ids into ``chars``, the sorted distinct characters.
  """
  from pydoc_data.topics import topics

  text = "\n\n".join(topics[k] for k in sorted(topics))
  chars = sorted(set(text))
  lookup = {c: i for i, c in enumerate(chars)}
  data = np.array([lookup[c] for c in text], dtype=np.int32)
  split = int((1 - val_fraction) * len(data))
  return data[:split], data[split:], chars


def check_context(p: argparse.ArgumentParser, context: int) -> None:
  """Refuses, as a usage error, a ``--context`` whose windows (``context + 1`` characters) the
  validation text of :func:`pydoc_text` cannot hold, before the model is built."""
  n = len(pydoc_text()[1])
  if context > n - 2:  # windows start in [0, n - context - 1)
    p.error(
      f"argument --context: must be at most {n - 2:,} (the validation text has {n:,} "
      f"characters), got {context:,}"
    )


def shuffled_batches(rng: np.random.Generator, arrays: Sequence[np.ndarray], batch_size: int):
  """Yields mini-batches of ``arrays`` forever, reshuffled every epoch (the last partial batch
  of an epoch is dropped).

  Raises:
    ValueError: When ``batch_size`` exceeds the number of examples (no batch would come).
  """
  n = len(arrays[0])
  if batch_size > n:
    raise ValueError(f"--batch-size {batch_size} exceeds the {n} training examples")
  while True:
    perm = rng.permutation(n)
    for i in range(0, n - batch_size + 1, batch_size):
      idx = perm[i : i + batch_size]
      yield tuple(a[idx] for a in arrays)
