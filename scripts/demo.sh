#!/usr/bin/env bash
# The main job: set up, start the server on the embedded SmolLM2 model, run a demo program against it, stop.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
PORT=${PORT:-30000}
radixflow serve --port "$PORT" --log-level warning &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
    kill -0 $SERVER 2>/dev/null || { echo "server exited during start-up" >&2; exit 1; }
    sleep 0.5
done
python examples/demo_client.py --url "http://127.0.0.1:$PORT"
