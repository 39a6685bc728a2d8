#!/usr/bin/env python3
"""First-step reference of TRL's own CPOTrainer and ORPOTrainer (trl.experimental.cpo / trl.experimental.orpo in
TRL 1.16) on the tiny random Llama + non-zero PEFT LoRA adapter + 3 token-id preference pairs of
tests/fixtures/dpo_trainer/ (read from there, not regenerated). Policy = base + adapter; both methods are
reference-free.

Writes tests/fixtures/cpo_orpo/cases.json: the batch exactly as TRL builds it, and per case the config parameters,
TRL's loss, the policy's summed AND per-token-averaged completion logps (and which one the method uses), every
metric TRL stores for the step under its exact name, d loss / d (per-sequence logps, nll term), and (for the cases
in FULL_GRADS, see below) the gradient of every LoRA parameter keyed by its adapter_model.safetensors name.
Deterministic (one CPU thread, float32, no randomness), CPU only, ~10 s (mostly imports).

Regenerate (same venv as scripts/gen_dpo_trainer_fixture.py):

    /work/pyref-trl/bin/python scripts/gen_cpo_orpo_fixture.py

How TRL is called (approach of scripts/gen_dpo_trainer_fixture.py):
  * dataset rows: CPO/ORPO tokenize TEXT (`tokenize_row`, run by `__init__` through `Dataset.map`), so the token-id
    pairs are turned into strings with one private-use character per token id (chr(0xE000 + id)) and tokenized by a
    stub tokenizer that maps each character back to its id (add_special_tokens is a no-op; bos 1, eos 2, pad 0). It
    satisfies enc(a + b) = enc(a) + enc(b), so TRL's own `maybe_extract_prompt`, `maybe_apply_chat_template` (both
    no-ops for plain strings) and `tokenize_row` (unmodified, on the trainer object) produce exactly the ids given;
    the row is {**text_row, **tokenize_row(text_row)} as `Dataset.map` would merge it, and TRL's own
    `DPODataCollatorWithPadding(pad_token_id=0)` (the default collator `__init__` builds) makes the batch;
  * the trainer object is `CPOTrainer.__new__(CPOTrainer)` / `ORPOTrainer.__new__(ORPOTrainer)` with the attributes
    `__init__` sets from a real `CPOConfig` / `ORPOConfig` (make_cpo / make_orpo mirror its lines);
  * the model is the PeftModel (base from dpo_trainer/model, adapter from dpo_trainer/adapter, `is_trainable=True`),
    train mode, eager attention, float32, all dropout 0. CPO/ORPO do not patch the model (no fused LM head): they call
    model(...).logits;
  * `compute_loss(obj, model, batch)` unmodified, then `loss.backward()` on zeroed grads; the tensors are read from
    `get_batch_loss_metrics`'s and `concatenated_forward`'s locals at their return (sys.settrace), the metrics from
    `obj._stored_metrics["train"]`, the gradients from the LoRA parameters' `.grad`.
Sanity asserts: the loaded LoRA weights equal adapter_model.safetensors; the batch is prompt+completion verbatim with
-100 prompt labels; TRL's logps equal an unpadded plain forward per sequence and the DPO fixture's policy logps; for
EVERY case the loss recomputed by plain autograd of this script's own transcription of the formula (unpadded
forwards) matches TRL's within 1e-5, and for the FULL_GRADS cases so do all LoRA gradients; the gradient keys are
exactly the adapter's tensor names and none is all-zero (checked for every case).

Size: one case's LoRA gradients are 4096 float32 (~55 KB of JSON); all 8 cases would be ~450 KB, over the 300 KB
budget, so only the FULL_GRADS cases carry `grads` (the other cases have `grads: null`). Every case carries
`dloss_dlogps` (d loss / d TRL's per-sequence chosen/rejected logps and d loss / d nll_loss), which together with a
full-gradient case pins the remaining cases' parameter gradients (the model backward is shared).
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
from peft import PeftModel  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402
from trl.data_utils import maybe_apply_chat_template, maybe_extract_prompt  # noqa: E402
from trl.experimental.cpo import CPOConfig, CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOConfig, ORPOTrainer  # noqa: E402
from trl.experimental.utils import DPODataCollatorWithPadding  # noqa: E402

PINNED = {"torch": "2.15.0", "trl": "1.16.0", "transformers": "5.24.0", "peft": "0.21.2"}
REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "tests" / "fixtures" / "dpo_trainer"
OUT = REPO / "tests" / "fixtures" / "cpo_orpo"
BOS, EOS, PAD = 1, 2, 0
CHAR0 = 0xE000  # token id n <-> chr(CHAR0 + n) (Unicode private-use area)

# (name, trainer, config kwargs). "alphapo" is CPOConfig sugar: __post_init__ turns it into loss_type "simpo" with
# cpo_alpha 0.0; the AlphaPO reward shape itself comes from `alpha` (default 0.0, so it must be given).
CASES = [
    ("cpo_sigmoid_beta0.1", "cpo", dict(loss_type="sigmoid", beta=0.1, cpo_alpha=1.0)),
    ("cpo_hinge_beta0.1", "cpo", dict(loss_type="hinge", beta=0.1, cpo_alpha=1.0)),
    ("cpo_ipo_beta0.5", "cpo", dict(loss_type="ipo", beta=0.5, cpo_alpha=1.0)),
    ("cpo_simpo_beta2.0_gamma0.5", "cpo", dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5, cpo_alpha=0.0)),
    ("cpo_alphapo_beta2.0_gamma0.5_alpha0.5", "cpo", dict(loss_type="alphapo", beta=2.0, simpo_gamma=0.5,
                                                          alpha=0.5)),
    ("cpo_sigmoid_beta0.1_ls0.1", "cpo", dict(loss_type="sigmoid", beta=0.1, cpo_alpha=1.0, label_smoothing=0.1)),
    ("orpo_beta0.1", "orpo", dict(beta=0.1)),
    ("orpo_beta0.5", "orpo", dict(beta=0.5)),
]
FULL_GRADS = {"cpo_sigmoid_beta0.1", "cpo_simpo_beta2.0_gamma0.5", "cpo_alphapo_beta2.0_gamma0.5_alpha0.5",
              "orpo_beta0.1"}
CPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/rejected",
               "logps/chosen", "logits/rejected", "logits/chosen", "nll_loss")
ORPO_METRICS = CPO_METRICS + ("log_odds_ratio", "log_odds_chosen")


def f32(x):
    """float32 value(s) as Python floats with the shortest repr that round-trips to the same float32."""
    a = np.asarray(torch.as_tensor(x).detach().to(torch.float32).numpy(), dtype=np.float32)
    if a.ndim == 0:
        return float(str(a[()]))
    return [float(str(v)) for v in a.ravel()]


def peft_saved_key(live_name, adapter_name="default"):
    """`...q_proj.lora_A.default.weight` -> `...q_proj.lora_A.weight` (the adapter_model.safetensors key)."""
    return live_name.replace(f".{adapter_name}.", ".")


def dump(obj):
    text = json.dumps(obj, indent=1)
    return re.sub(r"\[\s*([-0-9.eE+,\s]+?)\s*\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text)


# ---------------------------------------------------------------------------------------------------------------
# Stub tokenizer: one private-use character per token id
# ---------------------------------------------------------------------------------------------------------------
def to_text(ids):
    return "".join(chr(CHAR0 + i) for i in ids)


class CharTokenizer:
    """What tokenize_row / build_tokenized_answer use of a tokenizer: __call__(text, add_special_tokens=False) ->
    {"input_ids", "attention_mask"} (lists), bos/eos/pad ids."""
    bos_token_id, eos_token_id, pad_token_id = BOS, EOS, PAD
    pad_token, eos_token = "<pad>", "</s>"

    def __call__(self, text, add_special_tokens=False, **kw):
        assert not kw, kw
        ids = [ord(c) - CHAR0 for c in text]
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}


# ---------------------------------------------------------------------------------------------------------------
# Trainer objects (the attributes __init__ sets from the config, TRL 1.16)
# ---------------------------------------------------------------------------------------------------------------
def common(obj, cfg, model, tok):
    obj.args = cfg
    obj.accelerator = Accelerator(cpu=True)  # after the config, whose __post_init__ resets accelerate's state
    obj.model = model
    obj._peft_has_been_casted_to_bf16 = False
    obj.is_encoder_decoder = model.config.is_encoder_decoder
    obj.max_length = cfg.max_length if cfg.max_length is not None else 512
    obj.generate_during_eval = cfg.generate_during_eval
    obj.processing_class = tok
    obj.use_dpo_data_collator = True
    obj.aux_loss_enabled = getattr(model.config, "output_router_logits", False)
    obj.aux_loss_coef = getattr(model.config, "router_aux_loss_coef", 0.0)
    obj._stored_metrics = defaultdict(lambda: defaultdict(list))


def make_cpo(cfg, model, tok):
    obj = CPOTrainer.__new__(CPOTrainer)
    common(obj, cfg, model, tok)
    obj.max_completion_length = cfg.max_completion_length
    obj.pad_token_id = tok.pad_token_id
    obj.beta = cfg.beta
    obj.label_smoothing = cfg.label_smoothing
    obj.loss_type = cfg.loss_type
    obj.cpo_alpha = cfg.cpo_alpha
    if cfg.loss_type == "simpo":
        obj.simpo_gamma = cfg.simpo_gamma
    obj.alpha = cfg.alpha
    return obj


def make_orpo(cfg, model, tok):
    obj = ORPOTrainer.__new__(ORPOTrainer)
    common(obj, cfg, model, tok)
    obj.max_completion_length = cfg.max_completion_length
    obj.padding_value = cfg.padding_value if cfg.padding_value is not None else tok.pad_token_id
    obj.beta = cfg.beta
    return obj


def make_batch(obj, pairs):
    rows = []
    for p in pairs:
        text = {"prompt": to_text(p["prompt_ids"]), "chosen": to_text(p["chosen_ids"]),
                "rejected": to_text(p["rejected_ids"])}
        row = maybe_apply_chat_template(maybe_extract_prompt(dict(text)), processing_class=obj.processing_class)
        assert row == text  # plain strings: both are no-ops
        rows.append({**row, **obj.tokenize_row(row)})
    for r, p in zip(rows, pairs, strict=True):  # tokenize_row reproduces the given ids (BOS/EOS already there)
        n = len(p["prompt_ids"])
        assert r["prompt_input_ids"] == p["prompt_ids"]
        for side in ("chosen", "rejected"):
            assert r[f"{side}_input_ids"] == p["prompt_ids"] + p[f"{side}_ids"]
            assert r[f"{side}_attention_mask"] == [1] * len(r[f"{side}_input_ids"])
            assert r[f"{side}_labels"] == [-100] * n + p[f"{side}_ids"]
    return DPODataCollatorWithPadding(pad_token_id=PAD, is_encoder_decoder=False)(rows)


# ---------------------------------------------------------------------------------------------------------------
# Tracing TRL's locals
# ---------------------------------------------------------------------------------------------------------------
def traced(fn, codes):
    """Run fn() and capture the locals of the functions whose code objects are in `codes` at their return."""
    cap = {}

    def local(frame, event, arg):
        if event == "return":
            cap[frame.f_code.co_name] = dict(frame.f_locals)
        return local

    def glob(frame, event, arg):
        return local if frame.f_code in codes else None

    sys.settrace(glob)
    try:
        out = fn()
    finally:
        sys.settrace(None)
    return out, cap


def run_trl(kind, kwargs, model, tok, pairs, tmp):
    base = dict(output_dir=tmp, use_cpu=True, bf16=False, report_to="none")
    if kind == "cpo":
        cfg = CPOConfig(**base, **kwargs)
        obj, cls = make_cpo(cfg, model, tok), CPOTrainer
    else:
        cfg = ORPOConfig(**base, **kwargs)
        obj, cls = make_orpo(cfg, model, tok), ORPOTrainer
    batch = make_batch(obj, pairs)
    codes = {cls.get_batch_loss_metrics.__code__, cls.concatenated_forward.__code__}
    if kind == "orpo":
        codes.add(cls.odds_ratio_loss.__code__)
    loss, cap = traced(lambda: cls.compute_loss(obj, model, dict(batch)), codes)
    return obj, cfg, cls, batch, loss, cap


# ---------------------------------------------------------------------------------------------------------------
# Own transcription (plain autograd, one unpadded forward per sequence)
# ---------------------------------------------------------------------------------------------------------------
def token_logps(model, ids):
    """log p(ids[t] | ids[:t]) for t = 1..T-1, one unpadded plain forward."""
    x = torch.tensor([ids])
    logp = torch.log_softmax(model(input_ids=x, use_cache=False).logits[0].float()[:-1], dim=-1)
    return logp.gather(1, x[0, 1:, None])[:, 0]


def own_forward(model, pairs):
    """Per pair and side: completion-token logps; and the chosen sequences' all-token logps (ORPO's NLL)."""
    out = {"chosen": [], "rejected": [], "chosen_full": []}
    for p in pairs:
        n = len(p["prompt_ids"])
        for side in ("chosen", "rejected"):
            tl = token_logps(model, p["prompt_ids"] + p[f"{side}_ids"])
            out[side].append(tl[n - 1:])
            if side == "chosen":
                out["chosen_full"].append(tl)
    return out


def own_loss(kind, cfg, f):
    tok_c, tok_r = f["chosen"], f["rejected"]
    sum_c = torch.stack([t.sum() for t in tok_c])
    sum_r = torch.stack([t.sum() for t in tok_r])
    avg_c = torch.stack([t.mean() for t in tok_c])
    avg_r = torch.stack([t.mean() for t in tok_r])
    logsig = torch.nn.functional.logsigmoid
    if kind == "orpo":
        def log1m_exp(x):
            return torch.log(-torch.expm1(x))
        log_odds = (avg_c - avg_r) - (log1m_exp(avg_c) - log1m_exp(avg_r))
        nll = -torch.cat(f["chosen_full"]).mean()  # prompt (after BOS) + completion tokens, batch token mean
        return nll - cfg.beta * logsig(log_odds).mean()
    lt, beta, ls, a = cfg.loss_type, cfg.beta, cfg.label_smoothing, cfg.alpha
    pc, pr = (avg_c, avg_r) if lt in ("ipo", "simpo") else (sum_c, sum_r)
    if a != 0.0:
        z = (1 - torch.exp(pc) ** (-a)) / a - (1 - torch.exp(pr) ** (-a)) / a
    else:
        z = pc - pr
    if lt == "simpo":
        z = z - cfg.simpo_gamma / beta
    if lt in ("sigmoid", "simpo"):
        per = -logsig(beta * z) * (1 - ls) - logsig(-beta * z) * ls
    elif lt == "hinge":
        per = torch.relu(1 - beta * z)
    elif lt == "ipo":
        per = (z - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(lt)
    nll = -torch.cat(tok_c).mean()  # chosen completion tokens (EOS included), batch token mean
    return per.mean() + cfg.cpo_alpha * nll


# ---------------------------------------------------------------------------------------------------------------
NOTES = {
    "where": "TRL 1.16 has no CPOTrainer/ORPOTrainer in trl.trainer: they live in trl.experimental.cpo "
    "(CPOConfig, CPOTrainer) and trl.experimental.orpo (ORPOConfig, ORPOTrainer); both are the old-style trainers "
    "(tokenize_row + DPODataCollatorWithPadding + concatenated_forward), not DPOTrainer's new pipeline.",
    "batch_layout": (
        "tokenize_row works on TEXT: prompt tokenized without special tokens; a BOS is prepended only if the prompt "
        "does not already start with bos_token_id, an EOS appended to chosen/rejected only if they do not already "
        "end with eos_token_id. With these ids (prompt starts with BOS 1, completions end with EOS 2) nothing is "
        "added: chosen_input_ids = prompt_ids + chosen_ids, chosen_attention_mask all 1, chosen_labels = [-100] * "
        "len(prompt_ids) + chosen_ids (same for rejected), prompt_input_ids = prompt_ids. No truncation (max_length "
        "1024 default; if prompt+completion > max_length the COMPLETION is cut, and the EOS with it). "
        "DPODataCollatorWithPadding right-pads each key over the batch: *_input_ids with pad_token_id 0, *_labels "
        "with -100, *_attention_mask with 0 (prompt_* left-padded, unused by the loss). concatenated_inputs then pads "
        "chosen_* and rejected_* to the common width max(chosen width, rejected width) (same pad values; ORPO uses "
        "padding_value = args.padding_value or the tokenizer's pad id, CPO the tokenizer's pad id) and stacks "
        "[chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}] (2B rows): ONE forward, model(input_ids, "
        "attention_mask, use_cache=False), plain logits (no fused head). len_chosen = B; chosen = first B rows."
    ),
    "logps": (
        "get_batch_logps: logits[:, :-1] scored against labels[:, 1:] (log_softmax, temperature 1); tokens with label "
        "-100 (prompt and padding) masked out. Sum over the completion tokens (EOS included) = summed logp; "
        "average_log_prob=True divides by the number of completion tokens of that sequence (per-sequence mean, not a "
        "batch token mean). CPO: average_log_prob = loss_type in ['ipo', 'simpo'] (alphapo is simpo, so averaged); "
        "sigmoid/hinge (with or without label smoothing) use SUMMED logps. ORPO: always averaged. The fixture gives "
        "both (`summed_logps`, `avg_logps`) and `logps_used` names which one TRL fed to the loss (= TRL's "
        "`chosen_logps`/`rejected_logps` and the logps/* metrics)."
    ),
    "cpo_loss": (
        "z = pc - pr (the logps_used); if alpha != 0 (AlphaPO): z = r(pc) - r(pr) with r(l) = (1 - exp(l)^(-alpha)) / "
        "alpha. simpo: z -= simpo_gamma / beta. sigmoid and simpo: -logsigmoid(beta z) (1 - ls) - logsigmoid(-beta z)"
        " ls (label_smoothing ls supported for these two only); hinge: relu(1 - beta z); ipo: (z - 1/(2 beta))^2. "
        "loss = mean over the B pairs + cpo_alpha * nll_loss (cpo_alpha 0 => nll_loss is a constant 0, not computed). "
        "NLL: nn.CrossEntropyLoss (mean, ignore_index -100) over the CHOSEN rows' shifted concatenated_labels = "
        "chosen completion tokens only, EOS included, prompt and padding excluded; a mean over all chosen completion "
        "tokens of the batch (token-weighted), not a mean of per-sequence means; computed from the same forward. "
        "loss_type 'alphapo' is CPOConfig sugar: __post_init__ sets loss_type='simpo', cpo_alpha=0.0 but leaves "
        "alpha at its default 0.0 (so 'alphapo' alone is plain SimPO); alpha applies to every loss_type."
    ),
    "cpo_rewards_metrics": (
        "chosen_rewards = beta * pc (detached; pc = the logps_used, so summed for sigmoid/hinge, averaged for "
        "ipo/simpo); with alpha != 0: beta * r(pc). rewards/accuracies = mean((chosen_rewards > rejected_rewards)."
        "float()), strict >. rewards/margins = mean(chosen_rewards - rejected_rewards). logps/chosen|rejected = "
        "mean of the logps_used. logits/chosen|rejected = mean of ALL logits of the chosen|rejected rows over the "
        "full padded width (max(chosen width, rejected width)) and the whole vocabulary, padding positions included "
        "(padding-dependent: a different batch width changes them). nll_loss = the NLL term (0 when cpo_alpha = 0). "
        "Metric names in _stored_metrics['train']: " + ", ".join(CPO_METRICS) + "; eval uses the prefix 'eval_'; "
        "logged values are the mean over the stored micro-batch values."
    ),
    "orpo_loss": (
        "pc, pr = per-sequence AVERAGED completion logps. log_odds = (pc - pr) - (log1mexp(pc) - log1mexp(pr)), "
        "log1mexp(x) = log(1 - exp(x)) (log1p(-exp(x)) for x < -ln 2, else log(-expm1(x))). ratio = logsigmoid("
        "log_odds); TRL's per-pair `losses` = beta * ratio (<= 0; fixture `per_pair_losses`), loss = nll_loss - "
        "mean(losses) = nll_loss - beta * mean(ratio) (beta = lambda). NLL: nn.CrossEntropyLoss (mean) over the "
        "CHOSEN rows with labels = input_ids where attention_mask == 1 else -100, shifted: i.e. over the FULL chosen "
        "sequence, PROMPT TOKENS INCLUDED (every token after the first BOS, EOS included), padding excluded; a mean "
        "over all those tokens of the batch (token-weighted). This differs from CPO's NLL (completion only)."
    ),
    "orpo_rewards_metrics": (
        "chosen_rewards = beta * pc (averaged logps, detached); rewards/accuracies strict >; rewards/margins = mean "
        "difference; logps/* = mean averaged logps; logits/chosen|rejected = mean of all logits of those rows at "
        "positions 0..W-2 of the padded width W (padding included, last position dropped); nll_loss; log_odds_ratio "
        "= mean(logsigmoid(log_odds)); log_odds_chosen = mean(log_odds). Names: " + ", ".join(ORPO_METRICS) + "."
    ),
    "flags": (
        "is_encoder_decoder = model.config.is_encoder_decoder = False (Llama): decoder-only path (shift by one, "
        "input_ids+attention_mask). label_pad_token_id is not a parameter in 1.16: -100 is hard-coded (labels "
        "padding, prompt masking, CrossEntropyLoss ignore_index). padding_value (ORPO) / pad_token_id (CPO) only "
        "fills padded input positions, which are masked (attention 0, label -100), so it does not affect loss, "
        "logps or gradients, only the padding-dependent logits/* metrics. No reference model anywhere. "
        "aux_loss_enabled False (no output_router_logits). compute_loss wraps nothing (no bf16 PEFT cast); "
        "loss_is_scaled_for_ga = False. Real runs default to bf16=True and gradient_checkpointing=True "
        "(CPOConfig/ORPOConfig via _BaseConfig); here bf16=False, float32, no checkpointing (numerically the same "
        "gradients in float32)."
    ),
    "dloss_dlogps": (
        "d loss / d TRL's per-sequence chosen_logps and rejected_logps (the logps_used) and d loss / d nll_loss "
        "(= cpo_alpha for CPO, 1 for ORPO; null when the NLL term is a constant), by torch.autograd.grad on TRL's own "
        "graph before backward."
    ),
    "grads": (
        "d loss / d LoRA parameter after one backward of TRL's scalar loss (zeroed grads, no accumulation scaling, no "
        "clipping), keyed by the adapter_model.safetensors key, flattened row-major (lora_A [r, in], lora_B [out, "
        "r]), shape given; PEFT scale alpha/r = 2. Only for the cases in `full_grads_cases` (size budget); the other "
        "cases have grads null."
    ),
    "numerics": (
        "float32 throughout, CPU, one thread, eager attention. Numbers are the shortest decimals that round-trip to "
        "the same float32. The padded 2B-row forward matches unpadded forwards to ~1e-6."
    ),
}


def main():
    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "trl": trl.__version__,
                "transformers": transformers.__version__, "peft": peft.__version__,
                "accelerate": accelerate.__version__, "datasets": datasets.__version__, "numpy": np.__version__,
                "safetensors": safetensors.__version__}
    for k, v in PINNED.items():
        if versions[k].split("+")[0] != v:
            print(f"warning: {k} {versions[k]} != pinned {v}; the fixture will record the installed one",
                  file=sys.stderr)
    src = json.loads((SRC / "cases.json").read_text())
    pairs = src["pairs"]
    assert src["special_ids"] == {"bos": BOS, "eos": EOS, "pad": PAD}

    base = LlamaForCausalLM.from_pretrained(str(SRC / "model"), attn_implementation="eager", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(SRC / "adapter"), is_trainable=True)
    model.train()
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    saved = load_file(str(SRC / "adapter" / "adapter_model.safetensors"))
    live = {peft_saved_key(n): p for n, p in model.named_parameters() if p.requires_grad}
    assert set(live) == set(saved), sorted(set(live) ^ set(saved))[:4]
    assert all(torch.equal(live[k].detach(), saved[k]) for k in saved)
    plain = copy.deepcopy(model)  # for the own-transcription cross-check
    tok = CharTokenizer()

    cases, batch_record = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for name, kind, kwargs in CASES:
            model.zero_grad(set_to_none=True)
            obj, cfg, cls, batch, loss, cap = run_trl(kind, kwargs, model, tok, pairs, tmp + "/unused")
            assert loss.dtype == torch.float32 and loss.dim() == 0
            m, fw = cap["get_batch_loss_metrics"], cap["concatenated_forward"]
            pc_t, pr_t, nll_t = m["policy_chosen_logps"], m["policy_rejected_logps"], m["policy_nll_loss"]
            wrt = [pc_t, pr_t] + ([nll_t] if nll_t.requires_grad else [])
            dl = torch.autograd.grad(loss, wrt, retain_graph=True)
            loss.backward()

            # Both logps variants with TRL's own get_batch_logps on TRL's own logits and labels.
            logits = fw["all_logits"].detach()
            labels = fw["concatenated_batch"]["concatenated_labels"]
            B = len(pairs)
            lp = {avg: cls.get_batch_logps(logits, labels, average_log_prob=avg, is_encoder_decoder=False)
                  for avg in (False, True)}
            used_avg = kind == "orpo" or cfg.loss_type in ("ipo", "simpo")
            assert torch.equal(pc_t.detach(), lp[used_avg][:B]) and torch.equal(pr_t.detach(), lp[used_avg][B:])

            # Own transcription: unpadded plain forwards, plain autograd.
            plain.zero_grad(set_to_none=True)
            f = own_forward(plain, pairs)
            own_sum = torch.stack([t.sum() for t in f["chosen"] + f["rejected"]])
            own_avg = torch.stack([t.mean() for t in f["chosen"] + f["rejected"]])
            assert torch.allclose(own_sum, lp[False], rtol=0, atol=2e-5), (own_sum, lp[False])
            assert torch.allclose(own_avg, lp[True], rtol=0, atol=2e-6), (own_avg, lp[True])
            # Same policy as the DPO fixture: its TRL-computed policy logps (fused head) are the summed logps here.
            dpo_pol = torch.tensor(src["cases"][0]["chosen_logps"] + src["cases"][0]["rejected_logps"])
            assert torch.allclose(lp[False], dpo_pol, rtol=0, atol=2e-5), (lp[False], dpo_pol)
            own = own_loss(kind, cfg, f)
            assert abs(own.item() - loss.item()) < 1e-5, (name, own.item(), loss.item())
            grads = {peft_saved_key(n): p.grad for n, p in model.named_parameters() if p.requires_grad}
            assert set(grads) == set(saved), sorted(set(grads) ^ set(saved))[:4]
            for n, g in grads.items():
                assert g is not None and g.abs().max() > 0, f"zero gradient for {n}"
                assert list(g.shape) == list(saved[n].shape)
            if name in FULL_GRADS:
                own.backward()
                for n, p in plain.named_parameters():
                    if p.requires_grad:
                        g = grads[peft_saved_key(n)]
                        tol = max(1e-6, 1e-5 * g.abs().max().item())  # alphapo's grads are O(0.5)
                        assert torch.allclose(p.grad, g, rtol=1e-4, atol=tol), (name, n, (p.grad - g).abs().max())

            if batch_record is None:
                cb = obj.concatenated_inputs(batch, is_encoder_decoder=False, padding_value=PAD)
                batch_record = {
                    "collated": {k: batch[k].tolist() for k in (
                        "chosen_input_ids", "chosen_attention_mask", "chosen_labels", "rejected_input_ids",
                        "rejected_attention_mask", "rejected_labels", "prompt_input_ids", "prompt_attention_mask")},
                    "concatenated": {k: cb[k].tolist() for k in (
                        "concatenated_input_ids", "concatenated_attention_mask", "concatenated_labels")},
                }
            for k in ("concatenated_input_ids", "concatenated_attention_mask", "concatenated_labels"):
                assert fw["concatenated_batch"][k].tolist() == batch_record["concatenated"][k]

            store = obj._stored_metrics["train"]
            keys = ORPO_METRICS if kind == "orpo" else CPO_METRICS
            assert set(store) == set(keys) and all(len(v) == 1 for v in store.values()), sorted(store)
            params = ({"trainer": "ORPOTrainer", "beta": cfg.beta} if kind == "orpo" else
                      {"trainer": "CPOTrainer", "loss_type_arg": kwargs["loss_type"], "loss_type": cfg.loss_type,
                       "beta": cfg.beta, "cpo_alpha": cfg.cpo_alpha, "simpo_gamma": cfg.simpo_gamma,
                       "simpo_gamma_used": cfg.loss_type == "simpo", "alpha": cfg.alpha,
                       "label_smoothing": cfg.label_smoothing})
            rec = {
                "name": name,
                "params": params,
                "loss": f32(loss),
                "logps_used": "avg" if used_avg else "sum",
                "summed_logps": {"chosen": f32(lp[False][:B]), "rejected": f32(lp[False][B:])},
                "avg_logps": {"chosen": f32(lp[True][:B]), "rejected": f32(lp[True][B:])},
                "chosen_rewards": f32(m["chosen_rewards"]),
                "rejected_rewards": f32(m["rejected_rewards"]),
                "per_pair_losses": f32(m["losses"]),
                "nll_loss": f32(nll_t),
                "metrics": {k: f32(store[k][0]) for k in keys},
                "dloss_dlogps": {"chosen": f32(dl[0]), "rejected": f32(dl[1]),
                                 "nll_loss": f32(dl[2]) if len(dl) > 2 else None},
                "grads": ({n: {"shape": list(grads[n].shape), "values": f32(grads[n])} for n in sorted(grads)}
                          if name in FULL_GRADS else None),
            }
            if kind == "orpo":
                rec["log_odds"] = f32(cap["odds_ratio_loss"]["log_odds"])  # per pair; ratio = logsigmoid of it
            cases.append(rec)
            print(f"  {name}: loss={loss.item():.7f} (own {own.item():.7f})", file=sys.stderr)

    assert FULL_GRADS <= {c["name"] for c in cases}
    fixture = {
        "description": "First step of TRL's own CPOTrainer and ORPOTrainer (trl.experimental, compute_loss + "
        "backward) on the tiny random Llama + non-zero PEFT LoRA adapter + preference pairs of "
        "tests/fixtures/dpo_trainer/ (policy = base + adapter; reference-free), generated by "
        "scripts/gen_cpo_orpo_fixture.py. float32.",
        "regenerate": "/work/pyref-trl/bin/python scripts/gen_cpo_orpo_fixture.py",
        "versions": versions,
        "model_dir": "../dpo_trainer/model",
        "adapter_dir": "../dpo_trainer/adapter",
        "special_ids": {"bos": BOS, "eos": EOS, "pad": PAD, "label_pad": -100},
        "pairs": pairs,
        "batch": batch_record,
        "full_grads_cases": sorted(FULL_GRADS),
        "notes": NOTES,
        "cases": cases,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "cases.json"
    path.write_text(dump(fixture) + "\n")
    size = path.stat().st_size
    print(f"  {path.relative_to(REPO)} {size} B sha256 {hashlib.sha256(path.read_bytes()).hexdigest()[:16]}",
          file=sys.stderr)
    assert size < 300_000, size
    print(f"wrote {path.relative_to(REPO)} ({size} bytes, {len(cases)} cases)", file=sys.stderr)


if __name__ == "__main__":
    main()
