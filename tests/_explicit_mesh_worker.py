"""FSDP under jax.jit on a mesh with Explicit axes: section ``explicit_mesh`` of
``_distributed_worker.py`` (which runs this script, float64, 4 devices), or alone with
``JAX_ENABLE_X64=1 XLA_FLAGS=--xla_force_host_platform_device_count=4``.

``jax.make_mesh``'s axes are ``Explicit`` by default. Prints the largest parameter difference
from an unsharded run after 3 steps of each route (value_fn, fused), from a state made by a plain
``tx.init(params)`` (plain_init), then of ``block_size=3`` over split axes (blocks); then
``fused_2d_*``: the fused route on a ``(data, model)`` mesh with ``Auto``, then ``Explicit`` axes,
the first leaf split over ``model``; ``fused_bf16_dp``: the fused route against the value_fn route
with unsharded bf16 params and a batch split over the mesh; ``mean_over_split_k*``: a mean over an
axis split over the mesh, without and with lazy refresh; ``blocks_in_shards*``: blocks that lie
within the shards, and the all-gathers their average adds (none).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import adahessian_jax as ah
from adahessian_jax import distributed, spatial

mesh = jax.make_mesh((4,), ("d",), axis_types=(AxisType.Explicit,))
r = np.random.default_rng(0)
host = {"w": jnp.asarray(r.normal(size=(8, 3))), "b": jnp.asarray(r.normal(size=3))}
params = {
  "w": jax.device_put(host["w"], NamedSharding(mesh, P("d"))),
  "b": jax.device_put(host["b"], NamedSharding(mesh, P())),
}
tx = ah.adahessian(0.1, update_freq=2)
loss = lambda p: jnp.sum(jnp.tanh(p["w"] @ p["b"]) ** 2)
vgh = ah.value_grad_and_hessian_diag(loss)


def max_diff(p, q, keys):
  """The largest difference between ``p[k]`` and ``q[k]`` over ``keys``, in NumPy (float64)."""
  return max(
    float(np.max(np.abs(np.asarray(p[k], np.float64) - np.asarray(q[k], np.float64)))) for k in keys
  )


def step(p, s, fused, loss_fn=None):
  loss_fn = loss_fn or loss
  if fused:
    _, g, h = vgh(p, s)
    u, s = tx.update(g, s, p, hessian_diag=h)
  else:
    u, s = tx.update(jax.grad(loss_fn)(p), s, p, value_fn=loss_fn)
  return optax.apply_updates(p, u), s


for fused in (False, True):
  train = jax.jit(lambda p, s, fused=fused: step(p, s, fused))
  p, s = params, jax.jit(tx.init, out_shardings=distributed.state_shardings(tx, params))(params)
  q, t = host, jax.jit(tx.init)(host)
  for _ in range(3):
    p, s = train(p, s)
    q, t = train(q, t)
  assert s[0].mu["w"].sharding.spec == P("d", None), s[0].mu["w"].sharding
  print("fused" if fused else "value_fn", max_diff(p, q, ["w"]))

# The state from a plain tx.init(params) under jax.set_mesh, as most training loops make it: nu
# (and the stored D of update_freq=2) came out replicated while the moments took the params'
# shardings, and every update failed with "select cases must have the same shardings".
train = jax.jit(lambda p, s: step(p, s, False))
with jax.set_mesh(mesh):
  p, s = params, tx.init(params)
  q, t = host, tx.init(host)
  for _ in range(3):
    p, s = train(p, s)
    q, t = train(q, t)
assert s[0].nu["w"].sharding.spec == P("d", None), s[0].nu["w"].sharding
print("plain_init", max_diff(p, q, ["w"]))


# block_size=3 averages D over blocks that straddle the shards (2 rows or columns each) of
# leaves split over the Explicit axis: JAX refused the reshape into blocks (ShardingTypeError).
blocks = {
  "w": jnp.asarray(r.normal(size=(8, 8))),
  "v": jnp.asarray(r.normal(size=(8, 8))),
  "b": jnp.asarray(r.normal(size=8)),
}
specs = {"w": P("d", None), "v": P(None, "d"), "b": P()}
p = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in blocks.items()}
loss = lambda p: jnp.sum(jnp.tanh((p["w"] @ p["b"]) * (p["b"] @ p["v"])) ** 2)
tx = ah.adahessian(0.1, block_size=3, hessian_power=0.5)
train = jax.jit(lambda p, s: step(p, s, False))
s = jax.jit(tx.init, out_shardings=distributed.state_shardings(tx, p))(p)
q, t = blocks, jax.jit(tx.init)(blocks)
for _ in range(3):
  p, s = train(p, s)
  q, t = train(q, t)
assert s[0].nu["v"].sharding.spec == P(None, "d"), s[0].nu["v"].sharding
print("blocks", max_diff(p, q, blocks))


# The fused route marks a non-finite estimate in the first entry of the first leaf (b), here split
# over the model axis of a (data, model) mesh. With Auto axes XLA compiled that one-entry scatter
# wrongly (b's gradient got its first entry also at the first entry of its other shard: updates
# off by 6e-3); with Explicit axes JAX refused it (a ShardingTypeError about the scatter).
host = {"w": jnp.asarray(r.normal(size=(8, 4))), "b": jnp.asarray(r.normal(size=4))}
x = jnp.asarray(r.normal(size=(8, 8)))
loss = lambda p, x: jnp.mean(jnp.tanh(x @ p["w"] + p["b"]) ** 2)
vgh = ah.value_grad_and_hessian_diag(loss)
tx = ah.adahessian(0.1, hessian_power=0.5)


def fused_step(p, s, x):
  _, g, h = vgh(p, s, x)
  u, s = tx.update(g, s, p, hessian_diag=h)
  return optax.apply_updates(p, u), s


q, t = host, jax.jit(tx.init)(host)
for _ in range(3):
  q, t = jax.jit(fused_step)(q, t, x)
for axis_type in (AxisType.Auto, AxisType.Explicit):
  mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(axis_type,) * 2)
  specs = {"w": P(None, "model"), "b": P("model")}
  # The batch over both axes (Explicit axes refuse that split in x @ w).
  batch = P(("data", "model")) if axis_type == AxisType.Auto else P("data")
  p = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in host.items()}
  s = jax.jit(tx.init, out_shardings=distributed.state_shardings(tx, p))(p)
  for _ in range(3):
    p, s = jax.jit(fused_step)(p, s, jax.device_put(x, NamedSharding(mesh, batch)))
  print(f"fused_2d_{axis_type.name}", max_diff(p, q, host))


# Data parallelism: bf16 params left unsharded under jax.set_mesh, the batch split over the mesh.
# The fused route's non-finite mark (typed over the mesh, from the batch) went into the first
# entry of b's unsharded gradient by a one-entry update, which JAX refused (a ShardingTypeError
# about dynamic_update_slice). The value_fn route under the same mesh is the reference.
mesh = jax.make_mesh((4,), ("d",), axis_types=(AxisType.Explicit,))
host = jax.tree.map(lambda v: v.astype(jnp.bfloat16), host)
tx = ah.adahessian(0.1)
with jax.set_mesh(mesh):
  x = jax.device_put(x.astype(jnp.float32), NamedSharding(mesh, P("d")))
  ends = []
  for step_fn in (fused_step, lambda p, s, x: step(p, s, False, lambda p: loss(p, x))):
    p, s = host, tx.init(host)
    for _ in range(2):
      p, s = jax.jit(step_fn)(p, s, x)
    ends.append(p)
print("fused_bf16_dp", max_diff(*ends, host))


# A mean over an axis split over the Explicit axis (a kernel read as a convolution's, split over
# its window): the mean came back whole along it, unlike nu, and every update failed
# ("select cases must have the same shardings"; with update_freq=2, "cond branches must have
# equal output types").
mesh = jax.make_mesh((4,), ("d",), axis_types=(AxisType.Explicit,))
host = {"k": jnp.asarray(r.normal(size=(4, 2, 3)))}
loss = lambda p: jnp.sum(jnp.tanh(p["k"] * jnp.sum(p["k"] ** 2)) ** 2)
for k in (1, 2):
  tx = ah.adahessian(0.1, averaging=spatial.mean_over((0, 1)), update_freq=k, hessian_power=0.5)
  train = jax.jit(lambda p, s: step(p, s, False))
  p = {"k": jax.device_put(host["k"], NamedSharding(mesh, P("d")))}
  s = jax.jit(tx.init, out_shardings=distributed.state_shardings(tx, p))(p)
  q, t = host, jax.jit(tx.init)(host)
  for _ in range(3):
    p, s = train(p, s)
    q, t = train(q, t)
  assert s[0].nu["k"].sharding.spec == P("d", None, None), s[0].nu["k"].sharding
  print(f"mean_over_split_k{k}", max_diff(p, q, host))


# block_size=4 over a leaf split 4 ways along the blocks' axis, 4 rows a shard: every block lies
# within one shard, yet D was gathered whole before averaging (an all-gather of each such
# leaf's D per step, and a whole copy of it on every device). Printed: the value_fn route's
# largest difference from an unsharded run, then the all-gathers it compiles beyond those of
# block_size=1 (none).
host = {"w": jnp.asarray(r.normal(size=(16, 8)) / 4), "b": jnp.asarray(r.normal(size=8))}
loss = lambda p: jnp.sum(jnp.tanh(p["w"] @ p["b"]) ** 2)
p = {
  "w": jax.device_put(host["w"], NamedSharding(mesh, P("d"))),
  "b": jax.device_put(host["b"], NamedSharding(mesh, P())),
}
gathers = []
for block_size in (4, 1):
  tx = ah.adahessian(0.1, block_size=block_size, hessian_power=0.5)
  train = jax.jit(lambda p, s: step(p, s, False))
  s = jax.jit(tx.init, out_shardings=distributed.state_shardings(tx, p))(p)
  hlo = train.lower(p, s).compile().as_text()
  gathers.append(hlo.count("all-gather(") + hlo.count("all-gather-start("))
  if block_size == 4:
    q, t, ends = host, jax.jit(tx.init)(host), p
    for _ in range(3):
      ends, s = train(ends, s)
      q, t = train(q, t)
    print("blocks_in_shards", max_diff(ends, q, host))
print("blocks_in_shards_extra_gathers", gathers[0] - gathers[1])
