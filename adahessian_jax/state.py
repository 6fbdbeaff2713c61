"""AdaHessian's optimizer state and the rules read from it.

Each rule that both the transform and the fused route need lives here once:
which probes a step uses (:func:`probe_keys`), whether it refreshes the
Hessian (:func:`is_refresh_step`, :func:`on_refresh`), and how to find or
replace the AdaHessian state inside any optax state
(:func:`find_adahessian_state`, :func:`map_adahessian_state`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import jax
import jax.core
import jax.numpy as jnp
import numpy as np
import optax

from adahessian_jax import _keys, _validation
from adahessian_jax._axes import fold_in_axis_index
from adahessian_jax._extras import from_nnx

__all__ = [
  "ScaleByAdaHessianState",
  "find_adahessian_state",
  "is_refresh_step",
  "map_adahessian_state",
  "on_refresh",
  "probe_keys",
]

T = TypeVar("T")


class ScaleByAdaHessianState(NamedTuple):
  """State of :func:`adahessian_jax.scale_by_adahessian`; every field is an array (or ``None``).

  Attributes:
    count: Number of updates applied so far, ``int32`` scalar.
    key: Raw PRNG key data (``jax.random.key_data``), one key per probe, shape
      ``(n_samples, key_size)``; each is split once per Hessian refresh.
    mu: First moment of the gradient.
    nu: Second moment of the spatially averaged Hessian diagonal ``D``.
    hessian: The last ``D``, reused between refreshes; ``None`` when
      ``update_freq == 1`` (then the state is Adam's plus ``key``)
      and with ``lazy_moment="refresh"`` (``nu`` then moves on refresh steps
      only, with decay ``b2**update_freq`` and bias correction
      ``1 - b2**(update_freq·refreshes)``, ``refreshes = ceil(count /
      update_freq)``).
    update_freq: The refresh interval as an ``int32`` scalar when it is > 1,
      else ``None``; read by :func:`adahessian_jax.value_grad_and_hessian_diag`
      so that the fused route refreshes on exactly the transform's steps. So
      ``update_freq`` set and ``hessian`` ``None`` means ``lazy_moment="refresh"``.
  """

  count: jax.Array
  key: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  hessian: optax.Updates | None = None
  update_freq: jax.Array | None = None


def is_adahessian_state(x: Any) -> bool:
  """Whether ``x`` is a :class:`ScaleByAdaHessianState` (an ``is_leaf`` for optax states)."""
  return isinstance(x, ScaleByAdaHessianState)


_FIELDS = frozenset(ScaleByAdaHessianState._fields)
_OPTIONAL = frozenset({"hessian", "update_freq"})
#: What to do about a state restored from a checkpoint without a target (dicts in place of
#: NamedTuples), for the errors that meet one.
RESTORE_FIX = (
  "A checkpoint restored without a target (orbax's checkpointer.restore(path), Flax's "
  "serialization.msgpack_restore or checkpoints.restore_checkpoint(path, None)) holds dicts and "
  "lists in place of the optimizer's NamedTuples and tuples: restore with the abstract state as "
  "target, checkpointer.restore(path, jax.tree.map(ocp.utils.to_shape_dtype_struct, opt_state)), "
  "or with Flax flax.serialization.from_state_dict(opt_state, restored)."
)


#: What to do about an optimizer's state taken from ``nnx.state``, which holds its NamedTuples as
#: dicts too.
NNX_STATE_FIX = (
  "An nnx.State (nnx.state(optimizer), nnx.as_pure of one) holds the optimizer's NamedTuples as "
  "dicts: pass the nnx.Optimizer's own state, optimizer.opt_state (its arrays in Variables), or "
  "nnx.as_pure(optimizer.opt_state) (plain arrays)."
)


def untyped_state_hint(
  opt_state: Any, fields: frozenset[str] = _FIELDS, required: frozenset[str] = _FIELDS - _OPTIONAL
) -> str:
  """``" " + the fix`` if ``opt_state`` holds a state as a plain ``dict`` (a checkpoint restored
  without a target, or an ``nnx.State`` of an ``nnx.Optimizer``), else ``""``: by default an
  AdaHessian state, else a dict with the keys ``required`` and no others than ``fields`` (a
  NamedTuple's field names)."""
  untyped = lambda x: isinstance(x, dict) and required <= set(x) <= fields
  found = any(untyped(x) for x in jax.tree.leaves(opt_state, is_leaf=untyped))
  if not found:
    return ""
  # No checkpoint: the state of an nnx.Optimizer taken with nnx.state.
  return " " + (NNX_STATE_FIX if from_nnx(opt_state) else RESTORE_FIX)


def adahessian_states(opt_state: Any) -> list[ScaleByAdaHessianState]:
  """Every :class:`ScaleByAdaHessianState` inside ``opt_state``, in tree order."""
  return [
    x for x in jax.tree.leaves(opt_state, is_leaf=is_adahessian_state) if is_adahessian_state(x)
  ]


def find_adahessian_state(opt_state: Any) -> ScaleByAdaHessianState:
  """Returns the single :class:`ScaleByAdaHessianState` inside ``opt_state``.

  Works through :func:`optax.chain`, :func:`optax.inject_hyperparams`,
  :func:`optax.masked` and other combinators that keep inner states in their own.

  Args:
    opt_state: An optimizer state containing exactly one AdaHessian state.

  Returns:
    That state.

  Raises:
    ValueError: if there is none or more than one.
  """
  found = adahessian_states(opt_state)
  if len(found) != 1:
    raise ValueError(
      f"expected exactly one ScaleByAdaHessianState in the optimizer state, found {len(found)}."
      + untyped_state_hint(opt_state)
    )
  return found[0]


def map_adahessian_state(
  fn: Callable[[ScaleByAdaHessianState], ScaleByAdaHessianState], opt_state: T
) -> T:
  """Replaces every :class:`ScaleByAdaHessianState` ``s`` inside ``opt_state`` by ``fn(s)``.

  Example, giving every AdaHessian state a new probe key::

    opt_state = adahessian_jax.map_adahessian_state(
        lambda s: s._replace(key=new_key_data), opt_state)

  Args:
    fn: Maps an AdaHessian state to a state of the same structure.
    opt_state: An optax state holding one or more AdaHessian states.

  Returns:
    ``opt_state`` with its AdaHessian states replaced.

  Raises:
    TypeError: if ``fn`` is not a function of one state (e.g. the two arguments swapped), or
      returns anything but a :class:`ScaleByAdaHessianState`, or one whose
      ``count`` is not an integer array of the old one's shape or whose moments (``mu``, ``nu``,
      ``hessian``) are not real floating-point arrays, or one holding a plain array where the
      state of an ``nnx.Optimizer`` (``optimizer.opt_state``) held a Variable, which its
      ``update`` refuses (keep it: ``s._replace(key=s.key.replace(new_key_data))``).
    ValueError: if ``opt_state`` holds no AdaHessian state (another optimizer's, or one whose
      NamedTuples are dicts: restored without a target, an ``nnx.State``), naming the states it
      holds; if ``fn``'s state has a negative ``count``, ``nu`` or ``hessian`` of another
      tree or shapes than its ``mu`` (naming the leaf), or a new ``key`` that is not raw key
      data, one row per probe (``jax.random.key_data(jax.random.split(key, n_samples))``).
  """

  # Python's "'tuple' object is not callable" (the arguments swapped) named neither argument.
  fix = "map_adahessian_state(fn, opt_state) takes the function first: lambda s: s._replace(...)."
  try:
    _validation.callable_with(fn, (opt_state,), {}, "fn(state)", fix)
  except TypeError as e:
    raise TypeError(f"map_adahessian_state: {e}") from None

  # Returned unchanged, the state looked replaced: a new key or update_freq was silently not set.
  check_holds_adahessian_state(opt_state, "map_adahessian_state")

  def replace(x: Any) -> Any:
    if not is_adahessian_state(x):
      return x
    new = fn(x)
    if not is_adahessian_state(new):  # it replaced the state, and update failed much later
      raise TypeError(
        f"map_adahessian_state: fn returned {type(new).__name__} {str(new)[:80]}, not a "
        "ScaleByAdaHessianState: return the state it is given with fields replaced, "
        "s._replace(key=...)."
      )
    check_fields(new, "map_adahessian_state: fn returned a state whose", jnp.shape(x.count))
    _check_still_wrapped(x, new)
    # A replaced key (a typed key, a single one) failed only at the next update. A stacked
    # state's keys have its leading axes: the update inside jax.vmap checks them. An
    # nnx.Optimizer's key stays in its Variable (checked above): its data is checked.
    if new.key is not x.key and jnp.shape(_unwrapped(x.count)) == ():
      check_key_data(_unwrapped(new.key))
    return new

  return jax.tree.map(replace, opt_state, is_leaf=is_adahessian_state)


def check_holds_adahessian_state(opt_state: Any, who: str) -> None:
  """Raises ``ValueError`` unless ``opt_state`` holds a :class:`ScaleByAdaHessianState`, for
  ``who``, which replaces every one it holds: the message names the states it holds instead, and
  the fix for one restored without a target or taken with ``nnx.state``."""
  if adahessian_states(opt_state):
    return
  raise ValueError(
    f"{who}: opt_state holds no AdaHessian state (ScaleByAdaHessianState), so there is nothing "
    f"to replace; it holds {_state_names(opt_state)}. Pass the state of an optimizer built with "
    "adahessian_jax (adahessian, scale_by_adahessian, or a chain holding one)."
    + untyped_state_hint(opt_state)
  )


def check_fused_route_tx(opt_state: Any, caller: str, whose: str, fix: str) -> None:
  """Raises ``ValueError`` for a fused-route helper of a training object (``caller``) whose
  optimizer (``whose``, e.g. "this TrainState's tx") holds no AdaHessian transform: the fused
  pass's own error asks for a state passed after the params, which such a caller never passes.
  A state whose AdaHessian state is a plain dict is left to that error, which gives its fix."""
  if adahessian_states(opt_state) or untyped_state_hint(opt_state):
    return
  raise ValueError(
    f"{caller} is AdaHessian's fused route, but {whose} holds no AdaHessian transform (its "
    f"opt_state has no ScaleByAdaHessianState). {fix}"
  )


def _state_names(opt_state: Any) -> str:
  """The NamedTuple states in ``opt_state`` by class, for an error message (``ScaleByAdamState,
  EmptyState``), or what ``opt_state`` is where it holds none."""
  named = lambda x: isinstance(x, tuple) and hasattr(x, "_fields")
  names = [type(x).__name__ for x in jax.tree.leaves(opt_state, is_leaf=named) if named(x)]
  names = list(dict.fromkeys(names))
  if names:
    return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
  return f"no optax state: it is a {type(opt_state).__name__}"


_STACKED_FIX = (
  "A state with leading axes (jax.vmap(tx.init) over an ensemble or a sweep) holds one state "
  "per member: update it inside jax.vmap, with the state's axis mapped (in_axes=0). A state "
  "replicated for jax.pmap (distributed.replicate) holds one copy per device: update it inside "
  "the pmap-ed step, or take one copy for a jax.jit step, jax.tree.map(lambda x: x[0], state)."
)
#: Why ``nu`` and ``hessian`` (and so ``nu_dtype``) are never float16.
FLOAT16_NU = (
  "float16 cannot hold D² for a curvature over 256 (its largest value is 65504) nor under 2.4e-4"
)

_FIELDS_FIX = (
  "Replace fields with what tx.init makes of them (count the int32 step count, update_freq "
  "None or the refresh interval > 1, mu, nu and hessian floating-point arrays shaped like the "
  "parameters, e.g. nu=jax.tree.map(jnp.zeros_like, s.mu)), or start again from tx.init(params)."
)


def _unwrapped(x: Any) -> Any:
  """``x``'s array where it wraps one (``_validation.wraps_array``), else ``x``."""
  return x.__jax_array__() if _validation.wraps_array(x) else x


def _concrete(value: Any) -> bool:
  """Whether ``value`` (unwrapped) holds known values: not a traced value, nor a
  ``ShapeDtypeStruct`` (an abstract state, a checkpoint's target)."""
  return isinstance(value, int | np.integer | np.ndarray) or (
    isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer)
  )


_CORRUPT_FIX = (
  "A moment restored from a corrupt checkpoint (or set by hand) would reach every later update: "
  "restore an earlier checkpoint, or start again from tx.init(params). Under jax.jit the values "
  "are not known when the step is traced and are not checked."
)


def _bad_entries(field: str, x: Any, xp: Any = np) -> Any:
  """Where a moment is not finite, or, for ``nu``, negative; ``xp`` is ``np`` for an array read
  on the host, ``jnp`` for one reduced where it lives."""
  bad = ~xp.isfinite(x)
  return bad | (x < 0) if field == "nu" else bad


def check_moment_values(state: ScaleByAdaHessianState, what: str) -> None:
  """Raises ``ValueError`` where ``state``'s moments are known (outside ``jit``) and ``mu``,
  ``nu`` or ``hessian`` has a non-finite entry, or ``nu`` a negative one, naming the field, leaf
  and index.

  The update never writes one (it keeps the previous value where an estimate or gradient is not
  finite), so only a restored or hand-made state has one; it was taken silently: a NaN ``mu``
  made that entry's updates NaN for good, an infinite ``nu`` froze it, a negative ``nu`` made
  its denominator NaN. Arrays on the CPU are read in place with NumPy (no program compiled);
  on an accelerator, one reduction per leaf and one transfer of the results. Nothing under
  ``jit`` (traced values are skipped), so the compiled step is unchanged.

  Args:
    state: A :class:`ScaleByAdaHessianState` whose fields :func:`check_fields` accepted.
    what: The start of the error, completed by ``" nu at ['w'] ..."``.
  """
  fields = {"mu": state.mu, "nu": state.nu, "hessian": state.hessian}
  leaves = [
    (field, path, x)
    for field, tree in fields.items()
    for path, x in jax.tree_util.tree_leaves_with_path(jax.tree.map(_unwrapped, tree))
    if _concrete(x)  # and all here: not an array with shards on other processes
    and (not isinstance(x, jax.Array) or x.is_fully_addressable)
  ]
  flags: list[Any] = []
  for field, _, x in leaves:
    if isinstance(x, np.ndarray) or all(d.platform == "cpu" for d in x.devices()):
      flags.append(not np.any(_bad_entries(field, np.asarray(x))))  # a view: no copy, no program
      continue
    with jax.ensure_compile_time_eval():  # a state closed over by a jitted step: run, not staged
      flags.append(~jnp.any(_bad_entries(field, x, jnp)))
  ok = jax.device_get(flags)  # one transfer of the accelerators' flags
  for (field, path, x), good in zip(leaves, ok, strict=True):
    if good:
      continue
    host = np.asarray(x)
    index = tuple(int(i) for i in np.argwhere(_bad_entries(field, host))[0])
    kind = "negative" if np.isfinite(host[index]) else "not finite"
    raise ValueError(
      f"{what} {field} at {_validation.path_str(path)} has {host[index]} at index {index}, "
      f"{kind}"
      + (" (nu holds squared curvatures: >= 0)" if kind == "negative" else "")
      + ". "
      + _CORRUPT_FIX
    )


def check_counters(state: ScaleByAdaHessianState, what: str, count_shape: Any = ()) -> None:
  """Raises unless ``state.count`` (and ``update_freq`` where set) are integer arrays of shape
  ``count_shape`` (``count`` of 32 bits or more), and, where known (outside ``jit``),
  ``count >= 0`` and ``update_freq >= 2``.

  A float count drifted (float32 stops counting at 2**24) and a negative one flipped the sign of
  the bias correction, a step that ran away; ``update_freq`` 0 or 1 made every step a refresh
  step; an 8- or 16-bit count stopped at its maximum, and with it the bias correction and the
  refresh schedule (``update_freq`` steps apart), all silently.

  Args:
    state: A :class:`ScaleByAdaHessianState`.
    what: The start of the error, completed by ``" count ..."`` (e.g. ``"the AdaHessian
      state's"``).
    count_shape: Their shape (``()``; a stacked state's leading axes).
  """
  counters: tuple[tuple[str, Any, int], ...] = (("count", state.count, 0),)
  if state.update_freq is not None:
    counters += (("update_freq", state.update_freq, 2),)
  for name, value, lo in counters:
    dtype = _validation.array_dtype(value)
    shape = None if dtype is None else jnp.shape(value)
    integer = dtype is not None and jnp.issubdtype(dtype, jnp.integer)
    if not integer or shape != tuple(count_shape):
      got = f"is a {type(value).__name__}" if dtype is None else f"has dtype {dtype}, shape {shape}"
      error = TypeError if not integer else ValueError
      stacked = integer and shape is not None and len(shape) > len(tuple(count_shape))
      raise error(
        f"{what} {name} {got}, not an integer array of shape {tuple(count_shape)}. "
        + (_STACKED_FIX if stacked else _FIELDS_FIX)
      )
    if name == "count" and jnp.iinfo(dtype).bits < 32:
      raise TypeError(
        f"{what} count has dtype {dtype}, fewer than 32 bits: it would stop at "
        f"{jnp.iinfo(dtype).max} (optax.safe_increment), freezing the bias correction and the "
        "refresh schedule there. Cast it, s._replace(count=s.count.astype(jnp.int32)), or start "
        "again from tx.init(params)."
      )
    value = _unwrapped(value)
    if shape == () and _concrete(value) and int(value) < lo:
      raise ValueError(f"{what} {name} is {int(value)}, not >= {lo}. " + _FIELDS_FIX)


def check_fields(state: ScaleByAdaHessianState, what: str, count_shape: Any = ()) -> None:
  """Raises unless ``state``'s fields are of the kinds ``init`` makes: :func:`check_counters`,
  and ``mu``, ``nu`` and ``hessian`` real floating-point arrays of 16 bits or more (``nu`` and
  ``hessian`` not float16, as ``nu_dtype``), ``nu`` and ``hessian`` with ``mu``'s tree, all
  three of the same shapes, ``hessian`` of ``nu``'s dtypes.

  The update broadcast a ``nu`` of shape ``(1, n)`` to its ``mu``'s ``(m, n)`` and kept integer
  moments (truncating them every step), without an error. A ``str`` leaf (``"float32"``, read as
  the dtype it names) was blamed for a shape ``()``; 8-bit moments, and a lazy state's ``nu`` and
  ``hessian`` of different dtypes (under ``jit``), failed inside JAX, naming no field.

  Args:
    state: A :class:`ScaleByAdaHessianState`.
    what: The start of the error, completed by ``" nu at ['w'] ..."``.
    count_shape: The shape of ``count`` (``()``; a stacked state's leading axes).

  Raises:
    TypeError: for a counter or moment of the wrong dtype, a moment leaf that is no array, or a
      ``hessian`` of another dtype than its ``nu``.
    ValueError: for a counter of another shape or out of range, a ``nu`` or ``hessian`` of
      another tree than ``mu``, or moments of different shapes, naming the leaf and each shape.
  """
  check_counters(state, what, count_shape)
  fields = {f: getattr(state, f) for f in ("mu", "nu", "hessian")}
  if fields["hessian"] is None:
    del fields["hessian"]
  for field, tree in fields.items():
    if field != "mu" and jax.tree.structure(tree) != jax.tree.structure(state.mu):
      where = _validation.tree_difference(tree, state.mu, "its mu")
      raise ValueError(f"{what} {field} is not of its mu's tree: {where}. " + _FIELDS_FIX)
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
      dtype, at = _validation.array_dtype(x), f"{what} {field} at {_validation.path_str(path)}"
      if dtype is None:
        raise TypeError(f"{at} is {type(x).__name__} {x!r}, not an array. " + _FIELDS_FIX)
      if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{at} has dtype {dtype}. " + _FIELDS_FIX)
      if _validation.narrow_float(dtype):
        raise TypeError(f"{at} has dtype {dtype}: {_validation.NARROW_FLOAT}. " + _FIELDS_FIX)
      if field != "mu" and dtype == jnp.float16:  # as nu_dtype=float16 is refused
        raise TypeError(
          f"{at} has dtype float16: {FLOAT16_NU}. Cast nu and hessian to float32, "
          "s._replace(nu=optax.tree.cast(s.nu, jnp.float32), hessian=optax.tree.cast(s.hessian, "
          "jnp.float32)), or start again from tx.init(params)."
        )
  # Every field's shape, not each against mu's: a mu alone of another shape blamed nu.
  leaves = [jax.tree_util.tree_leaves_with_path(tree) for tree in fields.values()]
  for at in zip(*leaves, strict=True):
    shapes = [jnp.shape(x) for _, x in at]
    if len(set(shapes)) > 1:
      listed = ", ".join(f"{f} {s}" for f, s in zip(fields, shapes, strict=True))
      raise ValueError(
        f"{what} moments differ in shape at {_validation.path_str(at[0][0])}: {listed} (the "
        "update would broadcast them). " + _FIELDS_FIX
      )
    # init makes both in nu_dtype; under jit the update's lax.cond refused branches of two dtypes.
    if len(at) == 3 and jnp.result_type(at[1][1]) != jnp.result_type(at[2][1]):
      raise TypeError(
        f"{what} hessian at {_validation.path_str(at[0][0])} has dtype "
        f"{jnp.result_type(at[2][1])}, but its nu {jnp.result_type(at[1][1])}: init makes both "
        "in nu_dtype. Cast them alike, s._replace(nu=optax.tree.cast(s.nu, dtype), "
        "hessian=optax.tree.cast(s.hessian, dtype)), or start again from tx.init(params)."
      )


def placed_like_params(tree: T, params: Any) -> T:
  """``tree`` with its uncommitted arrays committed, replicated, to the devices of ``params``.

  ``jnp.zeros_like`` gives the moments the parameters' placement, but a step count or a key made
  with ``jnp.zeros`` is uncommitted. ``jax.jit`` keys its cache on whether an argument is
  committed, and its outputs are committed where any input was: with committed parameters
  (``jax.device_put(params, device)``, sharded arrays, a restored checkpoint) the whole training
  step compiled twice, for the state from ``init`` and again for the one the step returns. A no-op
  where no parameter is a committed concrete array (e.g. ``init`` traced under ``jax.jit``), and
  where the parameters span other processes' devices or several sets of devices.
  """
  shardings = [
    x.sharding
    for x in jax.tree.leaves(params)
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and x.committed
  ]
  if not shardings or not shardings[0].is_fully_addressable:
    return tree
  first = shardings[0]
  if any(s.device_set != first.device_set for s in shardings):
    return tree
  if isinstance(first, jax.sharding.NamedSharding):
    target: Any = jax.sharding.NamedSharding(first.mesh, jax.sharding.PartitionSpec())
  elif len(first.device_set) == 1:  # the device: SingleDeviceSharding(...) warns on jax >= 0.12
    target = next(iter(first.device_set))
  else:
    return tree

  def place(x: Any) -> Any:
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and not x.committed:
      return jax.device_put(x, target)
    return x

  return jax.tree.map(place, tree)


def _check_still_wrapped(old: ScaleByAdaHessianState, new: ScaleByAdaHessianState) -> None:
  """Raises ``TypeError`` where ``new`` (``map_adahessian_state``'s ``fn`` of ``old``) holds a
  plain array where ``old`` held one in a Variable: the state of an ``nnx.Optimizer``
  (``optimizer.opt_state``), whose ``update`` then failed in Flax with "Cannot set key 'key' on
  immutable node of type ScaleByAdaHessianState", naming no fix."""
  leaves = lambda tree: jax.tree.leaves(tree, is_leaf=_validation.wraps_array)
  wrapped = lambda tree: [_validation.wraps_array(x) for x in leaves(tree)]
  for field in ScaleByAdaHessianState._fields:
    before, after = getattr(old, field), getattr(new, field)
    if after is before:
      continue
    if any(wrapped(before)) and not all(wrapped(after)):
      kind = type(leaves(before)[0]).__name__
      raise TypeError(
        f"map_adahessian_state: fn returned a state whose {field} holds a plain array where the "
        f"given state's holds a Variable ({kind}): the state of an nnx.Optimizer "
        "(optimizer.opt_state), whose update refuses plain arrays there. Keep the Variables, "
        f"lambda s: s._replace({field}=s.{field}.replace(new_value)) (jax.tree.map over mu or "
        "nu keeps them), or set the values in place: "
        f"adahessian_jax.find_adahessian_state(optimizer.opt_state).{field}[...] = new_value."
      )


def _check_is_state(state: Any, call: str) -> None:
  """Raises ``TypeError`` unless ``state`` is a :class:`ScaleByAdaHessianState` (not, e.g., the
  whole optimizer state of :func:`adahessian_jax.adahessian`, a tuple around it)."""
  if not is_adahessian_state(state):
    raise TypeError(
      f"{call} takes the AdaHessian state itself, got {type(state).__name__}: pass "
      "adahessian_jax.find_adahessian_state(opt_state)." + untyped_state_hint(state)
    )


def new_keys_fix(key: str) -> str:
  """The code, for an error message, that gives an optimizer state new probe keys split from
  ``key`` (the expression of one PRNG key, e.g. ``"jax.random.key(seed)"``)."""
  return (
    "adahessian_jax.map_adahessian_state(lambda s: s._replace(key=jax.random.key_data("
    f"jax.random.split({key}, n_samples))), opt_state)"
  )


_NEW_KEYS = new_keys_fix("jax.random.key(seed)")


def check_key_data(key: Any) -> None:
  """Raises ``ValueError`` unless the state's ``key`` field is raw key data, one row per probe.

  ``map_adahessian_state(lambda s: s._replace(key=...), opt_state)`` lets a user put in a typed
  key (``jax.random.key``), a single key or one without the probe axis: they failed deep inside
  JAX, or a single raw key of shape ``(2,)`` read as two probes' keys. Raw data of another
  size per key than the default PRNG implementation's (a state made under another
  ``jax_default_prng_impl``) failed in JAX's ``wrap_key_data`` without naming the state.
  The state of an ``nnx.Optimizer`` (``optimizer.opt_state``, its arrays in ``nnx.OptArray``
  Variables) failed there too, with JAX's "Triggering __jax_array__() during abstractification".
  """
  if _validation.wraps_array(key):
    raise ValueError(
      f"the AdaHessian state's key is a {type(key).__module__}.{type(key).__qualname__} that "
      "wraps the key data, not the array itself: the state of an nnx.Optimizer "
      "(optimizer.opt_state holds its arrays in Variables), which JAX's PRNG functions refuse. "
      "Pass the pure state, nnx.as_pure(optimizer.opt_state), or use "
      "adahessian_jax.nnx.value_grad_and_hessian_diag(loss_fn, model, optimizer, ...)."
    )
  dtype = _validation.array_dtype(key)  # None for a str, which jnp.result_type parsed, or None
  typed = dtype is not None and _keys.is_typed(dtype)
  if dtype == jnp.uint32 and jnp.ndim(key) == 2:
    size = _keys.default_key_size()
    if jnp.shape(key)[1] == size:
      return
    # A checkpoint resumed under another jax_default_prng_impl: JAX's wrap_key_data failed with
    # "invalid PRNG key data" and no word of the state or of the fix.
    raise ValueError(
      f"the AdaHessian state's key holds key data of {jnp.shape(key)[1]} words per probe (shape "
      f"{jnp.shape(key)}), but keys of JAX's default PRNG implementation "
      f"(jax_default_prng_impl={str(jax.random.key_impl(jax.random.key(0)))!r}) have {size}: the "
      "state was "
      "made under another implementation (threefry2x32 keys have 2 words, rbg and unsafe_rbg "
      "keys 4), e.g. a checkpoint resumed with another JAX_DEFAULT_PRNG_IMPL. Resume under the "
      "implementation it was made with (jax.config.update('jax_default_prng_impl', ...)), or "
      f"give the state new probe keys: {_NEW_KEYS}."
    )
  kind = "typed PRNG keys" if typed else f"an array of dtype {dtype}"
  what = f"{type(key).__name__} {key!r}" if dtype is None else f"{kind} of shape {jnp.shape(key)}"
  stacked = dtype == jnp.uint32 and jnp.ndim(key) > 2
  fix = (
    _STACKED_FIX
    if stacked
    else "Replace it with jax.random.key_data(jax.random.split(key, n_samples))."
  )
  raise ValueError(
    f"the AdaHessian state's key must be raw key data, one row per probe (shape (n_samples, "
    f"key size), uint32), got {what}. {fix}"
  )


def probe_keys(state: ScaleByAdaHessianState, axis_name: Any = None) -> tuple[jax.Array, jax.Array]:
  """The keys of this step's probes, and the state's key data after a refresh.

  Args:
    state: A :class:`ScaleByAdaHessianState`.
    axis_name: For independent probes per device: the mapped axis whose index
      is folded into the keys (inside ``pmap``/``shard_map``). ``None``: the
      same probes on every device. The returned key data never depends on it,
      so the state stays replicated.

  Returns:
    ``(keys, next_key_data)``: a 1-D array of ``n_samples`` PRNG keys for the
    probes, and the raw key data to store if this step refreshes.

  Raises:
    TypeError: for a ``state`` that is not a :class:`ScaleByAdaHessianState`.
    ValueError: for a ``key`` field that is not raw key data of shape ``(n_samples, key size)``,
      the key size of JAX's default PRNG implementation.
  """
  _check_is_state(state, "probe_keys")
  check_key_data(state.key)
  keys = jax.random.wrap_key_data(state.key)
  next_key = jax.random.key_data(jax.vmap(lambda k: jax.random.split(k)[0])(keys))
  source = state.key if axis_name is None else fold_in_axis_index(state.key, axis_name)
  probes = jax.vmap(lambda k: jax.random.split(k)[1])(jax.random.wrap_key_data(source))
  return probes, next_key


def is_refresh_step(state: ScaleByAdaHessianState, refresh: bool | None = None) -> jax.Array | bool:
  """Whether the next update refreshes the Hessian (steps 1, 1+k, 1+2k, ...).

  Args:
    state: A :class:`ScaleByAdaHessianState`.
    refresh: The caller's own decision, a Python (or NumPy) ``bool`` taken on the host
      (e.g. ``step % update_freq == 0`` in a loop that runs two compiled step
      programs); it must follow the state's schedule, which is checked where
      the state is concrete. ``None``: read the schedule from the state.

  Returns:
    ``True`` when every step refreshes; otherwise a Python ``bool`` when the
    decision is static or the state is concrete (outside ``jit``), else a
    traced boolean scalar.

  Raises:
    ValueError: for ``refresh=False`` with ``update_freq == 1``, a
      ``refresh`` that contradicts a concrete state's schedule, or a state's ``count`` that is
      negative or ``update_freq`` below 2 (or either not a scalar).
    TypeError: for a ``refresh`` that is not a Python or NumPy bool, a ``state`` that is not a
      :class:`ScaleByAdaHessianState`, or one whose ``count`` or ``update_freq`` is not an integer,
      or, with ``update_freq`` set, an abstract ``jax.ShapeDtypeStruct`` (``jax.eval_shape``).
  """
  _check_is_state(state, "is_refresh_step")
  check_counters(state, "is_refresh_step: the AdaHessian state's")
  if isinstance(refresh, np.bool_):  # step % k == 0 on a NumPy step counter
    refresh = bool(refresh)
  if refresh is not None and not isinstance(refresh, bool):
    raise TypeError(
      "refresh must be a Python (or NumPy) bool decided on the host (one compiled program per "
      f"value), got {refresh!r}. Make it a static argument of the jitted step "
      "(jax.jit(step, static_argnames='refresh')) and pass bool(step % update_freq == 0) from "
      "a Python step counter, or leave it None to follow the state's schedule under jit."
    )
  if state.update_freq is None:
    if refresh is False:
      raise ValueError("refresh=False needs a lazy state (update_freq > 1); every step refreshes.")
    return True
  abstract = [
    n for n in ("count", "update_freq") if isinstance(getattr(state, n), jax.ShapeDtypeStruct)
  ]
  if abstract:  # the schedule needs values: % failed with "unsupported operand type(s)"
    raise TypeError(
      f"is_refresh_step reads the step from the state's values, concrete or traced (inside "
      f"jax.jit), but its {abstract[0]} is a jax.ShapeDtypeStruct: an abstract state, e.g. from "
      "jax.eval_shape(tx.init, params) or a checkpoint's restore target. Pass the state "
      "tx.init returns or the restored one."
    )
  scheduled = state.count % state.update_freq == 0
  if isinstance(scheduled, jax.core.Tracer):
    return scheduled if refresh is None else refresh
  if refresh is not None and refresh != bool(scheduled):
    raise ValueError(
      f"refresh={refresh} at step {int(state.count)}, but with update_freq="
      f"{int(state.update_freq)} the Hessian refreshes when step % update_freq == 0."
    )
  return bool(scheduled)


def on_refresh(refresh: jax.Array | bool, fresh: Callable[[], T], stale: Callable[[], T]) -> T:
  """``fresh()`` on refresh steps, ``stale()`` on the others: the refresh choice, written once.

  A concrete ``refresh`` (every step refreshes, or the state is known outside
  ``jit``) runs only the branch needed; a traced one uses ``lax.cond``, so the
  Hessian-vector product runs only on refresh steps under ``jit`` too.

  Args:
    refresh: From :func:`is_refresh_step`.
    fresh: Computes the value on a refresh step.
    stale: Computes the value on the other steps.

  Returns:
    The chosen branch's value.
  """
  if isinstance(refresh, jax.core.Tracer):
    return jax.lax.cond(refresh, fresh, stale)
  return fresh() if refresh else stale()


def moment_steps(count: Any, update_freq: int) -> Any:
  """The steps ``nu`` has averaged after ``count >= 1`` updates, for its bias correction
  ``1 - b2**steps``: ``count`` rounded up to a multiple of ``update_freq``.

  With ``lazy_moment="refresh"`` ``nu`` moves on refresh steps only, by ``b2**update_freq`` for
  the ``update_freq`` steps each refresh stands for; with ``update_freq=1`` this is ``count``.

  Args:
    count: The step count after the update, a Python int or an integer array.
    update_freq: The refresh interval ``k >= 1``.

  Returns:
    ``update_freq · ceil(count / update_freq)``, of the type of ``count``.
  """
  return update_freq * ((count - 1) // update_freq + 1)


def refresh_key(
  state: ScaleByAdaHessianState, refresh: jax.Array | bool, next_key: jax.Array
) -> jax.Array:
  """The key data to store: ``next_key`` on refresh steps, the current one otherwise."""
  if isinstance(refresh, jax.core.Tracer):
    return jnp.where(refresh, next_key, state.key)
  return next_key if refresh else state.key
