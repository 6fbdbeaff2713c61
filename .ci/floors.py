"""Prints the declared minimum versions from pyproject.toml as pip pins, or its Python versions.

  python .ci/floors.py [EXTRA ...] [--skip NAME ...]  ->  jax==0.7.0 optax==0.2.5 ... jaxlib==0.7.0
  python .ci/floors.py --python                        ->  3.11
  python .ci/floors.py --pythons                       ->  3.13 3.12 3.11

Reads the core dependencies and the named extras, and pins every requirement that has a
``>=`` lower bound to that bound; a package named twice (the core and an extra) gets the higher
floor. ``jaxlib`` is pinned to the jax floor, as jax requires exactly its own jaxlib. Reading the
floors from pyproject.toml is what keeps .ci/min_versions.sh and the declared floors from drifting
apart. Runs on the Python that runs CI (3.11+, for tomllib).
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
import tomllib

PYPROJECT = pathlib.Path(__file__).resolve().parent.parent / "pyproject.toml"
# name[extras] >= version, optionally followed by more specifiers or a marker.
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*)$")
FLOOR = re.compile(r">=\s*([0-9][0-9A-Za-z.+!-]*)")


def _version_key(version: str) -> tuple[int, ...]:
  return tuple(int(part) for part in re.findall(r"\d+", version))


def _normalise(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def floors(project: dict, extras: list[str]) -> dict[str, str]:
  """Maps each package with a ``>=`` bound in the core or the given extras to its floor.

  Args:
    project: The ``[project]`` table of pyproject.toml.
    extras: Names of optional-dependency groups to include besides the core.

  Returns:
    ``{normalised name: floor}``, the highest floor where a package is named twice, with
    ``jaxlib`` set to jax's floor.
  """
  optional = project.get("optional-dependencies", {})
  requirements = list(project.get("dependencies", []))
  for extra in extras:
    if extra not in optional:
      raise SystemExit(f"pyproject.toml has no extra {extra!r}; it has {sorted(optional)}")
    requirements += optional[extra]
  result: dict[str, str] = {}
  for requirement in requirements:
    match = REQUIREMENT.match(requirement)
    if match is None:
      raise SystemExit(f"cannot parse the requirement {requirement!r} in pyproject.toml")
    name, _, rest = match.groups()
    name = _normalise(name)
    if name == _normalise(project["name"]):
      continue  # a self-reference such as adahessian_jax[flax,plot]
    floor = FLOOR.search(rest.split(";")[0])
    if floor is None:
      continue
    if name not in result or _version_key(floor.group(1)) > _version_key(result[name]):
      result[name] = floor.group(1)
  if "jax" in result:
    result["jaxlib"] = result["jax"]
  return result


def pythons(project: dict) -> list[str]:
  """The Python versions the classifiers name (``Programming Language :: Python :: 3.13``),
  newest first."""
  classifier = re.compile(r"^Programming Language :: Python :: (3\.[0-9]+)$")
  found = [m.group(1) for c in project.get("classifiers", []) if (m := classifier.match(c))]
  return sorted(found, key=_version_key, reverse=True)


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("extras", nargs="*", help="optional-dependency groups besides the core")
  parser.add_argument("--skip", action="append", default=[], help="a package not to pin")
  parser.add_argument("--python", action="store_true", help="print the requires-python floor")
  parser.add_argument(
    "--pythons", action="store_true", help="print the classifiers' Python versions, newest first"
  )
  args = parser.parse_args(argv)
  project = tomllib.loads(PYPROJECT.read_text())["project"]
  if args.pythons:
    print(" ".join(pythons(project)))
    return
  if args.python:
    floor = FLOOR.search(project["requires-python"])
    if floor is None:
      raise SystemExit(f"requires-python {project['requires-python']!r} has no >= floor")
    print(floor.group(1))
    return
  skip = {_normalise(name) for name in args.skip}
  pins = floors(project, args.extras)
  print(" ".join(f"{name}=={version}" for name, version in pins.items() if name not in skip))


if __name__ == "__main__":
  main(sys.argv[1:])
