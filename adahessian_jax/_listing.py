"""What the resolver reports of every leaf: :func:`describe`'s :class:`Row` s and :class:`Listing`
(a text table), and the error of strict mode, which names the ambiguous rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

from adahessian_jax._rules import Rule
from adahessian_jax._validation import flag
from adahessian_jax.layout import AxisNames


class Row(NamedTuple):
  """One leaf in :func:`describe`'s listing.

  Attributes:
    path: The leaf's path (``jax.tree_util.keystr``, a box's ``.value`` omitted).
    shape: Its shape.
    names: Its axis names: its own or given with :func:`named`, else those the tree shows
      (``("layers", None, None)`` for a stack found from its bias; ``None`` where neither).
    rule: The concrete rule applied (see :meth:`Rule.explain`).
    why: Why that rule.
    groups: ``{group size: number of groups}``; the sizes times the counts add
      up to the leaf's size. ``None`` for a custom rule without ``groups``.
    ambiguous: Whether the rule is a guess (see :func:`strict`).
  """

  path: str
  shape: tuple[int, ...]
  names: AxisNames | None
  rule: Rule
  why: str
  groups: dict[int, int] | None
  ambiguous: bool


def _groups_text(groups: dict[int, int] | None) -> str:
  if groups is None:
    return "?"
  return " + ".join(f"{c}x{s}" for s, c in sorted(groups.items(), reverse=True)) or "-"


@dataclasses.dataclass(frozen=True)
class Listing:
  """What the averaging does to every leaf; ``print`` it for a table.

  Attributes:
    rows: One :class:`Row` per leaf, in ``jax.tree.leaves`` order.
  """

  rows: tuple[Row, ...]

  @property
  def ambiguous(self) -> tuple[Row, ...]:
    """The rows whose rule is a guess (see :func:`strict`)."""
    return tuple(r for r in self.rows if r.ambiguous)

  def __str__(self) -> str:
    return self.table()

  def table(self, why: bool = True) -> str:
    """The rows as a text table.

    Args:
      why: Whether to include the column of reasons.

    Returns:
      The table, one line per leaf after a header (``str(listing)`` is it with the reasons).

    Raises:
      ValueError: for a ``why`` that is not a bool.
    """
    why = flag("why", why)
    header = ("path", "shape", "axis names", "rule", "groups (count x size)", "why")
    cells = [header] + [
      (
        r.path,
        str(r.shape),
        "-" if r.names is None else str(r.names),
        str(r.rule),
        _groups_text(r.groups),
        r.why,
      )
      for r in self.rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header) - 1)]
    lines = [
      "  ".join(c[i].ljust(widths[i]) for i in range(len(widths))) + "  " + c[-1] for c in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * len(header[-1]))
    if not why:
      lines = [line[: sum(widths) + 2 * (len(widths) - 1)] for line in lines]
    return "\n".join(line.rstrip() for line in lines)


def ambiguity_error(rows: Sequence[Row], hint: str = "") -> ValueError:
  listed = "\n".join(f"  {r.path}: shape {r.shape}, axis names {r.names}: {r.why}" for r in rows)
  return ValueError(
    f"strict spatial averaging: {len(rows)} {'leaf is' if len(rows) == 1 else 'leaves are'} "
    "ambiguous (the rule is a guess: no axis names that say what each axis is, no explicit "
    "rule):\n"
    f"{listed}\n"
    "Name their axes (nn.with_logical_partitioning, nnx sharding metadata, or "
    "spatial.named(partition_specs)), or give each a rule through averaging=, e.g. "
    "spatial.mean_over(0) for a 1-D Conv kernel, spatial.blocks(32, axis=0) for an attention "
    "kernel (embed, heads, head_dim), spatial.per_layer(spatial.flax_default(32)) for a stack "
    "of Dense kernels (layers, in, out). spatial.describe(params) lists every leaf." + hint
  )
