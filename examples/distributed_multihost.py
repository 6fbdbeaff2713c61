"""Multi-host AdaHessian: several processes joined by ``jax.distributed``.

Run without arguments to launch 2 local processes with 2 CPU devices each,
joined on loopback with gloo CPU collectives (on a real cluster, start one
process per host with its ``process_id`` and the coordinator's address):

  python examples/distributed_multihost.py

Every process runs the same program over the global mesh (all processes'
devices); each loads only its own part of the batch
(``jax.make_array_from_process_local_data``). The step is the single-host
``jax.jit`` data-parallel step unchanged: the loss is global, so no
``axis_name`` is needed. Every process ends with the same parameters.
"""

import argparse
import socket
import subprocess
import sys

import _devices
from _args import no_options, nonnegative_int

NUM_PROCESSES, LOCAL_DEVICES = 2, 2


def worker(process_id, port, steps=60):
  _devices.force_host_devices(LOCAL_DEVICES, override=True)  # the layout needs exactly these
  import jax
  import numpy as np
  import optax
  from _toy import loss_fn, problem
  from jax.sharding import AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P

  import adahessian_jax as ah

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}",
    num_processes=NUM_PROCESSES,
    process_id=process_id,
    initialization_timeout=60,
  )
  try:
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
    x, y, init = problem(256)  # the same data and init everywhere (a real job reads files)
    # This process's rows of the global batch.
    rows = slice(jax.process_index() * 128, (jax.process_index() + 1) * 128)
    batch = NamedSharding(mesh, P("data"))
    x = jax.make_array_from_process_local_data(batch, x[rows], (256, 8))
    y = jax.make_array_from_process_local_data(batch, y[rows], (256, 2))
    replicated = NamedSharding(mesh, P())
    params = jax.tree.map(
      lambda a: jax.make_array_from_process_local_data(replicated, a, a.shape), init
    )

    tx = ah.adahessian(0.05)
    state = jax.jit(tx.init, out_shardings=replicated)(params)

    @jax.jit
    def step(params, state, x, y):
      loss = lambda p: loss_fn(p, x, y)
      value, grads = jax.value_and_grad(loss)(params)
      updates, state = tx.update(grads, state, params, value_fn=loss)
      return optax.apply_updates(params, updates), state, value

    for _ in range(steps):
      # Waiting for each step avoids a known XLA:CPU collectives deadlock with forced
      # host devices on small machines; on GPU/TPU drop block_until_ready.
      params, state, loss = jax.block_until_ready(step(params, state, x, y))
    w1 = np.asarray(params["w1"].addressable_data(0))
    print(
      f"process {jax.process_index()}: loss {float(loss.addressable_data(0)):.6f}, "
      f"sum(w1) {w1.sum():.8f}",
      flush=True,
    )
  finally:
    jax.distributed.shutdown()


def launch():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = [
    subprocess.Popen(
      [sys.executable, __file__, "--worker", str(i), str(port)], start_new_session=True
    )
    for i in range(NUM_PROCESSES)
  ]
  try:
    codes = [p.wait(timeout=300) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  sys.exit(max(codes))


def parse_args(argv=None) -> argparse.Namespace:
  # No options but the hidden one with which launch() starts each process: its process id and
  # the coordinator's port.
  return no_options(
    __doc__,
    argv,
    lambda p: p.add_argument(
      "--worker", nargs=2, type=nonnegative_int, default=None, help=argparse.SUPPRESS
    ),
  )


if __name__ == "__main__":
  args = parse_args()
  if args.worker is not None:
    worker(*args.worker)
  else:
    launch()
