"""AdaHessian inside optax combinators: multi_transform, masked, MultiSteps, apply_if_finite."""

import functools
import warnings

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_trees_allclose

import adahessian_jax as ah

LABELS = {"hidden": {"kernel": "ada", "bias": "ada"}, "out": {"kernel": "sgd", "bias": "sgd"}}


def closure_step(tx, loss_fn, batch):
  """A jitted step of ``tx`` by the closure route, the whole-model loss wrapped for the mask."""

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss_fn)(params, batch)
    value_fn = ah.masked_value_fn(lambda p: loss_fn(p, batch), params)
    updates, state = tx.update(grads, state, params, value_fn=value_fn)
    return optax.apply_updates(params, updates), state

  return step


def test_multi_transform_with_whole_model_closure_equals_adahessian_on_the_subtree(mlp_problem):
  params, loss_fn, batch = mlp_problem
  tx = optax.multi_transform({"ada": ah.adahessian(0.1), "sgd": optax.sgd(0.05)}, LABELS)
  state = tx.init(params)
  # Reference: AdaHessian on the "hidden" subtree alone, "out" held fixed in its loss,
  # plain SGD on "out".
  ref_tx = ah.adahessian(0.1)
  ref_state = ref_tx.init(params["hidden"])
  ref = params
  step = closure_step(tx, loss_fn, batch)

  @jax.jit  # one program, not op by op
  def ref_step(ref, ref_state):
    grads = jax.grad(loss_fn)(ref, batch)
    sub_loss = lambda h, out=ref["out"]: loss_fn({"hidden": h, "out": out}, batch)
    u, ref_state = ref_tx.update(grads["hidden"], ref_state, ref["hidden"], value_fn=sub_loss)
    ref = {
      "hidden": optax.apply_updates(ref["hidden"], u),
      "out": jax.tree.map(lambda p, g: p - 0.05 * g, ref["out"], grads["out"]),
    }
    return ref, ref_state

  for _ in range(4):
    params, state = step(params, state)
    ref, ref_state = ref_step(ref, ref_state)
  assert_trees_allclose(params, ref, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
  "update_freq, labels", [(1, LABELS), (2, LABELS), (1, {"hidden": "ada", "out": "sgd"})]
)
def test_inside_multi_transform_the_fused_route_follows_the_closure_route(
  mlp_problem, update_freq, labels
):
  # The fused route drew its probes over the whole model, so the other leaves' curvature leaked
  # into the owned leaves' estimate (H_on z_n); its probes now skip them as the closure's do.
  # Labels given as a prefix of the params (one label per subtree) put one MaskedNode for a whole
  # subtree in the state; the fused route took that for a state without masks and did so again.
  params, loss_fn, batch = mlp_problem
  tx = optax.multi_transform(
    {"ada": ah.adahessian(0.1, update_freq=update_freq), "sgd": optax.sgd(0.05)}, labels
  )
  vgh = ah.value_grad_and_hessian_diag(loss_fn)
  closure = closure_step(tx, loss_fn, batch)

  @jax.jit
  def fused(params, state):
    _, grads, hdiag = vgh(params, state, batch)
    updates, state = tx.update(grads, state, params, hessian_diag=hdiag)
    return optax.apply_updates(params, updates), state

  a, b = (params, tx.init(params)), (params, tx.init(params))
  for _ in range(5):
    a, b = closure(*a), fused(*b)
  assert_trees_allclose(b[0], a[0], rtol=1e-12, atol=1e-15)
  assert not np.allclose(a[0]["hidden"]["kernel"], params["hidden"]["kernel"])  # it trained


def test_an_adahessian_that_owns_no_leaf_leaves_the_other_transform_alone(mlp_problem):
  # A label that no leaf carries (all "sgd" for now): AdaHessian's estimate and its mark are over
  # no leaf, and the fused route has no leaf of its own to mark.
  params, loss_fn, batch = mlp_problem
  tx = optax.multi_transform({"ada": ah.adahessian(0.1), "sgd": optax.sgd(0.05)}, "sgd")
  vgh = ah.value_grad_and_hessian_diag(loss_fn)

  @jax.jit
  def fused(params, state):
    _, grads, hdiag = vgh(params, state, batch)
    updates, state = tx.update(grads, state, params, hessian_diag=hdiag)
    return optax.apply_updates(params, updates), state

  want = jax.tree.map(lambda p, g: p - 0.05 * g, params, jax.jit(jax.grad(loss_fn))(params, batch))
  for step in (closure_step(tx, loss_fn, batch), fused):
    got, _ = step(params, tx.init(params))
    assert_trees_allclose(got, want, rtol=1e-13, atol=1e-15)


