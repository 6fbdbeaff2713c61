"""Spatial averaging rules against NumPy loops, on Flax layouts."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpy_reference import block_average

import adahessian_jax as ah
from adahessian_jax import spatial


def _first_update(tx, grads, params, **extra):
  """``tx``'s update from a fresh state, as one jitted program rather than op by op."""
  return jax.jit(lambda g, p: tx.update(g, tx.init(p), p, **extra))(grads, params)


def test_conv_kernel_mean_over_spatial_axes(rng):
  d = rng.random((3, 3, 4, 5))  # Flax Conv kernel (kh, kw, in, out)
  got = spatial.flax_default(block_size=8)(jnp.asarray(d))
  want = np.broadcast_to(d.mean(axis=(0, 1), keepdims=True), d.shape)
  np.testing.assert_allclose(got, want, rtol=1e-14)
  # Not over the channel axes (the defect of other JAX ports).
  assert not np.allclose(got, np.broadcast_to(d.mean(axis=(2, 3), keepdims=True), d.shape))


@pytest.mark.parametrize("n,block", [(10, 3), (7, 7), (5, 8), (12, 4), (1, 2), (9, 1)])
def test_block_average_with_remainder(rng, n, block):
  d = rng.random((n, 3))
  got = spatial.blocks(block)(jnp.asarray(d))
  np.testing.assert_allclose(got, block_average(d, block, axis=0), rtol=1e-14)
  # Explicit check of the short last block on (10, 3) with block 3: rows 9..9.
  if (n, block) == (10, 3):
    np.testing.assert_allclose(got[9], d[9])
    np.testing.assert_allclose(got[6], d[6:9].mean(axis=0))


def test_block_average_other_axis(rng):
  d = rng.random((4, 10, 2))
  got = spatial.blocks(4, axis=1)(jnp.asarray(d))
  np.testing.assert_allclose(got, block_average(d, 4, axis=1), rtol=1e-14)


@pytest.mark.parametrize("shape", [(), (5,), (6, 4), (3, 4, 5), (2, 3, 4, 5), (2, 2, 3, 4, 5)])
@pytest.mark.parametrize("block_size", [1, 4])
def test_default_rule_every_rank(rng, shape, block_size):
  d = rng.random(shape)
  got = np.asarray(spatial.flax_default(block_size)(jnp.asarray(d)))
  assert got.shape == d.shape
  if len(shape) <= 1:
    want = d
  elif len(shape) == 2:
    want = block_average(d, block_size, axis=0)
  else:
    axes = tuple(range(len(shape) - 2))
    want = np.broadcast_to(d.mean(axis=axes, keepdims=True), d.shape)
  np.testing.assert_allclose(got, want, rtol=1e-14)
  # Averaging preserves the total (it is a mean over groups).
  np.testing.assert_allclose(got.sum(), d.sum(), rtol=1e-12)


def test_zero_size_leaf_does_not_crash():
  for shape in [(0,), (0, 3), (3, 0), (2, 2, 0, 4)]:
    d = jnp.zeros(shape)
    assert spatial.flax_default(4)(d).shape == shape


def test_resolve_rules_prefix_callable_and_single(rng):
  params = {
    "attn": {"query": {"kernel": jnp.zeros((8, 2, 4))}},
    "conv": {"kernel": jnp.zeros((3, 8, 4))},
    "dense": {"kernel": jnp.zeros((6, 3)), "bias": jnp.zeros(3)},
  }
  # Default: rank 3 treated as a 1-D convolution kernel.
  rules = spatial.resolve_rules(None, params, block_size=2)
  assert isinstance(rules["attn"]["query"]["kernel"], spatial.FlaxDefault)

  # A pytree prefix: the whole attention subtree gets blocks along axis 0.
  prefix = {
    "attn": spatial.blocks(4, axis=0),
    "conv": spatial.flax_default(),
    "dense": spatial.none(),
  }
  rules = spatial.resolve_rules(prefix, params)
  assert rules["attn"]["query"]["kernel"] == spatial.blocks(4, axis=0)
  assert rules["dense"]["kernel"] == spatial.none()

  # A callable on (path, leaf); None means the default.
  def by_path(path, leaf):
    return spatial.blocks(4) if "attn" in jax.tree_util.keystr(path) else None

  rules = spatial.resolve_rules(by_path, params, block_size=2)
  assert rules["attn"]["query"]["kernel"] == spatial.blocks(4)
  # The default, resolved: it is not read again (e.g. on a shard_map shard's shapes).
  assert rules["dense"]["kernel"] == dataclasses.replace(spatial.flax_default(2), resolved=True)

  # A single rule for everything.
  rules = spatial.resolve_rules(spatial.none(), params)
  leaves = jax.tree.leaves(rules, is_leaf=lambda x: isinstance(x, spatial.Rule))
  assert len(leaves) == 4 and all(r == spatial.none() for r in leaves)


