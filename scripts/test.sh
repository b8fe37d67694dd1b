#!/usr/bin/env bash
# Set up a virtual environment with every test dependency and run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e ".[test]"
.venv/bin/ruff check src tests examples bench
# pytest exits 5 when it collects no tests; set -e turns that into a failure.
.venv/bin/pytest -q "$@"
