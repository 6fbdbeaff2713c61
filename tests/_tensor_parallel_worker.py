"""Tensor-parallel ``shard_map`` checks: section ``tensor_parallel`` of ``_distributed_worker.py``.

Alone: ``XLA_FLAGS=--xla_force_host_platform_device_count=4 python _tensor_parallel_worker.py OUT``

A tanh MLP on a ``(data=2, model=2)`` mesh, Megatron style: the first kernel split over
its outputs, the second over its inputs, the batch over ``data``. Writes ``OUT/results.json``:
for each route, the largest error of the averaged Hutchinson estimate against the exact Hessian
diagonal of the global loss, in units of the estimator's own standard deviation; and how often
a probe block repeats across devices and steps with independent probes (``repeated_blocks``).
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import adahessian_jax as ah  # noqa: E402
from adahessian_jax import distributed, spatial  # noqa: E402

N, D_IN, HIDDEN, D_OUT = 16, 4, 8, 2
N_SAMPLES = 4096
# The replicated output bias is b0, the first leaf: the fused route puts its NaN mark there.
SPECS = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None), "b0": P()}


def whole_model_rules(params, block_size):
  """The default rules read on the whole model: inside shard_map the transform sees the shards'
  shapes, off which the default would read the layouts (and warns)."""
  return spatial.resolve_rules(None, params, block_size)


def make_problem():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(N, D_IN))
  y = rng.normal(size=(N, D_OUT))
  params = {
    "w1": rng.normal(size=(D_IN, HIDDEN)),
    "b1": 0.3 * rng.normal(size=(HIDDEN,)),
    "w2": rng.normal(size=(HIDDEN, D_OUT)) / 2,
    "b0": 0.3 * rng.normal(size=(D_OUT,)),
  }
  return x, y, params


def global_loss(params, x, y):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return jnp.mean((h @ params["w2"] + params["b0"] - y) ** 2)


def local_loss(params, x, y):
  """This device's batch, its block of hidden units; the output summed over ``model``."""
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return jnp.mean((jax.lax.psum(h @ params["w2"], "model") + params["b0"] - y) ** 2)


def exact_diagonal_and_sigma(params, x, y):
  """The Hessian diagonal and the per-entry standard deviation of ``N_SAMPLES`` probes, as NumPy
  arrays (one compiled program: op by op, the Hessian compiled a program per operation)."""

  @jax.jit
  def exact(params):
    flat, unravel = ravel_pytree(params)
    hessian = jax.hessian(lambda f: global_loss(unravel(f), x, y))(flat)
    diag = jnp.diag(hessian)
    off = hessian**2 - jnp.diag(diag**2)
    return unravel(diag), unravel(jnp.sqrt(off.sum(axis=1) / N_SAMPLES))

  return jax.tree.map(np.asarray, exact(params))


def state_specs(mesh, tx, params):
  """The optimizer state's ``PartitionSpec``s: the moments split like the params."""
  abstract = {
    k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh, SPECS[k]))
    for k, v in params.items()
  }
  return jax.tree.map(lambda s: s.spec, distributed.state_shardings(tx, abstract))


def step_on_one_device(tx):
  """``tx``'s updates from a given diagonal, on one device (to be jitted: one program)."""
  return lambda grads, state, params, hdiag: tx.update(grads, state, params, hessian_diag=hdiag)[0]


def floored_bias_update(mesh, params, diag, grads):
  """``curvature_floor`` on a leaf without curvature (``b0``) floors it by the model-wide mean,
  which takes in every shard of the split kernels: the update is one device's."""
  hparams = {"learning_rate": 0.1, "block_size": 2, "seed": 5, "curvature_floor": 0.5}
  # The exact diagonal is the global batch's, the same on every data device: no axis_name.
  tx = ah.adahessian(**hparams, averaging=whole_model_rules(params, 2))
  state = jax.jit(tx.init)(params)
  flat = {**diag, "b0": np.zeros_like(diag["b0"])}

  def step(grads, state, params, hdiag):
    return tx.update(grads, state, params, hessian_diag=hdiag)[0]["b0"]

  specs = (SPECS, state_specs(mesh, tx, params), SPECS, SPECS)
  got = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=specs, out_specs=P()))(
    grads, state, params, flat
  )
  want = jax.jit(step_on_one_device(ah.adahessian(**hparams)))(grads, state, params, flat)["b0"]
  got, want = np.asarray(got), np.asarray(want)
  return {"floored_b0_vs_single": float(np.max(np.abs(got - want))), "floored_b0": float(got[0])}


