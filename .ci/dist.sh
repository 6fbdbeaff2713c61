#!/usr/bin/env bash
# Distribution lane: builds the sdist and the wheel (the wheel from the sdist, so the sdist is
# complete), fails on any build warning, checks the metadata with twine, checks what the wheel
# holds, then installs the wheel alone (core dependencies only) in a fresh virtual environment and
# runs the core smoke test there, then adds the [flax] extra, imports the Flax helpers and runs the
# tests of what changes between jax releases on the installed wheel. That environment runs the
# newest Python the classifiers name that this machine has, with the newest releases pip finds:
# what a fresh machine installs (jax >= 0.11 needs Python >= 3.12, so the tests' environment on
# python3, 3.11 here, never sees them). The oldest Python and releases are .ci/min_versions.sh's.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The build tools get an environment of their own, so that this lane needs no other environment
# and can run while the tests run (.ci/run starts it in the background). Environments are made
# without pip (ensurepip costs ~5 s of CPU each) and python3's pip installs into them (pip >= 22.3,
# --python). The tools' environment then gets pip as a package, which python -m build uses to fill
# its isolated build environments, so that those get no pip of their own either.
pip_into() {
  local dir=$1
  shift
  python3 -m pip --python "$dir/bin/python" install --quiet --no-compile "$@"
}
python3 -m venv --without-pip "$work/tools"
pip_into "$work/tools" pip "build>=1.2" "twine>=6.1"
export PATH="$work/tools/bin:$PATH"

echo "== build"
# From a copy of the checkout without its build outputs: .ci/run runs this lane while the tests'
# `python3 -m venv .venv` and `pip install -e .` write into the checkout (.venv, and the
# adahessian_jax.egg-info that an sdist build writes too); a copy also keeps a stale egg-info from
# adding files to the sdist. Python's copytree, not tar: GNU tar exits 1 ("file changed as we
# read it") when the checkout's top folder gains an entry mid-copy, though the entries that change
# are all excluded.
python3 - "$root" "$work/src" <<'PY'
import os
import shutil
import sys

root, dst = sys.argv[1:]
excluded = {".git", ".venv", "venv", "build", "dist", os.path.join("examples", "figures", "quick")}
ignore_anywhere = shutil.ignore_patterns("*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache")


def ignore(folder, names):
  here = os.path.relpath(folder, root)
  skipped = {n for n in names if os.path.normpath(os.path.join(here, n)) in excluded}
  return skipped | set(ignore_anywhere(folder, names))


shutil.copytree(root, dst, ignore=ignore, symlinks=True)
PY
# With PYTHONDONTWRITEBYTECODE set (as on this machine) setuptools warns that it skips
# byte-compiling, which is about the environment, not the package: build without it.
if ! env -u PYTHONDONTWRITEBYTECODE python -m build --outdir "$work/dist" "$work/src" >"$work/build.log" 2>&1; then
  cat "$work/build.log"
  exit 1
fi
# pip, which build runs to install setuptools, warns on this machine about each project missing
# from a local index folder named in its configuration ("Location ... is ignored"): those lines
# are about the machine, not the package, and are let through; so are setuptools' lines that
# list the files it copies and adds, which name a module such as _layout_warnings.py.
if grep -i "warn" "$work/build.log" | grep -v "is ignored: it is neither a file nor a directory" |
  grep -v -E "^(copying .* -> |adding ')"; then
  echo "python -m build printed the warnings above"
  exit 1
