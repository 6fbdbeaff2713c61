"""Tests of the flat Hessian operator over batches: adahessian_jax.hessian._operator and its parts
(_layout, _data, _loss, _rows)."""

import dataclasses
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CompileCounter, assert_trees_allclose, with_fast_compile
from hessian_problems import dense_hessian, mlp, mlp_hessian, mlp_loss

from adahessian_jax import hessian, hutchinson


def _dense(op):
  return np.asarray(op.matmat(jnp.eye(op.size, dtype=op.dtype)))


# The reference loss as one program per batch shape, not op by op.
_mlp_loss = jax.jit(mlp_loss)


def test_single_batch_equals_dense_hessian():
  params, batch = mlp()
  op = hessian.hessian_operator(mlp_loss, params, batch)
  assert op.size == 75 and op.num_batches == 1
  np.testing.assert_allclose(_dense(op), mlp_hessian(), atol=1e-13)
  v = jnp.asarray(np.random.default_rng(1).normal(size=75))
  np.testing.assert_allclose(op.matvec(v), mlp_hessian() @ np.asarray(v), atol=1e-13)
  assert float(op.loss()) == pytest.approx(float(_mlp_loss(params, batch)), rel=1e-14)


def test_loss_at_other_params_checks_their_tree_and_shapes():
  # op.loss(params) took any tree: a bias of shape () broadcast in the loss and gave a number for
  # params that are not the operator's, a bias of shape (1,) too; matvec and ravel refuse them.
  x = jnp.asarray([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
  loss = lambda p, b: jnp.sum((b @ p["w"] + p["b"]) ** 2)
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
  op = hessian.hessian_operator(loss, params, x)
  moved = {"w": 2 * params["w"], "b": params["b"] + 1}
  assert float(op.loss(moved)) == pytest.approx(float(loss(moved, x)), rel=1e-14)
  must = re.escape(
    "loss's params must be a pytree with the structure and leaf shapes of the params"
  )
  with pytest.raises(ValueError, match=must + r".*\['b'\] has shape \(\), the params' .* \(2,\)"):
    op.loss({"w": params["w"], "b": jnp.zeros(())})
  with pytest.raises(ValueError, match=must + r": it lacks the leaves \['b'\]"):
    op.loss({"w": params["w"]})
  with pytest.raises(ValueError, match=must + r".*has \['c'\] that the params do not"):
    op.loss({**params, "c": jnp.zeros(())})


def test_full_data_mode_equals_dense_hessian_of_full_data_loss():
  params, (x, y) = mlp()
  cuts = [0, 7, 20, 33, 40]  # unequal batch sizes: the weighting matters
  batches = [(x[a:b], y[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
  op = hessian.hessian_operator(mlp_loss, params, batches=batches)
  assert op.num_batches == 4
  np.testing.assert_allclose(_dense(op), mlp_hessian(), atol=1e-13)
  assert float(op.loss()) == pytest.approx(float(_mlp_loss(params, (x, y))), rel=1e-14)
  # An unweighted average of the batch Hessians would differ.
  unweighted = np.mean([dense_hessian(mlp_loss, params, b, jit=True) for b in batches], axis=0)
  assert np.abs(unweighted - mlp_hessian()).max() > 1e-3
  # A one-shot iterator is read once and gives the same operator.
  op_iter = hessian.hessian_operator(mlp_loss, params, batches=iter(batches))
  np.testing.assert_allclose(_dense(op_iter), mlp_hessian(), atol=1e-13)


def test_bfloat16_products_and_losses_over_many_batches_are_summed_in_float32():
  params, (x, y) = mlp(num=256)
  exact = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16).astype(a.dtype), params)
  want_op = hessian.hessian_operator(mlp_loss, exact, (x, y))  # float64, the same point
  x, y = np.asarray(x), np.asarray(y)
  batches = [(x[i::256], y[i::256]) for i in range(256)]

  def loss(p, b):  # bfloat16 params, float64 arithmetic: only the products' rounding differs
    return mlp_loss(jax.tree.map(lambda a: a.astype(jnp.float64), p), b)

  op = hessian.hessian_operator(
    loss, jax.tree.map(lambda a: a.astype(jnp.bfloat16), params), batches=batches
  )
  assert op.dtype == jnp.bfloat16
  v = np.random.default_rng(0).normal(size=op.size)
  want = np.asarray(want_op.matvec(jnp.asarray(v)))
  got = np.asarray(op.matvec(jnp.asarray(v, jnp.bfloat16)), np.float64)
  # One bfloat16 product is off by ~0.3 %; the 256 products summed in bfloat16 were off by 1.2 %.
  assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.005
  # A bfloat16 loss likewise (landscapes too): 256 of them summed in bfloat16 were off by 1.3 %.
  op = hessian.hessian_operator(
    lambda p, b: mlp_loss(p, b).astype(jnp.bfloat16), exact, batches=batches
  )
  assert op.loss().dtype == jnp.float32
  assert float(op.loss()) == pytest.approx(float(want_op.loss()), rel=1e-3)


def test_explicit_batch_sizes_weight_the_batches():
  params, (x, y) = mlp()
  b1, b2 = (x[:20], y[:20]), (x[20:], y[20:])
  op = hessian.hessian_operator(mlp_loss, params, batches=[b1, b2], batch_sizes=[1, 3])
  want = 0.25 * dense_hessian(mlp_loss, params, b1, jit=True)
  want += 0.75 * dense_hessian(mlp_loss, params, b2, jit=True)
  np.testing.assert_allclose(_dense(op), want, atol=1e-13)


def test_batch_sizes_near_the_float_limit_keep_their_ratio():
  params, (x, y) = mlp()
  b1, b2 = (x[:20], y[:20]), (x[20:], y[20:])
  op = hessian.hessian_operator(mlp_loss, params, batches=[b1, b2], batch_sizes=[0.5e308, 1.5e308])
  assert op.data.weights == pytest.approx((0.25, 0.75), rel=1e-15)  # the sum overflowed: (0, 0)


def test_block_is_the_diagonal_block_of_a_leaf():
  params, batch = mlp()
  op = hessian.hessian_operator(mlp_loss, params, batch)
  assert op.leaf_names == ("hidden/bias", "hidden/kernel", "out/bias", "out/kernel")
  sl = op.leaf_slices[1]
  blk = op.block("hidden/kernel")
  assert blk.size == 40
  np.testing.assert_allclose(_dense(blk), mlp_hessian()[sl, sl], atol=1e-13)


def test_the_block_of_a_leaf_without_entries_is_refused_by_name():
  # A (0, 3) leaf's block is an operator of size 0, on which the analyses failed with NumPy's
  # and JAX's own errors ("zero-size array to reduction operation max", "Need at least one array
  # to concatenate", "k must be an integer in [1, 0]").
  loss = lambda p, b: jnp.sum(p["v"] ** 2) + jnp.sum(p["e"])
  op = hessian.hessian_operator(loss, {"e": jnp.zeros((0, 3)), "v": jnp.ones(4)}, jnp.ones(1))
  with pytest.raises(ValueError, match=r"leaf 'e' has no entries \(shape \(0, 3\)\)"):
    op.block("e")
  assert op.block("v").size == 4


def test_masked_is_the_block_embedded_in_the_full_space():
  params, batch = mlp()
  op = hessian.hessian_operator(mlp_loss, params, batch, block_size=5)
  sl = op.leaf_slices[3]
  want = np.zeros((75, 75))
  want[sl, sl] = mlp_hessian()[sl, sl]
  masked = op.masked("out/kernel")
  np.testing.assert_allclose(_dense(masked), want, atol=1e-13)  # 75 rows: 15 blocks of 5
  z = np.asarray(masked.rademacher(jax.random.key(0), 3))
  assert np.all(z[:, : sl.start] == 0) and np.all(np.abs(z[:, sl]) == 1)


def test_probes_are_the_optimizers_probes():
  params, batch = mlp()
  op = hessian.hessian_operator(mlp_loss, params, batch)
  key = jax.random.key(3)
  z = op.rademacher(key, 4)
  # The optimizer draws them inside its jitted update: one program here too, not op by op.
  want = jax.jit(lambda k: op.ravel(hutchinson.rademacher_like(jax.random.split(k, 4)[2], params)))(
    key
  )
  np.testing.assert_array_equal(z[2], want)
  assert set(np.unique(np.asarray(z))) == {-1.0, 1.0}


def test_bad_arguments_raise():
  params, batch = mlp()
  with pytest.raises(ValueError, match="exactly one"):
    hessian.hessian_operator(mlp_loss, params, batch, batches=[batch])
  with pytest.raises(ValueError, match="exactly one"):
    hessian.hessian_operator(mlp_loss, params)
  with pytest.raises(ValueError, match="batch_sizes"):
    hessian.hessian_operator(mlp_loss, params, batches=[batch], batch_sizes=[1, 2])
  with pytest.raises(TypeError, match="scalar"):
    hessian.hessian_operator(lambda p, b: mlp_loss(p, b) * jnp.ones(2), params, batch)
  # One dict batch passed as batches= would be read as the batches "x" and "y", its keys.
  with pytest.raises(ValueError, match=r"got a dict with keys \['x', 'y'\].* batch="):
    hessian.hessian_operator(mlp_loss, params, batches={"x": batch[0], "y": batch[1]})
  # The way out of a (loss, aux) loss takes the batch too, as loss_fn does.
  with pytest.raises(TypeError, match=r"tuple of 2 .* lambda p, b: loss_fn\(p, b\)\[0\]"):
    hessian.hessian_operator(lambda p, b: (mlp_loss(p, b), {"aux": 1.0}), params, batch)


_SHARDED = textwrap.dedent(
  """
  import jax, jax.numpy as jnp, numpy as np
  jax.config.update("jax_enable_x64", True)
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from hessian_problems import mlp, mlp_loss, mlp_hessian
  from adahessian_jax import hessian
  assert jax.device_count() == 2, jax.devices()
  params, batch = mlp()
  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
  op = hessian.hessian_operator(mlp_loss, params, sharded)
  h = np.asarray(op.matmat(jnp.eye(op.size)))
  print("ERR", np.abs(h - mlp_hessian()).max())
  """
)


def _on_two_cpu_devices(script: str) -> str:
  """The output of ``script`` run in a Python process that sees two CPU devices."""
  flags = with_fast_compile("--xla_force_host_platform_device_count=2")
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
  out = subprocess.run(
    [sys.executable, "-c", script],
    cwd=os.path.dirname(__file__),
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  return out.stdout


def test_batch_sharded_over_devices_gives_the_same_products():
  err = float(_on_two_cpu_devices(_SHARDED).split("ERR")[1])
  assert err < 1e-12


_FSDP_EXPLICIT = textwrap.dedent(
  """
  import jax, jax.numpy as jnp, numpy as np
  jax.config.update("jax_enable_x64", True)
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  from hessian_problems import mlp, mlp_loss, mlp_hessian
  import adahessian_jax
  from adahessian_jax import distributed, hessian
  mesh = jax.make_mesh((2,), ("data",), axis_types=(AxisType.Explicit,))
  at = lambda *spec: NamedSharding(mesh, P(*spec))
  params, batch = mlp()
  specs = {"hidden": {"kernel": at(None, "data"), "bias": at("data")},
           "out": {"kernel": at("data", None), "bias": at()}}
  sharded = jax.device_put(params, specs)
  gather = lambda p: jax.tree.map(lambda a: jax.sharding.reshard(a, at()), p)
  loss = lambda p, b: mlp_loss(gather(p), b)  # an FSDP model gathers its params
  op = hessian.hessian_operator(loss, sharded, jax.device_put(batch, at("data")))
  ref = hessian.hessian_operator(mlp_loss, params, batch)
  h = np.asarray(op.matmat(jnp.eye(op.size)))
  print("ERR", np.abs(h - mlp_hessian()).max())
  key = jax.random.key(0)
  print("PROBES", np.abs(op.rademacher(key, 3) - ref.rademacher(key, 3)).max())
  d = op.ravel(sharded)
  line = lambda o: hessian.loss_landscape_1d(o, jnp.array([0.5]), d).losses
  print("LINE", np.abs(line(op) - line(ref)).max())
  tx = adahessian_jax.adahessian(0.1)
  state = jax.jit(tx.init, out_shardings=distributed.state_shardings(tx, sharded))(sharded)
  update = lambda p, s: tx.update(jax.grad(loss)(p, batch), s, p, value_fn=lambda q: loss(q, batch))
  _, state = jax.jit(update)(sharded, state)
  assert state[0].nu["hidden"]["kernel"].sharding.spec == P(None, "data")
  pre = lambda o, s: hessian.preconditioned_operator(o, hessian.adahessian_preconditioner(s))
  v = jnp.linspace(-1.0, 1.0, op.size)
  print("PRE", np.abs(pre(op, state).matvec(v) - pre(ref, jax.device_get(state)).matvec(v)).max())
  """
)


def test_params_sharded_over_explicit_mesh_axes_give_the_same_analyses():
  # jax.make_mesh's axes are Explicit by default; ravel_pytree of a leaf split over one raised
  # a ShardingTypeError ("This reshape is not supported") in hessian_operator.
  out = _on_two_cpu_devices(_FSDP_EXPLICIT)
  got = {k: float(v) for k, v in (line.split() for line in out.splitlines())}
  assert got["ERR"] < 1e-12 and got["PROBES"] == 0.0 and got["LINE"] < 1e-12, got
  assert got["PRE"] < 1e-12, got


def test_pmap_replicated_params_are_refused_naming_the_fix():
  # A loss that broadcasts over the device axis (x @ w with w (devices, in, out)) averaged the
  # replicas' losses: on P devices every eigenvalue came out divided by P, with no error.
  params, (x, y) = mlp()
  devices = jax.local_device_count()
  stacked = jax.pmap(lambda p: p)(jax.tree.map(lambda a: jnp.stack([a] * devices), params))
  with pytest.raises(
    ValueError,
    match=r"leaf at \['hidden'\]\['bias'\] \(shape \(\d+, 8\)\) is a "
    r"jax.pmap output.*jax.tree.map\(lambda x: x\[0\], params\)",
  ):
    hessian.hessian_operator(mlp_loss, stacked, (x, y))
  one = jax.tree.map(lambda a: a[0], stacked)  # the documented way: one replica
  v = jnp.linspace(-1.0, 1.0, 75)
  got = hessian.hessian_operator(mlp_loss, one, (x, y)).matvec(v)
  np.testing.assert_allclose(got, hessian.hessian_operator(mlp_loss, params, (x, y)).matvec(v))
  # An NNX leaf by its canonical path: it read ['hidden']['bias'].value.
  nnx = pytest.importorskip("flax.nnx")
  boxed = nnx.State(jax.tree.map(nnx.Param, stacked))
  with pytest.raises(
    ValueError, match=r"leaf at \['hidden'\]\['bias'\] \(shape \(\d+, 8\)\) is a "
  ):
    hessian.hessian_operator(lambda p, b: mlp_loss(nnx.to_pure_dict(p), b), boxed, (x, y))


def test_a_batch_leaf_that_is_not_an_array_or_a_number_is_named():
  # It reached jit, whose error advised static_argnums, which the caller cannot pass.
  params, (x, y) = mlp()
  batch = {"x": x, "y": y, "scale": 2, "name": "train"}
  loss = lambda p, b: mlp_loss(p, (b["x"], b["y"])) * b["scale"]
  with pytest.raises(TypeError, match=r"leaf at batches\[0\]\['name'\] is a str \('train'\)"):
    hessian.hessian_operator(loss, params, batches=[batch, batch])
  with pytest.raises(TypeError, match=r"leaf at batch\['name'\].*functools.partial"):
    hessian.hessian_operator(loss, params, batch)
  # A NumPy array of strings or objects (a text column) passed as an array and reached jit too.
  for text in (np.array(["a", "b"]), np.array([None, 1], dtype=object), np.str_("train")):
    with pytest.raises(
      TypeError, match=rf"leaf at batch\['name'\] is a {type(text).__name__} of dtype {text.dtype}"
    ):
      hessian.hessian_operator(loss, params, {**batch, "name": text})


def test_a_single_empty_batch_is_refused_not_a_zero_hessian():
  params, (x, y) = mlp()
  with pytest.raises(ValueError, match=r"batch is empty: its leaf at batch\[0\]"):
    hessian.hessian_operator(mlp_loss, params, (x[:0], y[:0]))
  with pytest.raises(ValueError, match=r"batches\[1\] is empty"):
    hessian.hessian_operator(mlp_loss, params, batches=[(x, y), (x[:0], y[:0])])


def _dict_loss(p, b):
  return b["class_weights"][0] * mlp_loss(p, (b["x"], b["y"]))


def test_batch_sizes_are_not_inferred_from_a_leaf_that_is_not_per_example():
  params, (x, y) = mlp()
  cw = jnp.ones(3)  # sorts before "x": the first leaf, but not per-example
  batches = [{"class_weights": cw, "x": x[:32], "y": y[:32]}, {"class_weights": cw, "x": x[32:]}]
  batches[1]["y"] = y[32:]
  with pytest.raises(ValueError, match=r"\['class_weights'\]: 3, .*\['x'\]: 32.*batch_sizes="):
    hessian.hessian_operator(_dict_loss, params, batches=batches)
  op = hessian.hessian_operator(_dict_loss, params, batches=batches, batch_sizes=[32, 8])
  np.testing.assert_allclose(_dense(op), mlp_hessian(), atol=1e-13)


@pytest.mark.parametrize(
  "leaf, dtype",
  [
    (jnp.array(3, jnp.int32), "int32"),
    (jnp.array([True]), "bool"),
    (jnp.ones(2, jnp.complex64), "complex64"),
  ],
)
def test_non_float_leaves_are_refused_naming_the_leaf(leaf, dtype):
  params, batch = mlp()
  params = {**params, "extra": {"step": leaf}}
  with pytest.raises(
    TypeError, match=rf"leaf at \['extra'\]\['step'\] has dtype {dtype}.*close over"
  ):
    hessian.hessian_operator(mlp_loss, params, batch)


def test_a_whole_equinox_model_is_refused_saying_how_to_split_it():
  # An Equinox model holds its activation function as a leaf: the error says how Equinox splits
  # the arrays off.
  params, batch = mlp()
  with pytest.raises(TypeError, match=r"leaf at \['act'\] is .*eqx\.partition\(model, eqx\."):
    hessian.hessian_operator(mlp_loss, {**params, "act": jax.nn.relu}, batch)


def test_an_unhashable_loss_callable_works():
  @dataclasses.dataclass
  class Loss:  # eq=True: unhashable
    scale: float

    def __call__(self, p, b):
      return self.scale * mlp_loss(p, b)

  params, batch = mlp()
  op = hessian.hessian_operator(Loss(2.0), params, batch)
  np.testing.assert_allclose(_dense(op), 2 * mlp_hessian(), atol=1e-12)
  assert float(op.loss()) == pytest.approx(2 * float(_mlp_loss(params, batch)), rel=1e-14)


def test_a_later_measurement_of_an_nnx_model_reuses_the_compilation():
  nnx = pytest.importorskip("flax.nnx")

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.l = nnx.Linear(3, 2, rngs=rngs)
      self.bn = nnx.BatchNorm(2, use_running_average=True, rngs=rngs)

    def __call__(self, x):
      return self.bn(self.l(x))

  def nnx_loss(graphdef, rest, p, b):  # defined once; the state comes in the Partial's arrays
    return jnp.mean((nnx.merge(graphdef, p, rest, copy=True)(b[0]) - b[1]) ** 2)

  model = Net(nnx.Rngs(0))
  batch = (jnp.linspace(-1, 1, 12).reshape(4, 3), jnp.ones((4, 2)))
  alphas, v = np.linspace(-1, 1, 3), jnp.linspace(-1, 1, 12)

  def measure():
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    op = hessian.hessian_operator(jax.tree_util.Partial(nnx_loss, graphdef, rest), params, batch)
    land = hessian.loss_landscape_1d(op, alphas, v).losses
    # The closure the docs once gave, new each measurement: compiled anew, the reference values.
    ref = hessian.hessian_operator(lambda p, b: nnx_loss(graphdef, rest, p, b), params, batch)
    want = (ref.matvec(v), ref.loss(), hessian.loss_landscape_1d(ref, alphas, v).losses)
    return (op.matvec(v), op.loss(), land), want

  measure()
  model.l.kernel[...] = 2.0 * model.l.kernel[...]  # a later step: other params and statistics
  model.bn.mean[...] = model.bn.mean[...] + 1.0
  with CompileCounter() as later:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    op = hessian.hessian_operator(jax.tree_util.Partial(nnx_loss, graphdef, rest), params, batch)
    got = (op.matvec(v), op.loss(), hessian.loss_landscape_1d(op, alphas, v).losses)
  assert later.count == 0  # was a compilation of the product, of the loss and of the landscape
  _, want = measure()
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-12)


def test_nnx_state_that_is_not_trained_is_refused_naming_the_split():
  # nnx.state(model) or the module itself (a pytree) as params: BatchNorm's statistics were taken
  # for parameters, and in eval mode, where they move the loss, the top eigenvalue was not the
  # parameters' (a Linear-BatchNorm-Linear MLP: 2.34 for 2.14), with no error.
  nnx = pytest.importorskip("flax.nnx")
  model = nnx.Sequential(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), nnx.BatchNorm(2, rngs=nnx.Rngs(0)))
  model.eval()
  loss = lambda m, b: jnp.mean((m(b[0]) - b[1]) ** 2)
  batch = (jnp.linspace(-1, 1, 12).reshape(4, 3), jnp.ones((4, 2)))
  graphdef = nnx.graphdef(model)
  merged = lambda s, b: loss(nnx.merge(graphdef, s), b)
  fix = r"nnx\.BatchStat, not a parameter.*nnx\.split\(model, nnx\.Param, \.\.\.\)"
  with pytest.raises(ValueError, match=r"leaf at \['layers'\]\[1\]\['mean'\] is an " + fix):
    hessian.hessian_operator(merged, nnx.state(model), batch)
  with pytest.raises(ValueError, match=r"leaf at \.layers\[1\]\.mean is an " + fix):
    hessian.hessian_operator(loss, model, batch)


def test_errors_name_an_nnx_leaf_by_its_path_without_the_variables_value_step():
  # The params of an NNX model (nnx.split(model, nnx.Param)) were named with the Variable's own
  # step, "nan at ['linear']['kernel'].value[1, 0]", where the operator's leaf names and the
  # optimizer's layouts read "linear/kernel": the non-finite, complex, traced and integer checks.
  nnx = pytest.importorskip("flax.nnx")

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.linear = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
      return self.linear(x)

  graphdef, params = nnx.split(Net(nnx.Rngs(0)), nnx.Param)
  loss = lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x) ** 2)
  x = jnp.linspace(-1, 1, 12).reshape(4, 3)
  op = hessian.hessian_operator(loss, params, x)
  assert op.leaf_names == ("linear/bias", "linear/kernel")
  bad = jax.tree.map(lambda v: v, params)
  bad["linear"]["kernel"][...] = bad["linear"]["kernel"][...].at[1, 0].set(jnp.nan)
  with pytest.raises(
    hessian.NonFiniteError, match=re.escape("nan at ['linear']['kernel'][1, 0]. ")
  ):
    hessian.hessian_operator(loss, bad, x)
  bad = jax.tree.map(lambda v: v, params)
  bad["linear"]["bias"][...] = jnp.asarray([1.0, jnp.inf], bad["linear"]["bias"].dtype)
  with pytest.raises(ValueError, match=re.escape("not finite: inf at ['linear']['bias'][1].")):
    hessian.loss_landscape_1d(op, jnp.linspace(-1, 1, 3), bad)
  bad = jax.tree.map(lambda v: v, params)
  bad["linear"]["kernel"] = nnx.Param(bad["linear"]["kernel"][...].astype(jnp.complex64))
  with pytest.raises(ValueError, match=re.escape("its leaf at ['linear']['kernel'] has dtype c")):
    op.ravel(bad)
  with pytest.raises(ValueError, match=re.escape("its leaf at ['linear']['bias'] is traced")):
    jax.jit(lambda p: hessian.hessian_operator(loss, p, x).size)(params)
  bad = jax.tree.map(lambda v: v, params)
  bad["linear"]["bias"] = nnx.Param(jnp.zeros(2, jnp.int32))
  with pytest.raises(TypeError, match=re.escape("leaf at ['linear']['bias'] has dtype int32.")):
    hessian.hessian_operator(loss, bad, x)