def test_rules_for_the_whole_model_with_labels_given_as_a_prefix(mlp_problem):
  # Labels as a prefix hand AdaHessian one MaskedNode for all of "out"; a tree of rules written for
  # the whole model has entries inside it, and init refused them as "not in the params".
  params, loss_fn, batch = mlp_problem
  rules = {
    "hidden": {"kernel": ah.spatial.blocks(2, axis=0), "bias": None},
    "out": {"kernel": ah.spatial.blocks(2, axis=0), "bias": None},
  }
  tx = optax.multi_transform(
    {"ada": ah.adahessian(0.1, averaging=rules), "sgd": optax.set_to_zero()},
    {"hidden": "ada", "out": "sgd"},
  )
  state = tx.init(params)
  grads = jax.jit(jax.grad(loss_fn))(params, batch)
  value_fn = ah.masked_value_fn(lambda p: loss_fn(p, batch), params)
  updates, _ = jax.jit(lambda: tx.update(grads, state, params, value_fn=value_fn))()
  ref_tx = ah.adahessian(0.1, averaging=rules["hidden"])
  sub_loss = lambda h: loss_fn({"hidden": h, "out": params["out"]}, batch)

  @functools.partial(jax.jit, static_argnums=0)  # each update one program, not op by op
  def hidden_update(tx):
    return tx.update(
      grads["hidden"], ref_tx.init(params["hidden"]), params["hidden"], value_fn=sub_loss
    )[0]

  expected = hidden_update(ref_tx)
  assert_trees_allclose(updates["hidden"], expected, rtol=1e-12, atol=1e-15)
  unaveraged = hidden_update(ah.adahessian(0.1))
  assert not np.allclose(expected["kernel"], unaveraged["kernel"])  # the rules were applied


def test_a_stack_whose_biases_another_transform_owns_is_read_with_them_in_view():
  # Kernels to AdaHessian, biases to SGD (the labels above): the bias (layers, out) that shows the
  # kernel's leading axis to be a stack is a MaskedNode to AdaHessian, so its kernel (layers, in,
  # out) reads as a convolution, averaged across the layers. The warning says how to read the
  # whole tree, and those rules keep the layers apart as on the whole model.
  params = {"mlp": {"kernel": jnp.ones((3, 4, 5)), "bias": jnp.zeros((3, 5))}}
  labels = {"mlp": {"kernel": "ada", "bias": "sgd"}}
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.5), params)
  est = {"mlp": {"kernel": jnp.arange(60.0).reshape(3, 4, 5) + 1, "bias": jnp.ones((3, 5))}}
  # Each update one program, not op by op.
  one_step = lambda tx: jax.jit(lambda: tx.update(grads, tx.init(params), params, hessian_diag=est))
  expected, _ = one_step(ah.adahessian(0.1))()

  def kernel_update(averaging):
    tx = optax.multi_transform(
      {"ada": ah.adahessian(0.1, averaging=averaging), "sgd": optax.sgd(0.01)}, labels
    )
    updates, _ = one_step(tx)()
    return updates["mlp"]["kernel"]

  with pytest.warns(ah.spatial.LayoutGuessWarning, match=r"the 1 leaf of the other transforms"):
    guessed = kernel_update(None)
  assert not np.allclose(guessed, expected["mlp"]["kernel"])  # averaged across the layers
  rules = ah.spatial.resolve_rules(None, params, warn=True)
  np.testing.assert_allclose(kernel_update(rules), expected["mlp"]["kernel"], rtol=1e-6)


