"""Data: a Hub id or a local file -> rows -> detected format -> mapped columns -> validated -> training text.

Formats: `alpaca` (instruction / input / output), `chat` (`messages` or ShareGPT `conversations`, whose
turns may be role/content or from/value in either column) and `text` (a raw `text` column of strings). The
result is in one of the layouts TRL's SFTTrainer reads natively: prompt/completion (so the loss can skip the
prompt), messages, or text.
"""

import logging
import os
import re
from pathlib import Path

from . import datafile, rowcheck
from .columns import apply_mapping, parse_columns
from .own_template import answered, check_conversations
from .errors import UserError
from .prompts import Template, check_inputs_kept, render

log = logging.getLogger("sftkit")

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
FORMATS = ("auto", "alpaca", "chat", "text")


def load_dataset_any(dataset: str, split: str = "train"):
    """A local .jsonl/.json/.csv/.parquet file or folder, or a Hub data set id."""
    import datasets

    path = Path(dataset).expanduser()
    if path.exists():
        if path.is_dir() and (path / "dataset_info.json").exists():
            return datasets.load_from_disk(str(path))
        # Extensions in any case: Windows tools write DATA.JSONL, and the loader is named here, not by the extension.
        files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix.lower() in LOCAL_FORMATS)
        if path.is_dir():
            files = training_files(path, files)
        kinds = {LOCAL_FORMATS.get(p.suffix.lower()) for p in files}
        if not files or None in kinds or len(kinds) > 1:
            raise UserError(f"--dataset {dataset!r}: expected a .jsonl, .json, .csv or .parquet file, or a folder "
                            f"of files of one such kind; found {[p.name for p in files] or 'nothing usable'}.")
        blank = [p.name for p in files if is_blank(p)]
        if blank:  # checked first: the loaders fail on these with an empty or misleading message
            raise UserError(no_rows(dataset, blank if path.is_dir() else None))
        kwargs = datafile.check_files(files)  # bytes, layout, names given twice; CSV cells read as the text they are
        kind = kinds.pop()
        try:
            ds = datasets.load_dataset(kind, data_files=[str(datafile.loadable(p)) for p in files], split="train",
                                       **kwargs)
        except Exception as err:
            if "corresponds to no data" in str(err):  # e.g. a .json holding [] or a .csv with only a header
                raise UserError(no_rows(dataset)) from err
            raise UserError(unreadable(dataset, err)) from err
        if len(ds) == 0:
            raise UserError(no_rows(dataset))
        return ds
    if dataset.startswith((".", "/", "~")) or path.suffix.lower() in LOCAL_FORMATS:
        raise UserError(f"--dataset {dataset!r} does not exist. Check the path (relative to the current folder), "
                        "or pass a Hub id such as jojo0217/korean_safe_conversation.")
    try:
        return datasets.load_dataset(dataset, split=split, token=os.environ.get("HF_TOKEN") or None)
    except Exception as err:
        raise UserError(f"could not load data set {dataset!r} (split {split!r}) from the Hugging Face Hub: "
                        f"{type(err).__name__}: {err}. Check the id and --dataset_split, log in with HF_TOKEN for "
                        "a gated set, or pass a local .jsonl/.json/.csv/.parquet file.") from err


HELD_OUT = re.compile(r"(^|[-_.])(test|testset|valid|validation|val|eval|dev|devset)([-_.]|$)", re.IGNORECASE)


def training_files(folder: Path, files: list) -> list:
    """A folder's files to train on, said in one line. Files named as a held-out split (test.jsonl, valid.jsonl,
    data-eval.csv ...) are left out: training on a test split silently would make every later score meaningless."""
    held = [p for p in files if HELD_OUT.search(p.stem)]
    keep = [p for p in files if p not in held] or files  # only held-out names: the user means them all
    left = [p for p in files if p not in keep]
    log.info("data: --dataset %s: training on %s%s", folder, ", ".join(p.name for p in keep),
             f"; left out {', '.join(p.name for p in left)} (named as a held-out split: pass such a file itself to "
             "train on it)" if left else "")
    return keep


def unreadable(dataset: str, err: Exception) -> str:
    """Why datasets failed: its own error and the one beneath it (DatasetGenerationError alone says nothing; its
    cause says e.g. "Expected 2 fields in line 3, saw 3"). A .csv split by tabs was refused before, by check_file."""
    cause = err.__cause__
    why = f"{type(err).__name__}: {err}" + (f" ({type(cause).__name__}: {str(cause).strip()[:300]})" if cause else "")
    return (f"--dataset {dataset!r} could not be read: {why}. Check that it is valid .jsonl (one JSON object per "
            "line), .json, .csv (comma-separated; text holding a comma or a line break in double quotes) or .parquet.")


