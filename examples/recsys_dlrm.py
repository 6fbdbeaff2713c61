"""RecSys: a DLRM-style click-through model on synthetic data, AdaHessian vs Adagrad.

The paper's recommendation setting in miniature (DLRM on Criteo, where Adagrad is the usual
optimizer): embedding tables for categorical features, a bottom MLP for dense features, pairwise
dot-product interactions of all feature vectors, and a top MLP producing a click logit. Both
optimizers use a constant learning rate, as the DLRM reference does. AdaHessian uses its
official defaults (betas (0.9, 0.999), eps 1e-4, Hessian power 1) and no spatial averaging
(``block_size=1``): an embedding table's rows belong to different categories.

Data: a synthetic click log drawn from a known generator (``generate``; the generator's
parameters and the impressions come from separate streams of ``--seed``, so the data set is the
same on every machine and the generator does not depend on the number of impressions), built
to look like Criteo's Kaggle set in structure:

- 13 dense features ``x ~ N(0, I)`` (DLRM log-transforms and normalises Criteo's counts);
- 8 categorical features with cardinalities 20000, 5000, 2000, 1000, 200, 50, 20, 4; the
  value of feature ``f`` is drawn from a Zipf-like law ``P(rank r) ∝ (r + 1)^-1.1`` over its
  cardinality (a few frequent values, a long tail of rare ones), ids shuffled;
- the true click logit is
  ``c + w·x + Σ_f b_f[v_f] + (1/2) Σ_{i<j} <u_i, u_j> + 0.5 · tanh(x_0 x_1)``, where ``b_f`` are
  per-value biases ``~ N(0, 0.3²)``, the ``u`` are 4-d latent vectors: one per categorical
  value (``~ N(0, 0.4²)``) plus the dense projection ``x P`` (``P ~ N(0, 0.25²)``), summed over
  all 36 pairs of the 9 vectors, ``w ~ N(0, 0.3²)``, and ``c`` is set by bisection on the sample so
  that the mean click probability is 25 % (Criteo: 25.6 %);
- the label is ``y ~ Bernoulli(sigmoid(logit))``.

Because the generator is known, the plot also shows the *oracle*: the validation log loss and
AUC of the true click probabilities (the best any model can do on these labels).
1,000,000 impressions: 950,000 train, 50,000 held-out validation. The default run (1500 steps of
512) sees fewer than one epoch, as DLRM is usually trained (a second pass over the same
impressions overfits the embedding tables).

Run:
  python examples/recsys_dlrm.py              # default, under a minute on 2 CPU cores
  python examples/recsys_dlrm.py --quick      # seconds (smoke test)
  python examples/recsys_dlrm.py --tune       # learning-rate sweep first (4 values each)
  python examples/recsys_dlrm.py --steps 5000 # longer

Writes examples/figures/recsys_dlrm.{png,json} (``--out`` to change).
"""

import _common
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _args import parse_with_quick, positive_int
from sklearn.metrics import roc_auc_score

import adahessian_jax

CARDINALITIES = (20000, 5000, 2000, 1000, 200, 50, 20, 4)
N_DENSE, LATENT, TARGET_CTR = 13, 4, 0.25


def generate(n, seed=0, cardinalities=CARDINALITIES):
  """Draws ``n`` impressions from the documented generator.

  Returns ``(dense float32 (n, 13), cats int32 (n, F), clicks float32 (n,), p_true (n,))``.
  """
  # the generator's parameters first (they do not depend on n), then the impressions
  world = np.random.default_rng([seed, 0])
  proj, w = world.normal(0.0, 0.25, (N_DENSE, LATENT)), world.normal(0.0, 0.3, N_DENSE)
  tables = [
    (world.permutation(card), world.normal(0.0, 0.3, card), world.normal(0.0, 0.4, (card, LATENT)))
    for card in cardinalities
  ]
  rng = np.random.default_rng([seed, 1])
  dense = rng.standard_normal((n, N_DENSE)).astype(np.float32)
  cats = np.empty((n, len(cardinalities)), dtype=np.int32)
  logit = dense @ w + 0.5 * np.tanh(dense[:, 0] * dense[:, 1])
  latents = [dense.astype(np.float64) @ proj]
  for f, (ids, bias, latent) in enumerate(tables):
    card = len(ids)
    prob = (np.arange(card) + 1.0) ** -1.1
    cats[:, f] = ids[rng.choice(card, size=n, p=prob / prob.sum())]  # ids shuffled vs frequency
    logit += bias[cats[:, f]]
    latents.append(latent[cats[:, f]])
  u = np.stack(latents, axis=1)  # (n, 9, LATENT)
  gram = np.einsum("nfd,ngd->nfg", u, u)
  logit += 0.5 * (gram.sum(axis=(1, 2)) - np.einsum("nff->n", gram)) / 2  # pairs i<j
  # the offset c: bisection so that the mean click probability is TARGET_CTR
  lo, hi = -20.0, 20.0
  for _ in range(60):
    c = (lo + hi) / 2
    lo, hi = (c, hi) if np.mean(_sigmoid(logit + c)) < TARGET_CTR else (lo, c)
  p_true = _sigmoid(logit + c)
  clicks = (rng.random(n) < p_true).astype(np.float32)
  return dense, cats, clicks, p_true


def _sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


