"""The Hessian seen through an optimizer's diagonal preconditioner: ``P^{-1/2} H P^{-1/2}``.

An adaptive method steps ``θ ← θ − lr · P⁻¹ m`` with a diagonal ``P`` built
from its state. Near a minimum its stability is governed not by ``λ_max(H)``
but by the *preconditioned sharpness* ``λ_max(P⁻¹H)`` (Cohen et al. 2022):
along the top eigenvector of ``P⁻¹H`` the iteration is gradient descent with
rate ``lr`` on curvature ``λ_max(P⁻¹H)``, which overshoots when
``lr · λ_max(P⁻¹H) > 2`` (without momentum; with Adam-style momentum ``β₁``
the threshold is ``2(1+β₁)/(1−β₁)``, 38 for ``β₁ = 0.9``).

``P⁻¹H`` is not symmetric, but it is similar to ``P^{-1/2} H P^{-1/2}``
(same eigenvalues), which is: the Hessian of ``y ↦ L(θ + P^{-1/2} y)``.
:func:`preconditioned_operator` returns that operator, a
:class:`~adahessian_jax.hessian.HessianOperator` every analysis accepts
(eigenvalues, traces, densities, per-layer blocks, landscapes in the
rescaled coordinates).

The diagonals:

* :func:`adahessian_preconditioner`: ``P = v̂^{k/2} + eps`` with
  ``v̂ = nu / (1 − b2^count)`` from AdaHessian's state, exactly the
  denominator of its last update;
* :func:`adam_preconditioner`: ``P = sqrt(v̂ + eps_root) + eps`` from optax
  Adam's ``ScaleByAdamState`` (or AMSGrad's running maximum of ``v̂``, or AdaBelief's
  ``ScaleByBeliefState``), for comparison.

References:
  Cohen, Ghorbani, Krishnan, Agarwal, Medapati, Badura, Suo, Cardoze, Nado,
  Dahl, Gilmer, `Adaptive Gradient Methods at the Edge of Stability
  <https://arxiv.org/abs/2207.14484>`_, 2022.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adahessian_jax import _validation, layout, masking
from adahessian_jax.hessian import _checks
from adahessian_jax.hessian._operator import HessianOperator
from adahessian_jax.hessian._rows import scale_rows
from adahessian_jax.hessian._sketch import wide_dtype
from adahessian_jax.state import (
  adahessian_states,
  find_adahessian_state,
  moment_steps,
  untyped_state_hint,
)

__all__ = ["adahessian_preconditioner", "adam_preconditioner", "preconditioned_operator"]


_INJECT = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)


def _update_count(count: Any, what: str) -> int:
  """The state's step ``count`` as an int; an error before the first update or if replicated."""
  count = np.asarray(count)
  if count.ndim:
    raise ValueError(
      f"the {what} state's count has shape {count.shape}, not a scalar: a state replicated "
      "across devices (jax.pmap) holds one copy per device. Pass one replica, e.g. "
      "jax.tree.map(lambda x: x[0], opt_state)."
    )
  if int(count) < 0:  # was told "no update has been applied yet", which is not why
    raise ValueError(
      f"the {what} state has count {int(count)}, which no optimizer makes (init sets 0, each "
      "update adds 1): the state was built or restored wrongly. Pass the state the optimizer "
      "returned, or start again from tx.init(params)."
    )
  if int(count) < 1:
    raise ValueError(
      f"the {what} state has count {int(count)}: no update has been applied yet, so its second "
      "moment is zero and the preconditioner undefined. Measure after the first step."
    )
  return int(count)


def _bias_corrected(nu: Any, count: int, b2: float, every: int = 1) -> Any:
  """``nu / (1 − b2^c)``, ``c`` the steps ``nu`` averaged: ``count`` (from :func:`_update_count`)
  rounded up to ``every``."""
  correction = 1.0 - float(b2) ** moment_steps(count, every)
  return jax.tree.map(lambda v: v / jnp.asarray(correction, jnp.result_type(v)), nu)


def _contains(tree: Any, target: Any) -> bool:
  """Whether the state object ``target`` is a node of ``tree``."""
  found = jax.tree.leaves(tree, is_leaf=lambda x: x is target)
  return any(x is target for x in found)


