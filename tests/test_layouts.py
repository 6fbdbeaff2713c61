"""Spatial averaging on large-model Flax layouts: stacked layers, axis names, boxed params.

References are NumPy loops over layers and blocks (numpy_reference.block_average)
and hand-written tables of what each leaf of a small model is.
"""

import cProfile
import functools
import pstats
import re
import warnings
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, traverse_util
from numpy_reference import block_average

import adahessian_jax as ah
from adahessian_jax import layout, spatial
from adahessian_jax.hessian._stacks import layer_axes_of

EPS = 1e-4
LAYER_CURVATURE = np.array([1.0, 10.0, 100.0, 1000.0])  # the Hessian diagonal on layers 0-3
lecun = nn.initializers.lecun_normal()
zeros = nn.initializers.zeros


def per_layer_constants(tree):
  """A Hessian diagonal equal to 1, 10, 100, 1000 on layers 0-3 (leading axis) of every leaf."""
  return jax.tree.map(
    lambda x: np.broadcast_to(LAYER_CURVATURE.reshape((4,) + (1,) * (x.ndim - 1)), x.shape), tree
  )


def scan_layers(layer, length=4, partition_name="layers"):
  """``layer`` scanned ``length`` times, its boxed params' stacked axis named
  ``partition_name`` (``None``: left unnamed)."""
  return nn.scan(
    layer,
    variable_axes={"params": 0},
    split_rngs={"params": True},
    length=length,
    metadata_params={nn.PARTITION_NAME: partition_name},
  )


def linen_stack(box, kernel_names=("embed", "mlp"), bias_names=("mlp",)):
  """4 scanned layers: kernel (4, 16, 32) named ('layers', *kernel_names), bias (4, 32)."""

  class Layer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      k = self.param("kernel", box(lecun, kernel_names), (16, 32), jnp.float64)
      b = self.param("bias", box(zeros, bias_names), (32,), jnp.float64)
      return jnp.tanh(x @ k + b)[..., :16], None

  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
      return scan_layers(Layer)(name="layers")(x, None)[0]

  return zero_params(Stack(), np.ones((2, 16)))  # only shapes and names matter here


def nnx_stack(transform, use_bias=True):
  """The same stack from nnx.vmap or nnx.scan with sharding metadata on the variables."""

  class Layer(nnx.Module):
    def __init__(self, rngs):
      self.dense = nnx.Linear(
        16,
        32,
        kernel_init=nnx.with_partitioning(lecun, ("embed", "mlp")),
        bias_init=nnx.with_partitioning(zeros, ("mlp",)),
        use_bias=use_bias,
        param_dtype=jnp.float64,
        rngs=rngs,
      )

  class Model(nnx.Module):
    def __init__(self):
      meta = {nnx.PARTITION_NAME: "layers"}
      if transform == "vmap":
        make = nnx.vmap(Layer, in_axes=0, out_axes=0, transform_metadata=meta)
        self.layers = make(nnx.Rngs(0).split(4))
      else:

        @nnx.split_rngs(splits=4)
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0), transform_metadata=meta)
        def make(carry, rngs):
          return carry, Layer(rngs)

        self.layers = make(0, nnx.Rngs(0))[1]

  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(Model)  # only shapes and names matter: zeros, no initializers run
  nnx.update(model, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), nnx.state(model)))
  return model


@nnx.jit
def nnx_update(optimizer, model, grads, hessian_diag):
  """``optimizer.update`` as one jitted program, not one per operation and leaf shape."""
  optimizer.update(model, grads, hessian_diag=hessian_diag)


def zero_params(module, *inputs):
  """``module.init(key, *inputs)["params"]`` as zeros in their boxes, traced abstractly
  (``jax.eval_shape``): no program compiled, for tests where only shapes, names and boxes
  matter."""
  shapes = jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"]
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def nnx_zero_params(make):
  """The ``nnx.Param`` state (variables) of the NNX module ``make()`` builds, as zeros, built
  abstractly (``nnx.eval_shape``)."""
  state = nnx.state(nnx.eval_shape(make), nnx.Param)
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), state)


def averaged(rules, hessian_diag):
  """``averaged(rules, hessian_diag)`` as one jitted program, not one per operation
  and leaf shape."""
  return jax.jit(functools.partial(spatial.apply_rules, rules))(hessian_diag)


def leaf_values(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def check_layers_kept(averaged):
  for d in leaf_values(averaged):
    for layer, c in enumerate(LAYER_CURVATURE):
      np.testing.assert_array_equal(d[layer], np.full(d.shape[1:], c))


@pytest.mark.parametrize("block_size", [1, 4])
@pytest.mark.parametrize(
  "box,kernel_names,bias_names",
  [
    (nn.with_logical_partitioning, ("embed", "mlp"), ("mlp",)),  # logical names
    (nn.with_partitioning, (None, "model"), ("model",)),  # mesh axis names
  ],
  ids=["logical", "mesh"],
)
def test_linen_scan_stack_keeps_each_layer(box, kernel_names, bias_names, block_size):
  params = linen_stack(box, kernel_names, bias_names)
  kernel = params["layers"]["kernel"]
  assert kernel.value.shape == (4, 16, 32) and kernel.names == ("layers", *kernel_names)
  h = per_layer_constants(params)
  check_layers_kept(averaged(spatial.resolve_rules(None, params, block_size), h))

  # Through the optimizer: the first update is g / (D + eps) with D the averaged |diag|.
  tx = ah.scale_by_adahessian(block_size=block_size)

  @jax.jit  # one program, not one per operation and leaf shape
  def first_update(params, h):
    grads = jax.tree.map(jnp.ones_like, params)
    return tx.update(grads, tx.init(params), params, hessian_diag=h)[0]

  for u in leaf_values(first_update(params, h)):
    want = (1 / (LAYER_CURVATURE + EPS)).reshape((4,) + (1,) * (u.ndim - 1))
    np.testing.assert_allclose(u, np.broadcast_to(want, u.shape), rtol=1e-14)


def test_a_scan_whose_boxes_leave_the_stacked_axis_unnamed_keeps_its_layers_apart():
  """``nn.scan(..., metadata_params={nn.PARTITION_NAME: None})`` boxes the kernel as
  ``(None, "embed", "mlp")``: by its names a 1-D convolution's kernel, averaged across the 4
  layers (a flagged guess), and the Hessian tools' layers were one entry, though the same tree
  unboxed shows the stack by its bias ``(None, "mlp")``. Unnamed leading axes are read like
  unboxed ones; a convolution's unnamed window keeps its names."""

  class Layer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      box = nn.with_logical_partitioning
      k = self.param("kernel", box(lecun, ("embed", "mlp")), (16, 32), jnp.float64)
      b = self.param("bias", box(zeros, ("mlp",)), (32,), jnp.float64)
      conv = self.param("conv", box(lecun, (None, None, "embed", "mlp")), (3, 3, 16, 32))
      return jnp.tanh(x @ k + b + conv[0, 0, 0])[..., :16], None

  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
      return scan_layers(Layer, partition_name=None)(name="blocks")(x, None)[0]

  params = zero_params(Stack(), np.ones((2, 16)))
  assert params["blocks"]["kernel"].names == (None, "embed", "mlp")
  rules = spatial.resolve_rules(None, params, 4)
  check_layers_kept(averaged(rules, per_layer_constants(params)))
  rows = {r.path: r for r in spatial.describe(params, block_size=4).rows}
  assert not rows["['blocks']['kernel']"].ambiguous and not rows["['blocks']['bias']"].ambiguous
  assert rows["['blocks']['kernel']"].names == ("layers", "embed", "mlp")
  assert rows["['blocks']['conv']"].names == ("layers", None, None, "embed", "mlp")
  assert rows["['blocks']['conv']"].rule == spatial.per_layer(spatial.mean_over((0, 1)))
  assert "its unnamed leading axes stacked" in rows["['blocks']['kernel']"].why
  assert layer_axes_of(params) == [(0,), (0,), (0,)]


class _MeshBoxedConvBlock(nn.Module):
  """A residual 3x3 Conv with its bias, boxed with mesh axis names only."""

  @nn.compact
  def __call__(self, x, _=None):
    P, init = nn.with_partitioning, nn.initializers.lecun_normal()
    kernel, bias = P(init, (None, None, None, "model")), P(nn.initializers.zeros, ("model",))
    conv = nn.Conv(8, (3, 3), kernel_init=kernel, bias_init=bias, param_dtype=jnp.float64)
    return x + conv(x), None


class _MeshBoxedModel(nn.Module):
  """:class:`_MeshBoxedConvBlock`, an ``nn.scan`` of 3 of them (axis named ``layers``) and a
  ``DenseGeneral`` query projection ``q`` (4 heads of 2) with its bias, boxed with mesh axis
  names."""

  @nn.compact
  def __call__(self, x):
    x, _ = _MeshBoxedConvBlock()(x)
    meta = {"metadata_params": {nn.PARTITION_NAME: "layers"}}
    x, _ = nn.scan(_MeshBoxedConvBlock, length=3, **_SCANNED, **meta)()(x, None)
    P, init = nn.with_partitioning, nn.initializers.lecun_normal()
    kernel, bias = P(init, (None, "model", None)), P(nn.initializers.zeros, ("model", None))
    q = nn.DenseGeneral(
      (4, 2), kernel_init=kernel, bias_init=bias, param_dtype=jnp.float64, name="q"
    )
    return q(x)


def test_mesh_axis_names_leave_a_kernel_to_the_evidence_of_an_unboxed_one(rng):
  # nn.with_partitioning's mesh axis names ("model", None) carry no role: a Conv_0 kernel (None,
  # None, None, "model") beside its bias, its scanned twin ("layers", None, None, None, "model")
  # and a DenseGeneral kernel (None, "model", None) beside its bias ("model", None) were the
  # rank's guesses, flagged (mean over axis 0 for the query: across its embed inputs), while the
  # same params unboxed are read for sure by their biases and names. Now as unboxed.
  params = zero_params(_MeshBoxedModel(), np.ones((1, 5, 5, 8)))
  boxed = spatial.describe(params, spatial.strict(), block_size=2).rows
  plain = spatial.describe(nn.unbox(params), spatial.strict(), block_size=2).rows
  assert [r.rule for r in boxed] == [r.rule for r in plain]
  rows = {r.path: r for r in boxed}
  assert rows["['_MeshBoxedConvBlock_0']['Conv_0']['bias']"].names == (
    "model",
  )  # its own names where nothing is read
  hessian_diag = jax.tree.map(lambda p: rng.uniform(1.0, 2.0, p.shape), params)
  with warnings.catch_warnings():
    warnings.simplefilter("error", spatial.LayoutGuessWarning)
    got = _nu_after_one_step(ah.scale_by_adahessian(b2=0.5, block_size=2), params, hessian_diag)
  got = traverse_util.flatten_dict(nn.unbox(got), sep="/")
  kernels = 0
  for path, d in traverse_util.flatten_dict(nn.unbox(hessian_diag), sep="/").items():
    d = np.asarray(d)
    if path == "q/kernel":  # (embed, heads, head_dim): blocks of 2 embed inputs
      want = block_average(d, 2, axis=0)
    elif path.endswith("kernel"):  # (*layers, 3, 3, in, out): the mean over the 3x3 window
      window = (d.ndim - 4, d.ndim - 3)
      want = np.broadcast_to(d.mean(axis=window, keepdims=True), d.shape)
    else:
      want = d
    kernels += path.endswith("kernel")
    np.testing.assert_allclose(got[path], want, rtol=1e-12, err_msg=path)
  assert kernels == 3


def test_tensorflow_s_filters_count_as_a_kernel(rng):
  # tf.nn.conv2d's filters (kh, kw, in, out), Flax's kernel layout, kept as a raw param beside its
  # bias: only kernel and w counted as kernel names, so (3, 3, 3, 8) beside (8,) under conv_layer
  # and a 1-D (3, 8, 8) under conv1d were the rank's guesses, flagged, and a filter bank (16, 5)
  # beside its bias (16,) (one bias per filter: its first axis, as a FlaxConv1D kernel's) was
  # blocked across filters. Now each filter's window is averaged, and the bank's taps per filter.
  params = {
    "conv_layer": {"filters": np.zeros((3, 3, 3, 8)), "bias": np.zeros(8)},
    "conv1d": {"filters": np.zeros((3, 8, 8)), "bias": np.zeros(8)},
    "bank": {"filters": np.zeros((16, 5)), "bias": np.zeros(16)},
  }
  hessian_diag = jax.tree.map(lambda p: rng.uniform(1.0, 2.0, p.shape), params)
  with warnings.catch_warnings():
    warnings.simplefilter("error", spatial.LayoutGuessWarning)
    got = _nu_after_one_step(ah.scale_by_adahessian(b2=0.5, block_size=2), params, hessian_diag)
  d = {m: np.asarray(v["filters"]) for m, v in hessian_diag.items()}
  want = {
    "conv_layer": np.broadcast_to(d["conv_layer"].mean((0, 1), keepdims=True), (3, 3, 3, 8)),
    "conv1d": np.broadcast_to(d["conv1d"].mean(0, keepdims=True), (3, 8, 8)),
    "bank": block_average(d["bank"], 2, axis=1),
  }
  for module, w in want.items():
    np.testing.assert_allclose(got[module]["filters"], w, rtol=1e-12, err_msg=module)
    np.testing.assert_allclose(got[module]["bias"], hessian_diag[module]["bias"], rtol=1e-12)


def test_an_unnamed_stacked_axis_is_found_in_leaves_with_an_unnamed_axis_after_their_names():
  # A ConvNeXt block under nn.scan with PARTITION_NAME None: its depthwise kernel (None, "height",
  # "width", None, "embed") (the grouped input axis left unnamed) was taken for named, so its
  # layer scale gamma (None, "embed") got no stack from its relatives and was blocked across the
  # 4 layers as a Dense kernel, unflagged; LoRA's (None, "embed", None) factors were flagged.
  # Read as the same block scanned with the axis named.
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      box = nn.with_logical_partitioning
      names = ("height", "width", None, "embed")
      dw = nn.Conv(8, (3, 3), feature_group_count=8, kernel_init=box(lecun, names), name="dwconv")
      y = nn.Dense(8, kernel_init=box(lecun, ("embed", "mlp")), bias_init=box(zeros, ("mlp",)))
      a = self.param("lora_a", box(lecun, ("embed", None)), (8, 2))
      b = self.param("lora_b", box(zeros, (None, "mlp")), (2, 8))
      gamma = self.param("gamma", box(zeros, ("embed",)), (8,))
      return x + gamma * y(dw(x)) + x @ a @ b, None

  def rows(partition_name):
    class Stack(nn.Module):
      @nn.compact
      def __call__(self, x):
        return scan_layers(Block, partition_name=partition_name)(name="blocks")(x, None)[0]

    shapes = jax.eval_shape(Stack().init, jax.random.key(0), np.ones((1, 5, 5, 8)))["params"]
    return {r.path: r for r in spatial.describe(shapes, block_size=2).rows}

  unnamed, named = rows(None), rows("layers")
  assert [(r.rule, r.ambiguous) for r in unnamed.values()] == [
    (r.rule, r.ambiguous) for r in named.values()
  ]
  assert unnamed["['blocks']['gamma']"].rule == spatial.per_layer(spatial.none())
  assert unnamed["['blocks']['dwconv']['kernel']"].names == (
    ("layers", "height", "width", None, "embed")
  )


def test_an_unnamed_stacked_axis_passes_to_its_relatives_as_in_plain_arrays():
  """With ``{nn.PARTITION_NAME: None}`` a bias-less block's attention shows the stack, but its
  ``LayerNorm`` scale ``(None, "embed")`` and bias-less ``Dense`` kernel ``(None, "embed",
  "mlp")`` did not take it from their relatives, as the same arrays unboxed (an NNX model
  through ``nnx.Optimizer``) do: the kernel was averaged across the 4 layers (a flagged guess)
  and the scale's layers were one for the curvature floor and the Hessian tools."""
  box = nn.with_logical_partitioning

  class Layer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      h = nn.LayerNorm(use_bias=False, scale_init=box(nn.initializers.ones, ("embed",)))(x)
      h = nn.MultiHeadDotProductAttention(
        num_heads=2,
        use_bias=False,
        kernel_init=box(lecun, ("embed", "heads", "kv")),
        out_kernel_init=box(lecun, ("heads", "kv", "embed")),
        name="attn",
      )(h)
      return x + nn.Dense(8, use_bias=False, kernel_init=box(lecun, ("embed", "mlp")), name="up")(
        h
      ), None

  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
      return scan_layers(Layer, partition_name=None)(name="blocks")(x, None)[0]

  params = zero_params(Stack(), np.ones((1, 3, 8)))
  assert params["blocks"]["up"]["kernel"].names == (None, "embed", "mlp")
  rows = {r.path: r for r in spatial.describe(params, block_size=4).rows}
  plain = {r.path: r for r in spatial.describe(nn.unbox(params), block_size=4).rows}
  assert [r.rule for r in rows.values()] == [r.rule for r in plain.values()]
  assert not any(r.ambiguous for r in rows.values())
  up, scale = rows["['blocks']['up']['kernel']"], rows["['blocks']['LayerNorm_0']['scale']"]
  assert up.names == ("layers", "embed", "mlp")
  assert up.rule == spatial.per_layer(spatial.blocks(4, axis=0))
  assert "its unnamed leading axes stacked as in its relative" in scale.why
  assert layer_axes_of(params) == [(0,)] * 6
  check_layers_kept(averaged(spatial.resolve_rules(None, params, 4), per_layer_constants(params)))


def test_a_boxed_conv_whose_spatial_axes_are_unnamed_is_read_by_its_bias():
  """A boxed ``Conv`` kernel ``(None, None, "embed", "mlp")`` beside its bias ``("mlp",)`` was a
  flagged guess (a ``LayoutGuessWarning``), though the same tree unboxed is read as a
  convolution by its bias: the bias shows one layer, so the unnamed axes are its window. Without
  a bias nothing does, and the guess stays flagged."""
  box = nn.with_logical_partitioning

  class Layer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      x = nn.Conv(
        16, (3,), kernel_init=box(lecun, (None, "embed", "mlp")), bias_init=box(zeros, ("mlp",))
      )(x)
      return x, None

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(
        16,
        (3, 3),
        kernel_init=box(lecun, (None, None, "embed", "mlp")),
        bias_init=box(zeros, ("mlp",)),
      )(x)
      x = x.reshape(x.shape[0], -1, 16)
      x = nn.Conv(
        16, (3,), kernel_init=box(lecun, (None, "embed", "mlp")), bias_init=box(zeros, ("mlp",))
      )(x)
      return scan_layers(Layer)(name="blocks")(x, None)[0]

  params = jax.eval_shape(Model().init, jax.random.key(0), np.ones((1, 6, 6, 4)))["params"]
  rows = {r.path: r for r in spatial.describe(params, block_size=4).rows}
  want = {
    "['Conv_0']['kernel']": spatial.mean_over((0, 1)),
    "['Conv_1']['kernel']": spatial.mean_over(0),
    "['blocks']['Conv_0']['kernel']": spatial.per_layer(spatial.mean_over(0)),
  }
  for path, rule in want.items():
    assert rows[path].rule == rule and not rows[path].ambiguous, rows[path]
  assert "beside its bias (16,)" in rows["['Conv_0']['kernel']"].why
  assert rows["['Conv_0']['kernel']"].names == ("spatial", "spatial", "embed", "mlp")
  spatial.resolve_rules(None, params, 4, strict=True)  # nothing left to guess
  # Without the bias, (None, None, "embed", "mlp") could as well be a stack's: still a guess.
  bare = {"Conv_0": {"kernel": params["Conv_0"]["kernel"]}}
  (row,) = spatial.describe(bare, block_size=4).rows
  assert row.rule == spatial.mean_over((0, 1)) and row.ambiguous


def test_without_names_a_stack_is_kept_apart_by_its_bias_else_strict_says_so():
  boxed = linen_stack(nn.with_logical_partitioning)
  plain = nn.unbox(boxed)
  h = per_layer_constants(plain)
  # Unnamed, the kernel (4, 16, 32) has a 1-D Conv kernel's rank; its bias (4, 32) repeats the
  # kernel's leading axis (one layer's bias would be (32,)), so the module is a stack of layers.
  check_layers_kept(averaged(spatial.resolve_rules(None, plain), h))
  row = spatial.describe(plain).rows[1]
  assert row.rule == spatial.per_layer(spatial.blocks(1)) and not row.ambiguous
  assert "bias (4, 32) repeats the kernel's leading axes (4,)" in row.why
  spatial.resolve_rules(None, plain, strict=True)  # nothing left to guess
  # Without its bias nothing tells the stack from a 1-D conv: the rank decides (277.75 on every
  # layer, the mean of 1, 10, 100 and 1000), and strict mode refuses the guess.
  kernel_only = {"layers": {"kernel": plain["layers"]["kernel"]}}
  h_kernel = {"layers": {"kernel": h["layers"]["kernel"]}}
  got = averaged(spatial.resolve_rules(None, kernel_only), h_kernel)
  np.testing.assert_allclose(got["layers"]["kernel"], LAYER_CURVATURE.mean())
  with pytest.raises(ValueError, match=r"1 leaf is ambiguous[\s\S]*\['layers'\]\['kernel'\]"):
    spatial.resolve_rules(None, kernel_only, strict=True)
  with pytest.raises(ValueError, match="ambiguous"):
    ah.scale_by_adahessian(averaging=spatial.strict()).init(kernel_only)
  # Names from the boxes (or their partition specs) restore the per-layer rule.
  for source in (boxed, nn.get_partition_spec(boxed)):
    rules = spatial.resolve_rules(spatial.named(source), kernel_only)
    check_layers_kept(averaged(rules, h_kernel))
  # And so does the explicit modifier.
  rules = spatial.resolve_rules(spatial.per_layer(spatial.flax_default(4)), kernel_only)
  check_layers_kept(averaged(rules, h_kernel))


def test_stacked_bias_is_not_blocked_along_the_layer_axis(rng):
  params = linen_stack(nn.with_logical_partitioning)
  bias = rng.random((4, 32))
  h = jax.tree.map(lambda x: np.zeros(x.shape), params)
  h["layers"]["bias"] = h["layers"]["bias"].replace_boxed(bias)
  got = averaged(spatial.resolve_rules(None, params, block_size=4), h)
  np.testing.assert_array_equal(got["layers"]["bias"].value, bias)  # rank 1 per layer: none
  # Unnamed, the same (layers, features) leaf is still a Flax 'bias': none, not blocks of layers.
  plain = averaged(spatial.resolve_rules(None, nn.unbox(params), 4), nn.unbox(h))
  np.testing.assert_array_equal(plain["layers"]["bias"], bias)


@pytest.mark.parametrize("transform", ["vmap", "scan"])
def test_nnx_stacks_keep_each_layer(transform):
  model = nnx_stack(transform)
  state = nnx.state(model, nnx.Param)
  assert layout.names_by_path(state) == {
    "['layers']['dense']['bias']": ("layers", "mlp"),
    "['layers']['dense']['kernel']": ("layers", "embed", "mlp"),
  }
  # Resolved on the state of variables, the names are read directly.
  h = per_layer_constants(state)
  check_layers_kept(averaged(spatial.resolve_rules(None, state, 4), h))

  # nnx.Optimizer hands the transform plain arrays: the names come through spatial.named.
  before = nnx.as_pure(nnx.state(model, nnx.Param))
  tx = ah.scale_by_adahessian(block_size=4, averaging=spatial.named(state))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  grads = jax.tree.map(np.ones_like, state)  # variables, as nnx.grad returns them
  nnx_update(optimizer, model, grads, per_layer_constants(before))
  after = nnx.as_pure(nnx.state(model, nnx.Param))
  for step in leaf_values(jax.tree.map(np.subtract, after, before)):
    want = (1 / (LAYER_CURVATURE + EPS)).reshape((4,) + (1,) * (step.ndim - 1))
    np.testing.assert_allclose(step, np.broadcast_to(want, step.shape), rtol=1e-12)


def test_nnx_optimizer_without_names_keeps_layers_by_the_bias_else_strict_refuses():
  # nnx.Optimizer hands the transform plain arrays; the Linear's bias (4, 32) still tells the
  # stack of kernels (4, 16, 32) from a 1-D conv, so even strict mode keeps each layer alone.
  model = nnx_stack("vmap")
  tx = ah.scale_by_adahessian(block_size=4, averaging=spatial.strict())
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  before = nnx.as_pure(nnx.state(model, nnx.Param))
  grads = jax.tree.map(np.ones_like, nnx.state(model, nnx.Param))
  nnx_update(optimizer, model, grads, per_layer_constants(before))
  after = nnx.as_pure(nnx.state(model, nnx.Param))
  for step in leaf_values(jax.tree.map(np.subtract, after, before)):
    want = (1 / (LAYER_CURVATURE + EPS)).reshape((4,) + (1,) * (step.ndim - 1))
    np.testing.assert_allclose(step, np.broadcast_to(want, step.shape), rtol=1e-12)
  # Without a bias nothing does: strict mode refuses the rank's guess.
  model = nnx_stack("vmap", use_bias=False)
  optimizer = nnx.Optimizer(
    model, ah.scale_by_adahessian(averaging=spatial.strict()), wrt=nnx.Param
  )
  plain = nnx.as_pure(nnx.state(model, nnx.Param))
  with pytest.raises(ValueError, match=r"\['layers'\]\['dense'\]\['kernel'\]: shape \(4, 16, 32\)"):
    nnx_update(optimizer, model, nnx.state(model, nnx.Param), plain)


# A small model with every kind of leaf, axes named as a pods-style codebase names them.
P = nn.with_logical_partitioning


class MLPLayer(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    dense = nn.Dense(
      8,
      kernel_init=P(lecun, ("embed", "mlp")),
      bias_init=P(zeros, ("mlp",)),
      param_dtype=jnp.float64,
    )
    return x + jnp.tanh(dense(x)), None


class TinyLM(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(
      11,
      8,
      embedding_init=P(nn.initializers.normal(1.0), ("vocab", "embed")),
      param_dtype=jnp.float64,
    )(tokens)
    x = nn.Conv(
      8,
      (3,),
      kernel_init=P(lecun, ("width", "embed", "mlp")),
      bias_init=P(zeros, ("mlp",)),
      param_dtype=jnp.float64,
    )(x)
    x = nn.MultiHeadDotProductAttention(
      2,
      qkv_features=8,
      kernel_init=P(lecun, ("embed", "heads", "kv")),
      out_kernel_init=P(lecun, ("heads", "kv", "embed")),
      bias_init=P(zeros, ("heads", "kv")),
      out_bias_init=P(zeros, ("embed",)),
      param_dtype=jnp.float64,
    )(x)
    x = scan_layers(MLPLayer, 3)(name="stack")(x, None)[0]
    return nn.Dense(
      11,
      kernel_init=P(lecun, ("embed", "vocab")),
      bias_init=P(zeros, ("vocab",)),
      param_dtype=jnp.float64,
    )(x)


ATTN = "['MultiHeadDotProductAttention_0']"
QKV = [f"{ATTN}['{n}']" for n in ("query", "key", "value")]
# What each leaf is, and the rule for block size 3, written from Flax's layouts.
EXPECTED = {
  "['Embed_0']['embedding']": ((11, 8), spatial.blocks(3, axis=1)),  # rows (tokens) apart
  "['Conv_0']['kernel']": ((3, 8, 8), spatial.mean_over(0)),  # over the width
  "['Conv_0']['bias']": ((8,), spatial.none()),
  **{f"{q}['kernel']": ((8, 2, 4), spatial.blocks(3, axis=0)) for q in QKV},  # embed inputs
  **{f"{q}['bias']": ((2, 4), spatial.none()) for q in QKV},
  f"{ATTN}['out']['kernel']": ((2, 4, 8), spatial.blocks(3, axis=1)),  # head_dim inputs per head
  f"{ATTN}['out']['bias']": ((8,), spatial.none()),
  "['stack']['Dense_0']['kernel']": ((3, 8, 8), spatial.per_layer(spatial.blocks(3))),
  "['stack']['Dense_0']['bias']": ((3, 8), spatial.per_layer(spatial.none())),
  "['Dense_0']['kernel']": ((8, 11), spatial.blocks(3, axis=0)),  # unembedding: embed inputs
  "['Dense_0']['bias']": ((11,), spatial.none()),
}
#: Leaves of names of one's own added to the unboxed model: their rules are guesses.
AMBIGUOUS_UNNAMED = {
  "['adapters']['kernel']": (4, 8, 8),  # a stack of 4 Dense kernels, or a 1-D Conv of width 4?
  "['w_embed']": (8, 11),  # a table (rows apart), or a kernel (in, out) so named?
}


def numpy_average(path, d):
  """The expected averaging of one leaf, by NumPy loops."""
  shape, rule = EXPECTED[path]
  assert d.shape == shape
  if rule == spatial.none():
    return d
  if rule == spatial.mean_over(0):
    return np.broadcast_to(d.mean(axis=0, keepdims=True), d.shape)
  if rule == spatial.per_layer(spatial.none()):
    return d
  if rule == spatial.per_layer(spatial.blocks(3)):
    return np.stack([block_average(layer, 3, axis=0) for layer in d])
  return block_average(d, 3, axis=rule.axis)


@pytest.fixture(scope="module")
def tiny_lm():
  """Shapes (jax.ShapeDtypeStruct) in their boxes: the listing needs no values."""
  tokens = np.zeros((2, 5), np.int32)
  return jax.eval_shape(TinyLM().init, jax.random.key(0), tokens)["params"]


def test_describe_lists_every_kind_of_leaf(tiny_lm, rng):
  listing = spatial.describe(tiny_lm, block_size=3)
  rows = {r.path: r for r in listing.rows}
  assert sorted(rows) == sorted(EXPECTED)
  for path, (shape, rule) in EXPECTED.items():
    row = rows[path]
    assert row.shape == shape and row.rule == rule and not row.ambiguous, row
    assert sum(size * count for size, count in row.groups.items()) == np.prod(shape)
  assert rows["['stack']['Dense_0']['kernel']"].names == ("layers", "embed", "mlp")
  assert "stacked axis 0 ('layers') kept apart" in rows["['stack']['Dense_0']['kernel']"].why
  # Group sizes by hand: 8 = 3 + 3 + 2 along the blocked axis.
  assert rows["['Embed_0']['embedding']"].groups == {3: 11 * 2, 2: 11}
  assert rows["['Conv_0']['kernel']"].groups == {3: 64}
  assert rows["['stack']['Dense_0']['kernel']"].groups == {3: 3 * 2 * 8, 2: 3 * 8}
  assert rows[f"{ATTN}['out']['kernel']"].groups == {3: 2 * 8, 1: 2 * 8}
  text = str(listing)
  assert len(text.splitlines()) == len(EXPECTED) + 2
  assert "per_layer(blocks(3, axis=0), axes=(0,))" in text and "groups (count x size)" in text

  # The rules the optimizer resolves do what the listing says (NumPy loops).
  d = jax.tree.map(lambda x: rng.random(x.shape), nn.unbox(tiny_lm))
  boxed_d = jax.tree.map(
    lambda box, x: box.replace_boxed(x),
    tiny_lm,
    d,
    is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned),
  )
  got = averaged(spatial.resolve_rules(None, tiny_lm, 3), boxed_d)
  for info, want in zip(layout.leaves(got), layout.leaves(d), strict=True):
    path = jax.tree_util.keystr(info.path)
    np.testing.assert_allclose(info.leaf, numpy_average(path, np.asarray(want.leaf)), rtol=1e-14)


def test_strict_mode_names_every_ambiguous_leaf(tiny_lm):
  plain = nn.unbox(tiny_lm)
  listing = spatial.describe(plain, block_size=3)
  assert not listing.ambiguous  # Flax's own names and shapes settle every leaf
  # The attention projections are told by their module names and shapes: the boxed rules.
  rows = {r.path: r for r in listing.rows}
  for path in [f"{q}['kernel']" for q in QKV] + [f"{ATTN}['out']['kernel']"]:
    assert rows[path].rule == EXPECTED[path][1], rows[path]
    assert "an attention projection" in rows[path].why
  # The scanned Dense is told by Linen's name for it and by its bias (3, 8), the Conv by its
  # name and its bias (8,): the boxed rules.
  for path in ("['stack']['Dense_0']['kernel']", "['stack']['Dense_0']['bias']"):
    assert rows[path].rule == EXPECTED[path][1], rows[path]
    assert "Linen's name 'Dense_0' makes it a Dense" in rows[path].why
  assert rows["['Conv_0']['kernel']"].rule == EXPECTED["['Conv_0']['kernel']"][1]
  assert "by its module's name 'Conv_0': a Conv kernel" in rows["['Conv_0']['kernel']"].why
  # Leaves of names of one's own whose layout nothing shows: strict mode names every one.
  odd = {
    **plain,
    "adapters": {"kernel": jax.ShapeDtypeStruct((4, 8, 8), jnp.float32)},
    "w_embed": jax.ShapeDtypeStruct((8, 11), jnp.float32),
  }
  with pytest.raises(ValueError, match="2 leaves are ambiguous") as err:
    spatial.describe(odd, block_size=3, strict=True)
  guesses = spatial.describe(odd, block_size=3).ambiguous
  assert {r.path: r.shape for r in guesses} == AMBIGUOUS_UNNAMED
  # Each with the reason its rule is a guess (the rank-2 table's is its name, not its rank).
  for r in guesses:
    assert f"{r.path}: shape {r.shape}, axis names None: {r.why}" in str(err.value)
  # Boxed: nothing to refuse; unboxed with the names given: the same rules as boxed.
  spatial.resolve_rules(spatial.strict(), tiny_lm, 3)
  named = spatial.describe(plain, spatial.strict(spatial.named(nn.get_partition_spec(tiny_lm))), 3)
  assert [r.rule for r in named.rows] == [r.rule for r in spatial.describe(tiny_lm, None, 3).rows]

  # Explicit rules for the ambiguous leaves satisfy strict mode too.
  def explicit(path, leaf):
    key = jax.tree_util.keystr(path)
    if key == "['Conv_0']['kernel']":
      return spatial.mean_over(0)
    if key == "['Embed_0']['embedding']":  # the default's guess, given explicitly
      return spatial.blocks(3, axis=1)
    if key.startswith("['stack']"):  # kernels and biases, one layer at a time
      return spatial.per_layer(spatial.flax_default(3))
    return None

  rows = spatial.describe(plain, spatial.strict(explicit), 3).rows
  assert [r.rule for r in rows] == [r.rule for r in spatial.describe(tiny_lm, None, 3).rows]


def test_axis_roles_can_be_changed():
  d = np.arange(24.0).reshape(2, 3, 4)
  rule = spatial.flax_default(axis_roles={"depth": "stacked"}).bind(("depth", "embed", "mlp"))
  assert rule.explain(d.shape).rule == spatial.per_layer(spatial.blocks(1))
  np.testing.assert_array_equal(rule(d), d)
  forget = spatial.flax_default(axis_roles={"width": None}).bind(("width", "embed", "mlp"))
  assert forget.explain(d.shape).ambiguous
  with pytest.raises(ValueError, match=r"axis_roles\['depth'\] is 'layer'"):
    spatial.flax_default(axis_roles={"depth": "layer"})


def test_named_errors_name_the_problem():
  plain = {"w": np.zeros((2, 3, 4))}
  with pytest.raises(ValueError, match="without axis names"):
    spatial.named(plain)
  names = spatial.named({"v": jax.sharding.PartitionSpec("layers", None, None)})
  with pytest.raises(ValueError, match=r"no entry for the leaf at \['w'\]"):
    spatial.resolve_rules(names, plain)
  too_long = spatial.named({"w": jax.sharding.PartitionSpec("layers", None, None, "mlp")})
  with pytest.raises(
    ValueError, match=r"\('layers', None, None, 'mlp'\) of the leaf at \['w'\] have 4"
  ):
    spatial.resolve_rules(too_long, plain)


def test_an_empty_partition_spec_names_nothing_and_a_short_one_is_refused():
  # P() is what nn.get_partition_spec gives a leaf without a box: no names, not a rank mismatch.
  plain = {"w": np.zeros((2, 3, 4)), "scale": np.zeros(4)}
  specs = {
    "w": jax.sharding.PartitionSpec("layers", None, None),
    "scale": jax.sharding.PartitionSpec(),
  }
  rows = spatial.describe(plain, spatial.named(specs), block_size=3).rows
  assert [r.names for r in rows] == [None, ("layers", None, None)]  # leaves in key order
  assert rows[1].rule == spatial.per_layer(spatial.blocks(3))
  # Names go by position; one short is also what a stale stack carries, so it is not padded.
  short = spatial.named({"w": jax.sharding.PartitionSpec("embed", "mlp"), "scale": specs["scale"]})
  with pytest.raises(
    ValueError, match=r"have 2 entries, but its shape \(2, 3, 4\) has rank 3\. Names one short"
  ):
    spatial.describe(plain, short, block_size=3)


class HandStacked(nn.Module):
  """Boxed params as Linen's init returns them: a stack of 3 layers (logical names) by hand."""

  @nn.compact
  def __call__(self, x):
    k = self.param("kernel", P(lecun, ("layers", "embed", "mlp")), (3, 4, 4), jnp.float64)
    b = self.param("bias", P(zeros, ("layers", "mlp")), (3, 4), jnp.float64)
    for layer in range(3):
      x = jnp.tanh(x @ k[layer] + b[layer])
    head = nn.Dense(
      2,
      kernel_init=P(lecun, ("embed", "vocab")),
      bias_init=P(zeros, ("vocab",)),
      param_dtype=jnp.float64,
    )
    return head(x)


@pytest.mark.parametrize("route", ["closure", "fused"])
def test_boxed_params_end_to_end_equal_the_unboxed_run(route):
  r = np.random.default_rng(1)
  x, y = r.normal(size=(6, 4)), r.normal(size=(6, 2))
  boxed = jax.jit(HandStacked().init)(jax.random.key(0), x)["params"]
  plain = nn.unbox(boxed)

  def loss_fn(params, batch):
    xb, yb = batch
    return jnp.mean((HandStacked().apply({"params": params}, xb) - yb) ** 2)

  def run(params, averaging):
    tx = ah.adahessian(0.05, block_size=3, update_freq=2, weight_decay=1e-3, averaging=averaging)
    state = jax.jit(tx.init)(params)
    vgh = ah.value_grad_and_hessian_diag(loss_fn)

    @jax.jit
    def step(params, state):
      if route == "closure":
        grads = jax.grad(loss_fn)(params, (x, y))
        extra = {"value_fn": lambda p: loss_fn(p, (x, y))}
      else:
        _, grads, hdiag = vgh(params, state, (x, y))
        extra = {"hessian_diag": hdiag}
      updates, state = tx.update(grads, state, params, **extra)
      return optax.apply_updates(params, updates), state, updates

    history = []
    for _ in range(3):
      params, state, updates = step(params, state)
      history.append(updates)
    return state, history

  boxed_state, boxed_updates = run(boxed, None)
  plain_state, plain_updates = run(plain, spatial.named(boxed))
  for b, p in zip(boxed_updates, plain_updates, strict=True):
    assert jax.tree.structure(b) == jax.tree.structure(boxed)  # still boxed
    for u, v in zip(leaf_values(b), leaf_values(p), strict=True):
      np.testing.assert_array_equal(u, v)
  assert optax.tree.norm(plain_updates[-1]) > 0
  # Without the names, the bias (3, 4) repeating the kernel's leading axis says it is a stack.
  unnamed = {r.path: r.rule for r in spatial.describe(plain, None, 3).rows}
  assert unnamed["['kernel']"] == spatial.per_layer(spatial.blocks(3))
  assert unnamed["['bias']"] == spatial.per_layer(spatial.none())

  # The state carries the params' metadata: its moments shard like the params.
  inner = ah.find_adahessian_state(boxed_state)
  for field in (inner.mu, inner.nu, inner.hessian):
    assert jax.tree.structure(field) == jax.tree.structure(boxed)
  specs = ah.find_adahessian_state(nn.get_partition_spec(boxed_state))
  param_specs = nn.get_partition_spec(boxed)
  assert specs.mu == param_specs and specs.nu == param_specs and specs.hessian == param_specs
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("model",))
  rules = (("mlp", "model"), ("layers", None), ("embed", None), ("vocab", None))
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_state), mesh, rules)
  placed = jax.device_put(boxed_state, shardings)
  kernel = ah.find_adahessian_state(placed).mu["kernel"]
  assert kernel.value.sharding.spec == jax.sharding.PartitionSpec(None, None, "model")


