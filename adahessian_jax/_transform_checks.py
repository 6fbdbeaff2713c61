"""The checks of :func:`adahessian_jax.scale_by_adahessian`'s arguments and calls.

At construction the dtypes, the seed and whether ``block_size`` is used (at ``init`` again, with
the params' rules); at ``init`` that the params hold no Flax state (:func:`check_not_variables`);
at ``update``, before the step computes anything: the state against the
transform (:func:`check_state`), the mapped axes against the caller's (:func:`check_mapping`),
the gradients and params against the state (:func:`check_against_state`), and whether the step
was given what it needs to estimate the curvature (:func:`check_call`); then, inside the
estimate (on the steps that refresh, or under ``jit`` where its branch is traced), ``value_fn``
(:func:`check_value_fn`) or ``hessian_diag`` (:func:`given_estimate`). Each error names the bad
value, where it is (a leaf path), and the fix.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.core
import jax.numpy as jnp
import numpy as np

from adahessian_jax import _keys, _validation, _wrappers, masking, spatial
from adahessian_jax._axes import check_names, check_not_split_over
from adahessian_jax._extras import from_nnx, loaded
from adahessian_jax._validation import STATIC_FIX
from adahessian_jax.state import (
  RESTORE_FIX,
  ScaleByAdaHessianState,
  check_fields,
  check_key_data,
  check_moment_values,
  new_keys_fix,
  untyped_state_hint,
)

_HINT = (
  "Call tx.update(grads, opt_state, params, value_fn=lambda p: loss_fn(p, batch)) with the "
  "loss on the current batch, or pass a precomputed estimate as hessian_diag=..."
)


def float_dtype(name: str, dtype: Any) -> Any:
  """``dtype`` canonicalised, or ``None``; raises ``ValueError`` unless it is a real floating dtype
  of 16 bits or more (an 8-bit float failed in the first update's type promotion)."""
  if dtype is None:
    return None
  if isinstance(dtype, jax.Array):  # what optax.inject_hyperparams makes of a non-static arg
    raise ValueError(
      f"{name} must be a floating-point dtype, got the array {dtype!r}. {STATIC_FIX}"
    )
  # JAX reads a number (or NumPy array) as its dtype: mu_dtype=0.5 gave float32 moments.
  if isinstance(dtype, (numbers.Number, np.generic, np.ndarray)):
    raise ValueError(
      f"{name} must be a floating-point dtype (jnp.float32, 'bfloat16'), got the value {dtype!r}."
    )
  try:
    canonical = jax.dtypes.canonicalize_dtype(dtype)
  except TypeError as e:
    raise ValueError(f"{name} must be a floating-point dtype, got {dtype!r} ({e}).") from None
  if not jnp.issubdtype(canonical, jnp.floating):
    raise ValueError(f"{name} must be a real floating-point dtype, got {dtype!r}.")
  if _validation.narrow_float(canonical):  # the first update failed in JAX's type promotion
    raise ValueError(
      f"{name} must be a floating-point dtype of 16 bits or more, got {canonical.name}: "
      f"{_validation.NARROW_FLOAT}. Pass float32 or bfloat16."
    )
  return canonical


_OWN_KEYS = new_keys_fix("key")


def checked_seed(seed: Any) -> int:
  """``seed`` (``None``: 0) as an ``int``, checked; a PRNG key given as the seed, or a seed traced
  by ``jax.vmap`` (a sweep over seeds), is named with the way to get those probes."""
  try:
    # Taken mod 2**32: JAX seeds a key with a negative seed's 32-bit pattern without
    # jax_enable_x64 but its 64-bit one with it, so seed=-1 drew other probes under x64.
    return (
      _validation.count("seed", 0 if seed is None else seed, -(2**31), 2**32 - 1, fix=STATIC_FIX)
      % 2**32
    )
  except ValueError as e:
    dtype = jnp.result_type(seed) if hasattr(seed, "dtype") else None
    if dtype is not None and (_keys.is_typed(dtype) or dtype == jnp.uint32):
      raise ValueError(
        f"{e} It looks like a PRNG key: pass an int seed, or put probe keys of your own in the "
        f"state: {_OWN_KEYS}."
      ) from None
    if isinstance(seed, jax.core.Tracer):
      raise ValueError(
        f"{e} To give each member of a jax.vmap its own probes, build the optimizer with an int "
        f"seed and replace the key in each member's state, inside the vmap: {_OWN_KEYS} with "
        "key = jax.random.key(seed) draws exactly the probes of adahessian(seed=seed)."
      ) from None
    raise


def check_block_size_used(block_size: int, averaging: Any, rules: Any = None) -> None:
  """Refuses a ``block_size`` no leaf would use: ``averaging`` gives every leaf a rule of its own.

  ``block_size`` is the block size of the default rule only, so with a single rule (``none()``,
  ``blocks(8)``, ``flax_default(axis_roles=...)``) it would be dropped without a word; so it
  would with a callable or a pytree prefix that gives every leaf of the params its own rule
  (checked once ``rules``, what :func:`spatial.resolve_rules` gave the params, are known at
  ``init``: no leaf's rule is the default with ``block_size``).
  """
  if block_size == 1:
    return
  rule = spatial.as_averaging(averaging).rules
  fix = (
    "and block_size sets only the default rule's blocks. Give the block size to the rules "
    f"(spatial.flax_default({block_size}, axis_roles=...), spatial.blocks({block_size}, axis)), "
    "or leave block_size out."
  )
  if isinstance(rule, spatial.Rule):
    if isinstance(rule, spatial.FlaxDefault) and rule.block_size == block_size:
      return
    raise ValueError(
      f"block_size={block_size} would not be used: averaging={rule} is one rule for every leaf, "
      + fix
    )
  if rules is not None and not any(
    isinstance(r, spatial.FlaxDefault) and r.block_size == block_size
    for r in jax.tree.leaves(rules, is_leaf=spatial.is_rule)
  ):
    how = "callable returns None" if callable(rule) else "tree has None"
    raise ValueError(
      f"block_size={block_size} would not be used: the averaging gives every leaf of the params a "
      f"rule of its own (for no leaf the {how}, which picks the default rule), " + fix
    )


def check_not_variables(params: Any) -> None:
  """Refuses params that hold Flax's state beside the parameters: a whole Linen variables dict
  (``"params"`` beside ``batch_stats``, a cache or intermediates that hold arrays), or an NNX
  state with ``nnx.BatchStat``, ``nnx.Cache`` or ``nnx.Intermediate`` variables (an
  ``nnx.Optimizer`` built with ``wrt=nnx.Variable``).

  The optimizer would step them as parameters (by their gradient, its curvature estimate and the
  weight decay): BatchNorm's running statistics would drift, silently. A collection without
  leaves (left out by ``optax.masked`` or ``multi_transform``) is not stepped and passes.
  """
  held = [
    name for name in _validation.flax_state_collections(params) if jax.tree.leaves(params[name])
  ]
  if held:
    raise ValueError(
      f"scale_by_adahessian: params holds the Flax collection(s) {held} beside 'params', as the "
      "whole variables dict of model.init does, so the optimizer would step them as parameters "
      "(by their gradient, curvature and weight decay): BatchNorm's running statistics would "
      "drift silently. Pass variables['params'] to tx.init and tx.update (the gradient and "
      "value_fn in the params alone, the loss applying {'params': p, 'batch_stats': stats}), "
      "or leave the collections out with optax.masked."
    )
  kinds = tuple(
    kind for name in _NNX_STATE_VARIABLES if (kind := loaded("flax.nnx", name)) is not None
  )
  if not kinds or not from_nnx(params):
    return
  variable = loaded("flax.nnx", "Variable")
  for path, leaf in jax.tree_util.tree_leaves_with_path(
    params, is_leaf=lambda x: variable is not None and isinstance(x, variable)
  ):
    if isinstance(leaf, kinds):
      raise ValueError(
        f"scale_by_adahessian: the variable at {_validation.path_str(path)} is an "
        f"nnx.{type(leaf).__name__}, state of the model, not a parameter: the optimizer would "
        "step it by its gradient, curvature and weight decay (BatchNorm's running statistics "
        "would drift silently). Build the optimizer for the parameters alone: "
        "nnx.Optimizer(model, tx, wrt=nnx.Param)."
      )


# NNX's variable types for a model's state that no optimizer should step.
_NNX_STATE_VARIABLES = ("BatchStat", "Cache", "Intermediate")


def check_state(
  state: Any, *, update_freq: int, n_samples: int, stores_d: bool, mu_dtype: Any, nu_dtype: Any
) -> None:
  """Raises unless ``state`` is a :class:`ScaleByAdaHessianState` made by a transform with this
  ``update_freq``, ``n_samples``, ``lazy_moment`` (``stores_d``) and moment dtypes, whose fields
  and (outside ``jit``) values are those ``init`` and ``update`` make.

  Raises:
    TypeError: for another object than the state (naming what it is), or a field of another
      kind or dtype (:func:`adahessian_jax.state.check_fields`).
    ValueError: for a state made with other settings or moment dtypes, or a field of another
      tree or value.
  """
  _check_settings(state, update_freq, n_samples, stores_d)
  _check_dtypes(state, mu_dtype, nu_dtype)


def _check_settings(
  state: ScaleByAdaHessianState, update_freq: int, n_samples: int, stores_d: bool
) -> None:
  """Raises if ``state`` was made by a transform with another ``update_freq``, ``n_samples``
  or ``lazy_moment``."""
  if not isinstance(state, ScaleByAdaHessianState):
    kind, hint = type(state).__name__, untyped_state_hint(state)
    if isinstance(state, dict):
      kind = f"a dict with keys {sorted(state)}"
    elif isinstance(state, str):  # Flax restores a tuple as {"0": ..., "1": ...} without a target
      kind = (
        f"the string {state!r} (optax.chain passes on the keys of a dict found in place of its "
        "tuple of states)"
      )
      hint = " " + RESTORE_FIX
    raise TypeError(
      f"scale_by_adahessian's update got {kind} as its state, not the ScaleByAdaHessianState its "
      "init returns." + (hint or " Pass the state made by tx.init.")
    )
  check_key_data(state.key)  # a single raw key of shape (2,) would read as two probes' keys
  check_fields(state, "scale_by_adahessian's update got a state whose")  # e.g. a nu broadcast
  check_moment_values(state, "scale_by_adahessian's update got a state whose")  # outside jit
  fix = " Build the transform with the arguments the state was made with, or start a new state."
  if state.key.shape[0] != n_samples:
    raise ValueError(
      f"the AdaHessian state holds {state.key.shape[0]} probe keys but the transform has "
      f"n_samples={n_samples}." + fix
    )
  lazy_state = state.update_freq is not None
  if lazy_state != (update_freq > 1):
    made, stored = "update_freq=1", state.update_freq
    if stored is not None:  # known outside jit (a lazy_moment="refresh" state stores no D)
      traced = isinstance(stored, jax.core.Tracer)
      made = "update_freq > 1" if traced else f"update_freq={int(stored)}"
    raise ValueError(
      f"the AdaHessian state was made with {made} but the transform has "
      f"update_freq={update_freq}." + fix
    )
  if state.update_freq is None:
    return
  if (state.hessian is not None) != stores_d:
    made, used = ("repeat", "refresh") if state.hessian is not None else ("refresh", "repeat")
    raise ValueError(
      f"the AdaHessian state was made with lazy_moment={made!r} but the transform has "
      f"lazy_moment={used!r}." + fix
    )
  # Under jit the stored value is unknown (a per-step host check would cost every step). The
  # value_fn route then refreshes on the transform's schedule from the first step
  # (transform._schedule_of); a given hessian_diag was made on the state's schedule, which the
  # transform follows on that step. It writes its own update_freq into the new state either way.
  if not isinstance(state.update_freq, jax.core.Tracer) and int(state.update_freq) != update_freq:
    raise ValueError(
      f"the AdaHessian state was made with update_freq={int(state.update_freq)} but the "
      f"transform has update_freq={update_freq}." + fix
    )


def _check_dtypes(state: ScaleByAdaHessianState, mu_dtype: Any, nu_dtype: Any) -> None:
  """Raises if the transform has a ``mu_dtype`` or ``nu_dtype`` other than the dtypes of the
  state's moments (a state made with other ones, e.g. a resumed checkpoint): the update keeps the
  state's dtypes, so the transform's were ignored for good."""
  fields = (("mu", state.mu, mu_dtype), ("nu", state.nu, nu_dtype))
  fields += (("hessian", state.hessian, nu_dtype),) if state.hessian is not None else ()
  for field, tree, dtype in fields:
    if dtype is None:
      continue
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
      if jnp.result_type(x) != dtype:
        arg = "mu_dtype" if field == "mu" else "nu_dtype"
        raise ValueError(
          f"the AdaHessian state's {field} at {_validation.path_str(path)} has dtype "
          f"{jnp.result_type(x)} but the transform has {arg}={jnp.dtype(dtype).name}, which the "
          "update would ignore (it keeps the state's dtypes). Build the transform with the "
          "arguments the state was made with, or cast the state's moments: "
          "adahessian_jax.map_adahessian_state(lambda s: s._replace(mu=optax.tree.cast(s.mu, "
          "mu_dtype), nu=optax.tree.cast(s.nu, nu_dtype), hessian=optax.tree.cast(s.hessian, "
          "nu_dtype)), opt_state)."
        )


_STATE_PARAMS = "the state's parameter tree"
_NNX_PURE_GRADS = (
  "The gradients have no leaves at all: nnx.Optimizer.update(model, grads) keeps only the "
  "nnx.Variable leaves of grads that its wrt filter selects, and a plain dict or pure state of "
  "arrays (nnx.to_pure_dict(grads), nnx.as_pure(grads)) has none. Pass the nnx.State of Variables "
  "that nnx.grad(loss_fn)(model, ...) returns, as it is."
)


def _emptied_by_nnx_optimizer(updates: Any, mu: Any) -> bool:
  """Whether ``updates`` is an empty ``nnx.State`` for a state of parameters with leaves: what
  ``nnx.Optimizer.update`` passes on for gradients of plain arrays, which its filter drops."""
  return from_nnx(updates) and not jax.tree.leaves(updates) and bool(jax.tree.leaves(mu))


def check_against_state(updates: Any, params: Any, mu: Any) -> None:
  """Raises unless ``updates`` (and ``params``, if given) have the tree and shapes of the
  parameters the state was made for (``mu``'s): a mismatched leaf would broadcast into the
  moments, and the update into the parameters, instead of failing.

  Raises:
    ValueError: for ``updates=None``, another tree or a leaf of another shape (naming it).
    TypeError: for a leaf that is not an array, or not of a real floating dtype (naming it).
  """
  if updates is None:  # was a pytree-prefix error from a tree_map further on
    raise ValueError(
      "scale_by_adahessian's update got updates=None: pass the gradients first, "
      "tx.update(grads, opt_state, params, value_fn=...)."
    )
  for name, tree in (("params", params), ("updates", updates)):  # a stale state shows in params
    if tree is None:
      continue
    if jax.tree.structure(tree) != jax.tree.structure(mu):
      fix = (
        "Pass updates with the tree of the params, and the state made by init on them."
        if name == "updates"
        else "Pass the state made by init on these parameters (or restore the matching checkpoint)."
      )
      if name == "updates" and _emptied_by_nnx_optimizer(tree, mu):
        fix = _NNX_PURE_GRADS
      raise ValueError(
        f"scale_by_adahessian: the {name} tree is not the tree of the parameters the state was "
        f"made for: {_validation.tree_difference(tree, mu, _STATE_PARAMS)}. {fix}"
      )

    expected = (
      "gradients of real floating-point parameters are expected"
      if name == "updates"
      else "the state was made for real floating-point parameters"
    )

    def check(path, x, m, name=name, expected=expected):
      dtype = _validation.array_dtype(x)  # a str such as "float32" is no array of that dtype
      if dtype is None:
        raise TypeError(
          f"scale_by_adahessian: {name} leaf at {_validation.path_str(path)} is "
          f"{type(x).__name__} {x!r}, not an array; {expected}."
        )
      if jnp.shape(x) != jnp.shape(m):
        fix = (
          "a gradient has its parameter's shape: average per-example gradients first, and take "
          "them of the parameters the state was made for, not another model's"
          if name == "updates"
          else "pass the state made by init on these parameters"
        )
        raise ValueError(
          f"scale_by_adahessian: {name} leaf at {_validation.path_str(path)} has shape "
          f"{jnp.shape(x)}, but the state was made for a parameter of shape {jnp.shape(m)} "
          f"({fix})."
        )
      if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
          f"scale_by_adahessian: {name} leaf at {_validation.path_str(path)} has dtype {dtype}; "
          f"{expected}."
        )

    jax.tree_util.tree_map_with_path(check, tree, mu)


