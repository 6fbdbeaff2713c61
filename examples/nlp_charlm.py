"""NLP: a character-level transformer language model on CPython's bundled documentation.

The paper's NLP setting in miniature: a pre-LayerNorm causal transformer trained with AdaHessian
and with AdamW, both with betas (0.9, 0.98), weight decay 1e-4 and the same linear warm-up plus
inverse-square-root decay; AdaHessian averages the Hessian diagonal over blocks of 32 inputs
(paper Table 5). The default rule puts the blocks on the input axes of the rank-2 ``Dense``
kernels and of the attention projections (``(embed, heads, head_dim)`` for query/key/value,
``(heads, head_dim, embed)`` for the output, never across heads) and along the features of
the token and position tables ``(vocab, width)`` and ``pos_embed`` (each row apart).

Data: the text of ``pydoc_data.topics`` (the ~465 KB of help texts that ship with CPython,
``help('topics')``), topics concatenated in sorted order; the first 90 % of the characters
train, the last 10 % are the held-out validation text. Metrics: validation cross-entropy in
nats per character (bits per character = nats / ln 2) and next-character accuracy.

Run:
  python examples/nlp_charlm.py              # default, ~1-1.5 minutes on 2 CPU cores
  python examples/nlp_charlm.py --quick      # seconds (smoke test)
  python examples/nlp_charlm.py --tune       # learning-rate sweep first (3 values each)
  python examples/nlp_charlm.py --steps 3000 --layers 4 --width 128   # longer, larger

Writes examples/figures/nlp_charlm.{png,json} (``--out`` to change).
"""

import _common
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _args import check_heads, parse_with_quick, positive_int

import adahessian_jax


class Block(nn.Module):
  width: int
  heads: int

  @nn.compact
  def __call__(self, x, mask):
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(self.heads, name="attention")(h, h, mask=mask)
    h = nn.LayerNorm()(x)
    h = nn.Dense(4 * self.width, name="mlp_in")(h)
    return x + nn.Dense(self.width, name="mlp_out")(nn.gelu(h))


class CharLM(nn.Module):
  vocab: int
  context: int
  width: int = 64
  layers: int = 2
  heads: int = 4

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab, self.width, name="tok_embed")(tokens)
    pos = self.param("pos_embed", nn.initializers.normal(0.02), (self.context, self.width))
    x = x + pos[: tokens.shape[1]]
    mask = nn.make_causal_mask(tokens)
    for i in range(self.layers):
      x = Block(self.width, self.heads, name=f"block{i}")(x, mask)
    return nn.Dense(self.vocab, name="head")(nn.LayerNorm()(x))


def optimizers(block):
  def schedule(lr, n):  # the same for both: 10 % linear warm-up, then inverse square root
    warm = max(n // 10, 1)
    return lambda s: lr * jnp.minimum((s + 1) / warm, jnp.sqrt(warm / (s + 1)))

  return [
    _common.Optimizer(
      "AdaHessian",
      lambda lr, n: adahessian_jax.adahessian(
        schedule(lr, n),
        b1=0.9,
        b2=0.98,
        weight_decay=1e-4,
        block_size=block,
      ),
      lr=0.47,
      grid=(0.15, 0.47, 1.5),
      hessian=True,
    ),
    _common.Optimizer(
      "AdamW",
      lambda lr, n: optax.adamw(schedule(lr, n), b1=0.9, b2=0.98, weight_decay=1e-4),
      lr=1e-2,
      grid=(3e-3, 1e-2, 3e-2),
    ),
  ]


#: The defaults that ``--quick`` changes (a flag given explicitly keeps its value).
QUICK = dict(context=32, width=32, layers=1, heads=2, block_size=16, eval_windows=32)


def parse_args(argv=None):
  names = [o.name for o in optimizers(block=None)]  # the names only: nothing is built
  p = _common.parser(__doc__, steps=600, quick_steps=30, names=names)
  p.add_argument(
    "--batch-size", type=positive_int, default=32, help="windows per step (default 32)"
  )
  p.add_argument("--context", type=positive_int, default=64)
  p.add_argument("--width", type=positive_int, default=64)
  p.add_argument("--layers", type=positive_int, default=2)
  p.add_argument("--heads", type=positive_int, default=4, help="a divisor of --width")
  p.add_argument("--block-size", type=positive_int, default=32, help="AdaHessian's averaging block")
  p.add_argument("--eval-windows", type=positive_int, default=256)
  args = parse_with_quick(p, QUICK, argv)
  check_heads(p, args)
  _common.check_context(p, args.context)
  return args


def main():
  args = parse_args()
  steps = _common.resolve_steps(args)
  eval_every = max(steps // (6 if args.quick else 30), 1)

  train_data, val_data, chars = _common.pydoc_text()
  print(
    f"pydoc_data.topics: {len(train_data):,} train / {len(val_data):,} validation characters, "
    f"vocabulary {len(chars)}"
  )
  ctx = args.context
  starts = np.random.default_rng(args.seed + 100).integers(
    0, len(val_data) - ctx - 1, args.eval_windows
  )
  val_windows = np.stack([val_data[s : s + ctx + 1] for s in starts])

  model = CharLM(len(chars), ctx, args.width, args.layers, args.heads)
  params = model.init(jax.random.key(args.seed), val_windows[:1, :ctx])["params"]
  print(
    f"transformer with {_common.param_count(params):,} parameters "
    f"({args.layers} layers, width {args.width}, {args.heads} heads, context {ctx}); "
    f"{steps} steps of {args.batch_size} windows"
  )

  def loss_fn(params, windows):
    logits = model.apply({"params": params}, windows[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).mean()

  @jax.jit
  def eval_metrics(params):
    logits = model.apply({"params": params}, val_windows[:, :-1])
    targets = val_windows[:, 1:]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    return {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == targets)}

  def evaluate(params):
    return {k: float(v) for k, v in eval_metrics(params).items()}

  def batches(rng):  # windows of context + 1 characters at uniformly random offsets
    while True:
      s = rng.integers(0, len(train_data) - ctx - 1, args.batch_size)
      yield train_data[s[:, None] + np.arange(ctx + 1)]

  opts = optimizers(args.block_size)
  if args.quick:  # the tuned rates are for the default model and 600 steps; 30 steps need less
    opts[0].lr, opts[1].lr = 0.15, 3e-3
  runs, tuning = _common.compare(opts, params, loss_fn, batches, evaluate, steps, eval_every, args)
  extra = {"vocabulary": len(chars), "parameters": _common.param_count(params)}
  _common.summarize("nlp_charlm", runs, "accuracy", "val acc", args.out, args, extra, tuning)
  _common.plot(
    "nlp_charlm",
    runs,
    "accuracy",
    "next-char accuracy",
    f"char-level transformer LM on pydoc_data.topics ({args.layers} layers, width "
    f"{args.width}), AdaHessian block {args.block_size}",
    args.out,
  )


if __name__ == "__main__":
  main()
