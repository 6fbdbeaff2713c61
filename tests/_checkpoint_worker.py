"""Subprocess worker for test_checkpoint.py: train, checkpoint with orbax, resume.

python _checkpoint_worker.py MODE STEPS CKPT_DIR OUT_NPZ
  MODE = straight: train STEPS steps, save params + optimizer state to CKPT_DIR, train STEPS
                   more, write params + state to OUT_NPZ
  MODE = resume:   restore CKPT_DIR in this fresh process, train STEPS more, write OUT_NPZ
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import adahessian_jax as ah


def problem():
  r = np.random.default_rng(0)
  params = {
    "w1": jnp.asarray(r.normal(size=(5, 16)) / np.sqrt(5), jnp.float32),
    "b1": jnp.zeros(16, jnp.float32),
    "w2": jnp.asarray(r.normal(size=(16, 2)) / 4, jnp.float32),
  }
  x = jnp.asarray(r.normal(size=(256, 5)), jnp.float32)
  y = jnp.stack([jnp.sin(x[:, 0]), jnp.cos(x[:, 1] * x[:, 2])], axis=1)
  return params, x, y


def main():
  mode, steps, ckpt_dir, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
  params, x, y = problem()

  def loss_fn(p, idx):
    h = jnp.tanh(x[idx] @ p["w1"] + p["b1"])
    return jnp.mean((h @ p["w2"] - y[idx]) ** 2)

  tx = ah.adahessian(optax.cosine_decay_schedule(0.1, 40), update_freq=3, n_samples=2, seed=5)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, i):
    idx = (jnp.arange(32) + 32 * i) % 256  # the batch depends on the global step
    grads = jax.grad(loss_fn)(params, idx)
    updates, opt_state = tx.update(grads, opt_state, params, value_fn=lambda p: loss_fn(p, idx))
    return optax.apply_updates(params, updates), opt_state

  checkpointer = ocp.StandardCheckpointer()
  start = 0
  if mode == "straight":
    for i in range(steps):
      params, opt_state = step(params, opt_state, i)
    checkpointer.save(ckpt_dir, {"params": params, "opt": opt_state})
    checkpointer.wait_until_finished()
    start = steps
  elif mode == "resume":
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": params, "opt": opt_state})
    restored = checkpointer.restore(ckpt_dir, target)
    params, opt_state, start = restored["params"], restored["opt"], steps

  for i in range(start, start + steps):
    params, opt_state = step(params, opt_state, i)

  leaves = jax.tree_util.tree_flatten_with_path({"params": params, "opt": opt_state})[0]
  np.savez(out, **{jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves})


if __name__ == "__main__":
  main()
