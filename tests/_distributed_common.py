"""Problem and training loops shared by the distributed test workers.

Imported by ``_distributed_worker.py`` (one process, forced host devices),
``_multihost_worker.py`` and ``_multihost_checkpoint_worker.py`` (one of several
``jax.distributed`` processes); all are run as scripts by ``test_distributed.py``,
never imported by pytest. Every loop trains the same tiny tanh MLP on the same
global batch, so any two of them can be compared parameter by parameter.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import adahessian_jax as ah
from adahessian_jax import distributed

N_GLOBAL, D_IN, HIDDEN, D_OUT = 32, 8, 16, 4
STEPS = 50
AXIS = "data"
# (dtype name, update_freq): update_freq=2 runs the lax.cond refresh path.
CONFIGS = (("float32", 1), ("float64", 1), ("float32", 2))


def config_name(dtype, update_freq):
  return f"{dtype}_k{update_freq}"


def make_problem(dtype):
  """Global batch ``(x, y)`` and initial params, as NumPy arrays of ``dtype``."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(N_GLOBAL, D_IN))
  y = np.tanh(x @ rng.normal(size=(D_IN, D_OUT))) + 0.1 * rng.normal(size=(N_GLOBAL, D_OUT))
  params = {
    "w1": rng.normal(size=(D_IN, HIDDEN)) / np.sqrt(D_IN),
    "b1": 0.1 * rng.normal(size=(HIDDEN,)),
    "w2": rng.normal(size=(HIDDEN, D_OUT)) / np.sqrt(HIDDEN),
    "b2": 0.1 * rng.normal(size=(D_OUT,)),
  }
  cast = lambda a: np.asarray(a, dtype)
  return cast(x), cast(y), jax.tree.map(cast, params)


def loss_fn(params, x, y):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return jnp.mean((h @ params["w2"] + params["b2"] - y) ** 2)


# hessian_power=0.5 and block averaging keep the first step well conditioned, so that
# float32 rounding (a different summation order across devices) is not amplified past
# 1e-6; see DEFAULT_HPARAMS for the optimizer's defaults, checked against a noise floor.
TEST_HPARAMS = {"learning_rate": 0.05, "hessian_power": 0.5, "block_size": 4}
DEFAULT_HPARAMS = {"learning_rate": 0.05}


def make_tx(update_freq, axis_name=None, independent_probes=False, hparams=None):
  return ah.adahessian(
    **(TEST_HPARAMS if hparams is None else hparams),
    weight_decay=1e-3,
    update_freq=update_freq,
    seed=3,
    axis_name=axis_name,
    independent_probes=independent_probes,
  )


def local_step(tx, axis_name=None, fused=False, per_device_probes=False):
  """One training step on the local batch; gradients ``pmean``-ed if ``axis_name``."""

  def step(params, state, x, y):
    loss = lambda p: loss_fn(p, x, y)
    # This device's own gradient (under shard_map, not the automatic sum over the axis).
    local = distributed.device_varying(params, axis_name) if axis_name is not None else params
    if fused:
      probe_state = state
      if axis_name is not None:
        # Under shard_map the probes must vary like the local params (a no-op under pmap).
        probe_state = distributed.device_varying(state, axis_name)
      if per_device_probes:
        probe_state = distributed.per_device_probe_state(state, axis_name)
      _, grads, hdiag = ah.value_grad_and_hessian_diag(loss_fn)(local, probe_state, x, y)
      extra = {"hessian_diag": hdiag}
    else:
      grads = jax.grad(loss)(local)
      extra = {"value_fn": loss}
    if axis_name is not None:
      grads = jax.lax.pmean(grads, axis_name)
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state

  return step


def train_state_step(tx, axis_name, independent=False):
  """One step by ``linen.TrainState.apply_loss`` with ``axis_name`` (the fused route, with the
  gradients averaged and the probes chosen by the method)."""
  from adahessian_jax.linen import TrainState

  def step(params, state, x, y):
    ts = TrainState(step=0, apply_fn=None, params=params, tx=tx, opt_state=state)
    ts, _ = ts.apply_loss(loss_fn, x, y, axis_name=axis_name, independent_probes=independent)
    return ts.params, ts.opt_state

  return step


def mapped_step(tx, independent, fused, train_state):
  """The per-device step of ``pmap`` and ``shard_map`` over ``AXIS``: by ``TrainState.apply_loss``
  if ``train_state``, else :func:`local_step` (per-device probes with ``independent`` and
  ``fused``, the optimizer's otherwise)."""
  if train_state:
    return train_state_step(tx, AXIS, independent)
  return local_step(tx, AXIS, fused=fused, per_device_probes=independent and fused)


