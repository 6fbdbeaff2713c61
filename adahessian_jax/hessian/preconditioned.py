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
  Adam's ``ScaleByAdamState``, for comparison.

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

from adahessian_jax.hessian._operator import HessianOperator

__all__ = ["adahessian_preconditioner", "adam_preconditioner", "preconditioned_operator"]


def _bias_corrected(nu: Any, count: Any, b2: float, what: str, every: int = 1) -> Any:
  """``nu / (1 − b2^c)``, ``c`` the steps ``nu`` averaged: ``count`` rounded up to ``every``."""
  count = int(np.asarray(count))
  if count < 1:
    raise ValueError(
      f"the {what} state has count {count}: no update has been applied yet, so its second "
      "moment is zero and the preconditioner undefined. Measure after the first step."
    )
  correction = 1.0 - float(b2) ** (every * -(-count // every))
  return jax.tree.map(lambda v: v / jnp.asarray(correction, jnp.result_type(v)), nu)


def adahessian_preconditioner(
  opt_state: Any, *, b2: float = 0.999, eps: float = 1e-4, hessian_power: float = 1.0
) -> Any:
  """AdaHessian's diagonal ``P = v̂^{k/2} + eps``, ``v̂ = nu / (1 − b2^count)``.

  The denominator of the last update the state comes from (the update is
  ``lr · m̂ / P``, before any ``update_clip``). The state does not hold the
  hyperparameters: pass those of the transform. With a lazy refresh whose
  second moment moves on refresh steps only (``lazy_moment="refresh"``, a
  state with ``update_freq`` but no stored ``D``), ``count`` is rounded up to
  a multiple of ``update_freq``, as the transform does.

  Args:
    opt_state: Any optax state holding one
      :class:`~adahessian_jax.ScaleByAdaHessianState` (found with
      :func:`adahessian_jax.find_adahessian_state`).
    b2: The transform's ``b2``.
    eps: The transform's ``eps``.
    hessian_power: The transform's ``hessian_power`` ``k``.

  Returns:
    ``P`` as a pytree like the params.
  """
  import adahessian_jax  # the optimizer package imports this one: look it up at call time

  state = adahessian_jax.find_adahessian_state(opt_state)
  lazy_refresh_moment = state.update_freq is not None and state.hessian is None
  every = int(np.asarray(state.update_freq)) if lazy_refresh_moment else 1
  nu_hat = _bias_corrected(state.nu, state.count, b2, "AdaHessian", every)
  half = float(hessian_power) / 2
  return jax.tree.map(lambda v: v**half + eps, nu_hat)


def adam_preconditioner(
  opt_state: Any, *, b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0
) -> Any:
  """Adam's diagonal ``P = sqrt(v̂ + eps_root) + eps``, ``v̂ = nu / (1 − b2^count)``.

  Args:
    opt_state: Any optax state holding one :class:`optax.ScaleByAdamState`
      (``optax.adam``, ``optax.adamw``, in a chain or ``inject_hyperparams``).
    b2: Adam's ``b2``.
    eps: Adam's ``eps``.
    eps_root: Adam's ``eps_root``.

  Returns:
    ``P`` as a pytree like the params.
  """
  is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(x)]
  if len(found) != 1:
    raise ValueError(
      f"expected exactly one optax.ScaleByAdamState in the optimizer state, found {len(found)}."
    )
  nu_hat = _bias_corrected(found[0].nu, found[0].count, b2, "Adam")
  return jax.tree.map(lambda v: jnp.sqrt(v + eps_root) + eps, nu_hat)


@jax.jit
def _scale_rows(vs, scale):
  return vs * scale


def preconditioned_operator(op: HessianOperator, preconditioner: Any) -> HessianOperator:
  """``v ↦ P^{-1/2} H P^{-1/2} v``: the Hessian in the coordinates ``θ + P^{-1/2} y``.

  Its eigenvalues are those of ``P⁻¹H``; its top eigenvector ``u`` is the
  parameter-space direction ``P^{-1/2} u`` (normalised) along which the
  optimizer's step is least stable. Its trace is ``Σ_i H_ii / P_i``.

  Args:
    op: A Hessian operator (any: full, block or masked, over any data).
    preconditioner: ``P``, positive, as a pytree like the params (from
      :func:`adahessian_preconditioner`, :func:`adam_preconditioner`, or your
      own) or a flat ``(n,)`` array.

  Returns:
    A :class:`~adahessian_jax.hessian.HessianOperator` with the same layout,
    probes and data whose ``coordinates`` are ``P^{-1/2}`` (composed with
    ``op``'s own), so landscapes step in the rescaled coordinates. Each
    product costs one product of ``op``.

  Raises:
    ValueError: if ``P`` has the wrong size or an entry that is not positive and finite.
  """
  flat = preconditioner
  if not (isinstance(flat, jax.Array | np.ndarray) and np.ndim(flat) == 1):
    if jax.tree.structure(preconditioner) != jax.tree.structure(op.params):
      raise ValueError(
        "the preconditioner must have the structure of the params; got "
        f"{jax.tree.structure(preconditioner)}, expected {jax.tree.structure(op.params)}."
      )
    flat = op.ravel(preconditioner)
  flat = jnp.asarray(flat, op.dtype)
  if flat.shape != (op.size,):
    raise ValueError(f"the preconditioner must have {op.size} entries, got shape {flat.shape}")
  host = np.asarray(flat)
  if not np.all(np.isfinite(host) & (host > 0)):
    bad = int(np.argmin(np.where(np.isfinite(host), host, -np.inf)))
    raise ValueError(
      f"the preconditioner must be positive and finite, got {host[bad]} at flat index {bad}; "
      "an optimizer's P is positive when its eps is."
    )
  scale = 1.0 / jnp.sqrt(flat)
  full = op.matmat_fn
  return dataclasses.replace(
    op,
    matmat_fn=lambda vs: _scale_rows(full(_scale_rows(vs, scale)), scale),
    coordinates=scale if op.coordinates is None else scale * op.coordinates,
  )
