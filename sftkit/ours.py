"""What sftkit, the trainer and the exports write into a run folder; anything else there is the user's, and
--overwrite refuses to delete it. Checked inside the folders they write too: a note left in checkpoint-N/, a
second GGUF put in merged-16bit/, or an edited Modelfile would otherwise go with the folder that holds it."""

import fnmatch
from pathlib import Path

LOCK = ".lock"
TOP = ("run.json", "metrics.jsonl", "samples.jsonl", "adapter_model.safetensors", "adapter_config.json",
       "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
       "generation_config.json", "training_args.bin", "README.md", "Modelfile", "checkpoint-*", "merged-*",
       "gguf", "runs", "hub-upload", "report.png", LOCK, ".run.*.json")
# A saved model or trainer state (transformers, peft, TRL, Unsloth): weights, optimizer and RNG states, configs and
# tokenizer files of the Llama family and of BPE tokenizers with merges.txt / vocab.json.
SAVED = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.pt", "*.pth", "*.json", "*.jinja", "README.md",
         "tokenizer.model", "merges.txt", "vocab.txt")
INSIDE = {"checkpoint-*": SAVED, "merged-*": SAVED, "gguf": ("model-*.gguf", "Modelfile"),
          "runs": ("events.out.tfevents.*",)}  # hub-upload: a staged copy, replaced whole by each upload
EDITED_AFTER = 2.0  # seconds a Modelfile may be newer than run.json, which is written after the exports


def foreign(run: Path) -> list[str]:
    """Paths (relative to the run folder) of what sftkit did not write: entries it does not name at the top,
    files it does not write inside its folders, and a Modelfile changed after the run settled."""
    out = []
    for entry in sorted(run.iterdir()):
        if not any(fnmatch.fnmatch(entry.name, pat) for pat in TOP):
            out.append(entry.name)
            continue
        allowed = next((names for pat, names in INSIDE.items() if fnmatch.fnmatch(entry.name, pat)), None)
        if allowed is None or not entry.is_dir():
            continue
        for f in sorted(entry.rglob("*")):
            if f.is_file() and not any(fnmatch.fnmatch(f.name, pat) for pat in allowed):
                out.append(str(f.relative_to(run)))
    record, modelfile = run / "run.json", run / "gguf" / "Modelfile"
    if record.is_file() and modelfile.is_file() and \
            modelfile.stat().st_mtime > record.stat().st_mtime + EDITED_AFTER:
        out.append(f"{modelfile.relative_to(run)} (changed after the run finished)")
    return out
