"""Subprocess worker for ``test_distributed.py``: orbax checkpoints of a multi-process run.

Run as one of ``NUM_PROCESSES`` processes (``test_distributed.py`` starts them)::

  XLA_FLAGS=--xla_force_host_platform_device_count=2 \\
    python _multihost_checkpoint_worker.py PROCESS_ID NUM_PROCESSES PORT MODE CKPT_DIR OUT_DIR

Joins ``jax.distributed`` like ``_multihost_worker.py`` and trains the shared problem over the
global mesh for ``2 * STEPS`` steps in two ways:

* ``straight``: ``STEPS`` steps, an orbax checkpoint of params and optimizer state into
  ``CKPT_DIR``, ``STEPS`` more steps (:func:`run`, called by ``_multihost_worker.py`` in its
  processes; the script's ``straight`` mode does the same alone);
* ``resume`` (fresh processes, this script): restores ``CKPT_DIR`` with a target of
  ``ShapeDtypeStruct``s carrying the shardings, then ``STEPS`` steps.

Both write every leaf of the final params and state, in full, to
``OUT_DIR/<MODE>_<process id>.npz``.
"""

from __future__ import annotations

import os
import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")

import numpy as np  # noqa: E402
import optax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from _distributed_common import (  # noqa: E402
  AXIS,
  FSDP_SPECS,
  gather,
  join,
  local_step,
  make_problem,
  mesh_1d,
  put_global,
)
from jax.sharding import PartitionSpec as P  # noqa: E402

import adahessian_jax as ah  # noqa: E402
from adahessian_jax import distributed  # noqa: E402

STEPS = 5  # update_freq=3 refreshes on steps 1, 4, 7: the checkpoint falls mid-period


def setups(mesh):
  """``(name, tx, step, params)``: FSDP under ``jax.jit`` with the stabilizers and a schedule,
  and ``shard_map`` with independent probes and ``lazy_moment="refresh"``."""
  _, _, params = make_problem("float32")
  fsdp_tx = ah.adahessian(
    optax.cosine_decay_schedule(0.05, 20),
    curvature_floor=0.3,
    update_clip=0.05,
    weight_decay=1e-3,
    block_size=4,
    update_freq=3,
    n_samples=2,
    seed=3,
  )
  yield (
    "jit_fsdp",
    fsdp_tx,
    jax.jit(local_step(fsdp_tx)),
    {k: put_global(mesh, v, FSDP_SPECS[k]) for k, v in params.items()},
  )
  tx = ah.adahessian(
    0.05, update_freq=3, lazy_moment="refresh", axis_name=AXIS, independent_probes=True, seed=4
  )
  mapped = jax.shard_map(
    local_step(tx, AXIS), mesh=mesh, in_specs=(P(), P(), P(AXIS), P(AXIS)), out_specs=(P(), P())
  )
  yield (
    "shard_map_independent",
    tx,
    jax.jit(mapped),
    {k: put_global(mesh, v, P()) for k, v in params.items()},
  )


def train(step, params, state, x, y):
  for _ in range(STEPS):
    params, state = jax.block_until_ready(step(params, state, x, y))
  return params, state


def run(process_id, mode, ckpt_dir, out_dir):
  """The ``mode`` run of this process (``jax.distributed`` joined, 32-bit JAX), written to
  ``OUT_DIR/<MODE>_<process id>.npz``."""
  mesh = mesh_1d()
  x, y, _ = make_problem("float32")
  x, y = put_global(mesh, x, P(AXIS)), put_global(mesh, y, P(AXIS))
  checkpointer = ocp.StandardCheckpointer()
  arrays = {}
  for name, tx, step, params in setups(mesh):
    state = jax.jit(tx.init, out_shardings=distributed.state_shardings(tx, params))(params)
    tree = {"params": params, "opt_state": state}
    path = os.path.join(ckpt_dir, name)
    if mode == "straight":
      tree["params"], tree["opt_state"] = train(step, params, state, x, y)
      checkpointer.save(path, tree)
      checkpointer.wait_until_finished()
    else:
      target = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
      tree = checkpointer.restore(path, target)
      same = jax.tree.map(lambda a, t: a.sharding == t.sharding, tree, target)
      assert all(jax.tree.leaves(same)), same
    params, state = train(step, tree["params"], tree["opt_state"], x, y)
    assert distributed.max_replica_difference((params, state)) == 0.0
    leaves = jax.tree_util.tree_flatten_with_path({"params": params, "opt_state": state})[0]
    for path_, v in leaves:
      if v is not None:
        arrays[name + jax.tree_util.keystr(path_)] = gather(v)
  np.savez(os.path.join(out_dir, f"{mode}_{process_id}.npz"), **arrays)


def main(process_id, num_processes, port, mode, ckpt_dir, out_dir):
  join(process_id, num_processes, port)
  try:
    run(process_id, mode, ckpt_dir, out_dir)
  finally:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:7])
