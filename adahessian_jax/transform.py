"""``scale_by_adahessian``: the AdaHessian preconditioner as an optax transform."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics, utils

from adahessian_jax import _validation, hutchinson, masking, spatial

__all__ = ["ScaleByAdaHessianState", "is_refresh_step", "probe_keys", "scale_by_adahessian"]


class ScaleByAdaHessianState(NamedTuple):
  """State of :func:`scale_by_adahessian`; every field is an array (or ``None``).

  Attributes:
    count: Number of updates applied so far, ``int32`` scalar.
    key: Raw PRNG key data (``jax.random.key_data``), one key per probe, shape
      ``(n_samples, key_size)``; each is split once per Hessian refresh.
    mu: First moment of the gradient.
    nu: Second moment of the spatially averaged Hessian diagonal ``D``.
    hessian: The last ``D``, reused between refreshes; ``None`` when
      ``update_freq == 1`` (then the state is Adam's plus ``count`` and ``key``).
    update_freq: The refresh interval as an ``int32`` scalar when it is > 1,
      else ``None``; read by :func:`adahessian_jax.value_grad_and_hessian_diag`
      so that the fused path refreshes on exactly the transform's steps.
  """

  count: jax.Array
  key: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  hessian: optax.Updates | None = None
  update_freq: jax.Array | None = None


def probe_keys(state: ScaleByAdaHessianState) -> tuple[jax.Array, jax.Array]:
  """The keys of this refresh's probes, and the state's key data for the next refresh.

  Args:
    state: A :class:`ScaleByAdaHessianState`.

  Returns:
    ``(keys, next_key_data)``: a 1-D array of ``n_samples`` PRNG keys for the
    probes, and the raw key data to store if this step refreshes.
  """
  pairs = jax.vmap(jax.random.split)(jax.random.wrap_key_data(state.key))
  return pairs[:, 1], jax.random.key_data(pairs[:, 0])


def fold_in_axis_index(key_data: jax.Array, axis_name: Any) -> jax.Array:
  """Folds this device's index along ``axis_name`` into every key of raw ``key_data``."""
  keys = jax.random.wrap_key_data(key_data)
  index = jax.lax.axis_index(axis_name)
  return jax.random.key_data(jax.vmap(jax.random.fold_in, (0, None))(keys, index))


def device_varying(tree: Any, axis_name: Any) -> Any:
  """Marks ``tree`` as varying over ``axis_name`` inside ``shard_map``; else returns it as is.

  Under ``shard_map`` (with its default ``check_vma=True``), differentiating a
  per-device loss with respect to replicated (invariant) parameters sums the
  result over the axis automatically; at the returned values the gradient and
  Hessian-vector products are this device's own, as under ``pmap``.
  """
  typeof = getattr(jax, "typeof", None)
  cast = getattr(jax.lax, "pcast", None)
  if cast is None and hasattr(jax.lax, "pvary"):
    cast = lambda x, axes, to: jax.lax.pvary(x, axes)
  if typeof is None or cast is None:  # JAX without varying-axis types
    return tree
  axes = tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)

  def one(x):
    aval = typeof(x)
    varying = getattr(aval, "vma", None)
    if varying is None:
      varying = getattr(getattr(aval, "manual_axis_type", None), "varying", frozenset())
    missing = tuple(a for a in axes if a not in varying)
    if not missing:
      return x
    try:
      return cast(x, missing, to="varying")
    except ValueError:  # not under shard_map (pmap, vmap): values are per-device already
      return x

  return jax.tree.map(one, tree)


def is_refresh_step(state: ScaleByAdaHessianState) -> jax.Array | bool:
  """Whether the next update refreshes the Hessian (steps 1, 1+k, 1+2k, ...).

  Args:
    state: A :class:`ScaleByAdaHessianState`.

  Returns:
    ``True`` when every step refreshes, else a boolean scalar array.
  """
  if state.update_freq is None:
    return True
  return state.count % state.update_freq == 0


def _check_real_float_params(params: Any) -> None:
  def check(path, x):
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
        f"scale_by_adahessian needs real floating-point parameters, but the leaf at "
        f"{jax.tree_util.keystr(path)} has dtype {dtype}. Exclude non-float leaves with "
        f"optax.masked or optax.multi_transform."
      )

  jax.tree_util.tree_map_with_path(check, params)


_CALL_HINT = (
  "Call tx.update(grads, opt_state, params, value_fn=lambda p: loss_fn(p, batch)) with the "
  "loss on the current batch, or pass a precomputed estimate as hessian_diag=..."
)


