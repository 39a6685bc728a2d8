#!/usr/bin/env python3
"""First-step reference of TRL's own DPOTrainer on a tiny random Llama with a non-zero PEFT LoRA adapter.

Writes tests/fixtures/dpo_trainer/:
    model/config.json, model/model.safetensors            tiny random LlamaForCausalLM, float32 (the base = reference)
    adapter/adapter_config.json, adapter/adapter_model.safetensors   PEFT LoRA (r=4, alpha=8, all 7 projections,
                                                           random non-zero A and B, so the policy != the base)
    cases.json                                             pairs (token ids), reference logps, and per DPO case: loss,
                                                           policy logps, TRL's logged metrics, gradients of every LoRA
                                                           parameter (keyed by its adapter_model.safetensors name)
Deterministic (fixed seeds, one CPU thread), float32, CPU only, ~10 s (mostly imports). < 1 MB.

Regenerate (venv outside the repo, PyPI only; the default torch wheel is fine, it runs on CPU):

    python3 -m venv /work/pyref-trl
    /work/pyref-trl/bin/pip install --quiet torch==2.15.0 trl==1.16.0 transformers==5.24.0 peft==0.21.2
    /work/pyref-trl/bin/python scripts/gen_dpo_trainer_fixture.py

How TRL is called (same approach as scripts/gen_dpo_fixture.py, but with a real model instead of a stand-in):
  * the batch is built by TRL's own `DataCollatorForPreference` from examples {prompt_ids, chosen_ids, rejected_ids,
    ref_chosen_logps, ref_rejected_logps}, i.e. a `precompute_ref_log_probs=True` dataset row;
  * the reference logps are computed here, with the adapter disabled (`peft_model.disable_adapter()`, the base model),
    one unpadded forward per prompt+completion, sum of log_softmax at the completion tokens;
  * the trainer object is `DPOTrainer.__new__(DPOTrainer)` with the attributes `__init__` sets from a `DPOConfig`;
  * the PeftModel is patched exactly as `DPOTrainer.__init__` patches it:
    `add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "mean_logits", "is_top1"))`;
  * `DPOTrainer.compute_loss(obj, peft_model, inputs)` unmodified (train mode, float32, all dropout 0), then
    `loss.backward()`; the policy logps are read from `_compute_loss`'s locals (sys.settrace), the metrics from
    `obj._metrics["train"]`, the gradients from the LoRA parameters' `.grad` (zeroed between cases).
Sanity asserts: with every lora_B zeroed (on a deep copy) TRL's policy logps equal the reference logps computed here
and the sigmoid loss is ln 2; with the real adapter, TRL's policy logps equal a plain forward with the adapter on, and
the sigmoid loss is not ln 2, and its LoRA gradients equal plain-forward autograd of the same sigmoid loss (checks the
fused head's backward); the gradient keys are exactly the adapter_model.safetensors keys and none is all-zero.
"""

import copy
import hashlib
import json
import math
import re
import sys
import tempfile
import warnings
from collections import defaultdict
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
torch.set_num_threads(1)

import accelerate  # noqa: E402
import datasets  # noqa: E402
import numpy as np  # noqa: E402
import peft  # noqa: E402
import safetensors  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from trl import DPOConfig  # noqa: E402
from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

PINNED = {"torch": "2.15.0", "trl": "1.16.0", "transformers": "5.24.0", "peft": "0.21.2"}
REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "tests" / "fixtures" / "dpo_trainer"

