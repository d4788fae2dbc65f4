"""A local data file's bytes and layout, checked before datasets reads it: the encoding (UTF-8, with the place of
a bad byte), JSON Lines vs one JSON document, names given twice, a .json of columns, a .csv split by tabs. Each
problem is refused with its place and its fix. `python -m sftkit.datafile FILE.json|FILE.csv > FILE.jsonl` turns a
.json of columns, or a .csv split by tabs or semicolons, into rows. read_text decodes the other input files
(--sample_prompts, infer.py's --input_file), so a wrong encoding is refused with one message everywhere.
"""

import codecs
import csv
import hashlib
import json
import logging
import os
import sys
from pathlib import Path

from .errors import UserError

log = logging.getLogger("sftkit")
UTF16 = (b"\xff\xfe", b"\xfe\xff")  # Windows Notepad's "Unicode"
SEPARATORS = {"\t": "tab", ";": "semicolon", "|": "pipe"}  # what spreadsheets write into a ".csv" besides commas


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
        not_utf16(path, f.read(2))
    if suffix == ".csv":
        all(utf8_blocks(path))  # decodes every block (each is a truthy tuple)
        if sep := separator(path):  # read at commas it fails to parse, or is misread into other columns silently
            raise UserError(f"{path} looks {SEPARATORS[sep]}-separated: its first line holds more {SEPARATORS[sep]}s "
                            f"than commas. {csv_fix(path)}")
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


def read_text(path, what: str = "") -> str:
    """A whole input file's text: UTF-8, a leading BOM dropped (Windows editors write one). Other encodings are
    refused as a data file's are: the first bad byte's place and the iconv command. `what` (e.g. "--input_file ")
    starts the message, naming the option as well as the file."""
    path = Path(path)
    raw = path.read_bytes()
    not_utf16(path, raw[:2], what)
    skip = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0  # utf-8-sig's errors count from after it
    try:
        return raw[skip:].decode("utf-8")
    except UnicodeDecodeError as err:
        at = skip + err.start
        raise bad_bytes(path, at, raw.count(b"\n", 0, at) + 1, raw[at:], what) from None


def numbered_lines(path, what: str = "") -> list:
    """(line number, text) of an input file's non-blank lines, decoded by read_text."""
    return [(n, line) for n, line in enumerate(read_text(path, what).splitlines(), 1) if line.strip()]


def not_utf16(path: Path, head: bytes, what: str = ""):
    if head[:2] in UTF16:
        raise UserError(f"{what}{path} is UTF-16 text; it must be UTF-8. Re-save it as UTF-8 (an editor's 'Save as "
                        f"UTF-8', or `iconv -f utf-16 -t utf-8 {path} > {utf8_name(path)}`).")


