# Sourced by test_serve.sh and test_jobs.sh (with NAME set to the script's name): from the repo
# root, exits 0 with a message when stories260K (../shared/data) is absent; otherwise sets SRC
# (its HF folder), VENV (.venv-serve with the pinned openai SDK and pytest) and BIN (a release
# build of graft).
REPO=$(pwd)
SRC="${GRAFT_SHARED_DATA:-$REPO/../shared/data}/models/stories260K/hf"
if [ ! -f "$SRC/model.safetensors" ]; then
  echo "$NAME: skipping: $SRC is absent (stories260K lives in ../shared/data)"
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
