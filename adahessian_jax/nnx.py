"""Flax NNX training with AdaHessian.

``flax.nnx.Optimizer.update(model, grads, **kwargs)`` forwards keyword arguments
to ``tx.update``, but a ``value_fn`` then receives the parameters as an
``nnx.State``, not the module. These helpers bridge that:

* :func:`value_fn` builds the closure for the ``value_fn`` route::

    optimizer.update(model, grads, value_fn=adahessian_jax.nnx.value_fn(model, loss_fn, x, y))

* :func:`value_grad_and_hessian_diag` is the fused one-pass route::

    loss, grads, hdiag = adahessian_jax.nnx.value_grad_and_hessian_diag(
        loss_fn, model, optimizer, x, y)
    optimizer.update(model, grads, hessian_diag=hdiag)

Both evaluate ``loss_fn(module, ...)`` on a copy of ``model`` (and of NNX
objects among the arguments, such as an ``nnx.Rngs`` for dropout at call time)
rebuilt from the given parameters; the other state (BatchNorm statistics, RNG
counters) is read, and only the fused route writes it back, once, from its
primal pass.
Build the closure before computing the gradient so both see the same dropout
RNG state (the same mask).

A loss that writes its own parameters (``nnx.WeightNorm`` and
``nnx.SpectralNorm`` store the normalised kernel in its ``nnx.Param``) keeps
the write, as ``nnx.value_and_grad`` does; the fused route then takes the
Hessian where the gradient was taken, the closure route at the written
parameters (those the optimizer holds), so there the routes differ.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adahessian_jax import _evidence_biases, _validation, distributed, fused, layout
from adahessian_jax import state as state_lib
from adahessian_jax._extras import missing_extra

try:
  import flax.linen
  from flax import nnx

  if not hasattr(nnx, "as_pure"):  # else an AttributeError from Flax at the first call
    raise ImportError(
      f"flax {getattr(flax, '__version__', '?')} has no nnx.as_pure: the extra needs flax "
      ">= 0.12.7",
      name="flax",
    )
except ImportError as e:
  raise missing_extra("flax", "adahessian_jax.nnx", e) from e

__all__ = ["value_fn", "value_grad_and_hessian_diag"]


def _split(model, wrt, args, kwargs):
  """Splits ``(model, args, kwargs)`` as one graph (NNX objects among the arguments, such as an
  ``nnx.Rngs`` for dropout at call time, may share Variables with the model) into its graphdef,
  the state of the model's variables that ``wrt`` selects (nested as in ``nnx.state(model,
  wrt)``) and the rest as plain values."""
  try:
    selects = nnx.filterlib.to_predicate(wrt)
  except (TypeError, ValueError):  # Flax's own message fails: "Invalid format specifier '!r'"
    raise TypeError(
      f"wrt must be an NNX filter (a Variable type such as nnx.Param, a str, a callable (path, "
      f"value) -> bool, True, False, None, ... or a tuple of filters), got {wrt!r}: pass the "
      "nnx.Optimizer's, wrt=optimizer.wrt."
    ) from None
  graphdef, params, rest = nnx.split((model, args, kwargs), _trained(selects), ...)
  return graphdef, params.get(0, nnx.State({})), nnx.as_pure(rest)


def _trained(selects: Callable[[Any, Any], bool]) -> Callable[[Any, Any], bool]:
  """The filter of ``(model, args, kwargs)`` for the model's variables that ``selects``."""
  return lambda path, x: len(path) > 0 and path[0] == 0 and selects(path[1:], x)


def _merge(graphdef, params, rest):
  """``(model, args, kwargs)`` rebuilt from :func:`_split`'s parts, with ``params`` (in the shape
  of ``nnx.state(model, wrt)``) for the trained variables."""
  return nnx.merge(graphdef, nnx.State({0: params}), rest)


def _filter_name(wrt: Any) -> str:
  """An NNX filter as an error names it: ``Param`` for a type, else its ``repr``."""
  return wrt.__name__ if isinstance(wrt, type) else repr(wrt)


def _listing(paths: list[str]) -> str:
  return ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")


