"""bfloat16 parameters with float32 moments and a float32 Hessian estimate."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adahessian_jax as ah


def _train(dtype, steps=60):
  # Data and params built in NumPy (float32, then the dtype), not by eager jnp ops.
  r = np.random.default_rng(0)
  x32 = r.normal(size=(64, 6)).astype(np.float32)
  x, y = jnp.asarray(x32), jnp.asarray(np.sin(x32[:, :1] * 2.0) + 0.5 * x32[:, 1:2])
  p32 = {
    "w1": (r.normal(size=(6, 32)) / np.sqrt(6)).astype(np.float32),
    "b1": np.zeros(32, np.float32),
    "w2": (r.normal(size=(32, 1)) / np.sqrt(32)).astype(np.float32),
  }
  params = jax.tree.map(lambda p: jnp.asarray(p, dtype), p32)

  def loss_fn(p):
    h = jnp.tanh(x.astype(dtype) @ p["w1"] + p["b1"])
    return jnp.mean(((h @ p["w2"]).astype(jnp.float32) - y) ** 2)

  tx = ah.adahessian(0.05, mu_dtype=jnp.float32, nu_dtype=jnp.float32, update_freq=2)
  state = tx.init(params)
  vgh = ah.value_grad_and_hessian_diag(loss_fn)

  @jax.jit
  def step(params, state):
    loss, grads, hdiag = vgh(params, state)
    updates, state = tx.update(grads, state, params, hessian_diag=hdiag)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for _ in range(steps):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  return params, state, np.array(losses)


def test_bf16_tracks_f32():
  p16, s16, l16 = _train(jnp.bfloat16)
  _, _, l32 = _train(jnp.float32)
  inner = ah.find_adahessian_state(s16)
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(p16))
  for tree in (inner.mu, inner.nu, inner.hessian):
    assert all(m.dtype == jnp.float32 for m in jax.tree.leaves(tree))
  assert l32[-1] < 0.3 * l32[0]
  # The bf16 curve follows the f32 one: within 10% + 0.01 over the last third.
  tail = slice(40, None)
  np.testing.assert_allclose(l16[tail], l32[tail], rtol=0.1, atol=0.01)


def test_moments_keep_their_dtype_with_float32_hyperparameters():
  """inject_hyperparams(hyperparam_dtype=float32) makes b1 a float32 array; the bfloat16 first
  moment must stay bfloat16 (a state whose dtypes change breaks lax.scan and checkpoints)."""
  params = {"w": jnp.asarray([0.5, -1.0, 2.0], jnp.bfloat16)}
  loss = lambda p: jnp.sum(jnp.asarray([1.0, 3.0, 0.5]) * p["w"].astype(jnp.float32) ** 2)
  tx = optax.inject_hyperparams(ah.adahessian, hyperparam_dtype=jnp.float32)(0.1)

  def body(carry, _):
    p, s = carry
    u, s = tx.update(jax.grad(loss)(p), s, p, value_fn=loss)
    p = optax.apply_updates(p, u)
    return (p, s), loss(p)

  state = tx.init(params)
  (_, end), losses = jax.lax.scan(body, (params, state), None, length=8)
  dtypes = lambda s: jax.tree.map(lambda x: x.dtype, s)
  assert dtypes(end) == dtypes(state)
  # The float32 run of the same problem, within bfloat16's precision (one compiled step).
  p32 = {"w": params["w"].astype(jnp.float32)}
  ref_tx = ah.adahessian(0.1)

  @jax.jit
  def ref_step(p, s):
    u, s = ref_tx.update(jax.grad(loss)(p), s, p, value_fn=loss)
    p = optax.apply_updates(p, u)
    return p, s, loss(p)

  ref, s32 = [], ref_tx.init(p32)
  for _ in range(8):
    p32, s32, value = ref_step(p32, s32)
    ref.append(float(value))
  np.testing.assert_allclose(np.asarray(losses), ref, rtol=0.05)


def test_apply_if_finite_around_float32_moments_of_bfloat16_params():
  """The recommended bfloat16 setup (float32 moments) gave float32 updates, and
  optax.apply_if_finite's lax.cond (zeros like the bfloat16 gradient) failed: 'cond branches must
  have equal output types'. The updates keep the gradients' dtype; a NaN step is still skipped."""
  params = {"w": jnp.asarray([0.5, -1.0, 2.0], jnp.bfloat16)}
  loss = lambda p: jnp.sum(jnp.asarray([1.0, 3.0, 0.5]) * p["w"].astype(jnp.float32) ** 2)
  inner = ah.adahessian(0.1, mu_dtype=jnp.float32, nu_dtype=jnp.float32, update_clip=1e3)
  tx = optax.apply_if_finite(inner, max_consecutive_errors=2)
  state = tx.init(params)
  grads = jax.grad(loss)(params)
  update = jax.jit(lambda g, s: tx.update(g, s, params, value_fn=loss))  # one program, both steps
  updates, state = update(grads, state)
  assert updates["w"].dtype == jnp.bfloat16
  # Step 1 is -lr · g / (|h| + eps), g = 2·c·w and h = 2·c: -0.1 · w, rounded to bfloat16.
  expected = -0.1 * np.asarray(params["w"], np.float64) * (1 - 5e-5)
  np.testing.assert_allclose(np.asarray(updates["w"], np.float64), expected, rtol=2**-8)
  bad = {"w": grads["w"].at[0].set(jnp.nan)}
  updates, state = update(bad, state)
  assert int(state.notfinite_count) == 1 and not np.any(np.asarray(updates["w"], np.float32))


def test_bfloat16_params_keep_their_second_moment_in_float32_by_default():
  """A bfloat16 nu rounded b2 = 0.999 to 1 and dropped (1 - b2)·D² once it was under half a unit
  in nu's last place: with D = 1 it froze at 0.5 (from step ~400), where Algorithm 1 has
  1 - 0.999^t, so v̂ no longer followed the curvature."""
  params = {"w": jnp.ones(2, jnp.bfloat16)}
  tx = ah.scale_by_adahessian()
  grads, hdiag = {"w": jnp.ones(2, jnp.bfloat16)}, {"w": jnp.ones(2, jnp.bfloat16)}

  def body(state, _):
    return tx.update(grads, state, params, hessian_diag=hdiag)[1], None

  state, _ = jax.lax.scan(body, tx.init(params), None, length=1500)
  assert state.nu["w"].dtype == jnp.float32 and state.mu["w"].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(state.nu["w"]), 1 - 0.999**1500, rtol=1e-3)
  updates, _ = jax.jit(lambda s: tx.update(grads, s, params, hessian_diag=hdiag))(state)
  assert updates["w"].dtype == jnp.bfloat16


def test_state_of_weakly_typed_params_keeps_its_types_across_updates():
  """A Python float param (or a weakly typed 0-d array) gave a weakly typed first moment at init,
  which the first update made strong: a state whose types change recompiles a jitted step once
  more. Numbers as for a strongly typed param: step 1 is g / (|h| + eps)."""
  params = {"a": 1.5, "b": jnp.asarray(2.0)}
  loss = lambda p: p["a"] ** 2 + 3 * p["b"] ** 2
  for tx in (ah.scale_by_adahessian(), ah.scale_by_adahessian(update_freq=2)):
    state = tx.init(params)
    updates, new = jax.jit(
      lambda s, tx=tx: tx.update(jax.grad(loss)(params), s, params, value_fn=loss)
    )(state)
    assert jax.tree.map(jax.typeof, new) == jax.tree.map(jax.typeof, state)
    np.testing.assert_allclose(
      [float(updates["a"]), float(updates["b"])],
      [3.0 / (2.0 + 1e-4), 12.0 / (6.0 + 1e-4)],
      rtol=1e-12,
    )


def test_float16_first_moment_of_wider_gradients_saturates_instead_of_overflowing():
  """mu_dtype=float16 with float32 gradients beyond float16's range (65504) stored mu = inf: the
  update was inf and the parameters became inf, though every input was finite. mu now saturates
  at ±65504, as float16 updates do; the update of each step uses the unrounded mu."""
  params = {"w": jnp.ones(2, jnp.float32)}
  tx = ah.scale_by_adahessian(mu_dtype=jnp.float16)
  grads, hdiag = {"w": jnp.asarray([1e5, -1e5], jnp.float32)}, {"w": jnp.full(2, 1e5, jnp.float32)}
  step = jax.jit(lambda s: tx.update(grads, s, params, hessian_diag=hdiag))
  state, mu = tx.init(params), 0.0
  for t in range(1, 31):
    updates, state = step(state)
    assert state.mu["w"].dtype == jnp.float16
    # The reference: optax's rule on the stored (saturated) moment, in float64.
    mu_full = 0.9 * mu + 0.1 * 1e5
    nu_hat = 1e10  # D² with D = 1e5, bias-corrected
    expected = mu_full / (1 - 0.9**t) / (np.sqrt(nu_hat) + 1e-4)
    np.testing.assert_allclose(np.asarray(updates["w"]), [expected, -expected], rtol=1e-3)
    mu = float(np.float16(min(mu_full, 65504.0)))
  np.testing.assert_array_equal(np.asarray(state.mu["w"], np.float64), [65504.0, -65504.0])
