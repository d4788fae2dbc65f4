"""Exports after the adapter is safely on disk: a merged model, a GGUF file, an upload to the Hub.

Each export runs only after train_unsloth.py has saved the adapter and a finished run.json, so a failed
export never loses the training. The Hub token is read from HF_TOKEN and passed in memory only.
"""

import json
import logging
import os
from pathlib import Path

from . import gguf, hubcard, modelfile, ours, portable, prompts, stopping
from .backend import save_merged
from .errors import UserError

log = logging.getLogger("sftkit")
MERGED = ("", "16bit", "4bit")
SAMPLE_QUESTION = "비밀번호를 안전하게 만드는 방법은?"  # the prompt llama.cpp must tokenize as transformers does


def check_export_args(save_merged: str, save_gguf: str, push_to_hub: str, choice):
    """Fails before training, not after an hour of it."""
    if save_merged not in MERGED:
        raise UserError(f"--save_merged {save_merged!r} is not one of 16bit, 4bit.")
    if save_merged == "4bit" and not choice.cuda:
        raise UserError("--save_merged 4bit needs a CUDA GPU (bitsandbytes quantizes there). Use --save_merged "
                        "16bit on this machine.")
    if gguf.parse_quants(save_gguf):
        gguf.check_tools()  # llama.cpp installed and its converter at hand, or the install command now
    if push_to_hub and not os.environ.get("HF_TOKEN"):
        raise UserError("--push_to_hub needs a Hugging Face token with write access in the HF_TOKEN environment "
                        "variable (export HF_TOKEN=hf_...). It is read from there only, never saved.")


def source_config(model_name: str) -> dict | None:
    """The base model's config.json as published (its RoPE keys are what other loaders read)."""
    from transformers.utils import cached_file

    try:
        path = cached_file(model_name, "config.json", token=os.environ.get("HF_TOKEN") or None)
    except OSError:
        return None
    return json.loads(Path(path).read_text(encoding="utf-8")) if path else None


def merge_portable(model, tokenizer, run_dir: str, mode: str, choice, record) -> str:
    """A merged model that transformers 4.x and 5.x and llama.cpp's converter all read alike."""
    out = save_merged(model, tokenizer, run_dir, mode, choice, record.model_path)
    portable.make_portable(out, source_config(record.model_path))
    template = prompts.from_text(record.template, record.template_text, record.template_kind)
    stops = stopping.write_stop_ids(out, tokenizer, template)
    log.info("merged model (%s) saved to %s; it stops at ids %s", mode, out, stops)
    return out


def save_gguf(merged_dir: str, run_dir: str, quants, template, tokenizer, max_seq_length: int) -> dict:
    """llama.cpp's converter and quantizer on the merged 16-bit model (offline, either backend), a check that
    llama.cpp tokenizes the run's prompt as transformers does, and an Ollama Modelfile from the run's template."""
    paths = gguf.export_gguf(merged_dir, str(Path(run_dir) / "gguf"), quants)
    text = (tokenizer.apply_chat_template(prompts.messages(SAMPLE_QUESTION), chat_template=template.text,
                                          tokenize=False, add_generation_prompt=True) if template.kind == "chat"
            else prompts.render(template, {"instruction": SAMPLE_QUESTION, "input": ""}))
    checks = [gguf.verify_gguf(p, text, tokenizer, None) for p in paths]  # vocabulary only: seconds even for 8B
    bad = [c for c in checks if not c["ok"]]
    if bad:
        raise UserError(f"{bad[0]['file']}: {bad[0]['reason']}. The adapter and the merged model are safe in "
                        f"{run_dir}.")
    asked = gguf.parse_quants(quants)
    target = next((p for p, q in zip(paths, asked) if q not in gguf.CONVERTED), paths[0])
    info = modelfile.write(target, template, tokenizer, run_dir=run_dir, num_ctx=max_seq_length)
    log.info("GGUF ready. Ollama: %s ; then %s", info["create"], info["run"])
    return {"files": paths, "modelfile": info["path"], "ollama": [info["create"], info["run"]],
            "modelfile_sha256": ours.digest(Path(info["path"]))}  # --overwrite keeps a Modelfile edited since


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


def export(model, tokenizer, folder, record, choice, merged: str, quants: str, hub_repo: str):
    """Optional exports after training, each recorded in run.json (RunFolder.save); the adapter is already safe."""
    exports = record.exports
    out = str(folder.path)
    portable.make_portable(out)  # the run folder's tokenizer files, for transformers 4.x too
    try:
        if merged:
            exports["merged"] = merge_portable(model, tokenizer, out, merged, choice, record)
        if gguf.parse_quants(quants):
            sixteen = exports["merged"] if merged == "16bit" else merge_portable(model, tokenizer, out, "16bit", choice,
                                                                        record)
            template = prompts.from_text(record.template, record.template_text, record.template_kind)
            exports["gguf"] = save_gguf(sixteen, out, quants, template, tokenizer, record.args["max_seq_length"])
        if hub_repo:
            exports["hub"] = push(exports.get("merged", out), hub_repo, folder, record)
            log.info("uploaded to %s", exports["hub"])
    except UserError as err:
        exports["error"] = str(err)
        raise
    finally:
        folder.save(record)
