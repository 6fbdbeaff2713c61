"""scale_by_adahessian / adahessian against an independent NumPy transcription."""

import re
import warnings

import hessian_problems
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import CompileCounter, assert_trees_allclose, make_cnn_problem, make_mlp_problem
from jax.flatten_util import ravel_pytree
from numpy_reference import AdaHessianReference

import adahessian_jax as ah


def named(tree):
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(p): np.asarray(v, dtype=np.float64) for p, v in leaves}


def dense_hessian(loss_fn, params, batch):
  """The dense Hessian (NumPy, one compiled program per ``loss_fn``) and ``unravel``."""
  return hessian_problems.dense_hessian(loss_fn, params, batch, jit=True), ravel_pytree(params)[1]


def estimate_from_probes(h, unravel, probes):
  """mean over probes of z ⊙ (H z), with the dense Hessian, in NumPy."""
  total = 0.0
  for z in probes:
    zf = np.asarray(ravel_pytree(z)[0])
    total = total + zf * (h @ zf)
  return unravel(jnp.asarray(total / len(probes)))


# The transform's probes recovered for the NumPy reference: one program per params structure.
rademacher_like = jax.jit(ah.rademacher_like)


def closure_step(tx, loss_fn, batch):
  """A jitted training step by the closure route, returning the gradient too."""

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params, value_fn=lambda p: loss_fn(p, batch))
    return optax.apply_updates(params, updates), state, grads

  return step


CASES = [
  # name, problem, hyperparameters, route
  ("mlp-k1-wd0", "mlp", dict(hessian_power=1.0, weight_decay=0.0), "diag"),
  ("mlp-k0.5-wd", "mlp", dict(hessian_power=0.5, weight_decay=0.02), "diag"),
  ("mlp-freq2", "mlp", dict(update_freq=2), "diag"),
  ("mlp-n2-closure", "mlp", dict(n_samples=2), "closure"),
  ("mlp-freq3-closure", "mlp", dict(update_freq=3, weight_decay=0.01), "closure"),
  ("cnn-k1-wd0", "cnn", dict(hessian_power=1.0, block_size=5), "diag"),
  ("cnn-k0.5-wd", "cnn", dict(hessian_power=0.5, weight_decay=0.02, block_size=5), "diag"),
  ("cnn-freq2", "cnn", dict(update_freq=2, block_size=5), "diag"),
  ("cnn-n2-closure", "cnn", dict(n_samples=2, block_size=5), "closure"),
  # Beyond the paper: the stabilizers and the Adam-sized lazy state.
  ("mlp-floor-clip", "mlp", dict(curvature_floor=0.5, update_clip=0.3), "diag"),
  ("cnn-freq3-floor", "cnn", dict(update_freq=3, curvature_floor=0.2, block_size=5), "diag"),
  ("mlp-freq3-refresh-moment", "mlp", dict(update_freq=3, lazy_moment="refresh"), "diag"),
  ("cnn-freq2-refresh-moment", "cnn", dict(update_freq=2, lazy_moment="refresh"), "closure"),
  # A curvature clip low enough to bind on some steps (the test checks that it does).
  ("mlp-curvature-clip", "mlp", dict(curvature_clip=0.3), "diag"),
  (
    "cnn-freq2-curvature-clip-floor",
    "cnn",
    dict(update_freq=2, curvature_clip=0.1, curvature_floor=0.3, block_size=5),
    "diag",
  ),
  (
    "mlp-freq2-refresh-moment-curvature-clip",
    "mlp",
    dict(update_freq=2, lazy_moment="refresh", curvature_clip=0.1),
    "closure",
  ),
]


@pytest.mark.parametrize("name,problem,hp,route", CASES, ids=[c[0] for c in CASES])
def test_trajectory_matches_numpy_reference(name, problem, hp, route):
  params, loss_fn, batch = make_mlp_problem() if problem == "mlp" else make_cnn_problem()
  lr, b1, b2, eps = 0.05, 0.9, 0.99, 1e-4
  hp = dict(hp)
  n_samples = hp.pop("n_samples", 1)
  wd = hp.pop("weight_decay", 0.0)
  ref = AdaHessianReference(
    named(params),
    lr,
    b1,
    b2,
    eps,
    wd=wd,
    k=hp.get("hessian_power", 1.0),
    block_size=hp.get("block_size", 1),
    update_freq=hp.get("update_freq", 1),
    floor=hp.get("curvature_floor", 0.0),
    clip=hp.get("update_clip"),
    lazy_moment=hp.get("lazy_moment", "repeat"),
    curvature_clip=hp.get("curvature_clip"),
  )
  tx = ah.adahessian(lr, b1, b2, eps, weight_decay=wd, n_samples=n_samples, seed=3, **hp)
  state = tx.init(params)
  rng = np.random.default_rng(1)

  @jax.jit
  def step_diag(params, state, hdiag):
    grads = jax.grad(loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params, hessian_diag=hdiag)
    return optax.apply_updates(params, updates), state, grads

  step_closure = closure_step(tx, loss_fn, batch)

  # The curvature clip starts at step 11.
  for _ in range(14 if "curvature_clip" in hp else 6):
    h, unravel = dense_hessian(loss_fn, params, batch)
    if route == "diag":
      # Our own probes, in NumPy; on steps that do not refresh, pass garbage
      # to check it is ignored.
      probes = [
        unravel(jnp.asarray(rng.choice([-1.0, 1.0], size=h.shape[0]))) for _ in range(n_samples)
      ]
      est = estimate_from_probes(h, unravel, probes)
      passed = est if ref.refreshes() else jax.tree.map(lambda e: e * 0 + 1e6, est)
      params, state, grads = step_diag(params, state, passed)
    else:
      # The transform's own probes, recovered through the public API.
      keys, _ = ah.probe_keys(ah.find_adahessian_state(state))
      est = estimate_from_probes(h, unravel, [rademacher_like(k, params) for k in keys])
      params, state, grads = step_closure(params, state)
    expected = ref.step(named(grads), named(est))
    got = named(params)
    for key in expected:
      np.testing.assert_allclose(got[key], expected[key], rtol=1e-10, atol=1e-13, err_msg=key)
  if "curvature_clip" in hp:
    assert ref.clipped_steps > 0  # the clip bound on some steps: the case tests it


def test_schedule_and_inject_hyperparams_match_reference(mlp_problem):
  params, loss_fn, batch = mlp_problem
  # optax calls schedules with an int32 count; optax.linear_schedule then computes
  # in float32 (and jit rounds differently from eager), so use a float64 schedule.
  schedule = lambda count: 0.1 / (1.0 + 0.5 * jnp.asarray(count, jnp.float64))
  ref = AdaHessianReference(named(params), lambda t: 0.1 / (1.0 + 0.5 * t), wd=0.01)
  tx = optax.inject_hyperparams(ah.adahessian, static_args=ah.STATIC_ARGS)(
    learning_rate=schedule, weight_decay=0.01, update_freq=2
  )
  ref.update_freq = 2
  state = tx.init(params)

  step = closure_step(tx, loss_fn, batch)

  for i in range(5):
    h, unravel = dense_hessian(loss_fn, params, batch)
    keys, _ = ah.probe_keys(ah.find_adahessian_state(state))
    est = estimate_from_probes(h, unravel, [rademacher_like(k, params) for k in keys])
    params, state, grads = step(params, state)
    expected = ref.step(named(grads), named(est))
    for key, val in named(params).items():
      msg = f"step {i + 1} {key}"
      np.testing.assert_allclose(val, expected[key], rtol=1e-10, atol=1e-13, err_msg=msg)
  assert float(state.hyperparams["learning_rate"]) == pytest.approx(float(schedule(4)))


