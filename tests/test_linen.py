"""Flax Linen: TrainState forwards the loss; BatchNorm + dropout semantics."""

import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import CompileCounter, assert_trees_allclose
from flax.training import train_state as flax_train_state

import adahessian_jax as ah
from adahessian_jax.linen import TrainState


class Net(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(16, param_dtype=jnp.float64)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, param_dtype=jnp.float64)(x)
    x = nn.Dropout(0.3, deterministic=not train)(nn.relu(x))
    return nn.Dense(3, param_dtype=jnp.float64)(x)


@pytest.fixture
def setup():
  r = np.random.default_rng(0)
  x = jnp.asarray(r.normal(size=(32, 5)))
  y = jnp.asarray(r.integers(0, 3, size=32))
  model = Net()
  variables = model.init(jax.random.key(0), x, train=False)
  return model, variables, x, y


def make_loss(model, batch_stats, x, y, key):
  def loss_fn(params):
    logits, mutated = model.apply(
      {"params": params, "batch_stats": batch_stats},
      x,
      train=True,
      rngs={"dropout": key},
      mutable=["batch_stats"],
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, mutated["batch_stats"]

  return loss_fn


def test_flax_train_state_cannot_forward_but_ours_can(setup):
  model, variables, x, y = setup
  tx = ah.adahessian(0.1)
  loss_fn = make_loss(model, variables["batch_stats"], x, y, jax.random.key(1))
  value_fn = lambda p: loss_fn(p)[0]
  grads = jax.jit(jax.grad(value_fn))(variables["params"])
  plain = flax_train_state.TrainState.create(
    apply_fn=model.apply, params=variables["params"], tx=tx
  )
  # Flax's own drops the closure on the floor; the transform then says what is missing.
  with pytest.raises(ValueError, match="needs the loss"):
    plain.apply_gradients(grads=grads, value_fn=value_fn)
  ours = TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx)
  # Jitted: op by op, the step compiles each of its ~300 ops on its own.
  stepped = jax.jit(lambda s, g: s.apply_gradients(grads=g, value_fn=value_fn))(ours, grads)
  assert int(stepped.step) == 1
  # Without the loss, the documented error, not a silent step.
  with pytest.raises(ValueError, match="value_fn"):
    ours.apply_gradients(grads=grads)


@pytest.mark.parametrize("update_freq", [1, 2])
def test_apply_loss_with_batchnorm_and_dropout_matches_closure_route(setup, update_freq):
  model, variables, x, y = setup
  # Lazy refresh reuses step 1's estimate at step 2; an entry that came out near zero then
  # gives two huge steps instead of one (benchmarks/PAPER.md, Table 6), so k=2 runs at a
  # smaller learning rate here.
  lr = 0.1 if update_freq == 1 else 0.02
  tx = ah.adahessian(lr, weight_decay=1e-3, update_freq=update_freq, seed=4)
  fused_state = TrainState.create(
    apply_fn=model.apply,
    params=variables["params"],
    batch_stats=variables["batch_stats"],
    tx=tx,
  )
  closure_state = fused_state

  @jax.jit
  def fused_step(state, key):
    loss_fn = make_loss(model, state.batch_stats, x, y, key)
    state, (loss, batch_stats) = state.apply_loss(loss_fn, has_aux=True)
    return state.replace(batch_stats=batch_stats), loss

  @jax.jit
  def closure_step(state, key):
    loss_fn = make_loss(model, state.batch_stats, x, y, key)
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(
      grads=grads, value_fn=lambda p: loss_fn(p)[0], batch_stats=batch_stats
    )
    return state, loss

  @jax.jit  # one program, not op by op
  def forward(params, batch_stats, key):
    return make_loss(model, batch_stats, x, y, key)(params)

  def eval_loss(state):
    # Training-mode loss (batch statistics) with one fixed dropout mask: after 12 steps
    # the running averages (momentum 0.9) are still far from the batch statistics.
    return float(forward(state.params, state.batch_stats, jax.random.key(7))[0])

  initial = eval_loss(fused_state)
  for i in range(12):
    key = jax.random.key(100 + i)
    # The running statistics move exactly once per step: as after one forward pass.
    _, expected_stats = forward(fused_state.params, fused_state.batch_stats, key)
    fused_state, loss = fused_step(fused_state, key)
    closure_state, _ = closure_step(closure_state, key)
    assert_trees_allclose(fused_state.batch_stats, expected_stats, rtol=1e-13)
  # atol: a bias in front of BatchNorm has zero gradient and curvature; its entries are rounding
  # noise (~1e-16) divided by eps, so the two routes' fusions differ there at ~1e-14.
  assert_trees_allclose(fused_state.params, closure_state.params, rtol=1e-11, atol=1e-12)
  assert_trees_allclose(fused_state.batch_stats, closure_state.batch_stats, rtol=1e-11)
  assert eval_loss(fused_state) < (0.7 if update_freq == 1 else 0.95) * initial


