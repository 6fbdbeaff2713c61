"""Smoke test of an installed adahessian_jax with only its core dependencies.

  python .ci/smoke_core.py VERSION

Run by .ci/dist.sh in a fresh virtual environment that holds the built wheel and nothing else
(jax, optax, numpy and what they need), from a folder outside the repository so the installed
package is the one imported. Checks: the version, the type marker and that no optional dependency
is installed; a few training steps through ``value_fn`` and through the fused route, which must
agree; that the helpers of a missing extra raise an ImportError naming it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.resources
import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adahessian_jax
from adahessian_jax import hessian

OPTIONAL = ("flax", "orbax", "matplotlib", "sklearn", "tqdm")


def check_installation(expected_version: str) -> None:
  package_dir = pathlib.Path(adahessian_jax.__file__).parent
  assert "site-packages" in package_dir.parts, f"imported from {package_dir}, not the wheel"
  assert adahessian_jax.__version__ == expected_version, (
    f"adahessian_jax.__version__ is {adahessian_jax.__version__!r}, the wheel is {expected_version}"
  )
  installed = importlib.metadata.version("adahessian_jax")
  assert installed == expected_version, f"installed metadata says {installed}"
  assert importlib.resources.files("adahessian_jax").joinpath("py.typed").is_file(), "no py.typed"
  present = [name for name in OPTIONAL if importlib.util.find_spec(name) is not None]
  assert not present, f"optional dependencies installed with the bare wheel: {present}"


def mlp_problem():
  keys = jax.random.split(jax.random.key(0), 4)
  params = {
    "hidden": {"kernel": 0.5 * jax.random.normal(keys[0], (8, 16)), "bias": jnp.zeros(16)},
    "out": {"kernel": 0.5 * jax.random.normal(keys[1], (16, 1)), "bias": jnp.zeros(1)},
  }
  x = jax.random.normal(keys[2], (64, 8))
  y = jnp.sin(x.sum(axis=1, keepdims=True))

  def loss_fn(p, batch):
    xb, yb = batch
    h = jnp.tanh(xb @ p["hidden"]["kernel"] + p["hidden"]["bias"])
    return jnp.mean((h @ p["out"]["kernel"] + p["out"]["bias"] - yb) ** 2)

  return params, loss_fn, (x, y)


def train(route: str, steps: int = 12):
  """Trains the MLP with a lazy refresh (every 2nd step); returns the losses and parameters."""
  params, loss_fn, batch = mlp_problem()
  tx = adahessian_jax.adahessian(0.1, update_freq=2)
  opt_state = tx.init(params)
  vgh = adahessian_jax.value_grad_and_hessian_diag(loss_fn)

  @jax.jit
  def closure_step(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params, value_fn=lambda p: loss_fn(p, batch))
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def fused_step(params, opt_state):
    loss, grads, hdiag = vgh(params, opt_state, batch)
    updates, opt_state = tx.update(grads, opt_state, params, hessian_diag=hdiag)
    return optax.apply_updates(params, updates), opt_state, loss

  step = closure_step if route == "closure" else fused_step
  losses = []
  for _ in range(steps):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  return np.asarray(losses), params


def check_training() -> None:
  closure_losses, closure_params = train("closure")
  fused_losses, fused_params = train("fused")
  for route, losses in (("closure", closure_losses), ("fused", fused_losses)):
    assert np.all(np.isfinite(losses)), f"{route}: non-finite loss {losses}"
    assert losses[-1] < 0.5 * losses[0], f"{route}: the loss did not fall: {losses}"
  # The same probes, so the same trajectory up to float32 rounding.
  np.testing.assert_allclose(fused_losses, closure_losses, rtol=1e-4)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
    fused_params,
    closure_params,
  )
  first, last = closure_losses[0], closure_losses[-1]
  print(f"trained 12 steps on both routes: loss {first:.4f} -> {last:.4f}")


def expect_missing_extra(extra: str, action) -> None:
  try:
    action()
  except ImportError as e:
    assert f'pip install "adahessian_jax[{extra}]"' in str(e), f"does not name the extra: {e}"
    print(f"[{extra}] missing: {e}")
  else:
    raise AssertionError(f"expected an ImportError naming the {extra!r} extra")


def check_missing_extras() -> None:
  expect_missing_extra("flax", lambda: importlib.import_module("adahessian_jax.linen"))
  expect_missing_extra("flax", lambda: importlib.import_module("adahessian_jax.nnx"))
  params, loss_fn, batch = mlp_problem()
  op = hessian.hessian_operator(loss_fn, params, batches=[batch])
  density = hessian.spectral_density(op, jax.random.key(0), num_probes=1, num_steps=4)
  expect_missing_extra("plot", lambda: hessian.plot_spectral_density(density))


def main(argv: list[str]) -> None:
  (expected_version,) = argv
  check_installation(expected_version)
  check_training()
  check_missing_extras()
  print(f"core smoke test passed: adahessian_jax {expected_version}, jax {jax.__version__}")


if __name__ == "__main__":
  main(sys.argv[1:])
