"""The run folder: refuse to clobber a finished run, find the checkpoint to resume, write run.json atomically.

A run folder holds the LoRA adapter (adapter_model.safetensors + adapter_config.json), the tokenizer,
`run.json` (resolved arguments, backend, dtype and reason, template, versions, device, metrics, time,
memory) and `metrics.jsonl` (one line per logging step). infer.py and memory_report.py read it back.
"""

import functools
import importlib.metadata
import inspect
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from . import cli
from .errors import UserError

log = logging.getLogger("sftkit")

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


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[-1])


def checkpoints(folder: Path) -> list[Path]:
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=step_of)


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
    """Checks the folder against the flags; deletes nothing (see set_aside()). Returns the checkpoint to resume
    from, or None to start afresh."""
    folder = Path(output_dir)
    rec = status_of(folder)
    status = rec.get("status") if rec else None
    ckpts = checkpoints(folder) if folder.is_dir() else []
    if resume:
        if overwrite:
            raise UserError("--resume and --overwrite contradict each other: resume continues the run in "
                            f"{output_dir}, overwrite deletes it. Pass one of them.")
        if not ckpts and rec:
            raise UserError(f"--resume: the run in {output_dir!r} saved no checkpoint to resume from (it stopped "
                            "before its first save, or --save_steps was 0). Start it again with --overwrite.")
        if not ckpts:
            raise UserError(f"--resume: no checkpoint-* folder in {output_dir!r} to resume from. Run without "
                            "--resume to start training.")
        done = (rec.get("metrics") or {}).get("global_step") if rec else None
        if status == "finished" and (max_steps <= 0 or (done is not None and max_steps <= done)):
            raise UserError(f"{output_dir!r} already finished at step {done}; resuming would train past it and "
                            "replace the adapter. To train further pass a larger --max_steps with --resume; to "
                            "start again, --overwrite.")
        at = step_of(ckpts[-1])
        if 0 < max_steps < at:  # equal is fine: a run killed after its last checkpoint still gets finished
            raise UserError(f"--resume: --max_steps {max_steps} (given or recorded) is below the step of the run's "
                            f"newest checkpoint, {at}: there is nothing to train back to. Pass --max_steps {at} or "
                            "more.")
        return ckpts[-1]
    if folder.is_dir() and any(folder.iterdir()):
        if overwrite:
            if rec is None:  # never delete what train_unsloth.py did not write
                raise UserError(f"--overwrite refused: {output_dir!r} is not a run folder (no {RECORD}). Choose "
                                "an empty or new --output_dir.")
            if Path.cwd().resolve().is_relative_to(folder.resolve()):
                raise UserError(f"--overwrite refused: {output_dir!r} is the folder you are working in (or holds "
                                "it). Pass the run's folder by its name, e.g. --output_dir outputs/my-run.")
            no_leftover(folder)  # known now, before anything loads
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


def replaced_path(folder) -> Path:
    """Where --overwrite keeps the run it replaces: beside the real folder (a symlinked --output_dir included)."""
    real = Path(folder).resolve()
    return real.with_name(real.name + ".replaced")


def no_leftover(folder: Path) -> Path:
    """The folder an --overwrite moves the old run to; refused while one from an earlier --overwrite remains."""
    old = replaced_path(folder)
    if old.exists():  # the run that replaced it has not finished yet: this may be the only finished copy
        raise UserError(f"{old} holds the run an earlier --overwrite of {str(folder)!r} replaced; it is deleted "
                        "when the run that replaced it finishes (--resume it). Nothing was changed: finish that "
                        "run, or delete or move the folder, then retry.")
    return old


def set_aside(output_dir: str):
    """--overwrite: moves the previous run to <output_dir>.replaced instead of deleting it, and makes the folder
    anew. Called only once data, model and trainer have loaded; the old run is deleted by settle() when the new
    one has finished, or put back if the new one fails before its first checkpoint. Returns the moved folder."""
    folder = Path(output_dir).resolve()  # a symlinked folder: move what it points to, keep the link
    if not (folder.is_dir() and (folder / RECORD).is_file()):
        folder.mkdir(parents=True, exist_ok=True)
        return None
    old = no_leftover(folder)
    folder.rename(old)
    folder.mkdir(parents=True, exist_ok=True)  # under torchrun another rank's Trainer may have made it already
    return old


