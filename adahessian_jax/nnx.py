"""Flax NNX training with AdaHessian.

``flax.nnx.Optimizer.update(model, grads, **kwargs)`` forwards keyword arguments
to ``tx.update``, but a ``value_fn`` then receives the parameters as an
``nnx.State``, not the module. These helpers bridge that:

* :func:`value_fn` builds the closure for the ``value_fn`` route::

    optimizer.update(model, grads, value_fn=adahessian_jax.nnx.value_fn(model, loss_fn, x, y))

* :func:`value_grad_and_hessian_diag` is the fused one-pass route::

    loss, grads, hdiag = adahessian_jax.nnx.value_grad_and_hessian_diag(
        loss_fn, model, optimizer, x, y)
    optimizer.update(model, grads, hessian_diag=hdiag)

Both evaluate ``loss_fn(module, ...)`` on a copy of ``model`` rebuilt from the
given parameters; the module's other state (BatchNorm statistics, RNG counters)
is read, and only the fused route writes it back, once, from its primal pass.
Build the closure before computing the gradient so both see the same dropout
RNG state (the same mask).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from adahessian_jax import fused
from adahessian_jax._extras import missing_extra

try:
  from flax import nnx
except ImportError as e:
  raise missing_extra("flax", "adahessian_jax.nnx", e) from e

__all__ = ["value_fn", "value_grad_and_hessian_diag"]


def _split(model, wrt):
  graphdef, params, rest = nnx.split(model, wrt, ...)
  return graphdef, params, nnx.as_pure(rest)


def value_fn(
  model: nnx.Module, loss_fn: Callable[..., Any], *args, wrt: Any = nnx.Param, **kwargs
) -> Callable[[Any], Any]:
  """The loss as a function of the parameter state, for ``Optimizer.update(value_fn=...)``.

  Args:
    model: The module.
    loss_fn: ``loss_fn(module, *args, **kwargs)`` returning a scalar.
    *args: Positional arguments after the module.
    wrt: The optimizer's ``wrt`` filter (default ``nnx.Param``).
    **kwargs: Keyword arguments of ``loss_fn``.

  Returns:
    A function of the (pure) parameter state, as ``nnx.Optimizer`` passes it.
  """
  graphdef, _, rest = _split(model, wrt)
  return lambda params: loss_fn(nnx.merge(graphdef, params, rest), *args, **kwargs)


def value_grad_and_hessian_diag(
  loss_fn: Callable[..., Any],
  model: nnx.Module,
  optimizer: nnx.Optimizer,
  *args,
  has_aux: bool = False,
  **kwargs,
) -> tuple[Any, Any, Any]:
  """Loss, gradient and AdaHessian's Hessian-diagonal estimate of an NNX module.

  One forward-over-reverse pass (see
  :func:`adahessian_jax.value_grad_and_hessian_diag`), with the probes of the
  optimizer's AdaHessian state. The module's non-parameter state mutated by the
  loss (BatchNorm statistics, RNG counters, and Variables the call creates, such
  as ``Module.sow``'s intermediates) is written back to ``model`` once.

  Args:
    loss_fn: ``loss_fn(module, *args, **kwargs)``, a scalar (or ``(loss, aux)``
      if ``has_aux``).
    model: The module.
    optimizer: The ``nnx.Optimizer`` holding the AdaHessian state.
    *args: Positional arguments of ``loss_fn`` after the module.
    has_aux: Whether ``loss_fn`` returns ``(loss, aux)``.
    **kwargs: Keyword arguments of ``loss_fn``.

  Returns:
    ``(value, grads, hessian_diag)``: pass ``grads`` and
    ``hessian_diag=hessian_diag`` to ``optimizer.update(model, ...)``.
  """
  graphdef, params, rest = _split(model, optimizer.wrt)

  def loss_of(p):
    module = nnx.merge(graphdef, p, rest)
    out = loss_fn(module, *args, **kwargs)
    _, _, new_rest = nnx.split(module, optimizer.wrt, ...)
    loss, aux = out if has_aux else (out, None)
    # Variables, not plain values: nnx.update can only add a Variable the call created (sow).
    return loss, (aux, new_rest)

  vgh = fused.value_grad_and_hessian_diag(loss_of, has_aux=True)
  (loss, (aux, new_rest)), grads, hdiag = vgh(params, nnx.as_pure(optimizer.opt_state))
  nnx.update(model, new_rest)
  return ((loss, aux) if has_aux else loss), grads, nnx.as_pure(hdiag)
