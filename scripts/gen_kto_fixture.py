#!/usr/bin/env python3
"""First-step reference of TRL's own KTOTrainer on the tiny random Llama + non-zero PEFT LoRA adapter of
tests/fixtures/dpo_trainer/ (read from there, never regenerated here).

Writes tests/fixtures/kto_trainer/cases.json: 4 unpaired token-id examples (labels T, F, T, F) in one batch, the KL
completions TRL's dataset mapping gives them, base-model (adapter-disabled) reference logps of every example and of
every KL sequence, and per KTO case (kto β0.1 w 1/1, kto β0.5 w 1.33/1, apo_zero_unpaired β0.1): loss, per-example
losses, policy logps, policy KL logps, the `kl` TRL used, every metric TRL logs, and the gradient of every LoRA
parameter (keyed by its adapter_model.safetensors name). Deterministic (one CPU thread), float32, CPU only, ~10 s.

Regenerate (venv outside the repo, PyPI only):

    python3 -m venv /work/pyref-trl
    /work/pyref-trl/bin/pip install --quiet torch==2.15.0 trl==1.16.0 transformers==5.24.0 peft==0.21.2
    /work/pyref-trl/bin/python scripts/gen_kto_fixture.py

How TRL is called (same approach as scripts/gen_dpo_trainer_fixture.py):
  * KL completions: TRL's own nested `add_kl_completion_ids` (the code object taken out of
    `KTOTrainer._prepare_dataset`), applied with `Dataset.map(batched=True, batch_size=per_device_train_batch_size)`
    exactly as `_prepare_dataset` does; per_device_train_batch_size = 4 = the whole batch here;
  * the batch is built by TRL's own `DataCollatorForUnpairedPreference` from rows {prompt_ids, completion_ids,
    KL_completion_ids, label, ref_logps, ref_KL_logps}, i.e. a `precompute_ref_log_probs=True` dataset row (for
    apo_zero_unpaired: no KL_completion_ids / ref_KL_logps, as TRL's mapping and precompute then add none);
  * the reference logps are computed here with `peft_model.disable_adapter()` (the base model), one unpadded plain
    forward per sequence;
  * the trainer object is `KTOTrainer.__new__(KTOTrainer)` with the attributes `__init__` sets from a `KTOConfig`;
  * the PeftModel is patched as `KTOTrainer.__init__` patches it:
    `add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "mean_logits"))`;
  * `KTOTrainer.compute_loss(obj, peft_model, inputs)` unmodified (train mode, float32, dropout 0), then
    `loss.backward()`; logps / kl / losses are read from `_compute_loss`'s locals (sys.settrace), the metrics from
    `obj._metrics["train"]`, the gradients from the LoRA parameters' `.grad` (zeroed between cases).
Sanity asserts: with every lora_B zeroed (on a deep copy) TRL's policy logps and policy KL logps equal the reference
logps computed here, kl = 0 and the kto loss (weights 1/1) is 0.5; with the real adapter TRL's logps equal plain
forwards with the adapter on, the KL logps carry no grad, and the LoRA gradients equal plain-forward autograd of the
same loss (for every case); the gradient keys are exactly the adapter_model.safetensors keys and none is all-zero.
"""

import copy
import hashlib
import json
import re
import sys
import tempfile
import types
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
from datasets import Dataset  # noqa: E402
from peft import PeftModel  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402
from trl import KTOConfig  # noqa: E402
from trl.data_utils import unpair_preference_dataset  # noqa: E402
from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference, KTOTrainer  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

PINNED = {"torch": "2.15.0", "trl": "1.16.0", "transformers": "5.24.0", "peft": "0.21.2"}
REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "tests" / "fixtures" / "dpo_trainer"  # model/ and adapter/ are reused from here
OUT = REPO / "tests" / "fixtures" / "kto_trainer"

SEED_IDS = 2254  # chosen so the raw batch KL estimate is > 0 (the clamp at 0 does not hide it)
BOS, EOS, PAD = 1, 2, 0
PROMPT_LENGTHS = [5, 7, 4, 6]  # BOS included
COMPLETION_LENGTHS = [6, 3, 8, 5]  # EOS included
LABELS = [True, False, True, False]
BATCH_SIZE = 4  # per_device_train_batch_size: the KL rotation chunk
FUSED_OUTPUTS = ("log_probs", "entropy", "mean_logits")  # what KTOTrainer.__init__ asks for
# (loss_type, beta, desirable_weight, undesirable_weight)
CASES = [
    ("kto", 0.1, 1.0, 1.0),
    ("kto", 0.5, 1.33, 1.0),
    ("apo_zero_unpaired", 0.1, 1.0, 1.0),
]


