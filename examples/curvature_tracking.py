"""Sharpness and preconditioned sharpness during training: AdaHessian and Adam on the digits CNN.

Trains the paper benchmark's digits CNN (two 3x3 convolutions, average pooling, two dense layers;
batch 32, 10 % linear warm-up then cosine decay to lr/10) with AdaHessian and with Adam, each at
its tuned peak learning rate (0.47 and 0.03, benchmarks/PAPER.md) and at 2x, and every few steps
measures on a fixed set of training digits:

* the sharpness ``λ_max(H)``, the top eigenvalue of the loss Hessian;
* the preconditioned sharpness ``λ_max(P⁻¹H)`` with the optimizer's own diagonal ``P`` from its
  state (AdaHessian: ``v̂^{k/2} + eps``; Adam: ``sqrt(v̂) + eps``).

The step along the top eigenvector of ``P⁻¹H`` overshoots when ``lr·λ_max(P⁻¹H) > 2`` without
momentum, ``2(1+β₁)/(1−β₁) = 38`` with the EMA momentum both optimizers use; the figure draws
both thresholds. Each measurement is warm-started from the previous Ritz vectors
(``adahessian_jax.hessian.track_curvature``); ``--compare-cold`` also runs each one from a random
start, records both product counts and checks both values against a converged cold start (the
table in docs/hessian_analysis.md). At the end it
draws filter-normalised 1-D and 2-D loss landscapes (Li et al. 2018) around the 1x solutions.

Run:  python examples/curvature_tracking.py                 # ~3 minutes on 2 CPU cores
      python examples/curvature_tracking.py --compare-cold  # + cold starts, for the table
      python examples/curvature_tracking.py --quick         # a smoke test, seconds

Writes curvature_tracking.png, curvature_landscapes.png and curvature_tracking.json to
examples/figures/ (examples/figures/quick/ with --quick; ``--out`` to change).
"""

import argparse
import os
import time

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import _common  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _args import nonnegative_float, out_dir, positive_int, random_seed, write_json  # noqa: E402

import adahessian_jax  # noqa: E402
from adahessian_jax import hessian  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
B1 = 0.9  # both optimizers' momentum
TUNED = {"AdaHessian": 0.47, "Adam": 0.03}
COLORS = {"AdaHessian": "tab:red", "Adam": "tab:blue"}


def schedule(lr, steps):
  """10 % linear warm-up, then cosine decay to lr/10 (the paper benchmarks' schedule)."""
  return optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 10, 1), steps, lr / 10)


def optimizer(name, lr, steps, curvature_floor=0.0):
  """The transform and the function that reads its diagonal preconditioner ``P`` from a state."""
  if name == "AdaHessian":
    tx = adahessian_jax.adahessian(schedule(lr, steps), b1=B1, curvature_floor=curvature_floor)
    return tx, hessian.adahessian_preconditioner
  return optax.adam(schedule(lr, steps), b1=B1), hessian.adam_preconditioner


