"""The pytree check and the non-finite guard of every analysis in :mod:`adahessian_jax.hessian`.

One wording for a direction or preconditioner that does not match the params and one for a
product or loss that is not finite, so that a bad argument or a diverged model fails the same
way whichever function it reaches. Scalar arguments are checked by ``adahessian_jax._validation``,
which the optimizer shares; the Lanczos runs' ``which`` and ``stop_on`` here.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.core
import jax.numpy as jnp
import numpy as np

from adahessian_jax import _keys, _validation
from adahessian_jax.layout import leaves as canonical_leaves

# Why an analysis refuses a traced argument; shared by the operator's params and batch checks.
HOST_LOOP = (
  "the analyses are host loops that read each product's value to decide the next step: build the "
  "operator and run them outside jax.jit, vmap, grad and lax loops, e.g. between jitted training "
  "steps."
)


def concrete(tree: Any, what: str) -> None:
  """Raises ``ValueError`` naming the first leaf of ``tree`` that is traced (an analysis, or
  ``hessian_operator``, called inside ``jax.jit``, ``vmap``, ``grad`` or a ``lax`` loop).

  It failed at the first value read on the host with JAX's ``TracerArrayConversionError`` (or,
  for a grid of steps, as "a 1-D array of finite numbers ... dtype object"), naming no argument
  and no fix.

  Args:
    tree: The argument given: a pytree of arrays (the params, a batch, a direction) or one array.
    what: Its name, for the error message.
  """
  for path, leaf in leaves_with_path(tree):
    if isinstance(leaf, jax.core.Tracer):
      at = f"concrete arrays, but its leaf at {jax.tree_util.keystr(path)}"
      raise ValueError(
        f"{what} must be {at if path else 'a concrete array, but it'} is traced ({leaf.aval}): "
        + HOST_LOOP
      )


def prng_key(key: Any, *, traced: bool = False, default: int | None = None) -> jax.Array:
  """The analyses' check of their ``key``: one PRNG key (``adahessian_jax._keys.prng_key``) and,
  unless ``traced``, a concrete one, given on the host.

  A traced key (an analysis called inside ``jax.jit``) failed at the first value read on the host
  with JAX's ``TracerArrayConversionError`` on some internal array, naming no argument; so did a
  concrete key given inside ``jax.jit`` (the key's own operations are traced there), and the
  default key, made inside the trace, was blamed as a traced key the caller never passed.

  Args:
    key: The key given.
    traced: Whether the caller runs under a transformation too (``random_direction``).
    default: The seed of the key where ``key`` is ``None`` (``None``: a key is required).

  Returns:
    ``key``, or ``jax.random.key(default)``.
  """
  if not traced and isinstance(jnp.zeros(()), jax.core.Tracer):  # staged: inside jit or a loop
    raise ValueError(f"this analysis was called inside a traced function: {HOST_LOOP}")
  if key is None and default is not None:
    key = jax.random.key(default)
  if not traced and isinstance(key, jax.core.Tracer):
    raise ValueError(f"key must be a concrete PRNG key, got a traced one ({key.aval}): {HOST_LOOP}")
  return _keys.prng_key(key)


#: The eigenvalues an eigen solve can look for: largest algebraic, largest magnitude, smallest
#: algebraic.
_WHICH = ("LA", "LM", "SA")


def finite_1d(name: str, values: Any, empty: str) -> np.ndarray:
  """``values`` as a float64 array if it is 1-D, nonempty, real (not bool) and finite, else
  ``ValueError`` naming ``name``: a landscape's steps, a density's grid. ``empty`` is the error's
  advice for an empty one."""
  concrete(values, name)
  try:
    given = np.asarray(values)
  except (TypeError, ValueError):
    given = np.asarray(None)  # a ragged list: an object array, refused below
  real = jnp.issubdtype(given.dtype, jnp.floating) or jnp.issubdtype(given.dtype, jnp.integer)
  if not real or given.dtype == np.bool_:  # bools were read as 1.0 and 0.0, strings as numbers
    raise ValueError(
      f"{name} must be a 1-D array of finite numbers, got {values!r} (dtype {given.dtype})"
    )
  arr = given.astype(np.float64)
  if arr.ndim != 1:
    raise ValueError(f"{name} must be a 1-D array of finite numbers, got shape {arr.shape}")
  if not arr.size:
    raise ValueError(f"{name} is empty: {empty}")
  bad = np.flatnonzero(~np.isfinite(arr))
  if bad.size:
    raise ValueError(f"{name} must be finite, got {arr[bad[0]]} at index {int(bad[0])}")
  return arr


def which(which: str) -> str:
  """The eigen solves' check of their ``which`` (``top_eigenvalues``, ``layer_breakdown``).

  Args:
    which: The value given.

  Returns:
    ``which``.

  Raises:
    ValueError: if it is not one of ``"LA"``, ``"LM"``, ``"SA"``, naming it.
  """
  if which not in _WHICH:
    raise ValueError(f"which must be one of {_WHICH}, got {which!r}")
  return which


def stop_on(stop_on: str) -> str:
  """The Lanczos runs' check of their ``stop_on`` (``top_eigenvalues``, ``track_curvature``).

  Args:
    stop_on: The value given.

  Returns:
    ``stop_on``.

  Raises:
    ValueError: if it is not ``"residual"`` or ``"eigenvalue"``, naming it.
  """
  if stop_on not in ("residual", "eigenvalue"):
    raise ValueError(f"stop_on must be 'residual' or 'eigenvalue', got {stop_on!r}")
  return stop_on


def leaves_with_path(tree: Any) -> list[tuple[tuple[Any, ...], Any]]:
  """``(canonical path, leaf)`` of every leaf of ``tree``: a Linen box's or NNX variable's
  ``.value`` step left out, as the operator's leaf names and the optimizer's layouts name them
  (an error named ``['linear']['kernel'].value``)."""
  return [(x.path, x.leaf) for x in canonical_leaves(tree)]


def _paths(tree: Any) -> dict[str, Any]:
  """``{canonical path: leaf}``: a Linen box's or NNX variable's ``.value`` step left out."""
  return {jax.tree_util.keystr(x.path): x.leaf for x in canonical_leaves(tree)}


def _same_leaves(tree: Any, params: Any, got: dict[str, Any], want: dict[str, Any]) -> bool:
  """Whether ``tree`` and ``params`` (whose :func:`_paths` are ``got`` and ``want``) have the same
  leaves in the same order, boxes aside.

  A tree of the params' structure, or one that differs only by Linen boxes or NNX variables
  (``nnx.Optimizer``'s ``OptVariable`` where the params hold ``nnx.Param``, unboxed where they
  are boxed): both flatten to the same canonical paths in the same order, so they ravel alike.
  """
  if jax.tree.structure(tree) == jax.tree.structure(params):
    return True
  return list(got) == list(want) and len(jax.tree.leaves(tree)) == len(jax.tree.leaves(params))


def like_params(tree: Any, params: Any, what: str, *, flat: bool = False) -> None:
  """Raises ``ValueError`` unless ``tree`` has the structure of ``params`` and its leaves' shapes,
  its leaves being real arrays (as :func:`real` checks).

  Two trees of the same total size but other leaves (another model's, or a
  transposed kernel) would otherwise flatten to vectors of the right length
  with every entry in the wrong place. Linen boxes and NNX variables do not count: a
  tree that has the params' leaves at the same paths once they are unboxed matches (e.g. a
  preconditioner from ``nnx.Optimizer``'s state, whose leaves are ``OptVariable``, for params
  from ``nnx.state(model, nnx.Param)``).

  Args:
    tree: The pytree given, e.g. a direction or a preconditioner.
    params: The parameter pytree it must match.
    what: What ``tree`` is, as the caller names it (``"the preconditioner"``).
    flat: Whether the caller also takes a flat ``(n,)`` array (then the message offers one).
  """
  # First: np.shape of a leaf that is a scalar type (np.float32, not np.float32(1.0)) is the
  # class's attribute, "<attribute 'shape' of 'numpy.generic' objects>".
  real(tree, what)
  got, want = _paths(tree), _paths(params)
  must = f"{what} must be a pytree with the structure and leaf shapes of the params"
  must += " (or a flat array)" if flat else ""
  if not _same_leaves(tree, params, got, want):
    extra, missing = [p for p in got if p not in want], [p for p in want if p not in got]
    if jax.tree_util.treedef_is_leaf(jax.tree.structure(tree)):
      size = sum(int(np.size(x)) for x in want.values())
      detail = f"it is a single value of shape {np.shape(tree)}, not a pytree"
      detail += f"; a flat array must have shape ({size},)" if flat else ""
      if np.shape(tree) == ():  # one value for every entry: say how to spread it
        detail += (
          "; for one value everywhere pass jax.tree.map(lambda p: jnp.full_like(p, value), params)"
        )
    elif jax.tree_util.treedef_is_leaf(jax.tree.structure(params)):
      # A block operator's params are one array, whose path is "": "lacks the leaves (none)".
      detail = (
        f"it has the leaves {', '.join(list(got)[:4])}, but the params are a single array of "
        f"shape {np.shape(params)} (e.g. those of op.block(leaf, where)): pass its part for them, "
        "e.g. its leaf at that path indexed by where"
      )
    elif missing or extra:
      lacks = f"it lacks the leaves {', '.join(missing[:4]) or '(none)'}"
      detail = f"{lacks} and has {', '.join(extra[:4]) or 'none'} that the params do not"
    else:
      detail = (
        f"its structure {jax.tree.structure(tree)} differs from the params' "
        f"{jax.tree.structure(params)}"
      )
    raise ValueError(f"{must}: {detail}.")
  for path, leaf in got.items():
    if np.shape(leaf) != np.shape(want[path]):
      raise ValueError(
        f"{must}: its leaf at {path or _validation.ROOT} has "
        f"shape {np.shape(leaf)}, the params' leaf there has shape {np.shape(want[path])}."
      )


def real(tree: Any, what: str, *, floating: bool = False) -> None:
  """Raises ``ValueError`` naming the first leaf of ``tree`` with a complex dtype (with
  ``floating``, any dtype that is not a real floating one: a bool or an integer too).

  The Hessian acts on real vectors: cast to the params' dtype, a complex direction or
  preconditioner would silently lose its imaginary part, and a bool one would be read as 1.0
  and 0.0.

  Args:
    tree: A pytree of arrays, or one array.
    what: What ``tree`` is, as the caller names it.
    floating: Whether only real floating dtypes are allowed (a preconditioner, whose bool or
      integer entries are no optimizer's).
  """
  for path, leaf in leaves_with_path(tree):
    whose = f"its leaf at {jax.tree_util.keystr(path)}" if path else "it"
    dtype = _validation.array_dtype(leaf)
    if dtype is None:
      raise ValueError(
        f"{what} must be an array or a pytree of arrays, but {whose} is "
        f"{type(leaf).__name__} {leaf!r}."
      )
    if np.issubdtype(dtype, np.complexfloating):
      raise ValueError(
        f"{what} must be real, but {whose} has dtype {dtype}: the Hessian acts on real "
        "vectors, and a cast to the params' dtype would drop the imaginary part. Pass the real "
        "part (or the parts) explicitly."
      )
    if floating and not jnp.issubdtype(dtype, jnp.floating):  # bfloat16 too
      raise ValueError(
        f"{what} must hold real floating-point values, but {whose} has dtype {dtype} (a bool "
        "would be read as 1.0 and 0.0). Pass floats, e.g. jnp.asarray(x, jnp.float32) (1.0, "
        "not 1, for a scalar)."
      )


class NonFiniteError(FloatingPointError):
  """A Hessian-vector product (or the loss) at the operator's point is not finite.

  Raised by every analysis function as soon as it sees one, instead of
  spending the rest of its budget on NaNs; the message says where and what to
  check.
  """


def finite(values: Any, what: str, op: Any = None) -> None:
  """Raises :class:`NonFiniteError` if any entry of ``values`` is NaN or infinite.

  Args:
    values: A host or device array (fetched to the host: call it where the
      caller synchronises anyway).
    what: Where the values come from, e.g. ``"the Hessian-vector product at
      Lanczos step 3"``.
    op: The operator the values come from; if it has data, the message names
      the first batch whose loss is not finite and that batch's first
      non-finite entry (one loss per batch, spent only on the way to the error).
  """
  arr = np.asarray(values)
  if not np.all(np.isfinite(arr)):
    bad = "nan" if np.any(np.isnan(arr)) else "inf"
    data = getattr(op, "data", None)
    where = "" if data is None else data.not_finite(op.params)
    raise NonFiniteError(
      f"{what} is not finite ({bad}). The loss or its curvature at the operator's params is "
      "not finite: check op.loss() and the params (a diverged run, an overflow in low "
      f"precision, a log of zero) before analysing this point.{where}"
    )
