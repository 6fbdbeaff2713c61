"""Whether a loss couples the devices: read from its jaxpr, for ``independent_probes=True``.

With a probe per device, Hutchinson's estimate averaged over the devices is the global batch's
only if each device's loss reads the other devices' parameters at most linearly; a collective
whose result the loss takes nonlinearly (a BatchNorm synchronised over the batch axis) couples
the devices, and the estimate misses the Hessian blocks between them.

:func:`loss_couples_devices` decides it at trace time: it traces the loss to a jaxpr and walks
it forward from the parameters, through only the equations the derivative of the loss (its
first output) reads (:func:`_live`: not the aux, a comparison's predicate or a
``stop_gradient``). The result of a collective over ``axis_name`` that reads the parameters is
marked as crossed, and the first operation that takes a crossed value other than linearly (not
in ``_LINEAR``, a product of two values that depend on the parameters, a division by such a
value) is the answer. Nested jaxprs (``jit``, ``cond``, ``custom_jvp``, ``remat``) are walked
inside, ``scan`` and ``while`` bodies until the flags of their carry stop growing.
:func:`warn_if_loss_couples_devices` turns the answer into the warning of the transform and of
``distributed``.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.extend.core
import jax.numpy as jnp

from adahessian_jax._axes import check_names

# Collectives that move values between devices (pvary/pcast and axis_index move nothing).
_COMMUNICATING = frozenset(
  {
    "psum",
    "psum2",
    "psum_invariant",
    "pmax",
    "pmin",
    "all_gather",
    "all_gather_invariant",
    "ppermute",
    "all_to_all",
    "ragged_all_to_all",
    "reduce_scatter",
    "psum_scatter",
  }
)
# Linear in every operand that depends on the parameters, if only one does (for the products);
# a value that other devices' parameters reach only through these enters the loss linearly.
_LINEAR = frozenset(
  {
    "add",
    "add_any",
    "sub",
    "neg",
    "reduce_sum",
    "convert_element_type",
    "reshape",
    "broadcast_in_dim",
    "squeeze",
    "expand_dims",
    "transpose",
    "slice",
    "dynamic_slice",
    "concatenate",
    "pad",
    "rev",
    "copy",
    "copy_p",
    "gather",
    "select_n",
    "cumsum",
    "pvary",
    "pcast",
    "split",
    "scatter",
    "dynamic_update_slice",
    "real",
    "imag",
    "conj",
    "complex",
    # Identities: placement, precision, scheduling.
    "device_put",
    "sharding_constraint",
    "optimization_barrier",
    "reduce_precision",
    # Products (_PRODUCTS): linear in each operand alone.
    "mul",
    "div",
    "dot_general",
    # Piecewise linear (or constant) in their operands, as pmax is: no second derivative.
    "max",
    "min",
    "reduce_max",
    "reduce_min",
    "cummax",
    "cummin",
    "sort",
    "abs",
    "clamp",
    "sign",
    "floor",
    "ceil",
    "round",
  }
)
# Linear in each operand alone; a product of two that depend on the parameters is not. (select_n
# is not one: it picks between its operands, by a predicate that carries no derivative.)
_PRODUCTS = frozenset({"mul", "div", "dot_general"})


def _sub_jaxprs(eqn: Any) -> list[Any]:
  """The jaxprs among an equation's parameters (a ``cond``'s branches, a ``scan``'s body, a
  ``pjit``'s or ``custom_jvp_call``'s function)."""
  subs = []
  for value in eqn.params.values():
    for v in value if isinstance(value, tuple | list) else (value,):
      if isinstance(v, jax.extend.core.ClosedJaxpr):
        subs.append(v.jaxpr)
      elif isinstance(v, jax.extend.core.Jaxpr):
        subs.append(v)
  return subs


def _named_axes(eqn: Any) -> frozenset:
  """The mapped axes a collective equation (``psum``, ``all_gather``, ...) names."""
  named = eqn.params.get("axes", eqn.params.get("axis_name", ()))
  return frozenset(named if isinstance(named, tuple | list) else (named,))


def _is_var(v: Any) -> bool:
  """Whether an equation's operand is a variable, not a literal constant."""
  return not isinstance(v, jax.extend.core.Literal)


