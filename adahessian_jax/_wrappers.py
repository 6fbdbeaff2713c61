"""Which of optax's wrappers is calling AdaHessian, for errors and warnings that name it.

Some wrappers change what the transform is given without a sign in its arguments:
``optax.flatten`` hands it one vector of all the parameters (so the spatial averaging sees no
layout and ``value_fn`` receives that vector), and ``optax.lookahead`` and ``optax.contrib.sam``
pass it no ``value_fn`` or ``hessian_diag`` at all. Their functions are found on the Python stack
(at trace time, also under ``jax.jit``) by their code objects, so a renamed optax file does not
break the check: a wrapper that cannot be found is simply not named.
"""

from __future__ import annotations

import functools
import sys
import types

import optax

__all__ = ["calling"]


@functools.cache
def _codes() -> dict[types.CodeType, str]:
  """The code objects of the wrappers' ``init``/``update`` functions, and the wrappers' names."""
  inner = optax.identity()
  made = (
    ("optax.flatten", lambda: optax.flatten(inner)),
    ("optax.lookahead", lambda: optax.lookahead(inner, sync_period=1, slow_step_size=1.0)),
    ("optax.contrib.sam", lambda: optax.contrib.sam(inner, inner)),
    ("optax.contrib.sam", lambda: optax.contrib.sam(inner, inner, opaque_mode=True)),
  )
  codes = {}
  for name, make in made:
    try:
      tx = make()
    except (AttributeError, TypeError):  # an optax without this wrapper or argument
      continue
    for fn in (tx.init, tx.update):
      code = getattr(fn, "__code__", None)
      if code is not None:
        codes[code] = name
  return codes


def calling() -> list[str]:
  """The names of the wrappers among this function's callers, innermost first, each once.

  Returns:
    E.g. ``["optax.flatten"]`` when called (through any number of frames) from the ``init`` or
    ``update`` of an ``optax.flatten``; ``[]`` when no wrapper it knows is on the stack.
  """
  codes = _codes()
  found: list[str] = []
  frame = sys._getframe(1)
  while frame is not None:
    name = codes.get(frame.f_code)
    if name is not None and name not in found:
      found.append(name)
    frame = frame.f_back
  return found
