#!/usr/bin/env python3
"""First-step reference of TRL's own RewardTrainer on the tiny random Llama of tests/fixtures/dpo_trainer/ loaded as a
sequence classifier, with a PEFT LoRA adapter (the dpo_trainer LoRA values + a trained `score` head copy).

Writes tests/fixtures/reward_trainer/:
    adapter/adapter_config.json, adapter/adapter_model.safetensors   PEFT LoRA, task_type SEQ_CLS (r=4, alpha=8, all 7
                                        projections; lora_A/lora_B copied from tests/fixtures/dpo_trainer/adapter/,
                                        plus `base_model.model.score.weight`, the modules_to_save copy of the head)
    cases.json                          4 token-id preference pairs (+ margins), the score head weight, base-model
                                        (adapter-disabled) rewards of the 8 sequences, and per RewardTrainer case
                                        (plain, margin, center 0.01, pad_is_eos): loss, rewards, the position each
                                        reward was read at, every logged metric, and the gradient of every trainable
                                        parameter (keyed by its adapter_model.safetensors name)
The base model is tests/fixtures/dpo_trainer/model/ (read from there, never regenerated here). Deterministic (fixed
seeds, one CPU thread), float32, CPU only, ~10 s (mostly imports). < 300 KB.

Regenerate (venv outside the repo, PyPI only):

    python3 -m venv /work/pyref-trl
    /work/pyref-trl/bin/pip install --quiet torch==2.15.0 trl==1.16.0 transformers==5.24.0 peft==0.21.2
    /work/pyref-trl/bin/python scripts/gen_reward_fixture.py

How TRL is called (same approach as scripts/gen_dpo_trainer_fixture.py / gen_kto_fixture.py):
  * the base is `AutoModelForSequenceClassification.from_pretrained(dpo_trainer/model, num_labels=1)` (float32, eager
    attention) = LlamaForSequenceClassification: `model.*` loads, `lm_head` is dropped, `score` = Linear(32, 1,
    bias=False) is new; its weight is set here to N(0, 0.5^2) from a seeded torch.Generator (not HF's init);
  * the policy is `get_peft_model(base, LoraConfig(task_type="SEQ_CLS", ...))` = PeftModelForSequenceClassification
    (PEFT adds `score` to modules_to_save); the LoRA A/B values of the dpo_trainer adapter and the score weight are
    copied into it, and it is saved with `save_pretrained` into adapter/;
  * the batch is built by TRL's own `DataCollatorForPreference` (trl.trainer.reward_trainer) from rows {chosen_ids,
    rejected_ids[, margin]}, i.e. a tokenized (`chosen_ids`/`rejected_ids`) dataset row, with the pad id of the case;
  * `model.config.get_text_config().pad_token_id = pad` exactly as `RewardTrainer.__init__` sets it;
  * the trainer object is `RewardTrainer.__new__(RewardTrainer)` with the attributes `__init__` sets from a
    `RewardConfig` (args, accelerator, model, _metrics, _total_train_tokens, _tp_size);
  * `RewardTrainer.compute_loss(obj, peft_model, inputs)` unmodified (train mode, float32, all dropout 0), then
    `loss.backward()`; the rewards are TRL's own (`outputs.logits` chunked, read from compute_loss's locals with
    sys.settrace), the read positions from LlamaForSequenceClassification.forward's `last_non_pad_token` (same), the
    metrics from `obj._metrics["train"]`, the gradients from the trainable parameters' `.grad` (zeroed between cases;
    every case starts from the same weights, nothing is stepped).
Sanity asserts: TRL's rewards equal a plain per-sequence unpadded forward with the adapter on, reading the final hidden
state at the recorded position through the score copy (1e-5); the loss recomputed from those rewards by
-logsigmoid(rc - rr - margin).mean() + coef * mean((rc + rr)^2) equals TRL's, and its plain-forward autograd gradients
equal TRL's; pad_is_eos reads at len-2, the pad-0 cases at len-1; the gradient keys are exactly the
adapter_model.safetensors keys and none is all-zero; base_rewards (adapter disabled) equal a fresh
LlamaForSequenceClassification without PEFT, per-sequence; the saved adapter reloaded with PeftModel.from_pretrained
gives the live model's rewards.
"""