def _run(tx, params, loss_fn, batch, steps, jit=True):
  def step(params, state):
    grads = jax.grad(loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params, value_fn=lambda p: loss_fn(p, batch))
    return optax.apply_updates(params, updates), state

  step = jax.jit(step) if jit else step
  state = tx.init(params)
  for _ in range(steps):
    params, state = step(params, state)
  return params, state


@pytest.mark.parametrize("update_freq", [1, 3])
def test_jit_equals_no_jit(mlp_problem, update_freq):
  params, loss_fn, batch = mlp_problem
  tx = ah.adahessian(0.05, update_freq=update_freq, n_samples=2)
  p_jit, s_jit = _run(tx, params, loss_fn, batch, 5, jit=True)
  p_eager, s_eager = _run(tx, params, loss_fn, batch, 5, jit=False)
  assert_trees_allclose((p_jit, s_jit), (p_eager, s_eager), rtol=1e-12, atol=1e-14)


def test_same_seed_identical_different_seed_differs(mlp_problem):
  params, loss_fn, batch = mlp_problem
  a, _ = _run(ah.adahessian(0.05, seed=7), params, loss_fn, batch, 3)
  b, _ = _run(ah.adahessian(0.05, seed=7), params, loss_fn, batch, 3)
  c, _ = _run(ah.adahessian(0.05, seed=8), params, loss_fn, batch, 3)
  assert_trees_allclose(a, b, rtol=0.0)
  diff = jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), a, c)
  assert max(jax.tree.leaves(diff)) > 1e-6


def test_a_vmapped_sweep_over_seeds_and_learning_rates_equals_single_runs(mlp_problem):
  params, loss_fn, batch = mlp_problem
  seeds, lrs = jnp.array([3, 8]), jnp.array([0.02, 0.05])
  with pytest.raises(ValueError, match=r"(?s)traced.*each member of a jax.vmap its own probes"):
    jax.vmap(lambda s: ah.adahessian(seed=s).init(params))(seeds)
  tx = optax.inject_hyperparams(ah.adahessian, static_args=ah.STATIC_ARGS)(0.1, update_freq=2)

  def run(seed, lr):  # the recipe the error gives: the same probes as adahessian(seed=seed)
    state = tx.init(params)
    state.hyperparams["learning_rate"] = lr
    key = jax.random.key_data(jax.random.split(jax.random.key(seed), 1))
    state = ah.map_adahessian_state(lambda s: s._replace(key=key), state)
    p = params
    for _ in range(3):
      grads = jax.grad(loss_fn)(p, batch)
      updates, state = tx.update(grads, state, p, value_fn=lambda q: loss_fn(q, batch))
      p = optax.apply_updates(p, updates)
    return p

  swept = jax.jit(jax.vmap(run))(seeds, lrs)
  for i in range(2):
    single, _ = _run(
      ah.adahessian(float(lrs[i]), update_freq=2, seed=int(seeds[i])), params, loss_fn, batch, 3
    )
    assert_trees_allclose(jax.tree.map(lambda x, i=i: x[i], swept), single, rtol=1e-10, atol=1e-12)


def test_probes_differ_across_leaves_and_steps():
  params = {"a": jnp.zeros(64), "b": jnp.zeros(64)}
  tx = ah.scale_by_adahessian(update_freq=1)
  state = tx.init(params)
  keys, _ = ah.probe_keys(state)
  z1 = ah.rademacher_like(keys[0], params)
  assert not np.array_equal(z1["a"], z1["b"])
  # After one update the key has advanced: the next probes differ.
  _, state = tx.update(params, state, params, hessian_diag=params)
  keys2, _ = ah.probe_keys(state)
  z2 = ah.rademacher_like(keys2[0], params)
  assert not np.array_equal(z1["a"], z2["a"])
  # With update_freq=2 the key advances only on refresh steps.
  tx2 = ah.scale_by_adahessian(update_freq=2)
  s = tx2.init(params)
  k0 = np.asarray(s.key)
  _, s = tx2.update(params, s, params, hessian_diag=params)
  k1 = np.asarray(s.key)
  _, s = tx2.update(params, s, params, hessian_diag=params)
  assert not np.array_equal(k0, k1) and np.array_equal(k1, np.asarray(s.key))
  # Probe samples within one refresh are independent too.
  s3 = ah.scale_by_adahessian(n_samples=3).init(params)
  ks, _ = ah.probe_keys(s3)
  zs = [np.asarray(ah.rademacher_like(k, params)["a"]) for k in ks]
  assert not np.array_equal(zs[0], zs[1]) and not np.array_equal(zs[1], zs[2])


def test_independent_probes_never_reuse_a_key_across_devices_and_steps():
  """With ``independent_probes`` no key is used twice: every device's source (the state's key
  with its index folded in), its probe keys and the keys the state moves on to are all distinct
  over several steps (``jax.vmap`` with an axis name stands in for ``pmap``).

  With threefry ``fold_in(key, 0)`` is ``split(key)[0]``, the state's next key: device 0 folding
  in its index 0 drew from the next step's key, and its probe key was device 1's next source.
  """
  state = ah.scale_by_adahessian(n_samples=2, seed=3).init({"w": jnp.zeros(3)})

  def device(_, key_data):
    source = ah.distributed.fold_in_axis_index(key_data, "i")
    probes, next_data = ah.probe_keys(state._replace(key=key_data), axis_name="i")
    return source, jax.random.key_data(probes), next_data

  rows, key_data = [], state.key
  for _ in range(3):
    sources, probes, next_data = jax.vmap(device, (0, None), axis_name="i")(jnp.arange(4), key_data)
    rows += [np.asarray(sources).reshape(-1, 2), np.asarray(probes).reshape(-1, 2)]
    key_data = next_data[0]
    rows.append(np.asarray(key_data))
  rows = np.concatenate(rows)
  assert len({tuple(r) for r in rows}) == len(rows) == 3 * (4 * 2 * 2 + 2)


