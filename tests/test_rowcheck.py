"""Data checked before training (sftkit/datafile.py, sftkit/rowcheck.py): one class of problem a test, each refused
with its place and its fix, and the good files of the same shape let through."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Dataset, load_dataset

from conftest import ROOT, SAMPLE, write_jsonl
from sftkit import datafile, rowcheck
from sftkit.errors import UserError

ALPACA = ["instruction", "input", "output"]


def load(path: Path, checked=True):
    """As data.py does: check the file, then let datasets read it with the keyword arguments the check gave.
    Unchecked, datasets reads it as a Hub data set's files are read: check_text_fields is all that looks."""
    kwargs = datafile.check_file(path) if checked else {}
    kind = "csv" if path.suffix == ".csv" else "json"
    return load_dataset(kind, data_files=[str(path)], split="train", **kwargs)


def test_bytes_that_are_not_utf8_name_the_byte_the_line_and_the_iconv_fix(tmp_path):
    korean = '{"instruction": "안녕", "output": "네"}\n'
    for suffix in (".jsonl", ".csv", ".json"):
        good = tmp_path / f"good{suffix}"
        good.write_text(korean * 3 if suffix != ".csv" else "instruction,output\n안녕,네\n", encoding="utf-8")
        bad = tmp_path / f"bad{suffix}"
        bad.write_bytes(good.read_bytes() + korean.encode("cp949"))
        assert datafile.check_file(good) is not None
        with pytest.raises(UserError) as err:
            datafile.check_file(bad)
        msg = str(err.value)
        start = len(good.read_bytes()) + len('{"instruction": "')
        assert "not UTF-8" in msg and "iconv -f cp949 -t utf-8" in msg and bad.name in msg
        if suffix == ".jsonl":  # the 4th line, at the first Korean byte
            assert f"byte {start} (line 4)" in msg
    western = tmp_path / "w.jsonl"
    western.write_bytes('{"text": "café"}\n'.encode("cp1252"))
    with pytest.raises(UserError, match="iconv -f cp1252"):
        datafile.check_file(western)
    utf16 = tmp_path / "u.jsonl"
    utf16.write_bytes(korean.encode("utf-16"))
    with pytest.raises(UserError, match="UTF-16.*iconv -f utf-16"):
        datafile.check_file(utf16)


def test_a_multibyte_character_across_a_read_block_is_not_an_error(tmp_path):
    path = tmp_path / "long.csv"
    path.write_text("text\n" + "가" * 5000 + "\n", encoding="utf-8")  # 3 bytes a character
    lines = list(datafile.utf8_blocks(path, size=1000))  # blocks end at newlines, not inside a character
    assert "".join(text for _, text in lines) == path.read_text(encoding="utf-8")
    assert [n for n, _ in lines] == [1, 2]


def test_a_json_of_columns_is_refused_with_a_converter_that_works(tmp_path):
    cols = tmp_path / "cols.json"
    cols.write_text(json.dumps({"instruction": ["a", "b"], "output": ["0", "y"]}), encoding="utf-8")
    with pytest.raises(UserError) as err:
        datafile.check_file(cols)
    assert "holds columns" in str(err.value) and "python -m sftkit.datafile" in str(err.value)
    out = subprocess.run([sys.executable, "-m", "sftkit.datafile", str(cols)], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    rows = tmp_path / "cols.jsonl"
    rows.write_text(out, encoding="utf-8")
    assert load(rows)[:] == {"instruction": ["a", "b"], "output": ["0", "y"]}
    pandas = tmp_path / "pandas.json"  # DataFrame.to_json()'s default layout
    pandas.write_text(json.dumps({"instruction": {"0": "a", "1": "b"}, "output": {"0": "x", "1": "y"}}))
    with pytest.raises(UserError, match="holds columns"):
        datafile.check_file(pandas)


CHAT_ROW = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}


@pytest.mark.parametrize("doc", [[{"instruction": "a", "output": "b"}], {"instruction": "a", "output": "b"}, CHAT_ROW])
def test_json_documents_of_rows_pass(tmp_path, doc):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    assert datafile.check_file(path) == {}


