"""The documentation: the guides' code runs, and the API reference covers every public name.

The Sphinx build itself (warnings as errors) is the CI lane ``.ci/docs.sh``; these tests need no
Sphinx and fail fast with the fix in the message.
"""

import importlib
import inspect
import pathlib
import pkgutil
import re
import sys

import jax
import pytest
from _markdown import Block, blocks, no_run_reason, python_blocks, run_python_blocks

import adahessian_jax

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
GUIDES = sorted(DOCS.glob("*.md"))
API_PAGES = sorted((DOCS / "api").glob("*.rst"))
AUTODOC = re.compile(r"^\.\. auto(module|function|class|exception|data)::\s*(\S+)", flags=re.M)


@pytest.fixture
def restored_jax_config():
  """Undoes what a guide sets with ``jax.config.update`` (``jax_enable_x64``, ...)."""
  before = dict(jax.config.values)
  yield
  for name, value in before.items():
    if jax.config.values.get(name) != value:
      jax.config.update(name, value)


@pytest.mark.parametrize("guide", GUIDES, ids=[p.name for p in GUIDES])
def test_guide_python_blocks_run_in_order(guide, restored_jax_config):
  run_python_blocks(guide.read_text(), f"docs/{guide.name}")
  if "matplotlib.pyplot" in sys.modules:
    sys.modules["matplotlib.pyplot"].close("all")


def test_no_run_blocks_are_skipped_only_with_a_reason():
  text = (
    "```python\na = 1\n```\n\ntext\n\n"
    "```python no-run: needs two processes\nraise SystemExit\n```\n"
    "```bash\necho hi\n```\n```python\nb = a + 1\n```\n"
  )
  found = blocks(text)
  assert [(b.language, b.line) for b in found] == [("python", 1), ("python", 7), ("bash", 10)] + [
    ("python", 13)
  ]
  assert no_run_reason(found[1]) == "needs two processes"
  assert python_blocks(text) == ["a = 1\n", "b = a + 1\n"]
  assert run_python_blocks(text, "example.md")["b"] == 2
  with pytest.raises(ValueError, match="needs a reason"):
    no_run_reason(Block("python", "no-run", "", 3))
  with pytest.raises(ValueError, match="unknown info string 'norun'"):
    no_run_reason(Block("python", "norun", "", 3))


def _public_modules():
  names = ["adahessian_jax"] + [
    m.name
    for m in pkgutil.walk_packages(adahessian_jax.__path__, "adahessian_jax.")
    if not any(part.startswith("_") for part in m.name.split("."))
  ]
  return {name: importlib.import_module(name) for name in names}


def _object(path):
  module, _, attr = path.rpartition(".")
  try:
    return importlib.import_module(path)
  except ImportError:
    return getattr(importlib.import_module(module), attr)


def _api_entries():
  """(kind, name, page) for every autodoc directive of the API reference."""
  return [
    (kind, name, page.name)
    for page in API_PAGES
    for kind, name in AUTODOC.findall(page.read_text())
  ]


def test_every_public_module_and_name_is_documented_once():
  entries = _api_entries()
  documented = {}
  problems = []
  for kind, name, page in entries:
    try:
      obj = _object(name)
    except (ImportError, AttributeError):
      problems.append(f"docs/api/{page} documents {name}, which does not exist: fix or remove it")
      continue
    if kind != "module":
      documented.setdefault(id(obj), []).append(f"{name} ({page})")
  modules = {name for kind, name, _ in entries if kind == "module"}
  for modname, module in _public_modules().items():
    if modname not in modules:
      problems.append(f"module {modname}: add '.. automodule:: {modname}' to a docs/api page")
    if not inspect.getdoc(module):
      problems.append(f"module {modname} has no docstring")
    for name in getattr(module, "__all__", ()):
      obj = getattr(module, name)
      if inspect.ismodule(obj):
        continue
      where = documented.get(id(obj), [])
      if not where:
        kind = "class" if inspect.isclass(obj) else "function" if callable(obj) else "data"
        problems.append(
          f"{modname}.{name} is public but not in the API reference: add "
          f"'.. auto{kind}:: {modname}.{name}' to a docs/api page"
        )
      elif len(where) > 1:
        problems.append(f"{modname}.{name} is documented {len(where)} times: {where}")
  assert not problems, "\n".join(problems)


def test_public_functions_classes_and_methods_have_docstrings():
  missing = []
  for modname, module in _public_modules().items():
    for name in getattr(module, "__all__", ()):
      obj = getattr(module, name)
      if not (inspect.isclass(obj) or inspect.isroutine(obj)):
        continue  # modules are checked above, constants by the Sphinx build
      if not inspect.getdoc(obj):
        missing.append(f"{modname}.{name}")
      if inspect.isclass(obj):
        for attr, member in vars(obj).items():
          func = getattr(member, "__func__", getattr(member, "fget", member))
          if not attr.startswith("_") and inspect.isroutine(func) and not func.__doc__:
            missing.append(f"{modname}.{name}.{attr}")
  assert not missing, f"public names without a docstring: {sorted(set(missing))}"