SEED_MODEL, SEED_LORA, SEED_IDS = 1234, 1235, 1236
MODEL_CONFIG = dict(
    vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    bos_token_id=1, eos_token_id=2, pad_token_id=0, attention_dropout=0.0,
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BOS, EOS, PAD = 1, 2, 0
PROMPT_LENGTHS = [5, 7, 4]  # BOS included
CHOSEN_LENGTHS = [6, 3, 8]  # EOS included
REJECTED_LENGTHS = [4, 7, 5]  # EOS included; != chosen per pair
FUSED_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")  # what DPOTrainer.__init__ asks for
METRIC_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected")
# (loss_type, loss_weights, beta, label_smoothing)
CASES = [
    (["sigmoid"], None, 0.1, 0.0),
    (["ipo"], None, 0.5, 0.0),
    (["hinge"], None, 0.1, 0.0),
    (["sigmoid", "sft"], [0.8, 0.2], 0.1, 0.0),
]


def f32(x):
    """float32 value(s) as Python floats with the shortest repr that round-trips to the same float32."""
    a = np.asarray(torch.as_tensor(x).detach().to(torch.float32).numpy(), dtype=np.float32)
    if a.ndim == 0:
        return float(str(a[()]))
    return [float(str(v)) for v in a.ravel()]


# ---------------------------------------------------------------------------------------------------------------
# Model, adapter, pairs (conventions of scripts/gen_fixtures.py)
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def randomise(model, seed):
    """RMSNorm weights 1 + N(0, 0.1²); q/k_proj N(0, 0.14²); embed/lm_head N(0, 0.1²); other weights N(0, 0.08²).
    Visited in named_parameters() order."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.1 * noise)
        elif "q_proj" in name or "k_proj" in name:
            p.copy_(0.14 * noise)
        elif "embed_tokens" in name or "lm_head" in name:
            p.copy_(0.1 * noise)
        else:
            p.copy_(0.08 * noise)


@torch.no_grad()
def randomise_lora(model, seed):
    """lora_A N(0, 0.1²), lora_B N(0, 0.1²), seeded, in named_parameters() order."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_A" in name:
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        elif "lora_B" in name:
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def peft_saved_key(live_name, adapter_name="default"):
    """`...q_proj.lora_A.default.weight` -> `...q_proj.lora_A.weight` (the adapter_model.safetensors key)."""
    return live_name.replace(f".{adapter_name}.", ".")


def make_pairs():
    gen = torch.Generator().manual_seed(SEED_IDS)

    def ids(n):
        return torch.randint(3, MODEL_CONFIG["vocab_size"], (n,), generator=gen).tolist()

    pairs = []
    for p, c, r in zip(PROMPT_LENGTHS, CHOSEN_LENGTHS, REJECTED_LENGTHS, strict=True):
        pairs.append({"prompt_ids": [BOS] + ids(p - 1), "chosen_ids": ids(c - 1) + [EOS],
                      "rejected_ids": ids(r - 1) + [EOS]})
    return pairs


def summed_logps(model, prompt_ids, completion_ids):
    """Sum of log p(completion token | prefix) over the completion tokens, one unpadded forward (plain forward, no
    fused head)."""
    ids = torch.tensor([prompt_ids + completion_ids])
    logits = model(input_ids=ids, use_cache=False).logits[0].float()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    targets = ids[0, 1:]
    tok = logp.gather(1, targets[:, None])[:, 0]
    return tok[len(prompt_ids) - 1:].sum()


@torch.no_grad()
def policy_and_ref_logps(model, pairs):
    return policy_and_ref_logps_grad(model, pairs)


def policy_and_ref_logps_grad(model, pairs):
    out = {"chosen": [], "rejected": []}
    for pair in pairs:
        for side in ("chosen", "rejected"):
            out[side].append(summed_logps(model, pair["prompt_ids"], pair[f"{side}_ids"]))
    return torch.stack(out["chosen"]), torch.stack(out["rejected"])


# ---------------------------------------------------------------------------------------------------------------
# TRL
# ---------------------------------------------------------------------------------------------------------------
def grads_of(model):
    return {peft_saved_key(n): p.grad for n, p in model.named_parameters() if p.requires_grad}


def make_trainer(cfg, model):
    """The attributes DPOTrainer.__init__ sets and _compute_loss reads (TRL 1.16); see gen_dpo_fixture.py."""
    obj = DPOTrainer.__new__(DPOTrainer)
    obj.args = cfg
    obj.accelerator = Accelerator(cpu=True)  # after DPOConfig, whose __post_init__ resets accelerate's state
    obj.model = model
    obj.ref_model = None  # PEFT: no reference copy; unused anyway with precomputed reference logps
    obj.beta = cfg.beta
    obj.precompute_ref_logps = cfg.precompute_ref_log_probs
    obj.loss_types = cfg.loss_type
    obj.loss_weights = cfg.loss_weights or [1.0] * len(cfg.loss_type)
    obj.ld_alpha = cfg.ld_alpha
    obj.f_divergence_type = cfg.f_divergence_type
    obj.f_alpha_divergence_coef = cfg.f_alpha_divergence_coef
    obj.label_smoothing = cfg.label_smoothing
    obj.use_weighting = cfg.use_weighting
    obj.router_aux_loss_coef = 0.0
    obj.aux_loss_enabled = False
    obj._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    obj._total_train_tokens = 0
    obj._tp_size = 1
    return obj


CODE = DPOTrainer._compute_loss.__code__
RETURN_LOCALS = ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps", "chosen_rewards",
                 "rejected_rewards")


