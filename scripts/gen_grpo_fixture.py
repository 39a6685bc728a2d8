#!/usr/bin/env python3
"""GRPO and RLOO reference values from TRL 1.16's own trainer code: the per-micro-batch losses
(`GRPOTrainer._compute_loss`, `RLOOTrainer._compute_loss`), the advantages and reward/completion metrics
(`GRPOTrainer._generate_and_score_completions`, `RLOOTrainer._generate_and_score_completions`, both run for real
with generation and the model forwards stubbed) and the temperature-scaled log-probs / entropies of TRL's fused LM
head (`trl.kernels.ChunkedLogProbFunction`).

Writes tests/fixtures/grpo_loss/cases.json (< 200 KB):
    cases              GRPO + RLOO loss cases graft's `objective::grpo::PolicyLoss` matches within 1e-6
                       (crates/graft-train/tests/grpo_fixture.rs): every loss_type (grpo, bnpo, dr_grpo, dapo) on- and
                       off-policy, beta 0 and 0.04, clip-higher (epsilon_high 0.28), two-sided clipping (delta 1.5),
                       sequence-level ratios, gradient accumulation 2, dr_grpo with max_completion_length > T, a fully
                       masked row, padding; RLOO's clipped surrogate on summed sequence log-probs. All with
                       use_bias_correction_kl = False (see extra_cases).
    extra_cases        same format, TRL behaviours graft's PolicyLoss does not model yet, kept out of `cases` so the
                       existing test keeps passing: use_bias_correction_kl = True (TRL 1.16's DEFAULT: the per-token
                       KL is multiplied by the differentiable ratio coef_1, which changes the KL gradient even
                       on-policy), delta below 1 + epsilon_high (TRL computes the clip metrics from coef_1 AFTER the
                       delta clamp), and RLOO with a fully masked row (it still adds -A/B to the loss value).
    accumulation_cases one generation batch split by TRL's own split_tensor_dict into micro-batches, every micro-batch
                       through _compute_loss with current_gradient_accumulation_steps = GA, and the summed loss and
                       gradient: grpo (÷ GA inside TRL) and dapo (num_items_in_batch spans the generation batch;
                       steps_per_generation = GA and = 2·GA).
    advantage_cases    GRPO (scale_rewards group / batch / none, two reward functions with reward_weights and None
                       rewards, an unscorable row, normalize_then_sum, mask_truncated_completions, num_iterations 2)
                       and RLOO (KL-in-reward with the default beta 0.05, normalize_advantages, reward_clip_range,
                       unscorable row): rewards per function, completion ids, expected advantages, completion mask,
                       num_items_in_batch and every metric TRL logs there. float32 (TRL builds rewards as float32).
    logprob_cases      TRL's fused-LM-head kernel on given logits (identity LM head): log-probs of the labels and
                       entropies at temperature 1.0 and 0.7 (log_softmax(logits / T)). float32 statistics.
Loss cases are float64 (TRL's loss code is dtype-agnostic; in real training per_token_logps are float32 from the
fused head). Deterministic (seeded), CPU, one thread, ~10 s (mostly imports).

Regenerate (venv outside the repo, PyPI only):

    python3 -m venv /work/pyref-trl
    /work/pyref-trl/bin/pip install --quiet torch==2.15.0 trl==1.16.0 transformers==5.24.0 peft==0.21.2
    /work/pyref-trl/bin/python scripts/gen_grpo_fixture.py

How TRL is called:
  * configs are real `GRPOConfig` / `RLOOConfig` objects (so every default is TRL's own, and __post_init__ derives
    steps_per_generation / generation_batch_size); the trainer is `GRPOTrainer.__new__(GRPOTrainer)` (resp. RLOO)
    with the attributes `__init__` sets from that config (epsilon_low = epsilon, epsilon_high = epsilon_high or
    epsilon, beta, loss_type, ...), `current_gradient_accumulation_steps` as Trainer sets it, a single-process
    accelerator stand-in (gather / reduce are identities), and `_metrics`;
  * `_get_per_token_logps_and_entropies` is replaced by a function returning fixed per-token log-probs (a float64
    leaf with requires_grad) and entropies; `_compute_loss` itself is unmodified; the gradient is autograd's
    d loss / d per_token_logps after `loss.backward()`; the metrics are read from `_metrics["train"]`; TRL's
    locals `policy_loss` (the loss before the ÷ GA) and `normalizer` are read with sys.settrace;
  * for the advantages, `_generate_and_score_completions` runs unmodified with `_tokenize_prompts` /
    `_generate_single_turn` returning fixed token ids (so TRL's own `_generate` computes the completion metrics and
    its own `_calculate_rewards` calls real Python reward functions that return the case's rewards, None included),
    `_get_per_token_logps_and_entropies` returning fixed old / reference log-probs, and `processing_class` a stub
    `batch_decode`.
Sanity checks (asserts): every loss and gradient equals an independent float64 transcription of the formulas
(written from the notes in /work/notes/trl_rl_semantics.md, not from TRL's control flow) within 1e-12; closed forms
by hand (on-policy grpo / dapo gradients -A·m/(n·B·GA) and -A·m/num_items; the KL's on-policy gradient
beta·(1 - exp(ref - logp)) and its bias-corrected version); the delta and clipping branches are exercised (asserted
per case); advantages equal a numpy transcription (group mean, Bessel std + 1e-4, leave-one-out baseline, ...);
accumulated micro-batch gradients equal one full-batch gradient for dapo; log-probs equal torch's log_softmax of
logits / T.
"""

import json
import math
import re
import sys
import tempfile
import types
import warnings
import zlib
from collections import defaultdict, deque
from contextlib import nullcontext
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
torch.set_num_threads(1)

import numpy as np  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer  # noqa: E402
from trl.kernels import ChunkedLogProbFunction  # noqa: E402
from trl.trainer.utils import split_tensor_dict  # noqa: E402

PINNED = {"torch": "2.15.0", "trl": "1.16.0", "transformers": "5.24.0"}
REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "tests" / "fixtures" / "grpo_loss" / "cases.json"
B, T = 5, 6
TMP = tempfile.mkdtemp(prefix="gen_grpo_fixture_")
REF_MODEL = object()  # sentinel passed as `model` when TRL asks for reference log-probs


# --------------------------------------------------------------------------------------------------------------------
# helpers

def f32(x):
    """float32 value(s) as Python floats with the shortest repr that round-trips to the same float32."""
    a = np.asarray(torch.as_tensor(x).detach().to(torch.float32).numpy(), dtype=np.float32)
    if a.ndim == 0:
        return float(str(a[()]))
    return [float(str(v)) for v in a.ravel()] if a.ndim == 1 else [[float(str(v)) for v in r] for r in a]


def f64(x):
    return torch.as_tensor(x).detach().to(torch.float64).tolist()


def accelerator():
    return types.SimpleNamespace(
        device=torch.device("cpu"), num_processes=1, process_index=0, is_main_process=True,
        gather=lambda x: x, gather_for_metrics=lambda x: x, reduce=lambda x, reduction="sum": x,
        sync_gradients=True, autocast=nullcontext, unwrap_model=lambda m: m,
    )


def traced(fn, code):
    """Run fn(); return its result and the locals of the (last) frame of `code` at its return."""
    cap = {}

    def tracer(frame, event, arg):
        if frame.f_code is code:
            def local(frame, event, arg):
                if event == "return":
                    cap.clear()
                    cap.update(frame.f_locals)
                return local
            return local
        return None

    sys.settrace(tracer)
    try:
        out = fn()
    finally:
        sys.settrace(None)
    return out, cap


def grpo_config(**kw):
    kw.setdefault("per_device_train_batch_size", B)
    kw.setdefault("num_generations", B)
    return GRPOConfig(output_dir=TMP, use_cpu=True, report_to="none", **kw)


def loss_trainer(args, ga):
    """GRPOTrainer with the attributes __init__ sets from `args` that _compute_loss reads."""
    t = GRPOTrainer.__new__(GRPOTrainer)
    t.args = args
    t.beta = args.beta
    t.epsilon_low = args.epsilon
    t.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    t.importance_sampling_level = args.importance_sampling_level
    t.loss_type = args.loss_type
    t.max_completion_length = args.max_completion_length
    t.top_entropy_quantile = args.top_entropy_quantile
    t.off_policy_mask_threshold = args.off_policy_mask_threshold
    t.use_vllm = args.use_vllm
    t.vllm_importance_sampling_correction = args.vllm_importance_sampling_correction
    t.aux_loss_enabled = False  # not a MoE model
    t.entropy_coef = args.entropy_coef
    t.use_adaptive_entropy = args.use_adaptive_entropy
    t._entropy_bonus_enabled = t.entropy_coef != 0.0 or t.use_adaptive_entropy
    t.current_gradient_accumulation_steps = ga  # Trainer: len(batch_samples) of the optimizer step
    t.accelerator = accelerator()
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    t.model = types.SimpleNamespace(training=True)
    return t


# --------------------------------------------------------------------------------------------------------------------
# an independent transcription of the loss (float64 autograd), for the asserts

def own_grpo_loss(c, logp, old, ref, adv, mask, num_items, ga, spg):
    m = mask.to(torch.float64)
    old = logp.detach() if old is None else old
    lr = logp - old
    if c["importance_sampling_level"] == "sequence":
        lr = ((lr * m).sum(1) / m.sum(1).clamp(min=1)).unsqueeze(1)
    r = torch.exp(lr)
    a = adv.unsqueeze(1)
    r1 = r if c["delta"] is None else torch.clamp(r, max=c["delta"])
    r2 = torch.clamp(r, 1 - c["epsilon"], 1 + c["epsilon_high"])
    ell = -torch.minimum(r1 * a, r2 * a)
    if c["beta"] != 0.0:
        kl = torch.exp(ref - logp) - (ref - logp) - 1
        if c["use_bias_correction_kl"]:
            kl = kl * r
        ell = ell + c["beta"] * kl
    ell = ell.expand_as(m) * m
    lt = c["loss_type"]
    if lt == "grpo":
        return (ell.sum(1) / m.sum(1).clamp(min=1)).mean() / ga
    if lt == "bnpo":
        return ell.sum() / m.sum().clamp(min=1) / ga
    if lt == "dr_grpo":
        return ell.sum() / (m.shape[0] * c["max_completion_length"]) / ga
    if lt == "dapo":
        return ell.sum() / (max(num_items, 1.0) * ga / spg)
    raise ValueError(lt)


def own_rloo_loss(logp, old_logps, adv, mask, eps_lo, eps_hi):
    lr = (logp * mask).sum(1) - old_logps
    r = torch.exp(lr)
    return (-torch.minimum(r * adv, torch.clamp(r, 1 - eps_lo, 1 + eps_hi) * adv)).mean()


# --------------------------------------------------------------------------------------------------------------------
# loss cases

GEN = torch.Generator().manual_seed(20261202)


def randn(*s):
    return torch.randn(*s, generator=GEN, dtype=torch.float64)


def rand(*s):
    return torch.rand(*s, generator=GEN, dtype=torch.float64)


def make_mask(kind):
    mask = torch.ones(B, T, dtype=torch.long)  # TRL's completion_mask is an int64 tensor
    if kind in ("padded", "masked_row"):
        mask[1, 4:] = 0
        mask[3, 2:] = 0
    if kind == "masked_row":  # mask_truncated_completions zeroes a whole truncated completion
        mask[4, :] = 0
    return mask


def make_inputs(off_policy, mask_kind, level):
    logp = -rand(B, T) * 2.0 - 0.05
    adv = randn(B)
    adv[0], adv[1] = abs(adv[0]) + 0.3, -abs(adv[1]) - 0.3  # both signs present
    adv[2] = abs(adv[2]) + 0.1
    ent = rand(B, T) * 2.0
    ref = logp + 0.2 * randn(B, T)
    mask = make_mask(mask_kind)
    old = None
    if off_policy:
        old = logp + 0.3 * randn(B, T)
        if level == "token":
            # force ratios 1.82 (> delta 1.5 and > 1 + epsilon_high) on a negative- and a positive-advantage row
            old[1, 0] = logp[1, 0] - 0.6
            old[0, 1] = logp[0, 1] - 0.6
            old[2, 2] = logp[2, 2] + 0.5  # ratio 0.61 < 1 - epsilon
        else:
            # sequence level: whole-row shifts give sequence ratios exp(0.45) = 1.57 (rows 0, 2: A > 0, high-clipped)
            # and exp(-0.4) = 0.67 (row 1: A < 0, low-clipped)
            old[0] = logp[0] - 0.45
            old[1] = logp[1] + 0.4
            old[2] = logp[2] - 0.45
    # TRL's fused head returns 0 at masked (label -100) positions; mirror it in every per-token input
    z = mask == 0
    logp = logp.masked_fill(z, 0.0)
    ent = ent.masked_fill(z, 0.0)
    ref = ref.masked_fill(z, 0.0)
    if old is not None:
        old = old.masked_fill(z, 0.0)
    return logp, old, ref, adv, mask, ent


