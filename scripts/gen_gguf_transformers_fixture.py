#!/usr/bin/env python3
"""Reference logits of Hugging Face transformers on GGUF files, for graft's GGUF reader (weights::gguf).

Writes tests/fixtures/gguf_transformers/: `cases.json` and, for the types graft cannot quantize (IQ4_NL, IQ4_XS),
the GGUF files themselves (`<model>-<TYPE>.gguf`).

Models (`MODELS`), random, tiny, every row length a multiple of 256 so each K-quant applies unchanged:
- `llama`: llama, 2 layers, hidden 256, ffn 512, 4 heads / 2 kv heads, vocab 32, own output.weight (untied),
  rope base 10000, rms eps 1e-5;
- `qwen2`: qwen2, 2 layers, hidden 256, ffn 256, 4 / 2 heads, vocab 32, q/k/v biases, tied embeddings,
  rope base 1e6, rms eps 1e-6;
- `qwen3`: qwen3, 1 layer, hidden 256, ffn 256, 2 / 1 heads (head_dim 128, `attention.key_length` /
  `value_length` written), vocab 32, q/k norms, untied, rope base 1e6. transformers 5.24's GGUF loader maps no
  head_dim for qwen3 (it ignores `key_length`) and keeps Qwen3Config's default 128, right for every released
  Qwen3; a qwen3 GGUF with another head size loads there with a shape error, so the fixture uses 128;
- `llama_iq`: llama, 1 layer, hidden 256, ffn 256, 4 / 1 heads, vocab 32, tied: only for IQ4_NL and IQ4_XS,
  whose files are committed (graft has no quantizer for them), so it is kept small.

Each model is written as an f32 GGUF by gguf-py's GGUFWriter (no tokenizer). Then, per type, llama.cpp's own
`llama_model_quantize` (llama-cpp-python, default parameters, `pure` so the type goes on every 2-D tensor, no
imatrix) quantizes it, and the result is written again by GGUFWriter with the f32 file's metadata (only
`general.file_type` changes), 1-D tensors in f32 and llama.cpp's quantized bytes: the file transformers then reads
with `AutoModelForCausalLM.from_pretrained(dir, gguf_file=name, dtype=float32)` (which dequantizes with gguf-py).
Types: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (models llama, qwen2, qwen3),
IQ4_NL, IQ4_XS (model llama_iq).

`cases.json`: per model its tensors (`[name, dims]`, dims innermost first, in file order) and the metadata
(`[key, type, value]`, type u32 / f32 / str, in file order, `general.file_type` set per case); per case the
model, its `general.file_type`, the type of every tensor, the FNV-1a-64 of the whole file, the file name where it is committed, the token
ids and transformers' float32 logits `[T][V]` (shortest round-trip decimals). For the other cases the Rust test
(crates/graft-model/tests/gguf_transformers.rs) rebuilds the file byte for byte with graft's quantizer (bit-exact
with llama.cpp's) and `write_gguf`, and checks the FNV.

Tensor values are gen_gguf_quantize_fixture.py's splitmix64 formula (see its docstring) for tensor `name`, plus
1.0 for the norm weights (names ending in `norm.weight`).

Deterministic. ~25 s on 2 cores (both venvs installed); 531 KB (cases.json 119 KB, the two IQ files 212 + 200 KB).
transformers needs `accelerate` to load GGUF files. Used: torch 2.15.0 (+cu132 wheel, run on CPU), transformers 5.24.0,
accelerate 1.16.0, gguf 0.17.1, llama-cpp-python 0.3.36.

Regenerate (venvs outside the repo, PyPI only):

    python3 -m venv /work/pyref-gguf
    /work/pyref-gguf/bin/pip install numpy gguf==0.17.1 llama-cpp-python==0.3.36
    python3 -m venv /work/pyref-tf
    /work/pyref-tf/bin/pip install torch==2.15.0 transformers==5.24.0 gguf==0.17.1 numpy accelerate==1.16.0
    /work/pyref-tf/bin/python scripts/gen_gguf_transformers_fixture.py

The llama.cpp step runs in a subprocess under $GRAFT_LLAMACPP_PYTHON (default /work/pyref-gguf/bin/python).
"""

import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf import GGMLQuantizationType as T

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "gguf_transformers"

GAMMA = 0x9E3779B97F4A7C15
M64 = (1 << 64) - 1

MODELS = {
    "llama": dict(arch="llama", n_layers=2, hidden=256, ffn=512, n_head=4, n_head_kv=2, vocab=32, tied=False,
                  theta=10000.0, eps=1e-5),
    "qwen2": dict(arch="qwen2", n_layers=2, hidden=256, ffn=256, n_head=4, n_head_kv=2, vocab=32, tied=True,
                  theta=1e6, eps=1e-6),
    "qwen3": dict(arch="qwen3", n_layers=1, hidden=256, ffn=256, n_head=2, n_head_kv=1, vocab=32, tied=False,
                  theta=1e6, eps=1e-6),
    "llama_iq": dict(arch="llama", n_layers=1, hidden=256, ffn=256, n_head=4, n_head_kv=1, vocab=32, tied=True,
                     theta=10000.0, eps=1e-5),
}

