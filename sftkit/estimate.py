"""Predict peak GPU memory of QLoRA training (Unsloth) from a model's config alone, before anything loads.

Everything is in GiB (1024**3 bytes: what torch, the Unsloth notebook and sftkit's reports call "GB").
The arithmetic functions take a plain dict with hidden_size, intermediate_size, num_hidden_layers,
num_attention_heads, num_key_value_heads, head_dim, vocab_size, tie_word_embeddings, so each number can be
checked by hand. The estimate is a worst case: every row padded to max_seq_length (real batches are padded
only to their longest row, so measured peaks on short data are lower).
"""

import json
import re
from pathlib import Path

from .cli import names
from .errors import UserError

GIB = 1024 ** 3

# --- Weights: exact from the shapes, given the storage format. ---------------------------------------------
# bitsandbytes NF4 with double quantization (what Unsloth loads): 4 bits per weight, one 8-bit absmax per block
# of 64 weights, and one fp32 second-level absmax per 256 of those blocks.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
HALF_BYTES = 2  # embeddings, lm_head and norms stay in bf16/fp16; activations are bf16/fp16
# LoRA: fp32 weights (Unsloth keeps fp32 masters under bf16/fp16 autocast) + fp32 gradients + optimizer states.
LORA_WEIGHT_BYTES = 4
LORA_GRAD_BYTES = 4
OPTIMIZER_STATE_BYTES = {  # per trainable parameter: AdamW keeps two states (exp_avg, exp_avg_sq)
    "adamw_8bit": 2, "paged_adamw_8bit": 2, "adamw_bnb_8bit": 2,
    "adamw_torch": 8, "adamw_torch_fused": 8, "paged_adamw_32bit": 8, "adafactor": 4, "sgd": 0,
}

# --- Activations and overhead: fitted to measured Unsloth runs (benchmarks/README.md, "Memory estimate"). ----
# Peak reserved memory was measured on an H100 for the Llama-3.2-1B and Llama-3.1-8B shapes at 512-8192 tokens
# x 2 rows (benchmarks/seq_search.py). It grows linearly with tokens: 212 KiB/token (8B), 157 KiB/token (1B).
# The per-token bytes are modelled as (ACT_HIDDEN_COEF x hidden + ACT_INTERMEDIATE_COEF x intermediate) x 2 B
# for the layer being recomputed, + OFFLOAD_BUFFER_LAYERS x hidden x 2 B of checkpoints in flight to the CPU,
# + vocab x LOGIT_BYTES; the two shapes fix the scale of the layer terms (0.53 of a naive 10h + 5i + 1h count)
# and of the logits (0.73 B per vocab entry: Unsloth's cross-entropy works on chunks, never on all fp32 logits).
ACT_HIDDEN_COEF = 5.3
ACT_INTERMEDIATE_COEF = 2.64
OFFLOAD_BUFFER_LAYERS = 0.53
LOGIT_BYTES = 0.73
# CUDA context, cuBLAS workspaces and caching-allocator slack: the measured intercept (at zero tokens) less the
# weights and LoRA state; 0.63 (8B) and 0.62 GiB (1B).
RUNTIME_OVERHEAD_GIB = 0.62
# Without gradient checkpointing every layer's activations live until the backward pass, and the caching
# allocator reserved more than it handed out: fast mode with --packing (8 rows x 2048 tokens, 8B shape, H100)
# peaked at 64.8 GB allocated and 77.5 GB reserved against 7.7 GiB of weights and state + 58.2 GiB of activations
# by the layer formula, i.e. reserved = 1.2 x the activations. One measured point; it errs towards "won't fit".
NO_CHECKPOINT_RESERVE = 1.2