def run_grpo_loss(name, kw, ga=1, off_policy=True, mask_kind="padded", extra_note=None, num_items=None,
                  data=None):
    args = grpo_config(gradient_accumulation_steps=ga, **kw)
    c = {
        "loss_type": args.loss_type,
        "beta": args.beta,
        "epsilon": args.epsilon,
        "epsilon_high": args.epsilon_high if args.epsilon_high is not None else args.epsilon,
        "delta": args.delta,
        "importance_sampling_level": args.importance_sampling_level,
        "max_completion_length": args.max_completion_length,
        "use_bias_correction_kl": args.use_bias_correction_kl,
        "gradient_accumulation_steps": ga,
        "steps_per_generation": args.steps_per_generation,
        "num_processes": 1,
        "temperature": args.temperature,
        "top_entropy_quantile": args.top_entropy_quantile,
    }
    logp0, old, ref, adv, mask, ent = data or make_inputs(off_policy, mask_kind, c["importance_sampling_level"])
    if num_items is None:
        # the micro-batch is 1/GA of the generation batch; the other micro-batches hold this many tokens too
        num_items = int(mask.sum()) * ga
    logp = logp0.clone().requires_grad_(True)
    t = loss_trainer(args, ga)
    t._get_per_token_logps_and_entropies = lambda *a, **k: (logp, ent, None)
    inputs = {
        "prompt_ids": torch.ones(B, 2, dtype=torch.long),
        "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.full((B, T), 7, dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv.clone(),
        "num_items_in_batch": torch.tensor(num_items),  # TRL: gathered loss_mask.sum(), an int64 0-dim tensor
    }
    if old is not None:
        inputs["old_per_token_logps"] = old.clone()
    if c["beta"] != 0.0:
        inputs["ref_per_token_logps"] = ref.clone()
    loss, loc = traced(lambda: t._compute_loss(t.model, inputs), GRPOTrainer._compute_loss.__code__)
    loss.backward()
    grad = logp.grad.clone()

    # independent transcription
    lp2 = logp0.clone().requires_grad_(True)
    own = own_grpo_loss(c, lp2, old, ref if c["beta"] else None, adv, mask, num_items, ga, c["steps_per_generation"])
    own.backward()
    assert abs(own.item() - loss.item()) <= 1e-12 * max(1.0, abs(loss.item())), (name, own.item(), loss.item())
    assert torch.allclose(lp2.grad, grad, rtol=0, atol=1e-12), (name, (lp2.grad - grad).abs().max())
    assert loss.dtype == torch.float64

    # by-hand closed forms
    m = mask.to(torch.float64)
    n_b = m.sum(1).clamp(min=1)
    if old is None and c["importance_sampling_level"] == "token":
        kl_grad = torch.zeros_like(m)
        if c["beta"]:
            kl_grad = c["beta"] * (1 - torch.exp(ref - logp0))
            if c["use_bias_correction_kl"]:  # d/dlogp [kl · exp(logp - sg(logp))] at ratio 1 = kl' + kl
                kl_grad = kl_grad + c["beta"] * (torch.exp(ref - logp0) - (ref - logp0) - 1)
        g_tok = -adv.unsqueeze(1) + kl_grad
        if c["loss_type"] == "grpo":
            hand = g_tok * m / (n_b.unsqueeze(1) * B * ga)
        elif c["loss_type"] == "dapo":
            hand = g_tok * m / (num_items * ga / c["steps_per_generation"])
        elif c["loss_type"] == "bnpo":
            hand = g_tok * m / (m.sum() * ga)
        else:
            hand = g_tok * m / (B * c["max_completion_length"] * ga)
        assert torch.allclose(hand, grad, rtol=0, atol=1e-12), (name, "by hand", (hand - grad).abs().max())
    if c["loss_type"] != "dapo":
        assert abs(loc["policy_loss"].item() / ga - loss.item()) < 1e-15, name
        assert loc["normalizer"] == ga
    else:
        assert abs(float(loc["normalizer"]) - num_items * ga / c["steps_per_generation"]) < 1e-12
    assert (grad[mask == 0] == 0).all(), name  # no gradient through padding

    # the clipping / delta branches are really exercised
    lr = logp0 - (logp0 if old is None else old)
    if c["importance_sampling_level"] == "sequence":
        lr = ((lr * m).sum(1) / n_b).unsqueeze(1).expand_as(m)
    r = torch.exp(lr)
    sel = mask.bool()
    if old is not None:
        A = adv.unsqueeze(1).expand_as(m)
        assert ((r > 1 + c["epsilon_high"]) & (A > 0) & sel).any(), name
        assert ((r < 1 - c["epsilon"]) & (A < 0) & sel).any() or ((r < 1 - c["epsilon"]) & sel).any(), name
        if c["delta"] is not None:
            assert ((r > c["delta"]) & (A < 0) & sel).any(), name

    tm = t._metrics["train"]
    assert all(len(v) == 1 for v in tm.values()), dict(tm)
    checked = ["kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"]
    other = ["entropy", "clip_ratio/low_min", "clip_ratio/high_max"]
    assert set(tm) == set(checked[c["beta"] == 0.0:]) | set(other), sorted(tm)
    for k in tm:
        assert math.isfinite(tm[k][0]), (name, k)
    # entropy metric by hand: masked token mean
    assert abs(tm["entropy"][0] - ((ent * m).sum() / m.sum()).item()) < 1e-12
    case = {
        "name": name,
        "trainer": "grpo",
        "config": c,
        "grad_accum": ga,
        "inputs": {
            "per_token_logps": f64(logp0),
            "old_per_token_logps": f64(old) if old is not None else None,
            "ref_per_token_logps": f64(ref) if c["beta"] != 0.0 else None,
            "advantages": f64(adv),
            "completion_mask": mask.tolist(),
            "num_items_in_batch": float(num_items),
            "entropies": f64(ent),
        },
        "expected": {
            "loss": loss.item(),
            "policy_loss": loc["policy_loss"].item(),
            "d_per_token_logps": f64(grad),
            "metrics": {k: tm[k][0] for k in checked if k in tm},
            "other_metrics": {k: tm[k][0] for k in other},
        },
    }
    if extra_note:
        case["note"] = extra_note
    return case


def rloo_loss_trainer(args):
    t = RLOOTrainer.__new__(RLOOTrainer)
    t.args = args
    t.epsilon_low = args.epsilon
    t.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    t.aux_loss_enabled = False
    t.accelerator = accelerator()
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    t.model = types.SimpleNamespace(training=True)
    return t


