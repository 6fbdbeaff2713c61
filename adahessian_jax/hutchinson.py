"""Hessian-vector products and Hutchinson's estimate of the Hessian diagonal.

For a scalar function ``f`` of a pytree ``params`` and a Rademacher probe ``z``
(independent ``±1`` entries), ``E[z ⊙ Hz] = diag(H)`` (Bekas et al. 2007). The
product ``Hz`` is computed forward-over-reverse, ``jax.jvp`` of ``jax.grad``,
which returns the gradient as its primal output in the same pass; the pass is
traced once and rewritten so that XLA reads its result without transposes
(``adahessian_jax._transposes``; arguments sharded over ``Explicit`` mesh axes
run it as it is).

Everything here is shared by the optimizer (:mod:`adahessian_jax.transform`)
and the Hessian-analysis tools.

References:
  Hutchinson, `A stochastic estimator of the trace of the influence matrix for
  Laplacian smoothing splines <https://doi.org/10.1080/03610918908812806>`_,
  1989.

  Bekas, Kokiopoulou, Saad, `An estimator for the diagonal of a matrix
  <https://doi.org/10.1016/j.apnum.2007.01.003>`_, 2007.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adahessian_jax import _keys, _validation, masking
from adahessian_jax._axes import (
  fold_in_shard_index,
  nonnegative_total,
  sum_over_shards,
  unshared_axes,
)
from adahessian_jax._extras import from_nnx, loaded
from adahessian_jax._transposes import sink_transposes

__all__ = [
  "check_scalar_loss",
  "hutchinson_diagonal",
  "hvp",
  "rademacher",
  "rademacher_like",
  "value_grad_and_diagonal",
  "value_grad_hvp",
]


_WRAP = "wrap it: lambda p: f(p)[0]."
_NNX_STATE = (
  "adahessian_jax: the loss was called with an nnx.State (the variables an nnx.Optimizer "
  "trains), not with the module. Build it with adahessian_jax.nnx.value_fn(model, loss_fn, "
  "*args), or use adahessian_jax.nnx.value_grad_and_hessian_diag."
)
_NNX_CLOSURE = (
  "adahessian_jax: the loss writes NNX variables made outside it (BatchNorm statistics in "
  "training mode, a Dropout's RNG count), likely those of a model it closes over, which leaves "
  "the params it is given unused. Build it with adahessian_jax.nnx.value_fn(model, loss_fn, "
  "*args), not lambda state: loss_fn(model, ...), or use "
  "adahessian_jax.nnx.value_grad_and_hessian_diag. With those helpers, loss_fn(module, *args) "
  "must use the module it is passed (its first argument), not a model it closes over."
)


def _fn_fix(name: str) -> str:
  """How to call :func:`hvp`, :func:`hutchinson_diagonal` and :func:`value_grad_hvp` with a loss
  of more arguments, called ``name`` in their errors."""
  return (
    f"{name} is a function of the params alone: close over the rest, lambda p: loss_fn(p, batch)."
  )


_FN_FIX = _fn_fix("fn")

_FLOAT_FIX = (
  "The Hessian is taken with respect to every leaf: keep integer, bool and complex values out of "
  "params and close over them in fn instead."
)
# What hutchinson_diagonal's error for an fn that ignores the params it is given says: the
# optimizer's default advice is about its value_fn, tx.update and nnx.Optimizer.
_CONSTANT_FIX = (
  "It probably uses other params than its argument: write lambda p: loss_fn(p, batch), not "
  "lambda p: loss_fn(params, batch); for NNX, merge the params it is passed, "
  "nnx.merge(graphdef, p), not a model it closes over."
)


def check_scalar_loss(value: Any, what: str = "value_fn", fix: str = _WRAP) -> None:
  """Raises ``TypeError`` unless ``value`` is a real floating scalar.

  Args:
    value: What the loss function returned.
    what: How the error calls the function.
    fix: What to do if it returns ``(loss, aux)``, completing "If it returns (loss, aux), ...".
  """
  value = _validation.loss_and_aux(value, False, fix, what)[0]  # a tuple: the has_aux error
  if not hasattr(value, "shape") and not isinstance(value, float | int):
    raise TypeError(
      f"{what} must return a real floating-point scalar loss, got {type(value).__name__}. "
      f"If it returns (loss, aux), {fix}"
    )
  shape = jnp.shape(value)
  dtype = jnp.result_type(value)
  if shape != () or not jnp.issubdtype(dtype, jnp.floating):
    hint = (
      "Reduce the loss (e.g. .mean())."
      if shape != ()
      else "Return a float: an integer or complex loss has no real Hessian."
    )
    raise TypeError(
      f"{what} must return a real floating-point scalar loss, got shape {shape} and dtype "
      f"{dtype}. {hint}"
    )


def checked_loss(
  fn: Callable[..., Any], what: str, has_aux: bool = False, fix: str = _WRAP
) -> Callable[..., Any]:
  """``fn`` checked to return a real floating scalar (or ``(scalar, aux)`` with ``has_aux``).

  Args:
    fn: The loss function of the params.
    what: How errors call it.
    has_aux: Whether it returns ``(loss, aux)``.
    fix: What to do if it returns ``(loss, aux)`` without ``has_aux``.

  Returns:
    ``fn`` with the check, raising ``TypeError`` (at trace time) naming ``what`` and ``fix``.
  """

  def wrapped(params):
    try:
      out = fn(params)
    except Exception as e:
      # An nnx.Optimizer's update calls value_fn with an nnx.State; a loss written for the module
      # fails on it ("'State' object is not callable"), far from the cause.
      if from_nnx(params) and "'State'" in str(e):
        e.add_note(_NNX_STATE)
      # Flax's "Cannot mutate BatchStat from a different trace level" names no fix.
      trace_context = loaded("flax.errors", "TraceContextError")
      if trace_context is not None and isinstance(e, trace_context):
        e.add_note(_NNX_CLOSURE)
      raise
    loss, _ = _validation.loss_and_aux(out, has_aux, fix, what)
    check_scalar_loss(loss, what, fix)
    return out

  return wrapped


def rademacher(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
  """Rademacher (±1) entries from one random 32-bit word per 32 entries.

  ``jax.random.rademacher`` spends one random word per entry; the random bits
  then cost more than the rest of an optimizer step on CPU. Every bit of the
  generator's output is an independent fair coin, so unpacking the bits of
  ``ceil(n / 32)`` words gives the same distribution 32x cheaper.

  Args:
    key: A PRNG key.
    shape: Shape of the result.
    dtype: Floating dtype of the result.

  Returns:
    An array of independent ``±1`` entries.
  """
  n = math.prod(shape)
  words = jax.random.bits(key, (-(-n // 32), 1), jnp.uint32)
  bits = (words >> jnp.arange(32, dtype=jnp.uint32)) & 1
  signs = 2 * bits.reshape(-1)[:n].astype(dtype) - 1
  return signs.reshape(shape)


def rademacher_like(key: jax.Array, tree: Any) -> Any:
  """Draws an independent Rademacher (±1) probe for every leaf of ``tree``.

  Leaf ``i`` (in ``jax.tree.leaves`` order) gets :func:`rademacher` with key
  ``jax.random.split(key, n_leaves)[i]`` (:func:`optax.tree.split_key_like`'s).
  With threefry keys (JAX's default) leaves of one shape and dtype are drawn
  together, by one vectorised draw over their keys, which gives the same
  numbers: XLA compiles every draw on its own, about 0.2 s per leaf on a CPU,
  which a model of hundreds of leaves would pay at every compile. (Other key
  implementations, such as ``"rbg"``, draw other numbers under ``jax.vmap``, so
  their leaves are drawn one by one.)

  Args:
    key: A PRNG key.
    tree: A pytree of arrays; the probe has its structure, shapes and dtypes.

  Returns:
    A pytree like ``tree`` of ``±1`` entries, one independent key per leaf.

  Raises:
    ValueError: for a ``key`` that is not one PRNG key (an int seed, a batch of keys).
    TypeError: naming the first leaf that is no array (a string) or whose dtype holds no ``-1``
      (bool, unsigned integers).
  """
  key = _keys.prng_key(key, "rademacher_like's key")
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    dtype = _validation.array_dtype(x)
    if dtype is None:  # jnp.result_type("3") raised "data type '' not understood"
      raise TypeError(
        f"rademacher_like draws a probe like each leaf of the tree, but the leaf at "
        f"{_validation.path_str(path)} is {type(x).__name__} {x!r}, not an array. Pass the params "
        "(arrays) alone."
      )
    if dtype == jnp.bool_ or jnp.issubdtype(dtype, jnp.unsignedinteger):
      # -1 wrapped around to 255 in uint8; a bool leaf got int32 entries.
      raise TypeError(
        f"rademacher_like draws ±1 entries in each leaf's dtype, but the leaf at "
        f"{_validation.path_str(path)} has dtype {dtype}, which holds no -1. Draw the probe for "
        "the floating-point params (cast the tree: jax.tree.map(lambda x: "
        "x.astype(jnp.float32), tree))."
      )
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  together = vmap_invariant(keys)
  groups: dict[tuple[Any, ...], list[int]] = {}
  for i, x in enumerate(leaves):
    kind = (jnp.shape(x), jnp.result_type(x), unshared_axes(key, x), None if together else i)
    groups.setdefault(kind, []).append(i)
  probes: list[Any] = [None] * len(leaves)
  for (shape, dtype, axes, _), index in groups.items():
    mine = keys if len(index) == len(leaves) else keys[np.asarray(index)]
    mine = fold_in_shard_index(mine, axes)
    drawn = jax.vmap(lambda k, shape=shape, dtype=dtype: rademacher(k, shape, dtype))(mine)
    for j, i in enumerate(index):
      probes[i] = drawn[j]
  return jax.tree.unflatten(treedef, probes)


def vmap_invariant(keys: jax.Array) -> bool:
  """Whether ``jax.vmap`` over ``keys`` draws what a loop over them does (threefry keys)."""
  return str(jax.random.key_impl(_keys.as_typed(keys))) == "threefry2x32"


def check_tangents(tangents: Any, params: Any, what: str) -> None:
  """Raises ``ValueError`` unless ``tangents`` has the tree of ``params`` and each leaf the shape
  and dtype of the param at its path, as ``jax.jvp`` needs (its own error names no leaf).

  Args:
    tangents: The vector the Hessian is applied to.
    params: The point of evaluation.
    what: How the error calls ``tangents`` (``"hvp's tangents"``).
  """
  if jax.tree.structure(tangents) != jax.tree.structure(params):
    where = _validation.tree_difference(tangents, params, "the params tree")
    raise ValueError(
      f"{what} must be a pytree like the params: {where}. Build it from the params, e.g. "
      "jax.tree.map(jnp.ones_like, params)."
    )
  named = _validation.canonical_leaf_paths(tangents)  # not ['linear']['bias'].value
  for where, t, p in zip(named, jax.tree.leaves(tangents), jax.tree.leaves(params), strict=True):
    got, want = (jnp.shape(t), jnp.result_type(t)), (jnp.shape(p), jnp.result_type(p))
    if got != want:
      raise ValueError(
        f"{what} must have the shape and dtype of the params leaf by leaf, but its leaf at "
        f"{where} has shape {got[0]} and dtype {got[1]}, the param there "
        f"shape {want[0]} and dtype {want[1]}. Reshape or cast it (x.astype(param.dtype))."
      )


def hvp(fn: Callable[[Any], jax.Array], params: Any, tangents: Any) -> Any:
  """The Hessian of ``fn`` at ``params`` applied to ``tangents`` (forward-over-reverse).

  Args:
    fn: Scalar function of ``params`` (e.g. the loss on a batch), a real floating scalar.
    params: Point of evaluation, a pytree of real floating arrays.
    tangents: Vector the Hessian is applied to, a pytree with the structure, shapes and dtypes
      of ``params``.

  Returns:
    ``H @ tangents``, a pytree like ``params``.

  Raises:
    TypeError: naming the first leaf of ``params`` that is not a real floating array, or for an
      ``fn`` that is not callable as ``fn(params)`` or does not return a real floating scalar.
    ValueError: naming the first leaf of ``tangents`` whose path, shape or dtype is not the
      param's.
  """
  _validation.callable_with(fn, (params,), {}, "fn(params)", _FN_FIX)  # "'str' ... not callable"
  _validation.float_leaves(params, "hvp's params", _FLOAT_FIX)
  check_tangents(tangents, params, "hvp's tangents")
  grad = jax.grad(checked_loss(fn, "fn"))
  return sink_transposes(lambda p, t: jax.jvp(grad, (p,), (t,))[1])(params, tangents)


def value_grad_hvp(
  fn: Callable[..., Any],
  params: Any,
  tangents: Any,
  has_aux: bool = False,
  *,
  name: str = "fn",
  fix: str = _WRAP,
  constant_fix: str | None = None,
) -> tuple[Any, Any, Any]:
  """Loss, gradient and Hessian-vector product of ``fn`` in one forward-over-reverse pass.

  Args:
    fn: Scalar function of ``params`` (returning ``(loss, aux)`` if ``has_aux``).
    params: Point of evaluation.
    tangents: Vector (pytree like ``params``) the Hessian is applied to.
    has_aux: Whether ``fn`` returns ``(loss, aux)``.
    name: How error messages about ``fn`` call it (e.g. ``"value_fn"``).
    fix: What the error for an ``fn`` returning ``(loss, aux)`` without
      ``has_aux`` suggests (default: wrap it, ``lambda p: f(p)[0]``).
    constant_fix: What the error for an ``fn`` whose loss does not depend on ``params``
      suggests (default: the optimizer's ``value_fn`` advice).

  Returns:
    ``(value, grad, hvp)``; ``value`` is ``(loss, aux)`` if ``has_aux``.

  Raises:
    ValueError: for a ``has_aux`` that is not a bool, naming the first leaf of ``tangents`` whose
      path, shape or dtype is not the param's, or for an ``fn`` whose loss does not depend on
      ``params`` (a closure over other params), at trace time.
    TypeError: for an ``fn`` that is not callable as ``fn(params)``, or whose loss is not a real
      floating scalar (a tuple without ``has_aux``), at trace time.
  """
  has_aux = _validation.flag("has_aux", has_aux)
  # As hvp: value_grad_hvp(3, ...) failed with Python's "'int' object is not callable".
  _validation.callable_with(fn, (params,), {}, f"{name}(params)", _fn_fix(name))
  check_tangents(tangents, params, "value_grad_hvp's tangents")
  checked = checked_loss(fn, name, has_aux, fix)
  perturbed: list[bool] = []

  @jax.custom_jvp
  def mark(loss):
    return loss

  @mark.defjvp
  def _(primals, tangents):
    # Called only where differentiation reaches the loss, i.e. where it depends on the params.
    perturbed.append(True)
    return primals[0], tangents[0]

  def marked(p):
    out = checked(p)
    return (mark(out[0]), out[1]) if has_aux else mark(out)

  value_and_grad = jax.value_and_grad(marked, has_aux=has_aux)
  jvp = sink_transposes(lambda p, t: jax.jvp(value_and_grad, (p,), (t,)))
  (value, grad), (_, hz) = jvp(params, tangents)
  if not perturbed and jax.tree.leaves(params):
    raise ValueError(_constant_loss_message(name, constant_fix))
  return value, grad, hz


def _constant_loss_message(name: str, fix: str | None = None) -> str:
  what = (
    f"{name} returned a loss that does not depend on the params it was called with, so its "
    "gradient and Hessian there are zero"
  )
  if fix is not None:
    return f"{what}. {fix}"
  return (
    f"{what} (a zero Hessian estimate makes every step lr·g/eps). "
    "It probably uses other params than its argument: write lambda p: loss_fn(p, batch), not "
    "lambda p: loss_fn(params, batch); for an nnx.Optimizer, build it with "
    "adahessian_jax.nnx.value_fn(model, loss_fn, *args), not lambda state: loss_fn(model, ...). "
    "With adahessian_jax.nnx's helpers, loss_fn(module, *args) must use the module it is passed "
    "(its first argument), not a model it closes over."
  )


def value_grad_and_diagonal(
  fn: Callable[..., Any],
  params: Any,
  keys: jax.Array,
  has_aux: bool = False,
  *,
  name: str = "fn",
  fix: str = _WRAP,
  owned: Any = None,
  flat: bool = False,
  constant_fix: str | None = None,
) -> tuple[Any, Any, Any]:
  """Loss, gradient and Hutchinson's diagonal estimate, all in one pass.

  One Rademacher probe per key in ``keys`` (a 1-D array of PRNG keys, split
  again per leaf by :func:`rademacher_like`). With several keys the products
  are vectorised with ``vmap``; the loss and gradient, which do not depend on
  the probe, are computed once.

  Args:
    fn: Scalar function of ``params`` (returning ``(loss, aux)`` if ``has_aux``).
    params: Point of evaluation, a pytree of real floating arrays.
    keys: 1-D array of PRNG keys, one per probe.
    has_aux: Whether ``fn`` returns ``(loss, aux)``.
    name: How error messages about ``fn`` call it.
    fix: As for :func:`value_grad_hvp`.
    owned: ``None``, or a tree like ``params`` with an :class:`optax.MaskedNode`
      at each leaf another transform owns (an AdaHessian state's ``mu`` inside
      ``optax.masked``): the probes are drawn as for the tree of the other
      leaves alone and are zero on these, so the estimate on the owned leaves
      is the one of the loss as a function of them alone (the other leaves
      held fixed), as the ``value_fn`` route computes it.
    flat: Draw each probe as for the leaves of ``params`` concatenated into one
      vector (as ``optax.flatten`` hands them to the transform inside it), split
      back into the leaves: the probes the ``value_fn`` route draws there.
    constant_fix: As for :func:`value_grad_hvp`.

  Returns:
    ``(value, grad, estimate)`` where ``estimate`` is the mean of ``z ⊙ Hz``
    over the probes, a pytree like ``params``.

  Raises:
    ValueError: for ``keys`` that are not a 1-D array of at least one key, a ``has_aux`` or
      ``flat`` that is not a bool, or an ``fn`` whose loss does not depend on ``params``.
    TypeError: for an ``fn`` whose loss is not a real floating scalar (as :func:`value_grad_hvp`).
  """
  has_aux, flat = _validation.flag("has_aux", has_aux), _validation.flag("flat", flat)
  if _keys.batch_ndim(keys) != 1 or keys.shape[0] == 0:
    raise ValueError(
      f"keys must be a 1-D array of at least one PRNG key, one per probe, got shape {keys.shape} "
      f"and dtype {keys.dtype}: pass jax.random.split(key, n_samples) (key[None] for one probe)."
    )

  def probe(key):
    if flat:
      return _split_like(rademacher_like(key, _concatenated(params)), params)
    if owned is None:
      return rademacher_like(key, params)
    mine = rademacher_like(key, masking.restrict_to(params, owned))
    return masking.fill_masked(mine, params, jnp.zeros_like)

  def one(key):
    z = probe(key)
    value, grad, hz = value_grad_hvp(
      fn, params, z, has_aux, name=name, fix=fix, constant_fix=constant_fix
    )
    return value, grad, jax.tree.map(jnp.multiply, z, hz)

  if keys.shape[0] == 1:
    return one(keys[0])
  value, grad, estimates = jax.vmap(one, out_axes=(None, None, 0))(keys)
  return value, grad, jax.tree.map(lambda e: e.mean(axis=0), estimates)


def _concatenated(tree: Any) -> jax.Array:
  """The leaves of ``tree`` raveled and concatenated, as ``optax.flatten`` hands them on."""
  return jnp.concatenate([jnp.reshape(x, [-1]) for x in jax.tree.leaves(tree)])


def _split_like(vector: jax.Array, tree: Any) -> Any:
  """``vector`` (of :func:`_concatenated`'s layout) split into a tree like ``tree``."""
  leaves, treedef = jax.tree.flatten(tree)
  offsets = np.cumsum([np.size(x) for x in leaves])[:-1]
  parts = jnp.split(vector, offsets)
  split = zip(parts, leaves, strict=True)
  return treedef.unflatten(
    [jnp.reshape(v, jnp.shape(x)).astype(jnp.result_type(x)) for v, x in split]
  )


def not_finite_mark(tree: Any) -> jax.Array:
  """A float32 scalar: 0 if every entry of ``tree`` is finite, NaN otherwise.

  One reduction over the tree (``0·x`` cannot overflow, unlike a sum of ``x``). The fused route
  and the transform compute it on the same estimate (the transform before casting it to wider
  moments), so XLA keeps one copy of it. Under
  ``shard_map`` with parameters split over mesh axes it covers every shard's block, so that all
  shards agree whether a step is finite (else a replicated leaf's update would differ by shard).
  """
  # Each leaf's part is 0 or NaN; one reduction over them (nonnegative_total, float32 0 for an
  # empty tree), not a chain.
  mark = nonnegative_total([jnp.sum(x * 0, dtype=jnp.float32) for x in jax.tree.leaves(tree)])
  return sum_over_shards(mark)


def hutchinson_diagonal(
  fn: Callable[[Any], jax.Array],
  params: Any,
  key: jax.Array,
  n_samples: int = 1,
) -> Any:
  """Hutchinson's estimate of the Hessian diagonal of ``fn`` at ``params``.

  The mean of ``z ⊙ Hz`` over ``n_samples`` Rademacher probes ``z``; unbiased,
  with per-entry variance ``Σ_{j≠i} H_ij² / n_samples``.

  Args:
    fn: Scalar function of ``params`` (e.g. the loss on a batch).
    params: Point of evaluation, a pytree of real floating arrays.
    key: PRNG key. Probe ``s`` uses ``jax.random.split(key, n_samples)[s]``,
      split again per leaf with :func:`rademacher_like`.
    n_samples: Number of probes (the products are vectorised with ``vmap``).

  Returns:
    The signed estimate, a pytree like ``params``.

  Raises:
    TypeError: naming the first leaf of ``params`` that is not a real floating array (an
      integer leaf has no Hessian; for a complex one the real probe misses the imaginary part),
      or for an ``fn`` that is not callable as ``fn(params)`` or does not return a real floating
      scalar.
    ValueError: for an ``n_samples`` that is not an integer >= 1, a ``key`` that is not one
      PRNG key (an int seed, a batch of keys), or an ``fn`` whose loss does not depend on
      ``params``.
  """
  _validation.callable_with(fn, (params,), {}, "fn(params)", _FN_FIX)
  _validation.float_leaves(params, "hutchinson_diagonal's params", _FLOAT_FIX)
  key = _keys.prng_key(key, "hutchinson_diagonal's key")
  n_samples = _validation.count("n_samples", n_samples)
  keys = jax.random.split(key, n_samples)
  return value_grad_and_diagonal(fn, params, keys, constant_fix=_CONSTANT_FIX)[2]
