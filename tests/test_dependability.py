"""Hostile inputs, non-finite estimates and the stabilizers, each on a problem where it matters."""

import collections
import functools
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_trees_allclose

import adahessian_jax as ah


def small_params():
  return {"w": jnp.asarray([0.5, -1.0, 2.0]), "b": jnp.asarray(0.1)}


def small_loss(p):
  return jnp.sum(p["w"] ** 2) + p["b"] ** 2


def run(tx, loss, params, steps, route="value_fn"):
  """Trains ``steps`` jitted steps; returns the losses after each step and the final state."""
  state = tx.init(params)
  vgh = ah.value_grad_and_hessian_diag(loss)

  @jax.jit
  def step(p, s):
    if route == "value_fn":
      g = jax.grad(loss)(p)
      u, s = tx.update(g, s, p, value_fn=loss)
    else:
      _, g, h = vgh(p, s)
      u, s = tx.update(g, s, p, hessian_diag=h)
    return optax.apply_updates(p, u), s

  losses = []
  for _ in range(steps):
    params, state = step(params, state)
    losses.append(float(loss(params)))
  return np.asarray(losses), state


def run_seeds(make_tx, seeds, loss, params, steps):
  """:func:`run` of ``make_tx(seed)`` for each of ``seeds`` (value_fn route), side by side under
  ``jax.vmap``: one jitted step for all. Returns the losses, shape ``(len(seeds), steps)``.

  The step is ``make_tx(seeds[0])``'s: the seed only sets the probes' key, in ``init``'s state.
  """
  tx = make_tx(seeds[0])
  stack = lambda trees: jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)
  state = stack([make_tx(seed).init(params) for seed in seeds])
  params = stack([params] * len(seeds))

  @jax.jit
  @jax.vmap
  def step(p, s):
    u, s = tx.update(jax.grad(loss)(p), s, p, value_fn=loss)
    p = optax.apply_updates(p, u)
    return p, s, loss(p)

  losses = []
  for _ in range(steps):
    params, state, value = step(params, state)
    losses.append(np.asarray(value))
  return np.stack(losses, axis=1)


# ---------------------------------------------------------------- input checks


@pytest.mark.parametrize("jit", [False, True])
def test_hessian_diag_leaf_that_only_broadcasts_is_rejected_with_its_path(jit):
  params = small_params()
  tx = ah.adahessian(0.1)
  state = tx.init(params)
  grads = jax.grad(small_loss)(params)
  bad = {"w": jnp.ones((3, 1)), "b": jnp.asarray(1.0)}
  update = jax.jit(tx.update) if jit else tx.update
  with pytest.raises(ValueError, match=r"hessian_diag at \['w'\].*shape \(3,\).*\(3, 1\)"):
    update(grads, state, params, hessian_diag=bad)


def test_hessian_diag_integer_leaf_is_rejected():
  params = small_params()
  tx = ah.adahessian(0.1)
  grads = jax.grad(small_loss)(params)
  bad = {"w": jnp.ones((3,), jnp.int32), "b": jnp.asarray(1.0)}
  with pytest.raises(ValueError, match=r"hessian_diag at \['w'\].*dtype int32"):
    tx.update(grads, tx.init(params), params, hessian_diag=bad)


def test_an_8_bit_hessian_diag_leaf_is_named():
  # Failed in JAX's type promotion, naming no argument (also under jit).
  params = small_params()
  tx = ah.adahessian(0.1)
  grads = jax.grad(small_loss)(params)
  bad = {"w": jnp.ones(3, jnp.float8_e4m3fn), "b": jnp.asarray(1.0)}
  got = r"got shape \(3,\) and dtype float8_e4m3fn: 8-bit floats"
  with pytest.raises(ValueError, match=r"hessian_diag at \['w'\] must be .*16 bits .*; " + got):
    tx.update(grads, tx.init(params), params, hessian_diag=bad)


@pytest.mark.parametrize("leaf", ["float32", "1.0", object()])
def test_a_leaf_that_is_no_array_is_named_by_its_path(leaf):
  # A str was read as the dtype it names: "float32" passed the checks and failed later ("could
  # not convert string to float"), "1.0" with "data type '.0' not understood", naming neither the
  # argument nor the leaf.
  params = small_params()
  tx = ah.adahessian(0.1)
  state = tx.init(params)
  grads = jax.grad(small_loss)(params)
  bad = {**params, "b": leaf}
  kind = type(leaf).__name__
  with pytest.raises(ValueError, match=rf"hessian_diag at \['b'\] must .* \(\) .*; got {kind}"):
    jax.jit(lambda: tx.update(grads, state, params, hessian_diag=bad))()
  with pytest.raises(TypeError, match=rf"updates leaf at \['b'\] is {kind} .*, not an array; grad"):
    tx.update(bad, state, params, value_fn=small_loss)
  with pytest.raises(TypeError, match=rf"params leaf at \['b'\] is {kind} .*, not an array; the"):
    tx.update(grads, state, bad, value_fn=small_loss)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize(
  "case,error,match",
  [
    ("state of other params", ValueError, r"params leaf at \['w'\] has shape \(3,\).*\(4,\)"),
    (
      "per-example grads",
      ValueError,
      r"updates leaf at \['w'\] has shape \(2, 3\).*average .*, and take them of the "
      r"parameters the state was made for, not another model's",
    ),
    ("grads missing a leaf", ValueError, r"the updates tree .* no leaf at \['b'\]"),
    ("params with another leaf", ValueError, r"the params tree .* a leaf at \['c'\]"),
    ("complex grads", TypeError, r"updates leaf at \['w'\] has dtype complex"),
    ("integer params", TypeError, r"params leaf at \['w'\] has dtype int32"),
  ],
)
def test_updates_and_params_that_do_not_fit_the_state_are_rejected_by_leaf(jit, case, error, match):
  # Each would otherwise broadcast into the moments and the update, changing parameter shapes
  # (integer params: fail in jax.jvp, or pass silently by the hessian_diag route); a tree
  # mismatch is named by a leaf path, not by two whole tree structures.
  params = small_params()
  tx = ah.adahessian(0.1)
  state = tx.init(params)
  grads = jax.grad(small_loss)(params)
  if case == "state of other params":
    state = tx.init({"w": jnp.ones(4), "b": jnp.asarray(0.1)})
  elif case == "per-example grads":
    grads = {"w": jnp.stack([grads["w"]] * 2), "b": grads["b"]}
  elif case == "grads missing a leaf":
    grads = {"w": grads["w"]}
  elif case == "params with another leaf":
    params = {**params, "c": jnp.ones(2)}
  elif case == "integer params":
    params = {**params, "w": params["w"].astype(jnp.int32)}
  else:
    grads = {"w": grads["w"].astype(jnp.complex64), "b": grads["b"]}
  update = jax.jit(tx.update) if jit else tx.update
  with pytest.raises(error, match=match):
    update(grads, state, params, hessian_diag=jax.tree.map(jnp.ones_like, params))


def test_updates_none_is_named():
  params = small_params()
  tx = ah.adahessian(0.1)
  with pytest.raises(ValueError, match=r"got updates=None: pass the gradients first"):
    tx.update(None, tx.init(params), params, value_fn=small_loss)


def test_masked_hessian_diag_of_the_owned_leaves_only_is_rejected():
  params = small_params()
  tx = optax.masked(ah.adahessian(0.1), {"w": True, "b": False})
  grads = jax.grad(small_loss)(params)
  with pytest.raises(ValueError, match="must have the tree of the whole model's params"):
    tx.update(grads, tx.init(params), params, hessian_diag={"w": jnp.ones(3)})


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(eps=0.0), r"eps must be a finite real number > 0.0, got 0.0\."),
    (dict(eps=float("inf")), "eps must be a finite real number > 0.0, got inf"),
    (dict(learning_rate=float("nan")), "learning_rate must be a finite real number >= 0.0"),
    (dict(learning_rate=-0.1), "learning_rate must be a finite real number >= 0.0, got -0.1"),
    (dict(learning_rate=float("inf")), "learning_rate must be a finite real number"),
    (dict(weight_decay=float("inf")), "weight_decay must be a finite real number"),
    (dict(curvature_floor=float("inf")), "curvature_floor must be a finite real number"),
    (dict(learning_rate="0.1"), "learning_rate must be a finite real number >= 0.0, got '0.1'"),
    (dict(b1=True), r"b1 must be a finite real number in \[0.0, 1.0\), got True"),
    (dict(b2=0.9 + 0.1j), r"b2 must be a finite real number in \[0.0, 1.0\), got \(0.9\+0.1j\)"),
    (
      dict(eps=jnp.ones(2)),
      r"got Array\(\[1., 1.\], dtype=float\d+\) \(an array of shape \(2,\)\)",
    ),
    (dict(update_clip=float("nan")), r"update_clip must be a real number > 0.0 \(inf allowed\)"),
    (dict(n_samples=2.0), r"n_samples must be an integer >= 1, got 2.0"),
    (dict(block_size=jnp.ones((), jnp.int32) * 0), r"block_size must be an integer >= 1"),
    (dict(update_freq=2**31), r"update_freq must be an integer in \[1, 2147483647\]"),
    (dict(nu_dtype=jnp.asarray(0.0)), "static_args=adahessian_jax.STATIC_ARGS"),
    (dict(mu_dtype=jnp.int32), "mu_dtype must be a real floating"),
    (dict(nu_dtype=jnp.complex64), "nu_dtype must be a real floating"),
    (dict(nu_dtype=jnp.float16), "nu_dtype=float16: float16 cannot hold D²"),
    # Built, then the first update failed in JAX's type promotion, naming no argument.
    (dict(mu_dtype=jnp.float8_e4m3fn), r"mu_dtype must be .* 16 bits or more, got float8_e4m3fn"),
    (dict(nu_dtype="float8_e5m2"), r"nu_dtype must be .* 16 bits or more, got float8_e5m2: 8-bit"),
    (dict(seed=2**32), r"seed must be an integer in \[-2147483648, 4294967295\], got 4294967296"),
    (dict(seed=1.0), "seed must be an integer"),
    (dict(seed=jax.random.key(0)), r"(?s)seed must be an integer.*PRNG key: pass an int seed"),
    (dict(seed=jax.random.PRNGKey(0)), r"seed must be an integer.*like a PRNG key"),
    (dict(curvature_floor=-0.1), "curvature_floor"),
    (dict(update_clip=0.0), "update_clip"),
    (dict(mu_dtype="float33"), r"mu_dtype must be a floating-point dtype, got 'float33' \("),
    # JAX reads a number as its dtype: these gave float32 moments.
    (dict(mu_dtype=0.5), r"mu_dtype must be a floating-point dtype .*, got the value 0.5\."),
    (dict(nu_dtype=np.float32(0.5)), r"nu_dtype must be .*, got the value np.float32\(0.5\)\."),
    (dict(mu_dtype=np.ones(())), r"mu_dtype must be .*, got the value array\(1\.\)\."),
    (dict(lazy_moment="refreshed"), r"lazy_moment must be 'repeat' or 'refresh', got 'refreshed'"),
    (dict(independent_probes=True), r"independent_probes=True needs axis_name"),
    # A str from a config was truthy: "False" drew each device its own probes.
    (dict(independent_probes="False", axis_name="b"), r"must be True or False, got 'False'\."),
    # block_size is the default rule's: beside one rule for every leaf it would be dropped.
    (
      dict(block_size=4, averaging=ah.spatial.none()),
      r"block_size=4 would not be used: averaging=none\(\) is one rule for every leaf.*"
      r"spatial.flax_default\(4, axis_roles=...\)",
    ),
    (
      dict(block_size=32, averaging=ah.spatial.strict(ah.spatial.flax_default(axis_roles={}))),
      r"block_size=32 would not be used: averaging=flax_default\(1\)",
    ),
  ],
)
def test_bad_hyperparameters_are_rejected(kwargs, match):
  kwargs = {"learning_rate": 0.1, **kwargs}
  with pytest.raises(ValueError, match=match):
    ah.adahessian(**kwargs)