def run_steps(step, params, state, x, y, steps=STEPS):
  """``steps`` training steps, waiting for each before dispatching the next.

  Waiting matters on small CPU hosts: with several forced host devices and
  async dispatch, XLA:CPU's in-process collectives can deadlock when queued
  executions starve the thread pool (seen on a loaded 2-core machine).
  """
  for _ in range(steps):
    params, state = jax.block_until_ready(step(params, state, x, y))
  return params, state


def run_pmap_steps(step, state, x, y):
  """``STEPS`` calls ``state = step(state, x, y)``; returns the last state and the number of
  compiles after the first call (0: the inputs were placed as ``pmap`` places its outputs)."""
  from conftest import CompileCounter

  state = jax.block_until_ready(step(state, x, y))
  with CompileCounter() as compiles:
    for _ in range(STEPS - 1):
      state = jax.block_until_ready(step(state, x, y))
  return state, compiles.count


def train_single_device(dtype, update_freq, hparams=None, permute=False):
  """The reference: one device, the whole global batch (rows reversed if ``permute``)."""
  x, y, params = make_problem(dtype)
  if permute:  # the same loss, summed in another order: float rounding only
    x, y = x[::-1], y[::-1]
  x, y, params = jax.device_put((x, y, params), jax.local_devices()[0])
  key = (update_freq, None if hparams is None else tuple(sorted(hparams.items())))
  if key not in _SINGLE_DEVICE_STEPS:  # the permuted batch's run reuses the compiled program
    tx = make_tx(update_freq, hparams=hparams)
    _SINGLE_DEVICE_STEPS[key] = tx, jax.jit(local_step(tx))
  tx, step = _SINGLE_DEVICE_STEPS[key]
  state = tx.init(params)
  params, state = run_steps(step, params, state, x, y)
  return params


#: ``(tx, jitted step)`` of :func:`train_single_device` by ``(update_freq, hparams)``.
_SINGLE_DEVICE_STEPS = {}


def train_pmap(
  dtype, update_freq, hessian_pmean=True, independent=False, fused=False, train_state=False
):
  """``jax.pmap`` over all devices (every process's), the params and state copied by
  ``distributed.replicate``; returns params and state with a leading device axis (this process's
  devices) and the number of compiles after the first step.

  ``hessian_pmean=False`` is the negative control: gradients averaged, the
  Hessian estimate not (no ``axis_name`` for the optimizer). ``train_state``
  steps by ``TrainState.apply_loss``.
  """
  n = jax.local_device_count()
  x, y, params = make_problem(dtype)
  # This process's part of the global batch (all of it in one process), a slice per device.
  x, y = (np.split(a, jax.process_count())[jax.process_index()] for a in (x, y))
  xs = x.reshape(n, -1, x.shape[-1])
  ys = y.reshape(n, -1, y.shape[-1])
  tx = make_tx(
    update_freq,
    axis_name=AXIS if hessian_pmean else None,
    independent_probes=independent and not fused,
  )
  params, state = distributed.replicate((params, tx.init(params)), AXIS)
  local = mapped_step(tx, independent, fused, train_state)
  step = jax.pmap(lambda ps, x, y: local(*ps, x, y), axis_name=AXIS)
  (params, state), compiles = run_pmap_steps(step, (params, state), xs, ys)
  return params, state, compiles


def join(process_id, num_processes, port):
  """Joins ``jax.distributed`` as process ``process_id`` of ``num_processes``, coordinated on
  ``127.0.0.1:port`` (gloo CPU collectives are set by the worker before any computation)."""
  jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}",
    num_processes=num_processes,
    process_id=process_id,
    initialization_timeout=60,
  )