def traced(fn):
    """Run fn() and capture _compute_loss's locals at its return."""
    cap = {}

    def local(frame, event, arg):
        if event == "return" and "margins" in frame.f_locals:
            cap.update({k: frame.f_locals[k].detach().clone() for k in RETURN_LOCALS})
        return local

    def glob(frame, event, arg):
        return local if frame.f_code is CODE else None

    sys.settrace(glob)
    try:
        out = fn()
    finally:
        sys.settrace(None)
    return out, cap


def trl_loss(model, inputs, loss_type, loss_weights, beta, label_smoothing, tmp):
    cfg = DPOConfig(output_dir=tmp, use_cpu=True, bf16=False, report_to="none", beta=beta,
                    label_smoothing=label_smoothing, loss_type=list(loss_type), loss_weights=loss_weights,
                    precompute_ref_log_probs=True, max_length=None)
    obj = make_trainer(cfg, model)
    loss, cap = traced(lambda: DPOTrainer.compute_loss(obj, model, dict(inputs)))
    return obj, cfg, loss, cap


def make_inputs(pairs, ref_c, ref_r):
    examples = [dict(p, ref_chosen_logps=float(rc), ref_rejected_logps=float(rr))
                for p, rc, rr in zip(pairs, ref_c.tolist(), ref_r.tolist(), strict=True)]
    inputs = DataCollatorForPreference(pad_token_id=PAD, max_length=None)(examples)
    # The collator makes the ref logps with torch.tensor(list of Python floats): float32 under the default dtype, so
    # they are exactly the float32 values computed here.
    assert inputs["ref_chosen_logps"].dtype == torch.float32
    assert torch.equal(inputs["ref_chosen_logps"], ref_c) and torch.equal(inputs["ref_rejected_logps"], ref_r)
    return inputs


# ---------------------------------------------------------------------------------------------------------------
NOTES = {
    "batch_layout": (
        "TRL's DataCollatorForPreference concatenates prompt_ids + chosen_ids and prompt_ids + rejected_ids VERBATIM: "
        "with token ids given it adds no BOS and no EOS (those come only from DPOTrainer._prepare_dataset when it "
        "tokenizes text: the tokenizer's BOS on the prompt, eos_token appended as text to chosen/rejected). So the "
        "BOS (1) at the start of each prompt and the EOS (2) at the end of each completion are part of the given ids; "
        "the EOS is a completion token (scored and trained). The batch is [chosen_0..chosen_{B-1}, rejected_0.."
        "rejected_{B-1}] (2B rows), right-padded to the longest row with pad_token_id 0, attention_mask 1 on real "
        "tokens, completion_mask 1 on completion tokens. No truncation (max_length None)."
    ),
    "logps": (
        "labels = input_ids with completion_mask == 0 set to -100; the model patched by add_fused_lm_head scores "
        "hidden[:, :-1] against labels[:, 1:] (temperature 1) and returns per-token log-probs, 0 where the label is "
        "-100; logps = their sum per row = sum over the completion tokens of log p(token | everything before it, "
        "prompt included). The policy is the PeftModel with the adapter active; the reference is the base model "
        "(adapter disabled), here precomputed by this script (ref_*_logps, an unpadded plain forward per sequence) and "
        "passed in the batch as with precompute_ref_log_probs=True. Right padding and the causal mask mean a padded "
        "row's real positions see exactly the unpadded sequence."
    ),
    "loss": (
        "loss = sum_k loss_weights[k] * mean over the B=3 pairs of per_sequence_loss_k. sigmoid: "
        "-logsigmoid(beta*((pc-rc)-(pr-rr))); hinge: relu(1 - beta*(...)); ipo: ((pc-rc)/len_c - (pr-rr)/len_r - "
        "1/(2*beta))^2 with len = completion token count; sft: -sum of all chosen completion token logps / total "
        "chosen completion tokens (a batch-level token mean, not a mean of per-pair means). label_smoothing is not "
        "read by any of these loss types in TRL 1.16."
    ),
    "metrics": (
        "TRL's _metrics['train'] entries for this one micro-batch: rewards/chosen = mean(beta*(pc-rc)), "
        "rewards/rejected = mean(beta*(pr-rr)), rewards/accuracies = mean((chosen_rewards > rejected_rewards).float())"
        " (strict >), rewards/margins = mean(chosen_rewards - rejected_rewards), logps/chosen = mean(pc), "
        "logps/rejected = mean(pr); beta is each case's beta."
    ),
    "grads": (
        "d loss / d LoRA parameter after one backward of the scalar loss (no gradient accumulation scaling, no "
        "clipping), keyed by the adapter_model.safetensors key (adapter name 'default' removed), flattened row-major "
        "(lora_A [r, in], lora_B [out, r]); shape given. PEFT's LoRA scale alpha/r = 2."
    ),
    "numerics": (
        "float32 throughout (weights, forward, TRL's loss); CPU, one thread. Numbers are written with the shortest "
        "decimal that round-trips to the same float32. TRL's fused head computes log_softmax in chunks: its logps "
        "match a plain forward to ~1e-6."
    ),
}


