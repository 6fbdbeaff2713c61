"""A transformer trained the way pods train it: scanned, rematerialised, FSDP-sharded, bfloat16.

A character-level causal transformer LM on CPython's ``pydoc_data.topics`` (as in
``nlp_charlm.py``), written the way large models are written for TPU/GPU pods:

* the blocks are one ``nn.scan`` over an ``nn.remat``-ed block, so every block parameter is a
  single stacked leaf ``(layers, ...)`` whose first axis is named ``'layers'``
  (``metadata_params={nn.PARTITION_NAME: 'layers'}``);
* every parameter carries logical axis names (``nn.with_logical_partitioning``), mapped to a
  device mesh by ``LOGICAL_RULES`` (``nn.logical_axis_rules``): the ``'embed'`` axis of every
  parameter and the batch are split over the mesh axis ``'fsdp'`` (fully sharded data
  parallelism: every device holds 1/N of every parameter and of every optimizer moment);
* the optimizer state is built from the *boxed* parameters, so its moments carry the same names
  and are sharded exactly like the parameters (``nn.get_partition_spec`` of the state);
* one ``jax.jit`` step with explicit ``in_shardings``/``out_shardings`` and donated buffers;
* bfloat16 compute with float32 parameters and float32 optimizer moments.

AdaHessian (fused route, ``adahessian_jax.value_grad_and_hessian_diag``) is compared with AdamW
on the same initialisation, batches and schedule (10 % linear warm-up, then inverse square
root). AdaHessian's configuration is ``adahessian_config`` below, the one place to change it.

Before training, the script checks that the layout does not change the optimizer: the stacked,
rematerialised, sharded model and the same model with its blocks as separate modules
(``blocks_0``, ``blocks_1``, ...) on one device, started from the same parameters, follow the
same AdaHessian trajectory for ``--check-steps`` steps (default 20). Two things have to agree
for that: the Hutchinson probe and the spatial averaging. The probe is drawn per leaf, so a
stacked leaf ``(L, ...)`` and ``L`` separate leaves get different probes; the reference
therefore draws the probe on the stacked layout and applies it to its own leaves slice by slice
(``adahessian_jax.hvp``). The averaging must never mix layers: a rank-based rule would take a
stacked ``(layers, in, out)`` kernel for a 1-D convolution and average across the layers. The
check computes in float32 by default (in bfloat16 a scan and an unrolled loop round differently,
so "equal" would mean little) and prints the largest relative difference of the losses and of the
parameters. In float32 the two layouts still round differently (reductions split over 8 devices
or not), and AdaHessian divides by curvature estimates that are close to zero for some entries,
so after 20 steps the losses agree to ~1e-6 and the parameters to ~1e-3 (relative);
``--check-dtype float64``, which ``tests/test_pods_example.py`` runs, shows the two trajectories
are the same to ~1e-13.

Run:
  python examples/pods_transformer.py            # 8 forced CPU devices, 200 steps
  python examples/pods_transformer.py --quick    # tiny model, 30 steps (smoke test)
  python examples/pods_transformer.py --describe # how AdaHessian averages every leaf, then stop

Prints per-device memory of the optimizer states and AdaHessian's step-time ratio to AdamW;
writes examples/figures/pods_transformer.{png,json} (``--quick``: examples/figures/quick/).
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # must happen before JAX starts
  import _devices

  _devices.force_host_devices(8)

import dataclasses  # noqa: E402
import functools  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import _common  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _args import check_heads, nonnegative_int, parse_with_quick, positive_int, write_json  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import adahessian_jax  # noqa: E402
from adahessian_jax import spatial  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def adahessian_config(block_size: int) -> dict[str, Any]:
  """AdaHessian's hyperparameters for this example (all but the learning rate).

  The transformer setting of the paper: betas (0.9, 0.98), decoupled weight decay, and the
  Hessian diagonal averaged over blocks of ``block_size`` inputs (paper Table 5). The averaging
  is the library's default, which reads the parameters' logical axis names: no group spans two
  layers of the stack, two heads, or two rows of an embedding table (print it with
  ``--describe``). ``spatial.strict`` makes it refuse, with an error naming the leaves, to guess
  for a rank >= 3 leaf without names. Change AdaHessian's configuration here; everything else in
  the script uses it as given.
  """
  return dict(
    b1=0.9,
    b2=0.98,
    eps=1e-4,
    weight_decay=1e-4,
    block_size=block_size,
    averaging=spatial.strict(),
  )


ADAMW_CONFIG = dict(b1=0.9, b2=0.98, weight_decay=1e-4)

#: Logical axis name -> mesh axis. FSDP: the batch and every parameter's 'embed' axis are split
#: over 'fsdp'; activations keep their embedding axis whole ('act_embed').
LOGICAL_RULES = (
  ("batch", "fsdp"),
  ("embed", "fsdp"),
  ("act_embed", None),
  ("length", None),
  ("position", None),
  ("layers", None),
  ("heads", None),
  ("kv", None),
  ("mlp", None),
  ("vocab", None),
)

_part = nn.with_logical_partitioning
_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


class Block(nn.Module):
  """A pre-LayerNorm transformer block; ``(carry, _) -> (carry, None)`` for ``nn.scan``."""

  width: int
  heads: int
  mlp: int
  dtype: Any = jnp.bfloat16

  @nn.compact
  def __call__(self, x, _=None):
    head_dim = self.width // self.heads
    norm = functools.partial(
      nn.LayerNorm,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      scale_init=_part(nn.initializers.ones, ("embed",)),
      bias_init=_part(nn.initializers.zeros, ("embed",)),
    )
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32)
    # nn.Einsum, not nn.DenseGeneral: DenseGeneral initialises multi-axis kernels flattened to
    # rank 2, which clashes with their rank-3 logical names under nn.logical_axis_rules.
    project = functools.partial(nn.Einsum, dtype=self.dtype, param_dtype=jnp.float32)
    qkv_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", 0, (1, 2))
    out_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", (0, 1), 2)

    h = norm(name="ln_attn")(x)
    q, k, v = (
      project(
        (self.width, self.heads, head_dim),
        "bte,ehd->bthd",
        kernel_init=_part(qkv_init, ("embed", "heads", "kv")),
        bias_init=_part(nn.initializers.zeros, ("heads", "kv")),
        # No key bias: it adds q.b, the same for every key, which the softmax removes. Its
        # gradient and curvature are exactly zero, so what AdaHessian would see is rounding.
        use_bias=name != "key",
        name=name,
      )(h)
      for name in ("query", "key", "value")
    )
    softmax_dtype = jnp.promote_types(self.dtype, jnp.float32)  # float32 unless float64
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(softmax_dtype) / math.sqrt(head_dim)
    length = x.shape[1]
    causal = jnp.tril(jnp.ones((length, length), bool))
    logits = jnp.where(causal, logits, jnp.finfo(softmax_dtype).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    o = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    x = x + project(
      (self.heads, head_dim, self.width),
      "bthd,hde->bte",
      kernel_init=_part(out_init, ("heads", "kv", "embed")),
      bias_init=_part(nn.initializers.zeros, ("embed",)),
      name="out",
    )(o)

    h = norm(name="ln_mlp")(x)
    h = dense(
      self.mlp,
      kernel_init=_part(_init, ("embed", "mlp")),
      bias_init=_part(nn.initializers.zeros, ("mlp",)),
      name="mlp_in",
    )(h)
    x = x + dense(
      self.width,
      kernel_init=_part(_init, ("mlp", "embed")),
      bias_init=_part(nn.initializers.zeros, ("embed",)),
      name="mlp_out",
    )(nn.gelu(h))
    return nn.with_logical_constraint(x, ("batch", "length", "act_embed")), None


class CharLM(nn.Module):
  """Causal character LM. ``scan=True``: blocks stacked by ``nn.scan`` (leaves ``(layers, ...)``
  under ``'blocks'``); ``scan=False``: separate modules ``blocks_0``, ``blocks_1``, ...
  ``remat``: rematerialise every block in the backward pass."""

  vocab: int
  context: int
  width: int = 128
  layers: int = 4
  heads: int = 4
  mlp: int = 512
  dtype: Any = jnp.bfloat16
  scan: bool = True
  remat: bool = True

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(
      self.vocab,
      self.width,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      embedding_init=_part(nn.initializers.normal(0.02), ("vocab", "embed")),
      name="tok_embed",
    )(tokens)
    pos = self.param(
      "pos_embed",
      _part(nn.initializers.normal(0.02), ("position", "embed")),
      (self.context, self.width),
    )
    x = x + pos[: tokens.shape[1]].astype(self.dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
    block = nn.remat(Block) if self.remat else Block
    args = (self.width, self.heads, self.mlp, self.dtype)
    if self.scan:
      stack = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        length=self.layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )
      x, _ = stack(*args, name="blocks")(x, None)
    else:
      for i in range(self.layers):
        x, _ = block(*args, name=f"blocks_{i}")(x, None)
    x = nn.LayerNorm(
      dtype=self.dtype,
      param_dtype=jnp.float32,
      scale_init=_part(nn.initializers.ones, ("embed",)),
      bias_init=_part(nn.initializers.zeros, ("embed",)),
      name="ln_final",
    )(x)
    logits = nn.Dense(
      self.vocab,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      kernel_init=_part(_init, ("embed", "vocab")),
      bias_init=_part(nn.initializers.zeros, ("vocab",)),
      name="head",
    )(x)
    return logits.astype(jnp.promote_types(self.dtype, jnp.float32))


# ---------------------------------------------------------------------------------------------
# Stacked <-> unstacked parameters (for the check against separate layers on one device).


def _is_box(x):
  return isinstance(x, nn.LogicallyPartitioned)


def unstack(params: dict, layers: int) -> dict:
  """Unboxed stacked params -> unboxed params of the ``scan=False`` model."""
  out = {k: v for k, v in params.items() if k != "blocks"}
  for i in range(layers):
    out[f"blocks_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["blocks"])
  return out


def stack(params: dict, layers: int) -> dict:
  """Inverse of :func:`unstack`."""
  out = {k: v for k, v in params.items() if not k.startswith("blocks_")}
  out["blocks"] = jax.tree.map(
    lambda *xs: jnp.stack(xs), *[params[f"blocks_{i}"] for i in range(layers)]
  )
  return out


def rebox(like: Any, values: Any) -> Any:
  """``values`` (unboxed) in the logical-partitioning boxes of ``like``."""
  return jax.tree.map(
    lambda b, v: b.replace_boxed(v) if _is_box(b) else v, like, values, is_leaf=_is_box
  )


# ---------------------------------------------------------------------------------------------


def schedule(lr: float, steps: int):
  """10 % linear warm-up, then inverse square root (the same for both optimizers)."""
  warm = max(steps // 10, 1)
  return lambda s: lr * jnp.minimum((s + 1) / warm, jnp.sqrt(warm / (s + 1)))


def make_adahessian(lr: float, steps: int, block: int) -> optax.GradientTransformation:
  return adahessian_jax.adahessian(schedule(lr, steps), **adahessian_config(block))


def make_adamw(lr: float, steps: int, block: int) -> optax.GradientTransformation:
  del block
  return optax.adamw(schedule(lr, steps), **ADAMW_CONFIG)


#: The optimizers compared: name -> (constructor, default learning rate).
OPTIMIZERS = {"AdaHessian": (make_adahessian, 0.15), "AdamW": (make_adamw, 3e-3)}


def cross_entropy(model, params, windows):
  logits = model.apply({"params": params}, windows[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).mean()


def make_sharded_step(model, tx, hessian, param_sh, state_sh, batch_sh, mesh):
  """The pods-style step: one ``jax.jit`` with explicit shardings, params and state donated."""
  step = _common.make_step(
    tx, functools.partial(cross_entropy, model), "fused" if hessian else "plain"
  )
  replicated = NamedSharding(mesh, P())
  return jax.jit(
    step,
    in_shardings=(param_sh, state_sh, batch_sh),
    out_shardings=(param_sh, state_sh, replicated),
    donate_argnums=(0, 1),
  )


def make_reference_step(model, tx, layers):
  """The same AdaHessian step for the unstacked model on one device, with the stacked probe.

  The fused route would draw one probe per leaf of *this* tree; instead the probe is drawn from
  the same key on the stacked layout and cut into layers, and ``z * Hz`` is formed with
  ``adahessian_jax.hvp``.
  """
  loss_fn = functools.partial(cross_entropy, model)

  def step(params, opt_state, batch):
    values = nn.unbox(params)
    keys, _ = adahessian_jax.probe_keys(adahessian_jax.find_adahessian_state(opt_state))
    z = unstack(adahessian_jax.rademacher_like(keys[0], stack(values, layers)), layers)
    z = rebox(params, z)
    f = lambda p: loss_fn(p, batch)
    loss, grads = jax.value_and_grad(f)(params)
    hdiag = jax.tree.map(jnp.multiply, z, adahessian_jax.hvp(f, params, z))
    updates, opt_state = tx.update(grads, opt_state, params, hessian_diag=hdiag)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step)


@dataclasses.dataclass
class Setup:
  """Everything the runs share."""

  model: CharLM
  mesh: Any
  params: Any  # boxed, sharded over the mesh
  param_sh: Any  # their NamedShardings
  batch_sh: Any
  batches: Any  # rng -> iterator of (batch, context + 1) int32 windows
  evaluate: Any  # params -> {"loss": ..., "accuracy": ...} on the held-out windows
  block: int


def state_shardings(tx, setup: Setup):
  """The optimizer state's shardings, read from its boxes: moments are sharded like params."""
  abstract = jax.eval_shape(tx.init, setup.params)
  return nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), setup.mesh, LOGICAL_RULES)


