#!/usr/bin/env python3
"""The llama.cpp side of `graft bench decode`: prompt processing and single-stream greedy decode of one GGUF file with
llama.cpp itself (llama-cpp-python, built from source from PyPI), llama.cpp's defaults otherwise (f16 KV cache).

    python scripts/bench_llamacpp_decode.py MODEL.gguf --ids 5,17,... --tokens 128 --threads 2

Prints one JSON line: prompt_tokens_per_s (prompt length / time to the first new token, sampling included),
decode_tokens_per_s (the remaining tokens over their time), the llama-cpp-python version. Writes no fixture.

Install: python3 -m venv /work/pyref-gguf && /work/pyref-gguf/bin/pip install numpy gguf==0.17.1 llama-cpp-python==0.3.36
"""

import argparse
import json
import time

import llama_cpp


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--ids", required=True)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    ids = [int(x) for x in a.ids.split(",")]
    llm = llama_cpp.Llama(
        model_path=a.model,
        n_ctx=len(ids) + a.tokens + 16,
        n_threads=a.threads,
        n_threads_batch=a.threads,
        n_batch=512,
        verbose=False,
    )
    # Warm-up: page the weights in.
    for i, _ in enumerate(llm.generate(ids[::-1][:16], top_k=1, temp=0.0, reset=True)):
        if i >= 1:
            break
    start = time.perf_counter()
    first = None
    n = 0
    for _ in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        n += 1
        if first is None:
            first = time.perf_counter()
        if n > a.tokens:
            break
    end = time.perf_counter()
    print(
        json.dumps(
            {
                "prompt_tokens_per_s": len(ids) / (first - start),
                "decode_tokens_per_s": (n - 1) / (end - first),
                "llama_cpp_python": llama_cpp.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
