"""Every analysis of adahessian_jax.hessian stops on a non-finite loss and checks its counts."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hessian_problems import mlp, mlp_loss

from adahessian_jax import hessian
from adahessian_jax.hutchinson import rademacher_like


def nan_loss(p, batch):
  return mlp_loss(p, batch) * jnp.nan


@pytest.fixture(scope="module")
def ops():
  """A good operator, and a NaN one that records the size of every block product it is asked."""
  params, batch = mlp()
  good = hessian.hessian_operator(mlp_loss, params, batch)
  bad = hessian.hessian_operator(nan_loss, params, batch, block_size=4)
  calls = []

  def counted(vs):
    calls.append(vs.shape[0])
    return bad.matmat_fn(vs)

  return good, dataclasses.replace(bad, matmat_fn=counted), calls


ANALYSES = {
  "top_eigenvalues": lambda op: hessian.top_eigenvalues(op, 2, max_iter=50),
  "power_iteration": lambda op: hessian.power_iteration(op, 1, max_iter=50),
  "hutchinson_trace": lambda op: hessian.hutchinson_trace(op, jax.random.key(0), max_samples=400),
  "hutchpp_trace": lambda op: hessian.hutchpp_trace(op, jax.random.key(0), max_samples=400),
  "xtrace": lambda op: hessian.xtrace(op, jax.random.key(0), 40),
  "hutchinson_diagonal_estimate": lambda op: hessian.hutchinson_diagonal_estimate(
    op, jax.random.key(0), 400
  ),
  "xdiag": lambda op: hessian.xdiag(op, jax.random.key(0), 40),
  "spectral_density": lambda op: hessian.spectral_density(op, jax.random.key(0), num_steps=50),
  "layer_breakdown": lambda op: hessian.layer_breakdown(op, jax.random.key(0), num_samples=400),
  "track_curvature": lambda op: hessian.track_curvature(op),
}


@pytest.mark.parametrize("name", sorted(ANALYSES))
def test_a_nan_loss_is_an_error_at_the_first_product(ops, name):
  _, bad, calls = ops
  calls.clear()
  with pytest.raises(hessian.NonFiniteError, match="not finite"):
    ANALYSES[name](bad)
  # Stopped at once: one product call (a sketch needs one block), not the whole budget.
  assert len(calls) == 1, calls


def test_top_eigenvalues_of_a_nan_loss_is_no_longer_converged_nan():
  params, batch = mlp()
  op = hessian.hessian_operator(nan_loss, params, batch)
  with pytest.raises(FloatingPointError, match="Lanczos step 1"):
    hessian.top_eigenvalues(op)


@pytest.mark.parametrize(
  "call, message",
  [
    (lambda op: hessian.top_eigenvalues(op, 2.5), r"k must be an integer in \[1, 75\], got 2.5"),
    (lambda op: hessian.top_eigenvalues(op, 76), r"k must be an integer in \[1, 75\], got 76"),
    (lambda op: hessian.top_eigenvalues(op, True), "k must be an integer"),
    (lambda op: hessian.top_eigenvalues(op, 1, max_iter=0), "max_iter must be an integer"),
    (lambda op: hessian.top_eigenvalues(op, 1, tol=-1.0), "tol must be a finite real"),
    (lambda op: hessian.top_eigenvalues(op, 1, tol="0.1"), "tol must be a finite real"),
    (lambda op: hessian.top_eigenvalues(op, v0=np.zeros(75)), "nonzero"),
    (lambda op: hessian.top_eigenvalues(op, v0=np.ones(7)), "75 entries"),
    (lambda op: hessian.top_eigenvalues(op, stop_on="x"), "stop_on"),
    (lambda op: hessian.power_iteration(op, 1.0), "k must be an integer"),
    (
      lambda op: hessian.hutchinson_trace(op, jax.random.key(0), max_samples=10.5),
      "max_samples must be an integer",
    ),
    (
      lambda op: hessian.hutchinson_trace(op, jax.random.key(0), min_samples=5, max_samples=2),
      r"min_samples must be an integer in \[1, 2\], got 5",
    ),
    (lambda op: hessian.hutchinson_trace(op, jax.random.key(0), rtol=np.nan), "rtol"),
    (lambda op: hessian.hutchpp_trace(op, jax.random.key(0), sketch_size=-1), "sketch_size"),
    (  # checked also where the sketch alone gives the exact trace
      lambda op: hessian.hutchpp_trace(op, jax.random.key(0), sketch_size=10**6, rtol=-1.0),
      "rtol",
    ),
    (
      lambda op: hessian.xtrace(op, jax.random.key(0), 3),
      "num_matvecs must be an integer >= 4, got 3",
    ),
    (lambda op: hessian.xdiag(op, jax.random.key(0), 8.0), "num_matvecs must be an integer"),
    (
      lambda op: hessian.hutchinson_diagonal_estimate(op, jax.random.key(0), 1),
      "num_samples must be an integer >= 2, got 1",
    ),
    (lambda op: hessian.spectral_density(op, jax.random.key(0), num_probes=0), "num_probes"),
    (lambda op: hessian.spectral_density(op, jax.random.key(0), sigma=0.0), "sigma"),
    (lambda op: hessian.layer_breakdown(op, jax.random.key(0), block_size=0), "block_size"),
    (lambda op: hessian.loss_landscape_1d(op, [0.0], np.ones(75), chunk=0), "chunk"),
    (lambda op: op.block(9), r"leaf must be an integer in \[0, 3\]"),
    (lambda op: op.block("nope"), "no leaf named"),
    (lambda op: hessian.track_curvature(op, trace_matvecs=-2), "trace_matvecs"),
  ],
)
def test_counts_and_sizes_are_checked_with_one_wording(ops, call, message):
  good, _, _ = ops
  with pytest.raises(ValueError, match=message):
    call(good)


KEYED = {
  "top_eigenvalues": lambda op, key: hessian.top_eigenvalues(op, key=key),
  "power_iteration": lambda op, key: hessian.power_iteration(op, key=key),
  "hutchinson_trace": hessian.hutchinson_trace,
  "hutchpp_trace": hessian.hutchpp_trace,
  "xtrace": hessian.xtrace,
  "hutchinson_diagonal_estimate": hessian.hutchinson_diagonal_estimate,
  "xdiag": hessian.xdiag,
  "spectral_density": hessian.spectral_density,
  "layer_breakdown": hessian.layer_breakdown,
  "track_curvature": lambda op, key: hessian.track_curvature(op, key=key),
  "random_direction": hessian.random_direction,
}


@pytest.mark.parametrize("name", sorted(KEYED))
def test_a_key_that_is_not_one_prng_key_is_named_before_any_product(ops, name):
  # An int seed failed deep in jax.random ("invalid PRNG key data ... Got 0"), a batch of keys
  # with "split accepts a single key": neither named the argument or the fix.
  _, bad, calls = ops
  calls.clear()
  with pytest.raises(ValueError, match=r"key must be a single PRNG key, got 0 of type int; pass "):
    KEYED[name](bad, 0)
  keys = jax.random.split(jax.random.key(0), 3)
  with pytest.raises(ValueError, match=r"got a batch of typed keys of shape \(3,\); pass one key"):
    KEYED[name](bad, keys)
  with pytest.raises(ValueError, match=r"a batch of raw keys of shape \(3, 2\)"):
    KEYED[name](bad, jax.random.key_data(keys))
  assert calls == []


@pytest.mark.parametrize("name", sorted(set(KEYED) - {"random_direction"}))
def test_an_analysis_under_jit_or_vmap_is_refused_before_any_product(ops, name):
  """A traced key failed at the first value read on the host with JAX's
  TracerArrayConversionError on an internal array, naming no argument; so did a concrete key
  given inside jax.jit, and the default key of the eigen solves (made inside the trace) was
  blamed as a traced key the caller never passed. Under vmap, the key is what is traced."""
  _, bad, calls = ops
  calls.clear()
  inside = r"this analysis was called inside a traced function: .*outside jax\.jit"
  with pytest.raises(ValueError, match=inside):
    jax.jit(lambda k: KEYED[name](bad, k))(jax.random.key(0))
  with pytest.raises(ValueError, match=inside):
    jax.jit(lambda s: KEYED[name](bad, jax.random.key(0)))(1.0)
  with pytest.raises(
    ValueError, match=r"key must be a concrete PRNG key, got a traced one.*outside"
  ):
    jax.vmap(lambda k: KEYED[name](bad, k))(jax.random.split(jax.random.key(0), 2))
  assert calls == []


@pytest.mark.parametrize("analysis", ["top_eigenvalues", "power_iteration", "track_curvature"])
def test_an_eigen_solve_under_jit_with_its_default_key_names_the_call_not_the_key(ops, analysis):
  _, bad, calls = ops
  calls.clear()
  with pytest.raises(ValueError, match=r"called inside a traced function") as caught:
    jax.jit(lambda s: getattr(hessian, analysis)(bad))(1.0)
  assert "key" not in str(caught.value).split(":")[0]
  assert calls == []


def test_a_traced_direction_preconditioner_or_grid_is_named_with_the_host_loop_fix(ops):
  """A traced direction, v0 or preconditioner failed with NumPy's TracerArrayConversionError, a
  traced grid of steps as "a 1-D array of finite numbers, got JitTracer(...) (dtype object)"."""
  good, _, _ = ops
  flat, steps = jnp.ones(good.size), jnp.asarray([0.0, 1.0])
  host = r" is traced \(float64\[(75|2)\]\): the analyses are host loops .* outside jax.jit"
  for name, call, arg in [
    ("alphas", lambda a: hessian.loss_landscape_1d(good, a, flat).losses, steps),
    ("betas", lambda b: hessian.loss_landscape_2d(good, [0.0], b, (flat, -flat)).losses, steps),
    ("the direction", lambda d: hessian.loss_landscape_1d(good, [0.0], d).losses, flat),
    ("the direction", lambda d: hessian.normalize_direction(good, d, "filter"), flat),
    ("the preconditioner", lambda p: hessian.preconditioned_operator(good, p).size, flat),
    ("grid", lambda g: hessian.spectral_density(good, jax.random.key(0), grid=g).density, steps),
  ]:
    with pytest.raises(ValueError, match=rf"^{name} must be a concrete array, but it" + host):
      jax.jit(call)(arg)
  tree, key = good.unravel(flat), jax.random.key(0)  # a pytree names the leaf
  with pytest.raises(
    ValueError, match=r"^v0 must be concrete arrays, but its leaf at \['hidden'\]"
  ):
    jax.jit(lambda v: hessian.top_eigenvalues(good, key=key, v0=v).eigenvalues)(tree)


def test_random_direction_may_be_traced(ops):
  good, _, _ = ops
  key = jax.random.key(3)
  traced = jax.jit(lambda k: hessian.random_direction(good, k))(key)
  np.testing.assert_array_equal(traced, hessian.random_direction(good, key))


def test_an_operator_built_under_a_transformation_names_the_traced_leaf():
  params, batch = mlp()
  host = r" is traced \(float64\[8\]\): the analyses are host loops .* outside jax.jit"
  with pytest.raises(
    ValueError, match=r"params must be concrete arrays.*\['hidden'\]\['bias'\]" + host
  ):
    jax.jit(lambda p: hessian.hessian_operator(mlp_loss, p, batch).size)(params)
  with pytest.raises(ValueError, match=r"params must be concrete.*\['hidden'\]\['bias'\]"):
    jax.grad(lambda p: hessian.top_eigenvalues(hessian.hessian_operator(mlp_loss, p, batch)))(
      params
    )
  with pytest.raises(
    ValueError, match=r"^batches\[1\] must be concrete arrays, but its leaf at \[0\]"
  ):
    jax.jit(lambda b: hessian.hessian_operator(mlp_loss, params, batches=[batch, b]).size)(batch)


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"which": "la"}, r"which must be one of \('LA', 'LM', 'SA'\), got 'la'"),
    ({"tol": 0.0}, r"tol must be a finite real number in \(0.0, 1.0\), got 0.0"),
    ({"max_iter": 0}, "max_iter must be an integer >= 1, got 0"),
  ],
)
def test_layer_breakdown_checks_its_eigen_arguments_before_the_trace_probes(ops, kwargs, message):
  # They were checked by the first eigen solve, after num_samples products on every probe.
  _, bad, calls = ops
  calls.clear()
  with pytest.raises(ValueError, match=message):
    hessian.layer_breakdown(bad, jax.random.key(0), **kwargs)
  assert calls == []


@pytest.mark.parametrize(
  "call, message",
  [
    (lambda op: hessian.loss_landscape_1d(op, [0.0], chunk=0), "chunk must be an integer"),
    (lambda op: hessian.loss_landscape_2d(op, [0.0], [0.0], chunk=0), "chunk must be an integer"),
    (lambda op: hessian.loss_landscape_1d(op.block(3), [0.0]), "needs the loss and data"),
    (lambda op: hessian.loss_landscape_2d(op.masked(3), [0.0], [0.0]), "needs the loss and data"),
    # An empty grid spent the eigenvectors' products, then gave an empty landscape.
    (lambda op: hessian.loss_landscape_1d(op, []), "alphas is empty: give at least one step"),
    (lambda op: hessian.loss_landscape_2d(op, [], [0.0]), "alphas is empty"),
    (lambda op: hessian.loss_landscape_2d(op, [0.0], np.zeros(0)), "betas is empty"),
    (lambda op: hessian.loss_landscape_2d(op, [0.0], [np.inf]), "betas must be finite, got inf"),
  ],
)
def test_landscapes_check_steps_chunk_and_data_before_the_default_directions(ops, call, message):
  # They were checked after the top eigenvectors, the default directions, were computed.
  _, bad, calls = ops
  calls.clear()
  with pytest.raises(ValueError, match=message):
    call(bad)
  assert calls == []


def test_a_raw_key_is_the_typed_key_it_holds(ops):
  good, _, _ = ops
  raw = jax.random.PRNGKey(3)
  typed = hessian.xtrace(good, jax.random.wrap_key_data(raw), 8)
  assert hessian.xtrace(good, raw, 8) == typed


@pytest.mark.parametrize("name", sorted(KEYED))
def test_a_typed_key_of_another_implementation_draws_its_own_probes(ops, name):
  # The key check accepts a typed rbg key, but the probes' key data were wrapped as the default
  # threefry: every probe-drawing analysis failed inside JAX ("invalid PRNG key data: expected
  # key_data.shape to end with (2,); got shape=(8, 4)").
  good, _, _ = ops
  out = KEYED[name](good, jax.random.key(3, impl="rbg"))
  assert all(np.all(np.isfinite(np.asarray(x, float))) for x in jax.tree.leaves(out))


def test_an_rbg_probe_is_the_one_rademacher_like_draws_from_its_key(ops):
  # Row i is the probe of key i, as the optimizer draws it (rbg draws other bits under vmap).
  good, _, _ = ops
  keys = jax.random.split(jax.random.key(3, impl="rbg"), 5)
  want = [good.ravel(rademacher_like(k, good.params)) for k in keys]
  np.testing.assert_array_equal(good.probes(keys), np.stack(want))
  estimate = hessian.hutchinson_diagonal_estimate(good, jax.random.key(4, impl="rbg"), 6)
  sampled = [
    good.ravel(rademacher_like(k, good.params))
    for k in jax.random.split(jax.random.key(4, impl="rbg"), 6)
  ]
  z = np.stack(sampled)
  np.testing.assert_allclose(
    good.ravel(estimate.diagonal), np.mean(z * np.asarray(good.matmat(z)), axis=0), rtol=1e-12
  )


def test_counts_may_be_integer_arrays_and_reals_may_not_be_traced(ops):
  good, _, _ = ops
  # A 0-d integer array is a count like the int it holds; a traced real cannot be checked.
  by_array = hessian.top_eigenvalues(good, np.int64(2), max_iter=jnp.asarray(40))
  by_int = hessian.top_eigenvalues(good, 2, max_iter=40)
  np.testing.assert_array_equal(by_array.eigenvalues, by_int.eigenvalues)
  with pytest.raises(ValueError, match="tol must be a concrete real number, got a traced value"):
    jax.jit(lambda t: hessian.top_eigenvalues(good, 1, tol=t).eigenvalues)(1e-3)


def test_a_nan_loss_with_finite_curvature_stops_every_analysis():
  # log(p0 - 1) at p0 = 0 is NaN while its curvature, -1/(p0 - 1)², is finite: the products
  # were finite, so the analyses reported the Hessian of a point where the loss is undefined.
  loss = lambda p, b: jnp.sum(p["w"] ** 2) + jnp.log(p["w"][0] - 1.0) * b
  op = hessian.hessian_operator(loss, {"w": jnp.zeros(3)}, 1.0)
  for analyse in (
    lambda: hessian.top_eigenvalues(op, 1),
    lambda: hessian.hutchinson_trace(op, jax.random.key(0)),
    lambda: hessian.track_curvature(op),
  ):
    with pytest.raises(hessian.NonFiniteError, match="not finite"):
      analyse()


def test_a_non_finite_batch_among_several_is_named_with_its_entry():
  # One NaN input among five batches made every analysis fail with "check op.loss() and the
  # params", both of which look fine batch by batch: the message did not say which batch.
  params, batch = mlp()
  batches = [jax.tree.map(lambda x, i=i: x + 0.1 * i, batch) for i in range(5)]
  batches[3] = (batches[3][0].at[2, 1].set(jnp.nan), batches[3][1])
  op = hessian.hessian_operator(mlp_loss, params, batches=batches)
  named = r"The loss on batches\[3\] is nan; batches\[3\]\[0\]\[2, 1\] is nan\."
  for analyse in (
    lambda: hessian.top_eigenvalues(op, 1),
    lambda: hessian.hutchinson_trace(op, jax.random.key(0)),
    lambda: hessian.hutchinson_diagonal_estimate(op, jax.random.key(0)),
  ):
    with pytest.raises(hessian.NonFiniteError, match=named):
      analyse()
  # One batch: named as the batch; a NaN loss from finite data says so.
  with pytest.raises(hessian.NonFiniteError, match=r"The loss on the batch is nan; batch\[0\]"):
    hessian.top_eigenvalues(hessian.hessian_operator(mlp_loss, params, batches[3]), 1)
  log = lambda p, b: jnp.sum(p["w"] ** 2) + jnp.log(p["w"][0] - 1.0) * b
  with pytest.raises(hessian.NonFiniteError, match=r"is nan \(its entries are all finite\)"):
    hessian.top_eigenvalues(hessian.hessian_operator(log, {"w": jnp.zeros(3)}, 1.0), 1)


def test_a_finite_loss_with_non_finite_curvature_and_integer_batch_leaves_are_told_apart():
  # sqrt(|w|) at w = 0: the loss is finite, its curvature infinite.
  root = lambda p, b: jnp.sum(jnp.sqrt(jnp.abs(p["w"]))) * b
  op = hessian.hessian_operator(root, {"w": jnp.array([0.0, 1.0])}, 1.0)
  with pytest.raises(hessian.NonFiniteError, match="finite on every batch; its curvature is not"):
    hessian.top_eigenvalues(op, 1)
  # An integer leaf (labels) before the NaN one is passed over, not searched for a NaN.
  scaled = lambda p, b: jnp.sum(p["w"] ** 2) * jnp.mean(b["x"]) + 0.0 * jnp.sum(b["a"])
  batch = {"a": jnp.arange(3), "x": jnp.array([1.0, jnp.nan, 1.0])}
  op = hessian.hessian_operator(scaled, {"w": jnp.ones(2)}, batch)
  with pytest.raises(
    hessian.NonFiniteError, match=r"The loss on the batch is nan; batch\['x'\]\[1\]"
  ):
    hessian.top_eigenvalues(op, 1)


def test_a_dropout_key_in_the_batch_does_not_hide_the_nan_loss_it_is_searched_for():
  # A typed PRNG key in the batch (a dropout key, as docs/hessian_analysis.md's "dropout one fixed
  # mask" needs) made the search for the batch's NaN entry fail with NumPy's "JAX array with
  # PRNGKey dtype cannot be converted to a NumPy array", a TypeError in place of NonFiniteError.
  def loss(p, b):
    keep = jax.random.bernoulli(b["rng"], 0.5, b["x"].shape)
    return jnp.mean(jnp.where(keep, b["x"], 0.0) * p["w"] ** 2) + jnp.log(p["w"][0] - 1.0)

  batch = {"rng": jax.random.key(0), "x": jnp.ones((4, 2))}
  op = hessian.hessian_operator(loss, {"w": jnp.zeros(2)}, batches=[batch, batch])
  with pytest.raises(hessian.NonFiniteError, match=r"batches\[0\] is nan \(its entries are all"):
    hessian.top_eigenvalues(op, 1)
  # A NaN input after the key (leaves in key order: "rng" before "x") is still found and named.
  scaled = lambda p, b: jnp.sum(p["w"] ** 2) * jnp.mean(b["x"] * jax.random.uniform(b["rng"]))
  bad = {"rng": jax.random.key(0), "x": jnp.ones((4, 2)).at[3, 1].set(jnp.nan)}
  op = hessian.hessian_operator(scaled, {"w": jnp.ones(2)}, bad)
  with pytest.raises(hessian.NonFiniteError, match=r"on the batch is nan; batch\['x'\]\[3, 1\] is"):
    hessian.hutchinson_trace(op, jax.random.key(1))


def test_params_that_are_not_finite_or_empty_are_refused_at_once():
  params, batch = mlp()
  params = {**params, "out": {**params["out"], "bias": params["out"]["bias"].at[1].set(jnp.nan)}}
  with pytest.raises(
    hessian.NonFiniteError, match=r"params are not finite: nan at \['out'\]\['bias'\]\[1\]"
  ):
    hessian.hessian_operator(mlp_loss, params, batch)
  # Params that are one array have the path '', and the error said "nan at ." or "nan at [1]".
  quartic = lambda p, b: jnp.sum(p**4)
  root = r"the root \(the tree is a single array\)\. Analyse"
  with pytest.raises(hessian.NonFiniteError, match=r"params are not finite: nan at " + root):
    hessian.hessian_operator(quartic, jnp.asarray(jnp.nan), jnp.ones(1))
  with pytest.raises(hessian.NonFiniteError, match=r"not finite: inf at entry \[1\] of " + root):
    hessian.hessian_operator(quartic, jnp.asarray([1.0, jnp.inf]), jnp.ones(1))
  # On jax 0.7.0 (the floor; .ci/min_versions.sh runs this) {} ravels to a scalar, and the
  # operator had size 1: Lanczos found the eigenvalue 0 of a Hessian without entries.
  with pytest.raises(ValueError, match="params has no entries"):
    hessian.hessian_operator(lambda p, b: jnp.asarray(0.0), {}, jnp.ones(1))


def test_a_loss_of_the_params_alone_says_to_take_the_batch():
  # The optimizer's value_fn, lambda p: loss(p, batch), failed with Python's bare "takes 1
  # positional argument but 2 were given".
  params, batch = mlp()
  with pytest.raises(TypeError, match=r"loss_fn\(params, batch\).*lambda p, b: loss\(p, b\)"):
    hessian.hessian_operator(lambda p: mlp_loss(p, batch), params, batch)
  # A loss(params, x, y) given the batch (x, y): the fix unpacks it.
  x, y = batch
  with pytest.raises(TypeError, match=r"lambda p, b: loss\(p, \*b\) for a loss\(params, x, y\)"):
    hessian.hessian_operator(lambda p, xb, yb: mlp_loss(p, (xb, yb)), params, (x, y))


def test_a_loss_that_ignores_its_params_gets_the_analyses_fix():
  # A loss_fn closing over the outer params got the optimizer's advice ("fn returned ...", "every
  # step lr·g/eps", "write lambda p: loss_fn(p, batch)", nnx.Optimizer), not the analyses'.
  params, batch = mlp()
  op = hessian.hessian_operator(lambda p, b: mlp_loss(params, b), params, batch)
  message = (
    r"^loss_fn returned a loss that does not depend on the params it was called with, so its "
    r"gradient and Hessian there are zero\. It probably uses other params than its argument: "
    r"write lambda p, b: loss\(p, b\), not lambda p, b: loss\(params, b\); for NNX"
  )
  for analyse in (
    lambda: hessian.top_eigenvalues(op),
    lambda: hessian.hutchinson_trace(op, jax.random.key(0)),
  ):
    with pytest.raises(ValueError, match=message) as info:
      analyse()
    assert "lr·g/eps" not in str(info.value) and "value_fn" not in str(info.value)


@pytest.mark.parametrize(
  "grid,message",
  [
    (np.zeros((2, 3)), r"grid must be a 1-D array of finite numbers, got shape \(2, 3\)"),
    ([0.0, np.nan], r"grid must be finite, got nan at index 1"),
    (["a"], "grid must be a 1-D array of finite numbers"),
    ([True, False], r"grid must be a 1-D array of finite numbers, got \[True, False\]"),
    (["1", "2.5"], r"grid must be a 1-D array of finite numbers, got \['1', '2.5'\]"),
    ([], "grid is empty: give at least one point"),
  ],
)
def test_a_bad_density_grid_is_refused_before_any_product(ops, grid, message):
  good, _, _ = ops
  with pytest.raises(ValueError, match=message):
    hessian.spectral_density(
      dataclasses.replace(good, matmat_fn=None), jax.random.key(0), grid=grid
    )


def test_tracking_max_iter_counts_the_start_block(ops):
  good, _, _ = ops
  with pytest.raises(ValueError, match=r"max_iter must be an integer >= 2, got 1"):
    hessian.track_curvature(good, max_iter=1)  # spent 2 products
  assert hessian.track_curvature(good, max_iter=3, block_size=2).sharpness.num_matvecs <= 3


def test_hutchpp_rejects_unknown_stopping_arguments(ops):
  with pytest.raises(TypeError, match=r"unknown arguments \['max_sample'\]"):
    hessian.hutchpp_trace(ops[0], jax.random.key(0), max_sample=3)


def test_derived_operators_without_data_say_so(ops):
  good, _, _ = ops
  with pytest.raises(ValueError, match="needs the loss and data"):
    hessian.loss_landscape_1d(good.masked(0), [0.0])
  with pytest.raises(ValueError, match="needs the loss and data"):
    good.block(1).loss()


@pytest.mark.parametrize(
  "call",
  [
    lambda op, d: hessian.loss_landscape_1d(op, [0.0, 1.0], d),
    lambda op, d: hessian.normalize_direction(op, d, "unit"),
    lambda op, d: hessian.top_eigenvalues(op, v0=d),
    lambda op, d: hessian.preconditioned_operator(op, d),
  ],
)
def test_complex_vectors_are_refused_not_cast_to_real(ops, call):
  # Cast to the params' float64, the imaginary part was dropped with a ComplexWarning: a direction
  # 1 + 1j gave the landscape of 1, and v0 = 1j was "not a nonzero vector".
  good, _, _ = ops
  flat = jnp.ones(good.size) * (1.0 + 1.0j)
  tree = jax.tree.map(lambda x: x.astype(jnp.complex64), good.params)
  with pytest.raises(ValueError, match=r"must be real, but it has dtype complex128"):
    call(good, flat)
  with pytest.raises(ValueError, match=r"real, but its leaf at \['hidden'\]\['bias'\] has dtype"):
    call(good, tree)
  with pytest.raises(ValueError, match=r"real, but its leaf at \['hidden'\]\['bias'\] has dtype"):
    good.ravel(tree)


def test_a_scalar_type_or_dtype_leaf_is_refused_as_no_array():
  # jnp.float32 and np.dtype("float32") have a dtype, so they passed the check of real values as
  # float32 arrays and failed later in JAX ("JAX scalar type ... cannot be interpreted as a JAX
  # array"), naming neither the argument nor the leaf; np.float32's class attribute .dtype
  # failed inside the check ("Cannot interpret '<attribute 'dtype' ...'"), and op.ravel and
  # normalize_direction said it "has shape <attribute 'shape' of 'numpy.generic' objects>" (np.shape
  # reads the class's attribute), as a whole tree "a single value of shape <attribute ...>".
  params = {"a": jnp.array(2.0), "b": jnp.ones(3)}
  op = hessian.hessian_operator(lambda p, b: p["a"] ** 2 * jnp.sum(p["b"] ** 2) * b, params, 1.0)
  kinds = (jnp.float32, "_ScalarMeta"), (np.dtype("float32"), "Float32DType"), (np.float32, "type")
  for leaf, kind in kinds:
    tree = {"a": leaf, "b": jnp.ones(3)}
    for call, what in (
      (lambda t: hessian.preconditioned_operator(op, t), "the preconditioner"),
      (lambda t: hessian.normalize_direction(op, t, "unit"), "the direction"),
      (op.ravel, "the tree"),
    ):
      with pytest.raises(
        ValueError,
        match=rf"^{what} must be an array or a pytree of arrays, but its leaf at \['a'\] is {kind}",
      ):
        call(tree)
  for call in (op.ravel, lambda t: hessian.normalize_direction(op, t, None)):
    with pytest.raises(ValueError, match=r"arrays, but it is type <class 'numpy.float32'>\.$"):
      call(np.float32)


def test_an_array_of_another_rank_is_named_as_one(ops):
  # A (1, n) array or a scalar read as a pytree: "it lacks the leaves ... and has none that the
  # params do not", which says nothing of the shape that is wrong.
  good, _, _ = ops
  with pytest.raises(ValueError, match=r"single value of shape \(1, 75\).*shape \(75,\)"):
    hessian.loss_landscape_1d(good, [0.0], np.ones((1, good.size)))
  # A scalar P (one value everywhere) is told how to spread it over the params.
  with pytest.raises(
    ValueError, match=r"single value of shape \(\).*shape \(75,\).*jnp\.full_like\(p, value\)"
  ):
    hessian.preconditioned_operator(good, 2.0)


def test_only_the_functions_that_take_a_flat_array_offer_one():
  # op.ravel takes pytrees only, yet given a flat array it said the tree "must be a pytree ... (or
  # a flat array): it is a single value of shape (3,), not a pytree; a flat array must have shape
  # (3,)", the shape it had. normalize_direction (op.layout.flatten) does take one.
  op = hessian.hessian_operator(lambda p, b: jnp.sum(p["x"] ** 2) * b, {"x": jnp.ones(3)}, 1.0)
  with pytest.raises(ValueError) as err:
    op.ravel(np.ones(3))
  assert str(err.value) == (
    "the tree must be a pytree with the structure and leaf shapes of the params: it is a single "
    "value of shape (3,), not a pytree."
  )
  with pytest.raises(ValueError, match=r"^the tree must be .* of the params: it lacks"):
    op.ravel({"y": jnp.ones(3)})
  with pytest.raises(ValueError) as err:
    hessian.normalize_direction(op, np.ones((3, 1)), None)
  assert str(err.value) == (
    "the direction must be a pytree with the structure and leaf shapes of the params (or a flat "
    "array): it is a single value of shape (3, 1), not a pytree; a flat array must have shape (3,)."
  )
  np.testing.assert_array_equal(hessian.normalize_direction(op, np.arange(3.0), None), [0, 1, 2])


def test_a_single_array_as_params_is_named_in_errors():
  # Params that are one array have the empty key path, which the errors printed as "the leaf at
  # has dtype int32" and "its leaf at  has shape (2, 3)".
  root = r"the root \(the tree is a single array\)"
  loss = lambda p, b: jnp.sum(p**2 * b)
  with pytest.raises(TypeError, match=rf"leaf at {root} has dtype int32"):
    hessian.hessian_operator(loss, jnp.ones(3, jnp.int32), jnp.ones((2, 3)))
  op = hessian.hessian_operator(loss, jnp.ones((3, 2)), jnp.ones((2, 3, 2)))
  with pytest.raises(ValueError, match=rf"leaf at {root} has shape \(2, 3\), the params' leaf"):
    hessian.preconditioned_operator(op, jnp.ones((2, 3)))


@pytest.mark.parametrize(
  "call",
  [
    lambda op, tol: hessian.top_eigenvalues(op, tol=tol),
    lambda op, tol: hessian.power_iteration(op, tol=tol),
    lambda op, tol: hessian.track_curvature(op, tol=tol),
    lambda op, tol: hessian.layer_breakdown(op, jax.random.key(0), tol=tol),
  ],
  ids=["top_eigenvalues", "power_iteration", "track_curvature", "layer_breakdown"],
)
@pytest.mark.parametrize("tol", [1.0, 2.0, np.inf])
def test_a_relative_tolerance_of_one_or_more_is_refused_by_name_before_any_product(ops, call, tol):
  # Accepted, it stopped a run at its first Ritz value, converged (tol=1 on a flat spectrum: 43 %
  # below the top eigenvalue after one product).
  good, _, _ = ops
  calls = [0]

  def matmat(vs):
    calls[0] += 1
    return good.matmat_fn(vs)

  op = dataclasses.replace(good, matmat_fn=matmat)
  with pytest.raises(ValueError) as e:
    call(op, tol)
  assert calls[0] == 0
  assert str(e.value) == (
    f"tol must be a finite real number in (0.0, 1.0), got {tol!r}. It is relative to the "
    "estimated value, and one of 1 or more accepts an error as large as the value itself: pass a "
    "small fraction, e.g. tol=1e-4."
  )