def test_lazy_hessian_runs_hvp_only_on_refresh_steps(mlp_problem):
  params, loss_fn, batch = mlp_problem
  calls = []

  def counted(p):
    jax.debug.callback(lambda: calls.append(1))
    return loss_fn(p, batch)

  tx = ah.adahessian(0.05, update_freq=3)
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params, value_fn=counted)
    return optax.apply_updates(params, updates), state

  counts = []
  for _ in range(7):
    params, state = step(params, state)
    jax.effects_barrier()
    counts.append(len(calls))
  # Refreshes at steps 1, 4, 7 only.
  assert counts == [1, 1, 1, 2, 2, 2, 3]
  # And the compiled step contains a conditional around the product.
  hlo = jax.jit(step).lower(params, state).as_text()
  assert "conditional" in hlo or "case" in hlo


def test_update_freq_one_has_no_cond_and_adam_sized_state(mlp_problem):
  params, loss_fn, batch = mlp_problem
  tx = ah.scale_by_adahessian()
  state = tx.init(params)
  assert state.hessian is None and state.update_freq is None
  n_params = sum(x.size for x in jax.tree.leaves(params))
  n_state = sum(x.size for x in jax.tree.leaves(state))
  adam_state = sum(x.size for x in jax.tree.leaves(optax.scale_by_adam().init(params)))
  assert n_state == 2 * n_params + 1 + 2  # mu, nu, count, one key
  assert adam_state == 2 * n_params + 1
  jaxpr = jax.make_jaxpr(lambda p, s: tx.update(p, s, p, value_fn=lambda q: loss_fn(q, batch)))(
    params, state
  )
  assert "cond" not in str(jaxpr)


def test_inside_chain_with_extra_args(mlp_problem):
  params, loss_fn, batch = mlp_problem
  lr = 0.05
  chained = optax.chain(
    optax.clip_by_global_norm(10.0),
    ah.scale_by_adahessian(),
    optax.add_decayed_weights(0.01),
    optax.scale_by_learning_rate(lr),
  )
  alias = ah.adahessian(lr, weight_decay=0.01)

  def run(tx):
    @jax.jit
    def step(p, state):
      g = jax.grad(loss_fn)(p, batch)
      u, state = tx.update(g, state, p, value_fn=lambda q: loss_fn(q, batch), unused=123)
      return optax.apply_updates(p, u), state

    state = tx.init(params)
    p = params
    for _ in range(3):
      p, state = step(p, state)
    return p

  assert_trees_allclose(run(chained), run(alias))  # the clip never triggers at 10.0


def test_float32_params_keep_float32_state_and_updates():
  params = {"w": jnp.ones((3, 2), jnp.float32)}
  tx = ah.adahessian(0.1, update_freq=2, mu_dtype=jnp.bfloat16)
  state = tx.init(params)
  loss = lambda p: jnp.sum(jnp.sin(p["w"]) ** 2)
  u, state = jax.jit(lambda s: tx.update(params, s, params, value_fn=loss))(state)
  s = ah.find_adahessian_state(state)
  assert u["w"].dtype == jnp.float32
  assert s.mu["w"].dtype == jnp.bfloat16
  assert s.nu["w"].dtype == jnp.float32 and s.hessian["w"].dtype == jnp.float32


@pytest.mark.parametrize(
  "kwargs,name",
  [
    (dict(b1=1.0), "b1"),
    (dict(b1=-0.1), "b1"),
    (dict(b2=1.0), "b2"),
    (dict(b2=float("nan")), "b2"),
    (dict(eps=-1e-8), "eps"),
    (dict(hessian_power=1.5), "hessian_power"),
    (dict(hessian_power=-0.5), "hessian_power"),
    (dict(curvature_clip=0.0), "curvature_clip"),
    (dict(curvature_clip=float("inf")), "curvature_clip"),
    (dict(curvature_clip=-1.0), "curvature_clip"),
    (dict(block_size=0), "block_size"),
    (dict(block_size=2.5), "block_size"),
    (dict(update_freq=0), "update_freq"),
    (dict(update_freq=True), "update_freq"),
    (dict(n_samples=0), "n_samples"),
    (dict(seed=1.5), "seed"),
    (dict(lazy_moment=np.array(["repeat", "refresh"])), "lazy_moment"),
  ],
)
def test_invalid_hyperparameters_raise_at_construction(kwargs, name):
  value = next(iter(kwargs.values()))
  with pytest.raises(ValueError, match=name) as e:
    ah.scale_by_adahessian(**kwargs)
  assert repr(value) in str(e.value) or str(value) in str(e.value)
  with pytest.raises(ValueError, match=name):
    ah.adahessian(0.1, **kwargs)


def test_invalid_weight_decay():
  with pytest.raises(ValueError, match="weight_decay"):
    ah.adahessian(0.1, weight_decay=-1.0)


def test_missing_or_double_closure_raise(mlp_problem):
  params, loss_fn, batch = mlp_problem
  tx = ah.adahessian(0.1)
  state = tx.init(params)
  with pytest.raises(ValueError, match="value_fn=lambda p: loss_fn"):
    tx.update(params, state, params)
  with pytest.raises(ValueError, match="not both"):
    tx.update(params, state, params, value_fn=lambda p: loss_fn(p, batch), hessian_diag=params)
  # A misspelled name (or optax Sophia's obj_fn) is named, not only "a wrapper dropped it".
  with pytest.raises(ValueError, match=r"other extra arguments \(obj_fn, value\)"):
    tx.update(params, state, params, obj_fn=lambda p: loss_fn(p, batch), value=1.0)
  # Lazy: under jit every step may refresh, so the closure is always required...
  lazy = ah.adahessian(0.1, update_freq=2)
  lstate = lazy.init(params)
  with pytest.raises(ValueError, match="under jit"):
    jax.jit(lambda s: lazy.update(params, s, params))(lstate)
  # ... but outside jit a non-refresh step may omit it.
  _, lstate = lazy.update(params, lstate, params, value_fn=lambda p: loss_fn(p, batch))
  u, lstate = lazy.update(params, lstate, params)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
  with pytest.raises(ValueError, match="value_fn"):
    lazy.update(params, lstate, params)  # step 3 refreshes


def test_value_fn_must_return_real_scalar(mlp_problem):
  params, loss_fn, batch = mlp_problem
  tx = ah.adahessian(0.1)
  state = tx.init(params)
  with pytest.raises(TypeError, match=r"scalar.*shape \(3,\)"):
    tx.update(params, state, params, value_fn=lambda p: p["out"]["bias"] * 2.0)
  with pytest.raises(TypeError, match="scalar"):
    tx.update(params, state, params, value_fn=lambda p: (loss_fn(p, batch), 0))


def test_value_fn_ignoring_its_argument_is_refused(mlp_problem):
  # value_fn=lambda p: loss_fn(params, batch) (the outer params, not p) has a zero Hessian
  # estimate: the parameters moved by lr·g/eps and the loss went from 0.8 to 6e15 in 3 steps.
  params, loss_fn, batch = mlp_problem
  tx = ah.adahessian(0.1)
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss_fn)(params, batch)
    return tx.update(grads, state, params, value_fn=lambda p: loss_fn(params, batch))

  with pytest.raises(ValueError, match=r"value_fn returned a loss that does not depend on the"):
    step(params, state)
  # A loss that depends on the params only linearly has a zero Hessian, and is not refused.
  zero = tx.update(params, state, params, value_fn=lambda p: jnp.sum(p["out"]["bias"]))[1]
  assert float(jnp.abs(ah.find_adahessian_state(zero).nu["out"]["bias"]).max()) == 0.0


