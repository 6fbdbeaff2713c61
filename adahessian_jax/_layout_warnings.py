"""The :class:`LayoutGuessWarning` and the texts of its warnings: leaves whose layout the default
guessed, the hints for a tree inside ``optax.masked`` and for NNX variables, and parameters split
over mesh axes inside ``shard_map``; with the ``stacklevel`` that points at the user's line.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import optax

from adahessian_jax import layout
from adahessian_jax._averaging import Averaging, AveragingSpec
from adahessian_jax._listing import Row


class LayoutGuessWarning(UserWarning):
  """The default averaging guessed what the axes of some leaves are.

  Issued by the optimizer's ``init`` (``scale_by_adahessian``, ``adahessian``), once per tree,
  naming the leaves (see :func:`strict`). Where a guessed axis stacks layers or experts, the
  guess averages the curvature across them. Say what the axes are (axis names, or rules through
  ``averaging=``), make it an error with ``averaging=spatial.strict()``, or silence it with
  ``warnings.filterwarnings("ignore", category=spatial.LayoutGuessWarning)``.

  Also issued when NNX variables' axis names decide some leaves' rules that the plain arrays
  ``nnx.Optimizer.update`` passes would not (pass ``averaging=spatial.named(...)``), and by
  ``update`` inside ``shard_map``, where some parameters are split over mesh axes and the
  default reads layouts off the shards' shapes (pass the rules resolved on the whole model's
  params: ``averaging=spatial.resolve_rules(None, params, block_size, warn=True)``).
  """


#: The packages whose frames a warning skips to point at the line of the user's code.
_LIBRARY_PACKAGES = frozenset(("adahessian_jax", "optax", "jax", "jaxlib", "flax"))


def user_stacklevel() -> int:
  """The ``stacklevel`` of the first frame outside :data:`_LIBRARY_PACKAGES`, for
  ``warnings.warn`` called by the caller of this function: the user's ``tx.init(params)``, also
  through ``optax.chain``, ``nnx.Optimizer`` or ``jax.eval_shape``.

  Returns:
    The ``stacklevel`` to pass to ``warnings.warn`` in the function that calls this one.
  """
  frame, level = sys._getframe(2), 2
  while (
    frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in _LIBRARY_PACKAGES
  ):
    frame, level = frame.f_back, level + 1
  return level


#: How many guessed leaves the warning names (the others are counted).
WARN_LEAVES = 5


def guess_warning(rows: Sequence[Row]) -> str:
  listed = "".join(f"\n  {r.path}: shape {r.shape}, {r.rule}: {r.why}" for r in rows[:WARN_LEAVES])
  more = f"\n  ... and {len(rows) - WARN_LEAVES} more" if len(rows) > WARN_LEAVES else ""
  return (
    f"the spatial averaging of {len(rows)} {'leaf' if len(rows) == 1 else 'leaves'} is a "
    "guess (no axis names, module names or shapes say what their axes are):"
    f"{listed}{more}\n"
    "If a guessed axis stacks layers or experts, the curvature is averaged across them. Say "
    "what the axes are (nn.with_partitioning/nn.with_logical_partitioning, NNX sharding "
    "metadata, spatial.named(partition_specs)) or give rules through averaging=; "
    "spatial.describe(params, block_size=...) lists every leaf and why, and "
    "averaging=spatial.strict() makes guesses an error. If the guesses are right: "
    "warnings.filterwarnings('ignore', category=adahessian_jax.spatial.LayoutGuessWarning)."
  )


def _resolve_fix(averaging: Any, block_size: int) -> str:
  """The ``averaging=`` that reads the rules on the whole model, for a warning's text."""
  given = "None" if averaging is None else "averaging"
  size = f", block_size={block_size}" if block_size != 1 else ""
  return f"averaging=adahessian_jax.spatial.resolve_rules({given}, params{size}, warn=True)"


def masked_hint(averaging: Any, params: Any, block_size: int) -> str:
  """For a tree with :class:`optax.MaskedNode` s (inside ``optax.masked``/``multi_transform``), how
  to read it with the leaves of the other transforms in view, or ``""``."""
  hidden = sum(
    isinstance(x, optax.MaskedNode)
    for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  )
  if not hidden:
    return ""
  return (
    f"\nThis transform runs inside optax.masked or optax.multi_transform and does not see the "
    f"{hidden} {'leaf' if hidden == 1 else 'leaves'} of the other transforms, whose shapes (a "
    "bias beside its kernel) often say what the axes are. Read the whole tree instead: "
    f"{_resolve_fix(averaging, block_size)}, with params the whole model's."
  )


def nnx_module_hint(averaging: Any, params: Any) -> str:
  """For NNX variables without names given (``nnx.Optimizer``'s ``init`` sees the variables), the
  fix that reads each layout from its module's type, or ``""``."""
  if isinstance(averaging, Averaging) and averaging.names is not None:
    return ""
  if not any(map(layout.is_nnx_variable, layout.nnx_nodes(params))):
    return ""
  return (
    "\nThese are NNX variables: averaging=spatial.named(model), with the nnx.Module, names the "
    "axes of the parameters of nnx.Conv, nnx.Linear, nnx.LinearGeneral, nnx.MultiHeadAttention, "
    "nnx.Embed and other known modules (and stacks of them) from the modules' types."
  )


def warn_shard_shapes(
  averaging: AveragingSpec,
  block_size: int,
  split: Mapping[str, tuple[Any, ...]],
  read: Sequence[str],
) -> None:
  """Warns when parameters are split over mesh axes (inside ``shard_map``) and the default rule
  reads some layouts off shapes: it sees the shards' shapes there, not the whole model's.

  Args:
    averaging: The optimizer's ``averaging``, for the fix the warning names.
    block_size: The optimizer's ``block_size``, likewise.
    split: The paths of the parameters split over mesh axes, and those axes.
    read: The paths of the leaves whose layout was read off their shapes
      (:func:`resolve_rules_and_read_off`'s).
  """
  if not split or not read:
    return
  listed = lambda paths: ", ".join(list(paths)[:3]) + (", ..." if len(paths) > 3 else "")
  warnings.warn(
    f"scale_by_adahessian inside shard_map: {len(split)} parameter(s) ({listed(split)}) are "
    f"split over mesh axes {sorted(set().union(*split.values()), key=str)}, so the transform "
    f"sees their shards' shapes, and the default averaging reads the layout of {len(read)} "
    f"leaf(s) ({listed(read)}) off shapes: a stack of layers, a convolution or a PyTorch "
    "(out, in) kernel can be read otherwise than on the whole model. Resolve the rules on the "
    f"whole model's params and pass them: {_resolve_fix(averaging, block_size)}.",
    LayoutGuessWarning,
    stacklevel=user_stacklevel(),
  )
