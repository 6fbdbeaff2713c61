"""Which of optax's wrappers is calling AdaHessian, or holds its state, for errors that name it.

Some wrappers change what the transform is given without a sign in its arguments:
``optax.flatten`` hands it one vector of all the parameters (so the spatial averaging sees no
layout and ``value_fn`` receives that vector), and ``optax.lookahead``, ``optax.contrib.sam`` and
``optax.contrib.galore`` pass it no ``value_fn`` or ``hessian_diag`` at all. Their functions are
found on the Python stack (at trace time, also under ``jax.jit``) by their code objects, so a
renamed optax file does not break the check: a wrapper that cannot be found is simply not named.
The fused route, which is given the whole optimizer state instead, finds the wrappers that pass
no extra arguments by their states' types (:func:`holding`). One table, :data:`WRAPPERS`, has an
entry per wrapper; :data:`NO_EXTRA_ARGS` (which wrappers pass no extra arguments, and what to do),
:func:`holding` and :func:`calling` all read it.
"""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax

__all__ = ["NO_EXTRA_ARGS", "WRAPPERS", "calling", "holding"]


class Wrapper(NamedTuple):
  """One optax wrapper that AdaHessian's errors name.

  Attributes:
    name: How errors name it, e.g. ``"optax.lookahead"``.
    message: For a wrapper whose ``update`` passes its inner transforms no extra arguments, the
      clause that says so and what to do (it goes into :data:`NO_EXTRA_ARGS`); ``None`` for one
      named for another reason (``optax.flatten``).
    state_type: Looks its state's class up in this optax (``None`` where it has none), for
      :func:`holding`; ``None`` for a wrapper without a message, which :func:`holding` skips.
    samples: Constructions of it around a given inner transform, one per code path (SAM's opaque
      mode has its own), whose ``init``/``update`` code objects :func:`calling` looks for.
  """

  name: str
  message: str | None
  state_type: Callable[[], Any] | None
  samples: tuple[Callable[[optax.GradientTransformation], Any], ...]


#: Every wrapper named, one entry each: adding one is one edit here.
WRAPPERS = (
  Wrapper(
    name="optax.flatten",
    message=None,
    state_type=None,
    samples=(lambda inner: optax.flatten(inner),),
  ),
  Wrapper(
    name="optax.lookahead",
    message=(
      "optax.lookahead, whose update passes its fast optimizer no extra arguments (and refuses "
      "value_fn and hessian_diag itself), so AdaHessian cannot run inside it in either route: "
      "train with AdaHessian without optax.lookahead."
    ),
    state_type=lambda: getattr(optax, "LookaheadState", None),
    samples=(lambda inner: optax.lookahead(inner, sync_period=1, slow_step_size=1.0),),
  ),
  Wrapper(
    name="optax.contrib.sam",
    message=(
      "optax.contrib.sam, whose update takes no extra argument but its own grad_fn and passes "
      "none on, so AdaHessian can be neither its optimizer nor its adv_optimizer, in either "
      "route: train with AdaHessian without optax.contrib.sam."
    ),
    state_type=lambda: getattr(optax.contrib, "SAMState", None),
    samples=(
      lambda inner: optax.contrib.sam(inner, inner),
      lambda inner: optax.contrib.sam(inner, inner, opaque_mode=True),
    ),
  ),
  Wrapper(
    name="optax.contrib.galore",
    message=(
      "optax.contrib.galore (scale_by_galore), whose update passes its base_optimizer no extra "
      "arguments (and gradients projected to a low rank, not the parameters' shapes), so "
      "AdaHessian cannot be its base_optimizer, in either route: train with AdaHessian without "
      "GaLore."
    ),
    state_type=lambda: getattr(optax.contrib, "GaLoreState", None),
    samples=(lambda inner: optax.contrib.scale_by_galore(base_optimizer=inner),),
  ),
)

#: The wrappers whose ``update`` passes their inner transforms no extra arguments, so that
#: neither ``value_fn`` nor ``hessian_diag`` can reach AdaHessian inside them, and what to do.
NO_EXTRA_ARGS = {w.name: w.message for w in WRAPPERS if w.message is not None}


def _state_types() -> dict[type, str]:
  """The state types of the wrappers in :data:`NO_EXTRA_ARGS` (those this optax has)."""
  found = {}
  for w in WRAPPERS:
    state_type = w.state_type() if w.message is not None and w.state_type is not None else None
    if isinstance(state_type, type):
      found[state_type] = w.name
  return found


def holding(opt_state: Any, holds: Callable[[Any], bool]) -> list[str]:
  """The names of the wrappers in :data:`NO_EXTRA_ARGS` whose states inside ``opt_state`` hold a
  node for which ``holds`` is true (an AdaHessian state), outermost first, each once.

  Args:
    opt_state: Any optax state.
    holds: Whether a node of the tree (tested as a leaf) is the one looked for.

  Returns:
    E.g. ``["optax.lookahead"]`` for the state of ``optax.lookahead(adahessian(...), ...)``;
    ``[]`` when no such wrapper's state holds one.
  """
  wrappers = _state_types()
  found: list[str] = []

  def visit(tree: Any) -> None:
    is_wrapper = lambda x: type(x) in wrappers and x is not tree
    for node in jax.tree.leaves(tree, is_leaf=lambda x: is_wrapper(x) or holds(x)):
      if is_wrapper(node):
        if any(holds(x) for x in jax.tree.leaves(node, is_leaf=holds)):
          name = wrappers[type(node)]
          if name not in found:
            found.append(name)
        visit(node)

  visit((opt_state,))  # a tuple around it, so that a wrapper's state at the root is visited too
  return found


@functools.cache
def _codes() -> dict[types.CodeType, str]:
  """The code objects of the wrappers' ``init``/``update`` functions, and the wrappers' names."""
  inner = optax.identity()
  codes = {}
  for w in WRAPPERS:
    for make in w.samples:
      try:
        tx = make(inner)
      except (AttributeError, TypeError):  # an optax without this wrapper or argument
        continue
      for fn in (tx.init, tx.update):
        code = getattr(fn, "__code__", None)
        if code is not None:
          codes[code] = w.name
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
