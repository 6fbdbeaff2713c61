"""Device-axis helpers for mapped code (``pmap``, ``shard_map``), across JAX versions."""

from __future__ import annotations

from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from adahessian_jax import _keys, _validation, masking

__all__ = ["device_varying", "fold_in_axis_index"]

T = TypeVar("T")


def fold_in_axis_index(key_data: jax.Array, axis_name: Any) -> jax.Array:
  """Folds this device's index along ``axis_name`` into every key of raw ``key_data``.

  Device 0 folds in the axis size instead, which no device's index is: with threefry keys
  ``fold_in(key, 0)`` is ``split(key)[0]``, the key the optimizer state moves on to after the
  step, so device 0 would draw from the next step's key.

  Args:
    key_data: Raw PRNG key data (``jax.random.key_data``), one key per row.
    axis_name: A mapped axis name (or a tuple of them) bound by the enclosing
      ``pmap``/``shard_map``.

  Returns:
    Raw key data of the same shape, different on every device of the axis.

  Raises:
    TypeError: for ``key_data`` that is not a ``uint32`` array (typed keys, an optimizer state).
    ValueError: for ``key_data`` whose last axis is not one key's data (a scalar, or another
      PRNG implementation's keys), naming its shape; naming ``axis_name`` if it is not bound by
      an enclosing map.
  """
  dtype = getattr(key_data, "dtype", None)
  if dtype is None or _keys.is_typed(dtype) or dtype != np.uint32:
    # JAX's "invalid PRNG key data: expected key_data.ndim >= 1" named neither the argument nor
    # the fix, and for a whole state printed it.
    got = f"dtype {dtype}" if dtype is not None else f"a {type(key_data).__name__}"
    fix = (
      "pass jax.random.key_data(keys)"
      if dtype is not None and _keys.is_typed(dtype)
      else "pass the AdaHessian state's key (state.key), or jax.random.key_data(keys)"
    )
    raise TypeError(
      f"fold_in_axis_index takes raw PRNG key data (uint32, one key per row), got {got}: {fix}; "
      "distributed.per_device_probe_state(opt_state, axis_name) folds a whole optimizer state's."
    )
  size = _keys.default_key_size()
  if np.ndim(key_data) == 0 or np.shape(key_data)[-1] != size:  # JAX's "invalid PRNG key data"
    raise ValueError(
      f"fold_in_axis_index takes raw PRNG key data, one key of {size} uint32 words per row "
      f"(shape (..., {size}) under jax_default_prng_impl="
      f"{str(jax.random.key_impl(jax.random.key(0)))!r}), got shape {np.shape(key_data)}: pass "
      "the AdaHessian state's key (state.key, shape (n_samples, key size)), or "
      "jax.random.key_data(keys)."
    )
  keys = jax.random.wrap_key_data(key_data)
  return jax.random.key_data(_fold_in_each(keys, _device_tag(check_bound(axis_name))))


def _device_tag(axes: tuple[Any, ...]) -> jax.Array:
  """This device's index along ``axes``, except the axis size on device 0: never 0.

  Why not 0: :func:`fold_in_axis_index`. Under ``shard_map`` device 0's probe block for a split
  leaf (:func:`fold_in_shard_index`) would also come back the next step as another device's
  probe of a replicated leaf of that shape.

  Args:
    axes: Bound mapped axis names.

  Returns:
    An int32 scalar in ``1..size``, different on every device of ``axes``.
  """
  index = jax.lax.axis_index(axes)
  return jnp.where(index == 0, jax.lax.psum(1, axes), index)


def _varying_axes(x: Any) -> frozenset:
  """The mesh axes the value ``x`` varies over (inside ``shard_map``), across JAX versions."""
  return _aval_varying_axes(jax.typeof(x))


def _aval_varying_axes(aval: Any) -> frozenset:
  """The mesh axes an abstract value (``jax.typeof``'s, ``jax.eval_shape``'s) varies over."""
  varying = getattr(aval, "vma", None)
  if varying is None:
    varying = getattr(getattr(aval, "manual_axis_type", None), "varying", frozenset())
  return frozenset(varying)


def _in_order(axes: frozenset) -> tuple[Any, ...]:
  """``axes`` as a tuple in a fixed order, the same on every device (names may be any hashable)."""
  return tuple(sorted(axes, key=str))


def unshared_axes(key: jax.Array, like: Any) -> tuple[Any, ...]:
  """The mesh axes ``like`` varies over and ``key`` does not, in a fixed order (inside
  ``shard_map``; empty elsewhere)."""
  return _in_order(_varying_axes(like) - _varying_axes(key))


