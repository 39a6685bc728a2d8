"""GRPO and RLOO loss fixtures from TRL's own `GRPOTrainer._compute_loss` and
`RLOOTrainer._compute_loss`.

For fixed per-token log-probs (a leaf tensor standing in for the model's), old-policy and
reference log-probs, advantages and completion masks, this calls TRL 1.16's loss code on a
trainer built without a model (only the attributes `_compute_loss` reads are set; the model's
`_get_per_token_logps_and_entropies` is replaced by one returning the fixed log-probs) and
records the loss, its autograd gradient w.r.t. the log-probs, and the logged metrics. graft's
`objective::grpo::PolicyLoss` must match every case within 1e-6
(`crates/graft-train/tests/grpo_fixture.rs`).

Regenerate:
    python3 -m venv /work/pyref-trl
    /work/pyref-trl/bin/pip install torch==2.15.0 trl==1.16.0 transformers==5.24.0
    /work/pyref-trl/bin/python scripts/gen_grpo_fixture.py
writes tests/fixtures/grpo_loss/cases.json.
"""

import json
import types
from collections import defaultdict
from pathlib import Path

import torch
import trl
from trl import GRPOTrainer, RLOOTrainer

torch.manual_seed(0)
B, T = 5, 6


def make_trainer(cfg, accum):
    t = GRPOTrainer.__new__(GRPOTrainer)
    t.beta = cfg["beta"]
    t.epsilon_low = cfg["epsilon"]
    t.epsilon_high = cfg["epsilon_high"]
    t.importance_sampling_level = cfg["importance_sampling_level"]
    t.loss_type = cfg["loss_type"]
    t.max_completion_length = cfg["max_completion_length"]
    t.top_entropy_quantile = 1.0
    t.off_policy_mask_threshold = None
    t.use_vllm = False
    t.vllm_importance_sampling_correction = False
    t.aux_loss_enabled = False
    t._entropy_bonus_enabled = False
    t.current_gradient_accumulation_steps = accum
    t.args = types.SimpleNamespace(
        delta=cfg["delta"], use_bias_correction_kl=False, steps_per_generation=accum
    )
    t.accelerator = types.SimpleNamespace(
        num_processes=1,
        gather=lambda x: x,
        gather_for_metrics=lambda x: x,
        reduce=lambda x, reduction="sum": x,
        sync_gradients=True,
    )
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    t.model = types.SimpleNamespace(training=True)
    return t


def case(name, cfg, accum=1, off_policy=True, padded=True):
    logp = (-torch.rand(B, T, dtype=torch.float64) * 2.0).requires_grad_(True)
    old = (logp.detach() + 0.3 * torch.randn(B, T, dtype=torch.float64)) if off_policy else None
    ref = logp.detach() + 0.2 * torch.randn(B, T, dtype=torch.float64)
    adv = torch.randn(B, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.float64)
    if padded:
        mask[1, 4:] = 0
        mask[3, 2:] = 0
    num_items = mask.sum() * accum  # the generation batch spans `accum` micro-batches like this one
    trainer = make_trainer(cfg, accum)
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logp, torch.zeros_like(logp), None)
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long),
        "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv,
        "num_items_in_batch": num_items,
    }
    if old is not None:
        inputs["old_per_token_logps"] = old
    if cfg["beta"] != 0.0:
        inputs["ref_per_token_logps"] = ref
    model = types.SimpleNamespace(training=True)
    loss = trainer._compute_loss(model, inputs)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k in
               ("kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")}
    return {
        "name": name,
        "config": cfg,
        "grad_accum": accum,
        "inputs": {
            "per_token_logps": logp.detach().tolist(),
            "old_per_token_logps": old.tolist() if old is not None else None,
            "ref_per_token_logps": ref.tolist() if cfg["beta"] != 0.0 else None,
            "advantages": adv.tolist(),
            "completion_mask": mask.tolist(),
            "num_items_in_batch": float(num_items),
        },
        "expected": {"loss": loss.item(), "d_per_token_logps": logp.grad.tolist(), "metrics": metrics},
    }


def cfg(loss_type, beta=0.0, epsilon_high=0.2, delta=None, level="token"):
    return {
        "loss_type": loss_type,
        "beta": beta,
        "epsilon": 0.2,
        "epsilon_high": epsilon_high,
        "delta": delta,
        "importance_sampling_level": level,
        "max_completion_length": T,
    }


cases = []
for lt in ["grpo", "bnpo", "dr_grpo", "dapo"]:
    cases.append(case(f"{lt}-on-policy", cfg(lt), off_policy=False))
    cases.append(case(f"{lt}-off-policy", cfg(lt)))
    cases.append(case(f"{lt}-beta", cfg(lt, beta=0.04)))
    cases.append(case(f"{lt}-clip-higher-delta-accum2", cfg(lt, beta=0.04, epsilon_high=0.28, delta=1.5), accum=2))
    cases.append(case(f"{lt}-sequence", cfg(lt, beta=0.04, level="sequence")))


def rloo_case(name, epsilon_high=0.2, padded=True):
    """RLOO: the clipped surrogate on summed sequence log-probs, old log-probs as sequence sums."""
    t = RLOOTrainer.__new__(RLOOTrainer)
    t.epsilon_low = 0.2
    t.epsilon_high = epsilon_high
    t.aux_loss_enabled = False
    t.accelerator = types.SimpleNamespace(
        num_processes=1,
        gather=lambda x: x,
        gather_for_metrics=lambda x: x,
        reduce=lambda x, reduction="sum": x,
    )
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    t.model = types.SimpleNamespace(training=True)
    logp = (-torch.rand(B, T, dtype=torch.float64) * 0.5).requires_grad_(True)
    mask = torch.ones(B, T, dtype=torch.float64)
    if padded:
        mask[1, 4:] = 0
        mask[3, 2:] = 0
    old_logps = (logp.detach() * mask).sum(1) + 0.2 * torch.randn(B, dtype=torch.float64)
    adv = torch.randn(B, dtype=torch.float64)
    t._get_per_token_logps_and_entropies = lambda *a, **k: (logp, torch.zeros_like(logp), None)
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long),
        "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv,
        "old_logps": old_logps,
    }
    loss = t._compute_loss(t.model, inputs)
    loss.backward()
    metrics = {k: v[-1] for k, v in t._metrics["train"].items() if k.startswith("clip_ratio/") and k.endswith("_mean")}
    return {
        "name": name,
        "trainer": "rloo",
        "config": {"epsilon": 0.2, "epsilon_high": epsilon_high},
        "grad_accum": 1,
        "inputs": {
            "per_token_logps": logp.detach().tolist(),
            "old_logps": old_logps.tolist(),
            "advantages": adv.tolist(),
            "completion_mask": mask.tolist(),
        },
        "expected": {"loss": loss.item(), "d_per_token_logps": logp.grad.tolist(), "metrics": metrics},
    }


for c in cases:
    c["trainer"] = "grpo"
rloo_cases = [rloo_case("rloo"), rloo_case("rloo-clip-higher", epsilon_high=0.28), rloo_case("rloo-unpadded", padded=False)]
cases += rloo_cases
out = Path(__file__).resolve().parent.parent / "tests/fixtures/grpo_loss/cases.json"
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps({"trl_version": trl.__version__, "dtype": "float64", "cases": cases}, indent=1))
print(f"wrote {len(cases)} cases to {out}")
