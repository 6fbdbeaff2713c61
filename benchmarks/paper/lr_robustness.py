"""Paper Table 4 at small scale: robustness of AdamW and AdaHessian to learning-rate scaling.

Each optimizer's learning rate is first tuned on a 4-value grid (1 seed, same step budget), then
multiplied by 0.5, 1, 2, 3, 4, 5, 6, 10 and trained with 4 seeds (``--seeds``) on the
character-level LM (validation loss, nats/char), the digits CNN and the synthetic DLRM task
(validation accuracy).

  python benchmarks/paper/lr_robustness.py            # full (minutes)
  python benchmarks/paper/lr_robustness.py --quick    # smoke test (seconds)
  python benchmarks/paper/lr_robustness.py --adahessian-config '{"curvature_floor": 0.1}'
  python benchmarks/paper/lr_robustness.py --seeds 8 --scales 0.5 1 2 4 10 --tasks cnn
"""

from __future__ import annotations

import cli
import numpy as np
from _args import Distinct, positive_float  # (examples/_args.py, on the path from cli)
from tasks import get_task
from training import DIVERGE_FACTOR, fmt, summarize, train
from tuning import tuned_rows

SCALES = (0.5, 1, 2, 3, 4, 5, 6, 10)
OPTIMIZERS = ("adamw", "adahessian")
STEPS = {"lm": 300, "cnn": 300, "dlrm": 1500}
TITLES = {"lm": "char-LM (transformer)", "cnn": "digits CNN", "dlrm": "synthetic DLRM"}
QUICK_STEPS = 10
#: The defaults that ``--quick`` changes (a flag given explicitly keeps its value): the quick
#: smoke run covers the LM only (the CNN goes through the same code).
QUICK = {"scales": [1, 10], "tasks": ["lm"]}
PAPER = {
  "source": "Table 4, IWSLT14 De-En transformer, BLEU (higher is better)",
  "scales": list(SCALES),
  "adamw": ["35.42 ± .09", "35.66 ± .11", "35.37 ± .07", "35.18 ± .07", "34.79 ± .15",
            "14.41 ± 13.25", "0.41 ± .32", "Diverge"],
  "adahessian": ["35.33 ± .10", "35.79 ± .06", "35.21 ± .14", "34.74 ± .10", "34.19 ± .06",
                 "33.78 ± .14", "32.70 ± .10", "32.48 ± .83"],
}  # fmt: skip


def add_arguments(p):
  p.add_argument(
    "--scales",
    type=positive_float,
    nargs="+",
    action=Distinct,
    default=list(SCALES),
    help="LR multiples",
  )
  p.add_argument("--tasks", nargs="+", action=Distinct, choices=list(STEPS), default=list(STEPS))


def run(args, out):
  scales = tuple(float(s) if s % 1 else int(s) for s in args.scales)
  steps_for = {t: QUICK_STEPS if args.quick else STEPS[t] for t in args.tasks}
  seeds = args.seeds
  opts_for = {tname: OPTIMIZERS for tname in steps_for}
  out["scales"], out["results"] = list(scales), {}
  out["divergence_rule"] = (
    f"non-finite training loss, or final validation loss > {DIVERGE_FACTOR} x initial loss"
  )
  for task, steps, key, opt, config, lr in tuned_rows(args, out, opts_for, steps_for):
    rows = out["results"].setdefault(task.name, {})[key] = []
    for s in scales:
      recs = train(task, opt, [lr * s] * len(seeds), seeds, steps, config=config)
      rows.append(
        {
          "scale": s,
          "lr": lr * s,
          "summary": summarize(recs, task.metric),
          "loss_summary": summarize(recs, "loss"),
          "runs": recs,
        }
      )
      cell = fmt(rows[-1]["summary"], task.metric)
      print(f"{task.name} {cli.label(key, config)} x{s}: {cell}", flush=True)
  tables = [
    table(tname, get_task(tname, args.quick), rows, scales, out["adahessian_configs"])
    for tname, rows in out["results"].items()
  ]
  return "\n\n".join(tables)


def table(tname, task, rows, scales, configs):
  what = "validation loss (nats/char, lower is better)" if tname == "lm" else "val. accuracy (%)"
  head = "| LR scale | " + " | ".join(f"{s:g}" for s in scales) + " |"
  lines = [f"**{tname}**: {what}", "", head, "|---" * (len(scales) + 1) + "|"]
  for key, r in rows.items():
    cells = " | ".join(fmt(x["summary"], task.metric) for x in r)
    lines.append(f"| {cli.label(key, configs.get(key))} | {cells} |")
  return "\n".join(lines)


def plot(out, plt):
  tnames = list(out["results"])
  fig, axes = plt.subplots(1, len(tnames), figsize=(5 * len(tnames), 3.8), squeeze=False)
  for ax, tname in zip(axes[0], tnames, strict=True):
    scale = 1.0 if tname == "lm" else 100.0
    for key, rows in out["results"][tname].items():
      color = "tab:blue" if key == "adamw" else cli.color(key)
      xs = np.array([r["scale"] for r in rows], float)
      m, sd = cli.mean_std(rows)
      label = cli.label(key, out["adahessian_configs"].get(key))
      ax.errorbar(xs, m * scale, sd * scale, marker="o", color=color, capsize=3, label=label)
      for r in rows:
        if r["summary"]["diverged"]:
          ax.annotate(
            f"{r['summary']['diverged']}/{r['summary']['n']} div.",
            (r["scale"], 0.02),
            xycoords=("data", "axes fraction"),
            color=color,
            fontsize=7,
            ha="center",
            rotation=90,
          )
    ax.set_xscale("log")
    ax.set_xticks(out["scales"], [f"{s:g}" for s in out["scales"]])
    ax.set_xticks([], minor=True)
    ax.set_xlabel("learning-rate scale (x tuned)")
    ax.set_ylabel("val. loss (nats/char)" if tname == "lm" else "val. accuracy (%)")
    ax.set_title(TITLES[tname])
    ax.grid(alpha=0.3)
  fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8)
  fig.suptitle("LR robustness (paper Table 4), mean ± std over seeds")
  fig.tight_layout(rect=(0, 0.1, 1, 0.95))
  return fig


if __name__ == "__main__":
  cli.main("lr_robustness", __doc__.splitlines()[0], run, plot, PAPER, add_arguments, QUICK)