def test_a_linen_variables_dict_is_refused_and_the_recipe_gives_the_params_hessian():
  # model.init's whole variables dict as params: the running statistics were taken for parameters,
  # and in eval mode, where they move the loss, the top eigenvalue was not the parameters' (this
  # model: 4.62 for 3.74), with no error.
  nn = pytest.importorskip("flax.linen")

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Dense(3, param_dtype=jnp.float64)(x)
      x = nn.BatchNorm(use_running_average=True, param_dtype=jnp.float64)(x)
      return nn.Dense(2, param_dtype=jnp.float64)(jnp.tanh(x))

  model = Net()
  batch = (jnp.linspace(-1, 1, 24, dtype=jnp.float64).reshape(8, 3), jnp.ones((8, 2)))
  variables = jax.jit(model.init)(jax.random.key(0), batch[0])  # one program, not op by op
  stats = jax.tree.map(lambda s: s + 0.5, variables["batch_stats"])  # statistics that matter
  variables = {"params": variables["params"], "batch_stats": stats}
  loss = lambda v, b: jnp.mean((model.apply(v, b[0]) - b[1]) ** 2)
  fix = r"Pass variables\['params'\] as params and the rest to loss_fn"
  with pytest.raises(ValueError, match=r"collection\(s\) \['batch_stats'\] beside .*" + fix):
    hessian.hessian_operator(loss, variables, batch)
  with pytest.raises(ValueError, match=fix):  # a FrozenDict too
    hessian.hessian_operator(loss, pytest.importorskip("flax.core").freeze(variables), batch)
  f = lambda s, p, b: loss({"params": p, "batch_stats": s}, b)
  op = hessian.hessian_operator(jax.tree_util.Partial(f, stats), variables["params"], batch)
  want = np.linalg.eigvalsh(dense_hessian(lambda p, b: f(stats, p, b), variables["params"], batch))
  got = hessian.top_eigenvalues(op, 2, tol=1e-10).eigenvalues
  np.testing.assert_allclose(got, want[::-1][:2], rtol=1e-8)
  wrong = np.linalg.eigvalsh(dense_hessian(loss, variables, batch, jit=True))[-1]
  assert wrong > 1.1 * want[-1]  # what the variables dict would have measured


