"""One-pass loss, gradient and Hessian-diagonal estimate for AdaHessian.

The closure route, ``tx.update(grads, state, params, value_fn=...)``, is the
simplest to use, but when the training step already computed the gradient and
the transform then computes ``jvp(grad(value_fn))``, the gradient is computed
twice; with a lazy refresh (``update_freq > 1``) XLA cannot merge the two
across the ``lax.cond``. :func:`value_grad_and_hessian_diag` instead computes
the loss, the gradient and ``z ⊙ Hz`` in one ``jax.jvp`` of
``jax.value_and_grad`` (whose primal output already is the loss and the
gradient), with the probes the transform itself would draw, and on steps that
do not refresh the Hessian only ``jax.value_and_grad``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from adahessian_jax import _validation, _wrappers, hutchinson, masking
from adahessian_jax._axes import check_loss_varies, check_state_varies
from adahessian_jax._transposes import explicitly_sharded
from adahessian_jax.state import (
  adahessian_states,
  check_key_data,
  is_adahessian_state,
  is_refresh_step,
  on_refresh,
  probe_keys,
  untyped_state_hint,
)

__all__ = ["value_grad_and_hessian_diag"]


def _mark_not_finite(grads: Any, estimate: Any, owned: Any | None) -> Any:
  """``grads`` with one entry NaN if ``estimate`` has a non-finite entry where AdaHessian uses it
  (for ``optax.apply_if_finite``): a sum over the estimate and a one-entry update
  (:func:`_add_to_first_entry`; a select over that one leaf where it is typed with a split over
  ``Explicit`` mesh axes), no pass over the other leaves of ``grads``.

  ``owned`` is :func:`_owned`'s: inside ``optax.masked`` or ``multi_transform`` the AdaHessian
  state's ``mu``, with a ``MaskedNode`` at each leaf another transform owns. Those leaves'
  estimates are not used, and their gradients go to that transform, which would apply a NaN: the
  mark goes in the first non-empty leaf AdaHessian owns, and only its own leaves' estimates can
  set it. ``None``: AdaHessian owns every leaf.
  """
  flat, treedef = jax.tree.flatten(grads)
  estimates = jax.tree.leaves(estimate)
  mine = list(range(len(flat)))
  if owned is not None:
    slots = jax.tree.leaves(owned, is_leaf=masking.is_masked)
    mine = [i for i, m in enumerate(slots) if not masking.is_masked(m)]
  target = next((i for i in mine if flat[i].size > 0), None)
  if target is None:  # nothing AdaHessian owns has an entry to mark
    return grads
  poison = hutchinson.not_finite_mark([estimates[i] for i in mine])
  flat[target] = _add_to_first_entry(flat[target], poison)
  return jax.tree.unflatten(treedef, flat)


def _add_to_first_entry(x: jax.Array, value: jax.Array) -> jax.Array:
  """``x`` with the scalar ``value`` added to its first entry, under any sharding of ``x``.

  Not ``x.at[0].add(value)``: XLA's SPMD partitioner (jax 0.10) compiles that scatter wrongly under
  ``jax.jit`` for a leaf split over one axis of a 2-D mesh (the first entry was written into the
  first entry of every shard), and JAX refuses it, like any one-entry slice, for a leaf typed with
  a split over ``Explicit`` mesh axes; there a select against an iota typed like ``x`` does it. So
  too where only ``value`` is typed over such a mesh (``x`` unsharded under ``jax.set_mesh``, the
  estimate from a batch split over the mesh): the one-entry update then fails for the same reason.
  """
  value = value.astype(x.dtype)
  if explicitly_sharded((x, value)):
    sharding = jax.typeof(x).sharding
    at_first = [
      jax.lax.broadcasted_iota(jnp.int32, x.shape, i, out_sharding=sharding) == 0
      for i in range(x.ndim)
    ]
    return jnp.where(functools.reduce(jnp.logical_and, at_first, jnp.bool_(True)), x + value, x)
  corner = (0,) * x.ndim
  entry = jax.lax.slice(x, corner, (1,) * x.ndim) + value
  return jax.lax.dynamic_update_slice(x, entry, corner)


def _owned(params: Any, mu: Any) -> Any:
  """``mu`` if it marks leaves of ``params`` that other transforms own (``optax.masked``,
  ``multi_transform``), else ``None``: then the probes skip those leaves, as the masked
  ``value_fn`` route's do.

  A mask or labels given as a prefix of the params put one ``MaskedNode`` in ``mu`` for a whole
  subtree; it becomes one per leaf of that subtree, so that ``mu``'s slots line up with
  ``params``' leaves."""
  if not masking.has_masked_nodes(mu):
    return None
  try:
    mu = jax.tree.map(
      lambda m, p: jax.tree.map(lambda _: optax.MaskedNode(), p) if masking.is_masked(m) else m,
      mu,
      params,
      is_leaf=masking.is_masked,
    )
  except ValueError:  # params is not the tree mu was made for
    return None
  slots = jax.tree.leaves(mu, is_leaf=masking.is_masked)
  if len(slots) != len(jax.tree.leaves(params)):
    return None
  return mu


