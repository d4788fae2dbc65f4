"""What a Hub upload holds: a copy of the run's adapter (or merged model) with no local path in it, and a model
card that says how the model was made and how to use it. Staged in RUN/hub-upload, so what goes up can be read
first and uploaded again without training."""

import fnmatch
import json
import re
import shutil
from pathlib import Path

STAGE = "hub-upload"
# Left out of an upload: checkpoints and optimizer states stay local, other exports go separately.
NOT_UPLOADED = ("checkpoint-*", "*.pt", "training_args.bin", ".run.*", "merged-*", "gguf", STAGE, ".lock",
                "runs", "README.md")
_LOCAL = re.compile(r"^(/|~|[A-Za-z]:\\)")  # a POSIX, home or Windows path


def stage(source: Path, run_dir: Path, record, repo_id: str) -> Path:
    """Copies what is uploaded into RUN/hub-upload (replacing an earlier staging), scrubs local paths, writes the
    card. `source` is the run folder or its merged model."""
    out = run_dir / STAGE
    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    for item in source.iterdir():
        if any(fnmatch.fnmatch(item.name, pat) for pat in NOT_UPLOADED):
            continue
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, out / item.name)
    base = hub_base(record)
    # Only the files sftkit and peft write paths into: a tokenizer's merges ("/", "..") are data, not paths.
    for path in (out / "run.json", out / "adapter_config.json"):
        if path.is_file():
            data = scrub(json.loads(path.read_text(encoding="utf-8")))
            if path.name == "adapter_config.json":
                data["base_model_name_or_path"] = base  # peft loads the base from here: a Hub id, not a folder
            path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    (out / "README.md").write_text(model_card(record, repo_id, base, merged=source != run_dir), encoding="utf-8")
    return out


def hub_base(record) -> str:
    """The base model as a Hub id: the one trained from, or a local folder's name (said so in the card)."""
    name = str(record.args.get("model_name", ""))
    return Path(name).name if _LOCAL.match(name) or Path(name).is_dir() else name


def scrub(value):
    """Every string that is an absolute, home or Windows path becomes its last part: run.json's folders, data
    files, checkpoints. (Relative names such as "examples/tiny-llama" say nothing of the user's machine.)"""
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    if isinstance(value, str) and _LOCAL.match(value) and "\n" not in value:
        return Path(value).name
    return value


def model_card(record, repo_id: str, base: str, merged: bool) -> str:
    a = record.args
    local = base != a.get("model_name")
    data = Path(str(a.get("dataset", ""))).name if _LOCAL.match(str(a.get("dataset", ""))) or \
        Path(str(a.get("dataset", ""))).exists() else a.get("dataset", "")
    gguf = record.exports.get("gguf")
    lines = [
        "---", f"base_model: {base}", "library_name: " + ("transformers" if merged else "peft"), "tags:", "- lora",
        "- sft", "- sftkit", "---", "", f"# {repo_id}", "",
        f"{'A merged model' if merged else 'A LoRA adapter'} fine-tuned from `{base}`"
        + (" (a local copy of the base)" if local else "") + f" on `{data}` with sftkit "
        f"({record.backend.get('backend', '?')} backend, {record.backend.get('dtype', '?')}).", "",
        "## Training", "",
        f"- template: `{record.template}` ({record.template_kind}); the prompt format below must be used as is",
        f"- rows: {record.data.get('rows_used', '?')} of {record.data.get('rows_in', '?')} ({record.data.get('format')})",
        f"- LoRA r={a.get('r')}, alpha={a.get('lora_alpha')}, dropout={a.get('lora_dropout')}, "
        f"modules {', '.join(a.get('target_modules') or [])}",
        f"- {a.get('max_steps')} steps, batch {a.get('per_device_train_batch_size')} x "
        f"{a.get('gradient_accumulation_steps')}, lr {a.get('learning_rate')}, {a.get('optim')}, "
        f"weight decay {a.get('weight_decay')}, {a.get('lr_scheduler_type')} schedule, seed {a.get('seed')}, "
        f"max_seq_length {a.get('max_seq_length')}",
        f"- final loss: {(record.metrics or {}).get('final_loss')}", "",
    ]
    if record.template_kind == "instruction":
        lines += ["## Prompt format", "", "```", record.template_text.strip(), "```", ""]
    lines += ["## Use", "", "With sftkit (answers stream, the template and stop tokens come from the run):", "",
              "```bash", f"hf download {repo_id} --local-dir my-run",
              "python infer.py --adapter my-run --instruction \"...\"" if not merged else
              f"python infer.py --model_name {repo_id} --prompt {record.template} --instruction \"...\"", "```", "",
              "With transformers:", "", "```python"]
    if merged:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer",
                  f"model = AutoModelForCausalLM.from_pretrained('{repo_id}')",
                  f"tokenizer = AutoTokenizer.from_pretrained('{repo_id}')"]
    else:
        lines += ["from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer",
                  f"model = AutoPeftModelForCausalLM.from_pretrained('{repo_id}')  # loads {base} too",
                  f"tokenizer = AutoTokenizer.from_pretrained('{repo_id}')"]
    lines += ["```", ""]
    if gguf:
        lines += ["With Ollama (the GGUF export and its Modelfile, built from the same template):", "", "```bash",
                  "ollama create my-model -f Modelfile", "ollama run my-model", "```", ""]
    else:
        lines += ["For Ollama / llama.cpp, export GGUF with `train_unsloth.py --save_gguf q4_k_m` and use the "
                  "Modelfile written beside it.", ""]
    return "\n".join(lines)
