"""CV: a Flax CNN on scikit-learn's handwritten digits, AdaHessian vs Adam vs SGD with momentum.

The paper's image-classification setting in miniature: a small convolutional network trained
with AdaHessian (official defaults: betas (0.9, 0.999), eps 1e-4, Hessian power 1, convolution
kernels averaged over their spatial positions — Flax axes 0, 1 — by the default rule), compared
with the two usual first-order choices. Data: the 1,797 real 8x8 grey-scale digits of
``sklearn.datasets.load_digits``, 75 % training / 25 % held-out validation (stratified, seeded).
Every optimizer uses the same cosine-decay schedule, batch size, initialisation and batches.

Run:
  python examples/cv_digits.py              # default, under a minute on 2 CPU cores
  python examples/cv_digits.py --quick      # seconds (smoke test)
  python examples/cv_digits.py --tune       # learning-rate sweep first (4 values each)
  python examples/cv_digits.py --steps 3000 # longer

Writes examples/figures/cv_digits.{png,json} (``--out`` to change).
"""

import math

import _common
import jax
import jax.numpy as jnp
import optax
from _args import positive_int
from sklearn.model_selection import train_test_split

import adahessian_jax


def optimizers():
  def cosine(lr, n):  # the same schedule for everyone: 5 % linear warm-up, then cosine decay
    return optax.warmup_cosine_decay_schedule(0.0, lr, max(n // 20, 1), n)

  return [
    _common.Optimizer(
      "AdaHessian",
      lambda lr, n: adahessian_jax.adahessian(cosine(lr, n)),
      lr=0.3,
      grid=(0.03, 0.1, 0.3, 1.0),
      hessian=True,
    ),
    _common.Optimizer(
      "Adam", lambda lr, n: optax.adam(cosine(lr, n)), lr=1e-2, grid=(1e-3, 3e-3, 1e-2, 3e-2)
    ),
    _common.Optimizer(
      "SGD+momentum",
      lambda lr, n: optax.sgd(cosine(lr, n), momentum=0.9),
      lr=0.1,
      grid=(0.01, 0.03, 0.1, 0.3),
    ),
  ]


VAL_FRACTION = 0.25  # held out, stratified (train_test_split rounds the validation count up)


def parse_args(argv=None):
  names = [o.name for o in optimizers()]
  p = _common.parser(__doc__, steps=1000, quick_steps=60, names=names)
  p.add_argument("--batch-size", type=positive_int, default=64, help="images per step (default 64)")
  args = p.parse_args(argv)
  n = len(_common.digits_images()[1])
  n_train = n - math.ceil(VAL_FRACTION * n)
  if args.batch_size > n_train:  # no batch would come; say so before building anything
    p.error(f"argument --batch-size: {args.batch_size} exceeds the {n_train} training images")
  return args


def main():
  args = parse_args()
  steps = _common.resolve_steps(args)
  eval_every = max(steps // (6 if args.quick else 40), 1)

  x, y = _common.digits_images()  # (1797, 8, 8, 1), labels
  x_tr, x_val, y_tr, y_val = train_test_split(
    x, y, test_size=VAL_FRACTION, stratify=y, random_state=args.seed
  )
  print(f"digits: {len(x_tr)} train / {len(x_val)} validation images of 8x8, 10 classes")

  model = _common.DigitsCNN(width=8 if args.quick else 16)
  params = model.init(jax.random.key(args.seed), x_tr[:1])["params"]
  print(f"CNN with {_common.param_count(params):,} parameters; {steps} steps of {args.batch_size}")

  def loss_fn(params, batch):
    xb, yb = batch
    logits = model.apply({"params": params}, xb)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  @jax.jit
  def eval_metrics(params):
    logits = model.apply({"params": params}, x_val)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y_val).mean()
    return {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == y_val)}

  def evaluate(params):
    return {k: float(v) for k, v in eval_metrics(params).items()}

  def batches(rng):
    return _common.shuffled_batches(rng, (x_tr, y_tr), args.batch_size)

  opts = optimizers()
  runs, tuning = _common.compare(opts, params, loss_fn, batches, evaluate, steps, eval_every, args)
  _common.summarize("cv_digits", runs, "accuracy", "val acc", args.out, args, tuning=tuning)
  _common.plot(
    "cv_digits",
    runs,
    "accuracy",
    "accuracy",
    f"CNN on sklearn digits ({len(x_tr)} train / {len(x_val)} val), batch {args.batch_size}, "
    "warm-up + cosine decay",
    args.out,
  )


if __name__ == "__main__":
  main()
