"""Packaging: one version, extras that say what they enable, floors the CI lane can read, and the
release files (LICENSE, CHANGELOG.md, CITATION.cff, py.typed) consistent with the package.

The built wheel itself is checked by .ci/dist.sh (on the newest Python and releases) and the floors
by .ci/min_versions.sh; these tests are the fast checks of the same promises on the source tree.
"""

import ast
import importlib.metadata
import importlib.util
import json
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest
import yaml

import adahessian_jax

ROOT = pathlib.Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
CORE = {"jax", "jaxlib", "optax", "numpy"}
# Extra -> the third-party packages the helpers it enables import.
EXTRA_PACKAGES = {"flax": ("flax", "orbax"), "plot": ("matplotlib",)}


def _load_floors_script():
  spec = importlib.util.spec_from_file_location("ci_floors", ROOT / ".ci" / "floors.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_version_is_defined_once_and_is_the_installed_one():
  assert "version" not in PROJECT and "version" in PROJECT["dynamic"]
  attr = PYPROJECT["tool"]["setuptools"]["dynamic"]["version"]["attr"]
  assert attr == "adahessian_jax.__version__"
  assert re.fullmatch(r"\d+\.\d+\.\d+((a|b|rc)\d+)?(\.dev\d+)?", adahessian_jax.__version__)
  assignments = [
    path
    for path in (ROOT / "adahessian_jax").rglob("*.py")
    if re.search(r"^__version__\s*=", path.read_text(), flags=re.M)
  ]
  assert assignments == [ROOT / "adahessian_jax" / "__init__.py"]
  # The test environment installs the package (pip install -e ".[test]"), so its metadata exists;
  # a stale editable install (version bumped, not reinstalled) fails here on purpose.
  assert importlib.metadata.version("adahessian_jax") == adahessian_jax.__version__


def test_release_files_agree_with_the_package():
  version = adahessian_jax.__version__
  license_text = (ROOT / "LICENSE").read_text()
  assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
  assert "END OF TERMS AND CONDITIONS" in license_text
  assert PROJECT["license"] == "Apache-2.0" and PROJECT["license-files"] == ["LICENSE"]
  assert (ROOT / "adahessian_jax" / "py.typed").is_file()
  assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["adahessian_jax"]
  assert re.search(rf"^## \[{re.escape(version)}\]", (ROOT / "CHANGELOG.md").read_text(), re.M)
  citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
  assert citation["cff-version"] == "1.2.0" and citation["type"] == "software"
  assert str(citation["version"]) == version and citation["license"] == PROJECT["license"]
  (paper,) = citation["references"]
  assert paper["doi"] == "10.1609/aaai.v35i12.17275" and paper["year"] == 2021
  assert [a["family-names"] for a in paper["authors"]] == [
    "Yao",
    "Gholami",
    "Shen",
    "Mustafa",
    "Keutzer",
    "Mahoney",
  ]


def test_extras_and_their_readme_table():
  extras = PROJECT["optional-dependencies"]
  assert {"flax", "plot", "examples", "test", "docs", "dev"} <= set(extras)
  assert {re.split(r"[<>=\[ ]", r)[0] for r in PROJECT["dependencies"]} == CORE - {"jaxlib"}
  assert "adahessian_jax[flax,plot]" in extras["examples"]
  assert "adahessian_jax[examples]" in extras["test"]
  readme = (ROOT / "README.md").read_text()
  install = readme.split("\n## Installation\n", 1)[1].split("\n## ", 1)[0]
  for extra in extras:
    assert f"| `{extra}` |" in install, f"README's install table lacks the {extra!r} extra"
  floors = _load_floors_script().floors
  stated = {**floors(PROJECT, ["flax", "plot"]), **floors(PROJECT, [])}  # jax: the core's floor
  for name in ("jax", "optax", "numpy", "flax", "orbax-checkpoint", "matplotlib"):
    assert f"{name} ≥ {stated[name]}" in install, f"README's install table: {name}'s floor"


def test_floors_script_pins_the_highest_floor_and_jaxlib():
  floors = _load_floors_script().floors
  project = {
    "name": "adahessian_jax",
    "dependencies": ["jax>=0.6.2", "optax >= 0.2.5", "numpy>=1.26,<3", "scipy"],
    "optional-dependencies": {
      "flax": ["flax>=0.12.7", "jax>=0.10.0; python_version >= '3.11'"],
      "examples": ["adahessian_jax[flax]", "tqdm>=4"],
    },
  }
  assert floors(project, []) == {
    "jax": "0.6.2",
    "optax": "0.2.5",
    "numpy": "1.26",
    "jaxlib": "0.6.2",
  }
  assert floors(project, ["flax", "examples"]) == {
    "jax": "0.10.0",
    "optax": "0.2.5",
    "numpy": "1.26",
    "flax": "0.12.7",
    "tqdm": "4",
    "jaxlib": "0.10.0",
  }
  with pytest.raises(SystemExit, match="no extra 'gpu'"):
    floors(project, ["gpu"])
  # The real file: every core dependency has a floor, and jaxlib follows jax.
  real = floors(PROJECT, [])
  assert set(real) == CORE and real["jaxlib"] == real["jax"]


def test_floors_script_lists_the_classifiers_pythons_newest_first():
  # .ci/dist.sh tests the wheel on the first this machine has, .ci/min_versions.sh on the floor.
  pythons = _load_floors_script().pythons
  classifiers = [f"Programming Language :: Python :: {v}" for v in ("3.9", "3.12", "3.10", "3")]
  assert pythons({"classifiers": [*classifiers, "Operating System :: OS Independent"]}) == [
    "3.12",
    "3.10",
    "3.9",
  ]
  real = pythons(PROJECT)
  assert real[-1] == PROJECT["requires-python"].removeprefix(">="), real  # the floor is named
  minors = [int(v.split(".")[1]) for v in real]
  assert minors == list(range(minors[0], minors[-1] - 1, -1)), real  # and every version above it


# Blocks the optional packages, imports every module of the package, and reports what failed.
_WITHOUT_EXTRAS = """
import importlib, json, pkgutil, sys
blocked = {blocked!r}

class Block:
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in blocked:
      raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

sys.meta_path.insert(0, Block())
import adahessian_jax
errors = {{}}
for info in pkgutil.walk_packages(adahessian_jax.__path__, "adahessian_jax."):
  try:
    importlib.import_module(info.name)
  except ImportError as e:
    errors[info.name] = str(e)
try:  # a landscape of the right type: the plots check it before importing matplotlib
  line = adahessian_jax.hessian.Landscape1D([0.0], [1.0], None)
  adahessian_jax.hessian.plot_landscape_1d(line)
except ImportError as e:
  errors["plot_landscape_1d"] = str(e)
print(json.dumps(errors))
"""


def test_core_imports_without_extras_and_helpers_name_their_extra():
  blocked = sorted({p for packages in EXTRA_PACKAGES.values() for p in packages})
  proc = subprocess.run(
    [sys.executable, "-c", _WITHOUT_EXTRAS.format(blocked=blocked)],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=ROOT,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  errors = json.loads(proc.stdout.strip().splitlines()[-1])
  # Exactly the Flax helpers and the plots fail, each naming its extra; every other module
  # (the whole core, the Hessian analysis) imports with jax, optax and numpy alone.
  assert set(errors) == {"adahessian_jax.linen", "adahessian_jax.nnx", "plot_landscape_1d"}
  for name, message in errors.items():
    extra = "plot" if name.startswith("plot") else "flax"
    assert f'pip install "adahessian_jax[{extra}]"' in message, (name, message)
    assert "No module named" in message, (name, message)  # the original cause is kept


def test_flax_below_the_extras_floor_is_named_at_import_of_the_nnx_helpers():
  # A Flax older than the [flax] extra's floor (installed apart from the extra) imported fine
  # and failed at the first call with Flax's "module 'flax.nnx' has no attribute 'as_pure'".
  code = "import flax.nnx as n; del n.as_pure; import adahessian_jax.nnx"
  proc = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
  )
  assert proc.returncode != 0
  message = proc.stderr.strip().splitlines()[-1]
  assert message.startswith("ImportError: adahessian_jax.nnx needs"), message
  floor = next(r for r in PYPROJECT["project"]["optional-dependencies"]["flax"] if "flax>=" in r)
  assert f"has no nnx.as_pure: the extra needs flax >= {floor.split('>=')[1]}" in message, message
  assert 'pip install "adahessian_jax[flax]"' in message, message


def _private_names_used_across_modules(package: pathlib.Path) -> list[str]:
  """Every use, in a module of ``package``, of another of its modules' underscore name
  (``from adahessian_jax.x import _name``, ``x._name``), as ``file:line: what``. Underscore
  modules (``_validation``) are the place for shared helpers, so importing them is not one."""
  found = []
  for path in sorted(package.rglob("*.py")):
    tree, where_in = ast.parse(path.read_text()), path.relative_to(package.parent)
    modules = set()  # the local names bound to a module of the package
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("adahessian_jax"):
        for alias in node.names:
          where = package.joinpath(*node.module.split(".")[1:], alias.name)
          if where.is_dir() or where.with_suffix(".py").is_file():
            modules.add(alias.asname or alias.name)
          elif alias.name.startswith("_") and not alias.name.startswith("__"):
            found.append(f"{where_in}:{node.lineno}: from {node.module} import {alias.name}")
    for node in ast.walk(tree):
      if (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in modules
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
      ):
        found.append(f"{where_in}:{node.lineno}: {node.value.id}.{node.attr}")
  return found


def test_no_module_reads_another_modules_private_names():
  # A helper shared across modules gets a plain name: in its own module (outside __all__) or in
  # an underscore module (_validation, hessian/_checks). Private names stay private to one file.
  package = pathlib.Path(adahessian_jax.__file__).parent
  assert _private_names_used_across_modules(package) == []


def test_every_public_object_is_found_in_its_source():
  # spatial.py set its re-exported classes' __module__ to itself, where their source is not:
  # inspect.getsource raised OSError for every rule class, and Sphinx, finding no source order,
  # listed their methods alphabetically.
  import importlib
  import inspect

  modules = ["adahessian_jax", "adahessian_jax.spatial", "adahessian_jax.layout"]
  modules += ["adahessian_jax.hessian", "adahessian_jax.distributed", "adahessian_jax.linen"]
  modules += ["adahessian_jax.nnx"]
  checked = 0
  for name in modules:
    module = importlib.import_module(name)
    for attr in module.__all__:
      obj = getattr(module, attr)
      if inspect.isclass(obj) or inspect.isfunction(obj):
        if not getattr(obj, "__module__", "").startswith("adahessian_jax"):
          continue
        source = inspect.getsource(obj)
        assert re.search(rf"^\s*(class|def) {obj.__name__}\b", source, re.M), f"{name}.{attr}"
        checked += 1
  assert checked > 60