def _injected(opt_state: Any, target: Any) -> dict[str, Any]:
  """The hyperparameters of the innermost ``optax.inject_hyperparams`` state around ``target``.

  Empty if no such state encloses it.
  """
  is_inject = lambda x: isinstance(x, _INJECT)
  for node in jax.tree.leaves(opt_state, is_leaf=lambda x: is_inject(x) or x is target):
    if is_inject(node) and _contains(node.inner_state, target):
      return {**dict(node.hyperparams), **_injected(node.inner_state, target)}
  return {}


def _hyperparameter(name: str, given: Any, injected: dict[str, Any], default: float) -> Any:
  """``given``, else the state's injected value, else ``default``; a conflict is an error.

  ``given`` agrees with the state's value if it rounds to it in the state's dtype:
  ``inject_hyperparams`` stores float16 params' hyperparameters in float16 (0.999 as 0.99902).
  """
  if name not in injected:
    return default if given is None else given
  held = np.asarray(injected[name])
  stored = float(held)
  rounded = float(np.asarray(given, held.dtype)) if given is not None else None
  if given is not None and not (
    rounded == stored or np.isclose(float(given), stored, rtol=1e-6, atol=0.0)
  ):
    raise ValueError(
      f"{name}={given!r} was passed, but the optimizer state (optax.inject_hyperparams) holds "
      f"{name}={stored!r}, the value its updates used; leave {name} out to use the state's."
    )
  return stored


def _subtree_at(tree: Any, path: tuple[Any, ...], where: str) -> Any:
  """The node of ``tree`` at ``path`` (keys of ``jax.tree_util``); ``ValueError`` if none. A
  scalar leaf on the way stands for its whole subtree (a prefix mask's fill)."""
  node = tree
  for key in path:
    if jax.tree_util.treedef_is_leaf(jax.tree.structure(node)) and np.ndim(node) == 0:
      return node
    try:
      if isinstance(key, jax.tree_util.DictKey):
        node = node[key.key]
      elif isinstance(key, jax.tree_util.SequenceKey):
        node = node[key.idx]
      elif isinstance(key, jax.tree_util.GetAttrKey):
        node = getattr(node, key.name)
      else:
        raise TypeError(key)
    except (KeyError, IndexError, TypeError, AttributeError):
      raise ValueError(
        f"fill has no entry at {where}, a leaf the state leaves out: give a scalar, or a pytree "
        "like the params (another group's P)"
      ) from None
  return node


# Each builder of P and the other, whose P fills the leaves the first one's group leaves out.
_OTHER = {
  "adahessian_preconditioner": "adam_preconditioner",
  "adam_preconditioner": "adahessian_preconditioner",
}


def _groups_hint(call: str) -> str:
  """How to build ``P`` from a state with several groups of one kind (``optax.multi_transform``):
  one group's state at a time, each filling the leaves the other leaves out."""
  return (
    " For several groups (optax.multi_transform), pass each group's own state, its "
    "opt_state.inner_states[label], and fill the leaves it leaves out with the other's P: "
    f"hessian.{call}(opt_state.inner_states['a'], fill=hessian.{call}("
    "opt_state.inner_states['b'], fill=jnp.inf))."
  )


