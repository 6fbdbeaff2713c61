#!/usr/bin/env bash
# The library type-checks: pyright over adahessian_jax/ with [tool.pyright] of pyproject.toml.
# The version is pinned because a new pyright can report new errors: bump it on purpose.
# Pyright gets an environment of its own (made without pip; python3's pip installs into it) and
# resolves imports in the project's environment (--pythonpath): this lane writes nothing into
# that environment, so .ci/run can run it beside the docs lane, which installs into it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${VIRTUAL_ENV:-}" && -f .venv/bin/activate ]]; then . .venv/bin/activate; fi
project_python=$(python -c "import sys; print(sys.executable)")
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
python3 -m venv --without-pip "$tools"
python3 -m pip --python "$tools/bin/python" install --quiet --no-compile "pyright[nodejs]==1.1.414"
"$tools/bin/pyright" --pythonpath "$project_python"