import copy
import hashlib
import json
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
from peft import LoraConfig, PeftModel, PeftModelForSequenceClassification, get_peft_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForSequenceClassification  # noqa: E402
from transformers.modeling_layers import GenericForSequenceClassification  # noqa: E402
from trl import RewardConfig  # noqa: E402
from trl.trainer.reward_trainer import (  # noqa: E402
    DataCollatorForPreference,
    RewardTrainer,
    suppress_seqcls_warning,
)

PINNED = {"torch": "2.15.0", "trl": "1.16.0", "transformers": "5.24.0", "peft": "0.21.2"}
REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "tests" / "fixtures" / "dpo_trainer"  # model/ and adapter/ are reused from here
OUT = REPO / "tests" / "fixtures" / "reward_trainer"

SEED_IDS, SEED_SCORE = 3101, 3102
SCORE_STD = 0.5
BOS, EOS, PAD = 1, 2, 0
CHOSEN_LENGTHS = [9, 6, 11, 7]  # BOS and EOS included
REJECTED_LENGTHS = [7, 10, 5, 8]
MARGINS = [0.5, 0.0, -0.3, 1.2]
TARGETS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
# (name, pad_token_id, use_margin, center_rewards_coefficient)
CASES = [
    ("plain", PAD, False, None),
    ("margin", PAD, True, None),
    ("center", PAD, False, 0.01),
    ("pad_is_eos", EOS, True, 0.01),
]
METRIC_KEYS = ("accuracy", "margin", "min_reward", "mean_reward", "max_reward", "num_tokens")


def f32(x):
    """float32 value(s) as Python floats with the shortest repr that round-trips to the same float32."""
    a = np.asarray(torch.as_tensor(x).detach().to(torch.float32).numpy(), dtype=np.float32)
    if a.ndim == 0:
        return float(str(a[()]))
    return [float(str(v)) for v in a.ravel()]


def peft_saved_key(live_name, adapter_name="default"):
    """Live parameter name -> adapter_model.safetensors key:
    `...q_proj.lora_A.default.weight` -> `...q_proj.lora_A.weight`,
    `base_model.model.score.modules_to_save.default.weight` -> `base_model.model.score.weight`."""
    return live_name.replace(f".modules_to_save.{adapter_name}.", ".").replace(f".{adapter_name}.", ".")


def make_pairs(vocab):
    gen = torch.Generator().manual_seed(SEED_IDS)

    def seq(n):
        return [BOS] + torch.randint(3, vocab, (n - 2,), generator=gen).tolist() + [EOS]

    return [{"chosen_ids": seq(c), "rejected_ids": seq(r), "margin": m}
            for c, r, m in zip(CHOSEN_LENGTHS, REJECTED_LENGTHS, MARGINS, strict=True)]


def load_base(score_weight):
    with suppress_seqcls_warning():  # as RewardTrainer.__init__: lm_head UNEXPECTED, score MISSING are expected
        base = AutoModelForSequenceClassification.from_pretrained(
            str(SRC / "model"), num_labels=1, attn_implementation="eager", dtype=torch.float32)
    assert type(base).__name__ == "LlamaForSequenceClassification", type(base)
    assert tuple(base.score.weight.shape) == (1, 32) and base.score.bias is None
    with torch.no_grad():
        base.score.weight.copy_(score_weight)
    return base


def trainable(model):
    return {peft_saved_key(n): p for n, p in model.named_parameters() if p.requires_grad}


def score_module(model):
    """The ModulesToSaveWrapper around `score` (its active copy is trained; original_module is the base head)."""
    return model.base_model.model.score


def plain_reward(model, ids, pos, score_w):
    """One unpadded forward of the decoder (adapter state as set), final hidden state at `pos` through `score_w`."""
    h = model.get_base_model().model(input_ids=torch.tensor([ids]), use_cache=False).last_hidden_state[0]
    return h[pos] @ score_w[0]


def expected_pos(ids, pad):
    """Rightmost index whose token != pad (what LlamaForSequenceClassification reads)."""
    return max(i for i, t in enumerate(ids) if t != pad)