def test_a_prefix_of_rules_over_params_with_empty_and_none_subtrees():
  # A module's params may hold None or {} entries: a prefix built by jax.tree.map over the params
  # has None there too, which once counted as an extra leaf (zip() argument 2 is shorter...).
  params = {"gone": None, "empty": {}, "dense": {"kernel": jnp.ones((4, 2)), "bias": jnp.ones(2)}}
  prefix = jax.tree.map(lambda _: None, params)
  prefix["dense"]["kernel"] = spatial.blocks(2)
  rules = spatial.resolve_rules(prefix, params, block_size=4)
  assert rules["dense"]["kernel"] == spatial.blocks(2)
  assert isinstance(rules["dense"]["bias"], spatial.FlaxDefault)  # None: the default
  grads = {"gone": None, "empty": {}, "dense": {"kernel": jnp.arange(8.0).reshape(4, 2) + 1}}
  grads["dense"]["bias"] = jnp.ones(2)
  tx = ah.scale_by_adahessian(averaging=prefix)
  u, _ = _first_update(tx, grads, params, hessian_diag=grads)
  d = block_average(np.asarray(grads["dense"]["kernel"]), 2)
  np.testing.assert_allclose(u["dense"]["kernel"], grads["dense"]["kernel"] / (d + 1e-4), 1e-6)


@pytest.mark.filterwarnings(
  "ignore::adahessian_jax.spatial.LayoutGuessWarning"
)  # guesses on purpose
def test_override_changes_the_optimizer_update(rng):
  kernel = jnp.asarray(rng.normal(size=(8, 2, 4)))
  params = {"q": kernel}
  est = {"q": jnp.asarray(rng.normal(size=(8, 2, 4)))}
  grads = {"q": jnp.ones((8, 2, 4))}

  def first_update(tx):
    u, _ = _first_update(tx, grads, params, hessian_diag=est)
    return np.asarray(u["q"])

  d = np.abs(np.asarray(est["q"]))
  # step 1: update = g / (D + eps) with D the averaged |estimate| (b1, b2 bias-corrected away)
  default = first_update(ah.scale_by_adahessian())
  conv_mean = np.broadcast_to(d.mean(0, keepdims=True), d.shape)
  np.testing.assert_allclose(default, 1 / (conv_mean + 1e-4))
  override = first_update(ah.scale_by_adahessian(averaging={"q": spatial.blocks(4, axis=0)}))
  np.testing.assert_allclose(override, 1 / (block_average(d, 4, axis=0) + 1e-4))
  by_fn = first_update(ah.scale_by_adahessian(averaging=lambda path, leaf: spatial.none()))
  np.testing.assert_allclose(by_fn, 1 / (d + 1e-4))