def f32(x):
    """float32 value(s) as Python floats with the shortest repr that round-trips to the same float32."""
    a = np.asarray(torch.as_tensor(x).detach().to(torch.float32).numpy(), dtype=np.float32)
    if a.ndim == 0:
        return float(str(a[()]))
    return [float(str(v)) for v in a.ravel()]


def peft_saved_key(live_name, adapter_name="default"):
    """`...q_proj.lora_A.default.weight` -> `...q_proj.lora_A.weight` (the adapter_model.safetensors key)."""
    return live_name.replace(f".{adapter_name}.", ".")


def make_examples(vocab):
    gen = torch.Generator().manual_seed(SEED_IDS)

    def ids(n):
        return torch.randint(3, vocab, (n,), generator=gen).tolist()

    return [{"prompt_ids": [BOS] + ids(p - 1), "completion_ids": ids(c - 1) + [EOS], "label": lab}
            for p, c, lab in zip(PROMPT_LENGTHS, COMPLETION_LENGTHS, LABELS, strict=True)]


def trl_add_kl_completion_ids():
    """TRL's own nested `add_kl_completion_ids` from KTOTrainer._prepare_dataset (no closure, no globals)."""
    (code,) = [c for c in KTOTrainer._prepare_dataset.__code__.co_consts
               if isinstance(c, types.CodeType) and c.co_name == "add_kl_completion_ids"]
    assert not code.co_freevars
    return types.FunctionType(code, {})


def add_kl(examples, batch_size):
    ds = Dataset.from_list([{k: e[k] for k in ("prompt_ids", "completion_ids", "label")} for e in examples])
    ds = ds.map(trl_add_kl_completion_ids(), batched=True, batch_size=batch_size)
    return [list(r) for r in ds["KL_completion_ids"]]


def summed_logps(model, prompt_ids, completion_ids):
    """Sum of log p(completion token | prefix) over the completion tokens, one unpadded plain forward."""
    ids = torch.tensor([prompt_ids + completion_ids])
    logits = model(input_ids=ids, use_cache=False).logits[0].float()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    tok = logp.gather(1, ids[0, 1:, None])[:, 0]
    return tok[len(prompt_ids) - 1:].sum()


def all_logps(model, examples):
    """(logps of prompt_i + completion_i, logps of prompt_i + KL_completion_i), plain forwards."""
    lp = torch.stack([summed_logps(model, e["prompt_ids"], e["completion_ids"]) for e in examples])
    kl = torch.stack([summed_logps(model, e["prompt_ids"], e["KL_completion_ids"]) for e in examples])
    return lp, kl


# ---------------------------------------------------------------------------------------------------------------
# TRL
# ---------------------------------------------------------------------------------------------------------------
def grads_of(model):
    return {peft_saved_key(n): p.grad for n, p in model.named_parameters() if p.requires_grad}


def make_trainer(cfg, model):
    """The attributes KTOTrainer.__init__ sets and _compute_loss / _compute_kl_logps read (TRL 1.16)."""
    obj = KTOTrainer.__new__(KTOTrainer)
    obj.args = cfg
    obj.accelerator = Accelerator(cpu=True)  # after KTOConfig, whose __post_init__ resets accelerate's state
    obj.model = model
    obj.ref_model = None  # unused with precomputed reference logps
    obj.beta = cfg.beta
    obj.precompute_ref_logps = cfg.precompute_ref_log_probs
    obj.loss_type = cfg.loss_type
    obj.desirable_weight = cfg.desirable_weight
    obj.undesirable_weight = cfg.undesirable_weight
    obj.calculate_KL = cfg.loss_type not in ["apo_zero_unpaired"]  # verbatim rule of __init__
    obj.router_aux_loss_coef = 0.0
    obj.aux_loss_enabled = False
    obj._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    obj._total_train_tokens = 0
    obj._tp_size = 1
    return obj