def test_create_refuses_the_whole_variables_dict_as_params(setup):
  # params=model.init(...) holds batch_stats beside params: a loss of apply_fn(params, x) read the
  # running statistics from params and the optimizer stepped them (here weight decay and the
  # gradient moved BatchNorm's mean and var), silently.
  model, variables, x, y = setup
  tx = ah.adahessian(0.1, weight_decay=0.1)
  fix = r"params=variables\['params'\], batch_stats=variables\['batch_stats'\]"
  with pytest.raises(ValueError, match=r"holds the collection\(s\) \['batch_stats'\] .*" + fix):
    TrainState.create(apply_fn=model.apply, params=variables, tx=tx)
  with pytest.raises(ValueError, match=r"\['cache', 'intermediates'\]"):
    wrapped = {"params": variables["params"], "cache": {}, "intermediates": {}}
    TrainState.create(apply_fn=model.apply, params=wrapped, tx=tx)
  # The variables dict of a model with parameters only, and the parameters, are parameters.
  for params in ({"params": variables["params"]}, variables["params"]):
    state = TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    assert jax.tree.structure(state.params) == jax.tree.structure(params)


def test_overwrite_with_gradient_collection_is_replaced_not_stepped():
  # fp8 training keeps scales and amax histories in Flax's '_overwrite_with_gradient' collection:
  # Flax's TrainState.create makes the optimizer state for params['params'] only, and
  # apply_gradients replaces that collection by its gradient (the new values).
  owg = flax_train_state.OVERWRITE_WITH_GRADIENT
  params = {"params": {"w": jnp.ones((3, 2))}, owg: {"amax": jnp.zeros(4)}}

  def loss(p):
    return jnp.sum((p["params"]["w"].sum(0) - 1.0) ** 2) + jnp.sum(p[owg]["amax"] * 2.0)

  tx = ah.adahessian(0.1)
  state = TrainState.create(apply_fn=None, params=params, tx=tx)
  grads = jax.jit(jax.grad(loss))(params)
  value_fn = lambda w: loss({"params": w, owg: params[owg]})
  # Each step one program, not op by op.
  stepped = jax.jit(lambda s, g: s.apply_gradients(grads=g, value_fn=value_fn))(state, grads)
  updates, opt_state = jax.jit(lambda g, p: tx.update(g, tx.init(p), p, value_fn=value_fn))(
    grads["params"], params["params"]
  )
  assert_trees_allclose(stepped.params["params"], optax.apply_updates(params["params"], updates))
  assert_trees_allclose(stepped.opt_state, opt_state)
  np.testing.assert_array_equal(stepped.params[owg]["amax"], np.full(4, 2.0))
  # The fused route would precondition the collection like parameters: refused, saying what to do.
  with pytest.raises(ValueError, match="_overwrite_with_gradient.*apply_gradients"):
    state.apply_loss(loss)


