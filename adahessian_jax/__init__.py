"""AdaHessian for JAX and Optax, and Hessian-analysis tools for JAX models."""

from adahessian_jax import hutchinson, spatial
from adahessian_jax.alias import STATIC_ARGS, adahessian
from adahessian_jax.hutchinson import hutchinson_diagonal, hvp, rademacher_like
from adahessian_jax.transform import ScaleByAdaHessianState, scale_by_adahessian

__version__ = "0.1.0"

__all__ = [
    "STATIC_ARGS",
    "ScaleByAdaHessianState",
    "adahessian",
    "hutchinson",
    "hutchinson_diagonal",
    "hvp",
    "rademacher_like",
    "scale_by_adahessian",
    "spatial",
]
