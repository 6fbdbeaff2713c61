"""``scale_by_adahessian``: the AdaHessian preconditioner as an optax transform."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp
import optax

from adahessian_jax import _transform_checks as checks
from adahessian_jax import _validation, _wrappers, hutchinson, spatial
from adahessian_jax._axes import (
  check_estimate_varies,
  check_loss_varies,
  check_names,
  device_varying,
  nonnegative_total,
  shard_count,
  split_leaves,
  sum_over_shards,
)
from adahessian_jax._coupling import warn_if_loss_couples_devices
from adahessian_jax._validation import STATIC_FIX
from adahessian_jax.state import (
  FLOAT16_NU,
  ScaleByAdaHessianState,
  is_refresh_step,
  moment_steps,
  on_refresh,
  placed_like_params,
  probe_keys,
  refresh_key,
)

__all__ = ["scale_by_adahessian"]


def _stored_update_freq(update_freq: int) -> jax.Array | None:
  """What a state holds of ``update_freq``: with lazy refresh (``update_freq > 1``) the interval
  as an int32 array, which the fused route and :func:`adahessian_jax.is_refresh_step` read the
  schedule from; ``None`` without."""
  return jnp.asarray(update_freq, jnp.int32) if update_freq > 1 else None


def _schedule_of(state: ScaleByAdaHessianState, update_freq: int, value_fn: Any) -> Any:
  """``state`` with the transform's ``update_freq``, if the transform computes the estimate
  (``value_fn``) of a lazy state: the schedule its refresh follows.

  Under ``jit`` a resumed state made with another frequency (which ``checks.check_state``
  refuses outside ``jit``) then refreshes on the transform's schedule from its first step, not
  on the state's. A given ``hessian_diag`` was made on the state's schedule (the fused route
  reads it from the state), so there the state's decides that step.
  """
  if value_fn is None or state.update_freq is None:
    return state
  return state._replace(update_freq=_stored_update_freq(update_freq))


def _estimate(
  value_fn: Any,
  hessian_diag: Any,
  params: Any,
  keys: jax.Array,
  like: Any,
  axis_name: Any,
  independent_probes: bool = False,
) -> tuple[Any, jax.Array]:
  """``(the signed Hessian-diagonal estimate of this step in the dtypes of ``like``, whether
  every entry of it is finite)``.

  From ``value_fn`` by Hutchinson's method with the probes of ``keys``
  (:func:`_hutchinson`), or the given ``hessian_diag``; averaged over ``axis_name`` when it is
  set.
  """
  if value_fn is not None:
    estimate = _hutchinson(value_fn, params, keys, axis_name, independent_probes)
  else:
    estimate = checks.given_estimate(hessian_diag, like)
    if axis_name is not None:
      check_estimate_varies(estimate, axis_name)
  # Tested before a cast that keeps every value (bfloat16 params, float32 moments): the same
  # reduction as the fused route's mark on hessian_diag, which XLA then computes once (after the
  # cast it was a second pass over the estimate). After the average over axis_name, on which
  # every device agrees.
  widening = all(
    jnp.promote_types(jnp.result_type(e), jnp.result_type(x)) == jnp.result_type(x)
    for e, x in zip(jax.tree.leaves(estimate), jax.tree.leaves(like), strict=True)
  )
  mark = hutchinson.not_finite_mark(estimate) if widening and axis_name is None else None
  # Average in the moments' dtype (e.g. float32 for bfloat16 params).
  estimate = optax.tree.cast_like(estimate, like)
  if axis_name is not None:
    estimate = jax.lax.pmean(estimate, axis_name)
  if mark is None:
    mark = hutchinson.not_finite_mark(estimate)
  return estimate, jnp.isfinite(mark)


def _hutchinson(
  value_fn: Any, params: Any, keys: jax.Array, axis_name: Any, independent_probes: bool
) -> Any:
  """This device's Hutchinson estimate ``z ⊙ Hz`` of ``value_fn`` at ``params`` (one probe per
  row of ``keys``, averaged).

  With ``axis_name``, ``value_fn`` is this device's loss, differentiated at device-varying
  ``params``; with ``independent_probes``, warns if ``value_fn`` couples the devices (after
  ``value_fn`` and ``params`` have passed the checks, so that they are traced only as they will be
  called).
  """
  checks.check_value_fn(value_fn, params)
  if axis_name is not None:
    params, keys = device_varying((params, keys), axis_name)
    if independent_probes:
      warn_if_loss_couples_devices(value_fn, params, axis_name, "scale_by_adahessian")
  try:
    value, _, estimate = hutchinson.value_grad_and_diagonal(value_fn, params, keys, name="value_fn")
  except Exception as e:
    # A loss written for the parameter tree fails on optax.flatten's vector ("JAX does not
    # support string indexing"), which names neither the wrapper nor the fix.
    if "optax.flatten" in _wrappers.calling():
      e.add_note(checks.FLATTENED_VALUE_FN)
    raise
  if axis_name is not None:
    check_loss_varies(
      value,
      params,
      keys,
      "scale_by_adahessian",
      "value_fn",
      f"with axis_name={axis_name!r} value_fn",
      "Pass this device's loss (pmean only the loss you log), or, for a loss of the global "
      "batch, axis_name=None.",
    )
  return estimate


def _curvature(
  estimate: Any,
  finite: jax.Array,
  rules: Any,
  curvature_floor: Any,
  curvature_clip: Any,
  so_far: Callable[[], jax.Array],
) -> tuple[Any, jax.Array, jax.Array | None]:
  """``(D, finite, scale)``: ``D`` is the estimate's absolute value, spatially averaged, floored
  per leaf (or layer) and scaled down by ``scale`` (:func:`_spike_scale`; ``None`` without
  ``curvature_clip``); ``finite`` whether every entry of the estimate is (from
  :func:`_estimate`); ``so_far()`` the model's root-mean-square curvature so far
  (:func:`_rms_curvature_so_far`)."""
  d = spatial.apply_rules(rules, jax.tree.map(jnp.abs, estimate))
  if not _validation.is_static_zero(curvature_floor):
    sums = _leaf_sums(rules, estimate)
    model_mean = _model_mean([jnp.sum(x) for x in jax.tree.leaves(sums)], estimate)
    d = _floored(d, sums, rules, curvature_floor, model_mean)
  if curvature_clip is None:
    return d, finite, None
  scale = _spike_scale(d, so_far(), curvature_clip)
  return jax.tree.map(lambda x: x * scale.astype(x.dtype), d), finite, scale


def _mean_axes(rule: Any, x: Any) -> tuple[int, ...]:
  """The axes a leaf's (or, with stacked layers, a layer's) mean is taken over."""
  return tuple(i for i in range(x.ndim) if i not in rule.layer_axes(x.shape))


def _leaf_sums(rules: Any, estimate: Any) -> Any:
  """The sums of ``|estimate|`` over each leaf (or layer), keeping dimensions.

  Averaging keeps each group's sum, so D's means are |estimate|'s. Taken from the estimate (|e|
  written max(e, -e)), they cost one read of it; from D, XLA:CPU writes D out and reads it back
  (measured: +2 passes over the parameters). Mapped over the rules, whose leaves are Rule
  objects: the estimate's own nodes (tuples, NamedTuples, optax.MaskedNode) then stay nodes.
  """
  return jax.tree.map(
    lambda r, e: jnp.sum(jnp.maximum(e, -e), _mean_axes(r, e), keepdims=True, dtype=_sum_dtype(e)),
    rules,
    estimate,
    is_leaf=spatial.is_rule,
  )


def _model_mean(totals: list[jax.Array], like: Any) -> jax.Array:
  """The mean over the whole model of the entries whose per-leaf sums are ``totals`` (leaves
  like ``like``), split kernels' other shards included (inside ``shard_map``), so that every
  shard agrees on it."""
  # Counted in floats: an int32 count overflows beyond 2**31 - 1 parameters.
  size = sum(float(x.size) * shard_count(x) for x in jax.tree.leaves(like))
  return nonnegative_total([sum_over_shards(t) for t in totals]) / jnp.maximum(size, 1.0)


def _floored(d: Any, sums: Any, rules: Any, curvature_floor: Any, model_mean: jax.Array) -> Any:
  """``D`` raised to at least ``curvature_floor`` times its leaf's (or layer's) mean, or the
  model's ``model_mean`` for a leaf whose ``D`` is zero everywhere."""

  def floored(r, x, s):
    mean = s / float(math.prod(x.shape[i] for i in _mean_axes(r, x)))  # int32 overflows
    floor = curvature_floor * jnp.where(mean > 0, mean, model_mean)
    # A traced floor of 0 (optax.inject_hyperparams injects the default) leaves D as a static 0
    # does: 0 times a leaf's non-finite mean would make the whole leaf's D non-finite.
    floor = jnp.where(curvature_floor > 0, floor, 0)
    return jnp.maximum(x, floor.astype(x.dtype))

  return jax.tree.map(floored, rules, d, sums, is_leaf=spatial.is_rule)


