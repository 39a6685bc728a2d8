#!/usr/bin/env python3
"""Reference fixture of TRL's DPO losses, produced by TRL's own code.

Writes tests/fixtures/objectives/dpo_losses.json. Deterministic, CPU only, float64, ~10 s (mostly imports).

Regenerate (venv outside the repo, PyPI only; the default torch wheel is fine, it runs on CPU):

    python3 -m venv /work/pyref-trl
    /work/pyref-trl/bin/pip install --quiet torch==2.15.0 trl==1.16.0 transformers==5.24.0 peft==0.21.2
    /work/pyref-trl/bin/python scripts/gen_dpo_fixture.py

Versions installed when the committed fixture was generated (also in its "versions" field):
    python 3.11.7, torch 2.15.0 (+cu132 wheel, used on CPU), trl 1.16.0, transformers 5.24.0, peft 0.21.2,
    accelerate 1.15.0, datasets 5.2.0, numpy 2.4.6

How TRL is called. In TRL 1.16 there is no `DPOTrainer.dpo_loss` any more: every loss type is computed inline in
`DPOTrainer._compute_loss(model, inputs, return_outputs)` (reached through `compute_loss`) from the model's per-token
log-probs. So this script:
  * builds the batch with TRL's own `DataCollatorForPreference` (prompt/chosen/rejected token ids of the lengths in
    BATCH, plus precomputed reference logps, exactly like a `precompute_ref_log_probs=True` dataset row);
  * builds a trainer-like object with `DPOTrainer.__new__(DPOTrainer)` and sets the attributes `__init__` would set
    from a real `DPOConfig` (no model, no dataset, no Trainer.__init__);
  * passes a stand-in "model" that returns what a model patched by TRL's `add_fused_lm_head` returns for
    `model(..., labels=labels, fused_lm_head=True)`: a `FusedCausalLMOutput` whose `log_probs` [2B, T-1] is zero
    where the shifted label is -100 and holds the whole summed sequence logp on the first completion position
    (so TRL's `per_token_logps.sum(dim=1)` gives back exactly the float64 input);
  * calls `DPOTrainer.compute_loss(obj, model, inputs)` unmodified, reads the per-example loss of each loss type
    from the local `per_sequence_loss` of TRL's frame (sys.settrace, just before
    `loss += per_sequence_loss.mean() * loss_weight`), the rewards from its locals at return, the logged metrics from
    `obj._metrics["train"]`, and the gradients by `loss.backward()`;
  * re-runs every case through the non-precomputed path (a stand-in reference model) and checks that the loss is
    identical.
No loss math is reimplemented here; the only arithmetic is the weighted sum of per-type losses for multi-loss cases
(labelled "derived" in the fixture) and the consistency asserts.
"""

import inspect
import json
import re
import sys
import tempfile
import warnings
from collections import defaultdict
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
torch.set_default_dtype(torch.float64)  # the collator builds ref logps with torch.tensor(list): keep them float64
torch.set_num_threads(1)

import accelerate  # noqa: E402
import datasets  # noqa: E402
import numpy  # noqa: E402
import peft  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from trl import DPOConfig  # noqa: E402
from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer  # noqa: E402
from trl.trainer.utils import FusedCausalLMOutput  # noqa: E402

PINNED = {"torch": "2.15.0", "trl": "1.16.0", "transformers": "5.24.0", "peft": "0.21.2"}
OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "objectives" / "dpo_losses.json"

# ---------------------------------------------------------------------------------------------------------------
# The batch (6 preference pairs). Summed completion logps, float64. Example 4 is an exact tie of the log-ratios
# (dyadic values) to show that rewards/accuracies uses a strict `>`.
#   margin = (pc - rc) - (pr - rr):  3.08, -5.30, -0.59, -5.67, 0.0, 4.9 (up to rounding)
BATCH = {
    "prompt_lengths": [5, 9, 3, 14, 6, 8],
    "chosen_lengths": [7, 23, 4, 41, 12, 17],
    "rejected_lengths": [11, 19, 6, 35, 15, 9],
    "policy_chosen_logps": [-12.37, -34.05, -7.23, -55.48, -20.5, -41.6],
    "policy_rejected_logps": [-18.02, -30.51, -9.04, -48.27, -26.0, -22.3],
    "reference_chosen_logps": [-13.91, -31.26, -8.47, -52.03, -21.0, -43.9],
    "reference_rejected_logps": [-16.48, -33.02, -10.87, -50.49, -26.5, -19.7],
}
PAD_ID = 0