def test_value_fn_without_params_shows_the_call(mlp_problem):
  # The message named what was missing but not the call to make.
  params, loss_fn, batch = mlp_problem
  tx = ah.adahessian(0.1)
  with pytest.raises(ValueError, match=r"params=None: call tx.update\(grads, opt_state, params,"):
    tx.update(params, tx.init(params), value_fn=lambda p: loss_fn(p, batch))


def test_non_float_leaves_rejected_at_init():
  with pytest.raises(TypeError, match=r"\['step'\].*int"):
    ah.adahessian(0.1).init({"w": jnp.ones(3), "step": jnp.zeros((), jnp.int32)})
  # A whole Equinox model holds its activation function (and ints) as leaves: the errors say how
  # Equinox splits them off.
  model = {"weight": jnp.ones((2, 3)), "activation": jax.nn.relu}
  fix = re.escape("params, static = eqx.partition(model, eqx.is_inexact_array)")
  tx = ah.adahessian(0.1)
  with pytest.raises(TypeError, match=rf"leaf at \['activation'\] is [\s\S]*{fix}"):
    tx.init(model)
  vgh = ah.value_grad_and_hessian_diag(lambda p: jnp.sum(p["weight"]))
  with pytest.raises(TypeError, match=rf"leaf at \['activation'\] is [\s\S]*{fix}"):
    vgh(model, tx.init({"weight": model["weight"]}))


def test_a_single_array_as_params_is_named_in_errors():
  # Params that are one array, not a tree, have the empty key path: the errors read "the leaf at
  # has dtype int32", naming nothing.
  root = r"the root \(the tree is a single array\)"
  with pytest.raises(TypeError, match=rf"leaf at {root} has dtype int32"):
    ah.adahessian(0.1).init(jnp.zeros(3, jnp.int32))
  params = jnp.ones((3, 2))
  tx = ah.scale_by_adahessian()
  state = tx.init(params)
  with pytest.raises(ValueError, match=rf"hessian_diag at {root} must be .* shape \(3, 2\)"):
    tx.update(params, state, params, hessian_diag=jnp.ones((2, 3)))
  with pytest.raises(ValueError, match=rf"updates leaf at {root} has shape \(4, 3, 2\)"):
    tx.update(jnp.ones((4, 3, 2)), state, params, hessian_diag=params)
  tree_state = tx.init({"w": params})
  with pytest.raises(ValueError, match=rf"it has a leaf at {root}, where"):
    tx.update({"w": params}, tree_state, {"w": params}, hessian_diag=params)


def test_8_bit_float_leaves_rejected_at_init():
  # They passed init and the update failed inside jnp.signbit ("only supports 16, 32, and 64-bit
  # types"), naming no leaf.
  params = {"w": jnp.ones(3), "q": jnp.ones(2, jnp.float8_e4m3fn)}
  with pytest.raises(TypeError, match=r"16 bits or more.*\['q'\] has dtype float8_e4m3fn"):
    ah.adahessian(0.1).init(params)


def test_hessian_diag_structure_checked(mlp_problem):
  params, _, _ = mlp_problem
  tx = ah.scale_by_adahessian()
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"structure of params: .* no leaf at \['out'\]\['bias'\]"):
    tx.update(params, state, params, hessian_diag={"hidden": params["hidden"]})


def test_first_step_closed_form_on_quadratic():
  # f(x) = 1/2 x^T A x with diagonal A: Hz = A z exactly, so D = diag(A) for any
  # probe, and step 1 is lr * g / (|a|^k + eps) (ALGORITHM.md section 1).
  a = jnp.array([0.5, 2.0, 8.0, 1e-6])
  x = jnp.array([1.0, -1.0, 0.5, 3.0])
  f = lambda p: 0.5 * jnp.sum(a * p**2)
  for k in (1.0, 0.5):
    tx = ah.adahessian(0.1, hessian_power=k)
    u, _ = tx.update(jax.grad(f)(x), tx.init(x), x, value_fn=f)
    np.testing.assert_allclose(u, -0.1 * a * x / (a**k + 1e-4), rtol=1e-12)


def test_state_can_be_donated(mlp_problem):
  params, loss_fn, batch = mlp_problem
  tx = ah.adahessian(0.05, update_freq=2)
  step = jax.jit(
    lambda p, s: tx.update(p, s, p, value_fn=lambda q: loss_fn(q, batch)), donate_argnums=1
  )
  state = tx.init(params)
  for _ in range(3):
    _, state = step(params, state)
  assert int(ah.find_adahessian_state(state).count) == 3


@pytest.mark.parametrize("independent_probes", [False, True])
def test_independent_probes_keep_value_fn_errors(independent_probes):
  """With ``independent_probes`` the check for a loss that couples the devices traced
  ``value_fn`` before its own checks: a whole-model ``value_fn`` inside ``optax.masked`` failed
  with a bare ``TypeError`` (tuple indices) and one of the wrong signature with Python's message,
  instead of the errors that name the fix (``vmap`` with an axis name stands in for ``pmap``)."""
  params = {"a": jnp.ones(3), "b": jnp.ones(3)}
  loss = lambda p, x: jnp.sum(jnp.tanh(x * (p["a"] + p["b"])) ** 2)
  ada = lambda: ah.adahessian(0.1, axis_name="i", independent_probes=independent_probes)

  def step(tx, value_fn):
    state = tx.init(params)

    def device(x):
      return tx.update(params, state, params, value_fn=value_fn(x))[0]

    return jax.jit(jax.vmap(device, axis_name="i"))(jnp.ones((2, 3)))

  masked = optax.masked(ada(), {"a": True, "b": False})
  with pytest.raises(ValueError, match="masked params.*masked_value_fn"):
    step(masked, lambda x: lambda p: loss(p, x))
  with pytest.raises(TypeError, match=r"value_fn\(params\).*Close over"):
    step(ada(), lambda x: lambda p, y: loss(p, x))
  # And the masked_value_fn it asks for runs.
  updates = step(masked, lambda x: ah.masked_value_fn(lambda p: loss(p, x), params))
  assert np.all(np.isfinite(updates["a"])) and np.all(updates["b"] == 1.0)


