#!/usr/bin/env python3
"""Compute reference logits for a token sequence with transformers (+ PEFT), as JSON.

Used by graft's tests to check that graft-written PEFT-format adapters and merged model exports load
and behave identically in the reference stack.

    # base model + LoRA adapter directory (adapter_config.json + adapter_model.safetensors)
    python scripts/check_peft_adapter.py --base MODEL_DIR --adapter ADAPTER_DIR --ids 1,2,3 --out logits.json
    # a plain (e.g. merged) transformers model directory
    python scripts/check_peft_adapter.py --merged MODEL_DIR --ids 1,2,3 --out logits.json

Output: a JSON list of T rows, each a list of V floats (the float32 logits for every input position;
one sequence, positions 0..T-1). With `--out -` the JSON goes to stdout. Requires the versions in
scripts/requirements-ref.txt; runs on CPU, float32, eager attention.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from transformers import AutoModelForCausalLM


def load_model(args: argparse.Namespace) -> torch.nn.Module:
    """Load either base + PEFT adapter, or a plain model directory, in float32 eager mode."""
    model_dir = args.merged if args.merged else args.base
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    model.eval()
    return model


def parse_ids(text: str) -> list[int]:
    """Parse a comma-separated list of token ids ("1,2,3")."""
    ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    if not ids:
        raise argparse.ArgumentTypeError("--ids is empty")
    return ids


@torch.no_grad()
def logits_for(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """Logits [T, V] for one sequence of token ids."""
    input_ids = torch.tensor([ids])
    return model(input_ids=input_ids, use_cache=False).logits[0].float()


def main() -> None:
    """Parse arguments, run the model, write the logits JSON."""
    ap = argparse.ArgumentParser(description="Write transformers/PEFT logits for token ids as JSON.")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--base", help="base transformers model directory (use with --adapter)")
    src.add_argument("--merged", help="plain transformers model directory (e.g. a merged export)")
    ap.add_argument("--adapter", help="PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")
    ap.add_argument("--ids", required=True, type=parse_ids, help="comma-separated token ids, e.g. 1,2,3")
    ap.add_argument("--out", required=True, help="output JSON path ([T][V] logits), '-' for stdout")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args()
    if args.merged and args.adapter:
        ap.error("--adapter goes with --base, not --merged")

    torch.set_num_threads(args.threads)
    model = load_model(args)
    logits = logits_for(model, args.ids).tolist()
    text = json.dumps(logits)
    if args.out == "-":
        sys.stdout.write(text + "\n")
    else:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(f"wrote logits [{len(logits)}][{len(logits[0])}]", file=sys.stderr)


if __name__ == "__main__":
    main()