def test_a_learning_rate_schedule_is_checked_where_it_is_given_and_where_it_is_called():
  """optax multiplies the updates by a schedule's rate as it is: an inverse square root of the
  count, infinite at step 0, made every parameter -inf on the first step, and a rate of shape (2,)
  broadcast the scalar parameter ['b'] to shape (2,), both silently; a schedule of no argument
  failed inside optax's update with Python's error, which names no argument."""
  with pytest.raises(ValueError, match=r"schedule at step 0 must be .* got Array\(inf.*rsqrt"):
    ah.adahessian(lambda count: 0.1 * jax.lax.rsqrt(count.astype(jnp.float32)))
  with pytest.raises(ValueError, match=r"schedule at step 0 .* \(an array of shape \(2,\)\)"):
    ah.adahessian(lambda count: jnp.full(2, 0.1))
  with pytest.raises(ValueError, match=r"schedule at step 0 .* got -0.1\. A schedule takes"):
    ah.adahessian(lambda count: -0.1)
  with pytest.raises(TypeError, match=r"learning_rate is called as learning_rate\(count\), but"):
    ah.adahessian(lambda: 0.1)
  # Under jit the rate's value is unknown, its shape is not; eager updates check the value.
  params, grads = small_params(), jax.grad(small_loss)(small_params())
  vector = lambda count: jnp.full(2, 0.1) if isinstance(count, jax.core.Tracer) else 0.1
  tx = ah.adahessian(vector)
  step = jax.jit(lambda s: tx.update(grads, s, params, value_fn=small_loss))
  with pytest.raises(ValueError, match=r"must return a real scalar, got an array of shape \(2,\)"):
    step(tx.init(params))
  tx = ah.adahessian(lambda count: jnp.where(count < 1, 0.1, jnp.nan))
  state = tx.update(grads, tx.init(params), params, value_fn=small_loss)[1]
  with pytest.raises(ValueError, match=r"schedule at step 1 must be a finite real number"):
    tx.update(grads, state, params, value_fn=small_loss)
  # optax's schedules pass, and follow their values.
  schedule = optax.warmup_cosine_decay_schedule(0.0, 0.1, 2, 10)
  _, state = run(ah.adahessian(schedule), small_loss, params, 3)
  assert int(state[2].count) == 3


def test_the_fused_route_names_a_loss_it_cannot_call():
  """A loss's value for the loss (value_grad_and_hessian_diag(loss_fn(params))) was taken and
  failed at the first call with "'Array' object is not callable"; a call without the loss's batch
  failed inside the trace with Python's "missing 1 required positional argument", naming neither
  the fused route nor where the batch goes."""
  params = small_params()
  loss = lambda p, scale: scale * small_loss(p)
  with pytest.raises(TypeError, match=r"takes the loss function, .*; got Array\(5\.26"):
    ah.value_grad_and_hessian_diag(small_loss(params))
  vgh = ah.value_grad_and_hessian_diag(loss)
  state = ah.adahessian(0.1).init(params)
  with pytest.raises(
    TypeError,
    match=r"signature is \(p, scale\): missing a required argument: "
    r"'scale'\. .* pass the loss's other arguments after opt_state",
  ):
    jax.jit(vgh)(params, state)
  value, _, _ = vgh(params, state, 2.0)
  assert float(value) == pytest.approx(2.0 * float(small_loss(params)))


def test_a_leaf_that_is_not_an_array_and_a_bad_probe_count_are_named():
  with pytest.raises(TypeError, match=r"the leaf at \['name'\] is str 'dense'"):
    ah.adahessian(0.1).init({"w": jnp.ones(3), "name": "dense"})
  # A str that names a dtype was read as that dtype: init made it a float32 state entry, and the
  # update failed with "Argument 'float32' of type <class 'str'> is not a valid JAX type".
  with pytest.raises(TypeError, match=r"the leaf at \['dtype'\] is str 'float32'"):
    ah.adahessian(0.1).init({"w": jnp.ones(3), "dtype": "float32"})
  with pytest.raises(TypeError, match=r"the leaf at \['dtype'\] is _ScalarMeta"):
    ah.adahessian(0.1).init({"w": jnp.ones(3), "dtype": jnp.float32})
  for n in (0, -1):  # gave NaN and an MLIR error
    with pytest.raises(ValueError, match=f"n_samples must be an integer >= 1, got {n}"):
      ah.hutchinson_diagonal(small_loss, small_params(), jax.random.key(0), n_samples=n)


def test_an_axis_name_the_step_is_not_mapped_over_is_named():
  params = small_params()
  tx = ah.adahessian(0.1, axis_name="batch")
  stack = lambda t: jax.tree.map(lambda x: jnp.stack([x, x]), t)

  @functools.partial(jax.jit, static_argnums=2)  # vmap traces either way: one program, not ~120
  def step(p, s, axis):
    return jax.vmap(
      lambda p, s: tx.update(jax.grad(small_loss)(p), s, p, value_fn=small_loss), axis_name=axis
    )(stack(p), stack(s))

  updates, _ = step(params, tx.init(params), "batch")  # vmap binds the name like pmap
  assert np.all(np.isfinite(np.asarray(updates["w"])))
  with pytest.raises(ValueError, match="axis_name='batch' is not an axis of the enclosing"):
    step(params, tx.init(params), "data")  # was a bare AssertionError from jax
  # The hessian_diag route and independent probes met the unbound name in a collective first.
  grads = jax.grad(small_loss)(params)
  for tx in (
    ah.adahessian(0.1, axis_name="batch"),
    ah.adahessian(0.1, axis_name="batch", independent_probes=True),
  ):
    with pytest.raises(ValueError, match="axis_name='batch' is not an axis of the enclosing"):
      tx.update(grads, tx.init(params), params, hessian_diag=grads)


def test_an_integer_or_array_axis_name_is_refused_at_construction():
  # JAX's collectives read an integer as an array axis: the step failed with "axis 0 is out of
  # bounds for array of dimension 0".
  for axis_name in (0, ("batch", 1)):
    with pytest.raises(ValueError, match=r"is an integer, which JAX's collectives read as an arr"):
      ah.adahessian(0.1, axis_name=axis_name)
  state = ah.adahessian(0.1).init(small_params())
  stacked = jax.tree.map(lambda x: x[None], state)
  with pytest.raises(ValueError, match=r"axis_name=0: 0 is an integer"):
    jax.vmap(lambda s: ah.distributed.per_device_probe_state(s, 0), axis_name=0)(stacked)
  # An array is no axis name: the step failed with a bare "unhashable type: 'numpy.ndarray'".
  for axis_name in (np.array(["batch"]), ("batch", jnp.ones(2))):
    with pytest.raises(ValueError, match=r"axis_name=.*is not hashable, so it cannot name a"):
      ah.scale_by_adahessian(axis_name=axis_name)
  # A name given twice failed inside the step with JAX's "repeated axis in `source` argument".
  for axis_name in (("data", "data"), ["x", "y", "x"]):
    with pytest.raises(ValueError, match=r"axis_name=.* names an axis twice"):
      ah.adahessian(0.1, axis_name=axis_name)


def test_an_integer_or_array_expected_axis_name_is_named_as_that_argument():
  # The caller's expected_axis_name was reported as the transform's own "axis_name=0: ...",
  # beside a tx built with axis_name=None (or 'batch').
  params = small_params()
  grads = jax.grad(small_loss)(params)
  tx = ah.scale_by_adahessian()
  state = tx.init(params)
  for bad, what in ((0, "0 is an integer"), (np.array(["batch"]), r"array.*is not hashable")):
    with pytest.raises(ValueError, match=rf"^expected_axis_name={re.escape(repr(bad))}: {what}"):
      tx.update(grads, state, params, hessian_diag=grads, expected_axis_name=bad)
  with pytest.raises(ValueError, match=r"^expected_axis_name=\('batch', 1\): 1 is an integer"):
    tx.update(grads, state, params, hessian_diag=grads, expected_axis_name=("batch", 1))


@pytest.mark.parametrize(
  "made,used,match",
  [
    (dict(update_freq=3), dict(update_freq=1), r"made with update_freq=3 but the transform has"),
    (  # was "update_freq > 1 (it stores D)", which a lazy_moment="refresh" state does not
      dict(update_freq=2, lazy_moment="refresh"),
      dict(update_freq=1),
      r"made with update_freq=2 but the transform has update_freq=1\.",
    ),
    (dict(update_freq=1), dict(update_freq=3), r"made with update_freq=1"),
    (dict(update_freq=3), dict(update_freq=4), r"made with update_freq=3"),
    (dict(n_samples=2), dict(n_samples=1), r"2 probe keys but the transform has n_samples=1"),
    (
      dict(update_freq=2),
      dict(update_freq=2, lazy_moment="refresh"),
      r"made with lazy_moment='repeat' but the transform has lazy_moment='refresh'\.",
    ),
    (
      dict(update_freq=2, lazy_moment="refresh"),
      dict(update_freq=3),
      r"made with lazy_moment='refresh' but the transform has lazy_moment='repeat'\.",
    ),
  ],
)
def test_state_from_another_configuration_is_rejected(made, used, match):
  params = small_params()
  state = ah.adahessian(0.1, **made).init(params)
  tx = ah.adahessian(0.1, **used)
  grads = jax.grad(small_loss)(params)
  with pytest.raises(ValueError, match=match):
    tx.update(grads, state, params, value_fn=small_loss)


def test_lazy_state_with_another_frequency_is_switched_under_jit():
  # Under jit the stored frequency is not known at trace time: the first step follows the
  # state's schedule in both routes, and the transform writes its own frequency for the next.
  params = small_params()
  state = ah.adahessian(0.1, update_freq=3).init(params)
  tx = ah.adahessian(0.1, update_freq=4)
  grads = jax.grad(small_loss)(params)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p, value_fn=small_loss))
  _, new_state = step(grads, state, params)
  assert int(ah.find_adahessian_state(new_state).update_freq) == 4
  assert int(ah.find_adahessian_state(new_state).count) == 1


@pytest.mark.parametrize("route", ["value_fn", "fused"])
@pytest.mark.parametrize(
  "key,got",
  [
    (jax.random.split(jax.random.key(1), 2), r"typed PRNG keys of shape \(2,\)"),
    (jax.random.PRNGKey(1), r"dtype uint32 of shape \(2,\)"),  # read as 2 probes' keys
    (jax.random.key(1), r"typed PRNG keys of shape \(\)"),
    (None, r"NoneType None\."),  # was "an array of dtype float32 of shape ()"
  ],
)
def test_a_replaced_key_that_is_not_raw_key_data_per_probe_is_named(route, key, got):
  params = small_params()
  tx = ah.adahessian(0.1, n_samples=2)
  made = tx.init(params)
  match = r"state's key must be raw key data, one row per probe.*" + got
  with pytest.raises(ValueError, match=match):  # where it is replaced: it was the next update
    ah.map_adahessian_state(lambda s: s._replace(key=key), made)
  state = (ah.find_adahessian_state(made)._replace(key=key),) + made[1:]  # built by hand
  grads = jax.grad(small_loss)(params)
  with pytest.raises(ValueError, match=match):
    if route == "value_fn":
      jax.jit(lambda g, s, p: tx.update(g, s, p, value_fn=small_loss))(grads, state, params)
    else:
      jax.jit(ah.value_grad_and_hessian_diag(small_loss))(params, state)


