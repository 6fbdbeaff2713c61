"""Checks of arguments, shared by the optimizer and :mod:`adahessian_jax.hessian`.

One wording for each kind of argument, naming it and the bad value:

* a real number: ``"<name> must be a finite real number in [lo, hi), got <value>."``;
* a count: ``"<name> must be an integer in [lo, hi], got <value>."``;
* a pytree of parameters: ``"<what> must be real floating-point arrays, but the leaf at <path>
  ..."``.

A hyperparameter that is traced (injected by ``optax.inject_hyperparams`` inside ``jit``)
cannot be checked: :func:`hyperparameter` lets it through, as it was checked when the
optimizer was first built; the other checks, counts above all (they set shapes), refuse one.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Mapping
from typing import Any

import jax
import jax.core
import jax.numpy as jnp
import numpy as np

from adahessian_jax import layout

#: The fix for an argument that ``optax.inject_hyperparams`` traced (a count, a dtype, rules): it
#: must be static.
STATIC_FIX = "With optax.inject_hyperparams pass static_args=adahessian_jax.STATIC_ARGS."


def real_dtype(dtype: Any) -> bool:
  """Whether ``dtype`` holds real numbers: a floating or integer dtype (not bool or complex)."""
  return jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)


def real_scalar(value: Any) -> float | None:
  """``float(value)`` for a real scalar (a 0-d real array too), ``None`` for anything else.

  Bools, strings, complex numbers and arrays with more than one entry are not real scalars.
  """
  if isinstance(value, bool | np.bool_ | str | bytes):
    return None
  try:
    arr = np.asarray(value)
  except (TypeError, ValueError):
    return None
  if arr.shape != () or not real_dtype(arr.dtype):
    return None
  return float(arr)


def _traced(name: str, value: Any, must: str) -> ValueError:
  return ValueError(
    f"{name} must be {must}, got a traced value ({value!r}): pass a concrete value, computed "
    "outside jax.jit."
  )


def interval(
  name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False
) -> float:
  """Returns ``value`` as a ``float`` if it is a real number in the interval, else raises.

  The interval is ``[lo, hi]``, open at an end whose flag is set. ``hi`` may be ``inf``:
  ``inf`` itself is then allowed only if that end is closed. NaN never is.

  Args:
    name: The argument's name, as the caller spells it.
    value: The value given: a Python number, a NumPy scalar or a 0-d array.
    lo: Lower end.
    hi: Upper end.
    lo_open: Whether ``lo`` itself is excluded.
    hi_open: Whether ``hi`` itself is excluded.

  Returns:
    ``float(value)``.

  Raises:
    ValueError: naming ``name`` and the value, for a value outside the interval, NaN, a bool,
      a string, a complex number, an array with more than one entry or a traced value.
  """
  if isinstance(value, jax.core.Tracer):
    raise _traced(name, value, "a concrete real number")
  v = real_scalar(value)
  ok = (
    v is not None
    and (lo < v if lo_open else lo <= v)
    and (v < hi if hi_open else v <= hi)
    and not np.isnan(v)
  )
  if v is None or not ok:
    left, right = "(" if lo_open else "[", ")" if hi_open else "]"
    if hi == np.inf:
      where = f"{'>' if lo_open else '>='} {lo}" + ("" if hi_open else " (inf allowed)")
    else:
      where = f"in {left}{lo}, {hi}{right}"
    kind = "a finite real number" if hi_open or hi != np.inf else "a real number"
    shape = np.shape(value) if hasattr(value, "shape") else ()
    what = f" (an array of shape {shape})" if shape != () else ""
    raise ValueError(f"{name} must be {kind} {where}, got {value!r}{what}.")
  return v


def hyperparameter(
  name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False
) -> None:
  """:func:`interval`'s check of an optimizer hyperparameter, which lets a traced value through.

  ``optax.inject_hyperparams`` traces the values it injects inside ``jit``; their values cannot
  be checked there, and were checked when the optimizer was first built. Their shape and dtype
  can: an array set in the state between steps (``jnp.asarray([0.9])``) broadcast a scalar
  parameter, and its moments, to its shape, without an error.
  """
  if isinstance(value, jax.core.Tracer):
    if value.shape != () or not real_dtype(value.dtype):
      raise ValueError(
        f"{name} must be a real scalar, got a traced array of shape {value.shape} and dtype "
        f"{value.dtype}: a hyperparameter set in optax.inject_hyperparams's state must be one "
        f"value, e.g. opt_state.hyperparams[{name!r}] = jnp.asarray(v, jnp.float32)."
      )
    return
  try:
    interval(name, value, lo, hi, lo_open=lo_open, hi_open=hi_open)
  except ValueError as e:
    dtype = getattr(value, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating) or jnp.finfo(dtype).bits >= 32:
      raise
    # e.g. b2=0.999 rounds to 1.0 in bfloat16, the dtype inject_hyperparams gives it by default.
    raise ValueError(
      f"{e} optax.inject_hyperparams casts hyperparameters to the params' dtype ({dtype}), "
      "which may round them out of range: pass hyperparam_dtype=jnp.float32."
    ) from None


def positive(name: str, value: Any, allow_zero: bool = False) -> float:
  """Returns ``value`` as a ``float`` if it is finite and ``> 0`` (``>= 0`` if ``allow_zero``).

  Raises:
    ValueError: as :func:`interval` does.
  """
  return interval(name, value, 0.0, np.inf, lo_open=not allow_zero, hi_open=True)


def relative_tolerance(name: str, value: Any) -> float:
  """Returns ``value`` as a ``float`` if it is in ``(0, 1)``: the check of every analysis's
  relative tolerance (``tol`` of the eigenvalue solvers, ``track_curvature``, ``layer_breakdown``).

  One of 1 or more is met by a first Ritz value: ``tol=1`` runs stopped after one product,
  ``converged``, 43 % below a flat spectrum's top eigenvalue, or at a negative value for a top
  eigenvalue of 1 above a bulk reaching -3.

  Raises:
    ValueError: naming ``name`` and the value, as :func:`interval` does, and the fix.
  """
  try:
    return interval(name, value, 0.0, 1.0, lo_open=True, hi_open=True)
  except ValueError as e:
    v = real_scalar(value)
    if v is None or not v >= 1:
      raise
    raise ValueError(
      f"{e} It is relative to the estimated value, and one of 1 or more accepts an error as large "
      f"as the value itself: pass a small fraction, e.g. {name}=1e-4."
    ) from None


def flag(name: str, value: Any) -> bool:
  """Returns ``value`` as a ``bool`` if it is one (a Python or NumPy bool), else raises.

  A string from a config (``"False"``) or a number is truthy, and was read as ``True``.

  Args:
    name: The argument's name, as the caller spells it.
    value: The value given.

  Returns:
    ``bool(value)``.

  Raises:
    ValueError: for anything but a Python or NumPy bool.
  """
  if not isinstance(value, bool | np.bool_):
    raise ValueError(f"{name} must be True or False, got {value!r}.")
  return bool(value)


def count(name: str, value: Any, lo: int = 1, hi: int | None = None, *, fix: str = "") -> int:
  """Returns ``value`` as an ``int`` if it is an integer in ``[lo, hi]``, else raises.

  Args:
    name: The argument's name, as the caller spells it.
    value: The value given: a Python or NumPy integer, or a 0-d integer array.
    lo: Smallest allowed value.
    hi: Largest allowed value (``None``: no upper bound).
    fix: A sentence appended to the error for a traced value, saying how to pass a
      concrete one.

  Returns:
    ``int(value)``.

  Raises:
    ValueError: for a traced value (a count sets shapes and control flow), a bool, a
      non-integer (``2.5``, ``"3"``, an integer array that is not a scalar) or a value
      outside the range.
  """
  if isinstance(value, jax.core.Tracer):
    err = _traced(name, value, "a concrete Python int (it sets array shapes and control flow)")
    raise ValueError(f"{err} {fix}".rstrip()) from None
  ok = not isinstance(value, bool | np.bool_) and isinstance(
    value, numbers.Integral | np.integer | np.ndarray | jax.Array
  )
  if ok:  # dtype and shape before np.asarray, which refuses typed PRNG keys (seed=key(0))
    dtype, shape = jnp.result_type(value), getattr(value, "shape", ())
    ok = shape == () and jnp.issubdtype(dtype, jnp.integer) and dtype != np.bool_
  if ok:
    ok = int(value) >= lo and (hi is None or int(value) <= hi)
  if not ok:
    where = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
    raise ValueError(f"{name} must be an integer {where}, got {value!r}.")
  return int(value)


#: How an error names the one leaf of a tree that is a single array (its path is empty).
ROOT = "the root (the tree is a single array)"


def path_str(path: Any) -> str:
  """``path`` as :func:`jax.tree_util.keystr` writes it (``['linear']['w']``), or :data:`ROOT`
  for the empty path of a tree that is a single array, which ``keystr`` writes as ``''``.

  Args:
    path: A key path, from :func:`jax.tree_util.tree_leaves_with_path` or the like.

  Returns:
    The text for an error message's "the leaf at ...".
  """
  return jax.tree_util.keystr(path) or ROOT


def prefix_mismatch(entries: Any, paths: Any) -> tuple[Any, Any]:
  """Where a tree whose leaves are at ``entries`` fails to be a pytree prefix of a tree whose
  leaves are at ``paths`` (key paths, as :func:`jax.tree_util.tree_leaves_with_path` gives them),
  for an error that names the entry or leaf: a structure dump is a screenful for a model.

  Args:
    entries: The prefix's leaf paths, in order.
    paths: The tree's leaf paths, in order.

  Returns:
    ``(extra, missing)``: the first entry that is no node of the tree (``None`` if there is
    none), e.g. inside one of its leaves or where it has nothing; the first leaf path under no
    entry (``None`` if every leaf is covered).
  """
  nodes = {p[:depth] for p in paths for depth in range(len(p) + 1)}
  given = set(entries)
  extra = next((e for e in entries if e not in nodes), None)
  covered = lambda p: any(p[:depth] in given for depth in range(len(p) + 1))
  missing = next((p for p in paths if not covered(p)), None)
  return extra, missing


def wraps_array(x: Any) -> bool:
  """Whether ``x`` wraps an array without being one (an NNX Variable: ``nnx.state(model)``'s
  leaves, an ``nnx.Optimizer``'s state)."""
  return hasattr(x, "__jax_array__") and not isinstance(x, jax.Array)


def array_dtype(leaf: Any) -> Any:
  """The dtype of ``leaf`` as JAX reads an array (a Python or NumPy scalar too), or ``None`` for
  a leaf that is no array: the rule of every check that refuses such leaves, naming them.

  :func:`jax.numpy.result_type` reads a ``str`` (``"float32"``, ``"f"``), a scalar type
  (``jnp.float32``) or a dtype as the dtype it names, and ``None`` (a field left empty) as the
  default float dtype: those are no arrays.

  Args:
    leaf: A pytree leaf.

  Returns:
    Its dtype, or ``None``.
  """
  if leaf is None or isinstance(leaf, str | bytes | type | np.dtype):
    return None
  try:
    return jnp.result_type(leaf)
  except TypeError:
    return None


# Flax's collections that hold state, not parameters: BatchNorm's (and SpectralNorm's) running
# statistics, a decoder's cache and Module.sow's intermediates.
_FLAX_STATE_COLLECTIONS = ("batch_stats", "cache", "intermediates")


def flax_state_collections(tree: Any) -> list[str]:
  """The Flax state collections ``tree`` holds beside ``"params"``: a whole Linen variables dict
  (``model.init``'s), not its parameters.

  Args:
    tree: A pytree given as parameters.

  Returns:
    The names of those collections among its top-level keys (``["batch_stats"]``); empty unless
    ``tree`` is a mapping with a ``"params"`` key.
  """
  if not isinstance(tree, Mapping) or "params" not in tree:
    return []
  return [name for name in _FLAX_STATE_COLLECTIONS if name in tree]


#: Why a real floating dtype of fewer than 16 bits (:func:`narrow_float`) is refused.
NARROW_FLOAT = (
  "8-bit floats hold neither the curvature nor small updates (and JAX promotes them to no other "
  "dtype)"
)


def narrow_float(dtype: Any) -> bool:
  """Whether ``dtype`` is a floating dtype of fewer than 16 bits (``float8_e4m3fn``, ...), which
  parameters, moments and estimates must not have (:data:`NARROW_FLOAT`): JAX's sign, sqrt and
  Hessian products stop at 16 bits."""
  return jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 16


#: How an Equinox model, whose activation functions and other fields are leaves, gives its arrays.
_EQUINOX_SPLIT = (
  "An Equinox model: params, static = eqx.partition(model, eqx.is_inexact_array), and "
  "eqx.combine(params, static) in the loss."
)


def float_leaves(tree: Any, what: str, fix: str) -> None:
  """Raises ``TypeError`` naming the first leaf of ``tree`` that is not a real floating array
  of 16 bits or more.

  Args:
    tree: The pytree to check (parameters).
    what: What the leaves are, as the caller names them (``"the params"``).
    fix: A sentence appended to the error, saying what to do instead (followed, for a leaf
      that is not a floating array, by how an Equinox model splits its arrays off).
  """
  # A training state (Flax's TrainState) given whole: its step counter was the leaf named.
  if hasattr(tree, "params") and hasattr(tree, "opt_state"):
    fix = f"It is a {type(tree).__name__}, a training state: pass its .params. {fix}"
  # Canonical paths (layout.leaves): an NNX variable's ".value" step is no part of the leaf's.
  for info in layout.leaves(tree):
    leaf, where = info.leaf, path_str(info.path)
    must = f"{what} must be real floating-point arrays, but the leaf at {where}"
    dtype = array_dtype(leaf)
    if dtype is None:
      raise TypeError(f"{must} is {type(leaf).__name__} {leaf!r}. {fix} {_EQUINOX_SPLIT}")
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(f"{must} has dtype {dtype}. {fix} {_EQUINOX_SPLIT}")
    if narrow_float(dtype):
      raise TypeError(
        f"{what} must be floating-point arrays of 16 bits or more, but the leaf at {where} has "
        f"dtype {dtype}: {NARROW_FLOAT}. "
        "Keep parameters in float32 or bfloat16 (8-bit formats are for matmul inputs, scaled)."
      )


def short_repr(x: Any) -> str:
  """``repr(x)``, cut to 80 characters for an error message (a whole state or model is pages)."""
  text = repr(x)
  return text if len(text) <= 80 else text[:77] + "..."


def callable_with(fn: Any, args: tuple, kwargs: dict, call: str, fix: str) -> None:
  """Raises ``TypeError`` if ``fn`` is not callable or its signature cannot take ``fn(*args,
  **kwargs)``.

  Python's own error, raised from deep inside a trace, names neither the argument the function
  was given as nor how to fix the call. A function without a signature (a builtin) is let through;
  a decorated one is checked against the decorator's own arguments (:func:`_signature`).

  Args:
    fn: The user's function.
    args: The positional arguments it will be called with.
    kwargs: The keyword arguments it will be called with.
    call: How the function is called, e.g. ``"value_fn(params)"``.
    fix: A sentence appended to the error, saying what to do instead.
  """
  if not callable(fn):  # Python's "'str' object is not callable" names no argument
    got = short_repr(fn)  # e.g. a whole state
    raise TypeError(f"{call.split('(')[0]} must be a function, called as {call}; got {got}. {fix}")
  signature = _signature(fn)
  if signature is None:
    return
  try:
    signature.bind(*args, **kwargs)
  except TypeError as e:
    raise TypeError(
      f"{call.split('(')[0]} is called as {call}, but its signature is {signature}: {e}. {fix}"
    ) from None


def _signature(fn: Any) -> inspect.Signature | None:
  """``fn``'s signature, ``None`` if it has none (a builtin): a wrapper's own (a decorator that
  ``functools.wraps`` a function of other arguments, ``inner(model, batch)`` around ``f(model, x,
  y)``), unless it only passes its arguments on (``*args, **kwargs``, as ``jax.checkpoint``'s) or
  has none of its own (``nnx.jit``'s); then the wrapped function's."""
  try:
    signature = inspect.signature(fn)
  except (TypeError, ValueError):
    return None
  try:
    own = inspect.signature(fn, follow_wrapped=False)
  except (TypeError, ValueError):
    return signature
  passes_on = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
  return signature if all(p.kind in passes_on for p in own.parameters.values()) else own


def canonical_leaf_paths(tree: Any) -> list[str]:
  """The paths of ``tree``'s leaves as :func:`path_str` writes them, without a Linen box's or NNX
  variable's own ``.value`` step (:func:`adahessian_jax.layout.leaves`), in ``jax.tree.leaves``
  order: how an error names a leaf, as the layouts and the Hessian tools do."""
  return [path_str(x.path) for x in layout.leaves(tree)]


def leaf_paths(tree: Any) -> list[str]:
  """The paths of ``tree``'s leaves as :func:`jax.tree_util.keystr` writes them, in order."""
  return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


def unshared_leaf_paths(tree: Any, ref: Any) -> tuple[list[str], list[str]]:
  """The leaf paths of ``tree`` that ``ref`` has not, and those of ``ref`` that ``tree`` has not
  (both in tree order): where two trees that should match differ, for an error to name."""
  mine, theirs = leaf_paths(tree), leaf_paths(ref)
  mine_set, theirs_set = set(mine), set(theirs)
  return [p for p in mine if p not in theirs_set], [p for p in theirs if p not in mine_set]


def _boxed(tree: Any) -> tuple[list[str], set[str]]:
  """The canonical leaf paths of ``tree`` (a box's ``.value`` step removed), and those of the
  leaves that sit in a Flax box or NNX variable."""
  canonical = [jax.tree_util.keystr(x.path) for x in layout.leaves(tree)]
  return canonical, {c for c, p in zip(canonical, leaf_paths(tree), strict=True) if c != p}


def tree_difference(tree: Any, ref: Any, ref_name: str) -> str:
  """Where ``tree`` first differs from ``ref`` (called ``ref_name``), named by a leaf path where
  one has a leaf the other has not (a model's whole tree structure is too long to read), or
  where one has a Flax box (or NNX variable) around a leaf and the other a plain array."""
  extra, missing = unshared_leaf_paths(tree, ref)
  (mine, mine_boxed), (theirs, theirs_boxed) = _boxed(tree), _boxed(ref)
  path = next((p for p in mine if (p in mine_boxed) != (p in theirs_boxed)), None)
  if (extra or missing) and mine == theirs and path is not None:  # boxed in one tree only
    box = "a Flax metadata box (nn.Partitioned, nn.LogicallyPartitioned) or NNX variable"
    return (
      f"it has a plain array at {path}, where {ref_name} has {box}"
      if path in theirs_boxed
      else f"it has {box} at {path}, where {ref_name} has a plain array"
    ) + " (box both or neither: nn.unbox, nnx.as_pure)"
  if extra:
    return f"it has a leaf at {extra[0] or ROOT}, where {ref_name} has none"
  if missing:
    return f"it has no leaf at {missing[0] or ROOT}, where {ref_name} has one"
  if type(tree) is not type(ref) and mine == theirs:  # e.g. a dict for an nnx.State
    return (
      f"it has the same leaf paths, but is a {type(tree).__qualname__} where {ref_name} is a "
      f"{type(ref).__qualname__} (jax.tree.unflatten(jax.tree.structure(params), "
      "jax.tree.leaves(tree)) rebuilds it in the params' containers)"
    )
  return f"its nodes differ, {jax.tree.structure(tree)} against {jax.tree.structure(ref)}"


def is_static_zero(value: Any) -> bool:
  """Whether ``value`` is a concrete zero (so a term it scales can be left out of the graph)."""
  if isinstance(value, jax.core.Tracer):
    return False
  return bool(np.all(np.asarray(value) == 0))


def loss_and_aux(out: Any, has_aux: bool, fix: str, what: str = "loss_fn") -> tuple[Any, Any]:
  """Splits the output of a user's ``loss_fn`` into ``(loss, aux)`` (``aux`` ``None`` without
  ``has_aux``).

  Args:
    out: What ``loss_fn`` returned.
    has_aux: Whether it should be ``(loss, aux)``.
    fix: What to do if it is a tuple although ``has_aux`` is false, completing "If it returns
      (loss, aux), ...".
    what: How the error calls the function.

  Returns:
    ``(loss, aux)``.

  Raises:
    TypeError: for a tuple or list without ``has_aux``, and for anything but a pair with it.
  """
  # A loss returning (loss, aux1, aux2) needs has_aux and its auxiliary values packed into one
  # (where the fix is to index the loss out, [0] takes it from any tuple).
  several = isinstance(out, tuple | list) and len(out) > 2
  pack = "Pack the auxiliary values into one: return loss, (aux1, aux2, ...)."
  if has_aux:
    if not (isinstance(out, tuple | list) and len(out) == 2):
      shape, dtype = getattr(out, "shape", None), getattr(out, "dtype", None)
      got = f"a {type(out).__name__} of {len(out)}" if isinstance(out, tuple | list) else None
      got = got or (f"an array of shape {shape} and dtype {dtype}" if dtype else type(out).__name__)
      raise TypeError(
        f"{what} was given has_aux=True, so it must return (loss, aux); it returned {got}. "
        + (pack if several else "Drop has_aux=True for a loss without auxiliary output.")
      )
    return out[0], out[1]
  if isinstance(out, tuple | list):
    raise TypeError(
      f"{what} returned a {type(out).__name__} of {len(out)} where a scalar loss is expected. "
      f"If it returns (loss, aux), {fix}" + (f" {pack}" if several and "has_aux" in fix else "")
    )
  return out, None
