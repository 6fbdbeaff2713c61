"""Paper Table 6 at small scale: refreshing the Hessian every 1..5 steps.

AdaHessian (fused route, tuned learning rate) with ``update_freq`` 1..5 on the digits CNN, the
char-level LM and the synthetic DLRM task, 4 seeds each (``--seeds``); each task's first-order
baselines at their own tuned learning rates as references. Cost, on the CNN only (the paper's
claim is about one model; ``--no-timing`` skips it): the compiled training programs (one per
configuration, each a ``lax.scan`` over all steps of the seeds vmapped, batch 32 per seed) are
re-run ``REPEATS`` times in an interleaved order in this one process; the time per step is the
median wall time of a run divided by its number of steps, and the ratios to SGD and Adam come
from those medians. Time it only on an idle machine.

  python benchmarks/paper/hessian_frequency.py            # full (minutes)
  python benchmarks/paper/hessian_frequency.py --quick    # smoke test (seconds)
  python benchmarks/paper/hessian_frequency.py --seeds 8 \
    --adahessian-config '{"curvature_floor": 0.3, "update_clip": 0.05}'
"""

from __future__ import annotations

import time

import cli
import jax
import jax.numpy as jnp
import numpy as np
from _args import Distinct  # (examples/_args.py, on the path from cli)
from tasks import get_task
from training import compiled_run, fmt, freeze_config, summarize, train
from tuning import tune

FREQS = (1, 2, 3, 4, 5)
TASKS = ("cnn", "lm", "dlrm")
STEPS = {"cnn": 300, "lm": 300, "dlrm": 1500}
QUICK_STEPS = 10
REFERENCES = {"cnn": ("sgd", "adam"), "lm": ("sgd", "adamw"), "dlrm": ("adagrad", "adam")}
TIMED = "cnn"  # the task whose cost per step is measured (SGD and Adam as the baselines)
REPEATS, QUICK_REPEATS = 7, 1
#: The quick smoke run's one refresh interval: k = 2 runs the refresh schedule (and the lazy moment
#: of an ``--adahessian-config``) that k = 1 leaves out, one compiled program per configuration.
QUICK_FREQS = (2,)
PAPER = {
  "source": "Table 6, ResNet20 on CIFAR-10, PyTorch on one RTX Titan",
  "freqs": list(FREQS),
  "theoretical_cost_x_sgd": [2.0, 1.5, 1.33, 1.25, 1.2],
  "resnet20_acc": ["92.13 ± .08", "92.40 ± .04", "92.06 ± .18", "92.17 ± .21", "92.16 ± .12"],
  "measured_cost_x_sgd": [2.42, 1.71, 1.47, 1.36, 1.28],
  "measured_cost_x_adam": [2.27, 1.64, 1.42, 1.32, 1.25],
}
TITLES = {"cnn": "digits CNN", "lm": "char-LM (transformer)", "dlrm": "synthetic DLRM"}


#: The defaults that ``--quick`` changes (a flag given explicitly keeps its value).
QUICK = {"tasks": ["cnn"]}


def add_arguments(p):
  p.add_argument("--tasks", nargs="+", action=Distinct, choices=TASKS, default=list(TASKS))
  p.add_argument("--no-timing", action="store_true", help="skip the cost measurement")