# The curvature clip compares a step with at least this many steps of nu's average: over the first
# steps a run leaves its initialisation, and its curvature can rise 48-fold in one step (the quick
# digits CNN without warm-up, from step 1 to 2), which is no spike.
CURVATURE_CLIP_AFTER = 10


def _rms_curvature_so_far(nu: Any, b2: Any, previous: jax.Array) -> jax.Array:
  """The root mean square over the model of the curvature so far, ``sqrt(mean(v̂))`` after
  ``previous`` steps of ``nu``'s bias correction; 0 (no clip) before ``CURVATURE_CLIP_AFTER``."""
  sums = [jnp.sum(jnp.abs(v), dtype=_sum_dtype(v)) for v in jax.tree.leaves(nu)]
  mean = _model_mean(sums, nu)
  corrected = mean / (1 - b2 ** jnp.maximum(previous, 1)).astype(mean.dtype)
  return jnp.where(previous >= CURVATURE_CLIP_AFTER, jnp.sqrt(corrected), jnp.zeros_like(corrected))


# The squares of D / (the RMS so far) are summed times 2**-64 (an exact power of two): in float32
# a spike up to ~1e28 times the curvature so far, not only 1e19, keeps its mean square finite.
_SQUARES_UNIT = 2.0**32
# A finite D whose mean square passes that range is measured again in units 2**64 times larger:
# up to float32's largest D, unless the RMS so far is under ~1e-10.
_COARSE = 2.0**-64