class MLP(nn.Module):
  sizes: tuple

  @nn.compact
  def __call__(self, x):
    for i, s in enumerate(self.sizes):
      x = nn.Dense(s)(x)
      if i < len(self.sizes) - 1:
        x = nn.relu(x)
    return x


class DLRM(nn.Module):
  cardinalities: tuple
  dim: int = 16
  bottom: tuple = (64,)
  top: tuple = (64, 32)

  @nn.compact
  def __call__(self, dense, cats):
    z = nn.relu(MLP((*self.bottom, self.dim), name="bottom_mlp")(dense))
    init = nn.initializers.normal(0.1)
    embs = [
      nn.Embed(card, self.dim, embedding_init=init, name=f"table{i}")(cats[:, i])
      for i, card in enumerate(self.cardinalities)
    ]
    feats = jnp.stack([z, *embs], axis=1)  # (batch, 1 + F, dim)
    gram = jnp.einsum("bfd,bgd->bfg", feats, feats)
    i, j = np.triu_indices(feats.shape[1], k=1)
    x = jnp.concatenate([z, gram[:, i, j]], axis=1)  # dense vector + all pairwise dots
    return MLP((*self.top, 1), name="top_mlp")(x)[:, 0]


def optimizers():
  return [
    _common.Optimizer(
      "AdaHessian",
      lambda lr, n: adahessian_jax.adahessian(lr),
      lr=0.03,
      grid=(0.01, 0.03, 0.1, 0.3),
      hessian=True,
    ),
    _common.Optimizer(
      "Adagrad",
      lambda lr, n: optax.adagrad(lr),
      lr=1.0,
      grid=(0.1, 0.3, 1.0, 3.0),
    ),
  ]


def parse_args(argv=None):
  p = _common.parser(__doc__, steps=1500, quick_steps=40, names=[o.name for o in optimizers()])
  p.add_argument(
    "--batch-size", type=positive_int, default=512, help="impressions per step (default 512)"
  )
  p.add_argument(
    "--impressions", type=positive_int, default=1_000_000, help="train + validation size"
  )
  # --quick: fewer impressions (unless --impressions is given) and the cardinalities cut to 500
  args = parse_with_quick(p, {"impressions": 20_000}, argv)
  n_train = args.impressions - validation_size(args.impressions)
  if n_train < args.batch_size:
    p.error(
      f"argument --impressions: {args.impressions:,} impressions leave {n_train:,} for training, "
      f"fewer than one batch (--batch-size {args.batch_size})"
    )
  return args


def validation_size(impressions):
  """The held-out impressions: a fifth, at most 50,000."""
  return min(impressions // 5, 50_000)


def main():
  args = parse_args()
  cards = CARDINALITIES
  if args.quick:
    cards = tuple(min(c, 500) for c in CARDINALITIES)
  steps = _common.resolve_steps(args)
  eval_every = max(steps // (4 if args.quick else 30), 1)

  dense, cats, clicks, p_true = generate(args.impressions, seed=args.seed, cardinalities=cards)
  n_val = validation_size(args.impressions)
  tr = dense[n_val:], cats[n_val:], clicks[n_val:]
  va = dense[:n_val], cats[:n_val], clicks[:n_val]
  p_val = np.clip(p_true[:n_val], 1e-7, 1 - 1e-7)
  oracle = {
    "loss": float(-np.mean(va[2] * np.log(p_val) + (1 - va[2]) * np.log(1 - p_val))),
    "auc": float(roc_auc_score(va[2], p_val)),
  }
  print(
    f"synthetic clicks: {len(tr[2]):,} train / {n_val:,} validation impressions, CTR "
    f"{clicks.mean():.3f}; oracle validation log loss {oracle['loss']:.4f}, AUC {oracle['auc']:.4f}"
  )

  model = DLRM(cards, dim=8 if args.quick else 16)
  params = model.init(jax.random.key(args.seed), dense[:1], cats[:1])["params"]
  print(f"DLRM with {_common.param_count(params):,} parameters; {steps} steps of {args.batch_size}")

  def loss_fn(params, batch):
    d, c, y = batch
    return optax.sigmoid_binary_cross_entropy(model.apply({"params": params}, d, c), y).mean()

  @jax.jit
  def val_logits(params):
    return model.apply({"params": params}, va[0], va[1])

  def evaluate(params):
    logits = np.asarray(val_logits(params), dtype=np.float64)
    if not np.all(np.isfinite(logits)):
      return {"loss": float("nan"), "auc": float("nan")}
    loss = np.mean(np.logaddexp(0.0, logits) - va[2] * logits)
    return {"loss": float(loss), "auc": float(roc_auc_score(va[2], logits))}

  def batches(rng):
    return _common.shuffled_batches(rng, tr, args.batch_size)

  opts = optimizers()
  runs, tuning = _common.compare(opts, params, loss_fn, batches, evaluate, steps, eval_every, args)
  extra = {
    "oracle_val_loss": oracle["loss"],
    "oracle_val_auc": oracle["auc"],
    "parameters": _common.param_count(params),
  }
  _common.summarize("recsys_dlrm", runs, "auc", "val AUC", args.out, args, extra, tuning)
  _common.plot(
    "recsys_dlrm",
    runs,
    "auc",
    "AUC",
    f"DLRM on synthetic clicks ({len(tr[2]):,} train / {n_val:,} val), batch {args.batch_size}",
    args.out,
    reference=oracle,
  )


if __name__ == "__main__":
  main()
