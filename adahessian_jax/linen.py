"""Flax Linen training with AdaHessian: a ``TrainState`` that forwards the loss.

``flax.training.train_state.TrainState.apply_gradients`` does not forward extra
keyword arguments to ``tx.update``, so AdaHessian's ``value_fn`` /
``hessian_diag`` cannot reach it. :class:`TrainState` here does, and adds
:meth:`TrainState.apply_loss`, which runs the fused one-pass route.

What the Hessian is taken of, for models with dropout and BatchNorm: the
training-mode loss of this step, as a function of the parameters only, with
everything else fixed: the same dropout key (so the same mask) in every
evaluation, and BatchNorm normalising with the statistics of the current batch
(which depend on the parameters and are differentiated through, exactly as for
the gradient). The running averages (``batch_stats``) are updated once per
step, from the loss's auxiliary output of the primal pass; Hessian-vector
products never update them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Self

import jax
import jax.numpy as jnp
import optax

from adahessian_jax import _validation, distributed, state
from adahessian_jax._extras import missing_extra
from adahessian_jax.fused import value_grad_and_hessian_diag

try:
  from flax.linen import fp8_ops
  from flax.training import train_state
except ImportError as e:
  raise missing_extra("flax", "adahessian_jax.linen", e) from e

# Flax's collection for values that the gradient overwrites instead of the optimizer updating them
# (fp8 scales and amax histories); TrainState.create keeps it out of the optimizer state.
_OWG = fp8_ops.OVERWRITE_WITH_GRADIENT
_NOT_GIVEN: Any = object()  # apply_gradients' expected_axis_name when the caller names no axis


def _has_owg(tree: Any) -> bool:
  return isinstance(tree, Mapping) and _OWG in tree


def _check_params(params: Any) -> None:
  """Raises unless ``params`` is free of Flax's non-trainable collections beside ``"params"``.

  ``TrainState.create(params=model.init(key, x))`` passes the whole variables dict; with a
  BatchNorm the loss (``apply_fn(params, x)``) then reads the running statistics from ``params``,
  and the optimizer steps them as parameters (by their gradient, its curvature estimate and the
  weight decay), silently.
  """
  held = _validation.flax_state_collections(params)
  if not held:
    return
  stats = ", batch_stats=variables['batch_stats']" if "batch_stats" in held else ""
  raise ValueError(
    f"TrainState.create: params holds the collection(s) {held} beside 'params', as the whole "
    "variables dict of model.init does, so the optimizer would step them as parameters (by "
    "their gradient, curvature and weight decay): BatchNorm's running statistics would drift "
    f"silently. Pass the collections apart: TrainState.create(params=variables['params']{stats}"
    ", ...), with the loss applying {'params': params, 'batch_stats': state.batch_stats}; "
    "apply(..., mutable=[...]) returns a cache or intermediates afresh."
  )


def _check_batch_stats(old: Any, new: Any) -> None:
  """Raises unless ``new`` has the leaves (by path) of ``old``, the running statistics it
  replaces.

  The usual slip is to store the whole dict of mutated collections (``{"batch_stats": {...}}``)
  or of variables: the next ``apply`` finds no statistics where the model looks for them and,
  with ``mutable=["batch_stats"]``, silently starts them afresh every step (the tree nesting one
  level deeper each time, so ``jax.jit`` retraces every step), and evaluation later fails
  naming a missing variable.
  """
  if old is None or new is None or not jax.tree.leaves(old):
    return
  if set(_validation.leaf_paths(new)) == set(_validation.leaf_paths(old)):
    return
  where = _validation.tree_difference(new, old, "the old one")
  raise ValueError(
    f"TrainState: the new batch_stats does not have the tree of the old one ({where}). Running "
    "statistics keep their tree from step to step. Pass the collection itself, not the dict of "
    "collections: TrainState.create(..., batch_stats=variables['batch_stats']) and "
    "state.replace(batch_stats=mutated['batch_stats']) with mutated from "
    "apply(..., mutable=['batch_stats']). For another model, build a new state with "
    "TrainState.create."
  )


def _replace(self: Any, **updates: Any) -> Any:
  """Returns a new object replacing the specified fields with new values (``batch_stats`` only
  by one with the tree of the old)."""
  if "batch_stats" in updates:
    _check_batch_stats(self.batch_stats, updates["batch_stats"])
  return dataclasses.replace(self, **updates)


def _check_fields(state: Any, kwargs: Mapping[str, Any]) -> None:
  """Raises unless every keyword of ``apply_gradients``' ``kwargs`` names a field of ``state``.

  They replace fields, as in Flax, and reach no optimizer: an extra argument meant for a member
  of ``tx`` failed in ``tx.update`` as missing, although it had been passed.
  """
  unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(state)})
  if not unknown:
    return
  names = ", ".join(f"{name}=" for name in unknown)
  raise TypeError(
    f"TrainState.apply_gradients got {names}, not a field of {type(state).__name__}: its keyword "
    "arguments other than value_fn, hessian_diag, refresh, value, expected_axis_name and "
    "expected_independent_probes replace fields, as in Flax, "
    "and reach no optimizer. To give tx.update other extra arguments, call it yourself: "
    "updates, opt_state = state.tx.update(grads, state.opt_state, state.params, "
    "value_fn=value_fn, **extra); state = state.replace(step=state.step + 1, "
    "params=optax.apply_updates(state.params, updates), opt_state=opt_state)."
  )


__all__ = ["TrainState"]


class TrainState(train_state.TrainState):
  """A Flax ``TrainState`` for optimizers that need the loss, such as AdaHessian.

  Example::

    state = TrainState.create(apply_fn=model.apply, params=variables["params"],
                              batch_stats=variables["batch_stats"], tx=adahessian(0.15))

    @jax.jit
    def train_step(state, batch, dropout_key):
      def loss_fn(params):
        logits, mutated = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, batch["x"], train=True,
            rngs={"dropout": dropout_key}, mutable=["batch_stats"])
        return cross_entropy(logits, batch["y"]), mutated["batch_stats"]

      state, (loss, batch_stats) = state.apply_loss(loss_fn, has_aux=True)
      return state.replace(batch_stats=batch_stats), loss

  Attributes:
    batch_stats: Optional non-trainable collection (e.g. BatchNorm running
      averages); ``None`` for models without one. ``replace`` (and
      ``apply_gradients``' keyword arguments) refuse one with other leaf paths
      than the current one, e.g. the whole dict of mutated collections.
  """

  batch_stats: Any = None

  if TYPE_CHECKING:  # set below (and for every subclass) to the checked _replace

    def replace(self, **updates: Any) -> Self: ...

  @classmethod
  def create(cls, *, apply_fn: Callable[..., Any], params: Any, tx: Any, **kwargs: Any) -> Self:
    """Like Flax's, but ``step`` starts as an int32 array, not the Python int ``0``.

    ``jax.jit`` keys its cache on a Python scalar apart from an array of the same
    dtype, so a ``step=0`` compiled the training step twice, for the first
    step and again for the ``step + 1`` array it returns. For the same reason,
    with parameters committed to devices (``jax.device_put(params, device)``,
    sharded arrays) the step and every uncommitted leaf of the optimizer state
    (optax's step counts) are committed, replicated, to the parameters' devices:
    ``jax.jit`` keys on committedness too, and commits its outputs.

    Args:
      apply_fn: The model's apply function.
      params: The parameters (``tx.init`` initialises ``opt_state`` from them).
      tx: The optimizer.
      **kwargs: Further fields (``batch_stats``).

    Returns:
      A new :class:`TrainState` at step 0.

    Raises:
      ValueError: for ``params`` holding ``batch_stats``, ``cache`` or
        ``intermediates`` beside ``params`` (the whole variables dict of
        ``model.init``), which the optimizer would step as parameters.
    """
    _check_params(params)
    created = super().create(apply_fn=apply_fn, params=params, tx=tx, **kwargs)
    # With committed params, an uncommitted step or state leaf (optax's counts, of any tx, not
    # only adahessian's, whose init commits its own) also compiled the step twice: jit keys on it
    # and commits its outputs (state.placed_like_params).
    placed = state.placed_like_params((jnp.zeros([], jnp.int32), created.opt_state), created.params)
    return created.replace(step=placed[0], opt_state=placed[1])

  def __init_subclass__(cls, **kwargs: Any) -> None:
    # Flax makes every subclass a dataclass with its own unchecked ``replace``.
    super().__init_subclass__(**kwargs)
    cls.replace = _replace

  def apply_gradients(
    self,
    *,
    grads: Any,
    value_fn: Callable[[Any], Any] | None = None,
    hessian_diag: Any = None,
    refresh: bool | None = None,
    expected_axis_name: Any = _NOT_GIVEN,
    expected_independent_probes: Any = _NOT_GIVEN,
    value: Any = None,
    **kwargs: Any,
  ) -> Self:
    """Like Flax's, but forwards ``value_fn`` / ``hessian_diag`` (and ``value``) to ``tx.update``.

    As in Flax, params with an ``_overwrite_with_gradient`` collection (fp8
    training) are ``{"params": ..., "_overwrite_with_gradient": ...}``: the
    optimizer steps ``params["params"]`` (so ``value_fn`` and ``hessian_diag``
    are of those only), and the other collection is replaced by its gradient.

    Args:
      grads: Gradients with the structure of ``params``.
      value_fn: The loss as a function of the params only (closure route).
      hessian_diag: A precomputed Hessian-diagonal estimate (fused route).
      refresh: A refresh decision taken on the host, passed to ``tx.update``
        (see :func:`adahessian_jax.value_grad_and_hessian_diag`); ``None``
        follows the schedule in the state.
      expected_axis_name: If given, passed to ``tx.update``: the axis (or
        ``None``) the gradients were averaged over, which ``tx`` must average
        the estimate over (see :func:`adahessian_jax.scale_by_adahessian`).
        :meth:`apply_loss` passes its ``axis_name`` through this method, so a
        subclass that overrides it (e.g. to update an EMA of the params) applies
        to both routes.
      expected_independent_probes: If given, passed to ``tx.update``: whether
        the probes of ``hessian_diag`` were each device's own, which ``tx``'s
        ``independent_probes`` must match (:meth:`apply_loss` passes it).
      value: The loss at the current params, passed to ``tx.update`` as optax's extra argument
        ``value``, which members of ``tx`` such as ``optax.contrib.reduce_on_plateau`` need
        (AdaHessian ignores it); :meth:`apply_loss` passes the loss it computes.
      **kwargs: Other attributes to ``.replace()``, as in Flax.

    Returns:
      The state after one step.

    Raises:
      TypeError: for a keyword in ``kwargs`` that names no field of the state (another extra
        argument meant for ``tx.update``, which this method does not forward), before
        ``tx.update`` runs.
    """
    _check_fields(self, kwargs)
    extra = {}
    if value_fn is not None:
      extra["value_fn"] = value_fn
    if hessian_diag is not None:
      extra["hessian_diag"] = hessian_diag
    if refresh is not None:
      extra["refresh"] = refresh
    if expected_axis_name is not _NOT_GIVEN:
      extra["expected_axis_name"] = expected_axis_name
    if expected_independent_probes is not _NOT_GIVEN:
      extra["expected_independent_probes"] = expected_independent_probes
    if value is not None:
      extra["value"] = value
    owg = _has_owg(grads)
    trained, params = (grads["params"], self.params["params"]) if owg else (grads, self.params)
    updates, opt_state = self.tx.update(trained, self.opt_state, params, **extra)
    params = optax.apply_updates(params, updates)
    if owg:
      params = {"params": params, _OWG: grads[_OWG]}
    return self.replace(step=self.step + 1, params=params, opt_state=opt_state, **kwargs)

  def apply_loss(
    self,
    loss_fn: Callable[..., Any],
    *args: Any,
    has_aux: bool = False,
    refresh: bool | None = None,
    axis_name: Any = None,
    independent_probes: bool = False,
    **kwargs: Any,
  ) -> tuple[Self, Any]:
    """One optimizer step from the loss, by the fused one-pass route.

    Computes loss, gradient and the Hessian-diagonal estimate with
    :func:`adahessian_jax.value_grad_and_hessian_diag` and applies them.

    Data parallel under ``pmap`` or ``shard_map`` (each device a part of the
    batch, the parameters replicated; for ``pmap``,
    ``distributed.replicate(state, axis_name)``, so that the step compiles
    once): pass the mapped ``axis_name``, and build
    ``tx`` with the same ``axis_name`` (and ``independent_probes``), which
    averages the estimate over it. This method differentiates the local loss at
    device-varying parameters (:func:`adahessian_jax.distributed.device_varying`),
    draws the probes from :func:`adahessian_jax.distributed.per_device_probe_state`
    with ``independent_probes``, and ``pmean``-s the gradients and the returned
    loss over ``axis_name``; ``aux`` stays each device's own (``pmean`` the
    ``batch_stats`` in it yourself if the replicas should share them; a
    BatchNorm synchronised over ``axis_name`` shares them already). The
    estimate is averaged by ``tx`` alone, so ``tx.update`` gets
    ``expected_axis_name=axis_name`` (and ``expected_independent_probes``) and
    raises unless its ``axis_name`` (and ``independent_probes``) is the
    same (a ``tx`` that averaged the estimate over another axis, or over none,
    would let the replicas drift apart)::

      tx = adahessian_jax.adahessian(0.1, axis_name="batch")
      state = TrainState.create(apply_fn=model.apply, params=params, tx=tx)
      step = jax.pmap(lambda s, b: s.apply_loss(loss_fn, b, axis_name="batch"),
                      axis_name="batch")

    Args:
      loss_fn: ``loss_fn(params, *args, **kwargs)``, a scalar (or
        ``(loss, aux)`` if ``has_aux``).
      *args: Positional arguments of ``loss_fn`` after ``params``.
      has_aux: Whether ``loss_fn`` returns ``(loss, aux)``.
      refresh: A refresh decision taken on the host, for both the fused pass
        and ``tx.update`` (see :func:`adahessian_jax.value_grad_and_hessian_diag`);
        ``None`` follows the schedule in the state.
      axis_name: The ``pmap`` / ``shard_map`` axis (or tuple of axes) the batch
        is split over, as given to ``tx``; ``None`` (the default) averages
        nothing over devices (a single device, or ``jit`` with sharded arrays).
      independent_probes: Each device draws its own probes, as ``tx`` built
        with ``independent_probes=True`` does; needs ``axis_name``. Warns if
        ``loss_fn`` reads other devices' parameters through a collective over
        ``axis_name`` (``nn.BatchNorm(axis_name=...)``), which biases the estimate.
      **kwargs: Keyword arguments of ``loss_fn`` (other than the four above,
        which this method takes).

    Returns:
      ``(new_state, value)`` where ``value`` is the loss (or ``(loss, aux)``)
      at the parameters before the step; with ``axis_name`` the loss is the
      mean over the devices.

    Raises:
      TypeError: if ``loss_fn``'s signature cannot take the arguments given,
        or its output does not match ``has_aux`` (a tuple without it, a lone
        value with it), or ``refresh`` is not a bool or ``None``.
      ValueError: for ``refresh`` as :func:`adahessian_jax.is_refresh_step`
        does, for params with an ``_overwrite_with_gradient`` collection
        (fp8 training), which this route would precondition like the
        parameters (use :meth:`apply_gradients` with ``value_fn``), for a
        ``tx`` without an AdaHessian transform (use :meth:`apply_gradients`),
        for an ``axis_name`` that no enclosing map binds or that is not
        ``tx``'s, for ``independent_probes`` without ``axis_name``, or other
        than ``tx``'s, for a ``has_aux`` or ``independent_probes`` that is not a bool, and
        under ``shard_map`` for a ``loss_fn`` reduced over ``axis_name`` (``lax.pmean``;
        it must be this device's loss).
    """
    has_aux = _validation.flag("TrainState.apply_loss: has_aux", has_aux)
    if _has_owg(self.params):
      raise ValueError(
        f"TrainState.apply_loss: params hold a {_OWG!r} collection (fp8 training), whose "
        "gradients are new values that overwrite it, not directions to precondition, but the "
        "fused route takes the Hessian of every leaf it is given. Compute the gradient of the "
        "whole params yourself and call apply_gradients(grads=grads, value_fn=...) with value_fn "
        f"a function of params['params'] (with params[{_OWG!r}] held fixed)."
      )

    state.check_fused_route_tx(
      self.opt_state,
      "TrainState.apply_loss",
      "this TrainState's tx",
      "Create it with tx=adahessian_jax.adahessian(...), or for another optimizer compute the "
      "gradients yourself and call apply_gradients(grads=grads).",
    )
    _validation.callable_with(
      loss_fn,
      (self.params, *args),
      kwargs,
      f"loss_fn(params, *args, **kwargs) with the {len(args)} positional and {len(kwargs)} keyword "
      "arguments given to TrainState.apply_loss after loss_fn",
      "Pass the loss's other arguments there (state.apply_loss(loss_fn, batch)), or close over "
      "them.",
    )

    params, opt_state = distributed.fused_pass_inputs(
      self.params,
      self.opt_state,
      axis_name,
      independent_probes,
      "TrainState.apply_loss",
      "tx",
      loss=lambda p: loss_fn(p, *args, **kwargs),
    )

    def checked(params, *args, **kwargs):
      out = loss_fn(params, *args, **kwargs)
      loss, aux = _validation.loss_and_aux(out, has_aux, "pass has_aux=True.")
      return (loss, aux) if has_aux else loss

    vgh = value_grad_and_hessian_diag(checked, has_aux=has_aux, refresh=refresh)
    value, grads, hdiag = vgh(params, opt_state, *args, **kwargs)
    if axis_name is not None:
      grads = jax.lax.pmean(grads, axis_name)
      value = (
        (jax.lax.pmean(value[0], axis_name), value[1])
        if has_aux
        else jax.lax.pmean(value, axis_name)
      )
    # tx raises unless it averages the estimate over the same axis (None too) as the gradients.
    # Through apply_gradients, which a subclass may override.
    new = self.apply_gradients(
      grads=grads,
      hessian_diag=hdiag,
      refresh=refresh,
      expected_axis_name=axis_name,
      expected_independent_probes=independent_probes,
      value=value[0] if has_aux else value,  # optax's extra argument (reduce_on_plateau's)
    )
    return new, value


TrainState.replace = _replace  # Flax set its own, unchecked