# GiB that torch sees on each card (torch.cuda.get_device_properties().total_memory), less than nvidia-smi's
# total. A T4 shows 14.56-14.76 depending on the driver (OOM messages; the Unsloth notebook prints "Max memory =
# 14.748 GB"), so 14.7, not 15.0; an H100 80GB HBM3 showed 79.18 here. l4 and the a100s are not measured yet.
GPUS = {"t4": 14.7, "l4": 22.5, "a100-40": 39.5, "a100-80": 79.3, "h100": 79.18}

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Shapes of the models the notebook uses, so the estimate works offline without a download.
LLAMA_31_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False)
LLAMA_32_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                   num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True)
LLAMA_32_3B = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                   num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True)
KNOWN = {"llama-3.1-8b": LLAMA_31_8B, "llama-3-8b": LLAMA_31_8B, "llama-3.2-1b": LLAMA_32_1B,
         "llama-3.2-3b": LLAMA_32_3B}


def linear_shapes(cfg: dict) -> dict:
    """(in_features, out_features) of each linear layer inside one decoder block."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def quantized_params(cfg: dict) -> int:
    """Weights of all decoder-block linear layers: the ones stored in 4-bit."""
    return cfg["num_hidden_layers"] * sum(a * b for a, b in linear_shapes(cfg).values())


def base_weights_gib(cfg: dict) -> float:
    """4-bit base weights: quantized_params x NF4_BYTES_PER_PARAM (0.5 B + 8-bit absmax per 64 + fp32 per 16384)."""
    return quantized_params(cfg) * NF4_BYTES_PER_PARAM / GIB


def half_params(cfg: dict) -> int:
    """16-bit parameters: embed_tokens, lm_head (none extra if tied), two RMSNorms per layer and the final one."""
    emb = cfg["vocab_size"] * cfg["hidden_size"]
    norms = (2 * cfg["num_hidden_layers"] + 1) * cfg["hidden_size"]
    return emb * (1 if cfg["tie_word_embeddings"] else 2) + norms


def half_weights_gib(cfg: dict) -> float:
    """Embeddings, lm_head and norms: half_params x 2 bytes."""
    return half_params(cfg) * HALF_BYTES / GIB


def lora_params(cfg: dict, r: int, target_modules) -> int:
    """Trainable LoRA parameters: r x (in + out) per targeted module per layer (A is r x in, B is out x r)."""
    shapes = linear_shapes(cfg)
    return cfg["num_hidden_layers"] * sum(r * sum(shapes[m]) for m in target_modules)


def lora_gib(cfg: dict, r: int, target_modules, optim: str = "adamw_8bit") -> float:
    """LoRA training state: lora_params x (4 B fp32 weight + 4 B fp32 grad + optimizer bytes, 2 for adamw_8bit)."""
    per = LORA_WEIGHT_BYTES + LORA_GRAD_BYTES + OPTIMIZER_STATE_BYTES[optim]
    return lora_params(cfg, r, target_modules) * per / GIB


def activations_gib(cfg: dict, seq: int, batch: int, gradient_checkpointing: bool = True) -> float:
    """Activations: tokens x (ACT_HIDDEN_COEF x hidden + ACT_INTERMEDIATE_COEF x intermediate) x 2 B for one layer
    (the one being recomputed) plus OFFLOAD_BUFFER_LAYERS x tokens x hidden x 2 B of checkpoints in flight to the
    CPU. Without gradient checkpointing every layer keeps its working set: x num_hidden_layers, no offload."""
    tokens = seq * batch
    layer = tokens * (ACT_HIDDEN_COEF * cfg["hidden_size"] + ACT_INTERMEDIATE_COEF * cfg["intermediate_size"])
    if not gradient_checkpointing:
        return NO_CHECKPOINT_RESERVE * layer * cfg["num_hidden_layers"] * HALF_BYTES / GIB
    return (layer + OFFLOAD_BUFFER_LAYERS * tokens * cfg["hidden_size"]) * HALF_BYTES / GIB


def hf_extra_gib(cfg: dict, seq: int, batch: int) -> float:
    """What the plain transformers + peft path holds beyond Unsloth, from how each works (not fitted): peft's
    prepare_model_for_kbit_training keeps embeddings and lm_head in fp32 (2 more bytes a parameter), so the
    logits come out in fp32 too, and HF's gradient checkpointing keeps every layer's input on the GPU, where
    Unsloth's offloads them. For the notebook config on the 8B shape (batch 2, longest row 1,178 tokens) this
    gives 3.1 GiB; measured on an H100, the hf backend reserved 3.2 GiB more than Unsloth (10.46 vs 6.99 GB)."""
    tokens = seq * batch
    upcast = half_params(cfg) * 2
    layer_inputs = cfg["num_hidden_layers"] * tokens * cfg["hidden_size"] * HALF_BYTES
    return (upcast + layer_inputs + tokens * cfg["vocab_size"] * 2) / GIB


def logits_gib(cfg: dict, seq: int, batch: int) -> float:
    """Logits: batch x seq x vocab x LOGIT_BYTES (16-bit, materialised once)."""
    return seq * batch * cfg["vocab_size"] * LOGIT_BYTES / GIB


MAX_GPU_GB = 300  # above the largest single GPU (B300: 288 GB)


def gpu_capacity(gpu) -> float:
    """GiB of a GPU by name (t4, l4, a100-40, a100-80, h100) or a number of GiB."""
    try:
        value = float(gpu)
    except (TypeError, ValueError):
        key = str(gpu).strip().lower()
        if key not in GPUS:
            raise UserError(f"unknown --gpu {gpu!r}. Pass one of {', '.join(GPUS)} or the GPU's memory as a "
                            "number of GB, e.g. --gpu 24.") from None
        return GPUS[key]
    if value <= 0:
        raise UserError(f"--gpu {gpu!r} must be a positive number of GB (e.g. --gpu 24) or a name: "
                        f"{', '.join(GPUS)}.")
    if value > MAX_GPU_GB:  # a model number (3090, 4090) read as gigabytes
        raise UserError(f"--gpu {gpu!r} would be {value:g} GB, more than any one GPU has: pass its memory in GB "
                        f"(an RTX 3090 or 4090: --gpu 24) or a name: {', '.join(GPUS)}.")
    return value


def check_targets(target_modules) -> list:
    """A comma-separated string or a list/tuple (Fire turns 'q_proj,k_proj' into a tuple) -> checked list."""
    mods = names(target_modules)
    bad = [m for m in mods if m not in MODULES]
    if bad or not mods:
        raise UserError(f"--target_modules {','.join(bad) or '(empty)'}: the estimate knows the Llama linear "
                        f"layers {','.join(MODULES)}; pass a comma-separated subset of them.")
    return mods


def train_embeddings_gib(cfg: dict, optim: str = "adamw_8bit", fp16: bool = True) -> float:
    """--train_embeddings: a trainable copy of embed_tokens and lm_head beside the frozen originals; weight and
    gradient in fp32 under fp16 (a T4: the scaler unscales only fp32 gradients), 16-bit under bf16, plus the
    optimizer's states. 8B: 1.05 billion parameters, 9.8 GiB in fp16 with 8-bit AdamW."""
    params = cfg["vocab_size"] * cfg["hidden_size"] * (1 if cfg.get("tie_word_embeddings") else 2)
    return params * ((8 if fp16 else 2 * HALF_BYTES) + OPTIMIZER_STATE_BYTES[optim]) / GIB


