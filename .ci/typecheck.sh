#!/usr/bin/env bash
# The library type-checks: pyright over adahessian_jax/ with [tool.pyright] of pyproject.toml.
# The version is pinned because a new pyright can report new errors: bump it on purpose.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${VIRTUAL_ENV:-}" && -f .venv/bin/activate ]]; then . .venv/bin/activate; fi
pip install --quiet "pyright[nodejs]==1.1.414"
pyright