def _check_estimate(estimate: Any, like: Any) -> None:
  """Raises unless ``hessian_diag`` has the structure, shapes and a float dtype of ``like``."""
  if jax.tree.structure(estimate) != jax.tree.structure(like):
    where = _validation.tree_difference(estimate, like, _STATE_PARAMS)
    flat = jax.tree.leaves(like)
    sizes = [jnp.size(e) for e in jax.tree.leaves(estimate)]
    flattened = len(flat) == 1 and jnp.ndim(flat[0]) == 1 and sum(sizes) == jnp.size(flat[0])
    hint = (
      " Inside optax.flatten the parameters are one vector, and spatial averaging then sees one "
      "rank-1 leaf: keep AdaHessian outside optax.flatten, or pass hessian_diag flattened like "
      "the params (jnp.concatenate([x.ravel() for x in jax.tree.leaves(hessian_diag)]))."
      if flattened and len(sizes) > 1
      else ""
    )
    raise ValueError(f"hessian_diag must have the structure of params: {where}.{hint}")

  def check(path, e, x):
    # array_dtype: a str leaf ("float32") was read as the dtype it names, reported as a shape ().
    dtype = _validation.array_dtype(e)
    narrow = dtype is not None and _validation.narrow_float(dtype)  # failed in type promotion
    floating = dtype is not None and jnp.issubdtype(dtype, jnp.floating)
    if not floating or narrow or jnp.shape(e) != jnp.shape(x):
      got = (
        f"{type(e).__name__} {e!r}"
        if dtype is None
        else f"shape {jnp.shape(e)} and dtype {dtype}"
        + (f": {_validation.NARROW_FLOAT}" if narrow else "")
      )
      raise ValueError(
        f"hessian_diag at {_validation.path_str(path)} must be a real floating array of 16 bits "
        f"or more, of shape {jnp.shape(x)} like the parameter; got {got}."
      )

  jax.tree_util.tree_map_with_path(check, estimate, like)


