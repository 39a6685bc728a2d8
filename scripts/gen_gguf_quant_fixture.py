#!/usr/bin/env python3
"""Reference dequantization of GGUF block types by llama.cpp's own gguf-py (`gguf.quants`), for graft's loaders.

Writes tests/fixtures/gguf_quants/cases.json: for Q4_0 and Q4_1, 4 blocks (128 values) of seeded normal data
quantized by `gguf.quants.quantize` (bit-exact with ggml's reference quantizers) as raw bytes (hex), and the values
`gguf.quants.dequantize` gives back (float32). graft's dequantizer must reproduce them exactly. Deterministic, < 10 KB.

Regenerate (venv outside the repo, PyPI only):

    python3 -m venv /work/pyref-trl
    /work/pyref-trl/bin/pip install --quiet numpy gguf==0.17.1
    /work/pyref-trl/bin/python scripts/gen_gguf_quant_fixture.py
"""

import json
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "gguf_quants" / "cases.json"


def main() -> None:
    rng = np.random.default_rng(20261202)
    cases = []
    for ty in (T.Q4_0, T.Q4_1):
        x = (rng.standard_normal((1, 128)) * 0.05 + 0.01).astype(np.float32)
        q = quantize(x, ty)
        back = dequantize(q, ty).astype(np.float32).reshape(-1)
        cases.append(
            {
                "type": ty.name,
                "ggml_type": int(ty),
                "bytes_hex": q.tobytes().hex(),
                "values": [float(v) for v in back],
            }
        )
    OUT.write_text(json.dumps({"gguf_py_version": gguf.__version__ if hasattr(gguf, "__version__") else "0.17.1", "cases": cases}, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
