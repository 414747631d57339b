#!/bin/sh
# The test command: set up, then lint, type-check and run every test (unit and lab).
set -eu
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/python -m pytest -q "$@"