# Which form of the policy/reference logps each loss type consumes in TRL 1.16 (all receive the token-SUMMED logps
# from the forward; the normalisation, where there is one, happens inside the loss branch).
LOGPS_FORM = {
    "sigmoid": "summed",
    "hinge": "summed",
    "ipo": "summed; inside the loss the log-ratio scores are divided by the completion token count "
    "(completion_mask.sum(dim=1).clamp(min=1), per side)",
    "exo_pair": "summed",
    "nca_pair": "summed",
    "robust": "summed",
    "bco_pair": "summed",
    "sppo_hard": "summed",
    "aot": "summed (then sorted across the batch)",
    "aot_unpaired": "summed (then sorted across the batch)",
    "apo_zero": "summed",
    "apo_down": "summed",
    "discopop": "summed",
    "sft": "per-token policy logps of the chosen completions: loss = -mean over ALL chosen completion tokens of the "
    "batch = -sum(policy_chosen_logps) / sum(chosen_lengths); reference and rejected unused",
    "sigmoid_norm": "summed; inside the loss the log-ratio scores are divided by the completion token count "
    "(completion_mask.sum(dim=1).clamp(min=1), per side)",
}
REQUESTED = list(LOGPS_FORM)

# (loss_type, loss_weights, beta, label_smoothing, discopop_tau)
CASES = []
for beta in (0.1, 0.5):
    CASES += [
        (["sigmoid"], None, beta, 0.0, 0.05),
        (["sigmoid"], None, beta, 0.1, 0.05),  # label_smoothing is ignored by sigmoid in TRL 1.16 (same numbers)
        (["hinge"], None, beta, 0.0, 0.05),
        (["ipo"], None, beta, 0.0, 0.05),
        (["exo_pair"], None, beta, 1e-3, 0.05),  # exo_pair requires label_smoothing > 0 (EXO paper: 1e-3)
        (["nca_pair"], None, beta, 0.0, 0.05),
        (["robust"], None, beta, 0.1, 0.05),
        (["bco_pair"], None, beta, 0.0, 0.05),
        (["sppo_hard"], None, beta, 0.0, 0.05),
        (["aot"], None, beta, 0.0 if beta == 0.1 else 0.1, 0.05),
        (["aot_unpaired"], None, beta, 0.0 if beta == 0.1 else 0.1, 0.05),
        (["apo_zero"], None, beta, 0.0, 0.05),
        (["apo_down"], None, beta, 0.0, 0.05),
        (["discopop"], None, beta, 0.0, 0.05 if beta == 0.1 else 0.5),
        (["sft"], None, beta, 0.0, 0.05),
        (["sigmoid_norm"], None, beta, 0.0, 0.05),
    ]
CASES += [
    (["sigmoid", "sft"], [0.8, 0.2], 0.1, 0.0, 0.05),
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], 0.1, 0.0, 0.05),  # MPO (TRL docs' example weights)
    (["sigmoid", "ipo"], None, 0.5, 0.0, 0.05),  # no loss_weights: TRL uses 1.0 each
]


