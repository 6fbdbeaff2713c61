"""Data-parallel and multi-host AdaHessian: probe policy, state sharding, drift checks.

AdaHessian needs one thing beyond what data-parallel Adam needs: the Hessian
diagonal estimate must be averaged across replicas like the gradient, or the
replicas' second moments, and so their parameters, drift apart. How that
happens depends on the programming model:

* ``pmap`` / ``shard_map`` (per-device view): pass ``axis_name`` to
  :func:`adahessian_jax.adahessian` (or ``scale_by_adahessian``). Every
  replica computes ``z ⊙ H_i z`` on its local batch and the transform
  ``lax.pmean``-s it over the axis before the absolute value and the spatial
  averaging, exactly as the gradients are ``pmean``-ed by the training step.
* ``jax.jit`` with shardings (global view), data-parallel or FSDP: nothing to
  do. The loss is a global function of global arrays, so its gradient and
  ``z ⊙ Hz`` already are the global-batch quantities; do **not** pass
  ``axis_name``. Keep the optimizer state sharded like the parameters
  (:func:`state_shardings`); the PRNG key in the state is two ``uint32`` per
  probe, replicated, and the probes are generated sharded like the parameters
  (JAX's partitionable threefry, the default).
* Multi-host (``jax.distributed.initialize``): the same code as the single-host
  case over the global mesh / all devices.

Probe policy (per-device view only). The PRNG key lives in the replicated
state, so by default every device draws the **same** probe ``z`` and the
averaged estimate is ``z ⊙ (mean_i H_i) z``: exactly the single-device
estimate on the global batch, hence single-device training reproduced to
rounding. With ``independent_probes=True`` each device folds its
``lax.axis_index`` (device 0: the axis size, :func:`fold_in_axis_index`) into
the key and draws its own probe; the average
``mean_i z_i ⊙ H_i z_i`` stays unbiased and has lower variance, for free,
while the state stays replicated (measurements: ``docs/distributed.md``).
Use the default where reproducibility against a single device matters (tests,
debugging, comparing runs across device counts); use independent probes for
production training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec, Sharding

from adahessian_jax import _keys, _validation, masking
from adahessian_jax._axes import (
  check_names,
  device_varying,
  fold_in_axis_index,
)
from adahessian_jax._coupling import warn_if_loss_couples_devices
from adahessian_jax.state import (
  check_holds_adahessian_state,
  check_key_data,
  map_adahessian_state,
)

__all__ = [
  "device_varying",
  "fold_in_axis_index",
  "max_replica_difference",
  "per_device_probe_state",
  "replicate",
  "state_shardings",
]

T = TypeVar("T")


def per_device_probe_state(opt_state: T, axis_name: Any) -> T:
  """``opt_state`` with this device's index folded into the AdaHessian key.

  For the fused route with independent probes: the probes that
  :func:`adahessian_jax.value_grad_and_hessian_diag` draws from the returned
  state are exactly those of ``scale_by_adahessian(..., axis_name=axis_name,
  independent_probes=True)`` in the ``value_fn`` route. Use the returned state
  only to compute the estimate and pass the original state to ``tx.update``,
  so that the optimizer state stays replicated::

    vgh = adahessian_jax.value_grad_and_hessian_diag(loss_fn)
    probe_state = distributed.per_device_probe_state(opt_state, "batch")
    loss, grads, hdiag = vgh(params, probe_state, batch)
    grads = jax.lax.pmean(grads, "batch")
    updates, opt_state = tx.update(
        grads, opt_state, params, hessian_diag=hdiag,
        expected_axis_name="batch", expected_independent_probes=True)

  The last two arguments say how the gradients were averaged and the probes drawn: ``tx`` raises
  unless it was built with ``axis_name="batch"`` and ``independent_probes=True`` (a ``tx``
  without them would not average the estimate, or not as drawn, with no error).

  Must be called inside a mapped context (``pmap``, ``shard_map``, ``vmap``)
  that binds ``axis_name``. Under ``shard_map`` pass ``vgh`` the parameters as
  :func:`device_varying` returns them (as for any gradient there): probes that vary
  over the axis at invariant parameters are refused, naming the leaf.

  Args:
    opt_state: An optimizer state containing AdaHessian states.
    axis_name: The mapped axis (or tuple of axes) the probes should differ over.

  Returns:
    ``opt_state`` with the ``key`` of every :class:`ScaleByAdaHessianState`
    replaced by its per-device fold.

  Raises:
    ValueError: if ``axis_name`` is not bound by an enclosing map, ``opt_state``
      holds no AdaHessian state, or one whose key is not raw key data of JAX's default PRNG
      implementation (e.g. a checkpoint made under another ``jax_default_prng_impl``).
  """
  check_holds_adahessian_state(opt_state, "per_device_probe_state")

  def fold(s):
    check_key_data(s.key)  # e.g. made under another PRNG implementation
    return s._replace(key=fold_in_axis_index(s.key, axis_name))

  return map_adahessian_state(fold, opt_state)


def fused_pass_inputs(
  params: Any,
  opt_state: Any,
  axis_name: Any,
  independent_probes: bool,
  caller: str,
  tx: str,
  loss: Callable[[Any], Any] | None = None,
) -> tuple[Any, Any]:
  """The ``(params, opt_state)`` at which a data-parallel fused pass takes this device's own
  gradient and estimate (the Flax helpers' ``axis_name`` / ``independent_probes``).

  With ``axis_name``, both are marked device-varying (under ``shard_map``, differentiating at the
  replicated, invariant, parameters would sum the gradient over the axis, and the probes must vary
  like them), and with ``independent_probes`` the state's keys are folded per device
  (:func:`per_device_probe_state`; pass the original state to ``tx.update``). Without
  ``axis_name`` they are returned as they are.

  With ``independent_probes`` and ``loss`` (this device's loss of the params), warns if it reads
  other devices' parameters through a collective over ``axis_name`` (a synchronised BatchNorm),
  which would bias the estimate.

  Args:
    params: The parameters the pass differentiates at.
    opt_state: The optimizer state whose AdaHessian keys draw the probes.
    axis_name: The axis the step is mapped over, or ``None``.
    independent_probes: Whether each device draws its own probes.
    caller: The helper's name, for errors and warnings.
    tx: How the caller's optimizer transform is called, for the error.
    loss: This device's loss of the params, for the warning; ``None`` skips it.

  Returns:
    ``(params, opt_state)`` for the pass.

  Raises:
    ValueError: for ``independent_probes`` without ``axis_name``, naming ``caller`` and ``tx``
      (how the caller's optimizer transform is called).
  """
  independent_probes = _validation.flag(f"{caller}: independent_probes", independent_probes)
  if axis_name is None:
    if independent_probes:
      raise ValueError(
        f"{caller}: independent_probes=True draws each device's own probes, so it needs the "
        f"axis_name the step is mapped over (pmap or shard_map), as given to {tx}."
      )
    return params, opt_state
  params, opt_state = device_varying((params, opt_state), axis_name)
  if independent_probes:
    if loss is not None:
      warn_if_loss_couples_devices(loss, params, axis_name, caller)
    opt_state = per_device_probe_state(opt_state, axis_name)
  return params, opt_state


def _sharding_of(path: Any, x: Any) -> Sharding:
  sharding = getattr(x, "sharding", None)
  if not isinstance(sharding, Sharding):
    raise TypeError(
      "state_shardings needs params as sharded jax.Arrays (or ShapeDtypeStructs with a "
      f"sharding), got a {type(x).__name__} without one at {_validation.path_str(path)}: "
      "jax.device_put the params with their shardings first."
    )
  return sharding


def _check_replicated(replicated: Any) -> None:
  """Raises unless ``replicated`` is a :class:`jax.sharding.Sharding` (or, for ``jit`` under
  ``jax.set_mesh``, a ``PartitionSpec``) that replicates a value: it was put into the result as
  given, and ``jit`` or ``device_put`` failed on it later, naming the step count's path."""
  if isinstance(replicated, PartitionSpec):
    replicates = all(axis is None for axis in replicated)
  elif isinstance(replicated, Sharding):
    replicates = replicated.is_fully_replicated
  else:
    wrap = " (wrap it: NamedSharding(mesh, PartitionSpec()))"
    raise TypeError(
      f"state_shardings: replicated={replicated!r} is a {type(replicated).__name__}, not a "
      "jax.sharding.Sharding"
      + (wrap if isinstance(replicated, jax.sharding.Mesh) else "")
      + ": pass NamedSharding(mesh, PartitionSpec()), or leave it None to replicate over the "
      "parameters' mesh."
    )
  if not replicates:  # the step count and keys, scalars, cannot be split
    raise ValueError(
      f"state_shardings: replicated={replicated} splits values over devices, but it is the "
      "sharding of the step count and the PRNG keys, which every device holds whole: pass "
      "NamedSharding(mesh, PartitionSpec()), or leave it None."
    )


def state_shardings(
  tx: optax.GradientTransformation | Callable[[Any], Any],
  params: Any,
  replicated: Sharding | PartitionSpec | None = None,
) -> Any:
  """Shardings for an optimizer state that follow the parameters' (FSDP style).

  Every parameter-shaped subtree of ``tx``'s state (the moments ``mu``,
  ``nu`` and the stored Hessian of AdaHessian, Adam's moments, ...; found with
  :func:`optax.tree.map_params`, so it works for every state layout) gets the
  parameters' shardings, leaf by leaf where the shapes agree; every other leaf
  (step counts, PRNG keys, a leaf whose shape differs from its
  parameter's, or the vectors of ``optax.flatten``, whose ``init`` ``map_params``
  cannot call: there the parameter-shaped subtrees are found by the
  parameters' tree structure) gets ``replicated``. Where ``optax.masked`` (or
  ``optax.multi_transform``) leaves parameters out of a state, the
  ``optax.MaskedNode`` stays, so the result has the state's structure.

  Needed because under ``jax.jit`` with automatic axes ``jit(tx.init)(params)``
  does not shard the zeros like the parameters, whatever their shardings (the
  zeros do not depend on the parameters' values): they come back replicated
  under ``jax.set_mesh``, else on one device. Use it as
  ``jax.jit(tx.init, out_shardings=state_shardings(tx, params))(params)`` or
  ``jax.device_put(state, state_shardings(tx, params))``, and as
  ``in_shardings``/``out_shardings`` of the training step.

  Args:
    tx: The optimizer (or its ``init`` function).
    params: The parameters as sharded :class:`jax.Array` values (or
      :class:`jax.ShapeDtypeStruct` values with shardings).
    replicated: Sharding of the non-parameter leaves, one that replicates them (or
      ``PartitionSpec()`` under :func:`jax.set_mesh`). Default: replicated over
      the mesh of the first parameter's :class:`jax.sharding.NamedSharding`.

  Returns:
    A pytree of shardings with the structure of ``tx``'s state.

  Raises:
    ValueError: if ``replicated`` is not given and the parameters have no
      ``NamedSharding`` to take the mesh from, or is one that splits values.
    TypeError: for a ``replicated`` that is neither a :class:`jax.sharding.Sharding` nor a
      ``PartitionSpec``, a ``tx``
      whose ``init`` cannot take ``params``, or a leaf of ``params`` without a sharding (naming
      its path).
  """
  # An optimizer (then its init) or, as the docstring allows, its init function itself.
  init = cast(Callable[[Any], Any], getattr(tx, "init", tx))
  if not callable(init):  # e.g. the optimizer's state: "the first argument must be callable"
    raise TypeError(
      f"state_shardings: tx is a {type(tx).__name__}, not an optimizer (an "
      "optax.GradientTransformation) or its init function. Pass the optimizer first, then the "
      "params: state_shardings(tx, params)."
    )
  _validation.callable_with(
    init,
    (params,),
    {},
    "tx.init(params)",
    "Pass the optimizer (or its init function) first, then the params: "
    "state_shardings(tx, params).",
  )
  if replicated is not None:
    _check_replicated(replicated)
  param_shardings = jax.tree_util.tree_map_with_path(_sharding_of, params)
  if replicated is None:
    named = [s for s in jax.tree.leaves(param_shardings) if isinstance(s, NamedSharding)]
    if not named:
      raise ValueError(
        "state_shardings takes the mesh from the parameters' NamedShardings; the parameters "
        "have none, so pass replicated=... explicitly."
      )
    replicated = NamedSharding(named[0].mesh, PartitionSpec())
  shapes = jax.tree.map(lambda p: jax.ShapeDtypeStruct(jnp.shape(p), jnp.result_type(p)), params)
  abstract_state = jax.eval_shape(init, shapes)

  def follow(leaf, sharding, param):
    if masking.is_masked(leaf):  # a leaf (or subtree) that optax.masked leaves out
      return leaf
    return sharding if tuple(leaf.shape) == tuple(param.shape) else replicated

  try:
    return optax.tree.map_params(
      init,
      follow,
      abstract_state,
      param_shardings,
      shapes,
      transform_non_params=lambda leaf: replicated,
      is_leaf=masking.is_masked,
    )
  except Exception:  # noqa: BLE001 (init took the params above, not optax's placeholder)
    # optax.flatten's init concatenates the leaves, which the placeholder has none of ("Need at
    # least one array to concatenate"): the subtrees shaped like the params are found by their
    # structure instead (flatten's vectors are not, and are replicated).
    return _follow_by_structure(abstract_state, follow, param_shardings, shapes, replicated)


def _follow_by_structure(
  abstract_state: Any, follow: Callable[..., Any], shardings: Any, shapes: Any, replicated: Any
) -> Any:
  """``state_shardings`` for an ``init`` that cannot take ``optax.tree.map_params``'s
  placeholder: every subtree of ``abstract_state`` with the params' structure is mapped with
  ``follow(leaf, sharding, param)`` (its parameter's ``shardings`` where the shapes agree), every
  other leaf gets ``replicated``."""
  structure = jax.tree.structure(shapes)
  like_params = lambda x: not masking.is_masked(x) and jax.tree.structure(x) == structure

  def one(x):
    if masking.is_masked(x):
      return x
    if not like_params(x):
      return replicated
    return jax.tree.map(follow, x, shardings, shapes)

  return jax.tree.map(one, abstract_state, is_leaf=lambda x: masking.is_masked(x) or like_params(x))


def _pick_tree(_: Any, tree: Any) -> Any:
  return tree


def _replica_count(devices: Sequence[Any] | None) -> int:
  """The number of this process's devices among ``devices`` (all of them if ``None``).

  Raises:
    TypeError: for an entry of ``devices`` that is not a ``jax.Device``.
    ValueError: if ``devices`` repeats a device or holds none of this process's.
  """
  if devices is None:
    return jax.local_device_count()
  seen = set()
  for i, device in enumerate(devices):
    if not isinstance(device, jax.Device):
      raise TypeError(
        f"replicate: devices[{i}] is {device!r}, a {type(device).__name__}, not a jax.Device: "
        "pass the devices the pmap-ed step is given (e.g. jax.devices()[:2])."
      )
    if device in seen:
      raise ValueError(
        f"replicate: devices[{i}], {device}, is listed twice in devices={list(devices)}: pmap "
        "maps over distinct devices, so pass each once."
      )
    seen.add(device)
  n = sum(d.process_index == jax.process_index() for d in devices)
  if n == 0:
    raise ValueError(
      f"replicate: none of devices={list(devices)} belongs to this process (process "
      f"{jax.process_index()}, devices {jax.local_devices()}), so it would hold no copy: pass "
      "the devices the pmap-ed step maps over, which must include this process's."
    )
  return n


def _is_value(leaf: Any) -> bool:
  """Whether ``pmap`` takes ``leaf`` (not a Python scalar): a ``jax.Array``, a NumPy array or
  scalar of a numeric or boolean dtype, or an object JAX converts itself (``__jax_array__``)."""
  if isinstance(leaf, np.ndarray | np.generic):
    return leaf.dtype == np.bool_ or bool(jnp.issubdtype(leaf.dtype, jnp.number))
  return isinstance(leaf, jax.Array) or hasattr(leaf, "__jax_array__")


def _one_copy(axis_name: Any) -> Callable[[Any, Any], Any]:
  """The check of one leaf of ``replicate``'s tree: an array or Python scalar, one device's copy.

  Python scalars (and weakly typed arrays, ``jnp.asarray(1.0)``) become strongly typed arrays of
  their dtype: ``pmap`` keeps them weakly typed, and the step's outputs, computed from them with
  strongly typed values, are not, so the step would compile again for its own outputs.
  """

  def check(path: Any, leaf: Any) -> Any:
    if isinstance(leaf, (bool, int, float, complex)):
      return jnp.asarray(leaf, dtype=jnp.result_type(leaf))
    if not _is_value(leaf):  # pmap's error named "flat_args[1]", not the leaf
      raise TypeError(
        f"replicate: the leaf at {_validation.path_str(path)} is {type(leaf).__name__} {leaf!r}, "
        "not an array or number, which pmap cannot pass to the step. Keep it out of the tree "
        "(close over it in the step, or make it a static argument)."
      )
    sharding = getattr(leaf, "sharding", None)
    if not isinstance(leaf, jax.Array) or not isinstance(sharding, Sharding):
      return leaf
    spec = getattr(sharding, "spec", ())
    stacked = axis_name is not None and len(spec) > 0 and spec[0] == axis_name
    if stacked or not sharding.is_fully_replicated:
      raise ValueError(
        f"replicate: the leaf at {_validation.path_str(path)} (shape {leaf.shape}) is "
        f"{'stacked over ' + repr(axis_name) if stacked else 'split over devices'} ({sharding}); "
        "replicate stacks one device's copy of each leaf. If the tree is already replicate's "
        "(or the pmap-ed step's) output, pass it to the step as it is; otherwise pass one copy "
        "(jax.device_get(x), or x[0] of a stacked x)."
      )
    return jnp.asarray(leaf, dtype=leaf.dtype) if leaf.aval.weak_type else leaf

  return check


def replicate(tree: T, axis_name: Any, devices: Sequence[Any] | None = None) -> T:
  """``tree`` with a leading device axis, placed as ``jax.pmap`` places its outputs.

  For the parameters and optimizer state of a ``jax.pmap``-ed training step::

    params, opt_state = distributed.replicate((params, tx.init(params)), "batch")
    step = jax.pmap(step, axis_name="batch")

  ``pmap`` keys its compiled programs on where its inputs are placed, and on recent JAX (0.10)
  places its outputs as a ``NamedSharding`` over a mesh whose one axis is named
  ``axis_name``. Inputs placed otherwise (host or one-device arrays stacked with
  ``np.broadcast_to`` or ``jnp.broadcast_to``, or a mesh axis of another name, as
  ``flax.jax_utils.replicate`` gives by default) compiled the step twice, for the first inputs
  and again for the outputs of the first step, for any optimizer (``optax.adam`` too). This
  copies ``tree`` through an identity ``pmap`` with the step's ``axis_name`` and ``devices``,
  so its arrays are placed exactly as the step's outputs on every JAX version, and the step
  compiles once, provided ``tree`` has the structure of the step's output (with Flax NNX,
  replicate ``nnx.as_pure(state)`` if the step returns ``nnx.as_pure(...)``). Python scalar
  (weakly typed) leaves become strongly typed arrays of their default dtype, as the step's
  outputs are. Under ``jax.distributed`` each process calls it with the same ``tree``
  and gets the copies on its own devices, as the step takes its inputs there.

  Args:
    tree: A pytree of arrays (or values ``jnp.asarray`` accepts), one device's copy.
    axis_name: The ``axis_name`` of the ``pmap``-ed step (``None`` if it has none).
    devices: The ``devices`` of the ``pmap``-ed step, if it names them; default: ``pmap``'s
      (this process's devices).

  Returns:
    ``tree`` with every leaf stacked ``n`` times along a new leading axis, ``n`` the number of
    this process's devices among ``devices`` (default: :func:`jax.local_device_count`), one copy
    on each device.

  Raises:
    TypeError: for an ``axis_name`` that is not hashable, ``devices`` that are not a sequence
      (one ``jax.Device``) or hold an entry that is not a ``jax.Device``, or a leaf of ``tree``
      that is not an array or number (naming its path).
    ValueError: for an ``axis_name`` that is a tuple or an integer (``pmap``'s collectives
      cannot use it) or, where ``pmap`` names a mesh axis with it (JAX 0.8 on), not a str,
      ``devices`` that repeat a device or hold none of this process's, or a leaf
      of ``tree`` that is already stacked over ``axis_name`` (``replicate``'s or the step's
      output) or split over devices (naming its path).
  """
  try:
    hash(axis_name)
  except TypeError:
    raise TypeError(
      f"replicate: axis_name={axis_name!r} is a {type(axis_name).__name__}, not hashable; pass "
      "the axis_name of the pmap-ed step (a str such as 'batch')."
    ) from None
  if isinstance(axis_name, tuple):  # pmap binds one axis; its collectives read a tuple as several
    raise ValueError(
      f"replicate: axis_name={axis_name!r} is a tuple, but a pmap-ed step maps over one axis: "
      "pass the axis_name its jax.pmap is given (a str such as 'batch')."
    )
  check_names(axis_name)  # an integer, which collectives read as an array axis
  # pmap merged with shard_map (JAX 0.8 on, the only pmap from 0.10) names a mesh axis with it.
  if not isinstance(axis_name, str | None) and getattr(jax.config, "jax_pmap_shmap_merge", True):
    raise ValueError(  # was an MLIR "get(): incompatible function arguments" from pmap
      f"replicate: axis_name={axis_name!r} is a {type(axis_name).__name__}, but jax.pmap names a "
      "mesh axis with it, which must be a str: pass a str such as 'batch', to the step's "
      "jax.pmap too."
    )
  if devices is not None:
    try:
      devices = tuple(devices)
    except TypeError:  # one jax.Device: "'Device' object is not iterable", naming no argument
      raise TypeError(
        f"replicate: devices={devices!r} is a {type(devices).__name__}, not a sequence of "
        "jax.Devices: pass the devices the pmap-ed step is given (e.g. jax.devices()[:2], or "
        "[device] for one)."
      ) from None
  n = _replica_count(devices)
  tree = jax.tree_util.tree_map_with_path(_one_copy(axis_name), tree)
  mapped = jax.pmap(_pick_tree, axis_name=axis_name, in_axes=(0, None), devices=devices)
  return mapped(np.zeros(n, np.int8), tree)


def max_replica_difference(tree: Any, stacked: bool = False) -> float:
  """The largest absolute difference between replicas of the same values.

  A check for drift in data-parallel training: 0.0 means every replica holds
  bit-identical values. Under ``jax.distributed`` the copies other processes
  hold are compared too (of arrays spread over several processes, and of
  ``pmap`` outputs, each process's own copies), so there it is a collective:
  call it on every process (each gets the same result).

  Args:
    tree: A pytree of arrays (typed PRNG keys are compared by their key
      data). With ``stacked=False``, ``jax.Array``s whose shards are compared
      with the other shards covering the same index, on this process's devices
      and on other processes' (the copies of replicated or partially replicated
      arrays). With
      ``stacked=True``, arrays with a leading replica axis (``pmap`` outputs),
      each slice compared with the first, and for ``jax.Array``s under
      ``jax.distributed`` with the other processes' first slices (NumPy leaves,
      fetched with ``jax.device_get``, only within this process).
    stacked: Whether the leaves carry a leading replica axis.

  Returns:
    The maximum absolute difference over all leaves (0.0 without replicas,
    or where the replicas are equal: equal infinities too; complex values
    compared as complex); NaN if a replica holds NaN.

  Raises:
    TypeError: with ``stacked=False``, for a leaf that is not a ``jax.Array``; with
      ``stacked=True``, for one that is no array (a str, a ``ShapeDtypeStruct``).
    ValueError: for a ``stacked`` that is not a bool (a str ``"False"`` is truthy); with
      ``stacked=True``, for a scalar leaf.
  """
  stacked = _validation.flag("max_replica_difference: stacked", stacked)
  diffs = [0.0]

  def compare(a, b):
    if np.size(a):
      diffs.append(_difference(np.asarray(a), np.asarray(b)))

  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if isinstance(leaf, jax.Array) and _keys.is_typed(leaf):
      leaf = jax.random.key_data(leaf)  # a typed PRNG key (a dropout key): compare its bits
    if stacked:
      values = None if _validation.array_dtype(leaf) is None else np.asarray(leaf)
      if values is None or values.dtype == object:  # a str, a dtype, a ShapeDtypeStruct
        raise TypeError(
          "max_replica_difference(stacked=True) compares the slices of arrays along their "
          f"leading replica axis; the leaf at {_validation.path_str(path)} is "
          f"{type(leaf).__name__} {leaf!r}, not an array of numbers. Pass pmap outputs (arrays, "
          "also after jax.device_get), with other values out of the tree."
        )
      if values.ndim == 0:
        raise ValueError(
          f"max_replica_difference(stacked=True) needs a leading replica axis on every leaf; "
          f"the leaf at {_validation.path_str(path)} is a scalar. Pass pmap outputs, or "
          "stacked=False for jax.Arrays replicated over devices."
        )
      for replica in values[1:]:
        compare(replica, values[0])
      # pmap outputs: each process holds only its own copies.
      if isinstance(leaf, jax.Array) and jax.process_count() > 1 and values[:1].size:
        _compare_first_copies_across_processes(values[0], compare)
      continue
    if not isinstance(leaf, jax.Array):
      raise TypeError(
        f"max_replica_difference(stacked=False) compares the device copies of jax.Arrays; the "
        f"leaf at {_validation.path_str(path)} is a {type(leaf).__name__}, which has none (0.0 "
        "would say nothing). For values with a leading replica axis (pmap outputs, also after "
        "jax.device_get) pass stacked=True."
      )
    first: dict[Any, Any] = {}
    for shard in leaf.addressable_shards:
      index = _index_key(shard.index)
      if index in first:
        compare(shard.data, first[index])
      else:
        first[index] = shard.data
    if not leaf.is_fully_addressable:  # copies on other processes too
      _compare_across_processes(leaf, first, compare)
  return float(np.max(diffs))


def _compare_first_copies_across_processes(first: np.ndarray, compare: Any) -> None:
  """Compares this process's first copy of a stacked leaf (a ``pmap`` output) with the other
  processes' first copies.

  A collective (one ``process_allgather``): under ``jax.distributed`` ``pmap`` returns each
  process only the copies on its own devices, so copies built from different values on another
  process (params initialised from a per-process seed) differ from these in no slice here.
  """
  from jax.experimental import multihost_utils

  gathered = np.asarray(multihost_utils.process_allgather(first))
  for other in gathered[1:]:
    compare(other, gathered[0])


def _difference(a: np.ndarray, b: np.ndarray) -> float:
  """``max |a - b|`` of two copies, 0.0 only if they are equal entry by entry.

  Complex values are compared as complex (cast to float64, their imaginary parts were dropped),
  equal infinities differ by 0 (``inf - inf`` is NaN), and integers that differ by at least 1
  (in float64, ``2**53`` and ``2**53 + 1`` are equal). NaN in either copy gives NaN.
  """
  wide = np.complex128 if np.iscomplexobj(a) or np.iscomplexobj(b) else np.float64
  with np.errstate(invalid="ignore"):
    diff = np.abs(a.astype(wide) - b.astype(wide))
  equal = a == b
  if np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_:  # any inequality is >= 1
    diff = np.maximum(diff, 1.0)
  return float(np.max(np.where(equal, 0.0, diff)))


def _index_key(index: tuple[slice, ...]) -> tuple[Any, ...]:
  return tuple((s.start, s.stop, s.step) for s in index)


def _compare_across_processes(leaf: jax.Array, local: dict[Any, Any], compare: Any) -> None:
  """Compares the blocks of ``leaf`` that several processes hold with the first holder's copy.

  A collective (one ``process_allgather`` per leaf that has such blocks): the blocks, their
  order and sizes follow from the global sharding alone, so every process gathers the same.
  """
  from jax.experimental import multihost_utils

  holders: dict[Any, list[int]] = {}
  sizes: dict[Any, int] = {}
  for device, index in leaf.sharding.devices_indices_map(leaf.shape).items():
    key = _index_key(index)
    holders.setdefault(key, [])
    if device.process_index not in holders[key]:
      holders[key].append(device.process_index)
    sizes[key] = math.prod(
      len(range(*s.indices(n))) for s, n in zip(index, leaf.shape, strict=True)
    )
  shared = [key for key, procs in holders.items() if len(procs) > 1]
  if not shared:
    return
  mine = [
    np.asarray(local[key]).ravel() if key in local else np.zeros(sizes[key], leaf.dtype)
    for key in shared
  ]
  gathered = np.asarray(multihost_utils.process_allgather(np.concatenate(mine)))
  # The row of each process (JAX stacks them in its device order).
  order = np.asarray(multihost_utils.process_allgather(np.int32(jax.process_index()))).ravel()
  row = {int(p): r for r, p in enumerate(order)}
  start = 0
  for key in shared:
    block = gathered[:, start : start + sizes[key]]
    start += sizes[key]
    reference, *others = holders[key]
    for proc in others:
      compare(block[row[proc]], block[row[reference]])
