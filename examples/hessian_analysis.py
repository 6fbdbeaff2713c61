"""Hessian analysis of a small CNN on handwritten digits: AdaHessian vs Adam minima.

Trains the same Flax CNN on scikit-learn's 8x8 digits with AdaHessian and with
Adam, then analyses the Hessian of the training loss (512 training digits as
two batches; ``--long``: all 1500 as three, batch-size weighted) at
initialisation and at both solutions: top
eigenvalues (Lanczos), trace (Hutch++), eigenvalue density (stochastic Lanczos
quadrature), per-layer curvature, and the loss along the top eigenvectors.

Run:  python examples/hessian_analysis.py            # ~1 minute on 2 CPU cores
      python examples/hessian_analysis.py --long     # longer training, full training set,
                                                     # more probes

Writes PNGs to examples/figures/ (``--out`` to change).
"""

import argparse
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import _common  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _args import out_dir  # noqa: E402

import adahessian_jax  # noqa: E402
from adahessian_jax import hessian  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.avg_pool(nn.tanh(nn.Conv(8, (3, 3))(x)), (2, 2), (2, 2))
    x = nn.avg_pool(nn.tanh(nn.Conv(16, (3, 3))(x)), (2, 2), (2, 2))
    return nn.Dense(10)(x.reshape((x.shape[0], -1)))


def load_data():
  x, y = _common.digits_images()  # (1797, 8, 8, 1), labels
  perm = np.random.default_rng(0).permutation(len(x))
  x, y = x[perm], y[perm]
  return (x[:1500], y[:1500]), (x[1500:], y[1500:])


def train(name, tx, params, loss_fn, train_data, steps, batch_size, seed=1):
  """Minibatch training; AdaHessian gets the loss closure it needs for its probes."""
  opt_state = tx.init(params)
  needs_loss = name == "AdaHessian"

  @jax.jit
  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    extra = {"value_fn": lambda p: loss_fn(p, batch)} if needs_loss else {}
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  x, y = train_data
  for _ in range(steps):
    idx = rng.integers(0, len(x), batch_size)
    params, opt_state, _ = step(params, opt_state, (x[idx], y[idx]))
  return params


def analyse(label, loss_fn, params, batches, key, cfg):
  """Everything adahessian_jax.hessian reports for one point, with timings."""
  t0 = time.perf_counter()
  op = hessian.hessian_operator(loss_fn, params, batches=batches)
  k_eig, k_tr, k_esd, k_layers = jax.random.split(key, 4)
  top = hessian.top_eigenvalues(op, cfg["k"], key=k_eig, tol=1e-4)
  trace = hessian.hutchpp_trace(
    op, k_tr, sketch_size=cfg["sketch"], rtol=0.02, max_samples=cfg["trace_samples"]
  )
  esd = hessian.spectral_density(
    op, k_esd, num_probes=cfg["probes"], num_steps=cfg["lanczos_steps"], num_points=800
  )
  layers = hessian.layer_breakdown(
    op, k_layers, num_samples=cfg["layer_samples"], tol=1e-4, max_iter=cfg["layer_iter"]
  )
  hvps = top.num_matvecs + trace.num_matvecs + esd.num_matvecs
  hvps += cfg["layer_samples"] + sum(lc.num_matvecs for lc in layers.values())
  print(
    f"{label:>11}: loss {float(op.loss()):.4f}  λ_max {top.eigenvalues[0]:8.3f}  "
    f"top-{cfg['k']} {np.array2string(top.eigenvalues[1:], precision=2)}  "
    f"tr {trace.trace:8.2f} ± {trace.stderr:.2f}  ({hvps} HVPs, {time.perf_counter() - t0:.1f} s)"
  )
  return dict(op=op, top=top, trace=trace, esd=esd, layers=layers)


