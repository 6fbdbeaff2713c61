"""Loss spikes: batches now and then whose loss is far too large, with and without the clip.

A corrupted batch (mislabelled, a unit error, a broken loss scale) can make one step's loss
orders of magnitude too large. Here each step's loss is multiplied by ``--factor`` (1e10) with
probability ``--rate`` (1 %), at the same steps in every row of a seed, on the paper tasks with
``benchmarks/paper``'s trainer (tuned peak rates, warm-up then cosine decay, weight decay 1e-4,
the fused route, every seed of a row vmapped in one compiled run). Rows: AdamW, alone and after
``optax.clip_by_global_norm(1)``; AdaHessian's exact rule and the recommended stabilizers, each
without and with ``curvature_clip=10`` (the recommended ones with 5 too). Every row also trains
on the same batches without spikes (``clean``): where the clip never binds, those runs equal the
row's without the clip.

  python benchmarks/stability/spike.py                # cnn and lm, 4 seeds -> results/spike.json
  python benchmarks/stability/spike.py --tasks cnn --seeds 2
  python benchmarks/stability/spike.py --quick        # a smoke run (QUICK), to a temp dir
  python benchmarks/stability/spike.py --track        # one spike -> results/spike_tracking.json
  python benchmarks/stability/spike.py --ratios       # clean runs -> results/spike_ratios.json

``--track`` measures what the spike does to the preconditioner, with the curvature tools: the
CNN (seed 0) with the recommended stabilizers, without and with ``curvature_clip``, one spiked
batch at step ``TRACK_SPIKE`` of 300; every ``TRACK_EVERY`` steps, on a fixed batch, the loss and
``lr · λ_max(P⁻¹H)`` (``adahessian_jax.hessian.track_curvature``; ``P`` from the state), the
quantity whose size decides whether a step overshoots (above 2) or barely moves (near 0).

``--ratios`` measures, in clean runs, what the clip compares on each refresh step:
``sqrt(mean D²) / sqrt(mean v̂)`` over the model (``D²`` read off ``nu``'s update), per seed its
largest value, where, and its median; the clip binds where it exceeds ``c``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile

import common as C
import jax
import jax.numpy as jnp
import numpy as np
from _args import Distinct, parse_with_quick, positive_float, positive_int
from _common import RECOMMENDED_STABILIZERS as RECOMMENDED  # (examples/_common.py)

import adahessian_jax
from adahessian_jax import hessian

CURVATURE_CLIP = 10.0
# name: (optimizer, keyword arguments of benchmarks/paper/training.make_optimizer)
ROWS = {
  "adamw": ("adamw", {}),
  "adamw_gclip": ("adamw", {"clip_norm": 1.0}),
  "exact": ("adahessian", {}),
  "exact_cclip": ("adahessian", {"curvature_clip": CURVATURE_CLIP}),
  "recommended": ("adahessian", RECOMMENDED),
  "recommended_cclip": ("adahessian", {**RECOMMENDED, "curvature_clip": CURVATURE_CLIP}),
  "recommended_cclip5": ("adahessian", {**RECOMMENDED, "curvature_clip": 5.0}),
}
STEPS = C.PAPER_STEPS
# Peak rates: benchmarks/paper/results/tuning.json (AdamW's best of its grid; AdaHessian 0.47).
TUNED_LR = {
  "adamw": {"cnn": 0.03, "lm": 0.01, "dlrm": 0.03},
  "adahessian": dict.fromkeys(STEPS, C.TUNED_LR),
}
QUICK_STEPS = 4
# --quick's defaults: every code path once (a row without and with the clip, the small CNN), not
# a result: 4 steps are too few to learn, and a run that ends at chance counts as failed.
QUICK = {"tasks": ["cnn"], "rows": ["exact", "exact_cclip"], "seeds": 1}
QUICK_DIR = os.path.join(tempfile.gettempdir(), "adahessian_jax_spike_quick")


def spiky(task, rate: float, factor: float):
  """``task`` whose batches carry a loss scale: ``factor`` with probability ``rate``, else 1.

  The batch itself is drawn from the first half of the step's key, so the same seed gives the
  same batches at every ``rate`` (the clean runs see the spiked runs' data).
  """

  def sample(data, key):
    k_batch, k_spike = jax.random.split(key)
    scale = jnp.where(jax.random.uniform(k_spike) < rate, factor, 1.0)
    return task.sample(data, k_batch), scale

  def loss(params, batch):
    inner, scale = batch
    return scale * task.loss(params, inner)

  return dataclasses.replace(task, loss=loss, sample=sample)


def spike_steps(seed: int, steps: int, rate: float) -> list[int]:
  """The steps whose loss :func:`spiky` scales in the trainer's run of ``seed``."""
  _, k_data, _ = jax.random.split(jax.random.key(seed), 3)
  keys = jax.random.split(k_data, steps)
  u = jax.vmap(lambda k: jax.random.uniform(jax.random.split(k)[1]))(keys)
  return [int(t) for t in np.flatnonzero(np.asarray(u) < rate)]


TRACK_ROWS = ("recommended", "recommended_cclip")
TRACK_SPIKE, TRACK_EVERY = 100, 10


def track(steps: int, spike_at: int, every: int, factor: float, quick: bool = False) -> dict:
  """``--track``: the loss and ``lr · λ_max(P⁻¹H)`` every ``every`` steps around one spike (on
  the small CNN with ``quick``)."""
  base = C.get_task("cnn", quick)
  task = spiky(base, 0.0, factor)  # its loss takes (batch, scale): factor at spike_at
  k_init, k_data, k_probe = jax.random.split(jax.random.key(0), 3)
  probe = base.sample(base.data, jax.random.key(123))
  out = {"steps": steps, "spike_at": spike_at, "every": every, "factor": factor, "rows": {}}
  for row in TRACK_ROWS:
    optimizer, config = ROWS[row]
    lr = TUNED_LR[optimizer]["cnn"]
    tx = C.paper_training.make_optimizer(optimizer, lr, steps, base, **config)
    step = jax.jit(C.paper_training.make_step(tx, task.loss, "fused"))
    lr_at = C.paper_training.schedule(lr, steps)
    params = base.init(k_init)
    opt_state = C.paper_training.reseed_probes(tx.init(params), k_probe)
    record, rows = None, []
    for t, key in enumerate(jax.random.split(k_data, steps)):
      batch, _ = task.sample(base.data, key)
      params, opt_state, _ = step(params, opt_state, (batch, factor if t == spike_at else 1.0))
      if (t + 1) % every:
        continue
      op = hessian.hessian_operator(base.loss, params, probe)
      p = hessian.adahessian_preconditioner(opt_state)
      record = hessian.track_curvature(op, record, preconditioner=p, tol=1e-3)
      lam = record.preconditioned.eigenvalue * float(lr_at(t))
      rows.append({"step": t + 1, "loss": float(op.loss()), "lr_lambda_max": lam})
      print(f"{row:18s} step {t + 1:3d}: loss {rows[-1]['loss']:.4f}  lr·λ_max(P⁻¹H) {lam:.3g}")
    out["rows"][row] = {"config": config, "lr": lr, "measured": rows}
  return out


# (task, update_freq, row) of --ratios; 2 seeds (the DLRM's 1,500 steps: 1).
RATIO_RUNS = (
  ("cnn", 1, "exact"),
  ("cnn", 1, "recommended"),
  ("cnn", 4, "recommended"),
  ("lm", 1, "exact"),
  ("lm", 1, "recommended"),
  ("dlrm", 1, "recommended"),
)


def curvature_ratios(task, update_freq: int, config: dict, seed: int, steps: int) -> np.ndarray:
  """``sqrt(mean D²) / sqrt(mean v̂)`` before each refresh step after the first (NaN elsewhere):
  ``D²`` from ``nu``'s update (``nu' = b2 nu + (1 - b2) D²``), ``v̂`` the bias-corrected ``nu``."""
  b2 = 0.999  # adahessian's default, which make_optimizer keeps
  lr = TUNED_LR["adahessian"][task.name]
  tx = C.paper_training.make_optimizer(
    "adahessian", lr, steps, task, update_freq=update_freq, **config
  )
  k_init, k_data, k_probe = jax.random.split(jax.random.key(seed), 3)
  params = task.init(k_init)
  opt_state = C.paper_training.reseed_probes(tx.init(params), k_probe)
  step = C.paper_training.make_step(tx, task.loss, "fused")
  mean = lambda tree, f: (
    sum(jnp.sum(f(v)) for v in jax.tree.leaves(tree)) / sum(v.size for v in jax.tree.leaves(tree))
  )

  def body(carry, xs):
    params, opt_state = carry
    t, key = xs
    old = adahessian_jax.find_adahessian_state(opt_state).nu
    params, opt_state, _ = step(params, opt_state, task.sample(task.data, key))
    new = adahessian_jax.find_adahessian_state(opt_state).nu
    squares = jax.tree.map(lambda n, o: (jnp.abs(n) - b2 * jnp.abs(o)) / (1 - b2), new, old)
    so_far = mean(old, jnp.abs) / (1 - b2 ** jnp.maximum(t, 1))
    ratio = jnp.sqrt(mean(squares, lambda x: x) / so_far)
    return (params, opt_state), jnp.where((t > 0) & (t % update_freq == 0), ratio, jnp.nan)

  xs = (jnp.arange(steps), jax.random.split(k_data, steps))
  _, ratios = jax.jit(lambda c: jax.lax.scan(body, c, xs))((params, opt_state))
  return np.asarray(ratios)


def ratios(quick: bool) -> dict:
  """``--ratios``: per run of ``RATIO_RUNS`` and seed, the largest ratio, its step, the median."""
  out = {}
  for tname, k, row in RATIO_RUNS:
    task = C.get_task(tname, quick)
    steps = QUICK_STEPS * k if quick else STEPS[tname]
    for seed in range(1 if tname == "dlrm" or quick else 2):
      r = curvature_ratios(task, k, ROWS[row][1], seed, steps)
      ok = np.flatnonzero(np.isfinite(r))
      top = int(ok[np.argmax(r[ok])]) if len(ok) else None
      cell = {
        "max": float(r[top]) if top is not None else None,
        "at_step": None if top is None else top + 1,
        "median": float(np.median(r[ok])) if len(ok) else None,
      }
      out[f"{tname}/k{k}/{row}/seed{seed}"] = cell
      print(f"{tname} k={k} {row:12s} seed {seed}: {cell}", flush=True)
  return out


def train_row(task, row: str, seeds, steps: int) -> list[dict]:
  """One row's runs, one per seed (one compiled program)."""
  optimizer, config = ROWS[row]
  lr = TUNED_LR[optimizer][task.name]
  return C.train(task, optimizer, [lr] * len(seeds), list(seeds), steps, config=config)


def table(store: dict) -> str:
  """The results as a Markdown table: a row per configuration trained, clean and spiky per task."""
  tasks = list(store["tasks"])
  head = ["row"] + [f"{t} {kind}" for t in tasks for kind in ("clean", "spiky")]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for row in ROWS:
    if not any(f"{row}/clean" in store["tasks"][t]["cells"] for t in tasks):
      continue  # not trained
    cells = [row]
    for t in tasks:
      for kind in ("clean", "spiky"):
        cell = store["tasks"][t]["cells"].get(f"{row}/{kind}")
        cells.append(C.cell(cell["summary"], store["tasks"][t]["metric"]) if cell else "")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument(
    "--tasks",
    nargs="+",
    action=Distinct,
    choices=list(STEPS),
    default=["cnn", "lm"],
    help="the paper tasks to train (default: cnn lm)",
  )
  p.add_argument(
    "--rows",
    nargs="+",
    action=Distinct,
    choices=list(ROWS),
    default=list(ROWS),
    help="the rows to train (default: all)",
  )
  p.add_argument("--seeds", type=positive_int, default=4, help="seeds 0..n-1 (default: 4)")
  p.add_argument(
    "--rate", type=positive_float, default=0.01, help="probability of a spike per step (0.01)"
  )
  p.add_argument(
    "--factor", type=positive_float, default=1e10, help="a spiked batch's loss factor (1e10)"
  )
  p.add_argument(
    "--quick",
    action="store_true",
    help=f"a smoke run: {QUICK_STEPS} steps per run of the small tasks, to a temp dir (runs end at "
    "chance: 'failed')",
  )
  p.add_argument(
    "--report", action="store_true", help="instead: print the table of results/OUT.json"
  )
  p.add_argument(
    "--ratios", action="store_true", help="instead: the ratio the clip compares, clean runs"
  )
  p.add_argument(
    "--track",
    action="store_true",
    help=f"instead: the curvature around one spike at step {TRACK_SPIKE} (see above)",
  )
  C.add_output_arguments(p, "spike")
  args = parse_with_quick(p, QUICK, argv)
  if args.rate >= 1:
    p.error(f"--rate must be below 1 (a probability), got {args.rate}")
  args.out_dir = C.output_dir(args, QUICK_DIR)
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  C.paper_cli.enable_compilation_cache()
  if args.report:
    with open(os.path.join(args.out_dir, f"{args.out}.json")) as f:
      store = json.load(f)
    print(table(store))
    return store
  if args.ratios:
    out = {"runs": ratios(args.quick)}
    C.write_json(f"{args.out}_ratios", out, directory=args.out_dir)
    return out
  if args.track:
    steps, spike_at, every = (20, 5, 5) if args.quick else (STEPS["cnn"], TRACK_SPIKE, TRACK_EVERY)
    out = track(steps, spike_at, every, args.factor, args.quick)
    C.write_json(f"{args.out}_tracking", out, directory=args.out_dir)
    return out
  seeds = list(range(args.seeds))
  store = {
    "rate": args.rate,
    "factor": args.factor,
    "curvature_clip": CURVATURE_CLIP,
    "rows": ROWS,
    "tuned_lr": TUNED_LR,
    "tasks": {},
  }
  for tname in args.tasks:
    base = C.get_task(tname, args.quick)
    steps = QUICK_STEPS if args.quick else STEPS[tname]
    spikes = {seed: spike_steps(seed, steps, args.rate) for seed in seeds}
    out = store["tasks"][tname] = {"steps": steps, "metric": base.metric, "spikes": spikes}
    print(f"{tname}: spiked steps per seed {spikes}", flush=True)
    cells = out["cells"] = {}
    for kind, rate in (("clean", 0.0), ("spiky", args.rate)):
      task = spiky(base, rate, args.factor)
      for row in args.rows:
        recs = train_row(task, row, seeds, steps)
        s = C.summarize(recs, base.metric, tname)
        cells[f"{row}/{kind}"] = {"summary": s, "runs": recs}
        print(f"{tname} {row:18s} {kind}: {C.cell(s, base.metric)}", flush=True)
    C.write_json(args.out, store, directory=args.out_dir)
  print(table(store))
  if args.quick:
    print(C.quick_note(QUICK_STEPS))
  return store


if __name__ == "__main__":
  main()
