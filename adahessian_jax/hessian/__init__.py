"""Hessian analysis for JAX models: eigenvalues, trace, diagonal, spectral density,
per-layer curvature and loss landscapes, over one batch or a whole data set.

.. code-block:: python

  from adahessian_jax import hessian

  op = hessian.hessian_operator(loss_fn, params, batches=train_batches)
  top = hessian.top_eigenvalues(op, k=5)                  # Lanczos
  tr = hessian.hutchpp_trace(op, jax.random.key(0))       # trace ± stderr
  esd = hessian.spectral_density(op, jax.random.key(1))   # SLQ density
  per_layer = hessian.layer_breakdown(op, jax.random.key(2))

Every analysis takes a :class:`HessianOperator`; products are counted in each
result's ``num_matvecs`` (landscapes aside), and a non-finite product or loss
raises :class:`NonFiniteError` as soon as it is seen. Plot helpers live in
:mod:`adahessian_jax.hessian.plot` (they need matplotlib) and are re-exported here.
"""

from adahessian_jax.hessian._checks import NonFiniteError
from adahessian_jax.hessian._data import WeightedData
from adahessian_jax.hessian._layout import ParamLayout
from adahessian_jax.hessian._operator import HessianOperator, hessian_operator
from adahessian_jax.hessian.density import SpectralDensity, spectral_density
from adahessian_jax.hessian.diagonal import DiagonalEstimate, hutchinson_diagonal_estimate, xdiag
from adahessian_jax.hessian.eigen import Eigen, power_iteration, top_eigenvalues
from adahessian_jax.hessian.landscape import (
  Landscape1D,
  Landscape2D,
  loss_landscape_1d,
  loss_landscape_2d,
  normalize_direction,
  random_direction,
)
from adahessian_jax.hessian.layers import LayerCurvature, layer_breakdown
from adahessian_jax.hessian.plot import (
  plot_landscape_1d,
  plot_landscape_2d,
  plot_spectral_density,
)
from adahessian_jax.hessian.preconditioned import (
  adahessian_preconditioner,
  adam_preconditioner,
  preconditioned_operator,
)
from adahessian_jax.hessian.trace import TraceEstimate, hutchinson_trace, hutchpp_trace, xtrace
from adahessian_jax.hessian.tracking import CurvatureRecord, Sharpness, track_curvature

__all__ = [
  "CurvatureRecord",
  "DiagonalEstimate",
  "Eigen",
  "HessianOperator",
  "Landscape1D",
  "Landscape2D",
  "LayerCurvature",
  "NonFiniteError",
  "ParamLayout",
  "Sharpness",
  "SpectralDensity",
  "TraceEstimate",
  "WeightedData",
  "adahessian_preconditioner",
  "adam_preconditioner",
  "hessian_operator",
  "hutchinson_diagonal_estimate",
  "hutchinson_trace",
  "hutchpp_trace",
  "layer_breakdown",
  "loss_landscape_1d",
  "loss_landscape_2d",
  "normalize_direction",
  "plot_landscape_1d",
  "plot_landscape_2d",
  "plot_spectral_density",
  "power_iteration",
  "preconditioned_operator",
  "random_direction",
  "spectral_density",
  "top_eigenvalues",
  "track_curvature",
  "xdiag",
  "xtrace",
]
