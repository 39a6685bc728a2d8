#!/usr/bin/env python3
"""Greedy tokens from llama.cpp itself (through llama-cpp-python, built from source from PyPI) for a GGUF model, with an
optional LoRA GGUF — the peer side of graft's GGUF round-trip test (`crates/graft/tests/gguf_llamacpp.rs`).

    python scripts/llamacpp_greedy.py MODEL.gguf [--lora ADAPTER.gguf] --ids 1,2,3 --max-tokens 24
    python scripts/llamacpp_greedy.py MODEL.gguf --tokenize "some text"

Prints one JSON object: {"ids": [...]} (the greedy continuation of --ids, stopping at an end-of-generation token) or
{"prompt_ids": [...]} (llama.cpp's tokenization of the text, special tokens parsed, BOS as the model's metadata says).

Install (venv outside the repo; the build takes ~20 min on 2 cores, then pip's wheel cache makes it instant):

    python3 -m venv /work/pyref-gguf
    /work/pyref-gguf/bin/pip install numpy gguf==0.17.1 llama-cpp-python==0.3.36
"""

import argparse
import json
import sys

import llama_cpp


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--lora")
    ap.add_argument("--ids")
    ap.add_argument("--tokenize")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    llm = llama_cpp.Llama(
        model_path=a.model,
        lora_path=a.lora,
        n_ctx=1024,
        n_threads=a.threads,
        n_batch=512,
        # An f32 KV cache (llama.cpp's default is f16), so F32/F16/BF16 files can match exactly.
        type_k=0,
        type_v=0,
        verbose=False,
    )
    if a.tokenize is not None:
        ids = llm.tokenize(a.tokenize.encode(), add_bos=True, special=True)
        print(json.dumps({"prompt_ids": ids}))
        return
    prompt = [int(x) for x in a.ids.split(",")]
    out = []
    for tok in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, tok) or len(out) >= a.max_tokens:
            break
        out.append(tok)
    print(json.dumps({"ids": out}))


if __name__ == "__main__":
    sys.exit(main())