def per_device_bytes(tree, device) -> int:
  """Bytes of ``tree``'s leaves held by ``device``."""
  total = 0
  for leaf in jax.tree.leaves(nn.unbox(tree)):
    for shard in leaf.addressable_shards:
      if shard.device == device:
        total += shard.data.nbytes
  return total


def cast_tree(tree, shardings, dtype=None):
  """A fresh copy of ``tree`` (optionally cast), with ``shardings``; the steps donate theirs."""
  fn = lambda x: x.astype(dtype) if dtype is not None else jnp.copy(x)
  return jax.jit(lambda t: jax.tree.map(fn, t), out_shardings=shardings)(tree)


def train(name, make, lr, steps, eval_every, setup: Setup, seed, progress):
  """Trains one optimizer; returns a ``_common.Run`` and memory and step-time records."""
  model, mesh = setup.model, setup.mesh
  tx = make(lr, steps, setup.block)
  state_sh = state_shardings(tx, setup)
  params = cast_tree(setup.params, setup.param_sh)
  stream = setup.batches(np.random.default_rng(seed + 1))  # the same batches for both
  batch = jax.device_put(next(stream), setup.batch_sh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    opt_state = jax.jit(tx.init, out_shardings=state_sh)(params)
    step = make_sharded_step(
      model, tx, name == "AdaHessian", setup.param_sh, state_sh, setup.batch_sh, mesh
    )
    t0 = time.perf_counter()
    step = step.lower(params, opt_state, batch).compile()
    compile_s = time.perf_counter() - t0

  first = setup.evaluate(params)
  run = _common.Run(name, lr, [0], [math.nan], {k: [v] for k, v in first.items()}, [0.0], compile_s)
  bar = _common.progress_bar(steps, f"{name} lr={lr:g}", not progress)
  elapsed, window, step_times = 0.0, [], []
  for i in range(1, steps + 1):
    t0 = time.perf_counter()
    params, opt_state, loss = step(params, opt_state, batch)
    loss = float(loss)  # waits for the step (XLA:CPU collectives on forced devices need it)
    step_times.append(time.perf_counter() - t0)
    elapsed += step_times[-1]
    window.append(loss)
    run.diverged = run.diverged or not math.isfinite(loss)
    batch = jax.device_put(next(stream), setup.batch_sh)
    if bar is not None:
      bar.update(1)
    if i % eval_every == 0 or i == steps or run.diverged:
      # A step's loss is of the parameters before it: the last step's own blow-up shows here only.
      run.diverged = run.diverged or not _common.finite(params)
      metrics = setup.evaluate(params) if not run.diverged else {k: math.nan for k in run.val}
      run.steps.append(i)
      run.train_loss.append(float(np.mean(window)))
      run.time.append(elapsed)
      for k, v in metrics.items():
        run.val[k].append(float(v))
      window = []
      if bar is not None:
        bar.set_postfix_str(
          f"train {run.train_loss[-1]:.4f} val {run.val['loss'][-1]:.4f}", refresh=False
        )
    if run.diverged:
      break
  if bar is not None:
    bar.close()
  info = {
    "state_bytes_per_device": per_device_bytes(opt_state, mesh.devices.flat[0]),
    "state_bytes_total": sum(x.nbytes for x in jax.tree.leaves(nn.unbox(opt_state))),
    "median_step_s": float(np.median(step_times[len(step_times) // 5 :])),
  }
  return run, info


def make_evaluate(model, val_windows, batch_sh):
  val = jax.device_put(val_windows, batch_sh)

  @jax.jit
  def metrics(params):
    logits = model.apply({"params": params}, val[:, :-1])
    targets = val[:, 1:]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    return {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == targets)}

  return lambda params: {k: float(v) for k, v in metrics(params).items()}


def check_against_unstacked(setup: Setup, lr, steps, check_steps, seed, dtype=jnp.float32):
  """AdaHessian for ``check_steps`` steps, stacked+remat+FSDP vs separate layers on one device.

  Both start from ``setup.params`` cast to ``dtype`` and compute in ``dtype``, on the same
  batches, with the same schedule as the training run. Returns the largest relative difference
  of the per-step losses and of the final parameters (per leaf, the max-abs difference over the
  max-abs value, maximised over leaves), and the smallest change of a leaf (every leaf trains).
  """
  stacked = setup.model.clone(dtype=dtype)
  flat = setup.model.clone(dtype=dtype, scan=False, remat=False)
  layers = setup.model.layers
  tx = make_adahessian(lr, steps, setup.block)
  stream = setup.batches(np.random.default_rng(seed + 1))
  batches = [next(stream) for _ in range(check_steps)]

  # Stacked, rematerialised, FSDP over the mesh: the training run's step.
  params = cast_tree(setup.params, setup.param_sh, dtype)
  init = jax.device_get(nn.unbox(params))
  state_sh = state_shardings(tx, dataclasses.replace(setup, params=params))
  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(LOGICAL_RULES):
    opt_state = jax.jit(tx.init, out_shardings=state_sh)(params)
    step = make_sharded_step(
      stacked, tx, True, setup.param_sh, state_sh, setup.batch_sh, setup.mesh
    )
    losses_a = []
    for b in batches:
      params, opt_state, loss = step(params, opt_state, jax.device_put(b, setup.batch_sh))
      losses_a.append(float(loss))
  final_a = jax.device_get(nn.unbox(params))

  # Separate layers, one device, no sharding, no remat, no logical axis rules.
  device = jax.devices()[0]
  abstract = jax.eval_shape(flat.init, jax.random.key(0), batches[0][:1, :-1])["params"]
  ref_params = rebox(abstract, jax.device_put(unstack(init, layers), device))
  ref_state = jax.device_put(tx.init(ref_params), device)  # committed: one compilation
  ref_step = make_reference_step(flat, tx, layers)
  losses_b = []
  for b in batches:
    ref_params, ref_state, loss = ref_step(ref_params, ref_state, jax.device_put(b, device))
    losses_b.append(float(loss))
  final_b = stack(jax.device_get(nn.unbox(ref_params)), layers)

  rel = lambda a, b: float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))
  return {
    "steps": check_steps,
    "dtype": jnp.dtype(dtype).name,
    "max_rel_loss_diff": max(
      rel(np.float64(a), np.float64(b)) for a, b in zip(losses_a, losses_b, strict=True)
    ),
    "max_rel_param_diff": max(jax.tree.leaves(jax.tree.map(rel, final_a, final_b))),
    "min_param_change": min(
      jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), final_b, init))
    ),
    "losses_stacked": losses_a,
    "losses_unstacked": losses_b,
  }


