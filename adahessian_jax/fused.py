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

from collections.abc import Callable
from typing import Any

import jax
import optax

from adahessian_jax import hutchinson
from adahessian_jax.transform import ScaleByAdaHessianState, is_refresh_step, probe_keys

__all__ = ["find_adahessian_state", "value_grad_and_hessian_diag"]


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
  is_state = lambda x: isinstance(x, ScaleByAdaHessianState)
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(x)]
  if len(found) != 1:
    raise ValueError(
      f"expected exactly one ScaleByAdaHessianState in the optimizer state, found {len(found)}."
    )
  return found[0]


def value_grad_and_hessian_diag(
  fun: Callable[..., Any], has_aux: bool = False
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
  route, so both routes give the same trajectory for the same seed. On steps
  that refresh the Hessian (every step when ``update_freq == 1``) the cost is
  one forward-over-reverse pass; on the other steps (chosen with ``lax.cond``
  from the state under ``jit``) one ``jax.value_and_grad``, and the returned
  estimate is zeros, which the transform ignores on those steps.

  Use this route when the step computes the gradient anyway (the usual
  training step): it is the fastest. Use the ``value_fn`` route when the
  transform should own everything, e.g. inside a library that only calls
  ``tx.update``.

  Args:
    fun: The loss, ``fun(params, *args, **kwargs)``, a real scalar (or
      ``(loss, aux)`` if ``has_aux``).
    has_aux: Whether ``fun`` returns ``(loss, aux)``.

  Returns:
    A function ``(params, opt_state, *args, **kwargs) -> (value, grads,
    hessian_diag)``, where ``value`` is ``(loss, aux)`` if ``has_aux``, and
    ``opt_state`` contains one :class:`ScaleByAdaHessianState` (found with
    :func:`find_adahessian_state`). Pass ``hessian_diag`` to ``tx.update``.
  """

  def wrapped(params, opt_state, *args, **kwargs):
    state = find_adahessian_state(opt_state)
    loss = lambda p: fun(p, *args, **kwargs)
    keys, _ = probe_keys(state)
    refresh = is_refresh_step(state)

    def with_hessian():
      return hutchinson.value_grad_and_diagonal(loss, params, keys, has_aux)

    def without_hessian():
      value, grads = jax.value_and_grad(loss, has_aux=has_aux)(params)
      return value, grads, optax.tree.zeros_like(params)

    if refresh is True:
      return with_hessian()
    if not isinstance(refresh, jax.core.Tracer):
      return with_hessian() if bool(refresh) else without_hessian()
    return jax.lax.cond(refresh, with_hessian, without_hessian)

  return wrapped