def _masked_filled(p: Any, nu: Any, fill: Any, what: str, call: str) -> Any:
  """``p`` with the leaves ``optax.masked`` left out of ``nu`` taken from ``fill`` (a scalar, or
  a pytree like the params: its node at each such path).

  Raises ``ValueError`` naming those leaves when ``fill`` is ``None``; ``call`` is the public
  function that built ``p``, which its example names.
  """
  scalar = fill is not None and jax.tree_util.treedef_is_leaf(jax.tree.structure(fill))
  # Checked also where no leaf is masked out: fill=nan or -1 was taken without a word there.
  value = _validation.interval("fill", fill, 0.0, np.inf, lo_open=True) if scalar else None
  # An nnx.Optimizer's state holds its MaskedNodes in Variables: stopped there, the paths are the
  # canonical ones, without the Variable's own ".value" step, which a plain-dict fill (another
  # group's P of nnx.as_pure, the params' nnx.to_pure_dict) has not: it was refused as having no
  # entry at ['out']['bias'].value.
  is_node = lambda x: masking.is_masked(x) or layout.is_annotated(x)
  leaves = jax.tree_util.tree_leaves_with_path(nu, is_leaf=is_node)
  masked = [jax.tree_util.keystr(p) for p, x in leaves if masking.has_masked_nodes(x)]
  if not masked:
    return p
  if fill is None:
    raise ValueError(
      f"the {what} state is inside optax.masked (or is one group of optax.multi_transform): "
      f"the leaves {', '.join(masked)} are masked "
      "out, so it holds no second moment (and no preconditioner) for them. Pass fill=: "
      "fill=jnp.inf holds them still (the part of the Hessian this state preconditions); "
      "another group's P fills them with its own, e.g. "
      f"hessian.{call}(opt_state, fill=hessian.{_OTHER[call]}(opt_state, fill=jnp.inf))."
    )
  if scalar:
    # In the dtype of the state's own P: a Python float would be float64 under x64 beside a
    # float32 model's P (and float32 beside a float64 one's without).
    own = jax.tree.leaves(p)
    filled = jnp.asarray(value, jnp.result_type(*own) if own else float)
    at = lambda path: filled
  else:
    plain = layout.unboxed(fill)
    at = lambda path: _subtree_at(plain, path, jax.tree_util.keystr(path))

  def fill_leaf(path: Any, x: Any) -> Any:
    if not masking.has_masked_nodes(x):
      return x
    value = at(path)  # inside a Variable, the Variable stays
    return jax.tree.map(
      lambda y: value if masking.is_masked(y) else y, x, is_leaf=masking.is_masked
    )

  return jax.tree_util.tree_map_with_path(fill_leaf, p, is_leaf=is_node)


def _check_concrete(opt_state: Any, fill: Any) -> None:
  """Raises ``ValueError`` naming the first traced leaf of ``opt_state`` or ``fill``: ``P``'s bias
  correction reads the state's count (and injected hyperparameters) on the host, where a traced
  one failed with JAX's ``TracerArrayConversionError``, naming no argument and no fix."""
  _checks.concrete(opt_state, "opt_state")
  _checks.concrete(fill, "fill")


_ADAM_KINDS = (optax.ScaleByAdamState, optax.ScaleByAmsgradState, optax.ScaleByBeliefState)


def _adam_states(opt_state: Any) -> list[Any]:
  """The optax Adam, AMSGrad and AdaBelief states in ``opt_state``."""
  is_adam = lambda x: isinstance(x, _ADAM_KINDS)
  return [x for x in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(x)]