def test_bad_rules_fail_at_init():
  params = {"w": jnp.zeros((4, 3))}
  with pytest.raises(ValueError, match=r"axis 2.*\['w'\].*rank 2"):
    ah.scale_by_adahessian(averaging=spatial.blocks(2, axis=2)).init(params)
  # The rule as the user wrote it, and the axes that would fit.
  with pytest.raises(
    ValueError, match=r"mean_over\(\(0, 5\)\) averages over axis 5.*rank 2.*-2\.\.1"
  ):
    ah.scale_by_adahessian(averaging=spatial.mean_over((0, 5))).init(params)
  with pytest.raises(ValueError, match=r"mean_over\(\(1, -1\)\) names an axis twice.*\['w'\]"):
    ah.scale_by_adahessian(averaging=spatial.mean_over((1, -1))).init(params)  # failed in update
  with pytest.raises(TypeError, match="spatial rule"):
    ah.scale_by_adahessian(averaging=lambda path, leaf: "blocks").init(params)
  with pytest.raises(ValueError, match="prefix"):
    ah.scale_by_adahessian(averaging={"v": spatial.none()}).init(params)
  with pytest.raises(ValueError, match="block_size"):
    spatial.blocks(0)


def test_rules_work_under_jit_and_vmap(rng):
  d = jnp.asarray(rng.random((3, 3, 2, 4)))
  rule = spatial.flax_default(2)
  np.testing.assert_allclose(jax.jit(rule)(d), rule(d), rtol=1e-14)
  assert optax.tree.norm(jax.vmap(rule)(jnp.stack([d, d]))) > 0


@pytest.mark.parametrize("axes", [0, (0, 1), 2])
def test_per_layer_averages_each_slice_on_its_own(rng, axes):
  d = rng.random((3, 2, 7, 5))
  stacked = (axes,) if isinstance(axes, int) else axes
  rule = spatial.per_layer(spatial.blocks(3, axis=0), axes=axes)
  got = np.asarray(rule(jnp.asarray(d)))
  # NumPy: loop over every index of the stacked axes, block-average the slice.
  want = np.empty_like(d)
  for index in np.ndindex(*(d.shape[a] for a in stacked)):
    where = [slice(None)] * d.ndim
    for a, i in zip(stacked, index, strict=True):
      where[a] = i
    want[tuple(where)] = block_average(d[tuple(where)], 3, axis=0)
  np.testing.assert_allclose(got, want, rtol=1e-14)
  np.testing.assert_allclose(jax.jit(rule)(jnp.asarray(d)), want, rtol=1e-14)
  groups = rule.groups(d.shape)
  assert sum(size * count for size, count in groups.items()) == d.size


def test_per_layer_of_the_default_is_the_default_per_layer(rng):
  d = rng.random((4, 6, 3))  # a stack of Dense kernels (layers, in, out), no names
  got = spatial.per_layer(spatial.flax_default(2))(jnp.asarray(d))
  np.testing.assert_allclose(got, np.stack([block_average(k, 2, axis=0) for k in d]), rtol=1e-14)
  # The unnamed default takes the same leaf for a 1-D convolution: mean over the layers.
  conv = spatial.flax_default(2)(jnp.asarray(d))
  np.testing.assert_allclose(conv, np.broadcast_to(d.mean(0), d.shape), rtol=1e-14)
  with pytest.raises(ValueError, match=r"axis 3.*\['w'\].*rank 3"):
    spatial.resolve_rules(spatial.per_layer(spatial.none(), axes=3), {"w": jnp.zeros((4, 6, 3))})
  with pytest.raises(ValueError, match="rank 2"):  # the inner rule sees the slice (6, 3)
    spatial.resolve_rules(spatial.per_layer(spatial.blocks(2, axis=2)), {"w": jnp.zeros((4, 6, 3))})


