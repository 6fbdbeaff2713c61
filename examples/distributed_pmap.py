"""Data-parallel AdaHessian with ``jax.pmap`` (per-device view).

Each device computes its gradient and Hutchinson estimate on its shard of the
batch; ``lax.pmean`` averages the gradients (in the step) and the Hessian
estimates (inside the optimizer, via ``axis_name``). With the default probe
policy the result equals single-device training on the global batch.

Run: ``python examples/distributed_pmap.py`` (forces 4 CPU devices).
"""

import _devices
from _args import no_options

if __name__ == "__main__":  # before JAX starts: --help and a bad argument answer at once
  no_options(__doc__)
_devices.force_host_devices(4)  # unless XLA_FLAGS sets a device count

import jax  # noqa: E402
import optax  # noqa: E402
from _toy import loss_fn, problem  # noqa: E402

import adahessian_jax as ah  # noqa: E402
from adahessian_jax import distributed  # noqa: E402


def main(independent_probes=False, steps=100):
  n = jax.local_device_count()
  x, y, params = problem(64 * n)
  tx = ah.adahessian(0.05, axis_name="batch", independent_probes=independent_probes)
  state = tx.init(params)

  # Replicate params and state (leading device axis, placed as pmap places its outputs, so the
  # step compiles once), shard the batch.
  params, state = distributed.replicate((params, state), "batch")
  xs, ys = x.reshape(n, -1, 8), y.reshape(n, -1, 2)

  def step(params, state, x, y):
    loss = lambda p: loss_fn(p, x, y)  # this device's loss on its shard
    value, grads = jax.value_and_grad(loss)(params)
    grads = jax.lax.pmean(grads, "batch")
    updates, state = tx.update(grads, state, params, value_fn=loss)
    return optax.apply_updates(params, updates), state, jax.lax.pmean(value, "batch")

  step = jax.pmap(step, axis_name="batch")
  for i in range(steps):
    # Waiting for each step avoids a known XLA:CPU collectives deadlock with forced
    # host devices on small machines; on GPU/TPU drop block_until_ready.
    params, state, loss = jax.block_until_ready(step(params, state, xs, ys))
    if i % 25 == 0 or i == steps - 1:
      print(f"step {i:3d}  loss {float(loss[0]):.5f}")
  drift = distributed.max_replica_difference(params, stacked=True)
  print(f"max |difference| between the {n} replicas: {drift}")
  return params


if __name__ == "__main__":
  main()
