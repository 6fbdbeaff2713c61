"""Benchmark of adahessian_jax.hessian: eigenvalue solvers and trace estimators.

On a small tanh MLP fitted for a few Adam steps to scikit-learn's 8x8 digits
(float64, so a dense Hessian gives exact eigenvalues and trace):

* Eigenvalues: Hessian-vector products (HVPs) and wall time to reach a given
  relative accuracy on the top-k (largest-magnitude) eigenvalues, for Lanczos
  (``top_eigenvalues``) and for power iteration with deflation
  (``power_iteration``, PyHessian's method). Each solver is run over a sweep
  of its own stopping tolerance; the cheapest run that reaches the accuracy
  is reported, its time a median over repeats.
* Trace: relative RMS error against the number of HVPs for Hutchinson,
  Hutch++ (a third of the budget each for sketch, projection and residual) and
  XTrace, over many seeds.

Usage::

  python benchmarks/hessian_analysis.py          # full (about 70 s on 2 idle CPU cores)
  python benchmarks/hessian_analysis.py --quick  # < 30 s

Writes ``benchmarks/results/hessian_analysis.json`` (``--out`` to change; ``--quick`` does not
write unless ``--out`` is given).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from adahessian_jax import hessian  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
from _args import out_file, write_json  # noqa: E402  (examples/_args.py)


def make_problem(hidden: int, num_examples: int, train_steps: int, seed: int = 0):
  digits = load_digits()
  x = jnp.asarray(digits.data[:num_examples] / 16.0)
  y = jnp.asarray(digits.target[:num_examples])
  r = np.random.default_rng(seed)
  params = {
    "w1": jnp.asarray(r.normal(size=(64, hidden)) / 8.0),
    "b1": jnp.zeros(hidden),
    "w2": jnp.asarray(r.normal(size=(hidden, 10)) / np.sqrt(hidden)),
    "b2": jnp.zeros(10),
  }

  def loss_fn(p, batch):
    xb, yb = batch
    logits = jnp.tanh(xb @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  opt = optax.adam(1e-2)
  state = opt.init(params)

  @jax.jit
  def step(p, s):
    g = jax.grad(loss_fn)(p, (x, y))
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  for _ in range(train_steps):
    params, state = step(params, state)
  return loss_fn, params, (x, y)


def dense(op, chunk=128):
  eye = np.eye(op.size)
  h = np.concatenate([np.asarray(op.matmat(eye[i : i + chunk])) for i in range(0, op.size, chunk)])
  return 0.5 * (h + h.T)


def median_time(fn, repeats):
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    out = fn()
    jax.block_until_ready(out.eigenvectors_flat)
    times.append(time.perf_counter() - t)
  return float(np.median(times)), out


def eigen_benchmark(op, exact, ks, targets, repeats, tol_step):
  by_mag = exact[np.argsort(-np.abs(exact))]
  solvers = {
    "lanczos": (
      lambda k, tol: hessian.top_eigenvalues(op, k, which="LM", tol=tol, max_iter=300),
      [10.0**-e for e in np.arange(1, 11, tol_step)],
    ),
    "power": (
      lambda k, tol: hessian.power_iteration(op, k, tol=tol, max_iter=3000),
      [10.0**-e for e in np.arange(1, 11, tol_step)],
    ),
  }
  rows = []
  for k in ks:
    truth = by_mag[:k]
    runs = {}
    for name, (solve, tols) in solvers.items():
      runs[name] = []
      for tol in tols:
        out = solve(k, tol)  # also warms up compilation
        err = float(np.max(np.abs(out.eigenvalues - truth) / np.abs(truth)))
        runs[name].append((out.num_matvecs, err, tol))
    for target in targets:
      for name, (solve, _) in solvers.items():
        ok = [r for r in runs[name] if r[1] <= target]
        if not ok:
          rows.append(dict(k=k, target=target, method=name, hvps=None, seconds=None, error=None))
          continue
        hvps, err, tol = min(ok)
        seconds, _ = median_time(lambda s=solve, k=k, t=tol: s(k, t), repeats)
        rows.append(
          dict(k=k, target=target, method=name, hvps=hvps, seconds=seconds, error=err, tol=tol)
        )
  return rows


def trace_benchmark(op, exact_trace, budgets, seeds):
  methods = {
    "hutchinson": lambda m, key: hessian.hutchinson_trace(
      op, key, min_samples=m, max_samples=m, block_size=m
    ),
    "hutch++": lambda m, key: hessian.hutchpp_trace(
      op, key, sketch_size=m // 3, min_samples=m // 3, max_samples=m // 3, block_size=m // 3
    ),
    "xtrace": lambda m, key: hessian.xtrace(op, key, m),
  }
  rows = []
  for m in budgets:
    for name, fn in methods.items():
      ests = [fn(m, jax.random.key(s)) for s in range(seeds)]
      err = np.array([e.trace - exact_trace for e in ests]) / abs(exact_trace)
      se = np.array([e.stderr for e in ests]) / abs(exact_trace)
      cover = np.mean(np.abs(err) <= 1.96 * se)
      rows.append(
        dict(
          method=name,
          budget=m,
          hvps=int(ests[0].num_matvecs),
          rel_rmse=float(np.sqrt(np.mean(err**2))),
          mean_rel_stderr=float(np.mean(se)),
          coverage95=float(cover),
        )
      )
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="small model, few repeats (< 30 s)")
  parser.add_argument(
    "--out",
    type=out_file,
    default=None,
    help="JSON file (default: results/hessian_analysis.json; none with --quick)",
  )
  args = parser.parse_args()
  if args.out is None and not args.quick:
    args.out = os.path.join(HERE, "results", "hessian_analysis.json")
  t0 = time.perf_counter()
  if args.quick:
    cfg = dict(hidden=8, examples=300, steps=100, ks=[1, 5], targets=[1e-3, 1e-8], repeats=3)
    cfg.update(tol_step=1.0)
    cfg.update(budgets=[12, 48, 96], seeds=10)
  else:
    cfg = dict(hidden=24, examples=1000, steps=300, ks=[1, 5, 10], targets=[1e-3, 1e-8])
    cfg.update(repeats=5, budgets=[12, 24, 48, 96, 192], seeds=40, tol_step=0.5)
  load_start = os.getloadavg()  # time only on an idle machine: below 1
  loss_fn, params, batch = make_problem(cfg["hidden"], cfg["examples"], cfg["steps"])
  op = hessian.hessian_operator(loss_fn, params, batch)
  h = dense(op)
  exact = np.linalg.eigvalsh(h)
  print(
    f"MLP 64-{cfg['hidden']}-10 on {cfg['examples']} digits, n = {op.size} params, float64; "
    f"λ_max = {exact[-1]:.4g}, λ_min = {exact[0]:.4g}, tr = {np.trace(h):.4g}"
  )
  eig_rows = eigen_benchmark(op, exact, cfg["ks"], cfg["targets"], cfg["repeats"], cfg["tol_step"])
  print(
    "\nTop-k largest-magnitude eigenvalues: HVPs and median time to max relative error ≤ target"
  )
  print(f"{'k':>3} {'target':>7} {'method':>8} {'HVPs':>6} {'time ms':>8} {'error':>9}")
  for r in eig_rows:
    hv = "-" if r["hvps"] is None else r["hvps"]
    ms = "-" if r["seconds"] is None else f"{1e3 * r['seconds']:.1f}"
    er = "-" if r["error"] is None else f"{r['error']:.1e}"
    print(f"{r['k']:>3} {r['target']:>7.0e} {r['method']:>8} {hv:>6} {ms:>8} {er:>9}")
  trace_rows = trace_benchmark(op, float(np.trace(h)), cfg["budgets"], cfg["seeds"])
  print(f"\nTrace: relative RMS error over {cfg['seeds']} seeds vs HVPs (coverage of ±1.96 stderr)")
  print(f"{'HVPs':>5} " + " ".join(f"{m:>20}" for m in ("hutchinson", "hutch++", "xtrace")))
  for m in cfg["budgets"]:
    cells = []
    for name in ("hutchinson", "hutch++", "xtrace"):
      r = next(r for r in trace_rows if r["budget"] == m and r["method"] == name)
      cells.append(f"{r['rel_rmse']:.2e} ({100 * r['coverage95']:.0f}%)")
    print(f"{m:>5} " + " ".join(f"{c:>20}" for c in cells))
  result = dict(
    config=cfg,
    num_params=op.size,
    eigenvalues_top=exact[np.argsort(-np.abs(exact))][:10].tolist(),
    trace=float(np.trace(h)),
    eigen=eig_rows,
    trace_estimators=trace_rows,
    jax=jax.__version__,
    device=str(jax.devices()[0]),
    machine=platform.machine(),
    cpu_count=os.cpu_count(),
    loadavg_start=load_start,
    loadavg_end=os.getloadavg(),
    seconds=time.perf_counter() - t0,
  )
  if args.out is None:
    print(f"\n({result['seconds']:.0f} s; --quick writes nothing unless --out is given)")
    return
  print(f"\nwrote {write_json(args.out, result)} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
  main()
