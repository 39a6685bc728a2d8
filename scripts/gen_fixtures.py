#!/usr/bin/env python3
"""Generate the golden engine fixtures in ``tests/fixtures/engine/`` from the reference stack.

Each fixture is a tiny, randomly initialised model of a real architecture (built from transformers'
own config classes, float32, ``attn_implementation="eager"``), a packed batch of three sequences, and
the reference logits / log-probs / loss / gradients computed by transformers (full fine-tuning) and
by PEFT (LoRA). The Rust engine's tests load these and compare. The format is described in
``tests/fixtures/engine/README.md``.

How to regenerate
-----------------
    python3 -m venv /work/pyref                       # any path; CPU-only torch is enough
    /work/pyref/bin/pip install -r scripts/requirements-ref.txt \
        --extra-index-url https://download.pytorch.org/whl/cpu
    /work/pyref/bin/python scripts/gen_fixtures.py    # writes tests/fixtures/engine/
    # options: --out DIR, --only CASE[,CASE], --threads N

The output is deterministic for a given set of package versions (fixed seeds, one CPU thread): the
script is re-runnable and the diff should be empty unless the reference stack changed.

Numerics: weights are sampled and saved in float32; the reference itself is computed with the model
cast to float64 (exact upcast of the float32 weights), then stored as float32. transformers still
rounds a few intermediates to float32 inside an f64 model (RMSNorm computes in float32; RoPE cos/sin
come from a float32 ``inv_freq``), which costs ~1e-7 relative, far below the test tolerances. The
float32 run is also done and its deviation from the float64 one is recorded in reference.json as a
yardstick for what an f32 engine can reach.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import peft
import safetensors
import torch
import torch.nn.functional as F
import transformers
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "tests" / "fixtures" / "engine"
IGNORE = -100
ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------
# Each case: config class + model class + config kwargs, sequence lengths of the packed batch,
# the number of leading targets masked per sequence (the "prompt"), and the LoRA subcases.
CASES = [
    dict(
        name="llama_tied_gqa",
        config_cls=LlamaConfig,
        model_cls=LlamaForCausalLM,
        config=dict(
            vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-5, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
        lengths=[7, 12, 9],
        lora=[
            dict(subdir="lora", targets=ALL_TARGETS, rslora=False),
            dict(subdir="lora_qv", targets=["q_proj", "v_proj"], rslora=False),
        ],
    ),
    dict(
        name="llama3_scaled_untied",
        config_cls=LlamaConfig,
        model_cls=LlamaForCausalLM,
        config=dict(
            vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
            rms_norm_eps=1e-5, tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
        lengths=[7, 12, 9],
        lora=[dict(subdir="lora", targets=ALL_TARGETS, rslora=True)],
    ),
    dict(
        name="mistral_sliding",
        config_cls=MistralConfig,
        model_cls=MistralForCausalLM,
        config=dict(
            vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=5,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
        lengths=[9, 13, 11],
        lora=[dict(subdir="lora", targets=ALL_TARGETS, rslora=False)],
    ),
    dict(
        name="qwen2_bias",
        config_cls=Qwen2Config,
        model_cls=Qwen2ForCausalLM,
        config=dict(
            vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-6, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
        lengths=[7, 12, 9],
        lora=[dict(subdir="lora", targets=ALL_TARGETS, rslora=False)],
    ),
    dict(
        name="qwen3_qknorm",
        config_cls=Qwen3Config,
        model_cls=Qwen3ForCausalLM,
        config=dict(
            vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
        lengths=[7, 12, 9],
        lora=[dict(subdir="lora", targets=ALL_TARGETS, rslora=True)],
    ),
]
PROMPT_MASK = 3  # the first PROMPT_MASK targets of every sequence are -100
MID_MASK = (6, 7)  # ... and these targets (sequence-local indices) of the second sequence


# ----------------------------------------------------------------------------------------------
# Model construction and randomisation
# ----------------------------------------------------------------------------------------------
def build_model(case: dict) -> torch.nn.Module:
    """Instantiate the case's architecture from its transformers config class, float32, eager."""
    config = case["config_cls"](**case["config"])
    model = case["model_cls"]._from_config(config, attn_implementation="eager", dtype=torch.float32)
    model.eval()  # no dropout anywhere (all dropout probs are 0 anyway)
    return model