def _holds_a_module(tree: Any) -> bool:
  """Whether ``tree`` is an NNX object (a module, not a Variable) or a pytree holding one: an
  ``nnx.State`` (or a pure dict, or ``nnx.split``'s ``(graphdef, state)``) holds only Variables
  or arrays."""
  node = nnx.graphlib.is_graph_node
  leaves = jax.tree.leaves(tree, is_leaf=node)
  return any(node(x) and not isinstance(x, nnx.Variable) for x in leaves)


def _holds_state(tree: Any) -> bool:
  """Whether ``tree`` holds a Variable or an array: a module's state, as ``nnx.state``,
  ``nnx.split`` or ``nnx.to_pure_dict`` give it."""
  is_variable = lambda x: isinstance(x, nnx.Variable)
  kinds = (nnx.Variable, jax.Array, np.ndarray)
  return any(isinstance(x, kinds) for x in jax.tree.leaves(tree, is_leaf=is_variable))


def _check_arguments(
  model: Any, loss_fn: Any, call: str, args: tuple, kwargs: dict, after: str
) -> None:
  """Raises ``TypeError`` if ``loss_fn`` is not callable or ``model`` is a function rather than a
  module (or pytree of modules): the two helpers take them in opposite orders, so swapping them is
  the likely slip; where neither is an NNX module (a Linen module as the model), says that; for
  a model that is a module's state (``nnx.state``, ``nnx.split``, a pure dict), which
  ``loss_fn`` would be called with in place of the module; and if ``loss_fn``'s signature cannot
  take ``loss_fn(model, *args, **kwargs)`` (the arguments given after ``after``)."""
  if callable(loss_fn) and not (callable(model) and not nnx.graphlib.is_graph_node(model)):
    if not _holds_a_module(model):
      if not _holds_state(model):  # a number, a string, None: no state either
        raise TypeError(
          f"{call} takes the nnx.Module (or a pytree of them) as model, got "
          f"{_validation.short_repr(model)} (type "
          f"{type(model).__qualname__}), which is no module and holds none. Pass the module the "
          "loss takes as its first argument."
        )
      raise TypeError(
        f"{call} takes the nnx.Module (or a pytree of them) as model, got a "
        f"{type(model).__qualname__} that holds no module, only its state (variables or "
        "arrays, as nnx.state, nnx.split or nnx.to_pure_dict give them): loss_fn would be "
        "called with that in place of the module. Pass the module itself (nnx.merge(graphdef, "
        "state) rebuilds it from nnx.split's parts)."
      )
    # Python's own error came from inside the trace and named neither the helper nor the fix.
    _validation.callable_with(
      loss_fn,
      (model, *args),
      kwargs,
      f"loss_fn(model, *args, **kwargs) with the {len(args)} positional and {len(kwargs)} "
      f"keyword arguments given to {call} after {after}",
      "Pass the loss's other arguments there, or close over them.",
    )
    return
  if callable(loss_fn) and not nnx.graphlib.is_graph_node(loss_fn):  # not swapped: no NNX module
    linen = isinstance(model, flax.linen.Module)
    fix = (
      "A Flax Linen module takes adahessian_jax.linen.TrainState (or "
      "adahessian_jax.value_grad_and_hessian_diag of a loss of its params)."
      if linen
      else "Pass the nnx.Module (or a pytree of them) the loss takes as its first argument."
    )
    raise TypeError(
      f"{call} takes an nnx.Module (or a pytree of them) as model, got a "
      f"{type(model).__module__}.{type(model).__qualname__}, which is no NNX module. {fix}"
    )
  raise TypeError(
    f"{call} takes the module as model and the loss as loss_fn, got a "
    f"{type(model).__name__} as the model and a {type(loss_fn).__name__} as loss_fn. The orders "
    "differ: value_fn(model, loss_fn, *args) but value_grad_and_hessian_diag(loss_fn, model, "
    "optimizer, *args)."
  )


def _check_selects(params: Any, wrt: Any, whose: str) -> None:
  """Raises ``ValueError`` if ``params`` (the model's variables that ``wrt`` selects) is empty."""
  if not jax.tree.leaves(params):
    raise ValueError(
      f"the model holds no variables that {whose}wrt={_filter_name(wrt)} selects, so there is "
      "nothing to differentiate: pass the model the nnx.Optimizer was built for, with the "
      "optimizer's filter (a filter that selects none of the model's nnx.Param, such as a "
      "misspelt nnx.PathContains, would train nothing)."
    )


