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
``lax.axis_index`` into the key and draws its own probe; the average
``mean_i z_i ⊙ H_i z_i`` stays unbiased and its variance drops from
``Σ_{k≠j} H_jk²`` towards ``1/P`` of it (exactly so when the local Hessians
agree), for free, while the state stays replicated. Measured with
``benchmarks/probe_policy.py`` (softmax MLP, global batch 512): the summed
variance falls 1.9x / 3.3x / 5.3x for 2 / 4 / 8 replicas at initialisation
(1.5x / 2.0x / 2.3x after 100 steps), and with 8 replicas the global loss
after 20 and 200 steps is 0.139 and 0.0058 with independent probes against
0.233 and 0.0143 with the same probe (means over 5 seeds, every seed better).
Use the default where reproducibility against a single device matters (tests,
debugging, comparing runs across device counts); use independent probes for
production training.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, Sharding

from adahessian_jax.transform import ScaleByAdaHessianState, device_varying, fold_in_axis_index

__all__ = [
  "device_varying",
  "fold_in_axis_index",
  "max_replica_difference",
  "per_device_probe_state",
  "state_shardings",
]


def per_device_probe_state(opt_state: Any, axis_name: Any) -> Any:
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
    updates, opt_state = tx.update(grads, opt_state, params, hessian_diag=hdiag)

  Must be called inside a mapped context (``pmap``, ``shard_map``, ``vmap``)
  that binds ``axis_name``.

  Args:
    opt_state: An optimizer state containing AdaHessian states.
    axis_name: The mapped axis (or tuple of axes) the probes should differ over.

  Returns:
    ``opt_state`` with the ``key`` of every :class:`ScaleByAdaHessianState`
    replaced by its per-device fold.
  """
  is_state = lambda x: isinstance(x, ScaleByAdaHessianState)

  def fold(x):
    if is_state(x):
      return x._replace(key=fold_in_axis_index(x.key, axis_name))
    return x

  return jax.tree.map(fold, opt_state, is_leaf=is_state)


def _sharding_of(x: Any) -> Sharding:
  if isinstance(x, Sharding):
    return x
  sharding = getattr(x, "sharding", None)
  if not isinstance(sharding, Sharding):
    raise TypeError(
      f"state_shardings needs params as jax.Arrays or Shardings, got a leaf of type {type(x)}."
    )
  return sharding


def state_shardings(opt_state: Any, params: Any, replicated: Sharding | None = None) -> Any:
  """Shardings for an optimizer state that follow the parameters' (FSDP style).

  Every subtree of ``opt_state`` with the tree structure of ``params`` (the
  moments ``mu``, ``nu`` and the stored Hessian of AdaHessian, Adam's moments,
  ...) gets the parameters' shardings, leaf by leaf where the shapes agree;
  every other leaf (step counts, PRNG keys, or a leaf whose shape differs from
  its parameter's) gets ``replicated``.

  Needed because under ``jax.jit`` with automatic axes ``jit(tx.init)(params)``
  returns the zeros replicated, whatever the parameters' shardings (the zeros
  do not depend on the parameters' values). Use it as
  ``jax.jit(tx.init, out_shardings=state_shardings(jax.eval_shape(tx.init,
  params), params))(params)`` or ``jax.device_put(state,
  state_shardings(state, params))``, and as ``in_shardings``/``out_shardings``
  of the training step.

  Args:
    opt_state: The optimizer state, or its ``jax.eval_shape``.
    params: The parameters as sharded ``jax.Array``s, or a pytree of
      :class:`jax.sharding.Sharding` of the same structure.
    replicated: Sharding of the non-parameter leaves. Default: replicated over
      the mesh of the first parameter's :class:`jax.sharding.NamedSharding`.

  Returns:
    A pytree of shardings with the structure of ``opt_state``.

  Raises:
    ValueError: if ``replicated`` is not given and the parameters have no
      ``NamedSharding`` to take the mesh from.
  """
  is_sharding = lambda x: isinstance(x, Sharding)
  param_shardings = jax.tree.map(_sharding_of, params, is_leaf=is_sharding)
  shardings, treedef = jax.tree.flatten(param_shardings, is_leaf=is_sharding)
  if replicated is None:
    named = [s for s in shardings if isinstance(s, NamedSharding)]
    if not named:
      raise ValueError(
        "state_shardings takes the mesh from the parameters' NamedShardings; the parameters "
        "have none, so pass replicated=... explicitly."
      )
    replicated = NamedSharding(named[0].mesh, PartitionSpec())

  def like_params(node):
    try:
      return jax.tree.structure(node) == treedef
    except Exception:  # noqa: BLE001 - nodes that are not pytrees of arrays
      return False

  param_leaves = jax.tree.leaves(params, is_leaf=is_sharding)

  def fits(x, sharding, param):
    shape = tuple(np.shape(x))
    if not isinstance(param, Sharding):
      return shape == tuple(np.shape(param))
    try:
      sharding.shard_shape(shape)
    except Exception:  # noqa: BLE001 - rank or divisibility mismatch
      return False
    return True

  def assign(node):
    if like_params(node):
      leaves = jax.tree.leaves(node)
      return treedef.unflatten(
        s if fits(x, s, p) else replicated
        for x, s, p in zip(leaves, shardings, param_leaves, strict=True)
      )
    return jax.tree.map(lambda _: replicated, node)

  return jax.tree.map(assign, opt_state, is_leaf=like_params)


def max_replica_difference(tree: Any, stacked: bool = False) -> float:
  """The largest absolute difference between replicas of the same values.

  A check for drift in data-parallel training: 0.0 means every replica holds
  bit-identical values.

  Args:
    tree: A pytree of arrays. With ``stacked=False``, ``jax.Array``s whose
      addressable shards are compared with the other shards covering the same
      index (the copies of replicated or partially replicated arrays). With
      ``stacked=True``, arrays with a leading replica axis (``pmap`` outputs),
      each slice compared with the first.
    stacked: Whether the leaves carry a leading replica axis.

  Returns:
    The maximum absolute difference over all leaves (0.0 without replicas);
    NaN if a replica holds NaN.
  """
  diffs = [0.0]

  def compare(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.size:
      diffs.append(float(np.max(np.abs(a - b))))

  for leaf in jax.tree.leaves(tree):
    if stacked:
      values = np.asarray(leaf)
      for replica in values[1:]:
        compare(replica, values[0])
      continue
    first: dict[Any, Any] = {}
    for shard in getattr(leaf, "addressable_shards", ()):
      index = tuple((s.start, s.stop, s.step) for s in shard.index)
      if index in first:
        compare(shard.data, first[index])
      else:
        first[index] = shard.data
  return float(np.max(diffs))