def run_rloo_loss(name, epsilon_high=None, mask_kind="padded"):
    args = RLOOConfig(output_dir=TMP, use_cpu=True, report_to="none", per_device_train_batch_size=B,
                      num_generations=B, epsilon_high=epsilon_high)
    eps_hi = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    mask = make_mask(mask_kind)
    logp0 = (-rand(B, T) * 0.5).masked_fill(mask == 0, 0.0)
    ent = (rand(B, T) * 2.0).masked_fill(mask == 0, 0.0)
    # old_logps: TRL passes sequence sums (old_per_token_logps · mask).sum(1) of the generating policy
    # (a fully masked row has old_logps = 0 exactly, as TRL's masked sum gives)
    old_logps = (logp0 * mask).sum(1) + 0.2 * randn(B) * (mask.sum(1) > 0)
    old_logps[0] = (logp0[0] * mask[0]).sum() - 0.4  # ratio 1.49: high-clipped with A > 0
    old_logps[1] = (logp0[1] * mask[1]).sum() + 0.4  # ratio 0.67: low-clipped with A < 0
    adv = randn(B)
    adv[0], adv[1] = abs(adv[0]) + 0.3, -abs(adv[1]) - 0.3
    logp = logp0.clone().requires_grad_(True)
    t = rloo_loss_trainer(args)
    t._get_per_token_logps_and_entropies = lambda *a, **k: (logp, ent, None)
    inputs = {
        "prompt_ids": torch.ones(B, 2, dtype=torch.long),
        "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.full((B, T), 7, dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv.clone(),
        "old_logps": old_logps.clone(),
    }
    loss = t._compute_loss(t.model, inputs)
    loss.backward()
    lp2 = logp0.clone().requires_grad_(True)
    own = own_rloo_loss(lp2, old_logps, adv, mask.to(torch.float64), args.epsilon, eps_hi)
    own.backward()
    assert abs(own.item() - loss.item()) < 1e-12 and torch.allclose(lp2.grad, logp.grad, rtol=0, atol=1e-12), name
    # by hand: the gradient of a completion is the same on each of its tokens: -A·r/B when unclipped, else 0
    r = torch.exp((logp0 * mask).sum(1) - old_logps)
    clipped = ((r > 1 + eps_hi) & (adv > 0)) | ((r < 1 - args.epsilon) & (adv < 0))
    hand = torch.where(clipped, 0.0, -adv * r / B).unsqueeze(1) * mask
    assert torch.allclose(hand, logp.grad, rtol=0, atol=1e-12), name
    assert clipped[0] and clipped[1], name
    tm = t._metrics["train"]
    checked = ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"]
    other = ["entropy", "clip_ratio/low_min", "clip_ratio/high_max"]
    assert set(tm) == set(checked) | set(other), sorted(tm)
    return {
        "name": name,
        "trainer": "rloo",
        "config": {"epsilon": args.epsilon, "epsilon_high": eps_hi, "beta": args.beta,
                   "num_generations": args.num_generations, "gradient_accumulation_steps": 1,
                   "note": "beta is not used by the loss: RLOO puts the KL into the reward (advantage_cases)"},
        "grad_accum": 1,
        "inputs": {
            "per_token_logps": f64(logp0),
            "old_logps": f64(old_logps),
            "advantages": f64(adv),
            "completion_mask": mask.tolist(),
            "entropies": f64(ent),
        },
        "expected": {
            "loss": loss.item(),
            "d_per_token_logps": f64(logp.grad),
            "metrics": {k: tm[k][0] for k in checked},
            "other_metrics": {k: tm[k][0] for k in other},
        },
    }


def accumulation_case(name, loss_type, ga, spg):
    """One generation batch of B·spg rows split into spg micro-batches by TRL's split_tensor_dict; the first GA of
    them (one optimizer step) go through _compute_loss; their summed loss and gradients."""
    kw = dict(loss_type=loss_type, beta=0.04, epsilon_high=0.28, use_bias_correction_kl=False,
              per_device_train_batch_size=B, num_generations=B, gradient_accumulation_steps=ga)
    if spg != ga:
        kw["steps_per_generation"] = spg
    args = grpo_config(**kw)
    assert args.steps_per_generation == spg
    rows = B * spg
    mask = torch.ones(rows, T, dtype=torch.long)
    lengths = torch.randint(1, T + 1, (rows,), generator=GEN)
    for i, n in enumerate(lengths.tolist()):
        mask[i, n:] = 0
    logp = (-rand(rows, T) * 2.0).masked_fill(mask == 0, 0.0)
    old = (logp + 0.3 * randn(rows, T)).masked_fill(mask == 0, 0.0)
    ref = (logp + 0.2 * randn(rows, T)).masked_fill(mask == 0, 0.0)
    ent = (rand(rows, T) * 2.0).masked_fill(mask == 0, 0.0)
    adv = randn(rows)
    gen_batch = {
        "prompt_ids": torch.ones(rows, 2, dtype=torch.long), "prompt_mask": torch.ones(rows, 2, dtype=torch.long),
        "completion_ids": torch.full((rows, T), 7, dtype=torch.long), "completion_mask": mask,
        "advantages": adv, "num_items_in_batch": mask.sum(), "old_per_token_logps": old,
        "ref_per_token_logps": ref, "per_token_logps": logp, "entropies": ent,
    }
    micro = split_tensor_dict(gen_batch, spg)  # TRL's own split (no shuffle here: shuffle_sequence_dict is a permutation)
    total_loss, grads, out_micro = 0.0, [], []
    c = {"loss_type": loss_type, "beta": 0.04, "epsilon": 0.2, "epsilon_high": 0.28, "delta": None,
         "importance_sampling_level": "token", "max_completion_length": args.max_completion_length,
         "use_bias_correction_kl": False, "gradient_accumulation_steps": ga, "steps_per_generation": spg,
         "num_processes": 1}
    for k in range(ga):
        mb = dict(micro[k])
        lp = mb.pop("per_token_logps").clone().requires_grad_(True)
        en = mb.pop("entropies")
        t = loss_trainer(args, ga)
        t._get_per_token_logps_and_entropies = lambda *a, _lp=lp, _en=en, **kw2: (_lp, _en, None)
        loss = t._compute_loss(t.model, mb)
        loss.backward()
        total_loss += loss.item()
        grads.append(lp.grad)
        out_micro.append({
            "inputs": {"per_token_logps": f64(lp), "old_per_token_logps": f64(mb["old_per_token_logps"]),
                       "ref_per_token_logps": f64(mb["ref_per_token_logps"]), "advantages": f64(mb["advantages"]),
                       "completion_mask": mb["completion_mask"].tolist(),
                       "num_items_in_batch": float(mb["num_items_in_batch"])},
            "expected": {"loss": loss.item(), "d_per_token_logps": f64(lp.grad)},
        })
    # full-batch check for dapo with spg == ga: the accumulated gradient is one token-sum over the generation batch
    # divided by its token count
    if loss_type == "dapo" and spg == ga:
        lp_all = logp.clone().requires_grad_(True)
        full = own_grpo_loss(c, lp_all, old, ref, adv, mask, float(mask.sum()), 1, 1)
        full.backward()
        assert abs(full.item() - total_loss) < 1e-12
        assert torch.allclose(lp_all.grad, torch.cat(grads), rtol=0, atol=1e-12)
    if loss_type == "grpo":
        # per micro-batch: mean over its B rows of the row token-means, ÷ GA
        own_total = sum(own_grpo_loss(c, micro[k]["per_token_logps"], micro[k]["old_per_token_logps"],
                                      micro[k]["ref_per_token_logps"], micro[k]["advantages"],
                                      micro[k]["completion_mask"], 0.0, ga, spg).item() for k in range(ga))
        assert abs(own_total - total_loss) < 1e-12
    return {"name": name, "trainer": "grpo", "config": c, "generation_batch_rows": rows,
            "num_items_in_batch": float(mask.sum()), "micro_batches": out_micro,
            "expected": {"sum_of_micro_batch_losses": total_loss},
            "note": "micro_batches are the first GA (one optimizer step) of the spg slices of the generation batch; "
                    "each micro-batch's loss is what Trainer back-propagates (Trainer does not divide it again: "
                    "GRPOTrainer.loss_is_scaled_for_ga = True); the optimizer step sees the sum of their gradients."}