def init_std(name: str, shape: torch.Size) -> float:
    """Standard deviation used for a (non-norm, non-bias) weight: ~0.08–0.15, larger for q/k so
    that attention is far from uniform and masking errors show up in the logits."""
    if "q_proj" in name or "k_proj" in name:
        return 0.14
    if "embed_tokens" in name or "lm_head" in name:
        return 0.1
    return 0.08


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter with seeded random values.

    RMSNorm weights (incl. Qwen3 q_norm/k_norm) are 1 + N(0, 0.1²) (q/k norms 1 + N(0, 0.25²) so they
    are clearly non-unit); biases N(0, 0.1²); all other weights N(0, std²) per `init_std`.
    Parameters are visited in `named_parameters()` order (tied weights once).
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if name.endswith("norm.weight"):
            scale = 0.25 if ("q_norm" in name or "k_norm" in name) else 0.1
            p.copy_(1.0 + scale * noise)
        elif name.endswith(".bias"):
            p.copy_(0.1 * noise)
        else:
            p.copy_(init_std(name, p.shape) * noise)


# ----------------------------------------------------------------------------------------------
# Batch
# ----------------------------------------------------------------------------------------------
def make_batch(lengths: list[int], vocab: int, seed: int) -> dict:
    """A packed batch: sequences concatenated, positions restarting at 0, sequence ids, and
    next-token targets with -100 at each sequence's last token, its first PROMPT_MASK targets, and
    (second sequence only) the MID_MASK targets."""
    gen = torch.Generator().manual_seed(seed)
    input_ids, positions, seq_ids, targets = [], [], [], []
    for s, n in enumerate(lengths):
        ids = torch.randint(0, vocab, (n,), generator=gen).tolist()
        input_ids += ids
        positions += list(range(n))
        seq_ids += [s] * n
        tgt = ids[1:] + [IGNORE]
        for i in range(min(PROMPT_MASK, n)):
            tgt[i] = IGNORE
        if s == 1:  # a masked span in the middle too (e.g. a user turn between assistant turns)
            for i in MID_MASK:
                tgt[i] = IGNORE
        targets += tgt
    return {"input_ids": input_ids, "positions": positions, "seq_ids": seq_ids, "targets": targets}


