"""Shared pieces of the stability experiments: tasks, stabilizer prototypes, a vmapped trainer.

The stabilizers are prototyped *outside* the library, with its public API only, so that they can
be measured before they exist as arguments of ``adahessian_jax.scale_by_adahessian``:

* ``floor`` (alpha): the spatially averaged estimate ``D = avg(|d|)`` is floored per leaf,
  ``D <- max(D, alpha * mean_leaf(D))``, and passed as ``hessian_diag=``; the transform's own
  absolute value and averaging leave such a ``D`` unchanged (both are idempotent on it).
* ``floor_global`` (bool): a leaf whose ``D`` is exactly zero everywhere (no curvature at all:
  piecewise-linear losses, an output bias under an L1 loss) takes the floor from the mean of ``D``
  over the whole model instead.
* ``clip`` (rho): the preconditioned update is clipped elementwise, ``|m_hat / denom| <= rho``
  (an ``optax.clip`` right after ``scale_by_adahessian``), so no step exceeds ``lr * rho``.
* ``warmup`` (N): with ``update_freq > 1``, the estimate is refreshed on every one of the first
  N steps (then on steps 0, k, 2k, ... of the run as before).

A configuration is a dict with these keys (missing keys: off) plus ``update_freq``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import adahessian_jax
from adahessian_jax import spatial

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
FIGURES = os.path.join(HERE, "figures")
sys.path.insert(0, os.path.join(HERE, "..", "paper"))

import cli as paper_cli  # noqa: E402  (benchmarks/paper/cli.py)
import tasks as paper_tasks  # noqa: E402  (benchmarks/paper/tasks.py)
import training as paper_training  # noqa: E402  (benchmarks/paper/training.py)
from _args import file_name, out_dir  # noqa: E402  (examples/_args.py, on the path from cli)

WEIGHT_DECAY = paper_training.WEIGHT_DECAY
DIVERGE_FACTOR = paper_training.DIVERGE_FACTOR
schedule = paper_training.schedule
TUNED_LR = 0.47  # AdaHessian's tuned rate on all three paper tasks (results/tuning.json)
PAPER_STEPS = {"cnn": 300, "lm": 300, "dlrm": 1500}
DEFAULT_LR = 0.15  # adahessian()'s default rate, used for the two toy problems
TOY_STEPS = 100


def get_task(name: str, quick: bool = False):
  """A paper task (``cnn``, ``lm``, ``dlrm``) or a toy problem (``mlp_l1``, ``linear_hinge``)."""
  if name in TOYS:
    return TOYS[name]()
  return paper_tasks.get_task(name, quick)


# --------------------------------------------------------------------------------------------
# Toy problems without curvature along some or all coordinates


class ReluMLP(nn.Module):
  """The toys' ReLU MLP, two hidden layers of 32, one output per example."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(32)(x))
    x = nn.relu(nn.Dense(32)(x))
    return nn.Dense(1)(x)[:, 0]


def toy_task(name, model, loss_on_output, x, y, batch, metric_loss_only=True):
  """A ``paper_tasks.Task`` training ``model`` on ``(x, y)`` with ``loss_on_output(f(x), y)``
  in batches of ``batch``, scored by its training-set loss (the toys' rule)."""

  def init(key):
    return model.init(key, x[:1])["params"]

  def loss(params, b):
    xb, yb = b
    return loss_on_output(model.apply({"params": params}, xb), yb)

  def sample(data, key):
    idx = jax.random.randint(key, (batch,), 0, data["x"].shape[0])
    return data["x"][idx], data["y"][idx]

  def evaluate(params, data):
    return {"loss": loss(params, (data["x"], data["y"]))}

  data = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
  cfg = {"n": int(x.shape[0]), "dim": int(x.shape[1]), "batch": batch}
  return paper_tasks.Task(
    name, init, loss, sample, evaluate, data, lambda b: None, "loss", False, cfg
  )


@functools.cache
def mlp_l1_task():
  """ReLU MLP 8-32-32-1 regressing a smooth teacher with the L1 loss (training-set loss).

  Along each weight the network is piecewise linear, so the Hessian *diagonal* is exactly zero
  almost everywhere; the output bias has no curvature at all (its whole Hessian row is zero).
  """
  r = np.random.default_rng(0)
  x = r.normal(size=(1024, 8)).astype(np.float32)
  y = (0.5 * np.sin(x @ r.normal(size=8) / np.sqrt(8) * 2)).astype(np.float32)
  return toy_task("mlp_l1", ReluMLP(), lambda f, t: jnp.abs(f - t).mean(), x, y, batch=64)


