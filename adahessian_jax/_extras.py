"""Optional dependencies: the error that says which extra to install.

The core package needs only jax, optax and numpy. The helpers that need more
import it through a ``try`` whose ``except`` raises :func:`missing_extra`::

  try:
    from flax import nnx
  except ImportError as e:
    raise missing_extra("flax", "adahessian_jax.nnx", e) from e

Extras (``pyproject.toml`` declares them):

* ``flax``: :mod:`adahessian_jax.linen`, :mod:`adahessian_jax.nnx`, and orbax
  checkpoints of the optimizer state.
* ``plot``: the ``plot_*`` helpers of :mod:`adahessian_jax.hessian`.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["from_nnx", "loaded", "missing_extra"]


def loaded(module: str, name: str) -> Any:
  """``module.name`` if ``module`` has been imported, else ``None``, without importing it.

  A Flax box, variable or error can only be met once Flax was imported, so the checks that
  recognise them look them up here and Flax stays optional.

  Args:
    module: A module's full name, e.g. ``"flax.nnx"``.
    name: An attribute of it, e.g. ``"Variable"``.

  Returns:
    The attribute, or ``None`` if the module is not imported or has no such attribute.
  """
  return getattr(sys.modules.get(module), name, None)


def from_nnx(x: Any) -> bool:
  """Whether ``x`` is an object of Flax NNX (an ``nnx.State``, say), by its type's module,
  without importing Flax (as :func:`loaded`)."""
  return type(x).__module__.startswith("flax.nnx")


def missing_extra(extra: str, feature: str, error: ImportError) -> ImportError:
  """The ``ImportError`` for a feature whose optional dependencies are missing.

  Args:
    extra: The name of the extra that installs them, e.g. ``"flax"``.
    feature: What needs them, e.g. ``"adahessian_jax.linen"``.
    error: The original ``ImportError``; its message is kept, because it names
      the module that was not found (or why an installed one failed to import).

  Returns:
    An ``ImportError`` naming the extra and the command that installs it, to be
    raised ``from error``.
  """
  return ImportError(
    f'{feature} needs the optional dependencies of the "{extra}" extra, and importing them '
    f'failed ({error}). Install them with: pip install "adahessian_jax[{extra}]"',
    name=error.name,
  )
