"""Merged models: the LoRA update folded into 16-bit (or 4-bit) base weights, loadable without peft.

Unsloth merges on its own path (it reloads the 16-bit base itself); the plain path merges into a fresh,
unquantized base, on the GPU where it fits beside the training model, else on the CPU.
"""

import logging
import os
from pathlib import Path

from .. import estimate
from ..errors import UserError

log = logging.getLogger("sftkit")


def save_merged(model, tokenizer, run_dir: str, mode: str, choice, model_name: str) -> str:
    """Writes run_dir/merged-<mode> and returns its path. 16bit is written in 16-bit on every device."""
    out = str(Path(run_dir) / f"merged-{mode}")
    if choice.unsloth:
        # "forced" accepts the 4-bit rounding a merge into 4-bit implies.
        model.save_pretrained_merged(out, tokenizer, save_method="merged_16bit" if mode == "16bit"
                                     else "merged_4bit_forced")
        return out
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    token = os.environ.get("HF_TOKEN") or None
    # Merge in the training dtype on the GPU, in fp32 on the CPU; save in the base's own 16-bit dtype.
    kwargs = {"dtype": choice.torch_dtype(), "token": token}
    if mode == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=choice.torch_dtype())
    device = "CPU"
    if choice.cuda:
        free = torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
        device, why = merge_device(mode, sixteen_bit_gib(model_name), free / estimate.GIB)
        log.info("merging on the %s: %s", device, why)
        kwargs["device_map"] = {"": torch.cuda.current_device() if device == "GPU" else "cpu"}
    if device == "CPU" and mode == "16bit":
        kwargs["dtype"] = torch.float32  # exact on a CPU (half precision there is slow); rounded once when saved
    base = AutoModelForCausalLM.from_pretrained(model_name, **kwargs)
    merged = PeftModel.from_pretrained(base, run_dir).merge_and_unload()
    if mode == "16bit":
        merged = merged.to(sixteen_bit_dtype(AutoConfig.from_pretrained(model_name, token=token)))
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def sixteen_bit_dtype(config):
    """The base's own 16-bit dtype (Llama 3.1: bf16); fp16 where it says so; bf16 for anything else (fp32)."""
    import torch

    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return torch.float16 if str(dtype).endswith("float16") and "b" not in str(dtype) else torch.bfloat16


def sixteen_bit_gib(model_name: str) -> float:
    """GiB of the model's weights in 16-bit, from its config (0 when the shape is unknown offline)."""
    try:
        cfg = estimate.normalise(estimate.load_config(model_name)[0])
    except UserError:
        return 0.0
    return (estimate.quantized_params(cfg) + estimate.half_params(cfg)) * estimate.HALF_BYTES / estimate.GIB


def merge_device(mode: str, need_gib: float, free_gib: float) -> tuple[str, str]:
    """Where the plain path merges: the GPU when the fresh base fits beside the training model, else the CPU
    (RAM of the size of the 16-bit model; slower, but the GPU would run out: an 8B base is ~15 GiB in 16-bit, a
    whole T4). 4-bit merges need the GPU, where bitsandbytes quantizes."""
    if mode == "4bit":
        return "GPU", "a 4-bit merge quantizes with bitsandbytes on the GPU"
    if not need_gib:
        return "GPU", "the base's size is unknown offline, so it is tried on the GPU"
    if need_gib < 0.9 * free_gib:
        return "GPU", f"the base ({need_gib:.1f} GiB in 16-bit) fits the GPU's {free_gib:.1f} GiB free"
    return "CPU", (f"the base ({need_gib:.1f} GiB in 16-bit) does not fit the {free_gib:.1f} GiB free on the GPU; "
                   f"this needs about {need_gib:.0f} GiB of RAM")