@pytest.mark.parametrize("route", ["value_fn", "fused"])
def test_a_str_key_is_named_not_parsed_as_a_dtype(route):
  # jnp.result_type("key") failed with numpy's "data type 'key' not understood".
  params = small_params()
  tx = ah.adahessian(0.1)
  made = tx.init(params)
  state = (ah.find_adahessian_state(made)._replace(key="key"),) + made[1:]
  with pytest.raises(ValueError, match=r"state's key must be raw key data.*, got str 'key'\."):
    if route == "value_fn":
      tx.update(params, state, params, value_fn=small_loss)
    else:
      ah.value_grad_and_hessian_diag(small_loss)(params, state)


@pytest.mark.parametrize("route", ["value_fn", "fused"])
def test_a_state_stacked_by_vmap_updated_outside_vmap_says_to_map_it(route):
  # Was "Replace it with jax.random.key_data(...)", which would break the ensemble's state.
  tx = ah.adahessian(0.1)
  stacked = jax.tree.map(lambda x: jnp.stack([x, 2 * x]), small_params())
  state = jax.vmap(tx.init)(stacked)
  with pytest.raises(ValueError, match=r"shape \(2, 1, 2\)\. A state with leading axes.*in_axes"):
    if route == "value_fn":
      tx.update(stacked, state, stacked, value_fn=small_loss)
    else:
      ah.value_grad_and_hessian_diag(small_loss)(stacked, state)


@pytest.mark.parametrize("fn", [ah.is_refresh_step, ah.probe_keys])
def test_state_helpers_given_the_whole_optimizer_state_name_find_adahessian_state(fn):
  opt_state = ah.adahessian(0.1, update_freq=2).init(small_params())
  with pytest.raises(TypeError, match=r"got tuple: pass adahessian_jax.find_adahessian_state"):
    fn(opt_state)


def test_map_adahessian_state_over_a_state_that_holds_none_names_what_it_holds():
  # It returned an Adam state, or a checkpoint restored without a target (dicts), unchanged: the
  # new key or update_freq fn set was silently not set. optax.tree_utils.tree_set raises likewise.
  params = small_params()
  set_key = lambda s: s._replace(key=jax.random.key_data(jax.random.split(jax.random.key(1), 1)))
  none = r"^map_adahessian_state: opt_state holds no AdaHessian state \(ScaleByAdaHessianState\), "
  none += r"so there is nothing to replace; it holds "
  with pytest.raises(ValueError, match=none + r"ScaleByAdamState, EmptyState\."):
    ah.map_adahessian_state(set_key, optax.adam(0.1).init(params))
  restored = jax.tree.map(lambda x: x, [s._asdict() for s in ah.adahessian(0.1).init(params)])
  with pytest.raises(ValueError, match=r"it holds no optax state: it is a list\. .*restore with"):
    ah.map_adahessian_state(set_key, restored)
  state = ah.adahessian(0.1).init(params)
  assert ah.map_adahessian_state(set_key, state)[0].key.shape == state[0].key.shape


def test_bad_value_fn_is_called_value_fn():
  params = small_params()
  tx = ah.adahessian(0.1)
  grads = jax.grad(small_loss)(params)
  with pytest.raises(TypeError, match="value_fn must return a real floating-point scalar"):
    tx.update(grads, tx.init(params), params, value_fn=lambda p: p["w"])
  # Not a function at all (Python's "'str' object is not callable" named no argument).
  with pytest.raises(TypeError, match="value_fn must be a function, .* got 'loss'"):
    tx.update(grads, tx.init(params), params, value_fn="loss")
  with pytest.raises(TypeError, match="masked_value_fn's value_fn must be the loss .* got None"):
    ah.masked_value_fn(None, params)


def test_bad_fused_loss_is_named_with_the_has_aux_fix_on_every_step():
  # A (loss, aux) loss without has_aux got "wrap it: lambda p: f(p)[0]" (which drops aux) on
  # refresh steps and JAX's "Gradient only defined for scalar-output functions" between them.
  params = small_params()
  tx = ah.adahessian(0.1, update_freq=2)
  state = tx.init(params)
  _, state = tx.update(jax.grad(small_loss)(params), state, params, value_fn=small_loss)
  for s in (tx.init(params), state):  # a refresh step, then a step between refreshes
    vgh = ah.value_grad_and_hessian_diag(lambda p: (small_loss(p), 1.0))
    with pytest.raises(
      TypeError,
      match=r"loss given to value_grad_and_hessian_diag returned a "
      r"tuple of 2 .* pass has_aux=True",
    ):
      vgh(params, s)
    vgh = ah.value_grad_and_hessian_diag(lambda p: p["w"])
    with pytest.raises(
      TypeError,
      match=r"must return a real floating-point scalar loss, got "
      r"shape \(3,\)",
    ):
      vgh(params, s)


def test_inject_hyperparams_plain_call_trains_under_jit():
  params = small_params()
  schedule = optax.linear_schedule(0.2, 0.05, 20)
  tx = optax.inject_hyperparams(ah.adahessian)(learning_rate=schedule)
  losses, state = run(tx, small_loss, params, 20)
  direct, _ = run(ah.adahessian(schedule), small_loss, params, 20)
  np.testing.assert_allclose(losses, direct, rtol=1e-12)
  assert losses[-1] < 0.05 * float(small_loss(params))
  assert float(state.hyperparams["learning_rate"]) == pytest.approx(float(schedule(19)))


def test_inject_hyperparams_mask_function_must_be_static():
  params = {"w": jnp.asarray([[0.5, -1.0]]), "b": jnp.asarray([0.1])}
  loss = lambda p: jnp.sum(p["w"] ** 2) + jnp.sum(p["b"] ** 2)
  kernels = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
  make = optax.inject_hyperparams(ah.adahessian, static_args=ah.STATIC_ARGS)
  losses, _ = run(make(0.1, weight_decay=0.5, weight_decay_mask=kernels), loss, params, 5)
  mask = {"w": True, "b": False}
  direct, _ = run(ah.adahessian(0.1, weight_decay=0.5, weight_decay_mask=mask), loss, params, 5)
  np.testing.assert_allclose(losses, direct, rtol=1e-6)
  undecayed, _ = run(ah.adahessian(0.1), loss, params, 5)
  assert np.max(np.abs(direct - undecayed)) > 1e-3  # the decay matters on this problem
  # Not static, the mask function is called with the step count and returns False: no decay.
  tx = optax.inject_hyperparams(ah.adahessian)(0.1, weight_decay=0.5, weight_decay_mask=kernels)
  with pytest.raises(ValueError, match="weight_decay_mask .* got the single value False.*STATIC"):
    tx.init(params)


def test_a_weight_decay_mask_that_does_not_fit_the_params_is_named_at_init():
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2), "head": {"w": jnp.ones(3)}}
  bad = [
    ({"w": True, "b": False}, ValueError, r"no entry for the params leaf at \['head'\]\['w'\]"),
    ({"w": True, "b": False, "head": True, "x": False}, ValueError, r"an entry at \['x'\]"),
    ({"w": jnp.ones((2, 2), bool), "b": False, "head": True}, TypeError, r"\['w'\] is an array"),
    ({"w": "yes", "b": False, "head": True}, TypeError, r"\['w'\] is 'yes', not a boolean"),
    (lambda p: {"w": True}, ValueError, r"no entry for the params leaf at \['b'\]"),
  ]
  for mask, error, match in bad:  # optax: a prefix dump, an ambiguous truth value, or silence
    with pytest.raises(error, match="weight_decay_mask.*" + match):
      ah.adahessian(0.1, weight_decay=0.5, weight_decay_mask=mask).init(params)
  # A prefix of the params, NumPy booleans and 0-d boolean arrays are masks optax takes.
  mask = {"w": np.True_, "b": jnp.asarray(False), "head": True}
  tx = ah.adahessian(1.0, weight_decay=0.5, weight_decay_mask=mask)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params, hessian_diag=zeros)
  assert [float(u.max()) for u in jax.tree.leaves(updates)] == [0.0, -0.5, -0.5]  # b, head, w
  # Inside optax.masked the params the mask is checked against hold MaskedNodes.
  outer = optax.masked(tx, {"w": True, "b": True, "head": False})
  updates, _ = outer.update(zeros, outer.init(params), params, hessian_diag=zeros)
  assert [float(u.max()) for u in jax.tree.leaves(updates)] == [0.0, 0.0, -0.5]  # head: zeros
  # A mask function sees them as empty nodes and returns none there, as with optax.adamw (it
  # raised "no entry for the params leaf at ['head']['w']").
  kernels = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
  inner = ah.adahessian(1.0, weight_decay=0.5, weight_decay_mask=kernels)
  outer = optax.masked(inner, {"w": True, "b": True, "head": False})
  updates, _ = outer.update(zeros, outer.init(params), params, hessian_diag=zeros)
  assert [float(u.max()) for u in jax.tree.leaves(updates)] == [0.0, 0.0, -0.5]


def test_a_weight_decay_mask_without_the_other_transforms_leaves_is_named_at_init():
  # Inside multi_transform a mask of the group's own leaves raised optax's pytree-prefix dump
  # ("different numbers of pytree children ... symmetric difference on key sets is k2").
  params = {"k": jnp.ones((2, 2)), "b": jnp.ones(2), "k2": jnp.ones((2, 3))}
  labels = {"k": "ada", "b": "ada", "k2": "sgd"}

  def build(mask):
    ada = ah.adahessian(1.0, weight_decay=0.5, weight_decay_mask=mask)
    return optax.multi_transform({"ada": ada, "sgd": optax.sgd(0.1)}, labels)

  other = r"no entry for the params leaf at \['k2'\], which another transform of optax.masked"
  with pytest.raises(ValueError, match=r"^weight_decay_mask has " + other):
    build({"k": True, "b": False}).init(params)
  with pytest.raises(ValueError, match=r"^weight_decay_mask has " + other):
    build(lambda p: {"k": True, "b": False}).init(params)  # a function that drops the node
  # With an entry there (either boolean), or a mask function, the decay is the group's own.
  zeros = jax.tree.map(jnp.zeros_like, params)
  for mask in ({"k": True, "b": False, "k2": False}, {"k": True, "b": False, "k2": True}):
    tx = build(mask)
    updates, _ = tx.update(zeros, tx.init(params), params, hessian_diag=zeros)
    assert [float(u.min()) for u in jax.tree.leaves(updates)] == [0.0, -0.5, 0.0]  # b, k, k2


def test_a_state_of_an_adahessian_built_without_its_schedule_or_mask_is_named():
  # A constant-rate adahessian's state (EmptyState where a schedule keeps its count) gave the
  # schedule tuple's count method: "unsupported operand type(s) for -: 'builtin_function_or_method'
  # and 'int'"; without a mask, optax.masked's "'EmptyState' object has no attribute
  # 'inner_state'".
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
  zeros = jax.tree.map(jnp.zeros_like, params)
  plain = ah.adahessian(0.1).init(params)
  built = r"the optimizer state was made by an adahessian built otherwise .*tx.init\(params\)"
  cases = [
    (ah.adahessian(optax.linear_schedule(0.1, 0.0, 10)), r"schedule got no step count in its ", 0),
    (
      ah.adahessian(0.1, weight_decay=0.5, weight_decay_mask={"w": True, "b": False}),
      "got EmptyState where its mask keeps an optax.MaskedState",
      -0.05,  # lr · wd · w on w, nothing on b
    ),
  ]
  for tx, got, decayed in cases:
    for update in (tx.update, jax.jit(tx.update)):
      with pytest.raises(TypeError, match=rf"^adahessian with a .*{got}.*" + built):
        update(zeros, plain, params, hessian_diag=zeros)
    updates, _ = tx.update(zeros, tx.init(params), params, hessian_diag=zeros)  # its own state
    np.testing.assert_allclose(updates["w"], np.full((2, 2), decayed), rtol=1e-6)
    np.testing.assert_array_equal(updates["b"], np.zeros(2))


