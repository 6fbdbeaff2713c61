"""Matplotlib helpers for spectral densities and loss landscapes (optional dependency).

Each helper draws on a given ``matplotlib.axes.Axes`` (or a new figure's) and
returns the axes, so figures compose; matplotlib is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from adahessian_jax import _validation
from adahessian_jax._extras import missing_extra
from adahessian_jax.hessian.density import SpectralDensity
from adahessian_jax.hessian.landscape import Landscape1D, Landscape2D

if TYPE_CHECKING:  # matplotlib is optional: imported on first use
  import matplotlib.axes

__all__ = ["plot_landscape_1d", "plot_landscape_2d", "plot_spectral_density"]


#: Each result the plots draw: the analysis that returns it and the function that plots it.
_PLOTS = {
  SpectralDensity: ("spectral_density", "plot_spectral_density"),
  Landscape1D: ("loss_landscape_1d", "plot_landscape_1d"),
  Landscape2D: ("loss_landscape_2d", "plot_landscape_2d"),
}


def _check_result(result: Any, expected: type) -> None:
  """Raises ``TypeError`` unless ``result`` is an ``expected``, naming the type given and, for
  another analysis's result, the function that plots that.

  A ``Landscape2D`` given to ``plot_landscape_1d`` drew one line per column of its losses, and
  the other mix-ups failed on a missing attribute.
  """
  if isinstance(result, expected):
    return
  source, call = _PLOTS[expected]
  other = next((fn for kind, (_, fn) in _PLOTS.items() if isinstance(result, kind)), None)
  fix = f": plot it with {other}" if other else ""
  raise TypeError(
    f"{call} plots a {expected.__name__} (from {source}), got an object of type "
    f"{type(result).__qualname__}{fix}."
  )


def _grid(landscape: Landscape1D | Landscape2D, call: str) -> list[np.ndarray]:
  """The landscape's steps and losses as float arrays, if each step array is 1-D and the losses
  have one entry per grid point; ``ValueError`` naming the shapes otherwise.

  A landscape edited with ``_replace`` (losses of another grid, steps of another length) was
  drawn from the entries the steps index, the rest dropped, without an error.
  """
  names = ["alphas"] if isinstance(landscape, Landscape1D) else ["alphas", "betas"]
  arrays = []
  for name in [*names, "losses"]:
    value = getattr(landscape, name)
    try:
      arrays.append(np.asarray(value, np.float64))
    except (TypeError, ValueError):
      raise ValueError(
        f"{call}: the landscape's {name} must be real numbers, got {value!r:.80}"
      ) from None
  *steps, losses = arrays
  for name, x in zip(names, steps, strict=True):
    if x.ndim != 1:
      raise ValueError(f"{call}: the landscape's {name} must be 1-D, got shape {x.shape}")
  grid = tuple(x.size for x in steps)
  if losses.shape != grid:
    given = " and ".join(f"{n} {x.shape}" for n, x in zip(names, steps, strict=True))
    raise ValueError(
      f"{call}: the landscape's losses have shape {losses.shape}, but its {given} make a grid "
      f"of shape {grid}: one loss per point (a landscape edited with _replace must keep them "
      "alike)."
    )
  return arrays


def _plot_line(ax: matplotlib.axes.Axes, x: np.ndarray, y: np.ndarray, kwargs: Any) -> None:
  """Draws ``y`` against ``x`` in order of ``x``; with a marker on every point if a finite ``y``
  has no finite neighbour (one point, or one between non-finite values), which a line alone
  does not show, unless ``kwargs`` sets ``marker``."""
  order = np.argsort(x, kind="stable")
  x, y = x[order], y[order]
  finite = np.isfinite(y)
  joined = np.zeros_like(finite)
  joined[1:] |= finite[:-1]
  joined[:-1] |= finite[1:]
  if np.any(finite & ~joined):
    kwargs = {"marker": "o", **kwargs}
  ax.plot(x, y, **kwargs)


def _axes(ax: matplotlib.axes.Axes | None) -> matplotlib.axes.Axes:
  try:
    import matplotlib.axes
    import matplotlib.pyplot as plt
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise missing_extra("plot", "adahessian_jax.hessian.plot_*", e) from e
  if ax is None:
    return plt.figure().add_subplot()
  # plt.subplots(1, 2)'s array of axes, or its figure, raised "'numpy.ndarray' object has no
  # attribute 'plot'" at the first drawing call.
  if not isinstance(ax, matplotlib.axes.Axes):
    raise TypeError(
      f"ax must be one matplotlib Axes, got {type(ax).__name__}: pass one of them, e.g. axes[0] "
      "of fig, axes = plt.subplots(1, 2), or fig.add_subplot()."
    )
  return ax


def plot_spectral_density(
  density: SpectralDensity,
  ax: matplotlib.axes.Axes | None = None,
  *,
  log: bool = True,
  floor: float = 1e-8,
  **line_kwargs: Any,
) -> matplotlib.axes.Axes:
  """Plots an eigenvalue density (log scale by default, as the bulk dwarfs the outliers).

  Args:
    density: A :class:`~adahessian_jax.hessian.SpectralDensity`.
    ax: Axes to draw on (default: a new figure's).
    log: Logarithmic density axis.
    floor: Values below this are raised to it on the log scale (which leaves out zeros); a
      finite number ``> 0``.
    **line_kwargs: Passed to ``ax.plot`` (``label=...``, ``color=...``).

  Returns:
    The axes. The points are joined in order of the grid; a point without a finite neighbour
    (a grid of one point) gets a marker, as in :func:`plot_landscape_1d`.

  Raises:
    TypeError: for a ``density`` that is no ``SpectralDensity`` (naming what plots it), or an
      ``ax`` that is no matplotlib ``Axes`` (an array of them).
    ValueError: for a ``log`` that is not a bool, a ``floor`` that is not a finite number
      ``> 0``, or a grid that is not 1-D or not of the density's shape (naming both).
  """
  _check_result(density, SpectralDensity)
  log = _validation.flag("log", log)
  # A floor <= 0 left zeros that the log scale drops, NaN or inf drew nothing, a str failed in
  # np.maximum without naming it.
  floor = _validation.positive("floor", floor)
  grid, y = (np.asarray(a, np.float64) for a in (density.grid, density.density))
  if grid.ndim != 1 or y.shape != grid.shape:
    raise ValueError(
      f"plot_spectral_density: the density's grid must be 1-D and its density of the grid's "
      f"shape, got shapes {grid.shape} and {y.shape} (a density edited with _replace must keep "
      "them alike)."
    )
  ax = _axes(ax)
  # A grid of one point (spectral_density(..., grid=[0.0])) drew nothing, one out of order a
  # zig-zag: drawn as plot_landscape_1d draws its steps.
  _plot_line(ax, grid, np.maximum(y, floor) if log else y, line_kwargs)
  if log:
    ax.set_yscale("log")
  ax.set_xlabel("eigenvalue")
  ax.set_ylabel("density")
  return ax


def plot_landscape_1d(
  landscape: Landscape1D, ax: matplotlib.axes.Axes | None = None, **line_kwargs: Any
) -> matplotlib.axes.Axes:
  """Plots ``loss(θ + α d)`` against ``α``.

  Args:
    landscape: A :class:`~adahessian_jax.hessian.Landscape1D`.
    ax: Axes to draw on (default: a new figure's).
    **line_kwargs: Passed to ``ax.plot``.

  Returns:
    The axes. The points are joined in order of ``α`` (a grid in another order would draw a
    zig-zag). Where a finite loss has no finite neighbour (a landscape of one point, or one
    between non-finite losses, which a line alone does not show), every point gets a marker,
    unless ``line_kwargs`` sets ``marker``.

  Raises:
    TypeError: for a ``landscape`` that is no ``Landscape1D`` (a ``Landscape2D``: use
      :func:`plot_landscape_2d`), or an ``ax`` that is no matplotlib ``Axes``.
    ValueError: for ``alphas`` that are not 1-D, or ``losses`` not of their shape (naming both).
  """
  _check_result(landscape, Landscape1D)
  alphas, losses = _grid(landscape, "plot_landscape_1d")
  ax = _axes(ax)
  _plot_line(ax, alphas, losses, line_kwargs)
  ax.set_xlabel("step along direction")
  ax.set_ylabel("loss")
  return ax


def plot_landscape_2d(
  landscape: Landscape2D,
  ax: matplotlib.axes.Axes | None = None,
  *,
  levels: int = 30,
  log: bool = False,
  colorbar: bool = True,
  **contour_kwargs: Any,
) -> matplotlib.axes.Axes:
  """Contour plot of ``loss(θ + α d₁ + β d₂)``.

  Args:
    landscape: A :class:`~adahessian_jax.hessian.Landscape2D`.
    ax: Axes to draw on (default: a new figure's).
    levels: Number of contour levels (or matplotlib's sequence of level values).
    log: Contour ``log10(loss)`` instead of the loss.
    colorbar: Whether to add a colour bar.
    **contour_kwargs: Passed to ``ax.contourf``.

  Returns:
    The axes. Non-finite losses (a diverged loss far along a direction) are left blank; grids
    in any order are drawn in order of ``α`` and ``β`` (contours of an unsorted grid fold).

  Raises:
    TypeError: for a ``landscape`` that is no ``Landscape2D`` (a ``Landscape1D``: use
      :func:`plot_landscape_1d`), or an ``ax`` that is no matplotlib ``Axes``.
    ValueError: for a ``log`` or ``colorbar`` that is not a bool, ``levels`` that is no integer
      ``>= 1`` nor a sequence, steps that are not 1-D,
      ``losses`` not of shape ``(len(alphas), len(betas))``, a grid with fewer than 2 points
      along a direction, and with ``log`` for a loss ``<= 0`` (naming the first one).
  """
  _check_result(landscape, Landscape2D)
  log, colorbar = _validation.flag("log", log), _validation.flag("colorbar", colorbar)
  # A count (None and a sequence of values go to matplotlib as they are): matplotlib took True as
  # 1 level and raised "len() of unsized object" for 1.5 and ZeroDivisionError for -1.
  if levels is not None and np.ndim(levels) == 0:
    levels = _validation.count("levels", levels)
  alphas, betas, losses = _grid(landscape, "plot_landscape_2d")
  a, b = np.argsort(alphas, kind="stable"), np.argsort(betas, kind="stable")
  alphas, betas, losses = alphas[a], betas[b], losses[np.ix_(a, b)]
  if alphas.size < 2 or betas.size < 2:
    raise ValueError(
      f"plot_landscape_2d needs at least 2 alphas and 2 betas for a contour plot, got "
      f"{alphas.size} and {betas.size}: evaluate the plane on longer grids, or plot a line with "
      "plot_landscape_1d."
    )
  if log and np.any(losses <= 0):
    i, j = np.argwhere(losses <= 0)[0]
    raise ValueError(
      f"plot_landscape_2d(log=True) needs positive losses, got {float(losses[i, j])} at "
      f"alpha={float(alphas[i])}, beta={float(betas[j])}: pass log=False, or plot a shifted "
      "landscape, landscape._replace(losses=landscape.losses - np.nanmin(landscape.losses) + 1e-3)."
    )
  ax = _axes(ax)
  z = np.log10(losses) if log else losses
  cs = ax.contourf(alphas, betas, z.T, levels=levels, **contour_kwargs)
  ax.contour(alphas, betas, z.T, levels=levels, colors="k", linewidths=0.3)
  ax.plot([0], [0], "w+", markersize=10)
  ax.set_xlabel("direction 1")
  ax.set_ylabel("direction 2")
  if colorbar:
    ax.figure.colorbar(cs, ax=ax, label="log10 loss" if log else "loss")
  return ax