def test_boxed_state_with_unboxed_params_says_which_has_the_box():
  # init on boxed params, update with nn.unbox'ed ones: the same leaves, one tree boxed.
  boxed = zero_params(HandStacked(), np.ones((1, 4)))
  plain = nn.unbox(boxed)
  tx = ah.adahessian(0.1)
  box = r"a Flax metadata box \(nn.Partitioned, nn.LogicallyPartitioned\) or NNX variable"
  with pytest.raises(
    ValueError,
    match=rf"params tree .* plain array at \['Dense_0'\]\['bias'\], "
    rf"where the state's parameter tree has {box} \(box both or neither: nn.unbox",
  ):
    tx.update(plain, tx.init(boxed), plain, hessian_diag=plain)
  with pytest.raises(ValueError, match=rf"hessian_diag .* has {box} at \['Dense_0'\]\['bias'\]"):
    tx.update(plain, tx.init(plain), plain, hessian_diag=boxed)


def test_the_guide_shows_what_describe_prints():
  import pathlib

  from _markdown import blocks, python_blocks

  guide = (pathlib.Path(__file__).parent.parent / "docs" / "layouts.md").read_text()
  namespace = {}
  exec(python_blocks(guide)[0].replace("print(", "str("), namespace)  # the model and listing
  listing = namespace["listing"]
  table, why = [b.code for b in blocks(guide) if b.language == "text"][:2]
  assert table == listing.table(why=False) + "\n"
  out = "['blocks']['MultiHeadDotProductAttention_0']['out']['kernel']"
  assert why == next(r.why for r in listing.rows if r.path == out) + "\n"


def _nu_after_one_step(tx, params, hessian_diag):
  """``sqrt(nu / (1 - b2))`` after one update: the averaged |D| the state took (b2 = 0.5)."""

  @jax.jit  # one program, not one per operation and leaf shape
  def nu(params, hessian_diag):
    grads = jax.tree.map(jnp.ones_like, params)
    _, state = tx.update(grads, tx.init(params), params, hessian_diag=hessian_diag)
    return ah.find_adahessian_state(state).nu

  return jax.tree.map(lambda v: np.sqrt(np.asarray(v) / 0.5), nu(params, hessian_diag))


class ScannedBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    kernel = P(lecun, ("embed", "mlp"))  # boxed; the LayerNorm and the bias are not
    return nn.Dense(4, kernel_init=kernel)(nn.LayerNorm()(x)), None


@pytest.mark.parametrize("nested", [False, True])
def test_unboxed_leaves_of_a_named_stack_are_kept_per_layer(nested):
  # nn.scan names the stacked axis of boxed params only: the LayerNorm scale and the Dense bias
  # come out as plain (layers, features) arrays, which by rank look like Dense kernels.
  params = zero_params(scan_layers(ScannedBlock)(), np.ones((1, 4)), None)
  if nested:  # the stack under a key, beside an unboxed head of another shape
    params = {"blocks": params, "head": {"kernel": np.zeros((4, 3)), "bias": np.zeros(3)}}
  plain = nn.unbox(params)
  per_layer = per_layer_constants(np.zeros((4, 4)))
  hessian_diag = jax.tree.map(np.ones_like, plain)
  ln = hessian_diag["blocks"]["LayerNorm_0"] if nested else hessian_diag["LayerNorm_0"]
  ln["scale"] = per_layer
  tx = ah.scale_by_adahessian(b2=0.5, block_size=2, averaging=spatial.named(params))
  nu = _nu_after_one_step(tx, plain, hessian_diag)
  got = nu["blocks"]["LayerNorm_0"]["scale"] if nested else nu["LayerNorm_0"]["scale"]
  np.testing.assert_allclose(got, per_layer, rtol=1e-6)  # rank 1 per layer: nothing averaged
  listing = spatial.describe(plain, spatial.named(params), 2)
  rows = {r.path: r for r in listing.rows}
  scale = rows["['blocks']['LayerNorm_0']['scale']" if nested else "['LayerNorm_0']['scale']"]
  assert scale.names == ("layers", None)
  assert "stacked axes taken from its named relative" in scale.why
  # With the stack under a key, its leaves' inference is sure. At the root the LayerNorm shares
  # no module with the named kernel, a guess, but a scale or bias is averaged by no rule, stacked
  # or not: nothing for strict mode to refuse (test_an_unnamed_leaf_between_... has a leaf
  # where it matters). The head shares no key with the stack and, though its kernel has the
  # stack's 4 rows, its bias has not: the root, which holds both, is no stack, and the kernel is
  # a Dense kernel.
  assert listing.ambiguous == ()
  if nested:
    assert rows["['head']['kernel']"].rule == spatial.blocks(2)
  spatial.describe(plain, spatial.strict(spatial.named(params)), 2)


class ConvThenScannedBlocks(nn.Module):
  """A 3x3 Conv stem, then 3 scanned blocks: the stem's kernel (3, 3, 3, 8) has the stack's 3
  rows and a boxed stack holds the only named leaves."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (3, 3))(x).mean(axis=(1, 2))
    return scan_layers(ScannedBlock, length=3)()(x[:, :4], None)[0]


class Wrapped(nn.Module):
  @nn.compact
  def __call__(self, x):
    return ConvThenScannedBlocks()(x)


@pytest.mark.parametrize("model", [ConvThenScannedBlocks, Wrapped])
def test_a_conv_kernel_beside_a_stack_of_its_height_keeps_its_spatial_average(model):
  # Its nearest named relatives (the stack's kernel) shared the root, or the wrapper module, with
  # it, and its axis 0 had the stack's size, so it was taken for a stack of 3 and averaged over
  # its width alone, per row: groups of 3 instead of the 3x3 window. The Conv's bias (8,) has no
  # such axis, so the module holding both is no stack (a transform stacks every leaf under it).
  params = zero_params(model(), np.ones((1, 5, 5, 3)))
  plain = nn.unbox(params)
  hessian_diag = jax.tree.map(lambda x: np.random.default_rng(x.size).uniform(1, 2, x.shape), plain)
  tx = ah.scale_by_adahessian(b2=0.5, averaging=spatial.named(params))
  nu = _nu_after_one_step(tx, plain, hessian_diag)
  inner = (lambda t: t["ConvThenScannedBlocks_0"]) if model is Wrapped else (lambda t: t)
  d = np.asarray(inner(hessian_diag)["Conv_0"]["kernel"])
  want = np.broadcast_to(d.mean(axis=(0, 1), keepdims=True), d.shape)
  np.testing.assert_allclose(inner(nu)["Conv_0"]["kernel"], want, rtol=1e-6)
  # The stack's unboxed leaves still take its stacked axis: nothing averaged across layers.
  ln = np.asarray(inner(hessian_diag)["ScanScannedBlock_0"]["LayerNorm_0"]["scale"])
  np.testing.assert_allclose(inner(nu)["ScanScannedBlock_0"]["LayerNorm_0"]["scale"], ln, rtol=1e-6)
  rows = {r.path: r for r in spatial.describe(plain, spatial.named(params)).rows}
  prefix = "['ConvThenScannedBlocks_0']" if model is Wrapped else ""
  # Its names are a Conv kernel's (Linen's name 'Conv_0' and its bias (8,)), not the stack's.
  assert rows[f"{prefix}['Conv_0']['kernel']"].names == ("spatial", "spatial", None, None)
  assert rows[f"{prefix}['ScanScannedBlock_0']['LayerNorm_0']['scale']"].names == ("layers", None)


class _ScaledDense(nn.Module):
  """An unboxed Dense and an unboxed layer scale ``gamma`` (4,): no names of their own."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(4, name="proj")(x) * self.param("gamma", nn.initializers.ones, (4,))


class _StageOfLayers(nn.Module):
  """A stage of a stack of stacks: 2 scanned layers (boxed), then an unboxed Dense and scale."""

  @nn.compact
  def __call__(self, x, _):
    return _ScaledDense(name="out")(
      scan_layers(ScannedBlock, length=2)(name="inner")(x, None)[0]
    ), None


class _MoEBlock(nn.Module):
  """A block whose only boxed params are a mixture's experts (exp, embed, mlp)."""

  @nn.compact
  def __call__(self, x, _):
    wi = self.param("wi", P(lecun, ("exp", "embed", "mlp")), (2, 4, 4))
    return _ScaledDense(name="out")(jnp.einsum("bd,edm->bm", x, wi)), None


class _BlocksOf(nn.Module):
  block: type

  @nn.compact
  def __call__(self, x):
    return scan_layers(self.block)(name="blocks")(x, None)[0]


@pytest.mark.parametrize("block", [_StageOfLayers, _MoEBlock])
def test_unboxed_leaves_beside_a_deeper_stack_are_kept_per_layer(block):
  # 4 scanned blocks; the block's named leaves are stacked twice, by the outer scan and by an
  # inner scan or the experts, so they disagreed with the block's own unboxed leaves, which have
  # the outer axis only: those were read by rank, the Dense kernel (4, 4, 4) averaged across
  # layers as a 1-D Conv kernel and the scale (4, 4) in blocks of 2 layers.
  model = _BlocksOf(block)
  params = jax.eval_shape(model.init, jax.random.key(0), np.ones((1, 4)))["params"]
  plain = jax.tree.map(lambda s: np.zeros(s.shape, jnp.float64), nn.unbox(params))
  hessian_diag = per_layer_constants(plain)
  tx = ah.scale_by_adahessian(b2=0.5, block_size=2, averaging=spatial.named(params))
  nu = _nu_after_one_step(tx, plain, hessian_diag)
  for path in (("out", "proj", "kernel"), ("out", "gamma")):
    got, want = nu["blocks"], hessian_diag["blocks"]
    for key in path:
      got, want = got[key], want[key]
    np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=str(path))  # constant per layer
  rows = {r.path: r for r in spatial.describe(plain, spatial.named(params), 2).rows}
  kernel = rows["['blocks']['out']['proj']['kernel']"]
  assert kernel.names == ("layers", None, None) and not kernel.ambiguous
  assert kernel.rule == spatial.per_layer(spatial.blocks(2))
  assert rows["['blocks']['out']['gamma']"].rule == spatial.per_layer(spatial.none())
  # The per-layer Hessian analyses read the same layers.
  axes = dict(zip(rows, layer_axes_of(params), strict=True))
  assert axes["['blocks']['out']['proj']['kernel']"] == axes["['blocks']['out']['gamma']"] == (0,)


def test_an_unnamed_leaf_between_a_stack_and_other_named_leaves_is_ambiguous():
  params = {
    "stack": nn.LogicallyPartitioned(np.zeros((4, 8, 8)), ("layers", "embed", "mlp")),
    "embed": nn.LogicallyPartitioned(np.zeros((10, 8)), ("vocab", "embed")),
    "gamma": np.zeros((4, 8)),  # stacked, or a Dense kernel (4, 8)? its relatives disagree
    "scale": np.zeros((4, 8)),  # the same question, but a 'scale' is never averaged
  }
  assert [r.path for r in spatial.describe(params, block_size=2).ambiguous] == ["['gamma']"]
  with pytest.raises(ValueError, match=r"1 leaf is ambiguous[\s\S]*\['gamma'\]: shape \(4, 8\)"):
    spatial.describe(params, spatial.strict(), block_size=2)


@pytest.mark.parametrize(
  "averaging,names",
  [
    (spatial.per_layer(spatial.flax_default()), ("stage", "layers", "embed", "mlp")),
    (spatial.per_layer(spatial.per_layer(spatial.none())), None),
    (spatial.per_layer(spatial.none(), 2), None),
  ],
)
def test_the_curvature_floor_is_per_layer_under_nested_stacks(averaging, names):
  d = (10.0 ** np.arange(4)).reshape(2, 2, 1, 1) * np.ones((2, 2, 3, 4))
  box = (lambda x: nn.LogicallyPartitioned(x, names)) if names else (lambda x: x)
  params = {"w": box(np.zeros((2, 2, 3, 4)))}
  tx = ah.scale_by_adahessian(b2=0.5, curvature_floor=0.5, averaging=averaging)
  got = _nu_after_one_step(tx, params, {"w": box(d)})["w"]
  got = got.value if names else got
  # Each (stage, layer) slice's own mean is its constant value, so no floor rises above it.
  np.testing.assert_allclose(got, d, rtol=1e-6)


@pytest.mark.parametrize(
  "make,message",
  [
    (
      lambda: spatial.blocks(2, axis=1.9),
      r"axis must be an integer \(an axis of the leaf\), got 1.9",
    ),
    (
      lambda: spatial.mean_over(["0"]),
      r"axes\[0\] must be an integer \(an axis of the leaf\), got '0'",
    ),
    (lambda: spatial.mean_over(1.5), "axes must be an integer or a sequence of integers, got 1.5"),
    (lambda: spatial.per_layer(spatial.none(), axes=True), "axes must be an integer or a sequence"),
  ],
)
def test_rule_axes_must_be_integers(make, message):
  with pytest.raises(ValueError, match=message):
    make()


def test_rule_errors_name_the_entry_and_the_slice():
  params = {"stack": {"w": np.ones((2, 3, 4)), "b": np.ones((2, 4))}, "head": np.ones((4, 3))}
  with pytest.raises(ValueError, match=r"no entry for the params' leaves \['stack'\]\['b'\]"):
    spatial.describe(params, {"stack": {"w": spatial.per_layer(spatial.none())}, "head": None})
  with pytest.raises(ValueError, match=r"its entries \['stack'\]\['c'\] are not in the params"):
    spatial.describe(params, {"stack": {"w": None, "b": None, "c": spatial.none()}, "head": None})
  inner_axis = {
    "stack": {"w": spatial.per_layer(spatial.blocks(2, axis=2)), "b": None},
    "head": None,
  }
  with pytest.raises(
    ValueError, match=r"\['stack'\]\['w'\] \(one layer's slice, stacked axes \(0,\)"
  ):
    spatial.describe(params, inner_axis)
  stacked_axis = {
    "stack": {"w": spatial.per_layer(spatial.none(), axes=5), "b": None},
    "head": None,
  }
  with pytest.raises(
    ValueError, match=r"keeps apart stacked axis 5, but the leaf at \['stack'\]\['w'\] has rank 3"
  ):
    spatial.describe(params, stacked_axis)


def _flax_leaf_modules():
  """Unnamed params of Linen and NNX modules whose rank-2 leaves are not (in, out) kernels."""
  linen = {
    "dense_general": (nn.DenseGeneral((4, 3)), np.ones((1, 6))),
    "attention": (nn.MultiHeadDotProductAttention(2, qkv_features=8), np.ones((1, 3, 6))),
    "einsum": (nn.Einsum((3, 4, 5), "abc,cde->abde"), np.ones((1, 2, 3))),
    "embed": (nn.Embed(10, 6), np.ones((1,), np.int32)),
  }
  params = {k: zero_params(m, x) for k, (m, x) in linen.items()}
  nnx_modules = {
    "nnx_linear_general": lambda: nnx.LinearGeneral(6, (4, 3), rngs=nnx.Rngs(0)),
    "nnx_attention": lambda: nnx.MultiHeadAttention(2, 6, 8, decode=False, rngs=nnx.Rngs(0)),
    "nnx_einsum": lambda: nnx.Einsum("abc,cde->abde", (3, 4, 5), (4, 5), rngs=nnx.Rngs(0)),
    "nnx_embed": lambda: nnx.Embed(10, 6, rngs=nnx.Rngs(0)),
  }
  params.update({k: nnx.as_pure(nnx_zero_params(m)) for k, m in nnx_modules.items()})
  return params


