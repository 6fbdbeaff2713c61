"""Spatial averaging on models the other layout tests do not use (audit, round 3).

Each model's leaves are written down by hand as what they are (a Dense kernel's inputs, a
convolution window, a per-layer or per-expert slice, a bias); the reference is a NumPy average
over exactly those groups, compared with ``spatial.describe``'s groups and with the ``nu`` that
one ``scale_by_adahessian`` step leaves, for a random Hessian diagonal. Only readings found right
are kept here, as regression tests; none of these models is flagged (``LayoutGuessWarning``).
"""

import dataclasses
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adahessian_jax as ah
from adahessian_jax import spatial

# nn.SelfAttention is read here on purpose (its module name is SelfAttention_0); Flax warns that
# it will be deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:SelfAttention will be deprecated")

BS = 4
B2 = 0.999


def S(*shape):
  return jax.ShapeDtypeStruct(shape, jnp.float64)


# What a leaf is, in global axes of the leaf: ("none",), ("blocks", axis) (consecutive blocks of BS
# along axis, the last one shorter; every other axis kept apart) or ("mean", axes) (a mean over
# those axes).
NONE = ("none",)


def blocks(axis):
  return ("blocks", axis)


def mean(*axes):
  return ("mean", axes)


def reference(h, spec):
  """The NumPy average of ``h`` over the groups ``spec`` names (loops, no reshapes)."""
  h = np.asarray(h, np.float64)
  if spec[0] == "none":
    return h.copy()
  if spec[0] == "mean":
    return np.broadcast_to(h.mean(axis=spec[1], keepdims=True), h.shape).copy()
  axis = spec[1]
  out = np.empty_like(h)
  moved, dst = np.moveaxis(h, axis, 0), np.moveaxis(out, axis, 0)
  for start in range(0, moved.shape[0], BS):
    dst[start : start + BS] = moved[start : start + BS].mean(axis=0, keepdims=True)
  return out


