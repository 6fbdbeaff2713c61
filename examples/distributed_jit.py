"""AdaHessian under ``jax.jit`` with ``NamedSharding`` (global view): data-parallel and FSDP.

The loss is a function of global arrays, so its gradient and Hessian-vector
products already are global-batch quantities: no ``axis_name``, no explicit
collectives. XLA inserts the communication. The optimizer state follows the
parameters' shardings (:func:`adahessian_jax.distributed.state_shardings`);
the PRNG key in the state is a tiny replicated array and the probes are
generated sharded like the parameters.

Run: ``python examples/distributed_jit.py`` (forces 4 CPU devices).
"""

import _devices
from _args import no_options

if __name__ == "__main__":  # before JAX starts: --help and a bad argument answer at once
  no_options(__doc__)
_devices.force_host_devices(4)  # unless XLA_FLAGS sets a device count

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from _toy import loss_fn, problem  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import adahessian_jax as ah  # noqa: E402
from adahessian_jax import distributed  # noqa: E402


def train(fsdp, steps=60):
  mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
  x, y, params = problem(256)
  # (a) params replicated; (b) FSDP: each kernel split over the devices.
  specs = {"w1": P(None, "data"), "b1": P("data"), "w2": P("data", None), "b2": P()}
  if not fsdp:
    specs = {k: P() for k in params}
  params = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in params.items()}
  batch_sharding = NamedSharding(mesh, P("data"))
  x, y = jax.device_put(x, batch_sharding), jax.device_put(y, batch_sharding)

  tx = ah.adahessian(0.05)  # no axis_name: the loss below is global
  # jit(tx.init) alone would return the moments replicated; ask for the params' shardings.
  state_sharding = distributed.state_shardings(tx, params)
  state = jax.jit(tx.init, out_shardings=state_sharding)(params)

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
  nu = ah.find_adahessian_state(state).nu
  print(
    f"{'FSDP' if fsdp else 'data-parallel'}: loss {float(loss):.5f}; "
    f"w1 shard {params['w1'].addressable_shards[0].data.shape}, "
    f"its nu shard {nu['w1'].addressable_shards[0].data.shape}"
  )
  return params


if __name__ == "__main__":
  a = train(fsdp=False)
  b = train(fsdp=True)
  diff = max(float(jnp.max(jnp.abs(a[k] - b[k]))) for k in a)
  print(f"max |difference| between the two layouts on {jax.device_count()} devices: {diff:.2e}")