def plot(runs, memory, title, out):
  fig, (ax_tr, ax_vl, ax_mem) = plt.subplots(1, 3, figsize=(14, 4.2), dpi=90)
  for r in runs:
    c = _common.COLORS.get(r.name)
    label = f"{r.name} (lr {r.lr:g})"
    ax_tr.plot(r.steps[1:], r.train_loss[1:], color=c, label=label)
    ax_vl.plot(r.steps, r.val["loss"], color=c, label=label)
  ax_tr.set(xlabel="step", ylabel="train loss (nats/char, mean over interval)", title="training")
  ax_vl.set(xlabel="step", ylabel="validation loss (nats/char)", title="validation")
  _common._zoom(ax_vl, [r.val["loss"] for r in runs])
  names = list(memory)
  kib = [memory[n] / 1024 for n in names]
  ax_mem.bar(names, kib, color=[_common.COLORS.get(n.split()[0], "tab:gray") for n in names])
  ax_mem.set(ylabel="KiB on one device", title="per-device memory (FSDP)")
  for i, v in enumerate(kib):
    ax_mem.text(i, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=8)
  for ax in (ax_tr, ax_vl):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, "pods_transformer.png")
  fig.savefig(path)
  plt.close(fig)
  print(f"wrote {path}")
  return path