def _flattened(params: Any, mu: Any) -> bool:
  """Whether the AdaHessian state (its ``mu``) was made for ``params`` flattened into one vector,
  by ``optax.flatten``: then the probes are drawn for that vector, as the ``value_fn`` route
  draws them there, and split into ``params``' leaves."""
  leaves, mine = jax.tree.leaves(params), jax.tree.leaves(mu, is_leaf=masking.is_masked)
  if len(leaves) < 2 or len(mine) != 1 or masking.is_masked(mine[0]):
    return False  # one leaf: its probe is the vector's, reshaped
  return jnp.ndim(mine[0]) == 1 and jnp.size(mine[0]) == sum(jnp.size(x) for x in leaves)


def _accumulates_gradients(opt_state: Any) -> bool:
  """Whether ``opt_state`` holds an :class:`optax.MultiStepsState`: its gradient accumulator keeps
  a NaN for good (it is reset by multiplying with zero), so the fused route must not mark there."""
  is_multi = lambda x: isinstance(x, optax.MultiStepsState)
  return any(is_multi(x) for x in jax.tree.leaves(opt_state, is_leaf=is_multi))


def _the_adahessian_state(opt_state: Any) -> Any:
  """The one AdaHessian state in ``opt_state``, whose probes the fused route draws."""
  found = adahessian_states(opt_state)
  what = "value_grad_and_hessian_diag draws its probes from the AdaHessian state in opt_state"
  # The wrappers that pass the transform no hessian_diag: refused here, before the product is
  # spent, with the transform's own words (_wrappers.NO_EXTRA_ARGS).
  wrapped = "".join(
    f" Its state is inside that of {_wrappers.NO_EXTRA_ARGS[w]}"
    for w in _wrappers.holding(opt_state, is_adahessian_state)
  )
  if found and wrapped:
    raise ValueError(
      f"value_grad_and_hessian_diag was given an AdaHessian state that no hessian_diag can reach."
      f"{wrapped}"
    )
  if len(found) == 1:
    return found[0]
  if not found:
    raise ValueError(
      f"{what}, but opt_state holds none: pass the state of the optimizer built with "
      "adahessian_jax.adahessian or scale_by_adahessian, after params."
      + untyped_state_hint(opt_state)
    )
  raise ValueError(
    f"{what}, but opt_state holds {len(found)} (e.g. one per optax.multi_transform group), "
    "which would each draw other probes. Use one AdaHessian transform with per-group learning "
    "rates after it (optax.multi_transform over optax.scale_by_learning_rate), or the value_fn "
    "route with adahessian_jax.masked_value_fn."
  )


#: How errors about the loss given to :func:`value_grad_and_hessian_diag` call it, and their fix.
_NAME = "the loss given to value_grad_and_hessian_diag"
_FIX = "pass has_aux=True to value_grad_and_hessian_diag."


def _check_own_loss(value: Any, params: Any, key: Any, has_aux: bool) -> None:
  """Refuses a loss reduced over the axes the caller made ``params`` and the state's ``key``
  device-varying over under ``shard_map`` (``check_loss_varies``, the ``value_fn`` route's rule):
  its gradient and estimate would be 1/P of this device's."""
  check_loss_varies(
    value[0] if has_aux else value,
    params,
    key,
    "value_grad_and_hessian_diag",
    "the loss function",
    "at parameters and state made device-varying over the axis (distributed.device_varying; "
    "TrainState.apply_loss and adahessian_jax.nnx.value_grad_and_hessian_diag with axis_name "
    "do it) the loss",
    "Return this device's loss and reduce outside: pmean the returned loss and gradients over "
    "the axis (apply_loss and the nnx helper do), and tx (built with that axis_name) averages "
    "the estimate.",
  )