def is_blank(path: Path) -> bool:
    """True for a file holding nothing but whitespace; reads only until the first other byte."""
    with path.open("rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return False
    return True


def no_rows(dataset: str, empty_files=None) -> str:
    where = f"its files {empty_files} are empty" if empty_files else "it has no rows"
    return (f"--dataset {dataset!r}: {where}. Add training rows (for .jsonl, one JSON object per line such as "
            '{"instruction": "...", "input": "", "output": "..."}), remove empty files from the folder, '
            "or point --dataset at the file that holds your data.")


def detect_format(column_names, requested: str = "auto") -> str:
    cols = set(column_names)
    if requested not in FORMATS:
        raise UserError(f"--data_format {requested!r} is not one of {', '.join(FORMATS)}.")
    if requested != "auto":
        return requested
    if cols & {"messages", "conversations"}:
        return "chat"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if "text" in cols:
        return "text"
    raise UserError(f"cannot tell the data format from the columns {sorted(cols)}. Expected instruction/output "
                    "(Alpaca), messages or conversations (chat), or text. Rename columns with --columns, e.g. "
                    "--columns 'instruction=question,output=answer', or set --data_format.")


def format_of(ds, data_format: str = "auto", columns=None) -> str:
    """The data format, from the columns as --columns maps them (what picks the template under --prompt auto)."""
    return detect_format(apply_mapping(ds, parse_columns(columns)).column_names, data_format)


def to_messages(row: dict, index: int = 0) -> list:
    """`messages` or ShareGPT `conversations`, normalised to role/content turns. Either column may hold
    either style of turn: data sets mix the names up, and the turns mean the same thing."""
    column = "messages" if row.get("messages") else "conversations"
    turns = row.get(column) or []
    if not isinstance(turns, list):
        raise UserError(f"row {index}: column {column!r} holds a {type(turns).__name__}, not a list of turns. "
                        'Each row needs a list like [{"role": "user", "content": "..."}, ...].')
    return [to_turn(turn, column, index) for turn in turns]


def to_turn(turn, column: str, index: int) -> dict:
    # A column of mixed rows is unified by Arrow: absent keys read as None, so test values, not key presence.
    # rowcheck.check_text_fields has refused unknown speakers and non-text content already.
    if isinstance(turn, dict) and turn.get("role") is not None:
        return {"role": rowcheck.role_of(turn["role"]), "content": turn.get("content") or ""}
    if isinstance(turn, dict) and turn.get("from") is not None:
        return {"role": rowcheck.role_of(turn["from"]), "content": turn.get("value") or ""}
    raise UserError(f"row {index}: a turn in column {column!r} is {turn!r}; each turn needs role/content "
                    'keys ({"role": "user", "content": "..."}) or ShareGPT from/value keys '
                    '({"from": "human", "value": "..."}).')


def read_rows(ds, template: Template, data_format: str = "auto", columns=None, max_samples: int = 0,
              train_on_inputs: bool = False):
    """Validates and renders the rows once, before the model loads, so bad data fails fast. Returns (dataset in a
    TRL layout, without EOS: finalize() adds it once the tokenizer is known; info dict with the format and
    the counts)."""
    ds = apply_mapping(ds, parse_columns(columns), template.fields)
    fmt = detect_format(ds.column_names, data_format)
    required = {"alpaca": ["instruction", "output"], "text": ["text"]}.get(fmt, [])
    missing = [c for c in required if c not in ds.column_names]
    if fmt == "chat" and not {"messages", "conversations"} & set(ds.column_names):
        missing = ["messages or conversations"]
    if missing:
        raise UserError(f"the data set has no column {missing} for the {fmt} format. Columns found: "
                        f"{ds.column_names}. Map yours with --columns, e.g. --columns 'output=answer'.")
    if fmt == "alpaca" and template.kind != "instruction":
        what = "is a chat template" if template.kind == "chat" else "has no template"
        raise UserError(f"--prompt {template.name} {what}; Alpaca-style data needs an instruction template such as "
                        "alpaca_ko or alpaca (--prompt auto picks it).")
    if fmt == "text" and template.kind != "text":  # raw text is trained as written: a template would be a lie
        raise UserError(f"--prompt {template.name}: the data are raw text (a text column), trained as written, so "
                        "they take no template. Pass --prompt none (or auto), or map instruction/output columns "
                        "with --columns for the Alpaca format.")
    if fmt == "chat" and template.kind != "chat":
        raise UserError(f"--prompt {template.name} is an instruction template; chat data needs a chat template "
                        "such as llama-3.1-chat or chatml.")
    if fmt == "alpaca":
        if "input" not in ds.column_names:  # optional in Alpaca data: absent means empty
            ds = ds.map(lambda r: {"input": ""})
        unknown = template.fields - set(ds.column_names)
        if unknown:
            raise UserError(f"template {template.name!r} uses {sorted(unknown)}, which the data set lacks "
                            f"(columns: {ds.column_names}). Map a column onto it with --columns 'FIELD=COLUMN'.")
    rows_in = len(ds)
    if max_samples and max_samples > 0:
        ds = ds.select(range(min(max_samples, len(ds))))
    fields = {"alpaca": sorted(template.fields | {"instruction", "output"}), "text": ["text"],
              "chat": ["messages", "conversations"]}[fmt]
    rowcheck.check_text_fields(ds, fields, fmt, parse_columns(columns))  # every row used: text, or refused

    if fmt == "alpaca":
        ds = ds.filter(lambda r: bool(str(r["output"] or "").strip()) and bool(str(r["instruction"] or "").strip()))
        if "input" in ds.column_names:  # a template without {input} may serve data without inputs, not with them
            check_inputs_kept(template, sum(bool(str(x or "").strip()) for x in ds["input"]))
        # --train_on_inputs keeps this layout too: TRL with completion_only_loss=False trains on every token of it
        # (the same ids and labels as prompt + completion as one text), and the length policy can see the prompt.
        ds = ds.map(lambda r: {"prompt": render(template, r), "completion": str(r["output"])},
                    remove_columns=ds.column_names)
    elif fmt == "chat":
        ds = ds.map(lambda r, i: {"messages": to_messages(r, i)}, with_indices=True, remove_columns=ds.column_names)
        check_conversations(template, ds["messages"])  # a turn the template refuses, named before the model loads
        ds = ds.filter(lambda r: answered(r["messages"]))
    else:
        column = parse_columns(columns).get("text", "text")  # name the user's own column in the error
        ds = ds.filter(lambda r, i: bool(text_of(r["text"], column, i).strip()), with_indices=True)
        ds = ds.select_columns(["text"])
    kept = len(ds)
    considered = min(max_samples, rows_in) if max_samples and max_samples > 0 else rows_in
    dropped = considered - kept
    if dropped:
        log.info("dropped %d of %d rows with an empty answer (or instruction/text)", dropped, considered)
    if kept == 0:
        raise UserError(f"no usable rows: all {considered} rows had an empty answer or were filtered out. "
                        "Check the column mapping (--columns) and --max_samples.")
    return ds, {"format": fmt, "rows_in": rows_in, "rows_used": kept, "rows_dropped": dropped,
                "fingerprint": fingerprint(ds)}


def fingerprint(ds) -> str:
    """A hash of the rendered rows in order: --resume compares it, since a resumed run continues at a row position
    that means nothing if the data changed."""
    import hashlib
    import json

    h = hashlib.sha256()
    for batch in ds.iter(batch_size=1000):
        h.update(json.dumps(batch, ensure_ascii=False, sort_keys=True).encode("utf-8"))
    return h.hexdigest()[:16]


def text_of(value, column: str, index: int) -> str:
    """A `text` value, checked: a number or list there means the wrong column was picked."""
    if value is None:
        return ""  # empty, dropped and counted like an empty answer
    if not isinstance(value, str):
        raise UserError(f"column {column!r} row {index} holds a {type(value).__name__} ({str(value)[:40]!r}), "
                        "not text. The text format needs a string per row: fix the data, or map the right column "
                        "with --columns 'text=COLUMN'.")
    return value


def eval_count(rows: int, val_size) -> int:
    """Rows --val_size holds out (a count >= 1, or a fraction 0 < x < 1 of the rows); known before the model loads."""
    if not val_size:
        return 0
    n = int(val_size) if val_size >= 1 else max(1, round(rows * val_size))
    if n >= rows:
        raise UserError(f"--val_size {val_size} leaves no training rows out of {rows}. Use a smaller count "
                        "or a fraction such as 0.05.")
    return n


def add_eos(ds, eos_token: str):
    """The one place EOS is added: every answer (or text) ends in the tokenizer's EOS, so the model learns to stop.
    Chat rows need none: the chat template closes each turn with its own end-of-turn token."""
    if "completion" in ds.column_names:
        return ds.map(lambda r: {"completion": r["completion"] if r["completion"].endswith(eos_token)
                                 else r["completion"] + eos_token})
    if "text" in ds.column_names:
        return ds.map(lambda r: {"text": r["text"] if r["text"].endswith(eos_token) else r["text"] + eos_token})
    return ds


def finalize(ds, eos_token: str, val_size, seed: int):
    """After the tokenizer is known: EOS on every answer, then the evaluation split. Returns (train, eval|None)."""
    ds = add_eos(ds, eos_token)
    n = eval_count(len(ds), val_size)
    if not n:
        return ds, None
    parts = ds.train_test_split(test_size=n, seed=seed)
    return parts["train"], parts["test"]