def _masked_difference(estimate: Any, like: Any) -> str:
  """Where ``estimate`` (a whole-model ``hessian_diag``) does not fit the masked ``like``, named
  by a leaf path: a leaf or ``optax.MaskedNode`` of ``like`` with nothing at or under its path in
  ``estimate``, or a leaf of ``estimate`` under none of them (a real model's whole tree structure
  is too long to read)."""
  slots = dict(jax.tree_util.tree_leaves_with_path(like, is_leaf=masking.is_masked))
  paths = [p for p, _ in jax.tree_util.tree_leaves_with_path(estimate)]
  absent, extra = _validation.prefix_mismatch(list(slots), paths)
  if absent is not None:
    owner = ", which another transform owns" if masking.is_masked(slots[absent]) else ""
    return f"it has no leaf at {_validation.path_str(absent)}, where the params have one{owner}"
  if extra is not None:
    return f"it has a leaf at {_validation.path_str(extra)}, where the params have none"
  return "its tree is not the params' (other containers at the same paths)"


def check_value_fn(value_fn: Any, params: Any) -> None:
  """Raises unless ``value_fn(params)`` can be called: ``params`` given, a call with them alone
  possible, and (inside ``optax.masked``) a ``value_fn`` that takes the masked params."""
  if params is None:
    raise ValueError(
      "scale_by_adahessian needs params to evaluate value_fn at, got params=None: call "
      "tx.update(grads, opt_state, params, value_fn=...)."
    )
  _validation.callable_with(
    value_fn,
    (params,),
    {},
    "value_fn(params)",
    "Close over the other arguments: value_fn=lambda p: loss_fn(p, batch).",
  )
  if masking.has_masked_nodes(params) and not isinstance(value_fn, masking.MaskedValueFn):
    raise ValueError(
      "scale_by_adahessian got masked params (inside optax.masked or multi_transform), which "
      "a whole-model value_fn cannot be evaluated on. Pass "
      "value_fn=adahessian_jax.masked_value_fn(value_fn, params), or a whole-model "
      "hessian_diag."
    )