def check_device_multiples(p, args, n_devices: int) -> None:
  """Refuses, as a usage error, a size the FSDP mesh cannot split: the batch and the validation
  windows are split over the devices, and so is the ``'embed'`` axis of every parameter."""
  for flag, value in (
    ("--batch-size", args.batch_size),
    ("--width", args.width),
    ("--eval-windows", args.eval_windows),
  ):
    if value % n_devices:
      p.error(f"argument {flag}: must be a multiple of the {n_devices} devices, got {value}")


#: The defaults that ``--quick`` changes (a flag given explicitly keeps its value).
QUICK = dict(context=32, width=32, layers=2, heads=2, block_size=8, batch_size=16, eval_windows=32)


def parse_args(argv=None):
  """The command line's arguments; a size the device mesh cannot split is a usage error."""
  p = _common.parser(__doc__, steps=200, quick_steps=30, names=list(OPTIMIZERS), tune=False)
  p.add_argument(
    "--batch-size", type=positive_int, default=32, help="a multiple of the device count"
  )
  p.add_argument("--context", type=positive_int, default=64)
  p.add_argument("--width", type=positive_int, default=128, help="a multiple of the device count")
  p.add_argument("--layers", type=positive_int, default=4)
  p.add_argument("--heads", type=positive_int, default=4, help="a divisor of --width")
  p.add_argument(
    "--block-size", type=positive_int, default=32, help="AdaHessian's averaging block (default 32)"
  )
  p.add_argument(
    "--eval-windows", type=positive_int, default=256, help="a multiple of the device count"
  )
  p.add_argument(
    "--check-steps",
    type=nonnegative_int,
    default=20,
    help="steps of the layout check (default 20; 0: off)",
  )
  p.add_argument(
    "--check-dtype",
    choices=("float32", "float64"),
    default="float32",
    help="compute dtype of the layout check; float64 turns on jax_enable_x64 for the whole "
    "process (the training runs keep their explicit bfloat16/float32 dtypes)",
  )
  p.add_argument("--check-only", action="store_true", help="run the layout check, then stop")
  p.add_argument(
    "--describe", action="store_true", help="list AdaHessian's averaging of every leaf, then stop"
  )
  p.add_argument("--no-remat", action="store_true", help="do not rematerialise the blocks")
  args = parse_with_quick(p, QUICK, argv)
  check_heads(p, args)
  _common.check_context(p, args.context)
  check_device_multiples(p, args, len(jax.devices()))
  return args


