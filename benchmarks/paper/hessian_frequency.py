"""Paper Table 6 at small scale: refreshing the Hessian every 1..5 steps on the digits CNN.

AdaHessian (fused route, tuned learning rate) with ``update_freq`` 1..5, 4 seeds each; SGD
(momentum 0.9) and Adam at their own tuned learning rates as references. Cost: the compiled
training programs (one per configuration, each a ``lax.scan`` over all steps of 4 seeds vmapped,
batch 32 per seed) are re-run ``REPEATS`` times in an interleaved order in this one process; the
time per step is the median wall time of a run divided by its number of steps, and the ratios to
SGD and Adam come from those medians.

  python benchmarks/paper/hessian_frequency.py            # full (minutes)
  python benchmarks/paper/hessian_frequency.py --quick    # smoke test (seconds)
  python benchmarks/paper/hessian_frequency.py --seeds 8 --adahessian-config '{"update_clip": 1}'
"""

from __future__ import annotations

import time

import cli
import jax
import jax.numpy as jnp
import numpy as np
from tasks import get_task
from training import compiled_run, fmt, freeze_config, summarize, train
from tuning import tune

FREQS = (1, 2, 3, 4, 5)
STEPS, QUICK_STEPS = 300, 10
REPEATS, QUICK_REPEATS = 7, 2
PAPER = {
  "source": "Table 6, ResNet20 on CIFAR-10, PyTorch on one RTX Titan",
  "freqs": list(FREQS),
  "theoretical_cost_x_sgd": [2.0, 1.5, 1.33, 1.25, 1.2],
  "resnet20_acc": ["92.13 ± .08", "92.40 ± .04", "92.06 ± .18", "92.17 ± .21", "92.16 ± .12"],
  "measured_cost_x_sgd": [2.42, 1.71, 1.47, 1.36, 1.28],
  "measured_cost_x_adam": [2.27, 1.64, 1.42, 1.32, 1.25],
}


def run(args, out):
  freqs = (1, 2) if args.quick else FREQS
  steps = QUICK_STEPS if args.quick else STEPS
  repeats = QUICK_REPEATS if args.quick else REPEATS
  seeds = args.seeds
  task = get_task("cnn", args.quick)
  out["freqs"], out["steps"], out["task"] = list(freqs), steps, task.config
  out["tuning"] = {o: tune(task, o, steps, args.out, args.quick) for o in ("sgd", "adam")}
  out["tuning"]["adahessian"] = tune(task, "adahessian", steps, args.out, args.quick)
  variants = list(cli.variants(["adahessian"], args))
  configs = [("sgd", "sgd", 1, {}), ("adam", "adam", 1, {})]
  configs += [(f"{key}_f{f}", opt, f, config) for key, opt, config in variants for f in freqs]
  runs, timed = {}, {}
  for name, opt, f, config in configs:
    lrs = [out["tuning"][opt]["lr"]] * len(seeds)
    runs[name] = train(task, opt, lrs, seeds, steps, update_freq=f, config=config)
    print(f"{name}: {fmt(summarize(runs[name], 'acc'), 'acc')}", flush=True)
    # The program is compiled and cached now; time re-runs of it below.
    fn = compiled_run(task, opt, steps, 1, f, freeze_config(config))
    timed[name] = (fn, jnp.asarray(lrs, jnp.float32), jnp.asarray(seeds, jnp.int32))
  times = {k: [] for k in timed}
  for _ in range(repeats):
    for name, (fn, lrs, sd) in timed.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(lrs, sd, task.data))
      times[name].append((time.perf_counter() - t0) / steps)
  med = {k: float(np.median(v)) for k, v in times.items()}
  fastest = {k: float(np.min(v)) for k, v in times.items()}
  out["references"] = {
    k: {"summary": summarize(runs[k], "acc"), "step_time_s": med[k]} for k in ("sgd", "adam")
  }
  sgd_cell = fmt(out["references"]["sgd"]["summary"], "acc")
  adam_cell = fmt(out["references"]["adam"]["summary"], "acc")
  lines = [
    f"**cnn** (digits): val. accuracy (%); SGD {sgd_cell}, Adam {adam_cell}",
    "",
    "| Hessian refresh every k steps | " + " | ".join(str(f) for f in freqs) + " |",
    "|---" * (len(freqs) + 1) + "|",
    "| theoretical cost (x SGD) | " + " | ".join(f"{1 + 1 / f:.2f}x" for f in freqs) + " |",
  ]
  for key, _, config in variants:
    rows = []
    for f in freqs:
      name = f"{key}_f{f}"
      rows.append(
        {
          "update_freq": f,
          "summary": summarize(runs[name], "acc"),
          "step_time_s": med[name],
          "cost_x_sgd": med[name] / med["sgd"],
          "cost_x_adam": med[name] / med["adam"],
          "cost_x_sgd_from_fastest_repeats": fastest[name] / fastest["sgd"],
          "cost_x_adam_from_fastest_repeats": fastest[name] / fastest["adam"],
          "theoretical_cost_x_sgd": 1 + 1 / f,
        }
      )
    out[cli.results_field(key)] = rows
    name = "AdaHessian" if key == cli.EXACT else cli.label(key, config)
    lines += [
      f"| {name} accuracy | " + " | ".join(fmt(r["summary"], "acc") for r in rows) + " |",
      f"| {name} cost (x SGD) | " + " | ".join(f"{r['cost_x_sgd']:.2f}x" for r in rows) + " |",
      f"| {name} cost (x Adam) | " + " | ".join(f"{r['cost_x_adam']:.2f}x" for r in rows) + " |",
    ]
  out["step_times_all_repeats_s"] = times
  out["runs"] = runs
  out["timing_note"] = (
    f"median over {repeats} interleaved re-runs of each compiled {steps}-step program "
    f"({len(seeds)} seeds vmapped, batch {task.config['batch']}), divided by {steps}; the "
    "machine's load at the start is under environment"
  )
  return "\n".join(lines)