def estimate(cfg: dict, max_seq_length: int = 2048, per_device_train_batch_size: int = 2, r: int = 16,
             target_modules=MODULES, gradient_checkpointing: bool = True, optim: str = "adamw_8bit",
             gpu="t4", train_embeddings: bool = False) -> dict:
    """Peak memory of QLoRA training, by component (GiB), the total, the GPU's GiB, whether it fits, headroom."""
    mods = check_targets(target_modules)
    if optim not in OPTIMIZER_STATE_BYTES:
        raise UserError(f"--optim {optim!r} is not one the estimate knows; pass one of "
                        f"{', '.join(OPTIMIZER_STATE_BYTES)}.")
    if max_seq_length < 1 or per_device_train_batch_size < 1 or r < 1:
        raise UserError("--max_seq_length, --per_device_train_batch_size and --r must be positive integers.")
    seq, batch = int(max_seq_length), int(per_device_train_batch_size)
    parts = {
        "base_4bit_gib": base_weights_gib(cfg),
        "embeddings_16bit_gib": half_weights_gib(cfg),
        "lora_gib": lora_gib(cfg, r, mods, optim),
        "activations_gib": activations_gib(cfg, seq, batch, gradient_checkpointing),
        "logits_gib": logits_gib(cfg, seq, batch),
        "runtime_overhead_gib": RUNTIME_OVERHEAD_GIB,
    }
    if train_embeddings:  # counted as an fp16 run (a T4's): the larger of the two
        parts["train_embeddings_gib"] = train_embeddings_gib(cfg, optim)
    total = sum(parts.values())
    capacity = gpu_capacity(gpu)
    return {**parts, "total_gib": total, "gpu_gib": capacity, "fits": total <= capacity,
            "headroom_gib": capacity - total, "quantized_params": quantized_params(cfg),
            "half_params": half_params(cfg), "lora_params": lora_params(cfg, r, mods), "target_modules": mods}


