"""One process of the multi-process check, run by ``test_distributed.py``.

Usage (one per process, 2 local CPU devices each)::

  XLA_FLAGS=--xla_force_host_platform_device_count=2 \\
    python _multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR [CKPT_DIR]

Joins ``jax.distributed`` on ``127.0.0.1:PORT`` with gloo CPU collectives and runs its
sections in turn; a section that raises leaves its traceback in
``OUT_DIR/<section>_<id>.error`` and ends the process (the other process would wait for it).

``checkpoint`` (only with ``CKPT_DIR``, first, in 32-bit JAX): the ``straight`` run of
``_multihost_checkpoint_worker.py``, saving the orbax checkpoint that fresh processes resume.

``multi_host`` (in 64-bit JAX): trains the shared problem over the global mesh of all processes'
devices with ``jax.jit`` (data-parallel and FSDP), ``shard_map`` and ``jax.pmap`` (of all processes'
devices, params and state copied by ``distributed.replicate``), and writes the full final params to
``OUT_DIR/process_<id>.npz`` for the test to compare across processes and with the single-device
reference.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")

import numpy as np  # noqa: E402
from _distributed_common import (  # noqa: E402
  config_name,
  join,
  mesh_1d,
  to_numpy,
  train_jit,
  train_pmap,
  train_shard_map,
)
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from adahessian_jax import distributed  # noqa: E402

MODES = ("jit_dp", "jit_fsdp", "shard_map", "pmap")
DTYPES = ("float32", "float64")


def multi_host(process_id, out_dir):
  """The ``multi_host`` section: ``OUT_DIR/process_<id>.npz`` and ``.json``."""
  t0 = time.time()
  mesh = mesh_1d()  # every process's devices: the global batch is split across processes
  arrays, info = (
    {},
    {
      "process_index": jax.process_index(),
      "device_count": jax.device_count(),
      "local_device_count": jax.local_device_count(),
    },
  )
  for dtype in DTYPES:
    for mode in MODES:
      if mode == "jit_fsdp" and dtype == "float64":
        continue  # keep the run short; FSDP across processes is checked in float32
      key = f"{config_name(dtype, 1)}/{mode}"
      if mode == "pmap":  # this process's copies, on its devices
        params, state, info[f"{key}/compiles_after_first"] = train_pmap(dtype, 1)
        info[f"{key}/local_replica_diff"] = distributed.max_replica_difference(
          (params, state), stacked=True
        )
        for leaf, value in params.items():
          arrays[f"{key}/{leaf}"] = np.asarray(value)[0]
        continue
      if mode == "shard_map":
        params, state = train_shard_map(mesh, dtype, 1)
      else:
        params, state, _ = train_jit(mesh, dtype, 1, fsdp=mode == "jit_fsdp")
      info[f"{key}/local_replica_diff"] = distributed.max_replica_difference((params, state))
      for leaf, value in to_numpy(params).items():
        arrays[f"{key}/{leaf}"] = value
  # A "replicated" array that the processes built from different values: only the copies
  # on the other process show it.
  drifted = jax.make_array_from_process_local_data(
    NamedSharding(mesh, P()), np.full(3, float(jax.process_index())), (3,)
  )
  info["drift_across_processes"] = distributed.max_replica_difference({"b": drifted})
  # The same for pmap copies: each process holds only its own, made from its own values.
  copies = distributed.replicate({"b": np.full(3, float(jax.process_index()))}, "data")
  info["drift_across_processes_stacked"] = distributed.max_replica_difference(copies, stacked=True)
  info["drift_across_processes_stacked_host"] = distributed.max_replica_difference(
    jax.device_get(copies), stacked=True
  )
  other = [d for d in jax.devices() if d.process_index != jax.process_index()]
  try:  # a pmap over the other process's devices only: no copy here
    distributed.replicate({"w": np.ones(2)}, "data", devices=other)
  except ValueError as e:
    info["replicate_on_other_devices"] = str(e)
  info["seconds"] = time.time() - t0
  np.savez(os.path.join(out_dir, f"process_{process_id}.npz"), **arrays)
  with open(os.path.join(out_dir, f"process_{process_id}.json"), "w") as f:
    json.dump(info, f)


def checkpoint(process_id, out_dir, ckpt_dir):
  """The ``checkpoint`` section: ``OUT_DIR/straight_<id>.npz`` and the checkpoint in
  ``CKPT_DIR``."""
  import _multihost_checkpoint_worker

  _multihost_checkpoint_worker.run(process_id, "straight", ckpt_dir, out_dir)


def main(process_id, num_processes, port, out_dir, ckpt_dir=None):
  join(process_id, num_processes, port)
  sections = [("multi_host", lambda: multi_host(process_id, out_dir))]
  if ckpt_dir is not None:  # 32-bit, as the fresh processes that resume it
    sections.insert(0, ("checkpoint", lambda: checkpoint(process_id, out_dir, ckpt_dir)))
  for name, section in sections:
    jax.config.update("jax_enable_x64", name == "multi_host")
    try:
      section()
    except Exception:
      with open(os.path.join(out_dir, f"{name}_{process_id}.error"), "w") as f:
        f.write(traceback.format_exc())
      # Not jax.distributed.shutdown(): it waits for the other process, which may wait for this
      # one in the section. The test's runner stops the other process once this one has ended.
      sys.stdout.flush()
      os._exit(1)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:6])