class FusedLMStandIn(torch.nn.Module):
    """Plays a causal LM patched by trl's `add_fused_lm_head`, called as `model(..., labels=, fused_lm_head=True)`.

    Returns per-token log-probs [2B, T-1] that are 0 where the shifted label is -100 (as TRL's fused head does) and
    carry each row's whole summed logp on its first completion position. entropy/mean_logits/is_top1 are zeros
    (the metrics built from them, entropy, logits/*, mean_token_accuracy, are not part of the fixture).
    """

    is_gradient_checkpointing = False  # read by trl's disable_gradient_checkpointing (reference path)

    def __init__(self, seq_logps):
        super().__init__()  # nn.Module: training=True (DPOTrainer's metrics mode), and accelerate's is_peft_model
        self.seq_logps = seq_logps  # [2B]: chosen rows then rejected rows

    def forward(self, input_ids, attention_mask, labels, fused_lm_head, use_cache=False, **kwargs):
        assert fused_lm_head and not kwargs, kwargs
        mask = labels[:, 1:] != -100  # what add_fused_lm_head scores
        first = mask.to(torch.int64).argmax(dim=1)
        onehot = torch.nn.functional.one_hot(first, mask.size(1)).to(torch.float64) * mask
        log_probs = self.seq_logps[:, None] * onehot
        zeros = torch.zeros_like(log_probs)
        return FusedCausalLMOutput(
            loss=-log_probs.sum() / mask.sum(),
            log_probs=log_probs,
            entropy=zeros,
            mean_logits=zeros,
            is_top1=torch.zeros_like(mask),
            label_mask=mask,
        )


def make_batch():
    examples = []
    tok = 10
    for i in range(len(BATCH["prompt_lengths"])):
        ids = {}
        for key, n in (("prompt_ids", "prompt_lengths"), ("chosen_ids", "chosen_lengths"),
                       ("rejected_ids", "rejected_lengths")):
            ids[key] = [tok + j for j in range(BATCH[n][i])]
            tok += 100
        ids["ref_chosen_logps"] = BATCH["reference_chosen_logps"][i]
        ids["ref_rejected_logps"] = BATCH["reference_rejected_logps"][i]
        examples.append(ids)
    collator = DataCollatorForPreference(pad_token_id=PAD_ID, max_length=None)
    inputs = collator(examples)
    assert inputs["ref_chosen_logps"].dtype == torch.float64
    return inputs


def make_trainer(cfg, model, ref_model):
    """The attributes DPOTrainer.__init__ sets and _compute_loss reads (TRL 1.16)."""
    obj = DPOTrainer.__new__(DPOTrainer)
    obj.args = cfg  # discopop reads self.args.discopop_tau; ref path reads args.gradient_checkpointing_kwargs
    # .device, .gather, .gather_for_metrics; made after the DPOConfig, whose __post_init__ resets accelerate's state
    obj.accelerator = Accelerator(cpu=True)
    obj.model = model
    obj.ref_model = ref_model
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


_SRC, _START = inspect.getsourcelines(DPOTrainer._compute_loss)
_ACC = [i for i, s in enumerate(_SRC) if s.strip() == "loss += per_sequence_loss.mean() * loss_weight"]
assert len(_ACC) == 1, "TRL's _compute_loss changed: update the tracing hook"
ACC_LINE = _START + _ACC[0]
CODE = DPOTrainer._compute_loss.__code__
RETURN_LOCALS = ("chosen_rewards", "rejected_rewards", "margins", "reward_accuracies", "chosen_logps",
                 "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")


def traced(fn):
    cap = {"per_type": [], "locals": None}

    def local(frame, event, arg):
        if event == "line" and frame.f_lineno == ACC_LINE:
            fl = frame.f_locals
            cap["per_type"].append((fl["loss_type"], fl["loss_weight"], fl["per_sequence_loss"].detach().clone()))
        elif event == "return" and "margins" in frame.f_locals:  # not on an exception unwinding
            cap["locals"] = {k: frame.f_locals[k].detach().clone() for k in RETURN_LOCALS}
        return local

    def glob(frame, event, arg):
        return local if frame.f_code is CODE else None

    sys.settrace(glob)
    try:
        out = fn()
    finally:
        sys.settrace(None)
    return out, cap