# --- Where the config comes from: a local file, the built-in table, or the local Hugging Face cache. ---------

def normalise(cfg: dict) -> dict:
    """The eight fields from a config.json dict (multimodal configs keep them under text_config)."""
    if "hidden_size" not in cfg and isinstance(cfg.get("text_config"), dict):
        cfg = cfg["text_config"]
    try:
        heads = cfg["num_attention_heads"]
        out = dict(hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
                   num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=heads,
                   num_key_value_heads=cfg.get("num_key_value_heads") or heads,
                   head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, vocab_size=cfg["vocab_size"],
                   tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)))
    except KeyError as err:
        raise UserError(f"the model config has no {err.args[0]!r}, so it is not a Llama-style decoder the "
                        "estimate understands. Pass a Llama/Mistral/Qwen-style config.json.") from None
    return out


def shape_key(model_name: str) -> str:
    """'unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit' -> 'llama-3.1-8b' (the key into KNOWN)."""
    base = model_name.strip().rstrip("/").split("/")[-1].lower()
    base = re.sub(r"(-unsloth)?(-bnb)?-4bit$", "", base)
    base = re.sub(r"-instruct$", "", base)
    return re.sub(r"^meta-", "", base)


def load_config(model_name: str) -> tuple[dict, str]:
    """(config fields, where they came from) for a config.json path, a model folder, a known name, or a model
    in the local Hugging Face cache. Never touches the network."""
    path = Path(model_name)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise UserError(f"{model_name!r} is a folder without config.json. Pass the model folder that holds "
                            "config.json, or the config.json file itself.")
    if path.is_file():
        try:
            return normalise(json.loads(path.read_text(encoding="utf-8"))), str(path)
        except json.JSONDecodeError as err:
            raise UserError(f"{path} is not valid JSON ({err}). Pass a model's config.json.") from err
    key = shape_key(model_name)
    if key in KNOWN:
        return dict(KNOWN[key]), f"built-in {key} shape"
    try:
        from transformers import AutoConfig

        return normalise(AutoConfig.from_pretrained(model_name, local_files_only=True).to_dict()), "local HF cache"
    except UserError:
        raise
    except Exception:  # not cached, not a repo id, gated...: all mean "cannot know it offline"
        pass
    raise UserError(f"unknown model {model_name!r}: not a local folder or config.json, not in the local Hugging Face "
                    "cache, and not a built-in shape. Pass a path to the model's config.json (or its folder), or a "
                    "known name, e.g. unsloth/Meta-Llama-3.1-8B, meta-llama/Llama-3.2-1B, "
                    f"unsloth/Llama-3.2-3B-Instruct (built-in shapes: {', '.join(KNOWN)}).")
