"""Input files as Windows tools and spreadsheets write them: another encoding, a UTF-8 BOM, an upper-case extension,
a ".csv" split by tabs or semicolons, a batch line with its own system prompt. Each is read, or refused with the
file, the place and the fix; the same problem gets the same message whichever option named the file."""

import json
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from conftest import SAMPLE, TINY, write_jsonl
from sftkit import batchfile, data, datafile, prompts, samples
from sftkit.batchfile import read_prompts, run_batch
from sftkit.errors import UserError

ROWS = [{"instruction": "안녕", "input": "", "output": "007"}, {"instruction": "잘 가", "input": "x", "output": "네"}]
BOM = b"\xef\xbb\xbf"


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """datasets' cache (and the BOM-free copies made in it) under the test's folder, not the user's."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def korean_lines(tmp_path, name, encoding):
    path = tmp_path / name
    path.write_bytes(('{"instruction": "a"}\n' + '{"instruction": "한국의 수도는?"}\n').encode(encoding))
    return path


def refusal(read, path) -> str:
    with pytest.raises(UserError) as err:
        read(path)
    return str(err.value)


def test_every_input_file_in_another_encoding_is_refused_with_its_place_and_the_iconv_fix(tmp_path):
    start = len('{"instruction": "a"}\n{"instruction": "')  # the first Korean byte, on line 2
    readers = {"--input_file ": lambda p: read_prompts(str(p)), "--sample_prompts ": samples.read_prompts_file,
               "": datafile.check_file}
    for option, read in readers.items():
        path = korean_lines(tmp_path, "cp949.jsonl", "cp949")
        msg = refusal(read, path)
        assert msg.startswith(f"{option}{path} is not UTF-8 text: byte {start} (line 2)"), msg
        assert f"iconv -f cp949 -t utf-8 {path} > {tmp_path / 'utf8-cp949.jsonl'}" in msg
        with_bom = tmp_path / "bom-cp949.jsonl"  # the BOM's 3 bytes are counted in the offset
        with_bom.write_bytes(BOM + path.read_bytes())
        assert f"byte {start + 3} (line 2)" in refusal(read, with_bom)
        utf16 = korean_lines(tmp_path, "utf16.jsonl", "utf-16")
        assert f"{option}{utf16} is UTF-16 text" in refusal(read, utf16) and "iconv -f utf-16" in refusal(read, utf16)
    text = tmp_path / "prompts.txt"  # a plain-text prompts file as well as JSONL
    text.write_bytes("첫 질문\n둘째 질문\n".encode("cp949"))
    assert "--sample_prompts" in refusal(samples.read_prompts_file, text) and "iconv -f cp949" in refusal(
        samples.read_prompts_file, text)


def test_a_json_list_saved_with_a_bom_loads_as_without_one_and_the_file_is_left_alone(tmp_path):
    for name, text in {"list.json": json.dumps(ROWS, ensure_ascii=False, indent=2),
                       "compact.json": json.dumps(ROWS, ensure_ascii=False),
                       "one.json": json.dumps(ROWS[0], ensure_ascii=False, indent=2)}.items():
        plain, bommed = tmp_path / "plain" / name, tmp_path / "bom" / name
        for path, head in ((plain, b""), (bommed, BOM)):
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(head + text.encode("utf-8"))
        before = bommed.read_bytes()
        got = data.load_dataset_any(str(bommed))
        assert got.to_list() == data.load_dataset_any(str(plain)).to_list(), name
        assert got[0]["output"] == "007"  # read as datasets reads a .json list: text stays text
        assert bommed.read_bytes() == before  # not rewritten
    assert len(data.load_dataset_any(str(tmp_path / "bom"))) == 5  # a folder of them too
    changed = tmp_path / "bom" / "list.json"  # an edited file is copied again, not read from the stale copy
    changed.write_bytes(BOM + json.dumps(ROWS[:1], ensure_ascii=False).encode("utf-8"))
    assert len(data.load_dataset_any(str(changed))) == 1


def test_batch_and_sample_prompt_files_with_a_bom_are_read(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_bytes(BOM + '{"instruction": "첫 질문"}\n{"instruction": "둘째"}\n'.encode("utf-8"))
    assert [r["instruction"] for r in read_prompts(str(path))] == ["첫 질문", "둘째"]
    assert [p["instruction"] for p in samples.read_prompts_file(path)] == ["첫 질문", "둘째"]
    text = tmp_path / "prompts.txt"  # a Notepad text file: the BOM is not part of the first prompt
    text.write_bytes(BOM + "첫 질문\n둘째\n".encode("utf-8"))
    assert [p["instruction"] for p in samples.read_prompts_file(text)] == ["첫 질문", "둘째"]


def test_extensions_are_read_in_any_case(tmp_path):
    rows = [json.loads(line) for line in open(SAMPLE, encoding="utf-8")][:4]
    upper = write_jsonl(tmp_path / "UP.JSONL", rows)
    assert data.load_dataset_any(upper).to_list() == data.load_dataset_any(write_jsonl(tmp_path / "lo.jsonl",
                                                                                       rows)).to_list()
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "A.JSONL", rows)
    write_jsonl(folder / "b.Jsonl", rows)
    assert len(data.load_dataset_any(str(folder))) == 8
    (tmp_path / "T.CSV").write_text("instruction,output\n질문,007\n", encoding="utf-8")
    assert data.load_dataset_any(str(tmp_path / "T.CSV"))[0] == {"instruction": "질문", "output": "007"}
    with pytest.raises(UserError, match="does not exist"):  # a missing local file, not a Hub id to look up
        data.load_dataset_any("MISSING.JSONL")
    prompts_file = tmp_path / "P.JSONL"  # JSON even when its first line does not look like it
    prompts_file.write_text('  \n["not", "a", "prompt"]\n', encoding="utf-8")
    with pytest.raises(UserError, match="line 2 has no non-empty"):
        samples.read_prompts_file(prompts_file)


@pytest.mark.parametrize("sep,name", [("\t", "tab"), (";", "semicolon")])
def test_a_csv_split_by_tabs_or_semicolons_is_refused_with_a_converter_that_works(tmp_path, sep, name):
    path = tmp_path / "sheet.csv"
    lines = ["instruction, in short", "input", "output"], ["질문, 쉼표", "", "007"], ["둘째", "x", "네"]
    path.write_text("".join(sep.join(cells) + "\n" for cells in lines), encoding="utf-8")
    with pytest.raises(UserError) as err:
        data.load_dataset_any(str(path))
    msg = str(err.value)
    assert f"{path} looks {name}-separated" in msg and "comma-separated" in msg, msg
    command = msg.split("`")[1]  # the command the message gives, run as given
    assert command == f"python -m sftkit.datafile {path} > {tmp_path / 'sheet.jsonl'}"
    out = subprocess.run([sys.executable, "-m", "sftkit.datafile", str(path)], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    (tmp_path / "sheet.jsonl").write_text(out, encoding="utf-8")
    assert data.load_dataset_any(str(tmp_path / "sheet.jsonl")).to_list() == [
        {"instruction, in short": "질문, 쉼표", "input": "", "output": "007"},
        {"instruction, in short": "둘째", "input": "x", "output": "네"}]


def test_the_converter_answers_help_and_names_a_missing_file(tmp_path, capsys):
    assert datafile.convert_main(["--help"]) == 0 and "usage: python -m sftkit.datafile" in capsys.readouterr().out
    assert datafile.convert_main([str(tmp_path / "nope.csv")]) == 1
    assert "'%s' does not exist" % (tmp_path / "nope.csv") in capsys.readouterr().err
    assert datafile.convert_main(["--bogus", "1"]) == 2 and "unknown '--bogus 1'" in capsys.readouterr().err
    assert datafile.convert_main([str(tmp_path)]) == 1 and "is a folder: name one .json or .csv file" in \
        capsys.readouterr().err


def test_a_csv_that_fails_to_parse_says_why(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text("instruction,output\na,b\nc,d,e\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"Expected 2 fields in line 3, saw 3.*text holding a comma .* double quotes"):
        data.load_dataset_any(str(path))


def test_a_batch_line_with_a_system_key_on_an_instruction_template_names_the_line(tmp_path):
    src = tmp_path / "q.jsonl"
    src.write_text('{"instruction": "a"}\n\n{"instruction": "b", "system": "짧게"}\n', encoding="utf-8")
    rows = read_prompts(str(src))
    g = prompts_only_generator()
    out = tmp_path / "a.jsonl"
    with pytest.raises(UserError) as err:
        run_batch(g, str(src), str(out), rows=rows)
    msg = str(err.value)
    assert f"--input_file {src} line 3" in msg and '"system" key needs a chat template' in msg, msg
    assert "alpaca_ko" in msg and "Drop \"system\"" in msg and "--system" not in msg
    assert not out.exists() or out.read_text() == ""  # refused before any answer
    batchfile.check_systems(prompts.load("chatml"), str(src), rows)  # a chat template takes it
    bad = write_jsonl(tmp_path / "n.jsonl", [{"instruction": "a", "system": 1}])
    with pytest.raises(UserError, match=r"line 1: 'system' holds a number, not text"):
        read_prompts(bad)


def prompts_only_generator():
    from sftkit.generate import open_generator

    return open_generator(model_name=TINY, prompt="alpaca_ko", max_new_tokens=2)


def test_a_dataset_folder_trains_on_its_training_files_not_a_test_split(tmp_path, caplog):
    """A folder holding train.jsonl and test.jsonl (as split data sets ship) trains on train.jsonl only, and says
    which files it used and left out; a folder of held-out names only is taken whole."""
    import logging


    rows = [json.loads(line) for line in Path(SAMPLE).read_text(encoding="utf-8").splitlines()[:16]]
    folder = tmp_path / "split"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", rows[:10])
    write_jsonl(folder / "test.jsonl", rows[10:14])
    write_jsonl(folder / "data-valid.jsonl", rows[14:])
    with caplog.at_level(logging.INFO, logger="sftkit"):
        ds = data.load_dataset_any(str(folder))
    assert len(ds) == 10 and [r["instruction"] for r in ds] == [r["instruction"] for r in rows[:10]]
    assert "training on train.jsonl; left out data-valid.jsonl, test.jsonl" in caplog.text
    only = tmp_path / "only"
    only.mkdir()
    write_jsonl(only / "dev.jsonl", rows[:3])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sftkit"):
        assert len(data.load_dataset_any(str(only))) == 3
    assert "training on dev.jsonl" in caplog.text and "left out" not in caplog.text  # nothing left out: not said