def _spike_scale(d: Any, so_far: jax.Array, curvature_clip: Any) -> jax.Array:
  """The factor that brings the root mean square of ``D`` over the model down to
  ``curvature_clip`` times ``so_far`` (:func:`_rms_curvature_so_far`); 1 where it is not above
  it, where there is no curvature so far (0), and where ``D`` is not finite (an estimate that is
  not: its own check keeps that step's curvature).

  Second moments on both sides: ``nu`` averages ``D²``, so on a step like the earlier ones the
  ratio is near 1 however heavy the tails of a single probe's ``D``."""
  unit = jnp.where(so_far > 0, so_far, jnp.ones_like(so_far)) * _SQUARES_UNIT
  mean_square = lambda k: _model_mean(
    [
      jnp.sum(jnp.square(x / unit.astype(x.dtype) * k), dtype=_sum_dtype(x))
      for x in jax.tree.leaves(d)
    ],
    d,
  )
  ratio = mean_square(1.0)  # mean((D / so_far)²) / _SQUARES_UNIT²
  # Cast before the division: an injected float16 c (float16 params, inject_hyperparams's default
  # dtype) divided by 2**32 in float16 flushed to 0, which clipped every step from step 11 on.
  bound = jnp.asarray(curvature_clip).astype(ratio.dtype) / _SQUARES_UNIT  # an injected c: wider
  # Where that overflows, that times _COARSE²: a second pass over D on such a step only.
  fine = jnp.isfinite(ratio)
  ratio = jax.lax.cond(fine, lambda: ratio, lambda: mean_square(_COARSE))
  bound = jnp.where(fine, bound, bound * _COARSE)
  over = (so_far > 0) & jnp.isfinite(ratio) & (ratio > jnp.square(bound))
  # Not sqrt(bound² / ratio): that square of the scale flushes to 0 in float32 from a spike of
  # ~1e19 times c on (the scale itself, down to ~1e-38, is no smaller than it needs).
  return jnp.where(over, bound / jnp.sqrt(jnp.where(over, ratio, 1)), jnp.ones_like(ratio))


def _sum_dtype(x: jax.Array) -> Any:
  """Sums of half-precision estimates accumulate in float32."""
  return jnp.promote_types(x.dtype, jnp.float32)


def _scale_dtype(nu: Any) -> Any:
  """The dtype of a curvature clip's scale: that of the model's means (:func:`_model_mean`),
  which average the estimate cast to ``nu``'s dtypes."""
  return jnp.result_type(*(_sum_dtype(v) for v in jax.tree.leaves(nu)))


def _scaled(grads: Any, scale: jax.Array | None) -> Any:
  """``grads`` times a curvature clip's ``scale`` (unchanged for ``None``), in their dtypes; a
  non-finite entry stays non-finite (it keeps its ``mu``)."""
  if scale is None:
    return grads
  return jax.tree.map(lambda g: (g * scale).astype(jnp.result_type(g)), grads)


def _second_moment(
  curvature: Any,
  refresh: Any,
  state: ScaleByAdaHessianState,
  count: jax.Array,
  b2: Any,
  update_freq: int,
  lazy_moment: str,
  scale_dtype: Any = None,
) -> tuple[Any, Any, jax.Array, Any, Any]:
  """``(nu, D to store, the step count of nu's bias correction, finite, scale)``.

  ``curvature(previous)`` computes this step's ``(D, whether the estimate is finite, scale)``
  (``previous``: the step count of ``nu``'s bias correction before this step); it runs only on
  refresh steps. ``scale_dtype``: the dtype of ``scale``, ``None`` without a curvature clip.
  Entries whose new ``D`` is not finite keep their previous curvature: their
  bias-corrected ``nu`` (:func:`_kept`), or with ``lazy_moment="repeat"`` their stored ``D``,
  which then enters ``nu`` as on a step without refresh. Such an entry that has no curvature yet
  (``nu`` zero) is marked instead (:func:`_keep_curvature`). ``finite`` is ``None`` when the
  host decided that this step does not refresh; ``scale`` the factor of a curvature clip on
  this step's gradient (:func:`_spike_scale`; 1 on a step without refresh), ``None`` without
  one.
  """

  def moment(d, decay, steps, first=1):
    """nu once D (finite) enters it; ``steps``: nu's bias-correction count after this step,
    ``first`` that count on the first moment step."""
    nu = optax.tree.cast_like(
      optax.tree.update_moment_per_elem_norm(d, state.nu, decay, 2), state.nu
    )
    # An entry with no curvature yet (-0.0) after the first moment step (its first estimates were
    # not finite) takes its first D as if it had entered every earlier step, (1 - b2^steps) D²,
    # so that its bias-corrected nu is D², as on the first step: counted as one of `steps`, it
    # stepped sqrt(steps) times too far. (On the first step the usual sum is that already.)
    # |nu| clears the mark: the sum b2 · (-0.0) + (1 - b2) D² = +0 does not when D is a constant
    # zero under jit (a parameter the loss is linear in), as XLA simplifies x + 0 to x.
    weight, late = 1 - b2**steps, steps > first  # weight: as optax.tree.bias_correction divides

    def entered(n, e, old):
      late_first = jnp.signbit(old) & late
      return jnp.abs(jnp.where(late_first, (weight * jnp.square(e)).astype(n.dtype), n))

    return jax.tree.map(entered, nu, d, state.nu)

  def moment_of_stored(d):  # a marked stored D (-0.0) keeps nu marked
    marked = lambda x, n: jnp.where(jnp.signbit(x), jnp.full_like(n, -0.0), n)
    return jax.tree.map(marked, d, _keep_curvature(d, moment(d, b2, count), state.nu, state.nu))

  if update_freq == 1:
    d, finite, scale = curvature(count - 1)
    kept = _kept(state.nu, b2, count, count - 1)
    return _keep_curvature(d, moment(d, b2, count), kept, state.nu), None, count, finite, scale
  # A step without refresh: its gradient is not scaled (a scale of 1, if there is one).
  unscaled = None if scale_dtype is None else jnp.ones((), scale_dtype)
  if lazy_moment == "repeat":  # timm: the last D enters the moving average every step
    if refresh is False:  # decided on the host: the stored D, which is finite
      return moment_of_stored(state.hessian), state.hessian, count, None, unscaled
    d, finite, scale = on_refresh(
      refresh, lambda: curvature(count - 1), lambda: (state.hessian, jnp.array(True), unscaled)
    )
    # A D whose square overflows nu's dtype is not stored either: it would keep nu where it is
    # (not rescaled) on every step until the next refresh.
    d = _keep_curvature(jax.tree.map(jnp.square, d), d, state.hessian, state.nu)
    return moment_of_stored(d), d, count, finite, scale
  # "refresh": nu moves on refresh steps only, by the decay of update_freq steps.
  nu_count = moment_steps(count, update_freq)
  if refresh is False:
    return state.nu, None, nu_count, None, unscaled

  def fresh():
    d, finite, scale = curvature(nu_count - update_freq)
    kept = _kept(state.nu, b2, nu_count, nu_count - update_freq)
    nu = _keep_curvature(d, moment(d, b2**update_freq, nu_count, update_freq), kept, state.nu)
    return nu, finite, scale

  nu, finite, scale = on_refresh(refresh, fresh, lambda: (state.nu, jnp.array(True), unscaled))
  return nu, None, nu_count, finite, scale


