"""Per-leaf (per-layer) curvature: trace, diagonal and top eigenvalue of each block.

For a leaf ``l`` (a kernel, a bias, ...) with diagonal Hessian block ``H_ll``:

* the trace ``tr(H_ll)`` is the sum of the diagonal over the leaf, estimated by
  summing the Hutchinson diagonal samples of all leaves at once (one probe
  serves every leaf), with a standard error per leaf;
* the diagonal is the Hutchinson diagonal restricted to the leaf;
* the top eigenvalue of ``H_ll`` comes from Lanczos on the block operator
  (:meth:`~adahessian_jax.hessian.HessianOperator.block`), each of whose
  products costs one full Hessian-vector product.

References:
  Yao, Gholami, Keutzer, Mahoney, `PyHessian: Neural Networks Through the Lens
  of the Hessian <https://arxiv.org/abs/1912.07145>`_, 2020.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from adahessian_jax import _validation
from adahessian_jax.hessian._operator import HessianOperator, key_blocks
from adahessian_jax.hessian._sketch import wide_dtype
from adahessian_jax.hessian.diagonal import hutchinson_samples, unravel_wide
from adahessian_jax.hessian.eigen import top_eigenvalues

__all__ = ["LayerCurvature", "layer_breakdown"]


class LayerCurvature(NamedTuple):
  """Curvature of one leaf's diagonal Hessian block ``H_ll``.

  Attributes:
    size: Number of parameters in the leaf.
    trace: Estimate of ``tr(H_ll)``.
    trace_stderr: Its standard error.
    diagonal: Estimate of ``diag(H_ll)``, shaped like the leaf.
    top_eigenvalue: Largest eigenvalue of ``H_ll`` (``nan`` if not computed,
      or for a leaf of size 0, which has none).
    num_matvecs: Products spent on the eigenvalue.
  """

  size: int
  trace: float
  trace_stderr: float
  diagonal: jax.Array
  top_eigenvalue: float
  num_matvecs: int


@functools.partial(jax.jit, static_argnums=2)
def _leaf_sums(x, seg, num_leaves):
  """Per-row sums of ``x`` over each leaf's segment, in :func:`wide_dtype`."""
  x = x.astype(wide_dtype(x.dtype))
  return jax.vmap(lambda r: jax.ops.segment_sum(r, seg, num_leaves))(x)


def _unique_names(op: HessianOperator) -> tuple[str, ...]:
  """``op.leaf_names``, with every name shared by several leaves replaced by its full path.

  ``{"a/b": x, "a": {"b": y}}`` has two leaves named ``"a/b"``; they become
  ``"['a/b']"`` and ``"['a']['b']"`` (:func:`jax.tree_util.keystr`).
  """
  names = op.leaf_names
  if len(set(names)) == len(names):
    return names
  paths = _validation.leaf_paths(op.params)
  return tuple(p if names.count(n) > 1 else n for n, p in zip(names, paths, strict=True))


def layer_breakdown(
  op: HessianOperator,
  key: jax.Array,
  *,
  num_samples: int = 100,
  block_size: int | None = None,
  eigenvalues: bool = True,
  which: str = "LA",
  tol: float = 1e-6,
  max_iter: int = 100,
) -> dict[str, LayerCurvature]:
  """Trace, diagonal and top eigenvalue of every leaf's diagonal Hessian block.

  Args:
    op: The Hessian operator.
    key: PRNG key (split between the trace probes and the eigen solves).
    num_samples: Hutchinson probes shared by all leaves (at least 2).
    block_size: Probes per vectorised call (default ``op.block_size``).
    eigenvalues: Whether to compute each block's top eigenvalue (Lanczos,
      one full Hessian product per step, per leaf).
    which: Which eigenvalue, as in :func:`~adahessian_jax.hessian.top_eigenvalues`.
    tol: Lanczos residual tolerance.
    max_iter: Lanczos step limit per leaf.

  Returns:
    A dict from leaf name (``op.leaf_names``, e.g. ``"Conv_0/kernel"``) to
    :class:`LayerCurvature`, in flattening order. Leaves whose names coincide
    (``{"a/b": x, "a": {"b": y}}``) are keyed by their full paths instead
    (``"['a/b']"``, ``"['a']['b']"``), so none is lost. A leaf of size 0 has
    trace 0 with error 0, an empty diagonal and a ``nan`` top eigenvalue. The
    samples are in the operator's dtype; their per-leaf sums are in float32
    (or the operator's dtype, if wider) and averaged in float64; the diagonal
    of a float16 or bfloat16 operator is float32, and that of every leaf has
    the operator's dtype or float32, whichever is wider (a bfloat16 leaf of a
    float32 model too).

  Raises:
    ValueError: for a count out of range.
    NonFiniteError: at the first non-finite product (e.g. a NaN loss).
  """
  num_samples = _validation.count("num_samples", num_samples, 2)
  block_size = _validation.count("block_size", op.block_size if block_size is None else block_size)
  k_trace, k_eig = jax.random.split(key)
  blocks = key_blocks(k_trace, num_samples, block_size)
  seg = np.concatenate(
    [np.full(sl.stop - sl.start, i) for i, sl in enumerate(op.leaf_slices)]
  ).astype(np.int32)
  num_leaves = len(op.leaf_slices)
  wide = wide_dtype(op.dtype)
  diag_sum = jnp.zeros(op.size, wide)
  traces = []
  for keys in blocks:
    x = hutchinson_samples(op, keys)
    diag_sum = diag_sum + x.astype(wide).sum(0)
    traces.append(np.asarray(_leaf_sums(x, seg, num_leaves), dtype=np.float64))
  traces = np.concatenate(traces)
  diag = unravel_wide(op, diag_sum / num_samples)
  out = {}
  eig_keys = jax.random.split(k_eig, num_leaves)
  names = _unique_names(op)
  for i, (name, leaf_diag) in enumerate(zip(names, jax.tree.leaves(diag), strict=True)):
    top, spent = float("nan"), 0
    if eigenvalues and np.size(leaf_diag) > 0:
      eig = top_eigenvalues(
        op.block(i), 1, which=which, key=eig_keys[i], tol=tol, max_iter=max_iter
      )
      top, spent = float(eig.eigenvalues[0]), eig.num_matvecs
    t = traces[:, i]
    out[name] = LayerCurvature(
      size=int(np.size(leaf_diag)),
      trace=float(t.mean()),
      trace_stderr=float(t.std(ddof=1) / np.sqrt(num_samples)),
      diagonal=leaf_diag,
      top_eigenvalue=top,
      num_matvecs=spent,
    )
  return out
