#!/usr/bin/env python3
"""Reference quantization by llama.cpp itself, for graft's `graft export gguf --quant` (weights::quantize).

Writes tests/fixtures/gguf_quantize/cases.json with two parts:

- `legacy`: one input of 12 rows of 32 float32 values (8 hand-made edge blocks, then formula data for the tensor
  name `legacy`; stored as big-endian f32 bit patterns) and, for Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0, the bytes
  `gguf.quants.quantize` (gguf 0.17.1) gives for it; gguf-py's quantizers are bit-exact with ggml's
  `quantize_row_*_ref`. F16 and BF16 quantize the input with `float_extra` appended (infinities, range edges, ties,
  subnormals), BF16 also with `bf16_nan` (NaNs). F16 there is numpy's conversion, hence no NaN in its input (ggml
  writes every NaN as 0x7E00 | sign, numpy keeps payload bits; graft's unit tests cover ggml's rule).
- `models`: two tiny f32 llama GGUFs written with gguf-py's GGUFWriter and quantized by llama.cpp's own
  `llama_model_quantize` (llama-cpp-python, which builds the llama.cpp it vendors) to every file type graft writes
  (f32, f16, bf16, q8_0, q4_0, q4_k_m, q5_k_m, q6_k; `file_types`), and to q2_k and q3_k_m (`extra_file_types`,
  for their Q2_K / Q3_K tensors), default parameters, no imatrix. Model `a`: 8 layers (so
  `use_more_bits` splits attn_v / ffn_down), hidden 256, ffn 512, 4 heads / 2 kv heads, vocab 256, tied embeddings (no
  output.weight). Model `b`: 4 layers, hidden 64 (every K-quant falls back to a 32-block type), ffn 80 (ffn_down rows
  of 80 fit no block: F16), 4 / 2 heads, vocab 256, its own output.weight. Per model: `facts`, the input tensors
  (`[name, dims]`, dims innermost first, in file order), per file type the `general.file_type` llama.cpp wrote and
  the type it chose for every tensor (a list in the order of `tensors`), and per distinct (tensor, type) the
  FNV-1a-64 of the tensor's bytes and the hex of its first block (first 16 bytes for F32/F16/BF16).

Tensor values (both parts' formula data) are exactly reproducible in Rust: for a tensor named `name` with `n`
values in GGUF order (row-major, rows of dims[0]), value `i` (0-based) is
    z = splitmix64_mix(fnv1a64(name) + (i + 1) * 0x9E3779B97F4A7C15)        (u64, wrapping)
    v = ((z >> 40) - 2^23) * 2^-27                                          (|v| < 1/16, exact in f32)
    v *= 16 if z & 0xFF == 0                                                (outliers, ~1 in 256)
with splitmix64_mix(z) = z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27; z *= 0x94D049BB133111EB; z ^ (z >> 31).
Then, for tensors of at least 3 rows: the first 32 values of row 1 are 0 (an all-zero sub-block) and the first 16 of
row 2 are 1/32 (a constant, positive sub-block).

Deterministic; < 200 KB. ~10 s once llama-cpp-python is built (its source build takes 10-20 min).

Regenerate (venv outside the repo, PyPI only):

    python3 -m venv /work/pyref-gguf
    /work/pyref-gguf/bin/pip install numpy gguf==0.17.1 llama-cpp-python
    /work/pyref-gguf/bin/python scripts/gen_gguf_quantize_fixture.py
"""

import ctypes
import json
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import llama_cpp
import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFWriter
from gguf import GGMLQuantizationType as T
from gguf.quants import quantize

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "gguf_quantize" / "cases.json"

GAMMA = 0x9E3779B97F4A7C15
M64 = (1 << 64) - 1

# graft's file types -> llama_ftype.
FTYPES = {
    "f32": llama_cpp.LLAMA_FTYPE_ALL_F32,
    "f16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16,
    "bf16": llama_cpp.LLAMA_FTYPE_MOSTLY_BF16,
    "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
    "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "q5_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
    "q6_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K,
}

