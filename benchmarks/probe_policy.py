"""Measures the two probe policies for data-parallel AdaHessian.

With ``P`` data-parallel replicas, each computes ``z_i ⊙ H_i z_i`` on its local
batch and the estimates are averaged over the replicas (``lax.pmean``):

* ``same``: one probe ``z`` on every replica, so the average is ``z ⊙ H z`` for
  the global-batch Hessian ``H = mean_i H_i``: exactly the single-device
  estimate on the global batch. Per-entry variance ``Σ_{k≠j} H_jk²``.
* ``independent``: probe ``z_i`` on replica ``i``, so the average is
  ``mean_i z_i ⊙ H_i z_i``, still unbiased, with per-entry variance
  ``(1/P²) Σ_i Σ_{k≠j} (H_i)_jk²``, about ``1/P`` of the above when the local
  Hessians are alike, at no extra cost.

The script prints, for a small softmax MLP and ``P`` in (2, 4, 8):

1. the exact variances of the raw estimate (from explicit Hessians), and a
   Monte-Carlo estimate of the error of ``D = |estimate|`` (what AdaHessian
   uses) against ``|diag H|``;
2. the global training loss after a short AdaHessian run under each policy
   (``P`` replicas simulated with ``jax.vmap(..., axis_name=...)``, which
   runs the same collectives as ``pmap``), over several seeds, and the same for
   ``n_samples=P`` probes on one device (the costly way to get the same
   variance reduction).

Run: ``python benchmarks/probe_policy.py`` (CPU, about 5 minutes); writes
``benchmarks/results/probe_policy.json`` (``--out`` to change).
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
import optax
from jax.flatten_util import ravel_pytree

import adahessian_jax as ah

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
from _args import out_file, write_json  # noqa: E402  (examples/_args.py)

jax.config.update("jax_enable_x64", True)

N_GLOBAL = 512
D_IN, HIDDEN, N_CLASSES = 16, 32, 4
AXIS = "replicas"


def make_data(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(N_GLOBAL, D_IN))
  teacher = rng.normal(size=(D_IN, N_CLASSES))
  y = np.argmax(x @ teacher + 0.5 * rng.normal(size=(N_GLOBAL, N_CLASSES)), axis=1)
  return jnp.asarray(x), jnp.asarray(y)


def init_params(seed=0):
  rng = np.random.default_rng(seed + 100)
  return {
    "w1": jnp.asarray(rng.normal(size=(D_IN, HIDDEN)) / np.sqrt(D_IN)),
    "b1": jnp.zeros(HIDDEN),
    "w2": jnp.asarray(rng.normal(size=(HIDDEN, N_CLASSES)) / np.sqrt(HIDDEN)),
    "b2": jnp.zeros(N_CLASSES),
  }


def loss_fn(params, x, y):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  logits = h @ params["w2"] + params["b2"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def shard(a, n):
  return a.reshape(n, a.shape[0] // n, *a.shape[1:])


def variance_report(params, x, y, n_dev, n_mc=400):
  flat, unravel = ravel_pytree(params)
  xs, ys = shard(x, n_dev), shard(y, n_dev)
  local_h = jax.vmap(lambda a, b: jax.hessian(lambda f: loss_fn(unravel(f), a, b))(flat))(xs, ys)
  h = local_h.mean(0)
  diag = jnp.diag(h)
  var_same = (h**2).sum(1) - diag**2
  var_ind = ((local_h**2).sum(2) - jnp.diagonal(local_h, axis1=1, axis2=2) ** 2).sum(0) / n_dev**2

  # Monte Carlo through the library's estimator and a real pmean, as in training.
  def estimate(key, independent):
    def per_replica(a, b):
      k = jax.random.fold_in(key, jax.lax.axis_index(AXIS)) if independent else key
      e = ah.hutchinson_diagonal(lambda p: loss_fn(p, a, b), params, k)
      return jax.lax.pmean(ravel_pytree(e)[0], AXIS)

    return jax.vmap(per_replica, axis_name=AXIS)(xs, ys)[0]

  keys = jax.random.split(jax.random.key(1), n_mc)
  est_same = jax.lax.map(lambda k: estimate(k, False), keys)
  est_ind = jax.lax.map(lambda k: estimate(k, True), keys)
  err = lambda e: float(((jnp.abs(e) - jnp.abs(diag)) ** 2).sum(1).mean())
  mc_var = lambda e: float(((e - diag) ** 2).sum(1).mean())
  return {
    "var_same": float(var_same.sum()),
    "var_independent": float(var_ind.sum()),
    "mc_var_same": mc_var(est_same),
    "mc_var_independent": mc_var(est_ind),
    "abs_err_same": err(est_same),
    "abs_err_independent": err(est_ind),
    "diag_sq": float((diag**2).sum()),
  }


def train(x, y, n_dev, policy, seed, steps, lr=0.1):
  """Global loss after ``steps`` AdaHessian steps with ``n_dev`` simulated replicas."""
  n_samples = n_dev if policy == "n_samples" else 1
  replicas = 1 if policy == "n_samples" else n_dev
  tx = ah.adahessian(lr, seed=seed, n_samples=n_samples, axis_name=AXIS)
  params = init_params(0)
  state = tx.init(params)
  xs, ys = shard(x, replicas), shard(y, replicas)

  def replica_step(params, state, a, b):
    loss = lambda p: loss_fn(p, a, b)
    # The library's rule for this step's probes (with the replica index folded in if independent).
    axis = AXIS if policy == "independent" else None
    keys, _ = ah.probe_keys(ah.find_adahessian_state(state), axis)
    _, grads, hdiag = ah.hutchinson.value_grad_and_diagonal(loss, params, keys)
    grads = jax.lax.pmean(grads, AXIS)
    updates, state = tx.update(grads, state, params, hessian_diag=hdiag)
    return optax.apply_updates(params, updates), state

  @jax.jit
  def run(params, state):
    def body(carry, _):
      p, s = carry
      p, s = jax.vmap(replica_step, (None, None, 0, 0), (None, None), axis_name=AXIS)(p, s, xs, ys)
      return (p, s), None

    (params, state), _ = jax.lax.scan(body, (params, state), None, length=steps)
    return params

  return float(loss_fn(run(params, state), x, y))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--out",
    type=out_file,
    default=os.path.join(HERE, "results", "probe_policy.json"),
    help="JSON file (default benchmarks/results/probe_policy.json)",
  )
  args = parser.parse_args()
  t0 = time.time()
  result = {"variance": [], "training": []}
  x, y = make_data()
  params0 = init_params(0)
  # A point later in training, where the loss is smaller and curvature different.
  tx = ah.adahessian(0.1)
  p, s = params0, tx.init(params0)
  step = jax.jit(
    lambda p, s: (lambda g_s: (optax.apply_updates(p, g_s[0]), g_s[1]))(
      tx.update(jax.grad(loss_fn)(p, x, y), s, p, value_fn=lambda q: loss_fn(q, x, y))
    )
  )
  for _ in range(100):
    p, s = step(p, s)
  points = {"init": params0, "after 100 steps": p}

  print("1) Variance of the averaged estimate (sums over all parameters)")
  print(
    f"{'point':>16} {'P':>2} {'Var same':>10} {'Var indep':>10} {'ratio':>6} "
    f"{'MC same':>10} {'MC indep':>10} {'|D| err same':>12} {'|D| err ind':>12} {'ratio':>6}"
  )
  for name, pt in points.items():
    for n_dev in (2, 4, 8):
      r = variance_report(pt, x, y, n_dev)
      result["variance"].append({"point": name, "replicas": n_dev, **r})
      print(
        f"{name:>16} {n_dev:>2} {r['var_same']:10.3e} {r['var_independent']:10.3e} "
        f"{r['var_same'] / r['var_independent']:6.2f} {r['mc_var_same']:10.3e} "
        f"{r['mc_var_independent']:10.3e} {r['abs_err_same']:12.3e} "
        f"{r['abs_err_independent']:12.3e} {r['abs_err_same'] / r['abs_err_independent']:6.2f}"
        f"   (|diag H|^2 = {r['diag_sq']:.3e})"
      )

  print("\n2) Global training loss after AdaHessian training, P = 8 simulated replicas")
  seeds = range(5)
  for steps in (20, 200):
    row = {}
    for policy in ("same", "independent", "n_samples"):
      losses = [train(x, y, 8, policy, sd, steps) for sd in seeds]
      row[policy] = losses
    for policy, losses in row.items():
      result["training"].append({"steps": steps, "policy": policy, "losses": losses})
      print(
        f"  steps={steps:>3} {policy:>11}: mean {np.mean(losses):.6f}  "
        f"median {np.median(losses):.6f}  std over seeds {np.std(losses):.2e}  "
        f"[{', '.join(f'{v:.5f}' for v in losses)}]"
      )
  result.update(
    replicas_for_training=8,
    seeds=list(seeds),
    jax=jax.__version__,
    machine=platform.machine(),
    seconds=time.time() - t0,
  )
  print(f"\nwrote {write_json(args.out, result)} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
  main()
