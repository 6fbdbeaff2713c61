"""Data-parallel AdaHessian with ``jax.shard_map`` (per-device view inside ``jit``).

As with ``pmap``: the step sees this device's shard of the batch, averages
the gradients with ``lax.pmean`` and passes ``axis_name`` to the optimizer,
which averages the Hessian estimate. Under ``shard_map``, differentiating with
respect to replicated parameters sums over the axis automatically, so take
this device's gradient at :func:`adahessian_jax.distributed.device_varying`
parameters (the optimizer does the same for its Hessian-vector products).

Run: ``python examples/distributed_shard_map.py`` (forces 4 CPU devices).
"""

import _devices
from _args import no_options

if __name__ == "__main__":  # before JAX starts: --help and a bad argument answer at once
  no_options(__doc__)
_devices.force_host_devices(4)  # unless XLA_FLAGS sets a device count

import jax  # noqa: E402
import optax  # noqa: E402
from _toy import loss_fn, problem  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import adahessian_jax as ah  # noqa: E402
from adahessian_jax import distributed  # noqa: E402


def main(independent_probes=False, steps=100):
  mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
  x, y, params = problem(64 * jax.device_count())  # rows split evenly over any device count
  tx = ah.adahessian(0.05, axis_name="data", independent_probes=independent_probes)
  replicated, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  params = jax.device_put(params, replicated)
  state = jax.device_put(tx.init(params), replicated)
  x, y = jax.device_put(x, batch), jax.device_put(y, batch)

  def local_step(params, state, x, y):
    loss = lambda p: loss_fn(p, x, y)  # this device's loss on its shard
    value, grads = jax.value_and_grad(loss)(distributed.device_varying(params, "data"))
    grads = jax.lax.pmean(grads, "data")
    updates, state = tx.update(grads, state, params, value_fn=loss)
    return optax.apply_updates(params, updates), state, jax.lax.pmean(value, "data")

  step = jax.jit(
    jax.shard_map(
      local_step,
      mesh=mesh,
      in_specs=(P(), P(), P("data"), P("data")),
      out_specs=(P(), P(), P()),
    )
  )
  for i in range(steps):
    # Waiting for each step avoids a known XLA:CPU collectives deadlock with forced
    # host devices on small machines; on GPU/TPU drop block_until_ready.
    params, state, loss = jax.block_until_ready(step(params, state, x, y))
    if i % 25 == 0 or i == steps - 1:
      print(f"step {i:3d}  loss {float(loss):.5f}")
  n, drift = jax.device_count(), distributed.max_replica_difference(params)
  print(f"max |difference| between the {n} replicas: {drift}")
  return params


if __name__ == "__main__":
  main()