# Quantized only for their tensors' bytes (graft's quantize supports Q2_K and Q3_K; `graft export` does not offer
# these file types): Q2_K brings Q2_K and Q3_K tensors, Q3_K_M Q3_K, Q4_K and Q5_K.
EXTRA_FTYPES = {
    "q2_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q2_K,
    "q3_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q3_K_M,
}

MODELS = {
    "a": dict(n_layers=8, hidden=256, ffn=512, n_head=4, n_head_kv=2, vocab=256, tied=True),
    "b": dict(n_layers=4, hidden=64, ffn=80, n_head=4, n_head_kv=2, vocab=256, tied=False),
}

LEGACY = [T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & M64
    return h


def values(name: str, n: int, row: int) -> np.ndarray:
    """The formula data of the module docstring, as float32."""
    with np.errstate(over="ignore"):
        i = np.arange(1, n + 1, dtype=np.uint64)
        z = np.uint64(fnv1a64(name.encode())) + i * np.uint64(GAMMA)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    k = (z >> np.uint64(40)).astype(np.int64) - (1 << 23)
    v = k.astype(np.float32) * np.float32(2.0**-27)
    v[(z & np.uint64(0xFF)) == 0] *= np.float32(16.0)
    if n >= 3 * row:
        v[row : row + 32] = 0.0
        v[2 * row : 2 * row + 16] = np.float32(1.0 / 32.0)
    return v


def legacy_input() -> np.ndarray:
    """12 blocks of 32: edge cases first, then formula data."""
    blocks = [
        np.zeros(32),  # all zero
        np.full(32, -0.75),  # constant, negative
        np.linspace(-1.0, 0.5, 32),  # largest magnitude negative
        np.linspace(-0.25, 1.0, 32),  # largest magnitude positive
        (np.arange(32) - 16) / 8.0,  # values on the Q4_0/Q5_0 rounding ties
        np.where(np.arange(32) % 2 == 0, 1.0, -1.0) * 3.0,  # two values, equal magnitude (first one wins)
        np.linspace(-1e-6, 1e-6, 32),  # f16-subnormal scales
        np.linspace(-7e4, 9e4, 32),  # scales / values beyond the f16 range
    ]
    x = np.concatenate(blocks).astype(np.float32)
    x[6 * 32 + 3] = np.float32(1e-40)  # an f32 subnormal
    return np.concatenate([x, values("legacy", 4 * 32, 32)])


# Appended to the input for F16 and BF16 only: infinities, the f16 range edge, f16/bf16 ties, subnormals.
FLOAT_EXTRA = np.array(
    [np.inf, -np.inf, 65504.0, 65519.0, 65520.0, -1e6, 1e-40, -1e-45, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 1e-8]
    + [1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8],
    dtype=np.float32,
)
# Appended for BF16 only: NaNs (quiet, signalling, negative, with payload), which it keeps and quiets.
BF16_NAN = np.array([0x7FC00000, 0x7F800001, 0xFF812345, 0x7FFFFFFF], dtype=np.uint32).view(np.float32)


def write_model(path: Path, cfg: dict) -> list:
    """The f32 llama GGUF of `cfg`; returns its tensors as [name, dims] in file order."""
    h, ffn, vocab, L = cfg["hidden"], cfg["ffn"], cfg["vocab"], cfg["n_layers"]
    head_dim = h // cfg["n_head"]
    kv = head_dim * cfg["n_head_kv"]
    w = GGUFWriter(str(path), "llama")
    w.add_name("graft-quantize-fixture")
    w.add_block_count(L)
    w.add_context_length(128)
    w.add_embedding_length(h)
    w.add_feed_forward_length(ffn)
    w.add_head_count(cfg["n_head"])
    w.add_head_count_kv(cfg["n_head_kv"])
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_file_type(0)
    # numpy shapes are outermost first: GGUF dims reversed.
    shapes = [("token_embd.weight", (vocab, h))]
    for i in range(L):
        shapes += [
            (f"blk.{i}.attn_norm.weight", (h,)),
            (f"blk.{i}.attn_q.weight", (h, h)),
            (f"blk.{i}.attn_k.weight", (kv, h)),
            (f"blk.{i}.attn_v.weight", (kv, h)),
            (f"blk.{i}.attn_output.weight", (h, h)),
            (f"blk.{i}.ffn_norm.weight", (h,)),
            (f"blk.{i}.ffn_gate.weight", (ffn, h)),
            (f"blk.{i}.ffn_up.weight", (ffn, h)),
            (f"blk.{i}.ffn_down.weight", (h, ffn)),
        ]
    shapes.append(("output_norm.weight", (h,)))
    if not cfg["tied"]:
        shapes.append(("output.weight", (vocab, h)))
    tensors = []
    for name, shape in shapes:
        n = int(np.prod(shape))
        w.add_tensor(name, values(name, n, shape[-1]).reshape(shape))
        tensors.append([name, list(reversed(shape))])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def first_block(ty: T, raw: bytes) -> str:
    size = GGML_QUANT_SIZES[ty][1] if ty not in (T.F32, T.F16, T.BF16) else 16
    return raw[:size].hex()


def quantize_model(src: Path, dst: Path, ftype: int) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize failed ({rc})"


def main() -> None:
    t0 = time.time()
    x = legacy_input()

    def hex32(a: np.ndarray) -> str:
        return a.view(np.uint32).astype(">u4").tobytes().hex()

    legacy = {
        "input_f32_hex": hex32(x),
        "float_extra_f32_hex": hex32(FLOAT_EXTRA),
        "bf16_nan_f32_hex": hex32(BF16_NAN),
        "row_len": 32,
        "outputs": {},
    }
    for ty in LEGACY:
        xi = {T.F16: np.concatenate([x, FLOAT_EXTRA]), T.BF16: np.concatenate([x, FLOAT_EXTRA, BF16_NAN])}.get(ty, x)
        with np.errstate(over="ignore", invalid="ignore"):
            q = quantize(xi.reshape(1, -1) if ty in (T.F16, T.BF16) else xi.reshape(-1, 32), ty)
        legacy["outputs"][ty.name] = np.ascontiguousarray(q).view(np.uint8).tobytes().hex()

    models = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mname, cfg in MODELS.items():
            src = Path(tmp) / f"{mname}-input.gguf"
            tensors = write_model(src, cfg)
            mix, extra, blobs = {}, {}, {}
            for fname, ftype in {**FTYPES, **EXTRA_FTYPES}.items():
                dst = Path(tmp) / f"{mname}-out-{fname}.gguf"
                quantize_model(src, dst, ftype)
                r = GGUFReader(str(dst))
                ft = r.fields["general.file_type"]
                types = {}
                for t in r.tensors:
                    ty = T(t.tensor_type)
                    raw = np.ascontiguousarray(t.data).view(np.uint8).tobytes()
                    types[t.name] = ty.name
                    key = f"{t.name} {ty.name}"
                    entry = [f"{fnv1a64(raw):016x}", first_block(ty, raw)]
                    assert blobs.setdefault(key, entry) == entry, key
                assert set(types) == {n for n, _ in tensors}, mname
                # Types in the order of `tensors` (llama.cpp writes its output sorted by layer, then name).
                rec = {"general.file_type": int(ft.parts[ft.data[0]][0]), "types": [types[n] for n, _ in tensors]}
                (mix if fname in FTYPES else extra)[fname] = rec
                dst.unlink()
            models[mname] = {
                "facts": {"n_layers": cfg["n_layers"], "n_head": cfg["n_head"], "n_head_kv": cfg["n_head_kv"]},
                "config": cfg,
                "tensors": tensors,
                "file_types": mix,
                "extra_file_types": extra,
                "tensor_bytes": dict(sorted(blobs.items())),
            }

    doc = {
        "gguf_py_version": version("gguf"),
        "llama_cpp_python_version": llama_cpp.__version__,
        "legacy": legacy,
        "models": models,
    }
    text = json.dumps(doc, indent=0, separators=(",", ":")) + "\n"
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT}: {len(text)} bytes in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