# Type -> llama_ftype (with `pure`, its default type goes on every 2-D tensor).
FTYPES = {
    T.F32: 0, T.F16: 1, T.BF16: 32, T.Q4_0: 2, T.Q4_1: 3, T.Q5_0: 8, T.Q5_1: 9, T.Q8_0: 7,
    T.Q2_K: 10, T.Q3_K: 11, T.Q4_K: 14, T.Q5_K: 16, T.Q6_K: 18, T.IQ4_NL: 25, T.IQ4_XS: 30,
}
COMMITTED = {T.IQ4_NL, T.IQ4_XS}
CASES = [(m, t) for m in ("llama", "qwen2", "qwen3") for t in FTYPES if t not in COMMITTED]
CASES += [("llama_iq", t) for t in (T.IQ4_NL, T.IQ4_XS)]

TOKENS = [1, 17, 5, 31, 20, 2, 9]


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & M64
    return h


def values(name: str, n: int, row: int) -> np.ndarray:
    """gen_gguf_quantize_fixture.py's formula data, + 1 for norm weights."""
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
    if name.endswith("norm.weight"):
        v = v + np.float32(1.0)
    return v


def shapes(cfg: dict) -> list:
    """(name, numpy shape, outermost first) in file order."""
    h, ffn, vocab, L = cfg["hidden"], cfg["ffn"], cfg["vocab"], cfg["n_layers"]
    head_dim = h // cfg["n_head"]
    kv = head_dim * cfg["n_head_kv"]
    out = [("token_embd.weight", (vocab, h))]
    for i in range(L):
        b = f"blk.{i}"
        out.append((f"{b}.attn_norm.weight", (h,)))
        out.append((f"{b}.attn_q.weight", (h, h)))
        if cfg["arch"] == "qwen2":
            out.append((f"{b}.attn_q.bias", (h,)))
        out.append((f"{b}.attn_k.weight", (kv, h)))
        if cfg["arch"] == "qwen2":
            out.append((f"{b}.attn_k.bias", (kv,)))
        out.append((f"{b}.attn_v.weight", (kv, h)))
        if cfg["arch"] == "qwen2":
            out.append((f"{b}.attn_v.bias", (kv,)))
        if cfg["arch"] == "qwen3":
            out.append((f"{b}.attn_q_norm.weight", (head_dim,)))
            out.append((f"{b}.attn_k_norm.weight", (head_dim,)))
        out += [
            (f"{b}.attn_output.weight", (h, h)),
            (f"{b}.ffn_norm.weight", (h,)),
            (f"{b}.ffn_gate.weight", (ffn, h)),
            (f"{b}.ffn_up.weight", (ffn, h)),
            (f"{b}.ffn_down.weight", (h, ffn)),
        ]
    out.append(("output_norm.weight", (h,)))
    if not cfg["tied"]:
        out.append(("output.weight", (vocab, h)))
    return out