def _check_against_optimizer(params: Any, opt_state: Any) -> None:
  """Raises ``ValueError`` if the pure ``opt_state`` holds no AdaHessian state, or if the model's
  trained variables ``params`` are not those the optimizer's AdaHessian state was made for: a leaf
  of another shape at the same path, or a leaf of the state at a path where the model has none
  (another model).

  Shapes and paths only (trace time): the pass itself ran on another model's parameters, and
  ``optimizer.update`` then failed, with a hint about averaging per-example gradients where the
  gradients were those of the other model. Leaves the state holds no moment for (``optax.masked``)
  and a state made for the parameters flattened into one vector (``optax.flatten``) are passed.
  """
  call = "adahessian_jax.nnx.value_grad_and_hessian_diag"
  state_lib.check_fused_route_tx(
    opt_state,
    call,
    "the nnx.Optimizer's tx",
    "Build it with nnx.Optimizer(model, adahessian_jax.adahessian(...), wrt=...), or for another "
    "optimizer take the gradients with nnx.grad and call optimizer.update(model, grads).",
  )
  found = state_lib.adahessian_states(opt_state)
  if len(found) != 1:  # none (a plain-dict state, which the fused pass names) or several
    return
  held = {jax.tree_util.keystr(x.path): jnp.shape(x.leaf) for x in layout.leaves(found[0].mu)}
  model = {jax.tree_util.keystr(x.path): jnp.shape(x.leaf) for x in layout.leaves(params)}
  fix = (
    "Pass the model the nnx.Optimizer was built for (nnx.Optimizer(model, tx, wrt=...)), or "
    "build the optimizer on this model."
  )
  for path, shape in model.items():
    if path in held and held[path] != shape:
      raise ValueError(
        f"{call}: the model's parameter at {path} has shape {shape}, but the optimizer's state "
        f"was made for a parameter of shape {held[path]} there. {fix}"
      )
  missing = [path for path in held if path and path not in model]  # "": optax.flatten's vector
  if missing:
    raise ValueError(
      f"{call}: the optimizer's state holds a parameter at {missing[0]}, where the model has "
      f"none that the optimizer's wrt selects. {fix}"
    )


def _same_variables(expected: Any, given: Any, wrt: Any) -> Any:
  """``given`` (the state ``value_fn`` is called with) as a state nested like ``expected`` (the
  variables ``wrt`` selected when it was built): as it is, or rebuilt from a pure dict of the same
  variables (``nnx.to_pure_dict``; the leaves of the same paths, in the same order). Raises
  ``ValueError`` if it holds other variables, naming them."""
  pure_expected, pure_given = nnx.as_pure(expected), nnx.as_pure(given)
  paths = _validation.leaf_paths(pure_expected)
  same_tree = jax.tree.structure(pure_expected) == jax.tree.structure(pure_given)
  if same_tree or _validation.leaf_paths(pure_given) == paths:
    # The same paths, other shapes (another model's state): JAX's shape error named no variable.
    for path, want, got in zip(
      paths, jax.tree.leaves(pure_expected), jax.tree.leaves(pure_given), strict=True
    ):
      if jnp.shape(want) != jnp.shape(got):
        raise ValueError(
          f"adahessian_jax.nnx.value_fn was built for a model whose variable at {path} has shape "
          f"{jnp.shape(want)}, but was called with a state where it has shape {jnp.shape(got)}. "
          "Build it on the model the nnx.Optimizer updates: value_fn(model, loss_fn, ...)."
        )
    if same_tree:
      return given
    return jax.tree.unflatten(jax.tree.structure(pure_expected), jax.tree.leaves(pure_given))
  expected, given = pure_expected, pure_given
  extra, missing = _validation.unshared_leaf_paths(given, expected)
  diff = "; ".join(
    f"{what}: {_listing(paths)}"
    for what, paths in (("only in value_fn's", missing), ("only in the given", extra))
    if paths
  )
  diff = diff or "the same paths, another structure"
  raise ValueError(
    f"adahessian_jax.nnx.value_fn was built for the variables that wrt={_filter_name(wrt)} selects "
    f"({len(jax.tree.leaves(expected))} leaves), but was called with a state of "
    f"{len(jax.tree.leaves(given))} leaves ({diff}). Build "
    "it with the nnx.Optimizer's filter: value_fn(model, loss_fn, ..., wrt=optimizer.wrt)."
  )