fi
twine check --strict "$work"/dist/*
wheel=$(ls "$work"/dist/*.whl)
version=$(basename "$wheel" | cut -d- -f2)
python - "$wheel" "$work"/dist/*.tar.gz <<'EOF'
import sys
import tarfile
import zipfile

wheel, sdist = sys.argv[1:]
names = zipfile.ZipFile(wheel).namelist()
metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA")))
expected = ["adahessian_jax/py.typed", "adahessian_jax/__init__.py", "adahessian_jax/hessian/__init__.py"]
missing = [n for n in expected if n not in names]
missing += [] if any(n.endswith(".dist-info/licenses/LICENSE") for n in names) else ["LICENSE"]
assert not missing, f"the wheel lacks {missing}"
for field in (b"License-Expression: Apache-2.0", b"License-File: LICENSE", b"Provides-Extra: flax"):
  assert field in metadata, f"the wheel's METADATA lacks {field.decode()!r}"
sdist_names = tarfile.open(sdist).getnames()
for name in ("LICENSE", "pyproject.toml", "adahessian_jax/py.typed"):
  assert any(n.endswith("/" + name) for n in sdist_names), f"the sdist lacks {name}"
# The package and the files that build it, nothing else: setuptools' default would add
# tests/test*.py without the helpers they import (MANIFEST.in prunes them).
top_files = {"LICENSE", "MANIFEST.in", "PKG-INFO", "README.md", "pyproject.toml", "setup.cfg"}
stray = [
  n
  for n in sdist_names
  if "/" in n
  and n.split("/")[1] not in top_files | {"adahessian_jax", "adahessian_jax.egg-info"}
]
assert not stray, f"the sdist holds files beyond the package: {stray[:5]}"
print(f"wheel and sdist hold py.typed and LICENSE; metadata: Apache-2.0 by SPDX expression")
EOF

. .ci/python.sh  # newest_python
python=$(newest_python)
echo "== the wheel alone, core dependencies only, on $("$python" --version 2>&1)"
"$python" -m venv --without-pip "$work/venv"
pip_into "$work/venv" "$wheel"
(cd "$work" && "$work/venv/bin/python" "$root/.ci/smoke_core.py" "$version")

echo "== the wheel with the [flax] extra"
pip_into "$work/venv" "$wheel[flax]" pytest  # pytest for the tests below: one install
(cd "$work" && "$work/venv/bin/python" -c "
import adahessian_jax.linen, adahessian_jax.nnx, flax, jax, orbax.checkpoint
print('adahessian_jax.linen and .nnx import with flax', flax.__version__, 'and jax', jax.__version__)")

echo "== tests of the installed wheel on these releases"
# The tests that reach into what changes between jax releases (the jaxprs the coupling check
# walks, float16 and float32 rounding in the Hessian tools, the state's placement, which must not
# warn), a trajectory of the optimizer against the NumPy reference and NNX's two routes; from
# outside the checkout, so that the installed wheel is the one imported (pytest puts the tests'
# folder on sys.path, not the checkout). ~30 s of CPU.
(cd "$work" && "$work/venv/bin/python" -m pytest -q -p no:cacheprovider \
  "$root/tests/test_transform.py::test_trajectory_matches_numpy_reference[mlp-n2-closure]" \
  "$root/tests/test_transform.py::test_coupling_warning_follows_a_collective_through_a_scan_carry" \
  "$root/tests/test_transform.py::test_coupling_warning_reads_only_the_outputs_of_a_nested_body_that_reach_the_loss" \
  "$root/tests/test_transform.py::test_a_jitted_step_of_committed_params_compiles_once[None]" \
  "$root/tests/test_hessian_eigen.py::test_top_eigenvalues_match_dense_to_1e8" \
  "$root/tests/test_hessian_eigen.py::test_float16_lanczos_survives_a_residual_below_the_smallest_normal_number" \
  "$root/tests/test_hessian_eigen.py::test_float16_curvature_below_the_smallest_normal_number_is_measured" \
  "$root/tests/test_hessian_landscape.py::test_filter_normalisation_of_float16_filters_below_the_smallest_normal_number" \
  "$root/tests/test_hessian_diagonal.py::test_float32_standard_error_has_no_cancellation" \
  "$root/tests/test_nnx.py::test_value_fn_route_and_fused_route_agree_and_train")