@pytest.mark.parametrize(
  "names,want",
  [
    # (names of a (4, 6, 3) leaf, the rule the default must choose), from Flax's layouts
    (("layers", "embed", "mlp"), spatial.per_layer(spatial.blocks(2, axis=0))),
    (("embed", "heads", "kv"), spatial.blocks(2, axis=0)),  # query kernel
    (("heads", "kv", "embed"), spatial.blocks(2, axis=1)),  # output kernel
    (("width", "embed", "mlp"), spatial.mean_over(0)),  # 1-D conv
    (("layers", "heads", "kv"), spatial.per_layer(spatial.none())),  # stacked per-head biases
    (("vocab", "layers", "embed"), spatial.per_layer(spatial.blocks(2, axis=1), axes=(1,))),
    (("embed", "mlp", "kv"), spatial.blocks(2, axis=0)),  # DenseGeneral, all known
    ((("layers", "pipe"), None, "model"), spatial.per_layer(spatial.blocks(2, axis=0))),
  ],
)
def test_default_by_axis_names(rng, names, want):
  d = jnp.asarray(rng.random((4, 6, 3)))
  rule = spatial.flax_default(2).bind(names)
  choice = rule.explain(d.shape)
  assert choice.rule == want and not choice.ambiguous, choice
  np.testing.assert_allclose(rule(d), want(d), rtol=1e-14)


@pytest.mark.parametrize("names", [None, ("a", "b", "c"), ("embed", None, "mlp")])
def test_rank_3_without_known_names_is_a_guess(names):
  rule = spatial.flax_default(2) if names is None else spatial.flax_default(2).bind(names)
  choice = rule.explain((4, 6, 3))
  assert choice.rule == spatial.mean_over(0) and choice.ambiguous and "AMBIGUOUS" in choice.why


def test_describe_plain_rules_and_groups():
  params = {"conv": jnp.zeros((3, 3, 2, 4)), "dense": jnp.zeros((10, 3)), "b": jnp.zeros(3)}
  listing = spatial.describe(params, {"conv": None, "dense": spatial.blocks(4), "b": None}, 1)
  rows = {r.path: r for r in listing.rows}
  assert rows["['dense']"].groups == {4: 2 * 3, 2: 3}  # 10 = 4 + 4 + 2, per output
  assert rows["['dense']"].why == "given explicitly in averaging"
  assert rows["['conv']"].groups == {9: 8} and rows["['conv']"].rule == spatial.mean_over((0, 1))
  assert rows["['b']"].groups == {1: 3}
  assert listing.ambiguous == (rows["['conv']"],)  # rank 4, no names: a guess
  lines = str(listing).splitlines()
  assert lines[0].split()[:3] == ["path", "shape", "axis", "names"][:3] and len(lines) == 5


def test_a_rule_of_ones_own_needs_only_call():
  # The Rule base class's defaults: bind keeps the rule, groups are unknown ("?" in describe).
  @dataclasses.dataclass(frozen=True)
  class ColumnMax(spatial.Rule):
    def __call__(self, d):
      return jnp.broadcast_to(d.max(axis=0, keepdims=True), d.shape)

  params = {"w": jnp.arange(1.0, 7.0).reshape(2, 3), "b": jnp.ones(3)}
  averaging = {"w": ColumnMax(), "b": None}
  row = {r.path: r for r in spatial.describe(params, averaging).rows}["['w']"]
  assert row.groups is None and str(spatial.describe(params, averaging)).count(" ? ") == 1
  # A diagonal Hessian h = 1..6 (Hutchinson exact), b1 = b2 = 0: the update is g / max_col(h).
  h = jnp.arange(1.0, 7.0).reshape(2, 3)
  loss = lambda p: 0.5 * jnp.sum(h * p["w"] ** 2) + jnp.sum(p["b"] ** 2)
  tx = ah.scale_by_adahessian(b1=0.0, b2=0.0, eps=1e-300, averaging=averaging)
  u, _ = jax.jit(lambda p: tx.update(jax.grad(loss)(p), tx.init(p), p, value_fn=loss))(params)
  np.testing.assert_allclose(u["w"], h * params["w"] / jnp.array([4.0, 5.0, 6.0]), rtol=1e-14)
  np.testing.assert_allclose(u["b"], 1.0, rtol=1e-14)


