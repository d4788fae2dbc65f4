"""The run folder: refuse to clobber a finished run, find the checkpoint to resume, write run.json atomically.

A run folder holds the LoRA adapter (adapter_model.safetensors + adapter_config.json), the tokenizer,
`run.json` (resolved arguments, backend, dtype and reason, template, versions, device, metrics, time,
memory) and `metrics.jsonl` (one line per logging step). infer.py and memory_report.py read it back.
"""

import importlib.metadata
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from .errors import UserError

RECORD = "run.json"
LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "datasets", "unsloth",
             "unsloth_zoo", "fire")


def default_name(model_name: str, dataset: str) -> str:
    """outputs/<model>-<data set>: the same command lands in the same folder, so a rerun is caught."""
    def short(s):
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(s).rstrip("/")).stem or "run")
    return str(Path("outputs") / f"{short(model_name)}-{short(dataset)}")


def checkpoints(folder: Path) -> list[Path]:
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def read_record(folder) -> dict:
    """run.json of a run folder, with errors that say what to pass instead."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"run folder {str(folder)!r} does not exist. Pass the --output_dir of a training run "
                        "(train_unsloth.py prints it at the end).")
    path = folder / RECORD
    if not path.is_file():
        raise UserError(f"{str(folder)!r} has no {RECORD}, so it was not written by train_unsloth.py (or the run "
                        "never started). For a plain model pass --model_name and --prompt instead.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err}); the run folder is damaged.") from err


def prepare(output_dir: str, overwrite: bool, resume: bool):
    """Checks the folder against the flags. Returns the checkpoint to resume from, or None to start afresh."""
    folder = Path(output_dir)
    record = folder / RECORD
    status = None
    if record.is_file():
        try:
            status = json.loads(record.read_text(encoding="utf-8")).get("status")
        except json.JSONDecodeError:
            status = "damaged"
    ckpts = checkpoints(folder) if folder.is_dir() else []
    if resume:
        if overwrite:
            raise UserError("--resume and --overwrite contradict each other: resume continues the run in "
                            f"{output_dir}, overwrite deletes it. Pass one of them.")
        if not ckpts:
            raise UserError(f"--resume: no checkpoint-* folder in {output_dir!r} to resume from. Run without "
                            "--resume to start training.")
        return ckpts[-1]
    if folder.is_dir() and any(folder.iterdir()):
        if overwrite:
            shutil.rmtree(folder)  # asked for explicitly
        elif status == "finished":
            raise UserError(f"{output_dir!r} already holds a finished run. Pass --overwrite to replace it, or "
                            "choose another --output_dir.")
        elif ckpts:
            raise UserError(f"{output_dir!r} holds an unfinished run with {ckpts[-1].name}. Pass --resume to "
                            "continue it, or --overwrite to start again.")
        else:
            raise UserError(f"{output_dir!r} exists and is not empty. Choose another --output_dir, or pass "
                            "--overwrite to replace it.")
    folder.mkdir(parents=True, exist_ok=True)
    return None


def write_record(folder, record: dict):
    """Writes run.json atomically: an interrupted write never leaves half a file."""
    folder = Path(folder)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".run.", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(record, f, ensure_ascii=False, indent=2, default=str)
    os.replace(tmp, folder / RECORD)


def library_versions() -> dict:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out