def test_apply_loss_with_aux_or_without_it_against_has_aux_says_so():
  state = TrainState.create(apply_fn=None, params={"w": jnp.ones(3)}, tx=ah.adahessian(0.1))
  loss = lambda p: jnp.sum(p["w"] ** 2)
  with pytest.raises(TypeError, match="loss_fn returned a tuple.*has_aux=True"):
    state.apply_loss(lambda p: (loss(p), p["w"].mean()))
  with pytest.raises(TypeError, match=r"has_aux=True.*\(loss, aux\).*array of shape \(\)"):
    state.apply_loss(loss, has_aux=True)
  # (loss, aux1, aux2): the errors told to pass has_aux=True, then to drop it.
  three = lambda p: (loss(p), p["w"].mean(), p["w"].max())  # noqa: E731
  pack = r"tuple of 3.*Pack the auxiliary values into one: return loss, \(aux1, aux2, ...\)"
  for has_aux in (False, True):
    with pytest.raises(TypeError, match=pack):
      state.apply_loss(three, has_aux=has_aux)


def test_apply_loss_refuses_flags_that_are_no_bool():
  """A str from a config is truthy: has_aux="False" and independent_probes="False" were read as
  True, and the errors said "has_aux=True" and "independent_probes=True" of values the caller had
  not given; expected_independent_probes="False" of apply_gradients refused a tx that matched."""
  state = TrainState.create(apply_fn=None, params={"w": jnp.ones(3)}, tx=ah.adahessian(0.1))
  loss = lambda p: jnp.sum(p["w"] ** 2)
  for flag in ("has_aux", "independent_probes"):
    with pytest.raises(ValueError, match=rf"apply_loss: {flag} must be True or False, got 'False'"):
      state.apply_loss(loss, **{flag: "False"})
  with pytest.raises(ValueError, match=r"apply_loss: independent_probes must be .*, got 0\."):
    state.apply_loss(loss, independent_probes=0)
  grads = {"w": jnp.ones(3)}
  kw = dict(grads=grads, value_fn=loss)
  with pytest.raises(ValueError, match=r"expected_independent_probes must be .*, got 'False'"):
    state.apply_gradients(**kw, expected_independent_probes="False")
  assert state.apply_gradients(**kw, expected_independent_probes=False).step == 1


def test_apply_loss_with_another_optimizer_says_to_use_apply_gradients():
  # It failed inside value_grad_and_hessian_diag, telling a TrainState user to pass a state
  # "after params" to a function they had not called.
  state = TrainState.create(apply_fn=None, params={"w": jnp.ones(3)}, tx=optax.adam(0.1))
  with pytest.raises(ValueError, match=r"tx holds no AdaHessian.*apply_gradients\(grads=grads\)"):
    state.apply_loss(lambda p: jnp.sum(p["w"] ** 2))


def test_apply_loss_refuses_an_unbound_axis_name_and_independent_probes_without_one():
  # The data-parallel form is checked numerically in test_distributed.py (pmap and shard_map).
  state = TrainState.create(apply_fn=None, params={"w": jnp.ones(3)}, tx=ah.adahessian(0.1))
  loss = lambda p: jnp.sum(p["w"] ** 4)
  with pytest.raises(ValueError, match="independent_probes=True.*needs the axis_name"):
    state.apply_loss(loss, independent_probes=True)
  with pytest.raises(ValueError, match="axis_name='data' is not an axis of the enclosing pmap"):
    state.apply_loss(loss, axis_name="data")