def given_estimate(hessian_diag: Any, like: Any) -> Any:
  """``hessian_diag`` as arrays of the tree of ``like`` (the moments), checked: a whole model's
  estimate restricted to the leaves of a masked ``like`` (inside ``optax.masked`` or
  ``multi_transform``); raises unless it has ``like``'s tree and shapes and a float dtype."""
  estimate = hessian_diag
  if masking.has_masked_nodes(like) and not masking.has_masked_nodes(estimate):
    try:
      estimate = masking.restrict_to(estimate, like)
    except ValueError:
      raise ValueError(
        "hessian_diag inside optax.masked or multi_transform must have the tree of the whole "
        "model's params, the leaves other transforms own included (as "
        f"value_grad_and_hessian_diag returns it): {_masked_difference(estimate, like)}."
      ) from None
  _check_estimate(estimate, like)
  return jax.tree.map(jnp.asarray, estimate)  # a Python float for a 0-d leaf too


#: The call for an ``nnx.Optimizer``, whose ``value_fn`` takes an ``nnx.State``.
_NNX = (
  "With an nnx.Optimizer, whose value_fn receives an nnx.State: optimizer.update(model, grads, "
  "value_fn=adahessian_jax.nnx.value_fn(model, loss_fn, *args))."
)
#: What ``optax.flatten`` does to AdaHessian, warned of at ``init``.
FLATTENED = (
  "scale_by_adahessian is inside optax.flatten, which hands it all the parameters as one vector: "
  "the spatial averaging sees a single rank-1 leaf (no block_size blocks, no mean over "
  "convolution kernels' spatial axes, no averaging rules), curvature_floor's mean is the whole "
  "model's, value_fn receives the flat vector and hessian_diag must be one. Keep AdaHessian "
  "outside optax.flatten."
)
#: The note on an error of a ``value_fn`` inside ``optax.flatten``.
FLATTENED_VALUE_FN = (
  "scale_by_adahessian is inside optax.flatten, which calls value_fn with all the parameters as "
  "one vector, not their tree. Keep AdaHessian outside optax.flatten (it also loses the spatial "
  "averaging there), or unflatten in the loss: flat, unravel = "
  "jax.flatten_util.ravel_pytree(params); value_fn=lambda v: loss_fn(unravel(v), batch)."
)
#: Why an update given ``value_fn`` may still arrive without it: a wrapper dropped it.
_DROPPED = (
  "If you passed one, a wrapper dropped it on the way: optax passes extra arguments only through "
  "optax.GradientTransformationExtraArgs, which optax.MultiSteps is not (put it outermost, "
  "optax.MultiSteps(optax.chain(..., adahessian), k), not inside optax.chain or "
  "optax.apply_if_finite), and Flax's TrainState.apply_gradients passes none (use "
  "adahessian_jax.linen.TrainState)."
)


