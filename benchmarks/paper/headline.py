"""Headline comparison at matched step budgets: AdaHessian vs the usual first-order optimizers.

Char-level LM and digits CNN: SGD (momentum 0.9), Adam, AdamW, AdaHessian; synthetic DLRM click
model: Adagrad (the paper's RecSys baseline), Adam, SGD, AdaHessian. Every optimizer gets the same
tuning budget (a 4-value learning-rate grid, 1 seed, the full step budget; the sweep is recorded),
the same schedule (10 % warm-up, cosine to lr/10), the same steps and batches, and 4 seeds.

  python benchmarks/paper/headline.py            # full (minutes)
  python benchmarks/paper/headline.py --quick    # smoke test (seconds)
  python benchmarks/paper/headline.py --adahessian-config '{"curvature_floor": 0.1}'
"""

from __future__ import annotations

import cli
import numpy as np
from training import fmt, summarize, train
from tuning import tuned_rows

OPTIMIZERS = {
  "lm": ("sgd", "adam", "adamw", "adahessian"),
  "cnn": ("sgd", "adam", "adamw", "adahessian"),
  "dlrm": ("adagrad", "adam", "sgd", "adahessian"),
}
QUICK_OPTIMIZERS = {"lm": ("adahessian",), "cnn": ("sgd",), "dlrm": ("adagrad",)}
STEPS = {"lm": 300, "cnn": 300, "dlrm": 1500}  # DLRM steps are cheap: ~8 epochs
QUICK_STEPS = {"lm": 10, "cnn": 10, "dlrm": 10}
PAPER = {
  "lm": {
    "source": "Table 2, PTB three-layer tensorized transformer, test perplexity (lower is better)",
    "sgd": "59.9 ± 3.0",
    "adamw": "54.2 ± 1.6",
    "adahessian": "51.5 ± 1.2",
  },
  "cnn": {
    "source": "appendix/slides, ResNet20 on CIFAR-10, test accuracy % (higher is better)",
    "sgd": "92.08 ± 0.08",
    "adam": "90.33 ± 0.13",
    "adamw": "91.97 ± 0.15",
    "adahessian": "92.13 ± 0.18",
  },
  "dlrm": {
    "source": "appendix/slides, DLRM on Criteo Ad Kaggle, test accuracy % (higher is better)",
    "adagrad": "79.135",
    "adahessian": "79.167",
  },
}


def run(args, out):
  opts_for = QUICK_OPTIMIZERS if args.quick else OPTIMIZERS
  steps_for = QUICK_STEPS if args.quick else STEPS
  seeds = args.seeds
  lines = [
    "| task (metric) | optimizer | tuned lr | ours: val. metric | ours: val. loss | paper |",
    "|---|---|---|---|---|---|",
  ]
  out["results"] = {}
  for task, steps, key, opt, config, lr in tuned_rows(args, out, opts_for, steps_for):
    recs = train(task, opt, [lr] * len(seeds), seeds, steps, config=config)
    res = out["results"].setdefault(task.name, {})[key] = {
      "lr": lr,
      "summary": summarize(recs, task.metric),
      "loss_summary": summarize(recs, "loss"),
      "runs": recs,
    }
    metric = "acc. %" if task.metric == "acc" else "loss"
    lines.append(
      f"| {task.name} ({metric}) | {cli.label(key, config)} | {lr:g} | "
      f"{fmt(res['summary'], task.metric)} | {fmt(res['loss_summary'], 'loss')} "
      f"| {PAPER[task.name].get(key, '—')} |"
    )
    print(lines[-1], flush=True)
  return "\n".join(lines)


def plot(out, plt):
  titles = {"lm": "char-LM (transformer)", "cnn": "digits CNN", "dlrm": "synthetic DLRM"}
  colors = {
    "sgd": "tab:green",
    "adam": "tab:blue",
    "adamw": "tab:cyan",
    "adagrad": "tab:orange",
  }
  tnames = list(out["results"])
  fig, axes = plt.subplots(1, len(tnames), figsize=(4.2 * len(tnames), 3.6), squeeze=False)
  for ax, tname in zip(axes[0], tnames, strict=True):
    for opt, r in out["results"][tname].items():
      curves = np.array([run["curve"] for run in r["runs"]], float)
      xs = r["runs"][0]["curve_steps"]
      s, name = r["summary"], cli.label(opt, out["adahessian_configs"].get(opt))
      if s["mean"] is None:
        label = f"{name}: diverged"
      elif tname == "lm":
        label = f"{name}: val {s['mean']:.3f}"
      else:
        label = f"{name}: val {100 * s['mean']:.1f}%"
      with np.errstate(all="ignore"):
        mean = np.nanmean(np.where(np.isfinite(curves), curves, np.nan), axis=0)
      color = colors.get(opt) or cli.color(opt)
      ax.plot(xs, mean, color=color, label=label)
      ax.fill_between(xs, curves.min(0), curves.max(0), color=color, alpha=0.15)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean over seeds)")
    ax.set_title(titles[tname])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle("Matched step budgets, each optimizer's tuned learning rate")
  return fig


if __name__ == "__main__":
  cli.main("headline", __doc__.splitlines()[0], run, plot, PAPER)
