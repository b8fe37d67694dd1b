#!/usr/bin/env bash
# Set up Kiln, build the iris example model, serve it on localhost, call it, stop.
#   PORT, MANAGEMENT_PORT, METRICS_PORT  the three ports (default 8080, 8081, 8082)
#   KILN_HOME                            state folder (default: a temporary one, removed at the end)
#   PYTHON                               the Python 3.11+ that creates .venv/ (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PORT=${PORT:-8080}
MANAGEMENT_PORT=${MANAGEMENT_PORT:-8081}
METRICS_PORT=${METRICS_PORT:-8082}

# A busy port is found before anything starts: the server would only fail later,
# with the cause in its log.
port_busy() {
  "$PY" - "$1" <<'EOF'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(0)
sys.exit(1)
EOF
}
for var in PORT MANAGEMENT_PORT METRICS_PORT; do
  port=${!var}
  if [ "$port" != 0 ] && port_busy "$port"; then
    echo "Error: port $port ($var) is already in use on 127.0.0.1 (another server, or an earlier" >&2
    echo "quickstart still running). Stop it, or choose another port:" >&2
    echo "  $var=$((port + 10)) ./scripts/quickstart.sh" >&2
    exit 1
  fi
done

[ -x .venv/bin/python ] || "$PY" -m venv .venv
# Install only what is missing: a second run starts at once.
if ! .venv/bin/python -c 'import kiln, onnxruntime, onnx, sklearn' >/dev/null 2>&1; then
  echo "Installing Kiln and the example's packages into .venv/ (once) ..."
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e ".[onnx]" scikit-learn onnx
fi
export PATH="$PWD/.venv/bin:$PATH"
if [ -z "${KILN_HOME:-}" ]; then
  KILN_HOME=$(mktemp -d "${TMPDIR:-/tmp}/kiln-quickstart.XXXXXX")
  own_home=1
else
  own_home=0
fi
export KILN_HOME
server=""
cleanup() {
  if [ -n "$server" ]; then
    kill -INT "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
  fi
  if [ "$own_home" = 1 ]; then rm -rf "$KILN_HOME"; fi
}
trap cleanup EXIT

cd examples/iris-onnx
python build_model.py
log="$KILN_HOME/serve.log"
kiln serve --port "$PORT" --management-port "$MANAGEMENT_PORT" --metrics-port "$METRICS_PORT" 2>"$log" &   # request logs go to stderr
server=$!
for _ in $(seq 1 600); do
  [ -f "$KILN_HOME/serve.json" ] && break
  if ! kill -0 "$server" 2>/dev/null; then
    wait "$server" 2>/dev/null || true
    server=""
    echo "Error: kiln serve stopped before it was ready. The end of its log:" >&2
    tail -n 15 "$log" >&2
    exit 1
  fi
  sleep 0.1
done
if [ ! -f "$KILN_HOME/serve.json" ]; then
  echo "Error: kiln serve was not ready after 60 s. The end of its log:" >&2
  tail -n 15 "$log" >&2
  exit 1
fi
url=$(python -c "import json,os;print(json.load(open(os.path.join(os.environ['KILN_HOME'],'serve.json')))['url'])")

echo
echo "\$ curl -X POST $url/iris -H 'Content-Type: application/json' -d @sample.json"
if command -v curl >/dev/null; then
  curl -s -X POST "$url/iris" -H 'Content-Type: application/json' -d @sample.json; echo
fi
echo "\$ kiln predict iris sample-batch.json"
kiln predict iris sample-batch.json
