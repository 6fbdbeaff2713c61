"""AdaHessian under ``jax.jit`` with ``NamedSharding`` (global view): data-parallel and FSDP.

The loss is a function of global arrays, so its gradient and Hessian-vector
products already are global-batch quantities: no ``axis_name``, no explicit
collectives. XLA inserts the communication. The optimizer state follows the
parameters' shardings (:func:`adahessian_jax.distributed.state_shardings`);
the PRNG key in the state is a tiny replicated array and the probes are
generated sharded like the parameters.

Run: ``python examples/distributed_jit.py`` (forces 4 CPU devices).
"""

import math

import _devices
from _args import no_options

if __name__ == "__main__":  # before JAX starts: --help and a bad argument answer at once
  no_options(__doc__)
_devices.force_host_devices(4)  # unless XLA_FLAGS sets a device count

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _toy import loss_fn, problem  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import adahessian_jax as ah  # noqa: E402
from adahessian_jax import distributed  # noqa: E402


def train(fsdp, steps=60):
  n = jax.device_count()
  # FSDP splits the 32 hidden units evenly: over the most devices that divide them (all of 4 or 8;
  # 2 of 6). The batch, 64 rows per device, splits evenly over any of these meshes.
  size = math.gcd(n, 32) if fsdp else n
  mesh = jax.make_mesh(
    (size,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:size]
  )
  x, y, params = problem(64 * n)
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
    f"{'FSDP' if fsdp else 'data-parallel'} ({size} devices): loss {float(loss):.5f}; "
    f"w1 shard {params['w1'].addressable_shards[0].data.shape}, "
    f"its nu shard {nu['w1'].addressable_shards[0].data.shape}"
  )
  return params


if __name__ == "__main__":
  a = train(fsdp=False)
  b = train(fsdp=True)
  a, b = jax.device_get((a, b))  # placed on different meshes where FSDP uses fewer devices
  diff = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
  print(f"max |difference| between the two layouts on {jax.device_count()} devices: {diff:.2e}")
