#!/usr/bin/env python3
"""Reference dequantization of GGUF block types by llama.cpp's own gguf-py (`gguf.quants`), for graft's loaders.

Writes tests/fixtures/gguf_quants/cases.json: one case per block type graft reads, each the raw block bytes (hex) and
the float32 values `gguf.quants.dequantize` gives for them. graft's dequantizer must reproduce them bit for bit.

- Q4_0, Q4_1 (4 blocks each), Q5_0, Q5_1, Q8_0 (2 blocks each): seeded normal data quantized by
  `gguf.quants.quantize` (bit-exact with ggml's reference quantizers).
- Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS (2 super-blocks of 256 each), IQ4_NL (2 blocks): gguf-py cannot quantize
  these, so the blocks are seeded random bytes whose f16 scale fields (`d`, and `dmin` where the type has one) are
  overwritten with small random f16s, so every value is finite: positive for `dmin` and for the `d` of types with a
  minimum, either sign otherwise (as ggml's quantizers produce). Block 0 has `d` (and `dmin`) of magnitude 1e-4 to
  2e-3. Block 1 has a subnormal f16 (5e-6 to 3e-5) as `dmin`, or as `d` in types without a minimum, to cover the
  conversion of subnormal f16s; beside such a `dmin` it has a `d` of 8e-3 to 1.6e-2, so that some `scale * q - min`
  round in float32. (Every product in these formulas is exact in float32, so realistic blocks, with `d` and `dmin`
  of similar size, dequantize exactly and only that final subtraction can round.)

Per case: `type`, `ggml_type`, `bytes_from` (which of the two above), `bytes_hex`, `values`. Values are written as the
shortest decimal that reads back as the same float32; the script checks that the decimal, parsed as a float64 (also
one ulp either side) and rounded to float32, is that float32 again, so the file is exact for any JSON reader that
parses to float64. Deterministic, < 60 KB, ~1 s.

Regenerate (venv outside the repo, PyPI only):

    python3 -m venv /work/pyref-trl
    /work/pyref-trl/bin/pip install --quiet numpy gguf==0.17.1
    /work/pyref-trl/bin/python scripts/gen_gguf_quant_fixture.py
"""

import json
import math
from importlib.metadata import version
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "gguf_quants" / "cases.json"

# Types gguf-py quantizes: (type, blocks).
QUANTIZED = [(T.Q4_0, 4), (T.Q4_1, 4), (T.Q5_0, 2), (T.Q5_1, 2), (T.Q8_0, 2)]

# Types built from random bytes: type -> byte offsets of the f16 `d` and `dmin` (None: no minimum; `d` then has either
# sign) in a block, following the block structs of ggml-common.h.
RANDOM = {
    T.Q2_K: (80, 82),  # scales[16], qs[64], d, dmin
    T.Q3_K: (108, None),  # hmask[32], qs[64], scales[12], d
    T.Q4_K: (0, 2),  # d, dmin, scales[12], qs[128]
    T.Q5_K: (0, 2),  # d, dmin, scales[12], qh[32], qs[128]
    T.Q6_K: (208, None),  # ql[128], qh[64], scales[16], d
    T.IQ4_NL: (0, None),  # d, qs[16]
    T.IQ4_XS: (0, None),  # d, scales_h, scales_l[4], qs[128]
}


def f32_decimal(v: np.float32) -> str:
    """The shortest decimal of `v`, checked to read back as `v` through float64 (± one float64 ulp)."""
    assert np.isfinite(v), v
    s = str(v)
    f = float(s)
    ok = all(
        np.float32(x) == v and math.copysign(1.0, x) == math.copysign(1.0, float(v))
        for x in (math.nextafter(f, -math.inf), f, math.nextafter(f, math.inf))
        if x != 0.0 or v == 0.0
    )
    # Fallback: the exact value (a float32 is exactly a float64), which always reads back.
    return s if ok else repr(float(v))


def case(ty: T, raw: np.ndarray, bytes_from: str) -> dict:
    values = dequantize(raw, ty).astype(np.float32).reshape(-1)
    assert np.isfinite(values).all(), ty.name
    block, size = GGML_QUANT_SIZES[ty]
    assert raw.size * block == values.size * size, ty.name
    return {
        "type": ty.name,
        "ggml_type": int(ty),
        "bytes_from": bytes_from,
        "bytes_hex": raw.tobytes().hex(),
        "values": values,
    }


def main() -> None:
    rng = np.random.default_rng(20261202)
    cases = []
    for ty, blocks in QUANTIZED:
        block, _ = GGML_QUANT_SIZES[ty]
        x = (rng.standard_normal((1, blocks * block)) * 0.05 + 0.01).astype(np.float32)
        cases.append(case(ty, quantize(x, ty).reshape(-1), "gguf.quants.quantize of seeded normal data"))
    for ty, (d_at, dmin_at) in RANDOM.items():
        _, size = GGML_QUANT_SIZES[ty]
        raw = rng.integers(0, 256, size=(2, size), dtype=np.uint8)

        def put(b: int, offset: int, value: float) -> None:
            raw[b, offset : offset + 2] = np.array([value], dtype=np.float16).view(np.uint8)

        if dmin_at is None:
            sign = lambda: rng.choice([-1.0, 1.0])  # noqa: E731
            put(0, d_at, sign() * rng.uniform(1e-4, 2e-3))
            put(1, d_at, sign() * rng.uniform(5e-6, 3e-5))
        else:
            put(0, d_at, rng.uniform(1e-4, 2e-3))
            put(0, dmin_at, rng.uniform(1e-4, 2e-3))
            put(1, d_at, rng.uniform(8e-3, 1.6e-2))
            put(1, dmin_at, rng.uniform(5e-6, 3e-5))
        cases.append(case(ty, raw.reshape(-1), "seeded random bytes, random small f16 scales (block 1: subnormal)"))

    lines = ["{", f' "gguf_py_version": {json.dumps(version("gguf"))},', ' "cases": [']
    for i, c in enumerate(cases):
        lines.append("  {")
        for key in ("type", "ggml_type", "bytes_from", "bytes_hex"):
            lines.append(f"   {json.dumps(key)}: {json.dumps(c[key])},")
        vals = [f32_decimal(v) for v in c["values"]]
        rows = [", ".join(vals[j : j + 16]) for j in range(0, len(vals), 16)]
        lines.append('   "values": [\n    ' + ",\n    ".join(rows) + "\n   ]")
        lines.append("  }" + ("," if i + 1 < len(cases) else ""))
    lines += [" ]", "}"]
    text = "\n".join(lines) + "\n"
    # The file is valid JSON and reads back to exactly the dequantized float32 values.
    back = json.loads(text)
    for c, b in zip(cases, back["cases"]):
        assert (np.array(b["values"], dtype=np.float64).astype(np.float32) == c["values"]).all(), c["type"]
    OUT.write_text(text)
    print(f"wrote {OUT}: {len(cases)} cases, {len(text)} bytes")


if __name__ == "__main__":
    main()
