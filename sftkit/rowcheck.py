"""Data checked before training: a wrong value is refused with its place and its fix, never trained on as str().

`check_text_fields` checks every row's text fields once it is loaded (types, chat roles); datafile.py checks a
local file's bytes and layout before datasets reads it.
"""

from .datafile import kind
from .errors import UserError

# The speakers data sets use, by the role the chat templates know them as.
ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "bot": "assistant",
         "model": "assistant", "chatbot": "assistant", "system": "system"}
ROLE_LIST = "user (or human), assistant (or gpt, bot, model, chatbot), system"
SHOWN = 5  # rows named in an error; the rest are counted


def role_of(speaker) -> str | None:
    """The template role for a data set's speaker name ("GPT" -> "assistant"), None when it is none we know."""
    return ROLES.get(speaker.strip().lower()) if isinstance(speaker, str) else None


def blank(value) -> bool:
    """Empty means None, "" or whitespace only; the answer "0" is an answer."""
    return value is None or (isinstance(value, str) and not value.strip())


# --- the rows ----------------------------------------------------------------------------------------------------

def check_text_fields(ds, fields: list[str], fmt: str, mapping: dict | None = None):
    """Every row's text fields hold text: a str, or None/missing (empty: dropped and counted later). A chat column
    holds lists of turns whose speaker is one of ROLES and whose content is text. `mapping` ({field: column}, from
    --columns) names the user's own column in the error. Row numbers are 1-based, in the data set's order."""
    mapping = mapping or {}
    for field in [f for f in fields if f in ds.column_names]:
        name = mapping.get(field, field)
        if fmt == "chat":
            rows = turn_rows(ds, field)
            if rows:
                said = "; ".join(f"row {i + 1}: {turn_problem(ds[i][field])}" for i in rows[:SHOWN])
                raise UserError(f"column {name!r}: {count(rows)} cannot be trained on ({said}{more(rows)}). "
                                'Each turn needs a role and text, as {"role": "user", "content": "..."} or '
                                f'{{"from": "human", "value": "..."}}; the roles known are {ROLE_LIST}. Fix or remove '
                                "those rows.")
            continue
        rows = positions(arrow_column(ds, field), not_text)
        if rows:
            said = ", ".join(f"row {i + 1} ({kind(ds[i][field])})" for i in rows[:SHOWN])
            raise UserError(f"column {name!r} must hold text; {count(rows, 'holds', 'hold')} something else: "
                            f"{said}{more(rows)}. Write each as one string (a number in quotes, e.g. \"0\"; a list "
                            f"joined into one text), or map a text column onto it with --columns '{field}=COLUMN'.")


def count(rows: list, one: str = "", many: str = "") -> str:
    return f"1 row {one}".strip() if len(rows) == 1 else f"{len(rows):,} rows {many}".strip()


def more(rows: list) -> str:
    return f" and {len(rows) - SHOWN} more" if len(rows) > SHOWN else ""


def arrow_column(ds, field: str):
    """The column as Arrow sees it, with the data set's row selection (select, filter) applied."""
    return ds.select_columns([field]).with_format("arrow")[:].column(0)


def positions(column, mask_of) -> list[int]:
    """Rows (0-based) where mask_of(chunk) is true, over the chunks of an Arrow ChunkedArray."""
    import pyarrow.compute as pc

    found, base = [], 0
    for chunk in column.chunks:
        found += [base + i for i in pc.indices_nonzero(mask_of(chunk)).to_pylist()]
        base += len(chunk)
    return found


def not_text(array):
    """True where a value is neither text nor null. Arrow types whole columns; a column that mixes types is read
    as JSON text (datasets' Json feature), told apart here by its first character without decoding it."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind_of = array.type
    if getattr(kind_of, "extension_name", None) == "arrow.json":
        first = pc.utf8_slice_codeunits(array.storage, 0, 1)
        return pc.fill_null(pc.invert(pc.is_in(first, pa.array(['"', "n"]))), False)
    valid = array.is_valid()
    text = pa.types.is_string(kind_of) or pa.types.is_large_string(kind_of) or pa.types.is_null(kind_of)
    return pc.and_kleene(valid, pa.scalar(False)) if text else valid


def turn_rows(ds, field: str) -> list[int]:
    """Rows whose turns turn_problem refuses. A row scan: turns are objects, and roles need their values read
    (about 1.3 s for 200k two-turn rows; rendering them for training takes far longer)."""
    found = []
    for start in range(0, len(ds), 1000):
        found += [start + i for i, turns in enumerate(ds[start:start + 1000][field]) if turn_problem(turns)]
    return found


def turn_problem(turns) -> str | None:
    """What is wrong with one row's turns, in words; None when they can be trained on (None/[]: empty, dropped)."""
    if turns is None:
        return None
    if not isinstance(turns, list):
        return f"it holds {kind(turns)}, not a list of turns"
    for n, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            return f"turn {n} is {kind(turn)}, not an object with role and content"
        key = "content" if turn.get("role") is not None else "value"
        speaker = turn.get("role") if key == "content" else turn.get("from")
        if speaker is None:
            return f"turn {n} has neither a role nor a from key"
        if role_of(speaker) is None:
            return f"turn {n} has the unknown role {speaker!r}"
        if turn.get(key) is not None and not isinstance(turn[key], str):
            return f"turn {n}'s {key} is {kind(turn[key])}, not text"
    return None


if __name__ == "__main__":  # the converter's old name, which earlier error messages gave: it moved to datafile.py
    import sys

    from .datafile import convert_main

    sys.exit(convert_main(sys.argv[1:]))