def run(args, out):
  freqs = QUICK_FREQS if args.quick else FREQS
  tnames = tuple(args.tasks)
  seeds = args.seeds
  variants = list(cli.variants(["adahessian"], args))
  out["freqs"], out["tasks"], out["steps"], out["tuning"] = list(freqs), {}, {}, {}
  out["results"], out["references"] = {}, {}
  tables = []
  for tname in tnames:
    task = get_task(tname, args.quick)
    steps = QUICK_STEPS if args.quick else STEPS[tname]
    out["tasks"][tname], out["steps"][tname] = task.config, steps
    refs = ("sgd", "adam") if tname == TIMED else REFERENCES[tname]
    tuning = {o: tune(task, o, steps, args.out, args.quick) for o in (*refs, "adahessian")}
    out["tuning"][tname] = tuning
    configs = [(o, o, 1, {}) for o in refs]
    configs += [(f"{key}_f{f}", opt, f, config) for key, opt, config in variants for f in freqs]
    runs = {}
    for name, opt, f, config in configs:
      runs[name] = train(task, opt, [tuning[opt]["lr"]] * len(seeds), seeds, steps, 1, f,
                         config=config)  # fmt: skip
      print(f"{tname} {name}: {fmt(summarize(runs[name], task.metric), task.metric)}",
            flush=True)  # fmt: skip
    timing = None
    if tname == TIMED and not args.no_timing:
      timing = time_programs(task, steps, seeds, configs, tuning, args.quick)
      out["step_times_all_repeats_s"] = timing["all"]
      out["timing_note"] = timing["note"]
    out["references"][tname] = {
      o: {"summary": summarize(runs[o], task.metric), "runs": runs[o]} for o in refs
    }
    out["results"][tname] = {}
    for key, _, _ in variants:
      rows = []
      for f in freqs:
        name = f"{key}_f{f}"
        row = {"update_freq": f, "summary": summarize(runs[name], task.metric),
               "runs": runs[name], "theoretical_cost_x_sgd": 1 + 1 / f}  # fmt: skip
        if timing is not None:
          med, fast = timing["median"], timing["fastest"]
          row |= {
            "step_time_s": med[name],
            "cost_x_sgd": med[name] / med["sgd"],
            "cost_x_adam": med[name] / med["adam"],
            "cost_x_sgd_from_fastest_repeats": fast[name] / fast["sgd"],
            "cost_x_adam_from_fastest_repeats": fast[name] / fast["adam"],
          }
        rows.append(row)
      out["results"][tname][key] = rows
    tables.append(table(tname, task, out, freqs, timing is not None))
  return "\n\n".join(tables)


def time_programs(task, steps, seeds, configs, tuning, quick):
  """Median (and fastest) seconds per step of each configuration's compiled run, interleaved."""
  repeats = QUICK_REPEATS if quick else REPEATS
  timed = {}
  for name, opt, f, config in configs:
    fn = compiled_run(task, opt, steps, 1, f, freeze_config(config))  # compiled and cached
    lrs = jnp.asarray([tuning[opt]["lr"]] * len(seeds), jnp.float32)
    timed[name] = (fn, lrs, jnp.asarray(seeds, jnp.int32))
  times = {k: [] for k in timed}
  for _ in range(repeats):
    for name, (fn, lrs, sd) in timed.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(lrs, sd, task.data))
      times[name].append((time.perf_counter() - t0) / steps)
  note = (
    f"median over {repeats} interleaved re-runs of each compiled {steps}-step program "
    f"({len(seeds)} seeds vmapped, batch {task.config['batch']}), divided by {steps}; the "
    "machine's load at the start is under environment"
  )
  return {
    "median": {k: float(np.median(v)) for k, v in times.items()},
    "fastest": {k: float(np.min(v)) for k, v in times.items()},
    "all": times,
    "note": note,
  }


def table(tname, task, out, freqs, timed):
  metric = task.metric
  what = "validation loss (nats/char, lower is better)" if metric == "loss" else "val. accuracy (%)"
  refs = ", ".join(f"{o} {fmt(r['summary'], metric)}" for o, r in out["references"][tname].items())
  lines = [
    f"**{tname}**: {what}; {refs}",
    "",
    "| Hessian refresh every k steps | " + " | ".join(str(f) for f in freqs) + " |",
    "|---" * (len(freqs) + 1) + "|",
  ]
  if timed:
    lines.append(
      "| theoretical cost (x SGD) | " + " | ".join(f"{1 + 1 / f:.2f}x" for f in freqs) + " |"
    )
  for key, rows in out["results"][tname].items():
    name = "AdaHessian" if key == cli.EXACT else cli.label(key, out["adahessian_configs"][key])
    lines.append(f"| {name} | " + " | ".join(fmt(r["summary"], metric) for r in rows) + " |")
    if timed:
      for base in ("sgd", "adam"):
        cells = " | ".join(f"{r[f'cost_x_{base}']:.2f}x" for r in rows)
        lines.append(f"| {name} cost (x {base.upper() if base == 'sgd' else 'Adam'}) | {cells} |")
  return "\n".join(lines)