# --------------------------------------------------------------------------------------------------------------------
# advantage cases: _generate_and_score_completions with stubs

EOS, PAD = 2, 0


def reward_funcs_from(table):
    """One Python reward function per column of `table` (rows = completions, None allowed)."""
    funcs = []
    for j in range(len(table[0])):
        col = [row[j] for row in table]

        def f(prompts, completions, completion_ids, _col=col, **kwargs):
            assert len(completions) == len(_col)
            return list(_col)

        f.__name__ = f"r{j}"
        funcs.append(f)
    return funcs


def gen_trainer(cls, args, rewards_table, completion_ids, old, ref):
    t = cls.__new__(cls)
    t.args = args
    t.accelerator = accelerator()
    t.model = types.SimpleNamespace(training=True, is_gradient_checkpointing=False)
    t.state = types.SimpleNamespace(global_step=0, num_input_tokens_seen=0)
    t.environment_factories = None
    t.environments = None
    t.tools = None
    t.rollout_func = None
    t.processing_class = types.SimpleNamespace(
        batch_decode=lambda ids, skip_special_tokens=True: [" ".join(map(str, x)) for x in ids])
    t._tokenizer = types.SimpleNamespace(pad_token_id=PAD)
    t.eos_token_ids = [EOS]
    t.pad_to_multiple_of = args.pad_to_multiple_of
    t.mask_truncated_completions = args.mask_truncated_completions
    t.num_generations = args.num_generations
    t.num_generations_eval = args.num_generations_eval or args.num_generations
    t.num_iterations = args.num_iterations
    t.use_vllm = args.use_vllm
    t.beta = args.beta
    t.ref_model = REF_MODEL if args.beta != 0.0 else None
    t.chat_template_kwargs = {}
    funcs = reward_funcs_from(rewards_table)
    t.reward_funcs = funcs
    t.reward_func_names = [f.__name__ for f in funcs]
    t.reward_processing_classes = [None] * len(funcs)
    t.reward_weights = (torch.tensor(args.reward_weights, dtype=torch.float32) if args.reward_weights is not None
                        else torch.ones(len(funcs), dtype=torch.float32))
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    t._logs = {"images": deque(), "prompt": deque(), "completion": deque(), "rewards": defaultdict(deque),
               "advantages": deque(), "extra": defaultdict(deque)}
    t._pending_extra_logs = defaultdict(list)
    t._pending_metrics = defaultdict(list)
    t.log_multimodal = False
    n = len(completion_ids)
    t._tokenize_prompts = lambda prompts: ([[1, 10 + i // args.num_generations] for i in range(n)], None, {})
    if cls is GRPOTrainer:
        t.vllm_importance_sampling_correction = args.vllm_importance_sampling_correction
        t.multi_objective_aggregation = args.multi_objective_aggregation
        t.scale_rewards = args.scale_rewards
        t._generate_single_turn = lambda prompt_ids, images, mm, num_generations: (
            [list(c) for c in completion_ids], None)
    else:
        t.normalize_advantages = args.normalize_advantages
        t.reward_clip_range = args.reward_clip_range
        t._generate_single_turn = lambda prompt_ids, images, mm: [list(c) for c in completion_ids]
    calls = []

    def logps(model, input_ids, attention_mask, logits_to_keep, *a, **k):
        calls.append("ref" if model is REF_MODEL else "old")
        assert logits_to_keep == old.shape[1]
        return (ref if model is REF_MODEL else old).clone(), None, None

    t._get_per_token_logps_and_entropies = logps
    return t, calls


def completion_batch(lengths, truncated, gen):
    """Token ids: `length` tokens; the last is EOS unless truncated (then the length is max_completion_length)."""
    out = []
    for n, tr in zip(lengths, truncated, strict=True):
        ids = torch.randint(3, 30, (n,), generator=gen).tolist()
        if not tr:
            ids[-1] = EOS
        out.append(ids)
    return out


def seq_logps(lengths, width, scale, base=None):
    x = -rand(len(lengths), width) * scale if base is None else base + 0.1 * randn(len(lengths), width)
    for i, n in enumerate(lengths):
        x[i, n:] = 0.0
    return x.to(torch.float32)


def nanstd_np(x, axis=None):
    return np.nanstd(x, axis=axis, ddof=1)


def grpo_advantage_case(name, rewards, lengths, truncated, **kw):
    g = kw.pop("num_generations")
    ga = kw.pop("gradient_accumulation_steps", 1)
    n = len(rewards)
    args = GRPOConfig(output_dir=TMP, use_cpu=True, report_to="none", num_generations=g,
                      per_device_train_batch_size=n // ga, gradient_accumulation_steps=ga, **kw)
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) % 1000 + 7)
    cids = completion_batch(lengths, truncated, gen)
    width = max(lengths)
    old = seq_logps(lengths, width, 2.0)
    t, calls = gen_trainer(GRPOTrainer, args, rewards, cids, old, old)
    out = t._generate_and_score_completions([{"prompt": f"prompt {i // g}"} for i in range(n)])
    tm = {k: v[-1] for k, v in t._metrics["train"].items()}
    adv = out["advantages"]
    assert adv.dtype == torch.float32

    # numpy transcription
    R = np.array([[np.nan if v is None else v for v in row] for row in rewards], dtype=np.float32)
    w = t.reward_weights.numpy()
    unscorable = np.isnan(R).all(1)
    if args.multi_objective_aggregation == "sum_then_normalize":
        r = np.nansum(R * w, axis=1).astype(np.float32)
        r[unscorable] = np.nan
        grp = r.reshape(-1, g)
        mean = np.repeat(np.nanmean(grp, 1), g)
        if args.scale_rewards == "batch":
            std = np.full(n, nanstd_np(r))
        else:
            std = np.repeat(nanstd_np(grp, 1), g)
        a = r - mean
        if args.scale_rewards != "none":
            a = a / (std + 1e-4)
    else:
        grp = R.reshape(-1, g, R.shape[1])
        z = (grp - np.nanmean(grp, 1, keepdims=True)) / (nanstd_np(grp, 1)[:, None, :] + 1e-4)
        r = np.nansum(z.reshape(n, -1) * w, axis=1)
        r[unscorable] = np.nan
        std = np.full(n, nanstd_np(r))
        a = (r - np.nanmean(r)) / (std + 1e-4)
    a = np.nan_to_num(a, nan=0.0)
    assert np.allclose(a, adv.numpy(), rtol=0, atol=2e-6), (name, a, adv)
    assert abs(tm["frac_reward_zero_std"] - np.isclose(std, 0.0, rtol=1e-5, atol=1e-8).mean()) < 1e-7
    logged = np.nansum(R * w, axis=1)
    logged[unscorable] = np.nan
    assert abs(tm["reward"] - np.nanmean(logged)) < 1e-6 and abs(tm["reward_std"] - nanstd_np(logged)) < 1e-6
    # completion metrics by hand
    L = np.array(lengths, dtype=np.float64)
    assert tm["completions/mean_length"] == L.mean() and tm["completions/clipped_ratio"] == np.mean(truncated)
    cm = out["completion_mask"]
    exp_mask = np.array([[1 if (j < n_ and not (args.mask_truncated_completions and tr)) else 0
                          for j in range(width)] for n_, tr in zip(lengths, truncated, strict=True)])
    assert (cm.numpy() == exp_mask).all()
    assert int(out["num_items_in_batch"]) == exp_mask.sum()
    computes_old = "old_per_token_logps" in out
    generate_every = args.steps_per_generation * args.num_iterations
    assert computes_old == (args.gradient_accumulation_steps % generate_every != 0)
    assert calls == (["old"] if computes_old else [])
    return {
        "name": name,
        "trainer": "grpo",
        "num_generations": g,
        "scale_rewards": args.scale_rewards,
        "multi_objective_aggregation": args.multi_objective_aggregation,
        "reward_weights": args.reward_weights,
        "mask_truncated_completions": args.mask_truncated_completions,
        "num_iterations": args.num_iterations,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "steps_per_generation": args.steps_per_generation,
        "rewards_per_func": rewards,
        "reward_func_names": t.reward_func_names,
        "completion_ids": cids,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
        "expected_advantages": f32(adv),
        "expected_completion_mask": cm.tolist(),
        "expected_num_items_in_batch": int(out["num_items_in_batch"]),
        "computes_old_per_token_logps": computes_old,
        "expected_metrics": {k: (v if k == "num_tokens" else float(v)) for k, v in sorted(tm.items())},
    }


def rloo_advantage_case(name, rewards, lengths, truncated, **kw):
    g = kw.pop("num_generations", None)
    n = len(rewards)
    args = RLOOConfig(output_dir=TMP, use_cpu=True, report_to="none", per_device_train_batch_size=n,
                      **({"num_generations": g} if g else {}), **kw)
    g = args.num_generations
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) % 1000 + 11)
    cids = completion_batch(lengths, truncated, gen)
    width = max(lengths)
    old = seq_logps(lengths, width, 2.0)
    ref = seq_logps(lengths, width, 0, base=old.to(torch.float64))
    t, calls = gen_trainer(RLOOTrainer, args, rewards, cids, old, ref)
    out = t._generate_and_score_completions([{"prompt": f"prompt {i // g}"} for i in range(n)])
    tm = {k: v[-1] for k, v in t._metrics["train"].items()}
    adv = out["advantages"]
    cm = out["completion_mask"]
    assert calls == (["old", "ref"] if args.beta != 0.0 else ["old"])
    assert torch.equal(out["old_logps"], (old * cm).sum(1))

    # numpy transcription: leave-one-out over the scorable siblings
    R = np.array([[np.nan if v is None else v for v in row] for row in rewards], dtype=np.float32)
    w = t.reward_weights.numpy()
    unscorable = np.isnan(R).all(1)
    r = np.nansum(R * w, axis=1).astype(np.float32)
    r[unscorable] = np.nan
    if args.reward_clip_range:
        r = np.clip(r, *args.reward_clip_range)
    m = cm.numpy().astype(np.float32)
    kl = ((old.numpy() - ref.numpy()) * m).sum(1)
    if args.beta != 0.0:
        r = r - args.beta * kl
    grp = r.reshape(-1, g)
    cnt = (~np.isnan(grp)).sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        base = (np.nansum(grp, 1, keepdims=True) - grp) / (cnt - 1)
    a = (r - base.reshape(-1))
    if args.normalize_advantages:
        a = (a - np.nanmean(a)) / (nanstd_np(a) + 1e-4)
    a = np.nan_to_num(a, nan=0.0)
    assert np.allclose(a, adv.numpy(), rtol=0, atol=2e-6), (name, a, adv)
    std = nanstd_np(grp, 1)
    assert abs(tm["frac_reward_zero_std"] - np.isclose(std, 0.0, rtol=1e-5, atol=1e-8).mean()) < 1e-7
    if args.beta != 0.0:
        assert abs(tm["kl"] - ((old.numpy() - ref.numpy()) * m).sum() / m.sum()) < 1e-6
    case = {
        "name": name,
        "trainer": "rloo",
        "num_generations": g,
        "beta": args.beta,
        "normalize_advantages": args.normalize_advantages,
        "reward_clip_range": list(args.reward_clip_range) if args.reward_clip_range else None,
        "reward_weights": args.reward_weights,
        "mask_truncated_completions": args.mask_truncated_completions,
        "rewards_per_func": rewards,
        "reward_func_names": t.reward_func_names,
        "completion_ids": cids,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
        "old_per_token_logps": f32(old),
        "ref_per_token_logps": f32(ref) if args.beta != 0.0 else None,
        "expected_kl_per_sequence": f32(kl) if args.beta != 0.0 else None,
        "expected_old_logps": f32(out["old_logps"]),
        "expected_advantages": f32(adv),
        "expected_completion_mask": cm.tolist(),
        "expected_metrics": {k: (v if k == "num_tokens" else float(v)) for k, v in sorted(tm.items())},
    }
    return case


