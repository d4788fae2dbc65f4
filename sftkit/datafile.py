"""A local data file's bytes and layout, checked before datasets reads it: the encoding (UTF-8, with the place of
a bad byte), JSON Lines vs one JSON document, names given twice, a .json of columns. Each problem is refused with
its place and its fix. `python -m sftkit.datafile FILE.json > FILE.jsonl` turns a .json of columns into rows.
"""

import csv
import json
import sys
from pathlib import Path

from .errors import UserError


def check_files(paths) -> dict:
    """check_file for each file of a data set (all of one kind); their load_dataset keyword arguments, merged."""
    found = [check_file(Path(p)) for p in paths]
    return {**found[0], "converters": {k: v for f in found for k, v in f["converters"].items()}} if found[0] else {}


def check_file(path: Path) -> dict:
    """Refuses what datasets would misread or fail on with a traceback; returns extra load_dataset keyword
    arguments (CSV cells are read as the text they are: pandas would turn "007" into 7 and "NA" into nothing)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        duplicates(pq.read_schema(path).names, path)
        return {}
    with path.open("rb") as f:
        if f.read(2) in (b"\xff\xfe", b"\xfe\xff"):  # Windows Notepad's "Unicode"
            raise UserError(f"{path} is UTF-16 text; it must be UTF-8. Re-save it as UTF-8 (an editor's 'Save as "
                            f"UTF-8', or `iconv -f utf-16 -t utf-8 {path} > {utf8_name(path)}`).")
    if suffix == ".csv":
        all(utf8_blocks(path))  # decodes every block (each is a truthy tuple)
        with path.open(encoding="utf-8-sig", newline="") as f:
            header = next(csv.reader(f), [])
        duplicates(header, path)
        return {"converters": {name: str for name in header}, "keep_default_na": False}
    if suffix == ".jsonl" or json_lines(path):
        check_json_lines(path)
    else:
        check_json_document(path)
    return {}


def utf8_blocks(path: Path, size: int = 1 << 22):
    """(number of its first line, text) for each block of whole lines, decoded as UTF-8 (a block ends at a newline,
    which is never inside a UTF-8 sequence); bytes that are not UTF-8 are refused with their place."""
    offset, line, rest = 0, 1, b""
    with path.open("rb") as f:
        while True:
            data = f.read(size)
            block = rest + data
            if not block:
                return
            cut = block.rfind(b"\n") + 1 if data else len(block)
            whole, rest = block[:cut], block[cut:]
            if not whole:  # a line longer than the block: read on
                continue
            try:
                text = whole.decode("utf-8")
            except UnicodeDecodeError as err:
                raise bad_bytes(path, offset + err.start, line + whole.count(b"\n", 0, err.start),
                                whole[err.start:]) from None
            yield line, text
            offset, line = offset + len(whole), line + text.count("\n")


def bad_bytes(path: Path, offset: int, line: int, data: bytes) -> UserError:
    """Non-UTF-8 bytes: where, and how to convert (Korean files from Windows are usually cp949)."""
    try:  # a guess at the encoding, for the command: Korean text decodes as cp949 from its first byte on
        guess = data[:64].decode("cp949") and "cp949"
    except UnicodeDecodeError as err:
        guess = "cp949" if err.start > 0 or "incomplete" in err.reason else "cp1252"
    return UserError(f"{path} is not UTF-8 text: byte {offset} (line {line}) is {data[:4].hex(' ')}. Re-save it as "
                     f"UTF-8, e.g. `iconv -f {guess} -t utf-8 {path} > {utf8_name(path)}` (cp949 is the usual "
                     "encoding of Korean Windows files, cp1252 of Western ones).")


def utf8_name(path: Path) -> Path:
    return path.with_name(f"utf8-{path.name}")


def json_lines(path: Path) -> bool:
    """A .json file that is really JSON Lines: a first line that is a whole object, and more after it."""
    with path.open("rb") as f:
        first, rest = f.readline(), f.read(1 << 16).strip()
    try:
        return bool(rest) and isinstance(json.loads(first.decode("utf-8-sig")), dict)
    except ValueError:  # UnicodeDecodeError too
        return False


class Repeated(ValueError):  # a key given twice in one JSON object
    pass


def unique_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise Repeated(sorted({k for k in keys if keys.count(k) > 1}))
    return dict(pairs)


DECODER = json.JSONDecoder(object_pairs_hook=unique_keys)  # made once: json.loads(hook=) builds one a call
ROWS_HINT = ('Write one JSON object per row, e.g. {"instruction": "...", "output": "..."}: one a line in a .jsonl '
             "file, or a list of them in a .json file.")


def duplicates(names, path: Path):
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"{path}: the columns {twice} appear more than once (datasets would rename the copies "
                        "silently). Give each column its own name, or remove the copy.")


def parse_json(text: str, where: str):
    """JSON that refuses a key given twice in one object: JSON keeps the last (data lost), pyarrow fails on it."""
    try:
        return DECODER.decode(text)
    except Repeated as err:
        raise UserError(f"{where}: the keys {err.args[0]} appear twice in one object. Keep one of each (JSON "
                        "keeps only the last, so the other value would be lost).") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{where} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno} of it). "
                        f"{ROWS_HINT}") from None


def check_json_lines(path: Path):
    """UTF-8, one object a line, no key twice, no column both text and not; streamed (files can be hundreds of MB).
    datasets reads JSON Lines 10 MB at a time, and a column whose values stop being text after the first block is
    misread without a word: datasets 4.8.5 stores that whole block's text as JSON, quotes and escapes included."""
    seen = {}  # (column, key in the objects of its list, or None) -> {value type: first line}: cheap a row
    for first, text in utf8_blocks(path):
        for number, line in enumerate(text.split("\n"), first):
            if not line.strip():
                continue
            if not isinstance(row := parse_json(line.lstrip("\ufeff"), f"{path} line {number}"), dict):
                raise UserError(f"{path} line {number} holds {kind(row)}, not an object. {ROWS_HINT}")
            for column, value in row.items():
                seen.setdefault((column, None), {}).setdefault(type(value), number)
                for turn in value if type(value) is list else ():
                    for key, inner in turn.items() if type(turn) is dict else ():
                        seen.setdefault((column, key), {}).setdefault(type(inner), number)
    for (column, key), kinds in seen.items():
        other = sorted((n, t) for t, n in kinds.items() if t not in (str, type(None)))
        if str in kinds and other:
            where = f"column {column!r}" + (f" (its turns' {key!r})" if key else "")
            raise UserError(f"{path}: {where} holds text in some rows and {kind(other[0][1]())} in others (first on "
                            f"line {other[0][0]}); datasets misreads such a column. Make every value text (a number "
                            'in quotes, e.g. "0"; a list joined into one string), or remove the column.')