def plot(out, plt):
  tnames = list(out["results"])
  timed = "step_times_all_repeats_s" in out
  ncols = len(tnames) + timed
  fig, axes = plt.subplots(1, ncols, figsize=(4.4 * ncols, 3.6), squeeze=False)
  fs = np.array(out["freqs"], float)
  for ax, tname in zip(axes[0], tnames, strict=False):
    scale, metric = (1.0, "loss") if tname == "lm" else (100.0, "acc")
    for key, rows in out["results"][tname].items():
      color = cli.color(key)
      label = "AdaHessian" if key == cli.EXACT else cli.label(key, out["adahessian_configs"][key])
      m, sd = cli.mean_std(rows)
      ax.errorbar(fs, scale * m, scale * sd, marker="o", capsize=3, color=color, label=label)
      for r in rows:  # the seeds that did not diverge
        vals = [scale * run["val"][metric] for run in r["runs"] if not run["diverged"]]
        ax.scatter([r["update_freq"]] * len(vals), vals, s=10, color=color, alpha=0.5, zorder=3)
    refs = out["references"][tname].items()
    for (k, ref), c in zip(refs, ("tab:green", "tab:blue"), strict=True):
      s = ref["summary"]
      if s["mean"] is not None:
        ax.axhline(scale * s["mean"], color=c, label=f"{k} (tuned)")
        lo, hi = scale * (s["mean"] - s["std"]), scale * (s["mean"] + s["std"])
        ax.axhspan(lo, hi, color=c, alpha=0.15)
    ax.set_xlabel("Hessian refresh interval k")
    what = "val. loss (nats/char)" if tname == "lm" else "val. accuracy (%)"
    ax.set_ylabel(f"{what}, dots: seeds")
    ax.set_title(TITLES[tname])
    ax.set_xticks(fs)
    if tname == "lm":  # a diverged or collapsed seed's loss would hide the rest
      ax.set_ylim(2.15, 3.05)
    ax.grid(alpha=0.3)
  if timed:
    a2 = axes[0][-1]
    for key, rows in out["results"][TIMED].items():
      color = cli.color(key)
      label = "AdaHessian" if key == cli.EXACT else cli.label(key, out["adahessian_configs"][key])
      a2.plot(fs, [r["cost_x_sgd"] for r in rows], "o-", color=color, label=f"{label}, x SGD")
      a2.plot(fs, [r["cost_x_adam"] for r in rows], "s--", color=color, alpha=0.6,
              label=f"{label}, x Adam")  # fmt: skip
    a2.plot(fs, 1 + 1 / fs, "k:", label="theoretical, x SGD")
    paper = [out["paper"]["measured_cost_x_sgd"][FREQS.index(f)] for f in out["freqs"]]
    a2.plot(fs, paper, "^-", color="gray", alpha=0.6, label="paper ResNet20 GPU, x SGD")
    a2.set_xlabel("Hessian refresh interval k")
    a2.set_ylabel("time per step (ratio)")
    a2.set_title(f"cost per step ({TITLES[TIMED]})")
    a2.set_xticks(fs)
    a2.legend(fontsize=7)
    a2.grid(alpha=0.3)
  handles, labels = axes[0][0].get_legend_handles_labels()
  for ax in axes[0][1 : len(tnames)]:  # the references differ per task
    for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
      if label not in labels:
        handles.append(h)
        labels.append(label)
  fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
  fig.tight_layout(rect=(0, 0.2, 1, 0.95))
  fig.suptitle("Hessian refresh frequency (paper Table 6), dots: seeds that did not diverge")
  return fig


if __name__ == "__main__":
  cli.main("hessian_frequency", __doc__.splitlines()[0], run, plot, PAPER, add_arguments, QUICK)
