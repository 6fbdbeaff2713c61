"""Hessian-vector products and Hutchinson's diagonal estimate against exact values."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_trees_allclose
from hessian_problems import dense_hessian
from jax.flatten_util import ravel_pytree

import adahessian_jax as ah
from adahessian_jax import hutchinson


def test_hvp_equals_dense_hessian_product(mlp_problem, rng):
  params, loss_fn, batch = mlp_problem
  flat, unravel = ravel_pytree(params)
  h = dense_hessian(loss_fn, params, batch, jit=True)  # one program, not ~80 op by op
  v = rng.normal(size=flat.shape)
  got = ravel_pytree(ah.hvp(lambda p: loss_fn(p, batch), params, unravel(jnp.asarray(v))))[0]
  np.testing.assert_allclose(got, h @ v, rtol=1e-10, atol=1e-12)
  value, grad, hz = hutchinson.value_grad_hvp(
    lambda p: loss_fn(p, batch), params, unravel(jnp.asarray(v))
  )
  np.testing.assert_allclose(value, loss_fn(params, batch), rtol=1e-14)
  want_grad = jax.jit(jax.grad(loss_fn))(params, batch)
  np.testing.assert_allclose(ravel_pytree(grad)[0], ravel_pytree(want_grad)[0], rtol=1e-12)
  np.testing.assert_allclose(ravel_pytree(hz)[0], h @ v, rtol=1e-10, atol=1e-12)


def test_quadratic_estimate_converges_with_known_variance():
  """On f = 1/2 x^T A x, z ⊙ Az has mean diag(A) and per-entry variance
  sum_{j != i} A_ij^2 (Rademacher z); with N probes the standardised errors
  (est_i - A_ii) / sqrt(var_i / N) are approximately N(0, 1)."""
  n, n_probes = 60, 4000
  r = np.random.default_rng(0)
  b = r.normal(size=(n, n))
  a = b @ b.T / n + np.diag(r.random(n))
  f = lambda x: 0.5 * x @ jnp.asarray(a) @ x
  # Jitted, one program per probe count (op by op it compiled some 50 primitives).
  estimate = jax.jit(
    lambda key, num: ah.hutchinson_diagonal(f, jnp.zeros(n), key, num), static_argnums=1
  )
  est = np.asarray(estimate(jax.random.key(1), n_probes))
  var = (a**2).sum(axis=1) - np.diag(a) ** 2
  zscores = (est - np.diag(a)) / np.sqrt(var / n_probes)
  assert np.max(np.abs(zscores)) < 5.0
  # Calibrated: the mean squared z-score is ~1 (chi^2_60 / 60 lies in [0.5, 1.6] w.p. > 0.999).
  assert 0.5 < np.mean(zscores**2) < 1.6
  # And it really is an estimate: with one probe the error is far larger.
  one = np.asarray(estimate(jax.random.key(1), 1))
  assert np.abs(one - np.diag(a)).mean() > 10 * np.abs(est - np.diag(a)).mean()


def test_diagonal_hessian_is_exact_with_one_probe():
  a = jnp.array([1.0, -2.0, 3.0])
  f = lambda x: 0.5 * jnp.sum(a * x**2) + jnp.sum(x) ** 0  # separable: H = diag(a)
  est = ah.hutchinson_diagonal(f, jnp.ones(3), jax.random.key(0))
  np.testing.assert_allclose(est, a, rtol=1e-14)


def test_rademacher_like_entries_shapes_dtypes():
  tree = {"a": jnp.zeros((50, 4), jnp.float32), "b": jnp.zeros(7, jnp.float64)}
  z = ah.rademacher_like(jax.random.key(0), tree)
  assert z["a"].dtype == jnp.float32 and z["b"].dtype == jnp.float64
  assert set(np.unique(np.asarray(z["a"]))) == {-1.0, 1.0}
  assert abs(float(z["a"].mean())) < 0.15


@pytest.mark.parametrize(
  "key",
  [jax.random.key(3), jax.random.PRNGKey(5), jax.random.key(7, impl="rbg")],
  ids=["typed", "raw", "rbg"],
)
def test_rademacher_like_draws_each_leaf_from_its_own_key(key):
  # Leaves of one shape are drawn together (one vmapped draw); the numbers are each leaf's own
  # draw from jax.random.split(key, n_leaves)[i], as optax.tree.split_key_like gives it.
  tree = {
    "a": jnp.zeros((3, 5)),
    "b": [jnp.zeros(7, jnp.bfloat16), jnp.zeros((3, 5)), jnp.zeros(()), jnp.zeros((0, 4))],
    "c": jnp.zeros(33),
    "d": jnp.zeros((3, 5), jnp.float16),
  }
  keys = jax.random.split(key, len(jax.tree.leaves(tree)))
  leaves, treedef = jax.tree.flatten(tree)
  draw = jax.jit(hutchinson.rademacher, static_argnums=(1, 2))  # one program per shape and dtype
  each = [draw(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
  for got in (ah.rademacher_like(key, tree), jax.jit(ah.rademacher_like)(key, tree)):
    assert jax.tree.structure(got) == treedef
    for g, want in zip(jax.tree.leaves(got), each, strict=True):
      assert g.dtype == want.dtype and g.shape == want.shape
      np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(want, np.float32))
  # Leaves of one shape get different probes.
  assert not np.array_equal(np.asarray(each[0]), np.asarray(each[2]))


def test_value_grad_and_diagonal_has_aux(mlp_problem):
  params, loss_fn, batch = mlp_problem
  keys = jax.random.split(jax.random.key(0), 2)
  (value, aux), grad, est = hutchinson.value_grad_and_diagonal(
    lambda p: (loss_fn(p, batch), {"n": 3}), params, keys, has_aux=True
  )
  assert aux == {"n": 3}
  np.testing.assert_allclose(value, loss_fn(params, batch), rtol=1e-14)
  plain = jax.jit(
    lambda p, k: hutchinson.value_grad_and_diagonal(lambda q: loss_fn(q, batch), p, k)
  )
  plain = plain(params, keys)[2]
  assert_trees_allclose(est, plain, rtol=1e-13)
  with pytest.raises(TypeError, match=r"\(loss, aux\)"):
    hutchinson.value_grad_and_diagonal(lambda p: loss_fn(p, batch), params, keys, has_aux=True)


def test_bit_packed_rademacher_is_uniform_and_uncorrelated():
  from adahessian_jax.hutchinson import rademacher

  z = np.asarray(rademacher(jax.random.key(3), (4001, 64), jnp.float64)).reshape(-1)
  n = z.size
  assert set(np.unique(z)) == {-1.0, 1.0}
  assert abs(z.mean()) < 5 / np.sqrt(n)  # 5 standard errors
  # Entries 1..40 apart (within and across 32-bit words) are uncorrelated.
  for lag in (1, 2, 16, 31, 32, 33, 40):
    assert abs(np.mean(z[:-lag] * z[lag:])) < 5 / np.sqrt(n), lag
  # Odd sizes and scalars work.
  assert rademacher(jax.random.key(0), (), jnp.float32).shape == ()
  assert rademacher(jax.random.key(0), (3, 0)).shape == (3, 0)


@pytest.mark.parametrize(
  "leaf, message",
  [
    (jnp.ones(2, jnp.int32), r"leaf at \['b'\] has dtype int32"),
    # A real probe misses the imaginary part's curvature: (1+1j) gave 2 here, not 2 and 6.
    (jnp.ones(2, jnp.complex64), r"leaf at \['b'\] has dtype complex64"),
  ],
)
def test_non_float_params_are_named(leaf, message):
  params = {"a": jnp.ones(3), "b": leaf}
  f = lambda p: jnp.sum(p["a"] ** 2) + jnp.sum(jnp.real(p["b"]) ** 2 + 3 * jnp.imag(p["b"]) ** 2)
  with pytest.raises(TypeError, match=f"hutchinson_diagonal's params .*{message}.*close over"):
    ah.hutchinson_diagonal(f, params, jax.random.key(0))
  with pytest.raises(TypeError, match=f"hvp's params .*{message}"):
    ah.hvp(f, params, params)


@pytest.mark.parametrize("call", ["hvp", "hutchinson_diagonal"])
def test_an_fn_that_is_no_function_of_the_params_is_named(call):
  # Python's "'str' object is not callable", or "<lambda>() missing 1 required positional
  # argument: 'b'" from inside the trace, named neither the argument nor the fix.
  params = {"w": jnp.ones(3)}
  run = {
    "hvp": lambda fn: ah.hvp(fn, params, params),
    "hutchinson_diagonal": lambda fn: ah.hutchinson_diagonal(fn, params, jax.random.key(0)),
  }[call]
  fix = r"fn is a function of the params alone: close over the rest, lambda p: loss_fn\(p, batch\)"
  with pytest.raises(
    TypeError, match=r"^fn must be a function, called as fn\(params\); got 'x'\. "
  ):
    run("x")
  with pytest.raises(
    TypeError, match=r"^fn is called as fn\(params\), but its signature is \(p, b\)"
  ):
    run(lambda p, b: jnp.sum(p["w"] ** 2))
  with pytest.raises(TypeError, match=fix):
    run(lambda p, b: jnp.sum(p["w"] ** 2))
  assert_trees_allclose(run(lambda p: jnp.sum(p["w"] ** 2)), {"w": jnp.full(3, 2.0)})


def test_hvp_names_an_nnx_tangent_leaf_by_its_canonical_path():
  # It read "its leaf at ['linear']['bias'].value", where the rest of the package names
  # ['linear']['bias'].
  nnx = pytest.importorskip("flax.nnx")
  params = nnx.State({"linear": {"bias": nnx.Param(jnp.ones(2)), "kernel": nnx.Param(A)}})
  tangents = nnx.State({"linear": {"bias": nnx.Param(jnp.ones(3)), "kernel": nnx.Param(A)}})
  f = lambda p: jnp.sum(p["linear"]["kernel"][...] ** 2) + jnp.sum(p["linear"]["bias"][...] ** 3)
  with pytest.raises(ValueError, match=r"its leaf at \['linear'\]\['bias'\] has shape \(3,\) and"):
    ah.hvp(f, params, tangents)


@pytest.mark.parametrize("n_samples", [1, 3])
def test_hutchinson_diagonal_of_an_fn_that_ignores_its_params_gets_the_analysis_fix(n_samples):
  # It got the optimizer's advice: "a zero Hessian estimate makes every step lr·g/eps", "for an
  # nnx.Optimizer, build it with adahessian_jax.nnx.value_fn", for a call that takes no step.
  params, outer = {"w": jnp.ones(3)}, {"w": jnp.ones(3)}
  message = (
    r"^fn returned a loss that does not depend on the params it was called with, so its "
    r"gradient and Hessian there are zero\. It probably uses other params than its argument: "
    r"write lambda p: loss_fn\(p, batch\), not lambda p: loss_fn\(params, batch\); for NNX, "
    r"merge the params it is passed, nnx\.merge\(graphdef, p\), not a model it closes over\."
  )
  with pytest.raises(ValueError, match=message):
    ah.hutchinson_diagonal(lambda p: jnp.sum(outer["w"] ** 2), params, jax.random.key(0), n_samples)


@pytest.mark.parametrize(
  "loss, message",
  [
    (jnp.ones(3, jnp.float32), "shape (3,) and dtype float32. Reduce the loss"),
    (
      jnp.int32(3),
      "shape () and dtype int32. Return a float: an integer or complex loss has no real Hessian",
    ),
    (
      jnp.complex64(3),
      "dtype complex64. Return a float: an integer or complex loss has no real Hessian",
    ),
  ],
)
def test_check_scalar_loss_says_what_to_do(loss, message):
  with pytest.raises(TypeError, match=re.escape(message)):
    hutchinson.check_scalar_loss(loss)


@pytest.mark.parametrize(
  "keys, shape",
  [
    (jax.random.key(0), "()"),  # an IndexError
    (jax.random.PRNGKey(0), "(2,)"),  # raw key data of one key, not two keys
    (jax.random.split(jax.random.key(0), 0), "(0,)"),  # the mean of no probes: NaN
  ],
)
def test_value_grad_and_diagonal_names_bad_keys(keys, shape):
  message = rf"1-D array of at least one PRNG key, .* got shape {re.escape(shape)} .*split\(key"
  with pytest.raises(ValueError, match=message):
    hutchinson.value_grad_and_diagonal(lambda p: jnp.sum(p**3), jnp.ones(3), keys)


A = jnp.ones(3, jnp.float32)


@pytest.mark.parametrize(
  "tangents, message",
  [
    ({"a": A}, r"a pytree like the params: it has no leaf at \['b'\], where the params tree"),
    ({"a": A, "b": jnp.ones((2, 1))}, r"leaf at \['b'\] has shape \(2, 1\) and dtype"),
    (
      {"a": A, "b": jnp.ones(2, jnp.float16)},
      r"leaf at \['b'\] has shape \(2,\) and dtype float16, the param there shape \(2,\) and "
      r"dtype float32. Reshape or cast",
    ),
  ],
)
def test_tangents_unlike_the_params_are_named(tangents, message):
  # jax.jvp's own error names no leaf (and for a shape, no path at all).
  params = {"a": A, "b": jnp.ones(2, jnp.float32)}
  f = lambda p: jnp.sum(p["a"] ** 3) + jnp.sum(p["b"] ** 3)
  with pytest.raises(ValueError, match="value_grad_hvp's tangents must .*" + message):
    hutchinson.value_grad_hvp(f, params, tangents)
  with pytest.raises(ValueError, match="hvp's tangents must .*" + message):
    ah.hvp(f, params, tangents)


def test_a_key_that_is_not_one_prng_key_and_leaves_that_hold_no_minus_one_are_named():
  # An int seed failed deep in jax.random ("invalid PRNG key data ... Got 0"), a batch of keys
  # with "split accepts a single key"; an unsigned leaf's probe had 255 for -1, silently.
  params = {"w": jnp.ones(3)}
  f = lambda p: jnp.sum(p["w"] ** 2)
  with pytest.raises(
    ValueError, match=r"hutchinson_diagonal's key must be a single PRNG key, got 0"
  ):
    ah.hutchinson_diagonal(f, params, 0)
  keys = jax.random.split(jax.random.key(0), 2)
  with pytest.raises(ValueError, match=r"rademacher_like's key .* batch of typed keys of shape"):
    ah.rademacher_like(keys, params)
  for dtype in (jnp.uint8, jnp.uint32, jnp.bool_):
    tree = {"w": jnp.ones(3), "i": jnp.ones(2, dtype)}
    with pytest.raises(
      TypeError, match=rf"leaf at \['i'\] has dtype {jnp.dtype(dtype)}, which holds no -1"
    ):
      ah.rademacher_like(jax.random.key(0), tree)
  # A leaf that is no array raised NumPy's "data type '' not understood", naming no leaf.
  with pytest.raises(TypeError, match=r"the leaf at \['name'\] is str 'conv', not an array"):
    ah.rademacher_like(jax.random.key(0), {"w": jnp.ones(3), "name": "conv"})
  z = ah.rademacher_like(jax.random.PRNGKey(0), {"i": jnp.ones(64, jnp.int8)})["i"]  # raw key
  assert z.dtype == jnp.int8 and set(np.unique(np.asarray(z))) == {-1, 1}
  np.testing.assert_allclose(ah.hutchinson_diagonal(f, params, jax.random.PRNGKey(0))["w"], 2.0)


def test_value_grad_hvp_names_a_loss_it_cannot_call():
  # hvp and hutchinson_diagonal checked their fn; value_grad_hvp(3, ...) failed with Python's
  # "'int' object is not callable", and a loss of two arguments inside the trace.
  from adahessian_jax.hutchinson import value_grad_hvp

  p = {"w": jnp.ones(2)}
  with pytest.raises(TypeError, match=r"fn must be a function, called as fn\(params\); got 3"):
    value_grad_hvp(3, p, p)
  with pytest.raises(TypeError, match=r"value_fn is called as value_fn\(params\).*'b'"):
    value_grad_hvp(lambda q, b: jnp.sum(q["w"]), p, p, name="value_fn")
