"""JSONL prompt files for batch inference: read and check them, answer them in batches, resume a killed run.

Answers go to their own JSONL file, one line per prompt, appended as each batch finishes; each line carries the
prompt's position in the input (ROW), so a rerun answers only what is missing.
"""

import json
import logging
import os
from pathlib import Path

from .datafile import kind, numbered_lines
from .errors import UserError

log = logging.getLogger("sftkit")
ROW = "_row"  # the input line's position, our own key so a user column named "index" cannot clash
WRITTEN = (ROW, "answer", "stopped", "settings", "base_answer")  # the keys infer.py adds to each answer line


def read_prompts(input_file: str, compare_base: bool = False) -> list:
    """The rows of a JSONL prompt file, each checked here so that a bad line is named by its number (and is
    found before the model loads, when infer.py calls this first)."""
    src = Path(input_file)
    if not src.is_file():
        raise UserError(f"--input_file {input_file!r} does not exist. It should be JSONL with an 'instruction' "
                        "(and optional 'input') per line.")
    need = 'each line needs a JSON object like {"instruction": "your question", "input": ""} ("input" optional)'
    rows = []
    # Decoded as data files are: a BOM is dropped, and another encoding is refused with its iconv fix.
    for n, line in numbered_lines(input_file, "--input_file "):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{input_file} line {n} is not valid JSON ({err}); fix or remove that line.") from err
        if not isinstance(row, dict):
            raise UserError(f"{input_file} line {n} is a JSON {type(row).__name__}, not an object: {need}.")
        if not isinstance(row.get("instruction"), str) or not row["instruction"].strip():
            raise UserError(f"{input_file} line {n} has no non-empty text in 'instruction' (keys: {sorted(row)}): "
                            f"{need}.")
        taken = [k for k in WRITTEN if k in row and (compare_base or k != "base_answer")]
        if taken:  # the answer line would replace the user's value (a reference answer, say) without a word
            raise UserError(f"{input_file} line {n} has {', '.join(repr(k) for k in taken)}, which infer.py writes "
                            f"into each answer line: rename {'it' if len(taken) == 1 else 'them'} in the input "
                            f"(e.g. 'reference_{taken[0].lstrip('_')}') so that both are kept.")
        for key in ("input", "system"):  # rendered into the prompt: a number or list there is a wrong column
            if row.get(key) is not None and not isinstance(row[key], str):
                raise UserError(f"{input_file} line {n}: {key!r} holds {kind(row[key])}, not text. Write it as one "
                                "string (in quotes), or remove the key.")
        rows.append(row)
    if not rows:
        raise UserError(f"--input_file {input_file!r} holds no prompts: {need}, one per line.")
    return rows


def check_systems(template, input_file: str, rows: list):
    """A line's own "system" key needs a chat template. Refused here, naming the file and its lines: the generic
    check would blame a --system the user never passed."""
    given = [i for i, r in enumerate(rows) if r.get("system")]
    if not given or template.kind == "chat":
        return
    lines = [n for n, _ in numbered_lines(input_file, "--input_file ")] if Path(input_file).is_file() else []
    at = [str(lines[i] if len(lines) == len(rows) else i + 1) for i in given]  # rows not from this file: positions
    where = f"line {at[0]}" if len(at) == 1 else f"lines {', '.join(at[:5])}{' and more' if len(at) > 5 else ''}"
    what = "raw text" if template.kind == "text" else "an instruction template"
    them = "that line" if len(at) == 1 else "those lines"
    raise UserError(f"--input_file {input_file} {where}: a \"system\" key needs a chat template, and this run's "
                    f"template {template.name!r} is {what}. Drop \"system\" from {them}, or answer them with a run "
                    "(or --prompt) that uses a chat template.")