def test_apply_loss_refuses_a_tx_that_averages_the_estimate_over_another_axis():
  # Under a map (vmap binds axis names like pmap) a tx that does not average the estimate over
  # the axis apply_loss averaged the gradients over stepped each replica with its own second
  # moment, silently: the replicas drifted apart.
  params = {"w": jnp.ones(3)}
  batches = jnp.array([[1.0, 2.0, 3.0], [-2.0, 0.5, 4.0]])  # one row per replica
  loss = lambda p, b: jnp.sum(b * p["w"] ** 4)

  def run(tx, **kw):
    state = TrainState.create(apply_fn=None, params=params, tx=tx)
    step = lambda b: state.apply_loss(loss, b, **kw)[0].params["w"]
    return jax.jit(jax.vmap(step, axis_name="data"))(batches)  # one program, not op by op

  with pytest.raises(
    ValueError,
    match=r"averages the estimate over axis_name=None.*"
    r"axis_name='data'\)\)",
  ):
    run(ah.adahessian(0.1), axis_name="data")
  with pytest.raises(
    ValueError,
    match=r"over axis_name='data'.*expected_axis_name=None.*"
    r"apply_loss\(\.\.\., axis_name='data'\)",
  ):
    run(ah.adahessian(0.1, axis_name="data"))
  with pytest.raises(ValueError, match=r"averages the estimate over axis_name='other'"):
    jax.vmap(
      lambda: run(ah.adahessian(0.1, axis_name="other"), axis_name="data"),
      axis_name="other",
      axis_size=2,
    )()
  # The same axis, spelled as a tuple: the replicas agree, with the estimate of the whole batch.
  w = run(ah.adahessian(0.1, axis_name=("data",)), axis_name="data")
  mean = jnp.mean(batches, axis=0)
  tx = ah.adahessian(0.1)
  single = TrainState.create(apply_fn=None, params=params, tx=tx)
  single = jax.jit(lambda s: s.apply_loss(lambda p: jnp.sum(mean * p["w"] ** 4))[0])(single)
  np.testing.assert_allclose(w[0], w[1], rtol=0, atol=0)
  np.testing.assert_allclose(w[0], single.params["w"], rtol=1e-6)


def test_apply_loss_refuses_a_tx_built_with_other_independent_probes():
  """In the fused route apply_loss draws the probes, so a tx built with independent_probes=True
  under apply_loss without it stepped with the same probes on every device (and the reverse
  with independent ones), silently ignoring tx's setting."""
  params = {"w": jnp.ones(3)}
  batches = jnp.array([[1.0, 2.0, 3.0], [-2.0, 0.5, 4.0]])  # one row per replica
  loss = lambda p, b: jnp.tanh(jnp.dot(b, p["w"])) ** 2  # a Hessian with off-diagonal entries

  def run(tx_independent, independent):
    tx = ah.adahessian(0.1, axis_name="data", independent_probes=tx_independent)
    state = TrainState.create(apply_fn=None, params=params, tx=tx)
    step = lambda b: state.apply_loss(loss, b, axis_name="data", independent_probes=independent)
    # One program, not op by op.
    return jax.jit(jax.vmap(lambda b: step(b)[0].params["w"], axis_name="data"))(batches)

  for tx_independent in (True, False):
    with pytest.raises(
      ValueError,
      match=rf"built with independent_probes={tx_independent}.*"
      rf"apply_loss\(\.\.\., independent_probes={tx_independent}\)",
    ):
      run(tx_independent, not tx_independent)
  same, independent = run(False, False), run(True, True)
  assert not np.allclose(same, independent)  # both policies run, and differ