CODE = KTOTrainer._compute_loss.__code__
RETURN_LOCALS = ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps", "KL_logps",
                 "ref_KL_logps", "kl", "chosen_rewards", "rejected_rewards", "losses", "chosen_idx", "rejected_idx")


def traced(fn):
    """Run fn() and capture _compute_loss's locals at its return."""
    cap = {}

    def local(frame, event, arg):
        if event == "return" and "losses" in frame.f_locals:
            for k in RETURN_LOCALS:
                v = frame.f_locals[k]
                cap[k] = None if v is None else v
                if isinstance(v, torch.Tensor):
                    cap[k + "_requires_grad"] = v.requires_grad
                    cap[k] = v.detach().clone()
        return local

    def glob(frame, event, arg):
        return local if frame.f_code is CODE else None

    sys.settrace(glob)
    try:
        out = fn()
    finally:
        sys.settrace(None)
    return out, cap


def make_cfg(tmp, loss_type, beta, dw, uw):
    return KTOConfig(output_dir=tmp, use_cpu=True, bf16=False, report_to="none", loss_type=loss_type, beta=beta,
                     desirable_weight=dw, undesirable_weight=uw, precompute_ref_log_probs=True, max_length=None,
                     per_device_train_batch_size=BATCH_SIZE)


def trl_loss(model, inputs, loss_type, beta, dw, uw, tmp):
    cfg = make_cfg(tmp, loss_type, beta, dw, uw)
    obj = make_trainer(cfg, model)
    loss, cap = traced(lambda: KTOTrainer.compute_loss(obj, model, dict(inputs)))
    return obj, cfg, loss, cap


def make_inputs(examples, ref, ref_kl, calculate_kl):
    rows = []
    for e, r, rk in zip(examples, ref.tolist(), ref_kl.tolist(), strict=True):
        row = {"prompt_ids": e["prompt_ids"], "completion_ids": e["completion_ids"], "label": e["label"],
               "ref_logps": r}
        if calculate_kl:
            row.update(KL_completion_ids=e["KL_completion_ids"], ref_KL_logps=rk)
        rows.append(row)
    inputs = DataCollatorForUnpairedPreference(pad_token_id=PAD, max_length=None)(rows)
    # torch.tensor(list of Python floats) -> float32, exactly the float32 values computed here
    assert inputs["ref_logps"].dtype == torch.float32 and torch.equal(inputs["ref_logps"], ref)
    if calculate_kl:
        assert torch.equal(inputs["ref_KL_logps"], ref_kl)
    else:
        assert not any(k.startswith("KL_") or k == "ref_KL_logps" for k in inputs)
    return inputs


def own_loss(pol, pol_kl, ref, ref_kl, labels, loss_type, beta, dw, uw):
    """Independent restatement of TRL's loss (for the gradient cross-check); pol_kl is detached."""
    lab = torch.tensor(labels)
    lr = pol - ref
    if loss_type == "kto":
        kl = (pol_kl.detach() - ref_kl).mean().clamp(min=0)
        cl = 1 - torch.sigmoid(beta * (lr[lab] - kl))
        rl = 1 - torch.sigmoid(beta * (kl - lr[~lab]))
    else:
        cl = 1 - torch.sigmoid(beta * lr[lab])
        rl = torch.sigmoid(beta * lr[~lab])
    return torch.cat((dw * cl, uw * rl)).nanmean()


def unpair_demo():
    """TRL's unpair_preference_dataset on a 3-row paired dataset: order of the resulting rows."""
    paired = Dataset.from_dict({"prompt": ["p0", "p1", "p2"], "chosen": ["c0", "c1", "c2"],
                                "rejected": ["r0", "r1", "r2"], "extra": [0, 1, 2]})
    un = unpair_preference_dataset(paired)
    return [{"prompt": r["prompt"], "completion": r["completion"], "label": r["label"], "extra": r["extra"]}
            for r in un]


def kl_rotation_demo():
    """add_kl_completion_ids on 5 rows with per_device_train_batch_size 2: chunks [0,1], [2,3], [4]."""
    ds = Dataset.from_dict({"completion_ids": [[10], [11], [12], [13], [14]]})
    ds = ds.map(trl_add_kl_completion_ids(), batched=True, batch_size=2)
    return {"per_device_train_batch_size": 2, "completion_ids": [[10], [11], [12], [13], [14]],
            "KL_completion_ids": [list(r) for r in ds["KL_completion_ids"]]}