def batch_cache_len(prompt_tokens: int, new_tokens: int) -> int:
    """The static KV cache a batch file decodes with under --cuda_graphs: its longest prompt plus the new tokens,
    rounded up to 256 (so files of similar lengths reuse one compiled step)."""
    return -(-(prompt_tokens + new_tokens) // 256) * 256


GEN_KEYS = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty")


def batch_settings(source: str, template: str, merged: bool, gen: dict, system: str = "") -> dict:
    """What made an answer: the adapter (or model), template, merge and generation settings. Written into every
    answer line; a rerun with other settings must not append to the same file."""
    out = {"model": str(Path(source).resolve()) if Path(source).exists() else source, "template": template,
           "merged_adapter": bool(merged), **{k: gen[k] for k in GEN_KEYS if k in gen}}
    if system:
        out["system"] = system
    return out


def check_output_path(output_file: str):
    """--output_file must be a file in a folder that exists (checked before the model loads)."""
    dst = Path(output_file)
    if dst.is_dir():
        raise UserError(f"--output_file {output_file} is a folder; pass a file in it, e.g. {dst / 'answers.jsonl'}.")
    if not dst.parent.is_dir():
        raise UserError(f"--output_file {output_file}: the folder {dst.parent} does not exist. Create it (mkdir -p "
                        f"{dst.parent}) or pass a path in an existing folder.")


def answered(input_file: str, output_file: str, rows=None, settings=None):
    """(rows already answered, the output's lines to keep, whether its last line was torn). Refuses an output
    file that is the input, that holds lines this script did not write, or answers to another input file's
    prompts (when `rows` are given): appending to it, or dropping its lines, would damage someone's file.
    Cheap, so infer.py calls it before the model loads."""
    dst = Path(output_file)
    if input_file and Path(input_file).resolve() == dst.resolve():
        raise UserError(f"--output_file is the --input_file ({output_file}): answers would be mixed into the "
                        "prompts. Pass another file, e.g. answers.jsonl.")
    if not dst.is_file():
        return set(), [], False
    fix = "nothing was changed. Pass a new --output_file (or move this one away)."
    try:
        text = dst.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"--output_file {output_file} is not a text file of answers: {fix}") from None
    lines = text.splitlines()
    done, kept, other, torn = set(), [], None, False
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            i = row[ROW]
        except (json.JSONDecodeError, KeyError, TypeError, IndexError):
            # Answers are written whole, _row first, newline included: only a kill mid-write leaves a last line
            # that starts like one of ours and has no newline. Anything else is someone's data.
            if n == len(lines) and not text.endswith("\n") and line.startswith('{"' + ROW + '": '):
                torn = True
                break
            raise UserError(f"--output_file {output_file} line {n} is not an answer written by infer.py (no "
                            f"{ROW!r}), so the file is not one to resume: {fix}") from None
        if rows is not None and not (isinstance(i, int) and 0 <= i < len(rows)
                                     and rows[i].get("instruction") == row.get("instruction")):
            raise UserError(f"--output_file {output_file} line {n} answers prompt {i!r}, which is not that prompt of "
                            f"--input_file {input_file}: the answers are another file's, so {fix}")
        if settings is not None and row.get("settings") != settings and other is None:
            other = (n, row.get("settings") or {})
        done.add(i)
        kept.append(line)
    if other:  # checked after every line is known to be ours: a foreign line is the first thing to say
        n, was = other
        diff = sorted(k for k in set(was) | set(settings) if was.get(k) != settings.get(k))
        raise UserError(f"--output_file {output_file} line {n} was answered with other settings ("
                        + ", ".join(f"{k}: {was.get(k)!r} there, {settings.get(k)!r} now" for k in diff[:4])
                        + f"); appending would mix them. {fix}")
    return done, kept, torn


def run_batch(g, input_file: str, output_file: str, batch_size: int = 8, compare_base: bool = False,
              rows=None):
    """Answers every row of a JSONL file in batches, appending each batch as soon as it is done.

    A rerun skips the rows already in output_file, so an interrupted batch loses nothing and repeats nothing.
    rows: the file's rows when the caller already read them with read_prompts.
    """
    from tqdm.auto import tqdm

    rows = read_prompts(input_file) if rows is None else rows
    dst = Path(output_file)
    done, kept, torn = answered(input_file, output_file, rows, g.settings)
    if torn:  # a half-written last line from a killed run: dropped, and its row answered again below
        tmp = dst.with_name(dst.name + ".tmp")  # rewrite atomically: a kill now must not lose the answers
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, dst)
    todo = [(i, r) for i, r in enumerate(rows) if i not in done]
    check_systems(g.template, input_file, rows)  # before any answer, naming the lines
    g.check_lengths([(i + 1, g.row_ids(r)) for i, r in todo])  # a prompt past the window fails before any answer
    if done:
        log.info("%s: %d rows already answered, %d to go", output_file, len(done), len(todo))
    width = min(batch_size, len(todo))
    if g.compiled and todo:  # one cache for the whole file, as long as its longest prompt needs (in 256s)
        need = max(len(g.row_ids(r)) for _, r in todo)
        g.gen["max_cache_len"] = batch_cache_len(need, g.gen.get("max_new_tokens", 128))
    with dst.open("a", encoding="utf-8") as f, tqdm(total=len(todo), desc="answering", unit="prompt") as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            # A compiled decode step is specialised to its batch size: the last, smaller batch is padded with
            # copies of its last row (answers dropped) rather than compiled again (~100 s for an 8B model).
            batch = [r for _, r in chunk] + [chunk[-1][1]] * (width - len(chunk) if g.compiled else 0)
            answers = g.answer_batch(batch)[:len(chunk)]
            base = g.answer_batch(batch, base=True)[:len(chunk)] if compare_base else None
            for k, ((i, r), a) in enumerate(zip(chunk, answers)):
                # _row first: a kill mid-write leaves a line that still shows it was ours (see answered())
                out = {ROW: i, **{key: v for key, v in r.items() if key != ROW}, "answer": a["answer"],
                       "stopped": a["stopped"], "settings": g.settings}
                if base:
                    out["base_answer"] = base[k]["answer"]
                f.write(json.dumps(out, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(chunk))
    return len(todo)
