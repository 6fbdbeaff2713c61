"""Single-host distributed checks, run by ``test_distributed.py`` in one subprocess.

Usage: ``XLA_FLAGS=--xla_force_host_platform_device_count=4 python _distributed_worker.py OUT_DIR
[SECTION ...]``

Runs each of :data:`SECTIONS` (all of them if none is named) into ``OUT_DIR/<section>/``, with
what it prints in ``stdout.txt`` there; a section that raises leaves its traceback in
``OUT_DIR/<section>.error`` and the others still run, so that each test reads its own section's
results or failure. One process for all: each would pay JAX's and Flax's import again.

``single_host`` (:func:`main`) trains the shared problem for ``STEPS`` steps in each mode
(``pmap``, ``jit`` data-parallel and FSDP, ``shard_map``; both probe policies; the ``value_fn``
and the fused ``hessian_diag`` routes) and writes ``results.json`` (differences to the
single-device reference, between replicas, and sharding facts) and ``reference.npz`` (the
single-device params, for the multi-process test). ``nnx_same`` and ``nnx_independent``
(:func:`main_nnx`): Flax NNX; ``sync_bn`` (:func:`main_sync_bn`): a synchronised BatchNorm;
``replicate`` (:func:`main_replicate`): pmapped steps on ``distributed.replicate``-d copies;
``tensor_parallel`` and ``explicit_mesh``: ``_tensor_parallel_worker.py`` and
``_explicit_mesh_worker.py``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import sys
import time
import traceback

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
from _distributed_common import (  # noqa: E402
  DEFAULT_HPARAMS,
  NNX_STEPS,
  STEPS,
  config_name,
  max_abs_diff,
  mesh_1d,
  to_numpy,
  train_jit,
  train_nnx_pmap,
  train_nnx_shard_map,
  train_nnx_single_device,
  train_pmap,
  train_shard_map,
  train_single_device,
)

from adahessian_jax import distributed  # noqa: E402

# (dtype, update_freq, modes); update_freq=2 runs the lax.cond refresh path.
EXACT_MODES = ("pmap", "jit_dp", "jit_fsdp", "shard_map")
PLAN = (
  (
    "float32",
    1,
    (
      *EXACT_MODES,
      "pmap_no_hessian_pmean",
      "pmap_independent",
      "pmap_fused_independent",
      "shard_map_fused",
      "shard_map_independent",
      "pmap_train_state",
      "shard_map_train_state_independent",
    ),
  ),
  ("float64", 1, (*EXACT_MODES, "shard_map_train_state")),
  ("float32", 2, ("pmap", "jit_fsdp", "shard_map_independent", "pmap_train_state_independent")),
)


def run_mode(mode, mesh, dtype, k):
  """Returns ``(params as NumPy, max difference between replicas, extra results)``: the
  compiles after the first step (``pmap``), the shardings (``jit``)."""
  independent = "independent" in mode
  fused = "fused" in mode
  ts = "train_state" in mode  # linen.TrainState.apply_loss(axis_name=...): the fused route
  if mode.startswith("pmap"):
    p, s, compiles = train_pmap(dtype, k, "no_hessian" not in mode, independent, fused, ts)
    first = jax.tree.map(lambda a: np.asarray(a)[0], p)
    diff = distributed.max_replica_difference((p, s), stacked=True)
    return first, diff, {"compiles_after_first": compiles}
  if mode.startswith("jit"):
    p, s, info = train_jit(mesh, dtype, k, fsdp=mode == "jit_fsdp")
    return to_numpy(p), distributed.max_replica_difference((p, s)), {"sharding": info}
  p, s = train_shard_map(mesh, dtype, k, independent, fused, ts)
  return to_numpy(p), distributed.max_replica_difference((p, s)), {}


def main(out_dir):
  t0 = time.time()
  mesh = mesh_1d()
  results = {"n_devices": jax.device_count(), "steps": STEPS}
  references = {}
  for dtype, k, modes in PLAN:
    name = config_name(dtype, k)
    r = results[name] = {}
    ref = references[name] = to_numpy(train_single_device(dtype, k))
    outputs = {}
    for mode in modes:
      params, replica_diff, extra = run_mode(mode, mesh, dtype, k)
      outputs[mode] = params
      r[mode] = {"replica_diff": replica_diff, "vs_ref": max_abs_diff(params, ref), **extra}
      # The independent-probe runs against the value_fn route's (pmap's, else shard_map's).
      ref_mode = "pmap_independent" if "pmap_independent" in outputs else "shard_map_independent"
      if "independent" in mode and mode != ref_mode and ref_mode in outputs:
        r[mode][f"vs_{ref_mode}"] = max_abs_diff(params, outputs[ref_mode])

  # The optimizer's default hyperparameters in float32: the first step divides by
  # |D| + 1e-4, which amplifies rounding; compare with the single-device noise floor.
  ref = to_numpy(train_single_device("float32", 1, DEFAULT_HPARAMS))
  permuted = to_numpy(train_single_device("float32", 1, DEFAULT_HPARAMS, permute=True))
  p, _, _ = train_jit(mesh, "float32", 1, hparams=DEFAULT_HPARAMS)
  results["default_hparams_float32"] = {
    "jit_dp_vs_ref": max_abs_diff(to_numpy(p), ref),
    "permuted_batch_vs_ref": max_abs_diff(permuted, ref),
  }

  np.savez(
    os.path.join(out_dir, "reference.npz"),
    **{f"{name}/{leaf}": v for name, ps in references.items() for leaf, v in ps.items()},
  )
  results["seconds"] = time.time() - t0
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)


def main_nnx(out_dir, probes):
  """``adahessian_jax.nnx.value_grad_and_hessian_diag(..., axis_name=)`` in float64, under
  ``jax.pmap`` (of a step that ``nnx.merge``-s the model and optimizer) and ``nnx.shard_map``.

  ``probes="same"``: each mapped run's params against the single-device run on the global batch
  (also with ``nnx.WeightNorm``, which writes a parameter in the loss). ``"independent"``:
  under ``nnx.shard_map`` against the value_fn route's independent estimator (under ``pmap``) and
  the single-device run.
  Both with the largest difference between the replicas; written to ``OUT_DIR/results.json``.
  """
  ref = train_nnx_single_device("float64")
  results = {"steps": NNX_STEPS}
  if probes == "same":
    runs = {"pmap": train_nnx_pmap("float64"), "shard_map": train_nnx_shard_map("float64")}
    params, replica_diff, compiles = runs["pmap"]
    runs["pmap"] = params, replica_diff
    results["pmap_compiles_after_first"] = compiles
    for mode, (params, replica_diff) in runs.items():
      results[mode] = {"replica_diff": replica_diff, "vs_ref": max_abs_diff(params, ref)}
    params, replica_diff = train_nnx_shard_map("float64", weight_norm=True)
    ref = train_nnx_single_device("float64", weight_norm=True)
    results["shard_map_weight_norm"] = {
      "replica_diff": replica_diff,
      "vs_ref": max_abs_diff(params, ref),
    }
  else:
    value_fn, replica_diff, _ = train_nnx_pmap("float64", True, value_fn=True)
    results["pmap_value_fn"] = {"replica_diff": replica_diff, "vs_ref": max_abs_diff(value_fn, ref)}
    params, replica_diff = train_nnx_shard_map("float64", True)
    results["shard_map"] = {
      "replica_diff": replica_diff,
      "vs_ref": max_abs_diff(params, ref),
      "vs_value_fn": max_abs_diff(params, value_fn),
    }
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)


def main_sync_bn(out_dir):
  """``linen.TrainState.apply_loss(..., axis_name=)`` of a Linen model whose BatchNorm is
  synchronised over the batch axis (``nn.BatchNorm(axis_name=...)``), float64, under ``jax.pmap``
  and ``jax.shard_map``, against one device on the global batch (params and ``batch_stats``).

  And with ``independent_probes=True``, whether ``apply_loss`` and ``tx.update(value_fn=...)``
  warn that the estimate is biased (they must for the synchronised BatchNorm, not for a per-device
  one). Written to ``OUT_DIR/results.json``.
  """
  import warnings

  import flax.linen as nn
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import adahessian_jax as ah
  from adahessian_jax.linen import TrainState

  n, steps, axis = jax.local_device_count(), 3, "batch"

  class Model(nn.Module):
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x):
      x = nn.Dense(8, param_dtype=jnp.float64)(x)
      x = nn.BatchNorm(False, momentum=0.9, axis_name=self.axis_name, param_dtype=jnp.float64)(x)
      return nn.Dense(2, param_dtype=jnp.float64)(jnp.tanh(x))

  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(4 * n, 4)), rng.normal(size=(4 * n, 2))
  variables = Model().init(jax.random.key(0), x)

  def make_state(axis_name, independent=False, sync=True):
    model = Model(axis_name if sync else None)
    tx = ah.adahessian(
      0.05,
      hessian_power=0.5,
      block_size=4,
      seed=1,
      axis_name=axis_name,
      independent_probes=independent,
    )
    return TrainState.create(
      apply_fn=model.apply,
      params=variables["params"],
      batch_stats=variables["batch_stats"],
      tx=tx,
    )

  def make_loss(state):
    def loss_fn(params, x, y):
      out, mutated = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, x, mutable=["batch_stats"]
      )
      return jnp.mean((out - y) ** 2), mutated["batch_stats"]

    return loss_fn

  def step_fn(axis_name, independent=False):
    def step(state, x, y):
      state, (_, stats) = state.apply_loss(
        make_loss(state),
        x,
        y,
        has_aux=True,
        axis_name=axis_name,
        independent_probes=independent,
      )
      return state.replace(batch_stats=stats)

    return step

  def value_fn_step(state, x, y):  # the value_fn route (tx.update), stats left as they are
    loss = lambda p: make_loss(state)(p, x, y)[0]
    grads = jax.lax.pmean(jax.grad(loss)(state.params), axis)
    return state.apply_gradients(grads=grads, value_fn=loss)

  def train(step, state, *batch):
    for _ in range(steps):
      state = jax.block_until_ready(step(state, *batch))
    return jax.tree.map(np.asarray, {"params": state.params, "batch_stats": state.batch_stats})

  def flat(tree):
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree.leaves_with_path(tree)}

  stacked = lambda t: jax.tree.map(lambda a: np.broadcast_to(np.asarray(a), (n, *np.shape(a))), t)
  ref = flat(train(jax.jit(step_fn(None)), make_state(None), x, y))
  xs, ys = x.reshape(n, -1, x.shape[-1]), y.reshape(n, -1, y.shape[-1])
  pmapped = train(jax.pmap(step_fn(axis), axis_name=axis), stacked(make_state(axis)), xs, ys)
  results = {
    "pmap": {
      "vs_ref": max_abs_diff({k: v[0] for k, v in flat(pmapped).items()}, ref),
      "replica_diff": distributed.max_replica_difference(pmapped, stacked=True),
    }
  }
  mesh = jax.make_mesh((n,), (axis,), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.shard_map(step_fn(axis), mesh=mesh, in_specs=(P(), P(axis), P(axis)), out_specs=P())
  batch = jax.device_put((x, y), NamedSharding(mesh, P(axis)))
  state = jax.device_put(make_state(axis), NamedSharding(mesh, P()))
  results["shard_map"] = {"vs_ref": max_abs_diff(flat(train(jax.jit(sharded), state, *batch)), ref)}

  def warned(step, state):
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      jax.pmap(step, axis_name=axis).lower(stacked(state), xs, ys)
    return [str(w.message) for w in caught if "independent_probes" in str(w.message)]

  results["warnings"] = {
    "apply_loss_sync": warned(step_fn(axis, True), make_state(axis, True)),
    "value_fn_sync": warned(value_fn_step, make_state(axis, True)),
    "apply_loss_local": warned(step_fn(axis, True), make_state(axis, True, sync=False)),
    "value_fn_local": warned(value_fn_step, make_state(axis, True, sync=False)),
  }
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)


def main_replicate(out_dir):
  """``jax.pmap``-ed steps (AdaHessian with ``update_freq=2`` and Adam, float32) on params and
  state copied by ``distributed.replicate``: prints per optimizer the compiles of steps 2 to 5,
  the largest difference from the same steps on ``np.broadcast_to`` copies and between replicas;
  then whether ``replicate`` refuses a leaf split over devices."""
  del out_dir  # what it prints is the result
  import jax.numpy as jnp
  import optax
  from conftest import CompileCounter

  import adahessian_jax as ah

  n = jax.local_device_count()
  rng = np.random.default_rng(0)
  f32 = lambda a: np.asarray(a, np.float32)  # float32, as without jax_enable_x64
  x, y = f32(rng.normal(size=(8, 3))), f32(rng.normal(size=(8, 1)))
  params = {"w": jnp.asarray(f32(rng.normal(size=(3, 1)))), "b": jnp.zeros(1, jnp.float32)}
  shard = lambda a: a.reshape(n, -1, *a.shape[1:])
  stack = lambda t: jax.tree.map(lambda a: np.broadcast_to(a, (n, *np.shape(a))), t)
  for name, tx in [
    ("adahessian", ah.adahessian(0.1, update_freq=2, axis_name="batch")),
    ("adam", optax.adam(0.1)),
  ]:

    def step(p, s, x, y, tx=tx, name=name):
      loss = lambda v: jnp.mean((x @ v["w"] + v["b"] - y) ** 2)
      g = jax.lax.pmean(jax.grad(loss)(p), "batch")
      kw = {"value_fn": loss} if name == "adahessian" else {}
      u, s = tx.update(g, s, p, **kw)
      return optax.apply_updates(p, u), s

    pstep = jax.pmap(step, axis_name="batch")
    state = tx.init(params)
    p, s = distributed.replicate((params, state), "batch")
    assert jax.tree.structure((p, s)) == jax.tree.structure((params, state))
    jax.tree.map(np.testing.assert_array_equal, (p, s), stack((params, state)))
    p, s = pstep(p, s, shard(x), shard(y))
    with CompileCounter() as compiles:  # steps 2..5: the first step's outputs, nothing new
      for _ in range(4):
        p, s = jax.block_until_ready(pstep(p, s, shard(x), shard(y)))
    q, t = stack((params, state))  # the same numbers placed otherwise: the same result
    for _ in range(5):
      q, t = jax.block_until_ready(pstep(q, t, shard(x), shard(y)))
    same = max(
      float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
      for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(q), strict=True)
    )
    print(name, compiles.count, same, distributed.max_replica_difference((p, s), stacked=True))
  mesh = jax.make_mesh((n,), ("data",))
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  split = jax.device_put(jnp.arange(4.0), split)
  try:  # was a KeyError: 'data'
    distributed.replicate({"w": split}, "batch")
  except ValueError as e:
    print("split", "leaf at ['w'] (shape (4,)) is split over devices" in str(e))


def main_tensor_parallel(out_dir):
  import _tensor_parallel_worker

  _tensor_parallel_worker.main(out_dir)


def main_explicit_mesh(out_dir):
  del out_dir  # what it prints is the result
  runpy.run_path(os.path.join(os.path.dirname(__file__), "_explicit_mesh_worker.py"))


SECTIONS = {
  "single_host": main,
  "nnx_same": lambda out_dir: main_nnx(out_dir, "same"),
  "nnx_independent": lambda out_dir: main_nnx(out_dir, "independent"),
  "sync_bn": main_sync_bn,
  "replicate": main_replicate,
  "tensor_parallel": main_tensor_parallel,
  "explicit_mesh": main_explicit_mesh,
}


def run_sections(out_dir, names):
  """Runs the sections ``names`` into their own folders; a failure is written, not raised."""
  for name in names:
    print(f"section {name}", flush=True)  # in the log, should the process hang or crash
    section_dir = os.path.join(out_dir, name)
    os.makedirs(section_dir)
    printed = io.StringIO()
    try:
      with contextlib.redirect_stdout(printed):
        SECTIONS[name](section_dir)
    except Exception:
      with open(os.path.join(out_dir, f"{name}.error"), "w") as f:
        f.write(traceback.format_exc())
    with open(os.path.join(section_dir, "stdout.txt"), "w") as f:
      f.write(printed.getvalue())


if __name__ == "__main__":
  run_sections(sys.argv[1], sys.argv[2:] or list(SECTIONS))