def test_flax_biases_and_embedding_rows_are_not_averaged_across_outputs(rng):
  params = _flax_leaf_modules()
  hessian_diag = jax.tree.map(lambda x: rng.random(x.shape), params)
  tx = ah.scale_by_adahessian(b2=0.5, block_size=2)
  got = _nu_after_one_step(tx, params, hessian_diag)
  rows = {r.path: r for r in spatial.describe(params, block_size=2).rows}
  biases = 0
  leaves = jax.tree_util.tree_flatten_with_path(hessian_diag)[0]
  for (path, d), value in zip(leaves, jax.tree.leaves(got), strict=True):
    where, d = jax.tree_util.keystr(path), np.asarray(d)
    if where.endswith("['bias']"):  # (*features), (heads, head_dim), Einsum: one per output
      biases += d.ndim == 2
      np.testing.assert_allclose(value, d, rtol=1e-6)
      assert rows[where].rule == spatial.none() and not rows[where].ambiguous
    elif where.endswith("['embedding']"):  # (num_embeddings, features): each token's row alone
      np.testing.assert_allclose(value, block_average(d, 2, axis=1), rtol=1e-6)
      assert rows[where].rule == spatial.blocks(2, axis=1) and not rows[where].ambiguous
  assert biases == 10  # rank 2: 1 DenseGeneral + 3 attention + 1 Einsum, Linen and NNX
  # Flax's name for a table is no guess; a name of one's own with a word of a table is, with
  # block_size > 1 (a kernel (in, out) could be called so), and not at 1 (nothing averaged).
  spatial.describe(params, block_size=2, strict=True)
  mine = {"w_embed": np.zeros((10, 6))}
  assert spatial.describe(mine, block_size=2).rows[0].rule == spatial.blocks(2, axis=1)
  assert not spatial.describe(mine).ambiguous
  with pytest.raises(ValueError, match=r"\['w_embed'\]: shape \(10, 6\)"):
    spatial.describe(mine, block_size=2, strict=True)


def test_a_scanned_raw_depthwise_kernel_under_a_conv_name_is_a_flagged_guess():
  # Mamba's block scanned: a raw depthwise conv1d kernel (layers, width, channels) beside the
  # in_proj kernel (layers, in, out), a stack of 3 shown by their common first size, and a norm's
  # scale (layers, d). The conv's name made the rank-3 kernel a 1-D Conv (window 3, in 4, out 16):
  # averaged over axis 0, across the layers, unflagged. Now a guess, flagged. A bias-less 1-D
  # Conv_0 beside a stack of 3 elsewhere in the tree (stack, not its relative) stays a Conv.
  z = np.zeros
  mamba = {
    "layers": {
      "norm": {"scale": z((3, 16))},
      "mixer": {"conv1d": {"kernel": z((3, 4, 16))}, "in_proj": {"kernel": z((3, 16, 16))}},
    }
  }
  rows = {r.path: r for r in spatial.describe(mamba, block_size=4).rows}
  assert rows["['layers']['mixer']['conv1d']['kernel']"].ambiguous
  with pytest.warns(spatial.LayoutGuessWarning, match=r"\['conv1d'\]\['kernel'\]"):
    ah.adahessian(0.1, block_size=4).init(mamba)
  conv = {
    "Conv_0": {"kernel": z((3, 8, 8))},
    "Dense_0": {"kernel": z((8, 11)), "bias": z((11,))},
    "stack": {"Dense_0": {"kernel": z((3, 8, 8)), "bias": z((3, 8))}},
  }
  rows = {r.path: r for r in spatial.describe(conv, block_size=4).rows}
  assert rows["['Conv_0']['kernel']"].rule == spatial.mean_over((0,))
  assert not rows["['Conv_0']['kernel']"].ambiguous


def test_a_graph_convolution_is_no_window_over_axes():
  # A graph's "conv" holds a weight per relation (R-GCN), Chebyshev order (ChebConv) or head
  # (GAT) along its first axis: read by its name as a 1-D Conv kernel, it was averaged across
  # them, unflagged. Now the rank's guess, flagged; a Conv_0 beside the same bias stays a Conv.
  z = np.zeros
  graph = {
    "RGCNConv_0": {"kernel": z((5, 16, 32)), "root": z((16, 32)), "bias": z((32,))},
    "ChebConv_0": {"kernel": z((3, 16, 32)), "bias": z((32,))},
    "gat_conv": {"kernel": z((16, 4, 8))},
    "Conv_0": {"kernel": z((3, 16, 32)), "bias": z((32,))},
  }
  rows = {r.path: r for r in spatial.describe(graph, block_size=4).rows}
  for module in ("RGCNConv_0", "ChebConv_0", "gat_conv"):
    assert rows[f"['{module}']['kernel']"].ambiguous, module
  assert rows["['Conv_0']['kernel']"].rule == spatial.mean_over((0,))
  assert not rows["['Conv_0']['kernel']"].ambiguous


def _assert_blocks_of_4(rng, params, axes):
  """``describe(strict=True)`` reads each ``(module, leaf)`` of ``axes`` as blocks of 4 along its
  axis, and the state's |D| after one step is the estimate so averaged."""
  d = jax.tree.map(lambda x: rng.random(x.shape), params)
  got = _nu_after_one_step(ah.scale_by_adahessian(b2=0.5, block_size=4), params, d)
  rows = {r.path: r for r in spatial.describe(params, block_size=4, strict=True).rows}
  for (module, leaf), axis in axes.items():
    assert rows[f"['{module}']['{leaf}']"].rule == spatial.blocks(4, axis=axis), leaf
    want = block_average(d[module][leaf], 4, axis=axis)
    np.testing.assert_allclose(got[module][leaf], want, rtol=1e-6, err_msg=leaf)


def test_transformer_lens_tables_and_a_haiku_codebook_keep_their_rows_apart(rng):
  # TransformerLens's W_E (d_vocab, d_model) is a token table: read by its rank as a Dense kernel,
  # 4 tokens' rows were blocked together, unflagged (its W_pos was a flagged guess). Haiku's
  # VectorQuantizer keeps its codebook `embeddings` (embedding_dim, num_embeddings), a code per
  # column: read as a table, 4 codes were blocked together, unflagged.
  params = {
    "embed": {"W_E": np.zeros((12, 8))},
    "pos_embed": {"W_pos": np.zeros((6, 8))},
    "vector_quantizer": {"embeddings": np.zeros((8, 12))},
  }
  _assert_blocks_of_4(rng, params, {("embed", "W_E"): 1, ("pos_embed", "W_pos"): 1})
  _assert_blocks_of_4(rng, params, {("vector_quantizer", "embeddings"): 0})


def test_a_weight_whose_bias_is_its_last_axis_is_read_input_first(rng):
  # Hugging Face's PyTorch GPT-2 keeps its Conv1D weights (in, out) beside a bias (out,): the name
  # 'weight' read them output axis first, blocks along axis 1 across outputs (a flagged guess).
  # Their bias rules that out: blocks along the input axis 0, no guess. A square c_proj (16, 16)
  # fits both layouts and stays a flagged guess; a Linear (out, in) stays PyTorch's.
  params = {
    "h.0.attn.c_attn.weight": np.zeros((16, 48)),
    "h.0.attn.c_attn.bias": np.zeros((48,)),
    "h.0.attn.c_proj.weight": np.zeros((16, 16)),
    "h.0.attn.c_proj.bias": np.zeros((16,)),
    "h.0.mlp.c_fc.weight": np.zeros((16, 64)),
    "h.0.mlp.c_fc.bias": np.zeros((64,)),
  }
  d = jax.tree.map(lambda x: rng.random(x.shape), params)
  with pytest.warns(spatial.LayoutGuessWarning, match=r"1 leaf is a guess.*\n.*c_proj\.weight"):
    got = _nu_after_one_step(ah.scale_by_adahessian(b2=0.5, block_size=4), params, d)
  rows = {r.path: r for r in spatial.describe(params, block_size=4).rows}
  for key in ("h.0.attn.c_attn.weight", "h.0.mlp.c_fc.weight"):
    row = rows[f"['{key}']"]
    assert row.rule == spatial.blocks(4, axis=0) and not row.ambiguous, key
    np.testing.assert_allclose(got[key], block_average(d[key], 4, axis=0), rtol=1e-6)
  assert rows["['h.0.attn.c_proj.weight']"].ambiguous
  linear = {"linear": {"weight": np.zeros((64, 16)), "bias": np.zeros((64,))}}
  row = spatial.describe(linear, block_size=4, strict=True).rows[-1]
  assert row.rule == spatial.blocks(4, axis=1)


def test_loralib_factors_are_read_output_axis_first(rng):
  # loralib stores a LoRA pair in PyTorch's layout, lora_A (rank, in) and lora_B (out, rank): read
  # by their rank as Dense kernels (in, out), both were blocked along axis 0, across the rank's
  # rows and across outputs, unflagged. The shared size (the rank) shows the layout: blocks along
  # axis 1, each row's inputs. nnx.LoRA's lora_a (in, rank), lora_b (rank, out) stay Flax's.
  params = {
    "c_attn": {
      "weight": np.zeros((48, 16)),
      "bias": np.zeros((48,)),
      "lora_A": np.zeros((4, 16)),
      "lora_B": np.zeros((48, 4)),
    },
    "nnx_lora": {"lora_a": np.zeros((16, 4)), "lora_b": np.zeros((4, 48))},
  }
  axes = {("c_attn", "lora_A"): 1, ("c_attn", "lora_B"): 1}
  _assert_blocks_of_4(rng, params, axes | {("nnx_lora", "lora_a"): 0, ("nnx_lora", "lora_b"): 0})


def test_describe_gives_the_winning_reading_of_a_kernel_alone():
  # A square window beside a bias (out,) reads as a Conv kernel, Linen's name DenseGeneral_3 as a
  # DenseGeneral's; the DenseGeneral reading wins, but describe's why gave both.
  params = {"DenseGeneral_3": {"kernel": np.zeros((4, 4, 8, 16)), "bias": np.zeros(16)}}
  row = spatial.describe(params, block_size=4).rows[-1]
  assert row.rule == spatial.blocks(4, axis=2)
  assert "a DenseGeneral kernel" in row.why and "Conv kernel" not in row.why


class _Gate(nn.Module):
  """An ``nn.Einsum`` of ``spec`` and kernel ``shape`` on a carry it returns (scannable)."""

  spec: str
  shape: tuple[int, ...]

  @nn.compact
  def __call__(self, x, _=None):
    nn.Einsum(self.shape, self.spec)(x)
    return x, None


class _ScannedGates(nn.Module):
  """Three ``"btd,td->btd"`` gates stacked by ``nn.scan`` (Linen names it ``ScanGate_0``)."""

  @nn.compact
  def __call__(self, x):
    nn.scan(_Gate, length=3, **_SCANNED)("btd,td->btd", (4, 6))(x, None)
    return x


def test_an_einsum_kernel_that_contracts_no_input_is_not_averaged(rng):
  # An Einsum whose output keeps every kernel axis ("btd,td->btd", a learned gate per position and
  # channel) has its bias of the kernel's every axis: each kernel entry meets one output entry.
  # Read by its rank, the kernel (t, d) was blocked along axis 0 as a Dense kernel's inputs (across
  # positions, unflagged) and (t, h, d) averaged over axis 0 as a Conv kernel's window (flagged);
  # in an nn.scan stack too. One that contracts an axis ("btd,dh->bth") stays a Dense kernel.
  gates = {
    "gate": ("btd,td->btd", (4, 6), (1, 4, 6)),
    "reordered": ("btd,dt->btd", (6, 4), (1, 4, 6)),
    "rank3": ("bthd,thd->bthd", (4, 2, 6), (1, 4, 2, 6)),
    "outer": ("bd,hd->bhd", (2, 6), (1, 6)),
  }
  params = {k: zero_params(_Gate(spec, shape), np.ones(x)) for k, (spec, shape, x) in gates.items()}
  params["scanned"] = zero_params(_ScannedGates(), np.ones((1, 4, 6)))  # ScanGate_0: (3, 4, 6)
  params["nnx"] = nnx.as_pure(
    nnx_zero_params(lambda: nnx.Einsum("btd,td->btd", (4, 6), (4, 6), rngs=nnx.Rngs(0)))
  )
  params["haiku"] = {"w": np.zeros((4, 6)), "b": np.zeros((4, 6))}
  params["dense"] = zero_params(_Gate("btd,dh->bth", (6, 4)), np.ones((1, 4, 6)))
  hessian_diag = jax.tree.map(lambda x: rng.random(x.shape), params)
  got = _nu_after_one_step(ah.scale_by_adahessian(b2=0.5, block_size=2), params, hessian_diag)
  rows = {r.path: r for r in spatial.describe(params, block_size=2, strict=True).rows}
  kernels = 0
  leaves = jax.tree_util.tree_flatten_with_path(hessian_diag)[0]
  for (path, d), value in zip(leaves, jax.tree.leaves(got), strict=True):
    where, d = jax.tree_util.keystr(path), np.asarray(d)
    if not where.endswith(("['kernel']", "['w']")):
      continue
    kernels += 1
    if where.startswith("['dense']"):
      np.testing.assert_allclose(value, block_average(d, 2, axis=0), rtol=1e-6)
      assert rows[where].rule == spatial.blocks(2, axis=0)
      continue
    np.testing.assert_allclose(value, d, rtol=1e-6, err_msg=where)
    want = spatial.per_layer(spatial.none(), axes=0) if "scanned" in where else spatial.none()
    assert rows[where].rule == want, where
    assert "contracts no input" in rows[where].why and not rows[where].ambiguous
  assert kernels == 8


@pytest.mark.filterwarnings(
  "ignore::adahessian_jax.spatial.LayoutGuessWarning"
)  # guesses on purpose
def test_unboxed_flax_attention_keeps_heads_apart_and_blocks_its_inputs(rng):
  # Unboxed, the projections (embed, heads, head_dim) and (heads, head_dim, embed) have a 1-D Conv
  # kernel's rank: the query kernel was averaged over all its inputs, the output kernel across
  # heads. Their module names and shapes tell them apart (cross-attention: key/value with
  # another embed), in Linen and NNX alike; a lone Conv named "out" or "value" does not qualify.
  params = {
    "linen": zero_params(
      nn.MultiHeadDotProductAttention(2, qkv_features=8, out_features=6),
      np.ones((1, 3, 5)),
      np.ones((1, 4, 7)),
    ),
    "nnx": nnx.as_pure(
      nnx_zero_params(lambda: nnx.MultiHeadAttention(2, 5, 8, 6, decode=False, rngs=nnx.Rngs(0)))
    ),
    "decoder": {  # a 1-D Conv named "out" beside a query kernel of other sizes, and one "value"
      "query": {"kernel": np.ones((3, 4, 5))},
      "out": {"kernel": np.ones((3, 5, 6))},
    },
    "value": {"kernel": np.ones((3, 5, 6))},
  }
  hessian_diag = jax.tree.map(lambda x: rng.random(x.shape), params)
  got = _nu_after_one_step(ah.scale_by_adahessian(b2=0.5, block_size=2), params, hessian_diag)
  rows = {r.path: r for r in spatial.describe(params, block_size=2).rows}
  leaves = jax.tree_util.tree_flatten_with_path(hessian_diag)[0]
  checked = 0
  for (path, d), value in zip(leaves, jax.tree.leaves(got), strict=True):
    where, d = jax.tree_util.keystr(path), np.asarray(d)
    if not where.endswith("['kernel']") or d.ndim != 3:
      continue
    if where.startswith(("['linen']", "['nnx']")):
      axis = 1 if "['out']" in where else 0  # head_dim within a head, else embed
      np.testing.assert_allclose(value, block_average(d, 2, axis=axis), rtol=1e-6, err_msg=where)
      assert rows[where].rule == spatial.blocks(2, axis=axis) and not rows[where].ambiguous
      checked += 1
    else:  # the rank's guess, flagged
      np.testing.assert_allclose(value, np.broadcast_to(d.mean(0), d.shape), rtol=1e-6)
      assert rows[where].rule == spatial.mean_over(0) and rows[where].ambiguous, where
  assert checked == 8


def test_unboxed_attention_that_could_be_a_scanned_dense_stack_is_ambiguous():
  # An nn.scan stack of 8 Dense layers of width 8 named query/value/out has kernels (8, 8, 8):
  # the attention shapes with embed = heads. Taken for attention, blocks along axis 0 span
  # layers, so strict mode must refuse it; embed != heads (real attention) stays unflagged.
  stack = {m: {"kernel": jax.ShapeDtypeStruct((8, 8, 8), jnp.float32)} for m in ("query", "out")}
  attention = {
    "query": {"kernel": jax.ShapeDtypeStruct((16, 8, 8), jnp.float32)},
    "out": {"kernel": jax.ShapeDtypeStruct((8, 8, 16), jnp.float32)},
  }
  rows = spatial.describe({"stack": stack, "attn": attention}, block_size=4).rows
  assert [(r.path, r.ambiguous) for r in rows] == [
    ("['attn']['out']['kernel']", False),
    ("['attn']['query']['kernel']", False),
    ("['stack']['out']['kernel']", True),
    ("['stack']['query']['kernel']", True),
  ]
  assert "embed and heads axes have one size" in rows[3].why
  with pytest.raises(ValueError, match=r"\['stack'\]\['query'\]\['kernel'\]"):
    spatial.describe({"stack": stack}, spatial.strict(), block_size=4)


class _NormStack(nn.Module):
  """4 scanned LayerNorms and weight-normed Dense layers (no names: the scales come out as
  (4, 6)) and a 2-D LayerNorm."""

  @nn.compact
  def __call__(self, x):
    class Norm(nn.Module):
      @nn.compact
      def __call__(self, x, _):
        return nn.WeightNorm(nn.Dense(6))(nn.LayerNorm()(x)), None

    stack = nn.scan(Norm, variable_axes={"params": 0}, split_rngs={"params": True}, length=4)
    x = stack(name="stack")(x, None)[0]
    return nn.LayerNorm(reduction_axes=(-2, -1), feature_axes=(-2, -1), name="norm_2d")(x)


def test_flax_norm_scales_are_not_averaged_at_any_rank(rng):
  # nn.scan/nnx.vmap without names stack a LayerNorm scale into (layers, features), and a
  # LayerNorm over two feature axes has a (4, 6) scale: by rank both look like Dense kernels.
  params = jax.eval_shape(_NormStack().init, jax.random.key(0), np.ones((1, 4, 6)))["params"]
  make = nnx.vmap(lambda r: nnx.LayerNorm(6, rngs=r), in_axes=0, out_axes=0)
  layer = nnx.eval_shape(lambda: make(nnx.Rngs(0).split(4)))  # shapes only
  params["nnx_stack"] = nnx.as_pure(nnx.state(layer, nnx.Param))
  params = jax.tree.map(lambda s: np.zeros(s.shape), params)
  hessian_diag = per_layer_constants(params)
  hessian_diag["norm_2d"]["scale"] = rng.random((4, 6))  # one entry per feature
  got = _nu_after_one_step(ah.scale_by_adahessian(b2=0.5, block_size=4), params, hessian_diag)
  np.testing.assert_allclose(
    got["stack"]["LayerNorm_0"]["scale"], hessian_diag["stack"]["LayerNorm_0"]["scale"], rtol=1e-6
  )
  weight_norm = got["stack"]["WeightNorm_0"]["Dense_0/kernel/scale"]  # Flax's name for it
  np.testing.assert_allclose(weight_norm, np.repeat(LAYER_CURVATURE[:, None], 6, 1), rtol=1e-6)
  np.testing.assert_allclose(
    got["nnx_stack"]["scale"], hessian_diag["nnx_stack"]["scale"], rtol=1e-6
  )
  np.testing.assert_allclose(got["norm_2d"]["scale"], hessian_diag["norm_2d"]["scale"], rtol=1e-6)
  rows = {r.path: r for r in spatial.describe(params, block_size=4).rows}
  for path in (
    "['stack']['LayerNorm_0']['scale']",
    "['stack']['WeightNorm_0']['Dense_0/kernel/scale']",
    "['nnx_stack']['scale']",
    "['norm_2d']['scale']",
  ):
    assert rows[path].groups == {1: 24} and not rows[path].ambiguous, rows[path]


def test_an_embedding_with_only_its_features_named_keeps_its_rows_apart():
  # Only the embed axis named (the vocab axis left unsharded): by rank a Dense kernel, whose
  # blocks along axis 0 would average the curvature of different tokens.
  init = nn.initializers.normal(1.0)
  table = nn.Embed(8, 6, embedding_init=P(init, (None, "embed")))
  params = jax.eval_shape(table.init, jax.random.key(0), np.zeros((1,), np.int32))["params"]
  with nnx.use_eager_sharding(False):  # names only, no mesh
    layer = nnx.Embed(
      8, 6, embedding_init=nnx.with_partitioning(init, (None, "embed")), rngs=nnx.Rngs(0)
    )
  names = {"linen": params, "nnx": nnx.state(layer, nnx.Param)}
  plain = jax.tree.map(
    lambda s: np.zeros(s.shape), {"linen": nn.unbox(params), "nnx": nnx.as_pure(names["nnx"])}
  )
  per_token = np.broadcast_to(10.0 ** np.arange(8.0)[:, None], (8, 6))  # one value per row
  hessian_diag = jax.tree.map(lambda _: per_token, plain)
  tx = ah.scale_by_adahessian(b2=0.5, block_size=4, averaging=spatial.named(names))
  got = _nu_after_one_step(tx, plain, hessian_diag)
  np.testing.assert_allclose(got["linen"]["embedding"], per_token, rtol=1e-6)
  np.testing.assert_allclose(got["nnx"]["embedding"], per_token, rtol=1e-6)
  # Rows apart, blocks along the features: Flax's name for a table, no guess.
  listing = spatial.describe(plain, spatial.named(names), 4)
  assert [r.rule for r in listing.rows] == [spatial.blocks(4, axis=1)] * 2
  assert not listing.ambiguous


def test_a_rank_2_leaf_blocked_along_a_name_of_no_known_role_is_a_guess():
  # nn.vmap over an ensemble names its axis "members", a name of no known role: a per-member gain
  # (members, embed) looked like a Dense kernel (in, out), blocked across members unflagged.
  class Expert(nn.Module):
    @nn.compact
    def __call__(self, x):
      return x * self.param("gain", P(nn.initializers.ones, ("embed",)), (6,))

  members = nn.vmap(
    Expert,
    variable_axes={"params": 0},
    split_rngs={"params": True},
    in_axes=None,
    axis_size=4,
    metadata_params={nn.PARTITION_NAME: "members"},
  )
  params = jax.eval_shape(members().init, jax.random.key(0), np.ones((2, 6)))["params"]
  params["dense"] = nn.Partitioned(np.zeros((6, 3)), (None, "mlp"))  # an unnamed input: Dense
  (dense, gain) = spatial.describe(params, block_size=4).rows
  assert gain.rule == spatial.blocks(4) and gain.ambiguous and "AMBIGUOUS" in gain.why
  assert dense.rule == spatial.blocks(4) and not dense.ambiguous
  with pytest.raises(ValueError, match=r"\['gain'\]: shape \(4, 6\)"):
    spatial.describe(params, spatial.strict(), 4)
  # Named a stacked axis, it is kept apart: the gain is one entry per member and feature.
  roles = spatial.flax_default(4, axis_roles={"members": "stacked"})
  assert spatial.describe(params, roles).rows[1].rule == spatial.per_layer(spatial.none())


def test_a_mixture_of_experts_is_averaged_per_expert():
  # A MoE layer's kernels (exp, embed, mlp) and router (embed, exp), named as MaxText names them:
  # every expert is a Dense kernel of its own (blocks of inputs within one expert), never a
  # mean across experts; strict mode accepts them. Curvature 10^e for expert e.
  params = {
    "wi": nn.Partitioned(np.zeros((3, 8, 2)), ("exp", "embed", "mlp")),
    "router": nn.Partitioned(np.zeros((8, 3)), ("embed", "exp")),
  }
  h = {
    "wi": np.broadcast_to(10.0 ** np.arange(3.0)[:, None, None], (3, 8, 2)),
    "router": np.broadcast_to(10.0 ** np.arange(3.0), (8, 3)),
  }
  h["wi"] = h["wi"] * (1.0 + np.arange(8.0)[None, :, None])  # differs along embed
  rules = spatial.resolve_rules(spatial.strict(spatial.named(params)), nn.unbox(params), 4)
  got = averaged(rules, h)
  blocks = h["wi"].reshape(3, 2, 4, 2).mean(2, keepdims=True)  # per expert, 2 blocks of 4 inputs
  np.testing.assert_allclose(got["wi"], np.broadcast_to(blocks, (3, 2, 4, 2)).reshape(3, 8, 2))
  np.testing.assert_allclose(got["router"], h["router"])  # one entry per expert and input
  assert not spatial.describe(params, block_size=4).ambiguous


class UnnamedBlock(nn.Module):
  """A transformer-style block with no axis names at all, as most Linen code writes one."""

  @nn.compact
  def __call__(self, x, _):
    h = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(nn.LayerNorm()(x))
    x = x + h
    h = nn.Dense(16, use_bias=False, name="up")(x)  # a name of its own, no bias
    h = nn.Conv(16, (3,), padding="SAME")(h)  # a 1-D Conv kernel per layer: (3, 16, 16)
    return x + nn.Dense(6, use_bias=False)(nn.relu(h)), None  # Linen's name, no bias


