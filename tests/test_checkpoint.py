"""Orbax checkpoints: resuming in a fresh process continues bit-identically."""

import pathlib
import subprocess
import sys

import numpy as np
import pytest

WORKER = pathlib.Path(__file__).with_name("_checkpoint_worker.py")


def _run(*args):
  proc = subprocess.run(
    [sys.executable, str(WORKER), *map(str, args)],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]


def test_resume_from_orbax_checkpoint_is_bit_identical(tmp_path):
  steps = 7  # odd, so the checkpoint falls between two lazy Hessian refreshes (k=3)
  ckpt = tmp_path / "ckpt"
  _run("straight", steps, ckpt, tmp_path / "straight.npz")  # saves ckpt after `steps` steps
  _run("resume", steps, ckpt, tmp_path / "resumed.npz")
  a, b = np.load(tmp_path / "straight.npz"), np.load(tmp_path / "resumed.npz")
  assert len(a.files) == len(b.files) > 5
  for name in a.files:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)
  # The key and the lazy Hessian are in the checkpoint, and training moved the
  # parameters (b1 starts at zero), so the comparison is not vacuous.
  assert any("key" in name for name in a.files) and any("hessian" in name for name in a.files)
  assert np.abs(a["['params']['b1']"]).max() > 1e-3


def test_state_restored_without_target_is_refused_with_the_fix(tmp_path):
  # orbax's restore(path) without a target gives dicts and lists for the optimizer's
  # NamedTuples; the update raised AttributeError: 'dict' object has no attribute 'key'.
  ocp = pytest.importorskip("orbax.checkpoint")
  import jax
  import jax.numpy as jnp
  import optax

  import adahessian_jax as ah
  from adahessian_jax import distributed

  params = {"w": jnp.ones((2, 3))}
  loss = lambda p: jnp.sum(p["w"] ** 2)
  tx = optax.chain(optax.clip(1.0), ah.adahessian(0.1))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", tx.init(params))
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(tmp_path / "ckpt")
  assert isinstance(restored[1][0], dict)  # what orbax gives without a target
  fix = "restore with the abstract state as target"
  with pytest.raises(
    TypeError, match=r"update got a dict with keys \['count', 'hessian', .*" + fix
  ):
    tx.update(jax.grad(loss)(params), restored, params, value_fn=loss)
  with pytest.raises(ValueError, match=fix):
    ah.value_grad_and_hessian_diag(loss)(params, restored)
  with pytest.raises(ValueError, match=fix):
    ah.find_adahessian_state(restored)
  with pytest.raises(ValueError, match=fix):
    distributed.per_device_probe_state(restored, "batch")
  # The documented restore, with the abstract state as target, gives a state that works.
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, tx.init(params))
  state = checkpointer.restore(tmp_path / "ckpt", target)
  jax.jit(lambda s: tx.update(jax.grad(loss)(params), s, params, value_fn=loss))(state)


def test_flax_state_dict_restored_without_target_is_refused_with_the_fix():
  # Flax's serialization restores a tuple of states without a target as {"0": ..., "1": ...};
  # optax.chain then iterates over the dict's keys, and the update said it "got str as its state".
  import flax.serialization
  import jax
  import jax.numpy as jnp

  import adahessian_jax as ah

  params = {"w": jnp.ones((2, 3))}
  loss = lambda p: jnp.sum(p["w"] ** 2)
  tx = ah.adahessian(0.1, update_freq=2)
  data = flax.serialization.to_bytes(tx.init(params))
  restored = flax.serialization.msgpack_restore(data)
  assert set(restored) == {"0", "1", "2"}  # what Flax gives without a target
  fix = r"restore with the abstract state as target.*from_state_dict\(opt_state, restored\)"
  with pytest.raises(TypeError, match=r"got the string '0' .*" + fix):
    tx.update(jax.grad(loss)(params), restored, params, value_fn=loss)
  with pytest.raises(ValueError, match=fix):
    ah.value_grad_and_hessian_diag(loss)(params, restored)
  # The fix the message gives: the state dict restored into the state's own tree.
  state = flax.serialization.from_state_dict(tx.init(params), restored)
  jax.jit(lambda s: tx.update(jax.grad(loss)(params), s, params, value_fn=loss))(state)


