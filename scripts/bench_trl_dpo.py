#!/usr/bin/env python3
"""TRL DPOTrainer + PEFT LoRA training-step benchmark: the peer `graft bench train --method dpo` compares to.

Builds the shape's model exactly as scripts/bench_torch.py does (its SHAPES table and `build_model`: config, random
init, seed, sdpa attention), a tiny offline word-level tokenizer with the shape's vocab size, and a text preference
dataset whose rows tokenize to exactly --prompt-len + --completion-len tokens per side; then runs a REAL
`trl.DPOTrainer(model=base, args=DPOConfig(...), train_dataset=..., processing_class=tokenizer, peft_config=LoraConfig)`
with `trainer.train()` for 1 warm-up + --steps optimizer steps, timing each step with a TrainerCallback. Nothing is
downloaded.

    /work/pyref-trl/bin/python scripts/bench_trl_dpo.py --shape smollm2-135m
    /work/pyref-trl/bin/python scripts/bench_trl_dpo.py --shape tiny --steps 1
    /work/pyref-trl/bin/python scripts/bench_trl_dpo.py --shape smollm2-135m --pairs 1 --prompt-len 32 \
        --completion-len 64 --steps 1 --configs fp32 --checkpointing off

Output: progress on stderr; exactly ONE JSON line on stdout:
    {"peer": "trl", "trl": ..., "torch": ..., "transformers": ..., "peft": ..., "shape": ..., "pairs": ...,
     "prompt_len": ..., "completion_len": ..., "tokens_per_step": ..., "driver": "DPOTrainer.train", ...,
     "configs": [{"dtype", "checkpointing", "step_s": [...], "tokens_per_s", "peak_rss_mb", ...} | {..., "error"}],
     "best": <the configs entry with the highest tokens_per_s>}

What is measured (TRL's defaults unless stated):
- One step = one optimizer step of HF Trainer's inner loop = TRL `training_step` (DPO `compute_loss`: policy
  forward through TRL's fused LM head, reference forward under no_grad with the adapter disabled, sigmoid loss) +
  backward + grad-norm clip (max_grad_norm 1.0) + AdamW step (TrainingArguments' default `adamw_torch_fused`) + LR
  scheduler step + zero_grad; timed from the `on_step_begin` to the `on_step_end` callback. Data loading / collation
  (before on_step_begin) and logging (after on_step_end) are outside. `training_step_s` is the forward + backward
  part alone. The first step is an untimed warm-up.
- Reference = the base model via the disabled adapter: the LoRA is created by TRL from `peft_config` (fresh adapter,
  so no "ref" adapter copy), and the reference forward is inside every step, as TRL does by default.
  `--precompute-ref` sets `precompute_ref_log_probs=True` instead (TRL runs the reference over the dataset in
  `__init__`, untimed).
- LoRA: PEFT LoraConfig(r=R, lora_alpha=2R, lora_dropout=0, all 7 linear projections), as bench_torch.py.
- dtype: `fp32` = DPOConfig(bf16=False), everything float32; `bf16` = DPOConfig(bf16=True): accelerate's CPU bf16
  autocast around forward + loss, float32 weights/grads/AdamW state (bench_torch.py's bf16 recipe).
- checkpointing: DPOConfig(gradient_checkpointing=..., gradient_checkpointing_kwargs={"use_reentrant": False});
  TRL then calls `enable_input_require_grads` and disables checkpointing around the reference forward.
- Data: per pair, prompt = BOS + (prompt_len - 1) random words, chosen and rejected = (completion_len - 1) random
  words + EOS (TRL appends the EOS text itself), tokenized by TRL's own `_prepare_dataset`; no truncation
  (max_length=None), right padding never needed (all rows equal length). Each step's batch is checked to hold
  exactly 2 * pairs * (prompt_len + completion_len) real tokens.
- tokens/s = tokens_per_step * steps / sum(step_s), tokens_per_step = 2 * pairs * (prompt_len + completion_len)
  (chosen + rejected, prompt included, once each: the reference forward is not counted again).
- peak RSS = ru_maxrss of the process that built the model and ran the steps; each config runs in a fresh
  subprocess.
Measured numbers are recorded in scripts/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_torch import LORA_TARGETS, SHAPES, build_model  # noqa: E402  (same shapes / construction as the SFT peer)

PAD, BOS, EOS = "<pad>", "<s>", "</s>"  # ids 0, 1, 2


def log(msg: str) -> None:
    """Progress output (stderr only; stdout carries the single JSON result line)."""
    print(f"[bench_trl_dpo] {msg}", file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def tokens_per_step(args: argparse.Namespace) -> int:
    return 2 * args.pairs * (args.prompt_len + args.completion_len)


def make_tokenizer(vocab_size: int):
    """Offline word-level tokenizer with exactly `vocab_size` ids: <pad> 0, <s> 1, </s> 2, words w3..w{V-1};
    whitespace split, BOS prepended (TemplateProcessing), like a Llama-style tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, BOS: 1, EOS: 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=PAD)
    assert len(fast) == vocab_size, (len(fast), vocab_size)
    return fast


