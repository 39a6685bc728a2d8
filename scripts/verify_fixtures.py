#!/usr/bin/env python3
"""Check the engine fixtures against an independent, from-the-README implementation.

A minimal packed decoder written only from `tests/fixtures/engine/README.md` (no transformers code):
one pass over the whole packed batch, attention masked by `seq_ids` (+ sliding window), RoPE in the
rotate_half layout with restarting positions, llama3 frequency scaling, GQA, Qwen2 biases, Qwen3
q/k-norm, LoRA (scale alpha/r or alpha/sqrt(r)). It recomputes logits, loss and all gradients in
float64 with torch autograd and compares them with each `reference.safetensors`. It is what the Rust
engine has to do, so a pass here means the README describes the fixtures completely.

    /work/pyref/bin/python scripts/verify_fixtures.py [--dir tests/fixtures/engine]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent


def rope_inv_freq(cfg: dict, head_dim: int) -> torch.Tensor:
    """inv_freq[i] = theta^(-2i/d), with llama3 scaling if configured."""
    rp = cfg.get("rope_parameters") or {}
    theta = rp.get("rope_theta", cfg.get("rope_theta", 10000.0))
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if rp.get("rope_type") == "llama3":
        f, lo, hi, om = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"], rp["original_max_position_embeddings"]
        wl = 2 * math.pi / inv
        smooth = (om / wl - lo) / (hi - lo)
        mid = (1 - smooth) * inv / f + smooth * inv
        inv = torch.where(wl > om / lo, inv / f, torch.where(wl < om / hi, inv, mid))
    return inv


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim."""
    return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rope(x: torch.Tensor, pos: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """x [T, H, d]; HF rotate_half layout (dim j paired with j + d/2)."""
    emb = torch.cat([pos[:, None] * inv, pos[:, None] * inv], -1)[:, None, :]
    d = x.shape[-1] // 2
    rot = torch.cat([-x[..., d:], x[..., :d]], -1)
    return x * emb.cos() + rot * emb.sin()


def forward(cfg: dict, P: dict, batch: dict, lora: dict | None) -> torch.Tensor:
    """Packed forward → logits [T, V]. P: name → tensor; lora: {module prefix: (A, B, scale)}."""
    ids = torch.tensor(batch["input_ids"])
    pos = torch.tensor(batch["positions"], dtype=torch.float64)
    sid = torch.tensor(batch["seq_ids"])
    T, H, KV = len(ids), cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // H
    eps, inv = cfg["rms_norm_eps"], rope_inv_freq(cfg, hd)
    qi, ki = torch.arange(T)[:, None], torch.arange(T)[None, :]
    mask = (ki <= qi) & (sid[:, None] == sid[None, :])
    if cfg.get("sliding_window"):
        mask &= ki > qi - cfg["sliding_window"]

    def lin(x, name):
        y = x @ P[name + ".weight"].T
        if name + ".bias" in P:
            y = y + P[name + ".bias"]
        if lora and name in lora:
            A, B, s = lora[name]
            y = y + s * (x @ A.T) @ B.T
        return y

    x = P["model.embed_tokens.weight"][ids]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        h = rms(x, P[p + "input_layernorm.weight"], eps)
        q = lin(h, p + "self_attn.q_proj").view(T, H, hd)
        k = lin(h, p + "self_attn.k_proj").view(T, KV, hd)
        v = lin(h, p + "self_attn.v_proj").view(T, KV, hd)
        if p + "self_attn.q_norm.weight" in P:
            q, k = rms(q, P[p + "self_attn.q_norm.weight"], eps), rms(k, P[p + "self_attn.k_norm.weight"], eps)
        q, k = rope(q, pos, inv), rope(k, pos, inv)
        k, v = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
        s = torch.einsum("thd,uhd->htu", q, k) / math.sqrt(hd)
        a = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
        o = torch.einsum("htu,uhd->thd", a, v).reshape(T, H * hd)
        x = x + lin(o, p + "self_attn.o_proj")
        h = rms(x, P[p + "post_attention_layernorm.weight"], eps)
        x = x + lin(F.silu(lin(h, p + "mlp.gate_proj")) * lin(h, p + "mlp.up_proj"), p + "mlp.down_proj")
    x = rms(x, P["model.norm.weight"], eps)
    return x @ P.get("lm_head.weight", P["model.embed_tokens.weight"]).T


def check(ref: dict, logits: torch.Tensor, batch: dict, params: dict, tag: str) -> bool:
    """Compute loss/logprobs/grads from logits and compare with a reference dict; print a line."""
    tgt = torch.tensor(batch["targets"])
    valid = tgt != -100
    loss = F.cross_entropy(logits, tgt, ignore_index=-100, reduction="sum") / valid.sum()
    loss.backward()
    lp = torch.where(valid, torch.log_softmax(logits.detach(), -1).gather(1, tgt.clamp(min=0)[:, None])[:, 0], 0.0)
    errs = {
        "logits": float((logits.detach() - ref["logits"]).norm() / ref["logits"].norm()),
        "logprobs": float((lp - ref["logprobs"]).abs().max()),
        "loss": abs(float(loss.detach()) - float(ref["loss"][0])),
        "grads": max(float((p.grad - ref["grad." + n]).norm() / ref["grad." + n].norm()) for n, p in params.items()),
    }
    n_ref = sum(k.startswith("grad.") for k in ref)
    ok = errs["logits"] < 1e-5 and errs["loss"] < 1e-5 and errs["grads"] < 1e-4 and n_ref == len(params)
    print(f"{'ok  ' if ok else 'FAIL'} {tag:40s} " + " ".join(f"{k}={v:.1e}" for k, v in errs.items()))
    return ok


def main() -> None:
    """Verify every case (full FT and each LoRA subdir)."""
    ap = argparse.ArgumentParser(description="Verify engine fixtures with an independent implementation.")
    ap.add_argument("--dir", type=Path, default=REPO / "tests" / "fixtures" / "engine")
    args = ap.parse_args()
    all_ok = True
    for case in sorted(d for d in args.dir.iterdir() if (d / "config.json").exists()):
        cfg = json.loads((case / "config.json").read_text())
        batch = json.loads((case / "batch.json").read_text())
        W = {k: v.double() for k, v in load_file(str(case / "model.safetensors")).items()}
        P = {k: v.clone().requires_grad_(True) for k, v in W.items()}
        all_ok &= check(load_file(str(case / "reference.safetensors")), forward(cfg, P, batch, None), batch, P, case.name)
        for sub in sorted(d for d in case.iterdir() if (d / "adapter").is_dir()):
            acfg = json.loads((sub / "adapter" / "adapter_config.json").read_text())
            r, alpha = acfg["r"], acfg["lora_alpha"]
            scale = alpha / (math.sqrt(r) if acfg["use_rslora"] else r)
            A = {k: v.double().requires_grad_(True) for k, v in load_file(str(sub / "adapter" / "adapter_model.safetensors")).items()}
            lora = {}
            for k in A:
                if ".lora_A." in k:
                    mod = k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                    lora[mod] = (A[k], A[k.replace("lora_A", "lora_B")], scale)
            all_ok &= check(load_file(str(sub / "reference.safetensors")), forward(cfg, W, batch, lora), batch, A, f"{case.name}/{sub.name}")
    sys.exit(0 if all_ok else 1)


if __name__ == "__main__":
    main()