def fold_in_shard_index(keys: jax.Array, axes: tuple[Any, ...]) -> jax.Array:
  """PRNG ``keys`` (typed or raw, any batch shape) folded with this device's index along the
  mesh ``axes``.

  Inside ``shard_map`` a parameter sharded over a mesh axis (tensor parallelism) varies over it;
  a probe drawn for it from a replicated key would be the same block on every shard, so the
  global probe would repeat and Hutchinson's estimate would pick up the Hessian entries between
  the repeats (and its tangent would not vary like the parameter, which JAX refuses). Folding in
  the index along the axes the parameter varies over and its key does not
  (:func:`unshared_axes`) draws an independent block per shard. Axes the key already varies
  over (the data axis with ``independent_probes``) are left alone, as is everything outside
  ``shard_map`` (``pmap``, ``jit``), where nothing varies.

  Args:
    keys: PRNG keys, typed or raw key data.
    axes: Mesh axes, from :func:`unshared_axes`.

  Returns:
    PRNG keys like ``keys``, ``keys`` themselves if ``axes`` is empty.
  """
  if not axes:
    return keys
  return _fold_in_each(keys, jax.lax.axis_index(axes))


def _fold_in_each(keys: jax.Array, data: jax.Array) -> jax.Array:
  """``jax.random.fold_in(k, data)`` for every key ``k`` of ``keys`` (typed or raw, any batch
  shape)."""
  fold = lambda k: jax.random.fold_in(k, data)
  for _ in range(_keys.batch_ndim(keys)):
    fold = jax.vmap(fold)
  return fold(keys)


def sum_over_shards(x: jax.Array) -> jax.Array:
  """``x`` summed over the mesh axes it varies over inside ``shard_map``; else ``x`` itself.

  For a quantity every shard must agree on (whether the whole estimate is finite) when the
  parameters are split over mesh axes (tensor parallelism): each shard sees only its block.
  """
  axes = _in_order(_varying_axes(x))
  return jax.lax.psum(x, axes) if axes else x


def nonnegative_total(parts: list[jax.Array]) -> jax.Array:
  """The sum of scalars that are each ``>= 0`` (or NaN/inf), one per leaf, as one reduction.

  Written as a Python ``sum`` (or a reduction of the stacked scalars, which XLA's simplifier
  turns back into one), it is a chain of scalar adds, and XLA fuses a copy of that chain into
  every kernel that reads the total: with one kernel per leaf the compiled step grows with the
  square of the leaves (300 leaves: 90,000 adds, +30 s of compile on a CPU). The ``abs``
  between the stack and the reduction keeps it one reduction, computed once; it changes no
  value of a non-negative (or NaN) part.

  Args:
    parts: Real scalars.

  Returns:
    Their sum, a scalar of their promoted dtype (float32 0 for none).
  """
  if not parts:
    return jnp.zeros((), jnp.float32)
  return jnp.sum(jnp.abs(jnp.stack(parts)))


def split_leaves(tree: Any) -> dict[str, tuple[Any, ...]]:
  """The leaves of ``tree`` that vary over mesh axes (inside ``shard_map``: split parameters,
  or moments split like them), by path, with those axes; empty elsewhere."""
  split = {}
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    axes = _in_order(_varying_axes(x))
    if axes:
      split[_validation.path_str(path)] = axes
  return split


def shard_count(x: jax.Array) -> Any:
  """How many different blocks of ``x`` the mesh axes it varies over hold (inside ``shard_map``).

  1 outside ``shard_map`` and for a value the same on every device.
  """
  axes = _in_order(_varying_axes(x))
  return jax.lax.psum(1, axes) if axes else 1


def _manual_axes() -> frozenset[Any] | None:
  """The mesh axes an enclosing ``shard_map`` (or ``pmap``) maps over; ``None`` where this JAX
  does not say."""
  get_mesh = getattr(jax.sharding, "get_abstract_mesh", None)
  manual = None if get_mesh is None else getattr(get_mesh(), "manual_axes", None)
  return None if manual is None else frozenset(manual)


def _cast_to_varying(x: Any, axes: tuple[Any, ...]) -> Any:
  cast = getattr(jax.lax, "pcast", None)
  if cast is not None:
    return cast(x, axes, to="varying")
  # JAX < 0.8.2 has no pcast; its pvary was removed in JAX 0.10, whose API pyright reads.
  return jax.lax.pvary(x, axes)  # pyright: ignore[reportAttributeAccessIssue]