def test_a_state_of_another_optimizer_or_of_scale_by_adahessian_alone_is_named():
  # optax.chain's "The number of updates and states has to be the same in chain! Make sure you
  # have called init first!", although init had been called (of another optimizer).
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
  zeros = jax.tree.map(jnp.zeros_like, params)
  tx = ah.adahessian(0.1)
  cases = [
    (optax.adam(0.1).init(params), r"a tuple of 2 states \(ScaleByAdamState, EmptyState\)"),
    (optax.inject_hyperparams(ah.adahessian)(0.1).init(params), "an InjectStatefulHyperparams"),
  ]
  for state, got in cases:
    for update in (tx.update, jax.jit(tx.update)):
      with pytest.raises(TypeError, match=rf"^adahessian's update got {got}.* another optimizer"):
        update(zeros, state, params, hessian_diag=zeros)
  alone = ah.find_adahessian_state(tx.init(params))
  with pytest.raises(TypeError, match=r"got a ScaleByAdaHessianState, the state of scale_by_"):
    tx.update(zeros, alone, params, hessian_diag=zeros)
  updates, _ = tx.update(zeros, tx.init(params), params, hessian_diag=zeros)  # its own state
  assert [float(jnp.abs(u).max()) for u in jax.tree.leaves(updates)] == [0.0, 0.0]


def test_inject_hyperparams_rounding_to_bfloat16_params_names_hyperparam_dtype():
  params = {"w": jnp.asarray([0.5, -1.0, 2.0], jnp.bfloat16)}
  loss = lambda p: jnp.sum(p["w"].astype(jnp.float32) ** 2)
  with pytest.raises(ValueError, match=r"b2 .* got Array\(1, .*hyperparam_dtype=jnp.float32"):
    optax.inject_hyperparams(ah.adahessian)(0.1).init(params)  # b2=0.999 is 1.0 in bfloat16
  tx = optax.inject_hyperparams(ah.adahessian, hyperparam_dtype=jnp.float32)(0.1)
  losses, _ = run(tx, loss, params, 5)
  # The float32 run of the same problem, within bfloat16's precision.
  reference, _ = run(ah.adahessian(0.1), loss, jax.tree.map(jnp.float32, params), 5)
  np.testing.assert_allclose(losses, reference, rtol=0.03)


# ---------------------------------------------------------------- non-finite estimates


def overflowing_problem():
  """float16: loss and gradient finite, the Hessian-vector product overflows (80000 > 65504)."""
  params = {"w": jnp.full((4,), 1e-3, jnp.float16)}
  loss = lambda p: jnp.sum(40000.0 * p["w"].astype(jnp.float16) ** 2)
  return params, loss


def test_non_finite_estimate_by_value_fn_leaves_params_and_curvature_untouched():
  params, loss = overflowing_problem()
  tx = ah.adahessian(0.1)
  state = tx.init(params)
  grads = jax.grad(loss)(params)
  assert bool(jnp.all(jnp.isfinite(grads["w"])))
  updates, new_state = jax.jit(lambda g, s, p: tx.update(g, s, p, value_fn=loss))(
    grads, state, params
  )
  assert_trees_allclose(updates, jax.tree.map(jnp.zeros_like, updates), rtol=0.0)
  old, new = ah.find_adahessian_state(state), ah.find_adahessian_state(new_state)
  assert_trees_allclose(new.nu, old.nu, rtol=0.0)
  # The momentum takes the (finite) gradient as on any step.
  np.testing.assert_allclose(np.asarray(new.mu["w"], np.float32), 0.1 * np.asarray(grads["w"]))


def test_non_finite_estimate_from_the_fused_route_is_counted_by_apply_if_finite():
  params, loss = overflowing_problem()
  tx = optax.apply_if_finite(ah.adahessian(0.1), max_consecutive_errors=3)
  state = tx.init(params)
  loss_value, grads, hdiag = ah.value_grad_and_hessian_diag(loss)(params, state)
  assert np.isfinite(float(loss_value))
  assert not bool(jnp.all(jnp.isfinite(hdiag["w"])))
  updates, new_state = tx.update(grads, state, params, hessian_diag=hdiag)
  assert int(new_state.notfinite_count) == 1
  assert_trees_allclose(new_state.inner_state, state.inner_state, rtol=0.0)
  assert not np.any(np.asarray(updates["w"], np.float64))


def test_an_entry_whose_gradient_is_not_finite_keeps_its_momentum_and_moves_by_it():
  """As docs/stability.md says: the entry keeps its mu and steps by lr·m̂/P with it (the count
  advanced), nothing non-finite reaches the params or the state; apply_if_finite skips it."""
  params = {"w": jnp.zeros(3)}
  hdiag = {"w": jnp.full(3, 2.0)}
  tx = ah.adahessian(0.1)
  state = tx.init(params)
  updates, state = tx.update({"w": jnp.ones(3)}, state, params, hessian_diag=hdiag)
  params = optax.apply_updates(params, updates)
  mu, nu = np.asarray(state[0].mu["w"]), np.asarray(state[0].nu["w"])
  bad = {"w": jnp.asarray([1.0, jnp.inf, jnp.nan])}
  updates, state = jax.jit(tx.update)(bad, state, params, hessian_diag=hdiag)
  np.testing.assert_array_equal(np.asarray(state[0].mu["w"])[1:], mu[1:])
  nu = 0.999 * nu + 0.001 * 4.0  # D² of the step's finite estimate
  want = -0.1 * (mu / (1 - 0.9**2)) / (np.sqrt(nu / (1 - 0.999**2)) + 1e-4)
  np.testing.assert_allclose(np.asarray(updates["w"])[1:], want[1:], rtol=1e-6)
  skip = optax.apply_if_finite(tx, 1)
  inner = skip.init(params)
  updates, inner = skip.update(bad, inner, params, hessian_diag=hdiag)
  np.testing.assert_array_equal(np.asarray(updates["w"]), 0.0)
  assert int(inner.notfinite_count) == 1


@pytest.mark.parametrize("update_freq", [1, 2])
def test_fused_route_without_apply_if_finite_keeps_every_other_entry_training(update_freq):
  """The gradient entry the fused route marks NaN (for apply_if_finite) keeps its momentum, so
  without apply_if_finite nothing non-finite reaches the parameters or the state either."""
  params = {"a": jnp.ones(3, jnp.float32), "b": jnp.full((2,), 1e-4, jnp.float32)}
  loss = lambda p: jnp.sum(p["a"] ** 2) + jnp.float32(3e38) * jnp.sum(p["b"] ** 2)  # Hz overflows
  tx = ah.adahessian(0.1, update_freq=update_freq)
  state = tx.init(params)
  step = jax.jit(ah.value_grad_and_hessian_diag(loss))
  for i in range(3):
    _, grads, hdiag = step(params, state)
    assert bool(jnp.all(jnp.isfinite(hdiag["b"]))) == (i % update_freq != 0)  # refresh steps
    updates, state = jax.jit(tx.update)(grads, state, params, hessian_diag=hdiag)
    params = optax.apply_updates(params, updates)
    for leaf in jax.tree.leaves((params, state)):
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        assert bool(jnp.all(jnp.isfinite(leaf)))
  np.testing.assert_array_equal(np.asarray(params["b"]), np.full(2, 1e-4, np.float32))
  # The steps whose estimate is not finite do not move the params; a's curvature is taken in.
  if update_freq == 1:
    np.testing.assert_array_equal(np.asarray(params["a"]), np.ones(3, np.float32))
  else:  # the non-refresh step in between moves a (but for the entry marked NaN at step 0)
    np.testing.assert_array_less(np.asarray(params["a"])[1:], 0.95)
  assert float(jnp.min(state[0].nu["a"])) > 0 and float(jnp.max(state[0].nu["b"])) == 0.0


@pytest.mark.parametrize("overflow", ["w", "a_bias"])
def test_fused_mark_stays_in_the_leaves_adahessian_owns(overflow):
  # Inside multi_transform the first leaf (a_bias) belongs to SGD, which would apply a NaN mark;
  # an overflow in SGD's leaf is no concern of AdaHessian's and marks nothing.
  params = {"a_bias": jnp.ones(2, jnp.float16), "w": jnp.full(3, 1e-3, jnp.float16)}
  scale = {k: jnp.float16(300 if k == overflow else 1) for k in params}  # 300² overflows Hz

  def loss(p):
    return sum(0.5 * jnp.sum((p[k] * scale[k]) ** 2) for k in p)

  tx = optax.multi_transform(
    {"ada": ah.adahessian(0.01), "sgd": optax.sgd(0.01)}, {"a_bias": "sgd", "w": "ada"}
  )
  state = tx.init(params)
  _, grads, hdiag = jax.jit(ah.value_grad_and_hessian_diag(loss))(params, state)
  if overflow == "w":
    assert not bool(jnp.all(jnp.isfinite(hdiag["w"])))
  else:  # SGD's leaf gets no probe (as on the closure route), so nothing overflows there
    np.testing.assert_array_equal(np.asarray(hdiag["a_bias"]), 0.0)
  plain = jax.grad(loss)(params)
  np.testing.assert_array_equal(np.asarray(grads["a_bias"]), np.asarray(plain["a_bias"]))
  marked = np.isnan(np.asarray(grads["w"]))
  np.testing.assert_array_equal(marked, [overflow == "w", False, False])
  updates, _ = tx.update(grads, state, params, hessian_diag=hdiag)
  new = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(np.asarray(new["a_bias"]), 1 - 0.01 * np.asarray(plain["a_bias"]))
  if overflow == "w":  # AdaHessian's step with a non-finite estimate does not move its params
    np.testing.assert_array_equal(np.asarray(new["w"]), np.asarray(params["w"]))
  else:
    assert bool(jnp.all(new["w"] < params["w"]))


def test_fused_mark_stays_in_the_leaves_adahessian_owns_with_prefix_labels():
  # Labels given per subtree: SGD's subtree comes first and must not receive the NaN mark.
  params = {"a": {"bias": jnp.ones(2, jnp.float16)}, "w": jnp.full(3, 1e-3, jnp.float16)}
  loss = lambda p: 0.5 * jnp.sum(p["a"]["bias"] ** 2) + 0.5 * jnp.sum((p["w"] * 300) ** 2)
  tx = optax.multi_transform(
    {"ada": ah.adahessian(0.01), "sgd": optax.sgd(0.01)}, {"a": "sgd", "w": "ada"}
  )
  state = tx.init(params)
  _, grads, hdiag = jax.jit(ah.value_grad_and_hessian_diag(loss))(params, state)
  np.testing.assert_array_equal(np.asarray(hdiag["a"]["bias"]), 0.0)  # no probe on SGD's leaf
  np.testing.assert_array_equal(np.asarray(grads["a"]["bias"]), 1.0)
  np.testing.assert_array_equal(np.isnan(np.asarray(grads["w"])), [True, False, False])
  updates, _ = tx.update(grads, state, params, hessian_diag=hdiag)
  new = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(np.asarray(new["a"]["bias"]), np.float16(0.99))
  np.testing.assert_array_equal(np.asarray(new["w"]), np.asarray(params["w"]))