class UnnamedStack(nn.Module):
  @nn.compact
  def __call__(self, x):
    scan = nn.scan(UnnamedBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    return nn.Dense(2)(scan()(x, None)[0])


def test_an_unnamed_linen_scan_keeps_its_layers_apart(rng):
  # Plain nn.scan without metadata_params: every leaf is a plain array with a leading axis of 3
  # layers. By rank, the Dense kernels (3, in, out) were 1-D Conv kernels averaged across layers
  # (even at block_size 1) and the attention kernels (3, embed, heads, head_dim) 2-D ones. A
  # bias repeating its kernel's leading axis, or Linen's name 'Dense_0' (a Dense kernel has rank
  # 2), shows the stack; the leaves beside them ('up', the LayerNorm) take it from them, and the
  # attention and Conv kernels are then read per layer by their module names.
  params = zero_params(UnnamedStack(), np.ones((1, 5, 6)))
  hessian_diag = jax.tree.map(lambda x: rng.random(x.shape), params)
  got = _nu_after_one_step(ah.scale_by_adahessian(b2=0.5, block_size=2), params, hessian_diag)
  rows = {r.path: r for r in spatial.describe(params, block_size=2).rows}
  assert not any(r.ambiguous for r in rows.values()), [r.path for r in rows.values() if r.ambiguous]
  leaves = jax.tree_util.tree_flatten_with_path(hessian_diag)[0]
  for (path, d), value in zip(leaves, jax.tree.leaves(got), strict=True):
    where, d = jax.tree_util.keystr(path), np.asarray(d)
    if not where.startswith("['ScanUnnamedBlock_0']"):  # the head: a Dense kernel and its bias
      want = block_average(d, 2) if d.ndim == 2 else d
    elif not where.endswith("['kernel']"):  # biases and LayerNorm: nothing averaged
      want = d
    elif "['Conv_0']" in where:  # per layer, the mean over the 3 positions of the window
      want = np.broadcast_to(d.mean(axis=1, keepdims=True), d.shape)
    else:  # per layer: inputs in blocks of 2; the output projection's inputs within one head
      axis = 1 if "['out']" in where else 0
      want = np.stack([block_average(layer, 2, axis=axis) for layer in d])
    np.testing.assert_allclose(value, want, rtol=1e-6, err_msg=where)
    if where.startswith("['ScanUnnamedBlock_0']"):
      assert rows[where].names[0] == "layers", rows[where]
  # The per-layer Hessian analyses read the same layers.
  axes = dict(zip(rows, layer_axes_of(params), strict=True))
  assert (
    axes["['ScanUnnamedBlock_0']['up']['kernel']"] == (0,) and axes["['Dense_0']['kernel']"] == ()
  )
  assert (
    "Linen's name 'Dense_0' makes it a Dense"
    in rows["['ScanUnnamedBlock_0']['Dense_0']['kernel']"].why
  )
  assert "Linen's name of an nn.scan" in rows["['ScanUnnamedBlock_0']['up']['kernel']"].why
  # Under a name of your own, the scan's name says nothing: 'up' takes the stack from Dense_0.
  renamed = {"blocks": params["ScanUnnamedBlock_0"], "Dense_0": params["Dense_0"]}
  rows = {r.path: r for r in spatial.describe(renamed, block_size=2).rows}
  assert "taken from its named relative" in rows["['blocks']['up']['kernel']"].why
  assert rows["['blocks']['up']['kernel']"].rule == spatial.per_layer(spatial.blocks(2))


def test_what_tells_a_stack_without_names_and_what_does_not():
  def rows(tree, block_size=2):
    shapes = jax.tree.map(np.zeros, tree, is_leaf=lambda x: isinstance(x, tuple))
    listing = spatial.describe(shapes, block_size=block_size)
    return {r.path: (r.rule, r.ambiguous) for r in listing.rows}

  # A bias repeating the kernel's leading axes: a stack of layers, under any module name, with
  # Haiku's w/b too; a stack of stacks (2, 3, ...) by its bias (2, 3, out).
  got = rows(
    {
      "mlp": {"kernel": (4, 6, 8), "bias": (4, 8)},
      "hk": {"w": (4, 6, 8), "b": (4, 8)},
      "deep": {"kernel": (2, 3, 6, 8), "bias": (2, 3, 8)},
    }
  )
  assert got["['mlp']['kernel']"] == (spatial.per_layer(spatial.blocks(2)), False)
  assert got["['hk']['w']"] == (spatial.per_layer(spatial.blocks(2)), False)
  assert got["['hk']['b']"] == (spatial.per_layer(spatial.none()), False)
  assert got["['deep']['kernel']"] == (spatial.per_layer(spatial.blocks(2), axes=(0, 1)), False)
  # One layer's bias is its kernel's output axes: a DenseGeneral (in, heads, head_dim) with its
  # (heads, head_dim) bias (two output axes: no convolution's) is read so; a (3, in, out) kernel
  # with its (out,) bias (a 1-D Conv or an attention's output projection (heads, head_dim,
  # embed)) and a kernel without a bias stay the rank's guess, flagged; so does a Conv_0 without
  # a bias whose first size is a stack's in the tree (a 2-D Conv, or a scan of 1-D ones).
  got = rows(
    {
      "general": {"kernel": (6, 2, 4), "bias": (2, 4)},
      "proj": {"kernel": (3, 6, 8), "bias": (8,)},
      "alone": {"kernel": (4, 6, 8)},
      "Dense_1": {"kernel": (6, 6, 8), "bias": (6, 8)},  # layers = inputs: only the name tells
      "Conv_0": {"kernel": (6, 3, 6, 8)},  # a Conv without a bias: stacked or 2-D, unknown
    }
  )
  assert got["['general']['kernel']"] == (spatial.blocks(2), False)
  for leaf in ("proj", "alone", "Conv_0"):
    rule, ambiguous = got[f"['{leaf}']['kernel']"]
    assert rule == spatial.mean_over(tuple(range(2 if leaf == "Conv_0" else 1))) and ambiguous
  assert got["['Dense_1']['kernel']"] == (spatial.per_layer(spatial.blocks(2)), False)
  # Where nothing in the tree is stacked, a convolution's name settles a kernel without a bias
  # (Linen's Conv_0, Haiku's conv2_d, a user's conv1), and any (kh, kw, in, out) kernel beside
  # its (out,) bias is a Conv's; a rank-3 kernel under a convolution's name is one, bias or none.
  got = rows(
    {
      "Conv_0": {"kernel": (3, 3, 6, 8)},
      "conv2_d": {"w": (3, 3, 6, 8)},
      "conv1": {"kernel": (5, 8, 8)},
      "stem": {"kernel": (7, 7, 3, 6), "bias": (6,)},
      "Dense_0": {"kernel": (6, 8), "bias": (8,)},
      # A MobileNet's bias-less depthwise and pointwise Convs, a ConvNeXt's dwconv.
      "depthwise": {"kernel": (3, 3, 1, 8)},
      "pointwise": {"kernel": (1, 1, 8, 6)},
      "dwconv": {"kernel": (7, 7, 1, 8)},
    }
  )
  for where, axes in [
    ("['Conv_0']['kernel']", (0, 1)),
    ("['conv2_d']['w']", (0, 1)),
    ("['conv1']['kernel']", (0,)),
    ("['stem']['kernel']", (0, 1)),
    ("['depthwise']['kernel']", (0, 1)),
    ("['pointwise']['kernel']", (0, 1)),
    ("['dwconv']['kernel']", (0, 1)),
  ]:
    assert got[where] == (spatial.mean_over(axes), False), where
  # nn.vmap with variable_axes={"params": 1} stacks 3 members on axis 1: kernel (in, 3, out),
  # bias (out, 3). The name's leading stack would block (3, out) across members; the bias belies it.
  got = rows({"Dense_0": {"kernel": (6, 3, 8), "bias": (8, 3)}})
  assert got["['Dense_0']['kernel']"] == (spatial.mean_over(0), True)
  # A Linen Conv with its bias: the spatial axes are sure, stacked (bias (layers, out)) or not.
  got = rows(
    {
      "Conv_0": {"kernel": (3, 6, 8), "bias": (8,)},
      "Conv_1": {"kernel": (4, 3, 6, 8), "bias": (4, 8)},
    }
  )
  assert got["['Conv_0']['kernel']"] == (spatial.mean_over(0), False)
  assert got["['Conv_1']['kernel']"] == (spatial.per_layer(spatial.mean_over(0)), False)


class ScannedConvNormBlock(nn.Module):
  """A residual block of bias-less Convs and norms, as BatchNorm/GroupNorm nets write them."""

  norm: Callable[[], nn.Module]

  @nn.compact
  def __call__(self, x, _):
    return x + self.norm()(nn.Conv(x.shape[-1], (3,) * (x.ndim - 2), use_bias=False)(x)), None


@pytest.mark.parametrize("norm", ["GroupNorm", "LayerNorm"])
def test_a_bias_less_conv_in_an_unnamed_scan_is_not_averaged_across_layers(norm):
  # nn.scan of 4 blocks without names: the Conv_0 kernel (4, 3, 3, 8, 8) was taken for a 3-D
  # Conv's by its name, for sure, and averaged over the 4 layers. A GroupNorm's scale and bias
  # are one per channel, so (4, 8) shows the stack; a LayerNorm's (4, 8) may (feature_axes).
  make = (lambda: nn.GroupNorm(num_groups=2)) if norm == "GroupNorm" else nn.LayerNorm
  stack = nn.scan(
    ScannedConvNormBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=4
  )
  x = np.ones((1, 6, 6, 8))
  params = jax.eval_shape(stack(make).init, jax.random.key(0), x, None)["params"]
  row = {r.path: r for r in spatial.describe(params, block_size=2).rows}["['Conv_0']['kernel']"]
  if norm == "GroupNorm":
    assert row.rule == spatial.per_layer(spatial.mean_over((0, 1)))
    assert row.groups == {9: 4 * 64}
  else:  # a guess: the stack or a 3-D Conv
    assert row.rule == spatial.mean_over((0, 1, 2)) and row.ambiguous


def test_a_stack_as_long_as_its_convs_window_is_one_its_norms_show(rng):
  # A named nn.scan of 3 blocks of a bias-less 3x3 Conv and a GroupNorm (a ResNet stage of 3):
  # the GroupNorm's (3, 8) shows the stack, but the kernel's size past it, 3, was that of a
  # stack known in the tree (its own), so its name 'Conv_0' no longer made it a convolution's:
  # init warned (LayoutGuessWarning) and strict mode refused the model, for a rule it had right.
  stack = nn.scan(
    ScannedConvNormBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=3
  )

  class Stage(nn.Module):
    @nn.compact
    def __call__(self, x):
      return stack(lambda: nn.GroupNorm(num_groups=2), name="stage")(x, None)[0]

  params = jax.eval_shape(Stage().init, jax.random.key(0), np.ones((1, 6, 6, 8)))["params"]
  params = jax.tree.map(lambda p: np.zeros(p.shape), params)
  (row,) = [r for r in spatial.describe(params, block_size=2).rows if "Conv_0" in r.path]
  assert row.shape == (3, 3, 3, 8, 8)
  assert row.rule == spatial.per_layer(spatial.mean_over((0, 1))) and not row.ambiguous
  hessian_diag = jax.tree.map(lambda p: rng.uniform(1.0, 2.0, p.shape), params)
  with warnings.catch_warnings():
    warnings.simplefilter("error", spatial.LayoutGuessWarning)
    tx = ah.scale_by_adahessian(b2=0.5, block_size=2, averaging=spatial.strict())
    got = _nu_after_one_step(tx, params, hessian_diag)
  d = hessian_diag["stage"]["Conv_0"]["kernel"]
  want = np.broadcast_to(d.mean(axis=(1, 2), keepdims=True), d.shape)  # each layer's 3x3
  np.testing.assert_allclose(got["stage"]["Conv_0"]["kernel"], want, rtol=1e-12)
  # A Conv under a module of its own there may hold a stack of 3 of its own: still a guess.
  inner = {"Conv_0": {"kernel": np.zeros((3, 3, 3, 3, 8, 8))}}
  nested = {"stage": {"GroupNorm_0": params["stage"]["GroupNorm_0"], "inner": inner}}
  assert [r.path for r in spatial.describe(nested, block_size=2).ambiguous] == [
    "['stage']['inner']['Conv_0']['kernel']"
  ]
  # So does an nn.vmap of 3 Convs beside it (VmapConv_0 (3, 3, 3, 3, 8, 8)): 3 members or 3-D.
  lifted = {"GroupNorm_0": params["stage"]["GroupNorm_0"], "VmapConv_0": inner["Conv_0"]}
  assert [r.path for r in spatial.describe({"stage": lifted}, block_size=2).ambiguous] == [
    "['stage']['VmapConv_0']['kernel']"
  ]


@pytest.mark.parametrize(
  ("stacked", "wrap", "name"),
  [
    (False, None, "ConvLocal_0"),
    (True, None, "ConvLocal_0"),
    (False, nn.remat, "CheckpointConvLocal_0"),
    (True, nn.jit, "JitConvLocal_0"),
  ],
)
def test_a_bias_less_conv_local_keeps_its_output_positions_apart(stacked, wrap, name):
  # nn.ConvLocal's kernel (*out_positions, window * in, out) holds one filter per output
  # position. Without a bias, its name 'ConvLocal_0' (a word 'conv') made it a Conv kernel for
  # sure: the mean over axis 0 averaged the filters of all 8 output positions (and of the 3
  # layers of a scan). One position's kernel has rank 2, as a Dense's. nn.remat and nn.jit keep
  # the parameters as they are but prefix the class's name ('CheckpointConvLocal_0'), which was
  # then no ConvLocal's name, only a convolution's.
  layer = functools.partial(wrap(nn.ConvLocal) if wrap else nn.ConvLocal, 6, (3,), use_bias=False)

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      layer()(x)
      return x, None

  model = Block()
  if stacked:
    model = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)()
  params = jax.eval_shape(model.init, jax.random.key(0), np.ones((2, 8, 4)), None)["params"]
  (row,) = spatial.describe(params, block_size=4).rows
  assert row.path == f"['{name}']['kernel']"
  assert row.shape == (3,) * stacked + (8, 12, 6)
  assert row.rule == spatial.per_layer(spatial.blocks(4), axes=tuple(range(1 + stacked)))
  assert row.groups == {4: 3**stacked * 8 * 3 * 6} and not row.ambiguous
  # The Hessian diagonal of one output position is averaged with no other position's.
  d = np.broadcast_to(np.arange(8.0).reshape(8, 1, 1), row.shape)
  np.testing.assert_array_equal(jax.jit(row.rule)(d), d)  # one program, not one per operation


@pytest.mark.parametrize("layers", [3, 4])
def test_a_bias_less_conv_beside_a_stack_of_another_size_is_no_guess(layers):
  # A ViT's bias-less patch Conv (4, 4, 3, 16) beside an unnamed nn.scan of its blocks (whose
  # Dense bias (layers, 16) shows the stack): any known stack in the tree made the Conv's kernel
  # a guess (a stack of 1-D Convs (layers, w, in, out)?), so init warned on a plain ViT. Only a
  # stack of the kernel's first size can hold it.
  block = {"Dense_0": {"kernel": np.zeros((layers, 16, 16)), "bias": np.zeros((layers, 16))}}
  params = {"Conv_0": {"kernel": np.zeros((4, 4, 3, 16))}, "ScanBlock_0": block}
  row = {r.path: r for r in spatial.describe(params, block_size=2).rows}["['Conv_0']['kernel']"]
  if layers == 3:
    assert row.rule == spatial.mean_over((0, 1)) and not row.ambiguous
  else:  # a stack of 4 1-D Convs has this kernel too: a guess
    assert row.ambiguous


class BiasLessConvBlock(nn.Module):
  """A residual block of nothing but a bias-less Conv."""

  @nn.compact
  def __call__(self, x, _):
    return x + nn.Conv(x.shape[-1], (3, 3), use_bias=False)(x), None


class _MaybeBoxedConvBlock(nn.Module):
  """BiasLessConvBlock with its kernel boxed with logical names, or not."""

  boxed: bool

  @nn.compact
  def __call__(self, x, _):
    init = nn.initializers.lecun_normal()
    if self.boxed:
      init = nn.with_logical_partitioning(init, ("height", "width", "embed", "mlp"))
    return x + nn.Conv(8, (3, 3), use_bias=False, kernel_init=init)(x), None


def test_an_unnamed_scan_of_bias_less_convs_is_found_by_linen_s_scan_name():
  # nn.scan(Block) of nothing but a bias-less Conv: no bias, norm or name showed the stack, so its
  # kernel (4, 3, 3, 8, 8) was a 3-D Conv kernel by its name, averaged across the 4 layers,
  # unflagged. Linen names the scan ScanBiasLessConvBlock_0.
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      scan = nn.scan(
        BiasLessConvBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=4
      )
      return scan()(x, None)[0]

  params = jax.eval_shape(Net().init, jax.random.key(0), np.ones((1, 6, 6, 8)))["params"]
  (row,) = spatial.describe(params, block_size=2).rows
  assert row.rule == spatial.per_layer(spatial.mean_over((0, 1))) and not row.ambiguous
  assert row.groups == {9: 4 * 64}
  # Under a name you chose the scan leaves no trace: the 3-D reading, as documented.
  want_2d = spatial.mean_over((0, 1))
  renamed = {"blocks": params["ScanBiasLessConvBlock_0"]}
  (row,) = spatial.describe(renamed, block_size=2).rows
  assert row.rule == spatial.mean_over((0, 1, 2))
  # The guide's ways out: metadata_params names boxed kernels only (the plain ones it leaves as
  # they are, the 3-D reading), or an explicit rule.
  for boxed, want in [(False, spatial.mean_over((0, 1, 2))), (True, spatial.per_layer(want_2d))]:
    meta = {"metadata_params": {nn.PARTITION_NAME: "layers"}, "split_rngs": {"params": True}}
    stack = nn.scan(_MaybeBoxedConvBlock, variable_axes={"params": 0}, length=4, **meta)
    x = np.ones((1, 6, 6, 8))
    shapes = jax.eval_shape(stack(boxed, name="blocks").init, jax.random.key(0), x, None)
    (row,) = spatial.describe(shapes["params"], block_size=2).rows
    assert row.rule == want, boxed
  rule = {"blocks": {"Conv_0": {"kernel": spatial.per_layer(want_2d)}}}
  (row,) = spatial.describe(renamed, rule, block_size=2).rows
  assert row.rule == rule["blocks"]["Conv_0"]["kernel"] and row.groups == {9: 4 * 64}


class BiasLessConv(nn.Module):
  """BiasLessConvBlock for nn.remat_scan and nn.vmap: the carry alone."""

  @nn.compact
  def __call__(self, x):
    return BiasLessConvBlock()(x, None)[0]


class _PrivateConvBlock(BiasLessConvBlock):
  """A class whose name starts with '_': Linen names its nn.scan 'Scan_PrivateConvBlock_0'."""


@pytest.mark.parametrize(
  ("transform", "scan_name"),
  [("remat_scan", "Remat_scanBiasLessConv_0"), ("scan", "Scan_PrivateConvBlock_0")],
)
def test_an_unnamed_remat_scan_of_bias_less_convs_is_found_by_its_linen_name(transform, scan_name):
  # nn.remat_scan(Block) names its instance Remat_scanBlock_0, and nn.scan of a class _Block
  # Scan_Block_0: neither was a scan's name to the reader, so the kernel (4, 3, 3, 8, 8) of a
  # block of nothing but a bias-less Conv was a 3-D Conv's by its name, averaged across the 4
  # layers, unflagged (layer 3's diagonal of 1000 came out as 277.75).
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      if transform == "remat_scan":
        return nn.remat_scan(BiasLessConv, lengths=(4,))()(x)
      stacked = {"variable_axes": {"params": 0}, "split_rngs": {"params": True}}
      return nn.scan(_PrivateConvBlock, length=4, **stacked)()(x, None)[0]

  params = jax.eval_shape(Net().init, jax.random.key(0), np.ones((1, 6, 6, 8)))["params"]
  (row,) = spatial.describe(params, block_size=2).rows
  assert row.path.startswith(f"['{scan_name}']") and row.path.endswith("['Conv_0']['kernel']")
  assert row.rule == spatial.per_layer(spatial.mean_over((0, 1)))
  assert row.groups == {9: 4 * 64}
  # nn.remat_scan stacks one axis per entry of its lengths, which its name does not say: the
  # kernel is also lengths=(4, 3) over a 1-D Conv (3, 8, 8). Its first axis is kept apart either
  # way, and the count is flagged.
  assert row.ambiguous == (transform == "remat_scan"), row
  rules = spatial.resolve_rules(None, params, 2)
  check_layers_kept(averaged(rules, per_layer_constants(params)))


@pytest.mark.parametrize("block_size", [1, 2])
def test_a_bias_less_conv_under_an_unnamed_vmap_is_a_guess(block_size):
  # nn.vmap(Block) is named VmapBlock_0, but it may stack the params along axis 0, another axis,
  # or not at all (broadcast): (4, 3, 3, 8, 8) is 4 members' 3x3 kernels or one 3-D kernel. By
  # the Conv's name it was read as a 3-D one, for sure: averaged across the 4 members, at any
  # block size, unflagged. Now it is the rank's guess, flagged, and strict mode refuses it.
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      vmap = nn.vmap(
        BiasLessConv,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=None,
        axis_size=4,
      )
      return vmap()(x)

  params = jax.eval_shape(Net().init, jax.random.key(0), np.ones((1, 6, 6, 8)))["params"]
  (row,) = spatial.describe(params, block_size=block_size).rows
  assert row.shape == (4, 3, 3, 8, 8)
  assert row.rule == spatial.mean_over((0, 1, 2)) and row.ambiguous
  with pytest.raises(ValueError, match=r"(?s)1 leaf is ambiguous.*\['Conv_0'\]\['kernel'\]"):
    spatial.describe(params, spatial.strict(), block_size=block_size)
  # A 3x3 Conv_0 beside its bias, or a bias-less 1-D one (rank 3), stays a Conv's for sure.
  shapes = {"VmapBlock_0": {"Conv_0": {"kernel": np.zeros((3, 3, 8, 8)), "bias": np.zeros(8)}}}
  shapes["VmapBlock_0"]["Conv_1"] = {"kernel": np.zeros((3, 8, 8))}
  rows = [r for r in spatial.describe(shapes, block_size=block_size).rows if r.shape != (8,)]
  assert [(r.rule, r.ambiguous) for r in rows] == [
    (spatial.mean_over((0, 1)), False),
    (spatial.mean_over((0,)), False),
  ]


class ConvMoeBlock(nn.Module):
  """A bias-less 1-D Conv beside a mixture's raw weights (experts, in, out)."""

  @nn.compact
  def __call__(self, x):
    wi = self.param("wi", nn.initializers.lecun_normal(), (4, x.shape[-1], 3))
    return nn.Conv(3, (3,), use_bias=False)(x) + jnp.einsum("btd,edf->btf", x, wi)


def test_a_bias_less_conv_beside_a_mixture_in_an_unnamed_vmap_is_a_guess():
  # nn.vmap of 3 such blocks, without names: nothing names the stack (VmapConvMoeBlock_0 is no
  # sign, the mixture's weights (3, 4, 8, 3) have no bias), so the Conv_0 kernel (3, 3, 8, 3) was
  # a 2-D Conv's for sure by its name: averaged across the 3 layers, unflagged. Every leaf of the
  # block has the stack's size first: a guess now, named in init's warning.
  vmap = nn.vmap(
    ConvMoeBlock,
    variable_axes={"params": 0},
    split_rngs={"params": True},
    in_axes=None,
    axis_size=3,
  )
  params = jax.eval_shape(vmap().init, jax.random.key(0), np.ones((1, 5, 8)))["params"]
  rows = {r.path: r for r in spatial.describe(params, block_size=2).rows}
  assert rows["['Conv_0']['kernel']"].ambiguous
  with pytest.warns(spatial.LayoutGuessWarning, match=r"\['Conv_0'\]\['kernel'\]"):
    ah.adahessian(0.1, block_size=2).init(params)
  # A block of bias-less Convs alone, all 3x3, is no stack: for sure, unflagged.
  convs = {f"Conv_{i}": {"kernel": jax.ShapeDtypeStruct((3, 3, 8, 8), jnp.float32)} for i in (0, 1)}
  (row, _) = spatial.describe({"block": convs}, block_size=2).rows
  assert row.rule == spatial.mean_over((0, 1)) and not row.ambiguous


class NamedMoe(nn.Module):
  """A mixture's raw weights and biases, boxed with logical names."""

  @nn.compact
  def __call__(self, x, _):
    wi = self.param("wi", P(nn.initializers.lecun_normal(), ("exp", "embed", "mlp")), (3, 4, 8))
    bi = self.param("bi", P(nn.initializers.zeros, ("exp", "mlp")), (3, 8))
    return x + 0 * (wi.mean() + bi.mean()), None


def test_unnamed_axes_in_front_of_a_mixture_s_experts_are_a_stack():
  # nn.scan with PARTITION_NAME None leaves the layer axis unnamed: the mixture's bias (4, 3, 8)
  # ('bi', no 'bias' name or kernel beside it to show the stack) was (None, 'exp', 'mlp'), per
  # expert a Dense kernel (None, 'mlp') blocked along the 4 layers, unflagged.
  def rows(meta):
    scan = scan_layers(NamedMoe, partition_name=meta)
    params = jax.eval_shape(scan().init, jax.random.key(0), np.ones((2, 4)), None)["params"]
    return [(r.rule, r.groups, r.ambiguous) for r in spatial.describe(params, block_size=2).rows]

  bi, wi = rows(None)
  assert bi == (spatial.per_layer(spatial.none(), axes=(0, 1)), {1: 96}, False)
  assert wi == (spatial.per_layer(spatial.blocks(2), axes=(0, 1)), {2: 192}, False)
  assert rows(None) == rows("layers")


def test_a_module_that_shows_it_is_one_layer_takes_no_stack_from_its_relatives():
  def rows(tree):
    shapes = jax.tree.map(np.zeros, tree, is_leaf=lambda x: isinstance(x, tuple))
    listing = spatial.describe(shapes, block_size=2)
    axes = dict(zip([r.path for r in listing.rows], layer_axes_of(shapes), strict=True))
    return {r.path: (r.rule, r.groups, r.ambiguous, axes[r.path]) for r in listing.rows}

  # Stages of 2 and 3 scanned conv blocks beside a 3x3 stem and a 2x2 downsampling Conv (with
  # their biases (8,): one layer each, for sure): the stages disagreed, and each Conv kernel with
  # a stage's size on axis 0 was listed as ambiguous, so strict mode refused a plain CNN.
  stage = lambda n: {"Conv_0": {"kernel": (n, 3, 3, 8, 8), "bias": (n, 8)}}
  got = rows(
    {
      "Conv_0": {"kernel": (3, 3, 3, 8), "bias": (8,)},
      "stage1": stage(2),
      "Conv_1": {"kernel": (2, 2, 8, 8), "bias": (8,)},
      "stage2": stage(3),
    }
  )
  assert got["['Conv_0']['kernel']"] == (spatial.mean_over((0, 1)), {9: 24}, False, ())
  assert got["['Conv_1']['kernel']"] == (spatial.mean_over((0, 1)), {4: 64}, False, ())
  # A Conv to 3 channels beside a stack of 3 in one module: every leaf there had the stack's size
  # on axis 0, so the Conv's kernel (3, 3, 8, 3) was taken for 3 layers and averaged over its
  # width alone, and the bias-less Dense beside it was not blocked. Its bias (3,) shows the Conv
  # is one layer, so the module holding it is above the stack.
  got = rows(
    {
      "m": {
        "layers": stage(3),
        "Conv_0": {"kernel": (3, 3, 8, 3), "bias": (3,)},
        "proj": {"kernel": (3, 6)},
      }
    }
  )
  assert got["['m']['Conv_0']['kernel']"] == (spatial.mean_over((0, 1)), {9: 24}, False, ())
  assert got["['m']['Conv_0']['bias']"] == (spatial.none(), {1: 3}, False, ())
  assert got["['m']['proj']['kernel']"] == (spatial.blocks(2), {2: 6, 1: 6}, False, ())
  assert got["['m']['layers']['Conv_0']['kernel']"][0] == spatial.per_layer(
    spatial.mean_over((0, 1))
  )


def test_pytorch_and_equinox_weights_and_haiku_tables_keep_their_outputs_apart(rng):
  # Equinox (and PyTorch ports) name their weights "weight", output axis first: Linear (out, in),
  # Conv (out, in, kh, kw) with a bias (out, 1, 1). By Flax's layouts the Conv weight was averaged
  # over its output and input channels (even at block_size 1) and the Linear blocked across
  # outputs; Haiku's "embeddings" table (vocab, dim) across tokens.
  params = {
    "conv": {"weight": np.zeros((4, 3, 3, 3)), "bias": np.zeros((4, 1, 1))},
    "linear": {"weight": np.zeros((5, 6)), "bias": np.zeros(5)},
    "embed": {"embeddings": np.zeros((7, 4))},
    "norm": {"weight": np.zeros(6)},
  }
  hessian_diag = jax.tree.map(lambda x: rng.random(x.shape), params)
  got = _nu_after_one_step(ah.scale_by_adahessian(b2=0.5, block_size=2), params, hessian_diag)
  d = jax.tree.map(np.asarray, hessian_diag)
  conv = np.broadcast_to(d["conv"]["weight"].mean(axis=(2, 3), keepdims=True), (4, 3, 3, 3))
  np.testing.assert_allclose(got["conv"]["weight"], conv, rtol=1e-6)
  np.testing.assert_allclose(got["conv"]["bias"], d["conv"]["bias"], rtol=1e-6)
  for leaf, key in (("linear", "weight"), ("embed", "embeddings")):
    want = block_average(d[leaf][key], 2, axis=1)
    np.testing.assert_allclose(got[leaf][key], want, rtol=1e-6)
  np.testing.assert_allclose(got["norm"]["weight"], d["norm"]["weight"], rtol=1e-6)
  # The biases show the output axis first: no guess. Without a bias, or beside one that fits
  # both layouts (a square weight), it is a guess from a name where the layout matters: strict
  # mode refuses it, naming the fix.
  rows = {r.path: r for r in spatial.describe(params, block_size=2).rows}
  assert not [p for p, r in rows.items() if r.ambiguous]
  assert "PyTorch/Equinox Conv weight (out, in, *spatial)" in rows["['conv']['weight']"].why
  assert "a bias of its first axis" in rows["['linear']['weight']"].why
  guesses = {
    "conv": {"weight": np.zeros((4, 3, 3, 3))},
    "square": {"weight": np.zeros((6, 6)), "bias": np.zeros(6)},
  }
  rows = spatial.describe(guesses, block_size=2).rows
  assert [(r.path, r.ambiguous) for r in rows if "weight" in r.path] == [
    ("['conv']['weight']", True),
    ("['square']['weight']", True),
  ]
  # Hugging Face's FlaxConv1D (GPT-2) keeps a kernel (out, in) beside its bias (out,): blocks
  # along its inputs, the square c_proj too (the tree's other kernels show the layout); a
  # Flax Dense kernel (in, out) beside its bias (out,) in the same tree keeps Flax's reading.
  gpt = {
    "c_attn": {"kernel": np.zeros((12, 4)), "bias": np.zeros(12)},
    "c_proj": {"kernel": np.zeros((4, 4)), "bias": np.zeros(4)},
  }
  hessian_diag = jax.tree.map(lambda x: rng.random(x.shape), gpt)
  got = _nu_after_one_step(ah.scale_by_adahessian(b2=0.5, block_size=2), gpt, hessian_diag)
  for name in gpt:
    want = block_average(np.asarray(hessian_diag[name]["kernel"]), 2, axis=1)
    np.testing.assert_allclose(got[name]["kernel"], want, rtol=1e-6, err_msg=name)
  assert not spatial.describe(gpt, block_size=2).ambiguous
  mixed = {**gpt, "head": {"kernel": np.zeros((4, 10)), "bias": np.zeros(10)}}
  rules = {r.path: r.rule for r in spatial.describe(mixed, block_size=2).rows}
  assert rules["['c_attn']['kernel']"] == spatial.blocks(2, axis=1)
  assert rules["['c_proj']['kernel']"] == rules["['head']['kernel']"] == spatial.blocks(2, axis=0)
  # PyTorch's other weights (a packed q/k/v projection, an LSTM's) are (out, in) too.
  torch = {"in_proj_weight": np.zeros((12, 4)), "weight_ih_l0": np.zeros((16, 4))}
  for row in spatial.describe(torch, block_size=2).rows:
    assert row.rule == spatial.blocks(2, axis=1), row
  assert not spatial.describe(params, block_size=1).rows[4].ambiguous  # Linear, block_size 1