# ---------------------------------------------------------------------------------------------------------------
NOTES = {
    "batch_layout": (
        "DataCollatorForUnpairedPreference concatenates prompt_ids + completion_ids (and prompt_ids + "
        "KL_completion_ids) VERBATIM, one row per example in dataset order (no chosen/rejected regrouping in the "
        "batch), right-padded with pad_token_id 0 to the longest row of that tensor (the KL tensors are padded "
        "separately, to their own width), attention_mask 1 on real tokens, completion_mask 1 on completion tokens. "
        "With token ids given it adds no BOS/EOS: when TRL tokenizes text, _prepare_dataset appends eos_token as text "
        "to non-conversational completions and the tokenizer adds its BOS to the prompt, so here BOS (1) starts each "
        "prompt and EOS (2) ends each completion and is a scored completion token. label is a bool tensor; "
        "ref_logps / ref_KL_logps float32 tensors. No truncation (max_length None)."
    ),
    "logps": (
        "labels = input_ids with completion_mask == 0 set to -100; the fused LM head (add_fused_lm_head, outputs "
        "log_probs/entropy/mean_logits) scores hidden[:, :-1] against labels[:, 1:], 0 where -100; completion logps "
        "= per-row sum = sum over completion tokens of log p(token | prompt + previous completion tokens). The policy "
        "is the PeftModel with the adapter on; the reference is the base model (adapter disabled), precomputed here "
        "and passed as ref_logps / ref_KL_logps (precompute_ref_log_probs=True). chosen_* = rows with label True, "
        "rejected_* = rows with label False, via index_select in batch order."
    ),
    "kl_no_grad": (
        "The policy KL logps (_compute_kl_logps: prompt_i + KL_completion_i through the policy, adapter ON) are "
        "computed under torch.no_grad(): no gradient flows through the KL term. kl = (KL_logps - ref_KL_logps)"
        ".mean().detach() over ALL rows of the batch (desirable and undesirable alike), then "
        "accelerator.gather_for_metrics(kl).mean() (mean of the per-process means) and .clamp(min=0). So kl >= 0 "
        "and is a constant in the loss. apo_zero_unpaired: calculate_KL False, kl = torch.zeros(1) (metric 0.0), no "
        "KL forward at all."
    ),
    "loss": (
        "kto: chosen_losses = 1 - sigmoid(beta*((pc - rc) - kl)), rejected_losses = 1 - sigmoid(beta*(kl - (pr - rr))). "
        "apo_zero_unpaired: chosen_losses = 1 - sigmoid(beta*(pc - rc)), rejected_losses = sigmoid(beta*(pr - rr)). "
        "losses = cat(desirable_weight*chosen_losses, undesirable_weight*rejected_losses) (ALL chosen first, then "
        "all rejected; the fixture's per_example_losses are in this order), loss = losses.nanmean(): the plain mean "
        "over all B examples of the weighted losses (divides by B = num_chosen + num_rejected, NOT by the sum of "
        "weights). No length normalisation. loss_is_scaled_for_ga = False: the Trainer divides by the gradient "
        "accumulation steps itself. If a batch has no chosen (or no rejected) rows that side is an empty tensor and "
        "nanmean averages the other side only."
    ),
    "metrics": (
        "_metrics['train'] for this micro-batch (single process, so gathers are identities): kl = kl.item() (after "
        "clamp); rewards/chosen = sum(beta*(pc - rc)) / num_chosen (nansum over chosen examples only, divided by the "
        "chosen count); rewards/rejected likewise over rejected; logps/chosen = nansum(pc)/num_chosen, logps/rejected "
        "= nansum(pr)/num_rejected (policy logps); rewards/margins = rewards/chosen - rewards/rejected (only if both "
        "sides are present; there is no rewards/accuracies in KTO); entropy = token-weighted mean of the policy's "
        "per-token entropy over the main batch's completion tokens; logits/chosen, logits/rejected = token-weighted "
        "mean over chosen (rejected) completion tokens of the per-position mean over the vocabulary of the logits "
        "(the fused head's mean_logits); num_tokens = [running total of attention_mask.sum() of the main batch "
        "(KL rows not counted)]. The rewards use beta of the case and no KL term. Python floats computed from float32 "
        "tensors (divisions by counts in float64 Python), recorded here rounded to float32."
    ),
    "kl_rotation": (
        "_prepare_dataset (only when calculate_KL, i.e. loss_type != 'apo_zero_unpaired') maps the tokenized dataset "
        "with add_kl_completion_ids, batched=True, batch_size=per_device_train_batch_size: within each consecutive "
        "chunk of that many rows IN DATASET ORDER, KL_completion_ids = [completion_ids[-1]] + completion_ids[:-1] "
        "(row i gets the completion of row i-1, row 0 the chunk's last row's); the final chunk may be shorter and "
        "rotates within itself (a 1-row chunk pairs a row with its own completion). It runs after the max_length "
        "filter. It only equals an in-batch rotation because KTOConfig defaults train_sampling_strategy='sequential' "
        "(__init__ raises for any other strategy when calculate_KL) and requires per_device_train_batch_size > 1. "
        "The label plays no role. See kl_rotation_demo."
    ),
    "unpairing": (
        "A paired (chosen/rejected) dataset is unpaired by trl.data_utils.unpair_preference_dataset: Dataset.map("
        "_unpair_row, batched=True) with datasets' default batch_size 1000: for each 1000-row chunk, completion = "
        "chosen[0..n) + rejected[0..n), label = [True]*n + [False]*n, prompt and every other column duplicated "
        "(prompt + prompt). So for <= 1000 rows: all chosen rows first in order, then all rejected rows in order "
        "(NOT interleaved); with sequential sampling a batch then mostly holds one label. See unpair_demo (TRL's "
        "function on 3 pairs). It happens after extract_prompt and before add_eos/tokenization."
    ),
    "class_ratio_warning": (
        "Checked once on the prepared train Dataset: num_desirable = max(sum(label), 1); num_undesirable = "
        "max(len - num_desirable, 1) (uses the clamped num_desirable). Only if num_desirable != num_undesirable: "
        "des_lo = round(nu*uw/nd, 2), des_hi = round(nu*uw/nd*1.33, 2), und_lo = round(nd*dw/nu/1.33, 2), und_hi = "
        "round(nd*dw/nu, 2) (Python round, half-to-even on the binary float); warn (logger.warning, training "
        "continues) iff NOT (des_lo <= desirable_weight <= des_hi) AND NOT (und_lo <= undesirable_weight <= und_hi). "
        "Message: 'You have different amounts of desirable/positive and undesirable/negative examples but the "
        "weights on the desirable and undesirable losses don't seem to be in an ideal range. Based on your data, we "
        "recommend EITHER desirable_weight in [des_lo, des_hi] or undesirable_weight in [und_lo, und_hi] (but NOT "
        "BOTH). See the documentation on how to optimally set these weights.' Worked example: 3 desirable, 1 "
        "undesirable, weights 1/1 -> des [0.33, 0.44], und [2.26, 3.0] -> warns. This fixture's 2/2 never warns."
    ),
    "reference_with_peft": (
        "Caveat: a real KTOTrainer(model=PeftModel, ref_model=None) with peft>=0.20 adds a frozen 'ref' adapter "
        "copied from 'default' and uses it as the reference (use_adapter('ref')), so the reference is the INITIAL "
        "POLICY (logratios 0 at step one); the base model (adapter disabled) is the reference only when TRL itself "
        "wraps the model (peft_config=...) or the adapter is fresh. This fixture uses the base model as the reference "
        "(as the DPO trainer fixture does), passed in precomputed."
    ),
    "grads": (
        "d loss / d LoRA parameter after one backward of the scalar loss (no GA scaling, no clipping), keyed by the "
        "adapter_model.safetensors key, flattened row-major (lora_A [r, in], lora_B [out, r]); shape given. PEFT "
        "LoRA scale alpha/r = 2. Only the main (prompt + completion) forward contributes."
    ),
    "numerics": (
        "float32 throughout; CPU, one thread. Shortest decimal that round-trips to the same float32. The fused head "
        "matches a plain forward to ~1e-6."
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
    OUT.mkdir(parents=True, exist_ok=True)
    src_sha = {p: hashlib.sha256((SRC / p).read_bytes()).hexdigest() for p in
               ("model/config.json", "model/model.safetensors", "adapter/adapter_config.json",
                "adapter/adapter_model.safetensors")}

    base = LlamaForCausalLM.from_pretrained(str(SRC / "model"), attn_implementation="eager", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(SRC / "adapter"), is_trainable=True)
    saved = load_file(str(SRC / "adapter" / "adapter_model.safetensors"))
    live = {peft_saved_key(n): p for n, p in model.named_parameters() if p.requires_grad}
    assert set(live) == set(saved) and all(torch.equal(live[k].detach(), saved[k]) for k in saved)
    model.train()  # mode read from model.training; all dropout probabilities are 0
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    copy_b0 = copy.deepcopy(model)  # before patching
    copy_plain = copy.deepcopy(model)  # unpatched, for the gradient cross-check

    examples = make_examples(base.config.vocab_size)
    for e, kl in zip(examples, add_kl(examples, BATCH_SIZE), strict=True):
        e["KL_completion_ids"] = kl
    assert [e["KL_completion_ids"] for e in examples] == \
        [examples[(i - 1) % 4]["completion_ids"] for i in range(4)]

    with torch.no_grad():
        with model.disable_adapter():
            ref, ref_kl = all_logps(model, examples)
        own_p, own_pkl = all_logps(model, examples)  # adapter on
    assert (own_p - ref).abs().max() > 0.05, "the adapter should change the logps"
    raw_kl = (own_pkl - ref_kl).mean().item()

    add_fused_lm_head(model.get_base_model(), outputs=FUSED_OUTPUTS)
    labels = [e["label"] for e in examples]
    ch = [i for i, lab in enumerate(labels) if lab]
    rj = [i for i, lab in enumerate(labels) if not lab]

    with tempfile.TemporaryDirectory() as tmp:
        # Sanity: lora_B = 0 (on a copy) => policy == reference, kl = 0, kto loss = 0.5.
        with torch.no_grad():
            for n, p in copy_b0.named_parameters():
                if "lora_B" in n:
                    p.zero_()
        add_fused_lm_head(copy_b0.get_base_model(), outputs=FUSED_OUTPUTS)
        inputs_kl = make_inputs(examples, ref, ref_kl, True)
        _, _, loss0, cap0 = trl_loss(copy_b0, inputs_kl, "kto", 0.1, 1.0, 1.0, tmp + "/unused")
        assert torch.allclose(cap0["chosen_logps"], ref[ch], rtol=0, atol=2e-5)
        assert torch.allclose(cap0["rejected_logps"], ref[rj], rtol=0, atol=2e-5)
        assert torch.allclose(cap0["KL_logps"], ref_kl, rtol=0, atol=2e-5), (cap0["KL_logps"], ref_kl)
        assert abs(cap0["kl"].item()) < 2e-5 and abs(loss0.item() - 0.5) < 1e-5, (cap0["kl"], loss0)
        del copy_b0

        cases = []
        for loss_type, beta, dw, uw in CASES:
            calc_kl = loss_type != "apo_zero_unpaired"
            inputs = make_inputs(examples, ref, ref_kl, calc_kl)
            model.zero_grad(set_to_none=True)
            obj, cfg, loss, cap = trl_loss(model, inputs, loss_type, beta, dw, uw, tmp + "/unused")
            assert obj.calculate_KL == calc_kl
            assert loss.dtype == torch.float32 and loss.dim() == 0
            loss.backward()
            assert torch.allclose(cap["chosen_logps"], own_p[ch], rtol=0, atol=2e-5)
            assert torch.allclose(cap["rejected_logps"], own_p[rj], rtol=0, atol=2e-5)
            assert cap["chosen_idx"].tolist() == ch and cap["rejected_idx"].tolist() == rj
            if calc_kl:
                assert torch.allclose(cap["KL_logps"], own_pkl, rtol=0, atol=2e-5)
                assert cap["KL_logps_requires_grad"] is False, "TRL computes the KL logps under no_grad"
                assert torch.equal(cap["ref_KL_logps"], ref_kl)
                assert abs(cap["kl"].item() - max(raw_kl, 0.0)) < 2e-5
            else:
                assert cap["KL_logps"] is None and cap["ref_KL_logps"] is None and cap["kl"].item() == 0.0
            # Gradient cross-check: plain-forward autograd of the restated loss.
            copy_plain.zero_grad(set_to_none=True)
            pol = torch.stack([summed_logps(copy_plain, e["prompt_ids"], e["completion_ids"]) for e in examples])
            mine = own_loss(pol, own_pkl, ref, ref_kl, labels, loss_type, beta, dw, uw)
            mine.backward()
            assert abs(mine.item() - loss.item()) < 1e-5, (mine.item(), loss.item())
            grads = grads_of(model)
            for n, p in copy_plain.named_parameters():
                if p.requires_grad:
                    assert torch.allclose(p.grad, grads[peft_saved_key(n)], rtol=1e-4, atol=1e-6), n
            assert set(grads) == set(saved), sorted(set(grads) ^ set(saved))[:4]
            for n, g in grads.items():
                assert g is not None and g.abs().max() > 0, f"zero gradient for {n}"
                assert list(g.shape) == list(saved[n].shape)
            assert all(len(v) == 1 for v in obj._metrics["train"].values())
            metrics = {k: f32(obj._metrics["train"][k][0]) for k in sorted(obj._metrics["train"])}
            metrics["num_tokens"] = int(obj._metrics["train"]["num_tokens"][0])
            cases.append({
                "name": f"{loss_type}_beta{beta}_dw{dw}_uw{uw}",
                "loss_type": loss_type,
                "beta": beta,
                "desirable_weight": dw,
                "undesirable_weight": uw,
                "calculate_KL": calc_kl,
                "batch_keys": sorted(inputs),
                "loss": f32(loss),
                "per_example_losses_chosen_then_rejected": f32(cap["losses"]),
                "policy_logps": f32(own_p_from(cap, ch, rj)),
                "policy_KL_logps": f32(cap["KL_logps"]) if calc_kl else None,
                "kl": f32(cap["kl"].reshape(())) if calc_kl else 0.0,
                "chosen_rewards": f32(cap["chosen_rewards"]),
                "rejected_rewards": f32(cap["rejected_rewards"]),
                "metrics": metrics,
                "grads": {n: {"shape": list(grads[n].shape), "values": f32(grads[n])} for n in sorted(grads)},
            })
            print(f"  {cases[-1]['name']}: loss={loss.item():.7f} kl={cases[-1]['kl']}", file=sys.stderr)

    fixture = {
        "description": "First step of TRL's KTOTrainer (compute_loss + backward) on the tiny random Llama + non-zero "
        "PEFT LoRA adapter of tests/fixtures/dpo_trainer/ (policy = base + adapter, reference = base, precomputed), "
        "generated by scripts/gen_kto_fixture.py. float32.",
        "regenerate": "/work/pyref-trl/bin/python scripts/gen_kto_fixture.py",
        "versions": versions,
        "model_dir": "../dpo_trainer/model",
        "adapter_dir": "../dpo_trainer/adapter",
        "source_sha256": src_sha,
        "special_ids": {"bos": BOS, "eos": EOS, "pad": PAD},
        "per_device_train_batch_size": BATCH_SIZE,
        "examples": examples,
        "labels": labels,
        "ref_logps": f32(ref),
        "ref_KL_logps": f32(ref_kl),
        "raw_kl_before_clamp": f32(torch.tensor(raw_kl)),
        "batch": {k: inputs_kl[k].tolist() for k in ("input_ids", "attention_mask", "completion_mask",
                                                     "KL_input_ids", "KL_attention_mask", "KL_completion_mask")},
        "unpair_demo": unpair_demo(),
        "kl_rotation_demo": kl_rotation_demo(),
        "notes": NOTES,
        "cases": cases,
    }
    path = OUT / "cases.json"
    path.write_text(dump(fixture) + "\n")
    size = path.stat().st_size
    print(f"  {path.relative_to(REPO)} {size} B sha256 {hashlib.sha256(path.read_bytes()).hexdigest()[:16]}",
          file=sys.stderr)
    assert size < 300_000, size


def own_p_from(cap, ch, rj):
    """Policy logps back in example order from TRL's chosen/rejected split."""
    out = torch.empty(len(ch) + len(rj))
    out[ch] = cap["chosen_logps"]
    out[rj] = cap["rejected_logps"]
    return out


if __name__ == "__main__":
    main()