def test_fused_route_with_an_empty_first_leaf():
  params = {"a_unused": jnp.zeros((0, 4)), "w": jnp.asarray([1.0, 2.0])}
  loss = lambda p: jnp.sum(p["w"] ** 2) + jnp.sum(p["a_unused"])
  tx = ah.adahessian(0.1)
  state = tx.init(params)
  _, grads, hdiag = jax.jit(ah.value_grad_and_hessian_diag(loss))(params, state)
  np.testing.assert_array_equal(np.asarray(grads["w"]), [2.0, 4.0])
  np.testing.assert_array_equal(np.asarray(hdiag["w"]), [2.0, 2.0])
  updates, _ = jax.jit(tx.update)(grads, state, params, hessian_diag=hdiag)
  np.testing.assert_allclose(np.asarray(updates["w"]), -0.1 * np.array([2, 4]) / (2 + 1e-4))


def test_float16_params_keep_their_second_moment_in_float32():
  # D = 300: D² overflows float16 (largest 65504), which froze that entry for good (nu = inf),
  # and D = 5e-3 underflowed (nu = 0: a step of m / eps).
  d = np.array([300.0, 2.0, 5e-3])
  params = {"w": jnp.ones(3, jnp.float16)}
  tx = ah.adahessian(1e-3)
  state = tx.init(params)
  assert state[0].nu["w"].dtype == jnp.float32 and state[0].mu["w"].dtype == jnp.float16
  w, m, v = np.ones(3), np.zeros(3), np.zeros(3)
  for t in range(1, 4):  # Algorithm 1 in float64, the gradient of 0.5·d·w²
    g = d * w
    m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * d**2
    w = w - 1e-3 * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-4)
    grads = {"w": jnp.asarray(d, jnp.float16) * params["w"]}
    hdiag = {"w": jnp.asarray(d, jnp.float16)}
    updates, state = tx.update(grads, state, params, hessian_diag=hdiag)
    assert updates["w"].dtype == jnp.float16  # the chain's dtypes stay those of the gradients
    params = optax.apply_updates(params, updates)
    assert params["w"].dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(state[0].nu["w"]), v, rtol=2e-3)
  np.testing.assert_allclose(np.asarray(params["w"], np.float64), w, rtol=0, atol=1e-3)
  assert np.all(np.asarray(params["w"]) < 1)  # every entry moved (rounding of 1 - 3e-3)


