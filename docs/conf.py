"""Sphinx configuration: the guides in docs/*.md and an API reference from the docstrings.

Build (CI runs this in .ci/docs.sh; warnings are errors):

  pip install -e ".[docs]"
  sphinx-build -W --keep-going -b html docs build/docs   # build/ is git-ignored
"""

import importlib
import inspect
import pathlib
import re
import sys

from sphinx.pycode import ModuleAnalyzer
from sphinx.util import logging

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import adahessian_jax  # noqa: E402

project = "adahessian_jax"
author = "adahessian_jax maintainers"
copyright = "the adahessian_jax maintainers"
release = adahessian_jax.__version__
version = release

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "myst_parser"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
root_doc = "index"

# Google-style docstrings (Args/Returns/Raises/References), as optax writes them.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
# Signatures show these aliases by name, not expanded into their unions.
autodoc_type_aliases = {
  name: name
  for name in (
    "jax.typing.ArrayLike",
    "jax.typing.DTypeLike",
    "optax.Updates",
    "optax.Params",
    "optax.OptState",
    "optax.ScalarOrSchedule",
    "chex.ArrayTree",
    "spatial.AveragingSpec",
    "AveragingSpec",
  )
}
# The names users write (``adahessian_jax.hessian.HessianOperator``), not the defining modules'.
add_module_names = True

# Every cross-reference into this package must resolve. Names outside it (JAX, optax, builtins)
# are not linked: the build runs offline, without intersphinx inventories.
nitpicky = True
nitpick_ignore_regex = [
  ("py:.*", r"(jax|jaxlib|optax|flax|numpy|np|jnp|chex|orbax|matplotlib)(\..*)?"),
  # Type aliases of optax and chex as typing.get_type_hints expands them.
  ("py:class", r"ArrayTree|ArrayLike|Numeric|Shape|PRNGKey"),
  ("py:.*", r"(typing|collections|abc|types|dataclasses|enum)\..*"),
  ("py:.*", r"Any|Callable|Sequence|Mapping|Iterable|Iterator|NamedTuple|TypeVar"),
  ("py:.*", r"(int|float|bool|str|bytes|tuple|list|dict|set|frozenset|object|type|slice)"),
  ("py:.*", r"(None|NoneType|Ellipsis|ValueError|TypeError|Exception|FloatingPointError)"),
  # Type variables in signatures (``T``).
  ("py:class", r"(adahessian_jax(\.\w+)*\.)?[A-Z]"),
]

myst_heading_anchors = 3
# The guides start at "##" (they read like sections of the README); MyST takes the first heading
# as the page title either way.
suppress_warnings = ["myst.header"]

html_theme = "alabaster"
html_title = f"adahessian_jax {release}"
html_static_path: list[str] = []

_logger = logging.getLogger(__name__)


def _defining_comment(name: str, obj: object) -> list[str]:
  """The ``#:`` comment of a re-exported constant, read from the module that defines it.

  ``adahessian_jax.STATIC_ARGS`` is defined in ``adahessian_jax.alias``; autodoc looks for
  its comment only in ``adahessian_jax/__init__.py`` and falls back to ``tuple``'s docstring.
  """
  package = name.split(".")[0]
  attr = name.rsplit(".", 1)[1]
  for modname in sorted(m for m in sys.modules if m == package or m.startswith(package + ".")):
    module = sys.modules[modname]
    if getattr(module, attr, None) is not obj:
      continue
    try:
      docs = ModuleAnalyzer.for_module(modname).find_attr_docs()
    except Exception:  # a module without readable source
      continue
    if ("", attr) in docs:
      return [line for line in docs[("", attr)] if line is not None]
  return []


def _require_docstring(app, what, name, obj, options, lines):
  """Fills in re-exported constants' comments; a public object without a docstring is an error."""
  if what in ("data", "attribute") and not inspect.isroutine(obj):
    builtin_doc = inspect.getdoc(type(obj)) or ""
    if not lines or "\n".join(lines).strip() == builtin_doc.strip():
      lines[:] = _defining_comment(name, obj)
  if not any(line.strip() for line in lines):
    _logger.warning(
      "%s %s has no docstring: add one to its definition (a #: comment for a constant).",
      what,
      name,
      type="adahessian_jax",
      subtype="docstring",
    )


def _alias_names(app, what, name, obj, options, signature, return_annotation):
  """Shows an alias inside a union by its name (Sphinx 9 prints ``TypeAliasForwardRef('name')``)."""
  fix = lambda text: text and re.sub(r"TypeAliasForwardRef\('([^']+)'\)", r"\1", text)
  return fix(signature), fix(return_annotation)


def _skip_fields(app, what, name, obj, skip, options):
  """Class members are methods and properties; fields are in each class's Attributes section."""
  if what == "class" and not (inspect.isroutine(obj) or isinstance(obj, property)):
    return True
  return None


_MISSING = object()
_LINKABLE = ("module", "function", "class", "exception", "data", "method", "property")


def _import_path(path: str) -> object:
  """The object at a dotted ``path`` (``pkg.module.name.attr``), or ``_MISSING``."""
  parts = path.split(".")
  for split in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module(".".join(parts[:split]))
    except ImportError:
      continue
    for attr in parts[split:]:
      obj = getattr(obj, attr, _MISSING)
      if obj is _MISSING:
        return _MISSING
    return obj
  return _MISSING


def _package_object(name: str) -> object:
  """The one object that the package's modules bind to the bare ``name``, or ``_MISSING``."""
  found = {
    id(obj): obj
    for modname, module in list(sys.modules.items())
    if modname.split(".")[0] == "adahessian_jax"
    and (obj := getattr(module, name, _MISSING)) is not _MISSING
  }
  return next(iter(found.values())) if len(found) == 1 else _MISSING


def _documented(env) -> dict[int, str]:
  """``id(object)`` to the one name it is documented under (built once per build)."""
  cached = getattr(env, "_adahessian_documented", None)
  package = "adahessian_jax"
  if cached is None:
    cached = {}
    for name, entry in env.get_domain("py").objects.items():
      if entry.objtype in _LINKABLE:
        obj = _import_path(name)
        # Not typing.Any behind a type alias, nor a builtin class: only the package's own.
        if obj is not _MISSING and getattr(obj, "__module__", package).startswith(package):
          cached.setdefault(id(obj), name)
    env._adahessian_documented = cached
  return cached


def _resolve_reexport(app, env, node, contnode):
  """Resolves a reference to any name of a documented object to its documentation.

  Each object is documented once, under the name users import it by
  (``adahessian_jax.probe_keys``); docstrings refer to it by the name in scope where they are
  written (``probe_keys`` inside ``adahessian_jax.state``, or
  ``adahessian_jax.state.probe_keys``). A name that denotes no documented object stays an
  error.
  """
  if node.get("refdomain") != "py":
    return None
  target = node["reftarget"].lstrip(".~")
  module = node.get("py:module")
  candidates = ([f"{module}.{target}"] if module else []) + [target]
  obj = next((o for o in map(_import_path, candidates) if o is not _MISSING), _MISSING)
  if obj is _MISSING and "." not in target:
    obj = _package_object(target)
  name = _documented(env).get(id(obj)) if obj is not _MISSING else None
  if name is None or name == target:
    return None
  py = env.get_domain("py")
  return py.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], name, node, contnode)


def setup(app):
  app.connect("missing-reference", _resolve_reexport)
  app.connect("autodoc-process-docstring", _require_docstring)
  app.connect("autodoc-skip-member", _skip_fields)
  app.connect("autodoc-process-signature", _alias_names)
