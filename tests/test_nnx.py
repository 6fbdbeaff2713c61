"""Flax NNX: nnx.Optimizer with the value_fn helper and the fused route."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import CompileCounter, assert_trees_allclose
from flax import nnx

import adahessian_jax as ah
import adahessian_jax.nnx as ah_nnx


class Net(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(4, 16, param_dtype=jnp.float64, rngs=rngs)
    self.bn = nnx.BatchNorm(16, momentum=0.9, dtype=jnp.float64, param_dtype=jnp.float64, rngs=rngs)
    # flax keeps BatchNorm's statistics in float32 whatever the dtypes; in float64 its update would
    # cast float64 into them (a FutureWarning in jax 0.10, an error later).
    self.bn.mean = nnx.BatchStat(jnp.zeros(16, jnp.float64))
    self.bn.var = nnx.BatchStat(jnp.ones(16, jnp.float64))
    self.l2 = nnx.Linear(16, 1, param_dtype=jnp.float64, rngs=rngs)

  def __call__(self, x):
    return self.l2(nnx.relu(self.bn(self.l1(x))))


def loss_fn(model, x, y):
  return jnp.mean((model(x) - y) ** 2)


# nnx.grad of loss_fn as one program: op by op, a Net's backward pass compiles ~100 ops one by one.
jitted_grad = nnx.jit(nnx.grad(loss_fn))


def data():
  r = np.random.default_rng(0)
  x = jnp.asarray(r.normal(size=(32, 4)))
  return x, jnp.sin(x[:, :1] + x[:, 1:2])


def test_value_fn_route_and_fused_route_agree_and_train():
  x, y = data()
  model_a, model_b = Net(nnx.Rngs(0)), Net(nnx.Rngs(0))
  opt_a = nnx.Optimizer(model_a, ah.adahessian(0.1, update_freq=2), wrt=nnx.Param)
  opt_b = nnx.Optimizer(model_b, ah.adahessian(0.1, update_freq=2), wrt=nnx.Param)

  @nnx.jit
  def closure_step(model, optimizer, x, y):
    value_fn = ah_nnx.value_fn(model, loss_fn, x, y)  # before the gradient pass
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads, value_fn=value_fn)
    return loss

  @nnx.jit
  def fused_step(model, optimizer, x, y):
    loss, grads, hdiag = ah_nnx.value_grad_and_hessian_diag(loss_fn, model, optimizer, x, y)
    optimizer.update(model, grads, hessian_diag=hdiag)
    return loss

  losses = []
  for _ in range(15):
    la = closure_step(model_a, opt_a, x, y)
    lb = fused_step(model_b, opt_b, x, y)
    np.testing.assert_allclose(la, lb, rtol=1e-11)
    losses.append(float(lb))
  # l1's bias feeds BatchNorm, which subtracts it again: its gradient is rounding noise and the
  # bias stays ~1e-14, where only an absolute tolerance means anything (seen: 2.3e-13 apart).
  assert_trees_allclose(nnx.state(model_a), nnx.state(model_b), rtol=1e-10, atol=1e-12)
  assert losses[-1] < 0.5 * losses[0]
  # BatchNorm statistics moved (once per step, through the gradient/primal pass only).
  fresh = Net(nnx.Rngs(0))
  assert not np.allclose(model_b.bn.mean[...], fresh.bn.mean[...])


def test_fused_route_with_the_refresh_decided_on_the_host_follows_the_schedule():
  # As value_grad_and_hessian_diag(fun, refresh=...) and TrainState.apply_loss take it: refresh=
  # was passed on to loss_fn, which failed with Python's "unexpected keyword argument".
  x, y = data()
  model_a, model_b = Net(nnx.Rngs(0)), Net(nnx.Rngs(0))
  opt_a = nnx.Optimizer(model_a, ah.adahessian(0.1, update_freq=3), wrt=nnx.Param)
  opt_b = nnx.Optimizer(model_b, ah.adahessian(0.1, update_freq=3), wrt=nnx.Param)

  def make_step(refresh):
    @nnx.jit
    def step(model, optimizer, x, y):
      loss, grads, hdiag = ah_nnx.value_grad_and_hessian_diag(
        loss_fn, model, optimizer, x, y, refresh=refresh
      )
      optimizer.update(model, grads, hessian_diag=hdiag, refresh=refresh)
      return loss, hdiag

    return step

  scheduled, host = make_step(None), {True: make_step(True), False: make_step(False)}
  for i in range(7):
    la, _ = scheduled(model_a, opt_a, x, y)
    lb, hdiag = host[i % 3 == 0](model_b, opt_b, x, y)
    np.testing.assert_allclose(la, lb, rtol=1e-12)
    zero = all(not np.any(v) for v in jax.tree.leaves(hdiag))
    assert zero == (i % 3 != 0), i  # no Hessian pass between refreshes
  assert_trees_allclose(nnx.state(model_a), nnx.state(model_b), rtol=1e-10, atol=1e-12)
  with pytest.raises(TypeError, match="refresh must be a Python"):
    ah_nnx.value_grad_and_hessian_diag(loss_fn, model_b, opt_b, x, y, refresh="yes")


def test_fused_route_updates_batch_stats_once():
  x, y = data()
  model, reference = Net(nnx.Rngs(0)), Net(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, ah.adahessian(0.1, n_samples=3), wrt=nnx.Param)
  # Jitted (nnx.jit writes back what the call changed): op by op, the 3-probe estimate compiles
  # each of its ~230 ops on its own.
  nnx.jit(lambda m, o: ah_nnx.value_grad_and_hessian_diag(loss_fn, m, o, x, y))(model, optimizer)
  nnx.jit(loss_fn)(reference, x, y)  # one forward pass in training mode
  np.testing.assert_allclose(model.bn.mean[...], reference.bn.mean[...], rtol=1e-13)
  np.testing.assert_allclose(model.bn.var[...], reference.bn.var[...], rtol=1e-13)


def test_has_aux():
  x, y = data()
  model = Net(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, ah.adahessian(0.1), wrt=nnx.Param)
  aux_loss = lambda m, x, y: (loss_fn(m, x, y), {"mean_pred": m(x).mean()})

  @nnx.jit  # one program, not op by op
  def step(model, optimizer):
    (loss, aux), grads, hdiag = ah_nnx.value_grad_and_hessian_diag(
      aux_loss, model, optimizer, x, y, has_aux=True
    )
    optimizer.update(model, grads, hessian_diag=hdiag)
    return loss, aux, hdiag

  loss, aux, hdiag = step(model, optimizer)
  assert set(aux) == {"mean_pred"} and np.isfinite(float(loss))
  assert jax.tree.structure(hdiag) == jax.tree.structure(nnx.as_pure(nnx.state(model, nnx.Param)))


class Sowing(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(4, 8, param_dtype=jnp.float64, rngs=rngs)
    self.l2 = nnx.Linear(8, 1, param_dtype=jnp.float64, rngs=rngs)

  def __call__(self, x):
    h = jnp.tanh(self.l1(x))
    self.sow(nnx.Intermediate, "h_mean", h.mean())  # a Variable the call itself creates
    return self.l2(h)


# Flax 0.12.8 deprecates sow outside nnx.capture, but models still use it; the fused route must
# keep what it creates either way.
@pytest.mark.filterwarnings("ignore:Using 'Module.sow\\(\\)' outside:DeprecationWarning")
def test_fused_route_keeps_variables_the_loss_creates():
  # Module.sow adds an nnx.Intermediate during the call; the fused route writes it back once per
  # step, as nnx.value_and_grad in the closure route does.
  x, y = data()
  model_a, model_b = Sowing(nnx.Rngs(0)), Sowing(nnx.Rngs(0))
  opt_a = nnx.Optimizer(model_a, ah.adahessian(0.1), wrt=nnx.Param)
  opt_b = nnx.Optimizer(model_b, ah.adahessian(0.1), wrt=nnx.Param)

  @nnx.jit
  def steps(model_a, opt_a, model_b, opt_b):
    for _ in range(2):
      value_fn = ah_nnx.value_fn(model_a, loss_fn, x, y)
      _, grads = nnx.value_and_grad(loss_fn)(model_a, x, y)
      opt_a.update(model_a, grads, value_fn=value_fn)
      _, grads, hdiag = ah_nnx.value_grad_and_hessian_diag(loss_fn, model_b, opt_b, x, y)
      opt_b.update(model_b, grads, hessian_diag=hdiag)

  steps(model_a, opt_a, model_b, opt_b)
  assert isinstance(model_b.h_mean, nnx.Intermediate)
  assert len(jax.tree.leaves(nnx.state(model_b, nnx.Intermediate))) == 2  # one per step
  assert_trees_allclose(nnx.state(model_a), nnx.state(model_b), rtol=1e-12)


class WeightNormed(nnx.Module):
  def __init__(self, rngs):
    linear = nnx.Linear(4, 8, param_dtype=jnp.float64, rngs=rngs)
    self.l1 = nnx.WeightNorm(linear, param_dtype=jnp.float64, rngs=rngs)
    self.l2 = nnx.Linear(8, 1, param_dtype=jnp.float64, rngs=rngs)

  def __call__(self, x):
    return self.l2(jnp.tanh(self.l1(x)))


def test_fused_route_keeps_the_parameters_the_loss_writes_as_nnx_value_and_grad_does():
  # nnx.WeightNorm writes the normalised kernel into its nnx.Param during the call, and
  # nnx.value_and_grad keeps that write; the fused route dropped it, so the optimizer stepped from
  # the unnormalised kernel (another trajectory than nnx.value_and_grad's, silently).
  x, y = data()
  model_a, model_b = WeightNormed(nnx.Rngs(0)), WeightNormed(nnx.Rngs(0))
  opt_a = nnx.Optimizer(model_a, ah.adahessian(0.1), wrt=nnx.Param)
  opt_b = nnx.Optimizer(model_b, ah.adahessian(0.1), wrt=nnx.Param)

  @nnx.jit  # each route one program, not op by op
  def pure_route(model_a, opt_a):
    graphdef, params, rest = nnx.split(model_a, nnx.Param, ...)
    pure = lambda p: loss_fn(nnx.merge(graphdef, p, rest, copy=True), x, y)
    state = nnx.as_pure(opt_a.opt_state)
    _, _, hdiag = ah.value_grad_and_hessian_diag(pure)(nnx.as_pure(params), state)
    _, grads = nnx.value_and_grad(loss_fn)(model_a, x, y)
    opt_a.update(model_a, grads, hessian_diag=hdiag)

  @nnx.jit
  def fused_route(model_b, opt_b):
    _, grads, hdiag = ah_nnx.value_grad_and_hessian_diag(loss_fn, model_b, opt_b, x, y)
    opt_b.update(model_b, grads, hessian_diag=hdiag)

  pure_route(model_a, opt_a)
  fused_route(model_b, opt_b)
  assert_trees_allclose(nnx.state(model_a), nnx.state(model_b), rtol=1e-13)


class Adapted(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.LoRALinear(4, 8, lora_rank=2, param_dtype=jnp.float64, rngs=rngs)
    self.l2 = nnx.Linear(8, 1, param_dtype=jnp.float64, rngs=rngs)

  def __call__(self, x):
    return self.l2(jnp.tanh(self.l1(x)))


def test_value_fn_built_for_another_filter_than_the_optimizers_says_so():
  x, y = data()
  model = Adapted(nnx.Rngs(0))
  # nnx.Optimizer(model, tx, wrt=nnx.LoRAParam) hands value_fn the adapters' state only.
  adapters = nnx.as_pure(nnx.state(model, nnx.LoRAParam))
  value_fn = ah_nnx.value_fn(model, loss_fn, x, y)  # wrt=nnx.Param: every parameter
  with pytest.raises(ValueError, match=r"wrt=Param .*\['l1'\]\['kernel'\].*wrt=optimizer\.wrt"):
    value_fn(adapters)
  value_fn = ah_nnx.value_fn(model, loss_fn, x, y, wrt=nnx.LoRAParam)
  np.testing.assert_allclose(value_fn(adapters), loss_fn(model, x, y), rtol=1e-14)
  # A number is no filter: Flax's own error failed to format ("Invalid format specifier '!r'").
  for bad in (0, 1.5, [nnx.Param, 2]):
    with pytest.raises(
      TypeError, match=r"wrt must be an NNX filter .*, got " + re.escape(repr(bad))
    ):
      ah_nnx.value_fn(model, loss_fn, x, y, wrt=bad)


def test_value_fn_called_with_another_models_state_names_the_variable():
  """A state of the same paths but other shapes (a model of another width) failed in JAX's
  dot_general ("contracting dimensions to have the same shape"), naming no variable."""
  x, y = data()
  value_fn = ah_nnx.value_fn(Net(nnx.Rngs(0)), loss_fn, x, y)

  class Wider(Net):
    def __init__(self, rngs):
      super().__init__(rngs)
      self.l2 = nnx.Linear(16, 3, param_dtype=jnp.float64, rngs=rngs)

  wider = nnx.as_pure(nnx.state(Wider(nnx.Rngs(0)), nnx.Param))
  match = r"variable at \['l2'\]\['bias'\] has shape \(1,\), but .* it has shape \(3,\)\. Build"
  with pytest.raises(
    ValueError, match=r"^adahessian_jax\.nnx\.value_fn was built for a model whose " + match
  ):
    jax.jit(value_fn)(wider)
  with pytest.raises(ValueError, match=match):  # as a pure dict too
    value_fn(nnx.to_pure_dict(wider))


def test_loss_with_aux_or_without_it_against_has_aux_says_so():
  x, y = data()
  model = Adapted(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, ah.adahessian(0.1), wrt=nnx.Param)
  aux_loss = lambda m, x, y: (loss_fn(m, x, y), m(x).mean())
  vgh = ah_nnx.value_grad_and_hessian_diag
  # Traced (nnx.jit): the errors come while tracing, with nothing compiled op by op.
  with pytest.raises(TypeError, match="loss_fn returned a tuple.*has_aux=True"):
    nnx.jit(lambda m, o: vgh(aux_loss, m, o, x, y))(model, optimizer)
  with pytest.raises(TypeError, match=r"has_aux=True.*\(loss, aux\).*array of shape \(\)"):
    nnx.jit(lambda m, o: vgh(loss_fn, m, o, x, y, has_aux=True))(model, optimizer)
  with pytest.raises(TypeError, match=r"loss_fn returned a tuple.*\[0\]"):
    jax.jit(ah_nnx.value_fn(model, aux_loss, x, y))(nnx.as_pure(nnx.state(model, nnx.Param)))
  with pytest.raises(TypeError, match="nnx.Optimizer.*Array"):
    vgh(loss_fn, model, x, y)  # the optimizer forgotten


class CallTimeDropout(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(4, 8, param_dtype=jnp.float64, rngs=rngs)
    self.dropout = nnx.Dropout(0.5)  # its rngs come with each call
    self.l2 = nnx.Linear(8, 1, param_dtype=jnp.float64, rngs=rngs)

  def __call__(self, x, rngs):
    return self.l2(self.dropout(jnp.tanh(self.l1(x)), rngs=rngs))


def test_graph_nodes_among_the_arguments_are_state_too():
  # nnx.Rngs passed to the loss (Dropout's rngs at call time), as nnx.value_and_grad allows: the
  # fused route advances it once per step, like nnx.value_and_grad, and both routes use one mask
  # for the gradient and the Hessian products.
  x, y = data()
  dropout_loss = lambda model, x, y, rngs: jnp.mean((model(x, rngs) - y) ** 2)
  model_a, model_b = CallTimeDropout(nnx.Rngs(0)), CallTimeDropout(nnx.Rngs(0))
  rngs_a, rngs_b = nnx.Rngs(dropout=1), nnx.Rngs(dropout=1)
  opt_a = nnx.Optimizer(model_a, ah.adahessian(0.1), wrt=nnx.Param)
  opt_b = nnx.Optimizer(model_b, ah.adahessian(0.1), wrt=nnx.Param)

  @nnx.jit
  def steps(model_a, opt_a, rngs_a, model_b, opt_b, rngs_b):
    for _ in range(2):
      value_fn = ah_nnx.value_fn(model_a, dropout_loss, x, y, rngs_a)
      _, grads = nnx.value_and_grad(dropout_loss)(model_a, x, y, rngs_a)
      opt_a.update(model_a, grads, value_fn=value_fn)
      _, grads, hdiag = ah_nnx.value_grad_and_hessian_diag(
        dropout_loss, model_b, opt_b, x, y, rngs=rngs_b
      )
      opt_b.update(model_b, grads, hessian_diag=hdiag)

  steps(model_a, opt_a, rngs_a, model_b, opt_b, rngs_b)
  assert int(rngs_a.dropout.count[...]) == int(rngs_b.dropout.count[...]) == 2
  assert_trees_allclose(nnx.state(model_a), nnx.state(model_b), rtol=1e-12)
  assert_trees_allclose(nnx.state(opt_a), nnx.state(opt_b), rtol=1e-12)


def test_an_integer_variable_in_wrt_is_refused_naming_it_and_the_filter_fix():
  class Counted(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(4, 1, param_dtype=jnp.float64, rngs=rngs)
      self.count = nnx.Param(jnp.zeros((), jnp.int32))  # an integer among the trained variables

  with pytest.raises(TypeError, match=r"\['count'\][\s\S]*a narrower wrt= filter"):
    nnx.Optimizer(Counted(nnx.Rngs(0)), ah.adahessian(0.1), wrt=nnx.Param)


def test_an_optimizer_over_the_models_batch_stats_is_refused_naming_the_variable():
  # nnx.Optimizer(model, tx, wrt=nnx.Variable) made state for BatchNorm's running statistics,
  # which every step then moved by gradient, curvature and weight decay, silently.
  model = Net(nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"\['bn'\]\['mean'\] is an nnx.BatchStat.*wrt=nnx.Param"):
    nnx.Optimizer(model, ah.adahessian(0.1), wrt=nnx.Variable)

  class Cached(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(4, 1, param_dtype=jnp.float64, rngs=rngs)
      self.keys = nnx.Cache(jnp.zeros(3, jnp.float64))

  with pytest.raises(ValueError, match=r"\['keys'\] is an nnx.Cache"):
    nnx.Optimizer(Cached(nnx.Rngs(0)), ah.adahessian(0.1), wrt=nnx.Variable)
  optimizer = nnx.Optimizer(model, ah.adahessian(0.1), wrt=nnx.Param)  # the parameters alone
  assert "mean" not in nnx.to_pure_dict(nnx.state(optimizer.opt_state))[0]["mu"]["bn"]


def test_a_model_without_the_optimizers_variables_is_refused_early():
  x, y = data()
  model = Net(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, ah.adahessian(0.1), wrt=nnx.Param)
  frozen = nnx.BatchNorm(4, use_bias=False, use_scale=False, rngs=nnx.Rngs(1))  # no nnx.Param
  with pytest.raises(ValueError, match=r"no variables that the optimizer's wrt=Param selects"):
    ah_nnx.value_grad_and_hessian_diag(loss_fn, frozen, optimizer, x, y)


def test_a_model_of_other_parameters_than_the_optimizers_is_refused_naming_the_leaf():
  # The fused pass ran on the other model, and optimizer.update then failed (for the optimizer's
  # own model, with a hint about averaging per-example gradients).
  x, y = data()
  linear = lambda n: nnx.Linear(4, n, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(linear(1), ah.adahessian(0.1), wrt=nnx.Param)
  with pytest.raises(
    ValueError,
    match=r"the model's parameter at \['bias'\] has shape \(2,\), but the optimizer's state was "
    r"made for a parameter of shape \(1,\) there\. Pass the model the nnx.Optimizer was built for",
  ):
    ah_nnx.value_grad_and_hessian_diag(loss_fn, linear(2), optimizer, x, y)
  net_optimizer = nnx.Optimizer(Net(nnx.Rngs(0)), ah.adahessian(0.1), wrt=nnx.Param)
  with pytest.raises(
    ValueError, match=r"the optimizer's state holds a parameter at \['bn'\]\['bias'\], where"
  ):
    ah_nnx.value_grad_and_hessian_diag(loss_fn, linear(1), net_optimizer, x, y)


def test_model_and_loss_swapped_say_the_order_of_each_helper():
  # value_fn takes the model first, the fused route the loss first: the swap is easy to make, and
  # used to fail naming a filter (value_fn: 0 leaves selected; fused: "no variables").
  x, y = data()
  model = Net(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, ah.adahessian(0.1), wrt=nnx.Param)
  # A model that is no module and no module's state was called a state ("got a int that holds no
  # module, only its state").
  for bad in (5, None, "net"):
    with pytest.raises(
      TypeError, match=rf"as model, got {bad!r} \(type .*is no module and holds none"
    ):
      ah_nnx.value_fn(bad, loss_fn, x, y)
  order = r"got a function as the model and a Net as loss_fn.*value_fn\(model, loss_fn"
  with pytest.raises(TypeError, match=order):
    ah_nnx.value_fn(loss_fn, model, x, y)
  with pytest.raises(TypeError, match=order):
    ah_nnx.value_grad_and_hessian_diag(model, loss_fn, optimizer, x, y)
  # A pytree of modules is a model too.
  pair = (nnx.Linear(4, 3, rngs=nnx.Rngs(1)), nnx.Linear(3, 1, rngs=nnx.Rngs(2)))
  pair_loss = lambda m, x, y: jnp.mean((m[1](jnp.tanh(m[0](x))) - y) ** 2)
  pair_optimizer = nnx.Optimizer(pair, ah.adahessian(0.1), wrt=nnx.Param)
  fused = lambda m, o: ah_nnx.value_grad_and_hessian_diag(pair_loss, m, o, x, y)[0]
  value = nnx.jit(fused)(pair, pair_optimizer)  # one program, not op by op
  value_fn = ah_nnx.value_fn(pair, pair_loss, x, y)
  np.testing.assert_allclose(value_fn(nnx.as_pure(nnx.state(pair, nnx.Param))), value, rtol=1e-6)


def test_a_loss_or_optimizer_the_fused_helper_cannot_use_is_refused_naming_the_helper():
  # The loss was first called inside the trace, where Python's "<lambda>() takes 2 positional
  # arguments but 3 were given" named neither the helper nor the arguments given after the model.
  x, y = data()
  model = Net(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, ah.adahessian(0.1), wrt=nnx.Param)
  two = lambda m, x: jnp.mean(m(x) ** 2)
  fused = (
    r"loss_fn is called as loss_fn\(model, \*args, \*\*kwargs\) with the 2 positional and 1 "
    r"keyword arguments given to adahessian_jax.nnx.value_grad_and_hessian_diag\(loss_fn, model, "
    r"optimizer, \*args\) after the optimizer, but its signature is \(m, x\)"
  )
  with pytest.raises(TypeError, match=fused):
    ah_nnx.value_grad_and_hessian_diag(two, model, optimizer, x, y, train=True)
  closure = r"given to adahessian_jax.nnx.value_fn\(model, loss_fn, \*args\) after loss_fn"
  with pytest.raises(TypeError, match=closure):
    ah_nnx.value_fn(model, two, x, y)
  # An optimizer of another kind: the fused pass's own words asked for a state "after params".
  adam = nnx.Optimizer(model, optax.adam(0.1), wrt=nnx.Param)
  with pytest.raises(ValueError, match=r"the nnx.Optimizer's tx holds no AdaHessian transform"):
    ah_nnx.value_grad_and_hessian_diag(two, model, adam, x)
  # The arguments it takes pass, keywords included. Jitted (the signature check runs as the step
  # is traced): op by op, the fused pass compiled some 120 programs of one op each.
  kw = lambda m, x, scale=1.0: scale * jnp.mean(m(x) ** 2)
  fused_kw = lambda m, o: ah_nnx.value_grad_and_hessian_diag(kw, m, o, x, scale=2.0)[0]
  value = nnx.jit(fused_kw)(model, optimizer)
  np.testing.assert_allclose(value, 2.0 * two(model, x), rtol=1e-6)


def test_a_decorated_loss_is_checked_against_the_decorators_own_arguments():
  # A decorator that functools.wraps a loss of (m, x, y) into one of (m, batch) reports the
  # wrapped (m, x, y) to inspect.signature: the signature check refused the call with the batch,
  # which the NNX helpers ran before it was added. A decorator that only passes its arguments on
  # (*args, **kwargs) is still checked against the wrapped loss.
  x, y = data()
  model = Net(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, ah.adahessian(0.1), wrt=nnx.Param)

  def loss(m, x, y):
    return jnp.mean((m(x) - y) ** 2)

  def on_batches(f):
    @functools.wraps(f)
    def on_batch(m, batch):
      return f(m, batch["x"], batch["y"])

    return on_batch

  def passing_on(f):
    @functools.wraps(f)
    def inner(*args, **kwargs):
      return f(*args, **kwargs)

    return inner

  batch = {"x": x, "y": y}
  value = ah_nnx.value_grad_and_hessian_diag(on_batches(loss), model, optimizer, batch)[0]
  np.testing.assert_allclose(value, loss(model, x, y), rtol=1e-6)
  value_fn = ah_nnx.value_fn(model, on_batches(loss), batch)
  np.testing.assert_allclose(value_fn(nnx.state(model, nnx.Param)), value, rtol=1e-6)
  with pytest.raises(TypeError, match=r"but its signature is \(m, x, y\)"):
    ah_nnx.value_grad_and_hessian_diag(passing_on(loss), model, optimizer, batch)


def test_value_fn_for_a_filter_selecting_nothing_is_refused_early():
  # A filter that matches no variable trains nothing; the closure route used to run such steps
  # silently as no-ops (the fused route already refused it).
  x, y = data()
  model = Net(nnx.Rngs(0))
  typo = nnx.All(nnx.Param, nnx.PathContains("l3"))
  with pytest.raises(ValueError, match=r"no variables that wrt=All\(.*l3.*selects"):
    ah_nnx.value_fn(model, loss_fn, x, y, wrt=typo)


def test_a_loss_of_the_module_given_as_value_fn_gets_a_note_naming_the_helper():
  # optimizer.update calls value_fn with the nnx.State it trains; a loss of the module failed
  # inside the user's code with "'State' object is not callable" and nothing more.
  x, y = data()
  model = Net(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, ah.adahessian(0.1), wrt=nnx.Param)
  grads = jitted_grad(model, x, y)
  with pytest.raises(TypeError, match="'State' object is not callable") as e:
    optimizer.update(model, grads, value_fn=lambda m: loss_fn(m, x, y))
  assert any("adahessian_jax.nnx.value_fn(model, loss_fn" in n for n in e.value.__notes__)


def test_a_value_fn_closing_over_the_module_is_refused():
  # lambda state: loss_fn(model, x, y) ignores the state the optimizer passes: the Hessian
  # estimate was zero and the step lr·g/eps, silently.
  x, y = data()
  model = nnx.Linear(4, 1, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, ah.adahessian(0.1), wrt=nnx.Param)
  grads = jitted_grad(model, x, y)
  with pytest.raises(ValueError, match=r"adahessian_jax.nnx.value_fn\(model, loss_fn, \*args\)"):
    optimizer.update(model, grads, value_fn=lambda state: loss_fn(model, x, y))


def test_a_value_fn_closing_over_a_module_with_batchnorm_gets_a_note_naming_the_helper():
  # Its BatchNorm writes the model's statistics from inside the optimizer's trace: Flax's
  # TraceContextError ("Cannot mutate BatchStat from a different trace level") came first and
  # named no fix.
  from flax.errors import TraceContextError

  x, y = data()
  model = Net(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, ah.adahessian(0.1), wrt=nnx.Param)
  grads = jitted_grad(model, x, y)
  with pytest.raises(TraceContextError) as e:
    optimizer.update(model, grads, value_fn=lambda state: loss_fn(model, x, y))
  assert any("adahessian_jax.nnx.value_fn(model, loss_fn" in n for n in e.value.__notes__)


@pytest.mark.parametrize("with_batchnorm", [False, True])
def test_a_loss_of_the_helpers_closing_over_the_model_says_to_use_the_module_it_is_passed(
  with_batchnorm,
):
  # loss_fn given to the helpers used the outer model, not its module argument: the errors told
  # the user to build the closure with adahessian_jax.nnx.value_fn, the helper already in use.
  x, y = data()
  model = Net(nnx.Rngs(0)) if with_batchnorm else nnx.Linear(4, 1, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, ah.adahessian(0.1), wrt=nnx.Param)
  closing = lambda module, x, y: loss_fn(model, x, y)  # noqa: E731
  fix = "must use the module it is passed (its first argument), not a model it closes over"
  grads = jitted_grad(model, x, y)
  # With BatchNorm the loss writes the outer model's statistics from inside a trace (Flax's
  # TraceContextError, with a note); without, the loss does not depend on the params given.
  from flax.errors import TraceContextError

  error = TraceContextError if with_batchnorm else ValueError
  for call in (
    lambda: ah_nnx.value_grad_and_hessian_diag(closing, model, optimizer, x, y),
    lambda: optimizer.update(model, grads, value_fn=ah_nnx.value_fn(model, closing, x, y)),
  ):
    with pytest.raises(error) as e:
      call()
    assert fix in " ".join([str(e.value), *getattr(e.value, "__notes__", [])])


def test_an_update_without_the_loss_names_the_nnx_helper():
  # optimizer.update(model, grads), Adam's call, was told to call tx.update(grads, opt_state,
  # params, value_fn=lambda p: loss_fn(p, batch)), which an nnx.Optimizer user cannot write.
  x, y = data()
  model = nnx.Linear(4, 1, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, ah.adahessian(0.1), wrt=nnx.Param)
  grads = jitted_grad(model, x, y)
  fix = r"optimizer.update\(model, grads, value_fn=adahessian_jax.nnx.value_fn\(model, loss_fn"
  with pytest.raises(ValueError, match=fix):
    optimizer.update(model, grads)


def test_flags_that_are_no_bool_are_refused():
  """A str from a config is truthy: has_aux="False" and independent_probes="False" were read as
  True, and the errors said "has_aux=True" and "independent_probes=True" of values the caller had
  not given; independent_probes=0 was let through."""
  x, y = data()
  model = nnx.Linear(4, 1, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, ah.adahessian(0.1), wrt=nnx.Param)
  vgh = ah_nnx.value_grad_and_hessian_diag
  for flag, bad in (("has_aux", "False"), ("independent_probes", "False"), ("has_aux", 0)):
    with pytest.raises(ValueError, match=rf"diag: {flag} must be True or False, got {bad!r}\."):
      vgh(loss_fn, model, optimizer, x, y, **{flag: bad})


def test_axis_name_and_independent_probes_are_refused_where_no_map_binds_them():
  """The data-parallel keywords of the fused route (stepped under pmap and shard_map in
  test_distributed.py) refuse an axis_name no enclosing map binds (JAX's own error is a NameError
  from deep inside the step) and independent_probes without an axis_name, before anything runs:
  the model and the optimizer are unchanged."""
  x, y = data()
  model = nnx.Linear(4, 1, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, ah.adahessian(0.1, axis_name="data"), wrt=nnx.Param)
  before = jax.tree.map(np.asarray, nnx.as_pure(nnx.state((model, optimizer))))
  vgh = ah_nnx.value_grad_and_hessian_diag
  with pytest.raises(ValueError, match="axis_name='data' is not an axis of the enclosing pmap"):
    vgh(loss_fn, model, optimizer, x, y, axis_name="data")
  with pytest.raises(ValueError, match="axis_name='data' is not an axis of the enclosing pmap"):
    # Under a map that binds another name.
    jax.vmap(lambda x, y: vgh(loss_fn, model, optimizer, x, y, axis_name="data"), axis_name="b")(
      x.reshape(4, 8, 4), y.reshape(4, 8, 1)
    )
  with pytest.raises(ValueError, match="independent_probes=True .* needs the axis_name"):
    vgh(loss_fn, model, optimizer, x, y, independent_probes=True)
  after = jax.tree.map(np.asarray, nnx.as_pure(nnx.state((model, optimizer))))
  assert_trees_allclose(after, before, rtol=0, atol=0)


def test_update_with_expected_axis_name_refuses_a_tx_that_averages_over_another_axis():
  """optimizer.update forwards expected_axis_name to tx.update: a tx that does not average the
  estimate over the axis the gradients were averaged over (here none) raises, naming the fix,
  before anything is written; with the same axis the step is the plain one."""
  x, y = data()
  model = nnx.Linear(4, 1, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, ah.adahessian(0.1), wrt=nnx.Param)
  fused = lambda m, o: ah_nnx.value_grad_and_hessian_diag(loss_fn, m, o, x, y)[1:]
  grads, hdiag = nnx.jit(fused)(model, optimizer)  # one program, not op by op
  before = jax.tree.map(np.asarray, nnx.as_pure(nnx.state((model, optimizer))))
  with pytest.raises(ValueError, match=r"averages the estimate over axis_name=None.*axis_name='da"):
    optimizer.update(model, grads, hessian_diag=hdiag, expected_axis_name="data")
  after = jax.tree.map(np.asarray, nnx.as_pure(nnx.state((model, optimizer))))
  assert_trees_allclose(after, before, rtol=0, atol=0)
  twin = nnx.clone(model)
  twin_kernel = np.asarray(twin.kernel[...])
  plain = nnx.Optimizer(twin, ah.adahessian(0.1), wrt=nnx.Param)
  plain.update(twin, grads, hessian_diag=hdiag)
  optimizer.update(model, grads, hessian_diag=hdiag, expected_axis_name=None)
  assert np.max(np.abs(np.asarray(model.kernel[...]) - np.asarray(twin_kernel))) > 1e-3
  assert_trees_allclose(
    nnx.as_pure(nnx.state(model, nnx.Param)),
    nnx.as_pure(nnx.state(twin, nnx.Param)),
    rtol=0,
    atol=0,
  )


class BiasFreeLayer(nnx.Module):
  def __init__(self, rngs):
    kernel = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp"))
    self.dense = nnx.Linear(16, 16, use_bias=False, kernel_init=kernel, rngs=rngs)


class BiasFreeStack(nnx.Module):
  def __init__(self, rngs):
    meta = {nnx.PARTITION_NAME: "layers"}
    self.layers = nnx.vmap(BiasFreeLayer, in_axes=0, out_axes=0, transform_metadata=meta)(
      rngs.split(3)
    )


def test_axis_names_that_update_does_not_see_are_warned_of_at_init():
  """nnx.Optimizer calls init on the variables (names and all) but update on plain arrays: a
  named stack of bias-less layers, kernel ('layers', 'embed', 'mlp'), was read per layer at init
  (no warning) and averaged across its layers at every update (the rank's Conv guess). init now
  warns naming the leaf and the fix; with spatial.named the estimate is averaged per layer."""
  with nnx.use_eager_sharding(False):
    stack = BiasFreeStack(nnx.Rngs(0))
  leaf = r"\['layers'\]\['dense'\]\['kernel'\]: shape \(3, 16, 16\)"
  with pytest.warns(ah.spatial.LayoutGuessWarning, match=leaf + r"[\s\S]*spatial\.named\(nnx"):
    nnx.Optimizer(stack, ah.adahessian(0.1, block_size=8), wrt=nnx.Param)
  names = ah.spatial.named(nnx.state(stack, nnx.Param))
  optimizer = nnx.Optimizer(  # no warning (an error under this suite's filter)
    stack, ah.adahessian(0.1, b2=0.5, block_size=8, averaging=names), wrt=nnx.Param
  )
  estimate = jax.random.normal(jax.random.key(0), (3, 16, 16))
  grads = jax.tree.map(jnp.ones_like, nnx.state(stack, nnx.Param))
  hdiag = jax.tree.map(lambda _: estimate, nnx.as_pure(nnx.state(stack, nnx.Param)))
  optimizer.update(stack, grads, hessian_diag=hdiag)
  nu = ah.find_adahessian_state(nnx.as_pure(optimizer.opt_state)).nu
  by_hand = np.abs(np.asarray(estimate)).reshape(3, 2, 8, 16).mean(axis=2, keepdims=True)
  by_hand = np.broadcast_to(by_hand, (3, 2, 8, 16)).reshape(3, 16, 16)  # per layer, 8 inputs
  np.testing.assert_allclose(np.sqrt(nu["layers"]["dense"]["kernel"] / 0.5), by_hand, rtol=1e-6)


def test_init_calls_an_averaging_callable_once_per_leaf_of_named_variables():
  """To warn of names that update does not see, init reads the plain arrays too; it called the
  averaging callable again for every leaf there (same path, same leaf). The plain reading now
  reuses the rules the callable gave, and still warns of the named stack."""
  with nnx.use_eager_sharding(False):
    stack = BiasFreeStack(nnx.Rngs(0))
  calls = []

  def averaging(path, leaf):
    calls.append(jax.tree_util.keystr(path))
    return None

  leaf = r"\['layers'\]\['dense'\]\['kernel'\]: shape \(3, 16, 16\)"
  with pytest.warns(ah.spatial.LayoutGuessWarning, match=leaf + r"[\s\S]*spatial\.named\(nnx"):
    nnx.Optimizer(stack, ah.adahessian(0.1, block_size=8, averaging=averaging), wrt=nnx.Param)
  assert calls == ["['layers']['dense']['kernel']"]
  # A rule the callable gives is the plain arrays' rule too: nothing lost, no warning.
  calls.clear()
  per_layer = lambda path, leaf: calls.append(path) or ah.spatial.per_layer(ah.spatial.blocks(8))
  nnx.Optimizer(stack, ah.adahessian(0.1, averaging=per_layer), wrt=nnx.Param)
  assert len(calls) == 1


def test_a_linen_module_as_the_model_is_refused_naming_the_linen_route():
  """A Linen module is callable and no NNX graph node: the helpers said the model and the loss
  were swapped (they were not) instead of that the model is no NNX module."""
  import flax.linen as nn

  x, y = data()
  dense = nn.Dense(1)
  optimizer = nnx.Optimizer(Net(nnx.Rngs(0)), ah.adahessian(0.1), wrt=nnx.Param)
  fix = r"got a flax\.linen\.linear\.Dense, which is no NNX module.*linen\.TrainState"
  with pytest.raises(TypeError, match=fix):
    ah_nnx.value_fn(dense, loss_fn, x, y)
  with pytest.raises(TypeError, match=fix):
    ah_nnx.value_grad_and_hessian_diag(loss_fn, dense, optimizer, x, y)


F64 = {"param_dtype": jnp.float64}


class BiasFreeLinear(nnx.Module):
  def __init__(self, rngs):
    self.lin = nnx.Linear(8, 4, use_bias=False, **F64, rngs=rngs)


class BiasFreeConv(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(4, 4, (3, 3), use_bias=False, **F64, rngs=rngs)


class UserNamedCNN(nnx.Module):
  """Modules under attribute names of the user's, no sharding metadata."""

  def __init__(self, rngs):
    self.dw = nnx.Conv(4, 4, (3, 3), feature_group_count=4, use_bias=False, **F64, rngs=rngs)
    self.mixer = nnx.Conv(4, 4, 3, **F64, rngs=rngs)  # 1-D, kernel (3, 4, 4)
    self.proj = nnx.LinearGeneral((2, 3, 4), 5, axis=(-3, -2, -1), **F64, rngs=rngs)
    self.lins = nnx.vmap(BiasFreeLinear, in_axes=0, out_axes=0)(rngs.split(3))
    self.convs = nnx.vmap(BiasFreeConv, in_axes=0, out_axes=0)(rngs.split(2))
    self.mha = nnx.MultiHeadAttention(
      num_heads=2, in_features=8, qkv_features=8, decode=False, **F64, rngs=rngs
    )
    self.emb = nnx.Embed(10, 8, **F64, rngs=rngs)


def test_strict_optimizer_over_nnx_variables_names_the_module_fix():
  """A strict nnx.Optimizer over a model whose bias-less and depthwise kernels are guesses is
  refused at init, naming ``spatial.named(model)`` (as the guess warning does without strict);
  with it, nothing is guessed."""
  model = UserNamedCNN(nnx.Rngs(0))
  with pytest.raises(
    ValueError,
    match=r"(?s)strict spatial averaging.*\['dw'\]\['kernel'\]"
    r".*These are NNX variables: averaging=spatial\.named\(model\)",
  ):
    nnx.Optimizer(model, ah.adahessian(0.1, averaging=ah.spatial.strict()), wrt=nnx.Param)
  named = ah.spatial.strict(ah.spatial.named(model))
  nnx.Optimizer(model, ah.adahessian(0.1, averaging=named), wrt=nnx.Param)
  with pytest.raises(ValueError, match="strict spatial averaging") as plain:  # plain arrays
    ah.spatial.describe(nnx.as_pure(nnx.state(model, nnx.Param)), ah.spatial.strict())
  assert "These are NNX variables" not in str(plain.value)


def _block_mean(a, axis, size=2):
  """The mean of blocks of ``size`` consecutive entries along ``axis``, broadcast back."""
  a = np.moveaxis(a, axis, 0)
  blocks = a.reshape(a.shape[0] // size, size, *a.shape[1:])
  out = np.broadcast_to(blocks.mean(axis=1, keepdims=True), blocks.shape).reshape(a.shape)
  return np.moveaxis(out, 0, axis)


def _spatial_mean(a, axes):
  return np.broadcast_to(a.mean(axis=axes, keepdims=True), a.shape)


def test_named_model_reads_each_layout_from_its_module_type():
  """NNX modules under names of the user's (self.dw, self.mixer, self.proj) and nnx.vmap stacks
  without metadata: the default reading guessed the bias-less depthwise conv, the 1-D conv and
  the stack of bias-less Linears (a LayoutGuessWarning), and silently read the LinearGeneral
  with three input axes (2, 3, 4, 5) as a 2-D conv and the stack of bias-less 3x3 convs as a 3-D
  conv, averaged across its 2 layers. spatial.named(model) names each axis by its module's type:
  no warning, and the estimate is averaged per block by the documented rules."""
  model = UserNamedCNN(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  # Without named: the guesses flagged (the LinearGeneral's "window" (2, 3) of several sizes
  # too: no sure Conv), one misreading silent (the stack of 3x3 convs).
  plain = {r.path: r for r in ah.spatial.describe(params, block_size=2).rows}
  assert plain["['proj']['kernel']"].rule == ah.spatial.mean_over((0, 1))
  assert plain["['convs']['conv']['kernel']"].rule == ah.spatial.mean_over((0, 1, 2))
  guessed = {p for p, r in plain.items() if r.ambiguous}
  kernels = ("['dw']", "['mixer']", "['lins']['lin']", "['proj']")
  assert guessed == {f"{k}['kernel']" for k in kernels}
  with pytest.warns(ah.spatial.LayoutGuessWarning, match=r"averaging=spatial\.named\(model\)"):
    nnx.Optimizer(model, ah.adahessian(0.1, block_size=2), wrt=nnx.Param)

  named = ah.spatial.named(model)
  rows = {r.path: r for r in ah.spatial.describe(params, named, block_size=2).rows}
  assert not any(r.ambiguous for r in rows.values())
  # Its input axes as Linen's DenseGeneral_0 is read: blocks along the last, the others apart.
  assert rows["['proj']['kernel']"].names == ("heads", "heads", "embed", "mlp")
  assert rows["['proj']['kernel']"].rule == ah.spatial.blocks(2, axis=2)
  assert rows["['convs']['conv']['kernel']"].names == (
    "layers",
    "spatial",
    "spatial",
    "channels",
    "features",
  )
  assert rows["['mha']['out']['kernel']"].names == ("heads", "head_dim", "embed")
  assert rows["['emb']['embedding']"].names == ("vocab", "embed")
  tx = ah.adahessian(0.1, b2=0.5, block_size=2, averaging=named)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)  # no warning (an error in this suite)
  pure = nnx.as_pure(params)
  keys = jax.random.split(jax.random.key(1), len(jax.tree.leaves(pure)))
  leaves, treedef = jax.tree.flatten(pure)
  estimate = treedef.unflatten(
    [jax.random.normal(k, x.shape, jnp.float64) for k, x in zip(keys, leaves, strict=True)]
  )

  @nnx.jit  # one program: op by op, the update of these 20 leaves compiles for ~15 s
  def step(model, optimizer, grads, estimate):
    optimizer.update(model, grads, hessian_diag=estimate)

  step(model, optimizer, jax.tree.map(jnp.ones_like, params), estimate)
  nu = ah.find_adahessian_state(nnx.as_pure(optimizer.opt_state)).nu
  d = jax.tree.map(lambda x: np.sqrt(np.asarray(x) / 0.5), nu)
  h = jax.tree.map(lambda x: np.abs(np.asarray(x)), estimate)
  expected = {
    ("dw", "kernel"): _spatial_mean(h["dw"]["kernel"], (0, 1)),  # 3x3 per channel
    ("mixer", "kernel"): _spatial_mean(h["mixer"]["kernel"], (0,)),  # width 3
    ("proj", "kernel"): _block_mean(h["proj"]["kernel"], 2),  # DenseGeneral: the last input
    ("lins", "lin", "kernel"): _block_mean(h["lins"]["lin"]["kernel"], 1),  # per layer
    ("convs", "conv", "kernel"): _spatial_mean(h["convs"]["conv"]["kernel"], (1, 2)),
    ("emb", "embedding"): _block_mean(h["emb"]["embedding"], 1),  # each token's row apart
    ("mha", "out", "kernel"): _block_mean(h["mha"]["out"]["kernel"], 1),  # head_dim, per head
  }
  for name in ("query", "key", "value"):  # (embed, heads, head_dim): blocks of embed inputs
    expected["mha", name, "kernel"] = _block_mean(h["mha"][name]["kernel"], 0)
  flat_h = {tuple(k.key for k in p): x for p, x in jax.tree_util.tree_flatten_with_path(h)[0]}
  for path, value in jax.tree_util.tree_flatten_with_path(d)[0]:
    keys = tuple(k.key for k in path)
    want = expected.get(keys, flat_h[keys])  # biases: never averaged
    np.testing.assert_allclose(value, want, rtol=1e-12, err_msg=str(keys))


class Norm(nnx.Module):
  def __init__(self, rngs):
    self.norm = nnx.LayerNorm(4, **F64, rngs=rngs)


class Mixed(nnx.Module):
  def __init__(self, rngs):
    named = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("mlp", "embed"))
    self.own = nnx.Linear(4, 4, kernel_init=named, use_bias=False, **F64, rngs=rngs)
    self.dense_like = nnx.Einsum("nd,dhk->nhk", (4, 2, 3), **F64, rngs=rngs)
    self.heads_first = nnx.Einsum("btd,ndh->btnh", (2, 4, 3), **F64, rngs=rngs)
    self.out_like = nnx.Einsum("bthk,hkd->btd", (2, 4, 3), **F64, rngs=rngs)
    self.lora = nnx.LoRA(4, 2, 3, **F64, rngs=rngs)
    self.norms = nnx.vmap(Norm, in_axes=0, out_axes=0)(rngs.split(3))
    self.raw = nnx.Param(jnp.zeros((3, 4, 4), jnp.float64))


def test_named_model_keeps_own_names_and_names_only_the_layouts_it_knows():
  """Sharding metadata wins over the module's type; an nnx.Einsum is named only where its string
  lays the kernel out inputs first; a raw parameter of the user's gets no names (the default
  reading); a model with nothing to name is refused, saying why."""
  with nnx.use_eager_sharding(False):
    model = Mixed(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  rows = {r.path: r for r in ah.spatial.describe(params, ah.spatial.named(model), 2).rows}
  assert rows["['own']['kernel']"].names == ("mlp", "embed")
  assert rows["['dense_like']['kernel']"].names == ("embed", "mlp", "mlp")
  assert rows["['dense_like']['kernel']"].rule == ah.spatial.blocks(2, axis=0)
  assert rows["['heads_first']['kernel']"].names is None  # which axis is the input? unsaid
  # Two contracted axes (an attention output projection's): blocks along the last, per head.
  assert rows["['out_like']['kernel']"].names == ("heads", "embed", "mlp")
  assert rows["['out_like']['kernel']"].rule == ah.spatial.blocks(2, axis=1)
  assert rows["['lora']['lora_a']"].names == ("embed", "features")
  assert rows["['lora']['lora_b']"].names == ("features", "mlp")
  assert rows["['norms']['norm']['scale']"].names == ("layers", "features")
  assert rows["['raw']"].names is None
  plain = {r.path: r for r in ah.spatial.describe(params, block_size=2).rows}
  assert rows["['raw']"].rule == plain["['raw']"].rule == ah.spatial.mean_over((0,))
  with pytest.raises(ValueError, match=r"found no axis names in the Raw.*nnx\.with_partitioning"):
    ah.spatial.named(Raw())


class Gates(nnx.Module):
  def __init__(self, rngs):
    self.gate = nnx.Einsum("btd,td->btd", (4, 6), **F64, rngs=rngs)  # no bias: NNX's default
    self.outer = nnx.Einsum("bd,hd->bhd", (2, 6), **F64, rngs=rngs)
    self.dense = nnx.Einsum("btd,dh->bth", (6, 3), **F64, rngs=rngs)


def test_named_model_keeps_every_entry_of_an_einsum_that_contracts_nothing_apart():
  """An nnx.Einsum whose string contracts no axis ("btd,td->btd", a gate per position and
  channel; "bd,hd->bhd") meets each output entry with one kernel entry: nothing to average.
  spatial.named(model) left it unnamed, so the default reading blocked the (t, d) kernel along
  axis 0 as a Dense kernel's inputs, across positions, unflagged; now its axes are kept apart
  (named heads: no stack, so curvature_floor's mean stays the leaf's). One that contracts d
  ("btd,dh->bth") stays (embed, mlp)."""
  model = Gates(nnx.Rngs(0))
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  named = ah.spatial.named(model)
  rows = {r.path: r for r in ah.spatial.describe(params, named, 2, strict=True).rows}
  for path in ("['gate']['kernel']", "['outer']['kernel']"):
    assert rows[path].names == ("heads", "heads")
    # Kept apart, no stack of layers: curvature_floor takes the leaf's mean, not each entry's.
    assert rows[path].rule == ah.spatial.none() and not rows[path].rule.layer_axes((4, 6))
  assert rows["['dense']['kernel']"].names == ("embed", "mlp")
  assert rows["['dense']['kernel']"].rule == ah.spatial.blocks(2, axis=0)
  d = jax.tree.map(lambda x: np.random.default_rng(0).random(x.shape), params)
  tx = ah.scale_by_adahessian(b2=0.5, block_size=2, averaging=named)
  grads = jax.tree.map(jnp.ones_like, params)
  _, state = jax.jit(functools.partial(tx.update, hessian_diag=d))(grads, tx.init(params), params)
  nu = ah.find_adahessian_state(state).nu
  for key in ("gate", "outer"):
    np.testing.assert_allclose(np.sqrt(np.asarray(nu[key]["kernel"]) / 0.5), d[key]["kernel"])


def test_named_of_a_state_without_metadata_points_to_the_module():
  """``spatial.named(nnx.state(model))`` of a model without sharding metadata (RNG state and
  all) is refused naming the fix that works, ``spatial.named(model)``; the message suggested only
  a state with metadata, which such a state is not."""
  model = Net(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  for state in (nnx.state(model), params, nnx.as_pure(params)):
    fix = r"without axis names.*pass the module itself, spatial\.named\(model\)"
    with pytest.raises(ValueError, match=fix):
      ah.spatial.named(state)
  ah.spatial.named(model)  # the fix: the module's types name its layers
  with pytest.raises(ValueError, match="without axis names") as plain:
    ah.spatial.named(nnx.to_pure_dict(params))
  assert "spatial.named(model)" not in str(plain.value)  # a dict of arrays: could be any model's


class T5Attention(nnx.Module):
  def __init__(self, rngs):
    self.relative_attention_bias = nnx.Embed(8, 4, rngs=rngs)  # (buckets, heads)
    self.tokens = nnx.Embed(6, 4, rngs=rngs)
    self.q = nnx.Linear(4, 4, use_bias=False, rngs=rngs)


class T5Stack(nnx.Module):
  def __init__(self, rngs):
    self.first = T5Attention(rngs)
    self.layers = nnx.vmap(T5Attention, in_axes=0, out_axes=0)(rngs.split(3))


def test_named_model_keeps_a_table_of_attention_biases_one_bias_per_entry():
  """T5's relative position biases are an nnx.Embed(num_buckets, heads) named
  relative_attention_bias: one bias per bucket and head, which the default reading keeps
  (docs/layouts.md). spatial.named(model) named it ("vocab", "embed") by its type, a token
  table, so the estimate was averaged in blocks across its heads, silently, where the plain
  arrays were not: it is left to the default reading, token tables are named as before."""
  model = nnx.eval_shape(lambda: T5Stack(nnx.Rngs(0)))
  params = nnx.state(model, nnx.Param)
  named = ah.spatial.named(model)
  rows = {r.path: r for r in ah.spatial.describe(params, ah.spatial.strict(named), 2).rows}
  plain = {r.path: r for r in ah.spatial.describe(params, block_size=2).rows}
  one, stacked = ah.spatial.none(), ah.spatial.per_layer(ah.spatial.none())
  tokens = ah.spatial.blocks(2, axis=1)
  for where, table_rule, tokens_rule in (
    ("['first']", one, tokens),
    ("['layers']", stacked, ah.spatial.per_layer(tokens)),
  ):
    table = rows[f"{where}['relative_attention_bias']['embedding']"]
    assert table.rule == table_rule and "attention biases" in table.why, table
    assert table.groups == plain[table.path].groups == {1: int(np.prod(table.shape))}
    row = rows[f"{where}['tokens']['embedding']"]
    assert row.names[-2:] == ("vocab", "embed") and row.rule == tokens_rule, row
  pure = nnx.as_pure(params)
  estimate = jax.tree.map(lambda x: np.arange(x.size, dtype=np.float32).reshape(x.shape), pure)
  got = ah.spatial.apply_rules(ah.spatial.resolve_rules(named, pure, 2), estimate)
  np.testing.assert_array_equal(
    got["first"]["relative_attention_bias"]["embedding"],
    estimate["first"]["relative_attention_bias"]["embedding"],
  )


class Raw(nnx.Module):
  def __init__(self):
    self.w = nnx.Param(jnp.zeros((3, 4, 4)))


class ConvAndLinear(nnx.Module):
  def __init__(self, rngs):
    self.mixer = nnx.Conv(4, 5, (3,), use_bias=False, rngs=rngs)  # kernel (3, 4, 5)
    self.lin = nnx.Linear(3, 6, rngs=rngs)  # kernel (3, 6), bias (6,)


class ThreeLayers(nnx.Module):
  def __init__(self, rngs, out_axes):
    self.layers = nnx.vmap(ConvAndLinear, in_axes=0, out_axes=out_axes)(rngs.split(3))
    self.head = nnx.Linear(6, 2, rngs=rngs)


@pytest.mark.parametrize("out_axes", [0, 1])
def test_named_model_names_no_stack_in_front_where_a_sibling_shows_it_elsewhere(out_axes):
  """nnx.vmap(out_axes=1) stacks 3 layers along axis 1: the conv kernel (3, 3, 4, 5) is (width,
  layers, in, out) and the Linear's (3, 3, 6) (in, layers, out), which fit their one-layer shapes
  after a leading axis of 3 by a coincidence of sizes. spatial.named(model) named that axis
  "layers", so the conv was averaged over axis 1 (its layers) and the Linear blocked along it,
  silently. The Linear's bias (6, 3) shows the stack is not in front: the block's parameters
  keep no names then, and the default reading flags them (as it would with other sizes; under a
  convolution's name, "conv", it would take the bias-less kernel for a 2-D one: docs/layouts.md)."""
  model = nnx.eval_shape(lambda: ThreeLayers(nnx.Rngs(0), out_axes))
  params = nnx.state(model, nnx.Param)
  rows = {r.path: r for r in ah.spatial.describe(params, ah.spatial.named(model), 2).rows}
  conv, lin = rows["['layers']['mixer']['kernel']"], rows["['layers']['lin']['kernel']"]
  if out_axes == 0:  # the stack in front: named and read per layer, nothing guessed
    assert conv.names == ("layers", "spatial", "channels", "features")
    assert conv.rule == ah.spatial.per_layer(ah.spatial.mean_over((0,)), axes=(0,))
    assert lin.names == ("layers", "embed", "mlp")
    assert not any(r.ambiguous for r in rows.values())
    return
  assert conv.shape == (3, 3, 4, 5) and lin.shape == (3, 3, 6)
  assert rows["['layers']['lin']['bias']"].shape == (6, 3)
  for row in (conv, lin):
    assert row.names is None and row.ambiguous, row
  assert rows["['head']['kernel']"].names == ("embed", "mlp")  # no stack: named as before
  with pytest.raises(ValueError, match=r"2 leaves are ambiguous"):
    ah.spatial.describe(params, ah.spatial.strict(ah.spatial.named(model)), 2)


class OnlyAStackAlongAxis1(nnx.Module):
  def __init__(self, rngs):
    self.layers = nnx.vmap(ConvAndLinear, in_axes=0, out_axes=1)(rngs.split(3))


def test_named_model_whose_only_known_modules_are_stacked_along_axis_1_says_so():
  """With nothing but an nnx.vmap(out_axes=1) stack, named(model) finds no names: its error
  says the known modules must show their one-layer shape, alone or after a stack in front (it
  read as if the model held no module of a known layout, though it holds a Conv and a Linear)."""
  model = nnx.eval_shape(lambda: OnlyAStackAlongAxis1(nnx.Rngs(0)))
  with pytest.raises(
    ValueError, match=r"after a stack in front \(nnx\.vmap/nnx\.scan with out_axes=0\)"
  ):
    ah.spatial.named(model)


class TwoStacks(nnx.Module):
  """Bias-less Linears vmapped directly, an encoder of 3 beside a decoder of 5 (both stacked in
  front), and a head."""

  def __init__(self, rngs):
    linear = lambda r: nnx.Linear(4, 4, use_bias=False, rngs=r)
    self.enc = nnx.vmap(linear, in_axes=0, out_axes=0)(rngs.split(3))
    self.dec = nnx.vmap(linear, in_axes=0, out_axes=0)(rngs.split(5))
    self.head = nnx.Linear(4, 2, rngs=rngs)


def test_named_model_keeps_two_stacks_of_other_sizes_beside_each_other_per_layer():
  """Two stacks under one parent whose sizes differ (3 and 5 layers) are no sign of a stack
  along another axis: named(model) names both stacks' leading axes "layers" and keeps each layer
  apart, unflagged (a rule that took any sibling of other leading sizes for such a sign left
  these bias-less kernels to the default reading: averaged over their layers as a Conv's window,
  a flagged guess)."""
  model = nnx.eval_shape(lambda: TwoStacks(nnx.Rngs(0)))
  params = nnx.state(model, nnx.Param)
  averaging = ah.spatial.strict(ah.spatial.named(model))
  rows = {r.path: r for r in ah.spatial.describe(params, averaging, 2).rows}
  for path, n in (("['enc']['kernel']", 3), ("['dec']['kernel']", 5)):
    assert rows[path].shape == (n, 4, 4)
    assert rows[path].names == ("layers", "embed", "mlp"), rows[path]
    assert rows[path].rule == ah.spatial.per_layer(ah.spatial.blocks(2, axis=0), axes=(0,))
  assert not any(r.ambiguous for r in rows.values())


def test_pure_gradients_given_to_an_nnx_optimizer_are_refused_naming_nnx_grad():
  """nnx.Optimizer.update keeps only the Variables of grads that its filter selects, so a pure
  dict of gradients reached tx.update as an empty state: the error said to pass updates "with the
  tree of the params", which the dict had."""
  x, y = data()
  model = Net(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, ah.adahessian(0.1), wrt=nnx.Param)
  grads = jitted_grad(model, x, y)  # moves the BatchNorm statistics
  value_fn = ah_nnx.value_fn(model, loss_fn, x, y)
  before = jax.tree.map(np.array, nnx.as_pure(nnx.state((model, optimizer))))
  for pure in (nnx.to_pure_dict(grads), nnx.as_pure(grads)):
    with pytest.raises(ValueError, match=r"no leaves at all: nnx\.Optimizer\.update.*nnx\.grad"):
      optimizer.update(model, pure, value_fn=value_fn)
  assert_trees_allclose(nnx.as_pure(nnx.state((model, optimizer))), before, rtol=0)


def test_a_modules_state_as_the_model_is_refused_where_it_is_given():
  """nnx.state(model), nnx.split(model) or a pure dict in place of the module: value_fn accepted
  it and the loss failed at the update with "'State' object is not callable" and a note to use
  value_fn (which was used); the fused route failed the same way, or said the filter selects
  nothing."""
  x, y = data()
  model = Net(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, ah.adahessian(0.1), wrt=nnx.Param)
  for state in (nnx.state(model), nnx.split(model), nnx.to_pure_dict(nnx.state(model))):
    fix = rf"got a {type(state).__qualname__} that holds no module.*Pass the module itself"
    with pytest.raises(TypeError, match=fix):
      ah_nnx.value_fn(state, loss_fn, x, y)
    with pytest.raises(TypeError, match=fix):
      ah_nnx.value_grad_and_hessian_diag(loss_fn, state, optimizer, x, y)


def test_value_fn_takes_the_parameters_as_a_pure_dict():
  """Functional NNX code keeps parameters as pure dicts (nnx.to_pure_dict); value_fn refused
  one of the very variables it was built for, saying to pass the optimizer's filter."""
  x, y = data()
  model = Net(nnx.Rngs(0))
  value_fn = ah_nnx.value_fn(model, loss_fn, x, y)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  pure = nnx.to_pure_dict(params)
  np.testing.assert_allclose(value_fn(pure), loss_fn(model, x, y), rtol=1e-12)
  # The same step by optax on the pure dict as on the state (each one program, not op by op).
  tx = ah.adahessian(0.1)
  step = jax.jit(lambda g, p: tx.update(g, tx.init(p), p, value_fn=value_fn)[0])
  grads = jitted_grad(model, x, y)
  updates = step(nnx.as_pure(grads), params)
  pure_grads = nnx.to_pure_dict(grads)
  pure_updates = step(pure_grads, pure)
  assert_trees_allclose(pure_updates, nnx.to_pure_dict(updates), rtol=1e-12)


def test_a_pure_dict_hessian_diag_for_state_params_names_the_containers():
  """A pure-dict estimate for an nnx.Optimizer (whose params are an nnx.State) was refused with
  two tree structures to compare by eye."""
  x, y = data()
  model = Net(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, ah.adahessian(0.1), wrt=nnx.Param)
  grads = jitted_grad(model, x, y)
  hdiag = jax.tree.map(jnp.ones_like, nnx.to_pure_dict(grads))
  with pytest.raises(ValueError, match=r"same leaf paths, but is a dict where .* is a State"):
    optimizer.update(model, grads, hessian_diag=hdiag)


def test_model_and_optimizer_placed_together_compile_the_jitted_step_once():
  # docs/usage.md's recipe for training on a device chosen with jax.device_put. Placing only the
  # model left nnx.Optimizer's own step count uncommitted (AdaHessian's state follows the
  # params), and nnx.jit compiled the step again at its second call, for any optimizer.
  x, y = jax.device_put(data(), jax.devices()[0])
  model = Net(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, ah.adahessian(0.05, update_freq=2), wrt=nnx.Param)
  nnx.update((model, optimizer), jax.device_put(nnx.state((model, optimizer)), jax.devices()[0]))
  assert all(leaf.committed for leaf in jax.tree.leaves(nnx.state((model, optimizer))))

  @nnx.jit
  def step(model, optimizer, x, y):
    loss, grads, hdiag = ah_nnx.value_grad_and_hessian_diag(loss_fn, model, optimizer, x, y)
    optimizer.update(model, grads, hessian_diag=hdiag)
    return loss

  losses = [step(model, optimizer, x, y)]
  with CompileCounter() as compiles:  # the state the first step returns: nothing new
    losses += [step(model, optimizer, x, y) for _ in range(4)]
  assert compiles.count == 0 and int(optimizer.step[...]) == 5
  assert float(losses[-1]) < float(losses[0])


def test_an_nnx_optimizers_opt_state_with_its_variables_is_refused_naming_as_pure():
  """optimizer.opt_state holds its arrays in nnx.OptArray Variables: the package's own fused route
  and probe_keys given it failed in JAX's wrap_key_data with "Triggering __jax_array__() during
  abstractification", naming neither the state nor nnx.as_pure."""
  x, y = data()
  model = nnx.Linear(4, 1, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, ah.adahessian(0.1), wrt=nnx.Param)
  graphdef, params = nnx.split(model, nnx.Param)
  loss = lambda p: loss_fn(nnx.merge(graphdef, p), x, y)
  fix = r"key is a flax\.nnx\..*OptArray .*nnx\.as_pure\(optimizer\.opt_state\)"
  with pytest.raises(ValueError, match=fix):
    ah.value_grad_and_hessian_diag(loss)(params, optimizer.opt_state)
  with pytest.raises(ValueError, match=fix):
    ah.probe_keys(ah.find_adahessian_state(optimizer.opt_state))
  # The fix the message gives: the same step as the nnx helper's.
  pure = ah.value_grad_and_hessian_diag(loss)(params, nnx.as_pure(optimizer.opt_state))
  helper = ah_nnx.value_grad_and_hessian_diag(loss_fn, model, optimizer, x, y)
  assert_trees_allclose(nnx.as_pure(pure[2]), nnx.as_pure(helper[2]), rtol=1e-12)
  np.testing.assert_allclose(pure[0], helper[0], rtol=1e-12)


def test_masked_value_fn_given_the_variables_of_nnx_state_says_to_pass_them_pure():
  # nnx.Optimizer hands its tx plain arrays; masked_value_fn's full_params from nnx.state(model)
  # hold Variables, and the call failed with a bare KeyError ((DictKey('l2'), DictKey('bias'))).
  import optax

  model = Net(nnx.Rngs(0))
  x, y = data()
  labels = lambda p: jax.tree_util.tree_map_with_path(
    lambda path, _: "ada" if "l2" in jax.tree_util.keystr(path) else "frozen", p
  )
  tx = optax.multi_transform({"ada": ah.adahessian(0.1), "frozen": optax.set_to_zero()}, labels)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  grads = jitted_grad(model, x, y)
  value_fn = ah_nnx.value_fn(model, loss_fn, x, y)
  fix = r"hold NNX Variables .* pass nnx.as_pure\(nnx.state\(model, optimizer.wrt\)\)"
  for held in (nnx.state(model, nnx.Param), nnx.state(model)):  # the BatchStats too
    with pytest.raises(ValueError, match=fix):
      optimizer.update(model, grads, value_fn=ah.masked_value_fn(value_fn, held))
  # The fix the message gives trains the owned leaves only, as the fused route does.
  frozen = nnx.as_pure(nnx.state(model.l1))
  full = nnx.as_pure(nnx.state(model, optimizer.wrt))
  optimizer.update(model, grads, value_fn=ah.masked_value_fn(value_fn, full))
  assert_trees_allclose(nnx.as_pure(nnx.state(model.l1)), frozen, rtol=0, atol=0)
  assert not np.allclose(model.l2.kernel[...], full["l2"]["kernel"])


def test_map_adahessian_state_over_an_nnx_optimizers_state_keeps_its_variables():
  # optimizer.opt_state holds its arrays in Variables. A fn putting a plain key in was taken, and
  # the next optimizer.update failed in Flax ("Cannot set key 'key' on immutable node of type
  # ScaleByAdaHessianState"); one keeping the Variable was refused as if it were no key data.
  model = Net(nnx.Rngs(0))
  x, y = data()
  optimizer = nnx.Optimizer(model, ah.adahessian(0.1, update_freq=2), wrt=nnx.Param)
  new_key = jax.random.key_data(jax.random.split(jax.random.key(7), 1))
  with pytest.raises(
    TypeError,
    match=r"whose key holds a plain array where the given state's holds a Variable \(OptArray\)"
    r".*s._replace\(key=s.key.replace\(new_value\)\).*find_adahessian_state\(optimizer.opt_state\)"
    r".key\[...\] = new_value",
  ):
    ah.map_adahessian_state(lambda s: s._replace(key=new_key), optimizer.opt_state)
  optimizer.opt_state = ah.map_adahessian_state(
    lambda s: s._replace(key=s.key.replace(new_key)), optimizer.opt_state
  )
  np.testing.assert_array_equal(ah.find_adahessian_state(optimizer.opt_state).key[...], new_key)
  # The update draws its probes from the new key, as after setting it in place.
  other_model = Net(nnx.Rngs(0))
  other = nnx.Optimizer(other_model, ah.adahessian(0.1, update_freq=2), wrt=nnx.Param)
  hdiag_before = ah_nnx.value_grad_and_hessian_diag(loss_fn, other_model, other, x, y)[2]
  ah.find_adahessian_state(other.opt_state).key[...] = new_key
  expected = ah_nnx.value_grad_and_hessian_diag(loss_fn, other_model, other, x, y)[2]
  _, grads, hdiag = ah_nnx.value_grad_and_hessian_diag(loss_fn, model, optimizer, x, y)
  assert_trees_allclose(hdiag, expected, rtol=0, atol=0)
  assert not np.allclose(hdiag["l1"]["kernel"], hdiag_before["l1"]["kernel"])
  optimizer.update(model, grads, hessian_diag=hdiag)
  np.testing.assert_array_equal(optimizer.step[...], 1)


def test_find_adahessian_state_in_the_nnx_state_of_an_optimizer_names_its_opt_state():
  # nnx.state(optimizer) holds the NamedTuples as dicts; the error blamed a checkpoint restored
  # without a target, which there was none of.
  model = Net(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, ah.adahessian(0.1), wrt=nnx.Param)
  for state in (nnx.state(optimizer), nnx.as_pure(nnx.state((model, optimizer)))):
    with pytest.raises(ValueError, match=r"found 0\. An nnx.State .* optimizer.opt_state") as e:
      ah.find_adahessian_state(state)
    assert "checkpoint" not in str(e.value)
  assert int(ah.find_adahessian_state(optimizer.opt_state).count[...]) == 0