def test_apply_loss_coupling_warning_reads_only_what_couples_the_loss():
  """With independent probes apply_loss warns when the loss takes a collective's result over
  ``axis_name`` nonlinearly. It warned for a metric in the aux (a perplexity ``exp`` of the
  ``pmean``-ed loss), a comparison of it (``jnp.where(pmean(loss) > 1, ...)``) and a
  ``stop_gradient``-ed normaliser, none of which carries other devices' parameters into the
  loss's Hessian, a max or sort of gathered values (piecewise linear, as ``pmax``); and missed a
  loss divided by a ``pmean`` of the parameters."""
  params = {"w": jnp.ones(3)}
  batches = jnp.array([[1.0, 2.0, 3.0], [-2.0, 0.5, 4.0]])  # one row per replica
  local = lambda p, b: jnp.tanh(jnp.dot(b, p["w"])) ** 2
  mean = lambda p, b: jax.lax.pmean(local(p, b), "data")

  def warned(loss, has_aux=False):
    tx = ah.adahessian(0.1, axis_name="data", independent_probes=True)
    state = TrainState.create(apply_fn=None, params=params, tx=tx)
    step = lambda b: state.apply_loss(
      loss, b, axis_name="data", independent_probes=True, has_aux=has_aux
    )[0].params["w"]
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      w = jax.jit(jax.vmap(step, axis_name="data"))(batches)  # one program, not op by op
    assert np.all(np.isfinite(w))
    return [str(c.message) for c in caught if "other devices' parameters" in str(c.message)]

  fine = {
    "aux metric": (lambda p, b: (local(p, b), jnp.exp(mean(p, b))), True),
    "comparison": (lambda p, b: jnp.where(mean(p, b) > 1.0, 2.0, 1.0) * local(p, b), False),
    "stop_gradient": (lambda p, b: local(p, b) / jax.lax.stop_gradient(mean(p, b)), False),
    # Piecewise linear, like pmax: a max or sort of gathered values has no second derivative.
    "max of all_gather": (
      lambda p, b: local(p, b) + jnp.max(jax.lax.all_gather(jnp.dot(b, p["w"]), "data")),
      False,
    ),
    "sort of all_gather": (
      lambda p, b: local(p, b) + jnp.sort(jax.lax.all_gather(jnp.dot(b, p["w"]), "data"))[-1],
      False,
    ),
  }
  for name, (loss, has_aux) in fine.items():
    assert warned(loss, has_aux) == [], name
  coupled = lambda p, b: local(p, b) / jax.lax.pmean(jnp.sum(p["w"] ** 2), "data")
  (message,) = warned(coupled)
  assert "'div'" in message and "independent_probes=False" in message
  # The synchronised statistic taken nonlinearly still warns.
  assert len(warned(lambda p, b: jnp.tanh(local(p, b) - mean(p, b)))) == 1


def test_apply_loss_accepts_the_axes_of_tx_in_another_order():
  """axis_name=("a", "b") and ("b", "a") average over the same devices, but the check of the
  expected axis compared the tuples and refused the step. Each replica now steps like one device
  on the mean of all four batches."""
  params = {"w": jnp.ones(3)}
  batches = jnp.array([[[1.0, 2.0, 3.0], [-2.0, 0.5, 4.0]], [[0.5, 1.0, -1.0], [3.0, 2.0, 1.0]]])
  loss = lambda p, b: jnp.sum(b * p["w"] ** 4)
  state = TrainState.create(
    apply_fn=None, params=params, tx=ah.adahessian(0.1, axis_name=("a", "b"))
  )
  step = lambda b: state.apply_loss(loss, b, axis_name=("b", "a"))[0].params["w"]
  w = jax.jit(jax.vmap(jax.vmap(step, axis_name="b"), axis_name="a"))(batches).reshape(4, 3)
  mean = jnp.mean(batches, axis=(0, 1))
  single = TrainState.create(apply_fn=None, params=params, tx=ah.adahessian(0.1))
  single = jax.jit(lambda s: s.apply_loss(lambda p: jnp.sum(mean * p["w"] ** 4))[0])(single)
  for replica in w:
    np.testing.assert_allclose(replica, single.params["w"], rtol=1e-6)


class _EMAState(TrainState):
  """The usual Flax pattern: a subclass whose apply_gradients also keeps an EMA of the params."""

  ema: Any = None

  def apply_gradients(self, *, grads, **kwargs):
    new = super().apply_gradients(grads=grads, **kwargs)
    return new.replace(ema=jax.tree.map(lambda e, p: 0.5 * e + 0.5 * p, self.ema, new.params))


def test_apply_loss_steps_through_an_overridden_apply_gradients():
  """apply_loss stepped tx itself, past a subclass's apply_gradients: the EMA of the pattern above
  silently stopped moving. It now goes through apply_gradients, with expected_axis_name still
  checked (a tx with another axis is refused)."""
  params = {"w": jnp.asarray([1.0, 2.0])}
  loss = lambda p: jnp.sum(p["w"] ** 4)
  state = _EMAState.create(apply_fn=None, params=params, tx=ah.adahessian(0.1), ema=params)
  new, _ = jax.jit(lambda s: s.apply_loss(loss))(state)  # one program, not op by op
  # Whatever the step, the EMA is the mean of the old and the new params.
  np.testing.assert_allclose(new.ema["w"], 0.5 * (params["w"] + new.params["w"]), rtol=1e-6)
  assert np.max(np.abs(np.asarray(new.params["w"] - params["w"]))) > 1e-3
  bad = _EMAState.create(
    apply_fn=None, params=params, tx=ah.adahessian(0.1, axis_name="b"), ema=params
  )
  with pytest.raises(ValueError, match=r"averages the estimate over axis_name='b'"):
    jax.jit(jax.vmap(lambda _: bad.apply_loss(loss)[0].params, axis_name="b"))(jnp.arange(2))


