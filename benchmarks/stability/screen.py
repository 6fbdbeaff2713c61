"""Screens AdaHessian stabilizers, alone and combined, on the cases where the exact rule fails.

Each cell is one (task, configuration, update_freq, learning-rate scale) trained with every seed
at once (vmapped); the paper tasks use their tuned rate (0.47), the paper schedule and step
budget; the toys ``adahessian()``'s default rate 0.15 for 100 steps. Results are appended to
``results/<out>.json`` cell by cell (a rerun skips the cells already there).

  python benchmarks/stability/screen.py --tasks cnn --configs exact floor clip --seeds 4
  python benchmarks/stability/screen.py --tasks mlp_l1 linear_hinge --out screen_toys

The stabilizers are prototyped outside the library (see ``common.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import common as C
import numpy as np
from _args import Distinct, file_name, positive_int  # (examples/_args.py, on the path from common)

# Named configurations of the prototypes (common.py); update_freq is set per cell.
CONFIGS = {
  "exact": {},
  "floor": {"floor": 0.1},
  "floor_g": {"floor": 0.1, "floor_global": True},
  "clip": {"clip": 1.0},
  "warmup": {"warmup": 30},
  "floor_clip": {"floor": 0.1, "clip": 1.0},
  "floor_g_clip": {"floor": 0.1, "floor_global": True, "clip": 1.0},
  "floor_g_clip_warmup": {"floor": 0.1, "floor_global": True, "clip": 1.0, "warmup": 30},
  "floor_warmup": {"floor": 0.1, "warmup": 30},
  "floor.3": {"floor": 0.3},
  "floor.03": {"floor": 0.03},
  "floor_g_clip.5": {"floor": 0.1, "floor_global": True, "clip": 0.5},
  "floor_g_clip2": {"floor": 0.1, "floor_global": True, "clip": 2.0},
  "floor.3_g_clip": {"floor": 0.3, "floor_global": True, "clip": 1.0},
  "floor_clip.1": {"floor": 0.1, "clip": 0.1},
  "floor1_clip": {"floor": 1.0, "clip": 1.0},
  "clip.1": {"clip": 0.1},
  "floor_g_clip.1": {"floor": 0.1, "floor_global": True, "clip": 0.1},
}
# Cells per task: (update_freq, lr scale).
CELLS = {
  "cnn": [(1, 1), (2, 1), (3, 1), (4, 1), (5, 1), (1, 0.5), (1, 2), (4, 2)],
  "lm": [(1, 1), (2, 1), (3, 1), (4, 1), (5, 1), (1, 0.5), (1, 2)],
  "dlrm": [(1, 1), (2, 1), (3, 1), (4, 1), (5, 1)],
  "mlp_l1": [(1, 1), (4, 1)],
  "linear_hinge": [(1, 1), (4, 1)],
}


def cell_list(text: str) -> list[tuple[int, float]]:
  """``--cells``: a JSON list of ``[update_freq, lr scale]`` pairs, e.g. ``'[[4, 1], [1, 2]]'``."""
  try:
    value = json.loads(text)
  except json.JSONDecodeError:
    value = None

  def is_cell(c) -> bool:
    if not (isinstance(c, list) and len(c) == 2) or any(isinstance(x, bool) for x in c):
      return False
    k, scale = c
    if not (isinstance(k, int) and isinstance(scale, (int, float))):
      return False
    return k > 0 and math.isfinite(scale) and scale > 0

  if not (isinstance(value, list) and value and all(is_cell(c) for c in value)):
    raise argparse.ArgumentTypeError(
      "expected a JSON list of [update_freq, lr scale] pairs (a positive integer and a positive "
      f"number), e.g. '[[4, 1], [1, 2]]', got {text!r}"
    )
  return [(k, scale) for k, scale in value]


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument(
    "--tasks",
    nargs="+",
    action=Distinct,
    choices=list(CELLS),
    default=["cnn"],
    help="the tasks to screen (default: cnn)",
  )
  p.add_argument(
    "--configs",
    nargs="+",
    action=Distinct,
    choices=list(CONFIGS),
    default=["exact", "floor", "clip", "warmup"],
    help="the stabilizer configurations (default: exact floor clip warmup)",
  )
  p.add_argument("--seeds", type=positive_int, default=4, help="seeds 0..n-1 (default: 4)")
  p.add_argument(
    "--cells",
    type=cell_list,
    default=None,
    help="JSON list of [update_freq, scale] pairs (default: the task's cells)",
  )
  p.add_argument(
    "--out", type=file_name, default="screen", help="results/OUT.json (default: screen)"
  )
  args = p.parse_args()
  path = os.path.join(C.RESULTS, f"{args.out}.json")
  store = {"cells": {}}
  if os.path.exists(path):
    with open(path) as f:
      store = json.load(f)
  store["configs"] = {**store.get("configs", {}), **{c: CONFIGS[c] for c in args.configs}}
  store["note"] = (
    "Stabilizer prototypes outside the library (benchmarks/stability/common.py); paper tasks at "
    "the tuned rate 0.47 x scale with the paper schedule and step budget, toys at 0.15 x scale "
    "constant for 100 steps. 'failed' = diverged or collapsed (paper/training.py's COLLAPSE); "
    "mean ± std over the seeds that did not fail."
  )
  seeds = list(range(args.seeds))
  for tname in args.tasks:
    task = C.get_task(tname)
    cells = args.cells or CELLS[tname]
    for cname in args.configs:
      for k, scale in cells:
        key = f"{tname}/{cname}/k={k}/x{scale}/seeds={len(seeds)}"
        if key in store["cells"]:
          continue
        cfg = dict(CONFIGS[cname])
        if k == 1:  # refreshing every step already: a warm-up changes nothing
          cfg.pop("warmup", None)
        cfg["update_freq"] = k
        t0 = time.perf_counter()
        recs = C.run(task, cfg, seeds, lr_scale=scale)
        s = C.summarize(recs, task.metric, tname)
        s["max_train_loss"] = [r["max_train_loss"] for r in recs]
        s["initial_loss"] = [r["initial_loss"] for r in recs]
        store["cells"][key] = {"task": tname, "config": cname, "update_freq": k, "scale": scale,
                               "summary": s, "runs": recs}  # fmt: skip
        C.write_json(args.out, store)
        print(f"{key}: {C.cell(s, task.metric)}  [{time.perf_counter() - t0:.0f} s]", flush=True)


if __name__ == "__main__":
  np.set_printoptions(precision=4)
  main()