def make_dataset(args: argparse.Namespace, vocab_size: int, n_rows: int):
    """Text preference rows: prompt (prompt_len - 1 words; the tokenizer adds BOS), chosen / rejected (" " +
    completion_len - 1 words; TRL appends the EOS text)."""
    import datasets
    import torch

    gen = torch.Generator().manual_seed(args.seed + 1)

    def words(n: int) -> str:
        return " ".join(f"w{i}" for i in torch.randint(3, vocab_size, (n,), generator=gen).tolist())

    rows = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(n_rows):
        rows["prompt"].append(words(args.prompt_len - 1))
        rows["chosen"].append(" " + words(args.completion_len - 1))
        rows["rejected"].append(" " + words(args.completion_len - 1))
    return datasets.Dataset.from_dict(rows)


def run_single(args: argparse.Namespace, dtype: str, ckpt: bool) -> dict:
    """Build model + DPOTrainer for one configuration, run warm-up + timed steps; return the config's result."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rss_after_import = peak_rss_mb()
    import datasets
    import peft
    import transformers
    import trl
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    datasets.disable_progress_bars()
    seq = args.prompt_len + args.completion_len
    t0 = time.perf_counter()
    # bench_torch.build_model with full=True = the bare base model (random init, seed, attn); the LoRA is added by
    # TRL from peft_config with the same LoraConfig bench_torch.py uses.
    base, _, n_base = build_model(argparse.Namespace(shape=args.shape, seq=seq, seed=args.seed, attn=args.attn,
                                                     checkpointing=False, full=True, lora_rank=None))
    vocab = SHAPES[args.shape][1]["vocab_size"]
    tok = make_tokenizer(vocab)
    n_rows = args.pairs * (args.steps + 1)
    ds = make_dataset(args, vocab, n_rows)
    lcfg = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0,
                      target_modules=list(LORA_TARGETS), bias="none", task_type="CAUSAL_LM")

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step (on_step_begin -> on_step_end)."""

        def __init__(self):
            self.t = None
            self.step_s = []

        def on_step_begin(self, a, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            self.step_s.append(time.perf_counter() - self.t)

    timer = StepTimer()
    tmp = tempfile.TemporaryDirectory(prefix="bench_trl_dpo_")
    cfg = DPOConfig(
        output_dir=tmp.name, use_cpu=True, bf16=dtype == "bf16", fp16=False,
        gradient_checkpointing=ckpt, gradient_checkpointing_kwargs={"use_reentrant": False},
        per_device_train_batch_size=args.pairs, gradient_accumulation_steps=1, max_steps=args.steps + 1,
        beta=args.beta, precompute_ref_log_probs=args.precompute_ref, max_length=None,
        report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
        seed=args.seed,
    )
    trainer = DPOTrainer(model=base, args=cfg, train_dataset=ds, processing_class=tok, peft_config=lcfg,
                         callbacks=[timer])
    model = trainer.model
    assert isinstance(model, peft.PeftModel) and "ref" not in model.peft_config, "expected a fresh TRL-made adapter"
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    row = trainer.train_dataset[0]
    assert len(row["prompt_ids"]) == args.prompt_len and row["prompt_ids"][0] == 1, len(row["prompt_ids"])
    assert len(row["chosen_ids"]) == len(row["rejected_ids"]) == args.completion_len and row["chosen_ids"][-1] == 2
    param_dtypes = sorted({str(p.dtype) for p in model.parameters()})
    log(f"built {args.shape} + DPOTrainer in {time.perf_counter() - t0:.1f}s: {n_total / 1e6:.2f}M params, "
        f"{n_train / 1e6:.3f}M trainable, dtype={dtype} ckpt={ckpt} threads={torch.get_num_threads()} "
        f"params {param_dtypes}, optim={cfg.optim}, {n_rows} rows x {seq} tokens per side")

    # Time the forward + backward part alone, and check each batch's real token count.
    fb_s, batch_tokens = [], []
    inner = trainer.training_step

    def timed_training_step(model, inputs, *a, **kw):
        batch_tokens.append(int(inputs["attention_mask"].sum()))
        t = time.perf_counter()
        out = inner(model, inputs, *a, **kw)
        fb_s.append(time.perf_counter() - t)
        return out

    trainer.training_step = timed_training_step
    trainer.train()
    tmp.cleanup()
    ckpt_active = bool(model.get_base_model().is_gradient_checkpointing)
    mixed_precision = str(trainer.accelerator.mixed_precision)
    assert ckpt_active == ckpt and mixed_precision == ("bf16" if dtype == "bf16" else "no"), (ckpt_active,
                                                                                             mixed_precision)
    threads = torch.get_num_threads()
    if args.threads and threads != args.threads:
        log(f"warning: torch threads changed to {threads} during training")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(timer.step_s) == args.steps + 1, timer.step_s
    assert batch_tokens == [tokens_per_step(args)] * (args.steps + 1), batch_tokens
    step_s = timer.step_s[1:]
    log(f"warm-up step {timer.step_s[0]:.2f}s; steps {', '.join(f'{s:.2f}' for s in step_s)}s; losses {losses}")
    return {
        "dtype": dtype,
        "checkpointing": ckpt,
        "step_s": [round(s, 4) for s in step_s],
        "tokens_per_s": tokens_per_step(args) * len(step_s) / sum(step_s),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "training_step_s": [round(s, 4) for s in fb_s[1:]],
        "warmup_step_s": round(timer.step_s[0], 4),
        "losses": losses,
        "precision": "bf16 autocast (accelerate), fp32 weights/grads/AdamW" if dtype == "bf16" else "fp32",
        "param_dtypes": param_dtypes,
        "accelerate_mixed_precision": mixed_precision,
        "gradient_checkpointing_active": ckpt_active,
        "optim": str(cfg.optim.value if hasattr(cfg.optim, "value") else cfg.optim),
        "max_grad_norm": cfg.max_grad_norm,
        "threads": threads,
        "rss_after_import_mb": round(rss_after_import, 1),
        "load_avg_1m": os.getloadavg()[0],
        "params": n_total,
        "base_params": n_base,
        "trainable_params": n_train,
        "trl": trl.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def config_list(args: argparse.Namespace) -> list[tuple[str, bool]]:
    dtypes = ["fp32", "bf16"] if args.configs == "all" else [args.configs]
    ckpts = {"both": [False, True], "off": [False], "on": [True]}[args.checkpointing]
    return [(d, c) for d in dtypes for c in ckpts]


def child_cmd(args: argparse.Namespace, dtype: str, ckpt: bool) -> list[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--shape", args.shape, "--lora-rank", str(args.lora_rank),
           "--pairs", str(args.pairs), "--prompt-len", str(args.prompt_len), "--completion-len",
           str(args.completion_len), "--steps", str(args.steps), "--threads", str(args.threads), "--beta",
           str(args.beta), "--attn", args.attn, "--seed", str(args.seed), "--single", f"{dtype},{int(ckpt)}"]
    if args.precompute_ref:
        cmd.append("--precompute-ref")
    return cmd


def run_all(args: argparse.Namespace) -> dict:
    """Each configuration in a fresh subprocess; report every one and the best tokens/s."""
    configs = []
    for dtype, ckpt in config_list(args):
        log(f"run: dtype={dtype} checkpointing={ckpt}")
        proc = subprocess.run(child_cmd(args, dtype, ckpt), stdout=subprocess.PIPE, text=True)
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            configs.append({"dtype": dtype, "checkpointing": ckpt, "error": f"exit {proc.returncode}"})
            continue
        configs.append(json.loads(lines[-1]))
    ok = [c for c in configs if "error" not in c]
    if not ok:
        raise SystemExit("all configurations failed")
    best = max(ok, key=lambda c: c["tokens_per_s"])
    import peft
    import torch
    import transformers
    import trl

    return {
        "peer": "trl", "trl": trl.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "shape": args.shape, "pairs": args.pairs, "prompt_len": args.prompt_len,
        "completion_len": args.completion_len, "tokens_per_step": tokens_per_step(args), "steps": args.steps,
        "warmup_steps": 1, "lora_rank": args.lora_rank, "lora_alpha": 2 * args.lora_rank,
        "lora_targets": list(LORA_TARGETS), "beta": args.beta, "loss_type": "sigmoid",
        "reference": "precomputed (precompute_ref_log_probs=True, untimed)" if args.precompute_ref
        else "base model via disabled adapter, forward inside each step",
        "precompute_ref": args.precompute_ref, "threads": args.threads, "attn": args.attn,
        "driver": "DPOTrainer.train", "configs": configs, "best": best,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line interface."""
    ap = argparse.ArgumentParser(description="TRL DPOTrainer + PEFT LoRA training-step benchmark "
                                             "(peer of graft bench train --method dpo).")
    ap.add_argument("--shape", required=True, choices=sorted(SHAPES))
    ap.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (alpha = 2*rank); default 16")
    ap.add_argument("--pairs", type=int, default=4, help="preference pairs per step (per_device_train_batch_size)")
    ap.add_argument("--prompt-len", type=int, default=128, help="prompt tokens, BOS included")
    ap.add_argument("--completion-len", type=int, default=384, help="chosen = rejected tokens, EOS included")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (plus 1 untimed warm-up)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (0 = torch default)")
    ap.add_argument("--configs", choices=["all", "fp32", "bf16"], default="all",
                    help="dtypes to try (all = fp32 and bf16 autocast); each x --checkpointing")
    ap.add_argument("--checkpointing", choices=["both", "off", "on"], default="both",
                    help="gradient checkpointing settings to try (default both)")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--precompute-ref", action="store_true",
                    help="precompute_ref_log_probs=True: reference forward done in __init__, not timed")
    ap.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--single", help=argparse.SUPPRESS)  # internal: "dtype,ckpt01" = run one config in-process
    args = ap.parse_args(argv)
    if args.steps < 1 or args.pairs < 1:
        ap.error("--steps and --pairs must be >= 1")
    if args.prompt_len < 2 or args.completion_len < 2:
        ap.error("--prompt-len and --completion-len must be >= 2 (BOS / EOS included)")
    return args


def main() -> None:
    """Entry point: print exactly one JSON line on stdout."""
    args = parse_args()
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    real_stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # Trainer's PrinterCallback etc. print to stdout
        if args.single:
            import transformers

            transformers.logging.set_verbosity_error()
            dtype, ckpt = args.single.split(",")
            result = run_single(args, dtype, ckpt == "1")
        else:
            result = run_all(args)
    print(json.dumps(result), file=real_stdout, flush=True)


if __name__ == "__main__":
    main()