def test_a_whole_model_hessian_diag_inside_optax_flatten_says_why_it_does_not_fit(mlp_problem):
  params, loss_fn, batch = mlp_problem
  tx = optax.flatten(ah.adahessian(0.1))
  with pytest.warns(UserWarning, match="inside optax.flatten"):
    state = tx.init(params)
  loss, grads, hdiag = jax.jit(ah.value_grad_and_hessian_diag(loss_fn))(params, state, batch)
  with pytest.raises(ValueError, match=r"Inside optax.flatten .* keep AdaHessian outside"):
    tx.update(grads, state, params, hessian_diag=hdiag)


def test_inside_optax_flatten_init_warns_and_a_loss_of_the_tree_is_told_to_unflatten(mlp_problem):
  # optax.flatten hands AdaHessian one vector: the layouts that the spatial averaging reads were
  # lost without a word, and a loss written for the tree failed in the user's own code ("JAX does
  # not support string indexing"), naming neither the wrapper nor the fix.
  params, loss_fn, batch = mlp_problem
  tx = optax.flatten(ah.adahessian(0.1))
  with pytest.warns(UserWarning, match=r"inside optax.flatten.*rank-1.*Keep AdaHessian outside"):
    state = tx.init(params)
  grads = jax.grad(loss_fn)(params, batch)
  step = jax.jit(lambda s, vf: tx.update(grads, s, params, value_fn=vf), static_argnums=1)
  with pytest.raises(TypeError) as error:
    step(state, lambda p: loss_fn(p, batch))
  notes = " ".join(getattr(error.value, "__notes__", []))
  assert "inside optax.flatten" in notes and "ravel_pytree" in notes
  # The fix the note gives runs; with the probes of the tree (the fused route's estimate, flattened
  # as the hessian_diag error says) it is the unwrapped step, this MLP having nothing to average.
  _, unravel = jax.flatten_util.ravel_pytree(params)
  step(state, lambda v: loss_fn(unravel(v), batch))
  ref_tx = ah.adahessian(0.1)
  # Each one program, not op by op.
  fused = jax.jit(ah.value_grad_and_hessian_diag(loss_fn))
  _, _, hdiag = fused(params, ref_tx.init(params), batch)
  flat_hdiag = jnp.concatenate([h.ravel() for h in jax.tree.leaves(hdiag)])
  updates, _ = jax.jit(lambda h: tx.update(grads, state, params, hessian_diag=h))(flat_hdiag)
  expected, _ = jax.jit(
    lambda h: ref_tx.update(grads, ref_tx.init(params), params, hessian_diag=h)
  )(hdiag)
  assert_trees_allclose(updates, expected, rtol=1e-13, atol=1e-16)


@pytest.mark.parametrize("update_freq", [1, 2])
def test_inside_optax_flatten_the_fused_route_follows_the_closure_route(mlp_problem, update_freq):
  # The value_fn route draws each probe for the one vector optax.flatten hands the transform; the
  # fused route drew one per leaf of the tree, other probes: 2.0 apart after 5 steps (3.1 with
  # update_freq=2). It now draws them for the vector too, split into the leaves.
  params, loss_fn, batch = mlp_problem
  tx = optax.flatten(ah.adahessian(0.1, update_freq=update_freq, n_samples=2))
  _, unravel = jax.flatten_util.ravel_pytree(params)
  vgh = ah.value_grad_and_hessian_diag(loss_fn)

  @jax.jit
  def closure(params, state):
    grads = jax.grad(loss_fn)(params, batch)
    value_fn = lambda v: loss_fn(unravel(v), batch)
    updates, state = tx.update(grads, state, params, value_fn=value_fn)
    return optax.apply_updates(params, updates), state

  @jax.jit
  def fused(params, state):
    _, grads, hdiag = vgh(params, state, batch)
    flat_hdiag = jax.flatten_util.ravel_pytree(hdiag)[0]
    updates, state = tx.update(grads, state, params, hessian_diag=flat_hdiag)
    return optax.apply_updates(params, updates), state

  with pytest.warns(UserWarning, match="inside optax.flatten"):
    a = b = (params, tx.init(params))
  for _ in range(5):
    a, b = closure(*a), fused(*b)
  assert_trees_allclose(b, a, rtol=1e-12, atol=1e-15)
  assert not np.allclose(a[0]["hidden"]["kernel"], params["hidden"]["kernel"])  # it trained


