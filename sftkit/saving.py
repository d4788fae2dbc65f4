"""Exports after the adapter is safely on disk: a merged model, a GGUF file, an upload to the Hub.

Each export runs only after train_unsloth.py has saved the adapter and a finished run.json, so a failed
export never loses the training. The Hub token is read from HF_TOKEN and passed in memory only.
"""

import logging
import os
from pathlib import Path

from . import estimate, run
from .errors import UserError

log = logging.getLogger("sftkit")
MERGED = ("", "16bit", "4bit")
# Left out of a Hub upload: checkpoints and optimizer states stay local, other exports go separately.
NOT_UPLOADED = ("checkpoint-*", "checkpoint-*/**", "*.pt", "training_args.bin", ".run.*", "merged-*/**", "gguf/**")


def check_export_args(save_merged: str, save_gguf: str, push_to_hub: str, choice):
    """Fails before training, not after an hour of it."""
    if save_gguf and choice.backend != "unsloth":
        raise UserError(f"--save_gguf needs the Unsloth backend (a CUDA GPU); this run would use {choice.backend}. "
                        "Export on a GPU machine, or use --save_merged 16bit and convert with llama.cpp's "
                        "convert_hf_to_gguf.py.")
    if save_merged not in MERGED:
        raise UserError(f"--save_merged {save_merged!r} is not one of 16bit, 4bit.")
    if save_merged == "4bit" and not choice.device.startswith("cuda"):
        raise UserError("--save_merged 4bit needs a CUDA GPU (bitsandbytes quantizes there). Use --save_merged "
                        "16bit on this machine.")
    if push_to_hub and not os.environ.get("HF_TOKEN"):
        raise UserError("--push_to_hub needs a Hugging Face token with write access in the HF_TOKEN environment "
                        "variable (export HF_TOKEN=hf_...). It is read from there only, never saved.")


def save_merged(model, tokenizer, run_dir: str, mode: str, choice, model_name: str, load_in_4bit: bool) -> str:
    """Writes run_dir/merged-<mode>: base weights with the LoRA update folded in, loadable by plain transformers."""
    out = str(Path(run_dir) / f"merged-{mode}")
    if choice.backend == "unsloth":
        # Unsloth reloads the 16-bit base itself and merges; "forced" accepts the 4-bit rounding it implies.
        method = "merged_16bit" if mode == "16bit" else "merged_4bit_forced"
        model.save_pretrained_merged(out, tokenizer, save_method=method)
        return out
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    # Merge into a fresh, unquantized base rather than the training model: merging into 4-bit layers would
    # round the base weights, and the training model stays usable.
    kwargs = {"dtype": choice.torch_dtype(), "token": os.environ.get("HF_TOKEN") or None}
    if mode == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=choice.torch_dtype())
    if choice.device.startswith("cuda"):
        free = torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
        device, why = merge_device(mode, sixteen_bit_gib(model_name), free / estimate.GIB)
        log.info("merging on the %s: %s", device, why)
        kwargs["device_map"] = {"": torch.cuda.current_device() if device == "GPU" else "cpu"}
    base = AutoModelForCausalLM.from_pretrained(model_name, **kwargs)
    merged = PeftModel.from_pretrained(base, run_dir).merge_and_unload()
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if choice.dtype == "fp32":
        log.info("merged model saved in fp32, the dtype it was trained in on this CPU")
    return out


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


def save_gguf(model, tokenizer, run_dir: str, quant: str, choice) -> str:
    """Unsloth's GGUF export (it builds llama.cpp to convert). The adapter is already saved when this runs."""
    if choice.backend != "unsloth":
        raise UserError(f"--save_gguf needs the Unsloth backend (a CUDA GPU); this run used {choice.backend}. "
                        f"The adapter is saved in {run_dir}: export it on a GPU machine, or merge it with "
                        "--save_merged 16bit and convert with llama.cpp's convert_hf_to_gguf.py.")
    out = str(Path(run_dir) / "gguf")
    try:
        model.save_pretrained_gguf(out, tokenizer, quantization_method=quant)
    except Exception as err:  # llama.cpp missing, no network to fetch it, no compiler, unknown quant
        raise UserError(f"GGUF export ({quant}) failed: {type(err).__name__}: {err}. The adapter is safe in "
                        f"{run_dir}. Install llama.cpp (or give the machine network access) and retry on a GPU "
                        "machine, or use --save_merged 16bit and convert with llama.cpp yourself.") from err
    return out


def push(folder: str, repo_id: str, api=None) -> str:
    """Uploads the adapter (or merged) folder to repo_id; checkpoints and optimizer states stay local."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=os.environ.get("HF_TOKEN"))
    try:
        api.create_repo(repo_id, exist_ok=True, private=True)
        api.upload_folder(folder_path=folder, repo_id=repo_id, ignore_patterns=list(NOT_UPLOADED))
    except Exception as err:
        # Never echo the token: the message comes from the Hub client, which does not include it.
        excludes = " ".join(f"--exclude '{x}'" for x in NOT_UPLOADED)
        raise UserError(f"upload to {repo_id} failed: {type(err).__name__}: {err}. The run is saved locally in "
                        f"{folder}. Check that HF_TOKEN has write access, then upload that folder without training "
                        f"again: hf upload {repo_id} {folder} . --private {excludes}") from err
    return f"https://huggingface.co/{repo_id}"


def export(model, tokenizer, record, choice, merged: str, gguf: str, hub_repo: str):
    """Optional exports after training, each recorded in run.json; the adapter is already safe when they run."""
    args, exports = record["args"], record.setdefault("exports", {})
    out = args["output_dir"]
    try:
        if merged:
            exports["merged"] = save_merged(model, tokenizer, out, merged, choice, record["model_path"],
                                              args["load_in_4bit"])
            log.info("merged model (%s) saved to %s", merged, exports["merged"])
        if gguf:
            exports["gguf"] = save_gguf(model, tokenizer, out, gguf, choice)
        if hub_repo:
            exports["hub"] = push(exports.get("merged", out), hub_repo)
            log.info("uploaded to %s", exports["hub"])
    except UserError as err:
        exports["error"] = str(err)
        raise
    finally:
        run.write_record(out, record)