_EXPECTED_AXIS = "expected_axis_name"
_EXPECTED_PROBES = "expected_independent_probes"


def _check_expected_probes(expected: Any, independent_probes: bool) -> None:
  """Raises unless the caller that drew the probes of ``hessian_diag`` drew them as this transform
  would (``expected_independent_probes``): in the fused route the caller's choice is the one
  that counts, and a ``tx`` built with the other one would be silently ignored."""
  expected = _validation.flag(_EXPECTED_PROBES, expected)
  if expected == independent_probes:
    return
  raise ValueError(
    f"scale_by_adahessian: its caller drew {'each device its own' if expected else 'the same'} "
    f"probes (independent_probes={expected}), but this scale_by_adahessian was built with "
    f"independent_probes={independent_probes}, which the estimate it was given does not follow. "
    "Pass the same independent_probes to both (adahessian_jax.adahessian(..., "
    f"independent_probes={expected}) or TrainState.apply_loss(..., "
    f"independent_probes={independent_probes}))."
  )


def _averaged_axes(axis_name: Any, arg: str = "axis_name") -> frozenset[Any]:
  """The axes ``axis_name`` (the argument ``arg``) averages over: a set, as a mean over
  ``("a", "b")`` is one over ``("b", "a")``."""
  return frozenset(() if axis_name is None else check_names(axis_name, arg))


