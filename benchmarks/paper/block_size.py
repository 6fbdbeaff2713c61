"""Paper Table 5 at small scale: AdaHessian's spatial-averaging block size on the char-level LM.

AdaHessian at its tuned learning rate (tuned at block size 1, the library default) with block
sizes 1, 2, 4, ..., 128 and 4 seeds; AdamW at its own tuned learning rate as the reference.
Dense kernels average blocks of consecutive inputs of each output unit, embedding tables blocks of
consecutive features of each row (the model's widths are 32 and 128, so blocks >= 32 span whole
rows of most kernels; the averaging then equals the reference "instruction" rule).

  python benchmarks/paper/block_size.py            # full (minutes)
  python benchmarks/paper/block_size.py --quick    # smoke test (seconds)
  python benchmarks/paper/block_size.py --adahessian-config '{"curvature_floor": 0.1}'
"""

from __future__ import annotations

import cli
import numpy as np
from tasks import get_task
from training import fmt, summarize, train
from tuning import tune

BLOCKS = (1, 2, 4, 8, 16, 32, 64, 128)
STEPS, QUICK_STEPS = 300, 10
PAPER = {
  "source": "Table 5, IWSLT14 De-En transformer, BLEU (higher is better); AdamW 35.66 ± .11",
  "blocks": list(BLOCKS),
  "adahessian": ["35.67 ± .10", "35.66 ± .07", "35.78 ± .07", "35.77 ± .08", "35.67 ± .08",
                 "35.79 ± .06", "35.72 ± .06", "35.67 ± .11"],
}  # fmt: skip


def run(args, out):
  blocks = (1, 128) if args.quick else BLOCKS
  steps = QUICK_STEPS if args.quick else STEPS
  seeds = args.seeds
  task = get_task("lm", args.quick)
  out["blocks"], out["steps"], out["task"] = list(blocks), steps, task.config
  tuned = {opt: tune(task, opt, steps, args.out, args.quick) for opt in ("adamw", "adahessian")}
  out["tuning"] = tuned
  lrs = [tuned["adahessian"]["lr"]] * len(seeds)
  lines = []
  for key, _, config in cli.variants(["adahessian"], args):
    rows = []
    for b in blocks:
      recs = train(task, "adahessian", lrs, seeds, steps, b, config=config)
      rows.append({"block_size": b, "summary": summarize(recs, "loss"), "runs": recs})
      print(f"{cli.label(key, config)} block {b}: {fmt(rows[-1]['summary'], 'loss')}", flush=True)
    out[cli.results_field(key)] = rows
    cells = " | ".join(fmt(r["summary"], "loss") for r in rows)
    lines.append(f"| {cli.label(key, config)} | {cells}")
  ref = train(task, "adamw", [tuned["adamw"]["lr"]] * len(seeds), seeds, steps)
  out["adamw_reference"] = {"summary": summarize(ref, "loss"), "runs": ref}
  adamw = fmt(out["adamw_reference"]["summary"], "loss")
  return "\n".join(
    [
      "**lm**: validation loss (nats/char, lower is better)",
      "",
      "| block size | " + " | ".join(str(b) for b in blocks) + " | AdamW |",
      "|---" * (len(blocks) + 2) + "|",
      *(line + f" | {adamw} |" for line in lines),
    ]
  )


def plot(out, plt):
  fig, ax = plt.subplots(figsize=(5.5, 3.6))
  for key in (cli.EXACT, *out["adahessian_configs"]):
    rows, color = out[cli.results_field(key)], cli.color(key)
    xs = np.array([r["block_size"] for r in rows], float)
    m, sd = cli.mean_std(rows)
    label = "AdaHessian" if key == cli.EXACT else cli.label(key, out["adahessian_configs"][key])
    ax.errorbar(xs, m, sd, marker="o", capsize=3, color=color, label=label)
  ref = out["adamw_reference"]["summary"]
  if ref["mean"] is not None:
    ax.axhline(ref["mean"], color="tab:blue", label="AdamW (tuned)")
    ax.axhspan(ref["mean"] - ref["std"], ref["mean"] + ref["std"], color="tab:blue", alpha=0.15)
  ax.set_xscale("log", base=2)
  ax.set_xticks(xs, [str(int(b)) for b in xs])
  ax.set_xlabel("spatial-averaging block size")
  ax.set_ylabel("val. loss (nats/char)")
  ax.set_title("Block size on the char-LM (paper Table 5)")
  ax.grid(alpha=0.3)
  ax.legend()
  return fig


if __name__ == "__main__":
  cli.main("block_size", __doc__.splitlines()[0], run, plot, PAPER)