def value_fn(
  model: nnx.Module,
  loss_fn: Callable[..., Any],
  *args: Any,
  wrt: Any = nnx.Param,
  **kwargs: Any,
) -> Callable[[Any], Any]:
  """The loss as a function of the parameter state, for ``Optimizer.update(value_fn=...)``.

  Args:
    model: The module.
    loss_fn: ``loss_fn(module, *args, **kwargs)`` returning a scalar.
    *args: Positional arguments after the module; NNX objects among them (an
      ``nnx.Rngs``) are read, not advanced, as the module's own state is.
    wrt: The optimizer's ``wrt`` filter (default ``nnx.Param``).
    **kwargs: Keyword arguments of ``loss_fn``.

  Returns:
    A function of the (pure) parameter state, as ``nnx.Optimizer`` passes it
    (or of the same state as a pure dict, ``nnx.to_pure_dict(state)``).
    Called with the state of other variables than ``wrt`` selects in ``model``
    (the optimizer's ``wrt`` is another filter), or of other shapes (another
    model's), it raises a ``ValueError`` naming them; for a ``loss_fn`` returning
    a tuple, a ``TypeError``.

  Raises:
    TypeError: if ``model`` is a function or ``loss_fn`` not callable (e.g.
      the two swapped), ``model`` is no NNX module (a Linen module, or a
      module's state: ``nnx.state``, ``nnx.split``, a pure dict), ``loss_fn``'s signature
      cannot take ``(model, *args, **kwargs)``, or ``wrt`` is no NNX filter (a number).
    ValueError: if ``model`` holds none of the variables ``wrt`` selects.
  """
  _check_arguments(
    model, loss_fn, "adahessian_jax.nnx.value_fn(model, loss_fn, *args)", args, kwargs, "loss_fn"
  )
  graphdef, expected, rest = _split(model, wrt, args, kwargs)
  _check_selects(expected, wrt, "")

  def value(params):
    params = _same_variables(expected, params, wrt)
    module, a, k = _merge(graphdef, params, rest)
    out = loss_fn(module, *a, **k)
    fix = "give value_fn the loss alone: lambda module, *a, **k: loss_fn(module, *a, **k)[0]."
    return _validation.loss_and_aux(out, False, fix)[0]

  return value


