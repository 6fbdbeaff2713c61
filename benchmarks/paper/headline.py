"""Headline comparison at matched step budgets: AdaHessian vs the usual first-order optimizers.

Char-level LM and digits CNN: SGD (momentum 0.9), Adam, AdamW, AdaHessian; synthetic DLRM click
model: Adagrad (the paper's RecSys baseline), Adam, SGD, AdaHessian. Every optimizer gets the same
tuning budget (a 4-value learning-rate grid, 1 seed, the full step budget; the sweep is recorded),
the same schedule (10 % warm-up, cosine to lr/10), the same steps and batches, and 4 seeds.

  python benchmarks/paper/headline.py            # full (minutes)
  python benchmarks/paper/headline.py --quick    # smoke test (seconds)
"""

from __future__ import annotations

import time

import numpy as np
import tasks as T

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


def main():
  args = T.parse_args(__doc__.splitlines()[0])
  t_start = time.perf_counter()
  opts_for = QUICK_OPTIMIZERS if args.quick else OPTIMIZERS
  steps_for = QUICK_STEPS if args.quick else STEPS
  seeds = T.EVAL_SEEDS[:2] if args.quick else T.EVAL_SEEDS
  out = {"experiment": "headline", "quick": args.quick, "seeds": list(seeds), "steps": steps_for}
  out["tuning"], out["results"], out["tasks"] = {}, {}, {}
  lines = [
    "| task (metric) | optimizer | tuned lr | ours: val. metric | ours: val. loss | paper |",
    "|---|---|---|---|---|---|",
  ]
  for tname, opts in opts_for.items():
    task, steps = T.get_task(tname, args.quick), steps_for[tname]
    out["tasks"][tname] = task.config
    res = {}
    for opt in opts:
      tuned = T.tune(task, opt, steps, args.out, args.quick)
      out["tuning"][f"{tname}/{opt}"] = tuned
      recs = T.train(task, opt, [tuned["lr"]] * len(seeds), seeds, steps)
      res[opt] = {
        "lr": tuned["lr"],
        "summary": T.summarize(recs, task.metric),
        "loss_summary": T.summarize(recs, "loss"),
        "runs": recs,
      }
      metric = "acc. %" if task.metric == "acc" else "loss"
      lines.append(
        f"| {tname} ({metric}) | {opt} | {tuned['lr']:g} | "
        f"{T.fmt(res[opt]['summary'], task.metric)} | {T.fmt(res[opt]['loss_summary'], 'loss')} "
        f"| {PAPER[tname].get(opt, '—')} |"
      )
      print(lines[-1], flush=True)
    out["results"][tname] = res
  out["table_markdown"] = "\n".join(lines)
  out["paper"] = PAPER
  out["environment"] = T.environment()
  out["wall_s"] = round(time.perf_counter() - t_start, 1)
  T.write_json(args.out, "headline", out)
  plot(out, args.figures)


def plot(out, fig_dir):
  plt = T.pyplot()
  if plt is None:
    return
  titles = {"lm": "char-LM (transformer)", "cnn": "digits CNN", "dlrm": "synthetic DLRM"}
  colors = {
    "sgd": "tab:green",
    "adam": "tab:blue",
    "adamw": "tab:cyan",
    "adagrad": "tab:orange",
    "adahessian": "tab:red",
  }
  tnames = list(out["results"])
  fig, axes = plt.subplots(1, len(tnames), figsize=(4.2 * len(tnames), 3.6), squeeze=False)
  for ax, tname in zip(axes[0], tnames, strict=True):
    for opt, r in out["results"][tname].items():
      curves = np.array([run["curve"] for run in r["runs"]], float)
      xs = r["runs"][0]["curve_steps"]
      s = r["summary"]
      if s["mean"] is None:
        label = f"{opt}: diverged"
      elif tname == "lm":
        label = f"{opt}: val {s['mean']:.3f}"
      else:
        label = f"{opt}: val {100 * s['mean']:.1f}%"
      with np.errstate(all="ignore"):
        mean = np.nanmean(np.where(np.isfinite(curves), curves, np.nan), axis=0)
      ax.plot(xs, mean, color=colors[opt], label=label)
      ax.fill_between(xs, curves.min(0), curves.max(0), color=colors[opt], alpha=0.15)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean over seeds)")
    ax.set_title(titles[tname])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle("Matched step budgets, each optimizer's tuned learning rate")
  fig.tight_layout()
  fig.savefig(f"{fig_dir}/headline.png", dpi=90)
  plt.close(fig)


if __name__ == "__main__":
  main()
