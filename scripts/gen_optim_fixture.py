#!/usr/bin/env python3
"""Reference numbers for graft-train's optimizer and learning-rate schedules.

Writes, from PyTorch and transformers:
  tests/fixtures/optim/adamw.json      torch.optim.AdamW + clip_grad_norm_ for a few steps, with the
                                       lr of each step taken from transformers'
                                       get_cosine_schedule_with_warmup
  tests/fixtures/optim/schedules.json  lr multipliers of transformers' cosine / linear / constant /
                                       cosine-with-min-lr schedules, step by step

Regenerate (from the repository root) with the reference venv, which has torch and transformers:
    /work/pyref/bin/python scripts/gen_optim_fixture.py
Read by the tests in crates/graft-train/src/optim.rs and crates/graft-train/src/schedule.rs.
"""
import json
import os

import torch
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "optim")


def flat(t):
    return [float(x) for x in t.detach().reshape(-1).tolist()]


def adamw_fixture():
    torch.manual_seed(0)
    beta1, beta2, eps, weight_decay = 0.9, 0.95, 1e-6, 0.1
    max_grad_norm, peak_lr = 1.0, 1e-2
    shapes = {"w": (5, 4), "lora_B": (3, 6), "norm": (4,)}
    decays = {"w": True, "lora_B": True, "norm": False}
    params = {n: torch.nn.Parameter(torch.randn(s)) for n, s in shapes.items()}
    params["lora_B"].data.zero_()  # like a fresh LoRA B: weight decay of zero stays zero
    names = list(shapes)
    groups = [
        {"params": [params[n] for n in names if decays[n]], "weight_decay": weight_decay},
        {"params": [params[n] for n in names if not decays[n]], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=peak_lr, betas=(beta1, beta2), eps=eps, foreach=False)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=8)
    init = {n: flat(params[n]) for n in names}
    # Gradient scales chosen so some steps clip and some do not.
    scales = [3.0, 0.2, 1.5, 0.05, 5.0, 0.7, 2.0, 0.3]
    steps, lrs = [], []
    for k, scale in enumerate(scales):
        grads = {n: torch.randn(shapes[n]) * scale for n in names}
        for n in names:
            params[n].grad = grads[n].clone()
        lr = sched.get_last_lr()[0]
        lrs.append(lr)
        norm = torch.nn.utils.clip_grad_norm_([params[n] for n in names], max_grad_norm, foreach=False)
        clipped = {n: params[n].grad.clone() for n in names}
        opt.step()
        sched.step()
        steps.append({
            "grads": [flat(grads[n]) for n in names],
            "grad_norm": float(norm),
            "clipped_grads": [flat(clipped[n]) for n in names],
            "after": [flat(params[n]) for n in names],
            "exp_avg": [flat(opt.state[params[n]]["exp_avg"]) for n in names],
            "exp_avg_sq": [flat(opt.state[params[n]]["exp_avg_sq"]) for n in names],
        })
    return {
        "generator": f"scripts/gen_optim_fixture.py, torch {torch.__version__}",
        "beta1": beta1, "beta2": beta2, "eps": eps, "weight_decay": weight_decay,
        "max_grad_norm": max_grad_norm, "lrs": lrs,
        "params": [{"name": n, "decay": decays[n], "init": init[n]} for n in names],
        "steps": steps,
    }


def schedule_fixture():
    import transformers

    cases = []
    settings = [(0, 10), (3, 10), (4, 17), (10, 10), (1, 1)]
    makers = {
        "cosine": lambda o, w, t: get_cosine_schedule_with_warmup(o, w, t),
        "linear": lambda o, w, t: get_linear_schedule_with_warmup(o, w, t),
        "constant": lambda o, w, t: get_constant_schedule_with_warmup(o, w),
    }
    for kind, make in makers.items():
        for warmup, total in settings:
            cases.append((kind, warmup, total, 0.0, make))
    for warmup, total in [(2, 12), (0, 9)]:
        for rate in [0.1, 0.25]:
            cases.append(("cosine", warmup, total, rate,
                          lambda o, w, t, r=rate: get_cosine_with_min_lr_schedule_with_warmup(o, w, t, min_lr_rate=r)))
    out = []
    for kind, warmup, total, rate, make in cases:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = make(opt, warmup, total)
        factors = []
        for _ in range(total + 1):
            factors.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        out.append({"kind": kind, "warmup_steps": warmup, "total_steps": total,
                    "min_lr_ratio": rate, "factors": factors})
    return {"generator": f"scripts/gen_optim_fixture.py, transformers {transformers.__version__}",
            "cases": out}


def main():
    os.makedirs(OUT, exist_ok=True)
    for name, data in [("adamw.json", adamw_fixture()), ("schedules.json", schedule_fixture())]:
        with open(os.path.join(OUT, name), "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        print("wrote", os.path.join(OUT, name))


if __name__ == "__main__":
    main()