def settle(output_dir: str, old, finished: bool) -> str:
    """After an --overwrite: a finished new run drops the old one (also when it finished in a later --resume); a
    failed one that saved no checkpoint puts the old run back (nothing was gained, nothing is lost); otherwise
    both are kept and the log says where. Returns "restored", "kept" or ""."""
    folder = Path(output_dir).resolve()
    if finished:
        old = replaced_path(folder)
        if old.is_dir() and (old / RECORD).is_file():
            shutil.rmtree(old)
            log.info("this run replaced the one in %s, now deleted", old)
        return ""
    if old is None or not old.exists():
        return ""
    if not checkpoints(folder):
        shutil.rmtree(folder)
        old.rename(folder)
        log.info("the new run failed before its first checkpoint: the previous run is back in %s", output_dir)
        return "restored"
    log.info("the previous run is kept in %s until this one is resumed and finishes", old)
    return "kept"


# Arguments a resumed run may change (the micro-batch split of --fast is re-planned anyway); every other one the
# caller gives must match the run being resumed.
RESUMABLE_CHANGES = {"max_steps", "num_train_epochs", "save_steps", "logging_steps", "report_to", "save_merged",
                     "save_gguf", "push_to_hub", "cudnn_attention", "fast"}
# A resumed run may split its effective batch (their product) differently, e.g. smaller after running out of memory:
# the loss is normalised over all tokens of the optimizer step, so each step still learns the same.
SPLIT = ("per_device_train_batch_size", "gradient_accumulation_steps")
# What this invocation is asked to do, never taken from the record.
PER_INVOCATION = {"resume", "overwrite", "output_dir"}


def resumable(fn):
    """Wraps train(): with resume=True, every argument the caller did not give takes the value recorded in the
    run's run.json, so `--resume --output_dir X` alone continues X exactly (its step count too). Which arguments
    were given is known from the call (a Python caller's keywords) or, on the command line, from cli.GIVEN (Fire
    fills in every default), so `--max_steps 60` counts even though 60 is the default."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        given = dict(sig.bind_partial(*args, **kwargs).arguments)
        if cli.GIVEN is not None:  # from the command line: Fire filled in the defaults, keep what was typed
            given = {k: v for k, v in given.items() if k in cli.GIVEN}
        if given.get("resume"):
            full = {name: p.default for name, p in sig.parameters.items()} | given
            given["output_dir"] = full["output_dir"] or default_name(full["model_name"], full["dataset"])
            given = resume_args(given["output_dir"], given, set(sig.parameters))
        return fn(**given)

    return wrapper


def _same(given, recorded) -> bool:
    """CLI text and the recorded list name the same modules: 'q_proj' == ['q_proj'], (a, b) == [a, b]."""
    if isinstance(recorded, list) and isinstance(given, (str, tuple, list)):
        given = cli.names(given)
    return given == recorded


def resume_args(output_dir: str, given: dict, known: set) -> dict:
    """The recorded arguments of the run to resume (those `known` to train()), overridden by the `given` ones
    that may change; any other given argument that differs from the record is refused with both values."""
    rec = status_of(Path(output_dir))
    if not rec or "args" not in rec:
        return given  # nothing recorded: prepare() says what is missing
    recorded = {k: v for k, v in rec["args"].items() if k in known and k not in PER_INVOCATION}
    for key, value in given.items():
        if key in recorded and key not in RESUMABLE_CHANGES | PER_INVOCATION | set(SPLIT) \
                and not _same(value, recorded[key]):
            raise UserError(f"--resume: --{key} {value!r} differs from the run being resumed ({recorded[key]!r}). "
                            f"Drop --{key} to continue that run, or start a new one in another --output_dir.")
    merged = {**recorded, **given}
    if all(k in recorded for k in SPLIT):  # the rows of each step stay the same: only how they are split changes
        was, now = tuple(int(recorded[k]) for k in SPLIT), tuple(int(merged[k]) for k in SPLIT)
        if was[0] * was[1] != now[0] * now[1]:
            raise UserError(f"--resume: micro-batch {now[0]} x accumulation {now[1]} is an effective batch of "
                            f"{now[0] * now[1]}, the run being resumed used {was[0]} x {was[1]} = {was[0] * was[1]}. "
                            "A resumed run may split its batch differently (after running out of memory, e.g. "
                            f"--per_device_train_batch_size {max(was[0] // 2, 1)} --gradient_accumulation_steps "
                            f"{was[0] * was[1] // max(was[0] // 2, 1)}), not change it.")
    return merged


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
