"""Hessian-vector products whose results XLA reads without a transpose.

Forward-over-reverse differentiation of a dense layer ``y = x @ W`` gives the
kernel's tangent as ``transpose(a + b)``: reverse mode writes ``W``'s gradient
as the transpose of a ``dot_general``, and forward mode turns that ``dot_general``
into the sum of two. XLA folds ``transpose(dot_general)`` into the
``dot_general`` itself, but not ``transpose(a + b)``, so every consumer of the
product (``z ⊙ Hz``, the moments, a finiteness check) reads it with a stride
of one row per element. XLA:CPU runs such a fusion about 8x slower than a
contiguous one when it also has a scalar constant, as every moment update does
(measured: 2.5 ms against 0.3 ms for a 1024 x 1024 kernel); in the fused
AdaHessian step of a 784-1024-1024-10 MLP the transposed reads cost ~17 % of
the step (2.97-3.03x Adam's step time before, 2.46-2.49x after).

:func:`sink_transposes` traces a function to a jaxpr, rewrites
``transpose(add_any(a, b))`` as ``add_any(transpose(a), transpose(b))`` where
every term is a ``dot_general`` that XLA can produce transposed by swapping its
operands and the sum has at least :data:`MIN_BYTES` (smaller ones are read from
the cache; measured on MLPs, a 256 x 256 kernel gained nothing and the swapped
dots were up to 2 % slower, a 512 x 512 one gained 6-8 %), recursively, also
inside nested jaxprs (``jit``, ``scan``, ``cond``, ``remat``), and evaluates
the result. The values are the same sums of the same products.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.extend.core as jcore
from jax.extend.core import primitives

__all__ = ["explicitly_sharded", "sink_transposes"]

_ADD_ANY = primitives.add_jaxvals_p
_TRANSPOSE = primitives.transpose_p
_DOT_GENERAL = primitives.dot_general_p

# Smaller sums stay as they are: read from the cache, their transposes cost little, and the
# swapped dot_generals can be slower (XLA:CPU gives some of them a slower kernel).
MIN_BYTES = 1 << 20


def sink_transposes(fun: Callable[..., Any]) -> Callable[..., Any]:
  """``fun`` with ``transpose(a + b)`` computed as ``transpose(a) + transpose(b)``.

  Args:
    fun: A function of arrays (pytrees) returning arrays (pytrees).

  Returns:
    A function with the same signature and the same results (up to the order
    in which XLA sums a ``dot_general``'s products).
  """

  def wrapped(*args):
    if explicitly_sharded(args):
      return fun(*args)
    closed, out_shape = jax.make_jaxpr(fun, return_shape=True)(*args)
    out = jcore.jaxpr_as_fun(_rewrite_closed(closed)[0])(*jax.tree.leaves(args))
    return jax.tree.unflatten(jax.tree.structure(out_shape), out)

  return wrapped


def explicitly_sharded(args: Any) -> bool:
  """Whether a leaf of ``args`` is typed with a sharding over a mesh with ``Explicit`` axes.

  The jaxpr of such arguments, traced with :func:`jax.make_jaxpr`, does not evaluate: its
  ``add_any`` of a gradient term typed with the sharding and one typed without fails JAX's type
  check with a bare ``AssertionError`` (seen under ``jax.jit`` with FSDP-sharded parameters on a
  ``jax.make_mesh`` mesh, whose axes are ``Explicit`` by default). :func:`sink_transposes` then
  runs ``fun`` as it is.
  """
  for leaf in jax.tree.leaves(args):
    mesh = getattr(getattr(jax.typeof(leaf), "sharding", None), "mesh", None)
    types = getattr(mesh, "axis_types", ())
    if mesh is not None and not mesh.empty and jax.sharding.AxisType.Explicit in types:
      return True
  return False


def _rewrite_closed(closed: jcore.ClosedJaxpr) -> tuple[jcore.ClosedJaxpr, bool]:
  jaxpr, changed = _rewrite(closed.jaxpr)
  return (jcore.ClosedJaxpr(jaxpr, closed.consts) if changed else closed), changed


def _rewrite_param(value: Any) -> tuple[Any, bool]:
  if isinstance(value, jcore.ClosedJaxpr):
    return _rewrite_closed(value)
  if isinstance(value, jcore.Jaxpr):
    return _rewrite(value)
  if (
    isinstance(value, tuple)
    and value
    and all(isinstance(v, (jcore.ClosedJaxpr, jcore.Jaxpr)) for v in value)
  ):
    pairs = [_rewrite_param(v) for v in value]
    if any(c for _, c in pairs):
      return tuple(v for v, _ in pairs), True
  return value, False


def _rewrite(jaxpr: jcore.Jaxpr) -> tuple[jcore.Jaxpr, bool]:
  producers: dict[Any, jcore.JaxprEqn] = {}  # var -> the equation that computes it
  eqns: list[jcore.JaxprEqn] = []
  changed = False
  for eqn in jaxpr.eqns:
    params = dict(eqn.params)
    nested = False
    for name, value in eqn.params.items():
      params[name], c = _rewrite_param(value)
      nested |= c
    if nested:
      eqn = eqn.replace(params=params)
      changed = True
    if eqn.primitive is _TRANSPOSE and _sinkable(
      eqn.invars[0], eqn.params["permutation"], producers
    ):
      eqns.extend(_split(eqn, eqn.outvars[0], eqn.invars[0], producers))
      changed = True
      continue
    eqns.append(eqn)
    producers.update((v, eqn) for v in eqn.outvars)
  return (jaxpr.replace(eqns=eqns) if changed else jaxpr), changed


def _sinkable(source: Any, permutation: tuple[int, ...], producers: dict[Any, Any]) -> bool:
  """Whether ``source`` is a sum (``add_any``, nested) whose every term is a ``dot_general``
  that XLA can produce in the transposed order by swapping its operands."""
  eqn = producers.get(source) if isinstance(source, jcore.Var) else None
  if eqn is None or eqn.primitive is not _ADD_ANY:
    return False
  aval: Any = source.aval  # a ShapedArray: add_any's output
  if aval.size * aval.dtype.itemsize < MIN_BYTES:
    return False
  return all(_term_folds(v, permutation, producers) for v in eqn.invars)


def _term_folds(term: Any, permutation: tuple[int, ...], producers: dict[Any, Any]) -> bool:
  eqn = producers.get(term) if isinstance(term, jcore.Var) else None
  if eqn is None:
    return False
  if eqn.primitive is _ADD_ANY:
    return all(_term_folds(v, permutation, producers) for v in eqn.invars)
  if eqn.primitive is not _DOT_GENERAL:
    return False
  # dot_general's output is (batch, lhs free, rhs free); swapping the operands gives
  # (batch, rhs free, lhs free).
  (lhs_contract, rhs_contract), (lhs_batch, _) = eqn.params["dimension_numbers"]
  lhs, rhs = (v.aval.ndim for v in eqn.invars)
  n_batch = len(lhs_batch)
  n_lhs = lhs - n_batch - len(lhs_contract)
  n_rhs = rhs - n_batch - len(rhs_contract)
  batch = list(range(n_batch))
  swapped = (
    batch + [n_batch + n_lhs + i for i in range(n_rhs)] + [n_batch + i for i in range(n_lhs)]
  )
  return list(permutation) == swapped


def _split(
  transpose: jcore.JaxprEqn, out: Any, source: Any, producers: dict[Any, jcore.JaxprEqn]
) -> list[jcore.JaxprEqn]:
  """Equations computing ``out = transpose(source)`` as a sum of transposed terms."""
  add = producers[source]
  if add.primitive is not _ADD_ANY:
    return [transpose.replace(invars=[source], outvars=[out])]
  terms: list[Any] = [jcore.Var(out.aval) for _ in add.invars]
  eqns = [
    e for v, t in zip(add.invars, terms, strict=True) for e in _split(transpose, t, v, producers)
  ]
  eqns.append(add.replace(invars=terms, outvars=[out]))
  return eqns