@pytest.mark.filterwarnings(
  "ignore::adahessian_jax.spatial.LayoutGuessWarning"
)  # guesses on purpose
def test_a_square_kernel_reads_its_layout_from_the_nearest_kernels(rng):
  # A square kernel beside its bias fits both layouts. It followed the whole tree: a GPT-2 with a
  # Flax Dense value head (kernel (in, out) beside its bias) had its square attention c_proj
  # (out, in) read (in, out), blocked across its outputs, unflagged; and a Flax Dense (16, 16)
  # beside a raw PyTorch-layout `weight` was read (out, in). Now the kernels of the nearest module
  # above it that shows a layout decide (a `weight` is no kernel), and where they show both it is
  # a guess.
  block = {
    "c_attn": {"kernel": np.zeros((12, 4)), "bias": np.zeros(12)},
    "c_proj": {"kernel": np.zeros((4, 4)), "bias": np.zeros(4)},
  }
  params = {
    "h": {"0": {"attn": block}},
    "value_head": {"kernel": np.zeros((4, 1)), "bias": np.zeros(1)},
  }
  hessian_diag = jax.tree.map(lambda x: rng.random(x.shape), params)
  got = _nu_after_one_step(ah.scale_by_adahessian(b2=0.5, block_size=2), params, hessian_diag)
  for name in block:
    want = block_average(np.asarray(hessian_diag["h"]["0"]["attn"][name]["kernel"]), 2, axis=1)
    np.testing.assert_allclose(got["h"]["0"]["attn"][name]["kernel"], want, rtol=1e-6)
  want = block_average(np.asarray(hessian_diag["value_head"]["kernel"]), 2, axis=0)
  np.testing.assert_allclose(got["value_head"]["kernel"], want, rtol=1e-6)
  assert not spatial.describe(params, block_size=2).ambiguous
  flax = {
    "Dense_0": {"kernel": np.zeros((4, 4)), "bias": np.zeros(4)},
    "proj": {"weight": np.zeros((2, 4)), "bias": np.zeros(2)},
  }
  rows = {r.path: r for r in spatial.describe(flax, block_size=2).rows}
  assert rows["['Dense_0']['kernel']"].rule == spatial.blocks(2, axis=0)
  assert not rows["['Dense_0']['kernel']"].ambiguous
  # Side by side, a FlaxConv1D (12, 4) and a Dense (4, 10) leave the square one a guess.
  mixed = {**block, "head": {"kernel": np.zeros((4, 10)), "bias": np.zeros(10)}}
  rows = {r.path: r for r in spatial.describe(mixed, block_size=2).rows}
  assert [p for p, r in rows.items() if r.ambiguous] == ["['c_proj']['kernel']"]
  assert "show both" in rows["['c_proj']['kernel']"].why
  assert not spatial.describe(mixed, block_size=1).ambiguous


def _scanned_gpt2(layers, d, kernel="kernel", flax=False):
  """A GPT-2 block stacked by a scan, raw: FlaxConv1D kernels (layers, out, in) beside their
  biases (layers, out), or Flax Dense kernels (layers, in, out) with ``flax``."""

  def linear(n_in, n_out):
    shape = (layers, n_in, n_out) if flax else (layers, n_out, n_in)
    return {kernel: np.zeros(shape), "bias": np.zeros((layers, n_out))}

  norm = {"scale": np.zeros((layers, d)), "bias": np.zeros((layers, d))}
  return {
    "wte": np.zeros((50, d)),
    "wpe": np.zeros((16, d)),
    "h": {
      "attn": {"c_attn": linear(d, 3 * d), "c_proj": linear(d, d)},
      "mlp": {"c_fc": linear(d, 4 * d), "c_proj": linear(4 * d, d)},
      "ln_1": norm,
      "ln_2": norm,
    },
    "ln_f": {"scale": np.zeros(d), "bias": np.zeros(d)},
  }


def test_a_scanned_flaxconv1d_kernel_is_read_output_axis_first_per_layer(rng):
  # GPT-2's FlaxConv1D kernels (out, in), scanned: (layers, out, in) beside biases (layers,
  # out). The bias settled only rank-2 kernels, so these were read as Flax's (in, out) per
  # layer, blocked across their output units, unflagged.
  params = _scanned_gpt2(3, 8)
  kernels = [
    "['h']['attn']['c_attn']['kernel']",
    "['h']['attn']['c_proj']['kernel']",  # square, (3, 8, 8): as its neighbours show
    "['h']['mlp']['c_fc']['kernel']",
    "['h']['mlp']['c_proj']['kernel']",
  ]
  for block_size in (2, 3):
    rows = {r.path: r for r in spatial.describe(params, block_size=block_size).rows}
    assert not [p for p, r in rows.items() if r.ambiguous]
    for path in kernels:
      assert rows[path].rule == spatial.per_layer(spatial.blocks(block_size, axis=1)), path
    assert "a bias of its first axis" in rows[kernels[0]].why
  hessian_diag = jax.tree.map(lambda x: rng.random(x.shape), params)
  got = _nu_after_one_step(ah.scale_by_adahessian(b2=0.5, block_size=2), params, hessian_diag)
  for module, name in (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc")):
    want = block_average(np.asarray(hessian_diag["h"][module][name]["kernel"]), 2, axis=2)
    np.testing.assert_allclose(got["h"][module][name]["kernel"], want, rtol=1e-6, err_msg=name)
  # Flax's Dense twin (layers, in, out) keeps Flax's reading, and PyTorch's names read as the
  # kernels do, the square c_proj weight no guess now.
  flax_rows = spatial.describe(_scanned_gpt2(3, 8, flax=True), block_size=2).rows
  torch_rows = spatial.describe(_scanned_gpt2(3, 8, kernel="weight"), block_size=2).rows
  assert not [r.path for r in (*flax_rows, *torch_rows) if r.ambiguous]
  for row in flax_rows:
    if row.path.endswith("['kernel']"):
      assert row.rule == spatial.per_layer(spatial.blocks(2, axis=0)), row.path
  for row in torch_rows:
    if row.path.endswith("['weight']"):
      assert row.rule == spatial.per_layer(spatial.blocks(2, axis=1)), row.path
  # Each square c_proj follows the kernels of its own block; beside both layouts, a guess.
  both = {"gpt": _scanned_gpt2(3, 8)["h"], "dense": _scanned_gpt2(3, 8, flax=True)["h"]}
  rows = {r.path: r for r in spatial.describe(both, block_size=2).rows}
  assert not [p for p, r in rows.items() if r.ambiguous]
  for block, axis in (("gpt", 1), ("dense", 0)):
    for module, name in (("attn", "c_proj"), ("mlp", "c_fc")):
      rule = rows[f"['{block}']['{module}']['{name}']['kernel']"].rule
      assert rule == spatial.per_layer(spatial.blocks(2, axis)), (block, name)
  head = {"kernel": np.zeros((3, 8, 10)), "bias": np.zeros((3, 10))}  # Flax (layers, in, out)
  mixed = {**_scanned_gpt2(3, 8)["h"]["attn"], "head": head}
  rows = {r.path: r for r in spatial.describe(mixed, block_size=2).rows}
  assert [p for p, r in rows.items() if r.ambiguous] == ["['c_proj']['kernel']"]
  assert "show both" in rows["['c_proj']['kernel']"].why


@pytest.mark.filterwarnings(
  "ignore::adahessian_jax.spatial.LayoutGuessWarning"
)  # guesses on purpose
def test_a_flax_vmap_over_axis_1_is_not_read_output_axis_first():
  # nn.vmap with variable_axes={"params": 1} over a square Dense: kernel (in, members, out),
  # bias (out, members), which is also the kernel's leading axes, as a scanned FlaxConv1D's
  # (layers, out, in) beside (layers, out) is. Two readings: the rank's guess stays, flagged.
  ensemble = {"ff": {"kernel": np.zeros((8, 4, 8)), "bias": np.zeros((8, 4))}}
  (row,) = [r for r in spatial.describe(ensemble, block_size=2).rows if "kernel" in r.path]
  assert row.ambiguous and row.rule == spatial.mean_over((0,))


def test_a_haiku_norm_offset_is_a_bias_never_blocked_across_layers(rng):
  # An hk.layer_stack gives its LayerNorm an offset (layers, features) under a flat module name
  # beside the stack's other modules: taken for a Dense kernel, it was blocked across layers.
  params = {
    "stack/~/linear": {"w": np.zeros((4, 6, 6)), "b": np.zeros((4, 6))},
    "stack/~/layer_norm": {"scale": np.zeros((4, 6)), "offset": np.zeros((4, 6))},
    "embed": {"embeddings": np.zeros((9, 6))},
  }
  hessian_diag = jax.tree.map(lambda x: rng.random(x.shape), params)
  got = _nu_after_one_step(ah.scale_by_adahessian(b2=0.5, block_size=2), params, hessian_diag)
  offset = np.asarray(hessian_diag["stack/~/layer_norm"]["offset"])
  np.testing.assert_allclose(got["stack/~/layer_norm"]["offset"], offset, rtol=1e-6)
  rows = {r.path: r for r in spatial.describe(params, block_size=2).rows}
  assert rows["['stack/~/layer_norm']['offset']"].rule == spatial.none()


class _BiaslessBlock(nn.Module):
  """A block whose only evidence of the scan is its attention's rank-4 kernels: no bias, no
  Dense_N (the Dense has a name of the user's own), a LayerNorm."""

  @nn.compact
  def __call__(self, x, _):
    attention = nn.MultiHeadDotProductAttention(2, qkv_features=8, use_bias=False, name="attn")
    x = x + attention(nn.LayerNorm(name="norm")(x))
    return x + nn.Dense(6, use_bias=False, name="up")(x), None


def _check_scan_per_layer(block, features, norm, out, rng):
  """Checks one step on an ``nn.scan`` of 3 ``block`` layers without names, ``block_size=2``:
  no leaf is a guess, every leaf's axis 0 is named layers, the norms (paths with ``norm``) are
  not averaged, and every kernel is, per layer, in blocks of 2 inputs (the output projection's,
  paths with ``out``, within one head), against NumPy loops. Returns the params."""
  scan = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
  params = {"blocks": zero_params(scan(), np.ones((1, 5, features)), None)}
  hessian_diag = jax.tree.map(lambda x: rng.random(x.shape), params)
  got = _nu_after_one_step(ah.scale_by_adahessian(b2=0.5, block_size=2), params, hessian_diag)
  rows = {r.path: r for r in spatial.describe(params, block_size=2).rows}
  assert not [p for p, r in rows.items() if r.ambiguous]
  leaves = jax.tree_util.tree_flatten_with_path(hessian_diag)[0]
  for (path, d), value in zip(leaves, jax.tree.leaves(got), strict=True):
    where, d = jax.tree_util.keystr(path), np.asarray(d)
    if norm in where:
      want = d
    else:
      axis = 1 if out in where else 0
      want = np.stack([block_average(layer, 2, axis=axis) for layer in d])
    np.testing.assert_allclose(value, want, rtol=1e-6, err_msg=where)
    assert rows[where].names[0] == "layers", rows[where]
  return params


def test_an_nnx_vmap_of_lora_keeps_its_layers_apart():
  # nnx.vmap of nnx.LoRA without names: lora_a (layers, in, rank) and lora_b (layers, rank, out)
  # had no evidence and were taken for 1-D Conv kernels, averaged across the 3 layers (flagged).
  # One layer's lora_a and lora_b are (in, rank) and (rank, out): the rest is stacked.
  make = nnx.vmap(lambda r: nnx.LoRA(5, 2, 6, rngs=r), in_axes=0, out_axes=0)
  lora = nnx.eval_shape(lambda: make(nnx.Rngs(0).split(3)))
  params = nnx.as_pure(nnx.state(lora, nnx.Param))
  rows = {r.path: r for r in spatial.describe(params, block_size=4).rows}
  assert [r.ambiguous for r in rows.values()] == [False, False]
  assert rows["['lora_a']"].rule == rows["['lora_b']"].rule == spatial.per_layer(spatial.blocks(4))
  assert rows["['lora_a']"].groups == {4: 3 * 2, 1: 3 * 2}  # inputs 0-3 and 4 of each rank unit
  single = nnx.as_pure(nnx.state(nnx.eval_shape(lambda: nnx.LoRA(5, 2, 6, rngs=nnx.Rngs(0)))))
  assert spatial.describe(single, block_size=4).rows[0].rule == spatial.blocks(4)


def test_a_scan_of_biasless_attention_is_shown_by_its_rank_4_kernels(rng):
  # nn.scan without names over attention built with use_bias=False: the kernels (3, 6, 2, 4) and
  # (3, 2, 4, 6) were taken for 2-D Conv kernels, averaged across the 3 layers (even at block_size
  # 1), and the Dense 'up' (3, 6, 6) across layers too. One layer's query and out kernels are
  # (embed, heads, head_dim) and (heads, head_dim, embed): the leading axis of both is a stack.
  params = _check_scan_per_layer(_BiaslessBlock, 6, "['norm']", "['out']", rng)
  assert layer_axes_of(params) == [(0,)] * 7
  # Where embed = heads, the shapes are also those of 2-D Conv kernels named query/out (or of a
  # stack of stacks of Dense kernels): still the rank's guess, listed as ambiguous.
  same = {"query": {"kernel": np.zeros((3, 2, 2, 4))}, "out": {"kernel": np.zeros((3, 2, 4, 2))}}
  listing = spatial.describe({"attn": same}, block_size=2)
  assert [r.ambiguous for r in listing.rows] == [True, True]
  assert [r.rule for r in listing.rows] == [spatial.mean_over((0, 1))] * 2
  # A bias-less Conv initialised on its own holds its rank-4 kernel at the root (no module).
  alone = zero_params(nn.Conv(4, (3, 3), use_bias=False), np.ones((1, 5, 5, 2)))
  assert spatial.describe(alone).rows[0].rule == spatial.mean_over((0, 1))


class _CrossAttentionBlock(nn.Module):
  """Bias-less cross-attention: queries of 8 features, keys and values of 5, outputs of 6."""

  @nn.compact
  def __call__(self, x, context):
    attention = nn.MultiHeadDotProductAttention(
      num_heads=2, qkv_features=12, out_features=6, use_bias=False
    )
    return x, attention(x, context)  # the carry unchanged: out_features differs


def test_a_scan_of_biasless_attention_with_other_output_features_keeps_its_layers_apart():
  # out_features (6) is not the query's input features (8): the out kernel (3, 2, 6, 6) ends in
  # 6, and the stack showed only where it ended in the query's 8. The kernels were 2-D Conv
  # kernels by rank, averaged across the 3 layers and the inputs (flagged: a LayoutGuessWarning).
  # One layer's out kernel is (heads, head_dim, out_features), whatever out_features is.
  scan = nn.scan(
    _CrossAttentionBlock,
    variable_axes={"params": 0},
    split_rngs={"params": True},
    in_axes=nn.broadcast,
    length=3,
  )
  x, context = jnp.zeros((1, 4, 8)), jnp.zeros((1, 7, 5))
  params = jax.eval_shape(scan(name="blocks").init, jax.random.key(0), x, context)["params"]
  listing = spatial.describe(params, spatial.strict(), block_size=2)
  rows = {r.path.split("['")[-2].rstrip("']"): r for r in listing.rows}
  assert {k: r.shape for k, r in rows.items()} == {
    "key": (3, 5, 2, 6),
    "out": (3, 2, 6, 6),
    "query": (3, 8, 2, 6),
    "value": (3, 5, 2, 6),
  }
  for name in ("query", "key", "value"):  # blocks of inputs, per head and layer
    assert rows[name].rule == spatial.per_layer(spatial.blocks(2, axis=0), axes=(0,)), name
  assert rows["out"].rule == spatial.per_layer(spatial.blocks(2, axis=1), axes=(0,))
  assert rows["out"].groups == {2: 3 * 2 * 3 * 6}  # 3 layers x 2 heads x 3 blocks x 6 outputs


class _LlamaBlock(nn.Module):
  """A bias-less block of attention with names of its own (grouped-query) and an MLP."""

  @nn.compact
  def __call__(self, x, _):
    x = x + _CustomAttention(use_bias=False, name="attn")(nn.RMSNorm()(x))
    up = nn.Dense(16, use_bias=False, name="up")(nn.RMSNorm()(x))
    return x + nn.Dense(10, use_bias=False, name="down")(nn.silu(up)), None


def test_a_scan_of_biasless_attention_of_other_names_keeps_its_layers_apart(rng):
  # nn.scan without names over a Llama-style block: every kernel bias-less, under names of its
  # own. The attention's rank-4 kernels (3, 10, 4, 3) and (3, 4, 3, 10) were 2-D Conv kernels by
  # rank, averaged across the 3 layers (at block_size 1 too), and so were up/down (3, 10, 16).
  # Their shapes show one layer's attention under a leading axis: a stack, which the block's
  # other kernels then share.
  _check_scan_per_layer(_LlamaBlock, 10, "RMSNorm", "['o_proj']", rng)


def test_an_equinox_ensemble_keeps_its_members_apart_by_the_biases(rng):
  # eqx.filter_vmap stacks every leaf of a model: a Linear weight (3, out, in) with bias (3, out),
  # a Conv weight (3, out, in, kh, kw) with bias (3, out, 1, 1). Taken for one layer's Conv
  # weights, they were averaged over all their inputs (even at block_size 1) and the members'
  # norm weights (3, 6) blocked across members. One layer's bias is its weight's output axis
  # ((out,) or (out, 1, 1)), so the axes before it are stacked; a head whose bias is (out,) is one
  # layer and takes no stack from the ensemble beside it.
  shapes = {
    "ensemble": {
      "linear": {"weight": (3, 5, 6), "bias": (3, 5)},
      "conv": {"weight": (3, 4, 2, 3, 3), "bias": (3, 4, 1, 1)},
      "norm": {"weight": (3, 6)},
    },
    "m": {"stack": {"weight": (3, 5, 6), "bias": (3, 5)}, "head": {"weight": (3, 6), "bias": (3,)}},
  }
  params = jax.tree.map(np.zeros, shapes, is_leaf=lambda x: isinstance(x, tuple))
  hessian_diag = jax.tree.map(lambda x: rng.random(x.shape), params)
  got = _nu_after_one_step(ah.scale_by_adahessian(b2=0.5, block_size=2), params, hessian_diag)
  d = jax.tree.map(np.asarray, hessian_diag)
  per_member = lambda x: np.stack([block_average(layer, 2, axis=1) for layer in x])
  want = {
    "ensemble": {
      "linear": {"weight": per_member(d["ensemble"]["linear"]["weight"])},
      "conv": {"weight": d["ensemble"]["conv"]["weight"].mean(axis=(3, 4), keepdims=True)},
      "norm": {"weight": d["ensemble"]["norm"]["weight"]},
    },
    "m": {
      "stack": {"weight": per_member(d["m"]["stack"]["weight"])},
      "head": {"weight": block_average(d["m"]["head"]["weight"], 2, axis=1)},
    },
  }
  for module in ("ensemble", "m"):
    for leaf, value in want[module].items():
      expected = np.broadcast_to(value["weight"], d[module][leaf]["weight"].shape)
      np.testing.assert_allclose(got[module][leaf]["weight"], expected, rtol=1e-6, err_msg=leaf)
      if "bias" in d[module][leaf]:
        np.testing.assert_allclose(got[module][leaf]["bias"], d[module][leaf]["bias"], rtol=1e-6)
  rows = [r.path for r in spatial.describe(params).rows]
  axes = dict(zip(rows, layer_axes_of(params), strict=True))
  assert [p for p, a in axes.items() if a != (0,)] == [
    "['m']['head']['bias']",
    "['m']['head']['weight']",
  ]
  # An output of size 1 lets the bias (3, 1) be a 1-D Conv's (out, 1) too: the stack is unknown.
  one = spatial.describe({"weight": np.zeros((3, 1, 6)), "bias": np.zeros((3, 1))}).rows
  assert (one[1].rule, one[1].ambiguous) == (spatial.mean_over((2,)), True)


def test_an_equinox_conv_of_one_input_channel_beside_single_layers_is_one_layer(rng):
  # Equinox's MNIST tutorial CNN: eqx.nn.Conv2d(1, 3, 4), weight (3, 1, 4, 4), bias (3, 1, 1),
  # then Linears in a list. The input axis of size 1 lets the bias also be 3 stacked Conv1d(4,
  # 1)'s (1, 1), so the first layer of every grayscale Equinox CNN was a LayoutGuessWarning
  # whose reason (a Flax kernel named 'weight') was not the ambiguity. The Linears beside it
  # are one layer each: so is it.
  shapes = {
    "layers": [
      {"weight": (3, 1, 4, 4), "bias": (3, 1, 1)},
      {"weight": (5, 12), "bias": (5,)},
      {"weight": (2, 5), "bias": (2,)},
    ]
  }
  params = jax.tree.map(np.zeros, shapes, is_leaf=lambda x: isinstance(x, tuple))
  hessian_diag = jax.tree.map(lambda x: rng.normal(size=x.shape), params)
  tx = ah.scale_by_adahessian(b2=0.5, block_size=2)
  got = _nu_after_one_step(tx, params, hessian_diag)  # no LayoutGuessWarning: an error here
  d = np.abs(np.asarray(hessian_diag["layers"][0]["weight"]))
  want = np.broadcast_to(d.mean(axis=(2, 3), keepdims=True), d.shape)
  np.testing.assert_allclose(got["layers"][0]["weight"], want, rtol=1e-6)
  row = spatial.describe(params, block_size=2).rows[1]
  assert (row.path, row.rule, row.ambiguous) == (
    "['layers'][0]['weight']",
    spatial.mean_over((2, 3)),
    False,
  )
  # Alone, or a Conv1d(1, 8) (8, 1, 3) beside one layer (8 stacked Linear(3, 1) fit as well, a
  # shared trunk's ensemble of heads): still a guess, now saying which.
  lone = {"weight": np.zeros((8, 1, 3, 3)), "bias": np.zeros((8, 1, 1))}
  heads = {"heads": {"weight": np.zeros((8, 1, 3)), "bias": np.zeros((8, 1))}, **params}
  for tree, path in ((lone, "['weight']"), (heads, "['heads']['weight']")):
    row = next(r for r in spatial.describe(tree).rows if r.path == path)
    assert row.ambiguous, path
    assert "its input axis having size 1, also a stack of 8 layers' of output size 1" in row.why
    assert "Flax-layout" not in row.why


class _DenseGenerals(nn.Module):
  @nn.compact
  def __call__(self, x):  # x: (3, 2, 6)
    heads = nn.DenseGeneral((2, 4))(x)  # kernel (6, 2, 4), bias (2, 4)
    joined = nn.DenseGeneral(5, axis=(-2, -1))(heads)  # kernel (2, 4, 5), bias (5,)
    batched = nn.DenseGeneral((2, 4), batch_dims=0)(x)  # kernel (3, 6, 2, 4), bias (3, 2, 4)
    return joined.sum() + batched.sum()


def test_a_linen_dense_general_beside_its_bias_blocks_its_inputs(rng):
  # Linen's name DenseGeneral_N with a bias that is its kernel's trailing axes (the output axes)
  # shows a DenseGeneral kernel (*in, *out): blocks along its last input axis, as for the
  # flattened Dense, so axis=(-2, -1) over (heads, head_dim) keeps each head apart. By rank these
  # were taken for Conv kernels, averaged over all their inputs (even at block_size 1) and listed
  # as ambiguous; a batch_dims kernel per batch slice.
  params = zero_params(_DenseGenerals(), np.ones((3, 2, 6)))
  hessian_diag = jax.tree.map(lambda x: rng.random(x.shape), params)
  got = _nu_after_one_step(ah.scale_by_adahessian(b2=0.5, block_size=4), params, hessian_diag)
  d = jax.tree.map(np.asarray, hessian_diag)
  for name, axis in (("DenseGeneral_0", 0), ("DenseGeneral_1", 1)):
    want = block_average(d[name]["kernel"], 4, axis=axis)
    np.testing.assert_allclose(got[name]["kernel"], want, rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(got[name]["bias"], d[name]["bias"], rtol=1e-6)
  batched = np.stack([block_average(x, 4) for x in d["DenseGeneral_2"]["kernel"]])
  np.testing.assert_allclose(got["DenseGeneral_2"]["kernel"], batched, rtol=1e-6)
  listing = spatial.describe(params, block_size=4)
  assert not listing.ambiguous
  assert layer_axes_of(params) == [(), (), (), (), (0,), (0,)]
  # A custom attention's output projection: 4 heads of 8, never averaged across heads.
  out = {"DenseGeneral_3": {"kernel": np.zeros((4, 8, 16)), "bias": np.zeros((16,))}}
  row = spatial.describe(out, block_size=8).rows[1]
  assert (row.names, row.rule, row.ambiguous) == (
    ("heads", "features", "features"),
    spatial.blocks(8, axis=1),
    False,
  )
  # A bias that fits two ways (kernel (6, 6, 4), bias (6, 4): one layer, or a batch of 6 Dense
  # kernels (6, 4)) leaves the rank's guess, listed as ambiguous.
  two = {"DenseGeneral_0": {"kernel": np.zeros((6, 6, 4)), "bias": np.zeros((6, 4))}}
  row = spatial.describe(two).rows[1]
  assert (row.rule, row.ambiguous) == (spatial.mean_over((0,)), True)


class _ScannedDenseGeneral(nn.Module):
  """``nn.scan`` of 2 ``DenseGeneral((3, 4))`` under a name of your own: kernel (2, 3, 3, 4) beside
  its bias (2, 3, 4), which fits 1 stacked axis or 2 (2 x 3 ``Dense(4)``), and no Linen scan name
  says which."""

  @nn.compact
  def __call__(self, x):
    class Layer(nn.Module):
      @nn.compact
      def __call__(self, x, _):
        return nn.DenseGeneral((3, 4), name="proj")(x)[..., 0, :3], None

    return scan_layers(Layer, length=2, partition_name=None)(name="blocks")(x, None)[0]


def test_a_bias_that_fits_several_stacks_keeps_at_least_the_fewest_apart():
  # Kernel (2, 3, 3, 4) beside bias (2, 3, 4): a stack of 2 DenseGeneral((3, 4)) or of 2 x 3
  # Dense(4); either way axis 0 is one per layer. It is kept apart, and the kernel's reading per
  # layer is a flagged guess (strict refuses it). Read by rank alone, the kernel was a 2-D Conv's
  # and averaged across its 2 layers, flagged too.
  params = zero_params(_ScannedDenseGeneral(), np.ones((2, 3)))["blocks"]["proj"]
  rows = {r.path: r for r in spatial.describe(params, block_size=2).rows}
  kernel, bias = rows["['kernel']"], rows["['bias']"]
  assert (kernel.shape, bias.shape) == ((2, 3, 3, 4), (2, 3, 4))
  assert "repeats the kernel's leading axes (2,) or more: at least one per layer" in kernel.why
  assert bias.rule == spatial.per_layer(spatial.none(), axes=(0,)) and not bias.ambiguous
  assert kernel.rule.axes == (0,) and kernel.ambiguous
  h = {"bias": np.ones((2, 3, 4)), "kernel": np.ones((2, 3, 3, 4))}
  h = jax.tree.map(lambda x: x * np.array([1.0, 10.0]).reshape((2,) + (1,) * (x.ndim - 1)), h)
  got = averaged(spatial.resolve_rules(None, params, 2), h)
  for leaf in ("bias", "kernel"):
    np.testing.assert_array_equal(np.asarray(got[leaf][0]), 1.0, err_msg=leaf)
    np.testing.assert_array_equal(np.asarray(got[leaf][1]), 10.0, err_msg=leaf)
  with pytest.raises(ValueError, match=r"1 leaf is ambiguous"):
    spatial.describe(params, spatial.strict(), 2)


@pytest.mark.filterwarnings(
  "ignore::adahessian_jax.spatial.LayoutGuessWarning"
)  # guesses on purpose
def test_learned_position_tables_keep_their_rows_apart(rng):
  # A learned position table is a raw param (an nnx.Param, self.param in Linen), not an Embed:
  # by rank a (length, features) table was a Dense kernel, blocked across positions, and ViT's
  # (1, length, features) a 1-D Conv kernel. A word of a table in the name keeps rows apart:
  # also GPT-2's raw wte (vocab, embed) and wpe (positions, embed), blocked across tokens before.
  params = {
    "pos": np.zeros((6, 4)),
    "wte": np.zeros((6, 4)),
    "wpe": np.zeros((6, 4)),
    "pos_embedding": np.zeros((1, 6, 4)),
    "position_embeddings": np.zeros((6, 4)),
    "embed_w": np.zeros((6, 4)),  # a table, or a kernel so named: a guess
    "proj": {"kernel": np.zeros((6, 4))},  # a Dense kernel: blocks of inputs, as before
  }
  hessian_diag = jax.tree.map(lambda x: rng.random(x.shape), params)
  got = _nu_after_one_step(ah.scale_by_adahessian(b2=0.5, block_size=2), params, hessian_diag)
  d = jax.tree.map(np.asarray, hessian_diag)
  for key in ("pos", "wte", "wpe", "position_embeddings", "embed_w"):
    np.testing.assert_allclose(got[key], block_average(d[key], 2, axis=1), rtol=1e-6)
  want = block_average(d["pos_embedding"], 2, axis=2)
  np.testing.assert_allclose(got["pos_embedding"], want, rtol=1e-6)
  np.testing.assert_allclose(
    got["proj"]["kernel"], block_average(d["proj"]["kernel"], 2), rtol=1e-6
  )
  rows = {r.path: r for r in spatial.describe(params, block_size=2).rows}
  assert [path for path, row in rows.items() if row.ambiguous] == ["['embed_w']"]
  assert not spatial.describe(params, block_size=1).ambiguous  # nothing averaged: no guess


def test_a_pytorch_weight_of_another_name_is_settled_by_its_bias_of_that_name():
  # torch.nn.MultiheadAttention's in_proj_weight (3E, E) beside in_proj_bias (3E,), an LSTM's
  # weight_ih_l0 beside bias_ih_l0: only a plain weight was paired with a plain bias, so these
  # stayed guesses at block_size > 1 (their reading, blocks along axis 1, was right) and init
  # warned on every converted PyTorch transformer or LSTM. Flattened keys pair the same way.
  params = {
    "attn": {"in_proj_weight": np.zeros((24, 8)), "in_proj_bias": np.zeros(24)},
    "lstm": {
      "weight_ih_l0": np.zeros((16, 6)),
      "bias_ih_l0": np.zeros(16),
      "weight_hh_l0": np.zeros((16, 4)),
      "bias_hh_l0": np.zeros(16),
    },
    "rnn.weight_ih_l0": np.zeros((16, 6)),
    "rnn.bias_ih_l0": np.zeros(16),
    "alone": {"in_proj_weight": np.zeros((24, 8))},  # no bias: still a guess
  }
  rows = {r.path: r for r in spatial.describe(params, block_size=2).rows}
  for path in (
    "['attn']['in_proj_weight']",
    "['lstm']['weight_ih_l0']",
    "['lstm']['weight_hh_l0']",
    "['rnn.weight_ih_l0']",
  ):
    assert rows[path].rule == spatial.blocks(2, axis=1) and not rows[path].ambiguous, path
  assert rows["['alone']['in_proj_weight']"].ambiguous


def test_equinox_recurrent_cells_share_one_bias_between_their_weights():
  # eqx.nn.GRUCell holds weight_ih (3h, in), weight_hh (3h, h), bias (3h,), bias_n (h,);
  # eqx.nn.LSTMCell weight_ih (4h, in), weight_hh (4h, h), bias (4h,). The one plain bias was
  # paired with one of the two weights only, so the other stayed a guess at block_size > 1 (its
  # reading, blocks along axis 1, was right): init warned on every Equinox RNN, and strict mode
  # refused it.
  params = {
    "gru": {
      "weight_ih": np.zeros((30, 7)),
      "weight_hh": np.zeros((30, 10)),
      "bias": np.zeros(30),
      "bias_n": np.zeros(10),
    },
    "lstm": {
      "weight_ih": np.zeros((48, 10)),
      "weight_hh": np.zeros((48, 12)),
      "bias": np.zeros(48),
    },
    "head": {"weight": np.zeros((3, 12)), "bias": np.zeros(3)},
  }
  listing = spatial.describe(params, spatial.strict(), block_size=8)
  assert listing.ambiguous == ()
  rows = {r.path: r for r in listing.rows}
  for path in ("['gru']['weight_ih']", "['gru']['weight_hh']", "['lstm']['weight_hh']"):
    assert rows[path].rule == spatial.blocks(8, axis=1), path
    assert "a bias of its first axis" in rows[path].why, path
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    ah.adahessian(0.1, block_size=8).init(params)


def test_learned_rows_of_other_kinds_keep_their_rows_apart():
  # A Perceiver's latents (num_latents, d), a DETR's raw queries, prefix tuning's prefix, a
  # VQ-VAE's codebook, a Q-Former's query_tokens, slot attention's slots, a Set Transformer's
  # inducing points, prototypes, centroids, anchors, raw positional tables: by rank each was a
  # Dense kernel, blocked along axis 0, across the rows, unflagged.
  learned = ("latents", "queries", "prefix", "codebook", "query_tokens", "register_tokens")
  learned += ("slots", "inducing_points", "prototypes", "cluster_centroids", "anchors", "pe")
  learned += ("posemb",)
  params = {key: np.zeros((4 + i, 8)) for i, key in enumerate(learned)}
  params["proj"] = {"kernel": np.zeros((8, 8))}
  rows = {r.path: r for r in spatial.describe(params, block_size=4).rows}
  for key in learned:
    row = rows[f"['{key}']"]
    assert row.rule == spatial.blocks(4, axis=1) and not row.ambiguous, key
  assert rows["['proj']['kernel']"].rule == spatial.blocks(4, axis=0)


def test_a_table_named_a_table_keeps_its_rows_apart(rng):
  # A raw token_table or lookup_table (vocab, embed) was a Dense kernel by rank: blocked along
  # axis 0, averaging the curvature of 4 consecutive tokens, unflagged (a leaf named just
  # 'table' was a flagged guess). Stacked per layer, each layer's table keeps its rows apart.
  params = {
    "token_table": np.zeros((10, 8)),
    "lookup_table": np.zeros((10, 8)),
    "blocks": {"rel_table": np.zeros((3, 10, 8))},
    "q_table": np.zeros((10, 8)),  # another word too: a kernel's name, maybe
  }
  rows = {r.path: r for r in spatial.describe(params, block_size=4).rows}
  for key in ("['token_table']", "['lookup_table']"):
    assert rows[key].rule == spatial.blocks(4, axis=1) and not rows[key].ambiguous, key
  assert rows["['q_table']"].rule == spatial.blocks(4, axis=1) and rows["['q_table']"].ambiguous
  hessian_diag = jax.tree.map(lambda p: rng.uniform(1.0, 2.0, p.shape), params)
  got = averaged(spatial.resolve_rules(None, params, block_size=4), hessian_diag)
  d = hessian_diag["token_table"]
  want = np.stack([block_average(row, 4) for row in d])  # each token's row on its own
  np.testing.assert_allclose(got["token_table"], want, rtol=1e-12)
  table = hessian_diag["blocks"]["rel_table"]
  want = np.stack([[block_average(row, 4) for row in layer] for layer in table])
  np.testing.assert_allclose(got["blocks"]["rel_table"], want, rtol=1e-12)


def test_a_leaf_with_size_one_axes_but_the_last_is_no_guess():
  # ViT's class token (1, 1, features): a Conv kernel, a DenseGeneral kernel and a stack of layers
  # all average nothing there, but strict mode refused it as a guess, even at block_size 1.
  params = {"cls": np.zeros((1, 1, 8)), "kernel": np.zeros((1, 3, 8))}
  rows = {r.path: r for r in spatial.describe(params, block_size=4).rows}
  assert rows["['cls']"].rule == spatial.none() and not rows["['cls']"].ambiguous
  assert rows["['kernel']"].ambiguous  # (1, 3, 8): a stack's blocks along the 3 would average
  spatial.describe({"cls": params["cls"]}, spatial.strict(), block_size=4)


def test_size_one_leading_axes_are_no_guess_at_block_size_one():
  # Learned memory tokens (1, 4, features), a position table under a name of no table's word
  # (1, 1, length, features): every reading (a Conv kernel's mean over axis 0, a DenseGeneral's or
  # a stack's blocks of 1) averages nothing at the default block_size 1, yet init warned
  # (LayoutGuessWarning) and strict mode refused them. With blocks of 4 a stack's reading would
  # average along axis 1, so the guess stays flagged there.
  params = {
    "memory": jnp.zeros((1, 4, 8)),
    "enc": jnp.zeros((1, 1, 5, 8)),
    "head": {"kernel": jnp.zeros((8, 3)), "bias": jnp.zeros(3)},
  }
  rows = {r.path: r for r in spatial.describe(params, block_size=1).rows}
  for key in ("memory", "enc"):
    assert rows[f"['{key}']"].rule == spatial.none() and not rows[f"['{key}']"].ambiguous, key
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    ah.adahessian(0.1, averaging=spatial.strict()).init(params)
    ah.adahessian(0.1).init(params)
  rows = {r.path: r for r in spatial.describe(params, block_size=4).rows}
  assert rows["['memory']"].rule == spatial.mean_over((0,)) and rows["['memory']"].ambiguous
  assert rows["['enc']"].rule == spatial.mean_over((0, 1)) and rows["['enc']"].ambiguous
  with pytest.warns(spatial.LayoutGuessWarning, match=r"(?s)2 leaves.*\['enc'\].*\['memory'\]"):
    ah.adahessian(0.1, block_size=4).init(params)


@pytest.mark.filterwarnings(
  "ignore::adahessian_jax.spatial.LayoutGuessWarning"
)  # guesses on purpose
def test_keys_of_a_flattened_tree_are_read_by_their_last_part(rng):
  # A PyTorch state dict loaded as a flat dict ('blocks.0.fc.weight') and a Flax tree flattened
  # with sep="/" ('attn/query/bias') kept their whole keys as names, so neither the PyTorch
  # layout nor the never-averaged bias was recognised: the (out, in) weight was blocked across
  # its outputs and the (heads, head_dim) bias across heads, unflagged.
  params = {
    "blocks.0.fc.weight": np.zeros((4, 6)),
    "attn/query/bias": np.zeros((2, 4)),
  }
  hessian_diag = jax.tree.map(lambda x: rng.random(x.shape), params)
  got = _nu_after_one_step(ah.scale_by_adahessian(b2=0.5, block_size=2), params, hessian_diag)
  d = jax.tree.map(np.asarray, hessian_diag)
  want = block_average(d["blocks.0.fc.weight"], 2, axis=1)
  np.testing.assert_allclose(got["blocks.0.fc.weight"], want, rtol=1e-6)
  np.testing.assert_allclose(got["attn/query/bias"], d["attn/query/bias"], rtol=1e-6)


def test_a_flattened_tree_pairs_each_kernel_with_its_own_modules_bias(rng):
  # Every leaf of a flat dict had the same module (its path without the last key: none), so a
  # kernel was paired with another module's bias: the Dense kernel (8, 4) beside the norm's bias
  # (8,) was taken for Hugging Face's (out, in) and blocked across its 4 outputs, unflagged.
  params = {
    "dense/kernel": np.zeros((8, 4)),
    "dense/bias": np.zeros(4),
    "norm/bias": np.zeros(8),
    "norm/scale": np.zeros(8),
  }
  hessian_diag = jax.tree.map(lambda x: rng.random(x.shape), params)
  got = _nu_after_one_step(ah.scale_by_adahessian(b2=0.5, block_size=2), params, hessian_diag)
  want = block_average(np.asarray(hessian_diag["dense/kernel"]), 2, axis=0)
  np.testing.assert_allclose(got["dense/kernel"], want, rtol=1e-6)
  assert not spatial.describe(params, block_size=2).ambiguous
  # Its leading parts name its module everywhere: a scanned block's bias-less Conv beside a norm's
  # (layers, channels) scale stays a guess, as in the nested tree.
  nested = {
    "Conv_0": {"kernel": np.zeros((3, 3, 3, 4, 4))},
    "norm": {"scale": np.zeros((3, 4)), "bias": np.zeros((3, 4))},
  }
  flat = {f"blk/{m}/{p}": x for m, leaves in nested.items() for p, x in leaves.items()}
  want = [(r.rule, r.ambiguous) for r in spatial.describe({"blk": nested}, block_size=2).rows]
  assert [(r.rule, r.ambiguous) for r in spatial.describe(flat, block_size=2).rows] == want
  assert want[0] == (spatial.mean_over((0, 1, 2)), True)


def test_a_flattened_tree_keeps_flax_attention_names():
  # flax.traverse_util.flatten_dict(params, sep="/") gives keys "attn/query/kernel": the module
  # names query/out were not read from them, so a bias-less attention whose sizes defeat the
  # reading by shapes (embed = head_dim = 4) was averaged over all the query's inputs and across
  # the output kernel's heads, a guess.
  attention = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, use_bias=False)
  nested = {"attn": zero_params(attention, np.ones((1, 3, 4)))}
  flat = traverse_util.flatten_dict(nested, sep="/")
  want = {r.path.replace("']['", "/"): r.rule for r in spatial.describe(nested, block_size=2).rows}
  listing = spatial.describe(flat, block_size=2)
  assert {r.path: r.rule for r in listing.rows} == want
  assert want["['attn/out/kernel']"] == spatial.blocks(2, axis=1)
  assert not listing.ambiguous


@pytest.mark.parametrize("boxed", [True, False])
def test_a_tree_flattened_to_tuple_keys_reads_as_the_nested_one(rng, boxed):
  # flax.traverse_util.flatten_dict's default keys are tuples, ('ScanBlock_0', 'Dense_0', 'bias'):
  # such a key was no name and every leaf sat at the root, so a stack's biases and norm scales
  # (3, 4) were read as Dense kernels and blocked across the stack's layers, unflagged.
  model = ConvThenScannedBlocks()
  params = zero_params(model, np.ones((1, 6, 6, 3)))
  nested = params if boxed else nn.unbox(params)
  flat = traverse_util.flatten_dict(nested)
  assert all(isinstance(k, tuple) for k in flat)
  want = [(r.rule, r.names, r.ambiguous) for r in spatial.describe(nested, block_size=2).rows]
  assert [(r.rule, r.names, r.ambiguous) for r in spatial.describe(flat, block_size=2).rows] == want
  assert (spatial.per_layer(spatial.none(), axes=(0,)), ("layers", None), False) in want
  # The optimizer's averaging too: the state's |D| of every leaf is the nested tree's.
  plain = nn.unbox(params)
  hessian_diag = jax.tree.map(lambda x: rng.random(x.shape), plain)
  averaging = spatial.named(params) if boxed else None
  tx = ah.scale_by_adahessian(b2=0.5, block_size=2, averaging=averaging)
  got = _nu_after_one_step(
    ah.scale_by_adahessian(
      b2=0.5, block_size=2, averaging=None if averaging is None else spatial.named(flat)
    ),
    traverse_util.flatten_dict(plain),
    traverse_util.flatten_dict(hessian_diag),
  )
  want = traverse_util.flatten_dict(_nu_after_one_step(tx, plain, hessian_diag))
  for key, value in want.items():
    np.testing.assert_allclose(got[key], value, rtol=1e-6, err_msg=str(key))
  scale = ("ScanScannedBlock_0", "LayerNorm_0", "scale")  # per layer, rank 1: nothing averaged
  np.testing.assert_allclose(got[scale], traverse_util.flatten_dict(hessian_diag)[scale], rtol=1e-6)


class _CustomAttention(nn.Module):
  """An attention written with DenseGeneral layers of its own names, grouped-query."""

  use_bias: bool

  @nn.compact
  def __call__(self, x):
    general = functools.partial(nn.DenseGeneral, use_bias=self.use_bias)
    q = general((4, 3), name="q_proj")(x)
    k = general((2, 3), name="k_proj")(x)  # 2 key/value heads for 4 query heads
    v = general((2, 3), name="v_proj")(x)
    k, v = jnp.repeat(k, 2, axis=-2), jnp.repeat(v, 2, axis=-2)
    w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k))
    return general(10, axis=(-2, -1), name="o_proj")(jnp.einsum("bhqk,bkhd->bqhd", w, v))


