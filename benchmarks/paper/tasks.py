"""The three small tasks of the paper-claim experiments, and their models.

Three tasks this CPU can train in seconds to minutes:

* ``lm``: a character-level causal transformer on CPython's bundled documentation text
  (``pydoc_data.topics``), the last 10 % held out; metric: validation loss in nats per character.
* ``cnn``: a small Flax CNN on scikit-learn's 8x8 handwritten digits, 25 % held out; metric:
  validation accuracy.
* ``dlrm``: a tiny DLRM-style click model (embeddings, bottom MLP, pairwise dot interactions, top
  MLP) on synthetic clicks from a known generator with Zipf-distributed categorical ids; metric:
  test accuracy (the generator's own Bayes accuracy is the ceiling).

A :class:`Task` holds everything a jit-compiled training run needs; ``training.py`` trains on it,
``tuning.py`` sweeps learning rates on it and ``cli.py`` holds the experiments' shared command line.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


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


def char_lm_functions(model: nn.Module, context: int):
  """``(init, loss, evaluate)`` of a character model of ``context`` inputs on the LM task's data:
  next-character cross-entropy on windows of ``context + 1`` ids, evaluated on the validation
  windows (``data["val"]``)."""

  def init(key):
    return model.init(key, jnp.zeros((1, context), jnp.int32))["params"]

  def xent(params, windows):
    logits = model.apply({"params": params}, windows[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).mean()

  def evaluate(params, data):
    return {"loss": xent(params, data["val"])}

  return init, xent, evaluate


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
  init, xent, evaluate = char_lm_functions(model, ctx)

  def sample(data, key):
    train_ids = data["train"]
    off = jax.random.randint(key, (cfg["batch"],), 0, train_ids.shape[0] - ctx - 1)
    return jax.vmap(lambda o: jax.lax.dynamic_slice(train_ids, (o,), (ctx + 1,)))(off)

  data = {"train": jnp.asarray(train), "val": jnp.asarray(val_windows)}
  cfg.update(train_chars=int(len(train)), val_chars_evaluated=int(val_windows[:, 1:].size))
  # Flax default averaging: embedding and position tables (vocab or position, feature) in blocks
  # of features of one row, as the fairseq reference does for its (num_embeddings, dim) weights;
  # Dense kernels (in, out) in blocks of inputs; attention projections within each head.
  return Task("lm", init, xent, sample, evaluate, data, lambda b: None, "loss", False, cfg)


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


def digits_functions(model: nn.Module):
  """``(init, loss, evaluate)`` of a 10-class classifier of the 8x8x1 digits on the CNN task's
  data: cross-entropy on a batch ``(x, y)``, validation loss and accuracy on ``data["xv"]``,
  ``data["yv"]``."""

  def init(key):
    return model.init(key, jnp.zeros((1, 8, 8, 1)))["params"]

  def loss(params, batch):
    xb, yb = batch
    logits = model.apply({"params": params}, xb)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  def evaluate(params, data):
    logits = model.apply({"params": params}, data["xv"])
    xent = optax.softmax_cross_entropy_with_integer_labels(logits, data["yv"]).mean()
    return {"loss": xent, "acc": jnp.mean(jnp.argmax(logits, -1) == data["yv"])}

  return init, loss, evaluate


def cnn_task(quick: bool = False) -> Task:
  from sklearn.datasets import load_digits

  cfg = dict(width=8 if quick else 16, batch=32, val_fraction=0.25)
  digits = load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]
  y = digits.target.astype(np.int32)
  perm = np.random.default_rng(0).permutation(len(y))
  n_val = int(cfg["val_fraction"] * len(y))
  val_idx, train_idx = perm[:n_val], perm[n_val:]
  init, loss, evaluate = digits_functions(DigitsCNN(cfg["width"]))

  def sample(data, key):
    idx = jax.random.randint(key, (cfg["batch"],), 0, data["x"].shape[0])
    return data["x"][idx], data["y"][idx]

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
