"""Single-host distributed checks, run by ``test_distributed.py`` in a subprocess.

Usage: ``XLA_FLAGS=--xla_force_host_platform_device_count=4 python _distributed_worker.py OUT_DIR``
(or ``... OUT_DIR nnx_same`` / ``nnx_independent`` for the Flax NNX checks alone,
:func:`main_nnx`)

Trains the shared problem for ``STEPS`` steps in each mode (``pmap``, ``jit``
data-parallel and FSDP, ``shard_map``; both probe policies; the ``value_fn``
and the fused ``hessian_diag`` routes) and writes ``OUT_DIR/results.json``
(differences to the single-device reference, between replicas, and sharding
facts) and ``OUT_DIR/reference.npz`` (the single-device params, for the
multi-process test).
"""

from __future__ import annotations

import json
import os
import sys
import time

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
  """Returns ``(params as NumPy, max difference between replicas, extra info)``."""
  independent = "independent" in mode
  fused = "fused" in mode
  ts = "train_state" in mode  # linen.TrainState.apply_loss(axis_name=...): the fused route
  if mode.startswith("pmap"):
    p, s = train_pmap(dtype, k, "no_hessian" not in mode, independent, fused, ts)
    first = jax.tree.map(lambda a: np.asarray(a)[0], p)
    return first, distributed.max_replica_difference((p, s), stacked=True), None
  if mode.startswith("jit"):
    p, s, info = train_jit(mesh, dtype, k, fsdp=mode == "jit_fsdp")
    return to_numpy(p), distributed.max_replica_difference((p, s)), info
  p, s = train_shard_map(mesh, dtype, k, independent, fused, ts)
  return to_numpy(p), distributed.max_replica_difference((p, s)), None


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
      params, replica_diff, info = run_mode(mode, mesh, dtype, k)
      outputs[mode] = params
      r[mode] = {"replica_diff": replica_diff, "vs_ref": max_abs_diff(params, ref)}
      if info is not None:
        r[mode]["sharding"] = info
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
  Both with the largest difference between the replicas; written to ``OUT_DIR/nnx_PROBES.json``.
  """
  ref = train_nnx_single_device("float64")
  results = {"steps": NNX_STEPS}
  if probes == "same":
    runs = {"pmap": train_nnx_pmap("float64"), "shard_map": train_nnx_shard_map("float64")}
    for mode, (params, replica_diff) in runs.items():
      results[mode] = {"replica_diff": replica_diff, "vs_ref": max_abs_diff(params, ref)}
    params, replica_diff = train_nnx_shard_map("float64", weight_norm=True)
    ref = train_nnx_single_device("float64", weight_norm=True)
    results["shard_map_weight_norm"] = {
      "replica_diff": replica_diff,
      "vs_ref": max_abs_diff(params, ref),
    }
  else:
    value_fn, replica_diff = train_nnx_pmap("float64", True, value_fn=True)
    results["pmap_value_fn"] = {"replica_diff": replica_diff, "vs_ref": max_abs_diff(value_fn, ref)}
    params, replica_diff = train_nnx_shard_map("float64", True)
    results["shard_map"] = {
      "replica_diff": replica_diff,
      "vs_ref": max_abs_diff(params, ref),
      "vs_value_fn": max_abs_diff(params, value_fn),
    }
  with open(os.path.join(out_dir, f"nnx_{probes}.json"), "w") as f:
    json.dump(results, f, indent=1)


if __name__ == "__main__":
  if len(sys.argv) > 2:
    main_nnx(sys.argv[1], sys.argv[2].removeprefix("nnx_"))
  else:
    main(sys.argv[1])