def test_an_nnx_loss_that_writes_the_models_state_gets_the_copy_fix():
  # Without copy=True, a training-mode merge updates BatchNorm statistics and the dropout RNG count
  # of `rest` from inside the trace; NNX's error said only "Cannot mutate ... from a different trace
  # level".
  nnx = pytest.importorskip("flax.nnx")
  from flax.errors import TraceContextError

  batch = (jnp.linspace(-1, 1, 12, dtype=jnp.float32).reshape(4, 3), jnp.ones((4, 2), jnp.float32))
  for norm in (nnx.BatchNorm(2, rngs=nnx.Rngs(0)), nnx.Dropout(0.5, rngs=nnx.Rngs(1))):
    model = nnx.Sequential(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), norm)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    merged = lambda g, r, p, b: jnp.mean((nnx.merge(g, p, r)(b[0]) - b[1]) ** 2)
    with pytest.raises(TraceContextError) as e:
      hessian.hessian_operator(jax.tree_util.Partial(merged, graphdef, rest), params, batch)
    assert "nnx.merge(graphdef, p, rest, copy=True)" in "".join(getattr(e.value, "__notes__", []))


def test_an_operator_on_an_nnx_split_stays_at_its_point_while_the_model_trains():
  # nnx.split's state holds the model's own Variables, which nnx.Optimizer.update writes in place:
  # an operator kept from an earlier step followed the model to its new params (while the Partial's
  # BatchNorm statistics stayed), its products, loss and eigenvalues silently another point's.
  nnx = pytest.importorskip("flax.nnx")
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  batch = (jnp.linspace(-1, 1, 12).reshape(4, 3), jnp.ones((4, 2)))

  def nnx_loss(graphdef, rest, p, b):
    return jnp.mean(jnp.tanh(nnx.merge(graphdef, p, rest, copy=True)(b[0]) - b[1]) ** 2)

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  op = hessian.hessian_operator(jax.tree_util.Partial(nnx_loss, graphdef, rest), params, batch)
  v = jnp.linspace(-1, 1, op.size)
  want = (np.asarray(op.matvec(v)), float(op.loss()), np.asarray(op.ravel(op.params)))
  model.kernel[...] = 2.0 * model.kernel[...]  # a training step, in place
  np.testing.assert_array_equal(op.matvec(v), want[0])
  assert float(op.loss()) == want[1]
  np.testing.assert_array_equal(op.ravel(op.params), want[2])