@pytest.mark.parametrize("lazy_moment", ["repeat", "refresh"])
def test_host_refresh_false_before_any_estimate_does_not_move_the_params(lazy_moment):
  # Under jit the host's refresh decision cannot be checked against the state. Step 0 declared
  # as a non-refresh step (an off-by-one in the loop) has no curvature to use: it must not step
  # by m / eps (it moved w to -120 and the loss to 8e4).
  params, grads = small_params(), jax.grad(small_loss)(small_params())
  tx = ah.adahessian(0.1, update_freq=2, lazy_moment=lazy_moment)
  step = jax.jit(lambda g, s, p, **kw: tx.update(g, s, p, **kw), static_argnames="refresh")
  updates, state = step(grads, tx.init(params), params, hessian_diag=None, refresh=False)
  assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(updates))
  np.testing.assert_allclose(np.asarray(state[0].mu["w"]), 0.1 * np.asarray(grads["w"]))
  h = jax.tree.map(jnp.ones_like, params)
  updates, _ = step(grads, state, params, hessian_diag=h, refresh=True)
  assert all(np.all(np.asarray(u) != 0) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize(
  "kw", [{}, {"update_freq": 2, "lazy_moment": "refresh"}, {"update_freq": 2}], ids=str
)
def test_an_entry_keeps_its_bias_corrected_curvature_past_a_non_finite_estimate(kw):
  # Curvature 1 everywhere but one inf estimate on step 3: the entry must step like its finite
  # neighbour afterwards. Keeping nu itself while the count advanced lowered its corrected
  # curvature: steps 1.22, 1.15, 1.12... times the neighbour's (1.41, 1.22... refreshing lazily).
  tx = ah.scale_by_adahessian(b1=0.0, eps=1e-12, **kw)
  params = {"w": jnp.ones(2)}
  state = tx.init(params)
  for step in range(8):
    h = {"w": jnp.asarray([1.0, jnp.inf if step == 2 else 1.0])}
    updates, state = tx.update({"w": jnp.ones(2)}, state, params, hessian_diag=h)
    want = [0.0, 0.0] if step == 2 else [1.0, 1.0]  # that step does not move the params
    np.testing.assert_allclose(np.asarray(updates["w"]), want, rtol=1e-6, err_msg=str(step))


def test_user_hessian_diag_with_nan_keeps_those_entries_curvature_and_stops_the_step():
  params = small_params()
  tx = ah.scale_by_adahessian(update_freq=2)
  state = tx.init(params)
  grads = jax.grad(small_loss)(params)
  bad = {"w": jnp.asarray([1.0, jnp.nan, 1.0]), "b": jnp.asarray(jnp.inf)}
  updates, new = tx.update(grads, state, params, hessian_diag=bad)
  for field in ("nu", "hessian"):  # the non-finite entries keep their curvature
    assert float(getattr(new, field)["w"][1]) == float(getattr(state, field)["w"][1])
    assert float(getattr(new, field)["b"]) == float(getattr(state, field)["b"])
    assert bool(jnp.all(jnp.isfinite(getattr(new, field)["w"])))
  # The step does not move the params; the momentum takes the finite gradient as on any step.
  assert not np.any(np.asarray(updates["w"])) and float(updates["b"]) == 0.0
  np.testing.assert_allclose(np.asarray(new.mu["w"]), 0.1 * np.asarray(grads["w"]), rtol=1e-6)
  # The finite entries' curvature is taken in: nu = (1 - b2) D².
  np.testing.assert_allclose(np.asarray(new.nu["w"])[[0, 2]], [1e-3, 1e-3], rtol=1e-6)
  # The next step does not refresh: the entries with curvature move, the marked ones (no
  # curvature yet) wait; the refresh after it, with a finite estimate, moves every entry.
  finite = {"w": jnp.ones(3), "b": jnp.asarray(1.0)}
  updates, new = tx.update(grads, new, params, hessian_diag=finite)
  np.testing.assert_array_equal(np.asarray(updates["w"]) != 0, [True, False, True])
  assert float(updates["b"]) == 0.0
  updates, _ = tx.update(grads, new, params, hessian_diag=finite)
  assert np.all(np.asarray(updates["w"]) != 0) and float(updates["b"]) != 0.0


@pytest.mark.parametrize("lazy_moment", ["repeat", "refresh"])
@pytest.mark.parametrize("host", [False, True])
def test_entry_without_curvature_whose_estimate_is_not_finite_waits_for_a_finite_one(
  lazy_moment, host
):
  """A lazy refresh whose estimate overflows where no curvature was seen yet (nu = 0): on the
  steps between refreshes that entry must not move by m / eps as if its curvature were zero."""
  params = {"w": jnp.ones(3, jnp.float32)}
  grads = {"w": jnp.full(3, 2.0, jnp.float32)}
  tx = ah.scale_by_adahessian(update_freq=2, lazy_moment=lazy_moment)
  update = jax.jit(
    lambda s, h, refresh: tx.update(grads, s, params, hessian_diag=h, refresh=refresh),
    static_argnums=2,
  )
  state = tx.init(params)
  estimates = [[1.0, jnp.inf, jnp.nan], [9.0, 9.0, 9.0], [4.0, 4.0, 4.0], [9.0, 9.0, 9.0]]
  moved = []
  for step, estimate in enumerate(estimates):
    refresh = (step % 2 == 0) if host else None
    updates, state = update(state, {"w": jnp.asarray(estimate)}, refresh)
    moved.append(np.asarray(updates["w"]) != 0)
    for leaf in jax.tree.leaves(state):
      assert bool(jnp.all(jnp.isfinite(leaf)))
    assert np.all(np.abs(np.asarray(updates["w"])) < 10.0)  # |m̂ / sqrt(v̂)| is about 1 here
  # Step 0 refreshes with a non-finite estimate: nothing moves. Step 1 does not refresh: the
  # entry with curvature moves, the two without wait. Step 2 refreshes with a finite estimate:
  # everything moves from then on, and the marks are gone (nu > 0).
  np.testing.assert_array_equal(moved, [[0, 0, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1]])
  assert float(jnp.min(state.nu["w"])) > 0


@pytest.mark.parametrize(
  "update_freq,lazy_moment", [(1, "refresh"), (2, "refresh"), (2, "repeat")], ids=str
)
def test_an_entry_whose_first_finite_estimate_comes_late_steps_as_on_a_first_step(
  update_freq, lazy_moment
):
  """An entry whose estimates are not finite on the first refreshes and then D: its first
  corrected nu is D², as an entry's whose first estimate was D. Counted as one of the steps' it
  was D² (1 - b2) / (1 - b2^t): the step was sqrt(t) too long (2.0x at t = 4)."""
  params = {"w": jnp.ones(2, jnp.float32)}
  grads = {"w": jnp.full(2, 0.5, jnp.float32)}
  tx = ah.scale_by_adahessian(b2=0.9, update_freq=update_freq, lazy_moment=lazy_moment, eps=1e-12)
  update = jax.jit(lambda s, h: tx.update(grads, s, params, hessian_diag=h))
  state = tx.init(params)
  late = 3 * update_freq  # the step (from 0) of the entry's first finite estimate
  for step in range(late + 1):
    estimate = [2.0, jnp.nan if step < late else 2.0]
    updates, state = update(state, {"w": jnp.asarray(estimate, jnp.float32)})
  # m̂ = g = 0.5 for a constant gradient, D = 2: both entries step by 0.25.
  np.testing.assert_allclose(np.asarray(updates["w"]), [0.25, 0.25], rtol=1e-5)


# ---------------------------------------------------------------- stabilizers


def coupled_quadratic(n=32, seed=0):
  """0.5 wᵀAw with strong off-diagonal couplings: single-probe estimates z⊙Az are very noisy,
  and some entries come out near zero although every true diagonal entry is ~1.9."""
  r = np.random.default_rng(seed)
  c = r.normal(size=(n, n)) * 0.25
  a = np.eye(n) + (c + c.T) / 2 - np.diag(np.diag(c))
  a += (0.1 - np.linalg.eigvalsh(a).min()) * np.eye(n)
  a = jnp.asarray(a)
  return {"w": jnp.asarray(r.normal(size=n))}, lambda p: 0.5 * p["w"] @ a @ p["w"]


def test_curvature_floor_keeps_a_lazy_run_from_blowing_up():
  params, loss = coupled_quadratic()
  initial = float(loss(params))
  peaks = {}
  for floor in (0.0, 0.3):
    # The 8 seeds' runs side by side, one program (a run per seed compiled its step per seed):
    # a seed only sets the probes' key, in the state that init makes.
    make = lambda seed, floor=floor: ah.adahessian(
      0.5, update_freq=4, seed=seed, curvature_floor=floor
    )
    peaks[floor] = run_seeds(make, range(8), loss, params, 20).max(axis=1)
  assert max(peaks[0.0]) > 100 * initial  # the exact rule: a noisy near-zero D, huge steps
  assert max(peaks[0.3]) < initial


def hinge_problem():
  """A linear classifier with the hinge loss: the Hessian is exactly zero almost everywhere."""
  r = np.random.default_rng(0)
  x = jnp.asarray(r.normal(size=(128, 10)))
  y = jnp.sign(x @ r.normal(size=10))
  loss = lambda p: jnp.mean(jnp.maximum(0.0, 1.0 - y * (x @ p["w"] + p["b"])))
  return {"w": jnp.zeros(10), "b": jnp.zeros(())}, loss


def test_update_clip_bounds_steps_where_there_is_no_curvature():
  params, loss = hinge_problem()
  initial = float(loss(params))
  exact, _ = run(ah.adahessian(), loss, params, 100)
  clipped, _ = run(ah.adahessian(update_clip=1.0), loss, params, 100)
  assert exact.max() > 10 * initial  # steps of lr·g/eps = 1500·g
  assert clipped.max() < initial and clipped[-1] < 0.05 * initial


def relu_l1_problem():
  """A ReLU MLP 8-32-1 regressing a smooth teacher with the L1 loss: piecewise linear along each
  weight (Hessian diagonal zero almost everywhere), and the output bias has no curvature at all."""
  r = np.random.default_rng(0)
  x = jnp.asarray(r.normal(size=(256, 8)))
  y = 0.5 * jnp.sin(x @ jnp.asarray(r.normal(size=8)) / np.sqrt(8) * 2)
  params = {
    "w1": jnp.asarray(r.normal(size=(8, 32)) / np.sqrt(8)),
    "b1": jnp.zeros(32),
    "w2": jnp.asarray(r.normal(size=(32, 1)) / np.sqrt(32)),
    "b2": jnp.zeros(1),
  }
  net = lambda p: (jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"])[:, 0]
  return params, lambda p: jnp.mean(jnp.abs(net(p) - y))


@pytest.mark.parametrize("problem", [relu_l1_problem, hinge_problem])
def test_recommended_configuration_trains_without_curvature_at_the_default_rate(problem):
  # The README's configuration at the default rate (0.15): the exact rule blows up (steps of
  # lr·g/eps), the recommended one lowers the loss over 100 steps without ever exceeding the start.
  params, loss = problem()
  initial = float(loss(params))
  exact, _ = run(ah.adahessian(), loss, params, 100)
  stable, _ = run(ah.adahessian(curvature_floor=0.3, update_clip=0.05), loss, params, 100)
  assert exact.max() > 10 * initial
  assert stable.max() <= initial and stable[-1] < 0.5 * initial, (initial, stable[::10])


def test_update_clip_is_elementwise_and_exact_below_the_bound():
  params = {"w": jnp.asarray([1e-3, 1.0])}
  grads = {"w": jnp.asarray([1.0, 1.0])}
  hdiag = {"w": jnp.asarray([0.0, 4.0])}
  updates, _ = ah.scale_by_adahessian(update_clip=0.5).update(
    grads, ah.scale_by_adahessian(update_clip=0.5).init(params), params, hessian_diag=hdiag
  )
  # Step 1: m̂ = g, v̂ = D², u = g / (|D| + eps): 1/1e-4 clipped to 0.5, and 1/4.0001 kept.
  np.testing.assert_allclose(np.asarray(updates["w"]), [0.5, 1 / (4 + 1e-4)], rtol=1e-12)


def test_curvature_floor_closed_form():
  params = {"w": jnp.zeros(4)}
  grads = {"w": jnp.ones(4)}
  hdiag = {"w": jnp.asarray([0.0, -2.0, 6.0, 0.4])}  # |D| = 0, 2, 6, 0.4; mean 2.1
  tx = ah.scale_by_adahessian(curvature_floor=0.5)
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params, hessian_diag=hdiag)
  floored = np.maximum([0.0, 2.0, 6.0, 0.4], 0.5 * 2.1)
  np.testing.assert_allclose(np.asarray(updates["w"]), 1 / (floored + 1e-4), rtol=1e-12)
  np.testing.assert_allclose(np.asarray(state.nu["w"]), 0.001 * floored**2, rtol=1e-12)


def steps_then(tx, first, last, n=12):
  """``n`` jitted updates from the ``(grads, hessian_diag)`` pair ``first``, then one from
  ``last`` (the curvature clip starts at step 11); that one's updates and state. The params are
  zeros like ``first``'s gradients."""
  params = jax.tree.map(jnp.zeros_like, first[0])
  step = jax.jit(lambda g, s, h: tx.update(g, s, params, hessian_diag=h))
  state = tx.init(params)
  for _ in range(n):
    _, state = step(first[0], state, first[1])
  return step(last[0], state, last[1])


def clipped_spike_closed_form(g, d, b1=0.9, b2=0.999, eps=1e-4):
  """``(nu, mu, update)`` after 10 steps of ``(g, d)`` and an 11th whose gradient and estimate a
  curvature clip of 4 scales to ``4 g`` and ``4 |d|`` (NumPy)."""
  g, d = np.asarray(g, np.float64), np.asarray(d, np.float64)
  nu = b2 * (1 - b2**10) * d**2 + (1 - b2) * (4 * d) ** 2
  mu = b1 * (1 - b1**10) * g + (1 - b1) * 4 * g
  return nu, mu, mu / (1 - b1**11) / (np.sqrt(nu / (1 - b2**11)) + eps)


@pytest.mark.parametrize("injected", [False, True])
def test_curvature_clip_closed_form(injected):
  # Steps 1-10 set the curvature so far (D = |d|, v̂ = D²: RMS sqrt(7.5)); step 11's estimate
  # and gradient are 1e10 times theirs: both are scaled by 4 · sqrt(7.5) / (1e10 sqrt(7.5)), so
  # D = 4 |d| and the gradient 4 g, as if the batch's loss had been 4x the others'.
  g, d = jnp.ones(4), jnp.asarray([1.0, -2.0, 3.0, 4.0])
  if injected:
    tx = optax.inject_hyperparams(ah.scale_by_adahessian)(curvature_clip=4.0)
  else:
    tx = ah.scale_by_adahessian(curvature_clip=4.0)
  spike = ({"w": 1e10 * g}, {"w": 1e10 * d})
  updates, state = steps_then(tx, ({"w": g}, {"w": d}), spike, n=10)
  inner = state.inner_state if injected else state
  nu, mu, want = clipped_spike_closed_form(g, d)
  np.testing.assert_allclose(np.asarray(inner.nu["w"]), nu, rtol=1e-12)
  np.testing.assert_allclose(np.asarray(inner.mu["w"]), mu, rtol=1e-12)
  np.testing.assert_allclose(np.asarray(updates["w"]), want, rtol=1e-12)


@pytest.mark.parametrize("spike", [1e20, 1e27])
def test_curvature_clip_scales_a_float32_spike_beyond_the_square_of_its_scale(spike):
  # The scale 4 / spike was taken as sqrt(limit / ratio): its square, under float32's smallest
  # normal (1e-38) from a spike of ~4e19 on, flushed to 0, which zeroed that step's D and
  # gradient instead of scaling them to 4 d and 4 g (as in the closed form above).
  g, d = jnp.ones(4), jnp.asarray([1.0, -2.0, 3.0, 4.0])
  f32 = lambda x: {"w": jnp.asarray(x, jnp.float32)}
  tx = ah.scale_by_adahessian(curvature_clip=4.0)
  updates, state = steps_then(tx, (f32(g), f32(d)), (f32(spike * g), f32(spike * d)), n=10)
  nu, mu, want = clipped_spike_closed_form(g, d)
  np.testing.assert_allclose(np.asarray(state.nu["w"]), nu, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(state.mu["w"]), mu, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(updates["w"]), want, rtol=1e-5)


@pytest.mark.parametrize(("spike", "n"), [(1e30, 4), (1e37, 4), (1e26, 2**20)])
def test_curvature_clip_scales_a_finite_spike_whose_mean_square_overflows(spike, n):
  # A finite estimate whose mean square (in units of 2**32 times the RMS so far) passes float32's
  # range: 1e28 times the curvature in one entry, less in a large model. It was taken for a
  # non-finite estimate and not scaled: D² overflowed nu's range there (nu kept as it was), and
  # the spiked gradient entered mu, so the step was ~spike times the usual (1e29 at 1e30).
  g, d = jnp.ones(n), jnp.tile(jnp.asarray([1.0, -2.0, 3.0, 4.0]), n // 4)
  f32 = lambda x: {"w": jnp.asarray(x, jnp.float32)}
  tx = ah.scale_by_adahessian(curvature_clip=4.0)
  updates, state = steps_then(tx, (f32(g), f32(d)), (f32(spike * g), f32(spike * d)), n=10)
  nu, mu, want = clipped_spike_closed_form(g[:4], d[:4])
  np.testing.assert_allclose(np.asarray(state.nu["w"][:4]), nu, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(state.mu["w"][:4]), mu, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(updates["w"][:4]), want, rtol=1e-5)


@pytest.mark.parametrize("update_freq", [1, 2])
def test_curvature_clip_leaves_steps_under_it_and_non_finite_estimates_as_they_are(update_freq):
  # Under the bound (3x the mean so far, c = 4) the clip changes nothing, bit for bit; a
  # non-finite estimate (inf: an infinite mean) is not scaled (a scale of 0 would have stored
  # D = 0 in its finite entries).
  g, d = {"w": jnp.ones(4)}, {"w": jnp.asarray([1.0, -2.0, 3.0, 4.0])}
  inf = {"w": jnp.asarray([1.0, jnp.inf, 3.0, 4.0])}
  for second in ((g, jax.tree.map(lambda x: 3 * x, d)), (g, inf)):
    for lazy_moment in ("repeat", "refresh"):
      kw = dict(update_freq=update_freq, lazy_moment=lazy_moment)
      # Step 13 refreshes with update_freq=2 too.
      u, s = steps_then(ah.scale_by_adahessian(curvature_clip=4.0, **kw), (g, d), second)
      u0, s0 = steps_then(ah.scale_by_adahessian(**kw), (g, d), second)
      for a, b in ((u, u0), (s.nu, s0.nu), (s.mu, s0.mu)):
        np.testing.assert_array_equal(np.asarray(a["w"]), np.asarray(b["w"]))


def test_curvature_clip_injected_wider_than_the_curvature_under_a_lazy_refresh():
  # An injected float64 c beside float32 moments made the refresh branch's scale float64 and the
  # other branch's float32: lax.cond refused the step ("branches must have equal output types").
  params = {"w": jnp.ones(4, jnp.float32)}
  loss = lambda p: jnp.sum(jnp.sin(p["w"]) ** 2 * jnp.arange(1.0, 5.0, dtype=jnp.float32))
  updates = {}
  for dtype in (jnp.float32, jnp.float64):
    tx = optax.inject_hyperparams(
      ah.adahessian, static_args=ah.STATIC_ARGS, hyperparam_dtype=dtype
    )(learning_rate=1.0, curvature_clip=0.5, update_freq=2)
    state = tx.init(params)
    step = jax.jit(lambda s, tx=tx: tx.update(jax.grad(loss)(params), s, params, value_fn=loss))
    for _ in range(3):
      updates[dtype], state = step(state)
  # float32 and float64 hyperparameters (b2 = 0.999 rounds differently): rounding apart.
  np.testing.assert_allclose(updates[jnp.float64]["w"], updates[jnp.float32]["w"], rtol=1e-5)


def test_curvature_clip_injected_in_float16_leaves_a_steady_curvature_alone():
  # inject_hyperparams casts c to float16 for float16 params; c / 2**32 computed in float16
  # flushed to 0, so from step 11 on every refresh step's curvature and gradient were scaled
  # down (nu fell from 8.0 to 5.6 in 4 steps) on a quadratic whose curvature never changes.
  params = {"w": jnp.full((4, 3), 0.5, jnp.float16)}
  weights = jnp.arange(1.0, 13.0, dtype=jnp.float32).reshape(4, 3)
  loss = lambda p: jnp.sum(p["w"].astype(jnp.float32) ** 2 * weights)
  runs = {}
  for clip in (None, 2.0):
    tx = optax.inject_hyperparams(ah.adahessian, static_args=ah.STATIC_ARGS)(
      learning_rate=0.01, curvature_clip=clip
    )
    state, p, updates = tx.init(params), params, []
    step = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p, value_fn=loss))
    for _ in range(14):
      u, state = step(jax.grad(loss)(p), state, p)
      p = optax.apply_updates(p, u)
      updates.append(u["w"])
    runs[clip] = (np.stack(updates), ah.find_adahessian_state(state).nu["w"])
  np.testing.assert_allclose(runs[2.0][0], runs[None][0], rtol=1e-6)
  np.testing.assert_allclose(runs[2.0][1], runs[None][1], rtol=1e-6)
  b2 = float(jnp.float16(0.999))  # as injected
  corrected = runs[2.0][1] / (1 - b2**14)
  np.testing.assert_allclose(corrected, 4 * weights**2, rtol=1e-3)  # D = 2 * weights