def test_no_flatten_warning_outside_optax_flatten(mlp_problem):
  params, _, _ = mlp_problem
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    optax.chain(optax.masked(ah.adahessian(0.1), True)).init(params)


def test_masked_needs_the_wrapper_and_says_so(mlp_problem):
  params, loss_fn, batch = mlp_problem
  mask = jax.tree.map(lambda label: label == "ada", LABELS)
  tx = optax.masked(ah.adahessian(0.1), mask)
  state = tx.init(params)
  with pytest.raises(ValueError, match="masked_value_fn"):
    tx.update(params, state, params, value_fn=lambda p: loss_fn(p, batch))


def test_an_integer_leaf_masked_out_trains_by_the_closure_route_and_is_named_by_the_fused():
  # A step counter in the params, kept from AdaHessian by the mask: the closure route trains;
  # the fused route differentiates every leaf and failed inside jax.jvp on float0 tangents.
  params = {"step": jnp.asarray(3, jnp.int32), "w": jnp.full(3, 0.5)}
  loss = lambda p: jnp.sum(jnp.cos(p["w"]) * p["step"] + p["w"] ** 4)
  tx = optax.masked(ah.adahessian(0.1), {"step": False, "w": True})
  state = tx.init(params)

  @jax.jit  # one program, not op by op
  def w_update(params, state):
    grads = jax.grad(loss, allow_int=True)(params)
    return tx.update(grads, state, params, value_fn=ah.masked_value_fn(loss, params))[0]["w"]

  assert bool(jnp.all(w_update(params, state) != 0))
  with pytest.raises(TypeError, match=r"leaf at \['step'\] has dtype int32.*masked_value_fn"):
    ah.value_grad_and_hessian_diag(loss)(params, state)


def test_fused_route_with_two_adahessian_members_says_what_to_do_instead(mlp_problem):
  params, loss_fn, batch = mlp_problem
  tx = optax.multi_transform({"ada": ah.adahessian(0.1), "sgd": ah.adahessian(0.01)}, LABELS)
  vgh = ah.value_grad_and_hessian_diag(loss_fn)
  with pytest.raises(ValueError, match="holds 2 .*scale_by_learning_rate.*masked_value_fn"):
    vgh(params, tx.init(params), batch)
  with pytest.raises(ValueError, match="holds none: pass the state of the optimizer"):
    vgh(params, optax.adam(0.1).init(params), batch)


def test_masked_with_whole_model_hessian_diag_from_the_fused_route(mlp_problem):
  params, loss_fn, batch = mlp_problem
  mask = jax.tree.map(lambda label: label == "ada", LABELS)
  tx = optax.masked(ah.adahessian(0.1, seed=2), mask)
  state = tx.init(params)
  vgh = ah.value_grad_and_hessian_diag(loss_fn)  # finds the state inside MaskedState

  @jax.jit  # one program, not op by op
  def fused(params, state):
    _, grads, hdiag = vgh(params, state, batch)
    return grads, hdiag, *tx.update(grads, state, params, hessian_diag=hdiag)

  grads, hdiag, updates, new_state = fused(params, state)
  # Masked-out leaves pass through untouched; owned leaves get exactly AdaHessian's
  # first step on the restricted estimate: g / (|D| + eps) * (-lr).
  np.testing.assert_array_equal(updates["out"]["kernel"], grads["out"]["kernel"])
  expected = -0.1 * grads["hidden"]["kernel"] / (jnp.abs(hdiag["hidden"]["kernel"]) + 1e-4)
  np.testing.assert_allclose(updates["hidden"]["kernel"], expected, rtol=1e-12)
  assert int(ah.find_adahessian_state(new_state).count) == 1