def check_names(axis_name: Any, arg: str = "axis_name") -> tuple[Any, ...]:
  """``axis_name`` as a tuple of names; raises ``ValueError``, naming the argument ``arg``, for an
  integer among them, a name that is not hashable (an array), or one named twice.

  JAX's collectives read an integer as a positional array axis (``psum(x, 0)`` sums over axis 0 of
  ``x``), so ``axis_name=0``, written for the mapped axis's index, failed with "axis 0 is out of
  bounds for array of dimension 0" inside the step.
  """
  axes = tuple(axis_name) if isinstance(axis_name, tuple | list) else (axis_name,)
  for a in axes:
    if isinstance(a, int | np.integer):
      raise ValueError(
        f"{arg}={axis_name!r}: {a!r} is an integer, which JAX's collectives read as an array "
        "axis, not a mapped one. Pass the name the step is mapped over (jax.pmap(..., "
        "axis_name='batch'), or a mesh axis name under shard_map)."
      )
    try:
      hash(a)
    except TypeError:  # an array: JAX's "unhashable type" came from inside the step
      raise ValueError(
        f"{arg}={axis_name!r}: {a!r} is not hashable, so it cannot name a mapped axis. Pass "
        "the name the step is mapped over (jax.pmap(..., axis_name='batch'), or a mesh axis name "
        "under shard_map)."
      ) from None
  if len(set(axes)) != len(axes):  # JAX's "repeated axis in `source` argument", in the step
    raise ValueError(f"{arg}={axis_name!r} names an axis twice: name each mapped axis once.")
  return axes


def check_bound(axis_name: Any) -> tuple[Any, ...]:
  """``axis_name`` as a tuple of names, if an enclosing ``pmap``/``shard_map`` binds them all.

  Raises:
    ValueError: naming ``axis_name`` if it is not bound (JAX's own error is a ``NameError``
      from deep inside the step).
  """
  axes = check_names(axis_name)
  if None in axes:  # the error below advised axis_name=None, the value given
    raise ValueError(
      f"axis_name={axis_name!r} names no mapped axis: pass the axis name the step is mapped over "
      "(jax.pmap(..., axis_name='batch'), or a mesh axis name under shard_map)."
    )
  try:
    jax.lax.psum(1, axes)  # a constant: only checks that the axes are bound
  except NameError as e:
    raise ValueError(
      f"axis_name={axis_name!r} is not an axis of the enclosing pmap or shard_map ({e}). Pass "
      "the axis name the step is mapped over, or axis_name=None under jax.jit with sharded arrays."
    ) from None
  return axes


def check_not_split_over(moments: Any, axis_name: Any) -> None:
  """Refuses an ``axis_name`` that is not bound (:func:`check_bound`), or that names a mesh axis
  a parameter is split over: the estimate is averaged over it.

  Args:
    moments: The optimizer state's moments (shaped like the parameters, split like them).
    axis_name: The optimizer's ``axis_name``.

  Raises:
    ValueError: naming ``axis_name`` if it is not bound; naming the leaf and the axis, inside
      ``shard_map`` (elsewhere nothing varies), if a parameter is split over it.
  """
  axes = check_bound(axis_name)

  def check(path, x):
    split = [a for a in axes if a in _varying_axes(x)]
    if split:
      raise ValueError(
        f"scale_by_adahessian: the parameter at {_validation.path_str(path)} is split over mesh "
        f"axis {split[0]!r}, which axis_name={axis_name!r} also names: the estimate is pmean-ed "
        "over axis_name, which would average different blocks of it. Pass axis_name the axes only "
        "the batch is split over (docs/distributed.md, tensor parallelism), or use jax.jit "
        "with sharded arrays for parameters split over the batch's axes (FSDP). Parameters "
        "with a leading device axis (copies made for jax.pmap) go to shard_map whole: "
        "in_specs=P() for them and the optimizer state, after dropping that axis (x[0] of each "
        "leaf, as flax.jax_utils.unreplicate does)."
      )

  jax.tree_util.tree_map_with_path(check, moments)


