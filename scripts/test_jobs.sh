#!/usr/bin/env bash
# End-to-end test of the fine-tuning API (`graft serve --jobs`) with the official `openai` Python
# SDK: builds graft (release), makes the stories260K fixture (tests/serve/make_fixture.py), and
# runs tests/serve/test_jobs.py, which starts the server itself (it kills it with SIGKILL mid-job
# and starts it again on the same state directory). Skips (exit 0, with a message) when
# ../shared/data is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=test_jobs.sh
. scripts/serve_test_env.sh

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$VENV/bin/python" tests/serve/make_fixture.py "$SRC" "$WORK/fx"
GRAFT_BIN="$BIN" GRAFT_FIXTURE="$WORK/fx" \
  timeout 900 "$VENV/bin/python" -m pytest -q -p no:cacheprovider -s tests/serve/test_jobs.py "$@"
