"""The compiled training step grows linearly in the parameter leaves, at about Adam's rate.

Counted in instructions of XLA's optimized module, which are exact at any load. A model with
hundreds of leaves (a deep network without ``nn.scan``) pays the compile once per run; a term
that grows with the square of the leaves, or a large constant per leaf, is what makes it slow
(``benchmarks/compile_time.py`` times it).
"""

import jax
import jax.numpy as jnp
import optax
import pytest

import adahessian_jax as ah


def _instructions(step, *args) -> int:
  text = jax.jit(step).lower(*args).compile().as_text()
  return sum(" = " in line for line in text.splitlines())


def _params(n: int):
  shapes = [(4, 4), (4,), (3,)]
  return {f"w{i:03d}": jnp.full(shapes[i % 3], 0.1 * (i + 1)) for i in range(n)}


def _loss(params, batch=None):
  return sum(jnp.sum(jnp.tanh(w) ** 2) for w in jax.tree.leaves(params))


def _adam_and_hvp(params):
  """Adam's step plus one forward-over-reverse product: the work AdaHessian's step adds."""
  tx = optax.adam(1e-3)

  def step(p, s):
    g = jax.grad(_loss)(p)
    _, hz = jax.jvp(jax.grad(_loss), (p,), (jax.tree.map(jnp.ones_like, p),))
    u, s = tx.update(jax.tree.map(lambda a, b: a + 0 * b, g, hz), s, p)
    return optax.apply_updates(p, u), s

  return _instructions(step, params, tx.init(params))


def _fused(params):
  tx = ah.adahessian(1e-3)
  vgh = ah.value_grad_and_hessian_diag(_loss)

  def step(p, s):
    _, g, h = vgh(p, s, None)
    u, s = tx.update(g, s, p, hessian_diag=h)
    return optax.apply_updates(p, u), s

  return _instructions(step, params, tx.init(params))


def _closure_with_floor(params):
  tx = ah.adahessian(1e-3, curvature_floor=0.1)

  def step(p, s):
    u, s = tx.update(jax.grad(_loss)(p), s, p, value_fn=_loss)
    return optax.apply_updates(p, u), s

  return _instructions(step, params, tx.init(params))


@pytest.mark.parametrize("route", [_fused, _closure_with_floor], ids=["fused", "closure_floor"])
def test_step_grows_linearly_in_the_leaves(route):
  # Before: a Python sum of per-leaf scalars (the non-finite mark, the floor's model mean) that
  # XLA fused into every leaf's kernel (n² adds), and one threefry draw per leaf; 5.3x (fused)
  # and 7.4x (floor) Adam+hvp's instructions per leaf. Now about 2.1x and 2.8x.
  small, large = 6, 24
  per_leaf = lambda f: (f(_params(large)) - f(_params(small))) / (large - small)
  assert per_leaf(route) < 3.5 * per_leaf(_adam_and_hvp)
