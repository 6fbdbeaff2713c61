"""Per-layer curvature: trace, diagonal and top eigenvalue of each leaf's block, or each layer's.

A leaf holding layers stacked along some axes (``nn.scan``, ``nnx.vmap``; see
``layer_axes`` of :func:`layer_breakdown`) is split into its layers, each a block of its own.

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
from typing import Any, NamedTuple

import jax
import numpy as np

from adahessian_jax import _validation
from adahessian_jax.hessian import _checks
from adahessian_jax.hessian._layout import part_name
from adahessian_jax.hessian._operator import HessianOperator
from adahessian_jax.hessian._rows import key_blocks
from adahessian_jax.hessian._sketch import wide_dtype
from adahessian_jax.hessian._stacks import layer_axes_of, layer_slices
from adahessian_jax.hessian.diagonal import hutchinson_samples, unravel_wide
from adahessian_jax.hessian.eigen import top_eigenvalues
from adahessian_jax.hessian.trace import t_scaled_stderr

__all__ = ["LayerCurvature", "layer_breakdown"]


class LayerCurvature(NamedTuple):
  """Curvature of one leaf's diagonal Hessian block ``H_ll`` (or one layer's, in a stacked leaf).

  Attributes:
    size: Number of parameters in the leaf (in the layer).
    trace: Estimate of ``tr(H_ll)``.
    trace_stderr: Its standard error, Student-t scaled as
      :func:`adahessian_jax.hessian.hutchinson_trace`'s: ``trace ± 1.96·trace_stderr`` is a
      95 % interval.
    diagonal: Estimate of ``diag(H_ll)``, shaped like the leaf (like one layer of it).
    top_eigenvalue: Largest eigenvalue of ``H_ll`` (``nan`` if not computed,
      or for a leaf of size 0, which has none).
    num_matvecs: Products spent on the eigenvalue.
    top_eigenvalue_error: Its estimated error (``Eigen.errors``: ``inf`` if its run ran
      out of ``max_iter``; ``nan`` if not computed).
    converged: Whether its Lanczos run met ``tol`` within ``max_iter``
      (``Eigen.converged``; ``False`` if not computed).
  """

  size: int
  trace: float
  trace_stderr: float
  diagonal: jax.Array
  top_eigenvalue: float
  num_matvecs: int
  top_eigenvalue_error: float = float("nan")
  converged: bool = False


@functools.partial(jax.jit, static_argnums=3)
def _block_sums(diag_sum, x, seg, num_leaves):
  """``diag_sum`` plus the sum of the rows of ``x``, and the per-row sums of ``x`` over each
  leaf's segment, in :func:`wide_dtype`: one program per block shape (op by op, four)."""
  x = x.astype(wide_dtype(x.dtype))
  return diag_sum + x.sum(0), jax.vmap(lambda r: jax.ops.segment_sum(r, seg, num_leaves))(x)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _keys(key, num_samples, block_size, num_parts):
  """The trace probes' key blocks and each part's eigen key, from ``split(key)``'s two: one
  program (op by op, five)."""
  k_trace, k_eig = jax.random.split(key)
  return key_blocks(k_trace, num_samples, block_size), tuple(jax.random.split(k_eig, num_parts))


class _Part(NamedTuple):
  """A leaf, or one layer of a stacked leaf: what gets an entry of the breakdown."""

  name: str
  leaf: int  # its leaf's index
  where: tuple[Any, ...]  # its index into the leaf (``()``: the whole leaf)
  entries: np.ndarray  # its entries' positions in the operator's flat vector


