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
  _run("straight", steps, ckpt, tmp_path / "straight.npz")
  _run("first", steps, ckpt, "-")
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
  tx.update(jax.grad(loss)(params), state, params, value_fn=loss)