# --------------------------------------------------------------------------------------------------------------------
# log-probs / entropies of the fused LM head at a temperature

def logprob_case(name, temperature, n=6, v=8):
    logits = (torch.randn(n, v, generator=GEN) * 2.0).to(torch.float32)
    labels = torch.randint(0, v, (n,), generator=GEN)
    eye = torch.eye(v, dtype=torch.float32)  # LM head = identity, so hidden @ W^T = the logits
    lp, ent, *_ = ChunkedLogProbFunction.apply(logits, eye, None, labels, temperature, 32768, None, 1.0,
                                               ("log_probs", "entropy"))
    ls = torch.log_softmax(logits.double() / temperature, -1)
    assert torch.allclose(lp.double(), ls.gather(1, labels[:, None])[:, 0], atol=1e-6)
    assert torch.allclose(ent.double(), -(ls.exp() * ls).sum(-1), atol=1e-5)
    return {"name": name, "temperature": temperature, "logits": f32(logits), "labels": labels.tolist(),
            "expected_log_probs": f32(lp), "expected_entropy": f32(ent)}


# --------------------------------------------------------------------------------------------------------------------

NOTES = {
    "source": "TRL 1.16 trl/trainer/grpo_trainer.py GRPOTrainer._compute_loss (lines 3020-3291) and "
              "_generate_and_score_completions (2324-2936); trl/trainer/rloo_trainer.py RLOOTrainer._compute_loss "
              "(1794-1861) and _generate_and_score_completions (1458-1786). Full write-up: "
              "/work/notes/trl_rl_semantics.md (outside the repo).",
    "loss": "ratio r = exp(logp - old) per token (importance_sampling_level token) or exp(masked mean of logp - old) "
            "per sequence (sequence); old = logp.detach() when old_per_token_logps is null (num_iterations 1, "
            "generation aligned with the optimizer step). per-token loss = -min(min(r, delta)·A, clamp(r, 1-eps, "
            "1+eps_high)·A) (+ beta·kl, kl = exp(ref-logp) - (ref-logp) - 1, times r when use_bias_correction_kl). "
            "grpo: mean over rows of (row token sum / max(row tokens, 1)), ÷ GA. bnpo: token sum / max(tokens, 1), "
            "÷ GA. dr_grpo: token sum / (B·max_completion_length), ÷ GA. dapo: token sum / (max(num_items_in_batch, "
            "1) / num_processes · GA / steps_per_generation). `loss` is what TRL returns (Trainer does not divide it "
            "again: loss_is_scaled_for_ga = True); `policy_loss` is TRL's local before the ÷ GA (= loss for dapo).",
    "rloo_loss": "logps = (per_token_logps·mask).sum(1); r = exp(logps - old_logps); loss = mean over rows of "
                 "-min(r·A, clamp(r, 1-eps, 1+eps_high)·A). No KL in the loss. TRL returns it unscaled "
                 "(loss_is_scaled_for_ga = False): HF Trainer divides it by GA.",
    "metrics": "`metrics` are the loss-side metrics graft emits: kl (beta > 0; masked token mean of the un-corrected "
               "or corrected per-token kl actually used), clip_ratio/low_mean = masked mean of (r < 1-eps & A < 0), "
               "high_mean = (r > 1+eps_high & A > 0), region_mean = either; for the sequence level and RLOO the "
               "means are over completions. r here is coef_1 after the delta clamp. `other_metrics`: entropy "
               "(masked token mean of `inputs.entropies`), clip_ratio/low_min = min over rows of the row mean of "
               "low-clipped, clip_ratio/high_max = max over rows of the row mean of high-clipped (NaN rows, i.e. "
               "fully masked, skipped).",
    "num_items_in_batch": "TRL's num_items_in_batch is the gathered completion-token count of the whole generation "
                          "batch (all steps_per_generation micro-batches, all processes); only dapo (and cispo/"
                          "vespo) read it. In the loss cases it is mask.sum()·GA (the other micro-batches assumed to "
                          "hold as many tokens); accumulation_cases use real splits.",
    "numerics": "loss cases float64 (inputs and TRL's arithmetic); advantage cases float32 (TRL builds "
                "rewards_per_func as float32); logprob cases float32 statistics. Metric values are Python floats "
                "from .item().",
}