def check_loss_varies(
  value: Any, params: Any, keys: Any, caller: str, loss: str, given: str, fix: str
) -> None:
  """Refuses a loss reduced over a data axis inside ``shard_map``: the one rule of both routes.

  The data axes are those the probes' ``keys`` vary over: the ``value_fn`` route makes them vary
  over ``axis_name``, the fused route's caller over the axes it made the parameters and the
  state device-varying over (:func:`device_varying`; :func:`fold_in_axis_index` too). A mesh
  axis only the parameters vary over (tensor parallelism splits them over it) is no data axis:
  a loss summed over it is right. At the device-varying ``params`` a loss reduced over a data
  axis (by ``lax.pmean``) is the same on every device of it, and its derivatives at this
  device's parameters are 1/P of this device's share, so the gradient and the estimate averaged
  over the axis would be P times too small (measured: 1/8 of one device's on 8 devices),
  silently. Under ``pmap`` (and outside ``shard_map``) nothing varies and nothing is checked:
  there the same loss gives one device's. A trace-time check: it adds nothing to the program.

  Args:
    value: The loss at ``params`` (a scalar).
    params: The parameters the loss was evaluated at.
    keys: The PRNG keys the probes were drawn from.
    caller: Who raises, for the error.
    loss: How the error calls the loss (``"value_fn"``).
    given: Why and what must be this device's own loss, after "but" (``"with
      axis_name='data' value_fn"``).
    fix: The error's last sentence.

  Raises:
    ValueError: naming the axis, if ``value`` does not vary over a data axis that ``params``
      vary over.
  """
  varying = frozenset().union(*(_varying_axes(x) for x in jax.tree.leaves(params)))
  data = _varying_axes(keys) & varying
  reduced = _in_order(data - _varying_axes(value))
  if reduced:
    raise ValueError(
      f"{caller}: {loss} returns the same loss on every device of mesh axis {reduced[0]!r} (it "
      f"is reduced over the axis, e.g. by jax.lax.pmean), but {given} must be this device's "
      "own loss: under shard_map the derivatives of the reduced loss at this device's "
      "parameters are 1/P of its share, and its gradient and Hessian estimate, averaged over "
      f"the axis, would be P times too small (P devices). {fix}"
    )


def _tracks_variation(axes: tuple[Any, ...]) -> bool:
  """Whether JAX tracks here which values vary over ``axes``: inside ``shard_map`` with
  ``check_vma=True``, not under ``pmap`` or ``check_vma=False``, where nothing is seen to vary.
  Traced apart (``jax.eval_shape``), so it adds nothing to the program."""
  try:
    index = jax.eval_shape(lambda: jax.lax.axis_index(axes))
  except AssertionError:  # a vmap axis among them inside shard_map: JAX's own error comes later
    return False
  return frozenset(axes) <= _aval_varying_axes(index)


def check_estimate_varies(estimate: Any, axis_name: Any) -> None:
  """Refuses a given Hessian-diagonal estimate that is the same on every device of an axis of
  ``axis_name`` (inside ``shard_map``), which the transform averages it over.

  Averaging it would change nothing, and the usual source is the fused route at parameters and
  state left replicated with this device's loss: JAX differentiates the sum of the devices'
  losses there, so the gradient and the estimate are P times the global batch's (measured: 4x
  on 4 devices), silently. An estimate that is already the global batch's needs no
  ``axis_name``. Under ``pmap`` and with ``check_vma=False`` nothing is seen to vary, and
  nothing is checked. A trace-time check: it adds nothing to the program.

  Args:
    estimate: The ``hessian_diag`` given to the update, in the moments' tree.
    axis_name: The transform's ``axis_name``, bound here.

  Raises:
    ValueError: naming the leaf and the axis.
  """
  axes = check_names(axis_name)
  if not _tracks_variation(axes):
    return
  for path, x in jax.tree_util.tree_leaves_with_path(estimate):
    same = _in_order(frozenset(axes) - _varying_axes(x))
    if same:
      a = same[0]
      raise ValueError(
        f"scale_by_adahessian: hessian_diag at {_validation.path_str(path)} is the same on every "
        f"device of mesh axis {a!r} (it does not vary over it), which tx averages it over "
        f"(axis_name={axis_name!r}): that would change nothing. If it comes from "
        "value_grad_and_hessian_diag at params and opt_state left replicated with this "
        "device's loss, JAX differentiated the sum of the devices' losses, and the gradient and "
        "the estimate are P times the global batch's (P devices): make both device-varying "
        f"first, distributed.device_varying((params, opt_state), {a!r}) (TrainState.apply_loss "
        "and adahessian_jax.nnx.value_grad_and_hessian_diag with axis_name do it). If it is "
        "already the global batch's estimate, build tx without axis_name."
      )


