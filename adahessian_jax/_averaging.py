"""The ``averaging`` specification: what users pass (a rule, a pytree prefix of rules, a callable
``(path, leaf) -> rule | None``, or an :class:`Averaging` from :func:`named` / :func:`strict`),
its checks when the optimizer is built, and its reading into one unbound rule per leaf.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

from adahessian_jax import layout, masking
from adahessian_jax._extras import from_nnx, loaded
from adahessian_jax._flax_default import flax_default
from adahessian_jax._rules import Rule, blocks, is_rule, mean_over, none, per_layer
from adahessian_jax._validation import STATIC_FIX, callable_with, flag, path_str
from adahessian_jax.layout import AxisNames


@dataclasses.dataclass(frozen=True)
class Averaging:
  """An averaging specification with what the resolver needs besides the rules.

  Build it with :func:`named` and :func:`strict`; it is accepted wherever an
  ``averaging`` argument is.

  Attributes:
    rules: ``None``, a rule, a pytree prefix of rules, or a callable
      ``(path, leaf) -> rule | None``, as for :func:`resolve_rules`.
    names: ``(path string, axis names)`` pairs for leaves that carry no names of
      their own (see :func:`named`), or ``None``.
    strict: Refuse ambiguous leaves (see :func:`strict`).
  """

  rules: Any = None
  names: tuple[tuple[str, AxisNames | None], ...] | None = None
  strict: bool = False

  def __post_init__(self) -> None:
    flag("Averaging: strict", self.strict)  # a config's "False" is truthy: it was strict


# The callable is spelled out so that type checkers infer a lambda's (path, leaf) arguments; a
# pytree prefix of rules (or None) has no type of its own, hence Any.
AveragingSpec = Rule | Averaging | Callable[[tuple[Any, ...], Any], Rule | None] | Any


def _is_nnx_state(tree: Any) -> bool:
  """Whether ``tree`` is an NNX state (``nnx.state(model)``) or holds NNX variables."""
  return from_nnx(tree) or any(map(layout.is_nnx_variable, layout.nnx_nodes(tree)))


def named(source: Any, averaging: AveragingSpec = None) -> Averaging:
  """Gives the default rule the axis names of ``source`` for leaves that carry none.

  The optimizer sees plain arrays where the names were stripped: after
  ``nn.unbox``, and always under ``nnx.Optimizer.update`` (it passes
  ``nnx.as_pure`` state). Take the names from a tree that has them::

    # Linen: params = nn.unbox(boxed); names from the boxes or their specs
    tx = adahessian_jax.adahessian(lr, averaging=spatial.named(nn.get_partition_spec(boxed)))
    # NNX: the module itself (its variables' sharding metadata, else their modules' types)
    tx = adahessian_jax.adahessian(lr, averaging=spatial.named(model))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  Given an ``nnx.Module``, each variable keeps the names of its sharding
  metadata; one without them gets names from the type of the module holding
  it: ``nnx.Conv``/``nnx.ConvTranspose`` kernels ``("spatial", ...,
  "channels", "features")``, ``nnx.Linear`` ``("embed", "mlp")``,
  ``nnx.LinearGeneral`` its last input axis ``"embed"``, any input axes before it
  ``"heads"``, its output axes ``"mlp"`` and its batch axes ``"layers"`` (a kernel
  ``(2, 8, 4, 5)`` over ``axis=(-2, -1)``: ``("heads", "embed", "mlp", "mlp")``),
  ``nnx.MultiHeadAttention``'s query, key and
  value ``("embed", "heads", "head_dim")`` and output ``("heads", "head_dim",
  "embed")``, ``nnx.Embed`` ``("vocab", "embed")`` (none for a table of attention
  biases by its name, T5's ``relative_attention_bias``), ``nnx.LoRA``, the norms'
  scales and biases, and an ``nnx.Einsum`` whose string lays its kernel out
  inputs first. Axes before those (the stack of ``nnx.vmap``/``nnx.scan``) are
  named ``"layers"``, unless a parameter of the module or of a sibling module
  does not fit its one-layer shape after the same axes (a stack along another
  axis). Variables of other modules get none (the default reading).

  Leaves are matched by path (a box's ``.value`` step ignored); a leaf of the
  optimized tree that is not in ``source`` raises ``ValueError``. Only the
  names are kept, not the arrays.

  Args:
    source: An ``nnx.Module``, boxed Linen params, an NNX state of variables,
      or a tree of ``PartitionSpec`` (see :mod:`adahessian_jax.layout`).
    averaging: The rules, as for :func:`resolve_rules` (``None``: the default),
      or an :class:`Averaging` to add the names to.

  Returns:
    An :class:`Averaging`.

  Raises:
    ValueError: if ``source`` carries no axis names at all.
  """
  if _is_nnx_module(source):
    from adahessian_jax import nnx as nnx_support  # Flax is imported: source is its module

    names = nnx_support.module_axis_names(source)
    missing = (
      f"spatial.named found no axis names in the {type(source).__qualname__}: none of its "
      "variables has sharding metadata and none is held by a module whose layout it knows "
      "(nnx.Conv, nnx.ConvTranspose, nnx.Linear, nnx.LinearGeneral, nnx.Einsum, "
      "nnx.MultiHeadAttention, nnx.Embed other than a table of attention biases, nnx.LoRA, the "
      "norms) with its one-layer shape, alone or after a stack in front (nnx.vmap/nnx.scan "
      "with out_axes=0). Name the axes (nnx.with_partitioning) or give rules through averaging=."
    )
  else:
    names = layout.names_by_path(source)
    missing = (
      "spatial.named got a tree without axis names: pass boxed Linen params (from init with "
      "nn.with_logical_partitioning/nn.with_partitioning), an NNX state of variables with "
      "sharding metadata (nnx.state(model, nnx.Param)), or a tree of PartitionSpec "
      "(nn.get_partition_spec(boxed_params))."
    )
    if _is_nnx_state(source):  # without metadata: the fix is the module, whose types name axes
      missing += (
        " This NNX state's variables have no sharding metadata, and a state holds no module "
        "types: pass the module itself, spatial.named(model), which names the axes of nnx.Conv, "
        "nnx.Linear, nnx.Embed and the other layers it knows from their types."
      )
  if all(n is None for n in names.values()):
    raise ValueError(missing)
  pairs = tuple(names.items())
  if isinstance(averaging, Averaging):
    return dataclasses.replace(averaging, names=pairs)
  return Averaging(averaging, names=pairs)


def _is_nnx_module(x: Any) -> bool:
  """Whether ``x`` is an ``nnx.Module`` (without importing Flax: one exists only once it is)."""
  module = loaded("flax.nnx", "Module")
  return module is not None and isinstance(x, module)


def strict(averaging: AveragingSpec = None) -> Averaging:
  """Makes the resolver refuse to guess: ambiguous leaves raise an error naming them all.

  A leaf is ambiguous when the default rule decides it by rank alone at rank >=
  3 (no axis names, or names of no known role): a 1-D ``Conv`` kernel, an
  attention kernel and a stack of ``Dense`` kernels look alike. With
  ``block_size > 1`` so are: a leaf whose name has a word of a table and other words
  a kernel could have (``w_embed``; not ``pos_embed``) without a ``vocab`` axis name; a
  leaf with a heads or vocab axis whose blocks would go along an axis of no known role
  while another axis could be the input; a rank-2 leaf whose axis 0 has a name of no
  known role. And so is an unnamed leaf whose stacked axes are taken from named leaves
  that share no module with it, or whose nearest named relatives disagree on them, and
  every other reading :func:`describe` marks AMBIGUOUS (a ``weight`` whose bias does not
  settle its layout, say). Name its axes or give it an explicit rule. Use it as
  ``adahessian_jax.adahessian(lr, averaging=spatial.strict(rules))``.

  Args:
    averaging: The rules, as for :func:`resolve_rules`, or an
      :class:`Averaging` (e.g. from :func:`named`).

  Returns:
    An :class:`Averaging`.
  """
  if isinstance(averaging, Averaging):
    return dataclasses.replace(averaging, strict=True)
  return Averaging(averaging, strict=True)


def as_averaging(averaging: AveragingSpec) -> Averaging:
  """``averaging`` as an :class:`Averaging` (rules without names or strict mode, if not one).

  Args:
    averaging: As for :func:`resolve_rules`.

  Returns:
    ``averaging`` itself if it is an :class:`Averaging`, else one that holds it as its rules.
  """
  return averaging if isinstance(averaging, Averaging) else Averaging(averaging)


def _rule_or_none(x: Any) -> bool:
  return x is None or isinstance(x, Rule)


def _prefix_mismatch(prefix: Any, params: Any, error: Exception) -> str:
  """Which entries of a prefix of rules and which leaves of ``params`` do not match, in words."""
  keys = lambda path: tuple(str(k) for k in path)
  entries = [
    keys(p) for p, _ in jax.tree_util.tree_flatten_with_path(prefix, is_leaf=_rule_or_none)[0]
  ]
  leaves = [keys(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  covers = lambda entry, leaf: leaf[: len(entry)] == entry
  uncovered = ["".join(leaf) for leaf in leaves if not any(covers(e, leaf) for e in entries)]
  unused = ["".join(e) for e in entries if not any(covers(e, leaf) for leaf in leaves)]
  said = []
  if uncovered:
    said.append(
      f"it has no entry for the params' leaves {', '.join(uncovered[:4])} (give each a rule, or "
      "None for the default)"
    )
  if unused:
    said.append(f"its entries {', '.join(unused[:4])} are not in the params")
  return "; ".join(said) if said else f"broadcasting failed: {error}"


def _expand_masked(prefix: Any, params: Any) -> Any:
  """``params`` with each :class:`optax.MaskedNode` that stands where ``prefix`` has a subtree
  replaced by that subtree, a ``MaskedNode`` at each of its entries.

  A mask or labels given as a prefix of the params (``optax.masked(tx, {"head": False, ...})``)
  hand the inner transform one ``MaskedNode`` for a whole subtree another transform owns; a tree
  of rules written for the whole model has entries inside it, and is a prefix of the result.
  """
  if _rule_or_none(prefix):
    return params
  if masking.is_masked(params):
    return jax.tree.map(lambda _: optax.MaskedNode(), prefix, is_leaf=_rule_or_none)
  one_level = lambda tree: jax.tree_util.tree_flatten(tree, is_leaf=lambda x: x is not tree)
  prefix_children, prefix_def = one_level(prefix)
  children, treedef = one_level(params)
  if prefix_def != treedef:  # not a prefix: the caller's error says where
    return params
  pairs = zip(prefix_children, children, strict=True)
  return treedef.unflatten([_expand_masked(p, c) for p, c in pairs])


def _not_a_rule(value: Any, where: str | None = None, leaf: str | None = None) -> TypeError:
  """The error for an entry of a tree of rules (at ``where``, a path, ``""`` for the root; or
  the entry that the params' ``leaf`` at that path takes) that is not a rule."""
  if isinstance(value, jax.Array):  # what optax.inject_hyperparams makes of a tree it traces
    hint = f" {STATIC_FIX}"
  elif isinstance(value, bool | np.bool_):
    hint = (
      " averaging takes rules, not a mask: spatial.none() where a leaf is not to be averaged, "
      "None for the default."
    )
  else:
    hint = ""
  if where == "":
    return TypeError(
      f"averaging is {value!r}, which is none of: None, a spatial rule, a pytree prefix of the "
      f"params with rules as leaves, a callable (path, leaf) -> rule | None.{hint}"
    )
  if leaf is not None:
    return TypeError(
      f"averaging gives {value!r} for the leaf at {leaf}, which is not a spatial rule.{hint}"
    )
  at = "" if where is None else f" at {where}"
  return TypeError(f"averaging tree contains {value!r}{at}, which is not a spatial rule.{hint}")


#: The functions that make rules: given uncalled as averaging, each was called on (path, leaf).
_CONSTRUCTORS = {
  "none": none,
  "blocks": blocks,
  "mean_over": mean_over,
  "per_layer": per_layer,
  "flax_default": flax_default,
  "named": named,
  "strict": strict,
}


def check_averaging(averaging: AveragingSpec) -> None:
  """Refuses, when the optimizer is built, an ``averaging`` that no tree of params could take.

  A rule constructor given uncalled (``averaging=spatial.blocks``), a callable that cannot be
  called as ``(path, leaf)``, and a tree with an entry that is neither a rule nor ``None`` (a
  str, a number, a mask's bools) failed only at ``init``, or with Python's own error.

  Args:
    averaging: As for :func:`resolve_rules`.

  Raises:
    TypeError: naming the bad value (and its entry's path in a tree) and the fix.
  """
  rules = as_averaging(averaging).rules
  if rules is None or is_rule(rules):
    return
  name = next((n for n, make in _CONSTRUCTORS.items() if rules is make), None)
  if name is not None:
    raise TypeError(
      f"averaging=spatial.{name} is the function that makes a rule, not a rule: call it, e.g. "
      f"averaging=spatial.{name}(...), or give a callable (path, leaf) -> rule | None."
    )
  if callable(rules):
    callable_with(
      rules,
      ((), None),
      {},
      "averaging(path, leaf)",
      "Give a function of a leaf's key path and the leaf, returning a spatial rule or None.",
    )
    return
  for path, value in jax.tree_util.tree_flatten_with_path(rules, is_leaf=_rule_or_none)[0]:
    if not _rule_or_none(value):
      raise _not_a_rule(value, jax.tree_util.keystr(path))


def spec_rules(averaging: Any, params: Any, infos, default: Rule) -> list[Rule]:
  """One (unbound) rule per leaf of ``params``, in ``jax.tree.leaves`` order."""
  if averaging is None:
    return [default] * len(infos)
  if is_rule(averaging):
    return [averaging] * len(infos)
  if callable(averaging):
    out = []
    for info in infos:
      try:
        rule = averaging(info.path, info.leaf)
      except Exception as e:
        e.add_note(
          f"adahessian_jax: raised by the averaging callable for the leaf at {path_str(info.path)}."
        )
        raise
      if rule is None:
        rule = default
      if not is_rule(rule):
        raise TypeError(
          f"averaging callable returned {rule!r} for {path_str(info.path)}; "
          "expected an adahessian_jax.spatial rule or None."
        )
      out.append(rule)
    return out
  if masking.has_masked_nodes(params):
    params = _expand_masked(averaging, params)
  try:
    rules = jax.tree.broadcast(averaging, params, is_leaf=_rule_or_none)
  except (ValueError, TypeError) as e:
    # JAX's own message can name the wrong entry (it ignores is_leaf): say what does not match.
    raise ValueError(
      "averaging must be None, a spatial rule, a callable (path, leaf) -> rule, or a "
      f"pytree prefix of params with rules as leaves; {_prefix_mismatch(averaging, params, e)}"
    ) from e
  # One entry per leaf of params: a None in the prefix over a None subtree of params (a leafless
  # node) comes out as None, which is_leaf=_rule_or_none would count as a leaf.
  out = [default if r is None else r for r in jax.tree.structure(params).flatten_up_to(rules)]
  for info, r in zip(infos, out, strict=True):
    if not is_rule(r):  # resolve_rules and describe called directly: the optimizer checked it
      raise _not_a_rule(r, leaf=path_str(info.path))
  return out