def mesh_1d(devices=None):
  devices = np.asarray(devices if devices is not None else jax.devices())
  return jax.sharding.Mesh(devices, (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def put_global(mesh, array, spec):
  """A global ``jax.Array`` from the full NumPy array every process holds."""
  sharding = NamedSharding(mesh, spec)
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def put_tree(tree, shardings):
  """``put_global`` for a pytree; ``shardings`` a pytree (prefix) of ``NamedSharding``s."""
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, tree)
  return jax.tree.map(lambda v, sh: put_global(sh.mesh, np.asarray(v), sh.spec), tree, shardings)


# Params sharded FSDP style: kernels over their output axis, biases over theirs where divisible.
FSDP_SPECS = {"w1": P(None, AXIS), "b1": P(AXIS), "w2": P(AXIS, None), "b2": P()}


def train_jit(mesh, dtype, update_freq, fsdp=False, hparams=None):
  """``jax.jit`` over global arrays: batch sharded; params replicated or FSDP-sharded.

  Returns ``(params, state, info)``; ``info`` records whether the state's
  moments kept the parameters' shardings through training.
  """
  x, y, params = make_problem(dtype)
  x = put_global(mesh, x, P(AXIS))
  y = put_global(mesh, y, P(AXIS))
  specs = FSDP_SPECS if fsdp else jax.tree.map(lambda _: P(), params)
  params_np = params
  params = {k: put_global(mesh, v, specs[k]) for k, v in params.items()}
  tx = make_tx(update_freq, hparams=hparams)
  state_sh = distributed.state_shardings(tx, params)
  if fsdp:  # created sharded: the full state never exists on one device
    state = jax.jit(tx.init, out_shardings=state_sh)(params)
  else:
    state = put_tree(tx.init(params_np), state_sh)
  param_sh = jax.tree.map(lambda a: a.sharding, params)
  # No out_shardings for the step: the shardings below are what XLA propagated.
  step = jax.jit(local_step(tx), donate_argnums=(0, 1))
  params, state = run_steps(step, params, state, x, y)
  adah = ah.find_adahessian_state(state)
  same = lambda tree: all(
    jax.tree.leaves(
      jax.tree.map(lambda a, s: a.sharding.is_equivalent_to(s, a.ndim), tree, param_sh)
    )
  )
  info = {
    "params_keep_sharding": same(params),
    "mu_like_params": same(adah.mu),
    "nu_like_params": same(adah.nu),
    "hessian_like_params": adah.hessian is None or same(adah.hessian),
    "key_replicated": bool(adah.key.sharding.is_fully_replicated),
    "mu_w1_shard_shape": list(adah.mu["w1"].addressable_shards[0].data.shape),
  }
  return params, state, info


def train_shard_map(mesh, dtype, update_freq, independent=False, fused=False, train_state=False):
  """``jax.shard_map`` with ``axis_name``: params and state replicated, batch sharded;
  ``train_state`` steps by ``TrainState.apply_loss``."""
  x, y, params = make_problem(dtype)
  x = put_global(mesh, x, P(AXIS))
  y = put_global(mesh, y, P(AXIS))
  params_np = params
  params = jax.tree.map(lambda v: put_global(mesh, v, P()), params)
  tx = make_tx(update_freq, axis_name=AXIS, independent_probes=independent and not fused)
  state = put_tree(tx.init(params_np), NamedSharding(mesh, P()))
  local = mapped_step(tx, independent, fused, train_state)
  step = jax.jit(
    jax.shard_map(
      local,
      mesh=mesh,
      in_specs=(P(), P(), P(AXIS), P(AXIS)),
      out_specs=(P(), P()),
    )
  )
  params, state = run_steps(step, params, state, x, y)
  return params, state


def max_abs_diff(a, b):
  return float(
    max(
      np.max(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64)))
      for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )
  )


def gather(v):
  """A full NumPy copy of a (possibly sharded, possibly multi-process) array."""
  from jax.experimental import multihost_utils

  if isinstance(v, jax.Array) and not v.is_fully_addressable:
    if v.sharding.is_fully_replicated:
      # This process's copy, as the all-gather returns it, without compiling a gather per leaf.
      return np.asarray(v.addressable_data(0))
    v = multihost_utils.process_allgather(v, tiled=True)
  return np.asarray(v)


def to_numpy(params):
  """Full NumPy copies of (possibly sharded, possibly multi-process) params."""
  return {k: gather(v) for k, v in params.items()}


# Flax NNX: adahessian_jax.nnx.value_grad_and_hessian_diag with axis_name, a few steps each.
NNX_STEPS = 4


def nnx_model(dtype, weight_norm=False):
  """An NNX tanh MLP holding :func:`make_problem`'s params (``nnx.WeightNorm`` around its first
  layer if ``weight_norm``: the loss writes that layer's kernel)."""
  from flax import nnx

  _, _, params = make_problem(dtype)

  def linear(d_in, d_out, w, b, rngs):
    layer = nnx.Linear(d_in, d_out, param_dtype=dtype, rngs=rngs)
    layer.kernel[...], layer.bias[...] = params[w], params[b]
    return layer

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.l1 = linear(D_IN, HIDDEN, "w1", "b1", rngs)
      self.l2 = linear(HIDDEN, D_OUT, "w2", "b2", rngs)
      if weight_norm:
        self.l1 = nnx.WeightNorm(self.l1, param_dtype=dtype, rngs=rngs)

    def __call__(self, x):
      return self.l2(jnp.tanh(self.l1(x)))

  return MLP(nnx.Rngs(0))