def spiky_regression():
  """A 2-layer tanh regression and a loss that one batch (scale 1e10) makes far too large."""
  r = np.random.default_rng(0)
  x = jnp.asarray(r.normal(size=(128, 6)))
  y = jnp.tanh(x @ jnp.asarray(r.normal(size=6)))
  params = {"w1": jnp.asarray(r.normal(size=(6, 16)) / np.sqrt(6)), "w2": jnp.zeros(16)}
  loss = lambda p, scale=1.0: scale * jnp.mean((jnp.tanh(x @ p["w1"]) @ p["w2"] - y) ** 2)
  return params, loss


@pytest.mark.parametrize("config", [{}, {"curvature_floor": 0.3, "update_clip": 0.05}])
def test_curvature_clip_keeps_one_spiked_batch_from_stalling_the_run(config):
  # Step 10's loss is 1e10 times too large. The paper's rule (and the recommended stabilizers)
  # put 1e17 times the curvature into nu, which b2 = 0.999 forgets over ~39,000 steps: the run
  # stalls where it was. The clip scales that step's curvature and gradient down together.
  params, loss = spiky_regression()
  tx_of = lambda **kw: optax.chain(
    optax.clip_by_global_norm(1.0), ah.adahessian(0.15, **config, **kw)
  )
  finals = {}
  for name, clip, spike in (
    ("clean", None, 1.0),
    ("stalled", None, 1e10),
    ("clipped", 10.0, 1e10),
    ("clipped_clean", 10.0, 1.0),
  ):
    tx = tx_of(curvature_clip=clip)

    @jax.jit
    def step(p, s, scale, tx=tx):
      u, s = tx.update(jax.grad(loss)(p, scale), s, p, value_fn=lambda q: loss(q, scale))
      return optax.apply_updates(p, u), s

    p, s = params, tx.init(params)
    for t in range(60):
      if t == 10:
        finals[f"{name}_before_spike"] = float(loss(p))
      p, s = step(p, s, spike if t == 10 else 1.0)
    finals[name] = float(loss(p))
  # Stalled for good at the loss before the spike (0.157 / 0.432 here; clean: 0.049 / 0.068).
  np.testing.assert_allclose(finals["stalled"], finals["stalled_before_spike"], rtol=1e-3)
  assert finals["stalled"] > 3 * finals["clean"], finals
  assert finals["clipped"] < 2 * finals["clean"], finals  # 0.082 / 0.093
  assert finals["clipped_clean"] == finals["clean"]  # healthy steps never reach the bound


class _Layer(NamedTuple):
  w: jax.Array
  b: jax.Array


@pytest.mark.parametrize("tree", ["tuple", "namedtuple", "masked", "multi_transform"])
def test_curvature_floor_on_tuple_nodes_and_inside_optax_masks(tree):
  # Tuples and NamedTuples (optax.MaskedNode is an empty one) are nodes of a params tree: each
  # leaf gets the floor it gets in a dict. (They were taken for leaves, and the floor crashed.)
  d = {"w": np.asarray([0.0, -2.0, 6.0, 0.4]), "b": np.asarray([0.0, 1.0])}  # means 2.1, 0.5
  floored = {k: np.maximum(np.abs(v), 0.5 * np.abs(v).mean()) for k, v in d.items()}
  make = {"tuple": lambda x: (x["w"], x["b"]), "namedtuple": lambda x: _Layer(x["w"], x["b"])}
  pack = make.get(tree, lambda x: dict(x))
  params = pack({k: jnp.zeros(v.shape) for k, v in d.items()})
  grads = pack({k: jnp.ones(v.shape) for k, v in d.items()})
  hdiag = pack({k: jnp.asarray(v) for k, v in d.items()})
  tx = ah.scale_by_adahessian(curvature_floor=0.5)
  owned = ["w", "b"]
  if tree == "masked":
    tx, owned = optax.masked(tx, {"w": True, "b": False}), ["w"]
  elif tree == "multi_transform":
    tx, owned = (
      optax.multi_transform({"ah": tx, "sgd": optax.sgd(1.0)}, {"w": "ah", "b": "sgd"}),
      ["w"],
    )
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params, hessian_diag=hdiag)
  got = dict(updates) if isinstance(updates, dict) else {"w": updates[0], "b": updates[1]}
  for k in owned:
    np.testing.assert_allclose(np.asarray(got[k]), 1 / (floored[k] + 1e-4), rtol=1e-12)
  if tree == "masked":  # passed through unchanged
    np.testing.assert_array_equal(np.asarray(got["b"]), 1.0)
  if tree == "multi_transform":  # SGD's step
    np.testing.assert_array_equal(np.asarray(got["b"]), -1.0)


def test_curvature_floor_is_per_layer_on_stacked_leaves():
  # Layer l has curvature 10**l, with one entry of layer 0 near zero. A leaf-wide floor
  # (α·mean over all layers = 0.5·277.8) would flatten layer 0; per layer it floors that entry only.
  scales = 10.0 ** np.arange(4)[:, None]
  d = scales * np.ones((4, 3))
  d[0, 0] = 1e-6
  params = {"stack": jnp.zeros((4, 3))}
  grads = {"stack": jnp.ones((4, 3))}
  tx = ah.scale_by_adahessian(
    curvature_floor=0.5, averaging=ah.spatial.per_layer(ah.spatial.none())
  )
  updates, _ = jax.jit(tx.update)(
    grads, tx.init(params), params, hessian_diag={"stack": jnp.asarray(d)}
  )
  layer_mean = d.mean(axis=1, keepdims=True)
  floored = np.maximum(d, 0.5 * layer_mean)
  np.testing.assert_allclose(np.asarray(updates["stack"]), 1 / (floored + 1e-4), rtol=1e-12)
  assert floored[0, 0] == pytest.approx(0.5 * (2 + 1e-6) / 3)


def test_curvature_floor_falls_back_to_the_model_mean_for_a_leaf_without_curvature():
  params = {"flat": jnp.zeros(2), "curved": jnp.zeros(2)}
  grads = {"flat": jnp.ones(2), "curved": jnp.ones(2)}
  hdiag = {"flat": jnp.zeros(2), "curved": jnp.asarray([1.0, 3.0])}  # model mean 1.0
  tx = ah.scale_by_adahessian(curvature_floor=0.5)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params, hessian_diag=hdiag)
  np.testing.assert_allclose(np.asarray(updates["flat"]), 1 / (0.5 + 1e-4), rtol=1e-12)
  np.testing.assert_allclose(np.asarray(updates["curved"]), 1 / (np.array([1.0, 3.0]) + 1e-4))


def test_a_traced_zero_floor_keeps_only_the_non_finite_entries_curvature():
  # optax.inject_hyperparams injects the default curvature_floor=0.0, traced under jit: 0 times
  # the leaf's NaN mean made the whole leaf's D NaN, so every entry kept its old curvature.
  params = {"w": jnp.asarray([0.5, -1.0, 2.0])}
  grads = {"w": jnp.ones(3)}
  tx = optax.inject_hyperparams(ah.adahessian)(0.1)
  update = jax.jit(tx.update)
  state = tx.init(params)
  _, state = update(grads, state, params, hessian_diag={"w": jnp.asarray([2.0, 3.0, 4.0])})
  _, state = update(grads, state, params, hessian_diag={"w": jnp.asarray([jnp.nan, 5.0, 6.0])})
  nu = np.asarray(ah.find_adahessian_state(state).nu["w"])
  # Entry 0 keeps step 1's corrected curvature 2² (nu = 0.001·2²·(1 − 0.999²)/(1 − 0.999)); the
  # others move on: 0.999·0.001·D₁² + 0.001·D₂².
  np.testing.assert_allclose(nu, [0.004 * 1.999, 0.999 * 0.009 + 0.025, 0.999 * 0.016 + 0.036])


def test_a_constant_zero_curvature_clears_the_first_step_mark_under_jit():
  # The loss is linear in b: its Hessian-diagonal estimate is a constant zero, which XLA folds;
  # the mark of "no curvature yet" (nu = -0.0) was cleared by -0.0 + 0.0 = +0.0, an addition
  # XLA simplifies away, so under jit b never moved.
  loss = lambda p: jnp.sum(p["w"] ** 2) + 0.7 * jnp.sum(p["b"])
  params = {"w": jnp.ones(2), "b": jnp.ones(3)}
  tx = ah.adahessian(0.1)

  def step(params, state):
    ones = jax.tree.map(jnp.ones_like, params)
    hdiag = jax.jvp(jax.grad(loss), (params,), (ones,))[1]  # exact: the Hessian is diagonal
    updates, state = tx.update(jax.grad(loss)(params), state, params, hessian_diag=hdiag)
    return optax.apply_updates(params, updates), state

  eager, compiled = (params, tx.init(params)), (params, tx.init(params))
  for _ in range(2):
    eager, compiled = step(*eager), jax.jit(step)(*compiled)
  # Algorithm 1 for b: g = 0.7, D = 0, so each step moves it by lr · m̂ / eps = 0.1 · 0.7 / 1e-4.
  np.testing.assert_allclose(compiled[0]["b"], 1 - 2 * 700.0, rtol=1e-6)
  np.testing.assert_allclose(compiled[0]["b"], eager[0]["b"], rtol=1e-6)
  assert not np.any(np.signbit(np.asarray(ah.find_adahessian_state(compiled[1]).nu["b"])))


def test_a_second_moment_that_would_overflow_keeps_its_previous_value():
  # D = 1e200 is finite in float64, D² is not: nu became inf and froze the entry for good.
  params = {"w": jnp.ones(2)}
  tx = ah.scale_by_adahessian(b2=0.5)
  state = tx.init(params)
  grads = {"w": jnp.ones(2)}
  _, state = tx.update(grads, state, params, hessian_diag={"w": jnp.asarray([2.0, 2.0])})
  updates, state = tx.update(grads, state, params, hessian_diag={"w": jnp.asarray([1e200, 2.0])})
  nu = np.asarray(state.nu["w"])
  # Entry 0 keeps step 1's corrected curvature 2² (its nu rescaled to step 2's bias correction),
  # so with the same D as its neighbour it has the same nu.
  np.testing.assert_allclose(nu, [0.75 * 4.0, 0.75 * 4.0])
  assert np.all(np.isfinite(np.asarray(updates["w"])))
  _, state = tx.update(grads, state, params, hessian_diag={"w": jnp.asarray([2.0, 2.0])})
  np.testing.assert_allclose(np.asarray(state.nu["w"]), [0.875 * 4.0, 0.875 * 4.0])


def test_a_lazy_refresh_whose_d_squared_would_overflow_keeps_the_stored_d():
  # D = 1e200 is finite in float64, D² is not. With update_freq=2 (lazy_moment="repeat") it was
  # stored all the same, and nu kept its value, not rescaled, on every step until the next
  # refresh: the bias-corrected curvature shrank (4 -> 3.43 -> 3.2 here) and the step grew
  # (0.50 -> 0.54 -> 0.56), and the next refresh did not restore it (3.61). It is dropped like
  # a non-finite estimate now: the stored D stays 2, and entry 0 moves with it exactly as
  # entry 1, whose D is 2 throughout.
  params = {"w": jnp.ones(2)}
  tx = ah.scale_by_adahessian(b2=0.5, update_freq=2)
  state = tx.init(params)
  grads = {"w": jnp.ones(2)}
  for d0 in (2.0, 0.0, 1e200, 0.0, 2.0):  # refresh steps 0, 2, 4; the others use the stored D
    updates, state = tx.update(grads, state, params, hessian_diag={"w": jnp.asarray([d0, 2.0])})
    np.testing.assert_array_equal(np.asarray(state.hessian["w"]), [2.0, 2.0])
    nu, u = np.asarray(state.nu["w"]), np.asarray(updates["w"])
    np.testing.assert_allclose(nu[0], nu[1], rtol=1e-12)
    np.testing.assert_allclose(u[0], u[1], rtol=1e-12)


