"""The length policy: what --max_seq_length does to each row, decided once before training, and said.

What TRL 1.14.2's SFTTrainer does with a row (trl/trainer/sft_trainer.py, `_prepare_dataset`), and so what is
counted here: a `completion` or `text` that does not end in the tokenizer's eos_token gets it appended (chat rows
get none: the template closes each turn); the row is tokenized whole (`tokenizer(prompt + completion)`, BOS
included; chat rows: the rendered template, with add_special_tokens=False); its answer starts where the tokenized
prompt and the tokenized row stop agreeing (`common_prefix_length`; chat: the conversation up to the first
assistant turn, with the generation prompt); every row is cut to max_length keeping its start
(truncation_mode "keep_start"; packing's default "bfd" cuts the same way), and rows left without an answer token
are dropped only where the loss is masked. Unchecked, a long row is cut or dropped without a word, a cut row
under --train_on_inputs trains on a prompt with no answer and no EOS, and no rows left ends in
"ValueError: num_samples=0".

Policy: a row whose prompt alone reaches max_seq_length is dropped (no answer token would remain); a row whose
answer is cut but keeps tokens is kept and counted; nothing left is a UserError.
"""

import logging

from .errors import UserError

log = logging.getLogger("sftkit")
BATCH = 1000  # rows a tokenizer call: the fast tokenizer's batch encoding, and bounded memory


def fit_lengths(rows, tokenizer, max_seq_length: int, train_on_inputs: bool):
    """(the rows the trainer can learn from, report). `rows` is a datasets.Dataset in one of data.py's layouts
    (prompt/completion, text, or messages with the chat template on the tokenizer), with or without EOS yet.
    The report, for the log and run.json: rows_checked, rows_dropped_too_long, answers_truncated,
    longest_tokens (the longest kept row as the trainer sees it, at most max_seq_length: what fast mode sizes
    micro-batches for) and longest_row_tokens (before any cut: the --max_seq_length that keeps every row)."""
    keep, dropped, truncated, longest, longest_row = [], 0, 0, 0, 0
    for index, (length, answer_start) in enumerate(measure(rows, tokenizer, max_seq_length)):
        longest_row = max(longest_row, length)
        if length > max_seq_length and answer_start >= max_seq_length:
            dropped += 1
            continue
        truncated += length > max_seq_length
        longest = max(longest, min(length, max_seq_length))
        keep.append(index)
    report = {"max_seq_length": max_seq_length, "rows_checked": len(rows), "rows_dropped_too_long": dropped,
              "answers_truncated": truncated, "longest_tokens": longest, "longest_row_tokens": longest_row}
    if not keep:
        raise UserError(f"no row fits --max_seq_length {max_seq_length}: in all {len(rows)} rows the prompt alone "
                        f"fills it, so no answer token would be trained (the longest row has {longest_row:,} "
                        f"tokens). Raise --max_seq_length ({longest_row} keeps every row whole) or shorten the prompts "
                        "(a shorter template or input).")
    if dropped or truncated:  # said once, with what to change; quiet when every row fits
        said = [f"{dropped:,} of {len(rows):,} rows dropped (the prompt alone fills --max_seq_length "
                f"{max_seq_length}: no answer token would be left)"] if dropped else []
        if truncated:
            said.append(f"{truncated:,} answer{'s' * (truncated > 1)} cut at {max_seq_length} tokens (trained on "
                        f"{'the prompt and ' if train_on_inputs else ''}what fits, without their end or EOS)")
        log.info("length: %s; the longest row has %d tokens: --max_seq_length %d keeps every row whole",
                 "; ".join(said), longest_row, longest_row)
    return (rows.select(keep) if dropped else rows), report


def measure(rows, tokenizer, cap: int | None = None):
    """(tokens in the row as the trainer tokenizes it, index of its first answer token) for each row, in order.
    The answer's start is worked out only for rows longer than `cap` (None: every row), where it decides."""
    cols = set(rows.column_names)
    if "messages" in cols:
        layout = chat_rows
    elif {"prompt", "completion"} <= cols:
        layout = completion_rows
    elif "text" in cols:
        layout = text_rows
    else:
        raise ValueError(f"no prompt/completion, text or messages column in {sorted(cols)}")
    for start in range(0, len(rows), BATCH):
        yield from layout(rows[start:start + BATCH], tokenizer, cap)


def with_eos(text: str, eos: str) -> str:
    return text if not eos or text.endswith(eos) else text + eos  # as TRL's add_eos does


def completion_rows(batch, tokenizer, cap):
    eos = tokenizer.eos_token
    full = [p + with_eos(c, eos) for p, c in zip(batch["prompt"], batch["completion"])]
    ids = tokenizer(full, return_attention_mask=False, verbose=False)["input_ids"]
    long = [i for i, row in enumerate(ids) if cap is None or len(row) > cap]
    prompts = tokenizer([batch["prompt"][i] for i in long], return_attention_mask=False, verbose=False)["input_ids"] \
        if long else []
    starts = dict(zip(long, (common_prefix(p, ids[i]) for i, p in zip(long, prompts))))
    return [(len(row), starts.get(i, 0)) for i, row in enumerate(ids)]


def text_rows(batch, tokenizer, cap):
    """Raw text is all answer: a cut text is truncated, never dropped."""
    ids = tokenizer([with_eos(t, tokenizer.eos_token) for t in batch["text"]], return_attention_mask=False,
                    verbose=False)["input_ids"]
    return [(len(row), 0) for row in ids]


def chat_rows(batch, tokenizer, cap):
    conversations = batch["messages"]
    rendered = tokenizer.apply_chat_template(conversations, tokenize=False)
    ids = tokenizer(rendered, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    out = []
    for turns, row in zip(conversations, ids):
        start = 0
        if cap is None or len(row) > cap:
            first = next((n for n, turn in enumerate(turns) if turn["role"] == "assistant"), None)
            if first is None:
                start = len(row)  # no answer at all
            elif first > 0:  # (an assistant turn first: nothing to render before it; only its header precedes)
                prompt = tokenizer.apply_chat_template(turns[:first], tokenize=False, add_generation_prompt=True)
                start = common_prefix(tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"], row)
        out.append((len(row), start))
    return out


def common_prefix(ids: list, other: list) -> int:
    """Leading tokens the two agree on; compared as whole slices first (C speed), token by token only if not."""
    n = min(len(ids), len(other))
    if ids[:n] == other[:n]:
        return n
    return next(i for i in range(n) if ids[i] != other[i])
