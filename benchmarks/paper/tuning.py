"""Learning-rate sweeps of the paper-claim experiments, cached per results directory."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from cli import finite, variants
from tasks import Task, get_task
from training import DIVERGE_FACTOR, WEIGHT_DECAY, train

TUNE_SEED = 100  # the learning-rate sweep uses its own seed, not one of the reported ones

# Each optimizer's sweep: 4 values, a factor ~sqrt(10) apart, around its usual default.
LR_GRIDS = {
  "sgd": (0.03, 0.1, 0.3, 1.0),  # heavy-ball momentum 0.9
  "adam": (1e-3, 3e-3, 1e-2, 3e-2),
  "adamw": (1e-3, 3e-3, 1e-2, 3e-2),
  "adagrad": (0.01, 0.03, 0.1, 0.3),
  "adahessian": (0.047, 0.15, 0.47, 1.5),
}
# A first sweep one notch lower (sgd 0.01-0.3, adam(w) 3e-4-1e-2, adahessian 0.015-0.47) put the
# best value of most (task, optimizer) pairs at the top of the grid in these short runs; every
# grid was moved up by the same factor sqrt(10) except Adagrad's, whose optimum was inside.
QUICK_LR = {"sgd": 0.1, "adam": 3e-3, "adamw": 3e-3, "adagrad": 0.1, "adahessian": 0.047}


def tune(task: Task, name: str, steps: int, out_dir: str, quick: bool) -> dict[str, Any]:
  """Picks ``name``'s learning rate for ``task`` (1 seed, the experiment's full step budget).

  The same rule for every optimizer: sweep its 4-value grid (``LR_GRIDS``); if the best value is
  at an end of the grid, sweep 4 more values beyond that end, continuing the grid's 1-3-10
  pattern (e.g. top end 1e-2, 3e-2 -> 0.1, 0.3, 1, 3), once. The best value is the one with the
  best final validation metric among runs that did not diverge. Results are cached in
  ``out_dir/tuning.json`` so experiments share one sweep. In quick mode there is no sweep.
  AdaHessian is tuned with the exact rule (no extra configuration).
  """
  if quick:
    return {"lr": QUICK_LR[name], "grid": [], "note": "quick mode: no sweep, fixed default"}
  path = os.path.join(out_dir, "tuning.json")
  grid = list(LR_GRIDS[name])
  setup = json.dumps(
    [task.config, grid, DIVERGE_FACTOR, WEIGHT_DECAY, "extend-once"], sort_keys=True
  )
  key = f"{task.name}/{name}/steps={steps}/{hashlib.sha1(setup.encode()).hexdigest()[:8]}"
  cached = _read(path).get(key)
  if cached is not None:
    return cached
  sign = 1.0 if task.higher_is_better else -1.0

  def pick(recs):
    ok = [r for r in recs if not r["diverged"] and np.isfinite(r["val"][task.metric])]
    return max(ok, key=lambda r: sign * r["val"][task.metric]) if ok else recs[0]

  recs = train(task, name, grid, [TUNE_SEED] * len(grid), steps)
  best, extension = pick(recs), []
  if best["lr"] == grid[-1]:
    extension = [grid[-2] * 10, grid[-1] * 10, grid[-2] * 100, grid[-1] * 100]
  elif best["lr"] == grid[0]:
    extension = [grid[1] / 10, grid[0] / 10, grid[1] / 100, grid[0] / 100]
  if extension:
    recs += train(task, name, extension, [TUNE_SEED] * len(extension), steps)
    best = pick(recs)
  recs = sorted(recs, key=lambda r: r["lr"])
  entry = {
    "lr": best["lr"],
    "metric": task.metric,
    "seed": TUNE_SEED,
    "steps": steps,
    "grid": [
      {"lr": r["lr"], task.metric: r["val"][task.metric], "diverged": r["diverged"]} for r in recs
    ],
    "extended": bool(extension),
    "best_at_grid_edge": best["lr"] in (recs[0]["lr"], recs[-1]["lr"]),
  }
  os.makedirs(out_dir, exist_ok=True)
  cache = _read(path)  # re-read: another experiment may have added entries meanwhile
  cache[key] = entry
  with open(path + ".tmp", "w") as f:
    json.dump(finite(cache), f, indent=1)
  os.replace(path + ".tmp", path)
  return entry


def tuned_rows(
  args, out: dict[str, Any], opts_for: Mapping[str, Sequence[str]], steps_for: Mapping[str, int]
) -> Iterator[tuple[Task, int, str, str, dict[str, Any], float]]:
  """``(task, steps, key, optimizer, config, tuned lr)`` of every task's rows, in order.

  The rows are ``opts_for[task]`` with AdaHessian's configured row added (see
  ``cli.variants``); each task's config and each tuning result are recorded in ``out``.
  """
  out["steps"], out["tasks"], out["tuning"] = dict(steps_for), {}, {}
  for tname, opts in opts_for.items():
    task, steps = get_task(tname, args.quick), steps_for[tname]
    out["tasks"][tname] = task.config
    for key, opt, config in variants(opts, args):
      entry = out["tuning"][f"{tname}/{opt}"] = tune(task, opt, steps, args.out, args.quick)
      yield task, steps, key, opt, config, entry["lr"]


def _read(path: str) -> dict[str, Any]:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)
