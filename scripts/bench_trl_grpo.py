#!/usr/bin/env python3
"""TRL GRPOTrainer + PEFT LoRA step benchmark: the peer `graft bench train --method grpo` compares to.

Builds the shape's model as scripts/bench_torch.py does (`build_model`: config, random init, seed), the offline
word-level tokenizer of scripts/bench_trl_dpo.py, and --prompts-per-step x (--steps + 1) prompts of --prompt-len
random words; then runs a REAL `trl.GRPOTrainer(model=base, reward_funcs=[length], args=GRPOConfig(...),
train_dataset=..., processing_class=tokenizer, peft_config=LoraConfig)` with `trainer.train()` for 1 warm-up +
--steps optimizer steps, each one generation batch of prompts-per-step x --generations completions (transformers
`generate`, no vLLM), timed with a TrainerCallback. Nothing is downloaded.

    /work/pyref-trl/bin/python scripts/bench_trl_grpo.py --shape smollm2-135m
    /work/pyref-trl/bin/python scripts/bench_trl_grpo.py --shape tiny --steps 1 --configs fp32

Output: progress on stderr; exactly ONE JSON line on stdout:
    {"peer": "trl", "trl": ..., "shape": ..., "configs": [{"dtype", "step_s", "rollout_tokens_per_s",
     "completion_tokens", "peak_rss_mb", ...} | {..., "error"}], "best": <the config with the lowest step time>}

What is measured (TRL's GRPOConfig defaults unless stated): one step = rollouts (generate with temperature 1,
top_p 1, the live LoRA), the reward, advantages, then the policy forward + backward (loss_type dapo, beta 0: no
reference pass), clip, AdamW — on_step_begin to on_step_end. The completions are max_completion_length tokens
(EOS is held back by `min_new_tokens`; graft's side has no stop token, so the work is the same). rollout tokens/s = completion tokens generated in the
timed steps / the time GRPOTrainer spent in generation (`_generate` wrapped with a timer). peak RSS = ru_maxrss of
the process; each dtype runs in a fresh subprocess. dtypes: fp32, or bf16 (accelerate's CPU autocast, fp32
weights), as bench_torch.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_torch import LORA_TARGETS, SHAPES, build_model  # noqa: E402
from bench_trl_dpo import make_tokenizer, peak_rss_mb  # noqa: E402


def log(msg: str) -> None:
    print(f"[bench_trl_grpo] {msg}", file=sys.stderr, flush=True)


def run_single(args: argparse.Namespace, dtype: str) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import datasets
    import peft
    import transformers
    import trl
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    datasets.disable_progress_bars()
    seq = args.prompt_len + args.completion_len
    base, _, _ = build_model(argparse.Namespace(shape=args.shape, seq=seq, seed=args.seed, attn="sdpa",
                                                checkpointing=False, full=True, lora_rank=None))
    vocab = SHAPES[args.shape][1]["vocab_size"]
    tok = make_tokenizer(vocab)
    gen = torch.Generator().manual_seed(args.seed + 1)
    n_rows = args.prompts_per_step * (args.steps + 1)
    prompts = [" ".join(f"w{i}" for i in torch.randint(3, vocab, (args.prompt_len,), generator=gen).tolist())
               for _ in range(n_rows)]
    ds = datasets.Dataset.from_dict({"prompt": prompts})

    def length_reward(completions, **kw):
        return [float(len(c)) for c in completions]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.t, self.step_s = None, []

        def on_step_begin(self, a, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            self.step_s.append(time.perf_counter() - self.t)

    timer = StepTimer()
    tmp = tempfile.TemporaryDirectory(prefix="bench_trl_grpo_")
    completions = args.prompts_per_step * args.generations
    cfg = GRPOConfig(
        output_dir=tmp.name, use_cpu=True, bf16=dtype == "bf16", fp16=False,
        per_device_train_batch_size=completions, gradient_accumulation_steps=1, max_steps=args.steps + 1,
        num_generations=args.generations, max_completion_length=args.completion_len, temperature=1.0,
        beta=0.0, loss_type="dapo", report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
        dataloader_num_workers=0, seed=args.seed,
        # Full-length completions, as on graft's side (no stop token there).
        generation_kwargs={"min_new_tokens": args.completion_len},
    )
    lcfg = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0,
                      target_modules=list(LORA_TARGETS), bias="none", task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=base, reward_funcs=[length_reward], args=cfg, train_dataset=ds,
                          processing_class=tok, peft_config=lcfg, callbacks=[timer])
    gen_s, gen_tokens = [], []
    inner = trainer._generate

    def timed_generate(*a, **kw):
        t = time.perf_counter()
        out = inner(*a, **kw)
        gen_s.append(time.perf_counter() - t)
        # (prompt_ids, completion_ids, ...): count the completion tokens.
        completion_ids = out[1]
        gen_tokens.append(sum(len(c) for c in completion_ids))
        return out

    trainer._generate = timed_generate
    trainer.train()
    tmp.cleanup()
    assert len(timer.step_s) == args.steps + 1, timer.step_s
    assert gen_tokens[1:] == [completions * args.completion_len] * args.steps, gen_tokens
    step_s = timer.step_s[1:]
    timed_gen_s, timed_tokens = sum(gen_s[1:]), sum(gen_tokens[1:])
    log(f"{dtype}: warm-up {timer.step_s[0]:.2f}s; steps {', '.join(f'{s:.2f}' for s in step_s)}s; "
        f"generation {timed_gen_s:.2f}s for {timed_tokens} tokens")
    return {
        "dtype": dtype,
        "step_s": [round(s, 4) for s in step_s],
        "mean_step_s": sum(step_s) / len(step_s),
        "completion_tokens": timed_tokens,
        "generation_s": round(timed_gen_s, 4),
        "rollout_tokens_per_s": timed_tokens / max(timed_gen_s, 1e-9),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "threads": torch.get_num_threads(),
        "trl": trl.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description="TRL GRPOTrainer + PEFT LoRA benchmark (peer of graft bench train "
                                             "--method grpo).")
    ap.add_argument("--shape", required=True, choices=sorted(SHAPES))
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--prompts-per-step", type=int, default=2)
    ap.add_argument("--generations", type=int, default=4, help="num_generations")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--completion-len", type=int, default=64, help="max_completion_length")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--configs", choices=["all", "fp32", "bf16"], default="all")
    ap.add_argument("--single", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.single:
        print(json.dumps(run_single(args, args.single)))
        return
    configs = []
    for dtype in (["fp32", "bf16"] if args.configs == "all" else [args.configs]):
        cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--single", dtype]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            configs.append({"dtype": dtype, "error": f"exit {proc.returncode}"})
            continue
        configs.append(json.loads(lines[-1]))
    ok = [c for c in configs if "error" not in c]
    if not ok:
        raise SystemExit("all configurations failed")
    best = min(ok, key=lambda c: c["mean_step_s"])
    print(json.dumps({"peer": "trl", "trl": best["trl"], "shape": args.shape, "generations": args.generations,
                      "prompts_per_step": args.prompts_per_step, "prompt_len": args.prompt_len,
                      "completion_len": args.completion_len, "configs": configs, "best": best}))


if __name__ == "__main__":
    main()