def test_a_partial_without_arrays_does_not_lend_its_compilation_to_another_loss():
  # JAX takes a tree structure holding a PyTreeDef (the static part of a Partial without arrays,
  # e.g. over an NNX graphdef alone) for equal to one holding any other object: a plain function
  # of the same shapes then ran the Partial's compiled product and loss.
  def loss(p, b):
    return jnp.sum(p["x"] ** 2 * b)

  params, batch = {"x": jnp.array([0.5, -1.0, 2.0])}, jnp.array([1.0, 2.0, 3.0])
  first = hessian.hessian_operator(jax.tree_util.Partial(loss), params, batch)
  second = hessian.hessian_operator(lambda p, b: 3.0 * loss(p, b), params, batch)
  ones = jnp.ones(3)
  np.testing.assert_allclose(first.matvec(ones), [2.0, 4.0, 6.0], rtol=1e-14)
  np.testing.assert_allclose(second.matvec(ones), [6.0, 12.0, 18.0], rtol=1e-14)  # was the first's
  assert float(second.loss()) == pytest.approx(3 * float(first.loss()), rel=1e-14)


@pytest.mark.parametrize("kind", ["boolean mask", "string array"])
def test_a_partial_whose_arrays_must_stay_concrete_is_static(kind):
  # NumPy arrays a loss uses as Python values: traced as arguments they failed at the first product
  # (NonConcreteBooleanIndexError; a string array is no JAX type); static, as before the Partial's
  # arrays became arguments, they work.
  params, (x, y) = mlp()
  first = np.arange(40) < 25
  arg = first if kind == "boolean mask" else np.array(["first"])

  def loss(a, p, b):
    keep = a if a.dtype == bool else first
    return mlp_loss(p, (b[0][keep], b[1][keep]))

  op = hessian.hessian_operator(jax.tree_util.Partial(loss, arg), params, (x, y))
  want = dense_hessian(mlp_loss, params, (x[:25], y[:25]), jit=True)
  np.testing.assert_allclose(_dense(op), want, atol=1e-13)
  assert float(op.loss()) == pytest.approx(float(_mlp_loss(params, (x[:25], y[:25]))), rel=1e-14)