def accuracy(model, params, data):
  x, y = data
  return float((jnp.argmax(model.apply({"params": params}, x), -1) == y).mean())


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--long", action="store_true", help="train longer, more probes")
  parser.add_argument(
    "--out",
    type=out_dir,
    default=os.path.join(HERE, "figures"),
    help="directory of the figures (default examples/figures/)",
  )
  args = parser.parse_args()
  cfg = dict(steps=1000, k=5, sketch=20, probes=8, lanczos_steps=50, layer_samples=30, grid=21)
  cfg.update(hessian_examples=512, hessian_batch=256, layer_iter=30, trace_samples=100)
  if args.long:
    cfg.update(steps=4000, probes=16, lanczos_steps=100, layer_samples=200, grid=41)
    cfg.update(hessian_examples=1500, hessian_batch=500, layer_iter=100, trace_samples=1000)
  start = time.perf_counter()

  train_data, test_data = load_data()
  model = CNN()
  init = model.init(jax.random.key(0), train_data[0][:1])["params"]
  num_params = sum(np.size(p) for p in jax.tree.leaves(init))

  def loss_fn(params, batch):
    logits = model.apply({"params": params}, batch[0])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

  # The Hessian of the loss over (a subset of) the training set, as several
  # batches: products are averaged over them, weighted by batch size.
  x, y = (a[: cfg["hessian_examples"]] for a in train_data)
  step = cfg["hessian_batch"]
  batches = [(x[i : i + step], y[i : i + step]) for i in range(0, len(x), step)]

  optimizers = {
    "Adam": optax.adam(3e-3),
    "AdaHessian": adahessian_jax.adahessian(learning_rate=0.15),
  }
  solutions = {"init": init}
  for name, tx in optimizers.items():
    t = time.perf_counter()
    solutions[name] = train(name, tx, init, loss_fn, train_data, cfg["steps"], 64)
    print(
      f"{name:>10}: {cfg['steps']} steps, test accuracy "
      f"{accuracy(model, solutions[name], test_data):.1%} ({time.perf_counter() - t:.1f} s)"
    )

  print(f"\nCNN with {num_params} parameters; Hessian of the loss on {len(x)} training digits")
  results = {
    label: analyse(label, loss_fn, p, batches, jax.random.key(i), cfg)
    for i, (label, p) in enumerate(solutions.items())
  }
  os.makedirs(args.out, exist_ok=True)
  colors = {"init": "tab:gray", "Adam": "tab:blue", "AdaHessian": "tab:red"}

  # 1. Eigenvalue densities.
  fig, ax = plt.subplots(figsize=(7, 4))
  for label, r in results.items():
    hessian.plot_spectral_density(r["esd"], ax, label=label, color=colors[label], lw=1.2)
  ax.set_ylim(1e-6, None)
  ax.set_title(f"Hessian eigenvalue density (SLQ, {len(x)} training digits)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(args.out, "hessian_esd.png"), dpi=100)

  # 2. Loss along the top eigenvector, same scale for all.
  fig, ax = plt.subplots(figsize=(7, 4))
  alphas = np.linspace(-1.0, 1.0, 4 * cfg["grid"])
  for label, r in results.items():
    ls = hessian.loss_landscape_1d(r["op"], alphas, r["top"].eigenvectors_flat[0])
    lam = r["top"].eigenvalues[0]
    hessian.plot_landscape_1d(ls, ax, label=f"{label} (λ_max = {lam:.2f})", color=colors[label])
  ax.set_yscale("log")
  ax.set_title("Training loss along the top Hessian eigenvector")
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(args.out, "hessian_landscape_1d.png"), dpi=100)

  # 3. Loss on the plane of the top two eigenvectors, trained models.
  fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
  grid = np.linspace(-1.0, 1.0, cfg["grid"])
  for ax, label in zip(axes, ("Adam", "AdaHessian"), strict=True):
    r = results[label]
    pair = tuple(r["top"].eigenvectors_flat[:2])
    ls = hessian.loss_landscape_2d(r["op"], grid, grid, pair)
    hessian.plot_landscape_2d(ls, ax, levels=20, log=True, cmap="viridis")
    ax.set_title(f"{label}: log10 loss, top-2 eigen-plane")
    ax.set_xlabel("eigenvector 1")
    ax.set_ylabel("eigenvector 2")
  fig.tight_layout()
  fig.savefig(os.path.join(args.out, "hessian_landscape_2d.png"), dpi=90)

  # 4. Per-layer curvature.
  names = list(results["init"]["layers"])
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  width = 0.27
  for j, (label, r) in enumerate(results.items()):
    pos = np.arange(len(names)) + (j - 1) * width
    tr = [r["layers"][n].trace for n in names]
    se = [r["layers"][n].trace_stderr for n in names]
    axes[0].bar(pos, tr, width, yerr=se, label=label, color=colors[label])
    axes[1].bar(pos, [r["layers"][n].top_eigenvalue for n in names], width, color=colors[label])
  for ax, title in zip(axes, ("trace of the layer's Hessian block", "top eigenvalue"), strict=True):
    ax.set_xticks(np.arange(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_title(title)
    ax.set_yscale("symlog", linthresh=1e-2)
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(os.path.join(args.out, "hessian_layers.png"), dpi=100)

  sharper = max(("Adam", "AdaHessian"), key=lambda n: results[n]["top"].eigenvalues[0])
  print(
    f"\nSharper minimum (larger λ_max): {sharper}. Per-layer trace / top eigenvalue:\n"
    + "\n".join(
      f"  {n:>16}: "
      + "  ".join(
        f"{lab} {r['layers'][n].trace:8.3f} / {r['layers'][n].top_eigenvalue:7.3f}"
        for lab, r in results.items()
      )
      for n in names
    )
  )
  print(f"figures in {args.out} ({time.perf_counter() - start:.0f} s in all)")


if __name__ == "__main__":
  main()
