#!/usr/bin/env bash
# Set up Kiln, build the iris example model, serve it on localhost, call it, stop.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e ".[onnx]" scikit-learn onnx
export PATH="$PWD/.venv/bin:$PATH"
export KILN_HOME="${KILN_HOME:-$(mktemp -d)}"

cd examples/iris-onnx
python build_model.py
kiln serve --port "${PORT:-8080}" --management-port "${MANAGEMENT_PORT:-8081}" --metrics-port "${METRICS_PORT:-8082}" 2>"$KILN_HOME/serve.log" &   # request logs go to stderr
server=$!
trap 'kill -INT $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do [ -f "$KILN_HOME/serve.json" ] && break; sleep 0.1; done
url=$(python -c "import json,os;print(json.load(open(os.path.join(os.environ['KILN_HOME'],'serve.json')))['url'])")

echo
echo "\$ curl -X POST $url/iris -H 'Content-Type: application/json' -d @sample.json"
if command -v curl >/dev/null; then
  curl -s -X POST "$url/iris" -H 'Content-Type: application/json' -d @sample.json; echo
fi
echo "\$ kiln predict iris sample-batch.json"
kiln predict iris sample-batch.json
