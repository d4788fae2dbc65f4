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
        name = Path(str(s).rstrip("/")).name
        for ext in (".jsonl", ".json", ".csv", ".parquet"):  # data files only: "Llama-3.1-8B" keeps its ".1-8B"
            name = name[: -len(ext)] if name.endswith(ext) else name
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", name or "run")
    return str(Path("outputs") / f"{short(model_name)}-{short(dataset)}")


def checkpoints(folder: Path) -> list[Path]:
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def read_record(folder) -> dict:
    """run.json of a run folder, with errors that say what to pass instead."""
    if not str(folder or "").strip():  # Path("") would quietly mean the current folder
        raise UserError("no run folder given. Pass the --output_dir of a training run, e.g. outputs/RUN "
                        "(train_unsloth.py prints it at the end).")
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"run folder {str(folder)!r} does not exist. Pass the --output_dir of a training run "
                        "(train_unsloth.py prints it at the end).")
    path = folder / RECORD
    if not path.is_file():
        raise UserError(f"{str(folder)!r} has no {RECORD}, so it was not written by train_unsloth.py (or the run "
                        "never started). Pass a run folder that train_unsloth.py wrote (infer.py can also take "
                        "--model_name with --prompt for a plain model).")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err}); the run folder is damaged.") from err


def status_of(folder: Path):
    record = folder / RECORD
    if not record.is_file():
        return None
    try:
        return json.loads(record.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return {"status": "damaged"}


def prepare(output_dir: str, overwrite: bool, resume: bool, max_steps: int = -1):
    """Checks the folder against the flags; deletes nothing (see clear()). Returns the checkpoint to resume
    from, or None to start afresh."""
    folder = Path(output_dir)
    rec = status_of(folder)
    status = rec.get("status") if rec else None
    ckpts = checkpoints(folder) if folder.is_dir() else []
    if resume:
        if overwrite:
            raise UserError("--resume and --overwrite contradict each other: resume continues the run in "
                            f"{output_dir}, overwrite deletes it. Pass one of them.")
        if not ckpts:
            raise UserError(f"--resume: no checkpoint-* folder in {output_dir!r} to resume from. Run without "
                            "--resume to start training.")
        done = (rec.get("metrics") or {}).get("global_step") if rec else None
        if status == "finished" and (max_steps <= 0 or (done is not None and max_steps <= done)):
            raise UserError(f"{output_dir!r} already finished at step {done}; resuming would train past it and "
                            "replace the adapter. To train further pass a larger --max_steps with --resume; to "
                            "start again, --overwrite.")
        return ckpts[-1]
    if folder.is_dir() and any(folder.iterdir()):
        if overwrite:
            if rec is None:  # never delete what train_unsloth.py did not write
                raise UserError(f"--overwrite refused: {output_dir!r} is not a run folder (no {RECORD}). Choose "
                                "an empty or new --output_dir.")
        elif status == "finished":
            raise UserError(f"{output_dir!r} already holds a finished run. Pass --overwrite to replace it, or "
                            "choose another --output_dir.")
        elif ckpts:
            raise UserError(f"{output_dir!r} holds an unfinished run with {ckpts[-1].name}. Pass --resume to "
                            "continue it, or --overwrite to start again.")
        else:
            raise UserError(f"{output_dir!r} exists and is not empty. Choose another --output_dir, or pass "
                            "--overwrite to replace it.")
    return None


def clear(output_dir: str):
    """Empties the run folder for a fresh start; called only after the data and the model have loaded, so a
    typo in another argument never costs the previous run."""
    folder = Path(output_dir)
    if folder.is_dir() and (folder / RECORD).is_file():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)


# Arguments a resumed run may change; every other one must match the run being resumed. Left at their defaults,
# they too take the recorded values (a plain `--resume` must not fall back to the default 60 steps).
RESUMABLE_CHANGES = {"max_steps", "num_train_epochs", "save_steps", "logging_steps", "report_to", "save_merged",
                     "save_gguf", "push_to_hub", "cudnn_attention"}
# What this invocation is asked to do, never taken from the record.
PER_INVOCATION = {"resume", "overwrite", "output_dir"}


def _comparable(value):
    """Recorded lists and CLI text for the same list compare equal: 'q_proj,v_proj' == ['q_proj', 'v_proj']."""
    if isinstance(value, str) and "," in value:
        return [x.strip() for x in value.split(",") if x.strip()]
    return list(value) if isinstance(value, tuple) else value


def resume_args(output_dir: str, given: dict, defaults: dict) -> dict:
    """The recorded arguments of the run to resume, with the few allowed changes from `given`.

    An argument left at its default takes the recorded value, so `--resume --output_dir X` alone continues
    X exactly; one set explicitly to something else is a conflict (reported with both values) unless it is one
    of RESUMABLE_CHANGES."""
    rec = status_of(Path(output_dir))
    if not rec or "args" not in rec:
        return given
    recorded = dict(rec["args"])
    out = dict(given)
    for key, value in recorded.items():
        if key not in given or key in PER_INVOCATION:
            continue
        now = _comparable(given[key])
        if now == _comparable(defaults.get(key)) or now == _comparable(value):
            out[key] = value
        elif key not in RESUMABLE_CHANGES:
            raise UserError(f"--resume: --{key} {given[key]!r} differs from the run being resumed ({value!r}). "
                            f"Drop --{key} to continue that run, or start a new one in another --output_dir.")
    return out


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