def plot(out, plt):
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
  for key, color in ((cli.EXACT, "tab:red"), (cli.CONFIGURED, "tab:orange")):
    rows = out.get(cli.results_field(key))
    if rows is None:
      continue
    label = "AdaHessian" if key == cli.EXACT else cli.label(key, out["adahessian_config"])
    fs = np.array([r["update_freq"] for r in rows], float)
    m, sd = cli.mean_std(rows)
    a1.errorbar(fs, 100 * m, 100 * sd, marker="o", capsize=3, color=color, label=label)
    for r in rows:
      accs = [100 * a for a in r["summary"]["all"] if a is not None]
      a1.scatter([r["update_freq"]] * len(accs), accs, s=12, color=color, alpha=0.5, zorder=3)
    a2.plot(fs, [r["cost_x_sgd"] for r in rows], "o-", color=color, label=f"{label}, x SGD")
    a2.plot(fs, [r["cost_x_adam"] for r in rows], "s--", color=color, alpha=0.6,
            label=f"{label}, x Adam")  # fmt: skip
  for k, c in (("sgd", "tab:green"), ("adam", "tab:blue")):
    s = out["references"][k]["summary"]
    if s["mean"] is not None:
      a1.axhline(100 * s["mean"], color=c, label=f"{k} (tuned)")
      a1.axhspan(100 * (s["mean"] - s["std"]), 100 * (s["mean"] + s["std"]), color=c, alpha=0.15)
  a1.set_xlabel("Hessian refresh interval k")
  a1.set_ylabel("val. accuracy (%) (dots: seeds)")
  a1.set_title("digits CNN accuracy")
  a1.legend(fontsize=8)
  a1.grid(alpha=0.3)
  fs = np.array(out["freqs"], float)
  a2.plot(fs, 1 + 1 / fs, "k:", label="theoretical, x SGD")
  a2.plot(fs, out["paper"]["measured_cost_x_sgd"][: len(fs)], "^-", color="gray", alpha=0.6,
          label="paper ResNet20 GPU, x SGD")  # fmt: skip
  a2.set_xlabel("Hessian refresh interval k")
  a2.set_ylabel("time per step (ratio)")
  a2.set_title("cost per step")
  a2.legend(fontsize=8)
  a2.grid(alpha=0.3)
  for a in (a1, a2):
    a.set_xticks(fs)
  fig.suptitle("Hessian refresh frequency (paper Table 6)")
  return fig


if __name__ == "__main__":
  cli.main("hessian_frequency", __doc__.splitlines()[0], run, plot, PAPER)
