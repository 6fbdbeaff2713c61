"""The rewrite of Hessian-vector products: transpose(a + b) as transpose(a) + transpose(b)."""

import functools

import flax.linen as nn
import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import optax
import pytest
from conftest import assert_trees_allclose

import adahessian_jax as ah
from adahessian_jax import _transposes
from adahessian_jax._transposes import sink_transposes


@pytest.fixture
def every_size(monkeypatch):
  """Rewrite the small test problems' sums too (by default only those of 1 MiB or more)."""
  monkeypatch.setattr(_transposes, "MIN_BYTES", 0)


def transposed_sums(jaxpr) -> int:
  """Transposes of sums that XLA leaves strided: of a rank-2 ``add_any`` (a dense kernel's
  tangent), anywhere (nested jaxprs included), or of any ``add_any`` that is an output (a
  kernel's tangent of any rank, e.g. ``DenseGeneral``'s)."""
  producers, count = {}, 0
  for eqn in jaxpr.eqns:
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jcore.ClosedJaxpr):
          count += transposed_sums(sub.jaxpr)
        elif isinstance(sub, jcore.Jaxpr):
          count += transposed_sums(sub)
    producers.update((v, eqn) for v in eqn.outvars)
  outputs = {v for v in jaxpr.outvars if isinstance(v, jcore.Var)}
  for eqn in jaxpr.eqns:
    if eqn.primitive.name != "transpose" or not isinstance(eqn.invars[0], jcore.Var):
      continue
    source = producers.get(eqn.invars[0])
    if source and source.primitive.name == "add_any":
      count += eqn.outvars[0].aval.ndim == 2 or eqn.outvars[0] in outputs
  return count


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(24)(x))
    return nn.Dense(5)(nn.tanh(nn.Dense(16)(x)))


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    x = nn.relu(nn.Conv(6, (3, 3), strides=2)(x))
    return nn.Dense(5)(x.reshape(x.shape[0], -1))


class Attention(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(h, h)
    return nn.Dense(5)(x.mean(axis=1))


def flax_problem(module, x_shape):
  @jax.jit  # one program: op by op, Flax's init compiled each of its primitives on its own
  def make():
    key_x, key_y, key_p = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(key_x, x_shape)
    y = jax.random.randint(key_y, (x_shape[0],), 0, 5)
    return x, y, module.init(key_p, x)["params"]

  x, y, params = make()

  def loss(p):
    logits = module.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return params, loss


@jax.jit
def jitted_layer(h, w):
  return jnp.tanh(h @ w)


def scan_problem():
  """Stacked layers in ``lax.scan``: the transposes sit in the backward scan's body."""
  keys = jax.random.split(jax.random.key(1), 3)
  params = {"w": jax.random.normal(keys[0], (3, 6, 6)) / 3, "out": jax.random.normal(keys[1], (6,))}
  x = jax.random.normal(keys[2], (7, 6))

  def loss(p):
    h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])
    return jnp.mean((h @ p["out"]) ** 2)

  return params, loss


def jit_problem():
  """A ``jax.jit``-decorated layer: the transposes sit in a nested ``jit``."""
  keys = jax.random.split(jax.random.key(2), 3)
  params = {"w1": jax.random.normal(keys[0], (6, 8)) / 3, "w2": jax.random.normal(keys[1], (8, 3))}
  x = jax.random.normal(keys[2], (5, 6))
  return params, lambda p: jnp.sum(jitted_layer(jitted_layer(x, p["w1"]), p["w2"]) ** 2)


PROBLEMS = {
  "mlp": lambda: flax_problem(MLP(), (9, 7)),
  "cnn": lambda: flax_problem(CNN(), (3, 8, 8, 2)),
  "attention": lambda: flax_problem(Attention(), (3, 4, 8)),
  "scan": scan_problem,
  "nested_jit": jit_problem,
}


@functools.cache
def problem(name):
  """``PROBLEMS[name]()``, built once: the tests only read it (the MLP is used by three)."""
  return PROBLEMS[name]()


# Probes drawn by one jitted program per params structure (test_hutchinson checks that it
# draws what rademacher_like draws op by op).
rademacher_like = jax.jit(ah.hutchinson.rademacher_like)


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_rewritten_product_equals_jvp_of_grad_and_has_no_transposed_sums(name, every_size):
  params, loss = problem(name)
  z = rademacher_like(jax.random.key(3), params)
  plain = lambda p, t: jax.jvp(jax.value_and_grad(loss), (p,), (t,))
  expected = jax.jit(plain)(params, z)
  got = jax.jit(sink_transposes(plain))(params, z)
  assert_trees_allclose(got, expected, rtol=1e-6, atol=1e-7)
  before = transposed_sums(jax.make_jaxpr(plain)(params, z).jaxpr)
  after = transposed_sums(jax.make_jaxpr(sink_transposes(plain))(params, z).jaxpr)
  assert after == 0
  if name != "cnn":  # convolutions' kernel tangents come out without a transpose
    assert before > 0


def test_library_products_use_the_rewrite(every_size):
  params, loss = problem("mlp")
  z = rademacher_like(jax.random.key(4), params)
  routes = {
    "hvp": lambda p, t: ah.hutchinson.hvp(loss, p, t),
    "value_grad_hvp": lambda p, t: ah.hutchinson.value_grad_hvp(loss, p, t),
  }
  for route in routes.values():
    assert transposed_sums(jax.make_jaxpr(route)(params, z).jaxpr) == 0
  expected = jax.jit(lambda p, t: jax.jvp(jax.grad(loss), (p,), (t,))[1])(params, z)
  assert_trees_allclose(jax.jit(routes["hvp"])(params, z), expected, rtol=1e-6, atol=1e-7)


def test_rewrite_under_vmap_and_with_closed_over_tracers(every_size):
  """Several probes (``vmap``) and a loss closing over a traced batch, as in a jitted step."""
  params, _ = problem("mlp")
  module = MLP()
  x = jax.random.normal(jax.random.key(5), (9, 7))
  zs = jax.jit(jax.vmap(lambda k: ah.hutchinson.rademacher_like(k, params)))(
    jax.random.split(jax.random.key(6), 3)
  )

  def products(p, batch, route):
    loss = lambda q: jnp.mean(module.apply({"params": q}, batch) ** 2)
    return jax.vmap(lambda t: route(loss, p, t))(zs)

  plain = lambda loss, p, t: jax.jvp(jax.grad(loss), (p,), (t,))[1]
  expected = jax.jit(lambda p, b: products(p, b, plain))(params, x)
  got = jax.jit(lambda p, b: products(p, b, ah.hutchinson.hvp))(params, x)
  assert_trees_allclose(got, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("width, rewritten", [(512, True), (128, False)])
def test_only_sums_of_at_least_min_bytes_are_rewritten(width, rewritten):
  """A 512 x 512 float32 kernel (1 MiB) is rewritten; a 128 x 128 one, read from the cache,
  keeps its transpose (the swapped dots can be slower there)."""
  params = {"b": jnp.zeros(width), "w": jnp.zeros((width, width))}
  x = jnp.ones((4, width))
  loss = lambda p: jnp.sum(jnp.tanh(jnp.tanh(x + p["b"]) @ p["w"]) ** 2)
  plain = lambda p, t: jax.jvp(jax.grad(loss), (p,), (t,))[1]
  before = transposed_sums(jax.make_jaxpr(plain)(params, params).jaxpr)
  after = transposed_sums(jax.make_jaxpr(sink_transposes(plain))(params, params).jaxpr)
  assert before > 0
  assert after == (0 if rewritten else before)