def test_a_partial_with_python_numbers_keeps_its_arrays_as_arguments():
  # A Partial holding a Python number beside its arrays (a label smoothing, a class count used as a
  # size) was static as a whole, hashed by identity: each new Partial (one per measurement, with
  # the state of that step) compiled the Hessian product and loss anew, its arrays as constants.
  # The numbers are now static by value, the arrays arguments.
  params, (x, y) = mlp()

  def loss(shift, smoothing, outputs, p, b):  # outputs: a size, so it must stay concrete
    h = jnp.tanh(b[0] @ p["hidden"]["kernel"] + p["hidden"]["bias"])
    pred = (h @ p["out"]["kernel"] + p["out"]["bias"])[:, :outputs] + shift[:outputs]
    return jnp.mean((pred - b[1][:, :outputs]) ** 2) + smoothing * jnp.mean(pred**4)

  def measure(shift, smoothing=0.1):
    op = hessian.hessian_operator(
      jax.tree_util.Partial(loss, shift, smoothing, 2),
      params,
      batches=[(x[:20], y[:20]), (x[20:], y[20:])],
    )
    return op, _dense(op), float(op.loss())

  shift = jnp.array([0.5, -0.25, 1.0])
  measure(jnp.zeros(3))
  with CompileCounter() as count:
    op, got, value = measure(shift)
  assert count.count == 0  # was 2: the product and the loss (the batches have one shape)
  f = lambda p, b: loss(shift, 0.1, 2, p, b)
  np.testing.assert_allclose(got, dense_hessian(f, params, (x, y), jit=True), atol=1e-13)
  assert value == pytest.approx(float(jax.jit(f)(params, (x, y))), rel=1e-14)
  # Another number is another function: compiled, not the first's.
  _, other, _ = measure(shift, smoothing=0.3)
  g = lambda p, b: loss(shift, 0.3, 2, p, b)
  np.testing.assert_allclose(other, dense_hessian(g, params, (x, y), jit=True), atol=1e-13)


