#!/usr/bin/env python3
"""PyTorch + transformers + PEFT training-step benchmark: the baseline `graft bench train` compares to.

`graft bench train --shape NAME ...` spawns this script with the same shape and batch and prints the
ratio. It builds the model from a config (random init, nothing downloaded), feeds random token ids
with labels = input ids (standard causal-LM loss, transformers' own shift + mean), and times full
training steps: forward + backward + AdamW step + zero_grad. One warm-up step is not timed.

    python scripts/bench_torch.py --shape smollm2-135m --batch 4 --seq 512 --lora-rank 16 --steps 2
    python scripts/bench_torch.py --shape tiny --full --dtype bf16 --checkpointing
    python scripts/bench_torch.py --shape stories260k --lora-rank 8 --all-configs

Output: progress on stderr; exactly ONE JSON line on stdout:
    {"tokens_per_s": ..., "peak_rss_mb": ..., "step_s": [...], "config": {...}}
with `--all-configs` the best run's numbers plus "runs": [each run's JSON].

Choices (what PyTorch users actually do on CPU):
- `--dtype bf16` = `torch.autocast("cpu", dtype=torch.bfloat16)` around forward + loss, with float32
  master weights, float32 grads and float32 AdamW state (the mixed-precision recipe of HF Trainer
  `bf16=True`). `fp32` = everything float32.
- attention: transformers' default `sdpa` (override with `--attn eager`).
- LoRA: PEFT LoraConfig(r=R, lora_alpha=2R, lora_dropout=0, all 7 linear targets), base frozen.
- `--checkpointing`: `model.gradient_checkpointing_enable(use_reentrant=False)` (works with a frozen
  base + LoRA without enable_input_require_grads).
- tokens/s = batch * seq * steps / sum(timed step seconds).
- peak RSS = `resource.getrusage(RUSAGE_SELF).ru_maxrss` of the process that ran the steps (MB),
  i.e. includes model construction; `--all-configs` runs each config in a fresh subprocess so the
  numbers do not contaminate each other.
Measured numbers are recorded in scripts/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

SHAPES = {
    # name: (model_type, config kwargs)
    "smollm2-135m": ("llama", dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rms_norm_eps=1e-5,
        max_position_embeddings=8192, rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    )),
    "qwen2.5-0.5b": ("qwen2", dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rms_norm_eps=1e-6,
        max_position_embeddings=32768, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )),
    "stories260k": ("llama", dict(
        hidden_size=64, intermediate_size=172, num_hidden_layers=5, num_attention_heads=8,
        num_key_value_heads=4, vocab_size=512, tie_word_embeddings=True, rms_norm_eps=1e-5,
        max_position_embeddings=512, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )),
    "tiny": ("llama", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True, rms_norm_eps=1e-5,
        max_position_embeddings=256, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )),
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def log(msg: str) -> None:
    """Progress output (stderr only; stdout carries the single JSON result line)."""
    print(f"[bench_torch] {msg}", file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def build_model(args: argparse.Namespace):
    """Build the shape's model from its config (random init) and wrap it for LoRA if requested.
    Returns (model, n_trainable, n_total)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, kw = SHAPES[args.shape]
    kw = dict(kw, max_position_embeddings=max(kw["max_position_embeddings"], args.seq))
    config = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=args.attn)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not args.full:
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0,
                          target_modules=LORA_TARGETS, bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, lcfg)
    model.train()
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    return model, n_train, n_total


def run_single(args: argparse.Namespace) -> dict:
    """Run warm-up + timed training steps for one configuration; return the result dict."""
    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    rss_after_import = peak_rss_mb()
    t0 = time.perf_counter()
    model, n_train, n_total = build_model(args)
    log(f"built {args.shape} in {time.perf_counter() - t0:.1f}s: {n_total / 1e6:.2f}M params, "
        f"{n_train / 1e6:.3f}M trainable, threads={torch.get_num_threads()}")
    vocab = SHAPES[args.shape][1]["vocab_size"]
    gen = torch.Generator().manual_seed(args.seed + 1)
    input_ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    bf16 = args.dtype == "bf16"

    def step() -> float:
        """One full training step; returns the loss."""
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    step_s = []
    for i in range(args.steps + 1):
        t = time.perf_counter()
        loss = step()
        dt = time.perf_counter() - t
        if i == 0:
            log(f"warm-up step {dt:.2f}s loss={loss:.4f}")
        else:
            step_s.append(dt)
            log(f"step {i}/{args.steps} {dt:.2f}s loss={loss:.4f} "
                f"({args.batch * args.seq / dt:.1f} tok/s, rss {peak_rss_mb():.0f} MB)")
    tokens = args.batch * args.seq * len(step_s)
    import peft

    return {
        "tokens_per_s": tokens / sum(step_s),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "step_s": [round(s, 4) for s in step_s],
        "config": {
            "shape": args.shape, "batch": args.batch, "seq": args.seq,
            "mode": "full" if args.full else "lora", "lora_rank": None if args.full else args.lora_rank,
            "lora_alpha": None if args.full else 2 * args.lora_rank,
            "dtype": args.dtype,
            "precision": "bf16 autocast, fp32 master weights/grads/AdamW" if bf16 else "fp32",
            "checkpointing": args.checkpointing, "threads": torch.get_num_threads(), "attn": args.attn,
            "rss_after_import_mb": round(rss_after_import, 1), "load_avg_1m": os.getloadavg()[0],
            "steps": len(step_s), "warmup_steps": 1, "params": n_total, "trainable_params": n_train,
            "final_loss": loss, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
    }


def run_all_configs(args: argparse.Namespace) -> dict:
    """Run {fp32, bf16} x {checkpointing off, on}, each in a fresh subprocess; report the best
    tokens/s run's numbers plus every run."""
    runs = []
    for dtype in ("fp32", "bf16"):
        for ckpt in (False, True):
            cmd = [sys.executable, os.path.abspath(__file__), "--shape", args.shape, "--batch", str(args.batch),
                   "--seq", str(args.seq), "--steps", str(args.steps), "--dtype", dtype, "--attn", args.attn,
                   "--seed", str(args.seed)]
            cmd += ["--full"] if args.full else ["--lora-rank", str(args.lora_rank)]
            if ckpt:
                cmd.append("--checkpointing")
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            log(f"run: dtype={dtype} checkpointing={ckpt}")
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
            if proc.returncode != 0:
                runs.append({"config": {"dtype": dtype, "checkpointing": ckpt}, "error": f"exit {proc.returncode}"})
                continue
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    ok = [r for r in runs if "error" not in r]
    if not ok:
        raise SystemExit("all configurations failed")
    best = max(ok, key=lambda r: r["tokens_per_s"])
    return {**best, "runs": runs}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line interface."""
    ap = argparse.ArgumentParser(description="PyTorch/PEFT training-step benchmark (baseline for graft bench train).")
    ap.add_argument("--shape", required=True, choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (alpha = 2*rank); default 16")
    mode.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (plus 1 untimed warm-up)")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch default)")
    ap.add_argument("--all-configs", action="store_true",
                    help="run {fp32,bf16} x {ckpt off,on} in fresh subprocesses, report best + all")
    ap.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    return args


def main() -> None:
    """Entry point: print exactly one JSON line on stdout."""
    args = parse_args()
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    if not args.all_configs:
        import transformers

        transformers.logging.set_verbosity_error()
    result = run_all_configs(args) if args.all_configs else run_single(args)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
