"""Curvature over a training run: sharpness and preconditioned sharpness, warm-started.

:func:`track_curvature` is what a training loop calls every ``N`` steps: the top
Hessian eigenvalue (the sharpness ``λ_max(H)``), the top eigenvalue of the
preconditioned Hessian ``λ_max(P⁻¹H)`` for the optimizer's own ``P`` (see
:mod:`~adahessian_jax.hessian.preconditioned`), and optionally their traces.
Each Lanczos run starts from the previous measurement's eigenvector, so that
while the eigenvector drifts slowly a measurement costs a few products
instead of a cold start's tens. It runs on the host between training steps and
costs nothing in between.

A warm start sees only what its Krylov space reaches, so a small random probe
is mixed into it (``warm_mix``): without it, an old eigenvector that the new
Hessian maps to zero (a dead unit) is an invariant subspace Lanczos never
leaves. A new eigenvalue that overtakes the tracked one along a direction
orthogonal to the old eigenvector is still found later than from a random
start; pass ``previous=None`` now and then when that matters.

References:
  Cohen, Kaur, Li, Kolter, Talwalkar, `Gradient Descent on Neural Networks
  Typically Occurs at the Edge of Stability <https://arxiv.org/abs/2103.00065>`_,
  ICLR 2021.

  Cohen et al., `Adaptive Gradient Methods at the Edge of Stability
  <https://arxiv.org/abs/2207.14484>`_, 2022.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

from adahessian_jax.hessian import _checks
from adahessian_jax.hessian._operator import HessianOperator
from adahessian_jax.hessian.eigen import top_eigenvalues
from adahessian_jax.hessian.preconditioned import preconditioned_operator
from adahessian_jax.hessian.trace import TraceEstimate, xtrace

__all__ = ["CurvatureRecord", "Sharpness", "track_curvature"]


class Sharpness(NamedTuple):
  """The top eigenvalue of one operator at one point.

  Attributes:
    eigenvalue: The top Ritz value ``θ``.
    error: Estimated error of ``θ``, ``min(r, r²/gap)`` from the residual
      ``r`` and the gap to the next Ritz value (``Eigen.errors``).
    residual: ``r = ‖H y − θ y‖`` for the Ritz vector ``y``: some eigenvalue
      of ``H`` lies within ``r`` of ``θ`` (a bound, where ``error`` is an
      estimate).
    num_matvecs: Hessian-vector products spent.
    converged: Whether the stopping rule was met within ``max_iter``.
    eigenvector: The flat unit Ritz vector ``y``, the next warm start.
  """

  eigenvalue: float
  error: float
  residual: float
  num_matvecs: int
  converged: bool
  eigenvector: jax.Array


class CurvatureRecord(NamedTuple):
  """One measurement of :func:`track_curvature`.

  Attributes:
    sharpness: ``λ_max(H)``.
    preconditioned: ``λ_max(P⁻¹H)`` (``None`` without a preconditioner).
    trace: ``tr(H)`` by XTrace (``None`` unless asked for).
    preconditioned_trace: ``tr(P⁻¹H)`` by XTrace (``None`` unless asked for).
    num_matvecs: Hessian-vector products spent in all.
  """

  sharpness: Sharpness
  preconditioned: Sharpness | None
  trace: TraceEstimate | None
  preconditioned_trace: TraceEstimate | None
  num_matvecs: int


def _top(op, previous: Sharpness | None, key, tol, max_iter, stop_on, mix) -> Sharpness:
  v0 = None
  if previous is not None:
    # A little of a random probe: a previous eigenvector can sit in an invariant subspace of
    # the new Hessian (e.g. dead units: Hv = 0), which Lanczos could never leave.
    z = op.rademacher(key, 1)[0]
    v0 = previous.eigenvector + mix * z / np.sqrt(op.size)
  eig = top_eigenvalues(op, 1, key=key, v0=v0, tol=tol, max_iter=max_iter, stop_on=stop_on)
  return Sharpness(
    eigenvalue=float(eig.eigenvalues[0]),
    error=float(eig.errors[0]),
    residual=float(eig.residuals[0]),
    num_matvecs=eig.num_matvecs,
    converged=bool(eig.converged[0]),
    eigenvector=eig.eigenvectors_flat[0],
  )


def track_curvature(
  op: HessianOperator,
  previous: CurvatureRecord | None = None,
  *,
  preconditioner: Any = None,
  key: jax.Array | None = None,
  tol: float = 1e-4,
  max_iter: int = 200,
  stop_on: str = "eigenvalue",
  warm_mix: float = 0.01,
  trace_matvecs: int = 0,
) -> CurvatureRecord:
  """Sharpness and preconditioned sharpness at ``op``'s point, warm-started from ``previous``.

  Example (every 50 steps of an AdaHessian run)::

    record = None
    for step in range(num_steps):
      params, opt_state = train_step(params, opt_state, next(batches))
      if step % 50 == 0:
        op = hessian.hessian_operator(loss_fn, params, batch=probe_batch)
        P = hessian.adahessian_preconditioner(opt_state)
        record = hessian.track_curvature(op, record, preconditioner=P)
        print(step, record.sharpness.eigenvalue, record.preconditioned.eigenvalue)

  Args:
    op: The Hessian operator at the current params (a fixed batch, or the
      batches, whose Hessian is tracked).
    previous: The last record, whose eigenvectors start this measurement's
      Lanczos runs (``None``: random starts).
    preconditioner: The optimizer's ``P`` (a pytree like the params or a flat
      array), e.g. from :func:`~adahessian_jax.hessian.adahessian_preconditioner`;
      ``None`` skips the preconditioned quantities.
    key: PRNG key of the random starts and trace probes (default ``key(0)``).
    tol: Tolerance of each Lanczos run, relative to ``|θ|``.
    max_iter: Maximum Lanczos steps per run.
    stop_on: ``"eigenvalue"`` stops when the estimated eigenvalue error is
      below ``tol·|θ|`` (the default: tracking wants the eigenvalue);
      ``"residual"`` when the residual is, which bounds the error (costs more
      steps). See :func:`~adahessian_jax.hessian.top_eigenvalues`.
    warm_mix: Norm of the random probe added to a warm start (whose norm is 1),
      so that no direction is invisible to it.
    trace_matvecs: If positive, also estimate the traces by XTrace with this
      many products each.

  Returns:
    A :class:`CurvatureRecord`.

  Raises:
    NonFiniteError: if a product is not finite (a diverged run): record
      ``nan`` and stop measuring, or measure before the divergence.
  """
  key = jax.random.key(0) if key is None else key
  k_plain, k_pre, k_tr, k_pre_tr = jax.random.split(key, 4)
  trace_matvecs = _checks.count("trace_matvecs", trace_matvecs, 0)
  mix = _checks.positive("warm_mix", warm_mix, allow_zero=True)
  plain = _top(op, previous and previous.sharpness, k_plain, tol, max_iter, stop_on, mix)
  trace = None if trace_matvecs == 0 else xtrace(op, k_tr, trace_matvecs)
  pre = pre_trace = None
  if preconditioner is not None:
    pop = preconditioned_operator(op, preconditioner)
    pre = _top(pop, previous and previous.preconditioned, k_pre, tol, max_iter, stop_on, mix)
    pre_trace = None if trace_matvecs == 0 else xtrace(pop, k_pre_tr, trace_matvecs)
  spent = [plain, pre, trace, pre_trace]
  total = int(np.sum([x.num_matvecs for x in spent if x is not None]))
  return CurvatureRecord(plain, pre, trace, pre_trace, total)