@pytest.mark.parametrize(
  "labels,drop,named",
  [
    # The owned leaves' estimate only, where the other transform's leaf must be filled in too.
    (LABELS, lambda d: {"hidden": d["hidden"]}, "no leaf at ['out']['bias'], where the params"),
    # Labels as a prefix of the params: one MaskedNode for a whole subtree.
    ({"hidden": "ada", "out": "sgd"}, lambda d: {"hidden": d["hidden"]}, "no leaf at ['out']"),
    (LABELS, lambda d: {**d, "hidden": {"kernel": d["hidden"]["kernel"]}}, "['hidden']['bias']"),
    (LABELS, lambda d: {**d, "extra": jnp.ones(2)}, "a leaf at ['extra'], where the params have"),
  ],
)
def test_a_hessian_diag_that_does_not_fit_a_multi_transform_names_the_leaf(
  mlp_problem, labels, drop, named
):
  # The error printed both trees' whole PyTreeDefs (thousands of characters for a real model),
  # naming no leaf, where the same error outside a combinator names one.
  params, loss_fn, batch = mlp_problem
  tx = optax.multi_transform({"ada": ah.adahessian(0.1), "sgd": optax.sgd(0.01)}, labels)
  grads = jax.grad(loss_fn)(params, batch)
  hdiag = drop(jax.tree.map(jnp.ones_like, params))
  with pytest.raises(ValueError, match="must have the tree of the whole model's params") as e:
    tx.update(grads, tx.init(params), params, hessian_diag=hdiag)
  assert named in str(e.value) and "PyTreeDef" not in str(e.value)


def test_multi_steps_cost_and_semantics(mlp_problem):
  """optax.MultiSteps runs the inner update, hence the Hessian-vector product, on every
  micro-step (k products per optimizer step, k - 1 discarded), and the estimate that
  survives is the last micro-batch's. Documented; the exact alternative is below."""
  params, loss_fn, (x, y) = mlp_problem
  k = 4
  micro = [(x[i::k], y[i::k]) for i in range(k)]
  calls = []

  def counted(p, b):
    jax.debug.callback(lambda: calls.append(1))
    return loss_fn(p, b)

  # MultiSteps accumulates in float32 unless told otherwise.
  tx = optax.MultiSteps(ah.adahessian(0.1), every_k_schedule=k, accumulator_dtype=jnp.float64)
  state = tx.init(params)

  @jax.jit
  def micro_step(params, state, b):
    grads = jax.grad(loss_fn)(params, b)
    updates, state = tx.update(grads, state, params, value_fn=lambda p: counted(p, b))
    return optax.apply_updates(params, updates), state

  p = params
  for b in micro:
    p, state = micro_step(p, state, b)
  jax.effects_barrier()
  assert len(calls) == k  # one product per micro-step

  # Equivalent: one AdaHessian step on the mean gradient with the last micro-batch's estimate.
  inner = ah.adahessian(0.1)

  @jax.jit  # one program, not op by op
  def reference(params):
    mean_grad = jax.tree.map(lambda *g: sum(g) / k, *[jax.grad(loss_fn)(params, b) for b in micro])
    return inner.update(
      mean_grad, inner.init(params), params, value_fn=lambda q: loss_fn(q, micro[-1])
    )[0]

  u = reference(params)
  assert_trees_allclose(p, optax.apply_updates(params, u), rtol=1e-10, atol=1e-14)


