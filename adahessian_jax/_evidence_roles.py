"""Axis names by their roles, as the readers of :mod:`adahessian_jax._evidence` read and give
them: the name a reader gives an axis of a role (:func:`role_name`), and the leading stacked axes
of a leaf's names (:func:`stacked_prefix`, :func:`leading_stack`, :func:`lead_names`).
"""

from __future__ import annotations

from collections.abc import Mapping

from adahessian_jax.layout import STACKED, AxisNames, axis_role


def role_name(roles: Mapping[str, str], role: str) -> str | None:
  """The name every reader gives an axis it finds to have ``role``: the role's own word if it is
  a name in ``roles`` (``"spatial"``, ``"heads"``, ``"features"``, ``"vocab"``), else the first
  name of that role in ``roles``' order (``"layers"`` for a stacked axis, by
  :data:`~adahessian_jax.spatial.AXIS_ROLES`); ``None`` if no name has the role."""
  if roles.get(role) == role:
    return role
  return next((x for x, r in roles.items() if r == role), None)


def stacked_prefix(names: AxisNames, roles: Mapping[str, str]) -> int:
  """How many of ``names`` lead with a stacked role (``("layers", None, "mlp")``: 1)."""
  n = 0
  while n < len(names) and names[n] is not None and axis_role(names[n], roles) == STACKED:
    n += 1
  return n


def lead_names(names: AxisNames | None, lead: int) -> AxisNames:
  """The names of a leaf's ``lead`` leading (stacked) axes, ``()`` for a leaf without names
  (:func:`leading_stack`: its stack not named yet, or none)."""
  return tuple(names[:lead] if names else ())


def leading_stack(names: AxisNames | None, roles: Mapping[str, str]) -> int | None:
  """The number of leading stacked axes of a leaf with no other names, else ``None``."""
  if names is None:
    return 0
  n = stacked_prefix(names, roles)
  return n if n and all(x is None for x in names[n:]) else None
