"""Optimizers and the vmapped trainer of the paper-claim experiments.

:func:`train` runs many (learning rate, seed) pairs at once: the whole training run of one pair
is a ``lax.scan`` over steps and the pairs are ``jax.vmap``-ed, so an experiment compiles once
per optimizer configuration. AdaHessian uses the fused route
(``adahessian_jax.value_grad_and_hessian_diag``) and its probe key is seeded per run.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tasks import Task

import adahessian_jax

# The training step is the examples' (examples/_common.py), shared with benchmarks/step_time.py.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples"))
from _common import make_step  # noqa: E402

# A run diverged if a training loss is non-finite, or if its final validation loss is more than
# DIVERGE_FACTOR times the loss at initialisation (it ended far worse than where it started).
# Tables report mean ± std over the runs that did not diverge, and count separately the finite
# runs that made no progress (final validation loss >= the loss at initialisation).
DIVERGE_FACTOR = 1.5
# A finite run "collapsed" when it ended at the level of a model that learned nothing: chance-level
# digits (10 classes), the DLRM's majority-class rate, an LM no better than character frequencies.
# The held-out tasks of benchmarks/stability/heldout.py train on the same data as the CNN (vit)
# and the LM (gru), and take their levels.
COLLAPSE = {"cnn": ("acc", 0.5), "dlrm": ("acc", 0.6), "lm": ("loss", 3.0)}
COLLAPSE.update(vit=COLLAPSE["cnn"], gru=COLLAPSE["lm"])


def collapsed(task_name: str, val: Mapping[str, float], initial_loss: float) -> bool:
  """Whether a finite run's validation metrics ``val`` are those of a model that learned nothing
  (``COLLAPSE``; tasks without a rule: a final loss no better than at initialisation)."""
  if task_name not in COLLAPSE:
    return bool(val["loss"] >= initial_loss)
  metric, level = COLLAPSE[task_name]
  return bool(val[metric] < level if metric == "acc" else val[metric] > level)


WEIGHT_DECAY = 1e-4  # AdamW and AdaHessian (both decoupled, multiplied by the learning rate)

Config = tuple[tuple[str, Any], ...]  # AdaHessian keyword arguments, hashable: sorted items


def freeze_config(config: Mapping[str, Any] | Config | None) -> Config:
  """``{"curvature_floor": 0.1}`` -> ``(("curvature_floor", 0.1),)`` (a cache key)."""
  if not config:
    return ()
  items = config.items() if isinstance(config, Mapping) else config
  return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in items))


def schedule(lr, steps: int):
  """The same schedule for every optimizer: 10 % linear warm-up, then cosine decay to lr/10.

  optax's warm-up-cosine with peak 1, scaled by ``lr``: ``lr`` is traced (vmapped over runs),
  and optax's schedule needs a concrete peak.
  """
  warm = max(1, steps // 10)
  shape = optax.warmup_cosine_decay_schedule(1.0 / warm, 1.0, warm, max(steps, warm + 1), 0.1)
  return lambda count: lr * shape(count)


def make_optimizer(
  name: str,
  lr,
  steps: int,
  task: Task,
  block_size: int = 1,
  update_freq: int = 1,
  clip_norm: float | None = None,
  **adahessian_kwargs,
) -> optax.GradientTransformation:
  """The optimizer ``name`` with peak learning rate ``lr`` and the shared schedule.

  ``clip_norm``: the gradients are first clipped to this global norm
  (``optax.clip_by_global_norm``), for any optimizer. ``adahessian_kwargs`` are passed on to
  :func:`adahessian_jax.adahessian` (e.g. stabilizer arguments); they are an error for the other
  optimizers.
  """
  tx = _optimizer(name, lr, steps, task, block_size, update_freq, **adahessian_kwargs)
  return tx if clip_norm is None else optax.chain(optax.clip_by_global_norm(clip_norm), tx)


def _optimizer(name, lr, steps, task, block_size, update_freq, **adahessian_kwargs):
  """:func:`make_optimizer` without the gradient clip."""
  sched = schedule(lr, steps)
  if name != "adahessian" and adahessian_kwargs:
    raise ValueError(f"{name!r} takes no AdaHessian arguments, got {sorted(adahessian_kwargs)}")
  if name == "sgd":
    return optax.sgd(sched, momentum=0.9)
  if name == "adam":
    return optax.adam(sched)
  if name == "adamw":
    return optax.adamw(sched, weight_decay=WEIGHT_DECAY)
  if name == "adagrad":
    return optax.adagrad(sched)
  if name == "adahessian":
    return adahessian_jax.adahessian(
      sched,
      **{
        "weight_decay": WEIGHT_DECAY,
        "block_size": block_size,
        "update_freq": update_freq,
        "averaging": task.averaging(block_size),
        **adahessian_kwargs,
      },
    )
  raise ValueError(f"unknown optimizer {name!r}")


def reseed_probes(opt_state, key: jax.Array):
  """``opt_state`` with its AdaHessian state's probe keys drawn from ``key`` (one per run).

  ``adahessian(seed=...)`` needs a Python int, and here the seed is traced (runs are vmapped).
  """

  def reseed(state):
    n_samples = state.key.shape[0]
    return state._replace(key=jax.random.key_data(jax.random.split(key, n_samples)))

  return adahessian_jax.map_adahessian_state(reseed, opt_state)


@functools.cache
def compiled_run(
  task: Task, name: str, steps: int, block_size: int, update_freq: int, config: Config = ()
):
  """The jitted ``(lrs, seeds, data) -> (initial losses, losses, metrics)`` of many runs."""

  def one(lr, seed, data):
    key = jax.random.key(seed)
    k_init, k_data, k_probe = jax.random.split(key, 3)
    params = task.init(k_init)
    tx = make_optimizer(name, lr, steps, task, block_size, update_freq, **dict(config))
    opt_state = tx.init(params)
    if name == "adahessian":
      opt_state = reseed_probes(opt_state, k_probe)
    step = make_step(tx, task.loss, "fused" if name == "adahessian" else "plain")
    loss0 = task.loss(params, task.sample(data, k_data))

    def body(carry, k):
      params, opt_state = carry
      params, opt_state, loss = step(params, opt_state, task.sample(data, k))
      return (params, opt_state), loss

    (params, _), losses = jax.lax.scan(body, (params, opt_state), jax.random.split(k_data, steps))
    return loss0, losses, task.evaluate(params, data)

  return jax.jit(jax.vmap(one, in_axes=(0, 0, None)))


def train(
  task: Task,
  name: str,
  lrs: Sequence[float],
  seeds: Sequence[int],
  steps: int,
  block_size: int = 1,
  update_freq: int = 1,
  curve_points: int = 50,
  config: Mapping[str, Any] | Config | None = None,
) -> list[dict[str, Any]]:
  """Trains one run per ``(lrs[i], seeds[i])`` at once; returns one record per run.

  ``config``: extra keyword arguments of :func:`adahessian_jax.adahessian` (AdaHessian only),
  and ``clip_norm`` (:func:`make_optimizer`).
  """
  assert len(lrs) == len(seeds)
  config = freeze_config(config)
  fn = compiled_run(task, name, steps, block_size, update_freq, config)
  t0 = time.perf_counter()
  loss0, losses, metrics = jax.block_until_ready(
    fn(jnp.asarray(lrs, jnp.float32), jnp.asarray(seeds, jnp.int32), task.data)
  )
  wall = time.perf_counter() - t0
  loss0, losses = np.asarray(loss0), np.asarray(losses)
  metrics = {k: np.asarray(v) for k, v in metrics.items()}
  # Training-loss curve: means over `curve_points` equal windows of steps.
  n = max(1, min(curve_points, steps))
  edges = np.linspace(0, steps, n + 1).astype(int)
  records = []
  for i, (lr, seed) in enumerate(zip(lrs, seeds, strict=True)):
    curve = [float(np.mean(losses[i, a:b])) for a, b in zip(edges[:-1], edges[1:], strict=True)]
    m = {k: float(v[i]) for k, v in metrics.items()}
    diverged = bool(
      not np.all(np.isfinite(losses[i]))
      or not np.isfinite(m["loss"])
      or m["loss"] > DIVERGE_FACTOR * loss0[i]
    )
    records.append(
      dict(
        optimizer=name,
        lr=float(lr),
        seed=int(seed),
        steps=steps,
        block_size=block_size,
        update_freq=update_freq,
        config=dict(config),
        initial_loss=float(loss0[i]),
        final_train_loss=float(np.mean(losses[i, -max(1, steps // 10) :])),
        val=m,
        diverged=diverged,
        collapsed=not diverged and collapsed(task.name, m, float(loss0[i])),
        curve_steps=[int(b) for b in edges[1:]],
        curve=curve,
        group_wall_s=round(wall, 2),  # compile + all runs of this call, on a shared CPU
      )
    )
  return records


def summarize(records: Sequence[dict[str, Any]], metric: str) -> dict[str, Any]:
  """Mean ± std of a validation metric over seeds, with the number of diverged runs."""
  ok = [r["val"][metric] for r in records if not r["diverged"]]
  out = {"n": len(records), "diverged": sum(r["diverged"] for r in records)}
  out["collapsed"] = sum(bool(r.get("collapsed")) for r in records)
  # Finite runs that ended no better than at initialisation (e.g. a spike, then stuck at chance).
  out["no_progress"] = sum(
    (not r["diverged"]) and r["val"]["loss"] >= r["initial_loss"] for r in records
  )
  vals = [r["val"][metric] for r in records]
  out["all"] = [None if not np.isfinite(v) else v for v in vals]
  out["mean"] = float(np.mean(ok)) if ok else None
  out["std"] = float(np.std(ok)) if ok else None
  return out


def fmt(summary: dict[str, Any], metric: str) -> str:
  """Table cell: ``mean ± std`` (over non-diverged seeds), ``diverged``, or ``k/n diverged``."""
  if summary["mean"] is None:
    return "diverged"
  scale, digits = (100.0, 2) if metric == "acc" else (1.0, 3)
  cell = f"{summary['mean'] * scale:.{digits}f} ± {summary['std'] * scale:.{digits}f}"
  if summary["diverged"]:
    cell += f" ({summary['diverged']}/{summary['n']} div.)"
  if summary.get("collapsed"):
    cell += f" ({summary['collapsed']}/{summary['n']} collapsed)"
  if summary.get("no_progress"):
    cell += f" ({summary['no_progress']}/{summary['n']} no progress)"
  return cell