def test_fused_route_inside_multi_steps_does_not_poison_the_accumulator():
  """A non-finite estimate on one micro-step made the fused route mark a gradient entry NaN (for
  optax.apply_if_finite); MultiSteps' accumulator, reset by multiplying with zero, kept that NaN
  for good, and the entry never trained again. Inside MultiSteps nothing is marked."""
  params = {"a": jnp.ones(3, jnp.float32), "b": jnp.full((2,), 1e-36, jnp.float32)}

  def loss(p, c):  # c = 1.5e19: b's Hessian-vector product (2c²) overflows, its gradient does not
    return jnp.sum(p["a"] ** 2) + jnp.sum((c * p["b"]) ** 2)

  tx = optax.MultiSteps(ah.adahessian(0.1), every_k_schedule=2)
  vgh = ah.value_grad_and_hessian_diag(loss)

  @jax.jit
  def micro_step(params, state, c):
    _, grads, hdiag = vgh(params, state, c)
    updates, state = tx.update(grads, state, params, hessian_diag=hdiag)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for c in [1.5e19, 1.0, 1.0, 1.0]:  # the overflowing estimate is a discarded micro-step's
    params, state = micro_step(params, state, jnp.float32(c))
  for leaf in jax.tree.leaves((params, state)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert bool(jnp.all(jnp.isfinite(leaf)))
  np.testing.assert_array_less(np.asarray(params["a"]), 0.95)  # a[0], the marked entry, too


def test_multi_steps_inside_another_combinator_drops_the_loss_and_the_error_says_where():
  # optax.MultiSteps is no GradientTransformationExtraArgs, so optax.chain (and apply_if_finite)
  # drop value_fn before it: the error asked for the value_fn the caller had passed.
  params = {"w": jnp.full(3, 0.5)}
  loss = lambda p: jnp.sum(p["w"] ** 4)
  grads = jax.grad(loss)(params)
  inner = optax.MultiSteps(ah.adahessian(0.1), every_k_schedule=2)
  tx = optax.chain(optax.clip_by_global_norm(1.0), inner)
  with pytest.raises(ValueError, match=r"wrapper dropped it.*MultiSteps is not \(put it outermost"):
    tx.update(grads, tx.init(params), params, value_fn=loss)
  outer = optax.MultiSteps(optax.chain(optax.clip_by_global_norm(1.0), ah.adahessian(0.1)), 2)
  # The order that works (one program, not op by op).
  jax.jit(lambda p: outer.update(grads, outer.init(p), p, value_fn=loss))(params)


@pytest.mark.parametrize(
  "wrap, name",
  [
    (lambda tx: optax.lookahead(tx, sync_period=2, slow_step_size=0.5), "optax.lookahead"),
    (lambda tx: optax.contrib.sam(tx, optax.sgd(0.05)), "optax.contrib.sam"),
    (lambda tx: optax.contrib.sam(optax.sgd(0.05), tx), "optax.contrib.sam"),
    (lambda tx: optax.contrib.scale_by_galore(rank=2, base_optimizer=tx), "optax.contrib.galore"),
  ],
)
def test_inside_lookahead_sam_or_galore_both_routes_name_the_wrapper(mlp_problem, wrap, name):
  # None of them passes extra arguments on (lookahead and sam refuse value_fn themselves), so
  # AdaHessian got none; its error blamed optax.MultiSteps and Flax's TrainState, neither of them
  # there (GaLore's still did). The fused route found the state inside theirs, spent the
  # Hessian-vector product, and only the tx.update after it failed: it now refuses at once.
  params, loss_fn, batch = mlp_problem
  tx = wrap(ah.adahessian(0.1))
  grads = jax.grad(loss_fn)(params, batch)
  tx_params = params
  if name == "optax.lookahead":  # its params are the fast and slow copies, its updates the fast
    tx_params = optax.LookaheadParams.init_synced(params)
  state = tx.init(tx_params)
  with pytest.raises(ValueError, match=rf"called by {name}.*without ") as error:
    jax.jit(tx.update)(grads, state, tx_params)
  assert "MultiSteps" not in str(error.value)
  products = []

  def counted(p, b):
    products.append(1)  # a Python side effect: once per trace of the loss
    return loss_fn(p, b)

  vgh = jax.jit(ah.value_grad_and_hessian_diag(counted))
  reach = rf"no hessian_diag can reach.*inside that of {name}.*without "
  with pytest.raises(ValueError, match=reach):
    vgh(params, state, batch)
  assert not products  # refused before the loss was traced


@pytest.mark.parametrize(
  "wrap",
  [
    lambda tx: optax.contrib.schedule_free(tx, learning_rate=1.0),
    lambda tx: optax.contrib.mechanize(tx),
    lambda tx: optax.conditionally_transform(tx, lambda step: step % 2 == 0),
  ],
  ids=["schedule_free", "mechanize", "conditionally_transform"],
)
def test_wrappers_that_pass_the_arguments_on_give_both_routes_one_trajectory(mlp_problem, wrap):
  # What docs/usage.md says of them: the inner AdaHessian's first step is the unwrapped one, and the
  # value_fn and fused routes follow one trajectory (the fused route's product on a step that
  # conditionally_transform skips is discarded).
  params, loss_fn, batch = mlp_problem
  inner = ah.adahessian(0.1, update_freq=2)
  tx = wrap(inner)
  vgh = ah.value_grad_and_hessian_diag(loss_fn)

  @jax.jit
  def closure(params, state):
    grads = jax.grad(loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params, value_fn=lambda p: loss_fn(p, batch))
    return optax.apply_updates(params, updates), state

  @jax.jit
  def fused(params, state):
    _, grads, hdiag = vgh(params, state, batch)
    updates, state = tx.update(grads, state, params, hessian_diag=hdiag)
    return optax.apply_updates(params, updates), state

  a = b = (params, tx.init(params))
  a = closure(*a)
  grads = jax.jit(jax.grad(loss_fn))(params, batch)
  value_fn = lambda p: loss_fn(p, batch)
  alone = jax.jit(lambda g, p: inner.update(g, inner.init(p), p, value_fn=value_fn)[1])(
    grads, params
  )
  found = ah.find_adahessian_state
  assert_trees_allclose(found(a[1]), found(alone), rtol=1e-12, atol=1e-15)
  for _ in range(3):
    a, b = closure(*a), fused(*b)
  b = fused(*b)
  assert_trees_allclose(b, a, rtol=1e-12, atol=1e-15)


def test_exact_gradient_accumulation_with_the_fused_route(mlp_problem):
  """The documented alternative to MultiSteps: accumulate the fused route's gradient AND
  estimate over equal micro-batches (same probes: same opt_state), then update once.
  Equals the full-batch step exactly, and every product is used."""
  params, loss_fn, (x, y) = mlp_problem
  k = 4
  micro = (x.reshape(k, -1, x.shape[1]), y.reshape(k, -1, y.shape[1]))
  tx = ah.adahessian(0.1, n_samples=2)
  state = tx.init(params)
  vgh = ah.value_grad_and_hessian_diag(loss_fn)

  @jax.jit
  def accumulated_step(params, state, micro):
    def body(carry, b):
      loss, g, h = vgh(params, state, b)
      return jax.tree.map(jnp.add, carry, (loss, g, h)), None

    zeros = (jnp.zeros(()), optax.tree.zeros_like(params), optax.tree.zeros_like(params))
    total, _ = jax.lax.scan(body, zeros, micro)
    loss, grads, hdiag = jax.tree.map(lambda t: t / k, total)
    updates, state = tx.update(grads, state, params, hessian_diag=hdiag)
    return optax.apply_updates(params, updates), state

  full_batch = (micro[0].reshape(-1, x.shape[1]), micro[1].reshape(-1, y.shape[1]))

  @jax.jit
  def full_step(params, state):
    grads = jax.grad(loss_fn)(params, full_batch)
    updates, state = tx.update(grads, state, params, value_fn=lambda p: loss_fn(p, full_batch))
    return optax.apply_updates(params, updates), state

  pa, sa, pf, sf = params, state, params, state
  for _ in range(3):
    pa, sa = accumulated_step(pa, sa, micro)
    pf, sf = full_step(pf, sf)
  assert_trees_allclose(pa, pf, rtol=1e-11, atol=1e-14)


def test_apply_if_finite_skips_bad_steps_without_touching_state(mlp_problem):
  params, loss_fn, batch = mlp_problem
  tx = optax.apply_if_finite(ah.adahessian(0.1, update_freq=2), max_consecutive_errors=5)
  state = tx.init(params)
  value_fn = lambda p: loss_fn(p, batch)
  grads = jax.grad(loss_fn)(params, batch)
  _, state = tx.update(grads, state, params, value_fn=value_fn)
  before = ah.find_adahessian_state(state)
  bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads)
  updates, state = tx.update(bad, state, params, value_fn=value_fn)
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
  assert int(state.notfinite_count) == 1
  assert_trees_allclose(ah.find_adahessian_state(state), before, rtol=0.0)
  updates, state = tx.update(grads, state, params, value_fn=value_fn)
  assert int(ah.find_adahessian_state(state).count) == 2