def bad_bytes(path: Path, offset: int, line: int, data: bytes, what: str = "") -> UserError:
    """Non-UTF-8 bytes: where, and how to convert (Korean files from Windows are usually cp949)."""
    try:  # a guess at the encoding, for the command: Korean text decodes as cp949 from its first byte on
        guess = data[:64].decode("cp949") and "cp949"
    except UnicodeDecodeError as err:
        guess = "cp949" if err.start > 0 or "incomplete" in err.reason else "cp1252"
    return UserError(f"{what}{path} is not UTF-8 text: byte {offset} (line {line}) is {data[:4].hex(' ')}. Re-save "
                     f"it as UTF-8, e.g. `iconv -f {guess} -t utf-8 {path} > {utf8_name(path)}` (cp949 is the usual "
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


def separator(path: Path) -> str | None:
    """The delimiter (a key of SEPARATORS) a .csv's first line, its header, holds more of than commas, or None: a
    comma-separated header holds a comma between each two names, and names rarely hold a tab or a semicolon."""
    with path.open("rb") as f:
        first = f.readline(1 << 16).decode("utf-8-sig", errors="replace")
    counts = {sep: first.count(sep) for sep in SEPARATORS if first.count(sep) > first.count(",")}
    return max(counts, key=counts.get) if counts else None


def csv_fix(path: Path) -> str:
    return (f"A .csv must be comma-separated: save it from your spreadsheet as 'CSV (comma delimited)', or convert "
            f"it: `python -m sftkit.datafile {path} > {path.with_suffix('.jsonl')}`, then train on that.")


def loadable(path: Path) -> Path:
    """The file for datasets to read: path, or for a .json document starting with a UTF-8 BOM a copy without it.
    datasets 4.8.5 turns a .json list into rows only when its first byte is "[" (else: "Expected object or value"),
    and its encoding="utf-8-sig" would send the list through pandas, which turns text such as "007" into numbers.
    The user's file is left alone. One copy a file, in datasets' cache, made again only when the file changed: an
    unchanged file reuses it, and datasets' Arrow cache of it."""
    with path.open("rb") as f:
        if f.read(3) != codecs.BOM_UTF8 or path.suffix.lower() != ".json" or json_lines(path):
            return path  # JSON Lines with a BOM (check_file let no other .jsonl through): pyarrow's reader skips it
    from datasets import config

    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    copy = Path(config.HF_DATASETS_CACHE) / "sftkit-without-bom" / f"{key}-{path.name}"
    was, now = (copy.stat() if copy.is_file() else None), path.stat()
    # The copy carries its source's mtime: any other (cp -p or unzip of an older, corrected file too) copies again.
    if not was or was.st_size != now.st_size - 3 or was.st_mtime_ns != now.st_mtime_ns:
        copy.parent.mkdir(parents=True, exist_ok=True)
        tmp = copy.with_name(f"{copy.name}.{os.getpid()}.tmp")  # renamed once whole: a kill leaves no half copy
        with path.open("rb") as src, tmp.open("wb") as dst:
            src.seek(len(codecs.BOM_UTF8))
            while chunk := src.read(1 << 24):
                dst.write(chunk)
        os.utime(tmp, ns=(now.st_atime_ns, now.st_mtime_ns))
        os.replace(tmp, copy)
    log.info("%s starts with a UTF-8 BOM, which datasets cannot read in a .json list: reading a copy without it, %s "
             "(the file itself is unchanged)", path, copy)
    return copy


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
    doc = parse_json(read_text(path), str(path))
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


def csv_rows(path: Path):
    """The rows of a .csv split at its own delimiter (commas, or what separator() finds), each cell as text."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=separator(path) or ",")
        duplicates(header := next(reader, []), path)
        for row in (r for r in reader if any(cell.strip() for cell in r)):
            if len(row) > len(header):
                raise UserError(f"{path} line {reader.line_num} has {len(row)} cells, but its header {header} names "
                                f"{len(header)}. Put text that holds the delimiter in double quotes, or fix the line.")
            yield dict(zip(header, row + [""] * (len(header) - len(row))))


def convert_main(argv: list[str]) -> int:
    usage = ("usage: python -m sftkit.datafile FILE.json > FILE.jsonl  (a .json of columns, written as rows)\n"
             "       python -m sftkit.datafile FILE.csv > FILE.jsonl   (a .csv split by commas, tabs or semicolons)")
    if argv in (["-h"], ["--help"]):
        print(usage)
        return 0
    if len(argv) != 1 or argv[0].startswith("-"):
        print(f"{'unknown ' + repr(' '.join(argv)) + chr(10) if argv else ''}{usage}", file=sys.stderr)
        return 2
    path = Path(argv[0])
    if not path.is_file():
        what = ("is a folder: name one .json or .csv file in it" if path.is_dir() else
                "does not exist (a path is relative to the current folder)")
        print(f"error: {argv[0]!r} {what}.", file=sys.stderr)
        return 1
    try:
        rows = csv_rows(path) if path.suffix.lower() == ".csv" else to_rows(json.loads(read_text(path)))
        for row in rows:
            sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(convert_main(sys.argv[1:]))
