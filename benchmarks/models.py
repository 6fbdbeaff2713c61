"""The benchmark models (Flax linen) and synthetic batches of the right shapes.

Each ``make_*`` returns a :class:`Problem`: initial parameters, a scalar loss
``loss_fn(params, batch)`` and a list of synthetic batches (fixed seeds). The
``size`` argument is ``"full"`` (the sizes of the benchmark table) or
``"tiny"`` (the ``--quick`` smoke run). ``gpt`` is the accelerator-sized model
(a GPT-2-small-shaped LM, 98M parameters), too large to time on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class Problem(NamedTuple):
  name: str
  description: str
  params: Any
  loss_fn: Callable[[Any, Any], jax.Array]
  batches: list[Any]


def _xent(logits, labels):
  logp = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], axis=-1))


# --------------------------------------------------------------------------- MLP


class MLP(nn.Module):
  features: tuple[int, ...]

  @nn.compact
  def __call__(self, x):
    for f in self.features[:-1]:
      x = nn.relu(nn.Dense(f)(x))
    return nn.Dense(self.features[-1])(x)


def make_mlp(size: str = "full", n_batches: int = 4, seed: int = 0) -> Problem:
  """MLP 784-1024-1024-10, batch 128 (tiny: 784-64-64-10, batch 16)."""
  hidden, batch = (1024, 128) if size == "full" else (64, 16)
  model = MLP((hidden, hidden, 10))
  rng = np.random.default_rng(seed)
  batches = [
    (
      jnp.asarray(rng.normal(size=(batch, 784)), jnp.float32),
      jnp.asarray(rng.integers(0, 10, size=(batch,)), jnp.int32),
    )
    for _ in range(n_batches)
  ]
  params = model.init(jax.random.key(seed), batches[0][0])["params"]

  def loss_fn(p, b):
    return _xent(model.apply({"params": p}, b[0]), b[1])

  desc = f"Flax MLP 784-{hidden}-{hidden}-10, ReLU, softmax cross-entropy, batch {batch}"
  return Problem("mlp", desc, params, loss_fn, batches)


# --------------------------------------------------------------------------- CNN


class BasicBlock(nn.Module):
  """A ResNet basic block (two 3x3 convolutions and a skip connection), no normalisation."""

  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x):
    y = nn.relu(nn.Conv(self.features, (3, 3), strides=self.strides)(x))
    y = nn.Conv(self.features, (3, 3))(y)
    if x.shape[-1] != self.features or self.strides != 1:
      x = nn.Conv(self.features, (1, 1), strides=self.strides)(x)
    return nn.relu(x + y)


class ResNetish(nn.Module):
  widths: tuple[int, ...]
  blocks_per_stage: int = 1
  n_classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(self.widths[0], (3, 3))(x))
    for i, w in enumerate(self.widths):
      for j in range(self.blocks_per_stage):
        x = BasicBlock(w, strides=2 if (i > 0 and j == 0) else 1)(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.n_classes)(x)


def make_cnn(size: str = "full", n_batches: int = 4, seed: int = 0) -> Problem:
  """ResNet-style CNN on 32x32x3 inputs, batch 64, widths 8/16/32 (tiny: 8x8x3, batch 4)."""
  if size == "full":
    widths, hw, batch = (8, 16, 32), 32, 64
  else:
    widths, hw, batch = (4, 8), 8, 4
  model = ResNetish(widths)
  rng = np.random.default_rng(seed)
  batches = [
    (
      jnp.asarray(rng.normal(size=(batch, hw, hw, 3)), jnp.float32),
      jnp.asarray(rng.integers(0, 10, size=(batch,)), jnp.int32),
    )
    for _ in range(n_batches)
  ]
  params = model.init(jax.random.key(seed), batches[0][0])["params"]

  def loss_fn(p, b):
    return _xent(model.apply({"params": p}, b[0]), b[1])

  w = "/".join(map(str, widths))
  desc = (
    f"Flax ResNet-style CNN: 3x3 stem, {len(widths)} stages x 1 basic block (widths {w}), "
    f"no normalisation, global average pool, {hw}x{hw}x3 inputs, batch {batch}"
  )
  return Problem("cnn", desc, params, loss_fn, batches)


# --------------------------------------------------------------------------- transformer LM


class Block(nn.Module):
  d_model: int
  n_heads: int
  d_mlp: int

  @nn.compact
  def __call__(self, x):
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.n_heads)(h, h, mask=mask)
    h = nn.LayerNorm()(x)
    h = nn.Dense(self.d_mlp)(h)
    return x + nn.Dense(self.d_model)(nn.gelu(h))


class TransformerLM(nn.Module):
  vocab: int
  seq_len: int
  d_model: int
  n_heads: int
  n_layers: int
  d_mlp: int

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab, self.d_model)(tokens)
    pos = self.param("pos_embedding", nn.initializers.normal(0.02), (self.seq_len, self.d_model))
    x = x + pos[None, : tokens.shape[1]]
    for _ in range(self.n_layers):
      x = Block(self.d_model, self.n_heads, self.d_mlp)(x)
    x = nn.LayerNorm()(x)
    return nn.Dense(self.vocab)(x)


def make_transformer(
  size: str = "full", n_batches: int = 4, seed: int = 0, name: str = "transformer"
) -> Problem:
  """Decoder-only LM: 2 pre-LN layers, d_model 128, 4 heads, vocab 512, seq 64, batch 8."""
  if size == "full":
    vocab, seq, d, heads, layers, mlp, batch = 512, 64, 128, 4, 2, 512, 8
  elif size == "gpt":
    vocab, seq, d, heads, layers, mlp, batch = 8192, 512, 768, 12, 12, 3072, 16
  else:
    vocab, seq, d, heads, layers, mlp, batch = 32, 8, 16, 2, 1, 32, 2
  model = TransformerLM(vocab, seq, d, heads, layers, mlp)
  rng = np.random.default_rng(seed)
  batches = [
    jnp.asarray(rng.integers(0, vocab, size=(batch, seq + 1)), jnp.int32) for _ in range(n_batches)
  ]
  params = model.init(jax.random.key(seed), batches[0][:, :-1])["params"]

  def loss_fn(p, b):
    return _xent(model.apply({"params": p}, b[:, :-1]), b[:, 1:])

  desc = (
    f"Flax decoder-only transformer LM: {layers} pre-LN layers, d_model {d}, {heads} heads, "
    f"MLP {mlp}, vocab {vocab}, sequence {seq}, batch {batch}"
  )
  return Problem(name, desc, params, loss_fn, batches)


def make_gpt(size: str = "full", n_batches: int = 4, seed: int = 0) -> Problem:
  """The transformer LM at GPT-2 small's shape (12 layers, d_model 768, 12 heads, MLP 3072;
  vocab 8192, sequence 512, batch 16: 98M parameters), for accelerators; ``"tiny"`` as above."""
  return make_transformer("gpt" if size == "full" else size, n_batches, seed, name="gpt")


MODELS = {"mlp": make_mlp, "cnn": make_cnn, "transformer": make_transformer, "gpt": make_gpt}