def value_grad_and_hessian_diag(
  loss_fn: Callable[..., Any],
  model: nnx.Module,
  optimizer: nnx.Optimizer[Any],
  *args: Any,
  has_aux: bool = False,
  axis_name: Any = None,
  independent_probes: bool = False,
  refresh: bool | None = None,
  **kwargs: Any,
) -> tuple[Any, Any, Any]:
  """Loss, gradient and AdaHessian's Hessian-diagonal estimate of an NNX module.

  One forward-over-reverse pass (see
  :func:`adahessian_jax.value_grad_and_hessian_diag`), with the probes of the
  optimizer's AdaHessian state. The module's state mutated by the loss
  (BatchNorm statistics, RNG counters, Variables the call creates, such as
  ``Module.sow``'s intermediates, and parameters it writes, such as
  ``nnx.WeightNorm``'s kernel) is written back to ``model`` once, as
  ``nnx.value_and_grad`` does.

  Data parallel under ``pmap`` or ``shard_map`` (each device a part of the
  batch, the model and optimizer replicated: ``nnx.shard_map``, or a
  ``jax.pmap`` of a step that ``nnx.merge``-s them, copied by
  ``distributed.replicate(nnx.as_pure(state), axis_name)`` if the step returns
  ``nnx.as_pure`` state, so that it compiles once): pass the mapped
  ``axis_name``, and build the optimizer's ``tx`` with the same ``axis_name``
  (and ``independent_probes``), which averages the estimate over it. This
  function differentiates the local loss at device-varying parameters
  (:func:`adahessian_jax.distributed.device_varying`), draws the probes from
  :func:`adahessian_jax.distributed.per_device_probe_state` with
  ``independent_probes`` (the optimizer's state is not changed), and
  ``pmean``-s over ``axis_name`` the returned gradients and loss and the
  parameters the loss writes (``nnx.WeightNorm``'s kernel). The other state it
  writes (BatchNorm statistics) and ``aux`` stay each device's own: ``pmean``
  them yourself if the replicas should share them (``shard_map`` refuses them
  otherwise at a replicated ``out_specs``), e.g.
  ``nnx.update(model, jax.lax.pmean(nnx.state(model, nnx.BatchStat), "data"))``.
  The estimate is averaged by ``tx`` alone; pass ``expected_axis_name`` to
  ``optimizer.update`` as below, which makes a ``tx`` with another ``axis_name``
  (or none, whose replicas would drift apart) raise::

    optimizer = nnx.Optimizer(model, adahessian_jax.adahessian(0.1, axis_name="data"),
                              wrt=nnx.Param)

    @nnx.jit
    @nnx.shard_map(mesh=mesh, in_specs=(P(), P(), P("data"), P("data")), out_specs=P())
    def train_step(model, optimizer, x, y):
      loss, grads, hdiag = adahessian_jax.nnx.value_grad_and_hessian_diag(
          loss_fn, model, optimizer, x, y, axis_name="data")
      optimizer.update(model, grads, hessian_diag=hdiag, expected_axis_name="data")
      return loss

  Args:
    loss_fn: ``loss_fn(module, *args, **kwargs)``, a scalar (or ``(loss, aux)``
      if ``has_aux``).
    model: The module.
    optimizer: The ``nnx.Optimizer`` holding the AdaHessian state.
    *args: Positional arguments of ``loss_fn`` after the module; the state of
      NNX objects among them (an ``nnx.Rngs``) is written back like the
      module's.
    has_aux: Whether ``loss_fn`` returns ``(loss, aux)``.
    axis_name: The ``pmap`` / ``shard_map`` axis (or tuple of axes) the batch
      is split over, as given to the optimizer's ``tx``; ``None`` (the default)
      averages nothing over devices (a single device, or ``jit`` with sharded
      arrays).
    independent_probes: Each device draws its own probes, as ``tx`` built
      with ``independent_probes=True`` does; needs ``axis_name``. Warns if
      ``loss_fn`` reads other devices' parameters through a collective over
      ``axis_name`` (``nnx.BatchNorm(axis_name=...)``), which biases the estimate.
    refresh: ``None`` (default) to follow the schedule in the optimizer's state, or a
      refresh decision taken on the host (see
      :func:`adahessian_jax.value_grad_and_hessian_diag`): pass the same value to
      ``optimizer.update(model, grads, hessian_diag=..., refresh=refresh)``. With
      ``update_freq > 1``, jit one step with ``refresh=True`` and one with ``False`` and call
      the first when ``step % update_freq == 0``: the other costs a ``nnx.value_and_grad``.
    **kwargs: Keyword arguments of ``loss_fn`` (other than the four above,
      which this function takes).

  Returns:
    ``(value, grads, hessian_diag)``: pass ``grads`` and
    ``hessian_diag=hessian_diag`` to ``optimizer.update(model, ...)``. With
    ``axis_name`` the loss in ``value`` and ``grads`` are the means over the
    devices, ``hessian_diag`` this device's estimate.

  Raises:
    ValueError: if ``model`` holds none of the variables ``optimizer.wrt``
      selects, or other ones than the optimizer's state was made for (a leaf of
      another shape, or none where the state has one: another model), if the optimizer's
      ``tx`` holds no AdaHessian transform, for an
      ``axis_name`` that no enclosing map binds, for ``independent_probes``
      without ``axis_name``, for a ``has_aux`` or ``independent_probes`` that is not a bool,
      for ``refresh`` as :func:`adahessian_jax.is_refresh_step` does, and under ``shard_map``
      for a ``loss_fn`` reduced over ``axis_name`` (``lax.pmean``; it must be this device's
      loss).
    TypeError: if ``model`` is a function or ``loss_fn`` not callable (e.g.
      the two swapped), ``model`` is no NNX module (a Linen module, or a module's
      state: ``nnx.state``, ``nnx.split``, a pure dict), ``loss_fn``'s signature cannot take
      ``(model, *args, **kwargs)``, ``optimizer`` is not an ``nnx.Optimizer``, or ``loss_fn``'s
      output does not match ``has_aux`` (a tuple without it, a lone value with
      it), or ``refresh`` is not a bool or ``None``.
  """
  has_aux = _validation.flag("adahessian_jax.nnx.value_grad_and_hessian_diag: has_aux", has_aux)
  if not isinstance(optimizer, nnx.Optimizer):
    raise TypeError(
      "adahessian_jax.nnx.value_grad_and_hessian_diag(loss_fn, model, optimizer, *args) takes "
      f"the nnx.Optimizer after the model, got {type(optimizer).__name__} there."
    )
  _check_arguments(
    model,
    loss_fn,
    "adahessian_jax.nnx.value_grad_and_hessian_diag(loss_fn, model, optimizer, *args)",
    args,
    kwargs,
    "the optimizer",
  )
  graphdef, params, rest = _split(model, optimizer.wrt, args, kwargs)
  _check_selects(params, optimizer.wrt, "the optimizer's ")
  opt_state = nnx.as_pure(optimizer.opt_state)
  _check_against_optimizer(nnx.as_pure(params), opt_state)
  trained = _trained(nnx.filterlib.to_predicate(optimizer.wrt))

  def loss_of(p):
    given = dict(nnx.to_flat_state(nnx.as_pure(p)))
    graph = _merge(graphdef, p, rest)
    out = loss_fn(graph[0], *graph[1], **graph[2])
    # The trained variables the call wrote (nnx.WeightNorm and nnx.SpectralNorm write the
    # normalised kernel into its nnx.Param; nnx.value_and_grad keeps the write) or created, and
    # the other Variables of the model and of NNX objects among the arguments, as Variables, not
    # plain values: nnx.update can only add a Variable the call created (Module.sow) as one. The
    # trained ones it did not write are left out: under shard_map with axis_name they are the
    # device-varying copies of the replicated parameters.
    now = nnx.to_flat_state(nnx.as_pure(nnx.state(graph, trained)))
    written = {path for path, v in now if given.get(path[1:]) is not v}
    _, new_params, _, new_state, _ = nnx.split(
      graph, lambda path, x: path in written and trained(path, x), trained, nnx.Variable, ...
    )
    loss, aux = _validation.loss_and_aux(out, has_aux, "pass has_aux=True.")
    return loss, (aux, new_params, new_state)

  params, opt_state = distributed.fused_pass_inputs(
    params,
    opt_state,
    axis_name,
    independent_probes,
    "adahessian_jax.nnx.value_grad_and_hessian_diag",
    "the optimizer's tx",
    loss=lambda p: loss_of(p)[0],
  )

  vgh = fused.value_grad_and_hessian_diag(loss_of, has_aux=True, refresh=refresh)
  (loss, (aux, new_params, new_state)), grads, hdiag = vgh(params, opt_state)
  if axis_name is not None:
    grads, loss = jax.lax.pmean((grads, loss), axis_name)
    # The trained variables the loss wrote, the same on every device (as the gradient).
    new_params = jax.tree.map(
      lambda x: (
        jax.lax.pmean(x, axis_name) if jnp.issubdtype(jnp.result_type(x), jnp.inexact) else x
      ),
      new_params,
    )
  nnx.update((model, args, kwargs), new_params, new_state)
  return ((loss, aux) if has_aux else loss), grads, nnx.as_pure(hdiag)


