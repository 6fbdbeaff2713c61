"""What a leaf's path says, as the readers of :mod:`adahessian_jax._evidence` read it.

A leaf's path as the readers take it (:func:`read_path`: a tuple key of a flattened tree as the
nested keys), its own name and its module's keys (:func:`leaf_name`, :func:`module_keys`; a
flattened string key, ``"Dense_0/kernel"``, read by its parts), what the default rule calls it
(:func:`param_name`: ``"kernel"``, ``"bias"``, ``"embedding"``, ``"weight"``, ...), the leaves
grouped by module (:func:`by_module`, :func:`by_leaf_name`, :func:`leaves_under`,
:func:`under_prefixes`), and what Linen's automatic module names show: the module's class
(:func:`linen_class`: ``Dense_0``) and the transforms above it (:func:`is_scan`,
:func:`stacks_all`: ``ScanBlock_0``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from jax.tree_util import DictKey


def key_name(key: Any) -> Any:
  """The name or index in one key of a path (``DictKey``, ``GetAttrKey``, ``SequenceKey``), or
  the key itself for any other."""
  return getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))


def read_path(path) -> tuple:
  """``path`` as the readers read it: a dict key that is a tuple (the keys of
  ``flax.traverse_util.flatten_dict(params)``, ``("Dense_0", "kernel")``) is one key per element,
  so that a tree flattened so reads as the nested one. (Read as one key, the last is no name and
  every leaf sits at the root: a stack's biases would be ``Dense`` kernels, averaged across its
  layers.)"""
  out = []
  for key in path:
    name = key_name(key)
    if isinstance(key, DictKey) and isinstance(name, tuple) and name:
      out.extend(DictKey(part) for part in name)
    else:
      out.append(key)
  return tuple(out)


def leaf_name(path) -> str | None:
  """A leaf's name: its last key, if a string; of a flattened key (``"Dense_0/kernel"``,
  ``"blocks.0.fc.weight"``), its last part."""
  last = key_name(path[-1]) if path else None
  if not isinstance(last, str):
    return None
  return last.replace("/", ".").rsplit(".", 1)[-1] or last


def module_keys(path) -> tuple:
  """The keys of a leaf's module: its path without the last key, and the leading parts of a
  flattened last key (``"Dense_0/kernel"``: ``Dense_0``; ``"blocks.0.fc.weight"``: ``blocks``,
  ``0``, ``fc``), which :func:`param_name` reads by its last part."""
  keys = tuple(key_name(k) for k in path[:-1])
  last = key_name(path[-1]) if path else None
  if isinstance(last, str):
    head, _, tail = last.replace("/", ".").rpartition(".")
    if head and tail:
      keys += tuple(head.split("."))
  return keys


#: The parameter names (from :func:`param_name`) the default rule reads by name, never as a
#: kernel: a bias, a norm's scale, a table and a PyTorch-layout weight.
READ_BY_NAME = ("bias", "scale", "embedding", "table", "weight")


#: Words (of a name split at "_") that make a leaf a table with a row per token or position:
#: Haiku's ``embeddings``, a learned ``pos_embedding``/``position_embeddings``/``pos_emb``,
#: GPT-2's ``wte`` and ``wpe`` (raw ``(vocab, embed)`` and ``(positions, embed)`` arrays in a
#: hand-written port), a ``token_table``/``lookup_table``; and learned rows of other kinds: a
#: Perceiver's ``latents``, a DETR's ``queries``, prefix- and prompt-tuning's
#: ``prefix``/``prompt``, a ViT's ``registers``, a VQ-VAE's ``codebook``, a Q-Former's
#: ``query_tokens``, slot attention's ``slots``, a Set Transformer's ``inducing_points``, the
#: ``prototypes``, ``centroids`` or ``anchors`` of metric and clustering heads, a raw ``pe`` or
#: ``posemb`` (a positional table).
_TABLE_WORDS = frozenset(
  ("embedding", "embeddings", "embed", "emb", "pos", "position", "positions", "positional")
  + ("table", "pe", "posemb")
  + ("wte", "wpe", "latent", "latents", "queries", "prefix", "prompt", "prompts", "registers")
  + ("codebook", "tokens", "slots", "inducing", "prototypes", "centroids", "anchors")
)


#: Whole names of tables: TransformerLens's token embedding ``W_E`` ``(d_vocab, d_model)`` and
#: positions ``W_pos`` ``(n_ctx, d_model)``.
_NAMED_TABLES = frozenset(("W_E", "W_pos"))


#: The words a table's name is made of (``pos_embedding``, ``token_embeddings``, ``wpe``): a name
#: with a word of :data:`_TABLE_WORDS` and others too (``w_embed``) could be a kernel's.
_TABLE_NAME_WORDS = _TABLE_WORDS | frozenset(
  ("", "token", "tokens", "tok", "word", "words", "patch", "type", "segment", "vocab", "learned")
  + ("absolute", "abs", "relative", "rel", "input", "output", "class", "cls", "table", "pe")
  + ("te", "lookup", "query", "register", "memory", "points", "cluster")
)


def param_name(path) -> str | None:
  """The last key of a leaf's path (``"kernel"``, ``"bias"``, ``"embedding"``), if a name.

  ``nn.WeightNorm`` names its scales ``"<layer>/<path>/scale"`` (``"Dense_0/kernel/scale"``),
  one entry per feature like a norm's: for those this is ``"scale"``. Haiku's embedding
  table ``"embeddings"`` is an ``"embedding"``, as is any name with a word (split at ``_``) of a
  table made of such words (``pos_embedding``, ``token_embeddings``, ``pos_emb``); one with other
  words too (``w_embed``, which a kernel could have) is a ``"table"``, and the ``"offset"`` of
  Haiku's norms (``hk.LayerNorm``, ``hk.BatchNorm``, ``hk.GroupNorm``) a ``"bias"``. A name with
  the word ``weight`` is a ``"weight"`` (PyTorch's ``in_proj_weight``, an LSTM's
  ``weight_ih_l0``). TransformerLens's ``W_E`` and ``W_pos`` are ``"embedding"`` tables; Haiku's
  ``VectorQuantizer`` codebook ``embeddings`` ``(embedding_dim, num_embeddings)`` (under a
  module with the word ``quantizer``) keeps its name: one code per column, a kernel's layout. A
  key of a flattened tree is read by its last part: ``"blocks.0.fc.weight"`` (a PyTorch state
  dict) is a ``"weight"``, ``"Dense_0/bias"`` (``flax.traverse_util.flatten_dict(...,
  sep="/")``) a ``"bias"``.
  """
  name = leaf_name(path)
  if name is None:
    return None
  if name in _NAMED_TABLES:
    return "embedding"
  module = module_keys(path)
  if name == "embeddings" and module and "quantizer" in words(module[-1]):
    return name  # Haiku's codebook (embedding_dim, num_embeddings): a code per column
  words_ = set(name.lower().split("_"))
  if _TABLE_WORDS & words_:  # a table's name; with another word (w_embed), maybe a kernel's
    return "embedding" if words_ <= _TABLE_NAME_WORDS else "table"
  if "weight" in words_:
    return "weight"
  return "bias" if name == "offset" else name


#: The (kernel, bias) pairs a module holds: Flax's names, Haiku's, and TensorFlow's ``filters``
#: (``tf.nn.conv2d``'s, ``(*spatial, in, out)`` as Flax's ``kernel``) beside a ``bias``.
KERNEL_BIAS = (("kernel", "bias"), ("w", "b"), ("filters", "bias"))
#: The kernels' names.
KERNEL_NAMES = tuple(dict.fromkeys(kernel for kernel, _ in KERNEL_BIAS))


def by_leaf_name(paths) -> dict[tuple, dict[str, int]]:
  """``{module path: {leaf name: leaf index}}`` by the leaves' own names (:func:`leaf_name`),
  where :func:`by_module` keys them by what :func:`param_name` reads them as."""
  modules: dict[tuple, dict[str, int]] = {}
  for i, path in enumerate(paths):
    name = leaf_name(path)
    if name is not None:
      modules.setdefault(module_keys(path), {})[name] = i
  return modules


def by_module(paths, keep: Callable[[int], bool] = lambda i: True) -> dict[tuple, dict[str, int]]:
  """``{module path: {parameter name: leaf index}}`` of the leaves ``keep`` selects that have a
  parameter name (:func:`param_name`); a module's path is its leaves' path without the last key
  (:func:`module_keys`: the leaves of a flattened tree are not all one module's).
  """
  modules: dict[tuple, dict[str, int]] = {}
  for i, path in enumerate(paths):
    param = param_name(path)
    if param is not None and keep(i):
      modules.setdefault(module_keys(path), {})[param] = i
  return modules


def leaves_under(modules: set[tuple], leaf_modules: list[tuple]) -> dict[tuple, list[int]]:
  """The leaves under each of ``modules``, found by looking up each leaf's module prefixes (not
  by trying every module against every leaf: one module per block of a deep network would make
  that the square of the leaves).

  Args:
    modules: Module paths (tuples of keys, as :func:`module_keys` gives).
    leaf_modules: Each leaf's module path.

  Returns:
    ``{module: [the indices of the leaves under it, in order]}``, for every module.
  """
  under: dict[tuple, list[int]] = {module: [] for module in modules}
  for i, keys in enumerate(leaf_modules):
    for depth in range(len(keys) + 1):
      if keys[:depth] in under:
        under[keys[:depth]].append(i)
  return under


def under_prefixes(items: Iterable[tuple[tuple, Any]]) -> dict[tuple, set]:
  """``{prefix: the values of the (keys, value) items under it}``, for every prefix of every
  item's keys (``()`` and the keys themselves included): what the leaves under a module show,
  by module, where :func:`leaves_under` lists the leaves under given modules."""
  found: dict[tuple, set] = {}
  for keys, value in items:
    for depth in range(len(keys) + 1):
      found.setdefault(keys[:depth], set()).add(value)
  return found


#: The prefixes Linen's lifted transforms that keep a module's parameters as they are add to its
#: class's name: ``nn.remat(nn.ConvLocal)`` is named ``CheckpointConvLocal_0``, ``nn.jit(nn.Dense)``
#: ``JitDense_0``.
_SHAPE_KEEPING_TRANSFORMS = ("Checkpoint", "Jit")


def linen_class(module: tuple) -> str | None:
  """The class a Linen automatic module name (``Conv_2``: ``Conv``) gives, else ``None``; past
  the prefixes of :data:`_SHAPE_KEEPING_TRANSFORMS` (``CheckpointJitConv_0``: ``Conv``)."""
  name = module[-1] if module else None
  parts = name.rsplit("_", 1) if isinstance(name, str) else []
  if len(parts) != 2 or not parts[1].isdigit() or not parts[0]:
    return None
  cls, stripped = parts[0], True
  while stripped:
    stripped = False
    for prefix in _SHAPE_KEEPING_TRANSFORMS:
      if cls.startswith(prefix) and cls[len(prefix) : len(prefix) + 1].isupper():
        cls, stripped = cls[len(prefix) :], True
  return cls


def named_by(key: Any, prefixes: tuple[str, ...]) -> bool:
  """Whether a module key is Linen's automatic name of a transform (one of ``prefixes``) of a
  class (``nn.scan(Block)`` is named ``ScanBlock_0``, ``nn.scan(_Block)`` ``Scan_Block_0``)."""
  cls = linen_class((key,))
  return cls is not None and any(
    cls.startswith(p) and cls[len(p) :].lstrip("_")[:1].isupper() for p in prefixes
  )


def is_scan(key: Any) -> bool:
  """Whether a module key is Linen's automatic name of an ``nn.scan`` of a class
  (``nn.scan(Block)`` is named ``ScanBlock_0``, ``nn.remat_scan(Block)`` ``Remat_scanBlock_0``)."""
  return named_by(key, ("Scan", "Remat_scan"))


def stacks_all(key: Any) -> bool:
  """Whether a module key is Linen's automatic name of an ``nn.scan`` or ``nn.vmap`` of a class
  (``ScanBlock_0``, ``VmapBlock_0``), which stack every parameter under it on one axis."""
  return is_scan(key) or named_by(key, ("Vmap",))


def words(name: Any) -> set[str]:
  """The words of a name, split at all but letters and before capitals (``MoeBlock_0``: moe,
  block; ``MoELayer_0``, as mixtures are often spelt: moe, layer), in lower case."""
  if not isinstance(name, str):
    return set()
  found = re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])", name.replace("MoE", "Moe"))
  return {w.lower() for w in found}