def run_case(loss_type, loss_weights, beta, label_smoothing, discopop_tau, inputs, tmp):
    common = dict(output_dir=tmp, use_cpu=True, bf16=False, report_to="none", beta=beta,
                  label_smoothing=label_smoothing, discopop_tau=discopop_tau, loss_type=list(loss_type),
                  loss_weights=loss_weights)
    cfg = DPOConfig(precompute_ref_log_probs=True, **common)
    pc = torch.tensor(BATCH["policy_chosen_logps"], requires_grad=True)
    pr = torch.tensor(BATCH["policy_rejected_logps"], requires_grad=True)
    model = FusedLMStandIn(torch.cat([pc, pr]))
    obj = make_trainer(cfg, model, None)
    loss, cap = traced(lambda: DPOTrainer.compute_loss(obj, model, dict(inputs)))
    assert loss.dtype == torch.float64 and loss.dim() == 0
    loss.backward()
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in (pc, pr)]
    assert [c[0] for c in cap["per_type"]] == list(loss_type)
    loc = cap["locals"]
    assert torch.equal(loc["chosen_logps"], pc.detach()) and torch.equal(loc["rejected_logps"], pr.detach())

    # Same case through the reference-model path (no precomputed ref logps): must give the same loss.
    cfg2 = DPOConfig(precompute_ref_log_probs=False, **common)
    ref = FusedLMStandIn(torch.tensor(BATCH["reference_chosen_logps"] + BATCH["reference_rejected_logps"]))
    model2 = FusedLMStandIn(torch.cat([pc.detach(), pr.detach()]))
    obj2 = make_trainer(cfg2, model2, ref)
    inputs2 = {k: v for k, v in inputs.items() if not k.startswith("ref_")}
    loss2 = DPOTrainer.compute_loss(obj2, model2, inputs2)
    assert torch.equal(loss.detach(), loss2.detach()), (loss_type, loss.item(), loss2.item())

    metrics = {k: v[0] for k, v in obj._metrics["train"].items()
               if k.startswith("rewards/") or k.startswith("logps/")}
    for v in obj._metrics["train"].values():
        assert len(v) == 1
    case = {
        "name": "+".join(loss_type) + f"_beta{beta}" + (f"_ls{label_smoothing}" if label_smoothing else "")
        + (f"_tau{discopop_tau}" if "discopop" in loss_type else ""),
        "loss_type": loss_type[0] if len(loss_type) == 1 else list(loss_type),
        "loss_weights": obj.loss_weights,
        "loss_weights_given": loss_weights,
        "beta": beta,
        "label_smoothing": label_smoothing,
        "discopop_tau": discopop_tau,
        "f_divergence_type": cfg.f_divergence_type,
        "ld_alpha": cfg.ld_alpha,
        "use_weighting": cfg.use_weighting,
        "logps_form": {lt: LOGPS_FORM[lt] for lt in loss_type},
        "inputs": {k: BATCH[k] for k in ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps",
                                         "reference_rejected_logps", "chosen_lengths", "rejected_lengths")},
        "outputs": {},
    }
    o = case["outputs"]
    if len(loss_type) == 1:
        o["losses"] = cap["per_type"][0][2].tolist()
    else:
        o["losses_by_type"] = {lt: l.tolist() for lt, _, l in cap["per_type"]}
        derived = sum(w * l for _, w, l in cap["per_type"])
        o["losses"] = derived.tolist()
        o["losses_note"] = "derived: sum_k loss_weights[k] * losses_by_type[k] (TRL only forms the scalar loss)"
    mean = torch.tensor(o["losses"]).mean().item()
    assert abs(mean - loss.item()) <= 1e-12 * max(1.0, abs(loss.item())), (loss_type, mean, loss.item())
    o["chosen_rewards"] = loc["chosen_rewards"].tolist()
    o["rejected_rewards"] = loc["rejected_rewards"].tolist()
    o["loss"] = loss.item()
    o["grad_policy_chosen_logps"] = grads[0].tolist()
    o["grad_policy_rejected_logps"] = grads[1].tolist()
    o["metrics"] = metrics
    return case


NOTES = {
    "api": (
        "TRL 1.16 has no DPOTrainer.dpo_loss / concatenated_forward / get_batch_loss_metrics any more (the 1.x DPO "
        "refactor). All loss types, the rewards and the metrics are computed inline in DPOTrainer._compute_loss(model, "
        "inputs, return_outputs), called by compute_loss. There is no RunningMoments: bco_pair is the plain "
        "-logsigmoid(beta*chosen_logratio) - logsigmoid(-beta*rejected_logratio) with no running-mean shift, and "
        "sigmoid has no label smoothing (conservative DPO is gone: label_smoothing is read only by exo_pair, robust, "
        "aot and aot_unpaired). Rewards are always beta * (policy - reference) SUMMED logps, detached, for every loss "
        "type (also ipo / sigmoid_norm / sft). The __init__ checks (bypassed here) are: exo_pair needs "
        "label_smoothing > 0 (ValueError); robust warns unless 0 <= label_smoothing < 0.5; use_weighting is refused "
        "with aot/aot_unpaired; f_divergence_type != reverse_kl is only allowed with sigmoid, sigmoid_norm, hinge, "
        "ipo, exo_pair, robust, discopop, sft."
    ),
    "loss_reduction": (
        "loss = sum_k loss_weights[k] * mean_i(per_sequence_loss_k[i]) over the per-device micro-batch (plus "
        "router_aux_loss_coef * aux_loss for MoE models). loss_type is a list (a str is wrapped); loss_weights "
        "defaults to 1.0 each and must have the same length. 'sft' is a batch-level token mean "
        "-sum(chosen per-token logps)/sum(chosen completion tokens), expanded to [B] so that its mean is that scalar. "
        "aot/aot_unpaired sort the per-example quantities across the batch (torch.sort, ascending) before pairing, so "
        "their per_sequence_loss[i] is the i-th sorted pair, not example i, and the loss is not a sum of "
        "per-example terms. DPOTrainer.loss_is_scaled_for_ga = False: transformers' Trainer divides this loss by "
        "gradient_accumulation_steps for backward; the logged 'loss' is the average over the steps since the last log."
    ),
    "tokenization_eos_bos": (
        "_prepare_dataset: if there is no 'prompt' column, extract_prompt takes the longest common prefix of chosen "
        "and rejected as the prompt. For non-conversational (plain text) examples, tokenizer.eos_token is appended as "
        "TEXT to chosen and to rejected unless they already end with it (so the EOS token is the last completion "
        "token and is trained on; pads are excluded by the completion mask even when pad == eos). Conversational "
        "examples get no EOS from TRL: the chat template's end-of-turn tokens end the completion. Tokenization: the "
        "prompt is tokenized alone (tokenizer(text=prompt), default add_special_tokens=True, so the prompt gets a BOS "
        "iff the tokenizer adds one, e.g. Llama yes, Qwen no; conversational: apply_chat_template(prompt, "
        "add_generation_prompt=True)), and prompt+chosen / prompt+rejected are each tokenized as ONE string (BOS only "
        "at the very start). The completion starts at min(common_prefix_length(prompt_ids, prompt+chosen ids), "
        "common_prefix_length(prompt_ids, prompt+rejected ids)); prompt_ids is cut to that length, so a token merged "
        "across the boundary belongs to the completion."
    ),
    "truncation": (
        "There is no max_prompt_length / max_completion_length in TRL 1.16; only max_length (default 1024, None = "
        "off). DataCollatorForPreference truncates each prompt+chosen and each prompt+rejected sequence "
        "independently to max_length tokens: truncation_mode 'keep_start' (default) keeps the first max_length tokens "
        "(the completion's end, EOS included, is cut); 'keep_end' (deprecated) keeps the last max_length tokens (the "
        "prompt's start is cut). With keep_start, examples whose prompt alone has >= max_length tokens are dropped "
        "from the dataset. The batch is [B chosen rows; B rejected rows], right-padded with pad_token_id (eos when "
        "the tokenizer has no pad), attention_mask 1 on real tokens, completion_mask 1 on completion tokens; "
        "pad_to_multiple_of pads the length."
    ),
    "sequence_logps": (
        "labels = input_ids with completion_mask == 0 set to -100; the model (patched by add_fused_lm_head) scores "
        "hidden[:, :-1] against labels[:, 1:] and returns per-token log-probs [2B, T-1] that are 0 where the label is "
        "-100, at temperature 1, without building full logits. logps = per_token_logps.sum(dim=1): a SUM over the "
        "completion tokens only (prompt and padding excluded; no averaging). Same for the reference (no_grad). ipo "
        "and sigmoid_norm divide the log-ratio scores by the completion token count of the UNshifted "
        "completion_mask (clamp min 1) inside the loss; with a non-empty prompt this equals the number of scored "
        "tokens. Options: use_logits_to_keep does not exist in 1.16 (the fused head only projects positions with a "
        "valid label); padding_free is accepted but forced to False with a warning ('temporarily unavailable'); "
        "ld_alpha (LD-DPO, default None) replaces the sum by sum(first min(len_chosen, len_rejected) completion "
        "tokens) + ld_alpha * sum(remaining tail tokens), for policy and reference alike, and the rewards use those "
        "values; use_weighting (WPO) multiplies each per_sequence_loss by exp(mean_t(logp_t - log sum_v p_v^2)) of "
        "the chosen row times that of the rejected row (no grad); f_divergence_type maps the log-ratios u to scores "
        "(forward_kl 1-exp(-u), js_divergence log2+logsigmoid(u), alpha_divergence (exp((a-1)u)-1)/(a-1)); "
        "prompt-learning PEFT virtual tokens are sliced off (log_probs[:, -(T-1):])."
    ),
    "reference_model": (
        "ref_model=None with a PEFT model (peft_config given, or a PeftModel passed): no reference copy is kept "
        "(self.ref_model = None); the reference logps come from the same model under use_adapter(model, None) = "
        "model.disable_adapter() (the base model), in torch.no_grad with gradient checkpointing temporarily off. "
        "Exception: a PeftModel passed WITH a pretrained adapter and no peft_config gets a frozen copy of its "
        "'default' adapter added as 'ref', and the reference is computed with set_adapter('ref') (except on PEFT "
        "0.17-0.19 with LoRA target_parameters, which falls back to disabling adapters). Without PEFT and without "
        "ref_model, a second copy is loaded from the policy's name/path with the policy's dtype (unless "
        "precompute_ref_log_probs, where the policy itself serves before training). precompute_ref_log_probs=True: "
        "before training, the reference (ref_model, or the policy / adapter-disabled model) is run once over the "
        "whole train (and eval) dataset in batches of precompute_ref_batch_size or per_device_*_batch_size (no_grad, "
        "accelerator autocast), and the summed logps are stored as dataset columns ref_chosen_logps / "
        "ref_rejected_logps (cached by a fingerprint of dataset and model hash); training then reads them from the "
        "batch instead of a reference forward. Not allowed with sync_ref_model, IterableDataset or vision data. This "
        "fixture uses that path (and checks that the reference-forward path gives the identical loss)."
    ),
    "metrics": (
        "Names appended to _metrics[mode] once per micro-batch and averaged (sum/len) at each log, 'eval_' prefix in "
        "eval: 'entropy' (mean per-token entropy over all completion tokens, chosen and rejected), 'num_tokens' "
        "(cumulative attention_mask sum, train), 'logits/chosen' and 'logits/rejected' (mean over completion tokens "
        "of the vocabulary-mean logit), 'mean_token_accuracy' (chosen completion tokens whose label is the argmax), "
        "'rewards/chosen' = mean(beta*(pc-rc)), 'rewards/rejected' = mean(beta*(pr-rr)), 'rewards/accuracies' = "
        "mean((chosen_rewards > rejected_rewards).float()) with a STRICT '>' (a tie counts 0; .float() makes it a "
        "float32 mean, e.g. 0.3333333432674408 for 2/6), 'rewards/margins' = "
        "mean(chosen_rewards - rejected_rewards), 'logps/chosen' / 'logps/rejected' = mean of the policy's summed "
        "logps, and 'aux_loss' for MoE models; transformers adds 'loss', 'grad_norm', 'learning_rate', 'epoch'. The "
        "fixture records the rewards/* and logps/* ones (the others need real logits)."
    ),
    "fixture_method": (
        "Per-example losses are TRL's own per_sequence_loss tensor for each loss type, read from the _compute_loss "
        "frame just before 'loss += per_sequence_loss.mean() * loss_weight'; 'loss' is the scalar compute_loss "
        "returned; gradients are torch autograd of that scalar w.r.t. the summed policy logps (float64). The "
        "stand-in model places each summed logp on the first completion position of its row, so the forward's sum "
        "returns the input exactly; no loss type here depends on how the sum is split over tokens (ld_alpha and "
        "use_weighting, which would, are off)."
    ),
}