def test_coupling_warning_follows_a_collective_through_a_scan_carry():
  """With independent probes the update warns when the loss takes a collective's result over
  ``axis_name`` nonlinearly. The check walked a ``scan`` body once, with the flags of the initial
  carry, so a ``pmean`` of the parameters carried into the next iteration and squared there was
  missed; and a ``pmean`` that only decides a predicate (``jnp.where(m * m > 1, ...)``), which
  carries no derivative, warned. The usual scans (an RNN with a ``pmean`` of its loss, a carry
  that sums) still do not warn (``vmap`` with an axis name stands in for ``pmap``)."""
  params = {"w": jnp.ones(3)}
  batches = jnp.array([[1.0, 2.0, 3.0], [-2.0, 0.5, 4.0]])  # one row per replica
  mean = lambda p, x: jax.lax.pmean(jnp.sum(p["w"] * x), "d")
  steps = lambda x: jnp.stack([x, 0.5 * x, -x])

  def squared_next_step(p, x):  # c = pmean(p·x); the next iteration adds c * c
    body = lambda c, xt: (c * c + mean(p, xt), None)
    return jax.lax.scan(body, 0.0, steps(x))[0]

  def squared_output(p, x):  # the carry is squared as the output of the next iteration
    body = lambda c, xt: (mean(p, xt), c * c)
    return jnp.sum(jax.lax.scan(body, 0.0, steps(x))[1])

  def rnn(p, x):
    def body(h, xt):
      h = jnp.tanh(p["w"] * h + xt)
      return h, jnp.sum(h**2)

    return jax.lax.pmean(jnp.sum(jax.lax.scan(body, jnp.zeros(3), steps(x))[1]), "d")

  def summing(p, x):
    body = lambda c, xt: (c + mean(p, xt) + jnp.sum(jnp.tanh(p["w"] * xt) ** 2), None)
    return jax.lax.scan(body, 0.0, steps(x))[0]

  def predicate(p, x):
    m = mean(p, x)
    return jnp.where(m * m > 1.0, 2.0, 1.0) * jnp.sum(jnp.tanh(p["w"] * x) ** 2)

  def warned(loss):
    tx = ah.adahessian(0.1, axis_name="d", independent_probes=True)
    state = tx.init(params)
    device = lambda x: tx.update(params, state, params, value_fn=lambda p: loss(p, x))[0]["w"]
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      updates = jax.jit(jax.vmap(device, axis_name="d"))(batches)
    assert np.all(np.isfinite(updates))
    return [str(c.message) for c in caught if "other devices' parameters" in str(c.message)]

  for loss in (squared_next_step, squared_output):
    (message,) = warned(loss)
    assert "'mul'" in message and "independent_probes=False" in message, loss.__name__
  for loss in (rnn, summing, predicate):
    assert warned(loss) == [], loss.__name__


def test_coupling_warning_reads_only_the_outputs_of_a_nested_body_that_reach_the_loss():
  """The check read every output of a nested ``jit``, ``scan``, ``cond``,
  ``custom_jvp`` or ``remat`` body as part of the loss, so a metric computed there from a
  ``pmean`` (a scan's per-step ``exp(pmean(loss_t))``, a jit returning ``(loss, pmean(l) ** 2)``)
  warned on a correct program, an error under ``-W error``. Those bodies now read only what
  reaches the loss; a collective taken nonlinearly in what does still warns (``vmap`` with an
  axis name stands in for ``pmap``)."""
  params = {"w": jnp.array([0.3, -0.2, 0.5])}
  batches = jnp.array([[1.0, 2.0, 3.0], [-2.0, 0.5, 4.0]])  # one row per replica
  local = lambda p, x: jnp.tanh(jnp.dot(x, p["w"])) ** 2
  pmean = lambda v: jax.lax.pmean(v, "d")
  steps = lambda x: jnp.stack([x, 0.5 * x, -x])

  def scan_metric(p, x):  # per-step perplexity in the ys; a metric carry beside the loss's
    def body(c, xt):
      total, metric = c
      return (total + local(p, xt), metric + jnp.exp(pmean(local(p, xt)))), jnp.exp(pmean(xt[0]))

    return pmean(jax.lax.scan(body, (0.0, 0.0), steps(x))[0][0])

  def jit_metric(p, x):
    loss, _ = jax.jit(lambda p: (local(p, x), pmean(local(p, x)) ** 2))(p)
    return pmean(loss)

  def cond_metric(p, x):
    both = lambda p: (local(p, x), pmean(local(p, x)) ** 2)
    return pmean(jax.lax.cond(x[0] > 0, both, both, p)[0])

  def remat_metric(p, x):
    return pmean(jax.checkpoint(lambda p: (local(p, x), jnp.exp(pmean(local(p, x)))))(p)[0])

  @jax.custom_jvp
  def with_metric(v):
    return v, pmean(v) ** 2

  with_metric.defjvp(lambda v, t: (with_metric(*v), (t[0], 2 * pmean(v[0]) * pmean(t[0]))))

  def custom_jvp_metric(p, x):
    return pmean(with_metric(local(p, x))[0])

  def map_metric(p, x):
    losses, _ = jax.lax.map(lambda xt: (local(p, xt), jnp.exp(pmean(local(p, xt)))), steps(x))
    return pmean(jnp.mean(losses))

  def step(loss):
    tx = ah.adahessian(0.1, axis_name="d", independent_probes=True)
    state = tx.init(params)
    device = lambda x: tx.update(params, state, params, value_fn=lambda p: loss(p, x))[0]["w"]
    return jax.jit(jax.vmap(device, axis_name="d"))(batches)

  for loss in (
    scan_metric,
    jit_metric,
    cond_metric,
    remat_metric,
    custom_jvp_metric,
    map_metric,
  ):
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      assert np.all(np.isfinite(step(loss))), loss.__name__

  def jit_squared(p, x):  # the same bodies, the collective's result taken into the loss
    return jax.jit(lambda p: (local(p, x), pmean(local(p, x)) ** 2))(p)[1]

  def scan_reads_metric(p, x):  # the loss's carry adds the metric's in the next step
    def body(c, xt):
      total, metric = c
      return (total + local(p, xt) + metric, jnp.exp(pmean(local(p, xt)))), None

    return jax.lax.scan(body, (0.0, 0.0), steps(x))[0][0]

  def remat_squared(p, x):
    return jax.checkpoint(lambda p: (local(p, x), jnp.exp(pmean(local(p, x)))))(p)[1]

  for loss, name in (
    (jit_squared, "integer_pow"),
    (scan_reads_metric, "exp"),
    (remat_squared, "exp"),
  ):
    with pytest.warns(UserWarning, match=rf"other devices' parameters.*'{name}'"):
      step(loss)