@pytest.mark.parametrize("use_bias", [True, False])
def test_attention_of_other_names_and_grouped_query_keeps_heads_apart(rng, use_bias):
  # q_proj (embed, heads, head_dim), k_proj/v_proj with 2 of the 4 heads, o_proj (heads,
  # head_dim, embed): by rank 1-D Conv kernels, averaged over all of q's inputs and o's heads. The
  # module's shapes show an attention, with or without biases, as for Flax's own module names.
  params = zero_params(_CustomAttention(use_bias), np.ones((1, 5, 10)))
  hessian_diag = jax.tree.map(lambda x: rng.random(x.shape), params)
  got = _nu_after_one_step(ah.scale_by_adahessian(b2=0.5, block_size=4), params, hessian_diag)
  rows = {r.path: r for r in spatial.describe(params, block_size=4).rows}
  assert not [r.path for r in rows.values() if r.ambiguous]
  for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
    d = np.asarray(hessian_diag[name]["kernel"])
    axis = 1 if name == "o_proj" else 0  # head_dim within one head, else embed
    want = block_average(d, 4, axis=axis)
    np.testing.assert_allclose(got[name]["kernel"], want, rtol=1e-6, err_msg=name)
    want_names = (
      ("heads", "head_dim", "embed") if name == "o_proj" else ("embed", "heads", "head_dim")
    )
    assert rows[f"['{name}']['kernel']"].names == want_names
  # The same projections as raw params of one module (wq, wk, wv, wo) and Haiku-style w's.
  raw = {"attn": {"wq": (10, 4, 3), "wk": (10, 2, 3), "wv": (10, 2, 3), "wo": (4, 3, 10)}}
  raw["hk"] = {f"{n}_proj": {"w": s} for n, s in zip("qkvo", raw["attn"].values(), strict=True)}
  raw = jax.tree.map(np.zeros, raw, is_leaf=lambda x: isinstance(x, tuple))
  for row in spatial.describe(raw, block_size=4).rows:
    axis = 1 if row.path.endswith(("['wo']", "['o_proj']['w']")) else 0
    assert (row.rule, row.ambiguous) == (spatial.blocks(4, axis=axis), False), row
  # Gemma's einsum layouts: q_einsum (heads, embed, head_dim), kv_einsum (2, kv_heads, embed,
  # head_dim), attn_vec_einsum (heads, head_dim, embed); qkv_einsum (3, heads, embed, head_dim)
  # without grouped queries. Each packed projection is kept apart, blocks along embed.
  gemma = {
    "gqa": {"q_einsum": (8, 12, 4), "kv_einsum": (2, 2, 12, 4), "attn_vec_einsum": (8, 4, 12)},
    "mha": {"qkv_einsum": (3, 8, 12, 4), "attn_vec_einsum": (8, 4, 12)},
  }
  gemma = jax.tree.map(lambda s: {"w": np.zeros(s)}, gemma, is_leaf=lambda x: isinstance(x, tuple))
  hessian_diag = jax.tree.map(lambda x: rng.random(x.shape), gemma)
  got = _nu_after_one_step(ah.scale_by_adahessian(b2=0.5, block_size=4), gemma, hessian_diag)
  d = jax.tree.map(np.asarray, hessian_diag)
  for group, leaf, axis in [
    ("gqa", "q_einsum", 1),
    ("gqa", "attn_vec_einsum", 1),
    ("mha", "attn_vec_einsum", 1),
  ]:
    want = block_average(d[group][leaf]["w"], 4, axis=axis)
    np.testing.assert_allclose(got[group][leaf]["w"], want, rtol=1e-6, err_msg=leaf)
  for group, leaf in [("gqa", "kv_einsum"), ("mha", "qkv_einsum")]:
    want = np.stack([block_average(x, 4, axis=1) for x in d[group][leaf]["w"]])
    np.testing.assert_allclose(got[group][leaf]["w"], want, rtol=1e-6, err_msg=leaf)
  assert not spatial.describe(gemma, block_size=4).ambiguous
  # Sizes that allow other readings stay the rank's guess: embed = head_dim (a 1-D Conv of
  # width 3 beside one of width 4 would have these shapes), an out kernel alone, and a
  # heads-first query beside the output kernel with nothing else: each fits the other's place.
  for tree in (
    {"wq": (3, 4, 3), "wo": (4, 3, 3)},
    {"wo": (4, 3, 10)},
    {"wq": (4, 10, 3), "wo": (4, 3, 10)},
  ):
    tree = jax.tree.map(np.zeros, tree, is_leaf=lambda x: isinstance(x, tuple))
    assert all(r.ambiguous for r in spatial.describe(tree, block_size=4).rows)


@pytest.mark.filterwarnings(
  "ignore::adahessian_jax.spatial.LayoutGuessWarning"
)  # guesses on purpose
def test_a_heads_first_query_and_output_kernel_alone_stay_a_guess_whatever_their_sizes():
  # An NNX stack of bias-less Linears (nnx.vmap, attributes fc1/fc2), as nnx.Optimizer passes it:
  # (layers, embed, mlp) and (layers, mlp, embed) are also an output kernel (heads, head_dim,
  # embed) beside a heads-first query (heads, embed, head_dim), and the other way round. With as
  # many layers as embed (or mlp) the other way round was excluded (its embed is its heads), and
  # the stack was read as an attention for sure: unflagged, its layers one for the curvature
  # floor. Its Linen twin (Dense_0 in ScanBlock_0) shows the stack; this one, a guess as at any
  # other number of layers.
  for layers in (3, 8, 32):
    stack = {"fc1": {"kernel": (layers, 8, 32)}, "fc2": {"kernel": (layers, 32, 8)}}
    stack["norm"] = {"scale": (layers, 8)}
    tree = jax.tree.map(np.zeros, {"layers": stack}, is_leaf=lambda x: isinstance(x, tuple))
    rows = {r.path: r for r in spatial.describe(tree, block_size=4).rows}
    for name in ("fc1", "fc2"):
      row = rows[f"['layers']['{name}']['kernel']"]
      assert (row.names, row.rule, row.ambiguous) == (None, spatial.mean_over(0), True), row
  # The same pair under attention's names, heads = head_dim: a tie as for other sizes.
  tree = jax.tree.map(
    np.zeros, {"wq": (4, 10, 4), "wo": (4, 4, 10)}, is_leaf=lambda x: isinstance(x, tuple)
  )
  assert all(r.ambiguous for r in spatial.describe(tree, block_size=4).rows)


@pytest.mark.filterwarnings(
  "ignore::adahessian_jax.spatial.LayoutGuessWarning"
)  # guesses on purpose
def test_a_convolution_beside_an_attention_of_other_names_stays_a_convolution(rng):
  # A block's Conv with as many outputs as the attention's head size and as many inputs as its
  # embed fits an input projection's shape: (2, 8, 4) a heads-first (heads, embed, head_dim),
  # (2, 2, 8, 4) a packed one. Read so, unflagged, it was blocked along its input channels and
  # kept apart along its width instead of averaged over its spatial axes. A convolution's name
  # or a bias of one axis (an input projection's is (heads, head_dim)) rules that out.
  params = {
    "q_proj": {"kernel": np.zeros((8, 2, 4))},
    "o_proj": {"kernel": np.zeros((2, 4, 8))},
    "Conv_0": {"kernel": np.zeros((2, 2, 8, 4)), "bias": np.zeros(4)},
    "conv": {"kernel": np.zeros((2, 8, 4))},
  }
  hessian_diag = jax.tree.map(lambda x: rng.random(x.shape), params)
  got = _nu_after_one_step(ah.scale_by_adahessian(b2=0.5, block_size=2), params, hessian_diag)
  d = jax.tree.map(np.asarray, hessian_diag)
  for name, axes in (("Conv_0", (0, 1)), ("conv", (0,))):
    want = np.broadcast_to(
      d[name]["kernel"].mean(axis=axes, keepdims=True), d[name]["kernel"].shape
    )
    np.testing.assert_allclose(got[name]["kernel"], want, rtol=1e-6, err_msg=name)
  for name, axis in (("q_proj", 0), ("o_proj", 1)):
    want = block_average(d[name]["kernel"], 2, axis=axis)
    np.testing.assert_allclose(got[name]["kernel"], want, rtol=1e-6, err_msg=name)
  # Under a name of no convolution, beside its bias (4,): no attention's, the rank's guess.
  other = {**params, "proj": {"kernel": np.zeros((2, 8, 4)), "bias": np.zeros(4)}}
  rows = {r.path: r for r in spatial.describe(other, block_size=2).rows}
  assert rows["['proj']['kernel']"].rule == spatial.mean_over(0)
  assert rows["['proj']['kernel']"].ambiguous