def _leaves_equal(a, b):
  import jax

  return jax.tree.structure(a) == jax.tree.structure(b) and all(
    np.array_equal(p, q) for p, q in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


def test_whole_linen_train_state_round_trips_and_resumes_identically(tmp_path):
  # docs/usage.md says a whole adahessian_jax.linen.TrainState (batch_stats and the optimizer's
  # NamedTuples inside) checkpoints with orbax; apply_fn and tx come back from the target.
  ocp = pytest.importorskip("orbax.checkpoint")
  import jax
  import jax.numpy as jnp
  from flax import linen as nn

  import adahessian_jax as ah
  from adahessian_jax.linen import TrainState

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      return nn.Dense(1)(nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x))))

  x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 4)), jnp.float32)
  y = jnp.sin(x[:, :1])
  net = Net()
  variables = net.init(jax.random.key(0), x, train=False)
  state = TrainState.create(
    apply_fn=net.apply,
    params=variables["params"],
    batch_stats=variables["batch_stats"],
    tx=ah.adahessian(0.1, update_freq=2),
  )

  @jax.jit
  def step(state):
    def loss_fn(params):
      variables = {"params": params, "batch_stats": state.batch_stats}
      pred, mutated = state.apply_fn(variables, x, train=True, mutable=["batch_stats"])
      return jnp.mean((pred - y) ** 2), mutated["batch_stats"]

    state, (_, batch_stats) = state.apply_loss(loss_fn, has_aux=True)
    return state.replace(batch_stats=batch_stats)

  start = state
  state = step(step(step(state)))  # odd: the lazy Hessian is one step old at the checkpoint
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", state)
  checkpointer.wait_until_finished()
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, start)
  restored = checkpointer.restore(tmp_path / "ckpt", target)
  assert type(restored) is TrainState and restored.tx is start.tx and int(restored.step) == 3
  assert _leaves_equal(restored, state) and not _leaves_equal(restored, start)
  assert _leaves_equal(step(step(restored)), step(step(state)))


def test_nnx_model_and_optimizer_state_round_trips_and_resumes_identically(tmp_path):
  # docs/usage.md's NNX checkpoint: nnx.state((model, optimizer)) saved, restored into fresh ones.
  ocp = pytest.importorskip("orbax.checkpoint")
  import jax
  import jax.numpy as jnp
  from flax import nnx

  import adahessian_jax as ah
  import adahessian_jax.nnx as ah_nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.l1, self.bn = nnx.Linear(4, 8, rngs=rngs), nnx.BatchNorm(8, rngs=rngs)
      self.l2 = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x):
      return self.l2(nnx.relu(self.bn(self.l1(x))))

  def loss_fn(model, x, y):
    return jnp.mean((model(x) - y) ** 2)

  x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 4)), jnp.float32)
  y = jnp.sin(x[:, :1])

  def make(seed):
    model = Net(nnx.Rngs(seed))
    return model, nnx.Optimizer(model, ah.adahessian(0.1, update_freq=2), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    _, grads, hdiag = ah_nnx.value_grad_and_hessian_diag(loss_fn, model, optimizer, x, y)
    optimizer.update(model, grads, hessian_diag=hdiag)

  model, optimizer = make(0)
  for _ in range(3):
    step(model, optimizer)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", nnx.state((model, optimizer)))
  checkpointer.wait_until_finished()
  fresh = make(1)
  assert not _leaves_equal(nnx.state(fresh), nnx.state((model, optimizer)))
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.state(fresh))
  nnx.update(fresh, checkpointer.restore(tmp_path / "ckpt", target))
  assert _leaves_equal(nnx.state(fresh), nnx.state((model, optimizer)))
  for _ in range(2):
    step(model, optimizer)
    step(*fresh)
  assert _leaves_equal(nnx.state(fresh), nnx.state((model, optimizer)))


@pytest.mark.parametrize(
  "made_under,resumed_under", [("rbg", "threefry2x32"), ("threefry2x32", "rbg")]
)
def test_state_made_under_another_prng_impl_is_refused_with_the_fix(made_under, resumed_under):
  # The state's key is raw key data, whose size per key is the PRNG implementation's (2 words for
  # threefry2x32, 4 for rbg); resumed under another jax_default_prng_impl, every route failed in
  # JAX's wrap_key_data ("invalid PRNG key data"), naming neither the state nor the fix.
  import jax
  import jax.numpy as jnp

  import adahessian_jax as ah
  from adahessian_jax import distributed

  params = {"w": jnp.arange(6.0).reshape(2, 3) / 6}
  loss = lambda p: jnp.sum(jnp.sin(p["w"]) ** 2)
  tx = ah.adahessian(0.1, update_freq=2, n_samples=2)
  step = lambda s: tx.update(jax.grad(loss)(params), s, params, value_fn=loss)
  with jax.default_prng_impl(made_under):
    saved = jax.device_get(tx.init(params))  # as pickled, or restored with its own target
    # One program. Not jax.jit(step): jit's cache does not key on the PRNG impl, so the refusals
    # below would reuse it and not trace.
    straight = jax.jit(lambda s: step(s))(saved)
  size = {"threefry2x32": 2, "rbg": 4}
  match = (
    rf"key holds key data of {size[made_under]} words per probe .*"
    rf"jax_default_prng_impl='{resumed_under}'\) have {size[resumed_under]}: the state was made "
    r"under another implementation.*jax.config.update\('jax_default_prng_impl'"
  )
  with jax.default_prng_impl(resumed_under):
    with pytest.raises(ValueError, match=match):
      step(saved)
    with pytest.raises(ValueError, match=match):
      jax.jit(step)(saved)
    with pytest.raises(ValueError, match=match):
      jax.jit(ah.value_grad_and_hessian_diag(loss))(params, saved)
    fold = lambda s: distributed.per_device_probe_state(s, "i")
    with pytest.raises(ValueError, match=match):
      jax.vmap(fold, axis_name="i")(jax.tree.map(lambda x: x[None], saved))
  # The fix the message gives first: back under the implementation it was made with.
  with jax.default_prng_impl(made_under):
    resumed = jax.jit(step)(saved)
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  assert float(jnp.abs(resumed[0]["w"]).max()) > 1e-3


