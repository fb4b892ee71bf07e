#!/usr/bin/env bash
# Set up, then run the linters and the whole test suite (what CI runs). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check gateway tests
.venv/bin/mypy gateway
exec .venv/bin/python -m pytest "$@"