def _kept(nu: Any, b2: Any, steps: jax.Array, previous: jax.Array) -> Any:
  """``nu`` rescaled so that its bias-corrected value ``nu / (1 − b2^steps)`` is the one it had
  after ``previous`` steps: what an entry whose new estimate is not finite keeps.

  Keeping ``nu`` itself would lower the corrected curvature as the count advances, and enlarge
  that entry's later steps (by √2 after a non-finite estimate on step 2, fading over ``1/(1 −
  b2)`` steps). ``nu`` as it is when ``previous`` is 0 (then it is the mark of no curvature yet).
  """
  ratio = (1 - b2**steps) / (1 - b2 ** jnp.maximum(previous, 1))
  return jax.tree.map(lambda v: jnp.where(previous > 0, v * ratio.astype(v.dtype), v), nu)


def _keep_curvature(test: Any, new: Any, old: Any, nu: Any) -> Any:
  """``new`` where ``test`` and ``new`` are finite; elsewhere ``old``, or ``-0.0`` where ``nu``
  is zero.

  Elementwise on values the step reads anyway, so it fuses into the moment updates. The sign of
  zero marks an entry that has had no curvature yet and whose estimate is not finite (e.g. a
  float16 overflow of ``Hz`` on the first refresh): it stays marked on the steps without refresh,
  the update leaves it where it is (:func:`_unmarked`), and the next finite estimate clears the
  mark. Without the mark such an entry would move by ``m / eps`` on the steps between refreshes,
  as if its curvature were zero. A ``new`` that is not finite although ``test`` is (``D²``
  beyond the range of ``nu``'s dtype) is dropped like a non-finite estimate, so ``nu`` never
  holds ``inf``.
  """

  def keep(t, n, o, v):
    ok = jnp.isfinite(t) & jnp.isfinite(n)
    return jnp.where(ok, n, jnp.where(v == 0, jnp.full_like(o, -0.0), o))

  return jax.tree.map(keep, test, new, old, nu)


def _no_curvature_yet(params: Any, nu_dtype: Any) -> Any:
  """The initial ``nu`` (and stored ``D``): ``-0.0``, the mark of an entry that has had no
  curvature estimate yet (:func:`_keep_curvature`), so that a step before the first estimate
  (e.g. a host-decided ``refresh=False`` on step 0, which ``jit`` cannot check) leaves the
  parameters where they are instead of moving them by ``m / eps``. The first finite estimate
  clears it, a zero one too, so the paper's rule is unchanged.

  In ``nu_dtype``, by default the parameter's, but float32 for float16 and bfloat16 parameters:
  float16 (largest value 65504) cannot hold ``D²`` for a curvature over 256, nor (below 6e-8)
  for one under 2.4e-4; bfloat16 (8 significant bits) rounds ``b2 = 0.999`` to 1 and drops
  ``(1 - b2)·D²`` once it is under half a unit in the last place of ``nu``, so that ``nu`` stops
  following the curvature (with ``D = 1``, frozen at 0.5 from step ~400 on).
  """

  def mark(p):
    dtype = jnp.result_type(p)
    dtype = nu_dtype or (jnp.float32 if dtype in (jnp.float16, jnp.bfloat16) else dtype)
    return jnp.full_like(p, -0.0, dtype)  # full_like: with p's sharding (Explicit mesh axes)

  return jax.tree.map(mark, params)


def _first_moment(params: Any, mu_dtype: Any) -> Any:
  """The initial ``mu``: zeros in ``mu_dtype``, by default each parameter's, strongly typed.

  A Python float parameter (or a weakly typed array) would otherwise give a weakly typed ``mu``,
  which the first update makes strong: a state whose types change recompiles a jitted step.
  """
  return jax.tree.map(lambda p: jnp.zeros_like(p, mu_dtype or jnp.result_type(p)), params)


def _saturated_float16(x: jax.Array) -> jax.Array:
  """``x`` in float16, saturated at its largest value (65504) rather than overflowing to ``inf``."""
  big = float(jnp.finfo(jnp.float16).max)
  return jnp.clip(x, -big, big).astype(jnp.float16)


