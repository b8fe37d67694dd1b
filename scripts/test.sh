#!/usr/bin/env bash
# Set up a virtual environment with every test dependency and run the whole suite,
# the PostgreSQL tests included (a throwaway PostgreSQL is started for them).
#   KILN_TEST_POSTGRES_URL  use this (empty, wipeable) database instead of starting one
#   PYTHON                  the Python 3.11+ that creates .venv/ (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# System packages (PostgreSQL, bubblewrap, curl): installed when root, else named.
missing=$(./scripts/system-packages.sh --check)
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    ./scripts/system-packages.sh || echo "note: could not install $missing; tests that need them skip" >&2
  else
    echo "note: missing system packages: $missing. The tests that need them skip;" >&2
    echo "      install them with: sudo ./scripts/system-packages.sh" >&2
  fi
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
# Python packages: installed again only when pyproject.toml changed, with progress the
# first time (about 4 GB: torch, TensorFlow, transformers).
stamp=.venv/.kiln-test-deps
wanted=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  echo "Installing Kiln and its test dependencies into .venv/ (the first time: about 4 GB, several minutes) ..."
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install --progress-bar on -e ".[test]"
  echo "$wanted" >"$stamp"
fi

# A throwaway PostgreSQL for the state store's PostgreSQL tests, stopped at the end.
pg_pid=""
if [ -z "${KILN_TEST_POSTGRES_URL:-}" ]; then
  echo "Starting a throwaway PostgreSQL for the tests ..."
  KILN_TEST_POSTGRES_URL=$(./scripts/postgres-for-tests.sh || true)
  if [ -n "$KILN_TEST_POSTGRES_URL" ]; then
    port=${KILN_TEST_POSTGRES_URL##*:}
    port=${port%%/*}
    for pidfile in /tmp/kiln-pg.*/postmaster.pid; do
      if [ -f "$pidfile" ] && [ "$(sed -n 4p "$pidfile")" = "$port" ]; then
        pg_pid=$(head -n 1 "$pidfile")
        pg_data=$(dirname "$pidfile")
      fi
    done
  else
    echo "note: PostgreSQL could not be started here; its store tests skip" >&2
  fi
  export KILN_TEST_POSTGRES_URL
fi
stop_postgres() {
  if [ -n "$pg_pid" ]; then
    kill -INT "$pg_pid" 2>/dev/null || true  # PostgreSQL's fast shutdown
    for _ in $(seq 1 100); do kill -0 "$pg_pid" 2>/dev/null || break; sleep 0.1; done
    rm -rf "$pg_data"
  fi
}
trap stop_postgres EXIT

.venv/bin/ruff check src tests examples bench
.venv/bin/mypy src/kiln  # at its default settings, no errors allowed (pyproject [tool.mypy])
# pytest exits 5 when it collects no tests; set -e turns that into a failure.
.venv/bin/pytest -q "$@"