# ---------------------------------------------------------------------------------------------------------------
# TRL
# ---------------------------------------------------------------------------------------------------------------
def make_trainer(cfg, model):
    """The attributes RewardTrainer.__init__ sets and compute_loss reads (TRL 1.16)."""
    obj = RewardTrainer.__new__(RewardTrainer)
    obj.args = cfg
    obj.accelerator = Accelerator(cpu=True)  # after RewardConfig, whose __post_init__ resets accelerate's state
    obj.model = model  # compute_loss reads the mode from self.model.training
    obj._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    obj._total_train_tokens = 0
    obj._tp_size = 1
    return obj


LOSS_CODE = RewardTrainer.compute_loss.__code__


def seqcls_forward_code():
    f = GenericForSequenceClassification.forward
    while hasattr(f, "__wrapped__"):
        f = f.__wrapped__
    assert "last_non_pad_token" in f.__code__.co_varnames
    return f.__code__


SEQCLS_CODE = seqcls_forward_code()


def traced(fn):
    """Run fn(); capture compute_loss's rewards and the seq-cls forward's last_non_pad_token at their returns."""
    cap = {}

    def local(frame, event, arg):
        if event == "return":
            if frame.f_code is LOSS_CODE:
                for k in ("rewards_chosen", "rewards_rejected"):
                    cap[k] = frame.f_locals[k].detach().clone()
            elif frame.f_code is SEQCLS_CODE:
                cap.setdefault("last_non_pad_token", []).append(frame.f_locals["last_non_pad_token"].clone())
        return local

    def glob(frame, event, arg):
        return local if frame.f_code in (LOSS_CODE, SEQCLS_CODE) else None

    sys.settrace(glob)
    try:
        out = fn()
    finally:
        sys.settrace(None)
    return out, cap


def make_inputs(pairs, pad, use_margin):
    rows = [{"chosen_ids": p["chosen_ids"], "rejected_ids": p["rejected_ids"],
             **({"margin": p["margin"]} if use_margin else {})} for p in pairs]
    inputs = DataCollatorForPreference(pad_token_id=pad)(rows)
    seqs = [p["chosen_ids"] for p in pairs] + [p["rejected_ids"] for p in pairs]
    width = max(map(len, seqs))
    assert inputs["input_ids"].tolist() == [s + [pad] * (width - len(s)) for s in seqs]
    assert inputs["attention_mask"].tolist() == [[1] * len(s) + [0] * (width - len(s)) for s in seqs]
    assert ("margin" in inputs) == use_margin
    if use_margin:
        assert inputs["margin"].dtype == torch.float32 and torch.equal(inputs["margin"], torch.tensor(MARGINS))
    return inputs


def own_loss(rc, rr, margin, coef):
    """Independent restatement of TRL's loss."""
    loss = -torch.nn.functional.logsigmoid(rc - rr - (margin if margin is not None else 0.0)).mean()
    if coef is not None:
        loss = loss + coef * torch.mean((rc + rr) ** 2)
    return loss