@functools.cache
def linear_hinge_task():
  """A linear classifier (20 features) with the hinge loss: the Hessian is zero everywhere."""
  r = np.random.default_rng(1)
  x = r.normal(size=(1024, 20)).astype(np.float32)
  w = r.normal(size=20)
  y = np.sign(x @ w + 0.5 * r.normal(size=1024)).astype(np.float32)
  hinge = lambda f, t: jnp.maximum(0.0, 1.0 - t * f).mean()
  return toy_task("linear_hinge", nn.Dense(1), lambda f, t: hinge(f[:, 0], t), x, y, batch=64)


TOYS = {"mlp_l1": mlp_l1_task, "linear_hinge": linear_hinge_task}


# --------------------------------------------------------------------------------------------
# Stabilizer prototypes


def floor_estimate(d: Any, alpha: float, global_fallback: bool) -> Any:
  """``max(D, alpha * mean_leaf(D))`` per leaf (``D`` already absolute and averaged)."""
  leaves = jax.tree.leaves(d)
  total = sum(jnp.sum(x) for x in leaves)
  global_mean = total / sum(x.size for x in leaves)

  def one(x):
    m = jnp.mean(x)
    if global_fallback:
      m = jnp.where(m > 0, m, global_mean)
    return jnp.maximum(x, alpha * m)

  return jax.tree.map(one, d)


def make_tx(cfg: dict[str, Any], lr, averaging=None, weight_decay: float = WEIGHT_DECAY):
  """``adahessian(lr, weight_decay=...)`` with the configuration's clip; returns ``(tx, prep)``.

  ``prep(hdiag)`` turns the raw estimate into the ``hessian_diag`` to pass (floored ``D``).
  With ``warmup`` the transform refreshes every step and the caller keeps the lazy ``D``.
  """
  k = int(cfg.get("update_freq", 1))
  warmup = int(cfg.get("warmup", 0))
  inner_freq = 1 if warmup else k
  parts = [adahessian_jax.scale_by_adahessian(update_freq=inner_freq, averaging=averaging)]
  if cfg.get("clip"):
    parts.append(optax.clip(float(cfg["clip"])))
  parts += [optax.add_decayed_weights(weight_decay), optax.scale_by_learning_rate(lr)]
  tx = optax.chain(*parts)
  alpha = float(cfg.get("floor", 0.0))
  glob = bool(cfg.get("floor_global", False))

  def prep(params, hdiag):
    if not alpha and not warmup:
      return hdiag
    rules = spatial.resolve_rules(averaging, params)
    d = spatial.apply_rules(rules, jax.tree.map(jnp.abs, hdiag))
    return floor_estimate(d, alpha, glob) if alpha else d

  return tx, prep


reseed = paper_training.reseed_probes  # the probe key of each vmapped run


def make_step(task, cfg: dict[str, Any], lr_fn, averaging=None, weight_decay=WEIGHT_DECAY):
  """Returns ``(tx, step)``.

  ``step(t, params, opt_state, d_lazy, batch) -> (params, opt_state, d_lazy, loss)``; ``t`` is
  the 0-based step index, ``d_lazy`` the kept ``D`` (used only with ``warmup``).
  """
  tx, prep = make_tx(cfg, lr_fn, averaging, weight_decay)
  k = int(cfg.get("update_freq", 1))
  warmup = int(cfg.get("warmup", 0))
  vgh = adahessian_jax.value_grad_and_hessian_diag(task.loss)

  def step(t, params, opt_state, d_lazy, batch):
    if warmup:
      refresh = (t < warmup) | (t % k == 0)

      def fresh():
        loss, grads, hd = vgh(params, opt_state, batch)
        return loss, grads, prep(params, hd)

      def stale():
        loss, grads = jax.value_and_grad(task.loss)(params, batch)
        return loss, grads, d_lazy

      loss, grads, hd = jax.lax.cond(refresh, fresh, stale)
      d_lazy = hd
    else:
      loss, grads, hd = vgh(params, opt_state, batch)
      hd = prep(params, hd)
    updates, opt_state = tx.update(grads, opt_state, params, hessian_diag=hd)
    return optax.apply_updates(params, updates), opt_state, d_lazy, loss

  return tx, step