def _carries_derivative(v: Any) -> bool:
  """Whether ``v`` can carry a derivative: a float or complex value (not a comparison's boolean,
  an index or a count)."""
  aval = getattr(v, "aval", None)
  return aval is None or not hasattr(aval, "dtype") or jnp.issubdtype(aval.dtype, jnp.inexact)


def _live(jaxpr: Any, outputs: tuple[int, ...] | None, memo: dict) -> Any:
  """What of ``jaxpr`` the derivative of its ``outputs`` (indices; ``None``: all) reads.

  A value reached only through one without a derivative (a comparison's predicate, a
  ``stop_gradient``) is not followed: how it is computed changes no derivative of the outputs.
  Nor is an output of a nested ``jit``, ``scan``, ``cond``, ``custom_jvp`` or ``remat`` that
  only the aux reads (a per-step metric): its body is read for the outputs used alone.

  Returns:
    ``(live, inputs)``: for each equation read, by index, the indices of its outputs read; and
    for each input of ``jaxpr`` whether it is read.
  """
  key = (id(jaxpr), outputs)
  if key not in memo:
    outvars = jaxpr.outvars if outputs is None else [jaxpr.outvars[i] for i in outputs]
    needed = {v for v in outvars if _is_var(v)}
    live = {}
    for i in reversed(range(len(jaxpr.eqns))):
      eqn = jaxpr.eqns[i]
      if eqn.primitive.name == "stop_gradient":  # a value held constant
        continue
      outs = tuple(  # not a comparison's predicate, an argmax: values without a derivative
        j for j, v in enumerate(eqn.outvars) if v in needed and _carries_derivative(v)
      )
      if outs:
        live[i] = outs
        reads = _operands_read(eqn, outs, memo)
        needed.update(v for v, r in zip(eqn.invars, reads, strict=True) if r and _is_var(v))
    memo[key] = live, [_is_var(v) and v in needed for v in jaxpr.invars]
  return memo[key]


def _loop_parts(eqn: Any) -> tuple[Any, int, int, int]:
  """``(body, skip, start, n_carry)`` of a ``scan`` or ``while`` equation: the body's jaxpr, the
  operands before the body's (a ``while``'s condition constants), the body inputs before the
  carry and the number of carried values (the first outputs of the body and of the equation)."""
  if eqn.primitive.name == "scan":
    if "ft_in" in eqn.params:  # jax >= 0.11: the operands' groups (consts, carry, xs) as a tree
      consts, carry, _ = eqn.params["ft_in"].unpack()
      return eqn.params["jaxpr"].jaxpr, 0, len(consts), len(carry)
    return eqn.params["jaxpr"].jaxpr, 0, eqn.params["num_consts"], eqn.params["num_carry"]
  # while: operands are the condition's constants, the body's, then the carry
  skip, start = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
  return eqn.params["body_jaxpr"].jaxpr, skip, start, len(eqn.invars) - skip - start


def _loop_outputs(eqn: Any, outs: tuple[int, ...], memo: dict) -> tuple[int, ...]:
  """The outputs of a loop's body that the derivative of the loop's outputs ``outs`` reads:
  those, and the carried values that the body reads for them in a later iteration (a fixed
  point; a loss carry that adds a metric carry reads it, one beside it does not)."""
  body, _, start, n_carry = _loop_parts(eqn)
  needed = set(outs)
  while True:
    read = _live(body, tuple(sorted(needed)), memo)[1]
    grown = needed | {j for j in range(n_carry) if read[start + j]}
    if grown == needed:
      return tuple(sorted(needed))
    needed = grown


def _sub_inputs(eqn: Any, sub: Any) -> list[int] | None:
  """For each input of ``eqn``'s sub-jaxpr ``sub``, the index of the operand it is: one to one (a
  ``jit``, a ``custom_jvp``, a ``remat``), a ``cond`` branch's without the branch index; ``None``
  where they do not line up (any operand may be any input)."""
  n, n_in = len(sub.invars), len(eqn.invars)
  if n == n_in:
    return list(range(n))
  if eqn.primitive.name == "cond" and n == n_in - 1:
    return list(range(1, n_in))
  return None


