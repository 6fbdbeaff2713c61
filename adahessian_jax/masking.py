"""AdaHessian inside ``optax.masked`` and ``optax.multi_transform``.

Those combinators hand their inner transforms the parameters with the leaves
they do not own replaced by :class:`optax.MaskedNode`. Two consequences:

* a precomputed ``hessian_diag`` for the whole model is restricted to the
  owned leaves automatically;
* a ``value_fn`` written for the whole model cannot be evaluated on the masked
  tree. Wrap it with :func:`masked_value_fn`, which fills the leaves that are
  not owned with their current values (held fixed), so the Hessian-vector
  product is taken over the owned leaves only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from adahessian_jax import _validation

__all__ = ["MaskedValueFn", "has_masked_nodes", "is_masked", "masked_value_fn", "restrict_to"]


def is_masked(x: Any) -> bool:
  """Whether ``x`` is an :class:`optax.MaskedNode`: a leaf (or subtree) another transform owns.

  Args:
    x: A node of a pytree (pass this function as ``is_leaf`` to stop at masked nodes).

  Returns:
    ``True`` for an :class:`optax.MaskedNode`.
  """
  return isinstance(x, optax.MaskedNode)


def has_masked_nodes(tree: Any) -> bool:
  """Whether ``tree`` contains :class:`optax.MaskedNode` entries.

  Args:
    tree: A pytree, e.g. the params an inner transform of ``optax.masked`` receives.

  Returns:
    ``True`` if any node of ``tree`` is an :class:`optax.MaskedNode`.
  """
  return any(is_masked(x) for x in jax.tree.leaves(tree, is_leaf=is_masked))


def restrict_to(full: Any, masked_like: Any) -> Any:
  """Keeps the leaves of ``full`` where ``masked_like`` is not a ``MaskedNode``.

  Args:
    full: A pytree like the whole model's params (e.g. a whole-model ``hessian_diag``).
    masked_like: The masked tree whose ``MaskedNode`` entries to copy (e.g. masked params).

  Returns:
    A tree with the structure of ``masked_like``: its ``MaskedNode`` entries, and the leaves of
    ``full`` elsewhere.
  """
  return jax.tree.map(lambda m, x: m if is_masked(m) else x, masked_like, full, is_leaf=is_masked)


def fill_masked(masked: Any, full: Any, fill: Callable[[Any], Any]) -> Any:
  """``masked`` with each ``MaskedNode`` replaced by ``fill`` of the leaf of ``full`` there."""
  return jax.tree.map(lambda m, x: fill(x) if is_masked(m) else m, masked, full, is_leaf=is_masked)


def _holds_variables(tree: Any) -> bool:
  """Whether ``tree`` holds arrays wrapped in NNX Variables (``_validation.wraps_array``)."""
  wrapped = _validation.wraps_array
  return any(wrapped(x) for x in jax.tree.leaves(tree, is_leaf=wrapped))


class MaskedValueFn:
  """A whole-model loss evaluated on a masked parameter tree (see :func:`masked_value_fn`)."""

  def __init__(self, value_fn: Callable[[Any], jax.Array], full_params: Any):
    self.value_fn = value_fn
    self.full_params = full_params

  def __call__(self, params: Any) -> jax.Array:
    self._check_full(params)
    return self.value_fn(fill_masked(params, self.full_params, lambda full: full))

  def _check_full(self, params: Any) -> None:
    """Raises ``ValueError`` naming a leaf if ``full_params`` are not a model of ``params``'s
    tree (JAX's tree error named no leaf), or have other shapes where ``params`` has leaves: a
    tree for another model, whose held leaves would enter the loss silently."""
    fix = (
      "Pass the whole model's current params, those the optimizer updates: "
      "masked_value_fn(lambda p: loss_fn(p, batch), params)."
    )
    # nnx.state(model) holds Variables, each a subtree around its array, where the params an
    # nnx.Optimizer hands its tx are plain arrays: the lookup below failed with a bare KeyError.
    if _holds_variables(self.full_params) and not _holds_variables(params):
      raise ValueError(
        "masked_value_fn's full_params hold NNX Variables (nnx.state(model) gives them), but "
        "the params it is called with are plain arrays, as nnx.Optimizer hands them to its tx: "
        "pass nnx.as_pure(nnx.state(model, optimizer.wrt))."
      )
    try:
      jax.tree.map(lambda m, x: None, params, self.full_params, is_leaf=is_masked)
    except (ValueError, TypeError):
      _, missing = _validation.unshared_leaf_paths(self.full_params, params)
      where = (
        f"they have no leaf at {missing[0] or _validation.ROOT}, where the params have one"
        if missing
        else "their tree is not the params' (with the leaves another transform owns)"
      )
      raise ValueError(
        f"masked_value_fn's full_params do not fit the params: {where}. {fix}"
      ) from None
    owned = jax.tree_util.tree_leaves_with_path(params)
    full = dict(jax.tree_util.tree_leaves_with_path(restrict_to(self.full_params, params)))
    named = _validation.canonical_leaf_paths(params)  # not ['linear']['bias'].value
    for (path, x), where in zip(owned, named, strict=True):
      if jnp.shape(full[path]) != jnp.shape(x):
        raise ValueError(
          f"masked_value_fn's full_params do not fit the params: their leaf at {where} has "
          f"shape {jnp.shape(full[path])}, the param there {jnp.shape(x)}. {fix}"
        )


def masked_value_fn(value_fn: Callable[[Any], jax.Array], full_params: Any) -> MaskedValueFn:
  """Makes a whole-model ``value_fn`` usable inside ``optax.masked`` / ``multi_transform``.

  Example::

    tx = optax.multi_transform(
        {"ada": adahessian_jax.adahessian(0.1), "sgd": optax.sgd(0.01)}, labels)
    value_fn = adahessian_jax.masked_value_fn(lambda p: loss_fn(p, batch), params)
    updates, opt_state = tx.update(grads, opt_state, params, value_fn=value_fn)

  Args:
    value_fn: The loss as a function of the full parameter tree.
    full_params: The current full parameters; leaves the AdaHessian member
      does not own are held at these values.

  Returns:
    A callable accepted as ``value_fn`` by :func:`scale_by_adahessian`, both on
    masked trees and on full ones.

  Raises:
    TypeError: for a ``value_fn`` that is not callable.
    ValueError: when the returned callable is called with params that ``full_params`` do not
      fit (another tree, or another shape at a leaf the params have), naming the leaf.
  """
  if not callable(value_fn):
    raise TypeError(
      f"masked_value_fn's value_fn must be the loss as a function of the full params, got "
      f"{value_fn!r}: masked_value_fn(lambda p: loss_fn(p, batch), params)."
    )
  return MaskedValueFn(value_fn, full_params)
