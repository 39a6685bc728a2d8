#!/usr/bin/env bash
# Checks that a graft-written PEFT adapter (and its merged export) gives the same logits in
# transformers + PEFT as in graft (max abs difference ≤ 1e-4).
#
#   scripts/check_graft_vs_peft.sh BASE_MODEL_DIR RUN_DIR [PYTHON]
#
# RUN_DIR is a finished `graft train` LoRA run (holding adapter/). PYTHON must have the versions of
# scripts/requirements-ref.txt (default: $GRAFT_PYTHON or python3).
set -euo pipefail
base=$1; run=$2; py=${3:-${GRAFT_PYTHON:-python3}}
here=$(cd "$(dirname "$0")" && pwd)
graft=${GRAFT_BIN:-$here/../target/release/graft}
ids=1,403,407,261,378,432,383,286,261,376,298
tmp=$(mktemp -d)
"$graft" logits --model "$base" --adapter "$run/adapter" --ids $ids --out "$tmp/graft.json"
"$py" "$here/check_peft_adapter.py" --base "$base" --adapter "$run/adapter" --ids $ids --out "$tmp/peft.json"
"$graft" export merge "$run" --out "$tmp/merged"
"$py" "$here/check_peft_adapter.py" --merged "$tmp/merged" --ids $ids --out "$tmp/merged_hf.json"
"$graft" logits --model "$tmp/merged" --ids $ids --out "$tmp/merged_graft.json"
"$py" - "$tmp" <<'PY'
import json, sys
d = sys.argv[1]
load = lambda n: json.load(open(f"{d}/{n}.json"))
def maxdiff(a, b):
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))
g, p, mh, mg = load("graft"), load("peft"), load("merged_hf"), load("merged_graft")
checks = {"graft adapter vs PEFT": maxdiff(g, p), "merged: transformers vs graft": maxdiff(mh, mg),
          "merged vs adapter": maxdiff(mh, p)}
for k, v in checks.items():
    print(f"{k}: max abs diff {v:.2e}")
sys.exit(0 if all(v <= 1e-4 for v in checks.values()) else 1)
PY