@pytest.mark.parametrize(
  "made,used,match",
  [
    (dict(), dict(mu_dtype="bfloat16"), r"mu at \['b'\] has dtype float32 .* mu_dtype=bfloat16"),
    (dict(mu_dtype="bfloat16"), dict(mu_dtype="float32"), r"mu at \['b'\] has dtype bfloat16"),
    (dict(), dict(nu_dtype="bfloat16"), r"nu at \['b'\] has dtype float32 .* nu_dtype=bfloat16"),
  ],
)
def test_state_with_other_moment_dtypes_is_refused_with_the_fix(made, used, match):
  # The update keeps the state's dtypes (cast_like), so a checkpoint resumed with another
  # mu_dtype / nu_dtype silently kept the old ones for good: no memory saved, or no precision won.
  import jax
  import jax.numpy as jnp
  import optax

  import adahessian_jax as ah

  params = {"b": jnp.ones(3, jnp.float32), "w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3) / 6}
  loss = lambda p: jnp.sum(jnp.sin(p["w"]) ** 2 * p["b"])
  grads = jax.grad(loss)(params)
  old = ah.adahessian(0.1, update_freq=2, **made)
  step = lambda tx, s: tx.update(grads, s, params, value_fn=loss)
  jitted = jax.jit(step, static_argnums=0)  # the steps that are no refusal: one program each
  state = jitted(old, jitted(old, old.init(params))[1])[1]
  tx = ah.adahessian(0.1, update_freq=2, **used)
  match += r".*, which the update would ignore .*map_adahessian_state"
  with pytest.raises(ValueError, match=match):
    step(tx, state)
  with pytest.raises(ValueError, match=match):
    jax.jit(step, static_argnums=0)(tx, state)
  # The cast the message gives: the update then has the transform's dtypes and the old numbers.
  mu_dtype, nu_dtype = used.get("mu_dtype", "float32"), used.get("nu_dtype", "float32")
  cast = ah.map_adahessian_state(
    lambda s: s._replace(
      mu=optax.tree.cast(s.mu, mu_dtype),
      nu=optax.tree.cast(s.nu, nu_dtype),
      hessian=optax.tree.cast(s.hessian, nu_dtype),
    ),
    state,
  )
  updates, new = jitted(tx, cast)
  new = ah.find_adahessian_state(new)
  assert new.mu["w"].dtype == jnp.dtype(mu_dtype) and new.nu["w"].dtype == jnp.dtype(nu_dtype)
  expected = jitted(old, state)[0]
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(a, b, rtol=2e-2, atol=1e-3)
  assert float(jnp.abs(updates["w"]).max()) > 1e-3


@pytest.mark.parametrize("committed", [False, True])
def test_restore_in_the_training_process_compiles_the_step_at_most_once_more(tmp_path, committed):
  # What docs/usage.md says: restored arrays are committed to the target's devices, so a step that
  # ran on uncommitted arrays compiles once more at the first step after the restore, and not
  # again; on committed params (jax.device_put) it does not compile again at all.
  ocp = pytest.importorskip("orbax.checkpoint")
  import jax
  import jax.numpy as jnp
  import optax
  from conftest import CompileCounter

  import adahessian_jax as ah

  params = {"w": jnp.ones((3, 2)) * 0.1, "b": jnp.zeros(2)}
  if committed:
    params = jax.device_put(params, jax.devices()[0])
  loss = lambda p: jnp.sum(jnp.sin(p["w"]) ** 2) + jnp.sum(p["b"] ** 2)
  tx = ah.adahessian(0.1, update_freq=2)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params, value_fn=loss)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for _ in range(3):
    params, state = step(params, state)
  tree = {"params": params, "opt_state": state}
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", tree)
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(
    tmp_path / "ckpt", jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
  )
  assert all(leaf.committed for leaf in jax.tree.leaves(restored))
  with CompileCounter() as first:
    params, state = step(restored["params"], restored["opt_state"])
  with CompileCounter() as later:
    for _ in range(3):
      params, state = step(params, state)
  assert (first.count, later.count) == ((0, 0) if committed else (1, 0))
  assert int(ah.find_adahessian_state(state).count) == 7