def check_state_varies(params: Any, key: Any, moments: Any, caller: str) -> None:
  """Refuses a leaf of ``params`` made device-varying over a mesh axis (inside ``shard_map``)
  that the optimizer state it comes with does not vary over, neither its PRNG ``key`` nor the
  leaf's moment.

  A leaf that varies over an axis its key does not draws its probe with the device's index
  along it folded in (:func:`fold_in_shard_index`, for a parameter split over it, whose moments
  are split like it). Parameters made device-varying over the data axis beside the state as it
  is (``device_varying(params, "data")``, as the ``value_fn`` route's recipe takes the gradient)
  drew each device's own probes: independent probes that the transform, built with the same
  probes, was not told of (the run no longer equals one device's), and a loss reduced over the
  axis could not be told (:func:`check_loss_varies`). A key that varies over an axis a leaf does
  not (``per_device_probe_state`` at the replicated params) would draw it a probe that varies where
  it does not, which JAX refuses (an error about ``pvary``, from inside the product).

  Args:
    params: The parameters the fused pass differentiates at.
    key: The AdaHessian state's PRNG key.
    moments: Its moments (``mu``), leaf by leaf like ``params`` (an ``optax.MaskedNode`` at a
      leaf another transform owns, which is not checked), or one vector (``optax.flatten``).
    caller: Who raises, for the error.

  Raises:
    ValueError: naming the leaf and the axis.
  """
  slots = jax.tree.leaves(moments, is_leaf=masking.is_masked)
  leaves = jax.tree_util.tree_leaves_with_path(params)
  if len(slots) != len(leaves):  # one vector for all (optax.flatten)
    slots = [frozenset().union(*(_varying_axes(m) for m in slots))] * len(leaves)
  for (path, x), m in zip(leaves, slots, strict=True):
    if masking.is_masked(m):
      continue
    given = (m if isinstance(m, frozenset) else _varying_axes(m)) | _varying_axes(key)
    missing = _in_order(_varying_axes(x) - given)
    if missing:
      a = missing[0]
      raise ValueError(
        f"{caller}: the parameter at {_validation.path_str(path)} varies over mesh axis {a!r} "
        "(made device-varying: distributed.device_varying), but the opt_state given with it "
        "does not, neither its PRNG key nor its moment: each device would draw its own probes, "
        "which tx was not told of (the run would no longer equal one device's on the global "
        "batch). Make both device-varying: distributed.device_varying((params, opt_state), "
        f"{a!r}), then for independent probes distributed.per_device_probe_state(opt_state, "
        f"{a!r})."
      )
    unlike = _in_order(_varying_axes(key) - _varying_axes(x))
    if unlike:  # JAX's own error, from the product, was about pvary and named no leaf
      a = unlike[0]
      raise ValueError(
        f"{caller}: the opt_state's PRNG key varies over mesh axis {a!r} (made device-varying, "
        "or folded by distributed.per_device_probe_state), but the parameter at "
        f"{_validation.path_str(path)} does not, so its probe would vary where it does not. "
        "Pass the params made device-varying over it too: distributed.device_varying((params, "
        f"opt_state), {a!r}) (at the replicated params the gradient is summed over the axis)."
      )


def device_varying(tree: T, axis_name: Any) -> T:
  """Marks ``tree`` as varying over ``axis_name`` inside ``shard_map``; else returns it as is.

  Under ``shard_map`` (with its default ``check_vma=True``), differentiating a
  per-device loss with respect to replicated (invariant) parameters sums the
  result over the axis automatically; at the returned values the gradient and
  Hessian-vector products are this device's own, as under ``pmap``.

  Args:
    tree: A pytree of arrays.
    axis_name: A mapped axis name, or a tuple of them.

  Returns:
    ``tree`` with every leaf varying over ``axis_name`` (unchanged outside
    ``shard_map``).

  Raises:
    ValueError: if ``axis_name`` is not bound by an enclosing map.
    TypeError: for a leaf that is not an array or number (naming its path).
  """
  axes = check_bound(axis_name)

  manual = _manual_axes()

  def one(path, x):
    try:
      varying = _varying_axes(x)
    except TypeError:  # JAX's "Argument 'relu' of type <class 'str'> is not a valid JAX type"
      raise TypeError(
        f"device_varying: the leaf at {_validation.path_str(path)} is {type(x).__name__} {x!r}, "
        "not an array or number. Keep it out of the tree (close over it in the step)."
      ) from None
    # Only shard_map's (manual) mesh axes track what varies: under vmap, even inside jit or
    # shard_map, the values are per-device already (JAX asserts on a cast over a vmap axis).
    missing = tuple(a for a in axes if a not in varying and (manual is None or a in manual))
    if not missing:
      return x
    try:
      return _cast_to_varying(x, missing)
    except ValueError:  # not under shard_map (pmap): values are per-device already
      return x

  return jax.tree_util.tree_map_with_path(one, tree)