def _parts(op: HessianOperator, layer_axes: Any) -> list[_Part]:
  """Every leaf of ``op``'s params, a stacked one split into its layers.

  Named by ``op.leaf_names``, which are unique: :class:`~adahessian_jax.hessian.ParamLayout`
  gives names that would read alike (``{"a/b": x, "a": {"b": y}}``) their full paths.
  """
  axes = layer_axes_of(op.params, layer_axes)
  parts = []
  leaves = jax.tree.leaves(op.params)
  for i, (name, x, sl) in enumerate(zip(op.leaf_names, leaves, op.leaf_slices, strict=True)):
    flat = np.arange(sl.start, sl.stop).reshape(np.shape(x))
    layers = layer_slices(np.shape(x), axes[i]) if flat.size else [()]
    for where in layers:
      parts.append(_Part(part_name(name, where), i, where, flat[where].ravel()))
  return parts


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
  layer_axes: Any = None,
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
    tol: Lanczos residual tolerance, relative, in ``(0, 1)``.
    max_iter: Lanczos step limit per leaf.
    layer_axes: Layers stacked in one leaf (``nn.scan``, ``nnx.vmap``: a kernel
      ``(layers, in, out)``) get an entry each. ``None`` (the default) finds the
      layer axes from the params' axis names (boxed Linen params, NNX state with
      sharding metadata) as the optimizer's spatial averaging reads them, an
      unnamed leaf of a named stack included, and in plain arrays from a stack's
      biases, Linen module names and attention kernels (docs/layouts.md); where
      nothing shows a stack, pass the number of leading layer axes of each leaf,
      as an int or a pytree prefix of the params (e.g. ``{"ScanBlock_0": 1,
      "head": 0}``; matched by path, boxes aside: a plain dict serves ``nnx.split``'s
      ``State``); ``0`` keeps every leaf whole.

  Returns:
    A dict from leaf name (``op.leaf_names``, e.g. ``"Conv_0/kernel"``) to
    :class:`LayerCurvature`, in flattening order; a stacked leaf has one entry
    per layer, named by its index (``"layers/Dense_0/kernel[3]"``, ``"...[:, 3]"``
    for a layer axis 1, as :meth:`~adahessian_jax.hessian.HessianOperator.block`
    names them), its diagonal shaped like one layer. Leaves whose names coincide
    (``{"a/b": x, "a": {"b": y}}``) are keyed by their full paths instead
    (``"['a/b']"``, ``"['a']['b']"``), so none is lost. A leaf of size 0 has
    trace 0 with error 0, an empty diagonal and a ``nan`` top eigenvalue. The
    samples are in the operator's dtype; their per-leaf sums are in float32
    (or the operator's dtype, if wider) and averaged in float64; the diagonal
    of a float16 or bfloat16 operator is float32, and that of every leaf has
    the operator's dtype or float32, whichever is wider (a bfloat16 leaf of a
    float32 model too).

  Raises:
    ValueError: for a count, ``which`` or ``tol`` out of range, an ``eigenvalues`` that is not a
      bool, a ``layer_axes`` that does not fit the params (naming the leaf), a ``key`` that is not
      one PRNG key (an int seed, a batch of keys), or a call inside ``jax.jit``, before any product
      is spent.
    NonFiniteError: at the first non-finite product (e.g. a NaN loss).
  """
  eigenvalues = _validation.flag("eigenvalues", eigenvalues)
  num_samples = _validation.count("num_samples", num_samples, 2)
  block_size = _validation.count("block_size", op.block_size if block_size is None else block_size)
  if eigenvalues:  # the eigen solves' arguments, before the trace probes spend any product
    _checks.which(which)
    tol = _validation.relative_tolerance("tol", tol)
    max_iter = _validation.count("max_iter", max_iter)
  parts = _parts(op, layer_axes)
  blocks, eig_keys = _keys(_checks.prng_key(key), num_samples, block_size, len(parts))
  seg = np.empty(op.size, np.int32)
  for i, part in enumerate(parts):
    seg[part.entries] = i
  wide = wide_dtype(op.dtype)
  diag_sum = jax.device_put(np.zeros(op.size, wide))  # no program (jnp.asarray compiles one)
  traces = []
  for keys in blocks:
    diag_sum, sums = _block_sums(diag_sum, hutchinson_samples(op, keys), seg, len(parts))
    traces.append(np.asarray(sums, dtype=np.float64))
  traces = np.concatenate(traces)
  diag = jax.tree.leaves(unravel_wide(op, diag_sum / num_samples))
  out = {}
  for i, part in enumerate(parts):
    top, spent, error, converged = float("nan"), 0, float("nan"), False
    if eigenvalues and part.entries.size > 0:
      eig = top_eigenvalues(
        op.block(part.leaf, part.where), 1, which=which, key=eig_keys[i], tol=tol, max_iter=max_iter
      )
      top, spent = float(eig.eigenvalues[0]), eig.num_matvecs
      error, converged = float(eig.errors[0]), bool(eig.converged[0])
    t = traces[:, i]
    out[part.name] = LayerCurvature(
      size=int(part.entries.size),
      trace=float(t.mean()),
      trace_stderr=t_scaled_stderr(np.asarray(t)),
      diagonal=diag[part.leaf][part.where],
      top_eigenvalue=top,
      num_matvecs=spent,
      top_eigenvalue_error=error,
      converged=converged,
    )
  return out