def dump(obj):
    text = json.dumps(obj, indent=1)
    return re.sub(r"\[\s*([-0-9.eE+,\s]+?)\s*\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text)


def main():
    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "trl": trl.__version__,
                "transformers": transformers.__version__, "peft": peft.__version__,
                "accelerate": accelerate.__version__, "datasets": datasets.__version__, "numpy": np.__version__,
                "safetensors": safetensors.__version__}
    for k, v in PINNED.items():
        if versions[k].split("+")[0] != v:
            print(f"warning: {k} {versions[k]} != pinned {v}; the fixture will record the installed one",
                  file=sys.stderr)
    model_dir, adapter_dir = OUT / "model", OUT / "adapter"
    model_dir.mkdir(parents=True, exist_ok=True)

    # Base model.
    config = LlamaConfig(**MODEL_CONFIG)
    base = LlamaForCausalLM._from_config(config, attn_implementation="eager", dtype=torch.float32)
    randomise(base, SEED_MODEL)
    base.save_pretrained(str(model_dir))  # transformers 5: always safetensors
    (model_dir / "generation_config.json").unlink(missing_ok=True)

    # PEFT LoRA adapter with random non-zero A and B.
    lcfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(TARGETS), bias="none",
                      task_type="CAUSAL_LM")
    model = get_peft_model(base, lcfg)
    randomise_lora(model, SEED_LORA)
    model.save_pretrained(str(adapter_dir))
    (adapter_dir / "README.md").unlink(missing_ok=True)
    cfg_path = adapter_dir / "adapter_config.json"
    acfg = json.loads(cfg_path.read_text())
    acfg["target_modules"] = sorted(acfg["target_modules"])  # PEFT writes a set: order varies run to run
    cfg_path.write_text(json.dumps(acfg, indent=2, sort_keys=True) + "\n")
    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    model.train()  # DPOTrainer's mode is read from model.training; all dropout probabilities are 0
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    copy_b0 = copy.deepcopy(model)  # before patching (the patch's closure holds the original bound forward)
    copy_plain = copy.deepcopy(model)  # unpatched, for the gradient cross-check

    # Pairs and reference logps (adapter disabled = the base model).
    pairs = make_pairs()
    with model.disable_adapter():
        ref_c, ref_r = policy_and_ref_logps(model, pairs)
    own_pc, own_pr = policy_and_ref_logps(model, pairs)  # adapter on
    assert (own_pc - ref_c).abs().max() > 0.05, "the adapter should change the logps"
    inputs = make_inputs(pairs, ref_c, ref_r)

    # Patch the policy as DPOTrainer.__init__ does.
    add_fused_lm_head(model.get_base_model(), outputs=FUSED_OUTPUTS)

    with tempfile.TemporaryDirectory() as tmp:
        # Sanity: lora_B = 0 (on a copy) => policy == reference (checks the reference computation) and loss = ln 2.
        with torch.no_grad():
            for n, p in copy_b0.named_parameters():
                if "lora_B" in n:
                    p.zero_()
        add_fused_lm_head(copy_b0.get_base_model(), outputs=FUSED_OUTPUTS)
        _, _, loss0, cap0 = trl_loss(copy_b0, inputs, ["sigmoid"], None, 0.1, 0.0, tmp + "/unused")
        assert torch.allclose(cap0["chosen_logps"], ref_c, rtol=0, atol=2e-5), (cap0["chosen_logps"], ref_c)
        assert torch.allclose(cap0["rejected_logps"], ref_r, rtol=0, atol=2e-5), (cap0["rejected_logps"], ref_r)
        assert abs(loss0.item() - math.log(2)) < 1e-5, loss0.item()
        del copy_b0

        cases = []
        for loss_type, loss_weights, beta, ls in CASES:
            model.zero_grad(set_to_none=True)
            obj, cfg, loss, cap = trl_loss(model, inputs, loss_type, loss_weights, beta, ls, tmp + "/unused")
            assert loss.dtype == torch.float32 and loss.dim() == 0
            loss.backward()
            assert torch.allclose(cap["chosen_logps"], own_pc, rtol=0, atol=2e-5)
            assert torch.allclose(cap["rejected_logps"], own_pr, rtol=0, atol=2e-5)
            assert torch.equal(cap["ref_chosen_logps"], ref_c) and torch.equal(cap["ref_rejected_logps"], ref_r)
            if loss_type == ["sigmoid"]:
                assert abs(loss.item() - math.log(2)) > 1e-3, "policy should differ from the reference"
                # Cross-check of the fused head's backward: plain-forward autograd of the same sigmoid loss.
                model2 = copy_plain
                model2.zero_grad(set_to_none=True)
                pc, pr = policy_and_ref_logps_grad(model2, pairs)
                own = -torch.nn.functional.logsigmoid(beta * ((pc - ref_c) - (pr - ref_r))).mean()
                own.backward()
                assert abs(own.item() - loss.item()) < 1e-5, (own.item(), loss.item())
                for n, p in model2.named_parameters():
                    if p.requires_grad:
                        g = grads_of(model)[peft_saved_key(n)]
                        assert torch.allclose(p.grad, g, rtol=1e-4, atol=1e-6), n
            grads = grads_of(model)
            assert set(grads) == set(saved), sorted(set(grads) ^ set(saved))[:4]
            assert all(n.startswith("base_model.model.model.layers.") for n in grads)
            for n, g in grads.items():
                assert g is not None and g.abs().max() > 0, f"zero gradient for {n}"
                assert list(g.shape) == list(saved[n].shape)
            assert all(len(v) == 1 for v in obj._metrics["train"].values())
            metrics = {k: obj._metrics["train"][k][0] for k in METRIC_KEYS}
            cases.append({
                "name": "+".join(loss_type) + f"_beta{beta}",
                "loss_type": loss_type[0] if len(loss_type) == 1 else list(loss_type),
                "loss_weights": list(obj.loss_weights),
                "beta": beta,
                "label_smoothing": ls,
                "loss": f32(loss),
                "chosen_logps": f32(cap["chosen_logps"]),
                "rejected_logps": f32(cap["rejected_logps"]),
                "chosen_rewards": f32(cap["chosen_rewards"]),
                "rejected_rewards": f32(cap["rejected_rewards"]),
                "metrics": {k: f32(v) for k, v in metrics.items()},
                "grads": {n: {"shape": list(grads[n].shape), "values": f32(grads[n])} for n in sorted(grads)},
            })
            print(f"  {cases[-1]['name']}: loss={loss.item():.7f}", file=sys.stderr)

    fixture = {
        "description": "First step of TRL's DPOTrainer (compute_loss + backward) on the tiny random Llama in model/ "
        "with the non-zero PEFT LoRA adapter in adapter/ (policy = base + adapter, reference = base), generated by "
        "scripts/gen_dpo_trainer_fixture.py. float32.",
        "regenerate": "/work/pyref-trl/bin/python scripts/gen_dpo_trainer_fixture.py",
        "versions": versions,
        "model": {"dir": "model", "config": {k: v for k, v in MODEL_CONFIG.items()}, "attn_implementation": "eager",
                  "dtype": "float32", "seed": SEED_MODEL},
        "adapter": {"dir": "adapter", "r": lcfg.r, "lora_alpha": lcfg.lora_alpha, "scale": lcfg.lora_alpha / lcfg.r,
                    "lora_dropout": 0.0, "target_modules": TARGETS, "seed": SEED_LORA,
                    "init": "lora_A N(0, 0.1^2), lora_B N(0, 0.1^2)"},
        "special_ids": {"bos": BOS, "eos": EOS, "pad": PAD},
        "pairs": pairs,
        "chosen_lengths": CHOSEN_LENGTHS,
        "rejected_lengths": REJECTED_LENGTHS,
        "ref_chosen_logps": f32(ref_c),
        "ref_rejected_logps": f32(ref_r),
        "batch": {k: inputs[k].tolist() for k in ("input_ids", "attention_mask", "completion_mask")},
        "notes": NOTES,
        "cases": cases,
    }
    (OUT / "cases.json").write_text(dump(fixture) + "\n")
    total = 0
    for f in sorted(OUT.rglob("*")):
        if f.is_file():
            total += f.stat().st_size
            print(f"  {f.relative_to(REPO)} {f.stat().st_size} B sha256 {hashlib.sha256(f.read_bytes()).hexdigest()[:16]}",
                  file=sys.stderr)
    assert total < 1_000_000, total
    print(f"wrote {OUT.relative_to(REPO)} ({total} bytes, {len(cases)} cases)", file=sys.stderr)


if __name__ == "__main__":
    main()
