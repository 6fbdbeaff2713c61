"""Sphinx configuration: the guides in docs/*.md and an API reference from the docstrings.

Build (CI runs this in .ci/docs.sh; warnings are errors):

  pip install -e ".[docs]"
  sphinx-build -W --keep-going -b html docs build/docs   # build/ is git-ignored
"""

import builtins
import importlib
import inspect
import pathlib
import re
import sys
import typing

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
_PACKAGE = "adahessian_jax"


def _lookup(path: str) -> tuple[object, str]:
  """The object at a dotted ``path``, and its home: the last module on the path plus the rest.

  ``adahessian_jax.alias.spatial.AveragingSpec`` is at home in ``adahessian_jax.spatial``.
  ``(_MISSING, "")`` where the path leads nowhere.
  """
  parts = path.split(".")
  for split in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module(".".join(parts[:split]))
    except ImportError:
      continue
    home = [obj.__name__]
    for attr in parts[split:]:
      obj = getattr(obj, attr, _MISSING)
      if obj is _MISSING:
        return _MISSING, ""
      home = [obj.__name__] if inspect.ismodule(obj) else [*home, attr]
    return obj, ".".join(home)
  return _MISSING, ""


def _shared(obj: object) -> bool:
  """Whether ``obj`` is one of Python's own (``typing.Any`` behind a type alias, ``int``)."""
  return any(value is obj for module in (typing, builtins) for value in vars(module).values())


def _package_object(name: str) -> object:
  """The one object that the package's modules bind to the bare ``name``, or ``_MISSING``."""
  found = {
    id(obj): obj
    for modname, module in list(sys.modules.items())
    if modname.split(".")[0] == _PACKAGE
    and (obj := getattr(module, name, _MISSING)) is not _MISSING
  }
  return next(iter(found.values())) if len(found) == 1 else _MISSING


def _documented(env) -> dict[int, str]:
  """``id(object)`` to the one name it is documented under (built once per build)."""
  cached = getattr(env, "_adahessian_documented", None)
  if cached is None:
    cached = {}
    for name, entry in env.get_domain("py").objects.items():
      obj, _ = _lookup(name)
      if entry.objtype in _LINKABLE and obj is not _MISSING and not _shared(obj):
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
  py = env.get_domain("py")
  target = node["reftarget"].lstrip(".~")
  module = node.get("py:module")
  name = None
  for path in ([f"{module}.{target}"] if module else []) + [target]:
    obj, home = _lookup(path)
    if obj is not _MISSING:
      name = _documented(env).get(id(obj)) or (home if home in py.objects else None)
      break
  else:
    if "." not in target:
      name = _documented(env).get(id(_package_object(target)))
  if name is None or name == target:
    return None
  # "obj": a type alias (``py:data``) named in an annotation is a ``py:class`` reference.
  return py.resolve_xref(env, node["refdoc"], app.builder, "obj", name, node, contnode)


def setup(app):
  app.connect("missing-reference", _resolve_reexport)
  app.connect("autodoc-process-docstring", _require_docstring)
  app.connect("autodoc-skip-member", _skip_fields)
  app.connect("autodoc-process-signature", _alias_names)