def _stored_like(m: jax.Array, old: jax.Array) -> jax.Array:
  """The new first moment ``m`` in the dtype of the stored one, ``old``; a float16 ``mu`` (of
  wider gradients, ``mu_dtype=float16``) saturated at its largest value (65504) rather than
  stored as ``inf``, which would make every later update of that entry ``inf``."""
  if old.dtype == jnp.float16 and m.dtype != jnp.float16:
    return _saturated_float16(m)
  return m.astype(old.dtype)


def _like_gradient(u: jax.Array, g: Any) -> jax.Array:
  """``u`` in the dtype of the gradient ``g`` (unchanged for a Python number ``g``); float16
  saturated at its largest value (65504) instead of overflowing to ``inf``.

  The chain keeps the gradients' dtypes: ``optax.apply_if_finite`` puts the update in a
  ``lax.cond`` with zeros like the gradient, which fails on float32 updates of bfloat16 gradients
  (moments in float32, or hyperparameters injected as float32). Before the learning rate scales
  it, ``m̂ / (√v̂ + eps)`` passes 65504 where the curvature is near zero (``g / eps``), so a
  float16 step saturates rather than turning the parameter into ``inf``.
  """
  if not hasattr(g, "dtype"):
    return u
  if g.dtype == jnp.float16:
    return _saturated_float16(u)
  return u.astype(g.dtype)


def _unmarked(updates: Any, nu: Any) -> Any:
  """``updates``, zero on the entries :func:`_keep_curvature` marked."""
  return jax.tree.map(lambda u, v: jnp.where(jnp.signbit(v), jnp.zeros_like(u), u), updates, nu)


def _new_first_moment(grads: Any, mu: Any, b1: Any) -> Any:
  """``mu`` moved towards ``grads``; an entry whose gradient is not finite (e.g. the one the fused
  route marks NaN on a step whose estimate is not) keeps its momentum."""
  new = optax.tree.update_moment(grads, mu, b1, 1)
  return jax.tree.map(lambda g, m, o: jnp.where(jnp.isfinite(g), m, o), grads, new, mu)


def _guarded(steps: Any, grads: Any, nu: Any, finite: jax.Array | None, update_clip: Any) -> Any:
  """The preconditioned ``steps`` as the chain gets them: zero where ``nu`` marks an entry with no
  curvature yet (:func:`_unmarked`), clipped to ``[-update_clip, update_clip]`` (if not
  ``None``), in the dtypes of the gradients ``grads`` (:func:`_like_gradient`), and zero
  everywhere on a step whose estimate is not ``finite`` (``None``: a step without an estimate)."""
  steps = _unmarked(steps, nu)
  if update_clip is not None:
    rho = cast(float | jax.Array, update_clip)  # a real scalar, checked at construction
    steps = jax.tree.map(lambda u: jnp.clip(u, -rho, rho), steps)
  steps = jax.tree.map(_like_gradient, steps, grads)
  if finite is not None:  # a step whose estimate is not finite does not move the params
    steps = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), steps)
  return steps


