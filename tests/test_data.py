import pytest
from datasets import Dataset

from conftest import SAMPLE, prepared, write_jsonl
from sftkit import data, prompts
from sftkit.errors import UserError

EOS = "<|end_of_text|>"
KO = prompts.load("alpaca_ko")


def test_sample_loads_as_alpaca_and_every_completion_ends_in_eos():
    ds = data.load_dataset_any(SAMPLE)
    assert len(ds) >= 200 and {"instruction", "input", "output"} <= set(ds.column_names)
    rows, info = prepared(ds, KO, EOS)
    assert info["format"] == "alpaca" and info["rows_used"] == len(ds)
    assert all(c.endswith(EOS) and not c.endswith(EOS + EOS) for c in rows["completion"])
    assert rows[0]["prompt"].endswith("### 응답:\n")


def test_column_mapping_trains_on_question_answer(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}])
    ds = data.load_dataset_any(path)
    with pytest.raises(UserError) as err:
        prepared(ds, KO, EOS)
    assert "question" in str(err.value) and "--columns" in str(err.value)  # lists the columns and the fix
    rows, info = prepared(ds, KO, EOS, columns="instruction=question,output=answer")
    assert rows["completion"] == ["a1" + EOS, "a2" + EOS] and "q1" in rows[0]["prompt"]
    rows, _ = prepared(ds, KO, EOS, columns={"instruction": "question", "output": "answer"})  # Fire gives a dict
    assert len(rows) == 2


def test_missing_mapped_column_and_bad_mapping_syntax(tmp_path):
    ds = Dataset.from_list([{"instruction": "a", "output": "b"}])
    with pytest.raises(UserError, match="lacks.*columns are"):
        prepared(ds, KO, EOS, columns="output=reply")
    with pytest.raises(UserError, match="FIELD=COLUMN"):
        data.parse_columns("instruction")


def test_empty_answers_are_dropped_and_counted_and_all_empty_is_an_error():
    ds = Dataset.from_list([{"instruction": "a", "input": "", "output": "b"},
                            {"instruction": "c", "input": "", "output": "  "},
                            {"instruction": "e", "input": "", "output": None}])
    rows, info = prepared(ds, KO, EOS)
    assert (info["rows_used"], info["rows_dropped"]) == (1, 2)
    empty = Dataset.from_list([{"instruction": "a", "input": "", "output": ""}])
    with pytest.raises(UserError, match="no usable rows"):
        prepared(empty, KO, EOS)


def test_template_field_the_data_lacks(tmp_path):
    t = prompts.from_text("ctx", '{"prompt_input": "{instruction}{context}", "prompt_no_input": "{instruction}{context}"}',
                          chat=False)
    ds = Dataset.from_list([{"instruction": "a", "output": "b"}])
    with pytest.raises(UserError, match=r"\['context'\].*--columns"):
        prepared(ds, t, EOS)


def test_columns_mapping_that_would_lose_a_column_is_refused():
    """--columns: a field nothing reads, or one column onto two fields (a rename moves it once, so the other
    field would silently be empty), is named; a custom template's own field is accepted."""
    ds = Dataset.from_list([{"question": "q", "answer": "a", "ctx": "c"}])
    with pytest.raises(UserError, match=r"names \['foo'\], which no format or template reads"):
        data.read_rows(ds, KO, columns="instruction=question,output=answer,foo=question")
    with pytest.raises(UserError, match=r"\['question'\] onto several fields \(instruction, input\)"):
        data.read_rows(ds, KO, columns="instruction=question,input=question,output=answer")
    t = prompts.from_text("ctx", '{"prompt_input": "{instruction}{input}{context}", '
                          '"prompt_no_input": "{instruction}{context}"}', chat=False)
    rows, info = data.read_rows(ds, t, columns="instruction=question,output=answer,context=ctx")
    assert info["rows_used"] == 1 and "c" in rows[0]["prompt"]


def test_unknown_paths_and_unreadable_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        data.load_dataset_any("./missing.jsonl")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(UserError, match="expected a .jsonl"):
        data.load_dataset_any(str(tmp_path))


def test_formats_are_detected_from_columns(tmp_path):
    assert data.detect_format(["messages"]) == "chat"
    assert data.detect_format(["conversations", "id"]) == "chat"
    assert data.detect_format(["instruction", "input", "output"]) == "alpaca"
    assert data.detect_format(["text"]) == "text"
    with pytest.raises(UserError, match="cannot tell"):
        data.detect_format(["foo", "bar"])


def test_csv_and_parquet_load(tmp_path):
    ds = Dataset.from_list([{"instruction": "a", "input": "", "output": "b"}])
    ds.to_csv(str(tmp_path / "d.csv"))
    ds.to_parquet(str(tmp_path / "d.parquet"))
    assert data.load_dataset_any(str(tmp_path / "d.csv"))[0]["output"] == "b"
    assert data.load_dataset_any(str(tmp_path / "d.parquet"))[0]["output"] == "b"


def test_eval_split_by_fraction_and_count():
    ds = Dataset.from_list([{"x": i} for i in range(20)])
    tr, ev = data.finalize(ds, "</s>", 0.1, 0)
    assert (len(tr), len(ev)) == (18, 2)
    tr, ev = data.finalize(ds, "</s>", 5, 0)
    assert (len(tr), len(ev)) == (15, 5)
    with pytest.raises(UserError, match="no training rows"):
        data.eval_count(len(ds), 20)


def test_empty_files_say_they_have_no_rows(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    (tmp_path / "header.csv").write_text("instruction,output\n")
    (tmp_path / "list.json").write_text("[]")
    for name in ("empty.jsonl", "blank.jsonl", "header.csv", "list.json"):
        with pytest.raises(UserError, match=r"has no rows\. Add training rows") as err:
            data.load_dataset_any(str(tmp_path / name))
        assert name in str(err.value)
    folder = tmp_path / "parts"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"instruction": "a", "output": "b"}])
    (folder / "b.jsonl").write_text("")
    with pytest.raises(UserError, match=r"\['b.jsonl'\] are empty.*remove empty files"):
        data.load_dataset_any(str(folder))


def test_non_text_in_the_text_column_names_column_and_row():
    ds = Dataset.from_list([{"text": None}, {"text": 7}])  # None is empty (dropped); 7 is the wrong column
    with pytest.raises(UserError, match=r"column 'text' must hold text; 1 row holds something else: row 2 \(a number\)"):
        prepared(ds, prompts.load("none"), EOS, data_format="text")
    with pytest.raises(UserError, match=r"column 'id' must hold text.*row 1 \(a number\)"):  # the user's column
        prepared(Dataset.from_list([{"id": 3}]), prompts.load("none"), EOS, columns="text=id")