def test_coupling_warning_passes_linear_operations_and_collectives_over_other_axes():
  """A collective over another mesh axis (``pmean`` over ``"model"`` of the loss already
  ``pmean``-ed over ``"data"``) and linear operations the check did not list (``jnp.split``,
  ``.at[].set``, ``dynamic_update_slice``, ``device_put``, ``optimization_barrier``) were taken
  as nonlinear uses of a collective's result: a warning on a correct program, an error under
  ``-W error`` (``vmap`` with axis names stands in for ``pmap`` over a 2 x 2 mesh;
  ``axis_name="data"``)."""
  params = {"w": jnp.array([0.3, -0.2, 0.5, 0.1])}
  batches = jnp.arange(16.0).reshape(2, 2, 4) / 8 - 1  # (model, data, features)
  local = lambda p, x: jnp.tanh(x * p["w"]) ** 2
  gathered = lambda p, x: jax.lax.all_gather(local(p, x), "data").reshape(-1)  # (8,)
  data_mean = lambda p, x: jax.lax.pmean(jnp.sum(local(p, x)), "data")

  def step(loss):
    tx = ah.adahessian(0.1, axis_name="data", independent_probes=True)
    state = tx.init(params)
    device = lambda x: tx.update(params, state, params, value_fn=lambda p: loss(p, x))[0]["w"]
    return jax.jit(jax.vmap(jax.vmap(device, axis_name="data"), axis_name="model"))(batches)

  def other_axis(p, x):
    return jax.lax.pmean(data_mean(p, x), "model") + jnp.mean(
      jax.lax.all_gather(data_mean(p, x), "model")
    )

  def linear_operations(p, x):
    g = gathered(p, x)
    return (
      jnp.sum(jnp.split(g, 2)[1])
      + jnp.sum(jnp.zeros(10).at[1:9].set(g))
      + jnp.sum(jax.lax.dynamic_update_slice(jnp.zeros(10), g, (2,)))
      + jnp.sum(jax.device_put(g))
      + jnp.sum(jax.lax.optimization_barrier(g))
    )

  for loss in (other_axis, linear_operations):
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      assert np.all(np.isfinite(step(loss))), loss.__name__
  # A nonlinear use after a collective over the other axis still warns, naming it.
  exp = lambda p, x: jnp.exp(jax.lax.psum(data_mean(p, x), "model"))
  with pytest.warns(UserWarning, match=r"other devices' parameters.*'exp'"):
    step(exp)


def test_resumed_state_with_another_update_freq_follows_the_transform_under_jit():
  """A lazy state resumed with another ``update_freq`` is refused outside ``jit``; under ``jit``
  the stored frequency is not known when the step is traced, and the first step silently
  refreshed on the state's schedule (``update_freq=3``: none at step 2) instead of the
  transform's (``update_freq=2``: a refresh). The ``value_fn`` route now follows the transform's
  from the first step: as the state with its frequency replaced does outside ``jit``."""
  params = {"w": jnp.array([1.0, -2.0, 0.5])}
  loss = lambda p: jnp.sum(jnp.tanh(p["w"]) ** 2 * jnp.arange(1.0, 4.0))
  old_tx, new_tx = ah.adahessian(0.1, update_freq=3), ah.adahessian(0.1, update_freq=2)
  state = old_tx.init(params)
  for _ in range(2):
    state = old_tx.update(params, state, params, value_fn=loss)[1]
  with pytest.raises(
    ValueError, match=r"made with update_freq=3 but the transform has update_freq=2"
  ):
    new_tx.update(params, state, params, value_fn=loss)
  jitted = jax.jit(lambda s: new_tx.update(params, s, params, value_fn=loss))(state)
  fixed = ah.map_adahessian_state(lambda s: s._replace(update_freq=jnp.asarray(2)), state)
  eager = new_tx.update(params, fixed, params, value_fn=loss)
  assert ah.is_refresh_step(ah.find_adahessian_state(fixed))  # step 2 refreshes at update_freq=2
  assert_trees_allclose(jitted, eager, rtol=1e-6, atol=0)