@pytest.mark.parametrize(
  "names,axis",
  [
    ((None, "kv_heads", "embed", "head_dim"), 0),  # Gemma's kv_einsum: axis 0 is key vs value
    ((None, "heads", "kv"), 0),  # a query kernel whose input is not named
    (("heads", "q_lora", "kv"), 1),  # an input axis whose name has no role
    (("vocab", None, "embed"), 1),
  ],
)
def test_blocks_along_an_axis_of_no_known_role_are_a_guess(names, axis):
  # Heads or vocab rows are kept apart, but the first other axis, where the blocks go, says
  # nothing of what it is: for kv_einsum (2, kv_heads, embed, head_dim) the blocks would average
  # the key kernel's curvature with the value kernel's.
  params = {"w": jnp.zeros((2, 3, 8, 4)[: len(names)])}
  by_names = spatial.named({"w": jax.sharding.PartitionSpec(*names)})
  (row,) = spatial.describe(params, by_names, 4).rows
  assert row.rule == spatial.blocks(4, axis=axis)
  assert row.ambiguous and "AMBIGUOUS" in row.why, row
  with pytest.raises(ValueError, match=r"\['w'\]: shape"):
    spatial.describe(params, spatial.strict(by_names), 4)
  assert not spatial.describe(params, by_names, 1).ambiguous  # blocks of 1 average nothing


def test_resolve_rules_and_describe_name_the_leaf_a_bad_entry_would_average():
  # Called directly (the optimizer checks the tree when it is built), they said "averaging tree
  # contains 'x', which is not a spatial rule." without a path.
  params = {"a": {"k": jnp.ones((2, 2))}, "b": jnp.ones(3)}
  at_k = r"averaging gives 'x' for the leaf at \['a'\]\['k'\], which is not a spatial rule\.$"
  with pytest.raises(TypeError, match=at_k):
    spatial.resolve_rules({"a": "x", "b": None}, params)
  with pytest.raises(TypeError, match=r"gives True for the leaf at \['a'\]\['k'\].*not a mask"):
    spatial.describe(params, averaging={"a": True, "b": None})


def test_a_rule_applied_by_hand_refuses_an_axis_beyond_the_rank():
  # apply_rules and a rule called on an array took the axis modulo the rank: blocks(2, axis=5)
  # on a (2, 3) leaf averaged along axis 1, silently.
  d = jnp.arange(6.0).reshape(2, 3)
  with pytest.raises(
    ValueError, match=r"blocks\(2, axis=5\) averages over axis 5, but the leaf at "
  ):
    spatial.apply_rules({"w": spatial.blocks(2, axis=5)}, {"w": d})
  with pytest.raises(ValueError, match=r"\['w'\] has rank 2: .* axes lie in -2\.\.1"):
    spatial.apply_rules({"w": spatial.blocks(2, axis=5)}, {"w": d})
  with pytest.raises(ValueError, match="the array it is applied to has rank 2"):
    spatial.blocks(2, axis=5)(d)
  with pytest.raises(ValueError, match=r"mean_over\(\(5,\)\) .* the array it is applied to"):
    spatial.mean_over(5)(d)
  with pytest.raises(ValueError, match=r"\['s'\] has rank 0: give that leaf a rule without axes"):
    spatial.resolve_rules(spatial.mean_over(0), {"s": jnp.ones(())})
  # A leaf of rules that is no rule raised "'int' object has no attribute 'check'", naming none.
  with pytest.raises(TypeError, match=r"rules has 2 at \['w'\], which is not a spatial rule"):
    spatial.apply_rules({"w": 2}, {"w": d})
  # In range, negative axes included, the averages are those along the axis named.
  got = spatial.apply_rules({"w": spatial.blocks(2, axis=-1)}, {"w": d})["w"]
  np.testing.assert_allclose(got, [[0.5, 0.5, 2.0], [3.5, 3.5, 5.0]])