def spike_clipped_updates(mesh, params, diag, grads):
  """``curvature_clip`` on step 12, whose estimate and gradient are 1e6 times the first 11's:
  the model's means take in every shard of the split kernels, so the scaled step is one
  device's; without the clip the updates differ (the clip bound)."""
  hparams = {"learning_rate": 0.1, "block_size": 2, "seed": 5, "curvature_clip": 3.0}
  tx = ah.adahessian(**hparams, averaging=whole_model_rules(params, 2))
  specs = (SPECS, state_specs(mesh, tx, params), SPECS, SPECS)

  def two_steps(tx):
    def steps(grads, state, params, hdiag):
      for _ in range(11):  # the clip starts at step 11
        _, state = tx.update(grads, state, params, hessian_diag=hdiag)
      spike = lambda t: jax.tree.map(lambda a: 1e6 * a, t)
      return tx.update(spike(grads), state, params, hessian_diag=spike(hdiag))[0]

    return steps

  state = jax.jit(tx.init)(params)
  mapped = jax.shard_map(two_steps(tx), mesh=mesh, in_specs=specs, out_specs=SPECS)
  got = jax.jit(mapped)(grads, state, params, diag)
  want = jax.jit(two_steps(ah.adahessian(**hparams)))(grads, state, params, diag)
  del hparams["curvature_clip"]
  unclipped = jax.jit(two_steps(ah.adahessian(**hparams)))(grads, state, params, diag)
  diff = lambda a, b: max(float(np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k])))) for k in a)
  return {"spike_clipped_vs_single": diff(got, want), "spike_clip_effect": diff(want, unclipped)}


def given_diagonal_updates(mesh, x, y, params, diag):
  """Updates from the exact diagonal given as ``hessian_diag``, against one device's.

  Also with a NaN in one entry of ``w1``, which only the first ``model`` shard holds: the step
  is skipped on every shard (and on one device), the replicated ``b0`` included.
  """
  tx = ah.adahessian(0.1, block_size=2, seed=5)  # the global batch's diagonal: no axis_name
  single = jax.jit(step_on_one_device(ah.adahessian(0.1, block_size=2, seed=5)))
  state = jax.jit(tx.init)(params)
  grads = jax.tree.map(np.asarray, jax.jit(jax.grad(global_loss))(params, x, y))
  out = floored_bias_update(mesh, params, diag, grads)
  out.update(spike_clipped_updates(mesh, params, diag, grads))
  specs = (SPECS, state_specs(mesh, tx, params), SPECS, SPECS)

  def step(grads, state, params, hdiag):
    return tx.update(grads, state, params, hessian_diag=hdiag)[0]

  mapped = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=specs, out_specs=SPECS))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    mapped.lower(grads, state, params, diag)
  out["default_rules_warning"] = [
    str(w.message) for w in caught if issubclass(w.category, spatial.LayoutGuessWarning)
  ]
  w1_nan = diag["w1"].copy()
  w1_nan[0, 0] = np.nan
  for name, bad in (("diag", diag), ("nan", {**diag, "w1": w1_nan})):
    got = jax.tree.map(np.asarray, mapped(grads, state, params, bad))
    want = jax.tree.map(np.asarray, single(grads, state, params, bad))
    out[f"{name}_vs_single"] = max(float(np.max(np.abs(got[k] - want[k]))) for k in params)
    out[f"{name}_max_update"] = max(float(np.max(np.abs(got[k]))) for k in params)
  return out


