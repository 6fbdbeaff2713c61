"""AdaHessian for JAX and Optax, and Hessian-analysis tools for JAX models."""

from adahessian_jax import distributed, hessian, hutchinson, spatial
from adahessian_jax.alias import STATIC_ARGS, adahessian
from adahessian_jax.fused import value_grad_and_hessian_diag
from adahessian_jax.hutchinson import hutchinson_diagonal, hvp, rademacher_like
from adahessian_jax.masking import masked_value_fn
from adahessian_jax.state import (
  ScaleByAdaHessianState,
  find_adahessian_state,
  is_refresh_step,
  map_adahessian_state,
  probe_keys,
)
from adahessian_jax.transform import scale_by_adahessian

__version__ = "0.1.0"

__all__ = [
  "STATIC_ARGS",
  "ScaleByAdaHessianState",
  "adahessian",
  "distributed",
  "find_adahessian_state",
  "hessian",
  "hutchinson",
  "hutchinson_diagonal",
  "hvp",
  "is_refresh_step",
  "map_adahessian_state",
  "masked_value_fn",
  "probe_keys",
  "rademacher_like",
  "scale_by_adahessian",
  "spatial",
  "value_grad_and_hessian_diag",
]