def test_loss_with_the_wrong_signature_says_how_to_pass_its_arguments():
  state = TrainState.create(apply_fn=None, params={"w": jnp.ones(3)}, tx=ah.adahessian(0.1))
  loss = lambda p, batch: jnp.sum((p["w"] - batch) ** 2)
  grads = {"w": jnp.ones(3)}
  # Python's own error, raised inside the transform's trace, named neither value_fn nor the fix.
  with pytest.raises(TypeError, match=r"value_fn\(params\).*'batch'.*lambda p: loss_fn\(p, batch"):
    state.apply_gradients(grads=grads, value_fn=loss)
  with pytest.raises(TypeError, match=r"0 positional.*'batch'.*apply_loss\(loss_fn, batch\)"):
    state.apply_loss(loss)
  with pytest.raises(TypeError, match=r"1 positional and 1 keyword.*unexpected keyword.*'scale'"):
    state.apply_loss(loss, jnp.zeros(3), scale=2.0)
  _, value = state.apply_loss(loss, jnp.zeros(3))
  assert float(value) == 3.0


def test_batch_stats_replaced_by_another_tree_says_to_pass_the_collection(setup):
  model, variables, x, _ = setup
  _, mutated = jax.jit(  # one program, not op by op
    lambda v: model.apply(
      v, x, train=True, rngs={"dropout": jax.random.key(1)}, mutable=["batch_stats"]
    )
  )(variables)
  state = TrainState.create(
    apply_fn=model.apply,
    params=variables["params"],
    batch_stats=variables["batch_stats"],
    tx=ah.adahessian(0.1),
  )
  # The whole dict of mutated collections: the next apply found no statistics at
  # ['BatchNorm_0'] and, being mutable, started them afresh every step, silently.
  fix = r"batch_stats=mutated\['batch_stats'\]"
  with pytest.raises(ValueError, match=r"leaf at \['batch_stats'\]\['BatchNorm_0'\].*" + fix):
    state.replace(batch_stats=mutated)
  with pytest.raises(ValueError, match=fix):
    zeros = optax.tree.zeros_like(variables["params"])
    state.apply_gradients(grads=zeros, hessian_diag=zeros, batch_stats=mutated)
  # A state made with all variables as batch_stats is caught at the first correct replace.
  wrong = state.replace(batch_stats=None).replace(batch_stats=variables)
  with pytest.raises(ValueError, match=r"leaf at \['BatchNorm_0'\].*batch_stats=variables"):
    wrong.replace(batch_stats=mutated["batch_stats"])
  stepped = state.replace(batch_stats=mutated["batch_stats"])
  assert stepped.batch_stats is mutated["batch_stats"]

  class WithExtra(TrainState):  # Flax gives every subclass its own replace
    extra: int = 0

  sub = WithExtra.create(
    apply_fn=None, params={}, batch_stats=variables["batch_stats"], tx=optax.identity()
  )
  assert sub.replace(extra=1).extra == 1
  with pytest.raises(ValueError, match=fix):
    sub.replace(batch_stats=mutated)