# What spatial.named(model) reads off an nnx.Module: each parameter's axis names by the type of
# the module that holds it (docs/layouts.md, "The mapping").
_STACKED = "layers"


def _input_names(n: int) -> tuple[str, ...]:
  """The names of a kernel's ``n`` input axes: the last one blocked along (``embed``), any before
  it kept apart (``heads``), as Linen's ``DenseGeneral`` kernels are read (docs/layouts.md)."""
  return ("heads",) * (n - 1) + ("embed",)


def _einsum_axes(einsum_str: str, rank: int) -> tuple[str, ...] | None:
  """The axis names of an ``nnx.Einsum`` kernel of ``rank`` axes, where its einsum string lays
  it out as a ``DenseGeneral`` kernel: axes mapped over (in the input, kernel and output:
  stacked), then contracted inputs (:func:`_input_names`), then outputs; where it contracts no
  axis (``"btd,td->btd"``, ``"bd,hd->bhd"``: each entry of the kernel meets its own output
  entries, as a per-head scale's), every axis ``"heads"``: kept apart, and no stack of layers
  (``curvature_floor`` takes the leaf's mean, as for a scale); otherwise ``None`` (the string
  does not say which axis is the input the default reading would block along)."""
  spec = einsum_str.replace(" ", "")
  if spec.count("->") != 1:
    return None
  operands, out = spec.split("->")
  parts = operands.split(",")
  if len(parts) != 2 or "." in parts[1] or len(parts[1]) != rank:
    return None
  x, kernel = parts
  if len(set(kernel)) != len(kernel):
    return None
  kinds = []
  for letter in kernel:
    if letter in x and letter in out:
      kinds.append(0)  # one kernel per entry of this axis: stacked
    elif letter in x:
      kinds.append(1)  # contracted: an input axis
    elif letter in out:
      kinds.append(2)  # an output axis
    else:
      return None
  if 1 not in kinds:  # nothing contracted: no inputs to block along, nothing to average
    return ("heads",) * rank
  if kinds != sorted(kinds):
    return None
  stacked, outputs = kinds.count(0), kinds.count(2)
  return (_STACKED,) * stacked + _input_names(kinds.count(1)) + ("mlp",) * outputs