def test_a_json_file_holding_json_lines_is_read_as_lines(tmp_path):
    path = write_jsonl(tmp_path / "rows.json", [{"text": "a"}, {"text": "b"}, {"text": "c", "text2": 1}])
    assert datafile.check_file(Path(path)) == {}
    Path(path).write_text('{"text": "a"}\n{"text": "b", "text": "c"}\n')
    with pytest.raises(UserError, match="line 2: the keys \\['text'\\] appear twice"):
        datafile.check_file(Path(path))


def test_names_given_twice_are_refused_in_csv_headers_and_json_objects(tmp_path):
    csv = tmp_path / "dup.csv"
    csv.write_text("instruction,output,output\na,b,c\n")
    with pytest.raises(UserError, match=r"columns \['output'\] appear more than once"):
        datafile.check_file(csv)
    nested = tmp_path / "nested.jsonl"  # datasets keeps the last of these without a word
    nested.write_text('{"messages": []}\n{"messages": [{"role": "user", "role": "assistant", "content": "x"}]}\n')
    with pytest.raises(UserError, match=r"line 2: the keys \['role'\]"):
        datafile.check_file(nested)
    doc = tmp_path / "doc.json"
    doc.write_text('[{"instruction": "a", "output": "x", "output": "y"}]')
    with pytest.raises(UserError, match=r"the keys \['output'\]"):
        datafile.check_file(doc)


def test_lines_that_are_not_one_object_name_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b",}\n')
    with pytest.raises(UserError, match="line 3 is not valid JSON"):
        datafile.check_file(path)
    path.write_text('{"text": "a"}\n["a", "b"]\n')
    with pytest.raises(UserError, match="line 2 holds a list, not an object"):
        datafile.check_file(path)


def test_a_column_that_is_text_in_some_lines_and_not_in_others_is_refused_by_line(tmp_path):
    """datasets reads JSON Lines 10 MB at a time; a column that stops being text past the first block comes back
    as strings with that block's text JSON-encoded (datasets 4.8.5). Refused before it is read, at any size."""
    rows = [{"instruction": "q", "output": "fine", "id": i} for i in range(5)]
    path = Path(write_jsonl(tmp_path / "late.jsonl", rows + [{"instruction": "q", "output": 0, "id": 5}]))
    with pytest.raises(UserError, match=r"column 'output' holds text in some rows and a number in others \(first "
                                        r"on line 6\).*\"0\""):
        datafile.check_file(path)
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    path = Path(write_jsonl(tmp_path / "chat.jsonl", [{"messages": turns}] * 3 + [
        {"messages": [turns[0], {"role": "assistant", "content": ["a", "b"]}]}]))
    with pytest.raises(UserError, match=r"column 'messages' \(its turns' 'content'\) holds text in some rows and a "
                                        r"list in others \(first on line 4\)"):
        datafile.check_file(path)
    ok = Path(write_jsonl(tmp_path / "ok.jsonl", [{"output": "a", "n": 1}, {"output": None, "n": 2.5}]))
    assert datafile.check_file(ok) == {}  # null is empty, not another type; numbers-only columns are not text