def test_a_later_operator_of_the_same_loss_fn_reuses_the_landscapes_compilation():
  params, batch = mlp()
  alphas, d = np.linspace(-1, 1, 3), jnp.linspace(-1, 1, 75)
  hessian.loss_landscape_1d(hessian.hessian_operator(mlp_loss, params, batch), alphas, d)
  later = jax.tree.map(lambda x: 2.0 * x, params)
  op = hessian.hessian_operator(mlp_loss, later, batch)
  with CompileCounter() as count:
    got = hessian.loss_landscape_1d(op, alphas, d).losses
  assert count.count == 0  # the landscape's compilation was keyed by the operator
  want = [_mlp_loss(op.unravel(op.ravel(later) + a * d), batch) for a in alphas]
  np.testing.assert_allclose(got, want, rtol=1e-12)


def test_the_public_layout_and_data_classes_build_on_their_own():
  # ParamLayout.of without unravel and WeightedData without jit_loss derive what the operator
  # passes them.
  params, batch = mlp()
  op = hessian.hessian_operator(mlp_loss, params, batches=[batch, batch], batch_sizes=[1, 3])
  layout = hessian.ParamLayout.of(params)
  assert layout.names == op.layout.names and layout.slices == op.layout.slices
  flat = op.ravel(params)
  assert_trees_allclose(layout.unravel(flat), params, rtol=0, atol=0)
  data = hessian.WeightedData(mlp_loss, (0.25, 0.75), (batch, batch))
  assert float(data.loss(params)) == pytest.approx(float(_mlp_loss(params, batch)), rel=1e-14)


def test_weighted_data_refuses_weights_that_are_no_weighted_mean():
  """WeightedData built by hand: a weight per batch, finite, non-negative, summing to 1 (a length
  mismatch raised zip()'s error at the first product; NaN, negative or unnormalised weights gave
  a wrong loss silently)."""
  params, batch = mlp()
  bad = {
    (0.5,): r"one weight per batch.*got 1 weights for 2 batches",
    (0.5, float("nan")): r"weights\[1\].*nan",
    (1.5, -0.5): r"weights\[1\].*-0\.5",
    (1.0, 1.0): r"must sum to 1.*sum 2\.0.*divide them by their sum",
  }
  for weights, match in bad.items():
    with pytest.raises(ValueError, match=match):
      hessian.WeightedData(mlp_loss, weights, (batch, batch))
  with pytest.raises(ValueError, match=r"at least one batch"):
    hessian.WeightedData(mlp_loss, (), ())
  data = hessian.WeightedData(mlp_loss, [0.0, 1.0], [batch, batch])  # lists: kept as tuples
  assert data.weights == (0.0, 1.0) and isinstance(data.batches, tuple)
  assert float(data.loss(params)) == pytest.approx(float(_mlp_loss(params, batch)), rel=1e-14)


def test_bad_batch_lists_and_batch_sizes_are_named():
  params, batch = mlp()
  with pytest.raises(ValueError, match=r"batches is empty; give at least one batch\.$"):
    hessian.hessian_operator(mlp_loss, params, batches=[])
  # A generator given again, read to its end by the first call: it said only "empty".
  gen = (b for b in [batch])
  hessian.hessian_operator(mlp_loss, params, batches=gen)
  with pytest.raises(
    ValueError,
    match=r"batches is empty; .* It is a generator, which an earlier call given it may have "
    r"consumed already .* pass a list, or a fresh iterator\.",
  ):
    hessian.hessian_operator(mlp_loss, params, batches=gen)
  # a str is iterable, its characters no sizes; a 0-d array raised "iteration over a 0-d array"
  for sizes in (3, "13", jnp.asarray(3)):
    with pytest.raises(
      ValueError, match=re.escape(f"batch_sizes must be a sequence of numbers, got {sizes!r}")
    ):
      hessian.hessian_operator(mlp_loss, params, batches=[batch, batch], batch_sizes=sizes)
  scalar_batches = [jnp.asarray(1.0), jnp.asarray(2.0)]  # no leaf to count examples on
  with pytest.raises(ValueError, match=r"size of batches\[0\] \(no leaf with a leading axis\)"):
    hessian.hessian_operator(lambda p, b: mlp_loss(p, batch) * b, params, batches=scalar_batches)


@pytest.mark.parametrize("sizes", [[np.inf, 1], ["3", 7], [True, True], [1, -2]])
def test_batch_sizes_must_be_finite_positive_numbers(sizes):
  params, (x, y) = mlp()
  with pytest.raises(ValueError, match=r"batch_sizes\[\d\] must be a finite real number > 0"):
    hessian.hessian_operator(mlp_loss, params, batches=[(x, y), (x, y)], batch_sizes=sizes)


def test_every_batch_is_checked_against_the_first_at_construction():
  params, (x, y) = mlp()
  bad = (jnp.ones((5, 4)), jnp.ones((5, 3)))
  with pytest.raises(ValueError, match=r"leaf at batches\[1\]\[0\] has shape \(5, 4\)"):
    hessian.hessian_operator(mlp_loss, params, batches=[(x, y), bad])


def test_several_batches_passed_as_batch_are_told_to_use_batches():
  # batch=[b1, b2] reached loss_fn as one batch, whose Flax or NumPy error (a tuple where an array
  # was expected) said nothing of batches=; batch=loader was refused as a leaf to close over.
  params, (x, y) = mlp()
  batches = [(x[:20], y[:20]), (x[20:], y[20:])]
  with pytest.raises((TypeError, ValueError)) as e:  # whatever loss_fn raises on a pair of tuples
    hessian.hessian_operator(mlp_loss, params, batches)
  hint = "batch= is a list of 2 pytrees of one structure. If they are several batches, pass them"
  assert hint in "".join(getattr(e.value, "__notes__", []))
  with pytest.raises(TypeError, match=r"batch is a generator, an iterator: pass the batches it"):
    hessian.hessian_operator(mlp_loss, params, (b for b in batches))
  op = hessian.hessian_operator(mlp_loss, params, batches=iter(batches))  # the fix
  assert op.num_batches == 2