@pytest.mark.parametrize("update_freq", [None, 2])
def test_inject_hyperparams_changed_between_steps_as_an_array_compiles_once(
  mlp_problem, update_freq
):
  """docs/usage.md's way to change a hyperparameter between steps keeps one compiled step; a Python
  float is another input type to jit, which compiles it twice."""
  params, loss_fn, batch = mlp_problem
  make = optax.inject_hyperparams(ah.adahessian, static_args=ah.STATIC_ARGS)
  tx = make(learning_rate=optax.linear_schedule(0.1, 0.05, 10), update_freq=update_freq)
  traces = []

  @jax.jit
  def step(params, state):
    traces.append(1)
    grads = jax.grad(loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params, value_fn=lambda p: loss_fn(p, batch))
    return optax.apply_updates(params, updates), state

  def run(new_b1):
    del traces[:]
    p, s = params, tx.init(params)
    for i in range(6):
      p, s = step(p, s)
      if i == 2:
        s.hyperparams["b1"] = new_b1(s.hyperparams["b1"].dtype)
    return len(traces), float(s.hyperparams["b1"])

  assert run(lambda dtype: jnp.asarray(0.95, dtype)) == (1, 0.95)
  step.clear_cache()
  assert run(lambda dtype: 0.95) == (2, 0.95)