def dump(obj):
    text = json.dumps(obj, indent=1, allow_nan=False)
    return re.sub(r"\[\s*([-0-9.eE+,\s]+?)\s*\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text)


def main():
    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "trl": trl.__version__,
                "transformers": transformers.__version__, "numpy": np.__version__}
    for k, v in PINNED.items():
        if versions[k].split("+")[0] != v:
            print(f"warning: {k} {versions[k]} != pinned {v}; the fixture records the installed one", file=sys.stderr)

    nobias = {"use_bias_correction_kl": False}
    cases = []
    for lt in ["grpo", "bnpo", "dr_grpo", "dapo"]:
        base = dict(loss_type=lt, max_completion_length=T, **nobias)
        cases.append(run_grpo_loss(f"{lt}-on-policy", base, off_policy=False))
        cases.append(run_grpo_loss(f"{lt}-off-policy", base))
        cases.append(run_grpo_loss(f"{lt}-beta", dict(base, beta=0.04)))
        cases.append(run_grpo_loss(f"{lt}-clip-higher-delta-accum2", dict(base, beta=0.04, epsilon_high=0.28,
                                                                          delta=1.5), ga=2))
        cases.append(run_grpo_loss(f"{lt}-sequence", dict(base, beta=0.04, importance_sampling_level="sequence")))
    cases.append(run_grpo_loss("grpo-on-policy-beta", dict(loss_type="grpo", beta=0.04, max_completion_length=T,
                                                           **nobias), off_policy=False))
    cases.append(run_grpo_loss("dapo-on-policy-beta-accum2", dict(loss_type="dapo", beta=0.04,
                                                                  max_completion_length=T, **nobias),
                               off_policy=False, ga=2))
    cases.append(run_grpo_loss("dr_grpo-max-len-16", dict(loss_type="dr_grpo", beta=0.04, max_completion_length=16,
                                                          **nobias)))
    cases.append(run_grpo_loss("grpo-masked-row", dict(loss_type="grpo", beta=0.04, epsilon_high=0.28,
                                                       max_completion_length=T, **nobias), mask_kind="masked_row",
                               extra_note="row 4 fully masked (as mask_truncated_completions does)"))
    cases.append(run_grpo_loss("bnpo-unpadded-accum3", dict(loss_type="bnpo", beta=0.04, max_completion_length=T,
                                                            **nobias), mask_kind="none", ga=3))
    cases.append(run_grpo_loss("dapo-sequence-masked-row", dict(loss_type="dapo", beta=0.04,
                                                                importance_sampling_level="sequence",
                                                                max_completion_length=T, **nobias),
                               mask_kind="masked_row"))
    cases += [run_rloo_loss("rloo"), run_rloo_loss("rloo-clip-higher", epsilon_high=0.28),
              run_rloo_loss("rloo-unpadded", mask_kind="none")]

    # TRL defaults / behaviours not modelled by graft's PolicyLoss yet (not read by grpo_fixture.rs)
    extra = [
        run_grpo_loss("grpo-beta-bias-corrected-kl-default", dict(loss_type="grpo", beta=0.04,
                                                                  max_completion_length=T),
                      extra_note="use_bias_correction_kl = True (TRL default): per_token_kl *= coef_1"),
        run_grpo_loss("dapo-beta-bias-corrected-kl-default", dict(loss_type="dapo", beta=0.04,
                                                                  max_completion_length=T),
                      extra_note="use_bias_correction_kl = True (TRL default)"),
        run_grpo_loss("grpo-on-policy-beta-bias-corrected-kl-default",
                      dict(loss_type="grpo", beta=0.04, max_completion_length=T), off_policy=False,
                      extra_note="use_bias_correction_kl = True on-policy: ratio 1 but d ratio / d logp = 1, so the "
                                 "KL gradient gains + beta·kl per token"),
        run_grpo_loss("grpo-sequence-bias-corrected-kl-default",
                      dict(loss_type="grpo", beta=0.04, importance_sampling_level="sequence",
                           max_completion_length=T),
                      extra_note="use_bias_correction_kl = True, sequence level: the (B,1) sequence ratio multiplies "
                                 "every token's kl"),
        run_grpo_loss("dapo-defaults-beta", dict(beta=0.04, max_completion_length=T),
                      extra_note="every other key at TRL's GRPOConfig default (loss_type dapo, epsilon 0.2, "
                                 "epsilon_high = epsilon, delta None, token level, bias-corrected KL)"),
    ]
    rm = run_rloo_loss("rloo-masked-row", mask_kind="masked_row")
    rm["note"] = ("row 4 fully masked (mask_truncated_completions): its ratio is exactly 1 and it still adds -A_4 / B "
                  "to the loss VALUE (per_sequence_loss.mean() is over all rows), with no gradient")
    extra.append(rm)
    d = make_inputs(True, "padded", "token")
    extra.append(run_grpo_loss("grpo-delta-below-clip-high", dict(loss_type="grpo", epsilon_high=0.28, delta=1.1,
                                                                  max_completion_length=T, **nobias), data=d,
                               extra_note="delta 1.1 < 1 + epsilon_high: the clip metrics use coef_1 after the "
                                          "delta clamp, so clip_ratio/high_mean is 0"))
    assert extra[-1]["expected"]["metrics"]["clip_ratio/high_mean"] == 0.0

    accumulation = [accumulation_case("grpo-accum2", "grpo", 2, 2), accumulation_case("dapo-accum2", "dapo", 2, 2),
                    accumulation_case("dapo-accum2-spg4", "dapo", 2, 4)]

    L = [3, 6, 2, 6, 4, 5, 1, 6]
    TR = [False, True, False, False, False, True, False, True]  # truncated = no EOS at the end (length = max 6)
    adv_cases = [
        grpo_advantage_case("grpo-group", [[1.0], [0.0], [0.5], [0.25], [1.0], [1.0], [1.0], [1.0]], L, TR,
                            num_generations=4, max_completion_length=6),
        grpo_advantage_case("grpo-batch", [[1.0], [0.0], [0.5], [0.25], [0.75], [1.0], [1.0], [0.125]], L, TR,
                            num_generations=4, scale_rewards="batch", max_completion_length=6),
        grpo_advantage_case("grpo-none", [[1.0], [0.0], [0.5], [0.25], [0.75], [1.0], [1.0], [0.125]], L, TR,
                            num_generations=4, scale_rewards="none", max_completion_length=6),
        grpo_advantage_case("grpo-two-funcs-weights-none-rewards",
                            [[1.0, None], [0.0, 1.0], [0.5, 0.0], [0.25, 1.0], [None, None], [1.0, 0.0],
                             [0.0, 0.0], [1.0, 1.0]], L, TR, num_generations=4, reward_weights=[1.0, 0.5],
                            max_completion_length=6),
        grpo_advantage_case("grpo-normalize-then-sum", [[1.0, 0.5], [0.0, 1.0], [0.5, 0.0], [0.25, 1.0],
                                                        [0.75, 0.25], [1.0, 0.0], [0.0, 0.0], [1.0, 1.0]], L, TR,
                            num_generations=4, reward_weights=[1.0, 0.5],
                            multi_objective_aggregation="normalize_then_sum", max_completion_length=6),
        grpo_advantage_case("grpo-mask-truncated-g2", [[1.0], [0.0], [0.5], [0.5], [0.75], [1.0], [0.0], [0.125]],
                            L, TR, num_generations=2, mask_truncated_completions=True, max_completion_length=6),
        grpo_advantage_case("grpo-num-iterations-2", [[1.0], [0.0], [0.5], [0.25], [1.0], [1.0], [1.0], [0.0]],
                            L, TR, num_generations=4, num_iterations=2, gradient_accumulation_steps=2,
                            max_completion_length=6),
        rloo_advantage_case("rloo-default-beta-g2", [[1.0], [0.0], [0.5], [0.25], [1.0], [1.0], [0.75], [0.0]],
                            L, TR, max_completion_length=6),
        rloo_advantage_case("rloo-g4-beta0-normalized", [[1.0], [0.0], [0.5], [0.25], [1.0], [1.0], [0.75], [0.0]],
                            L, TR, num_generations=4, beta=0.0, normalize_advantages=True, max_completion_length=6),
        rloo_advantage_case("rloo-g4-clip-two-funcs-unscorable",
                            [[1.0, 2.0], [None, None], [0.5, None], [0.25, 1.0], [3.0, 1.0], [1.0, 0.0],
                             [0.75, 0.5], [0.0, 0.0]], L, TR, num_generations=4, reward_weights=[1.0, 0.5],
                            reward_clip_range=(-0.5, 2.0), mask_truncated_completions=True,
                            max_completion_length=6),
    ]
    logprob_cases = [logprob_case("temperature-1.0", 1.0), logprob_case("temperature-0.7", 0.7)]

    gd, rd = GRPOConfig(output_dir=TMP, use_cpu=True, report_to="none"), RLOOConfig(output_dir=TMP, use_cpu=True,
                                                                                       report_to="none")
    defaults = {
        "grpo": {k: getattr(gd, k) for k in (
            "num_generations", "max_completion_length", "temperature", "top_p", "top_k", "beta", "epsilon",
            "epsilon_high", "delta", "loss_type", "scale_rewards", "num_iterations", "importance_sampling_level",
            "mask_truncated_completions", "reward_weights", "learning_rate", "use_bias_correction_kl",
            "multi_objective_aggregation", "top_entropy_quantile", "entropy_coef", "steps_per_generation",
            "generation_batch_size", "per_device_train_batch_size", "gradient_accumulation_steps")},
        "rloo": {k: getattr(rd, k) for k in (
            "num_generations", "max_completion_length", "temperature", "top_p", "top_k", "beta", "epsilon",
            "epsilon_high", "num_iterations", "normalize_advantages", "reward_clip_range",
            "mask_truncated_completions", "reward_weights", "learning_rate", "steps_per_generation",
            "generation_batch_size", "per_device_train_batch_size", "gradient_accumulation_steps")},
    }
    fixture = {
        "description": "GRPO / RLOO losses, gradients, advantages and metrics from TRL 1.16's own trainer code, "
                       "generated by scripts/gen_grpo_fixture.py.",
        "regenerate": "/work/pyref-trl/bin/python scripts/gen_grpo_fixture.py",
        "trl_version": trl.__version__,
        "versions": versions,
        "dtype": "float64",
        "dtypes": {"cases": "float64", "extra_cases": "float64", "accumulation_cases": "float64",
                   "advantage_cases": "float32", "logprob_cases": "float32"},
        "config_defaults": defaults,
        "notes": NOTES,
        "cases": cases,
        "extra_cases": extra,
        "accumulation_cases": accumulation,
        "advantage_cases": adv_cases,
        "logprob_cases": logprob_cases,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    text = dump(fixture) + "\n"
    OUT.write_text(text)
    size = len(text.encode())
    assert size < 200_000, size
    print(f"wrote {OUT.relative_to(REPO)}: {len(cases)} cases, {len(extra)} extra, {len(accumulation)} accumulation, "
          f"{len(adv_cases)} advantage, {len(logprob_cases)} logprob; {size} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