def test_a_refresh_decided_on_the_host_equals_the_schedule_in_the_state():
  # Flax's replace() refused refresh= ("unexpected keyword argument"), so a Linen user could not
  # take the host decision the docs recommend for speed. Both methods now pass it on.
  r = np.random.default_rng(3)
  x, y = jnp.asarray(r.normal(size=(8, 4))), jnp.asarray(r.normal(size=(8, 2)))
  model = nn.Dense(2, param_dtype=jnp.float64)
  params = model.init(jax.random.key(0), x)["params"]

  def loss_fn(p, xb, yb):
    return jnp.mean(jnp.tanh(model.apply({"params": p}, xb)) - yb) ** 2 + jnp.mean(
      model.apply({"params": p}, xb) ** 4
    )

  def run(step_fn):
    state = TrainState.create(
      apply_fn=model.apply, params=params, tx=ah.adahessian(0.1, update_freq=2)
    )
    for step in range(5):
      state = step_fn(state, step % 2 == 0)
    return state.params

  # Jitted, the host's decision a static argument (as the NNX twin in test_nnx.py): op by op the
  # 15 steps compiled 111 programs.
  def closure(state, refresh):
    grads = jax.grad(loss_fn)(state.params, x, y)
    value_fn = (lambda p: loss_fn(p, x, y)) if refresh else None
    return state.apply_gradients(grads=grads, value_fn=value_fn, refresh=refresh)

  scheduled_step = jax.jit(lambda s: s.apply_loss(loss_fn, x, y)[0])
  host_step = jax.jit(lambda s, f: s.apply_loss(loss_fn, x, y, refresh=f)[0], static_argnums=1)
  scheduled = run(lambda s, _: scheduled_step(s))
  assert_trees_allclose(run(jax.jit(closure, static_argnums=1)), scheduled, rtol=1e-12)
  assert_trees_allclose(run(host_step), scheduled, rtol=1e-12)
  # The host's decision is checked against a concrete state's schedule.
  state = TrainState.create(
    apply_fn=model.apply, params=params, tx=ah.adahessian(0.1, update_freq=2)
  )
  with pytest.raises(ValueError, match="refresh"):
    state.apply_loss(loss_fn, x, y, refresh=False)


