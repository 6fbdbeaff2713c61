"""How many products can a warm start save when tracking curvature? An oracle bound.

Trains the digits CNN of ``examples/curvature_tracking.py`` (same model, data, schedule and tuned
rates) and, at every step, for the Hessian ``H`` and the preconditioned ``P^{-1/2} H P^{-1/2}``:

* a reference: the top two eigenpairs by Lanczos to an estimated 1e-6 (not counted);
* the *oracle* count of a run: the fewest products after which its top Ritz value is within
  ``--target`` (1e-4) relative of the reference, read off ``Sharpness.history`` (a stopping rule
  can only stop later: it must also see that it has converged);
* runs of ``track_curvature``'s iteration from a normal random vector (cold), and from the previous
  reference eigenvector (``block_size=1``, plain Lanczos) or the previous top-2 reference vectors
  (``block_size=2``, the default), taken ``s`` steps before, for spacings ``s`` in 1, 3, 10, and
  ``s = 0`` (the step's own reference vectors: the floor, an eigenvector that did not move).

The warm starts here get *converged* previous eigenvectors and no random probe (``warm_mix=0``),
so the ratio of oracle counts, warm to cold, bounds what any stopping rule can save by a Krylov
start from the previous measurement, at each spacing. Also reports ``|cos|`` between consecutive
top eigenvectors: how far they move.

Usage::

  python benchmarks/tracking_oracle.py                  # both optimizers, 30-120 minutes on 2 cores
  python benchmarks/tracking_oracle.py --only Adam --steps 100
  python benchmarks/tracking_oracle.py --quick          # a smoke test, seconds

Writes ``benchmarks/results/tracking_oracle.json`` (``--out`` to change; ``--quick`` writes
nothing unless given ``--out``).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))

import curvature_tracking as ct  # noqa: E402  (examples/: the model, data and optimizers)
from _args import out_file, positive_float, positive_int, write_json  # noqa: E402

from adahessian_jax import hessian  # noqa: E402

SPACINGS = (0, 1, 3, 10)  # 0: the current step's own reference vectors (the floor)
BLOCKS = (1, 2)
KINDS = ("sharpness", "preconditioned")


def oracle_count(row, label, s: hessian.Sharpness, block: int, ref: float, target: float):
  """Puts in ``row[label]`` the fewest products after which the run's top Ritz value is within
  ``target`` of ``ref`` (``None`` if it never is: then also the value it ended at)."""
  hit = np.nonzero(np.abs(s.history - ref) <= target * abs(ref))[0]
  row[label] = int(block + hit[0]) if hit.size else None
  if not hit.size:
    row[f"{label}_missed_with"] = s.eigenvalue


def start_record(vectors: dict[str, np.ndarray], block: int) -> hessian.CurvatureRecord:
  """A record whose start blocks are given reference vectors (``track_curvature``'s warm start)."""

  def one(v):
    v = jnp.asarray(v[:block])
    return hessian.Sharpness(np.nan, np.nan, np.nan, 0, True, v[0], v, np.zeros(0))

  return hessian.CurvatureRecord(one(vectors[KINDS[0]]), one(vectors[KINDS[1]]), None, None, 0)


def track(name, cfg):
  """Trains one optimizer at its tuned rate; oracle counts at every step."""
  train, init, loss_fn, probe = ct.problem(cfg["seed"], cfg["width"], cfg["probe"])
  tx, preconditioner = ct.optimizer(name, ct.TUNED[name], cfg["steps"])
  step = ct.make_step(name, tx, loss_fn)
  params, opt_state = init, tx.init(init)
  rng = np.random.default_rng(cfg["seed"])
  x, y = train
  kw = dict(tol=cfg["run_tol"], stop_on="eigenvalue", max_iter=cfg["max_iter"])
  past, rows = {}, []
  for t in range(1, cfg["steps"] + 1):
    idx = rng.integers(0, len(x), cfg["batch"])
    params, opt_state, _ = step(params, opt_state, (x[idx], y[idx]))
    row = {"step": t}
    op = hessian.hessian_operator(loss_fn, params, probe)
    p = preconditioner(opt_state)
    ops = dict(zip(KINDS, (op, hessian.preconditioned_operator(op, p)), strict=True))
    refs, vecs = {}, {}
    for kind, o in ops.items():
      e = hessian.top_eigenvalues(o, k=2, tol=cfg["ref_tol"], stop_on="eigenvalue", max_iter=150)
      refs[kind], vecs[kind] = float(e.eigenvalues[0]), np.asarray(e.eigenvectors_flat)
      row[f"{kind}_ref"], row[f"{kind}_ref2"] = refs[kind], float(e.eigenvalues[1])
    cold = hessian.track_curvature(op, None, preconditioner=p, key=jax.random.key(1000 + t), **kw)
    for kind in KINDS:
      oracle_count(row, f"{kind}_cold", getattr(cold, kind), 1, refs[kind], cfg["target"])
    past[t] = vecs
    for s in SPACINGS:
      if (s and t % s) or t - s not in past:
        continue
      for kind in KINDS:
        row[f"{kind}_cos{s}"] = float(abs(past[t - s][kind][0] @ vecs[kind][0]))
      for b in BLOCKS:
        rec = start_record(past[t - s], b)
        warm = hessian.track_curvature(op, rec, preconditioner=p, block_size=b, warm_mix=0.0, **kw)
        for kind in KINDS:
          label = f"{kind}_warm{s}_b{b}"
          oracle_count(row, label, getattr(warm, kind), b, refs[kind], cfg["target"])
    past.pop(t - max(SPACINGS), None)
    rows.append(row)
    if t % 25 == 0 or t == cfg["steps"]:
      print(f"  {name} step {t}: cold {[row[f'{k}_cold'] for k in KINDS]}", flush=True)
  return rows


def summarize(rows, first_step=1):
  """Per spacing: measurements, median |cos|, oracle sums warm/cold (both operators), misses."""
  out = []
  for s in SPACINGS:
    sel = [r for r in rows if r["step"] >= first_step and r["step"] % max(s, 1) == 0]
    sel = [r for r in sel if f"sharpness_cos{s}" in r]
    if not sel:
      continue
    line = dict(spacing=s, measurements=len(sel), first_step=first_step)
    for kind in KINDS:
      line[f"{kind}_median_cos"] = float(np.median([r[f"{kind}_cos{s}"] for r in sel]))
    cold = [r[f"{k}_cold"] for r in sel for k in KINDS]
    line["cold_misses"] = sum(c is None for c in cold)
    for b in BLOCKS:
      warm = [r[f"{k}_warm{s}_b{b}"] for r in sel for k in KINDS]
      pairs = [(w, c) for w, c in zip(warm, cold, strict=True) if w is not None and c is not None]
      line[f"warm_b{b}_misses"] = sum(w is None for w in warm)
      line[f"warm_b{b}"] = sum(w for w, _ in pairs)
      line[f"cold_b{b}"] = sum(c for _, c in pairs)
      line[f"ratio_b{b}"] = line[f"warm_b{b}"] / max(line[f"cold_b{b}"], 1)
      line[f"median_warm_b{b}"] = float(np.median([w for w, _ in pairs]))
    line["median_cold"] = float(np.median([c for c in cold if c is not None]))
    out.append(line)
  return out


def print_table(name, summary):
  print(
    f"{name}: oracle products to the target, per eigenvalue (H and P^-1 H), warm / cold\n"
    "  from step | every | meas. | median |cos| H, P⁻¹H | Lanczos from previous (b=1) "
    "| block of 2 (b=2) | median warm b1 / b2 / cold | misses b1 / b2 / cold"
  )
  for x in summary:
    print(
      f"  {x['first_step']:>9} | {x['spacing']:>5} | {x['measurements']:>5} | "
      f"{x['sharpness_median_cos']:.3f}, {x['preconditioned_median_cos']:.3f} | "
      f"{x['warm_b1']} / {x['cold_b1']} = {x['ratio_b1']:.2f} | "
      f"{x['warm_b2']} / {x['cold_b2']} = {x['ratio_b2']:.2f} | "
      f"{x['median_warm_b1']:g} / {x['median_warm_b2']:g} / {x['median_cold']:g} | "
      f"{x['warm_b1_misses']} / {x['warm_b2_misses']} / {x['cold_misses']}"
    )


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny model, 12 steps: seconds")
  parser.add_argument("--only", default=None, choices=list(ct.TUNED), help="one optimizer")
  parser.add_argument(
    "--steps", type=positive_int, default=None, help="training steps (default 300)"
  )
  parser.add_argument(
    "--target", type=positive_float, default=1e-4, help="relative accuracy (default 1e-4)"
  )
  parser.add_argument(
    "--out",
    type=out_file,
    default=None,
    help="JSON file (default benchmarks/results/tracking_oracle.json; --quick: none)",
  )
  args = parser.parse_args()
  cfg = dict(steps=300, width=16, batch=32, probe=256, seed=0, target=args.target)
  cfg.update(ref_tol=1e-6, run_tol=1e-6, max_iter=40)
  if args.quick:
    cfg.update(steps=12, width=2, probe=32)
  if args.steps is not None:
    cfg["steps"] = args.steps
  out = args.out or (None if args.quick else os.path.join(HERE, "results", "tracking_oracle.json"))
  start = time.perf_counter()
  result = dict(config=cfg, machine=platform.machine(), load=os.getloadavg()[0], runs={})
  for name in [args.only] if args.only else list(ct.TUNED):
    rows = track(name, cfg)
    summary = summarize(rows) + summarize(rows, first_step=min(201, cfg["steps"] // 3 * 2 + 1))
    print_table(name, summary)
    result["runs"][name] = dict(summary=summary, rows=rows)
  result["seconds"] = time.perf_counter() - start
  if out:
    print(f"wrote {write_json(out, result)} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
  main()
