"""``adahessian``: the ready-made optimizer, one :func:`optax.chain`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from adahessian_jax import _validation, spatial
from adahessian_jax.transform import scale_by_adahessian

__all__ = ["STATIC_ARGS", "adahessian"]

#: Arguments of :func:`adahessian` that fix shapes, control flow or are
#: callables; pass them as ``static_args`` to :func:`optax.inject_hyperparams`.
STATIC_ARGS = (
  "block_size",
  "update_freq",
  "n_samples",
  "seed",
  "averaging",
  "weight_decay_mask",
  "mu_dtype",
  "nu_dtype",
  "independent_probes",
)


def adahessian(
  learning_rate: optax.ScalarOrSchedule = 0.15,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-4,
  weight_decay: jax.typing.ArrayLike = 0.0,
  weight_decay_mask: Any | Callable[[optax.Params], Any] | None = None,
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
  r"""The AdaHessian optimizer (Yao et al., 2021) with decoupled weight decay.

  Exactly the official rule ``p ← p − lr · (m̂ / (v̂^{k/2} + eps) + wd · p)``:

  .. code-block:: python

    optax.chain(
        scale_by_adahessian(b1, b2, eps, hessian_power, ...),
        optax.add_decayed_weights(weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )

  Every update needs the loss: pass ``value_fn=lambda p: loss_fn(p, batch)``
  (or a precomputed ``hessian_diag``) to ``update``; see
  :func:`adahessian_jax.scale_by_adahessian`.

  Args:
    learning_rate: A float or an optax schedule. The default 0.15 is the
      official image-classification code's; the paper used 0.047 with
      inverse-sqrt warm-up for translation.
    b1: Decay rate of the gradient's moving average.
    b2: Decay rate of the moving average of the squared Hessian diagonal.
    eps: Added to the denominator outside the power (official default 1e-4).
    weight_decay: Decoupled weight decay, multiplied by the learning rate, >= 0.
    weight_decay_mask: A pytree of booleans like the params, or a callable
      returning one, selecting which leaves are decayed.
    hessian_power: The power ``k`` in [0, 1] of the Hessian-diagonal term.
    block_size: Block size of the default spatial averaging of rank-2 kernels.
    update_freq: Refresh the Hessian every ``update_freq`` steps.
    n_samples: Hutchinson probes per refresh.
    seed: Seed of the probes' PRNG key.
    axis_name: Mapped axis to average the Hessian estimate over.
    averaging: Spatial-averaging rules (see :func:`scale_by_adahessian`).
    mu_dtype: dtype of the first moment.
    nu_dtype: dtype of the second moment and the stored Hessian diagonal.
    independent_probes: With ``axis_name``, a different probe on every device
      (lower variance, no longer the exact single-device result).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  References:
    Yao et al., `ADAHESSIAN: An Adaptive Second Order Optimizer for Machine
    Learning <https://arxiv.org/abs/2006.00719>`_, AAAI 2021.
  """
  _validation.in_interval("weight_decay", weight_decay, 0.0, float("inf"))
  return optax.chain(
    scale_by_adahessian(
      b1=b1,
      b2=b2,
      eps=eps,
      hessian_power=hessian_power,
      block_size=block_size,
      update_freq=update_freq,
      n_samples=n_samples,
      seed=seed,
      axis_name=axis_name,
      averaging=averaging,
      mu_dtype=mu_dtype,
      nu_dtype=nu_dtype,
      independent_probes=independent_probes,
    ),
    optax.add_decayed_weights(weight_decay, weight_decay_mask),
    optax.scale_by_learning_rate(learning_rate),
  )