def scale_by_adahessian(
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-4,
  hessian_power: jax.typing.ArrayLike = 1.0,
  *,
  curvature_floor: jax.typing.ArrayLike = 0.0,
  update_clip: jax.typing.ArrayLike | None = None,
  curvature_clip: jax.typing.ArrayLike | None = None,
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
  r"""Rescales updates by AdaHessian's preconditioner (Algorithm 1 of Yao et al.).

  Per step :math:`t` (from 1), with gradient :math:`g_t` and a Hessian-diagonal
  estimate :math:`\hat d_t`:

  .. math::
    D_t &= \max\big(\mathrm{avg}(|\hat d_t|),\ \alpha \cdot \mathrm{mean}_{\text{leaf}}
      \mathrm{avg}(|\hat d_t|)\big) \\
    m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) D_t^2 \\
    u_t &= \mathrm{clip}_{\rho}\Big(\frac{m_t / (1-\beta_1^t)}{(v_t / (1-\beta_2^t))^{k/2}
      + \epsilon}\Big)

  where avg is the spatial averaging. With ``curvature_clip = c``, a refresh
  step's :math:`D_t` and :math:`g_t` (:math:`t > 10`) are first both multiplied by
  :math:`\min\big(1,\ c\,\sqrt{\mathrm{mean}(\hat v_{t-1})}\,/
  \sqrt{\mathrm{mean}(D_t^2)}\big)`, means over the model. With the defaults
  (``α = 0``, no clips) this is exactly the paper's rule.

  The estimate comes either from a loss closure, ``value_fn``, through
  Hutchinson's method (``z ⊙ Hz`` with Rademacher probes ``z`` drawn from the
  key in the state, ``Hz`` by ``jax.jvp`` over ``jax.grad``, averaged over
  ``n_samples`` probes), or precomputed as ``hessian_diag``. Either goes through
  the same absolute value, spatial averaging and moments.

  Non-finite inputs never reach the state or the parameters: an entry whose
  ``D`` is not finite (e.g. a float16 overflow of ``Hz``) keeps its previous
  curvature (its ``nu``; with a lazy ``update_freq`` and the default
  ``lazy_moment``, its stored ``D``, which enters ``nu`` as on a step without
  refresh), and on such a step the parameters do not move (the update is
  zero); an entry with no curvature yet is marked by ``nu = -0.0`` (its
  initial value, kept while its estimates are not finite) and does not move
  until a finite estimate arrives (with a lazy ``update_freq``, or a
  host-decided ``refresh=False`` before the first refresh, it would otherwise
  move by ``m / eps``);
  an entry whose gradient is not finite keeps its ``mu``. The checks
  fuse into the moment updates, plus one reduction over the estimate. With
  ``curvature_floor`` a non-finite entry makes its leaf's (or layer's) mean, and
  so the whole leaf's ``D``, non-finite for the step, and the whole model's mean, which a leaf
  whose ``D`` is all zero falls back on. The fused route,
  :func:`adahessian_jax.value_grad_and_hessian_diag`, also makes such a step's
  gradient non-finite in one entry, so that :func:`optax.apply_if_finite`
  skips and counts the whole step (not inside :func:`optax.MultiSteps`).

  The returned transform's update is
  ``update(updates, state, params, *, value_fn=None, hessian_diag=None, refresh=None,
  **extra_args)`` (``refresh``: see ``update_freq``). Other extra arguments are ignored, so it
  composes in :func:`optax.chain`, except ``expected_axis_name``: a caller that averaged the
  gradients over a mapped axis (or over none: ``None``) and passes each device's own
  ``hessian_diag`` names that axis there, and the update raises unless ``axis_name`` names the
  same axes, in any order (:meth:`adahessian_jax.linen.TrainState.apply_loss` passes it). A
  transform that does not average the estimate the gradients were averaged with would let the
  replicas drift apart. Likewise ``expected_independent_probes``: a caller that drew the probes
  of ``hessian_diag`` itself says how, and the update raises unless ``independent_probes`` is
  the same (``apply_loss`` passes it).

  Args:
    b1: Decay rate of the gradient's moving average, in [0, 1).
    b2: Decay rate of the moving average of ``D²``, in [0, 1).
    eps: Added to the denominator *outside* the power, finite and > 0. At step 1 the
      update is ``g / (|D|^k + eps)``, so ``eps`` bounds the first step where
      the curvature is near zero.
    hessian_power: The power ``k`` in [0, 1]; ``k=0`` gives momentum SGD
      (scaled by ``1/(1+eps)``), ``k=1`` the full Newton-like scaling.
    curvature_floor: ``α >= 0`` (finite): every entry of ``D`` is raised to at least
      ``α`` times the mean of ``D`` over its leaf (over its layer, for leaves
      of stacked layers; see :mod:`adahessian_jax.spatial`), so that a single
      noisy near-zero estimate cannot produce a huge step. A leaf (or layer)
      whose ``D`` is zero everywhere takes ``α`` times the mean over the whole
      model instead. 0 (default) is the paper's rule.
    update_clip: ``ρ > 0`` or ``None`` (default, the paper's rule): clip every
      entry of the preconditioned update to ``[-ρ, ρ]`` (as Sophia does), which
      bounds the step ``lr·ρ`` where the curvature is zero.
    curvature_clip: ``c > 0`` (finite) or ``None`` (default, the paper's rule): on a
      refresh step whose root mean square of ``D`` over the model exceeds ``c``
      times that of the curvature so far (``sqrt(mean(v̂))``, the model's mean of
      the bias-corrected ``nu`` before this step), that step's ``D`` and gradient
      are both scaled down to meet it, as if the batch's loss had been. One batch
      whose loss is far too large (a corrupted batch) then cannot fill ``nu``
      with a curvature that ``b2`` takes thousands of steps to forget, which
      stalls the run; that step's Newton-like ``g / D`` is kept. It acts from
      step 11 on (``nu`` averaging 10 steps or more): a run's curvature moves
      fast as it leaves its initialisation. The gradients of steps without
      refresh are not scaled. Over the model, split kernels' other shards
      included (as ``curvature_floor``'s fallback mean); two reductions, over
      ``D²`` and ``nu``, on refresh steps.
    block_size: Block size of the default spatial averaging of rank-2 kernels
      (see :mod:`adahessian_jax.spatial`); ``None`` or 1 means none. Refused
      beside an ``averaging`` that is one rule for every leaf, or (at ``init``)
      that gives every leaf a rule of its own, which would not use it (give the
      rules the block size).
    update_freq: Refresh the Hessian estimate at steps 1, 1+k, 1+2k, ...; on the
      other steps the last ``D`` enters the moving average again (timm's
      ``update_each``). Under ``jit`` the Hessian-vector product runs only on
      refresh steps (``lax.cond``). ``None`` means 1. A training loop that
      knows its step number can also decide on the host and pass
      ``refresh=True``/``False`` to ``update`` (and to
      :func:`adahessian_jax.value_grad_and_hessian_diag`): two compiled
      programs, no conditional, non-refresh steps at the cost of an Adam step.
    lazy_moment: With ``update_freq > 1``: ``"repeat"`` (default, timm's
      semantics) stores ``D`` and feeds it into ``nu`` every step;
      ``"refresh"`` updates ``nu`` on refresh steps only, with decay
      ``b2**update_freq`` (the same memory in steps) and bias correction
      ``1 - b2**(update_freq·refreshes)``, storing no ``D``: the state is then
      as small as Adam's.
    n_samples: Number of Rademacher probes averaged per refresh (``None``: 1).
    seed: Seed of the PRNG key kept in the state, an integer in
      ``[-2**31, 2**32 - 1]`` (``None``: 0); a negative one is its 32-bit
      pattern, ``seed + 2**32``, with or without ``jax_enable_x64``.
    axis_name: If given, the estimate is averaged over this mapped axis
      (``pmap``/``shard_map``), like gradients are. ``value_fn`` is then this
      device's loss on its local batch (differentiated locally, also under
      ``shard_map``), and ``hessian_diag`` this device's estimate. With the
      state replicated, every device draws the same probe, so the result equals
      single-device training on the global batch. Leave it ``None`` under
      ``jax.jit`` with sharded global arrays: the loss is global there.
    independent_probes: With ``axis_name``, draw a different probe on every
      device (the state's key folded with its index along ``axis_name``,
      :func:`adahessian_jax.distributed.fold_in_axis_index`) in the
      ``value_fn`` route, while the state stays replicated. The averaged
      estimate keeps its mean and has lower variance, at no extra cost, but no
      longer equals the single-device result (see
      :mod:`adahessian_jax.distributed`); unless ``value_fn`` reads other
      devices' parameters through a collective over ``axis_name`` (a
      synchronised BatchNorm), which biases it: the update warns then.
      Default ``False``: the same probe everywhere, exact.
    averaging: Spatial-averaging rules: ``None`` for
      :func:`adahessian_jax.spatial.flax_default` with ``block_size``, a rule,
      a pytree prefix of rules (``None`` inside it meaning the default), a
      callable ``(path, leaf) -> rule | None``, or
      :func:`adahessian_jax.spatial.named` / :func:`adahessian_jax.spatial.strict`.
      Axis names on boxed Linen or NNX params are read automatically
      (``docs/layouts.md``).
    mu_dtype: Floating dtype of the first moment, 16 bits or more (default: the parameters').
      A float16 ``mu`` of wider gradients saturates at ±65504 instead of overflowing to ``inf``.
    nu_dtype: Floating dtype of the second moment and of the stored ``D``
      (default: the parameters', but float32 for float16 parameters, whose
      range cannot hold ``D²`` for curvatures over 256, and for bfloat16 ones,
      whose precision freezes ``nu`` after a few hundred steps; float16 and 8-bit floats are
      refused).
      Whatever the moments' dtypes, the updates have the gradients' dtypes
      (as ``optax.apply_if_finite`` needs); float16 ones saturate at ±65504
      (before the learning rate scales them they can pass float16's range).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Raises:
    ValueError: at construction, for a hyperparameter out of range, naming it, an
      integer ``axis_name`` (JAX reads it as an array axis) or an array one, an
      ``independent_probes`` that is not a bool, or a ``block_size`` that one rule for every
      leaf would not use (at ``init``: that rules of the leaves' own would not use); at
      ``update`` for a state made with another ``update_freq``,
      ``n_samples`` or ``lazy_moment``, moments of other dtypes than a given ``mu_dtype`` or
      ``nu_dtype`` (or whose ``key`` is not raw key data, one row
      per probe), ``updates`` or ``params`` whose tree or
      shapes are not those the state was made for, a ``hessian_diag`` leaf
      whose shape or dtype does not fit its parameter (naming a leaf path),
      both ``value_fn`` and ``hessian_diag``, neither on a step that may
      refresh, a ``value_fn`` whose loss does not depend on its argument (a
      closure over other params), an ``axis_name`` that no enclosing map binds, or one that names
      a mesh axis a parameter is split over (inside ``shard_map``), a ``value_fn`` whose loss
      is already reduced over ``axis_name`` (the same on every device inside ``shard_map``), a
      ``hessian_diag`` leaf the same on every device of ``axis_name`` (inside ``shard_map``: the
      fused route at replicated params, whose estimate is P times the global batch's), an
      ``expected_axis_name`` other than ``axis_name``, an ``expected_independent_probes``
      other than ``independent_probes``, ``params=None`` or masked params (inside
      ``optax.masked``) beside a ``value_fn`` not made by
      :func:`adahessian_jax.masked_value_fn`, or, outside ``jit``, a state whose moments hold
      a non-finite entry (``nu`` a negative one) or whose ``count`` is negative.
    TypeError: at construction, for an ``averaging`` that is none of the kinds above (naming
      the entry of a tree that is no rule); at ``init`` for non-float (or 8-bit float) parameter
      leaves; at ``update`` for
      non-float ``updates`` or ``params`` leaves (naming their path), a state that is not an
      :class:`adahessian_jax.ScaleByAdaHessianState` (a checkpoint restored without a
      target) or whose ``count`` or moments are not of the dtypes ``init`` makes, or a
      ``value_fn`` that cannot be called as ``value_fn(params)`` or does not
      return a real scalar.

  References:
    Yao, Gholami, Shen, Mustafa, Keutzer, Mahoney, `ADAHESSIAN: An Adaptive
    Second Order Optimizer for Machine Learning
    <https://arxiv.org/abs/2006.00719>`_, AAAI 2021.
  """
  _validation.hyperparameter("b1", b1, 0.0, 1.0, hi_open=True)
  _validation.hyperparameter("b2", b2, 0.0, 1.0, hi_open=True)
  _validation.hyperparameter("eps", eps, 0.0, float("inf"), lo_open=True, hi_open=True)
  _validation.hyperparameter("hessian_power", hessian_power, 0.0, 1.0)
  _validation.hyperparameter("curvature_floor", curvature_floor, 0.0, float("inf"), hi_open=True)
  if update_clip is not None:
    _validation.hyperparameter("update_clip", update_clip, 0.0, float("inf"), lo_open=True)
  if curvature_clip is not None:
    _validation.hyperparameter(
      "curvature_clip", curvature_clip, 0.0, float("inf"), lo_open=True, hi_open=True
    )
  block_size = _validation.count(
    "block_size", 1 if block_size is None else block_size, fix=STATIC_FIX
  )
  spatial.check_averaging(averaging)
  checks.check_block_size_used(block_size, averaging)
  update_freq = _validation.count(  # the state counts steps in int32
    "update_freq", 1 if update_freq is None else update_freq, 1, 2**31 - 1, fix=STATIC_FIX
  )
  n_samples = _validation.count("n_samples", 1 if n_samples is None else n_samples, fix=STATIC_FIX)
  # A 32-bit seed: without jax_enable_x64 JAX truncates a larger one (2**32 gave seed 0's keys).
  seed = checks.checked_seed(seed)
  if axis_name is not None:
    check_names(axis_name)
  independent_probes = _validation.flag("independent_probes", independent_probes)
  if independent_probes and axis_name is None:
    raise ValueError("independent_probes=True needs axis_name, the axis the probes differ over.")
  mu_dtype = checks.float_dtype("mu_dtype", mu_dtype)
  nu_dtype = checks.float_dtype("nu_dtype", nu_dtype)
  if nu_dtype == jnp.float16:
    raise ValueError(
      f"nu_dtype=float16: {FLOAT16_NU}. Pass float32 (the default for float16 params) or bfloat16."
    )
  # isinstance first: an array's `in` test raised NumPy's "truth value ... is ambiguous".
  if not isinstance(lazy_moment, str) or lazy_moment not in ("repeat", "refresh"):
    raise ValueError(f"lazy_moment must be 'repeat' or 'refresh', got {lazy_moment!r}.")
  lazy = update_freq > 1
  stores_d = lazy and lazy_moment == "repeat"

  def init_fn(params):
    _validation.float_leaves(
      params,
      "scale_by_adahessian's params",
      "Keep other leaves out of the params (with nnx.Optimizer, a narrower wrt= filter), or "
      "exclude them with optax.masked or optax.multi_transform.",
    )
    checks.check_not_variables(params)
    # Fail early on a bad rule; update checks again. Not on a tree without leaves:
    # optax.tree.map_params (so distributed.state_shardings) calls init on a leafless placeholder
    # to find the parameter-shaped fields, which a pytree-prefix averaging does not fit.
    if jax.tree.leaves(params):
      rules = spatial.resolve_rules(averaging, params, block_size, warn=True)
      checks.check_block_size_used(block_size, averaging, rules)
    if "optax.flatten" in _wrappers.calling():
      warnings.warn(checks.FLATTENED, stacklevel=spatial.user_stacklevel())
    # Committed where the params are, so that a jitted step compiles once (placed_like_params),
    # also for scale_by_adahessian alone or in a chain of one's own (adahessian's init and
    # linen.TrainState.create commit only the rest: these are committed by then).
    state = ScaleByAdaHessianState(
      count=jnp.zeros([], jnp.int32),
      key=jax.random.key_data(jax.random.split(jax.random.key(seed), n_samples)),
      mu=_first_moment(params, mu_dtype),
      nu=_no_curvature_yet(params, nu_dtype),
      # A buffer of its own: donating a state whose leaves alias fails.
      hessian=_no_curvature_yet(params, nu_dtype) if stores_d else None,
      update_freq=_stored_update_freq(update_freq),
    )
    return placed_like_params(state, params)

  def update_fn(
    updates, state, params=None, *, value_fn=None, hessian_diag=None, refresh=None, **extra_args
  ):
    checks.check_state(
      state,
      update_freq=update_freq,
      n_samples=n_samples,
      stores_d=stores_d,
      mu_dtype=mu_dtype,
      nu_dtype=nu_dtype,
    )
    state = jax.tree.map(jnp.asarray, state)  # a Python float moment, as jit would read it
    others = checks.check_mapping(state.mu, extra_args, axis_name, independent_probes)
    checks.check_against_state(updates, params, state.mu)
    refresh = is_refresh_step(_schedule_of(state, update_freq, value_fn), refresh)
    checks.check_call(value_fn, hessian_diag, refresh, lazy, others)
    rules, read_off_shapes = spatial.resolve_rules_and_read_off(averaging, updates, block_size)
    # Inside shard_map the moments are split like the parameters.
    spatial.warn_shard_shapes(averaging, block_size, split_leaves(state.mu), read_off_shapes)
    keys, next_key = probe_keys(state, axis_name if independent_probes else None)
    curvature = lambda previous: _curvature(
      *_estimate(value_fn, hessian_diag, params, keys, state.nu, axis_name, independent_probes),
      rules,
      curvature_floor,
      curvature_clip,
      lambda: _rms_curvature_so_far(state.nu, b2, previous),
    )
    # optax annotates the result as any array-like; it is a jax.Array like state.count.
    count_inc = cast(jax.Array, optax.safe_increment(state.count))
    nu, d, nu_count, finite, scale = _second_moment(
      curvature,
      refresh,
      state,
      count_inc,
      b2,
      update_freq,
      lazy_moment,
      None if curvature_clip is None else _scale_dtype(state.nu),
    )
    mu = _new_first_moment(_scaled(updates, scale), state.mu, b1)
    mu_hat = optax.tree.bias_correction(mu, b1, count_inc)
    nu_hat = optax.tree.bias_correction(nu, b2, nu_count)
    steps = jax.tree.map(lambda m, v: m / (v ** (hessian_power / 2) + eps), mu_hat, nu_hat)
    steps = _guarded(steps, updates, nu, finite, update_clip)
    new_state = ScaleByAdaHessianState(
      count=count_inc,
      key=refresh_key(state, refresh, next_key),
      mu=jax.tree.map(_stored_like, mu, state.mu),  # its dtype from init on, whatever b1's dtype
      nu=nu,
      hessian=d,
      update_freq=_stored_update_freq(update_freq),
    )
    return steps, new_state

  # optax types a state as chex.ArrayTree, which leaves out None, but a None field
  # (hessian=None, update_freq=None) is a valid pytree node with no leaves.
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)  # pyright: ignore[reportArgumentType]
