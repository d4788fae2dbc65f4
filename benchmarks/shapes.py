"""Random-init models of real Llama shapes, and synthetic data shaped like the Korean data set.

No weights are downloaded: a model is built from its config with random weights (speed and memory do not
depend on the values) and saved once under a cache folder. The tokenizer is the tiny model's (2k tokens);
the model keeps the real 128k vocabulary, so embedding, lm_head and logits cost what they really cost.
"""

import json
import os
import platform
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from sftkit import estimate  # noqa: E402

TINY = ROOT / "examples" / "tiny-llama"
SAMPLE = ROOT / "examples" / "data" / "korean_safe_sample.jsonl"

# The estimate's built-in shapes (one source of truth), with the real 128k-token window.
SHAPES = {
    "llama-3.1-8b": {**estimate.LLAMA_31_8B, "max_position_embeddings": 131072},
    "llama-3.2-1b": {**estimate.LLAMA_32_1B, "max_position_embeddings": 131072},
    "tiny": None,  # the bundled tiny model, for a CPU dry run of the harness
}
ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def make_model(shape: str, cache: Path) -> Path:
    """Builds (once) a random-init bf16 model of the named shape with the tiny tokenizer; returns its folder."""
    if SHAPES.get(shape, 1) == 1:
        raise SystemExit(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    if SHAPES[shape] is None:
        return TINY
    out = cache / shape
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(TINY)
    config = LlamaConfig(**SHAPES[shape], rope_parameters=ROPE, rms_norm_eps=1e-5, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, torch_dtype="bfloat16")
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):  # initialise on the GPU: an 8B model in bf16 takes seconds there, minutes on a CPU
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, max_shard_size="5GB")
    tok.save_pretrained(out)
    del model
    # Hand the ~30 GB back: the caller goes on to run training processes that size themselves to free memory.
    torch.cuda.empty_cache()
    return out


def token_lengths(n: int, mean: int, seed: int) -> list:
    """Row lengths like an instruction data set: log-normal around `mean`, clipped to [32, 4 * mean]."""
    rnd = random.Random(seed)
    return [int(min(max(rnd.lognormvariate(0, 0.6) * mean / 1.2, 32), 4 * mean)) for _ in range(n)]


def make_data(path: Path, n: int = 512, mean_tokens: int = 325, fixed: int = 0, seed: int = 0) -> Path:
    """Alpaca rows built from the Korean sample's sentences; `fixed` > 0 makes every row that many tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY)
    rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    pieces = [tok(r["output"], add_special_tokens=False)["input_ids"] for r in rows]
    rnd = random.Random(seed)
    lengths = [fixed] * n if fixed else token_lengths(n, mean_tokens, seed)
    out = []
    for length in lengths:
        prompt = rows[rnd.randrange(len(rows))]["instruction"]
        budget = max(length - len(tok(prompt)["input_ids"]) - 40, 8)  # ~40 tokens of template headings
        ids = []
        while len(ids) < budget:
            ids += pieces[rnd.randrange(len(pieces))]
        out.append({"instruction": prompt, "input": "", "output": tok.decode(ids[:budget])})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out), encoding="utf-8")
    return path


def prepared_rows(path: Path, n: int, tokenizer):
    """`n` synthetic Korean-length rows (make_data), rendered with the alpaca_ko template and the tokenizer's EOS,
    as the training script would feed them to SFTTrainer."""
    from datasets import Dataset

    from sftkit import data, prompts

    raw = Dataset.from_list([json.loads(x) for x in make_data(path, n=n, mean_tokens=325).read_text().splitlines()])
    return data.add_eos(data.read_rows(raw, prompts.load("alpaca_ko"))[0], tokenizer.eos_token)


def parse_config(cfg: str, extra) -> tuple:
    """`8x1` -> (8, 1, {}); a trailing `+` (e.g. `2x4+`) adds the SFTConfig fields in `extra` (JSON or a dict)."""
    micro, accum = (int(x) for x in cfg.rstrip("+").split("x"))
    more = (extra if isinstance(extra, dict) else json.loads(extra)) if cfg.endswith("+") and extra else {}
    return micro, accum, more


def train_flops_per_token(config: dict, seq: float) -> float:
    """Model FLOPs per trained token for LoRA: forward 2N plus backward through activations 2N (frozen base
    weights need no weight gradients), N being the decoder linears and lm_head, plus attention scores and
    values (4·L·seq·d forward, twice that in all). Recomputation by gradient checkpointing is overhead, not
    model FLOPs, so it is not counted (as in MFU)."""
    c = estimate.normalise(config)
    n = estimate.quantized_params(c) + c["vocab_size"] * c["hidden_size"]
    attn = 4 * c["num_hidden_layers"] * seq * c["num_attention_heads"] * c["head_dim"] / 2  # causal: half
    return 4 * n + 2 * attn


KERNEL_LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def profiler_counts(events) -> tuple:
    """(GPU kernel microseconds, kernel launches, host-device syncs) in torch.profiler events. Kernel time is
    the device-side self time of CUDA events (memcpy/memset included), summed."""
    gpu_us = sum(e.self_device_time_total for e in events if "CUDA" in str(getattr(e, "device_type", "")))
    return (gpu_us, sum(1 for e in events if e.name in KERNEL_LAUNCHES),
            sum(1 for e in events if e.name in SYNCS))


def host_info(ops: int = 2000) -> dict:
    """The host CPU, and the wall time of one small CUDA op as it measures: runs bound by launching kernels
    (small micro-batches, batch-1 decoding) scale with it, so ratios between such runs differ between hosts."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in
             (cpuinfo.read_text().splitlines() if cpuinfo.exists() else []) if line.startswith("model name")]
    info = {"cpu": names[0] if names else platform.processor(), "cores": os.cpu_count(), "us_per_cuda_op": None}
    import torch

    if torch.cuda.is_available():
        x = torch.zeros(256, device="cuda")
        for _ in range(200):  # warm the allocator and the kernel
            x = x + 1
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(ops):  # a ~2 us kernel: the loop runs at the speed the CPU dispatches and launches
            x = x + 1
        torch.cuda.synchronize()
        info["us_per_cuda_op"] = round((time.perf_counter() - t0) / ops * 1e6, 2)
    return info