@functools.cache
def compiled_run(task, cfg_json: str, steps: int, lr_base: float, weight_decay: float):
  """A jitted, seed-vmapped whole run: ``fn(lr_scales, seeds, data) -> (loss0, losses, metrics)``.

  Seeds are derived as in ``benchmarks/paper``: ``key(seed)`` split into init, data and probe keys,
  so the exact rule reproduces the paper benchmarks' runs.
  """
  cfg = json.loads(cfg_json)
  averaging = task.averaging(1)

  def one(scale, seed, data):
    lr = lr_base * scale
    # Paper tasks: the paper benchmarks' warm-up + cosine schedule; toys: a constant rate.
    lr_fn = lr if task.name in TOYS else schedule(lr, steps)
    k_init, k_data, k_probe = jax.random.split(jax.random.key(seed), 3)
    params = task.init(k_init)
    tx, step = make_step(task, cfg, lr_fn, averaging, weight_decay)
    opt_state = reseed(tx.init(params), k_probe)
    d_lazy = jax.tree.map(jnp.zeros_like, params)
    loss0 = task.loss(params, task.sample(data, k_data))

    def body(carry, xs):
      t, k = xs
      params, opt_state, d_lazy = carry
      params, opt_state, d_lazy, loss = step(t, params, opt_state, d_lazy, task.sample(data, k))
      return (params, opt_state, d_lazy), loss

    xs = (jnp.arange(steps), jax.random.split(k_data, steps))
    (params, _, _), losses = jax.lax.scan(body, (params, opt_state, d_lazy), xs)
    return loss0, losses, task.evaluate(params, data)

  return jax.jit(jax.vmap(one, in_axes=(0, 0, None)))