def value_grad_and_hessian_diag(
  fun: Callable[..., Any], has_aux: bool = False, *, refresh: bool | None = None
) -> Callable[..., tuple[Any, Any, Any]]:
  """Like :func:`jax.value_and_grad`, plus AdaHessian's Hessian-diagonal estimate.

  Example::

    vgh = adahessian_jax.value_grad_and_hessian_diag(loss_fn)

    @jax.jit
    def train_step(params, opt_state, batch):
      loss, grads, hdiag = vgh(params, opt_state, batch)
      updates, opt_state = tx.update(grads, opt_state, params, hessian_diag=hdiag)
      return optax.apply_updates(params, updates), opt_state, loss

  The probes come from the AdaHessian state's key exactly as in the closure
  route, so both routes give the same trajectory for the same seed; inside
  :func:`optax.masked` or :func:`optax.multi_transform` they are zero on the
  leaves of other transforms, as :func:`adahessian_jax.masked_value_fn` holds
  those fixed; inside :func:`optax.flatten` they are drawn for the one vector
  it hands the transform (pass the estimate raveled likewise). On steps
  that refresh the Hessian (every step when ``update_freq == 1``) the cost is
  one forward-over-reverse pass; on the other steps (chosen with ``lax.cond``
  from the state under ``jit``) one ``jax.value_and_grad``, and the returned
  estimate is zeros, which the transform ignores on those steps.

  If the estimate has a non-finite entry (e.g. a float16 overflow of ``Hz``)
  while the loss and gradient are finite, one entry of the returned gradient
  (the first of the first non-empty leaf AdaHessian owns; inside
  :func:`optax.masked` or :func:`optax.multi_transform` the leaves of other
  transforms are neither marked nor looked at) is NaN, so that
  :func:`optax.apply_if_finite` sees and counts the step. Without it,
  :func:`adahessian_jax.scale_by_adahessian` keeps that entry's momentum and
  the non-finite entries' curvature, so nothing non-finite reaches the state.
  Not when ``opt_state`` holds an :class:`optax.MultiSteps` state: its
  accumulator would keep the NaN on every later step (and that entry would
  never train again), so the gradient is returned as it is; the transform
  still keeps the non-finite entries' curvature and does not move the
  parameters on an optimizer step whose (last micro-batch's) estimate is
  not finite.

  With ``update_freq > 1`` a training loop that knows its step number can
  take the refresh decision on the host instead: build one step with
  ``refresh=True`` and one with ``refresh=False`` (passing the same value to
  ``tx.update``), compile both, and call the first when
  ``step % update_freq == 0``. Neither program has a conditional, so a
  non-refresh step costs what an Adam step costs. The step is the
  optimizer's, which :func:`optax.apply_if_finite` (on a skipped step) and
  :func:`optax.MultiSteps` (on a micro-step) do not advance: with those, follow
  the state's schedule (``refresh=None``)::

    def make_step(refresh):
      vgh = adahessian_jax.value_grad_and_hessian_diag(loss_fn, refresh=refresh)

      @jax.jit
      def train_step(params, opt_state, batch):
        loss, grads, hdiag = vgh(params, opt_state, batch)
        updates, opt_state = tx.update(
            grads, opt_state, params, hessian_diag=hdiag, refresh=refresh)
        return optax.apply_updates(params, updates), opt_state, loss

      return train_step

    steps = {True: make_step(True), False: make_step(False)}
    for step, batch in enumerate(batches):
      params, opt_state, loss = steps[step % update_freq == 0](params, opt_state, batch)

  Use this route when the step computes the gradient anyway (the usual
  training step): it is the fastest. Use the ``value_fn`` route when the
  transform should own everything, e.g. inside a library that only calls
  ``tx.update``.

  Args:
    fun: The loss, ``fun(params, *args, **kwargs)``, a real scalar (or
      ``(loss, aux)`` if ``has_aux``).
    has_aux: Whether ``fun`` returns ``(loss, aux)``.
    refresh: ``None`` (default) to follow the schedule in the state (a
      ``lax.cond`` under ``jit`` when ``update_freq > 1``), or a Python bool
      decided on the host (see above); see
      :func:`adahessian_jax.is_refresh_step`.

  Returns:
    A function ``(params, opt_state, *args, **kwargs) -> (value, grads,
    hessian_diag)``, where ``value`` is ``(loss, aux)`` if ``has_aux``, and
    ``opt_state`` contains one :class:`ScaleByAdaHessianState` (found with
    :func:`adahessian_jax.find_adahessian_state`). Pass ``hessian_diag`` to
    ``tx.update``.

  Raises:
    TypeError: for a ``fun`` that is not callable; when the returned function is
      called with arguments ``fun``'s signature cannot take after ``params``, a
      leaf of ``params`` that is not a real floating array (naming its path): it
      differentiates every leaf, also one that ``optax.masked`` keeps from AdaHessian; or
      with a ``refresh`` that is not a bool.
    ValueError: for a ``has_aux`` that is not a bool; when it is called with an ``opt_state``
      that holds no AdaHessian state, or more than one; for a bool ``refresh`` as
      :func:`adahessian_jax.is_refresh_step` does; and, under ``shard_map`` at ``params``
      and ``opt_state`` made device-varying over a data axis
      (:func:`adahessian_jax.distributed.device_varying`), for a loss reduced over that axis
      (``lax.pmean``), naming it: the gradient and estimate would be 1/P of this device's; for
      a leaf of ``params`` made device-varying over an axis that neither the state's key nor
      its moment varies over (the state not made device-varying with the params), or not over
      one the key varies over (the params left replicated), naming the leaf and the axis.
  """

  has_aux = _validation.flag("value_grad_and_hessian_diag: has_aux", has_aux)
  if not callable(fun):  # was Python's "'...' object is not callable" at the first call
    raise TypeError(
      f"value_grad_and_hessian_diag takes the loss function, fun(params, *args, **kwargs); got "
      f"{fun!r}. Pass the function itself: value_grad_and_hessian_diag(loss_fn)."
    )

  def wrapped(params, opt_state, *args, **kwargs):
    # Python's own error, from inside the trace, named neither the loss nor the fix.
    _validation.callable_with(
      fun,
      (params, *args),
      kwargs,
      "fun(params, *args, **kwargs)",
      "value_grad_and_hessian_diag(fun)(params, opt_state, *args, **kwargs) calls "
      "fun(params, *args, **kwargs): pass the loss's other arguments after opt_state.",
    )
    # Inside optax.masked another transform may own an integer leaf (a step counter), which
    # jax.jvp then refused with an error about float0 tangents.
    _validation.float_leaves(
      params,
      "value_grad_and_hessian_diag differentiates every leaf of params, so they",
      "Pass other leaves to the loss as arguments after opt_state, or use the value_fn route "
      "with adahessian_jax.masked_value_fn.",
    )
    state = _the_adahessian_state(opt_state)
    check_key_data(state.key)  # first: a stacked state's key says to update it inside jax.vmap
    owned = _owned(params, state.mu)
    mu = state.mu if owned is None else owned
    check_state_varies(params, state.key, mu, "value_grad_and_hessian_diag")
    accumulated = _accumulates_gradients(opt_state)
    loss = lambda p: fun(p, *args, **kwargs)

    def with_hessian():
      keys, _ = probe_keys(state)
      flat = _flattened(params, state.mu)
      value, grads, estimate = hutchinson.value_grad_and_diagonal(
        loss, params, keys, has_aux, name=_NAME, fix=_FIX, owned=owned, flat=flat
      )
      _check_own_loss(value, params, state.key, has_aux)
      if accumulated:  # the transform keeps the curvature of non-finite entries itself
        return value, grads, estimate
      return value, _mark_not_finite(grads, estimate, owned), estimate

    def without_hessian():
      checked = hutchinson.checked_loss(loss, _NAME, has_aux, _FIX)
      value, grads = jax.value_and_grad(checked, has_aux=has_aux)(params)
      _check_own_loss(value, params, state.key, has_aux)
      return value, grads, optax.tree.zeros_like(params)

    return on_refresh(is_refresh_step(state, refresh), with_hessian, without_hessian)

  return wrapped
