"""What sftkit, the trainer and the exports write into a run folder; anything else there is the user's, and
--overwrite refuses to delete it. Checked inside the folders they write too: a note left in checkpoint-N/, a
second GGUF put in merged-16bit/, or an edited Modelfile would otherwise go with the folder that holds it."""

import fnmatch
import hashlib
import json
from pathlib import Path

LOCK = ".lock"
# What a saved tokenizer writes, by family: Llama 3 (tokenizer.json), Llama 2 / Mistral / Gemma (tokenizer.model),
# Qwen and other BPE vocabularies (vocab.json, merges.txt, added_tokens.json).
TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
             "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json")
TOP = ("run.json", "metrics.jsonl", "samples.jsonl", "adapter_model.safetensors", "adapter_config.json",
       "generation_config.json", "training_args.bin", "README.md", "checkpoint-[0-9]*", "merged-16bit",
       "merged-4bit", "gguf", "runs", "hub-upload", "report.png", LOCK, ".run.*.json") + TOKENIZER
# A saved model or trainer state (transformers, peft, TRL, Unsloth): weights, optimizer, scaler and RNG states,
# configs and the tokenizer.
SAVED = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.pt", "*.pth", "*.json", "README.md") + TOKENIZER
INSIDE = {"checkpoint-[0-9]*": SAVED, "merged-*": SAVED, "gguf": ("model-*.gguf", "Modelfile"),
          "runs": ("events.out.tfevents.*",)}  # hub-upload: a staged copy, replaced whole by each upload
# Unsloth's merge fetches files from the Hub into the merged folder; huggingface_hub keeps its bookkeeping there.
HUB_CACHE = (".cache", "huggingface")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def foreign(run: Path) -> list[str]:
    """Paths (relative to the run folder) of what sftkit did not write: entries it does not name at the top,
    files it does not write inside its folders, and a Modelfile changed since the export wrote it."""
    out = []
    for entry in sorted(run.iterdir()):
        if not any(fnmatch.fnmatch(entry.name, pat) for pat in TOP):
            out.append(entry.name)
            continue
        allowed = next((names for pat, names in INSIDE.items() if fnmatch.fnmatch(entry.name, pat)), None)
        if allowed is None or not entry.is_dir():
            continue
        for f in sorted(entry.rglob("*")):
            inner = f.relative_to(entry).parts
            if f.is_file() and inner[:2] != HUB_CACHE and not any(fnmatch.fnmatch(f.name, p) for p in allowed):
                out.append(str(f.relative_to(run)))
    modelfile = run / "gguf" / "Modelfile"
    if modelfile.is_file() and written_digest(run) not in ("", digest(modelfile)):
        out.append(f"{modelfile.relative_to(run)} (changed since the export wrote it)")
    return out


def written_digest(run: Path) -> str:
    """The Modelfile's sha256 as the export recorded it in run.json ("" for older runs, or none)."""
    try:
        record = json.loads((run / "run.json").read_text(encoding="utf-8"))
        return str(((record.get("exports") or {}).get("gguf") or {}).get("modelfile_sha256") or "")
    except (OSError, ValueError, AttributeError):
        return ""
