"""Small tasks, optimizers and a vmapped trainer shared by the paper-claim experiments.

Three tasks this CPU can train in seconds to minutes:

* ``lm``: a character-level causal transformer on CPython's bundled documentation text
  (``pydoc_data.topics``), the last 10 % held out; metric: validation loss in nats per character.
* ``cnn``: a small Flax CNN on scikit-learn's 8x8 handwritten digits, 25 % held out; metric:
  validation accuracy.
* ``dlrm``: a tiny DLRM-style click model (embeddings, bottom MLP, pairwise dot interactions, top
  MLP) on synthetic clicks from a known generator with Zipf-distributed categorical ids; metric:
  test accuracy (the generator's own Bayes accuracy is the ceiling).

:func:`train` runs many (learning rate, seed) pairs at once: the whole training run of one pair
is a ``lax.scan`` over steps and the pairs are ``jax.vmap``-ed, so an experiment compiles once
per optimizer configuration. AdaHessian uses the fused route
(``adahessian_jax.value_grad_and_hessian_diag``) and its probe key is seeded per run.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import adahessian_jax
from adahessian_jax import spatial

# A run diverged if a training loss is non-finite, or if its final validation loss is more than
# DIVERGE_FACTOR times the loss at initialisation (it ended far worse than where it started).
# Tables report mean ± std over the runs that did not diverge, and count separately the finite
# runs that made no progress (final validation loss >= the loss at initialisation).
DIVERGE_FACTOR = 1.5
EVAL_SEEDS = (0, 1, 2, 3)  # 4 seeds: the same vmapped shape as the 4-value LR sweep
TUNE_SEED = 100  # the learning-rate sweep uses its own seed, not one of the reported ones
WEIGHT_DECAY = 1e-4  # AdamW and AdaHessian (both decoupled, multiplied by the learning rate)

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


# --------------------------------------------------------------------------------------------
# Tasks


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
  """A supervised task: everything a training run needs, all jit-able."""

  name: str
  init: Callable[[jax.Array], Any]  # key -> params
  loss: Callable[[Any, Any], jax.Array]  # (params, batch) -> scalar
  sample: Callable[[Any, jax.Array], Any]  # (data, key) -> batch
  evaluate: Callable[[Any, Any], dict[str, jax.Array]]  # (params, data) -> metrics
  data: Any  # arrays, passed to the compiled run as an argument
  averaging: Callable[[int], Any]  # block_size -> AdaHessian `averaging` spec
  metric: str  # the headline validation metric
  higher_is_better: bool
  config: dict[str, Any]


# Character-level LM ---------------------------------------------------------------------------


def _lm_text() -> np.ndarray:
  from pydoc_data.topics import topics

  text = "\n".join(topics[k] for k in sorted(topics))
  # Vocabulary: newline, printable ASCII, and one id for everything else (98 ids).
  codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
  ids = np.where((codes >= 32) & (codes < 127), codes - 31, 96)
  ids = np.where(codes == 10, 0, ids)
  return ids.astype(np.int32)


class _Block(nn.Module):
  d: int
  heads: int

  @nn.compact
  def __call__(self, x):
    b, t, d = x.shape
    h = nn.LayerNorm()(x)
    qkv = nn.Dense(3 * d, name="qkv")(h).reshape(b, t, 3, self.heads, d // self.heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    att = jnp.einsum("bqhc,bkhc->bhqk", q, k) / math.sqrt(d // self.heads)
    att = jnp.where(jnp.tril(jnp.ones((t, t), bool)), att, -1e9)
    o = jnp.einsum("bhqk,bkhc->bqhc", jax.nn.softmax(att, axis=-1), v).reshape(b, t, d)
    x = x + nn.Dense(d, name="proj")(o)
    h = nn.LayerNorm()(x)
    return x + nn.Dense(d, name="fc2")(nn.gelu(nn.Dense(4 * d, name="fc1")(h)))


class CharLM(nn.Module):
  vocab: int
  d: int
  layers: int
  heads: int
  context: int

  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(self.vocab, self.d, name="tok_embed")(ids)
    pos = self.param("pos_embed", nn.initializers.normal(0.02), (self.context, self.d))
    x = x + pos[: ids.shape[1]]
    for i in range(self.layers):
      x = _Block(self.d, self.heads, name=f"block{i}")(x)
    return nn.Dense(self.vocab, name="head")(nn.LayerNorm()(x))


def lm_task(quick: bool = False) -> Task:
  cfg = dict(d=32, layers=2, heads=4, context=32, batch=16, vocab=97, eval_windows=64)
  if quick:
    cfg.update(d=16, layers=1, heads=2, context=16, batch=8, eval_windows=8)
  ids = _lm_text()
  split = int(0.9 * len(ids))
  train, val = ids[:split], ids[split:]
  ctx = cfg["context"]
  # Fixed validation windows spread evenly over the held-out text.
  starts = np.linspace(0, len(val) - ctx - 2, cfg["eval_windows"]).astype(np.int64)
  val_windows = np.stack([val[s : s + ctx + 1] for s in starts])
  model = CharLM(cfg["vocab"], cfg["d"], cfg["layers"], cfg["heads"], ctx)

  def init(key):
    return model.init(key, jnp.zeros((1, ctx), jnp.int32))["params"]

  def xent(params, windows):
    logits = model.apply({"params": params}, windows[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).mean()

  def sample(data, key):
    train_ids = data["train"]
    off = jax.random.randint(key, (cfg["batch"],), 0, train_ids.shape[0] - ctx - 1)
    return jax.vmap(lambda o: jax.lax.dynamic_slice(train_ids, (o,), (ctx + 1,)))(off)

  def evaluate(params, data):
    return {"loss": xent(params, data["val"])}

  def averaging(block_size):
    # Embedding tables are (vocab or position, feature): average blocks of features of one row,
    # as the fairseq reference does for its (num_embeddings, dim) weights. Dense kernels (in, out)
    # get the Flax default: blocks of `block_size` inputs of each output unit.
    def rule(path, leaf):
      if "embed" in jax.tree_util.keystr(path) and leaf.ndim == 2:
        return spatial.blocks(block_size, axis=1)
      return None

    return rule

  data = {"train": jnp.asarray(train), "val": jnp.asarray(val_windows)}
  cfg.update(train_chars=int(len(train)), val_chars_evaluated=int(val_windows[:, 1:].size))
  return Task("lm", init, xent, sample, evaluate, data, averaging, "loss", False, cfg)


# Digits CNN -----------------------------------------------------------------------------------


class Conv3x3(nn.Module):
  """A 3x3 'SAME' convolution written as patches @ kernel.

  Same parameter layout as ``flax.linen.Conv`` (kernel ``(3, 3, in, out)``, so AdaHessian's default
  averaging is over its spatial axes 0, 1), but a plain contraction, which stays fast on CPU when
  the whole training run is ``vmap``-ed over seeds (a vmapped ``lax.conv`` becomes a grouped
  convolution, several times slower here).
  """

  features: int

  @nn.compact
  def __call__(self, x):
    kernel = self.param(
      "kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features)
    )
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    h, w = x.shape[1], x.shape[2]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = jnp.stack(
      [jnp.stack([xp[:, i : i + h, j : j + w] for j in range(3)], 3) for i in range(3)], 3
    )  # (batch, h, w, 3, 3, in)
    return jnp.einsum("bhwijc,ijco->bhwo", patches, kernel) + bias


class DigitsCNN(nn.Module):
  width: int

  @nn.compact
  def __call__(self, x):
    x = nn.relu(Conv3x3(self.width)(x))
    x = nn.relu(Conv3x3(2 * self.width)(x))
    x = nn.avg_pool(x, (2, 2), (2, 2)).reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(64)(x))
    return nn.Dense(10)(x)


def cnn_task(quick: bool = False) -> Task:
  from sklearn.datasets import load_digits

  cfg = dict(width=8 if quick else 16, batch=32, val_fraction=0.25)
  digits = load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]
  y = digits.target.astype(np.int32)
  perm = np.random.default_rng(0).permutation(len(y))
  n_val = int(cfg["val_fraction"] * len(y))
  val_idx, train_idx = perm[:n_val], perm[n_val:]
  model = DigitsCNN(cfg["width"])

  def init(key):
    return model.init(key, jnp.zeros((1, 8, 8, 1)))["params"]

  def loss(params, batch):
    xb, yb = batch
    logits = model.apply({"params": params}, xb)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  def sample(data, key):
    idx = jax.random.randint(key, (cfg["batch"],), 0, data["x"].shape[0])
    return data["x"][idx], data["y"][idx]

  def evaluate(params, data):
    logits = model.apply({"params": params}, data["xv"])
    xent = optax.softmax_cross_entropy_with_integer_labels(logits, data["yv"]).mean()
    return {"loss": xent, "acc": jnp.mean(jnp.argmax(logits, -1) == data["yv"])}

  data = {
    "x": jnp.asarray(x[train_idx]),
    "y": jnp.asarray(y[train_idx]),
    "xv": jnp.asarray(x[val_idx]),
    "yv": jnp.asarray(y[val_idx]),
  }
  cfg.update(n_train=int(len(train_idx)), n_val=int(n_val))
  # Flax default averaging: conv kernels over their spatial axes, dense kernels by input blocks.
  return Task("cnn", init, loss, sample, evaluate, data, lambda b: None, "acc", True, cfg)


# Synthetic DLRM -------------------------------------------------------------------------------


def _dlrm_data(n: int, fields: int, card: int, n_dense: int, seed: int):
  """Clicks from a known generator: per-id weights, dense weights, pairwise id interactions."""
  g = np.random.default_rng(1234)  # the generator's parameters are fixed; `seed` draws samples
  w = g.normal(0, 0.5, (fields, card))
  emb = g.normal(0, 0.5, (fields, card, 4))
  u = g.normal(0, 0.5, n_dense)
  r = np.random.default_rng(seed)
  # Zipf-like ids: a few ids are frequent, most are rare (the regime Adagrad is used for).
  p = 1.0 / np.arange(1, card + 1) ** 1.1
  ids = r.choice(card, size=(n, fields), p=p / p.sum())
  dense = r.normal(0, 1, (n, n_dense))
  e = emb[np.arange(fields), ids]  # (n, fields, 4)
  inter = np.einsum("nfc,ngc->nfg", e, e)
  iu = np.triu_indices(fields, 1)
  pair = inter[:, iu[0], iu[1]].sum(-1) / np.sqrt(fields)
  logit = -0.5 + w[np.arange(fields), ids].sum(-1) / np.sqrt(fields) + dense @ u + pair
  prob = 1 / (1 + np.exp(-logit))
  clicks = (r.random(n) < prob).astype(np.float32)
  return ids.astype(np.int32), dense.astype(np.float32), clicks, prob


class DLRM(nn.Module):
  fields: int
  card: int
  dim: int

  @nn.compact
  def __call__(self, ids, dense):
    embs = [nn.Embed(self.card, self.dim, name=f"embed{f}")(ids[:, f]) for f in range(self.fields)]
    bottom = nn.Dense(self.dim)(nn.relu(nn.Dense(16)(dense)))
    z = jnp.stack([bottom, *embs], axis=1)  # (batch, fields + 1, dim)
    dots = jnp.einsum("bfd,bgd->bfg", z, z)
    iu = np.triu_indices(self.fields + 1, 1)
    top_in = jnp.concatenate([bottom, dots[:, iu[0], iu[1]]], axis=-1)
    return nn.Dense(1)(nn.relu(nn.Dense(32)(top_in)))[:, 0]


def dlrm_task(quick: bool = False) -> Task:
  # 400k training clicks: the 1500-step headline run (batch 256) sees ~1 pass of the data, the
  # regime of the paper's single-epoch Criteo runs (a 50k set was badly overfitted by then).
  cfg = dict(fields=6, cardinality=1000, n_dense=4, dim=8, batch=256)
  cfg.update(n_train=400_000, n_test=20_000)
  if quick:
    cfg.update(cardinality=100, n_train=2_000, n_test=1_000, batch=64)
  f, card, nd = cfg["fields"], cfg["cardinality"], cfg["n_dense"]
  ids, dense, clicks, _ = _dlrm_data(cfg["n_train"], f, card, nd, seed=1)
  ids_t, dense_t, clicks_t, prob_t = _dlrm_data(cfg["n_test"], f, card, nd, seed=2)
  model = DLRM(f, card, cfg["dim"])

  def init(key):
    return model.init(key, jnp.zeros((1, f), jnp.int32), jnp.zeros((1, nd)))["params"]

  def loss(params, batch):
    i, d, c = batch
    return optax.sigmoid_binary_cross_entropy(model.apply({"params": params}, i, d), c).mean()

  def sample(data, key):
    idx = jax.random.randint(key, (cfg["batch"],), 0, data["ids"].shape[0])
    return data["ids"][idx], data["dense"][idx], data["clicks"][idx]

  def evaluate(params, data):
    logits = model.apply({"params": params}, data["ids_t"], data["dense_t"])
    xent = optax.sigmoid_binary_cross_entropy(logits, data["clicks_t"]).mean()
    return {"loss": xent, "acc": jnp.mean((logits > 0) == (data["clicks_t"] > 0.5))}

  data = {
    "ids": jnp.asarray(ids),
    "dense": jnp.asarray(dense),
    "clicks": jnp.asarray(clicks),
    "ids_t": jnp.asarray(ids_t),
    "dense_t": jnp.asarray(dense_t),
    "clicks_t": jnp.asarray(clicks_t),
  }
  bayes_acc = float(np.mean((prob_t > 0.5) == (clicks_t > 0.5)))
  p = np.clip(prob_t, 1e-12, 1 - 1e-12)
  bayes_loss = float(-np.mean(clicks_t * np.log(p) + (1 - clicks_t) * np.log(1 - p)))
  cfg.update(bayes_test_acc=bayes_acc, bayes_test_loss=bayes_loss)
  return Task("dlrm", init, loss, sample, evaluate, data, lambda b: None, "acc", True, cfg)


TASKS = {"lm": lm_task, "cnn": cnn_task, "dlrm": dlrm_task}


@functools.cache
def get_task(name: str, quick: bool) -> Task:
  return TASKS[name](quick)


# --------------------------------------------------------------------------------------------
# Optimizers and training


def schedule(lr, steps: int):
  """The same schedule for every optimizer: 10 % linear warm-up, then cosine decay to lr/10."""
  warm = max(1, steps // 10)

  def fn(count):
    c = jnp.asarray(count, jnp.float32)
    up = jnp.minimum(1.0, (c + 1) / warm)
    t = jnp.clip((c - warm) / max(1, steps - warm), 0.0, 1.0)
    return lr * up * (0.1 + 0.9 * 0.5 * (1 + jnp.cos(jnp.pi * t)))

  return fn


def make_optimizer(name: str, lr, steps: int, task: Task, block_size: int = 1, update_freq=1):
  sched = schedule(lr, steps)
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
      weight_decay=WEIGHT_DECAY,
      block_size=block_size,
      update_freq=update_freq,
      averaging=task.averaging(block_size),
    )
  raise ValueError(f"unknown optimizer {name!r}")


def _reseed_probes(opt_state, key):
  """Gives the AdaHessian state inside ``opt_state`` the probe key ``key`` (one per run)."""
  is_state = lambda x: isinstance(x, adahessian_jax.ScaleByAdaHessianState)

  def fix(s):
    if is_state(s):
      return s._replace(key=jax.random.key_data(jax.random.split(key, s.key.shape[0])))
    return s

  return jax.tree.map(fix, opt_state, is_leaf=is_state)


def make_step(task: Task, tx, name: str):
  """One training step ``(params, opt_state, batch) -> (params, opt_state, loss)``."""
  if name == "adahessian":
    vgh = adahessian_jax.value_grad_and_hessian_diag(task.loss)

    def step(params, opt_state, batch):
      loss, grads, hdiag = vgh(params, opt_state, batch)
      updates, opt_state = tx.update(grads, opt_state, params, hessian_diag=hdiag)
      return optax.apply_updates(params, updates), opt_state, loss

  else:

    def step(params, opt_state, batch):
      loss, grads = jax.value_and_grad(task.loss)(params, batch)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

  return step


@functools.cache
def compiled_run(task: Task, name: str, steps: int, block_size: int, update_freq: int):
  def one(lr, seed, data):
    key = jax.random.key(seed)
    k_init, k_data, k_probe = jax.random.split(key, 3)
    params = task.init(k_init)
    tx = make_optimizer(name, lr, steps, task, block_size, update_freq)
    opt_state = _reseed_probes(tx.init(params), k_probe)
    step = make_step(task, tx, name)
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
) -> list[dict[str, Any]]:
  """Trains one run per ``(lrs[i], seeds[i])`` at once; returns one record per run."""
  assert len(lrs) == len(seeds)
  fn = compiled_run(task, name, steps, block_size, update_freq)
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
        initial_loss=float(loss0[i]),
        final_train_loss=float(np.mean(losses[i, -max(1, steps // 10) :])),
        val=m,
        diverged=diverged,
        curve_steps=[int(b) for b in edges[1:]],
        curve=curve,
      )
    )
  for r in records:
    r["group_wall_s"] = round(wall, 2)  # compile + all runs of this call, on a shared CPU
  return records


def summarize(records: Sequence[dict[str, Any]], metric: str) -> dict[str, Any]:
  """Mean ± std of a validation metric over seeds, with the number of diverged runs."""
  ok = [r["val"][metric] for r in records if not r["diverged"]]
  out = {"n": len(records), "diverged": sum(r["diverged"] for r in records)}
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
  if summary.get("no_progress"):
    cell += f" ({summary['no_progress']}/{summary['n']} no progress)"
  return cell


# --------------------------------------------------------------------------------------------
# Tuning (cached per output directory, deterministic)


def tune(task: Task, name: str, steps: int, out_dir: str, quick: bool) -> dict[str, Any]:
  """Picks ``name``'s learning rate for ``task`` (1 seed, the experiment's full step budget).

  The same rule for every optimizer: sweep its 4-value grid (``LR_GRIDS``); if the best value is
  at an end of the grid, sweep 4 more values beyond that end, continuing the grid's 1-3-10
  pattern (e.g. top end 1e-2, 3e-2 -> 0.1, 0.3, 1, 3), once. The best value is the one with the
  best final validation metric among runs that did not diverge. Results are cached in
  ``out_dir/tuning.json`` so experiments share one sweep. In quick mode there is no sweep.
  """
  if quick:
    return {"lr": QUICK_LR[name], "grid": [], "note": "quick mode: no sweep, fixed default"}
  path = os.path.join(out_dir, "tuning.json")
  cache = {}
  if os.path.exists(path):
    with open(path) as f:
      cache = json.load(f)
  grid = list(LR_GRIDS[name])
  setup = json.dumps(
    [task.config, grid, DIVERGE_FACTOR, WEIGHT_DECAY, "extend-once"], sort_keys=True
  )
  key = f"{task.name}/{name}/steps={steps}/{hashlib.sha1(setup.encode()).hexdigest()[:8]}"
  if key in cache:
    return cache[key]
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
  if os.path.exists(path):  # re-read: another experiment may have added entries meanwhile
    with open(path) as f:
      cache = json.load(f)
  cache[key] = entry
  with open(path + ".tmp", "w") as f:
    json.dump(_finite(cache), f, indent=1)
  os.replace(path + ".tmp", path)
  return entry


# --------------------------------------------------------------------------------------------
# Command-line and output helpers

HERE = os.path.dirname(os.path.abspath(__file__))


def enable_compilation_cache() -> None:
  """Persists compiled programs across the experiment commands (they share many programs)."""
  path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
    os.path.expanduser("~"), ".cache", "adahessian_jax_paper_xla"
  )
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def parse_args(description: str):
  import argparse

  p = argparse.ArgumentParser(description=description)
  p.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
  p.add_argument("--out", default=None, help="results directory (default: results/)")
  p.add_argument("--figures", default=None, help="figures directory (default: figures/)")
  args = p.parse_args()
  enable_compilation_cache()
  explicit_out = args.out is not None
  if args.out is None:
    args.out = os.path.join(HERE, "results")
  if args.figures is None:
    args.figures = args.out if explicit_out else os.path.join(HERE, "figures")
  os.makedirs(args.out, exist_ok=True)
  os.makedirs(args.figures, exist_ok=True)
  return args


def environment() -> dict[str, Any]:
  import platform

  return {
    "jax": jax.__version__,
    "optax": optax.__version__,
    "backend": jax.default_backend(),
    "devices": [str(d) for d in jax.devices()],
    "cpu_count": os.cpu_count(),
    "python": platform.python_version(),
    "load_average_at_start": list(os.getloadavg()),
  }


def write_json(out_dir: str, name: str, payload: dict[str, Any]) -> str:
  path = os.path.join(out_dir, f"{name}.json")
  with open(path, "w") as f:
    json.dump(_finite(payload), f, indent=1, allow_nan=False, default=_json_default)
  return path


def _finite(x):
  """Replaces non-finite floats (diverged runs) by ``None`` so the JSON is standard."""
  if isinstance(x, dict):
    return {k: _finite(v) for k, v in x.items()}
  if isinstance(x, list | tuple):
    return [_finite(v) for v in x]
  if isinstance(x, float | np.floating) and not np.isfinite(x):
    return None
  return x


def _json_default(x):
  if isinstance(x, np.generic):
    return x.item()
  raise TypeError(f"not JSON serialisable: {type(x)}")


def pyplot():
  """matplotlib.pyplot with the Agg backend, or ``None`` when matplotlib is not installed."""
  try:
    import matplotlib
  except ImportError:
    return None
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt
