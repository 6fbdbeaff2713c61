"""Paper Table 4 at small scale: robustness of AdamW and AdaHessian to learning-rate scaling.

Each optimizer's learning rate is first tuned on a 4-value grid (1 seed, same step budget), then
multiplied by 0.5, 1, 2, 3, 4, 5, 6, 10 and trained with 4 seeds on the character-level LM
(validation loss, nats/char) and the digits CNN (validation accuracy).

  python benchmarks/paper/lr_robustness.py            # full (minutes)
  python benchmarks/paper/lr_robustness.py --quick    # smoke test (seconds)
"""

from __future__ import annotations

import time

import numpy as np
import tasks as T

SCALES = (0.5, 1, 2, 3, 4, 5, 6, 10)
OPTIMIZERS = ("adamw", "adahessian")
STEPS = {"lm": 300, "cnn": 300}
QUICK_STEPS = {"lm": 10}
PAPER = {
  "source": "Table 4, IWSLT14 De-En transformer, BLEU (higher is better)",
  "scales": list(SCALES),
  "adamw": ["35.42 ± .09", "35.66 ± .11", "35.37 ± .07", "35.18 ± .07", "34.79 ± .15",
            "14.41 ± 13.25", "0.41 ± .32", "Diverge"],
  "adahessian": ["35.33 ± .10", "35.79 ± .06", "35.21 ± .14", "34.74 ± .10", "34.19 ± .06",
                 "33.78 ± .14", "32.70 ± .10", "32.48 ± .83"],
}  # fmt: skip


def main():
  args = T.parse_args(__doc__.splitlines()[0])
  t_start = time.perf_counter()
  scales = (1, 10) if args.quick else SCALES
  seeds = T.EVAL_SEEDS[:2] if args.quick else T.EVAL_SEEDS
  steps_for = QUICK_STEPS if args.quick else STEPS
  out = {"experiment": "lr_robustness", "quick": args.quick, "scales": list(scales)}
  out["seeds"], out["steps"], out["tuning"], out["results"], out["tasks"] = (
    list(seeds),
    steps_for,
    {},
    {},
    {},
  )
  tables = []
  # The quick smoke run covers the LM only (the CNN goes through the same code).
  for tname in ("lm",) if args.quick else ("lm", "cnn"):
    task, steps = T.get_task(tname, args.quick), steps_for[tname]
    out["tasks"][tname] = task.config
    rows = {}
    for opt in OPTIMIZERS:
      tuned = T.tune(task, opt, steps, args.out, args.quick)
      out["tuning"][f"{tname}/{opt}"] = tuned
      rows[opt] = []
      for s in scales:
        recs = T.train(task, opt, [tuned["lr"] * s] * len(seeds), seeds, steps)
        rows[opt].append(
          {
            "scale": s,
            "lr": tuned["lr"] * s,
            "summary": T.summarize(recs, task.metric),
            "loss_summary": T.summarize(recs, "loss"),
            "runs": recs,
          }
        )
        print(f"{tname} {opt} x{s}: {T.fmt(rows[opt][-1]['summary'], task.metric)}", flush=True)
    out["results"][tname] = rows
    tables.append(table(tname, task, rows, scales))
  out["table_markdown"] = "\n\n".join(tables)
  out["paper"] = PAPER
  out["divergence_rule"] = (
    f"non-finite training loss, or final validation loss > {T.DIVERGE_FACTOR} x initial loss"
  )
  out["environment"] = T.environment()
  out["wall_s"] = round(time.perf_counter() - t_start, 1)
  print(out["table_markdown"])
  T.write_json(args.out, "lr_robustness", out)
  plot(out, args.figures)


def table(tname, task, rows, scales):
  what = "validation loss (nats/char, lower is better)" if tname == "lm" else "val. accuracy (%)"
  head = "| LR scale | " + " | ".join(f"{s:g}" for s in scales) + " |"
  lines = [f"**{tname}**: {what}", "", head, "|---" * (len(scales) + 1) + "|"]
  for opt, r in rows.items():
    lines.append(f"| {opt} | " + " | ".join(T.fmt(x["summary"], task.metric) for x in r) + " |")
  return "\n".join(lines)


def plot(out, fig_dir):
  plt = T.pyplot()
  if plt is None:
    return
  tnames = list(out["results"])
  fig, axes = plt.subplots(1, len(tnames), figsize=(5 * len(tnames), 3.8), squeeze=False)
  for ax, tname in zip(axes[0], tnames, strict=True):
    scale = 100.0 if tname == "cnn" else 1.0
    for opt, color in zip(OPTIMIZERS, ("tab:blue", "tab:red"), strict=True):
      rows = out["results"][tname][opt]
      xs = np.array([r["scale"] for r in rows], float)
      m = np.array([np.nan if r["summary"]["mean"] is None else r["summary"]["mean"] for r in rows])
      sd = np.array([np.nan if r["summary"]["std"] is None else r["summary"]["std"] for r in rows])
      ax.errorbar(xs, m * scale, sd * scale, marker="o", color=color, capsize=3, label=opt)
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
    ax.set_xlabel("learning-rate scale (x tuned)")
    ax.set_ylabel("val. loss (nats/char)" if tname == "lm" else "val. accuracy (%)")
    ax.set_title("char-LM (transformer)" if tname == "lm" else "digits CNN")
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle("LR robustness (paper Table 4), mean ± std over seeds")
  fig.tight_layout()
  fig.savefig(f"{fig_dir}/lr_robustness.png", dpi=90)
  plt.close(fig)


if __name__ == "__main__":
  main()
