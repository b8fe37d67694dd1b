#!/usr/bin/env bash
# Start a throwaway PostgreSQL on 127.0.0.1 for the state store's tests and print its URL.
# Best effort: prints nothing (and the PostgreSQL variants of the tests skip) when
# PostgreSQL cannot be installed or started here.
set -u
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq postgresql) >/dev/null 2>&1 || exit 0
  else
    exit 0
  fi
fi
bin=$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | tail -n 1)")
[ -x "$bin/initdb" ] || bin=$(dirname "$(command -v initdb)")
data=$(mktemp -d /tmp/kiln-pg.XXXXXX)
chown -R postgres "$data" 2>/dev/null
as_pg() { if [ "$(id -u)" = 0 ]; then su postgres -s /bin/sh -c "$*"; else sh -c "$*"; fi; }
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
as_pg "$bin/initdb -D $data -A trust -U kiln" >/dev/null 2>&1 || exit 0
as_pg "$bin/pg_ctl -D $data -o '-k $data -h 127.0.0.1 -p $port' -l $data/log -w start" >/dev/null 2>&1 || exit 0
as_pg "$bin/createdb -h 127.0.0.1 -p $port -U kiln kiln_test" >/dev/null 2>&1 || exit 0
echo "postgresql+psycopg://kiln@127.0.0.1:$port/kiln_test"
