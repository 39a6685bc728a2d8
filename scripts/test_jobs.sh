#!/usr/bin/env bash
# End-to-end test of the fine-tuning API (`graft serve --jobs`) with the official `openai` Python
# SDK: builds graft (release), makes the stories260K fixture (tests/serve/make_fixture.py), and
# runs tests/serve/test_jobs.py, which starts the server itself (it kills it with SIGKILL mid-job
# and starts it again on the same state directory). Skips (exit 0, with a message) when
# ../shared/data is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
SRC="${GRAFT_SHARED_DATA:-$REPO/../shared/data}/models/stories260K/hf"
if [ ! -f "$SRC/model.safetensors" ]; then
  echo "test_jobs.sh: skipping: $SRC is absent (stories260K lives in ../shared/data)"
  exit 0
fi

VENV="$REPO/.venv-serve"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c 'import openai, pytest, sys; sys.exit(openai.__version__ != "3.51.0")' 2>/dev/null; then
  "$VENV/bin/pip" install -q --disable-pip-version-check openai==3.51.0 pytest==9.2.0
fi

cargo build --release -q -p graft
BIN="${CARGO_TARGET_DIR:-$REPO/target}/release/graft"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$VENV/bin/python" tests/serve/make_fixture.py "$SRC" "$WORK/fx"
GRAFT_BIN="$BIN" GRAFT_FIXTURE="$WORK/fx" \
  timeout 900 "$VENV/bin/python" -m pytest -q -p no:cacheprovider -s tests/serve/test_jobs.py "$@"