def test_csv_cells_are_read_as_written(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('\ufeffinstruction,output\n007,0\nb,NA\n"c, d",1.50\ne,\n', encoding="utf-8")
    ds = load(path)
    assert ds["instruction"] == ["007", "b", "c, d", "e"] and ds["output"] == ["0", "NA", "1.50", ""]
    rowcheck.check_text_fields(ds, ALPACA, "alpaca")  # all text: passes
    assert [rowcheck.blank(v) for v in ds["output"]] == [False, False, False, True]  # "0" is an answer


def test_values_that_are_not_text_are_refused_by_column_row_and_type(tmp_path):
    rows = [{"instruction": "q", "output": "fine"}] * 2 + [
        {"instruction": "q", "output": ["a", "x"]}, {"instruction": "q", "output": 0},
        {"instruction": "q", "output": {"k": "v"}}, {"instruction": "q", "output": True},
        {"instruction": "q", "output": None}, {"instruction": "q"}]
    ds = load(Path(write_jsonl(tmp_path / "mixed.jsonl", rows)), checked=False)  # check_file refuses it first
    with pytest.raises(UserError) as err:
        rowcheck.check_text_fields(ds, ALPACA, "alpaca", mapping={"output": "answer"})
    msg = str(err.value)
    assert "column 'answer'" in msg and "4 rows hold something else" in msg  # None and missing are empty, not wrong
    assert "row 3 (a list), row 4 (a number), row 5 (an object), row 6 (a true/false value)" in msg
    assert "--columns 'output=COLUMN'" in msg


@pytest.mark.parametrize("value, kind", [(0, "a number"), (1.5, "a number"), (["a"], "a list"), (True, "a true")])
def test_a_whole_column_of_another_type_is_refused_from_its_arrow_type(value, kind):
    ds = Dataset.from_list([{"text": value}] * 12)
    with pytest.raises(UserError, match=rf"12 rows hold something else: row 1 \({kind}.*row 5 .* and 7 more"):
        rowcheck.check_text_fields(ds, ["text"], "text")


def test_row_numbers_follow_the_selected_rows():
    ds = Dataset.from_list([{"text": "a"}, {"text": "b"}, {"text": "c"}]).select([2, 0])
    rowcheck.check_text_fields(ds, ["text", "absent"], "text")  # a field the data lacks is data.py's to name
    mixed = Dataset.from_list([{"text": "a"}, {"text": "b"}, {"text": "c"}])
    assert rowcheck.positions(rowcheck.arrow_column(mixed.select([1, 2]), "text"), rowcheck.not_text) == []


def test_chat_roles_accept_the_usual_aliases_in_both_forms(tmp_path):
    rows = [{"messages": [{"role": r, "content": "hi"}, {"role": a, "content": "0"}]}
            for r, a in [("user", "assistant"), ("human", "gpt"), ("Human", "bot"), ("system", "model"),
                         ("user", "chatbot")]]
    rows += [{"messages": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ok"}]}]
    ds = load(Path(write_jsonl(tmp_path / "chat.jsonl", rows)))
    rowcheck.check_text_fields(ds, ["messages", "conversations"], "chat")
    assert [rowcheck.role_of(r) for r in ("GPT", " bot ", "human", "narrator", None)] == \
        ["assistant", "assistant", "user", None, None]


def test_chat_turns_that_cannot_be_trained_on_are_named(tmp_path):
    good = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ok"}]}
    rows = [good, {"conversations": [{"from": "human", "value": "hi"}, {"from": "narrator", "value": "x"}]},
            good, {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": ["a", "b"]}]},
            {"conversations": [{"value": "no speaker"}]}]
    ds = load(Path(write_jsonl(tmp_path / "sharegpt.jsonl", rows)), checked=False)
    with pytest.raises(UserError) as err:
        rowcheck.check_text_fields(ds, ["conversations"], "chat")
    msg = str(err.value)
    assert "3 rows cannot be trained on" in msg and "row 2: turn 2 has the unknown role 'narrator'" in msg
    assert "row 4: turn 2's value is a list, not text" in msg
    assert "row 5: turn 1 has neither a role nor a from key" in msg
    assert "gpt, bot, model, chatbot" in msg and '{"from": "human", "value": "..."}' in msg
    for bad in ("just text", [["user", "hi"]]):  # not a list of turns; turns that are not objects
        ds = load(Path(write_jsonl(tmp_path / "odd.jsonl", [good, {"conversations": bad}])), checked=False)
        with pytest.raises(UserError, match="row 2: (it holds text, not a list|turn 1 is a list, not an obj)"):
            rowcheck.check_text_fields(ds, ["conversations"], "chat")


def test_the_sample_passes_every_check():
    ds = load(Path(SAMPLE))
    rowcheck.check_text_fields(ds, ALPACA, "alpaca")
    assert len(ds) > 200