def dump(obj):
    text = json.dumps(obj, indent=1)
    # put numeric arrays on one line
    return re.sub(r"\[\s*([-0-9.eE+,\s]+?)\s*\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text)


def main():
    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "trl": trl.__version__,
                "transformers": transformers.__version__, "peft": peft.__version__,
                "accelerate": accelerate.__version__, "datasets": datasets.__version__, "numpy": numpy.__version__}
    for k, v in PINNED.items():
        if versions[k].split("+")[0] != v:
            print(f"warning: {k} {versions[k]} != pinned {v}; the fixture will record the installed one",
                  file=sys.stderr)
    src = inspect.getsource(DPOTrainer._compute_loss)
    supported = [lt for lt in REQUESTED if f'loss_type == "{lt}"' in src]
    unsupported = [lt for lt in REQUESTED if lt not in supported]
    inputs = make_batch()
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        for lt, lw, beta, ls, tau in CASES:
            if not set(lt) <= set(supported):
                continue
            cases.append(run_case(lt, lw, beta, ls, tau, inputs, tmp + "/unused"))
    fixture = {
        "description": "TRL DPO loss reference values, generated by TRL's own DPOTrainer code "
        "(scripts/gen_dpo_fixture.py). float64 throughout.",
        "regenerate": "/work/pyref-trl/bin/pip install --quiet torch==2.15.0 trl==1.16.0 transformers==5.24.0 "
        "peft==0.21.2 && /work/pyref-trl/bin/python scripts/gen_dpo_fixture.py",
        "versions": versions,
        "entry_point": "DPOTrainer.compute_loss -> DPOTrainer._compute_loss (no dpo_loss method in this version)",
        "supported": supported,
        "unsupported": unsupported,
        "conventions": {
            "inputs": "per-sequence SUMMED log-probs over the completion tokens (policy with grad, reference "
            "precomputed), batch of 6 pairs; chosen_lengths / rejected_lengths = completion token counts "
            "(completion_mask sums); prompts are non-empty (prompt_lengths); no truncation (max_length=None). Example "
            "4 has exactly equal chosen/rejected log-ratios (a tie)",
            "losses": "per_sequence_loss[i] of TRL (for aot/aot_unpaired: i-th pair after sorting; for sft: the "
            "batch scalar repeated)",
            "chosen_rewards": "beta * (policy_chosen_logps - reference_chosen_logps), as TRL logs it",
            "loss": "scalar returned by compute_loss = sum_k w_k * mean(losses_k)",
            "grads": "d loss / d policy_{chosen,rejected}_logps (autograd); zeros where the input is unused",
            "metrics": "TRL's logged values for this one micro-batch (single process)",
        },
        "batch": dict(BATCH, input_ids_shape=list(inputs["input_ids"].shape), pad_token_id=PAD_ID),
        "notes": NOTES,
        "cases": cases,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(dump(fixture) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(cases)} cases; unsupported: {unsupported})")


if __name__ == "__main__":
    main()