def _check_expected_axis(expected: Any, axis_name: Any) -> None:
  """Raises unless the caller's ``expected_axis_name`` names the axes of ``axis_name`` (in any
  order)."""
  if _averaged_axes(expected, _EXPECTED_AXIS) == _averaged_axes(axis_name):
    return
  if expected is None:
    problem = (
      f"this scale_by_adahessian averages the estimate over axis_name={axis_name!r}, but its "
      "caller averaged the gradients over no axis (expected_axis_name=None): each device would "
      f"step with its own gradient. Pass axis_name={axis_name!r} to the caller too "
      f"(TrainState.apply_loss(..., axis_name={axis_name!r}))"
    )
  else:
    problem = (
      f"its caller averaged the gradients over {expected!r} and gave each device's own "
      f"estimate (expected_axis_name={expected!r}), but this scale_by_adahessian averages the "
      f"estimate over axis_name={axis_name!r}: the devices' second moments would differ and the "
      f"replicas drift apart. Build tx with axis_name={expected!r} "
      f"(adahessian_jax.adahessian(..., axis_name={expected!r}))"
    )
  raise ValueError(f"scale_by_adahessian: {problem}.")


def check_mapping(
  mu: Any, extra_args: dict[str, Any], axis_name: Any, independent_probes: bool
) -> dict[str, Any]:
  """Raises if ``axis_name`` is bound by no enclosing map or names a mesh axis the parameters
  (``mu``) are split over, or unless the caller's ``expected_axis_name`` and
  ``expected_independent_probes`` (if in ``extra_args``) are this transform's; before any
  collective meets an unbound axis.

  Returns:
    The other extra arguments.
  """
  if axis_name is not None:
    check_not_split_over(mu, axis_name)
  others = dict(extra_args)
  if _EXPECTED_AXIS in others:
    _check_expected_axis(others.pop(_EXPECTED_AXIS), axis_name)
  if _EXPECTED_PROBES in others:
    _check_expected_probes(others.pop(_EXPECTED_PROBES), independent_probes)
  return others