def _own_axes(module: Any) -> dict[str, tuple[tuple[int, ...], tuple[Any, ...]]]:
  """For a module of a known type, its parameters' attribute names, each with the shape one
  module (one layer) gives it and its axis names; ``{}`` for other modules."""
  if isinstance(module, nnx.MultiHeadAttention):
    return {}  # its projections are read as its children, below
  if isinstance(module, (nnx.Conv, nnx.ConvTranspose)):
    shape = tuple(module.kernel_shape)
    spatial = ("spatial",) * len(module.kernel_size)
    return {
      "kernel": (shape, (*spatial, "channels", "features")),
      "bias": ((module.out_features,), ("features",)),
    }
  if isinstance(module, nnx.Linear):
    return {
      "kernel": ((module.in_features, module.out_features), ("embed", "mlp")),
      "bias": ((module.out_features,), ("mlp",)),
    }
  if isinstance(module, nnx.LinearGeneral):
    batch = tuple(module.batch_axis.values())
    ins, outs = tuple(module.in_features), tuple(module.out_features)
    stacked = (_STACKED,) * len(batch)
    return {
      "kernel": ((*batch, *ins, *outs), (*stacked, *_input_names(len(ins)), *("mlp",) * len(outs))),
      "bias": ((*batch, *outs), (*stacked, *("mlp",) * len(outs))),
    }
  if isinstance(module, nnx.Embed):
    return {"embedding": ((module.num_embeddings, module.features), ("vocab", "embed"))}
  if isinstance(module, nnx.LoRA):
    rank = int(module.lora_a.shape[-1])  # the one size not among the module's attributes
    return {
      "lora_a": ((module.in_features, rank), ("embed", "features")),
      "lora_b": ((rank, module.out_features), ("features", "mlp")),
    }
  norms = (nnx.LayerNorm, nnx.RMSNorm, nnx.BatchNorm, nnx.GroupNorm, nnx.InstanceNorm)
  if isinstance(module, norms):
    if isinstance(module, nnx.GroupNorm):
      count = module.num_groups * module.group_size
    else:
      count = module.num_features
    one = ((count,), ("features",))
    return {"scale": one, "bias": one}
  if isinstance(module, nnx.Einsum):
    shape = tuple(module.kernel_shape)
    names = _einsum_axes(module.einsum_str, len(shape))
    return {} if names is None else {"kernel": (shape, names)}
  return {}