def write_model(path: Path, mname: str, cfg: dict, file_type: int, data: dict) -> None:
    """The GGUF of model `cfg` with tensors `data` (name -> (array, raw ggml type or None))."""
    h = cfg["hidden"]
    w = GGUFWriter(str(path), cfg["arch"])
    w.add_name(f"graft-transformers-fixture-{mname}")
    w.add_block_count(cfg["n_layers"])
    w.add_context_length(128)
    w.add_embedding_length(h)
    w.add_feed_forward_length(cfg["ffn"])
    w.add_head_count(cfg["n_head"])
    w.add_head_count_kv(cfg["n_head_kv"])
    w.add_rope_dimension_count(h // cfg["n_head"])
    if cfg["arch"] == "qwen3":
        w.add_key_length(h // cfg["n_head"])
        w.add_value_length(h // cfg["n_head"])
    w.add_rope_freq_base(cfg["theta"])
    w.add_layer_norm_rms_eps(cfg["eps"])
    w.add_vocab_size(cfg["vocab"])
    w.add_file_type(file_type)
    for name, _ in shapes(cfg):
        arr, raw = data[name]
        w.add_tensor(name, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def f32_data(cfg: dict) -> dict:
    return {n: (values(n, int(np.prod(s)), s[-1]).reshape(s), None) for n, s in shapes(cfg)}


def quantize_stage(tmp: Path) -> None:
    """Under llama-cpp-python's venv: every case's GGUF into `tmp`."""
    import llama_cpp

    for mname, cfg in MODELS.items():
        src = tmp / f"{mname}-f32-input.gguf"
        write_model(src, mname, cfg, 0, f32_data(cfg))
    for mname, ty in CASES:
        cfg = MODELS[mname]
        src = tmp / f"{mname}-f32-input.gguf"
        raw = tmp / f"{mname}-{ty.name}-llamacpp.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = FTYPES[ty]
        params.nthread = 2
        params.pure = True
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(raw).encode(), ctypes.byref(params))
        assert rc == 0, f"llama_model_quantize {mname} {ty.name} failed ({rc})"
        r = GGUFReader(str(raw))
        got = {t.name: t for t in r.tensors}
        data = {}
        for name, s in shapes(cfg):
            t = got[name]
            tt = T(t.tensor_type)
            want = ty if len(s) == 2 else T.F32
            assert tt == want, f"{mname} {ty.name}: {name} is {tt.name}"
            if tt == T.F32:
                arr = np.ascontiguousarray(t.data).reshape(s)
                assert np.array_equal(arr.view(np.uint32), values(name, arr.size, s[-1]).reshape(s).view(np.uint32))
                data[name] = (arr, None)
            else:
                data[name] = (np.ascontiguousarray(t.data).view(np.uint8).reshape(s[0], -1), tt)
        write_model(tmp / f"{mname}-{ty.name}.gguf", mname, cfg, FTYPES[ty], data)
        raw.unlink()


def metadata(path: Path) -> list:
    r = GGUFReader(str(path))
    out = []
    for f in r.fields.values():
        if f.name.startswith("GGUF."):
            continue
        ty = f.types[0]
        if ty == GGUFValueType.UINT32:
            out.append([f.name, "u32", int(f.parts[f.data[0]][0])])
        elif ty == GGUFValueType.FLOAT32:
            out.append([f.name, "f32", float(f.parts[f.data[0]][0])])
        elif ty == GGUFValueType.STRING:
            out.append([f.name, "str", bytes(f.parts[f.data[0]]).decode()])
        else:
            raise ValueError(f"{f.name}: unexpected type {ty}")
    return out


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--quantize":
        quantize_stage(Path(sys.argv[2]))
        return
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    t0 = time.time()
    torch.manual_seed(0)
    llama_py = os.environ.get("GRAFT_LLAMACPP_PYTHON", "/work/pyref-gguf/bin/python")
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("*.gguf"):
        old.unlink()
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        subprocess.run([llama_py, __file__, "--quantize", str(tmp)], check=True)
        llama_cpp_version = subprocess.run(
            [llama_py, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
        models = {}
        for mname, cfg in MODELS.items():
            models[mname] = {
                "config": cfg,
                "tensors": [[n, list(reversed(s))] for n, s in shapes(cfg)],
                "metadata": metadata(tmp / f"{mname}-f32-input.gguf"),
            }
        cases = []
        for mname, ty in CASES:
            cfg = MODELS[mname]
            name = f"{mname}-{ty.name}.gguf"
            path = tmp / name
            raw = path.read_bytes()
            r = GGUFReader(str(path))
            types = [T(t.tensor_type).name for t in r.tensors]
            assert [t.name for t in r.tensors] == [n for n, _ in shapes(cfg)]
            model = AutoModelForCausalLM.from_pretrained(
                tmpdir, gguf_file=name, dtype=torch.float32, attn_implementation="eager"
            )
            model.eval()
            assert bool(model.config.tie_word_embeddings) == cfg["tied"], (name, model.config.tie_word_embeddings)
            ids = TOKENS
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0].float().numpy()
            assert logits.shape == (len(ids), cfg["vocab"])
            case = {
                "model": mname,
                "type": ty.name,
                "file_type": FTYPES[ty],
                "types": types,
                "file_fnv": f"{fnv1a64(raw):016x}",
                "file_bytes": len(raw),
                "token_ids": ids,
                # Shortest round-trip decimals of the float32 values.
                "logits": [[float(str(x)) for x in row] for row in logits],
            }
            if ty in COMMITTED:
                (OUT / name).write_bytes(raw)
                case["file"] = name
            cases.append(case)
            print(f"{name}: max |logit| {np.abs(logits).max():.4g}", flush=True)

    doc = {
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "gguf_py_version": version("gguf"),
        "llama_cpp_python_version": llama_cpp_version,
        "models": models,
        "cases": cases,
    }
    # One case per line.
    text = json.dumps({k: v for k, v in doc.items() if k != "cases"}, separators=(",", ":"))[:-1]
    text += ',"cases":[\n' + ",\n".join(json.dumps(c, separators=(",", ":")) for c in cases) + "\n]}"
    (OUT / "cases.json").write_text(text + "\n")
    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"wrote {OUT}: {total} bytes in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