def check_call(
  value_fn: Any, hessian_diag: Any, refresh: Any, lazy: bool, others: Any = ()
) -> None:
  """Raises unless the step has exactly what it needs: ``value_fn`` or ``hessian_diag`` (not
  both; neither only on a step that does not refresh). ``others`` are the names of the other
  extra arguments, named in the error for a missing loss (a misspelled ``value_fn``, or optax's
  Sophia's ``obj_fn``, lands there)."""
  if value_fn is not None and hessian_diag is not None:
    raise ValueError(f"scale_by_adahessian takes value_fn or hessian_diag, not both. {_HINT}")
  if value_fn is None and hessian_diag is None and refresh is not False:
    under_jit = " (under jit every step may refresh it)" if lazy else ""
    got = (
      f" It got other extra arguments ({', '.join(sorted(others))}), which it does not read: "
      "the loss goes in value_fn, an estimate in hessian_diag."
      if others
      else ""
    )
    wrapped = "".join(
      f" It is called by {_wrappers.NO_EXTRA_ARGS[w]}"
      for w in _wrappers.calling()
      if w in _wrappers.NO_EXTRA_ARGS
    )
    if wrapped:  # no call of the user's can pass the loss: the other fixes do not apply
      raise ValueError(
        f"scale_by_adahessian needs the loss to estimate the Hessian on this step.{wrapped}"
      )
    raise ValueError(
      f"scale_by_adahessian needs the loss to estimate the Hessian on this step{under_jit}.{got} "
      f"{_HINT} {_NNX} {_DROPPED}"
    )