def test_a_loss_of_batch_then_params_is_told_its_argument_order():
  # loss(batch, params), as some code bases write it, failed inside its own code ("'...Tracer'
  # object is not a mapping", a shape mismatch) with no word of the order hessian_operator calls it
  # in.
  params, batch = mlp()
  swapped = lambda b, p: mlp_loss(p, b)
  fix = "loss_fn runs with its arguments swapped, loss_fn(batch, params): it is called as"
  for kwargs in ({"batch": batch}, {"batches": [batch, batch]}):
    with pytest.raises((TypeError, ValueError, IndexError, KeyError)) as e:
      hessian.hessian_operator(swapped, params, **kwargs)
    assert fix in "".join(getattr(e.value, "__notes__", []))
    assert "lambda p, b: loss_fn(b, p)" in "".join(e.value.__notes__)
  op = hessian.hessian_operator(lambda p, b: swapped(b, p), params, batch)  # the fix
  np.testing.assert_allclose(_dense(op), mlp_hessian(), atol=1e-13)
  # A loss that fails either way gets no such note.
  broken = lambda p, b: mlp_loss(p, (b[0][:, :2], b[1]))
  with pytest.raises(TypeError) as e:
    hessian.hessian_operator(broken, params, batch)
  assert fix not in "".join(getattr(e.value, "__notes__", []))


def test_a_loss_that_fails_on_a_later_batch_shape_fails_at_construction_naming_it():
  # The loss was traced on batches[0] alone: one that fixes the batch size failed on a short last
  # batch inside the first analysis, with JAX's reshape error and no word of which batch.
  params, (x, y) = mlp()
  fixed = lambda p, b: mlp_loss(p, (b[0].reshape(16, 5), b[1].reshape(16, 3)))
  batches = [(x[:16], y[:16]), (x[16:32], y[16:32]), (x[32:], y[32:])]
  with pytest.raises(TypeError, match="cannot reshape") as e:
    hessian.hessian_operator(fixed, params, batches=batches)
  note = r"loss_fn failed on batches\[2\] \(leaf shapes \[\(8, 5\), \(8, 3\)\]\), though it runs on"
  assert re.search(note, "".join(e.value.__notes__))
  vector = lambda p, b: mlp_loss(p, b) * jnp.ones(() if len(b[0]) == 16 else (2,))
  with pytest.raises(
    TypeError, match=r"loss_fn on batches\[2\] must return a real floating-point scalar"
  ):
    hessian.hessian_operator(vector, params, batches=batches)


def test_one_batch_passed_as_batches_is_told_to_use_batch():
  # batches=(x, y) reads x and y as two batches; the errors said nothing of batch=(x, y).
  params, (x, y) = mlp()
  hint = r"parts of one batch, e.g. \(x, y\), pass it as batch=\(x, y\)"
  with pytest.raises(ValueError, match=r"leaf at batches\[1\] has shape .*" + hint):
    hessian.hessian_operator(mlp_loss, params, batches=(x, y))
  with pytest.raises(ValueError, match=r"batches\[1\] has the structure .*" + hint):
    hessian.hessian_operator(mlp_loss, params, batches=(x, {"y": y}))
  # Parts of equal shapes pass the check; the loss fails on the bare array x.
  with pytest.raises(ValueError) as e:
    hessian.hessian_operator(mlp_loss, params, batches=(x, x))
  assert "pass it as batch=(x, y)" in "".join(e.value.__notes__)
  # Batches of the same kind that differ get no such hint.
  with pytest.raises(ValueError) as e:
    hessian.hessian_operator(mlp_loss, params, batches=[(x, y), (x[:, :2], y)])
  assert "batch=(x, y)" not in str(e.value)


def test_vector_sizes_are_checked_by_matvec_and_matmat():
  params, batch = mlp()
  op = hessian.hessian_operator(mlp_loss, params, batch)
  with pytest.raises(ValueError, match=r"matvec needs a flat vector of shape \(75,\).*\(74,\)"):
    op.matvec(jnp.ones(74))
  with pytest.raises(ValueError, match=r"matmat needs .*\(b, 75\).*\(2, 76\)"):
    op.matmat(jnp.ones((2, 76)))
  # Cast to the operator's dtype, a complex vector lost its imaginary part (with a warning).
  with pytest.raises(ValueError, match=r"matvec's vector must be real, but it has dtype complex"):
    op.matvec(jnp.ones(75) * (1 + 1j))
  with pytest.raises(ValueError, match=r"matmat's vectors must be real, but it has dtype complex"):
    op.matmat(jnp.ones((2, 75)) * 1j)
  # unravel raised JAX's "axis 0 is out of bounds for array of dimension 0" for a scalar.
  for v in (jnp.asarray(0.5), jnp.ones(74)):
    with pytest.raises(ValueError, match=r"unravel needs a flat vector of shape \(75,\)"):
      op.unravel(v)
  assert jax.vmap(op.unravel)(jnp.ones((2, 75)))["hidden"]["kernel"].shape == (2, 5, 8)


def test_ravel_refuses_a_pytree_unlike_the_params():
  params, batch = mlp()
  op = hessian.hessian_operator(mlp_loss, params, batch)
  transposed = {**params, "hidden": {**params["hidden"], "kernel": params["hidden"]["kernel"].T}}
  with pytest.raises(ValueError, match=r"leaf at \['hidden'\]\['kernel'\] has shape \(8, 5\)"):
    op.ravel(transposed)
  with pytest.raises(ValueError, match=r"lacks the leaves \['hidden'\]\['bias'\]"):
    op.ravel({"a": jnp.ones(75)})
  with pytest.raises(ValueError, match=r"v0 must be a pytree .* lacks the leaves"):
    hessian.top_eigenvalues(op, 1, v0={"a": jnp.ones(75)})
  nan_v0 = jax.tree.map(jnp.ones_like, params)
  nan_v0["hidden"]["bias"] = nan_v0["hidden"]["bias"].at[2].set(jnp.nan)
  with pytest.raises(
    ValueError, match=r"v0 must be finite, got nan at \['hidden'\]\['bias'\]\[2\]"
  ):
    hessian.top_eigenvalues(op, 1, v0=nan_v0)  # was "v0 must be a nonzero vector"


