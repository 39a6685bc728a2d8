"""Builds the serve test fixture: a copy of stories260K with a ChatML-like chat template and two
small random PEFT LoRA adapters (pure Python: safetensors is a JSON header + raw f32 bytes).

Usage: make_fixture.py SRC_HF_DIR OUT_DIR
Writes OUT_DIR/model, OUT_DIR/adapters/{a,b} and OUT_DIR/spare/c (for hot-loading).
"""

import json
import os
import random
import shutil
import struct
import sys

TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def write_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, (shape, values) in tensors.items():
        data = struct.pack(f"<{len(values)}f", *values)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def write_adapter(out, cfg, seed, modules, r=4, alpha=8.0):
    os.makedirs(out, exist_ok=True)
    rng = random.Random(seed)
    hidden = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", heads)
    head_dim = cfg.get("head_dim", hidden // heads)
    inter = cfg["intermediate_size"]
    dims = {
        "q_proj": ("self_attn", heads * head_dim, hidden),
        "k_proj": ("self_attn", kv * head_dim, hidden),
        "v_proj": ("self_attn", kv * head_dim, hidden),
        "o_proj": ("self_attn", hidden, heads * head_dim),
        "gate_proj": ("mlp", inter, hidden),
        "up_proj": ("mlp", inter, hidden),
        "down_proj": ("mlp", hidden, inter),
    }
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for m in modules:
            block, o, i = dims[m]
            key = f"base_model.model.model.layers.{layer}.{block}.{m}"
            tensors[f"{key}.lora_A.weight"] = ([r, i], [rng.uniform(-0.3, 0.3) for _ in range(r * i)])
            tensors[f"{key}.lora_B.weight"] = ([o, r], [rng.uniform(-0.3, 0.3) for _ in range(o * r)])
    write_safetensors(os.path.join(out, "adapter_model.safetensors"), tensors)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": modules,
        "bias": "none",
        "base_model_name_or_path": None,
    }
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(config, f)


def main():
    src, out = sys.argv[1], sys.argv[2]
    model = os.path.join(out, "model")
    shutil.copytree(src, model)
    tc_path = os.path.join(model, "tokenizer_config.json")
    with open(tc_path) as f:
        tc = json.load(f)
    tc["chat_template"] = TEMPLATE
    with open(tc_path, "w") as f:
        json.dump(tc, f)
    with open(os.path.join(model, "config.json")) as f:
        cfg = json.load(f)
    write_adapter(os.path.join(out, "adapters", "a"), cfg, 1, ["q_proj", "v_proj"])
    write_adapter(os.path.join(out, "adapters", "b"), cfg, 2, list(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    write_adapter(os.path.join(out, "spare", "c"), cfg, 3, ["q_proj", "o_proj"])


if __name__ == "__main__":
    main()
