"""Exports after the adapter is safely on disk: a merged model, a GGUF file, an upload to the Hub.

Each export runs only after train_unsloth.py has saved the adapter and a finished run.json, so a failed
export never loses the training. The Hub token is read from HF_TOKEN and passed in memory only.
"""

import logging
import os
from pathlib import Path

from . import hubcard
from .backend import save_merged
from .errors import UserError

log = logging.getLogger("sftkit")
MERGED = ("", "16bit", "4bit")


def check_export_args(save_merged: str, save_gguf: str, push_to_hub: str, choice):
    """Fails before training, not after an hour of it."""
    if save_gguf and not choice.unsloth:
        raise UserError(f"--save_gguf needs the Unsloth backend (a CUDA GPU); this run would use {choice.backend}. "
                        "Export on a GPU machine, or use --save_merged 16bit and convert with llama.cpp's "
                        "convert_hf_to_gguf.py.")
    if save_merged not in MERGED:
        raise UserError(f"--save_merged {save_merged!r} is not one of 16bit, 4bit.")
    if save_merged == "4bit" and not choice.cuda:
        raise UserError("--save_merged 4bit needs a CUDA GPU (bitsandbytes quantizes there). Use --save_merged "
                        "16bit on this machine.")
    if push_to_hub and not os.environ.get("HF_TOKEN"):
        raise UserError("--push_to_hub needs a Hugging Face token with write access in the HF_TOKEN environment "
                        "variable (export HF_TOKEN=hf_...). It is read from there only, never saved.")


def save_gguf(model, tokenizer, run_dir: str, quant: str, choice) -> str:
    """Unsloth's GGUF export (it builds llama.cpp to convert). The adapter is already saved when this runs."""
    if not choice.unsloth:
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


def push(source: str, repo_id: str, folder, record, api=None) -> str:
    """Uploads a clean copy of the adapter (or merged model) to repo_id: staged in RUN/hub-upload with no local
    path in it and a model card (hubcard.py); checkpoints and optimizer states stay local."""
    staged = hubcard.stage(Path(source), folder.path, record, repo_id)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=os.environ.get("HF_TOKEN"))
    try:
        api.create_repo(repo_id, exist_ok=True, private=True)
        api.upload_folder(folder_path=str(staged), repo_id=repo_id)
    except Exception as err:
        # Never echo the token: the message comes from the Hub client, which does not include it.
        raise UserError(f"upload to {repo_id} failed: {type(err).__name__}: {err}. The run is saved locally, and what "
                        f"would be uploaded is staged in {staged}. Check that HF_TOKEN has write access, then upload "
                        f"it without training again: hf upload {repo_id} {staged} . --private") from err
    return f"https://huggingface.co/{repo_id}"


def export(model, tokenizer, folder, record, choice, merged: str, gguf: str, hub_repo: str):
    """Optional exports after training, each recorded in run.json (RunFolder.save); the adapter is already safe."""
    exports = record.exports
    out = str(folder.path)
    try:
        if merged:
            exports["merged"] = save_merged(model, tokenizer, out, merged, choice, record.model_path)
            log.info("merged model (%s) saved to %s", merged, exports["merged"])
        if gguf:
            exports["gguf"] = save_gguf(model, tokenizer, out, gguf, choice)
        if hub_repo:
            exports["hub"] = push(exports.get("merged", out), hub_repo, folder, record)
            log.info("uploaded to %s", exports["hub"])
    except UserError as err:
        exports["error"] = str(err)
        raise
    finally:
        folder.save(record)
