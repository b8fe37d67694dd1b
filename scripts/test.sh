#!/usr/bin/env bash
# Set up a virtual environment with every test dependency and run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# bubblewrap: `kiln server` runs every worker in its sandbox (docs/architecture.md,
# "Where user code runs"); the sandbox tests skip without it, and fail under CI=true.
if ! command -v bwrap >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq bubblewrap) >/dev/null 2>&1 \
    || echo "note: bubblewrap could not be installed; the sandbox tests will skip" >&2
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e ".[test]"
.venv/bin/ruff check src tests examples bench
# pytest exits 5 when it collects no tests; set -e turns that into a failure.
.venv/bin/pytest -q "$@"