def _operands_read(eqn: Any, outs: tuple[int, ...], memo: dict) -> list[bool]:
  """For each operand of ``eqn``, whether the derivative of its outputs ``outs`` reads it."""
  n_in = len(eqn.invars)
  if eqn.primitive.name in ("scan", "while"):
    body, skip, start, n_carry = _loop_parts(eqn)
    read = list(_live(body, _loop_outputs(eqn, outs, memo), memo)[1])
    for j in outs:
      if j < n_carry:  # after no iteration, the carry out is the carry in
        read[start + j] = True
    return [False] * skip + read
  subs = _sub_jaxprs(eqn)
  if not subs:
    return [True] * n_in
  read = [False] * n_in
  for sub in subs:
    operands = _sub_inputs(eqn, sub)
    if operands is None or len(sub.outvars) != len(eqn.outvars):
      return [True] * n_in
    for k, r in zip(operands, _live(sub, outs, memo)[1], strict=True):
      read[k] = read[k] or r
  return read


def _sub_flags(eqn: Any, sub: Any, flags: list[bool]) -> list[bool]:
  """``flags`` of ``eqn``'s operands, as the inputs of its sub-jaxpr ``sub``
  (:func:`_sub_inputs`; where they do not line up, any of them for each)."""
  operands = _sub_inputs(eqn, sub)
  if operands is None:
    return [any(flags)] * len(sub.invars)
  return [flags[k] for k in operands]


def _loop(
  eqn: Any, dep: list[bool], crossed: list[bool], axes: frozenset, outs: tuple[int, ...], memo: dict
) -> Any:
  """:func:`_couples` for a ``scan`` or ``while`` equation whose outputs ``outs`` are read: its
  body walked until the flags of the loop carry stop growing.

  A value a collective makes in one iteration reaches the next through the carry (``c =
  pmean(p)``, then ``c * c``), so one walk of the body with the flags of the initial carry misses
  it. The flags only grow, so this ends after at most twice as many walks as carried values. A
  ``while``'s condition is not walked: its predicate carries no derivative.

  Returns:
    ``(name, out_dep, out_crossed)`` as :func:`_couples`, for the equation's outputs.
  """
  body, skip, start, n_carry = _loop_parts(eqn)
  carry = slice(start, start + n_carry)
  dep, crossed = list(dep[skip:]), list(crossed[skip:])
  body_outs = _loop_outputs(eqn, outs, memo)
  while True:
    found, out_dep, out_crossed = _couples(body, dep, crossed, axes, body_outs, memo)
    if found:
      return found, [], []
    grown_dep = [a or b for a, b in zip(dep[carry], out_dep[:n_carry], strict=True)]
    grown_crossed = [a or b for a, b in zip(crossed[carry], out_crossed[:n_carry], strict=True)]
    if grown_dep == dep[carry] and grown_crossed == crossed[carry]:
      # The carry out is the carry in after no iteration, the body's after some.
      return None, grown_dep + out_dep[n_carry:], grown_crossed + out_crossed[n_carry:]
    dep[carry], crossed[carry] = grown_dep, grown_crossed