def main():
  args = parse_args()
  if args.check_dtype == "float64":
    jax.config.update("jax_enable_x64", True)
  steps = _common.resolve_steps(args)
  eval_every = max(steps // (6 if args.quick else 30), 1)

  devices = jax.devices()
  mesh = jax.make_mesh((len(devices),), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  train_data, val_data, chars = _common.pydoc_text()
  ctx = args.context
  starts = np.random.default_rng(args.seed + 100).integers(
    0, len(val_data) - ctx - 1, args.eval_windows
  )
  val_windows = np.stack([val_data[s : s + ctx + 1] for s in starts])

  model = CharLM(
    len(chars), ctx, args.width, args.layers, args.heads, 4 * args.width, remat=not args.no_remat
  )
  abstract = jax.eval_shape(model.init, jax.random.key(args.seed), val_windows[:1, :ctx])
  if args.describe:
    config = adahessian_config(args.block_size)
    print(spatial.describe(abstract["params"], config["averaging"], args.block_size))
    return
  param_sh = nn.logical_to_mesh_sharding(
    nn.get_partition_spec(abstract["params"]), mesh, LOGICAL_RULES
  )
  init = lambda key: model.init(key, val_windows[:1, :ctx])["params"]
  params = jax.jit(init, out_shardings=param_sh)(jax.random.key(args.seed))
  batch_sh = NamedSharding(mesh, nn.logical_to_mesh_axes(("batch", None), LOGICAL_RULES))

  def batches(rng):
    while True:
      s = rng.integers(0, len(train_data) - ctx - 1, args.batch_size)
      yield train_data[s[:, None] + np.arange(ctx + 1)]

  evaluate = make_evaluate(model, val_windows, batch_sh)
  setup = Setup(model, mesh, params, param_sh, batch_sh, batches, evaluate, args.block_size)
  n_params = _common.param_count(nn.unbox(params))
  print(
    f"pydoc_data.topics: {len(train_data):,} train / {len(val_data):,} validation characters; "
    f"transformer with {n_params:,} parameters ({args.layers} scanned"
    f"{'' if args.no_remat else ', rematerialised'} layers, width {args.width}, {args.heads} "
    f"heads, context {ctx}), bfloat16 compute, float32 params; FSDP over {len(devices)} "
    f"{devices[0].platform.upper()} devices; {steps} steps of {args.batch_size} windows"
  )

  lrs = {k: lr for k, (_, lr) in OPTIMIZERS.items()}
  lrs.update(args.lr)  # checked against the names when parsed
  optimizers = {k: v for k, v in OPTIMIZERS.items() if args.only is None or k in args.only}

  check = None
  if args.check_steps and "AdaHessian" in optimizers:
    check = check_against_unstacked(
      setup, lrs["AdaHessian"], steps, args.check_steps, args.seed, jnp.dtype(args.check_dtype)
    )
    print(
      f"layout check ({check['steps']} AdaHessian steps, {check['dtype']} compute): stacked + "
      f"remat + "
      f"FSDP over {len(devices)} devices vs separate layers on one device: max relative "
      f"difference of losses {check['max_rel_loss_diff']:.2e}, of parameters "
      f"{check['max_rel_param_diff']:.2e} (every leaf moved by >= "
      f"{check['min_param_change']:.2e})"
    )
  if args.check_only:
    print(f"wrote {write_json(os.path.join(args.out, 'pods_transformer_check.json'), check)}")
    return

  runs, infos = [], {}
  for name, (make, _) in optimizers.items():
    run, info = train(
      name, make, lrs[name], steps, eval_every, setup, args.seed, not args.no_progress
    )
    runs.append(run)
    infos[name] = info

  device = devices[0]
  param_bytes = per_device_bytes(params, device)
  memory = {"params": param_bytes}
  print(f"\nper-device memory on {device}: parameters {param_bytes / 1024:,.1f} KiB")
  for name, info in infos.items():
    memory[f"{name} state"] = info["state_bytes_per_device"]
    print(
      f"  {name:<10} optimizer state {info['state_bytes_per_device'] / 1024:,.1f} KiB per device "
      f"({info['state_bytes_total'] / 1024:,.1f} KiB in all, "
      f"{info['state_bytes_per_device'] / param_bytes:.2f}x the parameters)"
    )
  ratio = None
  if len(infos) == 2:
    ratio = infos["AdaHessian"]["median_step_s"] / infos["AdamW"]["median_step_s"]
    print(f"step time AdaHessian / AdamW (median, excluding compilation): {ratio:.2f}")
  extra = {
    "parameters": n_params,
    "devices": len(devices),
    "per_device_bytes": memory,
    "step_time_ratio": ratio,
    "layout_check": check,
    "adahessian_config": {
      k: v for k, v in adahessian_config(args.block_size).items() if k != "averaging"
    },
  }
  _common.summarize("pods_transformer", runs, "accuracy", "val acc", args.out, args, extra)
  plot(
    runs,
    memory,
    f"pods-style char LM on pydoc_data.topics: {args.layers} scanned layers, width "
    f"{args.width}, FSDP over {len(devices)} devices, bf16 compute",
    args.out,
  )


if __name__ == "__main__":
  main()
