"""``adahessian``: the ready-made optimizer, one :func:`optax.chain`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import jax
import jax.core
import jax.numpy as jnp
import numpy as np
import optax

from adahessian_jax import _validation, masking, spatial
from adahessian_jax.state import ScaleByAdaHessianState, placed_like_params
from adahessian_jax.transform import scale_by_adahessian

__all__ = ["STATIC_ARGS", "adahessian"]

#: Arguments of :func:`adahessian` that fix shapes, control flow or are
#: callables. With their defaults (``None``, ``"repeat"``, ``False``)
#: :func:`optax.inject_hyperparams` already treats them as static; when you give
#: them values, pass these names as ``static_args``.
STATIC_ARGS = (
  "block_size",
  "update_freq",
  "lazy_moment",
  "n_samples",
  "seed",
  "averaging",
  "weight_decay_mask",
  "mu_dtype",
  "nu_dtype",
  "independent_probes",
)


def _check_mask(mask: Any) -> None:
  """Raises for a ``weight_decay_mask`` that is a single boolean or array instead of a tree.

  ``optax.inject_hyperparams`` calls a callable argument that is not static as a schedule, with
  the step count: a mask function given the count returns one boolean (e.g. ``False`` from
  ``lambda p: jax.tree.map(lambda x: x.ndim > 1, p)``), which would silently decay no leaf, or
  every one.
  """
  if mask is None or callable(mask) or not jax.tree_util.treedef_is_leaf(jax.tree.structure(mask)):
    return
  raise ValueError(
    f"weight_decay_mask must be a pytree of booleans like the params, or a callable returning "
    f"one, got the single value {mask!r}. With optax.inject_hyperparams a mask function that is "
    "not static is called as a schedule with the step count: pass "
    "static_args=adahessian_jax.STATIC_ARGS. To decay every leaf or none, leave the mask None "
    "and set weight_decay (0 for none)."
  )


def _check_mask_tree(mask: Any, params: Any) -> None:
  """Raises unless ``mask`` (a tree, or a callable's result) is a pytree prefix of ``params``
  with booleans as leaves, naming the first entry that is not: ``optax.masked``'s own errors
  name no argument (a pytree-prefix dump, "the truth value of an array ... is ambiguous"), and a
  string or number leaf passed as true or false silently."""
  masks = jax.tree_util.tree_leaves_with_path(mask)
  for path, leaf in masks:
    if not (isinstance(leaf, bool | np.bool_) or (np.ndim(leaf) == 0 and _is_bool_array(leaf))):
      kind = f"an array of shape {np.shape(leaf)}" if np.ndim(leaf) else repr(leaf)
      raise TypeError(
        f"weight_decay_mask's leaf at {_validation.path_str(path)} is {kind}, not a boolean: "
        "the mask says per leaf of the params whether it is decayed (True or False; a mask per "
        "entry of a leaf is not supported)."
      )
  # A MaskedNode (inside optax.masked/multi_transform: a leaf another transform owns) counts.
  nodes = dict(jax.tree_util.tree_leaves_with_path(params, is_leaf=masking.is_masked))
  extra = _validation.prefix_mismatch([m for m, _ in masks], list(nodes))[0]
  if extra is not None:
    raise ValueError(
      f"weight_decay_mask has an entry at {_validation.path_str(extra)}, where the params have "
      "none: the mask must be a pytree of booleans like the params (or a prefix of them)."
    )
  # A MaskedNode needs an entry too, as optax.masked maps the mask over the params: a boolean
  # above or at it, or the empty node a mask function returns for it (it sees an empty node).
  empty = jax.tree_util.tree_leaves_with_path(mask, is_leaf=masking.is_masked)
  covering = [m for m, _ in masks] + [p for p, x in empty if masking.is_masked(x)]
  missing = _validation.prefix_mismatch(covering, list(nodes))[1]
  if missing is not None:
    fix = (
      ", which another transform of optax.masked or optax.multi_transform owns: the mask is "
      "matched against the whole tree the optimizer is given, so give it an entry there too "
      "(either boolean: this adahessian does not step that leaf), or make it a function of the "
      "params."
      if masking.is_masked(nodes[missing])
      else ": the mask must be a pytree of booleans like the params (or a prefix of them)."
    )
    raise ValueError(
      f"weight_decay_mask has no entry for the params leaf at {_validation.path_str(missing)}{fix}"
    )


def _is_bool_array(x: Any) -> bool:
  return isinstance(x, np.ndarray | jax.Array) and x.dtype == np.bool_


def _decayed_weights(weight_decay: Any, mask: Any) -> optax.GradientTransformation:
  """``optax.add_decayed_weights``, its mask checked against the params at ``init``."""
  inner = optax.add_decayed_weights(weight_decay, mask)
  if mask is None:
    return inner

  def init_fn(params):
    # Not on a tree without leaves: optax.tree.map_params (so distributed.state_shardings) calls
    # init on a leafless placeholder to find the parameter-shaped fields, which a mask does not fit.
    if jax.tree.leaves(params):
      _check_mask_tree(mask(params) if callable(mask) else mask, params)
    return inner.init(params)

  def update_fn(updates, state, params=None):
    if not isinstance(state, optax.MaskedState):  # optax: "'EmptyState' ... no 'inner_state'"
      raise TypeError(
        f"adahessian with a weight_decay_mask got {type(state).__name__} where its mask keeps an "
        f"optax.MaskedState: {_OTHER_STATE}"
      )
    return inner.update(updates, state, params)

  return optax.GradientTransformation(init_fn, update_fn)


#: Why a member of adahessian's chain got another member's state: the optimizer state was made by
#: an adahessian built otherwise (a schedule's count and a mask's state are kept only with them).
_OTHER_STATE = (
  "the optimizer state was made by an adahessian built otherwise (a constant learning_rate, or no "
  "weight_decay_mask). Build the optimizer as the state was, or start again from tx.init(params)."
)

_SCHEDULE_FIX = (
  "A schedule takes optax's step count (0 on the first update) and returns that step's rate, as "
  "optax.linear_schedule and optax.warmup_cosine_decay_schedule do."
)


def _checked_schedule(schedule: Callable[[Any], Any]) -> optax.Schedule:
  """``schedule`` with its rates checked: called now with step 0 (the first update's rate), and
  where :func:`optax.scale_by_learning_rate` calls it.

  optax multiplies the updates by the rate as it is: a schedule's ``inf`` at step 0 (an inverse
  square root of the count) made every parameter infinite, and a rate of shape ``(2,)`` broadcast
  scalar parameters to that shape, both without an error. Under ``jit`` a rate's value is not
  known, so there only its shape and dtype are checked.
  """
  _validation.callable_with(schedule, (0,), {}, "learning_rate(count)", _SCHEDULE_FIX)

  def checked(count: Any) -> Any:
    if _validation.array_dtype(count) is None:  # EmptyState().count is tuple's count method
      raise TypeError(
        "adahessian with a learning_rate schedule got no step count in its state (the "
        f"schedule's count was {count!r}): {_OTHER_STATE}"
      )
    rate = schedule(count)
    _check_rate(rate, count)
    return rate

  checked(jnp.zeros([], jnp.int32))  # as optax calls it on the first update
  return checked


def _check_rate(rate: Any, count: Any) -> None:
  """Raises unless the learning-rate schedule's ``rate`` at ``count`` is a real scalar (and,
  where it is concrete, finite and >= 0)."""
  if isinstance(rate, jax.core.Tracer):
    dtype = rate.dtype
    if rate.shape != () or not _validation.real_dtype(dtype):
      raise ValueError(
        f"learning_rate's schedule must return a real scalar, got an array of shape {rate.shape} "
        f"and dtype {dtype}: the updates are multiplied by it, so a vector would broadcast the "
        f"parameters to its shape. {_SCHEDULE_FIX}"
      )
    return
  step = "count" if isinstance(count, jax.core.Tracer) else int(count)
  try:
    _validation.interval(
      f"learning_rate's schedule at step {step}", rate, 0.0, float("inf"), hi_open=True
    )
  except ValueError as e:
    value = _validation.real_scalar(rate)  # inf or NaN (0 · inf) where the count is 0
    zero = step == 0 and value is not None and not np.isfinite(value)
    raise ValueError(
      f"{e} optax's count is 0 on the first update: a schedule that divides by it (an inverse "
      "square root) is infinite there; shift it: lambda count: lr * jax.lax.rsqrt(count + 1.0)."
      if zero
      else f"{e} {_SCHEDULE_FIX}"
    ) from None


def adahessian(
  learning_rate: optax.ScalarOrSchedule = 0.15,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-4,
  weight_decay: jax.typing.ArrayLike = 0.0,
  *,
  hessian_power: jax.typing.ArrayLike = 1.0,
  curvature_floor: jax.typing.ArrayLike = 0.0,
  update_clip: jax.typing.ArrayLike | None = None,
  curvature_clip: jax.typing.ArrayLike | None = None,
  weight_decay_mask: Any | Callable[[optax.Params], Any] | None = None,
  block_size: int | None = None,
  update_freq: int | None = None,
  lazy_moment: str = "repeat",
  n_samples: int | None = None,
  seed: int | None = None,
  axis_name: Any = None,
  independent_probes: bool = False,
  averaging: spatial.AveragingSpec = None,
  mu_dtype: jax.typing.DTypeLike | None = None,
  nu_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""The AdaHessian optimizer (Yao et al., 2021) with decoupled weight decay.

  With the defaults, exactly the official rule
  ``p ← p − lr · (m̂ / (v̂^{k/2} + eps) + wd · p)``:

  .. code-block:: python

    optax.chain(
        scale_by_adahessian(b1, b2, eps, hessian_power, ...),
        optax.add_decayed_weights(weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )

  Every update needs the loss (except one passed ``refresh=False``, with
  ``update_freq > 1``): pass ``value_fn=lambda p: loss_fn(p, batch)``
  (or a precomputed ``hessian_diag``) to ``update``; see
  :func:`adahessian_jax.scale_by_adahessian`.

  Example, with the recommended stabilizers (the README's configuration; the
  defaults are the paper's exact rule, which a near-zero curvature estimate can
  send to a step of ``lr·g/eps``)::

    tx = adahessian_jax.adahessian(0.15, curvature_floor=0.3, update_clip=0.05)
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, batch):
      loss, grads = jax.value_and_grad(loss_fn)(params, batch)
      updates, opt_state = tx.update(
          grads, opt_state, params, value_fn=lambda p: loss_fn(p, batch))
      return optax.apply_updates(params, updates), opt_state, loss

  Args:
    learning_rate: A finite float >= 0 or an optax schedule. The default 0.15 is the
      official image-classification code's; the paper used 0.047 with
      inverse-sqrt warm-up for translation. A schedule is called here with step
      0 (the first update's), and must return a real scalar, finite and >= 0
      (checked where its value is concrete, and its shape under ``jit`` too).
    b1: Decay rate of the gradient's moving average.
    b2: Decay rate of the moving average of the squared Hessian diagonal.
    eps: Added to the denominator outside the power (official default 1e-4),
      finite and > 0.
    weight_decay: Decoupled weight decay, multiplied by the learning rate,
      finite and >= 0.
    hessian_power: The power ``k`` in [0, 1] of the Hessian-diagonal term.
    curvature_floor: Per-leaf relative floor ``α`` of the Hessian diagonal
      (0: the paper's rule; recommended 0.3); see
      :func:`adahessian_jax.scale_by_adahessian`.
    update_clip: Elementwise bound ``ρ`` of the preconditioned update before
      the learning rate (``None``: the paper's rule; recommended 0.05).
    curvature_clip: Bound ``c`` of a refresh step's root-mean-square curvature
      over the model, relative to that of the curvature so far; a step above it
      has its curvature and gradient scaled down together, so that one batch
      with a far too large loss does not stall the run (``None``: the paper's
      rule); see :func:`adahessian_jax.scale_by_adahessian`.
    weight_decay_mask: A pytree of booleans like the params (or a prefix of
      them), or a callable returning one, selecting which leaves are decayed;
      ``init`` checks it against the params, naming an entry that does not fit.
      Inside :func:`optax.masked` or :func:`optax.multi_transform` a tree needs
      entries for the other transforms' leaves too (any boolean).
    block_size: Block size of the default spatial averaging of rank-2 kernels
      (``None``: 1, no blocks); refused beside an ``averaging`` that is one rule
      for every leaf (give that rule the block size).
    update_freq: Refresh the Hessian every ``update_freq`` steps (``None``: 1).
    lazy_moment: ``"repeat"`` (stored ``D`` enters ``nu`` every step) or
      ``"refresh"`` (``nu`` moves on refresh steps only; Adam-sized state).
    n_samples: Hutchinson probes per refresh (``None``: 1).
    seed: Seed of the probes' PRNG key (``None``: 0).
    axis_name: Mapped axis to average the Hessian estimate over.
    independent_probes: With ``axis_name``, a different probe on every device
      (lower variance, no longer the exact single-device result).
    averaging: Spatial-averaging rules (see :func:`scale_by_adahessian`).
    mu_dtype: Floating dtype of the first moment (16 bits or more).
    nu_dtype: Floating dtype of the second moment and the stored Hessian diagonal
      (see :func:`scale_by_adahessian`; not float16, nor 8 bits).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Raises:
    ValueError: at construction, for a ``learning_rate`` or ``weight_decay`` out of range (a
      schedule whose rate at step 0 is not a finite real scalar >= 0), a ``weight_decay_mask``
      that is a single value, not a tree; at ``init``, for a mask with an entry where the params
      have none, or none for a leaf; and what :func:`scale_by_adahessian` raises.
    TypeError: at ``init``, for a mask leaf that is not a boolean; at ``update``, for a state
      that is not this chain's (another optimizer's, ``scale_by_adahessian``'s alone, or one made
      with another ``learning_rate`` kind or ``weight_decay_mask``); and what
      :func:`scale_by_adahessian` raises.

  References:
    Yao et al., `ADAHESSIAN: An Adaptive Second Order Optimizer for Machine
    Learning <https://arxiv.org/abs/2006.00719>`_, AAAI 2021.
  """
  _validation.hyperparameter("weight_decay", weight_decay, 0.0, float("inf"), hi_open=True)
  _check_mask(weight_decay_mask)
  if callable(learning_rate):
    learning_rate = _checked_schedule(learning_rate)
  else:
    _validation.hyperparameter("learning_rate", learning_rate, 0.0, float("inf"), hi_open=True)
  chain = optax.chain(
    scale_by_adahessian(
      b1,
      b2,
      eps,
      hessian_power,
      curvature_floor=curvature_floor,
      update_clip=update_clip,
      curvature_clip=curvature_clip,
      block_size=block_size,
      update_freq=update_freq,
      lazy_moment=lazy_moment,
      n_samples=n_samples,
      seed=seed,
      axis_name=axis_name,
      independent_probes=independent_probes,
      averaging=averaging,
      mu_dtype=mu_dtype,
      nu_dtype=nu_dtype,
    ),
    # A real scalar (checked above); optax names float | Array | schedule, and multiplies.
    _decayed_weights(cast(float | jax.Array, weight_decay), weight_decay_mask),
    optax.scale_by_learning_rate(learning_rate),
  )
  # The other members' state too (a schedule's count; scale_by_adahessian's init commits only its
  # own), committed where the params are: a jitted step compiles once.
  init = lambda params: placed_like_params(chain.init(params), params)

  def update(updates, state, params=None, **extra_args):
    _check_chain_state(state)
    return chain.update(updates, state, params, **extra_args)

  return chain._replace(init=init, update=update)