def _attention_axes(module: Any) -> dict[str, dict[str, tuple[tuple[int, ...], tuple[Any, ...]]]]:
  """The axes of an ``nnx.MultiHeadAttention``'s projections, by child and parameter: the query,
  key and value kernels ``(embed, heads, head_dim)``, the output kernel ``(heads, head_dim,
  embed)``, and their biases."""
  out = {}
  for child in ("query", "key", "value", "out"):
    linear = getattr(module, child, None)
    if not isinstance(linear, nnx.LinearGeneral) or linear.batch_axis:
      continue
    ins, outs = tuple(linear.in_features), tuple(linear.out_features)
    if child != "out" and len(ins) == 1 and len(outs) == 2:
      kernel, bias = ("embed", "heads", "head_dim"), ("heads", "head_dim")
    elif child == "out" and len(ins) == 2 and len(outs) == 1:
      kernel, bias = ("heads", "head_dim", "embed"), ("embed",)
    else:
      continue
    out[child] = {"kernel": ((*ins, *outs), kernel), "bias": (outs, bias)}
  return out


def module_axis_names(model: Any) -> dict[str, tuple[Any, ...] | None]:
  """The axis names of every variable of ``model``, what ``spatial.named(model)`` reads: its own
  (sharding metadata) where it has them, else those the type of the module holding it gives
  (:func:`_own_axes`), with any leading axes beyond those named ``"layers"`` (the stacked axes of
  ``nnx.vmap``/``nnx.scan``); ``None`` where neither says. A parameter whose trailing shape is
  not what its module's attributes make is left unnamed.

  Args:
    model: An ``nnx.Module``.

  Returns:
    ``{path: axis names or None}``, keyed by ``jax.tree_util.keystr`` of each variable's path in
    ``nnx.state(model)``.
  """
  found = {jax.tree_util.keystr(x.path): x for x in layout.leaves(nnx.state(model))}
  names = {key: x.names for key, x in found.items()}
  by_type: dict[tuple[Any, ...], tuple[tuple[int, ...], tuple[Any, ...]]] = {}
  for path, module in nnx.iter_modules(model):
    for attr, axes in _own_axes(module).items():
      by_type[(*path, attr)] = axes
    if isinstance(module, nnx.MultiHeadAttention):
      for child, params in _attention_axes(module).items():
        for attr, axes in params.items():
          by_type[(*path, child, attr)] = axes
  leads: dict[tuple[Any, ...], tuple[int, ...] | None] = {}  # the stacked sizes; None: no fit
  keys: dict[tuple[Any, ...], str] = {}
  for path, (one, _) in by_type.items():
    key = jax.tree_util.keystr(tuple(jax.tree_util.DictKey(k) for k in path))
    if key not in found or names[key] is not None:
      continue  # no such variable (a module without a bias), or its own names win
    if _evidence_biases.names_a_bias_table(found[key].path):
      # T5's relative_attention_bias, an nnx.Embed (buckets, heads): its names would make it a
      # token table, averaged across heads; the default reading takes it for what it is.
      continue
    shape = tuple(getattr(found[key].leaf, "shape", ()))
    extra = len(shape) - len(one)
    leads[path] = shape[:extra] if extra >= 0 and shape[extra:] == tuple(one) else None
    keys[path] = key
  for path, lead in leads.items():
    if lead is None or (lead and _stack_in_doubt(path, leads)):
      continue
    names[keys[path]] = (_STACKED,) * len(lead) + tuple(by_type[path][1])
  return names


def _stack_in_doubt(
  path: tuple[Any, ...], leads: dict[tuple[Any, ...], tuple[int, ...] | None]
) -> bool:
  """Whether the leading axes that the parameter at ``path`` has beyond its module's one-layer
  shape may be no stack in front: where a parameter of its module or of a sibling module (under
  its module's parent) does not fit its own one-layer shape after any leading axes (``nnx.vmap``
  with ``out_axes=1`` stacks along axis 1: a ``Conv`` bias ``(out, layers)``), a kernel that fits
  by a coincidence of sizes (``(kw, layers, in, out)`` with ``layers = kw``) may have its stack
  elsewhere. Siblings that fit after other leading sizes are other stacks (an encoder's 3 layers
  beside a decoder's 5), not a sign: one ``nnx.vmap`` stacking along another axis makes every
  parameter that fits at all fit after the same ``(layers,)``.

  Args:
    path: The parameter's path, ``(*module path, attribute)``.
    leads: The leading sizes of every parameter of a known module beyond its one-layer shape
      (``None`` for one that does not fit).

  Returns:
    ``True`` if some parameter under the module's parent does not fit.
  """
  block = path[:-2]
  return any(other[: len(block)] == block and lead is None for other, lead in leads.items())