def test_float16_updates_larger_than_65504_before_the_learning_rate_saturate():
  # No curvature (a linear loss): the paper's step is lr · g / eps = 0.1 · 7 / 1e-4 = 7000, but
  # g / eps = 70000 passes float16's range before the learning rate scales it: it became inf
  # (and the parameter -inf); it now saturates at 65504, a step of 6550.4.
  params = {"a": jnp.ones(2, jnp.float16)}
  tx = ah.adahessian(0.1)
  grads = {"a": jnp.full(2, 7.0, jnp.float16)}
  updates, _ = tx.update(
    grads, tx.init(params), params, hessian_diag={"a": jnp.zeros(2, jnp.float16)}
  )
  new = optax.apply_updates(params, updates)
  assert new["a"].dtype == jnp.float16
  assert updates["a"].dtype == jnp.float16
  np.testing.assert_allclose(np.asarray(new["a"], np.float64), 1 - 6550.4, rtol=1e-3)


def test_a_python_float_estimate_for_a_scalar_parameter():
  params = {"s": jnp.asarray(1.0), "w": jnp.ones(2)}
  tx = ah.scale_by_adahessian(b2=0.5)
  grads = {"s": jnp.asarray(1.0), "w": jnp.ones(2)}
  hdiag = {"s": 4.0, "w": np.full(2, 4.0)}
  eager, _ = tx.update(grads, tx.init(params), params, hessian_diag=hdiag)
  compiled, _ = jax.jit(tx.update)(grads, tx.init(params), params, hessian_diag=hdiag)
  # m̂ = 1, v̂ = 16: 1 / (4 + 1e-4) everywhere.
  for u in (eager, compiled):
    np.testing.assert_allclose(np.asarray(u["s"]), 1 / (4 + 1e-4), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(u["w"]), 1 / (4 + 1e-4), rtol=1e-6)


def test_a_python_float_gradient_for_a_scalar_parameter():
  # Like optax's own transforms, a gradient leaf may be a Python number (it had no .dtype).
  params = {"s": jnp.asarray(1.0), "w": jnp.ones(2)}
  tx = ah.scale_by_adahessian(b2=0.5)
  updates, _ = tx.update(
    {"s": 1.0, "w": np.ones(2)},
    tx.init(params),
    params,
    hessian_diag={"s": 4.0, "w": np.full(2, 4.0)},
  )
  np.testing.assert_allclose(np.asarray(updates["s"]), 1 / (4 + 1e-4), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(updates["w"]), 1 / (4 + 1e-4), rtol=1e-6)


def test_python_float_moments_of_a_scalar_parameter_update_as_under_jit():
  # A hand-built state with Python float moments: jit reads them as arrays, the eager update
  # failed with "'float' object has no attribute 'dtype'".
  params = {"s": jnp.asarray(1.0), "w": jnp.ones(2)}
  tx = ah.scale_by_adahessian(b2=0.5)
  state = tx.init(params)
  floats = state._replace(
    mu={**state.mu, "s": float(state.mu["s"])}, nu={**state.nu, "s": float(state.nu["s"])}
  )
  args = ({"s": jnp.asarray(1.0), "w": jnp.ones(2)},)
  hdiag = {"s": jnp.asarray(4.0), "w": jnp.full(2, 4.0)}
  eager = tx.update(*args, floats, params, hessian_diag=hdiag)
  compiled = jax.jit(tx.update)(*args, floats, params, hessian_diag=hdiag)
  assert_trees_allclose(eager, compiled, rtol=1e-6, atol=0)
  np.testing.assert_allclose(np.asarray(eager[0]["s"]), 1 / (4 + 1e-4), rtol=1e-6)
  assert float(eager[1].nu["s"]) == 8.0  # (1 - 0.5)·4²


def test_curvature_floor_traces_for_leaves_beyond_int32_counts():
  # The floor's per-leaf and model-wide means divided by Python int counts, which JAX passes as
  # int32: a leaf of 2**31 entries or more raised OverflowError. Abstract shapes only (eval_shape).
  params = {"w": jax.ShapeDtypeStruct((2**16, 2**15 + 1), jnp.float32)}
  tx = ah.adahessian(0.1, curvature_floor=0.3)
  state = jax.eval_shape(tx.init, params)
  updates, _ = jax.eval_shape(lambda p, s: tx.update(p, s, p, hessian_diag=p), params, state)
  assert updates["w"].shape == (2**16, 2**15 + 1) and updates["w"].dtype == jnp.float32


def test_block_size_beside_the_default_rule_or_rules_per_leaf_is_accepted():
  for averaging in (None, ah.spatial.strict(), ah.spatial.flax_default(4), lambda path, leaf: None):
    ah.adahessian(0.1, block_size=4, averaging=averaging)


def test_block_size_that_a_callable_or_tree_of_rules_would_drop_is_refused_at_init():
  # block_size is the default rule's blocks; a callable or a prefix giving every leaf of the params
  # a rule of its own trained with other blocks and no error. Only init sees the leaves.
  params = {"w": jnp.ones((8, 4)), "b": jnp.ones((4,))}
  own = ah.spatial.blocks(2, 0)
  for averaging, how in (
    (lambda path, leaf: own if leaf.ndim == 2 else ah.spatial.none(), "callable returns None"),
    ({"w": own, "b": ah.spatial.none()}, "tree has None"),
  ):
    tx = ah.adahessian(0.1, block_size=4, averaging=averaging)
    with pytest.raises(ValueError, match=rf"block_size=4 would not be used: .*the {how}"):
      tx.init(params)
  # One leaf left to the default uses block_size: its D is the mean over blocks of 4 inputs.
  tx = ah.scale_by_adahessian(block_size=4, averaging={"w": None, "b": ah.spatial.none()})
  state = tx.init(params)
  hdiag = {"w": jnp.arange(32.0).reshape(8, 4), "b": jnp.arange(4.0)}
  _, state = jax.jit(tx.update)(params, state, params, hessian_diag=hdiag)
  expected = np.repeat(np.arange(32.0).reshape(2, 4, 4).mean(1), 4, axis=0)
  np.testing.assert_allclose(np.sqrt(state.nu["w"] / (1 - 0.999)), expected, rtol=1e-5)


def test_init_calls_an_averaging_callable_once_per_leaf():
  # init resolved the rules, then resolved every leaf's rule again to check that block_size is
  # used: a callable (path, leaf) -> rule ran twice per leaf.
  params = {"w": jnp.ones((8, 4)), "b": jnp.ones((4,)), "deep": {"k": jnp.ones((3, 5))}}
  calls = collections.Counter()

  def averaging(path, leaf):
    calls[jax.tree_util.keystr(path)] += 1
    return None if leaf.ndim == 2 else ah.spatial.none()

  ah.scale_by_adahessian(block_size=4, averaging=averaging).init(params)
  assert calls == {"['w']": 1, "['b']": 1, "['deep']['k']": 1}
  # The check still refuses a block_size that no leaf's rule uses, on the same single reading.
  calls.clear()
  every = lambda path, leaf: calls.update([jax.tree_util.keystr(path)]) or ah.spatial.none()
  with pytest.raises(ValueError, match="block_size=4 would not be used"):
    ah.scale_by_adahessian(block_size=4, averaging=every).init(params)
  assert calls == {"['w']": 1, "['b']": 1, "['deep']['k']": 1}


@pytest.fixture(scope="module")
def flag_calls():
  """For every bool parameter of the Hessian tools, hutchinson and spatial, by the name of its
  function: ``(parameter, call(value))``, a call that passes ``value`` as that parameter and
  nothing else wrong."""
  from adahessian_jax import hessian, hutchinson, spatial

  params = {"x": jnp.asarray([1.0, -2.0, 0.5]), "y": jnp.asarray([0.3, 0.7])}
  loss = lambda p, batch: jnp.sum(p["x"] ** 2 * batch) + jnp.sum(p["y"] ** 4)
  op = hessian.hessian_operator(loss, params, jnp.asarray([1.0, 2.0, 3.0]))
  key = jax.random.key(0)
  fn = lambda p: loss(p, 1.0)
  density = hessian.spectral_density(op, key, num_probes=1, num_steps=4, num_points=200)
  plane = hessian.loss_landscape_2d(op, [-1.0, 1.0], [-1.0, 1.0], key=key)
  conv = {"w": jnp.zeros((3, 3, 4, 4))}  # an unnamed rank-4 kernel: its rule is a guess
  return {
    "value_grad_hvp": ("has_aux", lambda v: hutchinson.value_grad_hvp(fn, params, params, v)),
    "value_grad_and_diagonal": (
      "has_aux",
      lambda v: hutchinson.value_grad_and_diagonal(fn, params, key[None], v),
    ),
    "value_grad_and_diagonal(flat)": (
      "flat",
      lambda v: hutchinson.value_grad_and_diagonal(fn, params, key[None], flat=v),
    ),
    "layer_breakdown": (
      "eigenvalues",
      lambda v: hessian.layer_breakdown(op, key, num_samples=2, eigenvalues=v),
    ),
    "top_eigenvalues": (
      "check_repeated",
      lambda v: hessian.top_eigenvalues(op, 2, check_repeated=v),
    ),
    "plot_spectral_density": ("log", lambda v: hessian.plot_spectral_density(density, log=v)),
    "plot_landscape_2d": ("log", lambda v: hessian.plot_landscape_2d(plane, log=v)),
    "plot_landscape_2d(colorbar)": (
      "colorbar",
      lambda v: hessian.plot_landscape_2d(plane, colorbar=v),
    ),
    "describe": ("strict", lambda v: spatial.describe(conv, strict=v)),
    "resolve_rules": ("strict", lambda v: spatial.resolve_rules(None, conv, strict=v)),
    "resolve_rules(warn)": ("warn", lambda v: spatial.resolve_rules(None, conv, warn=v)),
    "Averaging": ("Averaging: strict", lambda v: spatial.Averaging(strict=v)),
    "Listing.table": ("why", lambda v: spatial.describe(conv).table(why=v)),
  }


_FLAG_CALLS = (
  "value_grad_hvp value_grad_and_diagonal value_grad_and_diagonal(flat) layer_breakdown "
  "top_eigenvalues plot_spectral_density plot_landscape_2d plot_landscape_2d(colorbar) describe "
  "resolve_rules resolve_rules(warn) Averaging Listing.table"
).split()


@pytest.mark.parametrize("value", ["False", 0])
@pytest.mark.parametrize("function", _FLAG_CALLS)
def test_the_bool_flags_of_the_hessian_tools_and_spatial_refuse_other_values(
  flag_calls, function, value
):
  """A str from a config is truthy: log="False" drew a log scale, strict="False" refused the
  guessed leaves, warn="False" warned, eigenvalues="False" ran Lanczos, has_aux="False" failed
  saying "has_aux=True"; 0 and None were read as False. Each is refused before any work, naming
  the parameter (the plots before matplotlib is imported)."""
  name, call = flag_calls[function]
  with pytest.raises(ValueError, match=rf"^{name} must be True or False, got {value!r}\.$"):
    call(value)
