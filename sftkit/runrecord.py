"""run.json: one typed, versioned record of a run, and what it says when a run starts. RunFolder (runfolder.py) is
its one writer; --resume, infer.py and memory_report.py read it through RunFolder.read()."""

import os
import re
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .errors import UserError

RECORD = "run.json"
SCHEMA = 2  # 1: the unversioned records of earlier releases (same keys, read as they are)
LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "datasets", "unsloth",
             "unsloth_zoo", "fire")


@dataclass
class RunRecord:
    """run.json, typed. Unknown keys from a newer release are kept in `extra` and written back."""
    status: str = "running"  # running | finished | interrupted | failed | aborted
    args: dict = field(default_factory=dict)  # train()'s arguments as the user asked (not the fast plan)
    backend: dict = field(default_factory=dict)
    model_path: str = ""  # what infer.py reloads the base from, whatever folder it runs in
    template: str = ""
    template_kind: str = ""
    template_text: str = ""
    tokens: dict = field(default_factory=dict)  # bos / eos / pad tokens and ids the run trained with
    data: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    fast: dict | None = None
    versions: dict = field(default_factory=dict)
    world_size: int = 1
    started: str = ""
    finished: str | None = None
    resumed_from: str | None = None
    metrics: dict | None = None
    memory: dict | None = None
    exports: dict = field(default_factory=dict)
    error: str | None = None
    replaced: str | None = None  # the previous run --overwrite moved aside, deleted when this one finishes
    workdir: str = ""  # the folder relative paths in args (--dataset, --model_name ...) were typed in
    schema: int = SCHEMA
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = asdict(self)
        return {**out.pop("extra"), **out}

    @classmethod
    def from_dict(cls, raw, path: Path) -> "RunRecord":
        names = {f.name for f in fields(cls)} - {"extra"}
        if not isinstance(raw, dict) or not isinstance(raw.get("args", {}), dict) or "status" not in raw:
            raise damaged(path, "it is not a run record (no status or args)")
        if int(raw.get("schema", 1)) > SCHEMA:
            raise UserError(f"{path} was written by a newer sftkit (record schema {raw['schema']}, this one reads up "
                            f"to {SCHEMA}). Update the scripts (git pull) to read it.")
        known = {k: v for k, v in raw.items() if k in names}
        return cls(**{**known, "schema": SCHEMA}, extra={k: v for k, v in raw.items() if k not in names})


def damaged(path: Path, why: str) -> UserError:
    return UserError(f"{path} is damaged ({why}), so the run's settings are unknown; nothing was read from it. "
                     f"Restore the file (it is plain JSON), or start the run again with --overwrite (the folder's "
                     "checkpoints are then replaced).")


def default_name(model_name: str, dataset: str) -> str:
    """outputs/<model>-<data set>: the same command lands in the same folder, so a rerun is caught."""
    def short(s):
        name = Path(str(s).rstrip("/")).name
        for ext in (".jsonl", ".json", ".csv", ".parquet"):  # data files only: "Llama-3.1-8B" keeps its ".1-8B"
            name = name[: -len(ext)] if name.endswith(ext) else name
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", name or "run")
    return str(Path("outputs") / f"{short(model_name)}-{short(dataset)}")


def token_record(tokenizer) -> dict:
    """The special tokens the run trained with: infer.py and exports stop and pad with the same ones."""
    out = {}
    for kind in ("bos", "eos", "pad"):
        token = getattr(tokenizer, f"{kind}_token", None)
        out[kind] = {"token": token, "id": getattr(tokenizer, f"{kind}_token_id", None)} if token else None
    return out


def library_versions() -> dict:
    import importlib.metadata

    out = {}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def starting_record(a: dict, choice, template, info: dict, notes: list, fast: dict | None, world_size: int, ckpt,
                    tokenizer) -> RunRecord:
    """What run.json says about a run as it starts."""
    name = a["model_name"]
    return RunRecord(
        status="running", args=a, backend=choice.as_dict(),
        # infer.py reloads the base from here, whatever folder it is run from
        model_path=str(Path(name).resolve()) if Path(name).is_dir() else name,
        template=template.name, template_kind=template.kind, template_text=template.text,
        tokens=token_record(tokenizer), data=info, notes=notes, fast=fast, versions=library_versions(),
        world_size=world_size, started=time.strftime("%Y-%m-%d %H:%M:%S"), workdir=os.getcwd(),
        resumed_from=str(ckpt) if ckpt else None)