def _check_chain_state(state: Any) -> None:
  """Raises unless ``state`` has the three members of ``adahessian``'s chain: optax's error for
  another optimizer's state (Adam's pair, or ``scale_by_adahessian``'s own state, which
  :func:`adahessian_jax.find_adahessian_state` returns) says to call ``init`` first."""
  if isinstance(state, ScaleByAdaHessianState):
    raise TypeError(
      "adahessian's update got a ScaleByAdaHessianState, the state of scale_by_adahessian alone "
      "(what find_adahessian_state returns): adahessian's state is the tuple of its chain's three "
      "states that tx.init(params) returns. To change a field of the state, use "
      "adahessian_jax.map_adahessian_state(fn, opt_state)."
    )
  if isinstance(state, tuple) and len(state) != 3:
    got = (
      f"an {type(state).__name__}"  # a NamedTuple: optax.inject_hyperparams's state, say
      if hasattr(state, "_fields")
      else f"a tuple of {len(state)} states ({', '.join(type(s).__name__ for s in state)})"
    )
    raise TypeError(
      f"adahessian's update got {got} where its init makes a tuple of 3 (scale_by_adahessian's, "
      "the weight decay's and the learning rate's): the state of another optimizer. Pass the "
      "state tx.init(params) returns, or restore a checkpoint of this optimizer."
    )