def adahessian_preconditioner(
  opt_state: Any,
  *,
  b2: jax.typing.ArrayLike | None = None,
  eps: jax.typing.ArrayLike | None = None,
  hessian_power: jax.typing.ArrayLike | None = None,
  fill: jax.typing.ArrayLike | None = None,
) -> Any:
  """AdaHessian's diagonal ``P = v̂^{k/2} + eps``, ``v̂ = nu / (1 − b2^count)``.

  The denominator of the last update the state comes from (the update is
  ``lr · m̂ / P``, before any ``update_clip``). With a lazy refresh whose
  second moment moves on refresh steps only (``lazy_moment="refresh"``, a
  state with ``update_freq`` but no stored ``D``), ``count`` is rounded up to
  a multiple of ``update_freq``, as the transform does.

  The plain state does not hold the hyperparameters: pass those of the
  transform. Inside an ``optax.inject_hyperparams`` state the injected values
  are read from the state; passing a different value raises.

  Args:
    opt_state: Any optax state holding one
      :class:`~adahessian_jax.ScaleByAdaHessianState` (found with
      :func:`adahessian_jax.find_adahessian_state`).
    b2: The transform's ``b2``, in ``[0, 1)``; default the injected value, else 0.999.
    eps: The transform's ``eps``, ``> 0``; default the injected value, else 1e-4.
    hessian_power: The transform's ``hessian_power`` ``k``, in ``[0, 1]``;
      default the injected value, else 1.
    fill: ``P`` on the leaves ``optax.masked`` or ``optax.multi_transform``
      leaves out of the state: a scalar ``> 0`` for each such leaf (``jnp.inf``
      holds them still: the part of the Hessian this state preconditions), or a
      pytree like the params whose entries there are taken, e.g. the other
      group's ``P``: ``adahessian_preconditioner(s, fill=adam_preconditioner(s,
      fill=jnp.inf))`` for AdaHessian on some leaves and Adam on the others.
      ``None`` (default) raises where leaves are left out.

  Returns:
    ``P`` as a pytree like the params; ``inf`` on entries that have no curvature
    yet (every estimate of them so far was not finite), which the updates leave
    where they are, and which :func:`preconditioned_operator` therefore holds still.

  Raises:
    ValueError: for a hyperparameter out of range (named), one that conflicts
      with the state's injected value, not exactly one AdaHessian state, a state
      before its first update, replicated across devices, or inside
      ``optax.masked`` without ``fill``, or a scalar ``fill`` that is
      not ``> 0`` (also where no leaf is masked out), or traced arrays (a call inside
      ``jax.jit`` or ``vmap``: ``P`` is built on the host, between jitted steps), named by path.
  """
  _check_concrete(opt_state, fill)
  try:
    state = find_adahessian_state(opt_state)
  except ValueError as e:
    if len(adahessian_states(opt_state)) > 1:
      raise ValueError(f"{e}{_groups_hint('adahessian_preconditioner')}") from None
    if _adam_states(opt_state):
      raise ValueError(
        f"{e} The state holds an optax Adam/AMSGrad/AdaBelief state: its P is "
        "hessian.adam_preconditioner(opt_state)."
      ) from None
    raise
  injected = _injected(opt_state, state)
  b2 = _validation.interval(
    "b2", _hyperparameter("b2", b2, injected, 0.999), 0.0, 1.0, hi_open=True
  )
  eps = _validation.interval(
    "eps", _hyperparameter("eps", eps, injected, 1e-4), 0.0, np.inf, lo_open=True, hi_open=True
  )
  power = _hyperparameter("hessian_power", hessian_power, injected, 1.0)
  half = _validation.interval("hessian_power", power, 0.0, 1.0) / 2
  count = _update_count(state.count, "AdaHessian")
  lazy_refresh_moment = state.update_freq is not None and state.hessian is None
  every = int(np.asarray(state.update_freq)) if lazy_refresh_moment else 1
  nu_hat = _bias_corrected(state.nu, count, b2, every)
  # An entry without curvature yet (nu marked -0.0) is not moved by the updates: P = inf there.
  p = jax.tree.map(lambda v: jnp.where(jnp.signbit(v), jnp.inf, v**half + eps), nu_hat)
  return _masked_filled(p, state.nu, fill, "AdaHessian", "adahessian_preconditioner")


