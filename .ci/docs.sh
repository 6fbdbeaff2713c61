#!/usr/bin/env bash
# The documentation builds with no warnings (they are errors): the guides, docs/*.md, and the API
# reference from the docstrings, docs/api/. Their code runs in tests/test_docs.py.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${VIRTUAL_ENV:-}" && -f .venv/bin/activate ]]; then . .venv/bin/activate; fi
pip install --quiet -e ".[docs]"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
python -m sphinx -W --keep-going -q -b html docs "$out"
echo "docs: the guides and the API reference built with no warnings"