def load(seed):
  x, y = _common.digits_images()
  perm = np.random.default_rng(seed).permutation(len(y))
  val, train = perm[: len(y) // 4], perm[len(y) // 4 :]
  return (x[train], y[train]), (x[val], y[val])


def problem(seed, width, probe):
  """What every run shares: training data, initial params, loss and the probe batch measured on."""
  train, _ = load(seed)
  model = _common.DigitsCNN(width)
  init = model.init(jax.random.key(seed), train[0][:1])["params"]
  probe_batch = (jnp.asarray(train[0][:probe]), jnp.asarray(train[1][:probe]))

  def loss_fn(params, batch):
    logits = model.apply({"params": params}, batch[0])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

  return train, init, loss_fn, probe_batch


def make_step(name, tx, loss_fn):
  # AdaHessian by the fused route: loss, gradient and Hessian probe in one pass.
  return jax.jit(_common.make_step(tx, loss_fn, "fused" if name == "AdaHessian" else "plain"))


def run(name, scale, init, loss_fn, train, probe_batch, cfg, compare_cold):
  """Trains one optimizer at ``scale`` x its tuned rate, tracking the curvature every few steps."""
  lr = TUNED[name] * scale
  tx, preconditioner = optimizer(name, lr, cfg["steps"], cfg["curvature_floor"])
  step = make_step(name, tx, loss_fn)
  params, opt_state = init, tx.init(init)
  rng = np.random.default_rng(cfg["seed"])
  x, y = train
  out = dict(name=name, scale=scale, lr=lr, steps=[], loss=[], measured=[], lr_at=[])
  keys = ("warm_matvecs", "cold_matvecs", "max_rel_diff", "warm_rel_err", "cold_rel_err")
  for key in ("sharpness", "preconditioned") + keys:
    out[key] = []
  record, window = None, []
  for t in range(1, cfg["steps"] + 1):
    idx = rng.integers(0, len(x), cfg["batch"])
    params, opt_state, loss = step(params, opt_state, (x[idx], y[idx]))
    window.append(float(loss))
    if not np.isfinite(window[-1]):
      out["diverged_at"] = t
      break
    if t % cfg["every"] and t != 1:
      continue
    out["steps"].append(t)
    out["loss"].append(float(np.mean(window)))
    window = []
    op = hessian.hessian_operator(loss_fn, params, probe_batch)
    p = preconditioner(opt_state)
    try:
      record = hessian.track_curvature(
        op, record, preconditioner=p, tol=cfg["tol"], block_size=cfg["block_size"]
      )
    except hessian.NonFiniteError:  # the run is diverging: record and stop measuring
      out["diverged_at"] = t
      break
    out["measured"].append(t)
    out["lr_at"].append(float(schedule(lr, cfg["steps"])(t - 1)))
    out["sharpness"].append(record.sharpness.eigenvalue)
    out["preconditioned"].append(record.preconditioned.eigenvalue)
    out["warm_matvecs"].append(record.num_matvecs)
    if compare_cold:
      key = jax.random.key(1000 + t)
      cold = hessian.track_curvature(
        op, None, preconditioner=p, tol=cfg["tol"], key=key, block_size=cfg["block_size"]
      )
      out["cold_matvecs"].append(cold.num_matvecs)
      pairs = [(record.sharpness, cold.sharpness), (record.preconditioned, cold.preconditioned)]
      out["max_rel_diff"].append(
        max(abs(a.eigenvalue - b.eigenvalue) / abs(b.eigenvalue) for a, b in pairs)
      )
      if not cfg["reference"]:
        continue
      # Both against a converged cold start (estimated error 1e-6; not counted).
      refs = [
        hessian.top_eigenvalues(o, tol=1e-6, stop_on="eigenvalue", max_iter=150).eigenvalues[0]
        for o in (op, hessian.preconditioned_operator(op, p))
      ]
      for name_, rec in (("warm_rel_err", record), ("cold_rel_err", cold)):
        got = (rec.sharpness.eigenvalue, rec.preconditioned.eigenvalue)
        out[name_].append(float(max(abs(g - r) / abs(r) for g, r in zip(got, refs, strict=True))))
  out["final_params"] = params
  return out


def plot_tracking(runs, cfg, path):
  names = [n for n in TUNED if any(r["name"] == n for r in runs)]  # one with --only
  title_size = 12 if len(names) > 1 else 10  # one column is narrower
  fig, axes = plt.subplots(
    2, len(names), figsize=(11 if len(names) > 1 else 8, 7), sharex=True, squeeze=False
  )
  for col, name in enumerate(names):
    top, bottom = axes[0, col], axes[1, col]
    for r in (r for r in runs if r["name"] == name):
      style = "-" if r["scale"] == 1 else "--"
      label = f"{r['scale']:g}x (lr {r['lr']:g})"
      top.plot(r["steps"], r["loss"], style, color=COLORS[name], label=label)
      # From the step after the first: at step 1 the warm-up rate is 0 (2/lr infinite) and Adam's
      # P is |g|. (Not ">= every": with --every 1 that kept step 1, a division by zero.)
      keep = np.asarray(r["measured"]) > 1
      t = np.asarray(r["measured"])[keep]
      lr_t = np.asarray(r["lr_at"])[keep]
      pre, sharp = np.asarray(r["preconditioned"])[keep], np.asarray(r["sharpness"])[keep]
      bottom.plot(t, pre, style, color=COLORS[name], label=f"λ_max(P⁻¹H), {label}")
      bottom.plot(t, sharp, style, color="gray", lw=1, label=f"λ_max(H), {label}")
      bottom.plot(t, 2 / lr_t, style, color="k", lw=0.8, label=f"2/lr, {r['scale']:g}x")
      bottom.plot(t, 2 * (1 + B1) / (1 - B1) / lr_t, style, color="k", lw=0.4)
      if "diverged_at" in r:
        top.axvline(r["diverged_at"], color=COLORS[name], ls=":", lw=1)
    top.set_yscale("log")
    top.set_title(f"{name}: training loss (batch means)")
    top.legend(fontsize=8)
    bottom.set_yscale("log")
    bottom.set_xlabel("step")
    bottom.set_title(
      f"{name}: sharpness (gray), preconditioned (color); thin: 38/lr",
      fontsize=title_size,
    )
    bottom.legend(fontsize=6, ncol=2)
  fig.suptitle(
    f"Digits CNN, {cfg['num_params']:,} params; curvature of the loss on {cfg['probe']} "
    "training digits",
    fontsize=title_size,
  )
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def plot_landscapes(runs, loss_fn, probe_batch, cfg, path):
  """Filter-normalised random-direction landscapes (Li et al. 2018) at the 1x solutions."""
  solutions = [r for r in runs if r["scale"] == 1 and "diverged_at" not in r]
  fig, axes = plt.subplots(1, 1 + len(solutions), figsize=(4.2 * (1 + len(solutions)), 3.6))
  line = np.linspace(-1.0, 1.0, cfg["grid_1d"])
  grid = np.linspace(-1.0, 1.0, cfg["grid_2d"])
  for i, r in enumerate(solutions):
    op = hessian.hessian_operator(loss_fn, r["final_params"], probe_batch)
    d1, d2 = (hessian.random_direction(op, jax.random.key(k)) for k in (1, 2))
    ls1 = hessian.loss_landscape_1d(op, line, d1, normalize="filter")
    hessian.plot_landscape_1d(ls1, axes[0], label=r["name"], color=COLORS[r["name"]])
    ls2 = hessian.loss_landscape_2d(op, grid, grid, (d1, d2), normalize="filter")
    hessian.plot_landscape_2d(ls2, axes[1 + i], levels=15, log=True, cmap="viridis")
    axes[1 + i].set_title(f"{r['name']} 1x: log10 loss, filter-normalised")
  axes[0].set_yscale("log")
  axes[0].set_title("loss along a filter-normalised direction")
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def configure(argv=None) -> tuple[argparse.Namespace, dict]:
  """The command line's arguments and the run's configuration."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny model, few steps: seconds")
  parser.add_argument("--compare-cold", action="store_true", help="also measure from cold starts")
  parser.add_argument(
    "--seed", type=random_seed, default=0, help="seed of data split, init and batches (default 0)"
  )
  parser.add_argument(
    "--steps", type=positive_int, default=None, help="training steps (default 300; --quick: 8)"
  )
  parser.add_argument(
    "--every",
    type=positive_int,
    default=None,
    help="steps between measurements (default 10; --quick: 4)",
  )
  parser.add_argument("--only", default=None, choices=list(TUNED), help="one optimizer")
  parser.add_argument(
    "--curvature-floor",
    type=nonnegative_float,
    default=0.0,
    help="AdaHessian's stabilizer (default: off)",
  )
  parser.add_argument(
    "--block-size",
    type=positive_int,
    default=2,
    help="Ritz vectors per warm start (track_curvature; default 2)",
  )
  parser.add_argument(
    "--out",
    type=out_dir,
    default=None,
    help="directory of the figures and JSON (default examples/figures/; --quick: "
    "examples/figures/quick/)",
  )
  args = parser.parse_args(argv)
  cfg = dict(steps=300, every=10, width=16, batch=32, probe=256, tol=1e-4, grid_1d=41, grid_2d=21)
  cfg.update(scales=(1, 2))
  if args.quick:  # the 1x runs only, each measured twice
    cfg.update(steps=8, every=4, width=2, probe=32, grid_1d=5, grid_2d=4, scales=(1,))
  cfg.update({k: v for k, v in (("steps", args.steps), ("every", args.every)) if v is not None})
  if cfg["every"] > cfg["steps"]:  # no measurement to plot: it failed after all the training
    parser.error(
      f"argument --every: must be at most the {cfg['steps']} training steps, got {cfg['every']}"
      + ("" if args.every else " (the default)")
    )
  cfg["seed"], cfg["curvature_floor"] = args.seed, args.curvature_floor
  cfg["block_size"] = args.block_size
  cfg["reference"] = not args.quick  # converged starts to check both against (--compare-cold)
  return args, cfg


def main():
  args, cfg = configure()
  folder = args.out or os.path.join(HERE, "figures", "quick" if args.quick else "")
  os.makedirs(folder, exist_ok=True)
  start = time.perf_counter()

  train, init, loss_fn, probe_batch = problem(args.seed, cfg["width"], cfg["probe"])
  cfg["num_params"] = int(sum(np.size(p) for p in jax.tree.leaves(init)))
  runs = []
  for name in [args.only] if args.only else TUNED:
    for scale in cfg["scales"]:
      r = run(name, scale, init, loss_fn, train, probe_batch, cfg, args.compare_cold)
      runs.append(r)
      i = int(np.argmax(np.asarray(r["preconditioned"]) * np.asarray(r["lr_at"])))
      print(
        f"{name:>10} {scale}x (lr {r['lr']:g}): final loss {r['loss'][-1]:.4f}"
        + (f", diverged at step {r['diverged_at']}" if "diverged_at" in r else "")
        + f"; max lr·λ_max(P⁻¹H) = {r['preconditioned'][i] * r['lr_at'][i]:.1f} "
        f"(step {r['measured'][i]}), λ_max(H) {min(r['sharpness']):.3g}–"
        f"{max(r['sharpness']):.3g}; {sum(r['warm_matvecs'])} HVPs"
      )
      if args.compare_cold:
        warm, cold = np.asarray(r["warm_matvecs"][1:]), np.asarray(r["cold_matvecs"][1:])
        print(
          f"{'':>14}warm starts: {warm.sum()} HVPs, cold: {cold.sum()} "
          f"(ratio {warm.sum() / cold.sum():.2f}); largest warm-cold difference "
          f"{max(r['max_rel_diff']):.1e}"
          + (
            f"; largest error against a converged start: warm {max(r['warm_rel_err']):.1e}, "
            f"cold {max(r['cold_rel_err']):.1e}"
            if r["warm_rel_err"]
            else ""
          )
        )

  plot_tracking(runs, cfg, os.path.join(folder, "curvature_tracking.png"))
  landscapes = os.path.join(folder, "curvature_landscapes.png")
  plot_landscapes(runs, loss_fn, probe_batch, cfg, landscapes)
  summary = [{k: v for k, v in r.items() if k != "final_params"} for r in runs]
  write_json(os.path.join(folder, "curvature_tracking.json"), dict(config=cfg, runs=summary))
  print(f"figures and JSON in {folder} ({time.perf_counter() - start:.0f} s in all)")


if __name__ == "__main__":
  main()