@pytest.mark.filterwarnings(
  "ignore::adahessian_jax.spatial.LayoutGuessWarning"
)  # guesses on purpose
def test_the_experts_of_a_mixture_without_names_are_kept_apart(rng):
  # A mixture's weights as raw params (experts, in, out): by rank 1-D Conv kernels, averaged
  # across the experts even at block_size 1. A word of a mixture on the path (moe, experts,
  # MaxText's MoeBlock_0, a MoELayer_0 spelt as mixtures often are) keeps each expert apart,
  # inside a stack of layers too; a module of one expert (experts_1, experts/0) and a leaf off
  # such a path keep the rank's reading.
  tree = {
    "moe": {"w1": (4, 6, 8), "w2": (4, 8, 6), "gate": {"kernel": (6, 4)}},
    "MoeBlock_0": {"wi": (4, 6, 8), "experts_w1": (4, 6, 8)},
    "MoELayer_0": {"wo": (4, 8, 6)},
    "layers": {"experts": {"kernel": (3, 4, 6, 8)}, "bias": (3, 8)},
    "experts_1": {"kernel": (5, 6, 8)},
    "per_expert": {"experts": [{"kernel": (5, 6, 8)}]},
    "mlp": {"kernel": (5, 6, 8)},
  }
  tree["layers"] = {"Dense_0": {"kernel": (3, 6, 8), "bias": (3, 8)}, **tree["layers"]}
  params = jax.tree.map(np.zeros, tree, is_leaf=lambda x: isinstance(x, tuple))
  hessian_diag = jax.tree.map(lambda x: rng.random(x.shape), params)
  got = _nu_after_one_step(ah.scale_by_adahessian(b2=0.5, block_size=2), params, hessian_diag)
  rows = {r.path: r for r in spatial.describe(params, block_size=2).rows}
  d, got = jax.tree.map(np.asarray, hessian_diag), jax.tree.map(np.asarray, got)

  def per_expert(x):  # NumPy loops: blocks of 2 inputs within each (layer's) expert's kernel
    flat = x.reshape(-1, *x.shape[-2:])
    return np.stack([block_average(e, 2) for e in flat]).reshape(x.shape)

  def at(tree, keys):
    return tree if not keys else at(tree[keys[0]], keys[1:])

  for leaf in (
    ("moe", "w1"),
    ("moe", "w2"),
    ("MoeBlock_0", "wi"),
    ("MoeBlock_0", "experts_w1"),
    ("MoELayer_0", "wo"),
    ("layers", "experts", "kernel"),
  ):
    where = "".join(f"['{key}']" for key in leaf)
    np.testing.assert_allclose(at(got, leaf), per_expert(at(d, leaf)), rtol=1e-6, err_msg=where)
    assert not rows[where].ambiguous and "a mixture's experts" in rows[where].why, rows[where]
  for where in ("['experts_1']['kernel']", "['per_expert']['experts'][0]['kernel']"):
    assert (rows[where].rule, rows[where].ambiguous) == (spatial.mean_over(0), True), where
  assert rows["['mlp']['kernel']"].ambiguous
  # An attention's kernels under an expert's path are read as an attention's first.
  attention = {"expert_attn": {"wq": np.zeros((10, 4, 3)), "wo": np.zeros((4, 3, 10))}}
  assert [r.names for r in spatial.describe(attention).rows] == [
    ("heads", "head_dim", "embed"),
    ("embed", "heads", "head_dim"),
  ]
  np.testing.assert_allclose(
    got["moe"]["gate"]["kernel"], block_average(d["moe"]["gate"]["kernel"], 2)
  )
  # The word counts in the leaf's name or its module's only: under a wrapper of the whole model
  # (MoETransformer_0) a packed qkv (embed, 3, hidden) is no mixture (it would have averaged q,
  # k and v), but the rank's flagged guess; the mixture itself is still kept apart.
  wrapped = {"MoETransformer_0": {"attn": {"qkv": np.zeros((6, 3, 8))}, **params}}
  rows = {r.path: r for r in spatial.describe(wrapped, block_size=2).rows}
  qkv = rows["['MoETransformer_0']['attn']['qkv']"]
  assert qkv.ambiguous and "a mixture's experts" not in qkv.why, qkv
  for where in ("['MoETransformer_0']['moe']['w1']", "['MoETransformer_0']['MoeBlock_0']['wi']"):
    assert not rows[where].ambiguous and "a mixture's experts" in rows[where].why, rows[where]


class _ResNetBlock(nn.Module):
  """A ResNet block as Flax's example writes it: convolutions without biases, BatchNorm."""

  features: int

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(nn.Conv, use_bias=False)
    y = nn.BatchNorm(use_running_average=True)(conv(self.features, (3, 3))(x))
    y = nn.BatchNorm(use_running_average=True)(conv(self.features, (3, 3))(nn.relu(y)))
    return nn.relu(y + conv(self.features, (1, 1), name="conv_proj")(x))


class _ResNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (7, 7), use_bias=False, name="conv_init")(x)
    x = _ResNetBlock(16)(_ResNetBlock(8)(x))
    return nn.Dense(10)(x.mean((1, 2)))


class _NNXNet(nnx.Module):
  def __init__(self, rngs):
    self.conv1 = nnx.Conv(3, 16, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(16, 16, (3,), rngs=rngs)
    self.emb = nnx.Embed(100, 16, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(4, 16, decode=False, rngs=rngs)
    self.head = nnx.Linear(16, 10, rngs=rngs)


Spec = jax.sharding.PartitionSpec


def test_init_warns_of_guessed_layouts_once_and_common_models_have_none(tiny_lm):
  # A guess that could average across stacked layers is said at init, not only in describe.
  params = {
    "adapters": {"kernel": np.zeros((4, 8, 8))},  # 4 stacked Dense kernels, or a 1-D Conv?
    "head": {"kernel": np.zeros((8, 3)), "bias": np.zeros(3)},
  }
  with pytest.warns(spatial.LayoutGuessWarning, match="averaging of 1 leaf is a guess") as record:
    state = ah.adahessian(0.1).init(params)
  text = str(record[0].message)
  assert "['adapters']['kernel']: shape (4, 8, 8), mean_over((0,))" in text and "head" not in text
  assert record[0].filename == __file__  # the user's init line, not optax.chain's
  assert "spatial.strict()" in text and "filterwarnings" in text
  with warnings.catch_warnings():  # update resolves the rules again, silently
    warnings.simplefilter("error", spatial.LayoutGuessWarning)
    jax.jit(ah.adahessian(0.1).update)(params, state, params, hessian_diag=params)
  many = {f"a{i}": np.zeros((2, 3, 3)) for i in range(7)}
  with pytest.warns(spatial.LayoutGuessWarning, match="7 leaves is a guess") as record:
    ah.scale_by_adahessian().init(many)
  assert "['a4']" in str(record[0].message) and "... and 2 more" in str(record[0].message)
  with pytest.raises(ValueError, match="1 leaf is ambiguous"):
    ah.adahessian(0.1, averaging=spatial.strict()).init(params)

  # No warning where names, rules, module names or shapes say what the axes are.
  def stack_rule(path, leaf):
    return spatial.per_layer(spatial.flax_default()) if leaf.ndim == 3 else None

  models = {
    "explicit rules": (params, stack_rule),
    "names": (
      params,
      spatial.named(
        {
          "adapters": {"kernel": Spec("layers", None, None)},
          "head": {"kernel": Spec(), "bias": Spec()},
        }
      ),
    ),
    "Linen LM, unboxed": (nn.unbox(tiny_lm), None),
    "ResNet": (zero_params(_ResNet(), np.ones((1, 16, 16, 3))), None),
    "NNX": (nnx_zero_params(lambda: _NNXNet(nnx.Rngs(0))), None),
    "attention": (
      zero_params(_CustomAttention(False), np.ones((1, 5, 10))),
      None,
    ),
    "mixture": ({"moe": {"w1": np.zeros((4, 6, 8)), "w2": np.zeros((4, 8, 6))}}, None),
  }
  for name, (tree, averaging) in models.items():
    for block_size in (1, 32):
      with warnings.catch_warnings():
        warnings.simplefilter("error", spatial.LayoutGuessWarning)
        tx = ah.scale_by_adahessian(block_size=block_size, averaging=averaging)
        try:
          jax.eval_shape(tx.init, tree)  # init in a trace warns the same way
          tx.init(tree)
        except spatial.LayoutGuessWarning as e:
          pytest.fail(f"{name}, block_size {block_size}: {e}")


def test_relative_position_bias_tables_keep_heads_and_positions_apart():
  # Hugging Face's Flax T5 keeps its relative position biases in nn.Embed(num_buckets, heads)
  # named relative_attention_bias, t5x in a raw rel_embedding (heads, buckets) under relpos_bias,
  # BEiT in a raw relative_position_bias_table (distances, heads). Read as tables (blocks along
  # the last axis), T5's was averaged across its heads, unflagged: one bias per position and head.
  S = jax.ShapeDtypeStruct
  params = {
    "SelfAttention": {"relative_attention_bias": {"embedding": S((32, 4), jnp.float32)}},
    "relpos_bias": {"rel_embedding": S((4, 32), jnp.float32)},
    "relative_position_bias_table": S((49, 4), jnp.float32),
    # Linen's name for a module of class RelativeAttentionBias: its words were not split at the
    # capitals, and the table was averaged across heads as a token table, unflagged.
    "RelativeAttentionBias_0": {"embedding": S((32, 4), jnp.float32)},
    # ... and its unnamed nn.Embed, which Linen names Embed_0 under it.
    "RelativePositionBias_0": {"Embed_0": {"embedding": S((32, 4), jnp.float32)}},
    "Embed_0": {"embedding": S((40, 8), jnp.float32)},  # a token table: blocks along features
    "Encoder_0": {"Embed_0": {"embedding": S((40, 8), jnp.float32)}},  # so is this one
  }
  for block_size in (1, 32):
    rows = {r.path: r for r in spatial.describe(params, block_size=block_size).rows}
    assert not [r.path for r in rows.values() if r.ambiguous]
    for path in ("['Embed_0']['embedding']", "['Encoder_0']['Embed_0']['embedding']"):
      assert rows[path].rule == spatial.blocks(block_size, axis=1), path
    for path in (
      "['SelfAttention']['relative_attention_bias']['embedding']",
      "['relpos_bias']['rel_embedding']",
      "['relative_position_bias_table']",
      "['RelativeAttentionBias_0']['embedding']",
      "['RelativePositionBias_0']['Embed_0']['embedding']",
    ):
      assert rows[path].rule == spatial.none(), path
      assert "attention biases" in rows[path].why


def test_a_weight_paired_with_its_bias_is_no_table_of_attention_biases():
  # A table's word and a module named with 'bias' made emb_weight (out, in) beside its emb_bias
  # (out,) a table of attention biases (none, unflagged), though such a table has no bias of its
  # own: a Linear weight, its bias says which axis is its output. pos_w beside pos_b is a
  # kernel of a layout its name leaves open: a guess. A weight without a bias stays a table.
  S = jax.ShapeDtypeStruct
  params = {
    "pos_bias": {"emb_weight": S((8, 16), jnp.float32), "emb_bias": S((8,), jnp.float32)},
    "rel_bias": {"pos_w": S((8, 16), jnp.float32), "pos_b": S((16,), jnp.float32)},
    "relpos_bias": {"emb_weight": S((32, 4), jnp.float32)},
  }
  for block_size in (2, 3):
    rows = {r.path: r for r in spatial.describe(params, block_size=block_size).rows}
    weight = rows["['pos_bias']['emb_weight']"]
    assert (weight.rule, weight.ambiguous) == (spatial.blocks(block_size, axis=1), False)
    assert "a bias of its first axis" in weight.why
    kernel = rows["['rel_bias']['pos_w']"]
    assert (kernel.rule, kernel.ambiguous) == (spatial.blocks(block_size, axis=1), True)
    table = rows["['relpos_bias']['emb_weight']"]
    assert (table.rule, table.ambiguous) == (spatial.none(), False)
    assert "attention biases" in table.why
    for bias in ("['pos_bias']['emb_bias']", "['rel_bias']['pos_b']"):
      assert rows[bias].rule == spatial.none(), bias


def test_haiku_biases_beside_their_kernels_are_not_averaged():
  # AlphaFold's Haiku attention makes its own gating_w (channels, heads, head_dim) and gating_b
  # (heads, head_dim); a Linear of several outputs has w (in, heads, head_dim), b (heads,
  # head_dim). Read as Dense kernels, the biases were blocked along axis 0, across the heads,
  # unflagged: gating_b[h, d] came out as the mean over all heads h.
  S = jax.ShapeDtypeStruct
  attention = {
    "query_w": S((64, 8, 8), jnp.float32),
    "gating_w": S((64, 8, 8), jnp.float32),
    "gating_b": S((8, 8), jnp.float32),
    "output_w": S((8, 8, 64), jnp.float32),
    "output_b": S((64,), jnp.float32),
  }
  q_scalar = {"w": S((48, 12, 16), jnp.float32), "b": S((12, 16), jnp.float32)}
  params = {"attention": attention, "q_scalar": q_scalar, "lora": {"b": S((4, 16), jnp.float32)}}
  for block_size in (1, 32):
    rows = {r.path: r for r in spatial.describe(params, block_size=block_size).rows}
    for path in ("['attention']['gating_b']", "['q_scalar']['b']"):
      assert rows[path].rule == spatial.none(), (block_size, path, rows[path].rule)
      assert not rows[path].ambiguous
    # A "b" without its "w" (a LoRA factor) is no Haiku bias: read by its rank as before.
    assert rows["['lora']['b']"].rule == spatial.blocks(block_size, axis=0)
  d = np.arange(64.0).reshape(8, 8)
  stacked = {"w": S((3, 64, 8, 8), jnp.float32), "b": S((3, 8, 8), jnp.float32)}  # layer_stack
  rule = spatial.resolve_rules(None, stacked, 32)["b"]
  np.testing.assert_array_equal(rule(np.stack([d, d, d])), np.stack([d, d, d]))


def test_a_vector_per_layer_of_an_unnamed_stack_beside_stacked_norm_scales_is_a_guess():
  # nn.scan over an RWKV block without biases: no evidence names the stack, so its kernels
  # (layers, in, out) are flagged guesses, but a raw vector per layer (time_decay (layers,
  # features)) was read as a Dense kernel and blocked across the layers, unflagged. The norms'
  # (layers, features) scales beside it show the possible stack: it is listed as ambiguous.
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      decay = self.param("time_decay", nn.initializers.zeros, (x.shape[-1],))
      h = nn.LayerNorm(name="ln1")(x) * decay
      return x + nn.Dense(x.shape[-1], use_bias=False, name="key")(h), None

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      scan = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
      return scan(name="blocks")(x, None)[0]

  params = jax.eval_shape(Net().init, jax.random.key(0), np.zeros((1, 8)))["params"]
  rows = {r.path: r for r in spatial.describe(params, block_size=32).rows}
  decay = rows["['blocks']['time_decay']"]
  assert decay.rule == spatial.blocks(32) and decay.ambiguous  # blocks along the 3 layers
  assert "['blocks'] has a first axis of 3" in decay.why
  assert rows["['blocks']['key']['kernel']"].ambiguous  # as before
  assert not rows["['blocks']['ln1']['scale']"].ambiguous  # a scale: none either way
  # At block_size 1 nothing is averaged: no guess. A (6, 4) raw matrix beside a norm of other
  # sizes, or one whose relatives do not all have its first size, stays a Dense kernel.
  assert not spatial.describe(params, block_size=1).rows[-1].ambiguous
  other = {
    "latents": np.zeros((6, 4)),
    "norm": {"scale": np.zeros((6, 4)), "bias": np.zeros((6, 4))},
    "head": {"kernel": np.zeros((4, 10))},
  }
  assert not spatial.describe(other, block_size=32).ambiguous


def _blocks_of_layers(n_blocks: int):
  """Flax-named blocks of a Dense and a norm each, the Dense's parent one module per block."""
  block = lambda: {
    "Dense_0": {"kernel": np.ones((4, 4)), "bias": np.ones(4)},
    "LayerNorm_0": {"scale": np.ones(4), "bias": np.ones(4)},
  }
  return {"params": {f"Block_{i}": block() for i in range(n_blocks)}}


def _scans_of_convs(n_scans: int):
  """Linen scans of bias-less 2-D convolutions, one per block: ``(layers, kh, kw, in, out)``."""
  scan = lambda: {"Conv_0": {"kernel": np.ones((2, 3, 3, 2, 2))}}
  return {"params": {f"ScanBlock_{i}": scan() for i in range(n_scans)}}


@pytest.mark.parametrize("tree", [_blocks_of_layers, _scans_of_convs], ids=["blocks", "scans"])
def test_reading_the_layout_grows_linearly_in_the_leaves(tree):
  # Counted in Python function calls, exact at any load. Before: every leaf was tried against
  # every kernel's parent module (conv_kernels) and every scan's module (scan_stacks), the
  # square of the blocks: 4x the blocks cost 4.4x (blocks) and 4.5x (scans) the calls, now 4.0x.
  def calls(n: int) -> int:
    params = tree(n)
    profile = cProfile.Profile()
    profile.runcall(spatial.resolve_rules, None, params, 1)
    return pstats.Stats(profile).total_calls  # pyright: ignore[reportAttributeAccessIssue]

  assert calls(100) < 4.1 * calls(25)


class RawMixture(nn.Module):
  """A mixture's weights as raw params, each expert's bias named after its kernel."""

  @nn.compact
  def __call__(self, x, _=None):
    self.param("w_in", lecun, (4, 6, 8))  # (experts, in, out)
    self.param("b_in", zeros, (4, 8))  # (experts, out): a name of the author's
    self.param("w_out", lecun, (4, 8, 6))
    self.param("w_out_bias", zeros, (4, 6))
    return x, None


class ScannedRawMixture(nn.Module):
  @nn.compact
  def __call__(self, x):
    stack = nn.scan(RawMixture, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    return stack(name="moe")(x, None)[0]


def test_biases_of_experts_and_heads_under_names_of_their_own_are_not_averaged(rng):
  # A raw bias named after its kernel (a mixture's b_in or w_out_bias (experts, out), gpt-oss's
  # gate_up_proj_bias, a custom attention's q_bias (heads, head_dim)) was read by its rank as a
  # Dense kernel and blocked along axis 0: across the experts or heads, beside kernels kept
  # apart per expert and per head, with no warning. One entry per expert (head) and output unit.
  x = np.ones((1, 6))
  params = {
    "moe": jax.eval_shape(RawMixture().init, jax.random.key(0), x)["params"],
    "attn": {"wq": np.zeros((10, 2, 3)), "q_bias": np.zeros((2, 3)), "wo": np.zeros((2, 3, 10))},
    "mlp": {
      "experts": {"gate_up_proj": np.zeros((4, 10, 6)), "gate_up_proj_bias": np.zeros((4, 6))}
    },
  }
  params = jax.tree.map(lambda p: np.zeros(p.shape), params)
  hessian_diag = jax.tree.map(lambda p: rng.random(p.shape), params)
  with warnings.catch_warnings():
    warnings.simplefilter("error", spatial.LayoutGuessWarning)
    got = _nu_after_one_step(ah.scale_by_adahessian(b2=0.5, block_size=2), params, hessian_diag)
  d = jax.tree.map(np.asarray, hessian_diag)

  def per_expert(x):  # NumPy loops: blocks of 2 inputs within each (layer's) expert's kernel
    flat = x.reshape(-1, *x.shape[-2:])
    return np.stack([block_average(e, 2) for e in flat]).reshape(x.shape)

  for group, name in [("moe", "b_in"), ("moe", "w_out_bias"), ("attn", "q_bias")]:
    np.testing.assert_allclose(got[group][name], d[group][name], rtol=1e-6, err_msg=name)
  experts = got["mlp"]["experts"]
  np.testing.assert_allclose(
    experts["gate_up_proj_bias"], d["mlp"]["experts"]["gate_up_proj_bias"], rtol=1e-6
  )
  np.testing.assert_allclose(
    experts["gate_up_proj"], per_expert(d["mlp"]["experts"]["gate_up_proj"]), rtol=1e-6
  )
  for name in ("w_in", "w_out"):
    np.testing.assert_allclose(got["moe"][name], per_expert(d["moe"][name]), rtol=1e-6)
  # The attention's kernels: blocks of 2 embed inputs per head; 2 head_dim inputs of one head.
  np.testing.assert_allclose(got["attn"]["wq"], block_average(d["attn"]["wq"], 2), rtol=1e-6)
  np.testing.assert_allclose(got["attn"]["wo"], block_average(d["attn"]["wo"], 2, 1), rtol=1e-6)
  # In an nn.scan the bias b_in (layers, experts, out) repeats its kernel w_in's leading axes
  # (layers, experts, in, out): both stacked, each (layer, expert) kernel kept apart.
  scanned = jax.eval_shape(ScannedRawMixture().init, jax.random.key(1), x)["params"]
  hessian_diag = jax.tree.map(lambda p: rng.random(p.shape), scanned)
  rules = spatial.resolve_rules(None, scanned, block_size=2, warn=True)
  got = averaged(rules, hessian_diag)
  np.testing.assert_allclose(got["moe"]["b_in"], hessian_diag["moe"]["b_in"], rtol=1e-12)
  for name in ("w_in", "w_out"):
    want = per_expert(np.asarray(hessian_diag["moe"][name]))
    np.testing.assert_allclose(got["moe"][name], want, rtol=1e-12)


def test_raw_bias_paired_by_name_shows_the_experts_outside_a_mixture_name(rng):
  # A mixture's raw b_in (experts, out) beside w_in (experts, in, out) in a module with no mixture
  # word (FFN_0) was read by its rank as a Dense kernel: blocked across the experts, silently
  # (the kernels beside it were warned of, the bias not listed). b_in repeats w_in's leading
  # axis: one per expert, so both are kept apart per expert (b1/w1 likewise).
  params = {
    "FFN_0": {"w_in": np.zeros((4, 6, 8)), "b_in": np.zeros((4, 8))},
    "block": {"w1": np.zeros((3, 8, 6)), "b1": np.zeros((3, 6))},
  }
  hessian_diag = jax.tree.map(lambda p: rng.uniform(1.0, 2.0, p.shape), params)
  with warnings.catch_warnings():
    warnings.simplefilter("error", spatial.LayoutGuessWarning)
    got = _nu_after_one_step(ah.scale_by_adahessian(b2=0.5, block_size=2), params, hessian_diag)
  d = jax.tree.map(np.asarray, hessian_diag)
  for module, w, b in (("FFN_0", "w_in", "b_in"), ("block", "w1", "b1")):
    np.testing.assert_allclose(got[module][b], d[module][b], rtol=1e-12, err_msg=b)
    want = np.stack([block_average(e, 2) for e in d[module][w]])
    np.testing.assert_allclose(got[module][w], want, rtol=1e-12, err_msg=w)
  # A bias of one layer (out,) beside a rank-3 w_in shows no stack: the kernel's guess stays.
  one = {"FFN_0": {"w_in": np.zeros((4, 6, 8)), "b_in": np.zeros(8)}}
  assert [r.path for r in spatial.describe(one, block_size=2).ambiguous] == ["['FFN_0']['w_in']"]


def test_a_raw_bias_pairs_with_a_kernel_named_in_capitals(rng):
  # TransformerLens's layout (W_Q (heads, embed, head_dim) beside b_Q (heads, head_dim), W_O
  # (heads, head_dim, embed) beside b_O (embed,)) and a mixture's W1 (experts, in, out) beside
  # b1 (experts, out): the bias paired only with a lowercase w (w_Q, w1), so b_Q and b1 were
  # read by their rank as Dense kernels and blocked along axis 0, across the heads (experts),
  # with no warning, where the kernels beside them were kept apart per head (expert).
  attn = {"W_Q": (4, 16, 8), "W_K": (4, 16, 8), "W_V": (4, 16, 8), "W_O": (4, 8, 16)}
  attn |= {"b_Q": (4, 8), "b_K": (4, 8), "b_V": (4, 8), "b_O": (16,)}
  params = {"attn": attn, "ffn": {"W1": (3, 8, 6), "b1": (3, 6)}}
  params = jax.tree.map(np.zeros, params, is_leaf=lambda x: isinstance(x, tuple))
  hessian_diag = jax.tree.map(lambda p: rng.uniform(1.0, 2.0, p.shape), params)
  with warnings.catch_warnings():
    warnings.simplefilter("error", spatial.LayoutGuessWarning)
    got = _nu_after_one_step(ah.scale_by_adahessian(b2=0.5, block_size=8), params, hessian_diag)
  d = jax.tree.map(np.asarray, hessian_diag)
  for module, name in [("attn", "b_Q"), ("attn", "b_K"), ("attn", "b_V"), ("ffn", "b1")]:
    np.testing.assert_allclose(got[module][name], d[module][name], rtol=1e-12, err_msg=name)
  # Each head's (expert's) kernel on its own: blocks of 8 inputs (embed, head_dim, in).
  for module, name in [("attn", "W_Q"), ("attn", "W_O"), ("ffn", "W1")]:
    want = np.stack([block_average(e, 8) for e in d[module][name]])
    np.testing.assert_allclose(got[module][name], want, rtol=1e-12, err_msg=name)


class _EnsembleMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(8, use_bias=False, param_dtype=jnp.float64)(x)
    return nn.Dense(4, use_bias=False, param_dtype=jnp.float64)(h)


def _ensemble_of(block, axis):
  """``nn.vmap`` of ``block`` over 3 members, its params stacked along ``axis``
  (``variable_axes={"params": axis}``), the input shared."""
  return nn.vmap(
    block,
    variable_axes={"params": axis},
    split_rngs={"params": True},
    in_axes=None,
    out_axes=0,
    axis_size=3,
  )


@pytest.mark.parametrize("axis", [1, 2])
def test_bias_less_dense_siblings_under_vmap_over_a_later_axis(axis, rng):
  # nn.vmap with variable_axes={"params": 1} stacks a bias-less Dense_0 kernel as (in, members,
  # out). Linen's name Dense_0 (kernel rank 2) had the extra axis taken to lead: each input's
  # slice kept apart and blocks of 2 along the members (axis 2: along the outputs), silently.
  # Its sibling Dense_1 (8, 3, 4) has another first size, so the stack is not in front: it is the
  # one axis where both kernels have one size.
  ens = _ensemble_of(_EnsembleMLP, axis)
  params = zero_params(ens(), np.ones((2, 6)))
  hessian_diag = jax.tree.map(lambda p: rng.uniform(1.0, 2.0, p.shape), params)
  with warnings.catch_warnings():
    warnings.simplefilter("error", spatial.LayoutGuessWarning)
    got = _nu_after_one_step(ah.scale_by_adahessian(b2=0.5, block_size=2), params, hessian_diag)
  for name in ("Dense_0", "Dense_1"):
    d = np.asarray(hessian_diag[name]["kernel"])
    want = np.stack([block_average(np.take(d, m, axis), 2) for m in range(3)], axis=axis)
    np.testing.assert_allclose(got[name]["kernel"], want, rtol=1e-12, err_msg=name)
  # A lone bias-less Dense_0 in such an ensemble shows nothing and keeps the leading reading (as
  # an nn.scan's does); siblings that share no other size leave the rank's guess, flagged.
  odd = {"Dense_0": {"kernel": np.zeros((6, 3, 8))}, "Dense_1": {"kernel": np.zeros((8, 5, 4))}}
  rows = spatial.describe({"ens": odd}, block_size=2).rows
  assert [r.ambiguous for r in rows] == [True, True]


class OneDenseBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _=None):
    return nn.Dense(x.shape[-1], use_bias=False)(x), None


class AttentionDenseBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _=None):
    x = x + nn.MultiHeadDotProductAttention(num_heads=2)(x, x)
    return OneDenseBlock()(x)[0], None


def _init_inside(transformed, name, x):
  """The params' shapes of ``transformed`` (an ``nn.scan``/``nn.vmap`` of a block) inside a
  model, under Linen's automatic name (``name=None``) or ``name``."""

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      return transformed(name=name)(x, None)[0]

  return jax.eval_shape(Model().init, jax.random.key(0), x)["params"]


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_a_lone_bias_less_dense_under_vmap_is_a_guess_where_its_stack_matters(axis):
  # nn.vmap of a module holding one bias-less Dense: with variable_axes={"params": 1} its kernel
  # is (in, members, out) = (8, 3, 8). Linen's name Dense_0 alone had the stack read in front,
  # silently: each input's slice kept apart, blocks of 2 along the members. Nothing shows where
  # the stacked axis is (VmapOneDense_0 is no sign: ensembles map over other axes too), so with
  # block_size > 1 the reading is a guess; with 1 no reading averages anything.
  ens = _ensemble_of(OneDenseBlock, axis)
  params = _init_inside(ens, None, np.ones((2, 8)))
  (row,) = spatial.describe(params, block_size=2).rows
  assert row.path == "['VmapOneDenseBlock_0']['Dense_0']['kernel']"
  assert row.shape == (8,) * axis + (3,) + (8,) * (2 - axis)
  assert row.rule == spatial.per_layer(spatial.blocks(2))  # the stack in front, as before
  assert row.ambiguous and "not which axis is stacked" in row.why
  assert spatial.describe(params, block_size=1).ambiguous == ()
  refused = r"(?s)1 leaf is ambiguous.*\['Dense_0'\]\['kernel'\].*not which axis is stacked"
  with pytest.raises(ValueError, match=refused):
    spatial.describe(params, spatial.strict(), block_size=2)


@pytest.mark.parametrize("block", [OneDenseBlock, AttentionDenseBlock])
def test_a_lone_bias_less_dense_in_a_scan_takes_its_stack_from_the_scan_or_relatives(block):
  # The same kernel (3, 8, 8) where the stack shows in front: under nn.scan's name ScanOneDense_0,
  # or, under a name of the user's, beside attention whose biases (3, 2, 4) show the stack.
  stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
  for name in (None, "blocks") if block is AttentionDenseBlock else (None,):
    params = _init_inside(stack, name, np.ones((1, 4, 8)))
    rows = {r.path: r for r in spatial.describe(params, block_size=2).rows}
    (where,) = [p for p in rows if p.endswith("['Dense_0']['kernel']")]
    assert rows[where].shape == (3, 8, 8)
    assert rows[where].rule == spatial.per_layer(spatial.blocks(2))
    assert not any(r.ambiguous for r in rows.values()), where


def test_dense_general_over_three_input_axes_of_several_sizes_is_no_sure_conv(rng):
  # nn.DenseGeneral(8, axis=(-3, -2, -1), name="proj"): kernel (4, 12, 3, 8) beside its bias (8,)
  # was taken for a 2-D Conv's for sure, its "window" (4, 12) averaged (48 inputs of one output
  # unit) even at block_size=1, with no warning. A Conv's window has one size (3x3, a 16x16
  # patch) unless its module's name says it is a convolution: the rank's guess, flagged.
  class Proj(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.DenseGeneral(8, axis=(-3, -2, -1), name="proj", param_dtype=jnp.float64)(x)

  params = zero_params(Proj(), np.ones((1, 4, 12, 3)))
  with pytest.warns(spatial.LayoutGuessWarning, match=r"\['proj'\]\['kernel'\]"):
    ah.adahessian(0.1).init(params)
  rows = {r.path: r for r in spatial.describe(params).rows}
  assert rows["['proj']['kernel']"].ambiguous
  # Named as its axes are, it is averaged over nothing at block_size=1.
  spec = jax.sharding.PartitionSpec
  names = {"proj": {"kernel": spec("embed", "embed", "embed", "mlp"), "bias": spec("mlp")}}
  hessian_diag = jax.tree.map(lambda p: rng.uniform(1.0, 2.0, p.shape), params)
  tx = ah.scale_by_adahessian(b2=0.5, averaging=spatial.named(names))
  got = _nu_after_one_step(tx, params, hessian_diag)
  d = np.asarray(hessian_diag["proj"]["kernel"])
  np.testing.assert_allclose(got["proj"]["kernel"], d, rtol=1e-12)
  # A square window beside its bias (a 7x7 stem, a patch embedding) stays a Conv's, as does any
  # window under a convolution's name.
  convs = {
    "stem": {"kernel": np.zeros((7, 7, 3, 8)), "bias": np.zeros(8)},
    "conv_a": {"kernel": np.zeros((1, 7, 3, 8)), "bias": np.zeros(8)},
  }
  rows = [r for r in spatial.describe(convs).rows if r.path.endswith("['kernel']")]
  assert [(r.rule, r.ambiguous) for r in rows] == [(spatial.mean_over((0, 1)), False)] * 2


def test_describe_names_every_axis_it_finds_stacked_layers():
  # The readers named an unnamed stacked axis differently: 'layers' for a stack a bias shows,
  # but 'block' (the first stacked name alphabetically) in front of named experts and for packed
  # attention projections. One name per role now: 'layers' (a mixture's experts stay 'experts').
  s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  spec = jax.sharding.PartitionSpec
  experts = {"wi": spec(None, "exp", "embed", "mlp"), "bi": spec(None, "exp", "mlp")}
  cases = [  # (params, averaging, the kernel with a stacked axis 0 found)
    ({"Dense_0": {"kernel": s(3, 4, 5), "bias": s(3, 5)}}, None, "['Dense_0']['kernel']"),
    # raw packed projections (2, heads, embed, head_dim) beside their bias
    ({"mlp": {"w_in": s(2, 2, 3, 2), "b_in": s(2, 2, 3)}}, None, "['mlp']['w_in']"),
    # an unnamed axis in front of named experts
    ({"wi": s(4, 3, 4, 8), "bi": s(4, 3, 8)}, spatial.named(experts), "['wi']"),
  ]
  for params, averaging, kernel in cases:
    rows = {r.path: r for r in spatial.describe(params, averaging, block_size=2).rows}
    assert rows[kernel].names[0] == "layers", rows[kernel]
    assert "stacked axis 0 ('layers')" in rows[kernel].why, rows[kernel]
  moe = {"moe": {"wi": s(4, 6, 8)}}
  assert spatial.describe(moe, block_size=2).rows[0].names == ("experts", None, None)


#: Flax modules (features 3 -> 4, windows of 3) and an input, for the scanned-vs-unrolled test.
_ONE_LAYER = {
  "Dense": (lambda: nn.Dense(4), (1, 3)),
  "Conv1D": (lambda: nn.Conv(4, (3,)), (1, 5, 3)),
  "Conv2D": (lambda: nn.Conv(4, (3, 3)), (1, 5, 5, 3)),
  "Depthwise": (lambda: nn.Conv(3, (3, 3), feature_group_count=3), (1, 5, 5, 3)),
  "ConvLocal": (lambda: nn.ConvLocal(4, (3,)), (1, 5, 3)),
  "Embed": (lambda: nn.Embed(5, 4), (1, 2)),
  "Attention": (lambda: nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=6), (1, 3, 4)),
  "LayerNorm": (lambda: nn.LayerNorm(), (1, 3)),
  "DenseGeneral": (lambda: nn.DenseGeneral((2, 4)), (1, 3)),
  "DenseGeneralAxes": (lambda: nn.DenseGeneral(4, axis=(-2, -1)), (1, 2, 3)),
  "Einsum": (lambda: nn.Einsum((3, 2, 4), "btd,dhk->bthk"), (1, 5, 3)),
}

#: The kinds whose kernel's rank Linen's name does not fix: under nn.remat_scan of lengths (2, 3)
#: the kernel (2, 3, 3, *out) beside its bias (2, 3, *out) is also one remat layer's with outputs
#: (3, *out), so the number of stacked axes is a guess (flagged), biases or not.
_ANY_RANK = ("DenseGeneral", "DenseGeneralAxes", "Einsum")


class StackedOneLayer(nn.Module):
  kind: str
  carry_only: bool = False  # nn.remat_scan's body returns its carry alone

  @nn.compact
  def __call__(self, c, _=None):
    make, shape = _ONE_LAYER[self.kind]
    make()(np.zeros(shape, np.int32) if self.kind == "Embed" else np.ones(shape))
    return c if self.carry_only else (c, None)


_SCANNED = {"variable_axes": {"params": 0}, "split_rngs": {"params": True}}


class StackedLayers(nn.Module):
  """3 StackedOneLayer stacked by nn.scan, for an nn.scan of them: a scan of scans."""

  kind: str

  @nn.compact
  def __call__(self, c, _=None):
    nn.scan(StackedOneLayer, length=3, **_SCANNED)(self.kind)(c, None)
    return c, None


#: Linen's stacks of StackedOneLayer for the scanned-vs-unrolled test: (the stack's path, its
#: layer axes, a function of the kind and a carry that builds it).
_LINEN_STACKS = [
  (
    ("ScanStackedOneLayer_0",),
    (3,),
    lambda kind, c: nn.scan(StackedOneLayer, length=3, **_SCANNED)(kind)(c, None),
  ),
  (
    ("Remat_scanStackedOneLayer_0",),
    (2, 3),
    lambda kind, c: nn.remat_scan(StackedOneLayer, lengths=(2, 3))(kind, True)(c),
  ),
  (
    ("ScanStackedLayers_0", "ScanStackedOneLayer_0"),
    (2, 3),
    lambda kind, c: nn.scan(StackedLayers, length=2, **_SCANNED)(kind)(c, None),
  ),
]


def _one_layer_params(kind, stack=None):
  """The params' shapes of a model holding one ``kind`` layer, or the stack of them that
  ``stack`` (a function of the kind and a carry, :data:`_LINEN_STACKS`) builds, beside a Dense
  head."""

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      if stack is not None:
        stack(kind, np.zeros(()))
      else:
        StackedOneLayer(kind)(np.zeros(()))
      return nn.Dense(2, name="head")(x)

  return jax.eval_shape(Model().init, jax.random.key(0), np.ones((1, 5)))["params"]


#: (use_bias, the stack's path, Linen's name of one layer, the layer axes) of the stacks compared
#: with their layers: nn.scan's, nn.vmap's and nn.remat_scan's automatic names, one of your own,
#: nn.remat_scan's of several lengths and an nn.scan of nn.scans.
_STACKINGS = [
  (True, ("ScanStackedOneLayer_0",), "StackedOneLayer_0", (3,)),
  (False, ("ScanStackedOneLayer_0",), "StackedOneLayer_0", (3,)),
  (False, ("VmapStackedOneLayer_0",), "StackedOneLayer_0", (3,)),
  (False, ("Remat_scanStackedOneLayer_0",), "StackedOneLayer_0", (3,)),
  (False, ("blocks",), "blocks", (3,)),
  (True, ("Remat_scanStackedOneLayer_0",), "StackedOneLayer_0", (2, 3)),
  (False, ("Remat_scanStackedOneLayer_0",), "StackedOneLayer_0", (2, 3)),
  (False, ("Remat_scanStackedOneLayer_0",), "StackedOneLayer_0", (2, 2, 2)),
  (True, ("ScanStackedLayers_0", "ScanStackedOneLayer_0"), "StackedOneLayer_0", (2, 3)),
  (False, ("ScanStackedLayers_0", "ScanStackedOneLayer_0"), "StackedOneLayer_0", (2, 3)),
]


def _stack_of(tree, layers=(3,)):
  """``tree``'s leaves with the ``layers`` axes in front, as variable_axes={"params": 0}
  stacks them."""
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct((*layers, *s.shape), s.dtype), tree)


