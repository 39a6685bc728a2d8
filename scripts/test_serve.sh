#!/usr/bin/env bash
# End-to-end test of `graft serve` with the official `openai` Python SDK: builds graft (release),
# makes a fixture from stories260K (chat template + random PEFT adapters), starts the server on
# a free 127.0.0.1 port, runs tests/serve/test_openai.py with pytest, and stops the server.
# Skips (exit 0, with a message) when ../shared/data is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=test_serve.sh
. scripts/serve_test_env.sh

WORK=$(mktemp -d)
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ]; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

"$VENV/bin/python" tests/serve/make_fixture.py "$SRC" "$WORK/fx"
PORT=$("$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
KEY="sk-graft-test-$RANDOM"
"$BIN" serve --model "$WORK/fx/model" --adapters "$WORK/fx/adapters" --adapter-root "$WORK/fx/spare" \
  --served-model-name stories260k --host 127.0.0.1 --port "$PORT" --api-key "$KEY" \
  >"$WORK/server.log" 2>&1 &
SERVER_PID=$!

URL="http://127.0.0.1:$PORT"
for _ in $(seq 1 300); do
  if "$VENV/bin/python" -c "import urllib.request; urllib.request.urlopen('$URL/health', timeout=2)" 2>/dev/null; then
    break
  fi
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "test_serve.sh: the server exited:"; cat "$WORK/server.log"; exit 1
  fi
  sleep 0.1
done

status=0
GRAFT_SERVE_URL="$URL" GRAFT_API_KEY="$KEY" GRAFT_BIN="$BIN" GRAFT_FIXTURE="$WORK/fx" \
  timeout 300 "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/serve/test_openai.py || status=$?
if [ "$status" -ne 0 ]; then
  echo "--- server log ---"; tail -50 "$WORK/server.log"
fi
exit "$status"