@pytest.mark.parametrize(
  "axis_roles, message",
  [
    ({1: "stacked"}, r"axis_roles has the key 1 \(int\); the keys are axis names, strings"),
    ({("layers", "pipe"): "stacked"}, r"the key \('layers', 'pipe'\) \(tuple\)"),
    ("layers", r"axis_roles must be a mapping \{axis name: role\}, got 'layers'"),
    ([("depth", "stacked")], r"must be a mapping .* e\.g\. axis_roles=\{'depth': 'stacked'\}"),
  ],
)
def test_axis_roles_that_no_axis_name_can_match_are_refused(axis_roles, message):
  # A key other than a string matched no axis, so its role was dropped silently; a str gave
  # "dictionary update sequence element #0 has length 1; 2 is required".
  with pytest.raises(ValueError, match=message):
    spatial.flax_default(2, axis_roles=axis_roles)
  depth = spatial.flax_default(2, axis_roles={"depth": "stacked"}).bind(("depth", "embed", "mlp"))
  assert depth.explain((4, 6, 3)).rule == spatial.per_layer(spatial.blocks(2))


@pytest.mark.parametrize(
  "averaging, error, message",
  [
    (spatial.blocks, TypeError, r"averaging=spatial\.blocks is the function that makes a rule"),
    (spatial.strict(spatial.none), TypeError, r"averaging=spatial\.none is the function"),
    (lambda path: None, TypeError, r"averaging\(path, leaf\), but its signature is \(path\)"),
    ("blocks", TypeError, r"averaging is 'blocks', which is none of: None, a spatial rule"),
    (
      {"w": True, "b": False},
      TypeError,
      r"contains False at \['b'\].*not a mask: spatial\.none\(\)",
    ),
    ({"w": {"x": 2}}, TypeError, r"averaging tree contains 2 at \['w'\]\['x'\]"),
  ],
)
def test_an_averaging_no_params_could_take_is_refused_when_the_optimizer_is_built(
  averaging, error, message
):
  # These failed at init, passing spatial.blocks uncalled with "block_size must be an integer >=
  # 1, got (DictKey(key='b'), ...)" and a one-argument callable with Python's own TypeError.
  with pytest.raises(error, match=message):
    ah.scale_by_adahessian(averaging=averaging)


def test_an_error_raised_by_an_averaging_callable_names_the_leaf():
  def rules(path, leaf):
    return spatial.blocks(2) if leaf.ndim == 2 else {"oops": 1}["bias"]

  tx = ah.scale_by_adahessian(averaging=rules)
  with pytest.raises(KeyError) as info:
    tx.init({"b": jnp.ones(3), "w": jnp.ones((4, 3))})
  assert info.value.__notes__ == [
    "adahessian_jax: raised by the averaging callable for the leaf at ['b']."
  ]
  # A tree that is one array: its leaf is named as every error names it (keystr wrote '').
  with pytest.raises(KeyError) as info:
    tx.init(jnp.ones(3))
  assert info.value.__notes__ == [
    f"adahessian_jax: raised by the averaging callable for the leaf at {ah._validation.ROOT}."
  ]
  with pytest.raises(TypeError, match=r"returned 'x' for the root \(the tree is a single array\)"):
    ah.scale_by_adahessian(averaging=lambda path, leaf: "x").init(jnp.ones(3))


def test_per_layer_given_both_n_axes_and_axes_is_refused():
  # axes won and n_axes was dropped, silently: per_layer(none(), 2, axes=1) kept only axis 1.
  with pytest.raises(ValueError, match=r"per_layer was given n_axes=2 and axes=1: give one"):
    spatial.per_layer(spatial.none(), 2, axes=1)
  assert spatial.per_layer(spatial.none(), 1, axes=1) == spatial.per_layer(spatial.none(), axes=1)
  assert spatial.per_layer(spatial.none(), 2) == spatial.per_layer(spatial.none(), axes=(0, 1))


@pytest.mark.parametrize(
  "make",
  [lambda: spatial.mean_over((1, 0, 1)), lambda: spatial.per_layer(spatial.none(), axes=[1, 1])],
)
def test_an_axis_given_twice_is_refused_when_the_rule_is_made(make):
  # Refused only at init before (or, for a rule applied by hand, by jnp.mean's own error).
  with pytest.raises(ValueError, match=r"axes names axis 1 twice, got .*: give each axis once"):
    make()