def adam_preconditioner(
  opt_state: Any,
  *,
  b2: jax.typing.ArrayLike | None = None,
  eps: jax.typing.ArrayLike | None = None,
  eps_root: jax.typing.ArrayLike | None = None,
  fill: jax.typing.ArrayLike | None = None,
) -> Any:
  """Adam's diagonal ``P = sqrt(v̂ + eps_root) + eps``, ``v̂ = nu / (1 − b2^count)``.

  For ``optax.amsgrad``'s state, ``v̂`` is its running maximum ``nu_max``
  (already bias-corrected), the denominator of its last update. For
  ``optax.adabelief``'s (``ScaleByBeliefState``), ``nu`` is the moment of ``g − m``, which
  holds its ``eps_root`` already: ``P = sqrt(v̂) + eps``, ``eps`` 1e-16 by default. optax's
  ``adam``, ``adamw``, ``nadam`` and ``yogi`` divide by this ``P``; ``radam``,
  ``adamax`` and ``lamb`` hold the same ``ScaleByAdamState`` but divide
  differently (rectification, an infinity norm, a trust ratio), so for them
  this is not their ``P``: build it yourself.

  The plain state does not hold the hyperparameters: pass the transform's
  (``yogi``'s ``eps`` is 1e-3, which the default 1e-8 would miss by a few
  percent of ``λ_max(P⁻¹H)``). Inside an ``optax.inject_hyperparams`` state
  the injected values are read from the state; passing a different value raises.

  Args:
    opt_state: Any optax state holding one :class:`optax.ScaleByAdamState`,
      ``ScaleByAmsgradState`` or ``ScaleByBeliefState`` (``optax.adam``, ``optax.adamw``,
      ``optax.amsgrad``, ``optax.adabelief``, in a chain or ``inject_hyperparams``).
    b2: Adam's ``b2``, in ``[0, 1)``; default the injected value, else 0.999.
      Unused for AMSGrad, whose ``nu_max`` is already corrected.
    eps: Adam's ``eps``, ``>= 0``; default the injected value, else 1e-8 (AdaBelief's
      default, 1e-16, for its state).
    eps_root: Adam's ``eps_root``, ``>= 0``; default the injected value, else 0. Unused for
      AdaBelief, whose ``nu`` holds it.
    fill: ``P`` on the leaves ``optax.masked`` or ``optax.multi_transform``
      leaves out of the state, as for :func:`adahessian_preconditioner`.

  Returns:
    ``P`` as a pytree like the params.

  Raises:
    ValueError: for a hyperparameter out of range (named), one that conflicts
      with the state's injected value, not exactly one Adam, AMSGrad or AdaBelief state,
      a state before its first update, replicated across devices, or inside
      ``optax.masked`` without ``fill``, or a scalar ``fill`` that is not ``> 0``
      (also where no leaf is masked out), or traced arrays (a call inside ``jax.jit`` or
      ``vmap``: ``P`` is built on the host, between jitted steps), named by path.
  """
  _check_concrete(opt_state, fill)
  found = _adam_states(opt_state)
  if len(found) != 1:
    kinds = sorted({type(x).__name__ for x in found})
    hint = (
      " It holds an AdaHessian state: its P is hessian.adahessian_preconditioner(opt_state)."
      if not found and adahessian_states(opt_state)
      else ""
    )
    if not found:  # {"count", "mu", "nu"}: an Adam state restored without a target
      fields = frozenset(optax.ScaleByAmsgradState._fields)
      hint += untyped_state_hint(opt_state, fields, frozenset({"count", "mu", "nu"}))
    raise ValueError(
      "expected exactly one optax.ScaleByAdamState, ScaleByAmsgradState or ScaleByBeliefState "
      "in the optimizer "
      f"state, found {len(found)}{' (' + ', '.join(kinds) + ')' if kinds else ''}. For another "
      "optimizer, build its diagonal P as a pytree like the params and pass it to "
      f"preconditioned_operator.{_groups_hint('adam_preconditioner') if found else ''}{hint}"
    )
  state = found[0]
  amsgrad = isinstance(state, optax.ScaleByAmsgradState)
  # AdaBelief's nu is the moment of g - m plus eps_root, added at every step: its update divides
  # by sqrt(nu_hat) + eps, with eps 1e-16 by default.
  belief = isinstance(state, optax.ScaleByBeliefState)
  what = "AMSGrad" if amsgrad else "AdaBelief" if belief else "Adam"
  injected = _injected(opt_state, state)
  b2 = _validation.interval(
    "b2", _hyperparameter("b2", b2, injected, 0.999), 0.0, 1.0, hi_open=True
  )
  default_eps = 1e-16 if belief else 1e-8
  eps = _validation.interval(
    "eps", _hyperparameter("eps", eps, injected, default_eps), 0.0, np.inf, hi_open=True
  )
  eps_root = _hyperparameter("eps_root", eps_root, injected, 0.0)
  eps_root = _validation.interval("eps_root", eps_root, 0.0, np.inf, hi_open=True)
  eps_root = 0.0 if belief else eps_root  # in AdaBelief's nu already
  count = _update_count(state.count, what)
  # AMSGrad divides by the running maximum of the corrected nu: corrected already.
  nu_hat = state.nu_max if amsgrad else _bias_corrected(state.nu, count, b2)
  p = jax.tree.map(lambda v: jnp.sqrt(v + eps_root) + eps, nu_hat)
  return _masked_filled(p, state.nu, fill, what, "adam_preconditioner")


def _scalars_broadcast(p: Any, params: Any) -> Any:
  """``p`` with each scalar leaf (a masked group's ``fill``) broadcast to the params under it:
  their leaf at that path, or every leaf of the subtree a prefix mask left out. ``p`` as given
  if it is one array or its structure is no prefix of the params' (the check then names it)."""
  leaves = jax.tree.leaves(p)
  if jax.tree_util.treedef_is_leaf(jax.tree.structure(p)) or all(np.ndim(x) for x in leaves):
    return p
  # Unboxed (Linen boxes, NNX variables: nnx.Optimizer's OptVariable where the params hold
  # nnx.Param), so that the paths of the two agree; the operator ravels either alike.
  p, params = layout.unboxed(p), layout.unboxed(params)

  def broadcast(path, x):
    if np.ndim(x):
      return x
    try:
      under = _subtree_at(params, path, jax.tree_util.keystr(path))
    except ValueError:
      return x
    return jax.tree.map(lambda w: jnp.broadcast_to(jnp.asarray(x), np.shape(w)), under)

  return jax.tree_util.tree_map_with_path(broadcast, p)


