"""Tests of adahessian_jax.hessian.landscape and .plot."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hessian_problems import mlp, mlp_hessian, mlp_loss

from adahessian_jax import hessian


@pytest.fixture(scope="module")
def op():
  params, (x, y) = mlp()
  return hessian.hessian_operator(mlp_loss, params, batches=[(x[:15], y[:15]), (x[15:], y[15:])])


@pytest.fixture(scope="module")
def direct(op):
  """The loss at the params moved by a flat step, evaluated directly (one jitted program)."""
  params, batch = mlp()
  shifted = jax.jit(lambda flat: mlp_loss(op.unravel(op.ravel(params) + flat), batch))
  return lambda flat: float(shifted(flat))


def test_1d_along_the_top_eigenvector_has_its_curvature(op):
  h = 1e-3
  ls = hessian.loss_landscape_1d(op, [-h, 0.0, h])
  lam = np.linalg.eigvalsh(mlp_hessian())[-1]
  curvature = (ls.losses[0] - 2 * ls.losses[1] + ls.losses[2]) / h**2
  assert curvature == pytest.approx(lam, rel=1e-4)
  assert ls.losses[1] == pytest.approx(float(op.loss()), rel=1e-14)
  assert float(jnp.linalg.norm(ls.direction)) == pytest.approx(1.0)


def test_1d_given_direction_matches_direct_evaluation(op, direct):
  d = op.unravel(jnp.asarray(np.random.default_rng(0).normal(size=op.size)))
  alphas = np.linspace(-1, 1, 7)
  ls = hessian.loss_landscape_1d(op, alphas, d, normalize="unit", chunk=3)
  unit = op.ravel(d) / jnp.linalg.norm(op.ravel(d))
  want = [direct(a * unit) for a in alphas]
  np.testing.assert_allclose(ls.losses, want, rtol=1e-13)


def test_2d_matches_direct_evaluation(op, direct):
  rng = np.random.default_rng(1)
  d1, d2 = (jnp.asarray(rng.normal(size=op.size)) for _ in range(2))
  alphas, betas = np.linspace(-0.5, 0.5, 4), np.linspace(-1, 1, 3)
  ls = hessian.loss_landscape_2d(op, alphas, betas, (d1, d2))
  assert ls.losses.shape == (4, 3)
  for i, j in [(0, 0), (3, 1), (2, 2)]:
    assert ls.losses[i, j] == pytest.approx(direct(alphas[i] * d1 + betas[j] * d2), rel=1e-13)
  default = hessian.loss_landscape_2d(op, alphas, betas)
  np.testing.assert_allclose(default.directions @ default.directions.T, np.eye(2), atol=1e-10)


def test_layer_normalisation(op):
  d = jnp.ones(op.size)
  ls = hessian.loss_landscape_1d(op, [0.0], d, normalize="layer")
  p = op.ravel(op.params)
  for sl in op.leaf_slices:
    assert float(jnp.linalg.norm(ls.direction[sl])) == pytest.approx(
      float(jnp.linalg.norm(p[sl])), rel=1e-12
    )
  with pytest.raises(ValueError, match="normalize must be one of"):
    hessian.loss_landscape_1d(op, [0.0], d, normalize="filters")


def test_filter_normalisation_gives_every_filter_its_weight_filters_norm():
  # Flax layouts: Conv kernel (h, w, in, out), Dense kernel (in, out); the output is last.
  r = np.random.default_rng(0)
  params = {
    "Conv_0": {"kernel": jnp.asarray(r.normal(size=(3, 3, 2, 4))), "bias": jnp.zeros(4)},
    "Dense_0": {
      "kernel": jnp.asarray(r.normal(size=(6, 5))),
      "bias": jnp.asarray(r.normal(size=5)),
    },
  }

  def loss_fn(p, x):
    h = jnp.tanh(jnp.einsum("hwio,bhwi->bo", p["Conv_0"]["kernel"], x) + p["Conv_0"]["bias"])
    h = jnp.concatenate([h, h[:, :2]], axis=1)
    return jnp.mean((h @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]) ** 2)

  x = jnp.asarray(r.normal(size=(4, 3, 3, 2)))
  op = hessian.hessian_operator(loss_fn, params, x)
  d = op.unravel(hessian.random_direction(op, jax.random.key(0)))
  d["Dense_0"]["kernel"] = d["Dense_0"]["kernel"].at[:, 3].set(0.0)  # a zero filter stays zero
  ls = hessian.loss_landscape_1d(op, [0.0, 0.5], d, normalize="filter")
  got = op.unravel(ls.direction)
  for layer in ("Conv_0", "Dense_0"):
    w, g = np.asarray(params[layer]["kernel"]), np.asarray(got[layer]["kernel"])
    for j in range(w.shape[-1]):
      want = 0.0 if (layer, j) == ("Dense_0", 3) else np.linalg.norm(w[..., j])
      assert np.linalg.norm(g[..., j]) == pytest.approx(want, rel=1e-12, abs=1e-300)
      # Only rescaled: the filter keeps its direction.
      if want:
        cos = np.vdot(g[..., j], np.asarray(d[layer]["kernel"])[..., j])
        assert cos / (np.linalg.norm(g[..., j]) * np.linalg.norm(d[layer]["kernel"][..., j])) == (
          pytest.approx(1.0, rel=1e-12)
        )
    np.testing.assert_array_equal(got[layer]["bias"], 0.0)  # biases: zero direction
  moved = jax.jit(lambda p, e: loss_fn(jax.tree.map(lambda a, b: a + 0.5 * b, p, e), x))
  assert ls.losses[1] == pytest.approx(float(moved(params, got)), rel=1e-13)
  # 2-D with two filter-normalised random directions.
  d2 = hessian.random_direction(op, jax.random.key(1))
  plane = hessian.loss_landscape_2d(op, [0.0, 1.0], [0.0, 1.0], (d, d2), normalize="filter")
  np.testing.assert_allclose(plane.directions[0], ls.direction, rtol=1e-14)


def _sin_op(params):
  """An operator on ``params`` whose loss is smooth in every entry (for the directions only)."""
  loss_fn = lambda p, b: b * sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(p))
  return hessian.hessian_operator(loss_fn, params, 1.0)


def test_filter_normalisation_zeroes_biases_and_scales_of_any_rank():
  # Flax names them: a DenseGeneral/Einsum bias (*features), an attention bias (heads, head_dim),
  # a LayerNorm scale over two feature axes, a stack's unnamed bias (layers, out). Read by rank they
  # were kernels, rescaled per last-axis column, across heads and layers.
  r = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(r.normal(size=shape))
  params = {
    "query": {"kernel": normal(6, 5), "bias": normal(2, 5)},
    "ln": {"scale": normal(3, 4), "bias": normal(3, 4)},
    "stack": {"kernel": normal(2, 4, 4), "bias": normal(2, 4)},
    # Haiku's names: AlphaFold's gating bias (heads, head_dim) beside its gating_w.
    "attention": {"gating_w": normal(6, 2, 5), "gating_b": normal(2, 5)},
  }
  op = _sin_op(params)
  nd = op.unravel(
    hessian.normalize_direction(op, hessian.random_direction(op, jax.random.key(0)), "filter")
  )
  for path, leaf in jax.tree_util.tree_leaves_with_path(nd):
    if path[-1].key not in ("kernel", "gating_w"):
      np.testing.assert_array_equal(leaf, 0.0, err_msg=jax.tree_util.keystr(path))
  want = np.linalg.norm(np.asarray(params["query"]["kernel"]), axis=0)
  np.testing.assert_allclose(np.linalg.norm(nd["query"]["kernel"], axis=0), want, rtol=1e-12)


def _filter_norms(x, axes):
  """The norm of every filter of ``x``, a filter indexed by ``axes`` (numpy, for the tests)."""
  x = np.moveaxis(np.asarray(x), axes, range(len(axes)))
  return np.linalg.norm(x.reshape(int(np.prod(x.shape[: len(axes)])), -1), axis=1)


def test_filter_normalisation_keeps_attention_heads_apart():
  # A query/key/value kernel (embed, heads, head_dim) has a filter per output unit (head, head_dim
  # entry); the last axis alone pooled each head_dim entry across heads. The output kernel
  # (heads, head_dim, embed) has one per embed entry. Flax's module names tell them apart without
  # axis names; axis names (a "heads" role) do under any module name, in a stack too.
  import flax.linen as nn

  r = np.random.default_rng(0)
  heads_scale = np.array([1.0, 100.0])  # head 1 a hundred times larger
  q = r.normal(size=(6, 2, 3)) * heads_scale[:, None]
  out = r.normal(size=(2, 3, 6)) * heads_scale[:, None, None]
  op = _sin_op({"query": {"kernel": jnp.asarray(q)}, "out": {"kernel": jnp.asarray(out)}})
  d = hessian.random_direction(op, jax.random.key(0))
  nd = op.unravel(hessian.normalize_direction(op, d, "filter"))
  np.testing.assert_allclose(_filter_norms(nd["query"]["kernel"], (1, 2)), _filter_norms(q, (1, 2)))
  np.testing.assert_allclose(_filter_norms(nd["out"]["kernel"], (2,)), _filter_norms(out, (2,)))

  stack = {"proj": np.stack([q, 10 * q]), "o": np.stack([out, -out])}  # two layers each
  names = {"proj": ("layers", "embed", "heads", "kv"), "o": ("layers", "heads", "kv", "embed")}
  op = _sin_op({k: nn.LogicallyPartitioned(jnp.asarray(stack[k]), names[k]) for k in stack})
  d = hessian.random_direction(op, jax.random.key(1))
  nd = nn.unbox(op.unravel(hessian.normalize_direction(op, d, "filter")))
  for k, axes in (("proj", (0, 2, 3)), ("o", (0, 3))):
    np.testing.assert_allclose(_filter_norms(nd[k], axes), _filter_norms(stack[k], axes))

  # Unnamed, stacked by layer_axes= (nnx.vmap without sharding metadata): Flax's module names
  # find the heads in each layer, as they do unstacked; a filter of the stacked query kernel
  # pooled both heads' head_dim entries (norms off by up to 61x here).
  op = _sin_op({"query": {"kernel": stack["proj"]}, "out": {"kernel": stack["o"]}})
  d = hessian.random_direction(op, jax.random.key(2))
  nd = op.unravel(hessian.normalize_direction(op, d, "filter", layer_axes=1))
  for k, w, axes in (("query", "proj", (0, 2, 3)), ("out", "o", (0, 3))):
    np.testing.assert_allclose(_filter_norms(nd[k]["kernel"], axes), _filter_norms(stack[w], axes))


def test_filter_normalisation_gives_each_output_unit_of_a_dense_general_its_own_filter():
  # A DenseGeneral/nnx.LinearGeneral with features (3, 5) (kernel (6, 3, 5), bias (3, 5)), or an
  # Einsum with a bias, has 15 output units, each a filter, as its bias shows under any name; the
  # last axis alone pooled each column across the 3 units of the first output axis (norms off by
  # up to 69x here). Without a bias, nothing shows the output axes: the last axis stays the filter.
  r = np.random.default_rng(0)
  scale = np.array([1.0, 10.0, 100.0])[:, None]  # the first output axis' units differ in scale
  k = r.normal(size=(6, 3, 5)) * scale
  params = {
    "DenseGeneral_0": {"kernel": jnp.asarray(k), "bias": jnp.zeros((3, 5))},
    "proj": {"kernel": jnp.asarray(-k), "bias": jnp.ones((3, 5))},
    "no_bias": {"kernel": jnp.asarray(k)},
    # A bias that fits two ways (one layer with outputs (6, 4), or a batch of 6): the rank's guess.
    "batched": {"kernel": jnp.asarray(r.normal(size=(6, 6, 4))), "bias": jnp.zeros((6, 4))},
  }
  op = _sin_op(params)
  d = hessian.random_direction(op, jax.random.key(0))
  nd = op.unravel(hessian.normalize_direction(op, d, "filter"))
  for name, axes in (("DenseGeneral_0", (1, 2)), ("proj", (1, 2)), ("no_bias", (2,))):
    np.testing.assert_allclose(
      _filter_norms(nd[name]["kernel"], axes), _filter_norms(k, axes), rtol=1e-12, err_msg=name
    )
  np.testing.assert_allclose(
    _filter_norms(nd["batched"]["kernel"], (2,)),
    _filter_norms(params["batched"]["kernel"], (2,)),
    rtol=1e-12,
  )


def test_filter_normalisation_gives_each_output_unit_of_an_einsum_its_own_filter():
  # An Einsum's bias is its output's kernel axes in the output's order: "bd,dhk->bkh" has a kernel
  # (d, h, k) and a bias (k, h), 6 output units; the last axis alone pooled each k across both h
  # (norms off by up to 7x here). A batched kernel (batch, in, out) beside its bias (batch, out)
  # under layer_axes=0 has a filter per batch entry and output too, as its bias shows, and so has
  # an nn.vmap ensemble with variable_axes={"params": 1}: kernel (in, members, out), bias (out,
  # members) (per output across members, norms were off by up to 124x). One that contracts no
  # input, "btd,td->btd" (kernel and bias (t, d)), has a filter per entry (per column across the
  # positions t, an entry's size was off by up to 4,600x here).
  import flax.linen as nn

  r = np.random.default_rng(0)
  # Flax's inits as one jitted program each (op by op each primitive compiled on its own).
  einsum = jax.jit(nn.Einsum((4, 2, 3), "bd,dhk->bkh").init)(jax.random.key(0), jnp.ones((1, 4)))
  k = r.normal(size=(4, 2, 3)) * np.array([1.0, 30.0])[:, None]  # the two h differ in scale
  batched = r.normal(size=(2, 4, 3)) * np.array([1.0, 30.0])[:, None, None]
  ens = nn.vmap(
    nn.Dense, variable_axes={"params": 1}, split_rngs={"params": True}, in_axes=None, axis_size=3
  )(4)
  ens = jax.jit(ens.init)(jax.random.key(1), jnp.ones((1, 6)))["params"]
  members = np.asarray(ens["kernel"]) * np.array([1.0, 10.0, 100.0])[:, None]
  gate = r.normal(size=(4, 3)) * np.array([0.1, 1.0, 10.0, 100.0])[:, None]
  params = {
    "Einsum_0": {"kernel": jnp.asarray(k), "bias": einsum["params"]["bias"]},
    "batched": {"kernel": jnp.asarray(batched), "bias": jnp.zeros((2, 3))},
    "ensemble": {"kernel": jnp.asarray(members), "bias": ens["bias"]},
    "gate": {"kernel": jnp.asarray(gate), "bias": jnp.zeros((4, 3))},
  }
  assert params["Einsum_0"]["bias"].shape == (3, 2)
  op = _sin_op(params)
  d = hessian.random_direction(op, jax.random.key(0))
  nd = op.unravel(hessian.normalize_direction(op, d, "filter", layer_axes=0))
  np.testing.assert_allclose(
    _filter_norms(nd["Einsum_0"]["kernel"], (1, 2)), _filter_norms(k, (1, 2)), rtol=1e-12
  )
  np.testing.assert_allclose(
    _filter_norms(nd["batched"]["kernel"], (0, 2)), _filter_norms(batched, (0, 2)), rtol=1e-12
  )
  assert members.shape == (6, 3, 4) and ens["bias"].shape == (4, 3)
  np.testing.assert_allclose(
    _filter_norms(nd["ensemble"]["kernel"], (1, 2)), _filter_norms(members, (1, 2)), rtol=1e-12
  )
  np.testing.assert_allclose(np.abs(nd["gate"]["kernel"]), np.abs(gate), rtol=1e-12)


def test_filter_normalisation_gives_each_token_of_an_embedding_its_rows_norm():
  # An Embed table (num_embeddings, features) has a filter per token (row), as the reference code
  # rescales PyTorch's (num, dim) tables; per feature column, a rare token's small row got the
  # column's scale. Axis names ("vocab") say the same, and mark an unembedding's tokens too.
  import flax.linen as nn

  r = np.random.default_rng(0)
  table = r.normal(size=(5, 3)) * np.array([1e-3, 1.0, 1.0, 10.0, 1.0])[:, None]
  unembed = r.normal(size=(3, 5))
  named = {
    "tok": nn.LogicallyPartitioned(jnp.asarray(table), ("vocab", "embed")),
    "head": nn.LogicallyPartitioned(jnp.asarray(unembed), ("embed", "vocab")),
  }
  for params in ({"Embed_0": {"embedding": jnp.asarray(table)}}, named):
    op = _sin_op(params)
    nd = op.unravel(
      hessian.normalize_direction(op, hessian.random_direction(op, jax.random.key(0)), "filter")
    )
    got = jax.tree.leaves(nn.unbox(nd))
    np.testing.assert_allclose(np.linalg.norm(got[-1], axis=1), np.linalg.norm(table, axis=1))
    if len(got) == 2:  # the unembedding (embed, vocab): per token column
      np.testing.assert_allclose(np.linalg.norm(got[0], axis=0), np.linalg.norm(unembed, axis=0))


def test_filter_normalisation_of_pytorch_layouts_and_tables():
  # Equinox and PyTorch ports name their weights "weight", output axis first: a Linear (out, in)
  # and a Conv (out, in, kh, kw) have a filter per output unit along axis 0, and Haiku's table
  # "embeddings" (vocab, dim) one per token; by Flax's layouts the filters ran along the last axis.
  # Haiku's VectorQuantizer codebook "embeddings" (dim, codes) has one per code (column), and
  # TransformerLens's W_E (vocab, d_model) one per token (row): they ran along the other axis.
  # Hugging Face's PyTorch Conv1D weight (in, out) beside its bias (out,) has one per output
  # (column), as its bias shows: by the name's layout they ran along the rows.
  r = np.random.default_rng(1)
  scales = np.array([1e-3, 1.0, 10.0, 1.0])
  linear = r.normal(size=(4, 3)) * scales[:, None]
  conv = r.normal(size=(4, 2, 3, 3)) * scales[:, None, None, None]
  table = r.normal(size=(4, 3)) * scales[:, None]
  positions = r.normal(size=(1, 4, 3)) * scales[:, None]  # ViT's (1, length, features)
  params = {
    "lin": {"weight": jnp.asarray(linear)},
    "conv": {"weight": jnp.asarray(conv)},
    "embed": {"embeddings": jnp.asarray(table)},
    "pos_embedding": jnp.asarray(positions),
    "vector_quantizer": {"embeddings": jnp.asarray(table.T)},
    "embed_lens": {"W_E": jnp.asarray(table)},
    "c_fc": {"weight": jnp.asarray(table.T), "bias": jnp.zeros((4,))},
  }
  op = _sin_op(params)
  nd = op.unravel(
    hessian.normalize_direction(op, hessian.random_direction(op, jax.random.key(0)), "filter")
  )
  for got, want in ((nd["lin"]["weight"], linear), (nd["embed"]["embeddings"], table)):
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), np.linalg.norm(want, axis=1))
  np.testing.assert_allclose(
    np.linalg.norm(nd["embed_lens"]["W_E"], axis=1), _filter_norms(table, (0,))
  )
  for codes in (nd["vector_quantizer"]["embeddings"], nd["c_fc"]["weight"]):
    np.testing.assert_allclose(np.linalg.norm(codes, axis=0), np.linalg.norm(table, axis=1))
  np.testing.assert_allclose(_filter_norms(nd["conv"]["weight"], (0,)), _filter_norms(conv, (0,)))
  got = np.linalg.norm(nd["pos_embedding"], axis=2)  # a filter per position
  np.testing.assert_allclose(got, np.linalg.norm(positions, axis=2))


def test_filter_normalisation_of_an_unnamed_equinox_ensemble():
  # An eqx.filter_vmap ensemble's weight (members, out, in), its stack found from its bias
  # (members, out): each member's filters are its output rows. The stack's inferred axis names
  # hid the PyTorch layout, and the filters ran along the input axis.
  r = np.random.default_rng(2)
  weight = r.normal(size=(3, 4, 2)) * np.array([1e-3, 1.0, 10.0, 1.0])[:, None]
  params = {"weight": jnp.asarray(weight), "bias": jnp.asarray(r.normal(size=(3, 4)))}
  op = _sin_op(params)
  nd = op.unravel(
    hessian.normalize_direction(op, hessian.random_direction(op, jax.random.key(0)), "filter")
  )
  np.testing.assert_allclose(np.linalg.norm(nd["weight"], axis=2), np.linalg.norm(weight, axis=2))
  np.testing.assert_array_equal(nd["bias"], 0.0)


@pytest.mark.parametrize("layers", [(), (2,)], ids=["one-layer", "scanned"])
def test_filter_normalisation_of_hugging_face_conv1d_kernels(layers):
  # GPT-2's FlaxConv1D keeps a kernel (out, in) beside its bias (out,): a filter per row, the
  # square c_proj too (the tree's other kernels show the layout). By Flax's (in, out) the filters
  # ran along the inputs. Scanned, (layers, out, in) beside (layers, out): a filter per layer and
  # row; the bias settled only rank-2 kernels, so the filters ran along each layer's inputs.
  r = np.random.default_rng(3)
  scales = np.array([1e-3, 1.0, 10.0, 1.0])[:, None]
  fc = r.normal(size=(*layers, 4, 3)) * scales
  proj = r.normal(size=(*layers, 4, 4)) * scales  # square: as its neighbour shows
  params = {
    "c_fc": {"kernel": jnp.asarray(fc), "bias": jnp.zeros((*layers, 4))},
    "c_proj": {"kernel": jnp.asarray(proj), "bias": jnp.zeros((*layers, 4))},
  }
  op = _sin_op(params)
  nd = op.unravel(
    hessian.normalize_direction(op, hessian.random_direction(op, jax.random.key(0)), "filter")
  )
  for name, want in (("c_fc", fc), ("c_proj", proj)):
    got = np.linalg.norm(nd[name]["kernel"], axis=-1)
    np.testing.assert_allclose(got, np.linalg.norm(want, axis=-1), err_msg=name)


def test_filter_normalisation_of_a_square_conv1d_kernel_beside_a_flax_dense_head():
  # A GPT-2 with a Flax Dense value head (kernel (in, out) beside its bias): the square
  # attention c_proj (out, in), beside its c_attn (out, in), followed the whole tree, where the
  # head shows Flax's layout, and its filters ran along its inputs. Its nearest kernels decide.
  r = np.random.default_rng(4)
  scales = np.array([1e-3, 1.0, 10.0, 1.0])
  attn = r.normal(size=(12, 4))
  proj = r.normal(size=(4, 4)) * scales[:, None]
  head = r.normal(size=(4, 1))
  params = {
    "attn": {
      "c_attn": {"kernel": jnp.asarray(attn), "bias": jnp.zeros(12)},
      "c_proj": {"kernel": jnp.asarray(proj), "bias": jnp.zeros(4)},
    },
    "value_head": {"kernel": jnp.asarray(head), "bias": jnp.zeros(1)},
  }
  op = _sin_op(params)
  nd = op.unravel(
    hessian.normalize_direction(op, hessian.random_direction(op, jax.random.key(0)), "filter")
  )
  got = np.linalg.norm(nd["attn"]["c_proj"]["kernel"], axis=1)  # a filter per output row
  np.testing.assert_allclose(got, np.linalg.norm(proj, axis=1))
  got = np.linalg.norm(nd["value_head"]["kernel"], axis=0)  # Flax's (in, out): per column
  np.testing.assert_allclose(got, np.linalg.norm(head, axis=0))


def test_plots(op):
  matplotlib = pytest.importorskip("matplotlib")
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  sd = hessian.spectral_density(op, jax.random.key(0), num_probes=2, num_steps=10)
  fig, axes = plt.subplots(1, 3)
  ax = hessian.plot_spectral_density(sd, axes[0], label="esd", floor=1e-3)
  assert ax.get_yscale() == "log" and len(ax.lines[0].get_xdata()) == sd.grid.size
  np.testing.assert_array_equal(ax.lines[0].get_ydata(), np.maximum(sd.density, 1e-3))
  ls1 = hessian.loss_landscape_1d(op, np.linspace(-1, 1, 5))
  hessian.plot_landscape_1d(ls1, axes[1])
  np.testing.assert_allclose(axes[1].lines[0].get_ydata(), ls1.losses)
  ls2 = hessian.loss_landscape_2d(op, np.linspace(-1, 1, 4), np.linspace(-1, 1, 3))
  hessian.plot_landscape_2d(ls2, axes[2], levels=5)
  hessian.plot_landscape_2d(ls2, axes[2], levels=[0.0, 0.5, 1.0], colorbar=False)
  # matplotlib took levels=True as 1 level; 1.5 raised "len() of unsized object", -1 divided by 0.
  for bad in (True, 1.5, -1, 0, "30"):
    with pytest.raises(ValueError, match=rf"levels must be an integer >= 1, got {bad!r}"):
      hessian.plot_landscape_2d(ls2, axes[2], levels=bad)
  # The array of axes plt.subplots returns (or its figure) raised "'numpy.ndarray' object has no
  # attribute 'plot'" from the first drawing call.
  for plot, result in ((hessian.plot_landscape_1d, ls1), (hessian.plot_landscape_2d, ls2)):
    for bad in (axes, fig):
      with pytest.raises(
        TypeError, match=rf"ax must be one matplotlib Axes, got {type(bad).__name__}"
      ):
        plot(result, bad)
  with pytest.raises(TypeError, match=r"ax must be one matplotlib Axes, got ndarray"):
    hessian.plot_spectral_density(sd, axes)
  plt.close(fig)


@pytest.mark.parametrize(
  "losses, marker",
  [
    ([1.0], "o"),  # one point: a line of one point drew nothing
    ([np.nan, 1.0, np.inf], "o"),  # a finite point between non-finite ones: the same
    ([1.0, 2.0, np.nan], "None"),  # every finite point joined to another: a line alone
  ],
)
def test_plot_landscape_1d_marks_points_a_line_cannot_show(losses, marker):
  matplotlib = pytest.importorskip("matplotlib")
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  alphas = np.linspace(-1, 1, len(losses))
  line = hessian.Landscape1D(alphas, np.asarray(losses), jnp.zeros(2))
  ax = hessian.plot_landscape_1d(line)
  assert ax.lines[0].get_marker() == marker
  np.testing.assert_array_equal(ax.lines[0].get_xdata(), alphas)
  np.testing.assert_array_equal(ax.lines[0].get_ydata(), losses)
  assert hessian.plot_landscape_1d(line, marker="x").lines[-1].get_marker() == "x"
  plt.close("all")


def test_plots_draw_grids_given_in_any_order_in_order():
  # Grids are the user's: unsorted alphas drew a zig-zag line, and unsorted alphas or betas a
  # folded contour plot, with no error.
  matplotlib = pytest.importorskip("matplotlib")
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  a, b = np.linspace(-1, 1, 4), np.linspace(-2, 2, 5)
  losses = np.add.outer(a**2, 0.5 * b**2 + b) + 3.0
  pa, pb = np.array([2, 0, 3, 1]), np.array([4, 1, 0, 3, 2])
  line = hessian.plot_landscape_1d(hessian.Landscape1D(a[pa], losses[pa, 0], jnp.zeros(2)))
  np.testing.assert_array_equal(line.lines[0].get_xdata(), a)
  np.testing.assert_array_equal(line.lines[0].get_ydata(), losses[:, 0])

  def contours(alphas, betas, z):
    ax = hessian.plot_landscape_2d(hessian.Landscape2D(alphas, betas, z, jnp.zeros((2, 1))))
    return [p.vertices for c in ax.collections for p in c.get_paths()]

  want = contours(a, b, losses)
  got = contours(a[pa], b[pb], losses[np.ix_(pa, pb)])
  assert len(got) == len(want) and all(np.allclose(x, y) for x, y in zip(got, want, strict=True))
  plt.close("all")


def test_plots_refuse_losses_of_another_grid_than_their_steps():
  # A landscape edited with _replace: the plots drew the entries the steps index and dropped the
  # rest (5 losses on 2 alphas: a line of 2 points; 3x3 on a 2x2 grid: its top-left corner).
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  line = hessian.Landscape1D(np.array([0.0, 1.0]), np.ones(2), jnp.zeros(2))
  plane = hessian.Landscape2D(np.array([0.0, 1.0]), np.array([0.0, 1.0, 2.0]), np.ones((2, 3)), 0)
  one, two = r"^plot_landscape_1d: the landscape's ", r"^plot_landscape_2d: the landscape's "
  figures = plt.get_fignums()
  for call, landscape, match in [
    (hessian.plot_landscape_1d, line._replace(losses=np.ones(5)), r"losses have shape \(5,\), "),
    (hessian.plot_landscape_1d, line._replace(losses=np.ones((2, 1))), r"losses have shape \(2, 1"),
    (hessian.plot_landscape_1d, line._replace(alphas=np.ones((2, 1))), r"alphas must be 1-D, got"),
    (hessian.plot_landscape_1d, line._replace(losses=np.array(["a", "b"])), r"losses must be real"),
    (
      hessian.plot_landscape_2d,
      plane._replace(losses=np.ones((3, 3))),
      r"losses have shape \(3, 3",
    ),
    (
      hessian.plot_landscape_2d,
      plane._replace(losses=np.ones((3, 2))),
      r"losses have shape \(3, 2",
    ),
    (hessian.plot_landscape_2d, plane._replace(betas=np.ones((3, 1))), r"betas must be 1-D, got"),
  ]:
    prefix = one if call is hessian.plot_landscape_1d else two
    with pytest.raises(ValueError, match=prefix + match):
      call(landscape)
  with pytest.raises(ValueError, match=r"but its alphas \(2,\) and betas \(3,\) make a grid of"):
    hessian.plot_landscape_2d(plane._replace(losses=np.ones((3, 2))))
  assert plt.get_fignums() == figures  # refused before a figure was made
  hessian.plot_landscape_2d(plane)  # the grid's own shape is drawn
  plt.close("all")


def test_plot_landscape_2d_refuses_what_it_cannot_draw():
  matplotlib = pytest.importorskip("matplotlib")
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  a, b = np.linspace(-1, 1, 3), np.linspace(-2, 2, 5)
  losses = np.add.outer(a**2, b**2)  # 0 at the centre: log10 gave -300 there, one flat colour
  plane = hessian.Landscape2D(a, b, losses, jnp.zeros((2, 1)))
  with pytest.raises(ValueError, match=r"positive losses, got 0.0 at alpha=0.0, beta=0.0"):
    hessian.plot_landscape_2d(plane, log=True)
  with pytest.raises(ValueError, match="at least 2 alphas and 2 betas .* got 1 and 5"):
    hessian.plot_landscape_2d(plane._replace(alphas=a[:1], losses=losses[:1]))
  diverged = losses + 1.0
  diverged[0, 0], diverged[2, 4] = np.nan, np.inf
  ax = hessian.plot_landscape_2d(plane._replace(losses=diverged), log=True)
  lo, hi = ax.figure.axes[-1].get_ylim()  # the colour bar: non-finite losses are left blank
  assert 0.0 <= lo and hi <= np.log10(6.0) + 0.1
  plt.close(ax.figure)


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"alphas": [0.0, np.nan]}, "alphas must be finite, got nan at index 1"),
    ({"alphas": [0.0, np.inf]}, "alphas must be finite, got inf at index 1"),
    ({"alphas": np.zeros((2, 2))}, r"alphas must be a 1-D array .* shape \(2, 2\)"),
    ({"alphas": 0.5}, r"alphas must be a 1-D array .* shape \(\)"),
    # Bools were read as 1.0 and 0.0, strings as the numbers they spell.
    (
      {"alphas": [True, False]},
      r"alphas must be .* finite numbers, got \[True, False\] \(dtype bool",
    ),
    ({"alphas": ["0", "1"]}, r"alphas must be a 1-D array of finite numbers, got \['0', '1'\]"),
    ({"direction": "zeros", "normalize": "unit"}, "the direction is zero"),
    ({"direction": "nan"}, r"the direction is not finite: nan at \['out'\]\['bias'\]\[1\]"),
    ({"direction": "transposed"}, r"leaf at \['hidden'\]\['kernel'\] has shape \(8, 5\)"),
    ({"direction": "other tree"}, r"lacks the leaves \['hidden'\]\['bias'\]"),
    ({"direction": None, "normalize": "bogus"}, "normalize must be one of"),
    ({"direction": None, "normalize": "filter"}, "applies to a given direction"),
    ({"direction": "bias only", "normalize": "filter"}, "normalize='filter' zeroes the direction"),
  ],
)
def test_bad_steps_and_directions_are_refused(op, kwargs, message):
  params, _ = mlp()
  flat_nan = jnp.zeros(op.size).at[op.leaf_slices[2].start + 1].set(jnp.nan).at[0].set(1.0)
  directions = {
    "ones": jnp.ones(op.size),
    "zeros": jnp.zeros(op.size),
    "nan": flat_nan,
    "transposed": jax.tree.map(lambda a: a.T, params),
    "other tree": {"a": jnp.ones(op.size)},
    "bias only": jnp.zeros(op.size).at[op.leaf_slices[0]].set(1.0),
    None: None,
  }
  kwargs = {"alphas": [0.0, 1.0], "direction": "ones", **kwargs}
  kwargs["direction"] = directions[kwargs["direction"]]
  with pytest.raises(ValueError, match=message):
    hessian.loss_landscape_1d(op, **kwargs)


def test_2d_directions_that_are_not_a_pair_are_named(op):
  # The MLP's params have two top-level entries: one direction like them has length 2, and its
  # keys were read as the two directions ("directions[0] ... is a single value of shape ()").
  params, _ = mlp()
  d = jax.tree.map(jnp.ones_like, params)
  one = "got one direction shaped like the params; for the loss along one direction use loss_"
  for bad, message in [
    (d, one),
    (jnp.ones(op.size), one),
    ((d, d, d), "got a tuple of 3"),
    ((x for x in (d, d)), "got a generator"),
    (jnp.ones((3, op.size)), r"got an array of shape \(3, 75\)"),
  ]:
    with pytest.raises(ValueError, match=r"directions must be a pair \(d1, d2\) .*" + message):
      hessian.loss_landscape_2d(op, [0.0], [0.0], bad)
  # A pair of either kind, a list or an array of 2 rows, is the same plane.
  rows = jnp.stack([jnp.ones(op.size), jnp.linspace(-0.5, 0.5, op.size)])
  want = hessian.loss_landscape_2d(op, [0.5], [1.0], (d, rows[1])).losses
  np.testing.assert_allclose(hessian.loss_landscape_2d(op, [0.5], [1.0], rows).losses, want)
  np.testing.assert_allclose(hessian.loss_landscape_2d(op, [0.5], [1.0], [d, rows[1]]).losses, want)


def test_2d_directions_parallel_once_normalised_are_refused(op):
  # Two equal, opposite or proportional directions (or two that the normalisation makes so)
  # span a line: the grid repeated its losses along it, without an error.
  params, _ = mlp()
  d = jax.tree.map(lambda a: jnp.linspace(1.0, 2.0, a.size).reshape(a.shape), params)
  flat = op.ravel(d)
  # d scaled by 3 on each filter of each kernel: not parallel to d, but after "filter" it is.
  by_filter = jax.tree.map(lambda a: a * jnp.arange(1.0, a.shape[-1] + 1.0), d)
  other = op.ravel(by_filter)
  assert float(jnp.dot(flat, other) / jnp.linalg.norm(flat) / jnp.linalg.norm(other)) < 0.99
  for pair, normalize, cosine in [
    ((d, d), None, "1"),
    ((flat, -2.0 * flat), None, "-1"),
    ((d, flat * (1.0 + 1e-9)), "unit", "1 after normalize='unit'"),
    ((d, by_filter), "filter", "1 after normalize='filter'"),
  ]:
    with pytest.raises(
      ValueError,
      match=rf"^directions\[0\] and directions\[1\] are parallel \(cosine {cosine}\): their "
      r"plane is a line, .* Give two independent directions",
    ):
      hessian.loss_landscape_2d(op, [0.0, 1.0], [0.0, 1.0], pair, normalize=normalize)
  # Nearly parallel, but not to float64's precision: a plane (here op is float64).
  near = flat.at[0].add(1e-6)
  assert hessian.loss_landscape_2d(op, [0.0], [1.0], (flat, near)).losses.shape == (1, 1)


def test_a_nan_loss_at_the_point_is_a_non_finite_error():
  params, batch = mlp()
  nan_op = hessian.hessian_operator(lambda p, b: mlp_loss(p, b) * jnp.nan, params, batch)
  with pytest.raises(hessian.NonFiniteError, match="the loss at the operator's params"):
    hessian.loss_landscape_1d(nan_op, [0.0, 1.0], jnp.ones(nan_op.size))
  with pytest.raises(hessian.NonFiniteError, match="the loss at the operator's params"):
    hessian.loss_landscape_2d(nan_op, [0.0], [0.0], (jnp.ones(75), jnp.arange(75.0)))


def _stacked():
  """Two Dense layers stacked in one leaf (nn.scan layout) and a head, layer 1 ten times larger."""
  r = np.random.default_rng(0)
  kernel = r.normal(size=(2, 4, 4)) * np.array([1.0, 10.0])[:, None, None]
  params = {
    "head": {"kernel": jnp.asarray(r.normal(size=(4, 1))), "bias": jnp.zeros(1)},
    "stack": {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(r.normal(size=(2, 4)))},
  }

  def loss_fn(p, x):
    for i in range(2):
      x = jnp.tanh(x @ p["stack"]["kernel"][i] + p["stack"]["bias"][i])
    return jnp.mean((x @ p["head"]["kernel"] + p["head"]["bias"]) ** 2)

  return params, loss_fn, jnp.asarray(r.normal(size=(8, 4)))


def _check_per_layer_filters(params, nd):
  for layer in range(2):
    np.testing.assert_allclose(
      np.linalg.norm(nd["stack"]["kernel"][layer], axis=0),
      np.linalg.norm(params["stack"]["kernel"][layer], axis=0),
      rtol=1e-12,
    )
  np.testing.assert_array_equal(nd["stack"]["bias"], 0.0)  # a per-layer bias, zeroed
  np.testing.assert_allclose(
    np.linalg.norm(nd["head"]["kernel"], axis=0), np.linalg.norm(params["head"]["kernel"], axis=0)
  )


def test_filter_normalisation_keeps_stacked_layers_apart_with_layer_axes():
  params, loss_fn, x = _stacked()
  op = hessian.hessian_operator(loss_fn, params, x)
  d = hessian.random_direction(op, jax.random.key(0))
  nd = hessian.normalize_direction(op, d, "filter", layer_axes={"stack": 1, "head": 0})
  _check_per_layer_filters(params, op.unravel(nd))
  # Per layer for "layer" too: each layer's slice gets the norm of that layer's weights.
  nl = op.unravel(hessian.normalize_direction(op, d, "layer", layer_axes={"stack": 1, "head": 0}))
  np.testing.assert_allclose(
    np.linalg.norm(nl["stack"]["kernel"][1]), np.linalg.norm(params["stack"]["kernel"][1])
  )
  with pytest.raises(ValueError, match=r"layer_axes at \['head'\]\['bias'\] must be an integer"):
    hessian.normalize_direction(op, d, "filter", layer_axes=2)


def test_a_layer_axes_unlike_the_params_is_named_in_one_sentence():
  # JAX's pytree-prefix error (both trees' key sets, several lines) was appended to the sentence.
  params, loss_fn, x = _stacked()
  op = hessian.hessian_operator(loss_fn, params, x)
  d = hessian.random_direction(op, jax.random.key(0))
  start = r"^layer_axes must be an int or a pytree prefix of the params .* but it "
  for layer_axes, where in [
    ({"stack": {"kernel": (1, 1), "bias": 1}, "head": 0}, r"has an entry at \['stack'\]\['kernel"),
    ({"stack": 1, "head": 0, "tail": 0}, r"has an entry at \['tail'\], where the params have none"),
    ({"stack": 1}, r"has no entry for the params leaf at \['head'\]\['bias'\]"),
    ({"stack": 1, "head": None}, r"has no entry for the params leaf at \['head'\]\['bias'\]"),
  ]:
    with pytest.raises(ValueError, match=start + where) as caught:
      hessian.normalize_direction(op, d, "filter", layer_axes=layer_axes)
    assert "\n" not in str(caught.value) and "broadcast_prefix" not in str(caught.value)
  with pytest.raises(
    ValueError, match=r"\]\[0\], inside the params leaf at \['stack'\]\['kernel'\] of shape"
  ):
    bad = {"stack": {"kernel": (1, 1), "bias": 1}, "head": 0}
    hessian.layer_breakdown(op, jax.random.key(0), layer_axes=bad)


def test_filter_normalisation_reads_layer_axes_from_axis_names():
  import flax.linen as nn

  params, loss_fn, x = _stacked()
  names = {"head": {"kernel": ("mlp", "out"), "bias": ("out",)}}
  names["stack"] = {"kernel": ("layers", "embed", "mlp"), "bias": ("layers", "mlp")}
  boxed = jax.tree.map(
    nn.LogicallyPartitioned, params, names, is_leaf=lambda n: isinstance(n, tuple)
  )
  op = hessian.hessian_operator(lambda p, b: loss_fn(nn.unbox(p), b), boxed, x)
  d = hessian.random_direction(op, jax.random.key(0))
  nd = nn.unbox(op.unravel(hessian.normalize_direction(op, d, "filter")))
  _check_per_layer_filters(params, nd)


@pytest.mark.parametrize("scale", [1e20, 1e-25])
def test_normalising_a_direction_of_huge_or_tiny_entries_in_float32(scale):
  # The squares of 1e20 overflow float32 and those of 1e-25 underflow: "unit" gave zeros or inf
  # (a flat landscape), "filter" refused the direction as zero.
  w = jnp.asarray(np.random.default_rng(0).normal(size=(3, 2)), jnp.float32)
  op = hessian.hessian_operator(lambda p, b: jnp.sum(p["w"] ** 2 * b), {"w": w}, jnp.ones(1))
  d = np.random.default_rng(1).normal(size=6).astype(np.float32)
  unit = hessian.normalize_direction(op, jnp.asarray(d * scale, jnp.float32), "unit")
  np.testing.assert_allclose(unit, d / np.linalg.norm(d), rtol=1e-6)
  filt = np.asarray(hessian.normalize_direction(op, jnp.asarray(d * scale, jnp.float32), "filter"))
  want = d.reshape(3, 2) / np.linalg.norm(d.reshape(3, 2), axis=0) * np.linalg.norm(w, axis=0)
  np.testing.assert_allclose(filt.reshape(3, 2), want, rtol=1e-5)


def test_a_2d_landscape_of_one_parameter_without_directions_says_why():
  # It asked top_eigenvalues for k=2, whose error "k must be an integer in [1, 1], got 2" named
  # an argument the caller never passed.
  op = hessian.hessian_operator(lambda p, b: p["x"] ** 4 * b, {"x": jnp.asarray(1.0)}, 1.0)
  with pytest.raises(
    ValueError, match=r"top 2 eigenvectors.*1 parameter\(s\); pass the directions"
  ):
    hessian.loss_landscape_2d(op, [0.0], [0.0])
  np.testing.assert_allclose(hessian.loss_landscape_1d(op, [0.0, 1.0]).losses, [1.0, 16.0])


def test_plot_spectral_density_refuses_a_floor_that_is_no_finite_positive_number():
  # A floor <= 0 left the zeros of the density, which the log scale drops without a word; NaN
  # or inf made every value NaN or inf (an empty plot), True a flat line at 1, and a str failed
  # in np.maximum ("ufunc 'maximum' did not contain a loop"), naming no argument. Refused
  # before matplotlib is imported or a figure made.
  density = hessian.SpectralDensity(
    np.zeros(3), np.array([0.0, 1.0, 0.0]), np.zeros((1, 1)), np.ones((1, 1)), 0.1, 1
  )
  for floor in ("1e-8", -1.0, 0.0, np.nan, np.inf, True):
    with pytest.raises(ValueError, match=r"^floor must be a finite real number > 0\.0, got "):
      hessian.plot_spectral_density(density, floor=floor)


def test_plot_spectral_density_draws_a_users_grid_as_plot_landscape_1d_draws_its_steps():
  # spectral_density takes any grid: one of one point drew nothing (a line of one point), one out
  # of order a zig-zag, and a density of another length than its grid (_replace) failed inside
  # matplotlib ("x and y must have same first dimension") after a figure was made.
  matplotlib = pytest.importorskip("matplotlib")
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  one = hessian.SpectralDensity(np.zeros(1), np.ones(1), np.zeros((1, 1)), np.ones((1, 1)), 0.1, 1)
  assert hessian.plot_spectral_density(one).lines[0].get_marker() == "o"
  grid, density = np.array([1.0, -1.0, 0.0]), np.array([0.5, 0.1, 0.25])
  ax = hessian.plot_spectral_density(one._replace(grid=grid, density=density), log=False)
  assert ax.lines[0].get_marker() == "None"
  np.testing.assert_array_equal(ax.lines[0].get_xdata(), [-1.0, 0.0, 1.0])
  np.testing.assert_array_equal(ax.lines[0].get_ydata(), [0.1, 0.25, 0.5])
  figures = plt.get_fignums()
  with pytest.raises(ValueError, match=r"grid must be 1-D .* got shapes \(3,\) and \(2,\)"):
    hessian.plot_spectral_density(one._replace(grid=grid, density=density[:2]))
  assert plt.get_fignums() == figures
  plt.close("all")


def test_each_plot_refuses_another_result_naming_the_function_that_plots_it():
  # plot_landscape_1d drew a Landscape2D as one line per column of its losses; the other
  # mix-ups failed with an AttributeError. Refused before matplotlib is imported or a figure made.
  line = hessian.Landscape1D(np.zeros(2), np.ones(2), jnp.zeros(2))
  plane = hessian.Landscape2D(np.zeros(2), np.zeros(2), np.ones((2, 2)), jnp.zeros((2, 1)))
  density = hessian.SpectralDensity(
    np.zeros(3), np.ones(3), np.zeros((1, 1)), np.ones((1, 1)), 0.1, 1
  )
  cases = [
    (hessian.plot_landscape_1d, plane, "Landscape1D .* got .* Landscape2D: .* plot_landscape_2d"),
    (hessian.plot_landscape_2d, density, "Landscape2D .* SpectralDensity: .* plot_spectral_dens"),
    (hessian.plot_landscape_2d, line, "Landscape2D .* Landscape1D: plot it with plot_landscape_1d"),
    (hessian.plot_spectral_density, line, "SpectralDensity .* Landscape1D: .* plot_landscape_1d"),
    (hessian.plot_spectral_density, {"grid": 0}, r"SpectralDensity .* of type dict\.$"),
  ]
  for plot, result, message in cases:
    with pytest.raises(TypeError, match=rf"^{plot.__name__} plots a {message}"):
      plot(result)


def test_filter_normalisation_of_float16_filters_below_the_smallest_normal_number():
  # A float16 filter whose entries are all subnormal (below 6.1e-5): its norm is measured at the
  # dtype's smallest normal scale (the Lanczos vectors' rule). From jax 0.12 on, jnp.frexp flushes
  # a subnormal peak to 0, whose scale 1 let the squares underflow: the filter's norm came out 0.
  kernel = np.array([[1.0, 3e-6], [-2.0, -4e-6], [0.5, 2e-6]], np.float16)
  params = {"Dense_0": {"kernel": jnp.asarray(kernel), "bias": jnp.zeros(2, jnp.float16)}}
  op = _sin_op(params)
  d = {
    "Dense_0": {
      "kernel": jnp.asarray([[0.3, 5e-6], [0.1, -1e-6], [-0.2, 3e-6]], jnp.float16),
      "bias": jnp.ones(2, jnp.float16),
    }
  }
  got = op.unravel(hessian.normalize_direction(op, d, "filter"))["Dense_0"]["kernel"]
  got = np.asarray(got, np.float64)
  assert np.isfinite(got).all()
  want = np.linalg.norm(kernel.astype(np.float64), axis=0)
  np.testing.assert_allclose(np.linalg.norm(got, axis=0), want, rtol=2e-2)
  # Only rescaled: each filter keeps its direction.
  d64 = np.asarray(d["Dense_0"]["kernel"], np.float64)
  cos = np.sum(got * d64, axis=0) / (np.linalg.norm(got, axis=0) * np.linalg.norm(d64, axis=0))
  np.testing.assert_allclose(cos, 1.0, rtol=1e-2)