# ---------------------------------------------------------------------------------------------------------------
NOTES = {
    "model": (
        "Base = tests/fixtures/dpo_trainer/model loaded with AutoModelForSequenceClassification(num_labels=1) = "
        "LlamaForSequenceClassification: the decoder (model.*) loads, lm_head is dropped, score = Linear(hidden 32 -> "
        "1, bias=False) applied to the FINAL-NORMED last hidden state of every position; score_weight here is its "
        "[1, 32] weight (row-major), the same in the base model and, initially, in the adapter's modules_to_save "
        "copy. The reward of a sequence = score(hidden[b, p]) where p = rightmost index with input_ids[b, p] != "
        "config.pad_token_id (argmax of arange * (ids != pad)); the attention mask plays NO role in choosing p. With "
        "pad 0 (distinct from EOS) p = len - 1 (the EOS). With pad = EOS (what RewardTrainer does when the tokenizer "
        "has no pad token: pad_token = eos_token) the trailing EOS equals the pad id, so p = len - 2 (the last body "
        "token); the EOS is still attended (attention_mask 1) but, the model being causal, cannot affect the reward. "
        "(A sequence made only of pad ids would read p = 0.) RewardTrainer.__init__ sets "
        "model.config.get_text_config().pad_token_id = tokenizer.pad_token_id."
    ),
    "adapter": (
        "adapter/ = PeftModelForSequenceClassification (task_type SEQ_CLS): LoRA r 4, alpha 8 (scale 2), dropout 0 on "
        "all 7 projections, lora_A/lora_B values = tests/fixtures/dpo_trainer/adapter; PEFT puts 'classifier' and "
        "'score' in modules_to_save and saves the trained copy of the head as base_model.model.score.weight [1, 32]. "
        "Loading it (PeftModel.from_pretrained on the seq-cls base) replaces the head by that copy; with the adapter "
        "disabled the base head (score_weight) is used."
    ),
    "batch_layout": (
        "DataCollatorForPreference: input_ids = the 4 chosen_ids rows then the 4 rejected_ids rows (verbatim, no "
        "BOS/EOS added; when TRL tokenizes text, _prepare_dataset appends eos_token as text to non-conversational "
        "chosen/rejected and the tokenizer adds its BOS), right-padded with the case's pad id to the longest of all 8 "
        "rows; attention_mask 1 on real tokens (BOS and EOS included); margin (only if the rows have one) a float32 "
        "[4] tensor. compute_loss passes every key (margin included, harmlessly) to model(**inputs, use_cache=False)."
    ),
    "loss": (
        "rewards_chosen, rewards_rejected = chunk(outputs.logits.squeeze(-1), 2) (first / second half of the batch). "
        "loss = -logsigmoid(rc - rr - margin).mean() (margin SUBTRACTED inside; without a margin column "
        "-logsigmoid(rc - rr).mean()); mean over the pairs. If center_rewards_coefficient is not None: loss += coef * "
        "mean over the pairs of (rc + rr)^2. No length normalisation; loss_is_scaled_for_ga = False."
    ),
    "metrics": (
        "_metrics['train'] after one compute_loss (single process, gathers are identities): accuracy = mean(rc > rr) "
        "(STRICT >, ties count 0; margin column not used); margin = mean(rc - rr) (margin column not used); "
        "min_reward / mean_reward / max_reward over all 8 rewards; num_tokens = [running total over steps of "
        "attention_mask.sum()] = real tokens of chosen + rejected, padding excluded, BOS/EOS included (the list is "
        "replaced each step, not appended; here a fresh trainer per case, so it is the batch count, an int). "
        "Recorded rounded to float32 (they are .item() of float32 tensors)."
    ),
    "grads": (
        "d loss / d parameter after one backward of the scalar loss (no GA scaling, no clipping), keyed by the "
        "adapter_model.safetensors key, flattened row-major (lora_A [r, in], lora_B [out, r], "
        "base_model.model.score.weight [1, 32]); shape given. The trainable parameters are the LoRA A/B and the "
        "modules_to_save copy of score; the base score is frozen."
    ),
    "base_rewards": (
        "Rewards of the 8 sequences of the pairs (chosen, rejected) from the base model alone (adapter disabled: no "
        "LoRA, base head score_weight), pad 0, i.e. score(hidden[len - 1])."
    ),
    "numerics": (
        "float32 throughout; CPU, one thread, eager attention. Numbers are written with the shortest decimal that "
        "round-trips to the same float32. Batched (padded) and per-sequence unpadded forwards agree to ~1e-6."
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
    adapter_dir = OUT / "adapter"
    adapter_dir.mkdir(parents=True, exist_ok=True)
    src_sha = {p: hashlib.sha256((SRC / p).read_bytes()).hexdigest() for p in
               ("model/config.json", "model/model.safetensors", "adapter/adapter_config.json",
                "adapter/adapter_model.safetensors")}

    # Base sequence classifier with a chosen score head.
    score_w = torch.randn((1, 32), generator=torch.Generator().manual_seed(SEED_SCORE)) * SCORE_STD
    base = load_base(score_w)
    plain_base = copy.deepcopy(base)  # no PEFT at all, for the base_rewards cross-check

    # PEFT LoRA (SEQ_CLS) with the dpo_trainer adapter's A/B and the chosen score copy.
    lcfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(TARGETS), bias="none",
                      task_type="SEQ_CLS")
    model = get_peft_model(base, lcfg)
    assert isinstance(model, PeftModelForSequenceClassification)
    assert "score" in model.peft_config["default"].modules_to_save
    src_lora = load_file(str(SRC / "adapter" / "adapter_model.safetensors"))
    live = trainable(model)
    assert set(live) == set(src_lora) | {"base_model.model.score.weight"}, sorted(set(live) ^ set(src_lora))[:4]
    with torch.no_grad():
        for k, p in live.items():
            p.copy_(score_w if k == "base_model.model.score.weight" else src_lora[k])
    sm = score_module(model)
    assert torch.equal(sm.original_module.weight, score_w) and not sm.original_module.weight.requires_grad
    model.save_pretrained(str(adapter_dir))
    (adapter_dir / "README.md").unlink(missing_ok=True)
    cfg_path = adapter_dir / "adapter_config.json"
    acfg = json.loads(cfg_path.read_text())
    acfg["target_modules"] = sorted(acfg["target_modules"])  # PEFT writes a set: order varies run to run
    acfg["modules_to_save"] = sorted(acfg["modules_to_save"])
    acfg["base_model_name_or_path"] = None  # PEFT writes the absolute local path of the base
    cfg_path.write_text(json.dumps(acfg, indent=2, sort_keys=True) + "\n")
    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert "base_model.model.score.weight" in saved and set(saved) == set(live), sorted(set(saved) ^ set(live))[:4]
    assert all(torch.equal(saved[k], live[k].detach()) for k in saved)
    assert sum("lora_A" in k for k in saved) == sum("lora_B" in k for k in saved) == 14
    # The saved adapter round-trips: PeftModel.from_pretrained on a seq-cls base whose head is still HF's random
    # init gives the live model's rewards (the head comes from the adapter's modules_to_save copy).
    with torch.no_grad():
        with suppress_seqcls_warning():
            fresh = AutoModelForSequenceClassification.from_pretrained(
                str(SRC / "model"), num_labels=1, attn_implementation="eager", dtype=torch.float32)
        assert not torch.equal(fresh.score.weight, score_w)
        reloaded = PeftModel.from_pretrained(fresh, str(adapter_dir))
        probe = torch.tensor([[BOS, 5, 17, 42, EOS]])
        assert torch.allclose(reloaded(input_ids=probe).logits, model(input_ids=probe).logits, rtol=0, atol=1e-6)
        del fresh, reloaded
    model.train()  # RewardTrainer's mode is read from model.training; all dropout probabilities are 0
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert model.base_model.model.model.config.attention_dropout == 0.0
    copy_plain = copy.deepcopy(model)  # for the plain-forward gradient cross-check

    pairs = make_pairs(model.config.vocab_size)
    seqs = [p["chosen_ids"] for p in pairs] + [p["rejected_ids"] for p in pairs]
    assert [len(s) for s in seqs] == CHOSEN_LENGTHS + REJECTED_LENGTHS
    assert all(t not in (PAD, BOS, EOS) for s in seqs for t in s[1:-1])

    # Base rewards (adapter disabled, base head), pad 0, via the batch and per-sequence.
    model.config.get_text_config().pad_token_id = PAD
    base_inputs = make_inputs(pairs, PAD, False)
    with torch.no_grad():
        with model.disable_adapter():
            base_batch = model(**base_inputs, use_cache=False).logits[:, 0]
        plain_base.config.pad_token_id = PAD
        ref = torch.stack([plain_base(input_ids=torch.tensor([s]), use_cache=False).logits[0, 0] for s in seqs])
    assert torch.allclose(base_batch, ref, rtol=0, atol=1e-5), (base_batch, ref)
    del plain_base

    with tempfile.TemporaryDirectory() as tmp:
        cases = []
        for name, pad, use_margin, coef in CASES:
            model.zero_grad(set_to_none=True)
            model.config.get_text_config().pad_token_id = pad  # as RewardTrainer.__init__
            assert model.get_base_model().config.pad_token_id == pad
            inputs = make_inputs(pairs, pad, use_margin)
            cfg = RewardConfig(output_dir=tmp + "/unused", use_cpu=True, bf16=False, report_to="none",
                               center_rewards_coefficient=coef, max_length=None)
            obj = make_trainer(cfg, model)
            loss, cap = traced(lambda: RewardTrainer.compute_loss(obj, model, dict(inputs)))
            assert loss.dtype == torch.float32 and loss.dim() == 0
            loss.backward()
            rc, rr = cap["rewards_chosen"], cap["rewards_rejected"]
            (pos,) = cap["last_non_pad_token"]
            pos = pos.tolist()
            pos_c, pos_r = pos[:4], pos[4:]

            # Read positions: rightmost non-pad token.
            assert pos == [expected_pos(s, pad) for s in seqs]
            assert pos == [len(s) - (2 if pad == EOS else 1) for s in seqs]

            # Rewards = plain unpadded per-sequence forwards (adapter on), hidden state at pos through the score copy.
            with torch.no_grad():
                own = torch.stack([plain_reward(model, s, p, sm.modules_to_save["default"].weight)
                                   for s, p in zip(seqs, pos, strict=True)])
            assert torch.allclose(torch.cat([rc, rr]), own, rtol=0, atol=1e-5), (torch.cat([rc, rr]), own)
            assert (torch.cat([rc, rr]) - base_batch).abs().max() > 0.05, "the adapter should change the rewards"

            # Loss from the formula.
            margin = torch.tensor(MARGINS) if use_margin else None
            assert abs(own_loss(own[:4], own[4:], margin, coef).item() - loss.item()) < 1e-5

            # Gradients: keys, non-zero, and equal to plain-forward autograd of the same loss.
            grads = {k: p.grad for k, p in trainable(model).items()}
            assert set(grads) == set(saved), sorted(set(grads) ^ set(saved))[:4]
            for k, g in grads.items():
                assert g is not None and g.abs().max() > 0, f"zero gradient for {k}"
                assert list(g.shape) == list(saved[k].shape)
            copy_plain.zero_grad(set_to_none=True)
            w2 = score_module(copy_plain).modules_to_save["default"].weight
            r2 = torch.stack([plain_reward(copy_plain, s, p, w2) for s, p in zip(seqs, pos, strict=True)])
            own_loss(r2[:4], r2[4:], margin, coef).backward()
            for k, p in trainable(copy_plain).items():
                assert torch.allclose(p.grad, grads[k], rtol=1e-4, atol=1e-6), k

            tm = obj._metrics["train"]
            assert set(tm) == set(METRIC_KEYS), sorted(tm)
            assert all(len(v) == 1 for v in tm.values())
            assert tm["num_tokens"] == [sum(map(len, seqs))]
            metrics = {k: (tm[k][0] if k == "num_tokens" else f32(tm[k][0])) for k in METRIC_KEYS}
            cases.append({
                "name": name,
                "pad_token_id": pad,
                "use_margin": use_margin,
                "center_rewards_coefficient": coef,
                "loss": f32(loss),
                "rewards_chosen": f32(rc),
                "rewards_rejected": f32(rr),
                "score_positions_chosen": pos_c,
                "score_positions_rejected": pos_r,
                "metrics": metrics,
                "grads": {k: {"shape": list(grads[k].shape), "values": f32(grads[k])} for k in sorted(grads)},
            })
            print(f"  {name}: loss={loss.item():.7f} accuracy={metrics['accuracy']} margin={metrics['margin']}",
                  file=sys.stderr)

    fixture = {
        "description": "First step of TRL's RewardTrainer (compute_loss + backward) on the tiny random Llama of "
        "../dpo_trainer/model loaded as LlamaForSequenceClassification (num_labels 1) with the PEFT SEQ_CLS LoRA "
        "adapter in adapter/ (dpo_trainer LoRA values + trained score copy), generated by "
        "scripts/gen_reward_fixture.py. float32.",
        "regenerate": "/work/pyref-trl/bin/python scripts/gen_reward_fixture.py",
        "versions": versions,
        "model": "../dpo_trainer/model",
        "adapter": "adapter",
        "source_sha256": src_sha,
        "lora": {"r": lcfg.r, "lora_alpha": lcfg.lora_alpha, "scale": lcfg.lora_alpha / lcfg.r, "lora_dropout": 0.0,
                 "target_modules": TARGETS, "task_type": "SEQ_CLS", "modules_to_save": ["classifier", "score"]},
        "bos": BOS,
        "eos": EOS,
        "pad": PAD,
        "pairs": pairs,
        "score_weight": f32(score_w),
        "score_weight_init": f"torch.randn((1, 32), generator=torch.Generator().manual_seed({SEED_SCORE})) * "
                             f"{SCORE_STD}",
        "base_rewards": {"chosen": f32(base_batch[:4]), "rejected": f32(base_batch[4:])},
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
    assert total < 300_000, total
    print(f"wrote {OUT.relative_to(REPO)} ({total} bytes, {len(cases)} cases)", file=sys.stderr)


if __name__ == "__main__":
    main()