def check_json_document(path: Path):
    """A .json document is a list of row objects (or one object: one row). A dict of columns is refused with the
    command that converts it, not converted here: that would be a second reading path beside datasets', holding
    the whole file in memory, and the file the run records (and --resume compares) would not be what it read."""
    raw = path.read_bytes()
    try:
        doc = parse_json(raw.decode("utf-8-sig"), str(path))
    except UnicodeDecodeError as err:
        raise bad_bytes(path, err.start, raw.count(b"\n", 0, err.start) + 1, raw[err.start:]) from None
    if isinstance(doc, list):
        bad = next((i for i, row in enumerate(doc) if not isinstance(row, dict)), None)
        if bad is not None:
            raise UserError(f"{path}: item {bad + 1} of its list is {kind(doc[bad])}, not an object. {ROWS_HINT}")
    elif not isinstance(doc, dict):
        raise UserError(f"{path} holds {kind(doc)}, not rows. {ROWS_HINT}")
    elif (cols := columns_of(doc)) is not None:
        raise UserError(f"{path} holds columns ({', '.join(map(str, doc))}: {len(cols[0])} values each), not rows; "
                        f"datasets would read it as one row of lists. Convert it: `python -m sftkit.datafile {path} "
                        f"> {path.with_suffix('.jsonl')}`, then train on that.")


def columns_of(doc: dict):
    """The columns of a column-oriented object ({"a": [..], "b": [..]} or pandas' {"a": {"0": ..}}), as lists,
    or None. A chat row ({"messages": [{turn}, ..]}) is a row: its lists hold turn objects, not values."""
    values = list(doc.values())
    if values and all(isinstance(v, dict) and v and all(str(k).isdigit() for k in v) for v in values):
        if len({tuple(v) for v in values}) == 1:
            return [list(v.values()) for v in values]
    if not values or not all(isinstance(v, list) for v in values) or len({len(v) for v in values}) != 1:
        return None
    if not values[0] or any(isinstance(x, dict) for v in values for x in v[:1]):
        return None
    return values


def to_rows(doc):
    """The rows of a .json document: a list as it is, columns zipped into rows, one object as one row."""
    if isinstance(doc, list):
        return doc
    cols = columns_of(doc)
    return [dict(zip(doc, values)) for values in zip(*cols)] if cols is not None else [doc]


def kind(value) -> str:
    if isinstance(value, bool):
        return "a true/false value"
    return {str: "text", list: "a list", dict: "an object", type(None): "null"}.get(type(value), "a number")


def convert_main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m sftkit.datafile FILE.json > FILE.jsonl  (a .json of columns, written as rows)",
              file=sys.stderr)
        return 2
    doc = json.loads(Path(argv[0]).read_bytes().decode("utf-8-sig"))
    for row in to_rows(doc):
        sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(convert_main(sys.argv[1:]))