def repeated_probe_blocks(mesh, steps=3):
  """How many probe blocks repeat (up to sign) over ``steps`` steps of the fused route with
  independent probes (``per_device_probe_state``): a replicated ``(4, 4)`` leaf ``r`` first, a
  ``(4, 8)`` leaf ``u`` split over ``model`` (blocks of ``r``'s shape) second.

  The loss ``r[0, 0] · sum(all entries)`` has ``H = e₀1ᵀ + 1e₀ᵀ``, so off ``r[0, 0]`` a device's
  estimate ``z ⊙ Hz`` is its probe times ``z`` at ``r[0, 0]``. Device 0 folded in index 0, which
  made its key the state's next one: its block of ``u`` on model shard 0 was drawn again a step
  later as ``r``'s probe on data device 1 (one repeat per step after the first).
  """
  specs = {"r": P(), "u": P(None, "model")}
  rng = np.random.default_rng(1)
  values = {"r": rng.normal(size=(4, 4)), "u": rng.normal(size=(4, 8))}
  params = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in values.items()}

  def loss(p):
    return p["r"][0, 0] * (jnp.sum(p["r"]) + jax.lax.psum(jnp.sum(p["u"]), "model"))

  tx = ah.adahessian(
    0.0, b2=0.0, seed=4, axis_name="data", independent_probes=True, averaging=spatial.none()
  )
  abstract = {
    k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in params.items()
  }
  shardings = distributed.state_shardings(tx, abstract)
  state_spec = jax.tree.map(lambda s: s.spec, shardings)

  def step(params, state):
    local = distributed.device_varying((params, state), "data")
    probes = distributed.per_device_probe_state(local[1], "data")
    _, grads, hdiag = ah.value_grad_and_hessian_diag(loss)(local[0], probes)
    state = tx.update(jax.lax.pmean(grads, "data"), state, params, hessian_diag=hdiag)[1]
    return jax.tree.map(lambda e: e[None], hdiag), state

  out_specs = ({k: P("data", *v) for k, v in specs.items()}, state_spec)
  mapped = jax.jit(
    jax.shard_map(step, mesh=mesh, in_specs=(specs, state_spec), out_specs=out_specs)
  )
  state, blocks = jax.jit(tx.init, out_shardings=shardings)(params), []
  for _ in range(steps):
    estimate, state = mapped(params, state)
    estimate = jax.tree.map(np.asarray, estimate)
    for d in range(2):
      u = np.asarray(estimate["u"][d])
      blocks += [np.asarray(estimate["r"][d]), u[:, :4], u[:, 4:]]
  signs = [b.ravel()[1:] for b in blocks]  # probe · z at r[0, 0], off r[0, 0]
  return sum(
    np.array_equal(a, b) or np.array_equal(a, -b)
    for i, a in enumerate(signs)
    for b in signs[i + 1 :]
  )


def main(out_dir):
  mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  x, y, params = make_problem()
  diag, sigma = exact_diagonal_and_sigma(params, x, y)
  # b2=0 and block_size=1: after one step nu is the squared (averaged) estimate.
  tx = ah.adahessian(
    0.1,
    b2=0.0,
    block_size=1,
    n_samples=N_SAMPLES,
    seed=5,
    axis_name="data",
    averaging=whole_model_rules(params, 1),
  )
  state = jax.jit(tx.init)(params)

  def fused(params, state, x, y):
    local = distributed.device_varying((params, state), "data")
    hdiag = ah.value_grad_and_hessian_diag(local_loss)(*local, x, y)[2]
    return jax.lax.pmean(hdiag, "data")

  def value_fn(params, state, x, y):
    loss = lambda p: local_loss(p, x, y)
    grads = jax.lax.pmean(jax.grad(loss)(distributed.device_varying(params, "data")), "data")
    return tx.update(grads, state, params, value_fn=loss)[1]

  def run(step, out_specs):
    in_specs = (SPECS, state_specs(mesh, tx, params), P("data"), P("data"))
    mapped = jax.shard_map(step, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
    return jax.jit(mapped)(params, state, x, y)

  def fused_update(params, state, x, y):
    local = distributed.device_varying((params, state), "data")
    _, grads, hdiag = ah.value_grad_and_hessian_diag(local_loss)(*local, x, y)
    return tx.update(jax.lax.pmean(grads, "data"), state, params, hessian_diag=hdiag)[0]

  def value_fn_update(params, state, x, y):
    loss = lambda p: local_loss(p, x, y)
    grads = jax.lax.pmean(jax.grad(loss)(distributed.device_varying(params, "data")), "data")
    return tx.update(grads, state, params, value_fn=loss)[0]

  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    fused_u, value_fn_u = (
      jax.tree.map(np.asarray, run(f, SPECS)) for f in (fused_update, value_fn_update)
    )
    estimate = run(fused, SPECS)
    nu = ah.find_adahessian_state(run(value_fn, state_specs(mesh, tx, params))).nu
  guesses = [w for w in caught if issubclass(w.category, spatial.LayoutGuessWarning)]
  # |estimate| against |diagonal| differs by at most |estimate - diagonal|.
  z = lambda e, f: max(float(np.max(np.abs(f(e[k]) - f(diag[k])) / sigma[k])) for k in params)
  results = {
    "fused_z": z(estimate, np.asarray),
    "value_fn_z": z(jax.tree.map(np.sqrt, nu), np.abs),
    "whole_model_rules_warnings": len(guesses),
  }
  results["fused_vs_value_fn_update"] = max(
    float(np.max(np.abs(fused_u[k] - value_fn_u[k]))) for k in params
  )
  results["fused_max_update"] = max(float(np.max(np.abs(fused_u[k]))) for k in params)
  results.update(given_diagonal_updates(mesh, x, y, params, diag))
  results["repeated_blocks"] = int(repeated_probe_blocks(mesh))
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(results, f)
  print(results)


if __name__ == "__main__":
  main(sys.argv[1])