def split_sequences(batch: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split a packed batch back into (input_ids[1, L], position_ids[1, L]) per sequence."""
    out, start = [], 0
    ids, pos, sid = batch["input_ids"], batch["positions"], batch["seq_ids"]
    while start < len(ids):
        end = start
        while end < len(ids) and sid[end] == sid[start]:
            end += 1
        out.append((torch.tensor([ids[start:end]]), torch.tensor([pos[start:end]])))
        start = end
    return out


# ----------------------------------------------------------------------------------------------
# Reference computation
# ----------------------------------------------------------------------------------------------
def run_reference(model: torch.nn.Module, batch: dict) -> dict:
    """Forward each sequence separately (= isolated attention over the packed batch), concatenate
    the logits, compute loss = sum CE over non-ignored targets / their count, and backprop.

    Returns logits [T, V], logprobs [T] (0 at ignored targets), loss (0-dim) and n_trained;
    gradients are left in the parameters' .grad.
    """
    model.zero_grad(set_to_none=True)
    logits = torch.cat(
        [model(input_ids=ids, position_ids=pos, use_cache=False).logits[0] for ids, pos in split_sequences(batch)]
    )
    targets = torch.tensor(batch["targets"])
    valid = targets != IGNORE
    n = int(valid.sum())
    loss = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum") / n
    loss.backward()
    logp = torch.log_softmax(logits.detach(), dim=-1)
    logprobs = torch.where(valid, logp.gather(1, targets.clamp(min=0)[:, None])[:, 0], torch.zeros((), dtype=logp.dtype))
    return {"logits": logits.detach(), "logprobs": logprobs, "loss": loss.detach(), "n_trained": n}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative norm error |a - b| / |b| (in float64)."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def versions() -> dict:
    """Versions of the reference stack, recorded in every reference.json."""
    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def write_reference(out_dir: Path, ref64: dict, ref32: dict, grads: dict, extra: dict) -> None:
    """Write reference.safetensors (float32) and reference.json for one (sub)case."""
    tensors = {
        "logits": ref64["logits"].float().contiguous(),
        "logprobs": ref64["logprobs"].float().contiguous(),
        "loss": ref64["loss"].float().reshape(1).contiguous(),
    }
    for k, g in grads.items():
        tensors[f"grad.{k}"] = g.float().contiguous()
    save_file(tensors, str(out_dir / "reference.safetensors"), metadata={"format": "pt"})
    meta = {
        "loss": float(ref64["loss"]),
        "num_trained": ref64["n_trained"],
        **versions(),
        "computed_in": "float64 (weights are the float32 values, upcast); stored as float32",
        "f32_vs_f64": {
            "loss_abs": abs(float(ref32["loss"]) - float(ref64["loss"])),
            "logits_rel_norm": rel_err(ref32["logits"], ref64["logits"]),
            "logits_max_abs": float((ref32["logits"].double() - ref64["logits"]).abs().max()),
            **({"grads_max_rel_norm": extra.pop("grads_max_rel_norm")} if "grads_max_rel_norm" in extra else {}),
        },
        **extra,
    }
    (out_dir / "reference.json").write_text(json.dumps(meta, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------
# Sanity checks of transformers semantics that the README documents
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def check_sliding_window_semantics(case: dict) -> None:
    """Empirically confirm that, with sliding_window=W, a query at position q sees keys q-W+1..q
    (W keys including itself): with ONE layer, changing token q-W must not change logits at q, and
    changing token q-W+1 must."""
    cfg = dict(case["config"], num_hidden_layers=1)
    model = build_model(dict(case, config=cfg)).double()
    randomise(model, 1234)
    W, L = cfg["sliding_window"], cfg["sliding_window"] + 4
    ids = torch.randint(0, cfg["vocab_size"], (1, L), generator=torch.Generator().manual_seed(5))
    q = L - 1
    base = model(input_ids=ids, use_cache=False).logits[0, q]
    for k, must_change in [(q - W, False), (q - W + 1, True)]:
        ids2 = ids.clone()
        ids2[0, k] = (ids2[0, k] + 1) % cfg["vocab_size"]
        changed = (model(input_ids=ids2, use_cache=False).logits[0, q] - base).abs().max().item() > 1e-9
        assert changed == must_change, f"sliding-window semantics differ from README at key {k}"
    print(f"  sliding window check ok: query q sees keys q-{W - 1}..q", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# Case generation
# ----------------------------------------------------------------------------------------------
def gen_full(case: dict, case_dir: Path, seed: int) -> tuple[torch.nn.Module, dict]:
    """Build, randomise and save the base model; write batch.json and the full-FT reference."""
    model = build_model(case)
    randomise(model, seed)
    model.save_pretrained(str(case_dir))
    for extra in ("generation_config.json",):
        (case_dir / extra).unlink(missing_ok=True)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}

    batch = make_batch(case["lengths"], case["config"]["vocab_size"], seed + 1)
    (case_dir / "batch.json").write_text(json.dumps(batch) + "\n")

    # float32 run (yardstick) then float64 run (the reference).
    ref32 = run_reference(model, batch)
    grads32 = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model64 = copy.deepcopy(model).double()
    ref64 = run_reference(model64, batch)
    grads = {n: p.grad.detach().clone() for n, p in model64.named_parameters()}

    saved_keys = set(load_file(str(case_dir / "model.safetensors")).keys())
    missing = set(grads) - saved_keys
    assert not missing, f"grad names not in model.safetensors: {missing}"
    for n, g in grads.items():
        assert g.abs().max() > 0, f"zero gradient for {n}"
    extra = {
        "num_trainable_params": sum(g.numel() for g in grads.values()),
        "tied_note": "tied embeddings: grad.model.embed_tokens.weight includes the lm_head contribution"
        if case["config"].get("tie_word_embeddings") else None,
        "grads_max_rel_norm": max(rel_err(grads32[n], grads[n]) for n in grads),
    }
    if extra["tied_note"] is None:
        del extra["tied_note"]
    write_reference(case_dir, ref64, ref32, grads, extra)
    print(f"  full: loss={float(ref64['loss']):.6f} n={ref64['n_trained']} "
          f"logit std={float(ref64['logits'].std()):.3f} params={extra['num_trainable_params']}", file=sys.stderr)
    return model, base_state


def peft_saved_key(live_name: str, adapter_name: str = "default") -> str:
    """Map a live PEFT parameter name (`...q_proj.lora_A.default.weight`) to the key PEFT writes
    to adapter_model.safetensors (`...q_proj.lora_A.weight`)."""
    return live_name.replace(f".{adapter_name}.", ".")


@torch.no_grad()
def randomise_lora(model: torch.nn.Module, seed: int) -> None:
    """Re-initialise all lora_A (N(0, 0.1²)) and lora_B (N(0, 0.05²)) weights with a seeded generator
    (PEFT's zero-initialised B would make every lora_A gradient zero)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_A" in name:
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        elif "lora_B" in name:
            p.copy_(0.05 * torch.randn(p.shape, generator=gen))


def gen_lora(case: dict, case_dir: Path, base_state: dict, sub: dict, seed: int) -> None:
    """LoRA subcase: fresh copy of the base model, PEFT-wrapped, random A/B, adapter saved in
    PEFT's format, reference logits/loss and lora grads keyed by the saved adapter key names."""
    out = case_dir / sub["subdir"]
    out.mkdir(parents=True, exist_ok=True)
    base = build_model(case)
    base.load_state_dict(base_state)
    lcfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=list(sub["targets"]), lora_dropout=0.0,
        use_rslora=sub["rslora"], bias="none", task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lcfg)
    model.eval()
    randomise_lora(model, seed)
    model.save_pretrained(str(out / "adapter"))
    (out / "adapter" / "README.md").unlink(missing_ok=True)  # PEFT's model-card boilerplate
    # PEFT stores target_modules as a set: its JSON order varies run to run. Sort it (deterministic).
    cfg_path = out / "adapter" / "adapter_config.json"
    acfg = json.loads(cfg_path.read_text())
    acfg["target_modules"] = sorted(acfg["target_modules"])
    cfg_path.write_text(json.dumps(acfg, indent=2, sort_keys=True) + "\n")

    batch = json.loads((case_dir / "batch.json").read_text())
    ref32 = run_reference(model, batch)
    grads32 = {peft_saved_key(n): p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model64 = copy.deepcopy(model).double()
    ref64 = run_reference(model64, batch)
    grads = {peft_saved_key(n): p.grad.detach().clone() for n, p in model64.named_parameters() if p.requires_grad}

    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert set(saved) == set(grads), f"adapter keys {sorted(set(saved) ^ set(grads))[:4]} mismatch"
    assert set(get_peft_model_state_dict(model)) == set(saved)
    for n, g in grads.items():
        assert g.abs().max() > 0, f"zero gradient for {n}"
    # Base weights are frozen: no grads for them.
    assert all(not p.requires_grad for n, p in model64.named_parameters() if "lora_" not in n)
    scale = lcfg.lora_alpha / (math.sqrt(lcfg.r) if lcfg.use_rslora else lcfg.r)
    extra = {
        "num_trainable_params": sum(g.numel() for g in grads.values()),
        "lora": {"r": lcfg.r, "alpha": lcfg.lora_alpha, "use_rslora": lcfg.use_rslora,
                 "scale": scale, "target_modules": list(sub["targets"])},
        "grads_max_rel_norm": max(rel_err(grads32[n], grads[n]) for n in grads),
    }
    write_reference(out, ref64, ref32, grads, extra)
    print(f"  {sub['subdir']}: loss={float(ref64['loss']):.6f} targets={sub['targets']} "
          f"rslora={sub['rslora']} scale={scale:.3f} lora params={extra['num_trainable_params']}", file=sys.stderr)


def main() -> None:
    """Parse arguments and generate all (or the selected) cases."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    ap.add_argument("--only", default="", help="comma-separated case names to (re)generate")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps results bit-reproducible)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    only = {s for s in args.only.split(",") if s}
    args.out.mkdir(parents=True, exist_ok=True)
    for i, case in enumerate(CASES):
        if only and case["name"] not in only:
            continue
        seed = 1000 * (i + 1)
        case_dir = args.out / case["name"]
        if case_dir.exists():
            shutil.rmtree(case_dir)
        case_dir.mkdir(parents=True)
        print(f"[{case['name']}]", file=sys.stderr)
        if case["config"].get("sliding_window"):
            check_sliding_window_semantics(case)
        _, base_state = gen_full(case, case_dir, seed)
        for j, sub in enumerate(case["lora"]):
            gen_lora(case, case_dir, base_state, sub, seed + 100 + j)
    total = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"total fixture size: {total / 1e6:.2f} MB", file=sys.stderr)


if __name__ == "__main__":
    main()