@pytest.mark.parametrize("name", ["b1", "b2", "eps", "weight_decay", "learning_rate"])
def test_inject_hyperparams_set_to_a_vector_between_steps_is_refused_under_jit(name):
  """Under jit only the values of injected hyperparameters go unchecked: one set to an array of
  shape (1,) made the scalar parameter, and its moment, of shape (1,), without an error."""
  params = {"s": jnp.asarray(1.0), "w": jnp.ones((2, 3))}
  loss = lambda p: p["s"] ** 2 + jnp.sum(p["w"] ** 2)
  tx = optax.inject_hyperparams(ah.adahessian)(learning_rate=0.1, weight_decay=0.01)
  state = tx.init(params)
  state.hyperparams[name] = jnp.full((1,), state.hyperparams[name])

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params, value_fn=loss)
    return optax.apply_updates(params, updates), state

  with pytest.raises(ValueError, match=rf"^{name} must be a real scalar, got a traced array of "):
    step(params, state)
  state.hyperparams[name] = state.hyperparams[name][0]  # one value: trains as before
  new_params, _ = step(params, state)
  assert jax.tree.map(jnp.shape, new_params) == {"s": (), "w": (2, 3)}


def test_masked_value_fn_full_params_of_another_model_are_named():
  # Another tree failed with JAX's tree_map error, which names no leaf; a tree of other shapes
  # filled the leaves another transform owns with its own, silently.
  params = {"a": jnp.ones(3), "b": jnp.ones(2)}
  loss = lambda p: jnp.sum(p["a"] ** 2) + jnp.sum(p["b"] ** 3)
  tx = optax.masked(ah.adahessian(0.1), {"a": True, "b": False})
  state = tx.init(params)
  grads = jax.grad(loss)(params)
  # One program (not op by op); the errors come while tracing.
  step = jax.jit(
    lambda full: tx.update(grads, state, params, value_fn=ah.masked_value_fn(loss, full))
  )
  with pytest.raises(ValueError, match=r"full_params do not fit the params: they have no leaf at"):
    step({"x": jnp.ones(3)})
  with pytest.raises(ValueError, match=r"their leaf at \['a'\] has shape \(4,\), the param there"):
    step({"a": jnp.ones(4), "b": jnp.ones(2)})
  # The whole model's params: the first step on the owned leaf is -lr * g / H = -0.1 * 2a / 2.
  np.testing.assert_allclose(step(params)[0]["a"], -0.1, rtol=1e-3)


def test_masked_value_fn_names_an_nnx_leaf_by_its_canonical_path():
  # NNX params (Variables) of other shapes than full_params' read "their leaf at
  # ['linear']['bias'].value", where the rest of the package names ['linear']['bias'].
  nnx = pytest.importorskip("flax.nnx")
  full = nnx.State({"linear": {"bias": nnx.Param(jnp.ones(2)), "kernel": nnx.Param(jnp.ones(3))}})
  params = nnx.State({"linear": {"bias": nnx.Param(jnp.ones(3)), "kernel": nnx.Param(jnp.ones(3))}})
  loss = lambda p: jnp.sum(p["linear"]["kernel"][...] ** 2)
  with pytest.raises(
    ValueError, match=r"their leaf at \['linear'\]\['bias'\] has shape \(2,\), the"
  ):
    ah.masked_value_fn(loss, full)(params)