def test_leaf_names_that_would_read_alike_keep_their_full_paths():
  params = {"a/b": jnp.ones(2), "a": {"b": jnp.ones(3)}, "c": jnp.ones(1)}

  def loss(p, batch):
    return jnp.sum(p["a/b"] ** 2) + 5.0 * jnp.sum(p["a"]["b"] ** 2) + batch * jnp.sum(p["c"] ** 2)

  op = hessian.hessian_operator(loss, params, jnp.ones(()))
  assert op.leaf_names == ("['a']['b']", "['a/b']", "c")
  for name, curvature, size in (("['a']['b']", 10.0, 3), ("['a/b']", 2.0, 2)):
    block = op.block(name)
    np.testing.assert_allclose(np.asarray(block.matvec(jnp.ones(size))), curvature * np.ones(size))
  with pytest.raises(ValueError, match="no leaf named 'a/b'"):
    op.block("a/b")


def test_leaf_names_of_boxed_params_read_as_their_dict_keys():
  import flax.linen as nn
  from flax import nnx

  kernel = nn.Partitioned(jnp.full((2, 3), 0.5), names=(None, "mlp"))
  linen = {"Dense_0": {"kernel": kernel, "bias": jnp.zeros(3)}}

  def loss(p, x):
    p = nn.unbox(p)["Dense_0"]
    return jnp.sum((x @ p["kernel"] + p["bias"]) ** 2)

  op = hessian.hessian_operator(loss, linen, jnp.ones((1, 2)))
  # Was "Dense_0/kernel/value": the box's own step, and block("Dense_0/kernel") failed.
  assert op.leaf_names == ("Dense_0/bias", "Dense_0/kernel")
  # d^2/dK_ij dK_kl = 2 x_i x_k [j == l] with x = (1, 1): every row sum is 4.
  np.testing.assert_allclose(np.asarray(op.block("Dense_0/kernel").matvec(jnp.ones(6))), 4.0)
  state = nnx.state(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.Param)
  op = hessian.hessian_operator(lambda s, x: jnp.sum(s["kernel"][...] ** 2) * x, state, 1.0)
  assert op.leaf_names == ("bias", "kernel")


def test_every_analysis_reports_the_products_it_spent():
  # docs/hessian_analysis.md: num_matvecs is what each analysis spent, counted here on the
  # operator's own block product (layer_breakdown: each leaf's eigenvalue, besides the shared
  # probes; power_iteration: besides the k products that measure its residuals).
  params, batch = mlp()
  base = hessian.hessian_operator(mlp_loss, params, batch)
  spent = [0]

  def counted(vs):
    spent[0] += vs.shape[0]
    return base.matmat_fn(vs)

  op = dataclasses.replace(base, matmat_fn=counted)
  p = jax.tree.map(lambda x: jnp.abs(x) + 0.5, params)
  key = jax.random.key(0)
  analyses = {
    "top_eigenvalues": lambda: hessian.top_eigenvalues(op, 3, key=key),
    "hutchinson_trace": lambda: hessian.hutchinson_trace(op, key, max_samples=40),
    "hutchpp_trace": lambda: hessian.hutchpp_trace(op, key, max_samples=40),
    "xtrace": lambda: hessian.xtrace(op, key, 20),
    "hutchinson_diagonal_estimate": lambda: hessian.hutchinson_diagonal_estimate(op, key, 10),
    "xdiag": lambda: hessian.xdiag(op, key, 20),
    "spectral_density": lambda: hessian.spectral_density(op, key, num_probes=3, num_steps=12),
    "track_curvature": lambda: hessian.track_curvature(
      op, None, preconditioner=p, trace_matvecs=6, check_repeated=True
    ),
  }
  for name, run in analyses.items():
    spent[0] = 0
    assert run().num_matvecs == spent[0] > 0, name
  spent[0] = 0
  power = hessian.power_iteration(op, 2, max_iter=30)
  assert spent[0] == power.num_matvecs + 2
  spent[0] = 0
  per_leaf = hessian.layer_breakdown(op, key, num_samples=10)
  assert spent[0] == sum(x.num_matvecs for x in per_leaf.values()) + 10


def test_a_partial_with_a_linen_module_keeps_its_arrays_as_arguments():
  # Partial(loss, model, stats): the unbound module (a frozen dataclass of its configuration) made
  # the Partial static as a whole, hashed by identity, so each measurement's new Partial compiled
  # the product anew with its statistics as constants. A bound module holds variables its equality
  # does not compare: it stays static by identity.
  nn = pytest.importorskip("flax.linen")

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.BatchNorm(use_running_average=True, param_dtype=jnp.float64)(
        nn.Dense(4, param_dtype=jnp.float64)(x)
      )
      return nn.Dense(3, param_dtype=jnp.float64)(jnp.tanh(x))

  params, (x, y) = mlp()
  variables = jax.jit(Net().init)(jax.random.key(0), x)
  # float64 statistics (Flax keeps them in float32), so that no float32 rounding differs between
  # the compiled products and the op-by-op reference.
  variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)

  def loss(model, stats, p, b):
    out = model.apply({"params": p, "batch_stats": stats}, b[0])
    return jnp.mean((out - b[1]) ** 2)

  def measure(shift):
    stats = jax.tree.map(lambda s: s + shift, variables["batch_stats"])
    part = jax.tree_util.Partial(loss, Net(), stats)
    op = hessian.hessian_operator(part, variables["params"], (x, y))
    want = dense_hessian(lambda p, b: loss(Net(), stats, p, b), variables["params"], (x, y))
    return _dense(op), want

  measure(0.0)
  with CompileCounter() as count:
    got, _ = measure(0.5)
  assert count.count == 0  # was 1: the product
  got, want = measure(0.5)
  np.testing.assert_allclose(got, want, atol=1e-13)

  def bound_loss(model, p, b):
    return jnp.mean(
      (model.clone(parent=None).apply({**model.variables, "params": p}, b[0]) - b[1]) ** 2
    )

  for shift in (0.0, 0.7):  # bound to other statistics: another Hessian, not the first's
    stats = jax.tree.map(lambda s, d=shift: s + d, variables["batch_stats"])
    bound = Net().bind({"params": variables["params"], "batch_stats": stats})
    op = hessian.hessian_operator(
      jax.tree_util.Partial(bound_loss, bound), variables["params"], (x, y)
    )
    want = dense_hessian(jax.tree_util.Partial(loss, Net(), stats), variables["params"], (x, y))
    np.testing.assert_allclose(_dense(op), want, atol=1e-13)