def preconditioned_operator(op: HessianOperator, preconditioner: Any) -> HessianOperator:
  """``v ↦ P^{-1/2} H P^{-1/2} v``: the Hessian in the coordinates ``θ + P^{-1/2} y``.

  Its eigenvalues are those of ``P⁻¹H``; its top eigenvector ``u`` is the
  parameter-space direction ``P^{-1/2} u`` (normalised) along which the
  optimizer's step is least stable. Its trace is ``Σ_i H_ii / P_i``.

  Args:
    op: A Hessian operator (any: full, block or masked, over any data).
    preconditioner: ``P``, positive, as a pytree like the params (from
      :func:`adahessian_preconditioner`, :func:`adam_preconditioner`, or your
      own) or a flat ``(n,)`` array; a scalar leaf stands for every entry of the params'
      leaf (or subtree) at its path; for a block operator (``op.block(leaf, where)``)
      its part, ``P``'s leaf at that path indexed by ``where``. Linen boxes and NNX
      variables aside: ``P`` from ``nnx.Optimizer``'s ``opt_state`` serves params from
      ``nnx.split(model, nnx.Param, ...)``, an unboxed ``P`` boxed params. An
      ``inf`` entry is a coordinate the optimizer does not move: ``P^{-1/2}`` is 0 there.

  Returns:
    A :class:`~adahessian_jax.hessian.HessianOperator` with the same layout,
    probes and data whose ``coordinates`` are ``P^{-1/2}`` (composed with
    ``op``'s own), so landscapes step in the rescaled coordinates. Each
    product costs one product of ``op``.

  Raises:
    ValueError: if ``P`` is a pytree of other leaves (paths, boxes aside) or leaf
      shapes than the params, a flat array of another size, not of a real floating dtype
      (complex, bool or integer; named by leaf path), or has an entry that
      is not positive (NaN, 0, negative or ``-inf``; named by leaf path and
      index in the leaf) or so small that ``P^{-1/2}`` overflows the operator's dtype
      (float16: below 2.3e-10; ``P^{-1/2}`` is computed in at least float32).
  """
  _checks.real(preconditioner, "the preconditioner", floating=True)  # a bool one read as 1, 0
  flat = op.layout.flatten(_scalars_broadcast(preconditioner, op.params), "the preconditioner")
  # P^{-1/2} is taken in at least float32, then cast: a float16 operator's P rounded to float16
  # first turned an eps-sized entry (1e-8, a unit without curvature) into 0, refused, and one
  # above 65504 into inf, a coordinate silently frozen.
  flat = jnp.asarray(flat, wide_dtype(op.dtype))
  host = np.asarray(flat)
  if not np.all(host > 0):  # NaN compares False
    bad = int(np.argmin(np.where(np.isnan(host), -np.inf, host)))
    raise ValueError(
      f"the preconditioner must be positive (inf for a coordinate the optimizer does not move), "
      f"got {host[bad]} at {op.layout.where(bad)}; an optimizer's P is positive when its eps is."
    )
  scale = (1.0 / jnp.sqrt(flat)).astype(op.dtype)
  over = np.isinf(np.asarray(scale))
  if np.any(over):  # a P below the operator's dtype's range (float16: 2.3e-10)
    bad = int(np.argmax(over))
    raise ValueError(
      f"the preconditioner's entry {host[bad]} at {op.layout.where(bad)} is too small for the "
      f"operator's {op.dtype}: P^(-1/2) overflows it. Analyse params cast to float32."
    )
  full = op.matmat_fn
  return dataclasses.replace(
    op,
    matmat_fn=lambda vs: scale_rows(full(scale_rows(vs, scale)), scale),
    coordinates=scale if op.coordinates is None else scale * op.coordinates,
  )
