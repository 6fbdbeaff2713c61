"""Tests of adahessian_jax.hessian.layers (per-leaf breakdown)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CompileCounter
from hessian_problems import dense_hessian, mlp, mlp_hessian, mlp_loss

from adahessian_jax import hessian


def test_layer_breakdown_matches_dense_blocks():
  params, batch = mlp()
  op = hessian.hessian_operator(mlp_loss, params, batch)
  h = mlp_hessian()
  key = jax.random.key(0)
  out = hessian.layer_breakdown(op, key, num_samples=200, tol=1e-10)
  assert list(out) == list(op.leaf_names)
  diag = hessian.hutchinson_diagonal_estimate(op, jax.random.split(key)[0], num_samples=200)
  diag_flat = np.asarray(diag.diagonal_flat)  # sliced and summed in NumPy, not op by op
  z = []
  for name, sl in zip(op.leaf_names, op.leaf_slices, strict=True):
    blk, lc = h[sl, sl], out[name]
    assert lc.size == sl.stop - sl.start
    assert lc.top_eigenvalue == pytest.approx(np.linalg.eigvalsh(blk)[-1], rel=1e-8)
    np.testing.assert_allclose(np.ravel(lc.diagonal), diag_flat[sl], atol=1e-13)
    assert lc.trace == pytest.approx(float(np.sum(np.asarray(lc.diagonal))), rel=1e-10)
    z.append((lc.trace - np.trace(blk)) / lc.trace_stderr)
  assert np.all(np.abs(z) < 4), z
  assert sum(lc.trace for lc in out.values()) == pytest.approx(float(np.sum(diag_flat)), rel=1e-10)


def test_each_leaf_says_whether_its_eigenvalue_converged_and_its_error():
  # The breakdown dropped each Lanczos run's converged flag and error: a leaf eigenvalue cut
  # off by max_iter was reported like an exact one.
  params, batch = mlp()
  op = hessian.hessian_operator(mlp_loss, params, batch)
  h = mlp_hessian()
  good = hessian.layer_breakdown(op, jax.random.key(0), num_samples=2, tol=1e-10)
  short = hessian.layer_breakdown(op, jax.random.key(0), num_samples=2, tol=1e-10, max_iter=2)
  for name, sl in zip(op.leaf_names, op.leaf_slices, strict=True):
    exact = np.linalg.eigvalsh(h[sl, sl])[-1]
    assert good[name].converged and good[name].top_eigenvalue_error <= 1e-10 * abs(exact)
    assert abs(good[name].top_eigenvalue - exact) <= 1e-8 * abs(exact)
    cut = short[name]
    if cut.converged:  # out/bias: its block is a multiple of I, exact after one step
      assert abs(cut.top_eigenvalue - exact) <= 1e-8 * abs(exact)
    else:  # cut off by max_iter: no estimate is vouched for (it was 0.5-4.5x the true error)
      assert cut.top_eigenvalue_error == np.inf and abs(cut.top_eigenvalue - exact) > 0
  assert sum(not lc.converged for lc in short.values()) == 3
  off = hessian.layer_breakdown(op, jax.random.key(0), num_samples=2, eigenvalues=False)
  assert all(np.isnan(lc.top_eigenvalue_error) and not lc.converged for lc in off.values())


def test_without_eigenvalues():
  params, batch = mlp()
  op = hessian.hessian_operator(mlp_loss, params, batch)
  out = hessian.layer_breakdown(op, jax.random.key(0), num_samples=10, eigenvalues=False)
  assert all(np.isnan(lc.top_eigenvalue) and lc.num_matvecs == 0 for lc in out.values())


def _operator(loss_fn, params):
  return hessian.hessian_operator(loss_fn, params, batch=jnp.zeros(1))


def test_zero_size_leaf():
  # "e" has no entries: trace 0, no eigenvalue (top_eigenvalues raised on the empty block).
  def loss_fn(p, b):
    return jnp.sum(jnp.arange(1.0, 5.0) * p["v"] ** 2) + jnp.sum(p["e"])

  op = _operator(loss_fn, {"e": jnp.zeros((0, 3)), "v": jnp.ones(4)})
  out = hessian.layer_breakdown(op, jax.random.key(0), num_samples=4, tol=1e-10)
  e, v = out["e"], out["v"]
  assert e.size == 0 and e.trace == 0.0 and e.trace_stderr == 0.0 and e.diagonal.shape == (0, 3)
  assert np.isnan(e.top_eigenvalue) and e.num_matvecs == 0
  assert v.trace == pytest.approx(20.0, rel=1e-12) and v.top_eigenvalue == pytest.approx(8.0)


def test_colliding_leaf_names_keep_both_leaves():
  def loss_fn(p, b):
    return jnp.sum(p["a/b"] ** 2) + 5.0 * jnp.sum(p["a"]["b"] ** 2)

  op = _operator(loss_fn, {"a/b": jnp.ones(2), "a": {"b": jnp.ones(3)}})
  out = hessian.layer_breakdown(op, jax.random.key(0), num_samples=4)
  assert {k: (v.size, v.trace) for k, v in out.items()} == {
    "['a']['b']": (3, 30.0),
    "['a/b']": (2, 4.0),
  }
  assert out["['a']['b']"].top_eigenvalue == pytest.approx(10.0)


def test_bfloat16_traces_are_accumulated_in_float64():
  d = jnp.asarray([0.1, 3.3, 1e3, 7.77], jnp.bfloat16)
  op = _operator(lambda p, b: 0.5 * jnp.sum(d * p["w"] ** 2), {"w": jnp.ones(4, jnp.bfloat16)})
  lc = hessian.layer_breakdown(op, jax.random.key(0), num_samples=1000, eigenvalues=False)["w"]
  exact = np.asarray(d, np.float64)  # z ⊙ Hz = diag(H) exactly, for every probe
  assert lc.trace == pytest.approx(exact.sum(), rel=1e-7) and lc.trace_stderr == 0.0
  assert lc.diagonal.dtype == jnp.float32
  np.testing.assert_allclose(lc.diagonal, exact, rtol=1e-6)


@functools.cache
def _stacked_problem(layer_axis):
  """A residual stack of three tanh layers whose kernels share one leaf, stacked along
  ``layer_axis`` (0 or 1) of a boxed ``(layers, 3, 3)`` / ``(3, layers, 3)`` kernel (built once
  per axis: one ``loss_fn``, whose dense Hessian and products later tests reuse compiled)."""
  import flax.linen as nn

  r = np.random.default_rng(1)
  kernel = r.normal(size=(3, 3, 3)) * 0.6
  names = ["layers", None, "mlp"]
  if layer_axis == 1:
    kernel, names = np.moveaxis(kernel, 0, 1), [None, "layers", "mlp"]
  params = {"stack": {"kernel": nn.Partitioned(jnp.asarray(kernel), names=tuple(names))}}
  x = jnp.asarray(r.normal(size=(8, 3)))

  def loss_fn(p, xb):
    k = jnp.moveaxis(nn.unbox(p)["stack"]["kernel"], layer_axis, 0)
    for i in range(3):
      xb = xb + jnp.tanh(xb @ k[i])
    return jnp.mean(xb**2)

  return params, loss_fn, x


@functools.cache
def _stacked_hessian(layer_axis):
  """The dense Hessian of ``_stacked_problem(layer_axis)``, flat order: the leaf's row-major
  entries."""
  params, loss_fn, x = _stacked_problem(layer_axis)
  return dense_hessian(loss_fn, params, x, jit=True)


@pytest.mark.parametrize("layer_axis", [0, 1])
def test_stacked_layers_get_an_entry_each_matching_their_dense_blocks(layer_axis):
  params, loss_fn, x = _stacked_problem(layer_axis)
  op = hessian.hessian_operator(loss_fn, params, x)
  h = _stacked_hessian(layer_axis)
  out = hessian.layer_breakdown(op, jax.random.key(0), num_samples=8, tol=1e-10)
  names = ["stack/kernel[0]", "stack/kernel[1]", "stack/kernel[2]"]
  if layer_axis == 1:
    names = ["stack/kernel[:, 0]", "stack/kernel[:, 1]", "stack/kernel[:, 2]"]
  assert list(out) == names  # was one entry, "stack/kernel/value", pooling the three layers
  whole = hessian.layer_breakdown(op, jax.random.key(0), num_samples=8, layer_axes=0, tol=1e-10)
  (whole,) = whole.values()
  flat = np.arange(27).reshape(np.shape(np.moveaxis(np.zeros((3, 3, 3)), 0, layer_axis)))
  for i, lc in enumerate(out.values()):
    idx = np.take(flat, i, axis=layer_axis).ravel()
    assert lc.size == 9 and lc.diagonal.shape == (3, 3)
    blk = h[np.ix_(idx, idx)]
    assert lc.top_eigenvalue == pytest.approx(np.linalg.eigvalsh(blk)[-1], rel=1e-8)
    # The same probes as the unsplit leaf: its diagonal, cut into layers.
    np.testing.assert_allclose(np.ravel(lc.diagonal), np.ravel(whole.diagonal)[idx], rtol=1e-12)
  assert sum(lc.trace for lc in out.values()) == pytest.approx(whole.trace, rel=1e-12)
  # Plain arrays carry no names: layer_axes says the leaf is stacked.
  if layer_axis == 0:
    import flax.linen as nn

    plain = hessian.hessian_operator(loss_fn, nn.unbox(params), x)
    split = hessian.layer_breakdown(plain, jax.random.key(0), num_samples=8, layer_axes=1)
    assert list(split) == names
    assert [lc.top_eigenvalue for lc in split.values()] == pytest.approx(
      [lc.top_eigenvalue for lc in out.values()], rel=1e-8
    )


def test_block_of_part_of_a_leaf():
  params, loss_fn, x = _stacked_problem(1)
  op = hessian.hessian_operator(loss_fn, params, x)
  h = _stacked_hessian(1)
  blk = op.block("stack/kernel", (slice(None), 2))
  assert blk.leaf_names == ("stack/kernel[:, 2]",) and blk.size == 9
  idx = np.arange(27).reshape(3, 3, 3)[:, 2].ravel()
  v = np.arange(1.0, 10.0)
  np.testing.assert_allclose(
    np.asarray(blk.matvec(jnp.asarray(v))), h[np.ix_(idx, idx)] @ v, rtol=1e-12
  )
  with pytest.raises(
    ValueError, match=r"block\('stack/kernel', where=\(5,\)\) needs a NumPy basic"
  ):
    op.block("stack/kernel", (5,))
  with pytest.raises(ValueError, match=r"'x' is not an int or a slice"):
    op.block("stack/kernel", ("x",))  # type: ignore[arg-type]
  with pytest.raises(ValueError, match=r"has no entries at \(slice\(0, 0, None\),\)"):
    op.block("stack/kernel", (slice(0, 0),))


def test_a_python_float_leaf_is_a_block_of_its_own():
  # Its block's params were taken as leaf[()], which a Python float does not support.
  op = _operator(
    lambda p, b: 3.0 * p["a"] ** 2 + jnp.sum(p["b"] ** 2), {"a": 2.0, "b": jnp.ones(2)}
  )
  np.testing.assert_allclose(np.asarray(op.block("a").matvec(jnp.ones(1))), [6.0])
  out = hessian.layer_breakdown(op, jax.random.key(0), num_samples=4, tol=1e-10)
  assert out["a"].top_eigenvalue == pytest.approx(6.0) and out["b"].top_eigenvalue == pytest.approx(
    2.0
  )


@pytest.mark.parametrize("wrapper", [None, "Encoder"])
def test_a_leaf_of_another_module_named_like_a_stacked_one_is_kept_whole(wrapper):
  """Flax names a head "Dense_0" like the Dense inside an nn.scan block; only the stack is boxed.
  The head kernel (2, 3) has the stack's leading size but is no stack: it stays one leaf, and its
  filters get their norms. The stack's unboxed bias (its own module) is split. Inside a wrapper
  module ("Encoder") too: there the first path key, shared by head and stack, told them apart
  no more."""
  import flax.linen as nn

  r = np.random.default_rng(0)
  kernel = nn.Partitioned(jnp.asarray(r.normal(size=(2, 3, 3))), ("layers", None, "mlp"))
  params = {
    "Dense_0": {"kernel": jnp.asarray(r.normal(size=(2, 3))), "bias": jnp.ones(3)},
    "ScanBlock_0": {"Dense_0": {"kernel": kernel, "bias": jnp.asarray(r.normal(size=(2, 3)))}},
  }
  prefix = ""
  if wrapper is not None:
    params, prefix = {wrapper: params}, f"{wrapper}/"
  loss_fn = lambda p, b: sum(jnp.sum(jnp.tanh(b * a) ** 2) for a in jax.tree.leaves(p))
  op = hessian.hessian_operator(loss_fn, params, jnp.float64(0.5))
  layers = hessian.layer_breakdown(op, jax.random.key(0), num_samples=2, eigenvalues=False)
  stack = [
    f"{prefix}ScanBlock_0/Dense_0/{leaf}[{i}]" for leaf in ("bias", "kernel") for i in (0, 1)
  ]
  assert list(layers) == [f"{prefix}Dense_0/bias", f"{prefix}Dense_0/kernel", *stack]
  d = hessian.random_direction(op, jax.random.key(1))
  head = op.unravel(hessian.normalize_direction(op, d, "filter"))
  head = head[wrapper]["Dense_0"]["kernel"] if wrapper else head["Dense_0"]["kernel"]
  want = params[wrapper]["Dense_0"]["kernel"] if wrapper else params["Dense_0"]["kernel"]
  np.testing.assert_allclose(np.linalg.norm(head, axis=0), np.linalg.norm(want, axis=0), rtol=1e-12)


def test_a_later_breakdown_compiles_nothing_whatever_its_step_counts():
  # Each leaf's eigenvalue sliced its Lanczos basis to the steps taken: every new step count
  # compiled a slice, a product and a squeeze (the 4-6 programs a measurement compiled). A
  # max_iter no other test uses (23), so that no earlier test has compiled these shapes.
  params, batch = mlp()
  hessian.layer_breakdown(
    hessian.hessian_operator(mlp_loss, params, batch),
    jax.random.key(0),
    num_samples=2,
    tol=1e-3,
    max_iter=23,
  )
  for seed, tol in [(1, 1e-6), (2, 1e-10)]:
    later = jax.tree.map(lambda x, s=1 + 0.2 * seed: x * s, params)
    op = hessian.hessian_operator(mlp_loss, later, batch)
    with CompileCounter() as count:
      got = hessian.layer_breakdown(op, jax.random.key(seed), num_samples=2, tol=tol, max_iter=23)
    assert count.count == 0
    name = op.leaf_names[0]
    want = np.linalg.eigvalsh(np.asarray(op.block(name).matmat(jnp.eye(op.block(name).size))))
    np.testing.assert_allclose(got[name].top_eigenvalue, want[-1], rtol=1e-5)


def test_a_mixture_without_names_gets_an_entry_per_expert():
  # Raw (experts, in, out) weights under a "moe" path: an entry per expert, each the dense
  # Hessian's block of that expert's entries (before, one entry pooled the three experts).
  rng = np.random.default_rng(0)
  params = {"moe": {"w": jnp.asarray(rng.normal(size=(3, 2, 2)) * 0.5)}}
  x = jnp.asarray(rng.normal(size=(5, 2)))

  def loss_fn(p, xb):
    gates = jax.nn.softmax(xb @ jnp.ones((2, 3)) * jnp.arange(3.0), axis=-1)
    outs = jnp.tanh(jnp.einsum("bi,eio->beo", xb, p["moe"]["w"]))
    return jnp.mean(jnp.einsum("be,beo->bo", gates, outs) ** 2)

  op = hessian.hessian_operator(loss_fn, params, x)
  h = dense_hessian(loss_fn, params, x, jit=True)
  out = hessian.layer_breakdown(op, jax.random.key(0), num_samples=8, tol=1e-10)
  assert list(out) == ["moe/w[0]", "moe/w[1]", "moe/w[2]"]
  for e, lc in enumerate(out.values()):
    idx = np.arange(4 * e, 4 * e + 4)
    blk = h[np.ix_(idx, idx)]
    assert lc.top_eigenvalue == pytest.approx(np.linalg.eigvalsh(blk)[-1], rel=1e-8)


def test_the_blocks_of_leaves_of_one_shape_share_their_compiled_programs():
  # Before: a block's slice out of (and into) the flat vector was compiled for its offset, two
  # programs per leaf and per layer of a stack: 32 leaves compiled 83 programs, 16 leaves 51.
  # Now the offset is an argument, one program per width (21 and 21). Leaves of a size no other
  # test uses (7).
  def loss_fn(p, x):
    return sum(jnp.sum(jnp.tanh(w * x) ** 2) for w in jax.tree.leaves(p))

  def compilations(n: int) -> int:
    params = {f"w{i:02d}": jnp.full((7,), 0.1 * (i + 1)) for i in range(n)}
    op = hessian.hessian_operator(loss_fn, params, jnp.ones(()))
    with CompileCounter() as count:
      hessian.layer_breakdown(op, jax.random.key(0), num_samples=2, max_iter=3)
    return count.count

  compilations(4)  # the programs whose shapes do not depend on the leaf count
  assert compilations(32) <= compilations(16) + 2


def test_leaf_trace_stderr_is_student_t_scaled_as_hutchinson_traces():
  # trace ± 1.96·stderr is a 95 % interval only with t₍m−1₎(0.975)/1.96 for few samples
  # (t₃(0.975) = 3.182446305283708, scipy.stats.t.ppf); the plain s/√m covered 85 % at 4.
  params, batch = mlp()
  op = hessian.hessian_operator(mlp_loss, params, batch)
  out = hessian.layer_breakdown(op, jax.random.key(3), num_samples=4, eigenvalues=False)
  probes = op.probes(jax.random.split(jax.random.split(jax.random.key(3))[0], 4))
  for name, sl in zip(op.leaf_names, op.leaf_slices, strict=True):
    p = np.asarray(probes)[:, sl]
    x = np.sum(p * np.asarray(op.matmat(probes))[:, sl], axis=1)
    lc = out[name]
    assert lc.trace == pytest.approx(x.mean(), rel=1e-10)
    expected = x.std(ddof=1) / 2 * 3.182446305283708 / 1.959963984540054
    assert lc.trace_stderr == pytest.approx(expected, rel=2e-4)


def test_a_plain_dict_layer_axes_serves_nnx_params():
  # nnx.split's params are an nnx.State of nnx.Param variables: a plain dict prefix, as the
  # docstring's example reads, was refused ("has other containers than the params"), though a
  # plain-dict direction was taken for the same params.
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self):
      keys = jax.random.split(jax.random.key(0), 3)
      make = nnx.vmap(lambda k: nnx.Linear(3, 3, use_bias=False, rngs=nnx.Rngs(k)))
      self.blocks = make(keys)  # a stack without bias or names: nothing shows it
      self.head = nnx.Linear(3, 2, rngs=nnx.Rngs(1))

  _, params = nnx.split(Net(), nnx.Param)
  loss_fn = lambda p, x: jnp.sum(jnp.tanh(x @ p["blocks"]["kernel"][1]) @ p["head"]["kernel"])
  op = hessian.hessian_operator(lambda p, x: loss_fn(nnx.to_pure_dict(p), x), params, jnp.ones(3))
  want = hessian.layer_breakdown(
    op, jax.random.key(0), num_samples=4, layer_axes=nnx.State({"blocks": 1, "head": 0})
  )
  got = hessian.layer_breakdown(
    op, jax.random.key(0), num_samples=4, layer_axes={"blocks": 1, "head": 0}
  )
  assert (
    list(got)
    == list(want)
    == ["blocks/kernel[0]", "blocks/kernel[1]", "blocks/kernel[2]", "head/bias", "head/kernel"]
  )
  assert [lc.trace for lc in got.values()] == [lc.trace for lc in want.values()]
  d = hessian.random_direction(op, jax.random.key(1))
  nd = hessian.normalize_direction(op, d, "layer", layer_axes={"blocks": 1, "head": 0})
  kernel = np.asarray(nnx.to_pure_dict(op.unravel(nd))["blocks"]["kernel"])
  weights = np.asarray(nnx.to_pure_dict(params)["blocks"]["kernel"])
  np.testing.assert_allclose(
    np.linalg.norm(kernel, axis=(1, 2)), np.linalg.norm(weights, axis=(1, 2)), rtol=1e-6
  )
  # A dict that misses a leaf is still refused, naming it. By its canonical path, as the leaf
  # names: the errors read "['head']['bias'].value", and a tuple given for a leaf "an entry at
  # ['head']['kernel'][0], where the params have none" (inside no leaf's path with ".value").
  with pytest.raises(
    ValueError, match=r"has no entry for the params leaf at \['head'\]\['bias'\]\.$"
  ):
    hessian.layer_breakdown(op, jax.random.key(0), layer_axes={"blocks": 1})
  inside = r"\['head'\]\['kernel'\]\[0\], inside the params leaf at \['head'\]\['kernel'\] of shape"
  with pytest.raises(ValueError, match=inside):
    hessian.layer_breakdown(
      op, jax.random.key(0), layer_axes={"blocks": 1, "head": {"bias": 0, "kernel": (0, 0)}}
    )
  with pytest.raises(ValueError, match=r"^layer_axes at \['head'\]\['bias'\] must be an integer"):
    hessian.layer_breakdown(op, jax.random.key(0), layer_axes={"blocks": 1, "head": 2})
