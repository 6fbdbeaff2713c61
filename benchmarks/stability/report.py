"""Markdown tables of the screening results (``results/screen*.json``), for docs/stability.md.

Summaries are recomputed from the stored runs with ``common.summarize`` (so every table uses the
same failure rule: diverged, or collapsed to the level of a model that learned nothing).

  python benchmarks/stability/report.py             # all screening files, 4-seed cells
  python benchmarks/stability/report.py --seeds 8   # cells screened with --seeds 8 (none kept)
  python benchmarks/stability/report.py --diagnosis # the table of results/diagnosis.json
  python benchmarks/stability/report.py --heldout   # the tables of results/heldout.json
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import common as C
from _args import positive_int  # (examples/_args.py, on the path from common)

ORDER = ["exact", "floor", "floor_g", "clip", "warmup", "floor_clip", "floor_g_clip",
         "floor_warmup", "floor_g_clip_warmup"]  # fmt: skip


def load_cells(seeds):
  cells = {}
  for path in sorted(glob.glob(os.path.join(C.RESULTS, "screen*.json"))):
    with open(path) as f:
      for key, c in json.load(f)["cells"].items():
        if key.endswith(f"seeds={seeds}"):
          cells[key] = c
  return cells


def tables(seeds):
  cells = load_cells(seeds)
  by_task = {}
  for c in cells.values():
    by_task.setdefault(c["task"], []).append(c)
  out = []
  for tname, cs in by_task.items():
    task_metric = "loss" if tname in ("lm",) or tname in C.TOYS else "acc"
    cols = sorted(
      {(c["update_freq"], c["scale"]) for c in cs}, key=lambda x: (x[1] != 1, x[1], x[0])
    )
    confs = sorted({c["config"] for c in cs}, key=lambda n: (ORDER + [n]).index(n))
    head = "| config | " + " | ".join(f"k={k}, {s}x" for k, s in cols) + " |"
    lines = [f"**{tname}** ({'val. accuracy %' if task_metric == 'acc' else 'loss'}; "
             f"{seeds} seeds)", "", head, "|---" * (len(cols) + 1) + "|"]  # fmt: skip
    for conf in confs:
      row = []
      for k, s in cols:
        match = [c for c in cs if c["config"] == conf and c["update_freq"] == k and c["scale"] == s]
        if match:
          row.append(C.cell(C.summarize(match[0]["runs"], task_metric, tname), task_metric, "**"))
        else:
          row.append("")
      lines.append(f"| {conf} | " + " | ".join(row) + " |")
    out.append("\n".join(lines))
  return "\n\n".join(out)


def diagnosis_table(name: str = "diagnosis") -> str:
  """One row per (case, seed) of ``results/<name>.json``, failed seeds first."""
  with open(os.path.join(C.RESULTS, f"{name}.json")) as f:
    cases = json.load(f)["cases"]
  lines = [
    "| case | seed | result | loss spike at step | max loss | largest \\|update\\|/lr, "
    "steps 0-29 (leaf, step) | entries with D < 1 % of leaf mean at step 0 (worst leaf) |",
    "|---|---|---|---|---|---|---|",
  ]
  for cname, c in cases.items():
    for s in sorted(c["seeds"], key=lambda s: (not s["failed"], s["seed"])):
      u = s["max_abs_u_per_step"][:30]
      t = max(range(len(u)), key=lambda i: u[i])
      leaf = c["leaves"][s["max_abs_u_leaf_per_step"][t]].replace("']['", "/").strip("[']")
      zero = max(s["steps"][0]["leaves"].items(), key=lambda kv: kv[1]["frac_D_below_1pct"])
      zleaf = zero[0].replace("']['", "/").strip("[']")
      acc, loss = s["final"].get("acc"), s["final"]["loss"]
      result = "failed" if s["failed"] else "ok"
      result += f" ({100 * acc:.1f} %)" if acc is not None else f" (loss {loss:.3g})"
      spike = "-" if s["spike_step"] is None else str(s["spike_step"])
      lines.append(
        f"| {cname} | {s['seed']} | {result} | {spike} | {s['max_loss']:.3g} | "
        f"{u[t]:.3g} ({leaf}, {t}) | {100 * zero[1]['frac_D_below_1pct']:.0f} % ({zleaf}) |"
      )
  return "\n".join(lines)


def heldout_table(name: str = "heldout") -> str:
  """The tables of ``results/<name>.json`` (``heldout.py``): the main rows, then the ablation.

  One row per task, one column per cell; the ablation's table has the tasks that have its cells.
  """
  with open(os.path.join(C.RESULTS, f"{name}.json")) as f:
    store = json.load(f)
  tasks = store["tasks"]
  ablation = store.get("ablation", [])
  first = next(iter(tasks.values()))["cells"]
  keys = [k for k in first if first[k]["row"] not in ablation]
  names = [first[k]["row"].replace("adam", "AdamW").replace("_k3", ", k=3") for k in keys]
  labels = [f"{n} {first[k]['scale']:g}x" for n, k in zip(names, keys, strict=True)]
  head = ["task (metric, steps)", "rates: Adam / exact / rec.", *labels]
  lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
  for tname, t in tasks.items():
    metric = "val. accuracy %" if t["metric"] == "acc" else f"{t['metric']}"
    rates = " / ".join(f"{store['tuned_lr'][tname][r]:g}" for r in ("adam", "exact", "recommended"))
    cells = [
      C.cell(C.summarize(t["cells"][k]["runs"], t["metric"], tname), t["metric"], "**")
      for k in keys
    ]
    lines.append(f"| {tname} ({metric}, {t['steps']}) | {rates} | " + " | ".join(cells) + " |")
  abl = {k: c for t in tasks.values() for k, c in t["cells"].items() if c["row"] in ablation}
  if not abl:
    return "\n".join(lines)
  head = ["task (metric, steps)", "rate (rec.)", *(_config_label(store, c) for c in abl.values())]
  lines += ["", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
  for tname, t in tasks.items():
    if not any(k in t["cells"] for k in abl):
      continue
    metric = "val. accuracy %" if t["metric"] == "acc" else f"{t['metric']}"
    cells = [
      C.cell(C.summarize(t["cells"][k]["runs"], t["metric"], tname), t["metric"], "**")
      if k in t["cells"]
      else ""
      for k in abl
    ]
    rate = f"{store['tuned_lr'][tname]['recommended']:g}"
    lines.append(f"| {tname} ({metric}, {t['steps']}) | {rate} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _config_label(store: dict, cell: dict) -> str:
  """``α 0.3, ρ 0.05 4x``: a held-out cell's curvature_floor, update_clip and rate scale."""
  config = store["rows"][cell["row"]][1]
  names = {"curvature_floor": "α", "update_clip": "ρ"}
  parts = [f"{names.get(k, k)} {v:g}" for k, v in config.items()]
  return f"{', '.join(parts) or 'exact'} {cell['scale']:g}x"


def main(argv=None) -> str:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seeds", type=positive_int, default=4, help="the cells screened with N seeds")
  p.add_argument("--diagnosis", action="store_true", help="the diagnosis table instead")
  p.add_argument("--heldout", action="store_true", help="the table of results/heldout.json")
  a = p.parse_args(argv)
  if a.heldout:
    return heldout_table()
  text = diagnosis_table() if a.diagnosis else tables(a.seeds)
  if not text:  # printed nothing, as if the tables were empty
    p.exit(1, f"no cells screened with {a.seeds} seeds in {C.RESULTS}/screen*.json\n")
  return text


if __name__ == "__main__":
  print(main())