def test_a_jitted_step_compiles_once_from_create(setup):
  # Flax's create sets step=0, a Python int that jit keys apart from the int32 array step + 1
  # returns: the whole fused step compiled twice.
  model, variables, x, y = setup
  params = {"Dense_1": variables["params"]["Dense_1"]}
  head = nn.Dense(3, param_dtype=jnp.float64)
  state = TrainState.create(apply_fn=head.apply, params=params, tx=ah.adahessian(0.1))
  assert state.step.dtype == jnp.int32 and int(state.step) == 0
  traces = []

  def loss_fn(params, x, y):
    logits = head.apply({"params": params["Dense_1"]}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(state, x, y):
    traces.append(1)
    return state.apply_loss(loss_fn, x, y)[0]

  features = jnp.tanh(x @ jnp.ones((5, 16)))
  for _ in range(3):
    state = step(state, features, y)
  assert len(traces) == 1 and int(state.step) == 3 and state.step.dtype == jnp.int32


@pytest.mark.parametrize("adahessian", [True, False])
def test_a_jitted_step_of_committed_params_compiles_once_from_create(adahessian):
  # jit keys its cache on whether an argument is committed and commits its outputs: with params
  # put on a device, create's step and optax's counts (uncommitted) compiled the step twice.
  params = jax.device_put({"w": jnp.ones((4, 3)) * 0.1, "b": jnp.zeros(3)}, jax.devices()[0])
  loss_fn = lambda p: jnp.sum(jnp.sin(p["w"]) ** 2) + jnp.sum(p["b"] ** 2)
  tx = ah.adahessian(optax.linear_schedule(0.1, 0.01, 10)) if adahessian else optax.adam(0.1)
  state = TrainState.create(apply_fn=None, params=params, tx=tx)
  assert all(x.committed for x in jax.tree.leaves(state))

  @jax.jit
  def step(state):
    grads = jax.grad(loss_fn)(state.params)
    extra = {"value_fn": loss_fn} if adahessian else {}
    return state.apply_gradients(grads=grads, **extra)

  state = step(state)
  with CompileCounter() as compiles:  # the state the first step returns: nothing new
    for _ in range(4):
      state = step(state)
  assert compiles.count == 0 and int(state.step) == 5


def test_apply_gradients_and_apply_loss_pass_the_loss_to_tx_update_as_optaxs_value():
  # reduce_on_plateau after adahessian needs optax's extra argument value: apply_loss, which
  # computes the loss, failed in tx.update with "missing ... 'value'", and apply_gradients put a
  # value= among the fields to replace. Both steps equal a loop calling tx.update by hand.
  params = {"w": jnp.array([1.0, -2.0])}
  loss_fn = lambda p: jnp.sum(p["w"] ** 4)
  # rtol=0.99: no step counts as an improvement, so the scale halves after each step but the first.
  plateau = optax.contrib.reduce_on_plateau(patience=1, factor=0.5, rtol=0.99)
  tx = optax.chain(ah.adahessian(0.1), plateau)
  fused = by_grads = TrainState.create(apply_fn=None, params=params, tx=tx)
  p, opt_state = params, tx.init(params)
  # Each step one program, compiled once and reused (op by op, each op compiles on its own).
  by_hand = jax.jit(
    lambda p, s: tx.update(jax.grad(loss_fn)(p), s, p, value_fn=loss_fn, value=loss_fn(p))
  )
  by_grads_step = jax.jit(
    lambda s: s.apply_gradients(
      grads=jax.grad(loss_fn)(s.params), value_fn=loss_fn, value=loss_fn(s.params)
    )
  )
  fused_step = jax.jit(lambda s: s.apply_loss(loss_fn))
  for _ in range(4):
    updates, opt_state = by_hand(p, opt_state)
    by_grads = by_grads_step(by_grads)
    fused, loss = fused_step(fused)
    np.testing.assert_allclose(loss, loss_fn(p), rtol=1e-6)
    p = optax.apply_updates(p, updates)
    assert_trees_allclose(by_grads.params, p)
    assert_trees_allclose(fused.params, p)
  np.testing.assert_allclose(fused.opt_state[1].scale, 0.125)
  np.testing.assert_allclose(by_grads.opt_state[1].scale, 0.125)


def test_apply_gradients_names_a_keyword_that_is_no_field_before_tx_update_runs():
  # Its other keyword arguments replace fields, as in Flax: an extra argument meant for tx.update
  # reached no optimizer, and optax said it was missing, although it had been passed.
  params = {"w": jnp.array([1.0, -2.0])}
  loss_fn = lambda p: jnp.sum(p["w"] ** 4)
  state = TrainState.create(apply_fn=None, params=params, tx=ah.adahessian(0.1))
  grads = jax.grad(loss_fn)(params)
  with pytest.raises(TypeError, match=r"got grad=, not a field of TrainState.*state\.tx\.update"):
    state.apply_gradients(grads=grads, value_fn=loss_fn, grad=grads)
  # A field is replaced, as in Flax.
  stepped = state.apply_gradients(grads=grads, value_fn=loss_fn, batch_stats={"m": jnp.ones(2)})
  np.testing.assert_array_equal(stepped.batch_stats["m"], jnp.ones(2))


def test_a_training_state_given_as_params_is_told_to_pass_its_params():
  # The Hessian tools named the state's step counter (".step has dtype int32") and advised
  # closing over integer values, or an Equinox split; the fix is state.params.
  from adahessian_jax import hessian

  model, x = nn.Dense(2), jnp.ones((4, 3))
  params = model.init(jax.random.key(0), x)["params"]
  loss = lambda p, b: jnp.sum(model.apply({"params": p}, b) ** 2)
  states = (
    flax_train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(1e-3)),
    TrainState.create(apply_fn=model.apply, params=params, tx=ah.adahessian(1e-3)),
  )
  for state in states:
    with pytest.raises(TypeError, match=r"It is a TrainState, a training state: pass its \.params"):
      hessian.hessian_operator(loss, state, batch=x)
    with pytest.raises(TypeError, match=r"It is a TrainState, a training state: pass its \.params"):
      ah.hvp(lambda p: loss(p, x), state, state)
  hessian.hessian_operator(loss, states[0].params, batch=x)  # the fix