def test_a_linen_variables_dict_given_to_init_is_refused_unless_the_collections_are_masked():
  """``tx.init(model.init(key, x))``, the whole variables dict, made a state for BatchNorm's
  running statistics, which the steps then moved by their gradient, curvature and weight decay,
  silently (``TrainState.create`` refused it; a loop of one's own did not). Collections left out by
  ``optax.masked`` pass, as do the params alone or under a lone ``'params'`` key."""
  params = {"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
  stats = {"BatchNorm_0": {"mean": jnp.zeros(2), "var": jnp.ones(2)}}
  variables = {"params": params, "batch_stats": stats}
  for tx in (ah.scale_by_adahessian(), ah.adahessian(0.1, weight_decay=0.1)):
    held = r"Flax collection\(s\) \['batch_stats'\] beside 'params'"
    with pytest.raises(ValueError, match=held):
      tx.init(variables)
    with pytest.raises(ValueError, match=r"\['cache'\].*variables\['params'\] to tx.init"):
      tx.init({"params": params, "cache": {"k": jnp.zeros(3)}})
    for ok in (params, {"params": params}, {"params": params, "cache": {}}):
      mu = ah.find_adahessian_state(tx.init(ok)).mu
      assert jax.tree.structure(mu) == jax.tree.structure(ok)
  masked = optax.masked(ah.adahessian(0.1), {"params": True, "batch_stats": False})
  state = masked.init(variables)
  grads = jax.tree.map(jnp.ones_like, variables)
  diag = {"params": jax.tree.map(jnp.ones_like, params), "batch_stats": None}
  updates, _ = masked.update(grads, state, variables, hessian_diag=diag)
  # The statistics' gradient passes through masked untouched (the loop keeps them out of the
  # step); the params are stepped: -0.1 * m̂ / (|D| + eps) with m̂ = g = 1, D = 1.
  assert_trees_allclose(updates["batch_stats"], grads["batch_stats"])
  np.testing.assert_allclose(updates["params"]["Dense_0"]["kernel"], -0.1 / (1 + 1e-4), rtol=1e-6)


def test_a_state_with_fields_unlike_inits_is_refused_naming_the_field():
  """``map_adahessian_state`` (or a hand-built state) could give the update a ``nu`` or stored
  ``hessian`` of shape (1, 2) for a (3, 2) parameter, which it broadcast; integer moments, which
  it kept (truncated every step); a float count; or an ``fn`` result that is no state at all, all
  without an error (the last one failed at the next update, naming no ``fn``). A ``mu`` alone of
  another shape was reported as ``nu`` of another shape than ``mu``: each field's shape is named.
  A str leaf (read as the dtype it names) was reported as a shape ``()``; 8-bit moments failed in
  JAX's type promotion, and a ``nu`` cast without its ``hessian`` in the update's ``lax.cond``
  under ``jit``, naming no field; a float16 ``nu`` (refused as ``nu_dtype``) was taken."""
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
  loss = lambda p: jnp.sum(p["w"] ** 2) + jnp.sum(p["b"] ** 2)
  tx = ah.adahessian(0.1, update_freq=3)
  state = tx.init(params)
  small = {"w": jnp.ones((1, 2)), "b": jnp.zeros(2)}
  at_w = r"moments differ in shape at \['w'\]: "
  bad = [
    ("nu", small, at_w + r"mu \(3, 2\), nu \(1, 2\), hessian \(3, 2\) \(the update"),
    ("hessian", small, at_w + r"mu \(3, 2\), nu \(3, 2\), hessian \(1, 2\) \("),
    ("mu", small, at_w + r"mu \(1, 2\), nu \(3, 2\), hessian \(3, 2\) \("),
    ("mu", {"w": jnp.ones((3, 2), jnp.int32), "b": jnp.zeros(2)}, r"mu at \['w'\] has dtype int32"),
    ("count", jnp.float32(0.0), r"count has dtype float32, shape \(\), not an integer"),
    ("nu", {"w": "float32", "b": jnp.zeros(2)}, r"nu at \['w'\] is str 'float32', not an array\."),
    (
      "mu",
      {"w": jnp.ones((3, 2), jnp.float8_e4m3fn), "b": jnp.zeros(2)},
      r"mu at \['w'\] has dtype float8_e4m3fn: 8-bit floats hold neither",
    ),
    # As nu_dtype=float16 is refused: D² overflows for curvatures over 256.
    (
      "nu",
      {"w": jnp.zeros((3, 2), jnp.float16), "b": jnp.zeros(2)},
      r"nu at \['w'\] has dtype float16: float16 cannot hold D² for a curvature over 256",
    ),
    (
      "nu",
      {"w": jnp.zeros((3, 2), jnp.bfloat16), "b": jnp.zeros(2)},
      r"hessian at \['w'\] has dtype float\d+, but its nu bfloat16: init makes both in nu_dtype",
    ),
  ]
  for field, value, match in bad:
    error = TypeError if "dtype" in match or "not an array" in match else ValueError
    with pytest.raises(error, match=r"map_adahessian_state: fn returned a state whose " + match):
      ah.map_adahessian_state(lambda s, f=field, v=value: s._replace(**{f: v}), state)
    direct = (ah.find_adahessian_state(state)._replace(**{field: value}),) + state[1:]
    with pytest.raises(error, match=r"update got a state whose " + match):
      tx.update(params, direct, params, value_fn=loss)
  cast_nu = (ah.find_adahessian_state(state)._replace(nu=bad[-1][1]),) + state[1:]
  with pytest.raises(TypeError, match=bad[-1][2]):  # was a lax.cond error naming no field
    jax.jit(lambda s: tx.update(params, s, params, value_fn=loss))(cast_nu)
  with pytest.raises(TypeError, match=r"fn returned NoneType None, not a ScaleByAdaHessianState"):
    ah.map_adahessian_state(lambda s: None, state)
  # What init makes passes, also for a state stacked by jax.vmap (an ensemble), inside jit.
  stacked = jax.vmap(tx.init)({"w": jnp.ones((4, 3, 2)), "b": jnp.zeros((4, 2))})
  bumped = jax.jit(lambda s: ah.map_adahessian_state(lambda a: a._replace(count=a.count + 1), s))
  assert ah.find_adahessian_state(bumped(stacked)).count.tolist() == [1, 1, 1, 1]


def test_a_state_with_corrupt_moment_values_is_refused_where_they_are_known():
  """A state restored with NaN or inf in mu, nu or the stored D, or a negative nu, was taken: a
  NaN mu made that entry's updates NaN for good, an inf nu froze it. Outside jit (values known)
  the update names field, leaf and index; a negative count was refused already."""
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
  loss = lambda p: jnp.sum(p["w"] ** 2) + jnp.sum(p["b"] ** 2)
  fix = r"\. A moment restored from a corrupt checkpoint .* start again from tx\.init\(params\)"
  for kwargs in ({}, {"update_freq": 3}):
    tx = ah.adahessian(0.1, **kwargs)
    state = tx.init(params)
    bad = [
      ("mu", "w", (1, 0), jnp.nan, r"mu at \['w'\] has nan at index \(1, 0\), not finite"),
      ("nu", "b", (1,), jnp.inf, r"nu at \['b'\] has inf at index \(1,\), not finite"),
      (
        "nu",
        "w",
        (2, 1),
        -1.5,
        r"nu at \['w'\] has -1.5 at index \(2, 1\), negative \(nu holds squared curvatures: >= 0\)",
      ),
      ("mu", "b", (0,), -jnp.inf, r"mu at \['b'\] has -inf at index \(0,\), not finite"),
    ]
    if kwargs:
      bad.append(
        ("hessian", "b", (0,), jnp.nan, r"hessian at \['b'\] has nan at index \(0,\), not finite")
      )
    for field, leaf, index, value, match in bad:

      def corrupt(s, field=field, leaf=leaf, index=index, value=value):
        tree = dict(getattr(s, field))
        tree[leaf] = tree[leaf].at[index].set(value)
        return s._replace(**{field: tree})

      restored = ah.map_adahessian_state(corrupt, state)
      with pytest.raises(
        ValueError, match=r"^scale_by_adahessian's update got a state whose " + match + fix
      ):
        tx.update(params, restored, params, value_fn=loss)
    # A negative mu is a gradient's sign, and -0.0 in nu (init's mark of no curvature yet) no error.
    fine = ah.map_adahessian_state(
      lambda s: s._replace(mu=jax.tree.map(lambda m: m - 1.0, s.mu)), state
    )
    updates, _ = tx.update(params, fine, params, value_fn=loss)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


def test_map_adahessian_state_names_a_fn_that_is_no_function_of_one_state():
  """The arguments swapped, or a string, failed with Python's "'tuple' object is not callable",
  naming neither argument; a function of no arguments with "takes 0 positional arguments"."""
  state = ah.adahessian(0.1).init({"w": jnp.ones(2)})
  for fn, opt_state, got in [
    ("x", state, "got 'x'"),
    (state, lambda s: s, r"got \(ScaleByAdaHessianState\(count="),
  ]:
    refused = r"map_adahessian_state: fn must be a function, called as fn\(state\); " + got
    with pytest.raises(TypeError, match=refused):
      ah.map_adahessian_state(fn, opt_state)
  with pytest.raises(TypeError, match=r"called as fn\(state\), but its signature is \(\).*first"):
    ah.map_adahessian_state(lambda: None, state)


def test_refresh_decided_by_a_numpy_step_counter_is_taken_and_others_are_refused():
  """step % k == 0 on a NumPy counter is a NumPy bool: it was refused as "not a Python bool"
  (is_refresh_step, tx.update and the fused route alike); a number or string still is."""
  tx, params = ah.adahessian(0.1, update_freq=3), {"w": jnp.ones(2)}
  state = ah.find_adahessian_state(tx.init(params))
  for count, decided in ((3, np.int64(6) % 3 == 0), (4, np.int64(7) % 3 == 0)):
    assert isinstance(decided, np.bool_)
    assert ah.is_refresh_step(state._replace(count=jnp.int32(count)), decided) is bool(decided)
  loss = lambda p: jnp.sum(p["w"] ** 2)
  grads = {"w": 2 * jnp.ones(2)}
  for refresh in (np.True_, True):  # a refresh step: -lr g / (|D| + eps), D = 2 exactly
    updates, _ = tx.update(grads, tx.init(params), params, value_fn=loss, refresh=refresh)
    np.testing.assert_allclose(updates["w"], -0.1 * 2 / (2 + 1e-4) * np.ones(2), rtol=1e-6)
  for refresh in (1, "True", np.array([True])):
    with pytest.raises(TypeError, match=r"refresh must be a Python \(or NumPy\) bool .*got"):
      ah.is_refresh_step(state, refresh)


def test_is_refresh_step_refuses_a_count_or_update_freq_out_of_range():
  """A negative count (-1 % 3 == 2: "no refresh") and update_freq 0 or 1 (every step refreshed)
  were read without an error; a float count counted on (float32 stops at 2**24), an int8 one
  stopped at 127."""
  state = ah.find_adahessian_state(ah.adahessian(0.1, update_freq=3).init({"w": jnp.ones(2)}))
  cases = [
    ({"count": jnp.int32(-1)}, ValueError, r"count is -1, not >= 0"),
    ({"update_freq": jnp.int32(1)}, ValueError, r"update_freq is 1, not >= 2"),
    ({"update_freq": jnp.int32(0)}, ValueError, r"update_freq is 0, not >= 2"),
    ({"count": jnp.float32(3.0)}, TypeError, r"count has dtype float32, shape \(\)"),
    ({"count": jnp.zeros(2, jnp.int32)}, ValueError, r"count has .* \(2,\), not .*inside jax.vmap"),
    # A scalar type, which jnp.result_type reads as the dtype it names, is no integer array.
    ({"count": jnp.int32}, TypeError, r"count is a _ScalarMeta, not an integer array of shape"),
    # optax.safe_increment stops an int8 count at 127: the bias correction and the refresh
    # schedule (127 % 3 every step after) froze there.
    ({"count": jnp.int8(5)}, TypeError, r"count has dtype int8, fewer than 32 bits: .* at 127"),
  ]
  for fields, error, match in cases:
    with pytest.raises(error, match=r"is_refresh_step: the AdaHessian state's " + match):
      ah.is_refresh_step(state._replace(**fields))
  assert ah.is_refresh_step(state._replace(count=jnp.int32(3))) is True
  assert ah.is_refresh_step(state._replace(count=jnp.int32(4))) is False
  # The update and map_adahessian_state read the state with the same rule.
  tx, params = ah.adahessian(0.1, update_freq=3), {"w": jnp.ones(2)}
  first, *rest = tx.init(params)
  narrow = (first._replace(count=jnp.int16(0)), *rest)
  with pytest.raises(TypeError, match=r"count has dtype int16, fewer than 32 bits"):
    tx.update(params, narrow, params, value_fn=lambda p: jnp.sum(p["w"] ** 2))
  with pytest.raises(TypeError, match=r"count has dtype int16, fewer than 32 bits"):
    ah.map_adahessian_state(lambda s: s._replace(count=jnp.int16(0)), tx.init(params))


def test_a_state_replicated_for_pmap_given_to_a_jit_step_says_how_to_use_it():
  """A state from distributed.replicate (one copy per device) given to a jit step was told only
  to update it inside jax.vmap, as an ensemble's; the pmap-ed step, or one copy, is the fix."""
  from adahessian_jax import distributed

  tx, params = ah.adahessian(0.1), {"w": jnp.ones(3)}
  loss = lambda p: jnp.sum(p["w"] ** 4)
  replicated = distributed.replicate(tx.init(params), "batch")
  step = jax.jit(lambda s: tx.update(params, s, params, value_fn=loss)[0])
  with pytest.raises(
    ValueError,
    match=r"key must be raw key data, .* got an array of dtype uint32 of shape \(\d, 1, 2\)\. "
    r"A state with leading axes .* replicated for jax.pmap \(distributed.replicate\) holds one "
    r"copy per device: update it inside the pmap-ed step, or take one copy for a jax.jit step, "
    r"jax.tree.map\(lambda x: x\[0\], state\)\.",
  ):
    step(replicated)
  one = step(jax.tree.map(lambda x: x[0], replicated))  # the fix it gives runs
  np.testing.assert_allclose(one["w"], step(tx.init(params))["w"])


def test_is_refresh_step_of_an_abstract_state_says_it_needs_values():
  """A state from jax.eval_shape(tx.init, params) failed with Python's "unsupported operand
  type(s) for %: 'ShapeDtypeStruct' and 'ShapeDtypeStruct'"; every step refreshes with
  update_freq=1, which needs no values."""
  params = {"w": jnp.ones(2)}
  abstract = lambda tx: ah.find_adahessian_state(jax.eval_shape(tx.init, params))
  match = r"is_refresh_step reads .* but its count is a jax.ShapeDtypeStruct: an abstract state"
  for refresh in (None, True):
    with pytest.raises(TypeError, match=match):
      ah.is_refresh_step(abstract(ah.adahessian(0.1, update_freq=3)), refresh)
  assert ah.is_refresh_step(abstract(ah.adahessian(0.1))) is True


@pytest.mark.parametrize("update_freq", [None, 3])
def test_a_jitted_step_of_committed_params_compiles_once(update_freq):
  # jit keys its cache on whether an argument is committed and commits its outputs: with params
  # put on a device, the state's count and key (and a schedule's count), uncommitted from init,
  # compiled the whole step a second time for the state the first step returns.
  params = jax.device_put({"w": jnp.ones((4, 3)) * 0.1, "b": jnp.zeros(3)}, jax.devices()[0])
  loss_fn = lambda p: jnp.sum(jnp.sin(p["w"]) ** 2) + jnp.sum(p["b"] ** 2)
  lr = optax.linear_schedule(0.1, 0.01, 10)
  for tx in [ah.adahessian(lr, update_freq=update_freq), ah.scale_by_adahessian()]:
    with warnings.catch_warnings():  # jax >= 0.12 deprecated the SingleDeviceSharding it made
      warnings.simplefilter("error")
      state = tx.init(params)
    assert all(x.committed for x in jax.tree.leaves(state))
    vgh = ah.value_grad_and_hessian_diag(loss_fn)

    @jax.jit
    def step(params, state, tx=tx, vgh=vgh):
      _, grads, hdiag = vgh(params, state)
      updates, state = tx.update(grads, state, params, hessian_diag=hdiag)
      return optax.apply_updates(params, updates), state

    p, state = step(params, state)
    with CompileCounter() as compiles:  # the state the first step returns: nothing new
      for _ in range(4):
        p, state = step(p, state)
    assert compiles.count == 0
  # Uncommitted params (the usual case) leave the state as it was; under jit there is nothing
  # to place.
  loose = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
  assert not any(x.committed for x in jax.tree.leaves(ah.adahessian(0.1).init(loose)))
  jax.jit(ah.adahessian(0.1).init)(params)


def test_a_negative_seed_draws_the_same_probes_with_and_without_x64():
  # JAX seeds a key with a negative seed's 64-bit pattern under jax_enable_x64 and its 32-bit one
  # without: seed=-1 drew other probes depending on the flag (without it, those of 2**32 - 1).
  params = {"w": jnp.ones(3, jnp.float32)}
  key_of = lambda seed: ah.find_adahessian_state(ah.adahessian(seed=seed).init(params)).key
  for seed in (-1, -(2**31)):
    with jax.enable_x64(True):
      wide = np.asarray(key_of(seed))
    with jax.enable_x64(False):
      narrow = np.asarray(key_of(seed))
    np.testing.assert_array_equal(wide, narrow)
    np.testing.assert_array_equal(narrow, np.asarray(key_of(seed + 2**32)))