def _couples(
  jaxpr: Any,
  dep: list[bool],
  crossed: list[bool],
  axes: frozenset,
  outputs: tuple[int, ...] | None,
  memo: dict,
) -> Any:
  """Walks ``jaxpr`` from its inputs that depend on this device's parameters (``dep``) and those
  that other devices' parameters reach (``crossed``), through the equations whose derivative
  reaches its ``outputs`` (indices; ``None``: all of them; :func:`_live`, cached in ``memo``).

  Returns:
    ``(name, out_dep, out_crossed)``: the name of the first operation that takes the result of a
    collective over ``axes`` other than linearly (``None`` if there is none), and the two flags
    of the outputs (of those read; the others' are not computed).
  """
  live = _live(jaxpr, outputs, memo)[0]
  deps = {v for v, d in zip(jaxpr.invars, dep, strict=True) if d}
  cross = {v for v, c in zip(jaxpr.invars, crossed, strict=True) if c}
  for i, eqn in enumerate(jaxpr.eqns):
    outs = live.get(i)
    if outs is None:  # computes only the aux (a metric) or a predicate, not the loss
      continue
    d_in = [_is_var(v) and v in deps for v in eqn.invars]
    c_in = [_is_var(v) and v in cross for v in eqn.invars]
    if not any(d_in) and not any(c_in):
      continue
    name = eqn.primitive.name
    n_out = len(eqn.outvars)
    out_dep, out_crossed = [True] * n_out, [any(c_in)] * n_out
    subs = _sub_jaxprs(eqn)
    if name in _COMMUNICATING:  # linear (pmax: piecewise) in its operands, over any axis
      if _named_axes(eqn) & axes:  # its result reads other devices' parameters
        out_crossed = [any(c_in) or any(d_in)] * n_out
    elif name in ("scan", "while"):
      found, out_dep, out_crossed = _loop(eqn, d_in, c_in, axes, outs, memo)
      if found:
        return found, [], []
    elif subs:  # walk the body: a collective inside, or a crossed input taken nonlinearly there
      out_crossed = [False] * n_out
      for sub in subs:
        sub_dep, sub_cross = _sub_flags(eqn, sub, d_in), _sub_flags(eqn, sub, c_in)
        sub_outs = outs if len(sub.outvars) == n_out else None
        found, _, sub_crossed = _couples(sub, sub_dep, sub_cross, axes, sub_outs, memo)
        if found:
          return found, [], []
        if len(sub_crossed) != n_out:
          sub_crossed = [any(sub_crossed)] * n_out
        out_crossed = [a or b for a, b in zip(out_crossed, sub_crossed, strict=True)]
    elif any(c_in) and (
      name not in _LINEAR
      or (name in _PRODUCTS and sum(d_in) > 1)
      or (name == "div" and d_in[1])  # 1 / x is not linear in x
    ):
      return name, [], []
    deps.update(v for v, d in zip(eqn.outvars, out_dep, strict=True) if d)
    cross.update(v for v, c in zip(eqn.outvars, out_crossed, strict=True) if c)
  return (
    None,
    [_is_var(v) and v in deps for v in jaxpr.outvars],
    [_is_var(v) and v in cross for v in jaxpr.outvars],
  )


def loss_couples_devices(fn: Any, params: Any, axis_name: Any) -> Any:
  """Whether ``fn(params)`` (this device's loss, traced inside the map) lets
  other devices' parameters reach it other than linearly, through a collective over
  ``axis_name`` (a BatchNorm synchronised over the batch axis).

  Then the loss of each device depends on every device's parameters, and Hutchinson's estimate
  with a probe per device misses the Hessian blocks between devices. A collective whose result
  enters the loss linearly (a ``pmean`` of the loss), that sees no parameter (a token count),
  that only a comparison or ``stop_gradient`` takes, or that only the aux after the loss (the
  first output: ``(loss, aux)``) reads (a metric, also one a nested ``jit`` or ``scan`` body
  returns beside the loss) couples nothing.

  Returns:
    The name of the operation that takes the collective's result nonlinearly, or ``None``.
  """
  closed = jax.make_jaxpr(fn)(params)
  jaxpr, n = closed.jaxpr, len(closed.jaxpr.invars)
  axes = frozenset(check_names(axis_name))
  return _couples(jaxpr, [True] * n, [False] * n, axes, (0,), {})[0]


def warn_if_loss_couples_devices(fn: Any, params: Any, axis_name: Any, caller: str) -> None:
  """Warns if independent probes would bias the estimate of ``fn`` (:func:`loss_couples_devices`).

  Measured (a Dense-BatchNorm-tanh-Dense model, BatchNorm synchronised over 4 devices, 4096
  probes): entries off by up to 12 standard deviations of the estimator, and the bias before
  the BatchNorm, whose Hessian is exactly 0, estimated at -0.07.
  """
  found = loss_couples_devices(fn, params, axis_name)
  if found:
    warnings.warn(
      f"{caller}: independent_probes=True, but the loss reads other devices' parameters through "
      f"a collective over axis_name={axis_name!r} whose result it takes nonlinearly ({found!r}; "
      "e.g. BatchNorm(axis_name=...), which synchronises the batch statistics): each device's "
      "loss then depends on every device's probe, and the averaged estimate misses the Hessian "
      "between devices (biased). Use the same probes on every device "
      "(independent_probes=False, the default), which give the single-device estimate on the "
      "global batch exactly.",
      UserWarning,
      stacklevel=4,
    )
