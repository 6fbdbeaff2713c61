"""Paper Table 5 at small scale: AdaHessian's spatial-averaging block size on the char-level LM.

AdaHessian at its tuned learning rate (tuned at block size 1, the library default) with block
sizes 1, 2, 4, ..., 128 and 4 seeds; AdamW at its own tuned learning rate as the reference.
Dense kernels average blocks of consecutive inputs of each output unit, embedding tables blocks of
consecutive features of each row (the model's widths are 32 and 128, so blocks >= 32 span whole
rows of most kernels; the averaging then equals the reference "instruction" rule).

  python benchmarks/paper/block_size.py            # full (minutes)
  python benchmarks/paper/block_size.py --quick    # smoke test (seconds)
"""

from __future__ import annotations

import time

import numpy as np
import tasks as T

BLOCKS = (1, 2, 4, 8, 16, 32, 64, 128)
STEPS, QUICK_STEPS = 300, 10
PAPER = {
  "source": "Table 5, IWSLT14 De-En transformer, BLEU (higher is better); AdamW 35.66 ± .11",
  "blocks": list(BLOCKS),
  "adahessian": ["35.67 ± .10", "35.66 ± .07", "35.78 ± .07", "35.77 ± .08", "35.67 ± .08",
                 "35.79 ± .06", "35.72 ± .06", "35.67 ± .11"],
}  # fmt: skip


def main():
  args = T.parse_args(__doc__.splitlines()[0])
  t_start = time.perf_counter()
  blocks = (1, 128) if args.quick else BLOCKS
  seeds = T.EVAL_SEEDS[:2] if args.quick else T.EVAL_SEEDS
  steps = QUICK_STEPS if args.quick else STEPS
  task = T.get_task("lm", args.quick)
  out = {"experiment": "block_size", "quick": args.quick, "blocks": list(blocks)}
  out["seeds"], out["steps"], out["task"] = list(seeds), steps, task.config
  tuned = {opt: T.tune(task, opt, steps, args.out, args.quick) for opt in ("adamw", "adahessian")}
  out["tuning"] = tuned
  rows = []
  for b in blocks:
    recs = T.train(task, "adahessian", [tuned["adahessian"]["lr"]] * len(seeds), seeds, steps, b)
    rows.append({"block_size": b, "summary": T.summarize(recs, "loss"), "runs": recs})
    print(f"block {b}: {T.fmt(rows[-1]['summary'], 'loss')}", flush=True)
  ref = T.train(task, "adamw", [tuned["adamw"]["lr"]] * len(seeds), seeds, steps)
  out["results"] = rows
  out["adamw_reference"] = {"summary": T.summarize(ref, "loss"), "runs": ref}
  lines = [
    "**lm**: validation loss (nats/char, lower is better)",
    "",
    "| block size | " + " | ".join(str(b) for b in blocks) + " | AdamW |",
    "|---" * (len(blocks) + 2) + "|",
    "| AdaHessian | "
    + " | ".join(T.fmt(r["summary"], "loss") for r in rows)
    + f" | {T.fmt(out['adamw_reference']['summary'], 'loss')} |",
  ]
  out["table_markdown"] = "\n".join(lines)
  out["paper"] = PAPER
  out["environment"] = T.environment()
  out["wall_s"] = round(time.perf_counter() - t_start, 1)
  print(out["table_markdown"])
  T.write_json(args.out, "block_size", out)
  plot(out, args.figures)


def plot(out, fig_dir):
  plt = T.pyplot()
  if plt is None:
    return
  fig, ax = plt.subplots(figsize=(5.5, 3.6))
  rows = out["results"]
  xs = np.array([r["block_size"] for r in rows], float)
  m = np.array([np.nan if r["summary"]["mean"] is None else r["summary"]["mean"] for r in rows])
  sd = np.array([np.nan if r["summary"]["std"] is None else r["summary"]["std"] for r in rows])
  ax.errorbar(xs, m, sd, marker="o", capsize=3, color="tab:red", label="AdaHessian")
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
  fig.tight_layout()
  fig.savefig(f"{fig_dir}/block_size.png", dpi=90)
  plt.close(fig)


if __name__ == "__main__":
  main()