def run(task, cfg: dict[str, Any], seeds: Sequence[int], steps: int | None = None,
        lr_scale: float = 1.0) -> list[dict[str, Any]]:  # fmt: skip
  """Trains one run per seed; returns records like ``benchmarks/paper``'s (no timings).

  Paper tasks: tuned rate times ``lr_scale``, the paper schedule, weight decay 1e-4, the paper's
  step budget. Toys: ``adahessian()``'s default rate 0.15 (times ``lr_scale``), constant, no
  weight decay, 100 steps.
  """
  toy = task.name in TOYS
  steps = steps or (TOY_STEPS if toy else PAPER_STEPS[task.name])
  lr_base, wd = (DEFAULT_LR, 0.0) if toy else (TUNED_LR, WEIGHT_DECAY)
  fn = compiled_run(task, json.dumps(cfg, sort_keys=True), steps, lr_base, wd)
  n = len(seeds)
  loss0, losses, metrics = jax.block_until_ready(
    fn(jnp.full((n,), lr_scale, jnp.float32), jnp.asarray(seeds, jnp.int32), task.data)
  )
  loss0, losses = np.asarray(loss0), np.asarray(losses)
  out = []
  for i, seed in enumerate(seeds):
    m = {k: float(np.asarray(v)[i]) for k, v in metrics.items()}
    finite = bool(np.all(np.isfinite(losses[i])) and np.isfinite(m["loss"]))
    diverged = (not finite) or m["loss"] > DIVERGE_FACTOR * loss0[i]
    edges = np.linspace(0, steps, min(steps, 50) + 1).astype(int)
    out.append(
      dict(
        seed=int(seed),
        lr=float(lr_base * lr_scale),
        initial_loss=float(loss0[i]),
        final_train_loss=float(np.mean(losses[i, -max(1, steps // 10) :])),
        max_train_loss=float(np.nanmax(np.where(np.isfinite(losses[i]), losses[i], np.nan)))
        if np.any(np.isfinite(losses[i]))
        else None,
        val=m,
        diverged=bool(diverged),
        no_progress=bool((not diverged) and m["loss"] >= loss0[i]),
        curve=[float(np.mean(losses[i, a:b])) for a, b in zip(edges[:-1], edges[1:], strict=True)],
      )
    )
  return out


def train(task, optimizer: str, lrs, seeds, steps: int, **kwargs) -> list[dict[str, Any]]:
  """``benchmarks/paper``'s :func:`train` (``kwargs``: its ``update_freq``, ``config``), with the
  fields :func:`summarize` reads set as :func:`run` sets them (``collapsed``, ``no_progress``)."""
  recs = paper_training.train(task, optimizer, lrs, seeds, steps, **kwargs)
  for r in recs:
    r["collapsed"] = collapsed(task.name, r)
    r["no_progress"] = not r["diverged"] and r["val"]["loss"] >= r["initial_loss"]
  return recs


# A finite run *collapsed* when it ended where a model that learned nothing would be: chance
# accuracy on the CNN (10 classes), the majority-class rate on the DLRM clicks (58.5 %), the
# context-free character statistics on the LM (~3.3 nats/char; trained runs reach 2.2-2.6), or, on
# the toys, no lower training loss than at the start.
def collapsed(task_name: str, record: dict[str, Any]) -> bool:
  """Whether a finite, non-diverged run ended at the level of a model that learned nothing."""
  if record["diverged"]:
    return False
  return paper_training.collapsed(task_name, record["val"], record["initial_loss"])


def quick_note(steps: int) -> str:
  """The line under a ``--quick`` run's results: its ``steps`` are too few to learn, so most runs
  count as failed (:func:`collapsed`)."""
  return (
    f"(--quick: {steps} steps are too few to learn; a run that ends where a model that learned "
    "nothing would counts as failed)"
  )


def summarize(records, metric: str, task_name: str) -> dict[str, Any]:
  """Mean ± std of ``metric`` over the seeds that neither diverged nor collapsed, and counts."""
  bad = [r["diverged"] or collapsed(task_name, r) for r in records]
  ok = [r["val"][metric] for r, b in zip(records, bad, strict=True) if not b]
  return {
    "n": len(records),
    "diverged": sum(r["diverged"] for r in records),
    "collapsed": sum(collapsed(task_name, r) for r in records),
    "failed": sum(bad),
    "no_progress": sum(r["no_progress"] for r in records),
    "all": [r["val"][metric] if np.isfinite(r["val"][metric]) else None for r in records],
    "mean": float(np.mean(ok)) if ok else None,
    "std": float(np.std(ok)) if ok else None,
  }


def add_output_arguments(p: argparse.ArgumentParser, default: str) -> None:
  """``--out`` (the name of the results JSON, ``default`` unless given) and ``--out-dir`` (its
  directory, resolved by :func:`output_dir`), as the experiments that write one take them."""
  p.add_argument(
    "--out", type=file_name, default=default, help=f"results/OUT.json (default: {default})"
  )
  p.add_argument(
    "--out-dir", type=out_dir, default=None, help="directory of OUT.json (default: results/)"
  )


def output_dir(args: argparse.Namespace, quick_dir: str) -> str:
  """The directory of the results JSON: ``--out-dir`` if given, else ``quick_dir`` for a
  ``--quick`` run, else ``results/``."""
  if args.out_dir is not None:
    return args.out_dir
  return quick_dir if args.quick else RESULTS


def write_json(name: str, payload: Any, compact: bool = False, directory: str = RESULTS) -> str:
  """Writes ``<directory>/<name>.json``, by default ``results/`` (non-finite floats as ``null``)."""
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, f"{name}.json")
  fmt = {"separators": (",", ":")} if compact else {"indent": 1}
  with open(path + ".tmp", "w") as f:
    json.dump(paper_cli.finite(payload), f, allow_nan=False, default=paper_cli.json_default, **fmt)
  os.replace(path + ".tmp", path)
  return path


def cell(s: dict[str, Any], metric: str, emphasis: str = "") -> str:
  """Table cell ``mean ± std`` over the seeds that did not fail, and ``(k/n failed)``."""
  if s["mean"] is None:
    return f"all {s['n']} failed"
  sc, dg = (100.0, 1) if metric == "acc" else (1.0, 3)
  out = f"{s['mean'] * sc:.{dg}f} ± {s['std'] * sc:.{dg}f}"
  if s["failed"]:
    out += f" ({emphasis}{s['failed']}/{s['n']} failed{emphasis})"
  return out