def nnx_loss(model, x, y):
  return jnp.mean((model(x) - y) ** 2)


def nnx_step(axis_name=None, independent=False, value_fn=False):
  """One NNX step: the fused route (``axis_name`` and ``independent_probes`` passed on), or with
  ``value_fn`` the closure route (gradients ``pmean``-ed by hand; under ``pmap`` only)."""
  from flax import nnx

  import adahessian_jax.nnx as ah_nnx

  def step(model, optimizer, x, y):
    if value_fn:
      value = ah_nnx.value_fn(model, nnx_loss, x, y)
      loss, grads = nnx.value_and_grad(nnx_loss)(model, x, y)
      if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
      optimizer.update(model, grads, value_fn=value)
      return loss
    loss, grads, hdiag = ah_nnx.value_grad_and_hessian_diag(
      nnx_loss, model, optimizer, x, y, axis_name=axis_name, independent_probes=independent
    )
    # As the docstring shows: tx raises unless it averages the estimate over the same axis.
    optimizer.update(model, grads, hessian_diag=hdiag, expected_axis_name=axis_name)
    return loss

  return step


def nnx_params(model):
  """The model's ``nnx.Param`` values as NumPy arrays, by path."""
  from flax import nnx

  state = nnx.as_pure(nnx.state(model, nnx.Param))
  return {"/".join(map(str, path)): gather(v) for path, v in nnx.to_flat_state(state)}


def train_nnx_single_device(dtype, weight_norm=False):
  """The NNX reference: one device, the whole global batch, ``nnx.jit``."""
  from flax import nnx

  x, y, _ = make_problem(dtype)
  model = nnx_model(dtype, weight_norm)
  optimizer = nnx.Optimizer(model, make_tx(1), wrt=nnx.Param)
  step = nnx.jit(nnx_step())
  for _ in range(NNX_STEPS):
    jax.block_until_ready(step(model, optimizer, x, y))
  return nnx_params(model)


def train_nnx_pmap(dtype, independent=False, value_fn=False):
  """``jax.pmap`` of a step that ``nnx.merge``-s the replicated model and optimizer; returns the
  first replica's params, the largest difference between the replicas' states and the number of
  compiles after the first step."""
  from conftest import CompileCounter
  from flax import nnx

  n = jax.local_device_count()
  x, y, _ = make_problem(dtype)
  xs, ys = x.reshape(n, -1, x.shape[-1]), y.reshape(n, -1, y.shape[-1])
  model = nnx_model(dtype)
  optimizer = nnx.Optimizer(model, make_tx(1, AXIS, independent), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  # The step returns the pure state, so replicate the pure state (the same pytree in and out).
  state = distributed.replicate(nnx.as_pure(state), AXIS)
  local = nnx_step(AXIS, independent, value_fn)

  def mapped(state, x, y):
    model, optimizer = nnx.merge(graphdef, state)
    local(model, optimizer, x, y)
    return nnx.as_pure(nnx.state((model, optimizer)))

  step = jax.pmap(mapped, axis_name=AXIS)
  state = jax.block_until_ready(step(state, xs, ys))
  with CompileCounter() as compiles:
    for _ in range(NNX_STEPS - 1):
      state = jax.block_until_ready(step(state, xs, ys))
  first, _ = nnx.merge(graphdef, jax.tree.map(lambda a: np.asarray(a)[0], state))
  return nnx_params(first), distributed.max_replica_difference(state, stacked=True), compiles.count


def train_nnx_shard_map(dtype, independent=False, weight_norm=False):
  """``nnx.shard_map`` (under ``nnx.jit``) of the fused step, the model and optimizer replicated
  and the batch split; returns the params and the largest difference between device copies."""
  from flax import nnx

  mesh = mesh_1d()
  x, y, _ = make_problem(dtype)
  model = nnx_model(dtype, weight_norm)
  optimizer = nnx.Optimizer(model, make_tx(1, AXIS, independent), wrt=nnx.Param)
  step = nnx.jit(
    nnx.shard_map(
      nnx_step(AXIS, independent),
      mesh=mesh,
      in_specs=(P(), P(), P(AXIS), P(AXIS)),
      out_specs=P(),
    )
  )
  for _ in range(NNX_STEPS):
    jax.block_until_ready(step(model, optimizer, x, y))
  state = nnx.as_pure(nnx.state((model, optimizer)))
  return nnx_params(model), distributed.max_replica_difference(state)