def scale_by_adahessian(
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-4,
  hessian_power: jax.typing.ArrayLike = 1.0,
  block_size: int = 1,
  update_freq: int = 1,
  n_samples: int = 1,
  seed: int = 0,
  axis_name: Any = None,
  averaging: spatial.AveragingSpec = None,
  mu_dtype: jax.typing.DTypeLike | None = None,
  nu_dtype: jax.typing.DTypeLike | None = None,
  independent_probes: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales updates by AdaHessian's preconditioner (Algorithm 1 of Yao et al.).

  Per step :math:`t` (from 1), with gradient :math:`g_t` and a Hessian-diagonal
  estimate :math:`\hat d_t`:

  .. math::
    D_t &= \mathrm{avg}(|\hat d_t|) \quad \text{(spatial averaging)} \\
    m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) D_t^2 \\
    u_t &= \frac{m_t / (1-\beta_1^t)}{(v_t / (1-\beta_2^t))^{k/2} + \epsilon}

  The estimate comes either from a loss closure, ``value_fn``, through
  Hutchinson's method (``z ⊙ Hz`` with Rademacher probes ``z`` drawn from the
  key in the state, ``Hz`` by ``jax.jvp`` over ``jax.grad``, averaged over
  ``n_samples`` probes), or precomputed as ``hessian_diag``. Either goes through
  the same absolute value, spatial averaging and moments.

  The returned transform's update is
  ``update(updates, state, params, *, value_fn=None, hessian_diag=None, **extra_args)``.
  Other extra arguments are ignored, so it composes in :func:`optax.chain`.

  Args:
    b1: Decay rate of the gradient's moving average, in [0, 1).
    b2: Decay rate of the moving average of ``D²``, in [0, 1).
    eps: Added to the denominator *outside* the power, >= 0. At step 1 the
      update is ``g / (|D|^k + eps)``, so ``eps`` bounds the first step where
      the curvature is near zero.
    hessian_power: The power ``k`` in [0, 1]; ``k=0`` gives momentum SGD
      (scaled by ``1/(1+eps)``), ``k=1`` the full Newton-like scaling.
    block_size: Block size of the default spatial averaging of rank-2 kernels
      (see :mod:`adahessian_jax.spatial`); 1 means none.
    update_freq: Refresh the Hessian estimate at steps 1, 1+k, 1+2k, ...; on the
      other steps the last ``D`` enters the moving average again (timm's
      ``update_each``). Under ``jit`` the Hessian-vector product runs only on
      refresh steps (``lax.cond``).
    n_samples: Number of Rademacher probes averaged per refresh.
    seed: Seed of the PRNG key kept in the state.
    axis_name: If given, the estimate is averaged over this mapped axis
      (``pmap``/``shard_map``), like gradients are. ``value_fn`` is then this
      device's loss on its local batch (differentiated locally, also under
      ``shard_map``), and ``hessian_diag`` this device's estimate. With the
      state replicated, every device draws the same probe, so the result equals
      single-device training on the global batch. Leave it ``None`` under
      ``jax.jit`` with sharded global arrays: the loss is global there.
    averaging: Spatial-averaging rules: ``None`` for
      :func:`adahessian_jax.spatial.flax_default` with ``block_size``, a rule,
      a pytree prefix of rules, or a callable ``(path, leaf) -> rule | None``.
    mu_dtype: dtype of the first moment (default: the gradient's).
    nu_dtype: dtype of the second moment and of the stored ``D`` (default:
      the parameters').
    independent_probes: With ``axis_name``, draw a different probe on every
      device (the state's key folded with ``lax.axis_index(axis_name)``) in the
      ``value_fn`` route, while the state stays replicated. The averaged
      estimate keeps its mean and has lower variance, at no extra cost, but no
      longer equals the single-device result (see
      :mod:`adahessian_jax.distributed`). Default ``False``: the same probe
      everywhere, exact.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Raises:
    ValueError: at construction, for a hyperparameter out of range, naming it.
    TypeError: at ``init`` for non-float parameter leaves; at ``update`` for a
      ``value_fn`` that does not return a real scalar.

  References:
    Yao, Gholami, Shen, Mustafa, Keutzer, Mahoney, `ADAHESSIAN: An Adaptive
    Second Order Optimizer for Machine Learning
    <https://arxiv.org/abs/2006.00719>`_, AAAI 2021.
  """
  _validation.in_interval("b1", b1, 0.0, 1.0, hi_open=True)
  _validation.in_interval("b2", b2, 0.0, 1.0, hi_open=True)
  _validation.in_interval("eps", eps, 0.0, float("inf"))
  _validation.in_interval("hessian_power", hessian_power, 0.0, 1.0)
  block_size = _validation.positive_int("block_size", block_size)
  update_freq = _validation.positive_int("update_freq", update_freq)
  n_samples = _validation.positive_int("n_samples", n_samples)
  _validation.integer("seed", seed)
  if independent_probes and axis_name is None:
    raise ValueError("independent_probes=True needs axis_name, the axis the probes differ over.")
  mu_dtype = utils.canonicalize_dtype(mu_dtype)
  nu_dtype = utils.canonicalize_dtype(nu_dtype)

  def init_fn(params):
    _check_real_float_params(params)
    spatial.resolve_rules(averaging, params, block_size)  # fail early on a bad rule
    nu = optax.tree.zeros_like(params, dtype=nu_dtype)
    lazy = update_freq > 1
    return ScaleByAdaHessianState(
      count=jnp.zeros([], jnp.int32),
      key=jax.random.key_data(jax.random.split(jax.random.key(seed), n_samples)),
      mu=optax.tree.zeros_like(params, dtype=mu_dtype),
      nu=nu,
      # A buffer of its own: donating a state whose leaves alias fails.
      hessian=optax.tree.zeros_like(params, dtype=nu_dtype) if lazy else None,
      update_freq=jnp.asarray(update_freq, jnp.int32) if lazy else None,
    )

  def fresh_hessian(rules, params, value_fn, hessian_diag, keys, like):
    if value_fn is not None:
      if params is None:
        raise ValueError("scale_by_adahessian needs params to evaluate value_fn at.")
      if masking.has_masked_nodes(params) and not isinstance(value_fn, masking.MaskedValueFn):
        raise ValueError(
          "scale_by_adahessian got masked params (inside optax.masked or multi_transform), which "
          "a whole-model value_fn cannot be evaluated on. Pass "
          "value_fn=adahessian_jax.masked_value_fn(value_fn, params), or a whole-model "
          "hessian_diag."
        )
      if axis_name is not None:
        # value_fn is this device's loss; its local estimate is averaged below.
        params, keys = device_varying((params, keys), axis_name)
      estimate = hutchinson.value_grad_and_diagonal(value_fn, params, keys)[2]
    else:
      estimate = hessian_diag
      if masking.has_masked_nodes(like) and not masking.has_masked_nodes(estimate):
        estimate = masking.restrict_to(estimate, like)
      if jax.tree.structure(estimate) != jax.tree.structure(like):
        raise ValueError(
          "hessian_diag must have the structure of params; got "
          f"{jax.tree.structure(estimate)}, expected {jax.tree.structure(like)}."
        )
    # Average in the moments' dtype (e.g. float32 for bfloat16 params).
    estimate = optax.tree.cast_like(estimate, like)
    if axis_name is not None:
      estimate = jax.lax.pmean(estimate, axis_name)
    return spatial.apply_rules(rules, jax.tree.map(jnp.abs, estimate))

  def update_fn(updates, state, params=None, *, value_fn=None, hessian_diag=None, **extra_args):
    del extra_args
    if value_fn is not None and hessian_diag is not None:
      raise ValueError(
        "scale_by_adahessian takes value_fn or hessian_diag, not both. " + _CALL_HINT
      )
    count = state.count
    refresh = is_refresh_step(state)
    concrete = not isinstance(refresh, jax.core.Tracer)
    if (
      value_fn is None
      and hessian_diag is None
      and (update_freq == 1 or not concrete or bool(refresh))
    ):
      raise ValueError(
        "scale_by_adahessian needs the loss to estimate the Hessian on this step"
        + (" (under jit every step may refresh it)" if update_freq > 1 else "")
        + ". "
        + _CALL_HINT
      )
    rules = spatial.resolve_rules(averaging, updates, block_size)
    keys, next_key = probe_keys(state)
    if independent_probes:
      keys, _ = probe_keys(state._replace(key=fold_in_axis_index(state.key, axis_name)))
    compute = lambda: fresh_hessian(rules, params, value_fn, hessian_diag, keys, state.nu)

    if update_freq == 1:
      d, new_key, hessian = compute(), next_key, None
    elif concrete:
      # Outside jit the step is known: run only what is needed.
      d = compute() if refresh else state.hessian
      new_key = next_key if refresh else state.key
      hessian = d
    else:
      d = jax.lax.cond(refresh, compute, lambda: state.hessian)
      new_key = jnp.where(refresh, next_key, state.key)
      hessian = d

    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(d, state.nu, b2, 2)
    count_inc = numerics.safe_increment(count)
    mu_hat = optax.tree.bias_correction(mu, b1, count_inc)
    nu_hat = optax.tree.bias_correction(nu, b2, count_inc)
    half_power = hessian_power / 2
    updates = jax.tree.map(lambda m, v: m / (v**half_power + eps), mu_hat, nu_hat)
    mu = optax.tree.cast(mu, mu_dtype)
    nu = optax.tree.cast_like(nu, state.nu)
    return updates, ScaleByAdaHessianState(
      count=count_inc,
      key=new_key,
      mu=mu,
      nu=nu,
      hessian=hessian,
      update_freq=state.update_freq,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