def _by_layer(shape, layers=(3,)):
  """1, 10, 100, ... on the layers (the leading ``layers`` axes, in order) of a leaf of
  ``shape``."""
  return 10.0 ** np.arange(np.prod(layers)).reshape(layers + (1,) * (len(shape) - len(layers)))


def _without_biases(tree):
  """``tree`` as its modules built with ``use_bias=False`` make it."""
  flat = traverse_util.flatten_dict(tree)
  return traverse_util.unflatten_dict({k: v for k, v in flat.items() if k[-1] != "bias"})


@pytest.mark.parametrize("kind", list(_ONE_LAYER))
def test_a_stack_is_averaged_as_its_layers_are_one_by_one_or_flagged(kind, rng):
  # The invariant behind every stack reading: the averaging of stacked layers is, layer by
  # layer, that of one layer on its own (or the leaf is flagged as a guess), with a diagonal of
  # 1, 10, 100, ... times random on layers 0, 1, 2, ... and the stack as large as the input
  # features and the window. Several layer axes too (nn.remat_scan's lengths=(2, 3), a scan of
  # scans): each is kept apart. Not here: an nn.scan under a name of your own of nothing but one
  # bias-less convolution, which no evidence shows (docs/layouts.md).
  one = _one_layer_params(kind)
  layer = one["StackedOneLayer_0"]
  for path, layers, stack in _LINEN_STACKS:  # what Linen makes, as _stack_of makes it
    params = _one_layer_params(kind, stack)
    assert functools.reduce(lambda t, k: t[k], path, params) == _stack_of(layer, layers), path
  conv = kind in ("Conv1D", "Conv2D", "Depthwise")
  checks = []  # (the case, the stack's rule, one layer's rule, its number of layer axes, diag)
  for use_bias, top, own, layers in _STACKINGS:
    if not use_bias and (kind == "Embed" or top == ("blocks",) and conv):
      continue
    mine = layer if use_bias else _without_biases(layer)
    stacked = _stack_of(mine, layers)
    tree = functools.reduce(lambda t, k: {k: t}, reversed(top), stacked)
    diag = jax.tree.map(
      lambda s, n=layers: rng.uniform(1, 2, s.shape) * _by_layer(s.shape, n), stacked
    )
    rows = spatial.describe({"head": one["head"], **tree}, block_size=2).rows
    rows = rows[: len(jax.tree.leaves(diag))]
    if use_bias and not (kind in _ANY_RANK and top[0].startswith("Remat") and len(layers) > 1):
      assert not any(r.ambiguous for r in rows), (top, layers)  # the biases show the stack
    one_rows = spatial.describe({"head": one["head"], own: mine}, block_size=2).rows
    where = "".join(f"['{k}']" for k in top)
    for row, one_row, d in zip(rows, one_rows, jax.tree.leaves(diag), strict=False):
      assert row.path == one_row.path.replace(f"['{own}']", where, 1)
      if not row.ambiguous:  # the rule the optimizer applies, against one layer's
        checks.append((f"{top} {row}", row.rule, one_row.rule, len(layers), d))

  @jax.jit  # every case in one program, not one per operation and leaf shape
  def stack_and_layers(diags):
    out = []
    for (_, rule, one_rule, n, _), d in zip(checks, diags, strict=True):
      each = d.reshape(-1, *d.shape[n:])
      out.append((rule(d), jnp.stack([one_rule(x) for x in each]).reshape(d.shape)))
    return out

  results = stack_and_layers([d for *_, d in checks])
  for (case, *_), (got, want) in zip(checks, results, strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-12, err_msg=case)


class _ResidualCell(nn.Module):
  """A residual Dense + LayerNorm step whose carry is its input: every leaf's first size is
  the features' (kernel (6, 6), bias and norm (6,)); with ``features=8`` the kernel is (6, 8)
  and the first 6 outputs are added; ``general`` makes the Dense a ``DenseGeneral``."""

  features: int = 6
  general: bool = False

  @nn.compact
  def __call__(self, c, x):
    dense = nn.DenseGeneral if self.general else nn.Dense
    h = nn.LayerNorm(param_dtype=jnp.float64)(dense(self.features, param_dtype=jnp.float64)(c))
    return c + h[..., :6], x


def _scanned_cells(features=6, general=False, **scan):
  """``nn.scan`` of :class:`_ResidualCell` over 4 steps inside a model (Linen names it
  ``Scan_ResidualCell_0``), its params as zeros."""

  class Model(nn.Module):
    @nn.compact
    def __call__(self, xs):
      cell = nn.scan(_ResidualCell, length=4, **scan)(features, general)
      return cell(xs[0], xs)[0]

  return zero_params(Model(), np.ones((4, 2, 6)))


def test_a_scan_name_shows_no_stack_where_its_modules_show_none_in_front(rng):
  # Linen's scan name took the first axis for the stack where every leaf under it had one first
  # size, as a residual block's leaves do. With variable_axes={"params": 1} the Dense_0 kernel is
  # (in, layers, out) = (6, 4, 6): read per input with blocks of 4 along the layers, averaging
  # the 4 layers together, unflagged. Its bias (out, layers) = (6, 4) fits no stack in front: the
  # rank's guess now, flagged, and strict mode refuses it.
  params = _scanned_cells(variable_axes={"params": 1}, split_rngs={"params": True})
  rows = {r.path: r for r in spatial.describe(params, block_size=4).rows}
  kernel = rows["['Scan_ResidualCell_0']['Dense_0']['kernel']"]
  assert kernel.shape == (6, 4, 6) and kernel.ambiguous
  assert kernel.rule != spatial.per_layer(spatial.blocks(4))
  with pytest.raises(ValueError, match=r"(?s)1 leaf is ambiguous.*\['Dense_0'\]\['kernel'\]"):
    spatial.describe(params, spatial.strict(), block_size=4)
  # A scan over time that broadcasts its params (variable_broadcast="params", as cells are
  # scanned over a sequence) stacks nothing: its Dense_0 bias (6,) shows one layer. An LSTM
  # cell's bias-less input kernels ii, if, ig, io (6, 6) beside its recurrent kernels and their
  # biases were read as 6 layers of a vector each, blocks of 2 along the inputs replaced by none.
  for scanned in (
    _scanned_cells(variable_broadcast="params", split_rngs={"params": False}),
    zero_params(
      nn.scan(
        nn.LSTMCell,
        variable_broadcast="params",
        split_rngs={"params": False},
        in_axes=1,
        out_axes=1,
      )(6, param_dtype=jnp.float64),
      (np.ones((2, 6)), np.ones((2, 6))),
      np.ones((2, 5, 6)),
    ),
  ):
    hessian_diag = jax.tree.map(lambda p: rng.uniform(1.0, 2.0, p.shape), scanned)
    with warnings.catch_warnings():
      warnings.simplefilter("error", spatial.LayoutGuessWarning)
      got = _nu_after_one_step(ah.scale_by_adahessian(b2=0.5, block_size=2), scanned, hessian_diag)
    flat = traverse_util.flatten_dict(hessian_diag, sep="/")
    for path, d in flat.items():
      want = block_average(np.asarray(d), 2) if path.endswith("kernel") else np.asarray(d)
      got_leaf = traverse_util.flatten_dict(got, sep="/")[path]
      np.testing.assert_allclose(got_leaf, want, rtol=1e-12, err_msg=path)


@pytest.mark.parametrize("general", [False, True], ids=["Dense", "DenseGeneral"])
def test_a_scan_that_may_stack_a_square_dense_behind_is_flagged(general, rng):
  # nn.scan with variable_axes={"params": -1} of a residual Dense (in = out = 6) over 4 steps:
  # kernel (in, out, layers) = (6, 6, 4) beside its bias (out, layers) = (6, 4) and the norm's
  # (6, 4). That also fits the Dense stacked in front, 6 layers of (6, 4) beside (4,): it was
  # read so, each "layer" blocked across 2 output units and the 4 real layers, unflagged. Every
  # leaf's last size being the kernel's too, the shapes cannot tell: flagged, strict refuses.
  cls = "DenseGeneral_0" if general else "Dense_0"
  kernel_path = f"['Scan_ResidualCell_0']['{cls}']['kernel']"
  scan = {"variable_axes": {"params": -1}, "split_rngs": {"params": True}}
  behind = _scanned_cells(6, general, **scan)
  rows = {r.path: r for r in spatial.describe(behind, block_size=2).rows}
  assert rows[kernel_path].shape == (6, 6, 4) and rows[kernel_path].ambiguous
  assert "variable_axes={'params': -1}" in rows[kernel_path].why
  assert [p for p, r in rows.items() if r.ambiguous] == [kernel_path]
  with pytest.raises(ValueError, match=rf"(?s)1 leaf is ambiguous.*\['{cls}'\]\['kernel'\]"):
    spatial.describe(behind, spatial.strict(), block_size=2)
  with pytest.warns(spatial.LayoutGuessWarning, match=re.escape(kernel_path)):
    ah.scale_by_adahessian(block_size=2).init(behind)
  # So under nn.vmap's name (an ensemble of 4 members stacked last), inside a model.
  vmap = {"variable_axes": {"params": -1}, "split_rngs": {"params": True}, "axis_size": 4}
  vmapped = nn.vmap(_ResidualCell, in_axes=None, **vmap)(6, general)
  vmapped = {"outer": {"VmapBlock_0": zero_params(vmapped, np.ones((2, 6)), None)}}
  rows = {r.path: r for r in spatial.describe(vmapped, block_size=2).rows}
  kernel = rows[f"['outer']['VmapBlock_0']['{cls}']['kernel']"]
  assert kernel.shape == (6, 6, 4) and kernel.ambiguous
  # The same block scanned as usual (params axis 0; in = out, or in != out), and stacked behind
  # with in != out (kernel (6, 8, 4) beside (8, 4): a DenseGeneral over two output axes, whose
  # blocks of inputs keep layers and outputs apart either way), stay sure reads: blocks of 2
  # inputs within each layer and output unit, no warning.
  for features, axis in ((6, 0), (8, 0), (8, -1)):
    scan = {"variable_axes": {"params": axis}, "split_rngs": {"params": True}}
    params = _scanned_cells(features, general, **scan)
    hessian_diag = jax.tree.map(lambda p: rng.uniform(1.0, 2.0, p.shape), params)
    with warnings.catch_warnings():
      warnings.simplefilter("error", spatial.LayoutGuessWarning)
      got = _nu_after_one_step(ah.scale_by_adahessian(b2=0.5, block_size=2), params, hessian_diag)
    got = traverse_util.flatten_dict(got, sep="/")
    for path, d in traverse_util.flatten_dict(hessian_diag, sep="/").items():
      d = np.asarray(d)
      if path.endswith("kernel"):  # (layers, in, out) or (in, out, layers): blocks of inputs
        in_axis = 1 if axis == 0 else 0
        want = block_average(d, 2, axis=in_axis)
      else:
        want = d
      np.testing.assert_allclose(got[path], want, rtol=1e-12, err_msg=f"{features} {axis} {path}")


class _ConvNormHead(nn.Module):
  """A bias-less 3x3 Conv, a BatchNorm and a Dense head, as CNN ensembles are written."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), use_bias=False, param_dtype=jnp.float64)(x)
    x = nn.BatchNorm(use_running_average=True, param_dtype=jnp.float64)(x)
    return nn.Dense(2, param_dtype=jnp.float64)(x.mean((-3, -2)))


def _cnn_ensemble(axis, inside):
  """``nn.vmap`` of :class:`_ConvNormHead` over 5 members along ``axis``, initialised on its own
  (``inside=False``) or inside a model (Linen names it ``Vmap_ConvNormHead_0``)."""
  ens = nn.vmap(
    _ConvNormHead,
    variable_axes={"params": axis, "batch_stats": axis},
    split_rngs={"params": True},
    in_axes=None,
    axis_size=5,
  )

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      return ens()(x)

  return zero_params(Model() if inside else ens(), np.ones((1, 6, 6, 3)))


@pytest.mark.parametrize("axis", [1, -1])
def test_a_bias_less_conv_beside_a_norm_stacked_behind_is_a_guess(axis):
  # nn.vmap over 5 members along axis 1 (or -1), initialised on its own: the Conv_0 kernel is
  # (3, 5, 3, 3, 4) (or (3, 3, 3, 4, 5)), the BatchNorm scale (4, 5). By Conv_0's name and no
  # stack known, the kernel was a 3-D convolution's for sure, its mean over axes 0-2 taking in
  # the 5 members (or the 3 input channels) at any block size, unflagged. A norm's unnamed scale
  # of rank 2 beside it shows a stack somewhere: the rank's guess now, flagged; strict refuses.
  params = _cnn_ensemble(axis, inside=False)
  rows = {r.path: r for r in spatial.describe(params).rows}
  kernel = rows["['Conv_0']['kernel']"]
  assert kernel.shape == ((3, 5, 3, 3, 4) if axis == 1 else (3, 3, 3, 4, 5))
  assert rows["['BatchNorm_0']['scale']"].shape == (4, 5)
  assert kernel.ambiguous, kernel.why
  with pytest.raises(ValueError, match=r"(?s)ambiguous.*\['Conv_0'\]\['kernel'\]"):
    spatial.describe(params, spatial.strict())


def test_an_ensemble_s_conv_with_its_bias_stacked_behind_is_no_dense_general():
  # nn.vmap(variable_axes={"params": -1}) of a Conv with its bias: kernel (3, 3, 3, 4, members),
  # bias (4, members). A bias of two axes made it a DenseGeneral's (blocks of 4 along the 3
  # input channels, the 3x3 window kept apart), unflagged, where a Conv averages its window. Under
  # a convolution's name such a bias shows a stack behind: the rank's guess, flagged.
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Conv(4, (3, 3))(x)

  ens = nn.vmap(
    Block, variable_axes={"params": -1}, split_rngs={"params": True}, in_axes=None, axis_size=5
  )
  params = zero_params(ens(), np.ones((1, 6, 6, 3)))
  rows = spatial.describe(params, block_size=4).rows
  kernel = next(r for r in rows if r.path == "['Conv_0']['kernel']")
  assert kernel.shape == (3, 3, 3, 4, 5) and kernel.ambiguous, kernel.why
  assert kernel.rule != spatial.blocks(4, axis=2)
  # So is an nnx.vmap(out_axes=-1) of an nnx.Conv under a name of the user's: its 3x3 window.
  plain = {"c1": {"kernel": np.zeros((3, 3, 3, 4, 5)), "bias": np.zeros((4, 5))}}
  (_, kernel) = spatial.describe(plain, block_size=4).rows
  assert kernel.ambiguous and kernel.rule != spatial.blocks(4, axis=2), kernel.why
  # A Linen DenseGeneral_0 beside such a bias is a DenseGeneral's still (by its name), and so is
  # a kernel of two input axes (heads, head_dim) beside its bias of two output axes.
  named = {"DenseGeneral_0": {"kernel": np.zeros((3, 3, 3, 4, 5)), "bias": np.zeros((4, 5))}}
  (_, general) = spatial.describe(named, block_size=4).rows
  assert general.rule == spatial.blocks(4, axis=2) and not general.ambiguous
  heads = {"proj": {"kernel": np.zeros((4, 4, 8, 2)), "bias": np.zeros((8, 2))}}
  (_, general) = spatial.describe(heads, block_size=4).rows
  assert general.rule == spatial.blocks(4, axis=1) and not general.ambiguous


def test_a_bias_less_conv_in_a_vmap_ensemble_whose_relatives_show_the_stack_is_no_guess(rng):
  # nn.vmap over 5 members along axis 0 inside a model (Vmap_ConvNormHead_0): the Dense head's
  # bias (5, 2) shows the stack in front, which the bias-less Conv_0 kernel (5, 3, 3, 3, 4) takes.
  # Under nn.vmap's name its one member's (3, 3, 3, 4) was still the rank's guess: the init of
  # every such ensemble warned. Each member's 3x3 window is averaged, with no warning.
  params = _cnn_ensemble(0, inside=True)
  hessian_diag = jax.tree.map(lambda p: rng.uniform(1.0, 2.0, p.shape), params)
  with warnings.catch_warnings():
    warnings.simplefilter("error", spatial.LayoutGuessWarning)
    got = _nu_after_one_step(ah.scale_by_adahessian(b2=0.5, block_size=2), params, hessian_diag)
  ((name, block),) = hessian_diag.items()
  conv = np.asarray(block["Conv_0"]["kernel"])
  assert conv.shape == (5, 3, 3, 3, 4)
  want = np.broadcast_to(conv.mean(axis=(1, 2), keepdims=True), conv.shape)
  np.testing.assert_allclose(got[name]["Conv_0"]["kernel"], want, rtol=1e-12)
  head = np.asarray(block["Dense_0"]["kernel"])  # (5, 4, 2): blocks of 2 inputs per member
  want = np.stack([block_average(head[m], 2) for m in range(5)])
  np.testing.assert_allclose(got[name]["Dense_0"]["kernel"], want, rtol=1e-12)
  for norm in ("scale", "bias"):
    np.testing.assert_allclose(got[name]["BatchNorm_0"][norm], block["BatchNorm_0"][norm])


def test_a_leaf_without_entries_is_no_guess():
  # A zero-size leaf (an empty embedding table, a layer of width 0 in a sweep) averages nothing
  # under any reading, yet a rank-3 one was flagged as a guess: a LayoutGuessWarning at init (an
  # error under -W error) and a refusal under spatial.strict, for nothing.
  params = {"z": jnp.zeros((3, 0, 2)), "w": jnp.ones((2, 3)), "k": jnp.ones((3, 3, 2, 4))}
  rows = {r.path: r for r in spatial.describe(params).rows}
  assert not rows["['z']"].ambiguous and rows["['z']"].groups == {}
  assert rows["['z']"].why.endswith("no entries, so any reading averages the same")
  assert rows["['k']"].ambiguous  # a leaf with entries and the same reading stays a guess
  del params["k"]
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    tx = ah.adahessian(0.1, averaging=spatial.strict(spatial.flax_default()))
    state = tx.init(params)
    loss = lambda p: jnp.sum(p["w"] ** 4) + jnp.sum(p["z"])
    updates, state = tx.update(jax.grad(loss)(params), state, params, value_fn=loss)
  assert updates["z"].shape == (3, 0, 2)
  # d/dw of w^4 is 4, its curvature 12: the first step is lr * g / (|D| + eps) = 0.1 * 4 / 12.
  np.testing.assert_allclose(updates["w"], -0.1 * 4 / (12 + 1e-4), rtol=1e-12)