def group_sizes(shape, spec):
  """``{group size: count}`` of ``spec`` on ``shape``, as ``describe`` lists them."""
  size = int(np.prod(shape))
  if spec[0] == "none":
    return {1: size}
  if spec[0] == "mean":
    n = int(np.prod([shape[a] for a in spec[1]]))
    return {n: size // n}
  n = shape[spec[1]]
  rest = size // n
  sizes = {}
  for start in range(0, n, BS):
    k = min(BS, n - start)
    sizes[k] = sizes.get(k, 0) + rest
  return sizes


def check(params, expected, stacked=False):
  """describe's groups and the averaging resolved for the optimizer agree with ``expected``
  ({path: spec}) on every leaf; ``stacked``: the model has stacked layers or experts."""
  listing = spatial.describe(params, block_size=BS)
  assert listing.ambiguous == ()
  rows = {r.path: r for r in listing.rows}
  assert set(rows) == set(expected)
  for path, spec in expected.items():
    assert rows[path].groups == group_sizes(rows[path].shape, spec), (path, rows[path].rule)
  rules = spatial.resolve_rules(None, params, BS, strict=True)  # refuses nothing
  hs = _random_like(params)
  averaged = spatial.apply_rules(rules, hs)
  for (path, got), h in zip(_with_paths(averaged), jax.tree.leaves(hs), strict=True):
    spec = expected[path]
    np.testing.assert_allclose(
      np.asarray(got), reference(np.asarray(h), spec), rtol=1e-12, err_msg=path
    )
  MODELS.append((params, expected, stacked))


#: Every model checked, for the optimizer's step on all of them at once.
MODELS = []


def _with_paths(tree):
  return [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _random_like(params, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.uniform(0.5, 2.0, s.shape)), params)


def linen_params(model, *inputs):
  return jax.eval_shape(model.init, jax.random.key(0), *inputs)["params"]


def by_rules(params, rules):
  """{path: spec} from the first (substring, spec) of ``rules`` each path holds."""
  out = {}
  for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    key = jax.tree_util.keystr(path)
    out[key] = next(spec for sub, spec in rules if sub in key)
  return out


def test_linen_conv_transpose_1d_and_3d():
  class Model(nn.Module):
    @nn.compact
    def __call__(self, x, y):
      a = nn.ConvTranspose(8, (3,))(x)  # (3, 6, 8) + (8,)
      b = nn.ConvTranspose(8, (3, 3, 3), use_bias=False)(y)  # (3, 3, 3, 2, 8), no bias
      return a, nn.ConvTranspose(8, (2, 2, 2))(b)

  params = linen_params(Model(), jnp.zeros((2, 5, 6)), jnp.zeros((1, 4, 4, 4, 2)))
  check(
    params,
    {
      "['ConvTranspose_0']['bias']": NONE,
      "['ConvTranspose_0']['kernel']": mean(0),
      "['ConvTranspose_1']['kernel']": mean(0, 1, 2),
      "['ConvTranspose_2']['bias']": NONE,
      "['ConvTranspose_2']['kernel']": mean(0, 1, 2),
    },
  )


def test_linen_scanned_self_attention_with_qkv_and_out_features():
  """nn.SelfAttention(qkv_features=32, out_features=24) and a Dense back in an nn.scan of 3."""

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      y = nn.SelfAttention(num_heads=4, qkv_features=32, out_features=24)(x)
      return x + nn.Dense(16)(y), None

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      scan = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
      return scan(name="blocks")(x, None)[0]

  params = linen_params(Model(), jnp.zeros((2, 5, 16)))
  # query/key/value (3, 16, 4, 8): the 16 inputs of each layer and head; out (3, 4, 8, 24): the 8
  # head_dim inputs of each layer and head; Dense (3, 24, 16): its 24 inputs per layer.
  rules = [("bias", NONE), ("['out']['kernel']", blocks(2)), ("kernel", blocks(1))]
  check(params, by_rules(params, rules), stacked=True)


def test_linen_remat_scan_bias_less_self_attention():
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      y = nn.SelfAttention(num_heads=2, qkv_features=8, use_bias=False)(x)
      return x + nn.Dense(16, use_bias=False)(y)

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.remat_scan(Block, lengths=(2, 3))()(x)

  params = linen_params(Model(), jnp.zeros((2, 5, 16)))
  # Two stacked axes (2, 3) lead every leaf: query (2, 3, 16, 2, 4) blocks along the 16 inputs.
  check(
    params,
    by_rules(params, [("['out']['kernel']", blocks(3)), ("kernel", blocks(2))]),
    stacked=True,
  )


def test_linen_vmap_ensemble_of_attention_blocks():
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      y = nn.SelfAttention(num_heads=4, qkv_features=32, out_features=24)(x)
      return x + nn.Dense(16)(y)

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      vmap = nn.vmap(
        Block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=None,
        out_axes=0,
        axis_size=4,
      )
      return vmap(name="members")(x)

  params = linen_params(Model(), jnp.zeros((2, 5, 16)))
  rules = [("bias", NONE), ("['out']['kernel']", blocks(2)), ("kernel", blocks(1))]
  check(params, by_rules(params, rules), stacked=True)


def test_linen_jit_and_remat_wrapped_bias_less_1d_convolutions():
  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.jit(nn.Conv)(16, (3,), use_bias=False)(x)  # JitConv_0
      x = nn.remat(nn.Conv)(16, (5,), use_bias=False)(x)  # CheckpointConv_0
      return nn.remat(nn.Dense)(16, use_bias=False)(x)  # CheckpointDense_0

  params = linen_params(Model(), jnp.zeros((2, 7, 16)))
  check(
    params,
    {
      "['JitConv_0']['kernel']": mean(0),
      "['CheckpointConv_0']['kernel']": mean(0),
      "['CheckpointDense_0']['kernel']": blocks(0),
    },
  )


def test_linen_scanned_convnext_blocks_with_a_layer_scale():
  """A ConvNeXt stage in an nn.scan of 3: depthwise 7x7 Conv, LayerNorm, two Dense, gamma (d,)."""

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      d = x.shape[-1]
      y = nn.Conv(d, (7, 7), feature_group_count=d, name="dwconv")(x)
      y = nn.Dense(4 * d, name="pwconv1")(nn.LayerNorm(name="norm")(y))
      y = nn.Dense(d, name="pwconv2")(nn.gelu(y))
      gamma = self.param("gamma", nn.initializers.constant(1e-6), (d,))
      return x + gamma * y, None

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      scan = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
      return scan(name="stage")(x, None)[0]

  params = linen_params(Model(), jnp.zeros((1, 8, 8, 16)))
  rules = [("dwconv']['kernel", mean(1, 2)), ("pwconv1']['kernel", blocks(1))]
  rules += [("pwconv2']['kernel", blocks(1)), ("", NONE)]  # biases, scales, gamma (3, 16)
  check(params, by_rules(params, rules), stacked=True)


def test_haiku_layer_stack_transformer():
  """hk.layer_stack of 3 layers: MultiHeadAttention's query/key/value/linear, an MLP, LayerNorm."""
  n, d, h = 3, 16, 32
  stack = "transformer/~/layer_stack/~/"
  params = {
    "embed": {"embeddings": S(50, d)},
    stack + "mha/query": {"w": S(n, d, h), "b": S(n, h)},
    stack + "mha/key": {"w": S(n, d, h), "b": S(n, h)},
    stack + "mha/value": {"w": S(n, d, h), "b": S(n, h)},
    stack + "mha/linear": {"w": S(n, h, d), "b": S(n, d)},
    stack + "layer_norm": {"scale": S(n, d), "offset": S(n, d)},
    stack + "mlp/~/linear_0": {"w": S(n, d, 64), "b": S(n, 64)},
    stack + "mlp/~/linear_1": {"w": S(n, 64, d), "b": S(n, d)},
  }
  rules = [("['embeddings']", blocks(1)), ("['w']", blocks(1)), ("", NONE)]
  check(params, by_rules(params, rules), stacked=True)


def test_mixtures_of_experts_by_their_usual_names():
  """Mixtral's block_sparse_moe/experts/w1..w3, MaxText-like moe/wi, a Switch layer's biases."""
  e, d, ff = 4, 16, 32
  params = {
    "layers_0": {"moe": {"router": {"kernel": S(d, e)}, "wi": S(e, d, ff), "wo": S(e, ff, d)}},
    "layers_1": {
      "block_sparse_moe": {
        "gate": {"kernel": S(d, e)},
        "experts": {"w1": S(e, d, ff), "w2": S(e, ff, d), "w3": S(e, d, ff)},
      }
    },
    "layers_2": {
      "switch": {
        "router": {"kernel": S(d, e), "bias": S(e)},
        "wi": {"kernel": S(e, d, ff), "bias": S(e, ff)},
        "wo": {"kernel": S(e, ff, d), "bias": S(e, d)},
      }
    },
  }
  rules = [("bias", NONE), ("router", blocks(0)), ("gate", blocks(0)), ("", blocks(1))]
  check(params, by_rules(params, rules), stacked=True)


def test_hugging_face_flax_t5_and_llama_trees():
  d, h, ff, v = 16, 32, 64, 50
  attention = {
    "q": {"kernel": S(d, h)},
    "k": {"kernel": S(d, h)},
    "v": {"kernel": S(d, h)},
    "o": {"kernel": S(h, d)},
    "relative_attention_bias": {"embedding": S(32, 4)},  # (buckets, heads): a bias each
  }
  mlp = {"wi_0": {"kernel": S(d, ff)}, "wi_1": {"kernel": S(d, ff)}, "wo": {"kernel": S(ff, d)}}
  t5 = {
    "shared": {"embedding": S(v, d)},
    "encoder": {
      "block": {
        "0": {
          "layer": {
            "0": {"SelfAttention": attention, "layer_norm": {"weight": S(d)}},
            "1": {"DenseReluDense": mlp, "layer_norm": {"weight": S(d)}},
          }
        }
      },
      "final_layer_norm": {"weight": S(d)},
    },
    "lm_head": {"kernel": S(d, v)},
  }
  check(
    t5,
    by_rules(
      t5,
      [("shared", blocks(1)), ("relative_attention_bias", NONE), ("weight", NONE), ("", blocks(0))],
    ),
  )
  layer = {
    "self_attn": {
      "q_proj": {"kernel": S(d, d)},
      "k_proj": {"kernel": S(d, d // 2)},
      "v_proj": {"kernel": S(d, d // 2)},
      "o_proj": {"kernel": S(d, d)},
    },
    "mlp": {
      "gate_proj": {"kernel": S(d, ff)},
      "up_proj": {"kernel": S(d, ff)},
      "down_proj": {"kernel": S(ff, d)},
    },
    "input_layernorm": {"weight": S(d)},
    "post_attention_layernorm": {"weight": S(d)},
  }
  llama = {
    "model": {
      "embed_tokens": {"embedding": S(v, d)},
      "norm": {"weight": S(d)},
      "layers": {"0": layer},
    },
    "lm_head": {"kernel": S(d, v)},
  }
  rules = [("embed_tokens", blocks(1)), ("weight", NONE), ("", blocks(0))]
  check(llama, by_rules(llama, rules))


def _module(name, **fields):
  """An Equinox-like module: a dataclass whose fields are its children (paths ``.weight``)."""
  cls = dataclasses.make_dataclass(name, list(fields))
  jax.tree_util.register_dataclass(cls, data_fields=list(fields), meta_fields=[])
  return cls(**fields)


def test_equinox_cnn_and_ensemble_trees():
  """Equinox's layouts: Conv weight (out, in, *window) + bias (out, 1, ..., 1), Linear (out, in)."""
  cnn = _module(
    "CNN",
    c1=_module("Conv2d", weight=S(8, 3, 3, 3), bias=S(8, 1, 1)),
    c2=_module("Conv1d", weight=S(8, 8, 5), bias=S(8, 1)),
    ct=_module("ConvTranspose2d", weight=S(4, 8, 2, 2), bias=S(4, 1, 1)),
    head=_module("Linear", weight=S(10, 8), bias=S(10)),
  )
  rules = [("bias", NONE), ("c2", mean(2)), ("head", blocks(1)), ("", mean(2, 3))]
  check(cnn, by_rules(cnn, rules))
  # eqx.filter_vmap of 5 members: each member's Conv and Linear kept apart.
  ensemble = _module(
    "CNN",
    conv=_module("Conv2d", weight=S(5, 8, 3, 3, 3), bias=S(5, 8, 1, 1)),
    lin=_module("Linear", weight=S(5, 10, 8), bias=S(5, 10)),
  )
  rules = [("bias", NONE), ("conv", mean(3, 4)), ("lin", blocks(2))]
  check(ensemble, by_rules(ensemble, rules), stacked=True)


def _step_on(models):
  """One scale_by_adahessian step on a list of models' trees: each leaf's nu, with the expected."""
  params = [m[0] for m in models]
  arrays = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float64), params)
  hessian = jax.tree.map(lambda h: -h, _random_like(params, seed=1))  # signs do not matter
  tx = ah.scale_by_adahessian(b2=B2, block_size=BS)
  with warnings.catch_warnings():
    warnings.simplefilter("error", spatial.LayoutGuessWarning)
    state = tx.init(arrays)
  _, state = jax.jit(tx.update)(arrays, state, arrays, hessian_diag=hessian)
  for i, (_, expected, _) in enumerate(models):
    nus = _with_paths(state.nu[i])
    assert {path for path, _ in nus} == set(expected)
    for (path, nu), h in zip(nus, jax.tree.leaves(hessian[i]), strict=True):
      want = (1 - B2) * reference(np.abs(np.asarray(h)), expected[path]) ** 2
      np.testing.assert_allclose(np.asarray(nu), want, rtol=1e-12, err_msg=f"model {i}: {path}")


def test_one_adahessian_step_averages_each_model_so():
  """nu after one scale_by_adahessian step is (1 - b2) times the reference average of |h|, squared,
  on every leaf of every model above, with no LayoutGuessWarning. Two steps, one over the models
  with stacked layers or experts and one over those without: in one list, a model without a stack
  would see the others' stacks as its relatives' (flagged, as the docs say)."""
  if len(MODELS) != 12:  # run alone: build them
    MODELS.clear()
    for name, test in list(globals().items()):
      if name.startswith("test_") and name != "test_one_adahessian_step_averages_each_model_so":
        test()
  stacked = [m for m in MODELS if m[2]]
  assert len(stacked) == 7 and len(MODELS) == 12
  _step_on(stacked)
  _step_on([m for m in MODELS if not m[2]])
